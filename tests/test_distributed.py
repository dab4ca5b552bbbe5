"""torch.distributed: exact values under DDP and FSDP2, one exporting rank, one all-reduce per epoch.

Each test runs two ranks on CPU with the gloo backend, in processes it starts and always reaps: the
ranks write JSON results and the test joins them by a deadline, killing any that is left.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import multiprocessing
import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import torch.distributed as dist
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tolaria_otel import (
    LAYER_NORM,
    EpochSummary,
    SeedLayerSettings,
    SeedLayerTelemetry,
    SettingsError,
    configure_meter_provider,
)
from tolaria_otel.config.settings import ENV_EXPORT_RANK
from tolaria_otel.demo.seeded_mlp import SeededMLP, SeedRegistry
from tolaria_otel.export.resource import RANK_ATTRIBUTE, WORLD_SIZE_ATTRIBUTE, distributed_resource, process_group
from tolaria_otel.reduce.ranks import SlotLayout

from .framework_reference import TOTAL, assert_max_steps, first_largest
from .helpers import ReferenceNorms, collect, provider_readers, seeded_network, telemetry_for

pytestmark = pytest.mark.distributed

WORLD = 2
DEADLINE_S = 90.0  # a rank that fails leaves its peer in a collective until gloo's 30 s timeout
LOCAL_BATCH = 8
STEPS = 3
EPOCHS = 2
# Esper's upper tensor bound low enough that these small gradients count on both sides (thin's vanish).
ON = SeedLayerSettings(enabled=True, top_k=2, host_norm=True, tensor_exploding_above=0.005)


# --- running ranks --------------------------------------------------------------------------------


def run_ranks(
    worker: Callable[..., Any],
    out: Path,
    *args: Any,
    env: dict[str, str] | None = None,
    world: int = WORLD,
    deadline_s: float = DEADLINE_S,
) -> list[Any]:
    """Run ``worker(rank, *args)`` on every rank of a fresh gloo group of ``world`` ranks; its JSON-ready
    results, by rank."""
    with socket.socket() as probe:  # a port the kernel just called free; the ranks bind it at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    ranks = [
        context.Process(target=_rank_main, args=(worker, rank, world, port, str(out), env or {}, args), daemon=True)
        for rank in range(world)
    ]
    for process in ranks:
        process.start()
    deadline = time.monotonic() + deadline_s
    try:
        running = list(ranks)
        while running and time.monotonic() < deadline:
            for sentinel in wait([p.sentinel for p in running], timeout=max(0.0, deadline - time.monotonic())):
                finished = next(p for p in running if p.sentinel == sentinel)
                finished.join()
                running.remove(finished)
                assert finished.exitcode == 0, f"rank {ranks.index(finished)} exited with {finished.exitcode}"
        assert not running, f"ranks {[ranks.index(p) for p in running]} still running after {deadline_s} s"
    finally:
        for process in ranks:
            if process.is_alive():
                process.kill()
            process.join(10)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(world)]


def _rank_main(
    worker: Callable[..., Any], rank: int, world: int, port: int, out: str, env: dict[str, str], args: tuple[Any, ...]
) -> None:
    os.environ.update(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    try:
        result = worker(rank, *args)
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    # Skip interpreter teardown: there gloo's background threads can hit std::terminate (SIGABRT,
    # "terminate called without an active exception") after the work is done and written.
    os._exit(0)


class Collectives(TorchDispatchMode):
    """Records the collectives (c10d and functional-collective ops) run while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional"):
            self.ops.append(func._schema.name)
        return func(*args, **(kwargs or {}))


# --- training, the same on every rank and in the single-process reference --------------------------


def thin_network() -> tuple[SeededMLP, SeedRegistry]:
    """Two seeds, plus one so thin (hidden width 1) that FSDP2 leaves rank 1 an empty shard of most of it."""
    model, registry = seeded_network(2)
    registry.add("thin", model.graft("thin", hidden=1), "TRAINING")
    return model, registry


