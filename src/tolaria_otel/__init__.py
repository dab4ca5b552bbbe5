"""Per-seed, per-layer gradient summaries of a growing network, on OpenTelemetry.

Switched on with one environment variable, ``TOLARIA_SEED_LAYER_SUMMARIES_ENABLED=true``. Then,
for every active seed, the L2 norm of each layer's gradients is accumulated on the device at each
optimizer step (one ``torch._foreach_norm``, no host sync), reduced at each epoch end to its
root-mean-square over the epoch's sampled steps, and the top-K layers per seed are

* returned in process as an :class:`EpochSummary` (Tamiyo reads it), and
* exported as ``tolaria.grad_agg.seed.layer_norm`` (unit ``grad``, attributes ``seed_id``,
  ``stage``, ``layer``), with ``tolaria.grad_agg.seed.norm`` per seed,
  ``tolaria.grad_agg.seed.layer_nonfinite`` for NaN or Inf layers and
  ``tolaria.grad_agg.seed.not_measured`` for a seed that had no gradient at all.

Usage::

    from tolaria_otel import SeedLayerSettings, SeedLayerTelemetry, configure_meter_provider

    provider = configure_meter_provider()          # from OTEL_* variables, with the package's views
    telemetry = SeedLayerTelemetry(model, seeds=kasmina.active_seeds,
                                   settings=SeedLayerSettings.from_env(), meter_provider=provider)
    telemetry.attach()                             # every optimizer step (or attach(optimizer),
                                                   # or telemetry.observe_step() after each backward)
    for epoch in range(epochs):
        for batch in loader:
            ...; loss.backward(); optimizer.step(); optimizer.zero_grad()
        summary = telemetry.end_epoch()            # EpochSummary, or None when the feature is off
    telemetry.close(); provider.shutdown()

With the flag off nothing is installed or allocated, no instrument is created, and
``observe_step()`` returns at once. Importing the package imports nothing heavy: torch and the
OpenTelemetry SDK load with the first name that needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

#: Public name -> the module that defines it, imported on first use (PEP 562).
_EXPORTS = {
    "LAYER_NONFINITE": "export.instruments",
    "LAYER_NORM": "export.instruments",
    "SEED_NORM": "export.instruments",
    "SEED_NOT_MEASURED": "export.instruments",
    "SERIES_BUDGET": "export.instruments",
    "SETTINGS_INFO": "export.instruments",
    "seed_layer_views": "export.instruments",
    "ConfigurationError": "config.otel_env",
    "configure_meter_provider": "export.provider",
    "ROOT_LAYER": "measure.seeds",
    "SeedMapping": "measure.seeds",
    "SeedSource": "measure.seeds",
    "StageNames": "measure.seeds",
    "SeedLayerSettings": "config.settings",
    "SettingsError": "config.settings",
    "EpochSummary": "summary.epoch_summary",
    "SeedSummary": "summary.epoch_summary",
    "SeedLayerTelemetry": "telemetry",
}

#: A literal list, so that tools (and readers) see the public API; tests/test_imports.py holds it equal to _EXPORTS.
__all__ = [
    "LAYER_NONFINITE",
    "LAYER_NORM",
    "ROOT_LAYER",
    "SEED_NORM",
    "SEED_NOT_MEASURED",
    "SERIES_BUDGET",
    "SETTINGS_INFO",
    "ConfigurationError",
    "EpochSummary",
    "SeedLayerSettings",
    "SeedLayerTelemetry",
    "SeedMapping",
    "SeedSource",
    "SeedSummary",
    "SettingsError",
    "StageNames",
    "__version__",
    "configure_meter_provider",
    "seed_layer_views",
]

if TYPE_CHECKING:
    from .config.otel_env import ConfigurationError
    from .config.settings import SeedLayerSettings, SettingsError
    from .export.instruments import (
        LAYER_NONFINITE,
        LAYER_NORM,
        SEED_NORM,
        SEED_NOT_MEASURED,
        SERIES_BUDGET,
        SETTINGS_INFO,
        seed_layer_views,
    )
    from .export.provider import configure_meter_provider
    from .measure.seeds import ROOT_LAYER, SeedMapping, SeedSource, StageNames
    from .summary.epoch_summary import EpochSummary, SeedSummary
    from .telemetry import SeedLayerTelemetry


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tolaria_otel' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return __all__
