"""Zero-shot classification: acc1, acc5 and mean per-class recall, as CLIP_benchmark computes them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from open_clip import build_zero_shot_classifier
from torch.utils.data import DataLoader, Subset, default_collate

from clipa.data.transforms import eval_transform
from clipa.evaluate.datasets import ZeroShotData, load_zeroshot_data
from clipa.errors import ClipaError
from clipa.evaluate.models import LoadedModel


def _collate(batch):
    """Drop unreadable images (None) and count them."""
    kept = [b for b in batch if b is not None]
    if not kept:
        return None, None, len(batch)
    images, labels = default_collate(kept)
    return images, labels, len(batch) - len(kept)


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def classify(model, tokenizer, data: ZeroShotData, batch_size: int = 256, num_workers: int = 0,
             device: str | torch.device | None = None) -> dict:
    """Zero-shot metrics of `model` on `data` (images already transformed by the dataset).

    In a process group every process classifies its own slice of the data (rank, rank + world,
    ...) and the confusion matrices are summed, so N processes give the 1-process numbers N
    times faster (open_clip_train evaluates on rank 0 only).
    """
    model.eval()
    device = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    weights = build_zero_shot_classifier(model, tokenizer, data.classnames, data.templates,
                                         num_classes_per_batch=10, device=device)
    num_classes = len(data.classnames)
    rank, world = _distributed()
    dataset = data.dataset if world == 1 else Subset(data.dataset, range(rank, len(data.dataset), world))
    counts = torch.zeros(num_classes * num_classes + 2, dtype=torch.long)  # confusion, top-5 hits, skipped
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False, collate_fn=_collate)
    start = time.perf_counter()
    for images, labels, skipped in loader:
        counts[-1] += skipped
        if images is None:
            continue
        features = model.encode_image(images.to(device), normalize=True)
        logits = features @ weights
        topk = logits.topk(min(5, num_classes), dim=1).indices.cpu()
        counts[:-2] += torch.bincount(labels * num_classes + topk[:, 0], minlength=num_classes ** 2)
        counts[-2] += (topk == labels[:, None]).any(dim=1).sum()
    if world > 1:
        counts = counts.to(device)
        dist.all_reduce(counts)
        counts = counts.cpu()
    elapsed = time.perf_counter() - start
    confusion = counts[:-2].view(num_classes, num_classes)
    total = int(confusion.sum())
    if total == 0:
        raise ClipaError(f"--dataset {data.name}: no readable images ({int(counts[-1])} unreadable)")
    per_class_total = confusion.sum(dim=1)
    seen = per_class_total > 0
    recall = confusion.diag()[seen].float() / per_class_total[seen].float()
    return {
        "acc1": confusion.diag().sum().item() / total,
        "acc5": counts[-2].item() / total,
        "mean_per_class_recall": recall.mean().item(),
        "num_samples": total,
        "skipped_images": int(counts[-1]),
        "images_per_s": total / elapsed if elapsed > 0 else None,
    }


def zeroshot(loaded: LoadedModel, dataset: str, data_root: str | None = None, templates: str | None = None,
             image_size: int | None = None, batch_size: int = 256, num_workers: int = 0) -> dict:
    """Evaluate a loaded model on a named dataset; returns the CLIP_benchmark-shaped result."""
    size = image_size or loaded.image_size
    data = load_zeroshot_data(dataset, eval_transform(size, loaded.mean, loaded.std), data_root, templates)
    metrics = classify(loaded.model, loaded.tokenizer, data, batch_size=batch_size, num_workers=num_workers)
    return {
        "dataset": dataset, "model": loaded.name, "pretrained": loaded.pretrained,
        "task": "zeroshot_classification", "metrics": metrics, "language": "en",
        "num_classes": len(data.classnames), "chance": 1.0 / len(data.classnames), "image_size": size,
    }


def write_result(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
