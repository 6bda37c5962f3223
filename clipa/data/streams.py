"""Streaming sources (shards, CSV rows) as deterministic, splittable, resumable micro-batch streams.

Rank r's loader lane l is stream slot r * W + l of processes * W slots (W = max(1, data.num_workers));
every slot reads its own stream (epochs dealt round-robin, or resampled; a shuffle buffer; a
weighted mixture), a function of (seed, slots, slot) only, and a resumed worker fast-forwards its
slot to where the interrupted run was. docs/data.md describes the splitting, shuffling, resume
(and its cost) and dead-source rules this module implements; a dead source's ClipaError travels
from a loader worker as a `StreamError` item, so the user sees its one-line message.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from clipa.data.decode import MAX_PIXELS, decode_crop
from clipa.data.sources import Record, SkipStats
from clipa.errors import ClipaError
from clipa.reduction.image import patch_keep_indices

log = logging.getLogger("clipa.data")

# Stream identifiers mixed into the generator seeds, so the draws of one purpose never repeat
# another's. _AUGMENT_STREAM is the per-sample augmentations' (`sample_rng`).
_AUGMENT_STREAM = 0xA06
_ORDER_STREAM = 0x0DE5
_BUFFER_STREAM = 0xB0F
_RESAMPLE_STREAM = 0x5A3
_MIX_STREAM = 0x313
_SESSION_STREAM = 0x5E55
_INTERLEAVE_STREAM = 0x1E4


def sample_indices(b: int, micro_batch: int, processes: int, rank: int) -> range:
    """The sample indices of micro-batch `b` of process `rank` (the layout in clipa/data/loader.py)."""
    first = b * micro_batch * processes + rank * micro_batch
    return range(first, first + micro_batch)


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of every random choice about sample `index` (crop, caption tokens, kept patches)."""
    return np.random.default_rng([seed, index, _AUGMENT_STREAM])


class _Mode:
    """Shared with the readers: `light` while fast-forwarding (image bodies not needed)."""

    def __init__(self):
        self.light = False

    def __call__(self) -> bool:
        return self.light


def shuffled(records: Iterator[Record], size: int, rng: np.random.Generator) -> Iterator[Record]:
    """A shuffle buffer: fill to `size`, then emit a random buffered sample for each one read."""
    if size <= 1:
        yield from records
        return
    buffer: list[Record] = []
    for record in records:
        if len(buffer) < size:
            buffer.append(record)
            continue
        i = int(rng.integers(size))
        yield buffer[i]
        buffer[i] = record
    for i in rng.permutation(len(buffer)):
        yield buffer[i]


class _Drought:
    """Consecutive units of one slot that yielded no record; past `limit` the source is dead.

    The start-up check (check_not_empty) proves a source readable once; shards deleted later,
    expired credentials or a failing `pipe:` would otherwise make the slot loop over empty epochs
    forever, a hang with nothing but skip warnings in the log.
    """

    def __init__(self, source, slot: int, limit: int, stats: SkipStats):
        self.source, self.slot, self.limit, self.stats = source, slot, limit, stats
        self.empty, self.since = 0, Counter()

    def unit_starts(self) -> None:
        if self.empty == 0:  # a streak may start here: remember the counts, to name its skip reasons
            self.since = Counter(self.stats.counts)

    def unit_ends(self, got: bool) -> None:
        if got:
            self.empty = 0
            return
        self.empty += 1
        if self.empty >= self.limit:
            what = self.source.unit + ("s" if self.empty > 1 else "")
            streak = sorted((self.stats.counts - self.since).items())
            reasons = "; ".join(f"{reason.replace('_', ' ')}: {n}" for reason, n in streak) or "no samples in them"
            raise ClipaError(
                f"data.train: {self.source.name} stopped yielding samples: loader stream {self.slot} read "
                f"{self.empty} {what} in a row without a usable sample ({reasons}); the data became unreadable "
                "after the start-up check (deleted or moved shards, expired credentials, a failing pipe: "
                "command?). Fix access and run the same command again to resume from the last checkpoint")


def _read_unit(source, unit, stats: SkipStats, mode: _Mode, drought: _Drought) -> Iterator[Record]:
    got = False
    drought.unit_starts()
    for record in source.read(int(unit), stats, mode):
        got = True
        yield record
    drought.unit_ends(got)


