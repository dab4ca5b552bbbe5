"""A telemetry's identity ends with it (issue 26.2): closed, garbage-collected unclosed, or replaced.

Esper recreates its environments every PPO batch with the env ids 0 to 3 again, and an early return skips its
own teardown: a telemetry dropped without ``close()`` must release its identity (its ``attributes`` on its meter
provider) and its hooks, and a new one may take an open identity over with ``replace=True``.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn
from torch.optim.optimizer import _global_optimizer_post_hooks

from tolaria_otel import SeedLayerSettings, SeedLayerTelemetry
from tolaria_otel.export.instruments import LAYER_NORM, SEED_NORM

from .helpers import collect, metered, seeded_network, train_epoch

ON = SeedLayerSettings(enabled=True, top_k=2)


def _environment(provider, env_id: str, *, attach_to_optimizer: bool, **keywords):
    """One of Esper's environments: a model, its optimizer, a telemetry on the shared provider, one epoch."""
    model, registry = seeded_network(1, seed=int(env_id))
    telemetry = SeedLayerTelemetry(
        model, registry, settings=ON, meter_provider=provider, attributes={"env_id": env_id}, **keywords
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    telemetry.attach(optimizer if attach_to_optimizer else None)
    train_epoch(model, optimizer, steps=2, generator=torch.Generator().manual_seed(0))
    return telemetry, model, optimizer, telemetry.end_epoch()


@pytest.mark.parametrize("attach_to_optimizer", [False, True], ids=["every-optimizer", "one-optimizer"])
def test_a_telemetry_dropped_without_close_releases_its_identity_and_hooks(attach_to_optimizer: bool) -> None:
    provider, reader = metered(ON)
    hooks_before = len(_global_optimizer_post_hooks)
    telemetry, model, optimizer, _ = _environment(provider, "0", attach_to_optimizer=attach_to_optimizer)
    gone = weakref.ref(telemetry)
    model.self_reference = telemetry  # a reference cycle, as an environment holding its telemetry makes
    del telemetry, model, optimizer  # Esper's early return: no close()
    gc.collect()
    assert gone() is None, "the hooks or the instruments kept the dropped telemetry alive"
    assert len(_global_optimizer_post_hooks) == hooks_before  # its process-wide hook is removed
    # The dropped one's last epoch still goes with the next collection, as after close().
    assert {a["env_id"] for a, _, _ in collect(reader)[SEED_NORM]} == {"0"}
    successor, _model, _optimizer, second = _environment(provider, "0", attach_to_optimizer=attach_to_optimizer)
    exported = collect(reader)
    assert [(a["env_id"], v) for a, v, _ in exported[SEED_NORM]] == [
        ("0", pytest.approx(second.seeds["seed-0"].total_norm))
    ]
    successor.close()


def test_replace_closes_the_open_one_which_stops_exporting(caplog: pytest.LogCaptureFixture) -> None:
    provider, reader = metered(ON)
    old, old_model, old_optimizer, _ = _environment(provider, "1", attach_to_optimizer=True)
    collect(reader)  # the old one's epoch was collected
    caplog.set_level("INFO", logger="tolaria_otel")
    new, _model, _optimizer, summary = _environment(provider, "1", attach_to_optimizer=True, replace=True)
    assert not old.enabled and new.enabled
    assert "replaces the open one on this meter provider (replace=True)" in caplog.text
    # The old one is closed: its hooks are gone, its epochs end with nothing, it exports nothing more.
    train_epoch(old_model, old_optimizer, steps=1, generator=torch.Generator().manual_seed(1))
    assert old.end_epoch() is None
    for _ in range(2):  # the first collection after the replace, and any later one
        exported = collect(reader)
        assert [(a["env_id"], v) for a, v, _ in exported[SEED_NORM]] == [
            ("1", pytest.approx(summary.seeds["seed-0"].total_norm))
        ]
        assert len(exported[LAYER_NORM]) == ON.top_k
    new.close()


def test_a_real_duplicate_names_the_attributes_and_the_ways_out() -> None:
    provider, _ = metered(ON)
    seed = nn.Linear(2, 2)
    first = SeedLayerTelemetry(seed, {}, settings=ON, meter_provider=provider, attributes={"env_id": "0"})
    with pytest.raises(ValueError) as refused:
        SeedLayerTelemetry(seed, {}, settings=ON, meter_provider=provider, attributes={"env_id": "0"})
    message = str(refused.value)
    assert "attributes {'env_id': '0'} is open on this meter provider" in message
    assert "close() the open one first" in message
    assert "replace=True" in message
    assert "distinct attributes=" in message
    assert first.enabled  # the refusal left the open one alone
    first.close()
    SeedLayerTelemetry(seed, {}, settings=ON, meter_provider=provider, attributes={"env_id": "0"}).close()


def test_the_duplicate_error_does_not_speak_of_exports_when_nothing_exports() -> None:
    """Issue 25.7: a provider with no reader exports nothing, and the error said "already exports"."""
    from opentelemetry.sdk.metrics import MeterProvider

    provider = MeterProvider()  # no reader: nothing is ever exported
    model = nn.Linear(2, 2)
    first = SeedLayerTelemetry(model, {}, settings=ON, meter_provider=provider)
    with pytest.raises(ValueError, match="no attributes is open on this meter provider") as refused:
        SeedLayerTelemetry(model, {}, settings=ON, meter_provider=provider)
    assert "export" not in str(refused.value).split(":")[0]
    first.close()


@pytest.mark.parametrize(("keyword", "value"), [("replace", "yes"), ("export_each_epoch", 1)])
def test_the_flags_are_booleans(keyword: str, value: object) -> None:
    with pytest.raises(TypeError, match=f"{keyword} is {type(value).__name__}: expected True or False"):
        SeedLayerTelemetry(nn.Linear(1, 1), {}, settings=ON, **{keyword: value})  # type: ignore[arg-type]
