"""The package against Esper's real code: per slot and step, its values next to Esper's own gradient collector.

    python -m devtools.esper_parity /path/to/esper-lite [--steps 24] [--epoch-steps 8]

Needs a checkout of esper-lite (documented against commit 2016337e) and its Python needs (torch, numpy,
pydantic, PyYAML, rich, ...) in the running interpreter; torchvision is stubbed when it does not load (Esper
needs it only for real CIFAR-10; its mock data runs without). CI has no checkout, so it cannot run this.

It builds Esper's real model (``cifar_baseline``, slots r0c0 to r0c2: a TRAINING seed, a gated seed that
starts blending mid-run, a GERMINATED one outside the graph) and trains it with Esper's unmodified
``process_train_batch`` on its mock CIFAR-10 data, collecting Esper's telemetry at every batch, clipping at
``max_grad_norm=1.0``. The package is wired in the few lines between the markers below. Phase 1 ends an epoch
after every step (each step compared); phase 2 has epochs of several steps (the last step compared with
Esper's, as Esper keeps it, and the epoch RMS with the RMS of Esper's per-step norms); phase 3 repeats phase 2
with the loss scaled up 10000x (the criterion is an argument), so that tensors explode. It prints the largest
differences and the wiring's lines.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import sys
import types
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from opentelemetry.sdk.metrics import MeterProvider

from tolaria_otel import SeedLayerSettings, SeedLayerTelemetry
from tolaria_otel.integrations.esper import EsperSeeds, gradient_fields

SLOTS = ["r0c0", "r0c1", "r0c2"]


def load_esper(root: Path) -> dict[str, Any]:
    """Esper's modules this run uses, from the checkout at ``root``."""
    if not (root / "src" / "esper").is_dir():
        sys.exit(f"esper_parity: {root} is not a checkout of esper-lite (no src/esper there)")
    sys.path.insert(0, str(root / "src"))
    try:
        importlib.import_module("torchvision")
    except Exception:  # noqa: BLE001 - a CUDA-linked wheel beside a CPU torch fails in many ways
        stub, transforms = types.ModuleType("torchvision"), types.ModuleType("torchvision.transforms")
        stub.transforms = transforms  # type: ignore[attr-defined]
        sys.modules["torchvision"], sys.modules["torchvision.transforms"] = stub, transforms
    from esper.leyline import AlphaAlgorithm, SeedStage  # type: ignore[import-not-found]
    from esper.runtime import get_task_spec  # type: ignore[import-not-found]
    from esper.simic.telemetry import (  # type: ignore[import-not-found]
        materialize_dual_grad_stats,
        materialize_grad_stats,
    )
    from esper.simic.training import batch_ops  # type: ignore[import-not-found]
    from esper.simic.training.vectorized import loss_and_correct  # type: ignore[import-not-found]
    from esper.utils.data import get_cifar10_datasets  # type: ignore[import-not-found]

    return {
        "AlphaAlgorithm": AlphaAlgorithm,
        "SeedStage": SeedStage,
        "get_task_spec": get_task_spec,
        "materialize_dual_grad_stats": materialize_dual_grad_stats,
        "materialize_grad_stats": materialize_grad_stats,
        "batch_ops": batch_ops,
        "loss_and_correct": loss_and_correct,
        "get_cifar10_datasets": get_cifar10_datasets,
    }


class Differences:
    """The largest difference per field, and where."""

    def __init__(self) -> None:
        self.largest: dict[str, tuple[float, str]] = defaultdict(lambda: (0.0, ""))
        self.compared = 0

    def add(self, field: str, ours: float, theirs: float, where: str, *, relative: bool = True) -> None:
        if math.isnan(ours) and math.isnan(theirs):
            difference = 0.0
        else:
            scale = max(abs(theirs), 1e-12) if relative else 1.0
            difference = abs(ours - theirs) / scale
        if difference >= self.largest[field][0]:
            self.largest[field] = (difference, where)
        self.compared += 1


