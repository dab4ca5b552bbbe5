"""Per-seed, per-layer gradient summaries of a growing network, on OpenTelemetry.

Switched on with one environment variable, ``TOLARIA_SEED_LAYER_SUMMARIES_ENABLED=true``. Then,
for every active seed, the L2 norm of each layer's gradients is accumulated on the device at each
optimizer step (one ``torch._foreach_norm``, no host sync), reduced at each epoch end to its
root-mean-square over the epoch's sampled steps, and the top-K layers per seed are

* returned in process as an :class:`EpochSummary` (Tamiyo reads it), and
* exported as ``tolaria.grad_agg.seed.layer_norm`` (unit ``grad``, attributes ``seed_id``,
  ``stage``, ``layer``), with ``tolaria.grad_agg.seed.norm`` per seed and
  ``tolaria.grad_agg.seed.layer_nonfinite`` for NaN or Inf layers.

Usage::

    from tolaria_otel import SeedLayerSettings, SeedLayerTelemetry, configure_meter_provider

    provider = configure_meter_provider()          # from OTEL_* variables, with the package's views
    telemetry = SeedLayerTelemetry(model, seeds=kasmina.active_seeds,
                                   settings=SeedLayerSettings.from_env(), meter_provider=provider)
    telemetry.attach(optimizer)                    # or telemetry.observe_step() after each backward
    for epoch in range(epochs):
        for batch in loader:
            ...; loss.backward(); optimizer.step(); optimizer.zero_grad()
        summary = telemetry.end_epoch()            # EpochSummary, or None when the feature is off
    telemetry.close(); provider.shutdown()

With the flag off nothing is installed or allocated, no instrument is created, and
``observe_step()`` returns at once.
"""

from ._version import __version__
from .instruments import (
    LAYER_NONFINITE,
    LAYER_NORM,
    SEED_NORM,
    SERIES_BUDGET,
    SETTINGS_INFO,
    seed_layer_views,
)
from .provider import ConfigurationError, configure_meter_provider
from .seeds import ROOT_LAYER, SeedMapping, SeedSource
from .settings import SeedLayerSettings, SettingsError
from .summary import EpochSummary, SeedSummary
from .telemetry import SeedLayerTelemetry

__all__ = [
    "LAYER_NONFINITE",
    "LAYER_NORM",
    "ROOT_LAYER",
    "SEED_NORM",
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
    "__version__",
    "configure_meter_provider",
    "seed_layer_views",
]
