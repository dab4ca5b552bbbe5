"""Overhead of the per-seed layer summaries, side by side with the floor and the peers.

    python -m benchmarks.overhead                  # workloads (a) and (b) on the CPU, a few minutes
    python -m benchmarks.overhead --workload a     # only the work-package's seeded MLP
    python -m benchmarks.overhead --quick          # tiny sizes, a few seconds (the smoke test)
    python -m benchmarks.overhead --workload lightning   # (d): the same network under Lightning's Trainer

Every variant trains its own copy of the same network (same initial weights, same batches) with
its own optimizer. The variants run interleaved in one process, one measurement (``--epochs``
epochs) each per round, the order rotated by one every round (A B C, B C A, C A B, ...), so machine
drift and other processes' load fall on all of them alike. For each variant the table gives the
per-epoch wall time (median, min, max over all rounds), the ratio of its median to the baseline's,
the median of the paired ratios (each epoch against the baseline's epoch of the same round) with
their interquartile range as the noise, and the extra time per optimizer step.

Then one more epoch of every variant runs under two counters (not timed): the host reads of
tensor data (``item``, ``tolist``, ``numpy``, scalar conversion, ``torch.tensor`` of tensors, and
copies to the CPU from another device), each of which is a device sync on a GPU, per step and per
epoch; and the ATen operators dispatched per step (the step path's length, which is what costs on
a CPU where a step takes well under a millisecond).

The telemetry variants get a ``MeterProvider`` with an ``InMemoryMetricReader``: the real SDK
instruments, callbacks and views, but a pull reader that is only read once, after the timing (to
check the points are there). A periodic exporter would collect on its own thread every
``OTEL_METRIC_EXPORT_INTERVAL`` (60 s by default) and ship over the network: that is the
collector's cost, not the training loop's, and would only add noise to sub-second epochs.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tolaria_otel import SeedLayerSettings, SeedLayerTelemetry, seed_layer_views
from tolaria_otel.demo.seeded_mlp import SeededMLP, SeedRegistry

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

PEER_INSTALL = "pip install -c constraints.txt -r benchmarks/requirements.txt"


# --------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------


@dataclass
class Workload:
    """A network with seeds, the batches of one epoch, and how to train one step on them."""

    name: str
    description: str
    build: Callable[[], tuple[nn.Module, dict[str, nn.Module]]]  # (model, seed_id -> seed module)
    batches: list[Any]
    loss: Callable[[nn.Module, Any], torch.Tensor]
    optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    device: torch.device = torch.device("cpu")  # noqa: RUF009 - a torch.device is immutable
    synchronize: Callable[[], None] = lambda: None
    seed_layers: int = 0  # layers (modules with parameters) inside the seeds, for the tables

    @property
    def steps_per_epoch(self) -> int:
        return len(self.batches)


def _mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01)


def _batches(samples: int, batch: int, in_features: int, out_features: int) -> list[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(samples, in_features, generator=generator)
    y = torch.randn(samples, out_features, generator=generator)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, samples, batch)]


def count_layers(seeds: dict[str, nn.Module]) -> int:
    return sum(1 for seed in seeds.values() for m in seed.modules() if any(True for _ in m.parameters(recurse=False)))


def seeded_mlp_workload(samples: int = 512, batch: int = 32, seeds: int = 4) -> Workload:
    """(a) The work-package's: the 5-Linear host MLP with ``seeds`` 3-Linear seeds grafted in."""

    def build() -> tuple[nn.Module, dict[str, nn.Module]]:
        torch.manual_seed(0)
        model = SeededMLP()
        return model, {f"seed-{i}": model.graft(f"seed_{i}") for i in range(seeds)}

    _, seed_modules = build()
    return Workload(
        name="a",
        description=f"SeededMLP (5 Linear, width 64) + {seeds} seeds of 3 Linear; {samples} samples, batch {batch}",
        build=build,
        batches=_batches(samples, batch, 32, 10),
        loss=_mse,
        optimizer=_sgd,
        seed_layers=count_layers(seed_modules),
    )


class DeepSeed(nn.Module):
    """A deep, narrow residual branch: Linear(64, w), then ``depth - 2`` Linear(w, w), then Linear(w, 64)."""

    def __init__(self, width: int, depth: int, inner: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(width, inner), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Linear(inner, inner), nn.ReLU()]
        layers.append(nn.Linear(inner, width))
        self.net = nn.Sequential(*layers)
        self.alpha = 1.0
        self.in_graph = True  # SeededMLP's forward asks (a culled seed is skipped)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.net(x)


