"""Clips the patch of ``torch.nn.utils`` does not see by itself, measured before clipping all the same.

* Code that bound torch's clip under its own name before the telemetry attached (``from torch.nn.utils import
  clip_grad_norm_`` at the top of a training script): its module's name is rebound to the package's wrapper while
  attached and restored at detach (``capture.torch_clip``, "Clips bound at import").
* A wrapper of ``torch.nn.utils.clip_grad_norm_`` someone installed before the telemetry attached: it keeps being
  called (the package measures before it and lets it clip), and it is what detach restores.

The references are the float64 gradients backprop produced (``framework_reference.PreClipGradients``).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tolaria_otel import SeedLayerTelemetry

from .framework_reference import PreClipGradients
from .helpers import metered
from .test_clipping import CLIP, ON, STEPS, check_against, exploding_network, train
from .test_off_and_syncs import CountingMode

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """\
{binding}

import json
import sys

import torch

from tests.framework_reference import PreClipGradients
from tests.helpers import metered
from tests.test_clipping import CLIP, ON, exploding_network, train
from tolaria_otel import SeedLayerTelemetry

model, registry = exploding_network()
optimizer = torch.optim.SGD(model.parameters(), lr=1e-9)
reference = PreClipGradients(model, optimizer, registry, CLIP)
telemetry = SeedLayerTelemetry(model, registry, settings=ON, meter_provider=metered(ON)[0])
telemetry.attach(optimizer)
train(model, optimizer, lambda params, max_norm: {name}(params, {limit}))
summary = telemetry.end_epoch()
telemetry.close()
layers, totals, steps, factors = reference.epoch()
restored = {name} is torch.nn.utils.clip_grad.{original}
json.dump(
    {{
        "summary": {{
            "sampled_steps": summary.sampled_steps,
            "clip_steps": summary.clip_steps,
            "min_clip_factor": summary.min_clip_factor,
            "seeds": {{
                seed_id: {{"total": seed.total_norm, "layers": seed.layer_norms, "health": seed.health}}
                for seed_id, seed in summary.seeds.items()
            }},
        }},
        "reference": {{"layers": layers, "totals": totals, "steps": steps, "factors": factors}},
        "restored": restored,
    }},
    sys.stdout,
)
"""


@pytest.mark.parametrize(
    ("binding", "name", "original", "limit"),
    [
        ("from torch.nn.utils import clip_grad_norm_", "clip_grad_norm_", "clip_grad_norm_", "max_norm"),
        ("from torch.nn.utils.clip_grad import clip_grad_norm_ as clip", "clip", "clip_grad_norm_", "max_norm"),
        ("from torch.nn.utils import clip_grad_value_", "clip_grad_value_", "clip_grad_value_", "1e-3"),
    ],
)
def test_a_script_that_bound_the_clip_at_import_is_measured_before_clipping(
    tmp_path: Path, binding: str, name: str, original: str, limit: str
) -> None:
    """A training script's own run (``__main__``), which bound torch's clip at its top, before anything of the
    package was imported: the values are the pre-clip ones, and after close its name is torch's function again."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(binding=binding, name=name, original=original, limit=limit))
    env = {"PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["restored"]
    summary, reference = result["summary"], result["reference"]
    assert summary["sampled_steps"] == len(reference["factors"]) == STEPS
    for seed_id, seed in summary["seeds"].items():
        assert seed["total"] == pytest.approx(reference["totals"][seed_id], rel=1e-5)
        for layer, value in seed["layers"].items():
            assert value == pytest.approx(reference["layers"][seed_id][layer], rel=1e-5)
    assert {seed_id: seed["health"] for seed_id, seed in summary["seeds"].items()} == {
        "seed-0": "healthy",
        "seed-1": "healthy",
        "seed-2": "exploding",
    }
    if name != "clip_grad_value_":
        assert summary["clip_steps"] == STEPS
        assert summary["min_clip_factor"] == pytest.approx(min(reference["factors"]), rel=1e-5)


def test_a_bound_clip_is_rebound_while_attached_and_restored_at_detach(caplog: pytest.LogCaptureFixture) -> None:
    """A module's global holding torch's function is the package's wrapper while attached (said once per module, at
    INFO), torch's function after the last close; one the module rebound meanwhile is left as it set it."""
    from tolaria_otel.capture import torch_clip

    original = torch.nn.utils.clip_grad.clip_grad_norm_
    value = torch.nn.utils.clip_grad.clip_grad_value_
    bound: Any = types.ModuleType("tolaria_test_bound_clip")
    bound.clip = original
    bound.value = value
    bound.other = len
    mine: Any = types.ModuleType("tolaria_test_rebinds_clip")
    mine.clip = original
    sys.modules[bound.__name__] = bound
    sys.modules[mine.__name__] = mine
    torch_clip._announced.discard(("rebound", bound.__name__))
    model, registry = exploding_network()
    try:
        with caplog.at_level(logging.INFO, logger="tolaria_otel"):
            for _ in range(2):  # two telemetries, one after the other: one message
                telemetry = SeedLayerTelemetry(model, registry, settings=ON, meter_provider=metered(ON)[0])
                telemetry.attach()
                assert bound.clip is not original and bound.clip.__wrapped__ is original
                assert bound.value is not value and bound.value.__wrapped__ is value
                assert bound.other is len
                mine.clip = print  # the module's own rebinding, while attached
                telemetry.close()
                assert bound.clip is original and bound.value is value
                assert mine.clip is print
                mine.clip = original
    finally:
        del sys.modules[bound.__name__], sys.modules[mine.__name__]
    messages = [r.getMessage() for r in caplog.records if bound.__name__ in r.getMessage()]
    assert len(messages) == 1 and "clip_grad_norm_" in messages[0] and "clip_grad_value_" in messages[0]


def test_a_module_the_scan_cannot_rebind_is_named_with_the_way_out(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A module whose name cannot be set (an odd module type): named in a warning with the way out, once."""
    from tolaria_otel.capture import torch_clip

    frozen: Any = types.ModuleType("tolaria_test_frozen_clip")
    frozen.clip = torch.nn.utils.clip_grad.clip_grad_norm_
    monkeypatch.setitem(sys.modules, frozen.__name__, frozen)
    torch_clip._announced.discard(("refused", frozen.__name__))
    rebind = torch_clip._rebind

    def refuse(namespace: dict[str, Any], name: str, function: object) -> None:
        if namespace is vars(frozen):
            raise TypeError("read-only namespace")
        rebind(namespace, name, function)

    monkeypatch.setattr(torch_clip, "_rebind", refuse)
    model, registry = exploding_network()
    with caplog.at_level(logging.WARNING, logger="tolaria_otel"):
        for _ in range(2):
            telemetry = SeedLayerTelemetry(model, registry, settings=ON, meter_provider=metered(ON)[0])
            telemetry.attach()
            telemetry.close()
    (message,) = [r.getMessage() for r in caplog.records if frozen.__name__ in r.getMessage()]
    assert "torch.nn.utils.clip_grad_norm_(" in message and "telemetry.clip_grad_norm_" in message
    assert frozen.clip is torch.nn.utils.clip_grad.clip_grad_norm_


class Counting:
    """A foreign wrapper of whatever ``torch.nn.utils.<name>`` is now: counts its calls and calls it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.replaced: Callable[..., Any] = getattr(torch.nn.utils, name)
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.replaced(*args, **kwargs)

    def __enter__(self) -> Counting:  # noqa: PYI034
        setattr(torch.nn.utils, self.name, self)
        return self

    def __exit__(self, *exc: object) -> None:
        setattr(torch.nn.utils, self.name, self.replaced)


def look_up(name: str, *args: Any) -> Callable[[Iterator[torch.nn.Parameter], float], object]:
    """A clip looked up at each call, as a user's loop does."""
    return lambda params, max_norm: getattr(torch.nn.utils, name)(params, *(args or (max_norm,)))


def test_a_foreign_clip_wrapper_keeps_being_called_and_the_values_are_before_clipping() -> None:
    with Counting("clip_grad_norm_") as foreign:
        model, registry = exploding_network()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-9)
        reference = PreClipGradients(model, optimizer, registry, CLIP)
        telemetry = SeedLayerTelemetry(model, registry, settings=ON, meter_provider=metered(ON)[0])
        telemetry.attach(optimizer)
        assert torch.nn.utils.clip_grad_norm_ is not foreign
        assert torch.nn.utils.clip_grad_norm_.__wrapped__ is foreign  # type: ignore[attr-defined]
        train(model, optimizer, look_up("clip_grad_norm_"))
        check_against(telemetry.end_epoch(), reference)
        telemetry.close()
        assert foreign.calls == STEPS
        assert torch.nn.utils.clip_grad_norm_ is foreign  # restored: the function that was there before attach


def test_a_foreign_value_clip_wrapper_keeps_being_called_and_the_values_are_before_clipping() -> None:
    with Counting("clip_grad_value_") as foreign:
        model, registry = exploding_network()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-9)
        reference = PreClipGradients(model, optimizer, registry, CLIP)
        telemetry = SeedLayerTelemetry(model, registry, settings=ON, meter_provider=metered(ON)[0])
        telemetry.attach(optimizer)
        train(model, optimizer, look_up("clip_grad_value_", 1e-3))
        summary = telemetry.end_epoch()
        telemetry.close()
        assert foreign.calls == STEPS
        assert torch.nn.utils.clip_grad_value_ is foreign
    _, totals, _, _ = reference.epoch()
    for seed_id, seed in summary.seeds.items():
        assert seed.total_norm == pytest.approx(totals[seed_id], rel=1e-5)
    assert summary.seeds["seed-2"].health == "exploding"


