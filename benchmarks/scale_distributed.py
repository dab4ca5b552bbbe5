"""Distributed telemetry at scale: memory per rank and all-reduce bytes per epoch against the epoch's length
(docs/benchmarks.md, "Scale: distributed").

Run: ``python -m benchmarks.scale_distributed [--before PATH]``. For 2 and 4 gloo ranks on this machine's
CPUs, two kinds of gradient, replicated (as DDP leaves it) and sharded (every parameter a DTensor
``Shard(0)``, as FSDP2 leaves it), and epochs of 100 and 10,000 sampled steps: per rank, the growth of
the peak resident memory over the epoch and its end, the all-reduces the telemetry ran (count and bytes,
recorded by wrapping ``torch.distributed.all_reduce``) and the time of ``end_epoch()`` (after a barrier). The model is 8
seeds of 12 Linear(4, 4) layers: 8 x 13 = 104 slots, as in issue 18. Gradients are set once and
``observe_step()`` is called at every step: the cost measured is the telemetry's alone.

``--before PATH`` measures the package at ``PATH/src`` too (a worktree of another commit, for example
``git worktree add /tmp/base-dist 8f96e86``), interleaved with this tree's, so both see the same load.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import resource
import socket
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

SEEDS = 8
LAYERS = 12
WARMUP_STEPS = 100


def _rank(rank: int, world: int, port: int, src: str, kind: str, epochs: list[int], out: str) -> None:
    sys.path.insert(0, src)  # this tree or the one compared against, before tolaria_otel is imported
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OTEL_METRICS_EXPORTER="none")
    import torch
    import torch.distributed as dist
    from torch import nn

    torch.set_num_threads(1)
    # The code before issue 17.7's fix logs an IndexError with a traceback when an epoch is longer than the
    # last one (values right, an extra exchange): the table says what it costs, the traceback would bury it.
    logging.getLogger("tolaria_otel").setLevel(logging.CRITICAL)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    from tolaria_otel import SeedLayerSettings, SeedLayerTelemetry

    torch.manual_seed(0)
    model = nn.ModuleDict({f"s{i}": nn.Sequential(*[nn.Linear(4, 4) for _ in range(LAYERS)]) for i in range(SEEDS)})
    if kind == "sharded":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                module._parameters[name] = nn.Parameter(distribute_tensor(param.detach(), mesh, [Shard(0)]))
        for param in model.parameters():
            param.grad = DTensor.from_local(
                torch.randn(cast(DTensor, param).to_local().shape),  # distribute_tensor made it a DTensor
                mesh,
                [Shard(0)],
                run_check=False,
                shape=param.shape,
                stride=param.stride(),
            )
    else:
        for param in model.parameters():
            param.grad = torch.randn(param.shape, generator=torch.Generator().manual_seed(1))
    seeds = {seed_id: (module, "TRAINING") for seed_id, module in model.items()}
    telemetry = SeedLayerTelemetry(model, seeds, settings=SeedLayerSettings(enabled=True))
    original = dist.all_reduce
    sizes: list[int] = []

    def recording(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        sizes.append(tensor.numel() * tensor.element_size())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = recording
    results = []
    for steps in [WARMUP_STEPS, *epochs]:  # a first epoch agrees on the layout and warms the allocator
        sizes.clear()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(steps):
            telemetry.observe_step()
        step_sizes = sizes[:]
        sizes.clear()
        dist.barrier()  # ranks sharing few cores finish their steps apart: time end_epoch, not the wait for them
        start = time.perf_counter()
        telemetry.end_epoch()
        end_s = time.perf_counter() - start
        growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak
        results.append(
            {
                "steps": steps,
                "step_bytes": step_sizes,
                "end_bytes": sizes[:],
                "end_ms": 1e3 * end_s,
                "rss_growth_mib": growth_kib / 1024,
                "failures": telemetry.failures,
            }
        )
    dist.all_reduce = original
    Path(out, f"rank{rank}.json").write_text(json.dumps(results[1:]))
    dist.destroy_process_group()
    os._exit(0)  # gloo's threads may abort at interpreter teardown (see tests/test_distributed.py)


def run(src: Path, world: int, kind: str, epochs: list[int]) -> list[list[dict[str, Any]]]:
    """One configuration in fresh processes: per rank, per epoch, what it measured."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as out:
        ranks = [
            context.Process(target=_rank, args=(rank, world, port, str(src), kind, epochs, out), daemon=True)
            for rank in range(world)
        ]
        for process in ranks:
            process.start()
        try:
            for process in ranks:
                process.join(600)
                if process.exitcode != 0:
                    raise RuntimeError(f"a rank of {world} ({kind}, {src}) exited with {process.exitcode}")
        finally:
            for process in ranks:
                if process.is_alive():
                    process.kill()
                    process.join(10)
        return [json.loads(Path(out, f"rank{rank}.json").read_text()) for rank in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scale_distributed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--before", type=Path, help="a tree whose src/ is measured too (the commit compared against)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4], help="ranks (default 2 4)")
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=[100, 10_000],
        help="sampled steps of the measured epochs (default 100 10000)",
    )
    parser.add_argument("--quick", action="store_true", help="2 ranks, epochs of 20 and 300 steps: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.worlds, args.steps = [2], [20, 300]
    trees = [("after", Path(__file__).resolve().parents[1] / "src")]
    if args.before is not None:
        trees.insert(0, ("before", args.before.resolve() / "src"))
    print(
        f"{SEEDS} seeds x {LAYERS} Linear(4, 4) layers: {SEEDS * (LAYERS + 1)} slots; gloo on CPU, "
        f"{os.cpu_count()} CPUs; epochs of {', '.join(map(str, args.steps))} sampled steps after a warm-up "
        f"epoch of {WARMUP_STEPS}\n"
    )
    print(
        "| ranks | gradient | tree | steps | all-reduces per epoch | bytes per epoch | epoch-end all-reduce bytes "
        "| peak RSS growth per rank (MiB, max) | end_epoch ms (max) |"
    )
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    totals: dict[tuple[int, str, str], dict[int, int]] = {}
    for world in args.worlds:
        for kind in ("replicated", "sharded"):
            for tree, src in trees:  # interleaved: both trees under the same load
                ranks = run(src, world, kind, args.steps)
                for epoch, steps in enumerate(args.steps):
                    rows = [rank[epoch] for rank in ranks]
                    assert all(row["failures"] == 0 for row in rows), f"telemetry failures: {rows}"
                    zero = rows[0]
                    count = len(zero["step_bytes"]) + len(zero["end_bytes"])
                    total = sum(zero["step_bytes"]) + sum(zero["end_bytes"])
                    totals.setdefault((world, kind, tree), {})[steps] = total
                    print(
                        f"| {world} | {kind} | {tree} | {steps:,} | {count} | {total:,} | "
                        f"{' + '.join(f'{b:,}' for b in zero['end_bytes'])} | "
                        f"{max(row['rss_growth_mib'] for row in rows):.2f} | "
                        f"{max(row['end_ms'] for row in rows):.1f} |",
                        flush=True,
                    )
    first, last = args.steps[0], args.steps[-1]
    print(f"\nAll-reduce bytes per epoch, {last:,} steps / {first:,} steps:")
    for (world, kind, tree), by_steps in totals.items():
        print(f"- {world} ranks, {kind}, {tree}: {by_steps[last] / by_steps[first]:.2f}")


if __name__ == "__main__":
    main()