def deep_workload(depth: int, samples: int = 512, batch: int = 32, seeds: int = 4) -> Workload:
    """(b) Many small layers: the same host with ``seeds`` seeds of ``depth`` Linear layers each."""

    def build() -> tuple[nn.Module, dict[str, nn.Module]]:
        torch.manual_seed(0)
        model = SeededMLP()
        modules: dict[str, nn.Module] = {}
        for i in range(seeds):
            modules[f"seed-{i}"] = model.seeds[f"seed_{i}"] = DeepSeed(model.width, depth)
        return model, modules

    return Workload(
        name=f"b{seeds * depth}",
        description=f"SeededMLP + {seeds} seeds of {depth} Linear (16 wide): {seeds * depth} seed layers, "
        f"{2 * seeds * depth} gradient tensors; {samples} samples, batch {batch}",
        build=build,
        batches=_batches(samples, batch, 32, 10),
        loss=_mse,
        optimizer=_sgd,
        seed_layers=seeds * depth,
    )


# --------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One variant's own copy of the workload's network, its seeds and its optimizer."""

    workload: Workload
    model: nn.Module
    seeds: dict[str, nn.Module]
    optimizer: torch.optim.Optimizer
    epoch: int = 0


class Variant:
    """What a variant adds to the plain loop: ``step`` after backward (before ``optimizer.step()``),
    ``end_epoch`` after the epoch's last step. Both inside the timed region."""

    name = "baseline"
    kind = "control"  # control | ours | floor | peer
    every = 1  # measured in every Nth round only (a peer whose epochs take seconds)

    def __init__(self) -> None:
        self.unavailable: str | None = None
        self.note = ""

    def setup(self, run: Run) -> None:
        pass

    def step(self, last: bool) -> None:
        pass

    def end_epoch(self) -> None:
        pass

    def close(self) -> None:
        pass

    def feature_bytes(self) -> int:
        """Bytes of tensors the variant keeps between steps (its accumulators)."""
        return 0


class Baseline(Variant):
    def __init__(self, name: str = "baseline") -> None:
        super().__init__()
        self.name = name


class Telemetry(Variant):
    """The package through its public API, attached to the optimizer (the README's loop)."""

    kind = "ours"

    def __init__(
        self,
        name: str,
        *,
        enabled: bool = True,
        seeds: int | None = None,
        sample_every: int = 1,
        compact: bool = False,
        top_k: int = 3,
        source: str = "callable",
        attach: str = "optimizer",
        host_norm: bool = False,
    ) -> None:
        super().__init__()
        self.name = name
        self.source = source  # "callable": Kasmina's registry, called at every sampled step; "mapping": a dict
        self.attach = attach  # "optimizer": attach(optimizer); "every": attach(), the process-wide hook
        self.settings = SeedLayerSettings(
            enabled=enabled, top_k=top_k, compact=compact, sample_every=sample_every, host_norm=host_norm
        )
        self.seed_count = seeds
        self.summary: Any = None
        if not enabled:
            self.kind = "control"

    def setup(self, run: Run) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader], views=seed_layer_views(self.settings))
        registry = SeedRegistry()
        for seed_id in list(run.seeds)[: self.seed_count]:
            registry.add(seed_id, run.seeds[seed_id], "TRAINING")
        source = registry if self.source == "callable" else registry()
        self.telemetry = SeedLayerTelemetry(run.model, source, settings=self.settings, meter_provider=self.provider)
        self.telemetry.attach(run.optimizer if self.attach == "optimizer" else None)

    def end_epoch(self) -> None:
        self.summary = self.telemetry.end_epoch()

    def check(self) -> str:
        """After the timing: what the reader collects (proves the variant did the real work)."""
        data = self.reader.get_metrics_data()
        points: dict[str, int] = defaultdict(int)
        for resource_metrics in data.resource_metrics if data else ():
            for scope in resource_metrics.scope_metrics:
                for metric in scope.metrics:
                    points[metric.name.rsplit(".", 1)[-1]] += len(metric.data.data_points)
        seeds = len(self.summary.seeds) if self.summary is not None else 0
        exported = ", ".join(f"{n} {name}" for name, n in sorted(points.items())) or "no"
        return f"{exported} points; {seeds} seeds summarised"

    def feature_bytes(self) -> int:
        segments = getattr(self.telemetry, "_segments", {}).values()
        stats = [segment.stats for segment in segments]
        return sum(s.values.numel() * s.values.element_size() for s in stats)

    def close(self) -> None:
        self.telemetry.close()
        self.provider.shutdown()


class Floor(Variant):
    """Only the irreducible work: one ``torch._foreach_norm`` over the seeds' gradients per step."""

    name = "floor: _foreach_norm only"
    kind = "floor"

    def setup(self, run: Run) -> None:
        self.params = [p for seed in run.seeds.values() for p in seed.parameters() if p.requires_grad]

    def step(self, last: bool) -> None:
        torch._foreach_norm(cast(list[torch.Tensor], [p.grad for p in self.params]))  # all set by backward