def global_batches(epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(100 + epoch)
    return [
        (
            torch.randn(WORLD * LOCAL_BATCH, 32, generator=generator),
            torch.randn(WORLD * LOCAL_BATCH, 10, generator=generator),
        )
        for _ in range(STEPS)
    ]


def growing_batches(epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Epochs of 2, 5 and 3 steps: the second has more sampled steps than the one before."""
    generator = torch.Generator().manual_seed(200 + epoch)
    return [
        (
            torch.randn(WORLD * LOCAL_BATCH, 32, generator=generator),
            torch.randn(WORLD * LOCAL_BATCH, 10, generator=generator),
        )
        for _ in range((2, 5, 3)[epoch])
    ]


def train(
    model: nn.Module,
    telemetry: SeedLayerTelemetry,
    part: slice,
    batches: Callable[[int], list] = global_batches,
    epochs: int = EPOCHS,
    before_step: Callable[[], None] = lambda: None,
    after_epoch: Callable[[EpochSummary | None], None] = lambda summary: None,
) -> list:
    """``epochs`` epochs of SGD on the ``part`` of each global batch; the summaries, and the collectives
    the telemetry ran at each step and epoch end. ``before_step`` sees each step's gradients first,
    ``after_epoch`` each summary."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    summaries, step_ops, epoch_ops = [], [], []
    for epoch in range(epochs):
        for x, y in batches(epoch):
            nn.functional.mse_loss(model(x[part]), y[part]).backward()
            before_step()
            with Collectives() as step:
                telemetry.observe_step()
            step_ops += step.ops
            optimizer.step()
            optimizer.zero_grad()
        with Collectives() as end:
            summary = telemetry.end_epoch()
        epoch_ops.append(end.ops)
        after_epoch(summary)
        summaries.append(summary.to_dict())
    return [summaries, step_ops, epoch_ops]


def single_process_reference(
    network: Callable[[], tuple[SeededMLP, SeedRegistry]],
    batches: Callable[[int], list] = global_batches,
    epochs: int = EPOCHS,
) -> list[dict]:
    """The same epochs, unsharded, in this process, over the whole global batches; its largest steps checked
    against float64 per-step squares numbered from 0 at the run's first step (not per epoch)."""
    model, registry = network()
    telemetry, _ = telemetry_for(model, registry, ON)
    squares: dict[str, dict[str, list[tuple[int, float]]]] = {}
    steps = [0]

    def record() -> None:  # each seed's and layer's square of this step
        for seed_id, module in registry.modules.items():
            layers = squares.setdefault(seed_id, {})
            for name, sub in module.named_modules():
                if params := list(sub.parameters(recurse=False)):
                    value = sum(float(p.grad.double().square().sum()) for p in params if p.grad is not None)
                    layers.setdefault(name, []).append((steps[0], value))
            total = sum(float(p.grad.double().square().sum()) for p in module.parameters() if p.grad is not None)
            layers.setdefault(TOTAL, []).append((steps[0], total))
        steps[0] += 1

    def epoch_end(summary: EpochSummary | None) -> None:
        assert summary is not None
        assert_max_steps(summary, squares)
        squares.clear()

    summaries = train(model, telemetry, slice(None), batches, epochs, record, epoch_end)[0]
    assert steps[0] == sum(len(batches(epoch)) for epoch in range(epochs))
    return summaries


def assert_same_summaries(got: list[dict], want: list[dict], *, sharded: bool = False) -> None:
    """Equal to the unsharded run; Esper's tensor counts too, but not known for a sharded gradient."""
    assert len(got) == len(want)
    for got_epoch, want_epoch in zip(got, want):
        assert got_epoch["sampled_steps"] == want_epoch["sampled_steps"]
        assert got_epoch["host_norm"] == pytest.approx(want_epoch["host_norm"], rel=1e-4)
        assert [s["seed_id"] for s in got_epoch["seeds"]] == [s["seed_id"] for s in want_epoch["seeds"]]
        for got_seed, want_seed in zip(got_epoch["seeds"], want_epoch["seeds"]):
            assert (got_seed["stage"], got_seed["layer_count"]) == (want_seed["stage"], want_seed["layer_count"])
            assert got_seed["total_norm"] == pytest.approx(want_seed["total_norm"], rel=1e-4)
            assert [p["layer"] for p in got_seed["top_layers"]] == [p["layer"] for p in want_seed["top_layers"]]
            assert [p["value"] for p in got_seed["top_layers"]] == pytest.approx(
                [p["value"] for p in want_seed["top_layers"]], rel=1e-4
            )
            # The spikes and the distribution need the ranks' squares summed per step: exact too.
            assert got_seed["max_norm"] == pytest.approx(want_seed["max_norm"], rel=1e-4)
            assert [p["max"] for p in got_seed["top_layers"]] == pytest.approx(
                [p["max"] for p in want_seed["top_layers"]], rel=1e-4
            )
            assert got_seed["layers"] == pytest.approx(want_seed["layers"], rel=1e-4)
            # Each seed's and layer's largest step, numbered over the run (the reference's own checked in float64).
            assert (got_seed["max_step"], got_seed["layer_max_step"]) == (
                want_seed["max_step"],
                want_seed["layer_max_step"],
            )
            assert got_seed["host_ratio"] == pytest.approx(want_seed["host_ratio"], rel=1e-4)
            assert (got_seed["step_norm_counts"], got_seed["nonfinite_steps"], got_seed["health"]) == (
                want_seed["step_norm_counts"],
                want_seed["nonfinite_steps"],
                want_seed["health"],
            )
            assert got_seed["gradient_tensors"] == want_seed["gradient_tensors"]
            counts = ("vanishing_tensor_steps", "exploding_tensor_steps")
            assert [got_seed[name] for name in counts] == (
                [None, None] if sharded else [want_seed[name] for name in counts]
            )


def exported(reader: InMemoryMetricReader) -> dict[str, Any]:
    data = reader.get_metrics_data()
    resources = [dict(r.resource.attributes) for r in data.resource_metrics] if data else []
    points = [[attributes, value] for attributes, value, _ in collect(reader)[LAYER_NORM]]
    return {"resources": resources, "points": points}


# --- DDP -------------------------------------------------------------------------------------------


def _ddp_rank(rank: int) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel

    try:
        SeedLayerTelemetry(nn.Linear(1, 1), {}, settings=ON.replace(export_rank=WORLD))
        bad_export_rank = ""
    except SettingsError as error:
        bad_export_rank = str(error)
    model, registry = thin_network()
    reader = InMemoryMetricReader()
    provider = configure_meter_provider(ON, readers=[reader])  # OTEL_METRICS_EXPORTER=none: only the reader
    telemetry = SeedLayerTelemetry(model, registry, settings=ON, meter_provider=provider)
    summaries, _, _ = train(
        DistributedDataParallel(model), telemetry, slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    )
    return {
        "summaries": summaries,
        "exports": telemetry.exports,
        "bad_export_rank": bad_export_rank,
        **exported(reader),
    }


def test_ddp_equals_single_process_and_only_rank_0_exports(tmp_path):
    ranks = run_ranks(_ddp_rank, tmp_path, env={"OTEL_METRICS_EXPORTER": "none"})
    reference = single_process_reference(thin_network)
    for result in ranks:  # Tamiyo reads the same summary on every rank
        assert_same_summaries(result["summaries"], reference)
        assert result["bad_export_rank"] == (
            f"export_rank=2 is not valid: expected a rank from 0 to 1 (world size 2; set by {ENV_EXPORT_RANK})"
        )
    zero, one = ranks
    assert (zero["exports"], one["exports"]) == (True, False)
    assert one["points"] == [] and one["resources"] == []
    last = {s["seed_id"]: s for s in reference[-1]["seeds"]}
    assert len(zero["points"]) == ON.top_k * len(last)  # top_k series per seed, not top_k x world size
    for attributes, value in zero["points"]:
        assert set(attributes) == {"seed_id", "stage", "layer"}  # the rank is never a point attribute
        want = {p["layer"]: p["value"] for p in last[attributes["seed_id"]]["top_layers"]}
        assert value == pytest.approx(want[attributes["layer"]], rel=1e-4)
    (resource,) = zero["resources"]
    assert (resource[RANK_ATTRIBUTE], resource[WORLD_SIZE_ATTRIBUTE]) == (0, WORLD)


class Warnings(logging.Handler):
    """The package's warnings in a rank, as their messages."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        logging.getLogger("tolaria_otel").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _growing_rank(rank: int) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel

    warnings = Warnings()
    model, registry = thin_network()
    telemetry, _ = telemetry_for(model, registry, ON)
    summaries, _, epoch_ops = train(
        DistributedDataParallel(model),
        telemetry,
        slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH),
        growing_batches,
        3,
    )
    return {
        "summaries": summaries,
        "epoch_ops": epoch_ops,
        "warnings": warnings.messages,
        "failures": telemetry.failures,
    }


def test_ddp_epoch_longer_than_the_last_is_one_all_reduce_and_no_failure(tmp_path):
    """Issue 17.7: an epoch with more sampled steps than the one before raised an IndexError in the
    reduction, logged on every rank as a failure, and cost an exchange and a second all-reduce."""
    reference = single_process_reference(thin_network, growing_batches, 3)
    for result in run_ranks(_growing_rank, tmp_path):
        assert result["warnings"] == [] and result["failures"] == 0
        assert_same_summaries(result["summaries"], reference)
        assert [summary["sampled_steps"] for summary in result["summaries"]] == [2, 5, 3]
        assert result["epoch_ops"][1:] == [["c10d::allreduce_"]] * 2  # the step count is no part of the layout


def _pull_mode_rank(rank: int) -> list[str]:
    provider = configure_meter_provider(ON)
    try:
        return [type(reader).__name__ for reader in provider_readers(provider)]
    finally:
        provider.shutdown()


def test_pull_mode_serves_from_the_export_rank_only(tmp_path):
    """Every rank of a node reads the same OTEL_EXPORTER_PROMETHEUS_PORT: only the export rank binds it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        "OTEL_METRICS_EXPORTER": "prometheus",
        "OTEL_EXPORTER_PROMETHEUS_HOST": "127.0.0.1",
        "OTEL_EXPORTER_PROMETHEUS_PORT": str(port),
    }
    assert run_ranks(_pull_mode_rank, tmp_path, env=env) == [["ServingPrometheusReader"], []]


# --- FSDP2 -----------------------------------------------------------------------------------------


def _fsdp_rank(rank: int) -> dict[str, Any]:
    """FSDP2 on both ranks, then HSDP (replicated across the 2 ranks, shards of one): the weights differ."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    meshes = {
        "fsdp": init_device_mesh("cpu", (WORLD,)),
        "hsdp": init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("replicate", "shard")),
    }
    results = {}
    for name, mesh in meshes.items():
        model, registry = thin_network()
        for seed in model.seeds.values():
            fully_shard(seed, mesh=mesh)
        fully_shard(model, mesh=mesh)
        # fully_shard made every parameter a DTensor; nn.Module types them as plain Parameters.
        empty_shards = sum(cast(DTensor, p).to_local().numel() == 0 for p in model.seeds["thin"].parameters())
        telemetry, _ = telemetry_for(model, registry, ON)
        summaries, step_ops, epoch_ops = train(model, telemetry, slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH))
        results[name] = {
            "summaries": summaries,
            "step_ops": step_ops,
            "epoch_ops": epoch_ops,
            "empty_shards": empty_shards,
            "failures": telemetry.failures,
        }
    return results


@pytest.fixture(scope="module")
def fsdp_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_ranks(_fsdp_rank, tmp_path_factory.mktemp("fsdp"))


@pytest.mark.parametrize(("mesh", "empty_shards"), [("fsdp", [0, 4]), ("hsdp", [0, 0])])
def test_fsdp2_sharded_gradients_equal_unsharded_with_one_all_reduce_per_epoch(fsdp_ranks, mesh, empty_shards):
    reference = single_process_reference(thin_network)
    results = [ranks[mesh] for ranks in fsdp_ranks]
    for result in results:
        assert result["failures"] == 0
        assert_same_summaries(result["summaries"], reference, sharded=True)
        assert result["step_ops"] == []  # the step path measures local shards: no collective at all
        first, *later = result["epoch_ops"]
        assert first.count("c10d::allreduce_") == 1  # plus the layout exchange, once
        assert set(first) == {"c10d::allreduce_", "c10d::allgather_"}
        assert later == [["c10d::allreduce_"]] * (EPOCHS - 1)
    # FSDP: rank 1 holds nothing of thin's first two layers; HSDP: both ranks hold every (whole) shard.
    assert [result["empty_shards"] for result in results] == empty_shards


# --- seeds on some ranks, an idle rank, seeds that come, go and change stage ------------------------


def _uneven_rank(rank: int) -> dict[str, Any]:
    """No DDP: each rank trains its own model on its own data, holding different seeds.

    ``shared`` and ``idle`` are on both ranks, but ``idle`` is never in rank 1's forward (no gradient
    there); ``only0``/``only1`` live on one rank; ``gone`` is culled on both ranks at the end of
    epoch 0, when rank 1 also grafts ``late`` and moves ``only1`` to BLENDING.
    """
    torch.manual_seed(0)
    model = SeededMLP()
    registry = SeedRegistry()
    for seed_id in ("shared", "idle", "gone", f"only{rank}"):
        module = model.graft(seed_id, hidden=8)
        registry.add(seed_id, module, "TRAINING")
    if rank == 1:
        del model.seeds["idle"]  # still a seed of rank 1's Kasmina, but it never runs there
    settings = SeedLayerSettings.from_env()
    telemetry, reader = telemetry_for(model, registry, settings)
    reference = ReferenceNorms(registry)
    generator = torch.Generator().manual_seed(rank)
    summaries, epoch_ops, local = [], [], []
    for epoch in range(EPOCHS):
        for _ in range(STEPS):
            x, y = torch.randn(LOCAL_BATCH, 32, generator=generator), torch.randn(LOCAL_BATCH, 10, generator=generator)
            nn.functional.mse_loss(model(x), y).backward()
            reference.hook(None, None, None)  # type: ignore[arg-type]
            telemetry.observe_step()
            model.zero_grad()
        if epoch == 0:
            registry.remove("gone")
            if rank == 1:
                registry.add("late", model.graft("late", hidden=8), "GERMINATED")
                registry.stages["only1"] = "BLENDING"
        layers, totals = reference.epoch()
        local.append({"layers": layers, "totals": totals})
        with Collectives() as end:
            summaries.append(telemetry.end_epoch().to_dict())
        epoch_ops.append(end.ops)
    return {
        "summaries": summaries,
        "epoch_ops": epoch_ops,
        "local": local,
        "exports": telemetry.exports,
        "points": exported(reader)["points"],
        "settings": [settings.export_rank, settings.top_k],
    }


def test_seeds_on_some_ranks_and_an_idle_rank_give_exact_values_and_no_hang(tmp_path):
    env = {"TOLARIA_SEED_LAYER_SUMMARIES_ENABLED": "true", ENV_EXPORT_RANK: "1", "TOLARIA_SEED_LAYER_TOPK": "5"}
    zero, one = run_ranks(_uneven_rank, tmp_path, env=env)
    assert zero["summaries"] == one["summaries"]  # every rank gets the same global summary
    assert zero["settings"] == one["settings"] == [1, 5]
    assert (zero["exports"], one["exports"]) == (False, True)
    assert zero["points"] == []

    expected_seeds = [["gone", "idle", "only0", "only1", "shared"], ["idle", "late", "only0", "only1", "shared"]]
    for epoch, summary in enumerate(one["summaries"]):
        assert summary["sampled_steps"] == STEPS
        seeds = {s["seed_id"]: s for s in summary["seeds"]}
        assert sorted(seeds) == expected_seeds[epoch]  # "gone" culled at the end of epoch 0 (its last), "late" from 1
        assert [s for s in seeds if seeds[s]["left"]] == (["gone"] if epoch == 0 else [])
        assert seeds["only1"]["stage"] == "BLENDING"  # rank 1's stage, known to rank 0
        for seed_id, seed in seeds.items():
            # A plain gradient counts as replicated across its holders: the mean over those that saw one.
            holders = [rank["local"][epoch] for rank in (zero, one) if rank["local"][epoch]["totals"].get(seed_id)]
            want_total = math.sqrt(sum(h["totals"][seed_id] ** 2 for h in holders) / len(holders))
            assert seed["total_norm"] == pytest.approx(want_total, rel=1e-5)
            assert seed["layer_count"] == 3
            for point in seed["top_layers"]:
                want = math.sqrt(sum(h["layers"][seed_id][point["layer"]] ** 2 for h in holders) / len(holders))
                assert point["value"] == pytest.approx(want, rel=1e-5)
    assert seeds["idle"]["total_norm"] == pytest.approx(zero["local"][1]["totals"]["idle"], rel=1e-5)
    assert {attributes["seed_id"] for attributes, _ in one["points"]} == set(expected_seeds[1])
    for result in (zero, one):
        first, second = result["epoch_ops"]
        assert first.count("c10d::allreduce_") == 1
        # Epoch 1 measured other slots than epoch 0 ("late" came, "gone" went, a stage moved): the
        # all-reduce says so, the ranks agree on the new layout and reduce once more in it.
        assert second == ["c10d::allreduce_", "c10d::allgather_", "c10d::allgather_", "c10d::allreduce_"]


# --- epochs of 100 and 10,000 steps: the same traffic, exact values -------------------------------

SCALE_STEPS = (100, 10_000, 64)  # sampled steps of the epochs; the last one a whole chunk


def scale_model(sharded: bool, world: int) -> nn.ModuleDict:
    """Two seeds of two Linear layers; sharded: every parameter a DTensor ``Shard(0)``, as FSDP2 leaves
    it (with 4 ranks some shards are empty)."""
    torch.manual_seed(0)
    model = nn.ModuleDict({f"s{i}": nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)) for i in range(2)})
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                module._parameters[name] = nn.Parameter(distribute_tensor(param.detach(), mesh, [Shard(0)]))
    return model


def _scale_rank(rank: int, world: int, kinds: list[str]) -> dict[str, Any]:
    """Gradients as DDP (every rank the same, averaged) or FSDP2 (each rank its ``Shard(0)`` piece of
    one global gradient) leave them, drawn for the whole epoch from one generator every rank shares and
    copied into the gradients step by step, without a training step, so that 10,000 steps take seconds
    (the DDP and FSDP2 tests above train for real). Per kind: the summaries, the bytes of every
    all-reduce the telemetry ran, per epoch, at the steps and at the epoch end; on rank 0 the float64
    per-step squares of the global gradients, per seed and layer ("" the seed's total)."""
    from torch.distributed.tensor import DTensor

    results: dict[str, Any] = {}
    original = dist.all_reduce
    for kind in kinds:
        model = scale_model(kind == "sharded", world)
        registry = SeedRegistry()
        for seed_id, module in model.items():
            registry.add(seed_id, module, "TRAINING")
        params = [
            (seed_id, layer, param)
            for seed_id, module in model.items()
            for layer, sub in module.named_modules()
            for param in sub.parameters(recurse=False)
        ]
        for _, _, param in params:  # the gradient tensors each step is copied into
            grad = torch.zeros(param.shape)
            if isinstance(param, DTensor):
                piece = [*torch.chunk(grad, world), *[grad[:0]] * world][rank]  # Shard(0)'s split
                assert piece.shape == param.to_local().shape
                grad = DTensor.from_local(
                    piece.clone(),
                    param.device_mesh,
                    param.placements,
                    run_check=False,
                    shape=grad.shape,
                    stride=grad.stride(),
                )
            param.grad = grad
        telemetry, _ = telemetry_for(model, registry, SeedLayerSettings(enabled=True, top_k=2))
        sizes: list[int] = []

        def recording(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            sizes.append(  # noqa: B023 - this kind's list: each kind installs its own recording before it trains
                tensor.numel() * tensor.element_size()
            )
            return original(tensor, *args, **kwargs)

        dist.all_reduce = recording
        generator = torch.Generator().manual_seed(7)
        summaries, step_bytes, end_bytes, reference = [], [], [], []
        for steps in SCALE_STEPS:
            scales = {
                seed_id: 10.0 ** (4 * torch.rand(steps, generator=generator, dtype=torch.float64) - 3)
                for seed_id in model
            }  # per-step norms over four decades: many histogram buckets
            grads = [
                (
                    scales[seed_id].view(-1, *[1] * param.dim())
                    * torch.randn(steps, *param.shape, generator=generator, dtype=torch.float64)
                ).float()
                for seed_id, _, param in params
            ]
            targets = [
                param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad for _, _, param in params
            ]
            pieces = [
                grad
                if target.shape == grad.shape[1:]
                else [*torch.chunk(grad, world, dim=1), *[grad[:, :0]] * world][rank]
                for grad, target in zip(grads, targets)
            ]
            for step in range(steps):
                for target, piece in zip(targets, pieces):
                    target.copy_(piece[step])
                telemetry.observe_step()
            step_bytes.append(sizes[:])
            sizes.clear()
            summaries.append(telemetry.end_epoch().to_dict())
            end_bytes.append(sizes[:])
            sizes.clear()
            squares: dict[str, dict[str, list[float]]] = {}
            if rank == 0:
                for (seed_id, layer, _), grad in zip(params, grads):
                    per_step = grad.double().flatten(1).square().sum(1)
                    for key in (layer, ""):
                        layers = squares.setdefault(seed_id, {})
                        layers[key] = (
                            (torch.tensor(layers[key], dtype=torch.float64) + per_step).tolist()
                            if key in layers
                            else per_step.tolist()
                        )
            reference.append(squares)
        dist.all_reduce = original
        results[kind] = {
            "summaries": summaries,
            "step_bytes": step_bytes,
            "end_bytes": end_bytes,
            "reference": reference,
            "failures": telemetry.failures,
        }
    return results


def assert_equals_reference(summary: dict, squares: dict[str, dict[str, list[float]]], first_step: int) -> None:
    """The epoch's summary against float64 per-step squares of the global gradients; ``first_step``: the number
    of the epoch's first step (steps count over the whole run)."""
    from tolaria_otel.config.histogram import HISTOGRAM_BOUNDARIES

    for seed in summary["seeds"]:
        layers = squares[seed["seed_id"]]
        total = layers[""]
        assert seed["sampled_steps"] == len(total)
        assert seed["total_norm"] == pytest.approx(math.sqrt(sum(total) / len(total)), rel=1e-4)
        assert seed["max_norm"] == pytest.approx(math.sqrt(max(total)), rel=1e-5)
        numbered = {layer: list(enumerate(values, first_step)) for layer, values in layers.items()}
        assert seed["max_step"] == first_largest(numbered[""], margin=1e-5)
        assert seed["layer_max_step"] == {layer: first_largest(numbered[layer], margin=1e-5) for layer in ("0", "2")}
        for layer in ("0", "2"):
            assert seed["layers"][layer] == pytest.approx(math.sqrt(sum(layers[layer]) / len(total)), rel=1e-4)
        for point in seed["top_layers"]:
            assert point["max"] == pytest.approx(math.sqrt(max(layers[point["layer"]])), rel=1e-5)
        counts = [0] * (len(HISTOGRAM_BOUNDARIES) + 1)
        for square in total:  # OpenTelemetry's explicit buckets: (b[i-1], b[i]]
            counts[bisect.bisect_left(HISTOGRAM_BOUNDARIES, math.sqrt(square))] += 1
        assert seed["step_norm_counts"] == counts
        assert seed["nonfinite_steps"] == 0


@pytest.mark.parametrize(("world", "kinds"), [(2, ["replicated", "sharded"]), (4, ["sharded"])])
def test_epochs_of_100_and_10000_steps_reduce_the_same_bytes_exactly(tmp_path, world, kinds):
    """Issue 18.3: memory and all-reduce size independent of the epoch's length, values exact. The
    epoch end's all-reduce is ``61 x slots + 129 x sharded slots + world + 1`` float32 values
    (docs/distributed.md); a replicated gradient needs nothing per step, a sharded one one all-reduce
    of 129 x its slots per 64 sampled steps. Four ranks run the sharded kind only, with empty shards
    (a replicated gradient's reduction does not depend on the world size), to keep the suite short."""
    ranks = run_ranks(_scale_rank, tmp_path, world, kinds, world=world, deadline_s=240)  # 4 ranks on 2 shared cores
    slots = 6  # two seeds: two layers and a total each
    for kind in kinds:
        sharded = slots if kind == "sharded" else 0
        results = [result[kind] for result in ranks]
        for result in results:
            assert result["failures"] == 0
            assert result["summaries"] == results[0]["summaries"]  # every rank the same global summary
            end = [4 * (61 * slots + 129 * sharded + world + 1)]
            assert result["end_bytes"] == [end] * 3  # 100 steps and 10,000 steps: the same all-reduce
            assert result["step_bytes"] == [
                [4 * 129 * sharded] * (steps // 64 if sharded else 0) for steps in SCALE_STEPS
            ]
        first_steps = [sum(SCALE_STEPS[:epoch]) for epoch in range(len(SCALE_STEPS))]  # 0, 100, 10,100
        for summary, squares, steps, first in zip(
            results[0]["summaries"], results[0]["reference"], SCALE_STEPS, first_steps, strict=True
        ):
            assert summary["sampled_steps"] == steps
            assert_equals_reference(summary, squares, first)


# --- without torch.distributed, and the pieces -----------------------------------------------------


def test_without_torch_distributed_nothing_changes():
    assert not dist.is_initialized()
    assert process_group() is None
    assert distributed_resource().attributes == {}
    model, registry = seeded_network(1)
    telemetry, _ = telemetry_for(model, registry, ON.replace(export_rank=5))  # no world to check it against
    assert telemetry.exports and telemetry._ranks is None


@pytest.mark.parametrize(("raw", "expected"), [("0", 0), (" 3 ", 3), ("1000000", 1_000_000)])
def test_export_rank_read_from_the_environment(raw, expected):
    assert SeedLayerSettings.from_env({ENV_EXPORT_RANK: raw}).export_rank == expected
    assert SeedLayerSettings.from_env({}).export_rank == 0


@pytest.mark.parametrize("raw", ["-1", "1.5", "one", "1000001"])
def test_bad_export_rank_names_variable_value_and_accepted(raw):
    message = f"{ENV_EXPORT_RANK}={raw!r} is not valid: expected an integer from 0 to 1000000"
    with pytest.raises(SettingsError, match="^" + message.replace(".", r"\.") + "$"):
        SeedLayerSettings.from_env({ENV_EXPORT_RANK: raw})


def test_slot_layout_is_the_union_with_the_lowest_rank_stage_and_left_where_no_rank_lists_a_seed_at_the_end():
    layout = SlotLayout.agree(
        [
            (
                (("a", ""), ("a", "(root)"), ("a", "net.0"), ("b", ""), ("b", "net.0")),
                (("a", "TRAINING", False), ("b", "TRAINING", False)),
                (("b", ""), ("b", "net.0")),
                3,
            ),
            (
                (("b", ""), ("b", "net.0"), ("b", "net.1"), ("c", ""), ("c", "net.0")),
                (("b", "BLENDING", True), ("c", "GERMINATED", True)),
                (),
                0,
            ),
        ]
    )
    assert layout.sharded == (("b", ""), ("b", "net.0"))
    assert layout.steps == 3  # the per-step rows reduced for the sharded slots: the most any rank sampled
    assert layout.stages == {"a": "TRAINING", "b": "TRAINING", "c": "GERMINATED"}
    assert layout.left == {"a"}  # "b" left rank 0 but rank 1 still lists it
    assert layout.slots == (
        ("a", ""),
        ("a", "(root)"),
        ("a", "net.0"),
        ("b", ""),
        ("b", "net.0"),
        ("b", "net.1"),
        ("c", ""),
        ("c", "net.0"),
    )
    plain = SlotLayout.agree([((("a", ""),), (("a", "TRAINING", True),), (), 0), ((("a", ""),), (), (), 0)])
    assert (plain.sharded, plain.steps) == ((), 0)  # nothing sharded: no per-step rows at all
