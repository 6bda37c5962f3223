"""Linear probe: logistic regression on frozen image features, regularisation chosen on validation data.

Features are computed once and cached on disk (keyed by the model's weights file and the data), so
trying another regularisation grid or re-running costs seconds. The classifier is a full-batch
L-BFGS logistic regression in torch (scikit-learn is not a dependency; on a few thousand feature
vectors this converges in a second). The L2 strength is picked from a log grid on a validation
split carved from the training split (20% of every class, drawn with a fixed seed), then the probe
is refit on the whole training split and scored once on the test split. Feature extraction is
split over the processes of a group (torchrun / accelerate launch) and gathered in order.

Datasets: `imagefolder` (--data-root with train/ and test/ class folders) or `synthetic`.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

from clipa.data.synthetic import SyntheticEvalSet
from clipa.data.transforms import eval_transform
from clipa.errors import ClipaError
from clipa.evaluate.datasets import read_imagefolder
from clipa.evaluate.models import LoadedModel
from clipa.evaluate.sharding import all_true, gather_batches, rank_world, shard
from clipa.evaluate.zeroshot import eval_loader

PROBE_DATASETS = ("imagefolder", "synthetic")
L2_GRID = tuple(10.0 ** e for e in range(-6, 1))


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float,
                 max_iter: int = 200) -> torch.nn.Linear:
    torch.manual_seed(0)
    probe = torch.nn.Linear(features.shape[1], num_classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(features), labels) + l2 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe


def accuracy(probe: torch.nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (probe(features).argmax(1) == labels).float().mean().item()


def stratified_split(labels: torch.Tensor, fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(validation, fit) indices: `fraction` of every class (at least one image of each class with
    two or more), drawn with a fixed seed, so every class is scored and none is left out of the fit."""
    generator = torch.Generator().manual_seed(seed)
    val, fit = [], []
    for cls in labels.unique(sorted=True):
        members = (labels == cls).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        cut = min(max(1, round(len(members) * fraction)), len(members) - 1)
        val.append(members[:cut])
        fit.append(members[cut:])
    return torch.cat(val).sort().values, torch.cat(fit).sort().values


def choose_l2(features: torch.Tensor, labels: torch.Tensor, num_classes: int, grid=L2_GRID) -> tuple[float, dict]:
    """Best L2 strength on a held-out, class-stratified 20% of the training features."""
    val, fit = stratified_split(labels)
    if len(val) == 0:
        raise ClipaError("linear probe: every class has a single training image; a validation split needs at "
                         "least two images of some class")
    scores = {l2: accuracy(fit_logistic(features[fit], labels[fit], num_classes, l2), features[val], labels[val])
              for l2 in grid}
    best = max(scores, key=lambda l2: (scores[l2], l2))  # ties: the stronger regularisation
    return best, scores