def _read_units(source, units, stats: SkipStats, mode: _Mode, drought: _Drought, interleave: int = 1,
                rng: np.random.Generator | None = None) -> Iterator[Record]:
    """The records of `units` in turn, or, with `interleave` > 1, of that many units at once: each record
    from a random open unit (`rng`), the next unit opened when one ends. Shards written in some order
    (by class, by source, by date) then reach the shuffle buffer mixed, at no extra memory, as tf.data's
    `interleave` does for CLIPA's input pipeline; the buffer alone mixes only the few shards it spans."""
    if interleave <= 1:
        for unit in units:
            yield from _read_unit(source, unit, stats, mode, drought)
        return
    units = iter(units)
    active: list[Iterator[Record]] = []
    while True:
        while len(active) < interleave and (unit := next(units, None)) is not None:
            active.append(_read_unit(source, unit, stats, mode, drought))
        if not active:
            return
        i = int(rng.integers(len(active)))
        record = next(active[i], None)
        if record is None:
            active.pop(i)
        else:
            yield record


def drought_limit(n: int, slots: int, resampled: bool) -> int:
    """Consecutive empty units that mean "dead source" rather than bad luck.

    Epochs: a whole epoch of the slot, and at least min(n, 100) units, so a small dataset with a few
    missing shards is not stopped because one slot was dealt only those in one epoch. Resampled:
    max(100, n) draws (with a tenth of the shards good, 100 bad draws in a row have odds 1e-5).
    """
    if resampled:
        return max(100, n)
    return max(-(-n // slots), min(n, 100))


def _key(seed: int, session: int) -> list[int]:
    # Session 0 is the run's own stream; a non-exact resume (data.exact_resume=false) at micro-batch
    # b starts session b: another deterministic stream, nothing to fast-forward.
    return [seed] if session == 0 else [seed, _SESSION_STREAM, session]


def slot_units(n: int, seed: int, source_index: int, epoch: int, slot: int, slots: int, session: int = 0) -> np.ndarray:
    """The units (shards or rows) slot `slot` reads in `epoch`: a disjoint share of a permutation."""
    return np.random.default_rng([*_key(seed, session), source_index, epoch, _ORDER_STREAM]).permutation(n)[slot::slots]


def source_stream(source, source_index: int, *, seed: int, slot: int, slots: int, resampled: bool,
                  buffer: int, stats: SkipStats, mode: _Mode, session: int = 0, interleave: int = 1) -> Iterator[Record]:
    """One slot's endless stream of checked records from one source."""
    n, key = len(source), _key(seed, session)
    drought = _Drought(source, slot, drought_limit(n, slots, resampled), stats)
    if resampled:
        draws = np.random.default_rng([*key, source_index, slot, _RESAMPLE_STREAM])
        units = (int(draws.integers(n)) for _ in itertools.count())
        picks = np.random.default_rng([*key, source_index, slot, _INTERLEAVE_STREAM])
        rng = np.random.default_rng([*key, source_index, slot, _BUFFER_STREAM])
        yield from shuffled(_read_units(source, units, stats, mode, drought, interleave, picks), buffer, rng)
        return
    for epoch in itertools.count():
        units = slot_units(n, seed, source_index, epoch, slot, slots, session)
        picks = np.random.default_rng([*key, source_index, epoch, slot, _INTERLEAVE_STREAM])
        rng = np.random.default_rng([*key, source_index, epoch, slot, _BUFFER_STREAM])
        yield from shuffled(_read_units(source, units, stats, mode, drought, interleave, picks), buffer, rng)


def mixed(streams: list[Iterator[Record]], weights: list[float], rng: np.random.Generator) -> Iterator[Record]:
    if len(streams) == 1:
        yield from streams[0]
        return
    cumulative = np.cumsum(np.asarray(weights, dtype=np.float64) / sum(weights))
    last = len(streams) - 1
    while True:
        yield next(streams[min(int(np.searchsorted(cumulative, rng.random(), side="right")), last)])


class StreamError:
    """A ClipaError raised in a loader worker, sent to the training process as an item.

    Raised in the worker, torch would re-raise it with the worker's traceback pasted into the
    message; sent as an item, the user gets the one-line message (and exit code 2) unchanged.
    """

    def __init__(self, message: str):
        self.message = message


class StreamingTrainStream(IterableDataset):
    """Yields (uint8 images, token ids, kept-patch indices or None, new skip counts) micro-batches."""

    def __init__(self, sources: list, transform, tokenizer, *, micro_batch: int, processes: int = 1, rank: int = 0,
                 seed: int = 0, start_batch: int = 0, num_batches: int | None = None, mask=None, workers: int = 1,
                 resampled: bool = False, shuffle_buffer: int = 0, fast_decode: bool = True, exact_resume: bool = True,
                 interleave: int = 1, max_pixels: int = MAX_PIXELS):
        self.sources, self.transform, self.tokenizer = sources, transform, tokenizer
        self.micro_batch, self.processes, self.rank = micro_batch, processes, rank
        self.seed, self.start_batch, self.num_batches, self.mask = seed, start_batch, num_batches, mask
        self.workers, self.resampled, self.shuffle_buffer = max(1, workers), resampled, shuffle_buffer
        self.interleave = interleave
        self.fast, self.exact_resume, self.max_pixels = fast_decode, exact_resume, max_pixels
        slots = self.processes * self.workers
        if not resampled:
            for source in sources:
                if len(source) < slots:
                    what = f"{source.unit}s"
                    raise ClipaError(
                        f"data.train: {source.name} has {len(source)} {what} but {slots} loader streams read it "
                        f"({processes} process(es) x {self.workers} worker(s)), so some would get none; give it at "
                        f"least {slots} {what}, lower data.num_workers, or set data.resampled=true")

    def slot(self, lane: int) -> int:
        return self.rank * self.workers + lane

    def records(self, lane: int, stats: SkipStats, mode: _Mode, session: int = 0) -> Iterator[Record]:
        """The endless record stream of this rank's lane `lane`."""
        slot, slots = self.slot(lane), self.processes * self.workers
        streams = [source_stream(s, i, seed=self.seed, slot=slot, slots=slots, resampled=self.resampled,
                                 buffer=self.shuffle_buffer, stats=stats, mode=mode, session=session,
                                 interleave=self.interleave if s.interleaves else 1)
                   for i, s in enumerate(self.sources)]
        rng = np.random.default_rng([*_key(self.seed, session), slot, _MIX_STREAM])
        return mixed(streams, [s.weight for s in self.sources], rng)

    def batch(self, b: int, records: Iterator[Record], stats: SkipStats):
        images, captions, rngs = [], [], []
        for index in sample_indices(b, self.micro_batch, self.processes, self.rank):
            while True:
                record = next(records)
                rng = sample_rng(self.seed, index)
                try:
                    images.append(decode_crop(record.image, self.transform, rng, self.fast, self.max_pixels))
                    break
                except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError...
                    # The next sample of the stream takes this place, with a fresh generator for this index.
                    detail = str(err).split(" <_io.")[0]  # PIL names the in-memory buffer object: noise
                    stats.skip("corrupt_image", record.where, record.key, f"{type(err).__name__}: {detail}")
            captions.append(record.caption)
            rngs.append(rng)
        texts, keep = reduce_batch(captions, rngs, self.tokenizer, self.mask)
        return torch.stack(images), texts, keep, stats.take()

    def __iter__(self):
        info = get_worker_info()
        try:
            yield from self._batches(info)
        except ClipaError as err:
            if info is None:
                raise
            yield StreamError(str(err))  # re-raised by TrainLoader in the training process

    def _batches(self, info):
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if workers != self.workers:
            raise RuntimeError(f"StreamingTrainStream built for {self.workers} workers runs in {workers}")
        b = self.start_batch + worker
        lane = b % workers
        stats, mode = SkipStats(), _Mode()
        skip = (b // workers) * self.micro_batch
        if skip and not self.exact_resume:
            skip = 0
            records = self.records(lane, stats, mode, session=self.start_batch)
        else:
            records = self.records(lane, stats, mode)
        if skip:
            t0 = time.perf_counter()
            stats.quiet, mode.light = True, True
            for _ in range(skip):
                next(records)
            stats.quiet, mode.light = False, False
            stats.take()  # already counted and reported before the checkpoint
            log.info("data: stream slot %d fast-forwarded %d samples in %.1f s", self.slot(lane), skip,
                     time.perf_counter() - t0)
        while self.num_batches is None or b < self.start_batch + self.num_batches:
            yield self.batch(b, records, stats)
            b += workers


def reduce_batch(captions: list[str], rngs: list, text_reducer, mask) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A micro-batch's token reduction, in the data worker: caption tokens (`text_reducer`, a
    clipa.reduction.text.TextReducer) and kept-patch indices (`mask`: strategy, grid, ratio), from per-sample
    generators."""
    texts = text_reducer(captions, rngs=rngs)
    keep = None
    if mask is not None:
        strategy, grid, ratio = mask
        keep = torch.from_numpy(np.stack([patch_keep_indices(strategy, grid, ratio, rng) for rng in rngs]))
    return texts, keep
