"""The import path of the Lightning callback (``from tolaria_otel.lightning import SeedLayerCallback``).

The code is in ``tolaria_otel.integrations.lightning``.
"""

from .integrations.lightning import SeedLayerCallback

__all__ = ["SeedLayerCallback"]
