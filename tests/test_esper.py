"""Esper wired in (integrations/esper.py) on a stand-in of its loop (tests/esper_standin.py): the slots as the
seed source, a gate appearing mid-epoch, Esper's gradient fields of the last step and of the epoch, and the
layer series staying bounded over episodes of new seed ids. devtools/esper_parity.py runs Esper's real code."""

from __future__ import annotations

import math

import pytest
import torch

from tests.esper_standin import (
    Reference,
    SeedStage,
    batches,
    create_env_state,
    esper_fields,
    esper_ratio,
    process_train_batch,
)
from tests.helpers import collect, metered
from tolaria_otel import SeedLayerSettings, SeedLayerTelemetry
from tolaria_otel.integrations.esper import EsperSeeds, GradientFields, gradient_fields

REL = 1e-5


def settings(**kwargs: object) -> SeedLayerSettings:
    return SeedLayerSettings(enabled=True, **kwargs)  # type: ignore[arg-type]


def close(actual: float | None, expected: float) -> bool:
    return actual is not None and math.isclose(actual, expected, rel_tol=REL, abs_tol=1e-9)


def test_esper_seeds_lists_slots_with_a_state_by_slot_id_and_keeps_the_episode_seed_id():
    env = create_env_state(0)
    seeds = EsperSeeds(env.model)
    assert seeds() == {}
    env.model.slot("r0c1").germinate("ep3_env1_seed_0")
    listed = seeds()
    assert list(listed) == ["r0c1"]
    module, stage = listed["r0c1"]
    assert stage == "GERMINATED"
    assert [id(p) for p in module.parameters()] == [id(p) for p in env.model.slot("r0c1").get_parameters()]
    assert seeds()["r0c1"][0] is module  # unchanged slot: the same object, no new segment
    assert seeds.seed_id_of("r0c1") == "ep3_env1_seed_0"
    env.model.slot("r0c1").gated = True
    env.model.slot("r0c1").advance(SeedStage.BLENDING)  # the gate is created inside the slot
    gated, stage = seeds()["r0c1"]
    assert gated is not module and stage == "BLENDING"
    assert {name for name, _ in gated.named_modules()} >= {"seed.0", "alpha_schedule.gate"}
    env.model.slot("r0c1").prune()
    assert seeds() == {} and seeds.seed_ids == {"r0c1": "ep3_env1_seed_0"}
    with pytest.raises(TypeError, match="seed_slots"):
        EsperSeeds(torch.nn.Linear(2, 2))


def run_gate_epoch(source_of, before: int, after: int):
    """One epoch of a gated TRAINING slot whose gate appears (BLENDING) after ``before`` steps."""
    env = create_env_state(1)
    slot = env.model.slot("r0c0")
    slot.germinate("ep0_env0_seed_0", gated=True)
    slot.advance(SeedStage.TRAINING)
    telemetry = SeedLayerTelemetry(env.model, source_of(env.model), settings=settings())
    telemetry.attach()
    reference = Reference()
    data = batches(torch.Generator().manual_seed(2), before + after)
    for i, (x, y) in enumerate(data):
        if i == before:
            slot.advance(SeedStage.BLENDING)
        process_train_batch(env, x, y, before_clip=reference)
    summary = telemetry.end_epoch()
    telemetry.close()
    return summary.seeds["r0c0"], reference


def test_a_gate_created_mid_epoch_is_measured_from_its_first_step():
    seed, reference = run_gate_epoch(EsperSeeds, before=5, after=7)
    assert not seed.partial and seed.sampled_steps == 12
    gate = sum(step["r0c0"].squares["alpha_schedule.gate"] for step in reference.steps[5:])
    assert close(seed.layer_norms["alpha_schedule.gate"], math.sqrt(gate / 12))
    total = sum(step["r0c0"].total ** 2 for step in reference.steps)
    assert close(seed.total_norm, math.sqrt(total / 12))
    for layer in ("seed.0", "seed.2"):
        assert close(seed.layer_norms[layer], math.sqrt(sum(s["r0c0"].squares[layer] for s in reference.steps) / 12))


def test_the_plain_seed_slot_finds_the_gate_late():
    """Why EsperSeeds presents a new module: the SeedSlot itself stays one object when its gate is created."""
    seed, _ = run_gate_epoch(lambda model: lambda: {"r0c0": (model.seed_slots["r0c0"], "TRAINING")}, 5, 7)
    assert seed.partial


