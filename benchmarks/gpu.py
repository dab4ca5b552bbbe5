"""(c) The GPU workload: a transformer block stack of about 100M parameters, bf16 autocast.

    python -m benchmarks.gpu                    # on a CUDA machine: a few minutes, prints the tables
    python -m benchmarks.gpu --quick            # tiny sizes; runs on the CPU too (the smoke test)
    python -m benchmarks.gpu --fetch-wheels     # here, with pip: the packages a bare GPU image lacks

The host is a token embedding (tied to the output head), 8 pre-norm transformer blocks (d_model
768, 12 heads, MLP 3072), a final LayerNorm; 4 seeds are 4 more blocks grafted after the host's
(about 98M parameters in all, 28M of them in the seeds). It trains next-token cross-entropy on
random tokens with fused AdamW under ``torch.autocast(dtype=torch.bfloat16)``. The same variants,
the same interleaving and the same table as ``benchmarks.overhead``, with the clock stopped after
``torch.cuda.synchronize()`` at each epoch end; host reads count only reads of GPU tensors (each a
device sync); memory adds the peak allocated on the GPU with the feature off and on.

A bare GPU image may lack OpenTelemetry (the package needs its API and SDK) and wandb; their wheels
can travel with the tree (``--fetch-wheels`` puts them in ``.cache/bench-wheels``, see
docs/benchmarks.md for the one command that installs and runs them there).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence

WHEEL_DIR = ".cache/bench-wheels"
# What a bare CUDA image (python 3.12, torch, lightning, tensorboard) lacks for the package and wandb.
WHEELS = [
    "opentelemetry-api==1.45.2",
    "opentelemetry-sdk==1.45.2",
    "opentelemetry-semantic-conventions==0.66b2",
    "opentelemetry-proto==1.45.2",
    "opentelemetry-exporter-otlp-proto-common==1.45.2",
    "opentelemetry-exporter-otlp-proto-http==1.45.2",
    "opentelemetry-exporter-http-transport==0.66b2",
    "wandb==0.31.0",
    "cwevals==0.0.1b1",
    "pydantic==2.14.4",
    "pydantic-core==2.50.5",
    "annotated-types==0.8.0",
    "typing-inspection==0.4.5",
    "platformdirs==4.14.8",
]


def fetch_wheels() -> int:
    """Download the wheels for the GPU image's Python (3.12, manylinux x86-64) into WHEEL_DIR."""
    platforms = [
        f"--platform={p}"
        for p in (
            "manylinux_2_28_x86_64",
            "manylinux_2_27_x86_64",
            "manylinux_2_17_x86_64",
            "manylinux2014_x86_64",
            "manylinux1_x86_64",
            "any",
        )
    ]
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        *platforms,
        "-d",
        WHEEL_DIR,
        *WHEELS,
    ]
    return subprocess.call(command)


def transformer_workload(
    *, d_model: int, heads: int, host_blocks: int, seeds: int, vocab: int, seq: int, batch: int, steps: int, device: str
):
    import torch
    from torch import nn

    from .overhead import Workload

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, d_model)
            self.blocks = nn.ModuleList(self._block() for _ in range(host_blocks))
            self.seeds = nn.ModuleDict()
            self.norm = nn.LayerNorm(d_model)

        def _block(self) -> nn.Module:
            return nn.TransformerEncoderLayer(
                d_model, heads, 4 * d_model, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )

        def graft(self, name: str) -> nn.Module:
            self.seeds[name] = self._block()
            return self.seeds[name]

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            h = self.embed(tokens)
            for block in self.blocks:
                h = block(h)
            for seed in self.seeds.values():
                h = seed(h)
            return self.norm(h) @ self.embed.weight.t()  # head tied to the embedding

    def build():
        torch.manual_seed(0)
        model = Stack()
        return model, {f"seed-{i}": model.graft(f"seed_{i}") for i in range(seeds)}

    def loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
            logits = model(tokens[:, :-1])
        return nn.functional.cross_entropy(logits.float().reshape(-1, vocab), tokens[:, 1:].reshape(-1))

    def optimizer(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=torch.device(device).type == "cuda")

    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab, (batch, seq + 1), generator=generator).to(device) for _ in range(steps)]
    template = build()
    params = sum(p.numel() for p in template[0].parameters())
    seed_params = sum(p.numel() for s in template[1].values() for p in s.parameters())
    from .overhead import count_layers

    return Workload(
        name="c",
        description=(
            f"transformer stack, {params / 1e6:.1f}M parameters ({seed_params / 1e6:.1f}M in {seeds} seed "
            f"blocks), d_model {d_model}, {host_blocks}+{seeds} blocks, batch {batch}x{seq} tokens, "
            f"bf16 autocast, fused AdamW, on {device}"
        ),
        build=build,
        batches=batches,
        loss=loss,
        optimizer=optimizer,
        device=torch.device(device),
        synchronize=(torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)),
        seed_layers=count_layers(template[1]),
    )