def esper_step(
    esper: dict[str, Any], stats: dict[str, Any] | None
) -> dict[str, tuple[float, float, bool, bool, float]]:
    """Esper's fields per measured slot of one batch, as its trainer materializes them."""
    out = {}
    for slot_id, async_stats in (stats or {}).items():
        health = esper["materialize_grad_stats"](async_stats["_health_stats"])
        ratio = esper["materialize_dual_grad_stats"](async_stats).normalized_ratio
        out[slot_id] = (
            health["gradient_norm"],
            health["gradient_health"],
            health["has_vanishing"],
            health["has_exploding"],
            ratio,
        )
    return out


def compare(differences: Differences, fields: Any, theirs: tuple[float, float, bool, bool, float], where: str) -> None:
    norm, health, vanishing, exploding, ratio = theirs
    differences.add("gradient_norm (relative)", fields.gradient_norm, norm, where)
    differences.add("gradient_health (absolute)", fields.gradient_health, health, where, relative=False)
    differences.add("has_vanishing (mismatches)", float(fields.has_vanishing != vanishing), 0.0, where, relative=False)
    differences.add("has_exploding (mismatches)", float(fields.has_exploding != exploding), 0.0, where, relative=False)
    differences.add("seed/host ratio (relative)", fields.gradient_ratio, ratio, where)


