"""One epoch's measurement as seeds come and go: segments of steps, folded into per-slot statistics.

A *segment* is the measured parameters of one set of seed modules and the sampled steps during
which that set was the one the seed source listed. A seed germinated or culled mid-epoch, a module
swapped under the same seed id or a model moved to another device starts a new segment; the
earlier ones keep what they measured, folded in at the epoch end, so no sampled step is lost and a
seed's values cover exactly the steps at which it was present. A steady run has one segment per
epoch, reused from epoch to epoch.

A *slot* is ``(seed_id, layer)`` or ``(seed_id, TOTAL)`` (``(HOST, TOTAL)`` for the host when it is
measured). Per slot, over the epoch's sampled steps, the statistics are: the sum of the per-step
squared norms (the RMS), the largest per-step squared norm (the spike), and how many steps were
non-finite; per seed total, the per-step norms' histogram over ``summary.HISTOGRAM_BOUNDARIES``. They
are computed on the device from the per-step rows (``norms.StepNorms``) and copied to the host once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .norms import StepNorms, index_parameters
from .seeds import SeedView, discover_layers
from .summary import HISTOGRAM_BOUNDARIES

#: The layer name of a seed's total; no layer has it (the root is ``(root)``).
TOTAL = ""
#: The seed id of the host (every trainable parameter of the model that belongs to no seed); no seed has it.
HOST = ""

BUCKETS = len(HISTOGRAM_BOUNDARIES) + 1

Slot = tuple[str, str]
SegmentKey = tuple[object, ...]


def segment_key(seeds: Mapping[str, SeedView], host: Sequence[nn.Parameter] = ()) -> SegmentKey:
    """What a segment's layout depends on: each seed's parameters, whether they train, and where.

    Parameter ids cannot be reused while a segment holds the parameters.
    """
    key = tuple((seed_id, tuple((id(p), p.requires_grad, p.device) for p in view.module.parameters()))
                for seed_id, view in seeds.items())
    return (*key, (HOST, tuple((id(p), p.device) for p in host))) if host else key


class SlotStats:
    """Running per-slot statistics of a single process's steps, on the device."""

    def __init__(self, slot_count: int, totals: Sequence[int], device: torch.device) -> None:
        self.totals = torch.tensor(totals, dtype=torch.long, device=device)
        self.sums = torch.zeros(slot_count, dtype=torch.float32, device=device)
        self.maxima = torch.zeros(slot_count, dtype=torch.float32, device=device)
        self.nonfinite = torch.zeros(slot_count, dtype=torch.float32, device=device)
        self.counts = torch.zeros(len(totals), BUCKETS, dtype=torch.float32, device=device)
        self.boundaries = squared_boundaries(device)

    @torch.no_grad()
    def update(self, rows: torch.Tensor) -> None:
        """Add ``[steps, slots]`` squared norms (a dozen ops for the whole batch of steps)."""
        self.sums += rows.sum(0)
        torch.maximum(self.maxima, rows.amax(0), out=self.maxima)
        self.nonfinite += (~torch.isfinite(rows)).sum(0)
        self.counts += histogram_counts(rows.index_select(1, self.totals), self.boundaries)


def squared_boundaries(device: torch.device) -> torch.Tensor:
    """The histogram's bounds, squared: the rows hold squared norms, and a sqrt per step is not needed."""
    return torch.tensor([b * b for b in HISTOGRAM_BOUNDARIES], dtype=torch.float32, device=device)


