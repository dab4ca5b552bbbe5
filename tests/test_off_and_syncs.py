"""Off means off; the step path never syncs with the host."""

import torch
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from torch.utils._python_dispatch import TorchDispatchMode

from tolaria_otel import SeedLayerSettings, SeedLayerTelemetry
from tolaria_otel.norms import FLUSH_EVERY

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
    """Records every aten op, and which ones move data to the host."""

    HOST_SYNC_OPS = frozenset({"aten::_local_scalar_dense", "aten::item"})

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.host_transfers = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.ops.append(name)
        kwargs = kwargs or {}
        if name in self.HOST_SYNC_OPS:
            self.host_transfers += 1
        elif name in {"aten::_to_copy", "aten::copy_"}:
            target = kwargs.get("device")
            if name == "aten::copy_":
                target = args[0].device
            source = args[0 if name == "aten::_to_copy" else 1].device
            if target is not None and torch.device(target).type == "cpu" and source.type != "cpu":
                self.host_transfers += 1
        return func(*args, **(kwargs or {}))


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
