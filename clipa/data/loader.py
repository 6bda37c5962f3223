"""The training stream: deterministic micro-batches, split across processes and workers.

Micro-batch `b` of process `r` holds the source samples `b * micro * processes + r * micro + [0,
micro)`. Every random choice about a sample (its crop, which caption tokens and which image
patches it keeps) comes from a generator seeded by (seed, sample index). So the samples and
their augmentations do not depend on the number of loader workers, processes or accumulation
steps, and resuming at micro-batch `b` reproduces exactly what an uninterrupted run would have
seen from there on. Workers each build whole micro-batches (worker `w` builds w, w + W, ...) and
torch's DataLoader hands them out round-robin, in order.

Streaming sources (webdataset shards, CSV files; `data.train` syntax in clipa/data/spec.py) cannot
be addressed by index; clipa/data/streams.py gives each (rank, worker) lane its own deterministic
stream and keeps the same batch layout and per-sample augmentation seeds. Their workers also
report skipped samples, which `TrainLoader` sums for the trainer (`loader.skipped_samples`).
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipa.data.sources import SHARD_REASONS, ReadOptions, build_sources, check_not_empty
from clipa.data.spec import parse_train
from clipa.data.streams import StreamingTrainStream
from clipa.data.synthetic import SyntheticSource
from clipa.data.transforms import train_transform
from clipa.reduction import reduce_batch

_AUGMENT_STREAM = 0xA06


class TrainStream(IterableDataset):
    """Yields (uint8 images, token ids, kept-patch indices or None) micro-batches."""

    def __init__(self, source, transform, tokenizer, *, micro_batch: int, processes: int = 1, rank: int = 0,
                 seed: int = 0, start_batch: int = 0, num_batches: int | None = None, mask=None):
        self.source, self.transform, self.tokenizer = source, transform, tokenizer
        self.micro_batch, self.processes, self.rank = micro_batch, processes, rank
        self.seed, self.start_batch, self.num_batches = seed, start_batch, num_batches
        self.mask = mask  # (strategy, grid, ratio) or None

    def indices(self, b: int) -> range:
        first = b * self.micro_batch * self.processes + self.rank * self.micro_batch
        return range(first, first + self.micro_batch)

    def batch(self, b: int):
        images, captions, rngs = [], [], []
        for index in self.indices(b):
            rng = np.random.default_rng([self.seed, index, _AUGMENT_STREAM])
            image, caption = self.source.sample(index)
            images.append(self.transform(image, rng))
            captions.append(caption)
            rngs.append(rng)
        texts, keep = reduce_batch(captions, rngs, self.tokenizer, self.mask)
        return torch.stack(images), texts, keep

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        b = self.start_batch + worker
        while self.num_batches is None or b < self.start_batch + self.num_batches:
            yield self.batch(b)
            b += workers


def resolve_workers(num_workers: int) -> int:
    """`data.num_workers`, with -1 = the cores this process may use, minus one for the trainer (max 16).

    Cores are shared between the processes of a node (LOCAL_WORLD_SIZE, set by accelerate/torchrun).
    Streaming sources split their data per worker, so an automatic count that differs between the
    run and its resume (another machine) makes the resume approximate; set it explicitly there.
    """
    if num_workers >= 0:
        return num_workers
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(16, cores // local - 1))


def build_source(recipe):
    """The synthetic source, or the list of streaming sources `data.train` names (checked to yield data)."""
    data = recipe.data
    specs = parse_train(data.train)
    if specs[0].kind == "synthetic":
        return SyntheticSource(seed=recipe.train.seed, image_size=data.synthetic_image_size)
    sources = build_sources(specs, ReadOptions.from_config(data))
    for source in sources:
        check_not_empty(source)
    return sources


class TrainLoader:
    """The DataLoader, plus the skip counts its workers report with each micro-batch.

    Iterating yields (images, texts, keep) as before. Counts cover exactly the micro-batches handed
    out so far (not the ones still prefetched), so they are deterministic for a given run.
    """

    def __init__(self, loader: DataLoader):
        self.loader = loader
        self.skips: Counter = Counter()  # by reason: no_caption, corrupt_image, missing_shard, ...
        self._reported = 0

    def __iter__(self):
        for batch in self.loader:
            if len(batch) == 4:
                self.skips.update(batch[3])
            yield batch[0], batch[1], batch[2]

    @property
    def skipped_samples(self) -> int:
        """Samples skipped (corrupt, missing, without caption) since this loader started."""
        return sum(n for reason, n in self.skips.items() if reason not in SHARD_REASONS)

    @property
    def skipped_shards(self) -> int:
        """Shards that were missing, unreadable or cut short."""
        return sum(n for reason, n in self.skips.items() if reason in SHARD_REASONS)

    def take_skipped(self) -> int:
        """Samples skipped since the previous call: the value for one metrics line."""
        total = self.skipped_samples
        new, self._reported = total - self._reported, total
        return new


def build_train_loader(recipe, geometry, text_reducer, *, micro_batch: int, processes: int, rank: int,
                       start_batch: int, num_batches: int, mask=None) -> TrainLoader:
    data = recipe.data
    workers = resolve_workers(data.num_workers)
    source = build_source(recipe)
    common = dict(micro_batch=micro_batch, processes=processes, rank=rank, seed=recipe.train.seed,
                  start_batch=start_batch, num_batches=num_batches, mask=mask)
    transform = train_transform(geometry.image_size, data.crop_scale)
    if isinstance(source, SyntheticSource):
        stream = TrainStream(source, transform, text_reducer, **common)
    else:
        stream = StreamingTrainStream(source, transform, text_reducer, workers=workers, resampled=data.resampled,
                                      shuffle_buffer=data.shuffle_buffer, fast_decode=data.fast_decode,
                                      exact_resume=data.exact_resume, **common)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
                        prefetch_factor=4 if workers else None, persistent_workers=False,
                        worker_init_fn=_one_thread_per_worker)
    return TrainLoader(loader)


def _one_thread_per_worker(_worker_id: int) -> None:
    # Workers decode and crop; intra-op threads there would only fight the trainer for cores.
    torch.set_num_threads(1)
