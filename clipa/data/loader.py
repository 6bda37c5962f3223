"""The training stream: deterministic micro-batches, split across processes and workers.

Micro-batch `b` of process `r` holds the source samples `b * micro * processes + r * micro + [0,
micro)`. Every random choice about a sample (its crop, which caption tokens and which image
patches it keeps) comes from a generator seeded by (seed, sample index). So the samples and
their augmentations do not depend on the number of loader workers, processes or accumulation
steps, and resuming at micro-batch `b` reproduces exactly what an uninterrupted run would have
seen from there on. Workers each build whole micro-batches (worker `w` builds w, w + W, ...) and
torch's DataLoader hands them out round-robin, in order.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipa.data.synthetic import SyntheticSource
from clipa.data.transforms import train_transform
from clipa.errors import ClipaError
from clipa.reduction import patch_keep_indices

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
        texts = self.tokenizer(captions, rngs=rngs)
        keep = None
        if self.mask is not None:
            strategy, grid, ratio = self.mask
            keep = torch.from_numpy(np.stack([patch_keep_indices(strategy, grid, ratio, rng) for rng in rngs]))
        return torch.stack(images), texts, keep

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        b = self.start_batch + worker
        while self.num_batches is None or b < self.start_batch + self.num_batches:
            yield self.batch(b)
            b += workers


def build_source(recipe):
    data = recipe.data
    if data.train == "synthetic":
        return SyntheticSource(seed=recipe.train.seed, image_size=data.synthetic_image_size)
    raise ClipaError(
        f"data.train: \"{data.train}\" is not a supported source in this version; use \"synthetic\" "
        "(webdataset and CSV sources arrive with the data-pipeline work)"
    )


def build_train_loader(recipe, geometry, text_reducer, *, micro_batch: int, processes: int, rank: int,
                       start_batch: int, num_batches: int, mask=None) -> DataLoader:
    stream = TrainStream(
        build_source(recipe),
        train_transform(geometry.image_size, recipe.data.crop_scale),
        text_reducer,
        micro_batch=micro_batch,
        processes=processes,
        rank=rank,
        seed=recipe.train.seed,
        start_batch=start_batch,
        num_batches=num_batches,
        mask=mask,
    )
    workers = recipe.data.num_workers
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
                      prefetch_factor=4 if workers else None, persistent_workers=False,
                      worker_init_fn=_one_thread_per_worker)


def _one_thread_per_worker(_worker_id: int) -> None:
    # Workers decode and crop; intra-op threads there would only fight the trainer for cores.
    torch.set_num_threads(1)