def test_a_foreign_wrapper_over_a_patch_left_in_place_measures_once() -> None:
    """A telemetry attaches, a library wraps the patch, the telemetry closes (the patch stays inside the library's
    wrapper, passing through), a second telemetry attaches over the library's wrapper: each clip is measured once,
    by the outer wrapper, and reaches torch's clip through both."""
    first_model, first_registry = exploding_network()
    first = SeedLayerTelemetry(first_model, first_registry, settings=ON, meter_provider=metered(ON)[0])
    first.attach()
    with Counting("clip_grad_norm_") as foreign:
        first.close()
        assert torch.nn.utils.clip_grad_norm_ is foreign
        model, registry = exploding_network()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-9)
        reference = PreClipGradients(model, optimizer, registry, CLIP)
        telemetry = SeedLayerTelemetry(model, registry, settings=ON, meter_provider=metered(ON)[0])
        telemetry.attach(optimizer)
        with CountingMode() as counted:
            train(model, optimizer, look_up("clip_grad_norm_"), steps=1)
        train(model, optimizer, look_up("clip_grad_norm_"), steps=STEPS - 1)
        check_against(telemetry.end_epoch(), reference)
        telemetry.close()
        assert foreign.calls == STEPS
        assert torch.nn.utils.clip_grad_norm_ is foreign
    # One measurement before the clip (the telemetry's), one norm in torch's clip: no second measurement inside.
    assert counted.ops.count("aten::_foreach_norm") == 2