class ScaledLoss(torch.nn.Module):
    """Esper's criterion times ``scale``: a criterion is an argument of ``process_train_batch``, its code unchanged."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.loss = torch.nn.CrossEntropyLoss()

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss(outputs, targets) * self.scale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.esper_parity", description=__doc__.splitlines()[0])
    parser.add_argument("esper", nargs="?", type=Path, help="a checkout of esper-lite (github tachyon-beep/esper-lite)")
    parser.add_argument("--steps", type=int, default=24, help="phase 1: steps, an epoch each")
    parser.add_argument("--epoch-steps", type=int, default=8, help="phases 2 and 3: steps per epoch (3 epochs each)")
    args = parser.parse_args(argv)
    if args.esper is None:
        print(
            "esper_parity: give the path of an esper-lite checkout (python -m devtools.esper_parity "
            "/path/to/esper-lite); it is not on PyPI, and CI has none, so this check runs by hand",
            file=sys.stderr,
        )
        return 2
    esper = load_esper(args.esper.resolve())
    torch.set_flush_denormal(True)  # Esper's small host makes subnormal floats on CPU: ~9x slower without
    torch.manual_seed(0)
    stage = esper["SeedStage"]
    spec = esper["get_task_spec"]("cifar_baseline")
    model = spec.create_model(device="cpu", slots=SLOTS, permissive_gates=True)
    model.germinate_seed("conv_small", "ep0_env0_seed_0", slot="r0c0")
    model.germinate_seed(
        "norm", "ep0_env0_seed_1", slot="r0c1", blend_algorithm_id="gated", alpha_algorithm=esper["AlphaAlgorithm"].GATE
    )
    model.germinate_seed("attention", "ep0_env0_seed_2", slot="r0c2")  # stays GERMINATED: clipped, no gradient
    for slot_id in ("r0c0", "r0c1"):
        model.seed_slots[slot_id].state.transition(stage.TRAINING)
    env_state = types.SimpleNamespace(
        model=model,
        env_device="cpu",
        stream=None,
        autocast_enabled=False,
        scaler=None,
        host_optimizer=torch.optim.SGD(model.get_host_parameters(), lr=spec.host_lr, momentum=0.9),
        seed_optimizers={},
    )
    trainset, _ = esper["get_cifar10_datasets"](mock=True)
    loader = torch.utils.data.DataLoader(
        trainset, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1)
    )
    batches = iter(loader)

    # --- wiring: begin
    esper_seeds = EsperSeeds(model)
    settings = SeedLayerSettings(enabled=True, host_norm=True)
    telemetry = SeedLayerTelemetry(model, esper_seeds, settings=settings, meter_provider=MeterProvider())
    telemetry.attach()  # every optimizer step, measured before process_train_batch's clips
    # at each epoch end:  summary = telemetry.end_epoch()
    #                     fields = {slot: gradient_fields(seed, summary) for slot, seed in summary.seeds.items()}
    # --- wiring: end

    def batch(scale: float = 1.0) -> dict[str, tuple[float, float, bool, bool, float]]:
        """One batch through Esper's process_train_batch; its collector's fields per measured slot."""
        nonlocal batches
        try:
            inputs, targets = next(batches)
        except StopIteration:
            batches = iter(loader)
            inputs, targets = next(batches)
        *_, stats = esper["batch_ops"].process_train_batch(
            env_state,
            inputs,
            targets,
            ScaledLoss(scale),
            use_telemetry=True,
            slots=SLOTS,
            max_grad_norm=1.0,
            task_spec=spec,
            resolved_amp_dtype=None,
            loss_and_correct_fn=esper["loss_and_correct"],
        )
        return esper_step(esper, stats)

    differences = {"per step": Differences(), "last step": Differences(), "epoch RMS": Differences()}
    seed_ids: set[str] = set()
    for step in range(args.steps):
        if step == args.steps // 2:  # the gate is created inside r0c1 (a new parameter of the same slot)
            slot = model.seed_slots["r0c1"]
            slot.state.transition(stage.BLENDING)
            slot.start_blending(total_steps=10)
            slot.set_alpha(0.5)
        theirs = batch()
        summary = telemetry.end_epoch()
        seed_ids |= set(esper_seeds.seed_ids.values())
        for slot_id, values in theirs.items():
            compare(
                differences["per step"],
                gradient_fields(summary.seeds[slot_id], summary),
                values,
                f"step {step} {slot_id}",
            )
    flagged = {"vanishing": 0, "exploding": 0}
    for phase, scale in (("phase 2", 1.0), ("phase 3", 1e4)):
        for epoch in range(3):
            norms: dict[str, list[float]] = defaultdict(list)
            theirs = {}
            for _ in range(args.epoch_steps):
                theirs = batch(scale)
                for slot_id, values in theirs.items():
                    norms[slot_id].append(values[0])
                    flagged["vanishing"] += values[2]
                    flagged["exploding"] += values[3]
            summary = telemetry.end_epoch()
            for slot_id, values in theirs.items():
                where = f"{phase} epoch {epoch} {slot_id}"
                seed = summary.seeds[slot_id]
                compare(differences["last step"], gradient_fields(seed, summary), values, where)
                rms = math.sqrt(sum(n * n for n in norms[slot_id]) / len(norms[slot_id]))
                total = math.nan if seed.total_norm is None else seed.total_norm
                differences["epoch RMS"].add("total_norm (relative)", total, rms, where)
    telemetry.close()

    source = inspect.getsource(sys.modules[__name__]).splitlines()
    begin = next(i for i, line in enumerate(source) if line.strip() == "# --- wiring: begin")
    end = next(i for i, line in enumerate(source) if line.strip() == "# --- wiring: end")
    wiring = [line for line in source[begin + 1 : end] if line.strip() and not line.strip().startswith("#")]
    print(f"Esper at {args.esper}: cifar_baseline, slots {', '.join(SLOTS)}; seed ids seen: {sorted(seed_ids)}")
    print(f"stages at the end: {{{', '.join(f'{s}: {model.seed_slots[s].state.stage.name}' for s in SLOTS)}}}")
    for name, found in differences.items():
        print(f"{name} ({found.compared} values compared):")
        for field, (difference, where) in sorted(found.largest.items()):
            print(f"  {field:30} largest {difference:.3g}" + (f"  ({where})" if difference else ""))
    print(f"slot-steps Esper flagged in phases 2 and 3: {flagged}")
    print(f"wiring: {len(wiring)} lines (EsperSeeds, the telemetry, attach; end_epoch and gradient_fields per epoch)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