class ItemLoop(Variant):
    """The original trainer: walk the seeds' parameters every step, ``norm().item()`` each, sum the
    squares per layer in Python; RMS and top-3 per seed at the epoch end."""

    name = "peer: per-layer .item() loop"
    kind = "peer"

    def setup(self, run: Run) -> None:
        self.seeds = run.seeds
        self.squares: dict[tuple[str, str], float] = defaultdict(float)
        self.steps = 0

    def step(self, last: bool) -> None:
        for seed_id, seed in self.seeds.items():
            for name, param in seed.named_parameters():
                if param.grad is not None:
                    layer = name.rpartition(".")[0] or "(root)"
                    self.squares[(seed_id, layer)] += param.grad.norm().item() ** 2
        self.steps += 1

    def end_epoch(self) -> None:
        per_seed: dict[str, list[tuple[float, str]]] = defaultdict(list)
        for (seed_id, layer), total in self.squares.items():
            per_seed[seed_id].append((math.sqrt(total / self.steps), layer))
        self.top = {seed_id: sorted(values, reverse=True)[:3] for seed_id, values in per_seed.items()}
        self.squares.clear()
        self.steps = 0


class Lightning(Variant):
    """``lightning.pytorch.utilities.grad_norm`` per seed every step, as in ``on_before_optimizer_step``
    (only the computation: ``self.log_dict`` needs a Trainer, so this is a lower bound)."""

    name = "peer: Lightning grad_norm"
    kind = "peer"

    def setup(self, run: Run) -> None:
        try:
            from lightning.pytorch.utilities import grad_norm
        except Exception as error:  # noqa: BLE001 - reported in the table
            self.unavailable = f"{type(error).__name__}: {error} ({PEER_INSTALL})"
            return
        self.grad_norm = grad_norm
        self.seeds = run.seeds

    def step(self, last: bool) -> None:
        self.norms = {seed_id: self.grad_norm(seed, norm_type=2) for seed_id, seed in self.seeds.items()}


_WANDB_RUN: Any = None


class Wandb(Variant):
    """``wandb.watch(seeds, log="gradients", log_freq=1)`` offline, one committed row per step."""

    name = "peer: wandb.watch gradients"
    kind = "peer"
    every = 4  # an order of magnitude slower than the rest: every 4th round keeps the run short

    def setup(self, run: Run) -> None:
        global _WANDB_RUN  # noqa: PLW0603 - one offline wandb run per process, as wandb allows
        os.environ["WANDB_MODE"] = "offline"
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            import wandb

            if _WANDB_RUN is None:
                directory = tempfile.mkdtemp(prefix="bench-wandb-")
                _WANDB_RUN = wandb.init(
                    project="tolaria-otel-bench",
                    dir=directory,
                    mode="offline",
                    settings=wandb.Settings(x_disable_stats=True, console="off", silent=True),
                )
            wandb.watch(list(run.seeds.values()), log="gradients", log_freq=1)
        except Exception as error:  # noqa: BLE001
            self.unavailable = f"{type(error).__name__}: {error} ({PEER_INSTALL})"
            return
        self.wandb = wandb
        self.steps = 0

    def step(self, last: bool) -> None:
        # The histograms are made in the gradient hooks during backward; a row is committed per step.
        self.steps += 1
        self.wandb.log({"bench/step": self.steps})

    def close(self) -> None:
        global _WANDB_RUN  # noqa: PLW0603 - one offline wandb run per process, as wandb allows
        if _WANDB_RUN is not None:
            _WANDB_RUN.finish()
            _WANDB_RUN = None


class TensorBoard(Variant):
    """``SummaryWriter.add_histogram`` of each seed parameter's gradient once per epoch (its last step)."""

    name = "peer: TensorBoard add_histogram"
    kind = "peer"

    def setup(self, run: Run) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as error:  # noqa: BLE001
            self.unavailable = f"{type(error).__name__}: {error} ({PEER_INSTALL})"
            return
        self.writer = SummaryWriter(tempfile.mkdtemp(prefix="bench-tb-"))
        self.run = run
        self.epoch = 0

    def step(self, last: bool) -> None:
        if last:
            for seed_id, seed in self.run.seeds.items():
                for name, param in seed.named_parameters():
                    if param.grad is not None:
                        self.writer.add_histogram(f"{seed_id}/{name}", param.grad, self.epoch)

    def end_epoch(self) -> None:
        self.epoch += 1

    def close(self) -> None:
        self.writer.close()


