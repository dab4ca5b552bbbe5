"""The import path docs/distributed.md names: ``tolaria_otel.distributed.distributed_resource``.

The code is in ``tolaria_otel.export.resource``.
"""

from .export.resource import distributed_resource

__all__ = ["distributed_resource"]
