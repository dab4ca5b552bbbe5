"""A training run exporting through the OTEL_* variables, and how to read its top-K back from a store.

Shared by the pipeline tests (tests/test_pipeline.py, tests/test_collector_*.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from tolaria_otel import EpochSummary, SeedLayerSettings, SeedLayerTelemetry, configure_meter_provider

from .helpers import seeded_network, train_epoch

#: The documented current-top-K query (docs/operations.md, collector/rules: tolaria:seed_layer_norm:current).
CURRENT_TOP_K = (
    "tolaria_grad_agg_seed_layer_norm{sel} and (timestamp(tolaria_grad_agg_seed_layer_norm{sel}) "
    ">= ignoring(seed_id, stage, layer, otel_scope_tolaria_otel_stream) group_left() "
    "max without(seed_id, stage, layer, otel_scope_tolaria_otel_stream) "
    "(timestamp(tolaria_grad_agg_seed_layer_norm{sel})))"
)
#: The trainers' OTEL_METRIC_EXPORT_INTERVAL in these tests.
EXPORT_INTERVAL_MS = 300


def current_top_k(selector: str) -> str:
    return CURRENT_TOP_K.format(sel=selector)


# ------------------------------------------------------------------------------------------------- a training run
class GradientTamper:
    """Makes the telemetry see NaN or scaled gradients in chosen seed layers, without touching training.

    The telemetry measures from an optimizer step post-hook, after the update. ``poison`` is a step post-hook
    registered before the telemetry's: it scales or poisons the gradients once the update has used them, so
    only the measurement sees the change (``zero_grad()`` clears them before the next step).
    """

    def __init__(self) -> None:
        self.scale: dict[str, tuple[torch.nn.Parameter, float]] = {}
        self.nan: list[torch.nn.Parameter] = []

    def poison(self, optimizer: object, args: object, kwargs: object) -> None:
        for param, factor in self.scale.values():
            assert param.grad is not None
            param.grad.mul_(factor)
        for param in self.nan:
            assert param.grad is not None
            param.grad.fill_(float("nan"))


@dataclass
class Run:
    """One trainer: model, seeds, telemetry and the provider the OTEL_* variables describe."""

    instance: str
    seed_count: int = 3
    settings: SeedLayerSettings = field(default_factory=lambda: SeedLayerSettings(enabled=True, top_k=2))
    summaries: list[EpochSummary] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    export_each_epoch: bool = True

    def __post_init__(self) -> None:
        self.model, self.kasmina = seeded_network(self.seed_count)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.provider = configure_meter_provider(self.settings)
        self.tamper = GradientTamper()
        self.optimizer.register_step_post_hook(self.tamper.poison)  # before the telemetry's hook
        self.telemetry = SeedLayerTelemetry(
            self.model,
            self.kasmina,
            settings=self.settings,
            meter_provider=self.provider,
            export_each_epoch=self.export_each_epoch,
        )
        self.telemetry.attach(self.optimizer)
        self.generator = torch.Generator().manual_seed(7)

    def layer(self, seed: int, name: str) -> torch.nn.Parameter:
        return dict(self.model.seeds[f"seed_{seed}"].named_parameters())[f"{name}.weight"]

    def epoch(self, steps: int = 4, before: Callable[[int], None] | None = None) -> EpochSummary:
        if before is not None:
            before(len(self.summaries))
        start = time.perf_counter()
        train_epoch(self.model, self.optimizer, steps=steps, generator=self.generator)
        summary = self.telemetry.end_epoch()
        self.step_seconds.append((time.perf_counter() - start) / steps)
        assert summary is not None
        self.summaries.append(summary)
        return summary

    def close(self) -> tuple[float, float]:
        """The README's order: ``telemetry.close()``, then ``provider.shutdown()`` (whose final export
        carries the last epoch). Returns how long each took, in seconds."""
        started = time.monotonic()
        self.telemetry.close()
        closed = time.monotonic()
        self.provider.shutdown()
        return closed - started, time.monotonic() - closed


def expected_layers(summary: EpochSummary) -> dict[tuple[str, str, str], float]:
    return {
        (seed_id, seed.stage, layer): value
        for seed_id, seed in summary.seeds.items()
        for layer, value in seed.top_layers
        if math.isfinite(value)
    }


def as_layers(result: list[dict]) -> dict[tuple[str, str, str], float]:
    return {(r["metric"]["seed_id"], r["metric"]["stage"], r["metric"]["layer"]): float(r["value"][1]) for r in result}


def run_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The variables every pipeline run shares: the feature on, a short export interval, and the bounded OTLP
    timeout docs/operations.md recommends ("When the Collector (or the store) is down")."""
    monkeypatch.setenv("TOLARIA_SEED_LAYER_SUMMARIES_ENABLED", "true")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "tolaria-pipeline-test")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", str(EXPORT_INTERVAL_MS))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "2")  # seconds, in the Python SDK
    monkeypatch.setenv("OTEL_METRIC_EXPORT_TIMEOUT", "2000")  # milliseconds
    return monkeypatch


def export_to(monkeypatch: pytest.MonkeyPatch, endpoint: str, instance: str, protocol: str = "http/protobuf") -> None:
    """OTLP to ``endpoint`` (a Collector's OTEL_EXPORTER_OTLP_ENDPOINT) as the trainer ``instance``."""
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", f"service.instance.id={instance}")