@pytest.mark.parametrize("steps", [10, 64, 70])
def test_gradient_fields_are_esper_s_of_the_last_sampled_step_and_of_the_epoch(steps):
    """Esper's formulas on the float64 reference; 64 steps: the last step was absorbed before the epoch end."""
    env = create_env_state(3)
    env.model.slot("r0c0").germinate("ep1_env0_seed_0", dead_parameter=True)  # a vanishing tensor
    env.model.slot("r0c1").germinate("ep1_env0_seed_1")
    for slot in env.model.slots():
        slot.advance(SeedStage.TRAINING)
    telemetry = SeedLayerTelemetry(env.model, EsperSeeds(env.model), settings=settings(host_norm=True))
    telemetry.attach()
    reference = Reference()
    generator = torch.Generator().manual_seed(4)
    for i, (x, y) in enumerate(batches(generator, steps)):
        process_train_batch(env, x, y, loss_scale=3000.0 if i % 3 == 0 else 1.0, before_clip=reference)  # exploding
    summary = telemetry.end_epoch()
    telemetry.close()
    host_last, host_numel = reference.host[-1]
    host_rms = math.sqrt(sum(norm**2 for norm, _ in reference.host) / steps)
    for slot_id in ("r0c0", "r0c1"):
        seed = summary.seeds[slot_id]
        last = reference.steps[-1][slot_id]
        fields = gradient_fields(seed, summary)
        norm, health, vanishing, exploding = esper_fields(last.total, last.tensors, last.vanishing, last.exploding)
        assert close(fields.gradient_norm, norm) and close(fields.gradient_health, health)
        assert (fields.has_vanishing, fields.has_exploding, fields.measured) == (vanishing, exploding, True)
        assert close(fields.gradient_ratio, esper_ratio(last.total, last.numel, host_last, host_numel))
        assert seed.last_step_tensors == last.tensors
        trues = [step[slot_id] for step in reference.steps]
        rms = math.sqrt(sum(t.total**2 for t in trues) / steps)
        epoch = gradient_fields(seed, summary, over="epoch")
        expected = esper_fields(
            rms, sum(t.tensors for t in trues), sum(t.vanishing for t in trues), sum(t.exploding for t in trues)
        )
        assert close(epoch.gradient_norm, expected[0]) and close(epoch.gradient_health, expected[1])
        assert (epoch.has_vanishing, epoch.has_exploding) == expected[2:]
        assert close(epoch.gradient_ratio, esper_ratio(rms, trues[0].numel, host_rms, host_numel))
    assert gradient_fields(summary.seeds["r0c0"]).has_vanishing  # the dead tensor
    assert any(step["r0c1"].exploding for step in reference.steps)  # the test saw an exploding tensor
    assert gradient_fields(summary.seeds["r0c1"]).gradient_ratio is None  # no summary: no host


def test_gradient_fields_of_a_slot_without_gradient_are_esper_s_empty_collector():
    env = create_env_state(5)
    env.model.slot("r0c0").germinate("ep0_env0_seed_0")  # GERMINATED: outside the graph, clipped anyway
    telemetry = SeedLayerTelemetry(env.model, EsperSeeds(env.model), settings=settings(host_norm=True))
    telemetry.attach()
    for x, y in batches(torch.Generator().manual_seed(6), 3):
        process_train_batch(env, x, y)
    summary = telemetry.end_epoch()
    telemetry.close()
    seed = summary.seeds["r0c0"]
    assert seed.stage == "GERMINATED" and not seed.measured
    assert gradient_fields(seed, summary) == GradientFields(0.0, 1.0, False, False, 0.0, measured=False)
    with pytest.raises(ValueError, match="over="):
        gradient_fields(seed, over="batch")  # type: ignore[arg-type]


def test_two_slots_over_twelve_episodes_keep_a_bounded_set_of_series_and_the_reference_values():
    """Esper's shape: the env state (model, optimizers) is recreated at every episode, with new seed ids
    stamped with the episode; the series are the slots', so their count stops growing after the first."""
    layer_settings = settings(top_k=10)
    provider, reader = metered(layer_settings)
    series: set[frozenset] = set()
    counts = []
    seed_ids = set()
    telemetry = None
    generator = torch.Generator().manual_seed(7)
    for episode in range(12):
        env = create_env_state(100 + episode)
        if telemetry is not None:
            telemetry.close()  # the previous env state's telemetry: one identity per env id
        esper_seeds = EsperSeeds(env.model)
        telemetry = SeedLayerTelemetry(
            env.model, esper_seeds, settings=layer_settings, meter_provider=provider, attributes={"env_id": "0"}
        )
        telemetry.attach()
        for k, slot in enumerate(env.model.slots()):
            slot.germinate(f"ep{episode}_env0_seed_{k}", gated=k == 1)
        for epoch, stage in enumerate((SeedStage.TRAINING, SeedStage.BLENDING)):
            for slot in env.model.slots():
                slot.advance(stage)
            reference = Reference()
            for x, y in batches(generator, 4):
                process_train_batch(env, x, y, before_clip=reference)
            summary = telemetry.end_epoch()
            for slot_id, seed in summary.seeds.items():
                truths = [step[slot_id] for step in reference.steps]
                assert close(seed.total_norm, math.sqrt(sum(t.total**2 for t in truths) / len(truths))), (
                    episode,
                    epoch,
                )
                for layer, value in seed.layer_norms.items():
                    assert close(value, math.sqrt(sum(t.squares[layer] for t in truths) / len(truths)))
                assert close(gradient_fields(seed).gradient_norm, truths[-1].total)
            seed_ids |= set(esper_seeds.seed_ids.values())
            for attributes, _, _ in collect(reader)["tolaria.grad_agg.seed.layer_norm"]:
                series.add(frozenset(attributes.items()))
        counts.append(len(series))
    telemetry.close()
    provider.shutdown()
    assert len(seed_ids) == 24  # every episode's seeds were new
    assert {dict(attributes)["seed_id"] for attributes in series} == {"r0c0", "r0c1"}
    # Per slot, layer and stage (the stage is an attribute): r0c0's seed.0 and seed.2, r0c1's too, in TRAINING
    # and BLENDING, and r0c1's gate in BLENDING; the same nine after the first episode as after the twelfth.
    assert counts[0] == counts[-1] == 2 * 2 + 2 * 2 + 1
