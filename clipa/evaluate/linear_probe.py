"""Linear probe: logistic regression on frozen image features, regularisation chosen on validation data.

Features are computed once and cached on disk (keyed by the model's weights file and the data), so
trying another regularisation grid or re-running costs seconds. The classifier is a full-batch
L-BFGS logistic regression in torch (scikit-learn is not a dependency; on a few thousand feature
vectors this converges in a second). The L2 strength is picked from a log grid on a validation
split carved from the training split (20%, stratified by seed), then the probe is refit on the
whole training split and scored once on the test split.

Datasets: `imagefolder` (--data-root with train/ and test/ class folders) or `synthetic`.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from clipa.data.synthetic import SyntheticEvalSet
from clipa.data.transforms import eval_transform
from clipa.errors import ClipaError
from clipa.evaluate.datasets import _imagefolder
from clipa.evaluate.models import LoadedModel
from clipa.evaluate.zeroshot import _collate

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


def choose_l2(features: torch.Tensor, labels: torch.Tensor, num_classes: int, grid=L2_GRID) -> tuple[float, dict]:
    """Best L2 strength on a held-out 20% of the training features."""
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(labels), generator=generator)
    cut = max(1, len(labels) // 5)
    val, fit = order[:cut], order[cut:]
    scores = {l2: accuracy(fit_logistic(features[fit], labels[fit], num_classes, l2), features[val], labels[val])
              for l2 in grid}
    best = max(scores, key=lambda l2: (scores[l2], l2))  # ties: the stronger regularisation
    return best, scores


@torch.no_grad()
def _features(loaded: LoadedModel, dataset, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    model = loaded.model.eval()
    device = next(model.parameters()).device
    feats, labels = [], []
    for images, batch_labels, _ in DataLoader(dataset, batch_size=batch_size, collate_fn=_collate):
        if images is not None:
            feats.append(model.encode_image(images.to(device), normalize=True).float().cpu())
            labels.append(batch_labels)
    if not feats:
        raise ClipaError("linear probe: no readable images")
    return torch.cat(feats), torch.cat(labels)


def _cache_key(loaded: LoadedModel, dataset: str, data_root: str | None, split: str, size: int) -> str:
    weights = Path(loaded.pretrained)
    stamp = ""
    for candidate in (weights, weights / "open_clip_model.safetensors", weights / "model.safetensors"):
        if candidate.is_file():
            stat = candidate.stat()
            stamp = f"{candidate.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
            break
    text = f"{stamp or loaded.pretrained}|{dataset}|{data_root}|{split}|{size}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_features(loaded: LoadedModel, dataset: str, data_root: str | None, split: str, cache_dir: Path,
                    batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, int]:
    size = loaded.image_size
    transform = eval_transform(size, loaded.mean, loaded.std)
    path = cache_dir / f"{_cache_key(loaded, dataset, data_root, split, size)}.pt"
    if path.is_file():
        cached = torch.load(path, weights_only=True)
        return cached["features"], cached["labels"], int(cached["num_classes"])
    if dataset == "synthetic":
        data = SyntheticEvalSet(seed=1000 if split == "train" else 2000, per_class=40 if split == "train" else 20,
                                transform=transform)
        num_classes = len(data.classnames)
    else:
        if not data_root or not (Path(data_root) / split).is_dir():
            raise ClipaError(f"--data-root: {data_root}/{split} is missing; the linear probe needs train/ and test/ "
                             "class folders")
        data, classnames = _imagefolder(Path(data_root) / split, transform)
        num_classes = len(classnames)
    features, labels = _features(loaded, data, batch_size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"features": features, "labels": labels, "num_classes": num_classes}, tmp)
    tmp.replace(path)
    return features, labels, num_classes


def linear_probe(loaded: LoadedModel, dataset: str, data_root: str | None = None, cache_dir: str | Path | None = None,
                 batch_size: int = 256) -> dict:
    if dataset not in PROBE_DATASETS:
        raise ClipaError(f"--dataset: unknown linear-probe dataset \"{dataset}\" (available: {', '.join(PROBE_DATASETS)})")
    start = time.perf_counter()
    cache = Path(cache_dir) if cache_dir else Path(".clipa-cache") / "features"
    train_x, train_y, num_classes = cached_features(loaded, dataset, data_root, "train", cache, batch_size)
    test_x, test_y, test_classes = cached_features(loaded, dataset, data_root, "test", cache, batch_size)
    if test_classes != num_classes:
        raise ClipaError(f"--data-root: train/ has {num_classes} classes but test/ has {test_classes}")
    l2, scores = choose_l2(train_x, train_y, num_classes)
    probe = fit_logistic(train_x, train_y, num_classes, l2)
    metrics = {"acc1": accuracy(probe, test_x, test_y), "l2": l2,
               "validation_acc1": {f"{k:g}": v for k, v in scores.items()},
               "num_train": len(train_y), "num_test": len(test_y), "seconds": time.perf_counter() - start}
    return {"dataset": dataset, "model": loaded.name, "pretrained": loaded.pretrained, "task": "linear_probe",
            "metrics": metrics, "language": "en"}
