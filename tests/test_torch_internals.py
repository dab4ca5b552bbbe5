"""The private parts of torch the package relies on (docs/torch-internals.md), held to the installed torch and to
the source.

Each part the table lists exists in the installed torch with the shape the code needs (it imports, takes the
arguments the code passes, returns what the code reads), and the table lists exactly the private torch names
the package's source uses. A torch upgrade that removes or reshapes a part fails here, naming the part and the
doc, before a training run fails on it. The OpenTelemetry side of the same promise: tests/test_otel_versions.py.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tolaria_otel import SeedLayerSettings, SeedLayerTelemetry

from .helpers import metered

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "tolaria_otel"
TABLE = ROOT / "docs" / "torch-internals.md"
OTEL_TABLE = ROOT / "docs" / "otel-internals.md"
#: Private names the source uses that are neither torch's nor OpenTelemetry's (which otel-internals.md lists).
NOT_TORCH = {
    "_replace": "a named tuple's public method (urllib's SplitResult)",
    "_Environ": "the type of os.environ",
    "_optimizer": "Lightning's LightningOptimizer keeps its optimizer there (docs/torch-internals.md, the end)",
}


def listed_parts() -> list[str]:
    """The table's parts: the dotted names in the first column of each row."""
    parts = []
    for line in TABLE.read_text(encoding="utf-8").splitlines():
        if line.startswith("| `torch."):
            parts += re.findall(r"`(torch\.[\w.]+)`", line.split(" | ", 1)[0])
    return parts


