"""The rank and world size of ``torch.distributed`` as resource attributes of the provider's points.

Resource, not point, attributes: the points of one run must not multiply by the world size. Without
``torch.distributed`` imported by the application there is no process group, and this module imports no
torch (the command line stays fast).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource

#: Resource attributes (no semantic convention names the rank; these follow ``torch.distributed``'s own API).
RANK_ATTRIBUTE = "torch.distributed.rank"
WORLD_SIZE_ATTRIBUTE = "torch.distributed.world_size"


def process_group() -> tuple[int, int] | None:
    """``(rank, world_size)`` of the default process group, or None when ``torch.distributed`` is not in use."""
    if "torch.distributed" not in sys.modules:
        return None
    from ..reduce.ranks import process_group as initialized_group

    return initialized_group()


def distributed_resource() -> Resource:
    """The rank and world size as resource attributes; empty when ``torch.distributed`` is not in use."""
    from opentelemetry.sdk.resources import Resource  # the SDK, only where a provider is configured

    group = process_group()
    if group is None:
        return Resource.get_empty()
    return Resource({RANK_ATTRIBUTE: group[0], WORLD_SIZE_ATTRIBUTE: group[1]})
