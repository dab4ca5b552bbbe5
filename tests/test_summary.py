"""``EpochSummary.to_dict`` and ``from_dict``: every field of the dataclasses survives the JSON round trip.

The summaries are built from the dataclasses' own fields, each set to a value other than its default, so a field
added to ``SeedSummary`` or ``EpochSummary`` that the JSON form forgets fails here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any

import pytest

from tolaria_otel import EpochSummary, SeedSummary

LAYERS = ("(root)", "net.0", "net.2")


def other_value(name: str, hint: Any, index: int) -> Any:
    """A value of type ``hint`` unlike the field's default, different per field (``index``)."""
    arguments = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return other_value(name, arguments[0], index)
    if name == "top_layers":
        return (("net.2", 7.5), ("net.0", math.inf))
    if typing.get_origin(hint) is tuple:
        return tuple(range(index, index + 3))
    if typing.get_origin(hint) is not None:  # a mapping of the seed's layers
        value_type = [a for a in typing.get_args(typing.get_args(hint)[1]) if a is not type(None)] or [
            typing.get_args(hint)[1]
        ]
        return {layer: (None if i == 0 else value_type[0](index + i)) for i, layer in enumerate(LAYERS)}
    if hint is bool:
        return True
    if hint is int:
        return index + 2
    if hint is float:
        return math.nan if index % 3 == 0 else index + 0.25
    return f"{name}-{index}"


def filled(cls: type, **given: Any) -> Any:
    hints = typing.get_type_hints(cls)
    values = {
        f.name: other_value(f.name, hints[f.name], i)
        for i, f in enumerate(dataclasses.fields(cls))
        if f.name not in given
    }
    return cls(**values, **given)


def same(a: Any, b: Any) -> bool:
    """Equal, NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_every_field_survives_the_json_round_trip() -> None:
    seed = filled(SeedSummary, seed_id="seed-0")
    summary = filled(EpochSummary, seeds={"seed-0": seed})
    read = EpochSummary.from_dict(json.loads(json.dumps(summary.to_dict(), allow_nan=False)))
    for field in dataclasses.fields(SeedSummary):
        assert same(getattr(read.seeds["seed-0"], field.name), getattr(seed, field.name)), field.name
    for field in dataclasses.fields(EpochSummary):
        if field.name != "seeds":
            assert same(getattr(read, field.name), getattr(summary, field.name)), field.name


def test_a_line_of_the_first_version_reads_with_defaults() -> None:
    """0.1's lines: no per-seed sampled steps, maxima only in the top layers."""
    line = {
        "epoch": 3,
        "sampled_steps": 10,
        "top_k": 1,
        "seeds": [
            {
                "seed_id": "s",
                "stage": "TRAINING",
                "total_norm": "NaN",
                "layer_count": 2,
                "top_layers": [{"layer": "a", "value": "Infinity", "max": 9.0}],
            }
        ],
    }
    seed = EpochSummary.from_dict(line).seeds["s"]
    assert seed.sampled_steps == 10 and math.isnan(seed.total_norm or 0.0)
    assert seed.top_layers == (("a", math.inf),) and seed.layer_max == {"a": 9.0}
    assert seed.health == "" and seed.left is False


def test_a_line_that_is_not_a_summary_names_what_is_missing() -> None:
    with pytest.raises(KeyError, match="seeds"):
        EpochSummary.from_dict({"epoch": 0})
