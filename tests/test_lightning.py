"""tolaria_otel.integrations.lightning against a real Lightning fit: gradient accumulation, bf16-mixed, clipping,
seeds that come and go, checked against the gradients backprop produced before the clip (float64 copies)."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn
from torch.optim.optimizer import _global_optimizer_post_hooks
from torch.utils.data import DataLoader, TensorDataset

from tolaria_otel import LAYER_NORM, EpochSummary, SeedLayerSettings, SeedLayerTelemetry
from tolaria_otel.demo.seeded_mlp import SeededMLP, SeedRegistry

from .framework_reference import AppliedGradients, PreClipGradients, assert_exploding_seed_epoch, assert_max_steps
from .helpers import collect, expected_top_k, layer_points, metered

pytest.importorskip("lightning.pytorch")
import lightning.pytorch as pl
from lightning.pytorch.core.optimizer import LightningOptimizer

from tolaria_otel.integrations.lightning import SeedLayerCallback

ON = SeedLayerSettings(enabled=True, top_k=2)
ACCUMULATE = 4
BATCHES = 12  # per epoch: 3 optimizer steps of 4 micro-batches
CLIP = 0.03  # the whole model's gradient norm is clipped to this (it is 0.1 to 0.14 before)


class Regression(pl.LightningModule):
    def __init__(self, model: SeededMLP, registry: SeedRegistry) -> None:
        super().__init__()
        self.model = model
        self.registry = registry
        self.reference: AppliedGradients | None = None
        self.pre_clip: PreClipGradients | None = None
        self.pre_clip_norms: list[float] = []
        #: global step -> the factor one of its micro-batches' inputs is scaled by (a spike at a known step)
        self.spikes: dict[int, float] = {}

    # Optional: a subclass under manual optimization steps inside training_step and returns no loss.
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        x, y = batch
        if batch_idx % ACCUMULATE == 2:  # the third micro-batch of the step: inside the accumulation
            x = x * self.spikes.get(self.trainer.global_step, 1.0)
        return nn.functional.mse_loss(self.model(x), y)

    # A list where a subclass steps several optimizers.
    def configure_optimizers(self) -> torch.optim.Optimizer | list[torch.optim.Optimizer]:
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def on_fit_start(self) -> None:  # the optimizer exists now; Lightning steps a wrapper of it
        self.reference = AppliedGradients(self.trainer.optimizers[0], self.registry)
        clip = self.trainer.gradient_clip_val
        self.pre_clip = PreClipGradients(
            self, self.trainer.optimizers[0], self.registry, float("inf") if clip is None else float(clip)
        )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning's grad_norm hook: accumulated and unscaled, not yet clipped.
        self.pre_clip_norms.append(
            float(
                torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.parameters() if p.grad is not None]))
            )
        )

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        step = self.trainer.global_step
        if step == 2 and "seed-2" not in self.registry.stages:  # germinated mid-epoch
            self.registry.add("seed-2", self.model.seeds["seed_2"], "GERMINATED")
        if step == 4 and "seed-0" in self.registry.stages:  # culled mid-epoch
            self.registry.remove("seed-0")


def network() -> tuple[SeededMLP, SeedRegistry]:
    torch.manual_seed(0)
    model = SeededMLP()
    registry = SeedRegistry()
    for i in range(3):
        seed = model.graft(f"seed_{i}")
        if i < 2:
            registry.add(f"seed-{i}", seed, "TRAINING")
    return model, registry


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    data = TensorDataset(
        torch.randn(BATCHES * 8, 32, generator=generator), torch.randn(BATCHES * 8, 10, generator=generator)
    )
    return DataLoader(data, batch_size=8)


def trainer(*callbacks: pl.Callback, **kwargs: object) -> pl.Trainer:
    options: dict = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        accumulate_grad_batches=ACCUMULATE,
        precision="bf16-mixed",
        gradient_clip_val=CLIP,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **options)


def test_fit_measures_the_gradients_before_clipping_once_per_optimizer_step() -> None:
    gc.collect()  # a telemetry another test left unclosed detaches when collected: not in the middle of this fit
    before = torch.nn.utils.clip_grad_norm_  # torch's, or the patch of a telemetry another test left attached
    model, registry = network()
    module = Regression(model, registry)
    module.spikes = {1: 4.0}  # epoch 0's middle step; epoch 1 (steps 3-5) as it comes: its layers peak apart
    provider, reader = metered(ON)
    summaries: list[EpochSummary] = []
    callback = SeedLayerCallback(registry, settings=ON, meter_provider=provider, on_summary=summaries.append)
    expected = []

    class Reference(pl.Callback):  # the reference's epoch, read when the package summarises it
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            module.reference.epoch()
            expected.append(module.pre_clip.epoch())

    fit = trainer(callback, Reference())
    fit.fit(module, loader())

    assert [s.epoch for s in summaries] == [0, 1]
    assert [s.sampled_steps for s in summaries] == [BATCHES // ACCUMULATE] * 2
    # Clipping acted at every step, and what the optimizer applied is the clipped gradient.
    assert min(module.pre_clip_norms) > 2 * CLIP
    assert max(module.reference.step_totals) == pytest.approx(CLIP, rel=1e-3)
    for summary, (layers, totals, steps, factors) in zip(summaries, expected):
        assert set(summary.seeds) == set(steps)  # a seed culled mid-epoch keeps that epoch's steps
        for seed_id, seed in summary.seeds.items():
            assert seed.sampled_steps == steps[seed_id]
            assert seed.total_norm == pytest.approx(totals[seed_id], rel=1e-5)
            want = expected_top_k(layers[seed_id], ON.top_k)
            assert [layer for layer, _ in seed.top_layers] == [layer for layer, _ in want]
            assert [value for _, value in seed.top_layers] == pytest.approx([v for _, v in want], rel=1e-5)
        # The clip, on its own: it scaled every step down, by the factor torch's clip computes.
        assert summary.clip_steps == summary.clipped_steps == len(factors) == BATCHES // ACCUMULATE
        assert summary.min_clip_factor == pytest.approx(min(factors), rel=1e-5)
    # Each seed's and layer's largest step is at the reference's step, numbered by the reference's own count of
    # optimizer steps since the fit began: the spike's step 1 (seed 2 listed from step 2 only), then in epoch 1
    # steps that go on counting (seed 0 culled after step 3), a layer's peak at another step than its seed's.
    for summary, step_squares in zip(summaries, module.pre_clip.epoch_step_squares, strict=True):
        assert_max_steps(summary, step_squares)
    assert [{s: seed.max_step for s, seed in summary.seeds.items()} for summary in summaries] == [
        {"seed-0": 1, "seed-1": 1, "seed-2": 2},
        {"seed-0": 3, "seed-1": 4, "seed-2": 4},
    ]
    assert set(summaries[1].seeds["seed-1"].layer_max_step.values()) == {3, 4, 5}
    # Seed 2 germinated after step 2 and seed 0 was culled after step 4 (of 3 per epoch).
    assert summaries[0].seeds["seed-2"].sampled_steps == 1
    assert summaries[0].seeds.keys() == {"seed-0", "seed-1", "seed-2"}
    assert summaries[1].seeds.keys() == {"seed-0", "seed-1", "seed-2"}
    assert [seed.left for seed in summaries[1].seeds.values()] == [True, False, False]
    # The fit's end closed the telemetry: the hook is gone (the reference's is left) and the last epoch goes
    # out with the next collection.
    assert callback.telemetry is None
    assert len(fit.optimizers[0]._optimizer_step_post_hooks) == 2  # the two references'
    assert torch.nn.utils.clip_grad_norm_ is before  # the clip as it was before the fit
    points = layer_points(collect(reader)[LAYER_NORM])
    assert points == {
        (seed_id, layer): value for seed_id, seed in summaries[1].seeds.items() for layer, value in seed.top_layers
    }
    provider.shutdown()


def test_step_based_fit_summarises_every_n_steps_and_the_rest_at_the_end() -> None:
    model, registry = network()
    summaries: list[EpochSummary] = []
    callback = SeedLayerCallback(
        registry, settings=ON, meter_provider=metered(ON)[0], every_n_steps=2, on_summary=summaries.append
    )
    trainer(callback, max_epochs=-1, max_steps=5).fit(Regression(model, registry), loader())
    assert [s.sampled_steps for s in summaries] == [2, 2, 1]  # the fifth step's summary comes with the fit's end
    assert [s.epoch for s in summaries] == [0, 1, 2]


def test_a_failing_fit_closes_the_telemetry_and_the_next_fit_starts_afresh() -> None:
    model, registry = network()
    provider, _ = metered(ON)
    summaries: list[EpochSummary] = []
    callback = SeedLayerCallback(registry, settings=ON, meter_provider=provider, on_summary=summaries.append)

    class Failing(Regression):
        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
            if self.trainer.global_step == 2:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    with pytest.raises(RuntimeError, match="boom"):
        trainer(callback).fit(Failing(model, registry), loader())
    assert callback.telemetry is None
    assert [s.sampled_steps for s in summaries] == [2]  # the steps before the failure, summarised at the close
    # Same callback, same provider, same trainer identity: nothing of the failed fit is left in the way.
    trainer(callback, max_epochs=1).fit(Regression(model, registry), loader())
    assert [s.sampled_steps for s in summaries] == [2, BATCHES // ACCUMULATE]


def test_off_installs_nothing() -> None:
    model, registry = network()
    callback = SeedLayerCallback(registry, settings=SeedLayerSettings(enabled=False))
    module = Regression(model, registry)
    global_hooks = set(_global_optimizer_post_hooks)  # other tests' may be there: none may be added
    clip = torch.nn.utils.clip_grad_norm_

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
            assert callback.telemetry is not None and not callback.telemetry.enabled
            assert set(_global_optimizer_post_hooks) == global_hooks
            assert len(trainer.optimizers[0]._optimizer_step_post_hooks) == 2  # the references' alone
            assert torch.nn.utils.clip_grad_norm_ is clip  # not patched

    trainer(callback, Probe(), max_epochs=1).fit(module, loader())


def test_bad_options_fail_at_construction() -> None:
    with pytest.raises(ValueError, match=r"every_n_steps=0 is not valid: expected None .* or an int >= 1"):
        SeedLayerCallback({}, settings=ON, every_n_steps=0)
    with pytest.raises(TypeError, match="on_summary is list: expected a callable"):
        SeedLayerCallback({}, settings=ON, on_summary=[])  # type: ignore[arg-type]


def test_attach_to_the_lightning_optimizer_gives_what_the_callback_gives() -> None:
    model, registry = network()
    summaries: list[EpochSummary] = []
    callback = SeedLayerCallback(registry, settings=ON, meter_provider=metered(ON)[0], on_summary=summaries.append)
    attached = SeedLayerTelemetry(model, registry, settings=ON, meter_provider=metered(ON)[0])
    by_hand = []

    class ByHand(pl.Callback):  # the README's loop inside Lightning: attach() to what self.optimizers() returns
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            optimizer = pl_module.optimizers()
            assert isinstance(optimizer, LightningOptimizer)  # a subclass of LightningOptimizer and SGD both
            attached.attach(optimizer)

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            by_hand.append(attached.end_epoch())

    trainer(callback, ByHand()).fit(Regression(model, registry), loader())
    attached.close()  # left open, it would restore torch's clip whenever it is collected, during another test
    assert [s.to_dict() for s in by_hand] == [s.to_dict() for s in summaries]
    assert [s.sampled_steps for s in by_hand] == [BATCHES // ACCUMULATE] * 2


def test_the_lightning_benchmark_runs_every_variant() -> None:
    from benchmarks.overhead import LIGHTNING_VARIANTS, lightning_report

    report = lightning_report(samples=64, batch=32, seeds=2, rounds=1, epochs=1, log=lambda line: None)
    rows = [line.split("|")[1].strip() for line in report.splitlines() if line.startswith("| Lightning")]
    assert rows == list(LIGHTNING_VARIANTS)  # timings are printed, never asserted


def test_several_optimizers_stepping_on_the_same_gradients_count_once_per_batch() -> None:
    model, registry = network()
    summaries: list[EpochSummary] = []
    callback = SeedLayerCallback(registry, settings=ON, meter_provider=metered(ON)[0], on_summary=summaries.append)

    class HostAndSeeds(Regression):  # manual optimization: one optimizer for the host, one for the seeds
        def __init__(self, model: SeededMLP, registry: SeedRegistry) -> None:
            super().__init__(model, registry)
            self.automatic_optimization = False

        def configure_optimizers(self) -> list[torch.optim.Optimizer]:
            host = [p for name, p in self.model.named_parameters() if not name.startswith("seeds.")]
            return [torch.optim.SGD(host, lr=0.1), torch.optim.SGD(self.model.seeds.parameters(), lr=0.1)]

        def on_fit_start(self) -> None:
            pass

        def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
            pass

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
            optimizers = self.optimizers()
            assert isinstance(optimizers, list)  # two optimizers come as a list
            host, seeds = optimizers
            loss = super().training_step(batch, batch_idx)
            assert loss is not None  # Regression's step returns its loss
            self.manual_backward(loss)
            host.step()
            seeds.step()
            host.zero_grad()
            seeds.zero_grad()

    trainer(callback, max_epochs=1, precision="32-true", gradient_clip_val=None, accumulate_grad_batches=1).fit(
        HostAndSeeds(model, registry), loader()
    )
    assert [s.sampled_steps for s in summaries] == [BATCHES]


def test_an_exploding_seed_under_gradient_clip_val_is_reported_exploding_and_the_others_healthy() -> None:
    """Issue 17: ``gradient_clip_val=1.0``, ``accumulate_grad_batches=2``, one seed's branch scaled by 1000."""
    from .test_clipping import CLIP as ONE
    from .test_clipping import exploding_network, loss_of

    model, registry = exploding_network()

    class Exploding(Regression):
        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            x, y = batch
            return loss_of(self.model(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-9)  # tiny steps: every step explodes alike

        def on_train_batch_end(self, *args: object) -> None:
            pass

    module = Exploding(model, registry)
    summaries: list[EpochSummary] = []
    expected = []

    class Reference(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            expected.append(module.pre_clip.epoch())

    callback = SeedLayerCallback(registry, settings=ON, meter_provider=metered(ON)[0], on_summary=summaries.append)
    trainer(
        callback, Reference(), max_epochs=1, precision="32-true", gradient_clip_val=ONE, accumulate_grad_batches=2
    ).fit(module, loader())
    (summary,), ((layers, totals, _, factors),) = summaries, expected
    assert len(factors) == BATCHES // 2
    assert_exploding_seed_epoch(summary, layers, totals, factors)