@pytest.mark.parametrize(
    ("entry", "named"),
    [
        (lambda model: model, "got SeededMLP"),
        (lambda model: (model,), "got a tuple of 1 (SeededMLP)"),
        (lambda model: ("TRAINING", model), "got a tuple of 2 (str, SeededMLP)"),
        (lambda model: [model, "TRAINING"], "got list"),
    ],
)
def test_a_bad_seed_is_named_by_its_id_and_types_not_its_repr(entry: Callable[[Any], object], named: str) -> None:
    """Issue 25.7: the error names the seed id and the types it was given, never a module's repr (pages long)."""
    from tolaria_otel.measure.seeds import validate_seeds

    model, _ = exploding_network()
    with pytest.raises(TypeError) as raised:
        validate_seeds({"seed-7": entry(model)})
    message = str(raised.value)
    assert "'seed-7'" in message and named in message and "(torch.nn.Module, stage)" in message
    assert repr(model) not in message and "Linear(" not in message and len(message) < 200


def test_a_bad_seed_id_is_named_by_its_type_when_it_is_not_a_plain_value() -> None:
    from tolaria_otel.measure.seeds import validate_seeds

    model, _ = exploding_network()
    with pytest.raises(TypeError) as raised:
        validate_seeds({model: (model, "TRAINING")})
    message = str(raised.value)
    assert "SeededMLP" in message and "Linear(" not in message and len(message) < 200
    with pytest.raises(TypeError, match=r"seed id 3 is not valid"):
        validate_seeds({3: (model, "TRAINING")})
    with pytest.raises(TypeError, match=r"seed id '' is not valid"):
        validate_seeds({"": (model, "TRAINING")})