def all_variants(seed_count: int = 4) -> list[Variant]:
    half = max(1, seed_count // 2)
    return [
        Baseline(),
        Baseline("baseline again (A/A)"),
        Telemetry("disabled (flag off)", enabled=False),
        Telemetry("enabled, 1 seed", seeds=1),
        Telemetry(f"enabled, {half} seeds", seeds=half),
        Telemetry(f"enabled, {seed_count} seeds", seeds=seed_count),
        Telemetry(f"enabled, {seed_count} seeds, seed source a dict", seeds=seed_count, source="mapping"),
        Telemetry(f"enabled, {seed_count} seeds, attach()", seeds=seed_count, attach="every"),
        Telemetry(f"enabled, {seed_count} seeds, host norm", seeds=seed_count, host_norm=True),
        Telemetry(f"enabled, {seed_count} seeds, sample_every=4", seeds=seed_count, sample_every=4),
        Telemetry(f"enabled, {seed_count} seeds, compact", seeds=seed_count, compact=True),
        Floor(),
        ItemLoop(),
        Lightning(),
        Wandb(),
        TensorBoard(),
    ]


def deep_variants(seed_count: int = 4, wandb: bool = False) -> list[Variant]:
    """Workload (b): every variant but the telemetry on fewer seeds (growth with layers is the point)."""
    variants = [
        v for v in all_variants(seed_count) if not (isinstance(v, Telemetry) and v.seed_count not in (None, seed_count))
    ]
    for variant in variants:
        if isinstance(variant, Wandb) and not wandb:
            variant.unavailable = (
                "left out of (b) to keep the run short: about 0.6 ms per gradient tensor "
                "per step, seconds per epoch here (--wandb-deep runs it)"
            )
    return variants


# --------------------------------------------------------------------------------------------
# Training loop, timing and counting
# --------------------------------------------------------------------------------------------


def train_epoch(run: Run, variant: Variant, probe: Probe | None = None) -> None:
    model, optimizer, workload = run.model, run.optimizer, run.workload
    last = workload.steps_per_epoch - 1
    for i, batch in enumerate(workload.batches):
        workload.loss(model, batch).backward()
        variant.step(i == last)
        optimizer.step()
        optimizer.zero_grad()
        if probe is not None:
            probe.step_done()
    variant.end_epoch()
    workload.synchronize()
    run.epoch += 1


def make_run(workload: Workload, template: tuple[nn.Module, dict[str, nn.Module]]) -> Run:
    model = copy.deepcopy(template[0]).to(workload.device)
    # The seeds dict must name this copy's modules: look them up by identity in the copy.
    names = {id(module): name for name, module in template[0].named_modules()}
    copied = dict(model.named_modules())
    seeds = {seed_id: copied[names[id(module)]] for seed_id, module in template[1].items()}
    return Run(workload, model, seeds, workload.optimizer(model))


@dataclass
class Result:
    variant: Variant
    times: list[float] = field(default_factory=list)  # seconds per epoch, all rounds (wall clock)
    cpu: list[float] = field(default_factory=list)  # CPU seconds of this process per epoch
    paired: list[float] = field(default_factory=list)  # epoch time / baseline's same epoch
    reads_per_step: float = math.nan
    reads_per_epoch: float = math.nan
    ops_per_step: float = math.nan
    check: str = ""


def measure(
    workload: Workload,
    variants: Sequence[Variant],
    *,
    rounds: int,
    warmup: int,
    epochs: int,
    log: Callable[[str], None] = lambda s: None,
) -> list[Result]:
    template = workload.build()
    results = [Result(v) for v in variants]
    runs: list[Run | None] = []
    for variant in variants:
        built = make_run(workload, template)
        if not variant.unavailable:
            variant.setup(built)
        runs.append(None if variant.unavailable else built)
    live = [i for i, run in enumerate(runs) if run is not None]
    started = time.perf_counter()
    for r in range(-warmup, rounds):
        order = live[r % len(live) :] + live[: r % len(live)]
        order = [i for i in order if r < 0 or r % variants[i].every == 0]
        epoch_times: dict[int, list[float]] = {}
        epoch_cpu: dict[int, list[float]] = {}
        for i in order:
            run, variant = runs[i], variants[i]
            assert run is not None  # i is live
            gc.collect()
            times, cpu = [], []
            for _ in range(epochs):
                c0, t0 = time.process_time(), time.perf_counter()
                train_epoch(run, variant)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            epoch_times[i], epoch_cpu[i] = times, cpu
        if r >= 0:
            base = epoch_times[live[0]]
            for i in epoch_times:
                results[i].times += epoch_times[i]
                results[i].cpu += epoch_cpu[i]
                results[i].paired += [t / b for t, b in zip(epoch_times[i], base)]
        if r >= 0 and (r + 1) % max(1, rounds // 4) == 0:
            log(f"  [{workload.name}] round {r + 1}/{rounds} ({time.perf_counter() - started:.0f} s)")
    for i in live:
        run, variant = runs[i], variants[i]
        assert run is not None  # i is live
        count_syncs(run, variant, results[i])
        if isinstance(variant, Telemetry):
            results[i].check = variant.check()
        variant.close()
    return results


class Probe:
    """Counts, per optimizer step and at the epoch end, host reads of tensor data and ATen ops.

    A host read is a read of tensor values by the host: ``item()``, ``float()``, ``bool()`` and the
    like (``aten._local_scalar_dense``), ``tolist()``, ``numpy()``, ``torch.tensor`` of tensors, and a
    copy to the CPU from another device. On a GPU each one is a device-to-host copy and a sync. On a
    CPU-only workload every read counts (it would be a sync on a GPU); on a GPU workload only reads
    of tensors that are not on the CPU count. The ``Tensor`` methods are wrapped for the duration
    (a ``TorchFunctionMode`` would not see the gradient hooks that autograd runs), and a
    ``TorchDispatchMode`` sees the ATen operators, backward included.
    """

    def __init__(self, only_from_device: bool) -> None:
        self.only_from_device = only_from_device
        self.reads: list[int] = [0]
        self.ops: list[int] = [0]
        self.inside = False
        self._dispatch = _OpCount(self)
        self._saved: list[tuple[Any, str, Any]] = []

    def step_done(self) -> None:
        self.reads.append(0)
        self.ops.append(0)

    def counts(self, tensor: Any) -> bool:
        return isinstance(tensor, torch.Tensor) and not (self.only_from_device and tensor.device.type == "cpu")

    def __enter__(self) -> Self:
        def tensor_reads(args: Sequence[Any]) -> int:
            return sum(1 for t in _flatten(args[0]) if self.counts(t)) if args else 0

        def self_read(args: Sequence[Any]) -> int:
            return int(bool(args) and self.counts(args[0]))

        for owner, name, count in (
            (torch.Tensor, "tolist", self_read),
            (torch.Tensor, "numpy", self_read),
            (torch.Tensor, "__array__", self_read),
            (torch, "tensor", tensor_reads),
        ):
            original = getattr(owner, name)
            self._saved.append((owner, name, original))
            setattr(owner, name, self._wrap(original, count))
        self._dispatch.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._dispatch.__exit__(*exc)
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()

    def _wrap(self, original: Callable[..., Any], count: Callable[[Sequence[Any]], int]) -> Callable[..., Any]:
        probe = self

        def counted(*args: Any, **kwargs: Any) -> Any:
            if probe.inside:
                return original(*args, **kwargs)
            probe.reads[-1] += count(args)
            probe.inside = True  # what it does inside (a copy, a scalar read) is this one read
            try:
                return original(*args, **kwargs)
            finally:
                probe.inside = False

        return counted


def _flatten(data: Any) -> list[Any]:
    if isinstance(data, (list, tuple)):
        return [leaf for item in data for leaf in _flatten(item)]
    return [data]


class _OpCount(TorchDispatchMode):
    def __init__(self, probe: Probe) -> None:
        super().__init__()
        self.probe = probe

    def __torch_dispatch__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        probe = self.probe
        probe.ops[-1] += 1
        if not probe.inside:
            packet = func.overloadpacket
            if packet is torch.ops.aten._local_scalar_dense:
                probe.reads[-1] += int(probe.counts(args[0]))
            elif packet is torch.ops.aten._to_copy:
                target = kwargs.get("device")
                probe.reads[-1] += int(
                    args[0].device.type != "cpu" and target is not None and torch.device(target).type == "cpu"
                )
            elif packet is torch.ops.aten.copy_:
                probe.reads[-1] += int(args[0].device.type == "cpu" and args[1].device.type != "cpu")
        return func(*args, **kwargs)


def count_syncs(run: Run, variant: Variant, result: Result) -> None:
    probe = Probe(only_from_device=run.workload.device.type != "cpu")
    with probe:
        train_epoch(run, variant, probe)
    steps = run.workload.steps_per_epoch
    # reads[0..steps-1] are the steps; reads[steps] is the epoch end.
    result.reads_per_step = statistics.median(probe.reads[:steps])
    result.reads_per_epoch = sum(probe.reads)
    result.ops_per_step = statistics.median(probe.ops[:steps])


# --------------------------------------------------------------------------------------------
# Memory: fresh processes, feature off and on
# --------------------------------------------------------------------------------------------


def memory_probe(workload: Workload, variant: Variant, epochs: int) -> dict[str, Any]:
    """Train ``epochs`` epochs in this (fresh) process; peak RSS, Python heap kept, accumulator bytes."""
    template = workload.build()
    run = make_run(workload, template)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    variant.setup(run)
    for _ in range(epochs):
        train_epoch(run, variant)
    gc.collect()
    kept = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    out = {
        "variant": variant.name,
        "epochs": epochs,
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "python_heap_kept_kib": kept / 1024,
        "accumulator_bytes": variant.feature_bytes(),
    }
    if workload.device.type == "cuda":
        out["peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def memory_table(workload_args: list[str], workload: Workload, epochs_list: Sequence[int]) -> str:
    rows = [
        "| variant | epochs | peak RSS (MiB) | Python heap kept (KiB) | accumulator (bytes) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for epochs in epochs_list:
        for probe in ("baseline", "enabled"):
            command = [
                sys.executable,
                "-m",
                "benchmarks.overhead",
                *workload_args,
                "--memory-probe",
                probe,
                "--epochs",
                str(epochs),
            ]
            out = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ.copy())
            data = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(
                f"| {data['variant']} | {epochs} | {data['peak_rss_kib'] / 1024:.1f} | "
                f"{data['python_heap_kept_kib']:.1f} | {data['accumulator_bytes']} |"
            )
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def table(workload: Workload, results: Sequence[Result]) -> str:
    base = statistics.median(results[0].times)
    base_cpu = statistics.median(results[0].cpu)
    floor = next((r for r in results if r.variant.kind == "floor" and r.times), None)
    floor_extra = statistics.median(floor.times) - base if floor else math.nan
    steps = workload.steps_per_epoch
    lines = [
        "| variant | epoch median ms | min | max | ratio | paired ratio [IQR] | CPU-time ratio | extra µs/step "
        "| vs floor | host reads/step | host reads/epoch | ATen ops/step |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        if r.variant.unavailable:
            lines.append(f"| {r.variant.name} | not run: {r.variant.unavailable} |" + " |" * 10)
            continue
        name = r.variant.name + (f" (every={r.variant.every})" if r.variant.every > 1 else "")
        median = statistics.median(r.times)
        extra = median - base
        low, high = _quartiles(r.paired)
        vs_floor = f"{extra / floor_extra:.2f}x" if r.variant.kind in ("ours", "peer") and floor_extra > 0 else ""
        lines.append(
            f"| {name} | {median * 1e3:.2f} | {min(r.times) * 1e3:.2f} | {max(r.times) * 1e3:.2f} | "
            f"{median / base:.3f} | {statistics.median(r.paired):.3f} [{low:.3f}, {high:.3f}] | "
            f"{statistics.median(r.cpu) / base_cpu:.3f} | "
            f"{extra / steps * 1e6:+.1f} | {vs_floor} | {r.reads_per_step:g} | {r.reads_per_epoch:g} | "
            f"{r.ops_per_step:g} |"
        )
    return "\n".join(lines)


def growth_table(per_depth: Sequence[tuple[Workload, Sequence[Result]]]) -> str:
    """(b): extra µs per step against the seed layer count, ours against the floor's."""
    names: list[str] = []
    for _, results in per_depth:
        for r in results:
            if r.variant.kind != "control" and not r.variant.unavailable and r.variant.name not in names:
                names.append(r.variant.name)
    head = "| seed layers | " + " | ".join(names) + " |"
    lines = [head, "|" + " ---: |" * (len(names) + 1)]
    slopes: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for workload, results in per_depth:
        base = statistics.median(results[0].times)
        cells = []
        for name in names:
            found = next((r for r in results if r.variant.name == name and r.times), None)
            if found is None:
                cells.append("")
                continue
            extra = (statistics.median(found.times) - base) / workload.steps_per_epoch * 1e6
            slopes[name].append((workload.seed_layers, extra))
            cells.append(f"{extra:+.0f} µs ({statistics.median(found.times) / base:.2f}x)")
        lines.append(f"| {workload.seed_layers} | " + " | ".join(cells) + " |")
    fit = []
    for name in names:
        points = slopes[name]
        if len(points) >= 2:
            fit.append(f"{_slope(points):.2f}")
        else:
            fit.append("")
    lines.append("| µs per step per added layer (least squares) | " + " | ".join(fit) + " |")
    return "\n".join(lines)


def _slope(points: Sequence[tuple[int, float]]) -> float:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else math.nan


def verdicts(results: Sequence[Result]) -> list[str]:
    """The issue's goals, checked against this run's numbers, on the wall clock and on CPU time."""
    return [
        f"{label}: {line}"
        for label, attr in (("wall", "times"), ("CPU time", "cpu"))
        for line in _verdicts(results, attr)
    ] + [
        "not run: " + "; ".join(f"{r.variant.name} ({r.variant.unavailable})" for r in results if r.variant.unavailable)
    ] * any(r.variant.unavailable for r in results)


def _verdicts(results: Sequence[Result], attr: str) -> list[str]:
    measured = [r for r in results if getattr(r, attr)]
    base = statistics.median(getattr(results[0], attr))

    def over(r: Result) -> float:
        return statistics.median(getattr(r, attr)) / base - 1

    aa = next((r for r in measured if r.variant.name.startswith("baseline again")), None)
    noise = abs(over(aa)) if aa else 0.0
    out = []
    disabled = next((r for r in measured if r.variant.name.startswith("disabled")), None)
    if disabled:
        out.append(
            f"disabled {over(disabled):+.1%}, A/A {noise:+.1%} -> "
            f"{'within noise' if abs(over(disabled)) <= max(2 * noise, 0.01) else 'OUTSIDE noise'}"
        )
    ours = [r for r in measured if r.variant.kind == "ours"]
    full = [r for r in ours if "sample_every" not in r.variant.name and "compact" not in r.variant.name]
    floor = next((r for r in measured if r.variant.kind == "floor"), None)
    if full:
        worst = max(full, key=over)
        out.append(
            f"enabled worst ({worst.variant.name}) {over(worst):+.1%} -> "
            f"{'under' if over(worst) < 0.10 else 'OVER'} the 10 % bound"
        )
        if floor:
            f_over, e_over = over(floor), over(worst)
            ok = e_over <= 1.5 * f_over or e_over - f_over <= max(noise, 0.01)
            out.append(
                f"floor {f_over:+.1%}, enabled {e_over:+.1%} -> "
                f"{'within' if ok else 'NOT within'} 1.5x of the floor's overhead (or within noise of it)"
            )
        peers = [r for r in measured if r.variant.kind == "peer"]
        below = [r for r in peers if over(r) <= max(over(r) for r in full)]
        out.append(
            "peers "
            + ", ".join(f"{r.variant.name.removeprefix('peer: ')} {over(r):+.1%}" for r in peers)
            + (
                " -> every enabled variant is below every peer"
                if not below
                else " -> NOT below " + ", ".join(r.variant.name for r in below)
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def report(workload: Workload, results: Sequence[Result], epochs: int, rounds: int) -> str:
    lines = [
        f"### Workload ({workload.name}): {workload.description}",
        "",
        f"{workload.steps_per_epoch} steps per epoch, {epochs} epochs per measurement, {rounds} interleaved "
        f"rounds ({rounds * epochs} epochs per variant; a variant marked every=N only in every Nth round).",
        "",
        table(workload, results),
        "",
    ]
    checks = [f"- {r.variant.name}: {r.check}" for r in results if r.check]
    if checks:
        lines += ["Exported after the timing (InMemoryMetricReader):", *checks, ""]
    lines += ["Goals:", *(f"- {v}" for v in verdicts(results)), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Workload (d): a Lightning fit
# --------------------------------------------------------------------------------------------

LIGHTNING_VARIANTS = (
    "Lightning, no monitoring",
    "Lightning + tolaria_otel SeedLayerCallback",
    "Lightning + grad_norm logging (its docs' way)",
)


def lightning_report(samples: int, batch: int, seeds: int, rounds: int, epochs: int, log: Callable[[str], None]) -> str:
    """(d) Workload (a) trained by ``Trainer.fit``: the package's callback, Lightning's own ``grad_norm``
    logged per seed in ``on_before_optimizer_step`` (as Lightning's docs show it) and no monitoring,
    interleaved as above (one fit of ``epochs + 1`` epochs per variant per round, the first epoch
    untimed). Each epoch is timed from ``on_train_epoch_start`` to the end of ``on_train_epoch_end``
    (the callback's ``end_epoch`` included). Returns the section as markdown."""
    try:
        import lightning.pytorch as pl
        from lightning.pytorch.utilities import grad_norm

        from tolaria_otel.integrations.lightning import SeedLayerCallback
    except Exception as error:  # noqa: BLE001 - reported instead of the table
        return f"### Workload (d), a Lightning fit: not run: {type(error).__name__}: {error} ({PEER_INSTALL})\n"
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # the per-fit banner
    settings = SeedLayerSettings(enabled=True)
    workload = seeded_mlp_workload(samples, batch, seeds)
    template = workload.build()
    x = torch.cat([b[0] for b in workload.batches])
    y = torch.cat([b[1] for b in workload.batches])

    class Fit(pl.LightningModule):
        def __init__(self, log_grad_norm: bool) -> None:
            super().__init__()
            self.model, self.seeds = copy.deepcopy(template)
            self.log_grad_norm = log_grad_norm

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return _mse(self.model, batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return _sgd(self.model)

        def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
            if self.log_grad_norm:
                for seed_id, seed in self.seeds.items():
                    self.log_dict({f"{seed_id}/{k}": v for k, v in grad_norm(seed, norm_type=2).items()})

    class EpochTimer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.times.append(time.perf_counter() - self.start)

    def fit(variant: str) -> list[float]:
        module = Fit(log_grad_norm=variant == LIGHTNING_VARIANTS[2])
        callbacks: list[pl.Callback] = []
        if variant == LIGHTNING_VARIANTS[1]:
            provider = MeterProvider(metric_readers=[InMemoryMetricReader()], views=seed_layer_views(settings))
            seeds_now = {seed_id: (seed, "TRAINING") for seed_id, seed in module.seeds.items()}
            callbacks.append(SeedLayerCallback(seeds_now, settings=settings, meter_provider=provider))
        timer = EpochTimer()
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=epochs + 1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[*callbacks, timer],
        )  # the timer last: it sees the others' epoch ends
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)
        trainer.fit(module, loader)
        return timer.times[1:]

    times: dict[str, list[float]] = {name: [] for name in LIGHTNING_VARIANTS}
    paired: dict[str, list[float]] = {name: [] for name in LIGHTNING_VARIANTS}
    for round_ in range(rounds):
        order = LIGHTNING_VARIANTS[round_ % 3 :] + LIGHTNING_VARIANTS[: round_ % 3]
        this_round = {name: fit(name) for name in order}
        for name, epoch_times in this_round.items():
            times[name] += epoch_times
            paired[name].append(statistics.median(epoch_times) / statistics.median(this_round[LIGHTNING_VARIANTS[0]]))
        log(f"(d) round {round_ + 1}/{rounds}")
    base = statistics.median(times[LIGHTNING_VARIANTS[0]])
    steps = len(workload.batches)
    lines = [
        f"### Workload (d): {workload.description}, trained by Lightning {pl.__version__} `Trainer.fit` "  # type: ignore[attr-defined]  # set, not re-exported
        f"(CPU, fp32); {rounds} rounds of {epochs} timed epochs\n",
        "| variant | epoch median ms | ratio | paired ratio [IQR] | extra µs/step |",
        "| --- | ---: | ---: | --- | ---: |",
    ]
    for name in LIGHTNING_VARIANTS:
        median = statistics.median(times[name])
        low, high = _quartiles(paired[name])
        lines.append(
            f"| {name} | {median * 1e3:.2f} | {median / base:.3f} | {statistics.median(paired[name]):.3f} "
            f"[{low:.3f}, {high:.3f}] | {(median - base) / steps * 1e6:+.1f} |"
        )
    return "\n".join(lines) + "\n"


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workload",
        choices=("a", "b", "all", "lightning"),
        default="all",
        help="lightning: workload (a) under Lightning's Trainer (not part of all)",
    )
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: 30 for a, 10 for b)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per measurement, (a)")
    parser.add_argument("--deep-epochs", type=int, default=1, help="epochs per measurement, (b)")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--depths", default="25,50,100", help="(b): Linear layers per seed, comma-separated")
    parser.add_argument("--wandb-deep", action="store_true", help="(b): run the wandb peer too (slow)")
    parser.add_argument("--only", help="comma-separated name prefixes of the variants to run (baseline always runs)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on 2 cores)")
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory probes")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    parser.add_argument("--json", help="also write the raw per-epoch times here")
    parser.add_argument("--memory-probe", choices=("baseline", "enabled"), help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = args.rounds or 1
        args.warmup, args.epochs, args.deep_epochs, args.samples, args.depths = 0, 2, 1, 128, "3,5"
        args.no_memory = True
    return args


def select(variants: list[Variant], only: str | None) -> list[Variant]:
    if not only:
        return variants
    prefixes = tuple(p.strip() for p in only.split(",") if p.strip())
    return [v for v in variants if v is variants[0] or v.name.startswith(prefixes)]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if args.memory_probe:
        workload = (
            deep_workload(args.depth, args.samples, args.batch, args.seeds)
            if args.depth
            else seeded_mlp_workload(args.samples, args.batch, args.seeds)
        )
        variant = (
            Baseline()
            if args.memory_probe == "baseline"
            else Telemetry(f"enabled, {args.seeds} seeds", seeds=args.seeds)
        )
        print(json.dumps(memory_probe(workload, variant, args.epochs)))
        return 0

    print(
        f"# tolaria_otel overhead: torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}\n"
    )
    raw: dict[str, Any] = {}
    common = [
        "--samples",
        str(args.samples),
        "--batch",
        str(args.batch),
        "--seeds",
        str(args.seeds),
        "--threads",
        str(args.threads),
    ]
    if args.workload in ("a", "all"):
        workload = seeded_mlp_workload(args.samples, args.batch, args.seeds)
        rounds = args.rounds or 30
        results = measure(
            workload,
            select(all_variants(args.seeds), args.only),
            rounds=rounds,
            warmup=args.warmup,
            epochs=args.epochs,
            log=log,
        )
        print(report(workload, results, args.epochs, rounds), flush=True)
        raw[workload.name] = {r.variant.name: r.times for r in results}
        if not args.no_memory:
            print("Memory, each row a fresh process (peak RSS is the whole process's):\n")
            print(memory_table(common, workload, (args.epochs, 10 * args.epochs)) + "\n", flush=True)
    if args.workload in ("b", "all"):
        per_depth = []
        depths = [int(d) for d in args.depths.split(",")]
        for depth in depths:
            workload = deep_workload(depth, args.samples, args.batch, args.seeds)
            rounds = args.rounds or 10
            results = measure(
                workload,
                select(deep_variants(args.seeds, args.wandb_deep), args.only),
                rounds=rounds,
                warmup=min(args.warmup, 1),
                epochs=args.deep_epochs,
                log=log,
            )
            print(report(workload, results, args.deep_epochs, rounds), flush=True)
            per_depth.append((workload, results))
            raw[workload.name] = {r.variant.name: r.times for r in results}
        print("### Workload (b): extra time per step against the number of seed layers\n")
        print(growth_table(per_depth) + "\n")
        if not args.no_memory:
            print("Memory, deepest (b), each row a fresh process:\n")
            print(memory_table([*common, "--depth", str(depths[-1])], per_depth[-1][0], (args.deep_epochs,)) + "\n")
    if args.workload == "lightning":
        print(lightning_report(args.samples, args.batch, args.seeds, args.rounds or 10, args.epochs, log), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
