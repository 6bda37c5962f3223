"""The training stream: deterministic micro-batches, split across processes and workers.

Batch `b` of process `r` holds the samples `b * global_batch + r * micro + [0, micro)` of the
source, and its random crops come from a generator seeded by (seed, b, r). So the stream does
not depend on how many loader workers run, and resuming at batch `b` reproduces exactly what an
uninterrupted run would have seen from there on. Workers each build whole batches (worker `w`
builds batches w, w + W, ...) and torch's DataLoader hands them out round-robin, in order.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipa.data.synthetic import SyntheticSource
from clipa.data.transforms import train_transform
from clipa.errors import ClipaError


class TrainStream(IterableDataset):
    def __init__(self, source, transform, tokenizer, *, micro_batch: int, global_batch: int,
                 rank: int = 0, seed: int = 0, start_batch: int = 0, num_batches: int | None = None):
        self.source, self.transform, self.tokenizer = source, transform, tokenizer
        self.micro_batch, self.global_batch, self.rank = micro_batch, global_batch, rank
        self.seed, self.start_batch, self.num_batches = seed, start_batch, num_batches

    def batch(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = b * self.global_batch + self.rank * self.micro_batch
        images, captions = [], []
        # torchvision transforms draw from torch's global RNG: seed a forked copy per batch so the
        # crops are a function of (seed, batch, rank) only and the trainer's own RNG is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, b, self.rank)) & 0x7FFF_FFFF)
            for index in range(first, first + self.micro_batch):
                image, caption = self.source.sample(index)
                images.append(self.transform(image))
                captions.append(caption)
        return torch.stack(images), self.tokenizer(captions)

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


def build_train_loader(recipe, geometry, tokenizer, *, micro_batch: int, rank: int, start_batch: int,
                       num_batches: int) -> DataLoader:
    stream = TrainStream(
        build_source(recipe),
        train_transform(geometry.image_size, recipe.data.crop_scale),
        tokenizer,
        micro_batch=micro_batch,
        global_batch=recipe.train.global_batch_size,
        rank=rank,
        seed=recipe.train.seed,
        start_batch=start_batch,
        num_batches=num_batches,
    )
    workers = recipe.data.num_workers
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
                      prefetch_factor=4 if workers else None, persistent_workers=False,
                      worker_init_fn=_one_thread_per_worker)


def _one_thread_per_worker(_worker_id: int) -> None:
    # Workers decode and crop; intra-op threads there would only fight the trainer for cores.
    torch.set_num_threads(1)
