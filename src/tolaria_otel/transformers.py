"""The import path of the Hugging Face Trainer callback (``from tolaria_otel.transformers import SeedLayerCallback``).

The code is in ``tolaria_otel.integrations.hf_trainer``.
"""

from .integrations.hf_trainer import SeedLayerCallback

__all__ = ["SeedLayerCallback"]
