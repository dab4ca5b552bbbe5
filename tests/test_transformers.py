"""tolaria_otel.integrations.hf_trainer against a real Trainer.train(): a tiny randomly initialised BERT (built from
its config, nothing downloaded), gradient accumulation, bf16 on the CPU, clipping, a seed arriving
mid-run; checked against the gradients backprop produced before the Trainer's clip (float64 copies)."""

from __future__ import annotations

import gc
import os
from typing import Any

import pytest
import torch
from torch.optim.optimizer import _global_optimizer_post_hooks

from tolaria_otel import EpochSummary, SeedLayerSettings

from .framework_reference import AppliedGradients, PreClipGradients, assert_exploding_seed_epoch, assert_max_steps
from .helpers import expected_top_k, metered

os.environ["HF_HUB_OFFLINE"] = "1"  # read when transformers is imported: nothing may be fetched
pytest.importorskip("transformers")
import transformers

from tolaria_otel.integrations.hf_trainer import SeedLayerCallback

ON = SeedLayerSettings(enabled=True, top_k=3)
ACCUMULATE = 4
SAMPLES = 48  # batches of 4: 12 micro-batches, 3 optimizer steps per epoch
CLIP = 0.05  # max_grad_norm; the gradient norm before clipping is well above it


class Sentences(torch.utils.data.Dataset):
    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(1)
        self.ids = torch.randint(1, 64, (SAMPLES, 8), generator=generator)
        self.labels = torch.randint(0, 2, (SAMPLES,), generator=generator)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.labels[i]}


