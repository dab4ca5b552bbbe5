"""Off means off; the step path never syncs with the host."""

import functools

import numpy
import pytest
import torch
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from torch.utils._python_dispatch import TorchDispatchMode

from tolaria_otel import SeedLayerSettings, SeedLayerTelemetry
from tolaria_otel.measure.step_norms import FLUSH_EVERY

from .helpers import collect, metered, seeded_network, train_epoch


class CountingProvider(MeterProvider):
    """A real SDK provider that counts the meters asked of it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.meters_requested = 0

    def get_meter(self, *args, **kwargs):
        self.meters_requested += 1
        return super().get_meter(*args, **kwargs)


def test_off_by_default_installs_and_allocates_nothing(monkeypatch):
    for name in (
        "TOLARIA_SEED_LAYER_SUMMARIES_ENABLED",
        "TOLARIA_SEED_LAYER_TOPK",
        "TOLARIA_SEED_HEALTH_COMPACT",
        "TOLARIA_SEED_LAYER_SAMPLE_EVERY",
    ):
        monkeypatch.delenv(name, raising=False)
    model, registry = seeded_network(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    reader = InMemoryMetricReader()
    provider = CountingProvider(metric_readers=[reader])
    calls = []

    def source():
        calls.append(1)
        return registry()

    telemetry = SeedLayerTelemetry(model, source, meter_provider=provider)
    handle = telemetry.attach(optimizer)
    with CountingMode() as mode:
        telemetry.observe_step()
    train_epoch(model, optimizer, steps=2, generator=torch.Generator().manual_seed(0))
    assert telemetry.enabled is False
    assert telemetry.end_epoch() is None
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks  # no hook
    assert mode.ops == []  # observe_step touched no tensor
    assert calls == []  # the seed source is never read
    assert provider.meters_requested == 0  # so no instrument either
    assert not hasattr(telemetry, "_seeds")  # no segments, so no buffers
    assert not collect(reader)
    handle.remove()
    telemetry.close()


class CountingMode(TorchDispatchMode):
    """Records every aten op, and every read of tensor data by the host.

    A host read is what would be a device-to-host copy and a sync on an accelerator: a scalar read
    (``item()``, ``float()``, ``int()``, ``bool()``, ``__index__``, ``__format__`` of a 0-d tensor: ATen's
    ``_local_scalar_dense``), ``tolist()``, ``numpy()`` / ``__array__``, ``cpu()``, ``to("cpu")``, printing
    (``__repr__``, ``__format__``), ``torch.tensor`` of tensors, and a copy to the CPU from another device.
    On a CPU machine most of these dispatch no ATen op at all (the data is already on the host), so, as
    ``benchmarks.overhead.Probe`` does, the ``Tensor`` methods are wrapped for the duration (a
    ``TorchFunctionMode`` would not see the gradient hooks autograd runs), and every call counts. What a CPU
    run cannot tell apart: ``to(device)`` with a ``torch.device`` taken from a tensor (the package moves
    tensors to their parameters' device that way); on an accelerator the ATen check below counts it when it
    copies to the CPU.
    """

    HOST_SYNC_OPS = frozenset({"aten::_local_scalar_dense", "aten::item"})

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.host_transfers = 0
        self._inside = False  # in a wrapped method: what it does inside is that one read
        self._saved: list[tuple[object, str, object]] = []

    def __enter__(self):
        for owner, name, reads in _HOST_READS:
            self._saved.append((owner, name, owner.__dict__.get(name, _INHERITED)))
            setattr(owner, name, self._counted(getattr(owner, name), reads))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for owner, name, original in reversed(self._saved):
                if original is _INHERITED:
                    delattr(owner, name)
                else:
                    setattr(owner, name, original)
            self._saved.clear()

    def _counted(self, original, reads):
        mode = self

        @functools.wraps(original)
        def counted(*args, **kwargs):
            if mode._inside:
                return original(*args, **kwargs)
            mode.host_transfers += reads(*args, **kwargs)
            mode._inside = True
            try:
                return original(*args, **kwargs)
            finally:
                mode._inside = False

        return counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.ops.append(name)
        kwargs = kwargs or {}
        if self._inside:
            pass
        elif name in self.HOST_SYNC_OPS:
            self.host_transfers += 1
        elif name in {"aten::_to_copy", "aten::copy_"}:
            target = kwargs.get("device")
            if name == "aten::copy_":
                target = args[0].device
            source = args[0 if name == "aten::_to_copy" else 1].device
            if target is not None and torch.device(target).type == "cpu" and source.type != "cpu":
                self.host_transfers += 1
        return func(*args, **kwargs)


_INHERITED = object()


def _one(*args, **kwargs) -> int:
    return 1


def _to_host(tensor, *args, **kwargs) -> int:
    """``to()`` names the host: ``to("cpu")``, ``to(device="cpu:0")``, ``to("cpu", torch.float64)``."""
    target = kwargs.get("device", args[0] if args else None)
    return int(isinstance(target, str) and torch.device(target).type == "cpu")


def _tensors_in(data, *args, **kwargs) -> int:
    if isinstance(data, (list, tuple)):
        return sum(_tensors_in(item) for item in data)
    return int(isinstance(data, torch.Tensor))


#: (owner, method, how many host reads a call makes): the ways a tensor's data reaches the host without an
#: ATen op on a CPU machine.
_HOST_READS = (
    (torch.Tensor, "tolist", _one),
    (torch.Tensor, "numpy", _one),
    (torch.Tensor, "__array__", _one),
    (torch.Tensor, "cpu", _one),
    (torch.Tensor, "to", _to_host),
    (torch.Tensor, "__repr__", _one),
    (torch.Tensor, "__format__", _one),
    (torch, "tensor", _tensors_in),
)


STEPS = 2 * FLUSH_EVERY


def _op_counts(seed_count: int) -> tuple[CountingMode, CountingMode, int]:
    model, registry = seeded_network(seed_count)
    settings = SeedLayerSettings(enabled=True)
    provider, _ = metered(settings)
    telemetry = SeedLayerTelemetry(model, registry, settings=settings, meter_provider=provider)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    with CountingMode() as with_telemetry:
        train_epoch(model, optimizer, steps=STEPS, generator=generator, before_step=telemetry.observe_step)
    with CountingMode() as without:
        train_epoch(model, optimizer, steps=STEPS, generator=generator)
    with CountingMode() as epoch_end:
        telemetry.end_epoch()
    return with_telemetry, epoch_end, len(with_telemetry.ops) - len(without.ops)


def test_step_path_has_no_host_sync_and_a_fixed_op_count():
    """On an accelerator a host sync is a scalar read (``item``) or a copy to the CPU: none per step.
    The step path is one foreach norm per step, plus a batch of a dozen ops every FLUSH_EVERY steps,
    however many layers."""
    one_seed, _, one_seed_ops = _op_counts(1)
    four_seeds, _, four_seed_ops = _op_counts(4)
    assert one_seed.host_transfers == four_seeds.host_transfers == 0
    assert one_seed_ops == four_seed_ops
    assert STEPS <= four_seed_ops <= 1.6 * STEPS  # the previous step path: 2 ops per step
    assert four_seeds.ops.count("aten::_foreach_norm") == STEPS


@pytest.mark.slow
def test_above_list_tensors_max_a_step_is_two_ops_and_still_no_host_sync():
    """Many gradient tensors: a step's norms are copied into a preallocated buffer (one op more per step)
    rather than waiting as 0-d tensors; still no host sync, and the batch every FLUSH_EVERY steps."""
    many, _, many_ops = _op_counts(11)  # 66 gradient tensors
    assert many.host_transfers == 0
    assert many.ops.count("aten::_foreach_norm") == STEPS
    assert many.ops.count("aten::stack") >= STEPS  # into the buffer (the batch stacks its counts too)
    assert 2 * STEPS <= many_ops <= 2.6 * STEPS


def test_epoch_end_work_does_not_grow_with_layers():
    _, one_seed_epoch, _ = _op_counts(1)
    _, four_seed_epoch, _ = _op_counts(4)
    assert one_seed_epoch.host_transfers <= 1
    assert len(one_seed_epoch.ops) == len(four_seed_epoch.ops)


#: Every way a tensor's data reaches the host, each one read of a 0-d tensor (``__index__`` needs an integer).
HOST_READS = {
    "item()": lambda t: t.item(),
    "float()": float,
    "int()": int,
    "bool()": bool,
    "complex()": complex,
    "__index__": lambda t: [0, 1][t],
    "__format__": lambda t: f"{t:.3f}",
    "__format__ of a vector": lambda t: f"{t.expand(3)}",
    "str()": str,
    "repr()": repr,
    "tolist()": lambda t: t.tolist(),
    "numpy()": lambda t: t.numpy(),
    "numpy.asarray": numpy.asarray,
    "cpu()": lambda t: t.cpu(),
    'to("cpu")': lambda t: t.to("cpu"),
    'to("cpu", dtype)': lambda t: t.to("cpu", torch.float64),
    'to(device="cpu")': lambda t: t.to(device="cpu"),
    "torch.tensor of tensors": lambda t: torch.tensor([t]),
}


@pytest.mark.parametrize("read", HOST_READS.values(), ids=HOST_READS)
def test_the_counter_sees_every_way_data_reaches_the_host(read):
    """On a CPU machine too: the step-path tests above count what would be a sync on an accelerator."""
    tensor = torch.tensor(1)
    with CountingMode() as mode:
        read(tensor)
    assert mode.host_transfers == 1


def test_the_counter_counts_no_device_work():
    tensor = torch.ones(3)
    with CountingMode() as mode:
        (tensor + 1).to(torch.float64).to(tensor.device).norm()
        torch.stack([tensor, tensor]).sum(0, keepdim=True)
    assert mode.host_transfers == 0 and mode.ops
    assert not any(hasattr(getattr(owner, name), "__wrapped__") for owner, name, _ in _HOST_READS)  # restored
