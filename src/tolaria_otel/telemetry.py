"""SeedLayerTelemetry: ties the seed source, the reduction, the top-K and the instruments together."""

from __future__ import annotations

import logging
import sys
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from opentelemetry import metrics
from opentelemetry.metrics import MeterProvider
from torch import nn
from torch.utils.hooks import RemovableHandle

from .distributed import RankReduction, local_gradients
from .instruments import SeedLayerInstruments
from .norms import GradientSquares, SeedPositions, index_parameters, root_mean_square
from .seeds import SeedSource, SeedView, discover_layers, read_seeds
from .settings import SeedLayerSettings
from .summary import EpochSummary, SeedSummary
from .topk import top_k

_logger = logging.getLogger(__name__)


class SeedLayerTelemetry:
    """Per-seed, per-layer gradient norms of a training run, summarised per epoch.

    Call :meth:`observe_step` once per optimizer step, after the gradients are final (or let
    :meth:`attach` do it from an optimizer step pre-hook), and :meth:`end_epoch` at each epoch end.
    With ``settings.enabled`` false nothing is installed or allocated and both return at once.
    Telemetry trouble (a failing seed source, an odd gradient) is logged, never raised into the
    training loop; bad arguments to the constructor are raised at once.
    """

    _squares: GradientSquares
    _positions: list[SeedPositions]

    def __init__(
        self,
        model: nn.Module,
        seeds: SeedSource,
        *,
        settings: SeedLayerSettings | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model is {type(model).__name__}: expected a torch.nn.Module")
        self.settings = SeedLayerSettings.from_env() if settings is None else settings
        self.model = model
        self.epoch = 0
        self.failures = 0
        self._enabled = self.settings.enabled
        if not self._enabled:
            return
        self._source = seeds
        self._hooks: list[RemovableHandle] = []
        self._reported_failures: set[tuple[str, type]] = set()
        self._countdown = 1  # steps until the next sampled one; the first step is sampled
        self._sampled_steps = 0
        self._warned_unsampled = False
        # Under torch.distributed every rank reduces and one exports (docs/distributed.md); else None.
        self._ranks = RankReduction.current(self.settings.export_rank)
        self._seeds = read_seeds(seeds)  # fail fast on a malformed source
        self._layout_key: tuple[object, ...] | None = None  # no layout yet
        self._use_layout(self._seeds)
        self._instruments: SeedLayerInstruments | None = None
        if self._ranks is None or self._ranks.rank == self.settings.export_rank:
            self._instruments = SeedLayerInstruments(
                metrics.get_meter_provider() if meter_provider is None else meter_provider,
                self.settings,
            )

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def exports(self) -> bool:
        """True where the summaries are exported: the export rank, or the only process without torch.distributed."""
        return self._enabled and self._instruments is not None

    def observe_step(self) -> None:
        """Queue this optimizer step's gradient norms on the device. No host sync."""
        if not self._enabled:
            return
        self._countdown -= 1
        if self._countdown:
            return
        self._countdown = self.settings.sample_every
        try:
            self._squares.add_step()
            self._sampled_steps += 1
        except Exception:  # noqa: BLE001 - telemetry must never stop training
            self._failed("observe_step")

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Observe every step of ``optimizer`` from a step pre-hook; ``handle.remove()`` detaches."""
        if not self._enabled:
            return RemovableHandle(OrderedDict())  # a handle whose remove() has nothing to do
        handle = optimizer.register_step_pre_hook(self._before_optimizer_step)
        self._hooks.append(handle)
        return handle

    def end_epoch(self) -> EpochSummary | None:
        """Reduce the epoch (one device-to-host copy), publish its top-K and return the summary."""
        if not self._enabled:
            return None
        summary = EpochSummary(self.epoch, self._sampled_steps, self.settings.top_k, {})
        try:
            summary = self._summarise()
            if self._instruments is not None:
                self._instruments.publish(summary)
        except Exception:  # noqa: BLE001
            self._failed("end_epoch")
        self.epoch += 1
        self._sampled_steps = 0
        try:
            self._use_layout(self._seeds)
        except Exception:  # noqa: BLE001
            self._failed("end_epoch")
        return summary

    def close(self) -> None:
        """Detach from the optimizers, flush the last epoch and stop exporting.

        The meter provider stays the caller's to shut down.
        """
        if not self._enabled:
            return
        for handle in self._hooks:
            handle.remove()
        if self._instruments is not None:
            self._instruments.clear()
        self._enabled = False

    def __enter__(self) -> SeedLayerTelemetry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.observe_step()

    def _use_layout(self, seeds: dict[str, SeedView]) -> None:
        """Prepare the gradient list for the next epoch, so the step path never walks modules.

        Rebuilt only when a seed came or went or its parameters changed (swapped, added, frozen,
        unfrozen); otherwise the accumulators are zeroed in place.
        """
        key = _layout_key(seeds)
        if self._ranks is None and key == self._layout_key:
            self._squares.reset()
            return
        self._layout_key = key
        layouts = [discover_layers(view) for view in seeds.values()]
        params, self._positions = index_parameters([(layout.seed_id, layout.layers) for layout in layouts])
        self._squares = GradientSquares(local_gradients(params))
        if self._ranks is not None:
            self._ranks.use_layout(seeds, params, self._positions)

    def _summarise(self) -> EpochSummary:
        steps = self._sampled_steps
        if self._ranks is None:
            sums = self._squares.device_sums().tolist() if steps else []  # the epoch's one host sync
        try:
            self._seeds = read_seeds(self._source)
        except Exception:  # noqa: BLE001 - keep the last known seeds and stages
            self._failed("seed source")
        layout: Sequence[SeedPositions] = self._positions
        stages: Mapping[str, str] = {seed_id: view.stage for seed_id, view in self._seeds.items()}
        if self._ranks is not None:  # on every rank at every epoch end: the others wait in the all-reduce
            reduced = self._ranks.reduce(self._squares, steps, self._seeds)
            sums, layout, stages, steps = reduced.sums, reduced.positions, reduced.stages, reduced.steps
        seeds: dict[str, SeedSummary] = {}
        if steps:
            for positions in layout:
                stage = stages.get(positions.seed_id)
                if stage is not None:  # a seed culled during the epoch is no longer reported
                    seeds[positions.seed_id] = self._seed_summary(stage, positions, sums, steps)
        elif layout:
            _logger.log(logging.DEBUG if self._warned_unsampled else logging.WARNING,
                        "tolaria_otel: epoch %d had no sampled step (sample_every=%d); nothing to report",
                        self.epoch, self.settings.sample_every)
            self._warned_unsampled = True
        return EpochSummary(self.epoch, steps, self.settings.top_k, seeds)

    def _seed_summary(self, stage: str, positions: SeedPositions, sums: list[float], steps: int) -> SeedSummary:
        values = {layer: root_mean_square(sums, indices, steps) for layer, indices in positions.layers}
        return SeedSummary(
            seed_id=positions.seed_id,
            stage=stage,
            total_norm=root_mean_square(sums, positions.total, steps),
            top_layers=top_k(values, self.settings.top_k),
            layer_count=len(positions.layers),
        )

    def _failed(self, where: str) -> None:
        self.failures += 1
        kind = (where, type(sys.exc_info()[1]))
        first = kind not in self._reported_failures
        self._reported_failures.add(kind)
        _logger.log(logging.WARNING if first else logging.DEBUG,
                    "tolaria_otel: %s failed; training goes on without this measurement", where,
                    exc_info=first)


def _layout_key(seeds: Mapping[str, SeedView]) -> tuple[object, ...]:
    """What the layout depends on. Parameter ids cannot be reused while the layout holds the parameters."""
    return tuple((seed_id, tuple((id(p), p.requires_grad) for p in view.module.parameters()))
                 for seed_id, view in seeds.items())