def tiny_bert() -> transformers.BertForSequenceClassification:
    torch.manual_seed(0)
    # dataclass_transform hides that the config passes other keywords (num_labels) on to __post_init__.
    config = transformers.BertConfig(  # type: ignore[call-arg]
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    return transformers.BertForSequenceClassification(config)


def arguments(tmp_path: object, **kwargs: object) -> transformers.TrainingArguments:
    options: dict = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=True,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=ACCUMULATE,
        max_grad_norm=CLIP,
        num_train_epochs=2,
        lr_scheduler_type="constant",
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    options.update(kwargs)
    return transformers.TrainingArguments(**options)


class SpikedTrainer(transformers.Trainer):
    """The Trainer, with the loss of the third micro-batch of each step in ``spikes`` (state.global_step -> factor)
    scaled: a spike at a known optimizer step, inside its accumulation."""

    def __init__(self, *args: Any, spikes: dict[int, float], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spikes = spikes
        self._micro_batches: dict[int, int] = {}  # state.global_step -> compute_loss calls at it

    def compute_loss(self, *args: Any, **kwargs: Any) -> Any:
        step = self.state.global_step
        self._micro_batches[step] = self._micro_batches.get(step, 0) + 1
        loss = super().compute_loss(*args, **kwargs)
        assert isinstance(loss, torch.Tensor)  # training asks for the loss alone
        return loss * self.spikes.get(step, 1.0) if self._micro_batches[step] == 3 else loss


def test_train_measures_the_gradients_before_clipping_once_per_optimizer_step(tmp_path: object) -> None:
    gc.collect()  # a telemetry another test left unclosed detaches when collected: not in the middle of train()
    global_hooks = set(_global_optimizer_post_hooks)  # other tests' may be there: ours must not be added
    clip = torch.nn.utils.clip_grad_norm_  # torch's, or the patch of a telemetry another test left attached
    model = tiny_bert()
    layers = model.bert.encoder.layer
    seeds = {"layer-0": (layers[0], "TRAINING"), "layer-1": (layers[1], "TRAINING")}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    reference = AppliedGradients(optimizer, lambda: dict(seeds))
    pre_clip = PreClipGradients(model, optimizer, lambda: dict(seeds), CLIP)
    summaries: list[EpochSummary] = []
    expected = []

    class Lifecycle(transformers.TrainerCallback):
        def on_step_end(self, args: object, state: transformers.TrainerState, control: object, **kw: object) -> None:
            if state.global_step == 2:  # the pooler germinates mid-epoch
                assert model.bert.pooler is not None  # a classifier's BERT has its pooler
                seeds["pooler"] = (model.bert.pooler, "GERMINATED")

        def on_epoch_end(self, *args: object, **kw: object) -> None:
            reference.epoch()
            expected.append(pre_clip.epoch())

    provider, _ = metered(ON)
    callback = SeedLayerCallback(lambda: seeds, settings=ON, meter_provider=provider, on_summary=summaries.append)
    trainer = SpikedTrainer(
        model=model,
        args=arguments(tmp_path),
        train_dataset=Sentences(),
        optimizers=(optimizer, None),
        callbacks=[callback, Lifecycle()],
        spikes={1: 10.0},  # epoch 0's middle step; epoch 1 as it comes
    )
    trainer.train()

    assert [s.sampled_steps for s in summaries] == [3, 3]
    # Clipping acted at every step (the Trainer logs the norm before it), and what was applied is clipped.
    logged = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    assert len(logged) == 6 and min(logged) > 2 * CLIP
    assert max(reference.step_totals) == pytest.approx(CLIP, rel=1e-3)
    for summary, (want_layers, want_totals, want_steps, factors) in zip(summaries, expected):
        assert {seed_id: seed.sampled_steps for seed_id, seed in summary.seeds.items()} == want_steps
        for seed_id, seed in summary.seeds.items():
            assert seed.total_norm == pytest.approx(want_totals[seed_id], rel=1e-5)
            want = expected_top_k(want_layers[seed_id], ON.top_k)
            assert [layer for layer, _ in seed.top_layers] == [layer for layer, _ in want]
            assert [value for _, value in seed.top_layers] == pytest.approx([v for _, v in want], rel=1e-5)
        assert summary.clip_steps == summary.clipped_steps == len(factors) == 3
        assert summary.min_clip_factor == pytest.approx(min(factors), rel=1e-5)
    # The Trainer's logged grad_norm is the norm before its clip: the reference's.
    assert logged == pytest.approx([CLIP / factor for factor in pre_clip.factors], rel=1e-5)
    assert summaries[0].seeds["pooler"].sampled_steps == 1
    # Each seed's and layer's largest step is at the reference's step, numbered by the reference's own count of
    # optimizer steps since train() began: the spike's step 1 (the pooler listed from step 2 only), then steps
    # that go on counting in epoch 1 (3 to 5). The Trainer logs that step under global_step + 1.
    for summary, step_squares in zip(summaries, pre_clip.epoch_step_squares, strict=True):
        assert_max_steps(summary, step_squares)
    assert {s: seed.max_step for s, seed in summaries[0].seeds.items()} == {"layer-0": 1, "layer-1": 1, "pooler": 2}
    later = {step for seed in summaries[1].seeds.values() for step in seed.layer_max_step.values()}
    assert later <= {3, 4, 5} and len(later) > 1  # a layer's peak at another step than another layer's
    spike = max((entry for entry in trainer.state.log_history if "grad_norm" in entry), key=lambda e: e["grad_norm"])
    assert spike["step"] == 1 + 1  # the Trainer's log of the planted step
    # train()'s end closed the telemetry: the reference's is the only hook left on the optimizer.
    assert callback.telemetry is None and set(_global_optimizer_post_hooks) == global_hooks
    assert len(optimizer._optimizer_step_post_hooks) == 2  # the references'
    assert torch.nn.utils.clip_grad_norm_ is clip  # the clip as it was before train()
    provider.shutdown()


def test_max_steps_training_summarises_every_n_steps(tmp_path: object) -> None:
    model = tiny_bert()
    summaries: list[EpochSummary] = []
    callback = SeedLayerCallback(
        {"layer-0": (model.bert.encoder.layer[0], "TRAINING")},
        settings=ON,
        meter_provider=metered(ON)[0],
        every_n_steps=2,
        on_summary=summaries.append,
    )
    trainer = transformers.Trainer(
        model=model, args=arguments(tmp_path, max_steps=5, bf16=False), train_dataset=Sentences(), callbacks=[callback]
    )
    trainer.train()  # accelerate's AcceleratedOptimizer around the Trainer's own AdamW
    assert [s.sampled_steps for s in summaries] == [2, 2, 1]
    norms = [s.seeds["layer-0"].total_norm for s in summaries]
    assert all(norm is not None and norm > 0 for norm in norms)


class Regression(torch.nn.Module):
    """A model the Trainer trains as it is: its forward returns the loss."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        from .test_clipping import loss_of

        return {"loss": loss_of(self.model(x), labels)}


class Vectors(torch.utils.data.Dataset):
    def __init__(self, samples: int) -> None:
        generator = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(samples, 32, generator=generator), torch.randn(samples, 10, generator=generator)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def test_an_exploding_seed_under_the_default_max_grad_norm_is_reported_exploding(tmp_path: object) -> None:
    """Issue 17: the Trainer's default ``max_grad_norm=1.0``, ``gradient_accumulation_steps=2``, one seed's
    branch scaled by 1000."""
    from .test_clipping import exploding_network

    network, registry = exploding_network()
    model = Regression(network)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-9)
    pre_clip = PreClipGradients(model, optimizer, registry, 1.0)
    summaries: list[EpochSummary] = []
    callback = SeedLayerCallback(registry, settings=ON, meter_provider=metered(ON)[0], on_summary=summaries.append)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        num_train_epochs=1,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        lr_scheduler_type="constant",
        dataloader_num_workers=0,
    )
    assert args.max_grad_norm == 1.0  # the default
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Vectors(64), optimizers=(optimizer, None), callbacks=[callback]
    )
    trainer.train()
    (summary,) = summaries
    layers, totals, _, factors = pre_clip.epoch()
    assert len(factors) == 4
    assert_exploding_seed_epoch(summary, layers, totals, factors)
