"""The demo run: a small seeded network trained through a scripted lifecycle, with the feature on.

A 5-Linear host (:class:`~tolaria_otel.seeded_mlp.SeededMLP`) learns to classify synthetic data
labelled by a fixed random teacher, while :class:`~tolaria_otel.seeded_mlp.ScriptedLifecycle`
grafts 2 to 4 seeds of 5 layers (before the first step, right after an epoch end, and mid-epoch:
each measured from its first step) and drives them through Kasmina's stages SEED_STAGE_GERMINATED,
_TRAINING, _BLENDING, _FOSSILIZED and, for one, _CULLED (not measured: out of the graph) before it
is gone. Every epoch's :class:`~tolaria_otel.EpochSummary` goes to a JSON Lines file (one line per
epoch: ``EpochSummary.to_dict()`` plus ``loss``, the epoch's mean training loss), to the terminal,
and to whatever exporters the ``OTEL_*`` variables name.

The command line (``tolaria_otel.cli``) validates the options and the environment first; this
module only runs the training.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any, Protocol, TextIO

import torch
from opentelemetry.sdk.metrics import MeterProvider
from torch import nn

from ..config.settings import SeedLayerSettings
from ..summary.epoch_summary import EpochSummary
from ..telemetry import SeedLayerTelemetry
from .seeded_mlp import ScriptedLifecycle, Seed, SeededMLP, SeedRegistry

IN_FEATURES = 32
CLASSES = 10
BATCH = 64
LEARNING_RATE = 0.05


@dataclass(frozen=True)
class DemoOptions:
    epochs: int = 6
    steps: int = 16
    seeds: int = 4
    seed: int = 0
    device: str = "cpu"


class Display(Protocol):
    """What the run shows while it trains (rich in a terminal, nothing with ``--quiet``)."""

    def step(self, epoch: int, step: int) -> None: ...

    def epoch(self, record: dict[str, Any]) -> None: ...


def run_demo(
    options: DemoOptions,
    settings: SeedLayerSettings,
    provider: MeterProvider,
    out: TextIO,
    display: Display,
    stop_requested: Callable[[], bool],
) -> int:
    """Train ``options.epochs`` epochs, writing one JSON line per epoch to ``out``.

    Returns the number of finished epochs: fewer than asked when ``stop_requested()`` turned true,
    which is checked before every optimizer step so that an interrupted run stops between steps,
    with every finished epoch written. Closes the telemetry and shuts ``provider`` down (which
    exports the last epoch) however it ends.
    """
    # The network is tiny: intra-op threads only contend (ten times slower on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    telemetry: SeedLayerTelemetry | None = None
    try:
        device = torch.device(options.device)
        torch.manual_seed(options.seed)
        data = torch.Generator().manual_seed(options.seed)  # the data stream, apart from initialisation
        teacher = torch.randn(IN_FEATURES, CLASSES, generator=data)
        model = SeededMLP(IN_FEATURES, out_features=CLASSES).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9)
        registry = SeedRegistry()

        def graft(seed: Seed) -> None:
            seed.to(device)
            optimizer.add_param_group({"params": list(seed.parameters())})

        lifecycle = ScriptedLifecycle(model, registry, options.seeds, options.steps, on_graft=graft)
        telemetry = SeedLayerTelemetry(model, registry, settings=settings, meter_provider=provider)
        telemetry.attach()  # every optimizer step of the model's optimizers, whichever they are
        for epoch in range(options.epochs):
            lifecycle.start_epoch(epoch)
            loss_sum = torch.zeros((), device=device)
            for step in range(options.steps):
                if stop_requested():
                    return epoch
                lifecycle.before_step(epoch, step, options.steps)  # may germinate: measured from this step
                x = torch.randn(BATCH, IN_FEATURES, generator=data)
                y = (x @ teacher).argmax(dim=1)
                loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                loss_sum += loss.detach()  # stays on the device: one sync per epoch, like the telemetry
                display.step(epoch, step + 1)
            summary = telemetry.end_epoch()
            lifecycle.after_epoch(epoch)  # Tamiyo read the summary and germinates
            record = epoch_record(summary, epoch, loss_sum.item() / options.steps)
            if summary is not None:
                out.write(json.dumps(record) + "\n")
                out.flush()
            # Flush so every epoch reaches the backend, not only those an export interval catches.
            provider.force_flush()
            display.epoch(record)
        return options.epochs
    finally:
        if telemetry is not None:
            telemetry.close()
        provider.shutdown()
        torch.set_num_threads(threads)


def epoch_record(summary: EpochSummary | None, epoch: int, loss: float) -> dict[str, Any]:
    """The JSON line of one epoch: the summary's ``to_dict()`` plus the mean training loss."""
    record = summary.to_dict() if summary is not None else {"epoch": epoch, "seeds": []}
    record["loss"] = loss
    return record


@contextmanager
def stop_on_interrupt() -> Iterator[Callable[[], bool]]:
    """The first Ctrl-C asks the run to stop at the next step; a second one interrupts at once."""
    requested = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield requested.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


class QuietDisplay:
    def step(self, epoch: int, step: int) -> None:
        pass

    def epoch(self, record: dict[str, Any]) -> None:
        pass


class RichDisplay:
    """A progress bar over epochs and steps, and after each epoch a table with a row per seed."""

    def __init__(self, epochs: int, steps: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.steps = steps
        self.progress = Progress(
            TextColumn("{task.description:>6}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
        )
        self._epochs = self.progress.add_task("epochs", total=epochs)
        self._steps = self.progress.add_task("steps", total=steps)

    def __enter__(self) -> RichDisplay:  # noqa: PYI034 - typing.Self needs Python 3.11
        self.progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.stop()

    def step(self, epoch: int, step: int) -> None:
        self.progress.update(self._steps, completed=step)

    def epoch(self, record: dict[str, Any]) -> None:
        from rich.table import Table

        table = Table(
            title=f"epoch {record['epoch']}  loss {record['loss']:.4f}", title_justify="left", box=None, padding=(0, 1)
        )
        rows = []
        for seed in record["seeds"]:
            layers = "  ".join(f"{layer['layer']}={_number(layer['value'])}" for layer in seed["top_layers"])
            largest = "-" if seed["max_norm"] is None else f"{_number(seed['max_norm'])} @{seed['max_step']}"
            # Kasmina's prefix left out here only, to fit a terminal; the file and the metrics keep it.
            stage = seed["stage"].removeprefix("SEED_STAGE_")
            rows.append((seed["seed_id"], stage, _number(seed["total_norm"]), largest, layers))
        # The short columns keep their width (a seed id or a stage cut short reads as another); the layers wrap.
        for index, column in enumerate(("seed", "stage", "total norm", "max @step")):
            width = max([len(column), *(len(row[index]) for row in rows)])
            table.add_column(column, justify="left" if index < 2 else "right", no_wrap=True, min_width=width)
        table.add_column(f"top {record.get('top_k', '-')} layers", overflow="fold")
        for row in rows:
            table.add_row(*row)
        self.progress.console.print(table)
        self.progress.advance(self._epochs)


def _number(value: float | str | None) -> str:
    if value is None:
        return "not measured"
    return value if isinstance(value, str) else f"{value:.3g}"