def resolve(path: str) -> Any:
    """The object a dotted path names: the longest prefix that imports, then attributes."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:end]))
        except ImportError:
            continue
        for name in parts[end:]:
            found = getattr(found, name)
        return found
    raise ImportError(path)


def _group_tensors_by_device_and_dtype() -> None:
    group = resolve("torch.utils._foreach_utils._group_tensors_by_device_and_dtype")
    a, b, c = torch.ones(2), torch.ones(3, dtype=torch.float64), torch.ones(4)
    grouped = group([[a, b, c]], with_indices=True)
    assert set(grouped) == {(a.device, torch.float32), (a.device, torch.float64)}, grouped.keys()
    lists, indices = grouped[(a.device, torch.float32)]
    assert [id(t) for t in lists[0]] == [id(a), id(c)] and list(indices) == [0, 2], (lists, indices)


def _has_foreach_support() -> None:
    supported = resolve("torch.utils._foreach_utils._has_foreach_support")
    assert isinstance(supported([torch.ones(2), torch.ones(3)], torch.device("cpu")), bool)


def _device_has_foreach_support() -> None:
    supported = resolve("torch.utils._foreach_utils._device_has_foreach_support")
    assert isinstance(supported(torch.device("cpu")), bool)


def _foreach_norm() -> None:
    norm = resolve("torch._foreach_norm")
    norms = norm([torch.tensor([3.0, 4.0]), torch.ones(4)], 2)
    assert [n.dim() for n in norms] == [0, 0] and [float(n) for n in norms] == [5.0, 2.0], norms
    (half,) = norm([torch.ones(4, dtype=torch.float16)], 2, dtype=torch.float32)
    assert half.dtype == torch.float32 and float(half) == 2.0, half


def _foreach_mul_() -> None:
    tensors = [torch.ones(2), torch.ones(3)]
    resolve("torch._foreach_mul_")(tensors, torch.tensor(0.5))
    assert all(bool((t == 0.5).all()) for t in tensors), tensors


def _module_parameters() -> None:
    layer = nn.Linear(2, 2)
    parameters: Any = getattr(layer, "_parameters")  # noqa: B009 - the private name is the point
    assert [id(p) for p in parameters.values()] == [id(p) for p in layer.parameters(recurse=False)]


def _module_modules() -> None:
    stack = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    modules: Any = getattr(stack, "_modules")  # noqa: B009
    assert [id(m) for m in modules.values()] == [id(m) for m in stack.children()]


def _tensor_version() -> None:
    tensor = torch.zeros(2)
    before = getattr(tensor, "_version")  # noqa: B009
    tensor.add_(1)
    assert isinstance(before, int) and getattr(tensor, "_version") > before  # noqa: B009


def _optimizer_step_post_hooks() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)
    handle = optimizer.register_step_post_hook(lambda *_: None)
    assert handle.id in getattr(optimizer, "_optimizer_step_post_hooks")  # noqa: B009

    class Wrapper(torch.optim.Optimizer):  # accelerate's: an Optimizer whose __init__ never ran
        def __init__(self) -> None:
            pass

    assert not hasattr(Wrapper(), "_optimizer_step_post_hooks")


def _removable_handle() -> None:
    handle = resolve("torch.utils.hooks.RemovableHandle")(OrderedDict())
    handle.remove()


def _removable_handle_state() -> None:
    layer = nn.Linear(2, 2)  # held: the handle refers to its hooks dict weakly
    handle = layer.register_forward_hook(lambda *_: None)
    hooks = handle.hooks_dict_ref()
    assert hooks is not None and handle.id in hooks
    handle.remove()
    assert handle.id not in hooks


def _dynamo() -> None:
    resolve("torch._dynamo")


def _skip_frame() -> None:
    inspect.signature(resolve("torch._dynamo.skip_frame")).bind("tolaria_otel: optimizer step hooks run eagerly")


def _graph_break() -> None:
    inspect.signature(resolve("torch._dynamo.graph_break")).bind()


def _dtensor() -> None:
    """The public name first, as the code tries it; the private one is only needed where that fails."""
    if not torch.distributed.is_available():
        pytest.skip("torch built without torch.distributed: no DTensor to recognise")
    try:
        resolve("torch.distributed.tensor.DTensor")
    except (ImportError, AttributeError):
        resolve("torch.distributed._tensor.DTensor")


#: Per part of the table, the check of the shape the code needs.
CHECKS: dict[str, Callable[[], None]] = {
    "torch.utils._foreach_utils._group_tensors_by_device_and_dtype": _group_tensors_by_device_and_dtype,
    "torch.utils._foreach_utils._has_foreach_support": _has_foreach_support,
    "torch.utils._foreach_utils._device_has_foreach_support": _device_has_foreach_support,
    "torch._foreach_norm": _foreach_norm,
    "torch._foreach_mul_": _foreach_mul_,
    "torch.nn.Module._parameters": _module_parameters,
    "torch.nn.Module._modules": _module_modules,
    "torch.Tensor._version": _tensor_version,
    "torch.optim.Optimizer._optimizer_step_post_hooks": _optimizer_step_post_hooks,
    "torch.utils.hooks.RemovableHandle": _removable_handle,
    "torch.utils.hooks.RemovableHandle.hooks_dict_ref": _removable_handle_state,
    "torch.utils.hooks.RemovableHandle.id": _removable_handle_state,
    "torch._dynamo": _dynamo,
    "torch._dynamo.skip_frame": _skip_frame,
    "torch._dynamo.graph_break": _graph_break,
    "torch.distributed._tensor.DTensor": _dtensor,
}


def test_every_listed_part_has_a_check_and_every_check_a_listed_part() -> None:
    assert sorted(listed_parts()) == sorted(CHECKS), "docs/torch-internals.md and CHECKS list different parts"


@pytest.mark.parametrize("part", sorted(CHECKS))
def test_the_installed_torch_has_the_part_with_the_shape_the_code_needs(part: str) -> None:
    try:
        CHECKS[part]()
    except (ImportError, AttributeError, TypeError, AssertionError, RuntimeError) as error:
        pytest.fail(
            f"torch {torch.__version__}: {part} is gone or no longer has the shape the package needs "
            f"({type(error).__name__}: {error}); see docs/torch-internals.md for where it is used and what breaks"
        )


def _code(text: str) -> str:
    """Code only: no docstring, no comment, no import of the package's own modules (``from .._version``)."""
    text = re.sub(r"#.*", "", re.sub(r'"""[\s\S]*?"""', "", text))
    return re.sub(r"^\s*from \.+[\w.]* import .*$", "", text, flags=re.M)


