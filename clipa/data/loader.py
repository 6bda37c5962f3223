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

import logging
import os
from collections import Counter

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipa.data.sources import SHARD_REASONS, ReadOptions, build_sources, check_not_empty
from clipa.data.spec import parse_train
from clipa.data.streams import StreamError, StreamingTrainStream, reduce_batch, sample_indices, sample_rng
from clipa.data.synthetic import SyntheticSource
from clipa.data.transforms import train_transform
from clipa.distributed import processes_per_node
from clipa.errors import ClipaError


class TrainStream(IterableDataset):
    """Yields (uint8 images, token ids, kept-patch indices or None) micro-batches."""

    def __init__(self, source, transform, tokenizer, *, micro_batch: int, processes: int = 1, rank: int = 0,
                 seed: int = 0, start_batch: int = 0, num_batches: int | None = None, mask=None):
        self.source, self.transform, self.tokenizer = source, transform, tokenizer
        self.micro_batch, self.processes, self.rank = micro_batch, processes, rank
        self.seed, self.start_batch, self.num_batches = seed, start_batch, num_batches
        self.mask = mask  # (strategy, grid, ratio) or None

    def batch(self, b: int):
        images, captions, rngs = [], [], []
        for index in sample_indices(b, self.micro_batch, self.processes, self.rank):
            rng = sample_rng(self.seed, index)
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
    local = max(1, processes_per_node(1))
    return max(1, min(16, cores // local - 1))


def loader_layout(data, processes: int, micro_batch: int) -> dict:
    """What a streaming data position means: saved beside it in every checkpoint (`data_position`)."""
    return {"processes": processes, "num_workers": resolve_workers(data.num_workers), "micro_batch_size": micro_batch,
            "exact_resume": data.exact_resume, "shuffle_buffer": data.shuffle_buffer, "interleave": data.interleave}


# What a checkpoint saved before a key joined the layout read with: None = unknown, not compared.
_LAYOUT_BEFORE = {"shuffle_buffer": None, "interleave": 1}


def check_resume_layout(saved: dict | None, data, processes: int, micro_batch: int, main: bool = True) -> str | None:
    """Warn (on `main`) and return the warning when a resume changes the streaming loader's layout.

    Streams are per (rank, worker) slot, so a different number of processes or workers, or another
    micro-batch size, resumes each slot at the right count but not with the samples the old layout
    would have read. Synthetic data is addressed by sample index: any layout resumes exactly.
    Checkpoints from before the layout was saved carry none: nothing to compare.
    """
    if not saved or "processes" not in saved or parse_train(data.train)[0].kind == "synthetic":
        return None
    now = loader_layout(data, processes, micro_batch)
    changes = [f"{name} {saved[key]} -> {now[key]}" for name, key in
               (("processes", "processes"), ("micro-batch", "micro_batch_size"), ("data.exact_resume", "exact_resume"))
               if saved.get(key) != now[key]]
    if max(1, saved["num_workers"]) != max(1, now["num_workers"]):  # 0 workers = one stream, as 1 worker
        changes.insert(1, f"data.num_workers {saved['num_workers']} -> {now['num_workers']}")
    stream_keys = []  # what each stream reads and in what order
    for key, before in _LAYOUT_BEFORE.items():
        old = saved.get(key, before)
        if old is not None and old != now[key]:
            changes.append(f"data.{key} {old} -> {now[key]}")
            stream_keys.append(f"data.{key}={old}")
    if not changes:
        return None
    message = (f"data: the data position is approximate: the loader layout changed since the checkpoint "
               f"({', '.join(changes)}); every stream resumes at its position, but not with the samples the old "
               f"layout would have read (in the interrupted epoch some repeat, some are missed). For an exact resume "
               f"use the old layout: {saved['processes']} process(es), micro-batch {saved['micro_batch_size']}, "
               f"data.num_workers={saved['num_workers']} set explicitly (-1 resolves from this machine's cores)"
               + "".join(f", {k}" for k in stream_keys))
    if main:
        logging.getLogger("clipa.data").warning(message)
    return message


class DataPosition:
    """The checkpoint part `data_position`: the next micro-batch (`next_micro_batch()`) and the layout it
    counts in. The loader restarts from the step; restoring only checks the layout (`check_resume_layout`)."""

    def __init__(self, data, processes: int, micro_batch: int, next_micro_batch, main: bool = True):
        self.data, self.processes, self.micro_batch, self.main = data, processes, micro_batch, main
        self.next_micro_batch = next_micro_batch

    def state_dict(self) -> dict:
        return {"micro_batch": self.next_micro_batch(), **loader_layout(self.data, self.processes, self.micro_batch)}

    def load_state_dict(self, saved: dict) -> None:
        check_resume_layout(saved, self.data, self.processes, self.micro_batch, self.main)


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
        self._reported = (0, 0)  # (samples, shards) already in a metrics line

    def __iter__(self):
        for batch in self.loader:
            if isinstance(batch, StreamError):
                raise ClipaError(batch.message)
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

    def take_skipped(self, accelerator=None) -> dict[str, int]:
        """Samples and shards skipped since the previous call: the fields of one metrics line.

        With an `accelerator` of several processes, summed over them (every process reads its own
        shards, so rank 0's count alone undercounts); all processes must call it at the same step.
        """
        now = (self.skipped_samples, self.skipped_shards)
        new = [a - b for a, b in zip(now, self._reported)]
        self._reported = now
        if accelerator is not None and accelerator.num_processes > 1:
            new = accelerator.reduce(torch.tensor(new, device=accelerator.device), reduction="sum").tolist()
        return {"skipped_samples": int(new[0]), "skipped_shards": int(new[1])}


def build_train_loader(recipe, geometry, text_reducer, *, micro_batch: int, processes: int, rank: int,
                       start_batch: int, num_batches: int, mask=None) -> TrainLoader:
    data = recipe.data
    workers = resolve_workers(data.num_workers)
    source = build_source(recipe)
    common = dict(micro_batch=micro_batch, processes=processes, rank=rank, seed=recipe.train.seed,
                  start_batch=start_batch, num_batches=num_batches, mask=mask)
    transform = train_transform(geometry.image_size, data.augment)
    if isinstance(source, SyntheticSource):
        stream = TrainStream(source, transform, text_reducer, **common)
    else:
        stream = StreamingTrainStream(source, transform, text_reducer, workers=workers, resampled=data.resampled,
                                      shuffle_buffer=data.shuffle_buffer, fast_decode=data.fast_decode,
                                      exact_resume=data.exact_resume, interleave=data.interleave,
                                      max_pixels=data.max_image_pixels, **common)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
                        prefetch_factor=4 if workers else None, persistent_workers=False,
                        worker_init_fn=one_thread_per_worker)
    return TrainLoader(loader)


def one_thread_per_worker(_worker_id: int) -> None:
    # Workers decode and crop; intra-op threads there would only fight the trainer for cores.
    torch.set_num_threads(1)