class _Indexed(Dataset):
    """(image, label, index): the index puts features gathered from several processes back in order."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        return None if item is None else (*item, i)


def _collate_indexed(batch):
    kept = [b for b in batch if b is not None]  # unreadable images are left out of the probe
    if not kept:
        return None, None, None
    return torch.stack([b[0] for b in kept]), torch.tensor([b[1] for b in kept]), torch.tensor([b[2] for b in kept])


@torch.no_grad()
def _features(loaded: LoadedModel, dataset, batch_size: int, num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    model = loaded.model.eval()
    device = next(model.parameters()).device
    indices, feats, labels = [], [], []
    for images, batch_labels, index in eval_loader(shard(_Indexed(dataset)), batch_size, num_workers,
                                                   collate_fn=_collate_indexed):
        if images is not None:
            feats.append(model.encode_image(images.to(device), normalize=True).float().cpu())
            labels.append(batch_labels)
            indices.append(index)
    gathered = gather_batches(indices, feats, labels)
    if gathered is None:
        raise ClipaError("linear probe: no readable images")
    return gathered[1], gathered[2]


def _cache_key(loaded: LoadedModel, dataset: str, data_root: str | None, split: str, size: int) -> str:
    weights = Path(loaded.pretrained)
    stamp = ""
    for candidate in (weights, weights / "open_clip_model.safetensors", weights / "open_clip_pytorch_model.bin",
                      weights / "model.safetensors"):
        if candidate.is_file():
            stat = candidate.stat()
            stamp = f"{candidate.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
            break
    text = f"{stamp or loaded.pretrained}|{dataset}|{data_root}|{split}|{size}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_features(loaded: LoadedModel, dataset: str, data_root: str | None, split: str, cache_dir: Path,
                    batch_size: int = 256, num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    size = loaded.image_size
    transform = eval_transform(size, loaded.mean, loaded.std, loaded.interpolation, loaded.resize_mode)
    path = cache_dir / f"{_cache_key(loaded, dataset, data_root, split, size)}.pt"
    if all_true(path.is_file()):  # every process must agree, or some would wait in the gather forever
        cached = torch.load(path, weights_only=True)
        return cached["features"], cached["labels"], int(cached["num_classes"])
    if dataset == "synthetic":
        data = SyntheticEvalSet(seed=1000 if split == "train" else 2000, per_class=40 if split == "train" else 20,
                                transform=transform)
        num_classes = len(data.classnames)
    else:
        if not (Path(data_root) / split).is_dir():
            raise ClipaError(f"--data-root: {Path(data_root) / split} is missing; the linear probe needs train/ and "
                             "test/ class folders")
        data, classnames = read_imagefolder(Path(data_root) / split, transform)
        num_classes = len(classnames)
    features, labels = _features(loaded, data, batch_size, num_workers)
    if rank_world()[0] == 0:  # every process holds the gathered features; one writes them
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"features": features, "labels": labels, "num_classes": num_classes}, tmp)
        tmp.replace(path)
    return features, labels, num_classes


def linear_probe(loaded: LoadedModel, dataset: str, data_root: str | None = None, cache_dir: str | Path | None = None,
                 batch_size: int = 256, num_workers: int = 0) -> dict:
    if dataset not in PROBE_DATASETS:
        raise ClipaError(f"--dataset: unknown linear-probe dataset \"{dataset}\" (available: {', '.join(PROBE_DATASETS)})")
    if dataset != "synthetic" and not data_root:
        raise ClipaError(f"--data-root: required for --dataset {dataset}; point it at a folder with train/ and "
                         "test/ class folders")
    for split in ("train", "test") if dataset != "synthetic" else ():
        if not (Path(data_root) / split).is_dir():
            raise ClipaError(f"--data-root: {Path(data_root) / split} is missing; the linear probe needs train/ and "
                             "test/ class folders")
    start = time.perf_counter()
    cache = Path(cache_dir) if cache_dir else Path(".clipa-cache") / "features"
    train_x, train_y, num_classes = cached_features(loaded, dataset, data_root, "train", cache, batch_size, num_workers)
    test_x, test_y, test_classes = cached_features(loaded, dataset, data_root, "test", cache, batch_size, num_workers)
    if test_classes != num_classes:
        raise ClipaError(f"--data-root: train/ has {num_classes} classes but test/ has {test_classes}")
    # The features are fp32 on the CPU: the probe is fitted in fp32 whatever precision extracted them.
    with torch.autocast("cpu", enabled=False):
        l2, scores = choose_l2(train_x, train_y, num_classes)
        probe = fit_logistic(train_x, train_y, num_classes, l2)
        acc1 = accuracy(probe, test_x, test_y)
    metrics = {"acc1": acc1, "l2": l2,
               "validation_acc1": {f"{k:g}": v for k, v in scores.items()},
               "num_train": len(train_y), "num_test": len(test_y), "seconds": time.perf_counter() - start}
    return {"dataset": dataset, "model": loaded.name, "pretrained": loaded.pretrained, "task": "linear_probe",
            "metrics": metrics, "language": "en"}