def histogram_counts(squares: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
    """``[steps, seeds]`` squared norms -> ``[seeds, BUCKETS]`` counts of the norms per bucket;
    non-finite steps are left out (they are counted apart)."""
    seeds = squares.shape[1]
    buckets = torch.bucketize(squares, boundaries)  # (b[i-1], b[i]]: OpenTelemetry's explicit buckets
    buckets = torch.where(torch.isfinite(squares), buckets, BUCKETS)  # one extra bucket, dropped below
    flat = buckets + torch.arange(seeds, device=squares.device) * (BUCKETS + 1)
    return torch.bincount(flat.flatten(), minlength=seeds * (BUCKETS + 1)).view(seeds, BUCKETS + 1)[:, :BUCKETS]


class Segment:
    """The measured parameters of one set of seed modules, and the sampled steps it was current."""

    def __init__(self, seeds: Mapping[str, SeedView], key: SegmentKey, *, host: Sequence[nn.Parameter] = (),
                 keep_rows: bool = False) -> None:
        from .distributed import local_gradients, shard_weight  # DTensor support, loaded only when needed

        self.key = key
        self.modules: dict[str, nn.Module] = {seed_id: view.module for seed_id, view in seeds.items()}
        layouts = [(view.seed_id, discover_layers(view).layers) for view in seeds.values()]
        if host:
            layouts.append((HOST, (("host", tuple(host)),)))
        params, positions = index_parameters(layouts)
        self.slots: list[Slot] = []
        entries: list[tuple[int, int, float | None]] = []
        weights = [shard_weight(param) for param in params]
        for seed in positions:
            layers = () if seed.seed_id == HOST else seed.layers
            for layer, indices in (*layers, (TOTAL, seed.total)):
                entries.extend((i, len(self.slots), weights[i]) for i in indices)
                self.slots.append((seed.seed_id, layer))
        self.numel = [param.numel() for param in params]
        self.slot_params: list[list[int]] = [[] for _ in self.slots]
        for i, slot, _ in entries:
            self.slot_params[slot].append(i)
        self.home = params[0].device if params else torch.device("cpu")
        self.norms = StepNorms(local_gradients(params), entries, len(self.slots), self.home)
        self.total_slots = [i for i, (_, layer) in enumerate(self.slots) if layer == TOTAL]
        self.steps = 0
        # A single process folds each batch of rows into running statistics (memory independent of
        # the epoch's length); under torch.distributed the rows are kept, since a spike or a bucket of
        # a sharded gradient exists only after the ranks' squares are summed per step.
        self.keep_rows = keep_rows
        self.rows: list[tuple[list[int], torch.Tensor]] = []  # (epoch step indices, rows)
        self._row_steps: list[int] = []
        self.stats = SlotStats(len(self.slots), self.total_slots, self.home)

    def lists_same_modules(self, mapping: Mapping[str, tuple[nn.Module, object]]) -> bool:
        """The step path's check: the same seed ids with the same module objects (no walk over modules)."""
        modules = self.modules
        if len(mapping) != len(modules):
            return False
        for seed_id, entry in mapping.items():
            if modules.get(seed_id) is not entry[0]:
                return False
        return True

    def add_step(self, epoch_step: int) -> None:
        self.norms.add_step()
        self.steps += 1
        if self.keep_rows:
            self._row_steps.append(epoch_step)

    def absorb(self) -> None:
        """Turn the waiting steps into rows, and fold them in (single process) or keep them."""
        rows = self.norms.take_rows()
        if rows is None:
            return
        if self.keep_rows:
            self.rows.append((self._row_steps, rows))
            self._row_steps = []
        else:
            self.stats.update(rows)

    def reset(self) -> None:
        self.norms.reset()
        self.steps = 0
        self.rows = []
        self._row_steps = []
        self.stats = SlotStats(len(self.slots), self.total_slots, self.home)


@dataclass(frozen=True)
class EpochSums:
    """The epoch as the summary needs it, per slot (in ``slots`` order)."""

    slots: tuple[Slot, ...]
    sums: Sequence[float]  # sum over the steps of the squared norm
    maxima: Sequence[float]  # the largest per-step squared norm
    nonfinite: Sequence[int]  # steps whose norm was NaN or Inf
    measured: Sequence[bool]  # some parameter of it had a gradient at some step
    numel: Sequence[int]  # elements of the parameters that had a gradient
    counts: Mapping[str, tuple[int, ...]]  # per seed: its per-step norms per histogram bucket
    seed_steps: Mapping[str, int]  # per seed: the sampled steps at which it was listed
    steps: int


@dataclass(frozen=True)
class HostFacts:
    """What the host knows of an epoch's slots without reading the device: presence and sizes."""

    slots: tuple[Slot, ...]
    measured: tuple[bool, ...]
    numel: tuple[int, ...]
    seed_steps: Mapping[str, int]


def host_facts(segments: Sequence[Segment]) -> HostFacts:
    seed_steps: dict[str, int] = {}
    measured: dict[Slot, bool] = {}
    numel: dict[Slot, int] = {}
    for segment in segments:
        if not segment.steps:
            continue
        for seed_id in {seed for seed, _ in segment.slots}:
            seed_steps[seed_id] = seed_steps.get(seed_id, 0) + segment.steps
        had = segment.norms.had_gradient()
        for slot, params in zip(segment.slots, segment.slot_params):
            measured[slot] = measured.get(slot, False) or any(had[i] for i in params)
            numel[slot] = max(numel.get(slot, 0), sum(segment.numel[i] for i in params if had[i]))
    slots = tuple(sorted(measured))
    return HostFacts(slots, tuple(measured[s] for s in slots), tuple(numel[s] for s in slots), seed_steps)


@torch.no_grad()
def fold(segments: Sequence[Segment], home: torch.device, steps: int) -> EpochSums:
    """A single process's epoch: the segments' statistics in one vector, copied to the host once."""
    for segment in segments:
        segment.absorb()
    facts = host_facts(segments)
    n = len(facts.slots)
    index = {slot: i for i, slot in enumerate(facts.slots)}
    seeds = sorted({seed for seed, layer in facts.slots if layer == TOTAL})
    seed_index = {seed: i for i, seed in enumerate(seeds)}
    vector = torch.zeros(3 * n + len(seeds) * BUCKETS, dtype=torch.float32, device=home)
    for segment in segments:
        if not segment.steps:
            continue
        stats = segment.stats
        target = torch.tensor([index[slot] for slot in segment.slots], dtype=torch.long, device=home)
        vector[:n].index_add_(0, target, stats.sums.to(home))
        vector[n:2 * n].scatter_reduce_(0, target, stats.maxima.to(home), reduce="amax")
        vector[2 * n:3 * n].index_add_(0, target, stats.nonfinite.to(home))
        totals = [seed_index[segment.slots[i][0]] for i in segment.total_slots]
        counts = vector[3 * n:].view(len(seeds), BUCKETS)
        counts.index_add_(0, torch.tensor(totals, dtype=torch.long, device=home), stats.counts.to(home))
    values = vector.tolist()  # the epoch's one host sync
    counts_flat = values[3 * n:]
    return EpochSums(
        facts.slots, values[:n], values[n:2 * n], [int(v) for v in values[2 * n:3 * n]], facts.measured,
        facts.numel, {seed: tuple(int(c) for c in counts_flat[i * BUCKETS:(i + 1) * BUCKETS])
                      for i, seed in enumerate(seeds)},
        facts.seed_steps, steps)