def _private_names_used() -> dict[str, set[str]]:
    """Private names the source takes from elsewhere, each with the modules that use it: attributes, getattr
    and hasattr strings, and names imported from torch, less what the package defines itself."""
    texts = {path.relative_to(SOURCE).as_posix(): path.read_text(encoding="utf-8") for path in SOURCE.rglob("*.py")}
    defined: set[str] = set()
    for text in texts.values():
        defined |= set(re.findall(r"(?:def|class) (_\w+)", text))
        defined |= set(re.findall(r"^(_\w+)\b", text, re.M))
        defined |= set(re.findall(r"self\.(_\w+)(?:\s*:[^=\n]*)?\s*=[^=]", text))
        defined |= set(re.findall(r"self\.(_\w+), self", text))
    used: dict[str, set[str]] = {}
    for module, text in texts.items():
        code = _code(text)
        names = set(re.findall(r"\.(_[A-Za-z]\w*)", code))
        names |= set(re.findall(r"(?:getattr|hasattr)\(\s*[\w.]+,\s*\"(_\w+)\"", code))
        for imported in re.findall(r"^from torch[\w.]* import (\([^)]*\)|.+)$", code, re.M):
            names |= set(re.findall(r"\b(_[A-Za-z]\w*)", imported))
        for name in names - defined:
            if not name.startswith("__"):
                used.setdefault(name, set()).add(module)
    return used


def _opentelemetry_listed() -> set[str]:
    rows = [line for line in OTEL_TABLE.read_text(encoding="utf-8").splitlines() if line.startswith("| `")]
    return {name for row in rows for name in re.findall(r"`(_\w+)`", row)}


def test_the_table_lists_exactly_the_private_torch_names_the_source_uses() -> None:
    listed = {segment for part in listed_parts() for segment in part.split(".") if segment.startswith("_")}
    used = _private_names_used()
    torch_names = set(used) - _opentelemetry_listed() - set(NOT_TORCH)
    unlisted = {name: sorted(used[name]) for name in sorted(torch_names - listed)}
    assert not unlisted, (
        f"the source uses private parts that docs/torch-internals.md does not list (or NOT_TORCH explains): {unlisted}"
    )
    assert not listed - torch_names, (
        f"docs/torch-internals.md lists private parts the source no longer uses: {sorted(listed - torch_names)}"
    )
    code = "\n".join(_code(path.read_text(encoding="utf-8")) for path in SOURCE.rglob("*.py"))
    for part in listed_parts():
        last = part.rsplit(".", 1)[1]
        assert re.search(rf"\.{last}\b|\b{last}\b(?!\s*\()", code), (
            f"docs/torch-internals.md lists {part}, which the source no longer uses"
        )


def test_torch_clip_functions_take_the_parameters_the_package_wrappers_take() -> None:
    """While attached the package replaces torch.nn.utils.clip_grad_norm_ and clip_grad_value_ by wrappers of the
    same parameters (docs/torch-internals.md, "Public, but relied on"): a parameter torch adds would be refused."""
    original_norm, original_value = torch.nn.utils.clip_grad.clip_grad_norm_, torch.nn.utils.clip_grad.clip_grad_value_
    patched_before = torch.nn.utils.clip_grad_norm_ is not original_norm  # a telemetry of another test left attached
    settings = SeedLayerSettings(enabled=True)
    provider, _ = metered(settings)
    model = nn.Linear(2, 2)
    telemetry = SeedLayerTelemetry(model, {"seed": (model, "TRAINING")}, settings=settings, meter_provider=provider)
    telemetry.attach()
    try:
        wrappers: tuple[Any, Any] = torch.nn.utils.clip_grad_norm_, torch.nn.utils.clip_grad_value_
    finally:
        telemetry.close()
    originals: tuple[Any, Any] = original_norm, original_value
    for original, wrapper in zip(originals, wrappers):
        assert wrapper is not original and wrapper.__wrapped__ is original
        assert list(inspect.signature(original).parameters) == list(
            inspect.signature(wrapper, follow_wrapped=False).parameters
        ), (
            f"torch {torch.__version__}: torch.nn.utils.{original.__name__} takes other parameters than the "
            "package's wrapper; see docs/torch-internals.md"
        )
    if not patched_before:  # the last telemetry to close restores torch's functions
        assert torch.nn.utils.clip_grad_norm_ is original_norm and torch.nn.utils.clip_grad_value_ is original_value