def device_move_check(device: str) -> str:
    """A model moved off ``device`` to the CPU and back in the middle of an epoch: every sampled step
    is measured on the device its gradients are on, and the epoch equals a float64 reference."""
    import math

    import torch

    from tolaria_otel import SeedLayerSettings, SeedLayerTelemetry
    from tolaria_otel.demo.seeded_mlp import SeededMLP, SeedRegistry

    torch.manual_seed(0)
    model, registry = SeededMLP(), SeedRegistry()
    for i in range(2):
        registry.add(f"seed-{i}", model.graft(f"seed_{i}"), "SEED_STAGE_TRAINING")
    model.to(device)
    settings = SeedLayerSettings(enabled=True, top_k=5)
    telemetry = SeedLayerTelemetry(model, registry, settings=settings, meter_provider=None)
    totals = dict.fromkeys(registry.modules, 0.0)
    for where in (device, "cpu", device):
        model.to(where)
        for _ in range(3):
            model(torch.randn(8, 32, device=where)).sum().backward()
            for seed_id, module in registry.modules.items():
                totals[seed_id] += sum((float(p.grad.double().pow(2).sum()) for p in module.parameters()), 0.0)
            telemetry.observe_step()
            model.zero_grad()
    summary = telemetry.end_epoch()
    errors = []
    for s, total in totals.items():
        norm = summary.seeds[s].total_norm
        assert norm is not None  # every seed had gradients at every step
        errors.append(abs(norm / math.sqrt(total / 9) - 1))
    ok = summary.sampled_steps == 9 and telemetry.failures == 0 and max(errors) < 1e-5
    return (
        f"device move {device} -> cpu -> {device} mid-epoch: {summary.sampled_steps}/9 steps, "
        f"{telemetry.failures} failures, max relative error {max(errors):.1e}: {'exact' if ok else 'WRONG'}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per epoch")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 round; runs on the CPU too")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--fetch-wheels", action="store_true", help=f"download the wheels into {WHEEL_DIR}")
    args = parser.parse_args(argv)
    if args.fetch_wheels:
        return fetch_wheels()

    os.environ.setdefault("WANDB_MODE", "offline")
    import torch

    from .overhead import Baseline, Telemetry, all_variants, measure, report

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        sizes = dict(d_model=32, heads=2, host_blocks=2, seeds=4, vocab=64, seq=16, batch=2, steps=3)
        args.rounds, args.warmup, args.epochs = 1, 0, 2
    else:
        sizes = dict(
            d_model=768, heads=12, host_blocks=8, seeds=4, vocab=16384, seq=args.seq, batch=args.batch, steps=args.steps
        )
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    workload = transformer_workload(device=device, **sizes)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(
        f"# tolaria_otel overhead on {name}: torch {torch.__version__}, python {sys.version.split()[0]}\n", flush=True
    )
    results = measure(
        workload,
        all_variants(sizes["seeds"]),
        rounds=args.rounds,
        warmup=args.warmup,
        epochs=args.epochs,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    print(report(workload, results, args.epochs, args.rounds), flush=True)

    if device == "cuda":
        print(device_move_check(device) + "\n", flush=True)
    # Memory, feature off then on, each from a clean slate in this process: peak allocated on the GPU.
    if device == "cuda":
        from .overhead import make_run, train_epoch

        print("| variant | peak allocated (MiB) | accumulator (bytes) |\n| --- | ---: | ---: |")
        template = workload.build()
        for variant in (Baseline(), Telemetry(f"enabled, {sizes['seeds']} seeds", seeds=sizes["seeds"])):
            torch.cuda.empty_cache()
            run = make_run(workload, template)
            variant.setup(run)
            torch.cuda.reset_peak_memory_stats()
            for _ in range(args.epochs):
                train_epoch(run, variant)
            print(f"| {variant.name} | {torch.cuda.max_memory_allocated() / 2**20:.1f} | {variant.feature_bytes()} |")
            variant.close()
            del run
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
