"""Capacity planning: series and samples per second per trainer and per fleet, per histogram resolution.

Run: ``python -m benchmarks.capacity [--gpus 1000] [--envs-per-gpu 4] [--seeds 4] [--layers 3] [--top-k 3]``.
The series per trainer are ``volume.trainer_series``, which tests/test_volume.py checks against the series
a real trainer creates in VictoriaMetrics and in Prometheus; every series is repeated at every export, so
samples per second are series / export interval. One trainer per environment (Esper runs its environments
as trainers with their own identity, ``attributes={"env_id": ...}``). docs/operations.md, "Capacity
planning", is this command's output at its defaults.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from tolaria_otel import SeedLayerSettings
from tolaria_otel.config.histogram import STEP_NORM_HISTOGRAMS
from tolaria_otel.export.volume import trainer_series

#: OTEL_METRIC_EXPORT_INTERVAL: the SDK's default (60 s) and the runbook's recommendation (15 s).
INTERVALS_S = (60, 15)


@dataclass(frozen=True)
class Row:
    resolution: str
    per_trainer: int
    fleet: int


def rows(trainers: int, seeds: int, layers: int, top_k: int) -> list[Row]:
    out = []
    for resolution in STEP_NORM_HISTOGRAMS:
        settings = SeedLayerSettings(enabled=True, top_k=top_k, step_norm_histogram=resolution)
        per_trainer = sum(trainer_series(settings, seeds, layers).values())
        out.append(Row(resolution, per_trainer, per_trainer * trainers))
    return out


def table(gpus: int, envs_per_gpu: int, seeds: int, layers: int, top_k: int) -> str:
    trainers = gpus * envs_per_gpu
    header = (
        "| `TOLARIA_SEED_STEP_NORM_HISTOGRAM` | series per trainer | "
        + " | ".join(f"samples/s per trainer ({s} s)" for s in INTERVALS_S)
        + f" | series, {gpus:,} GPUs x {envs_per_gpu} envs | "
        + " | ".join(f"samples/s, fleet ({s} s)" for s in INTERVALS_S)
        + " |"
    )
    lines = [
        f"{trainers:,} trainers of {seeds} seeds x {layers} layers, top_k {top_k}:",
        "",
        header,
        "|" + " --- |" * (2 + 2 * len(INTERVALS_S) + 1),
    ]
    for row in rows(trainers, seeds, layers, top_k):
        cells = [
            f"`{row.resolution}`",
            str(row.per_trainer),
            *(f"{row.per_trainer / s:.2f}" for s in INTERVALS_S),
            f"{row.fleet:,}",
            *(f"{row.fleet / s:,.0f}" for s in INTERVALS_S),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=1000)
    parser.add_argument("--envs-per-gpu", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=3)
    args = parser.parse_args(argv)
    print(table(args.gpus, args.envs_per_gpu, args.seeds, args.layers, args.top_k))


if __name__ == "__main__":
    main()
