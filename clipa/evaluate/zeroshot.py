"""Zero-shot classification: acc1, acc5 and mean per-class recall, as CLIP_benchmark computes them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from open_clip import build_zero_shot_classifier
from torch.utils.data import DataLoader

from clipa.data.transforms import eval_transform
from clipa.evaluate.datasets import ZeroShotData, load_zeroshot_data
from clipa.evaluate.models import LoadedModel


@torch.no_grad()
def classify(model, tokenizer, data: ZeroShotData, batch_size: int = 256, num_workers: int = 0,
             device: str | torch.device = "cpu") -> dict:
    """Zero-shot metrics of `model` on `data` (images already transformed by the dataset)."""
    model.eval()
    weights = build_zero_shot_classifier(model, tokenizer, data.classnames, data.templates,
                                         num_classes_per_batch=10, device=device)
    num_classes = len(data.classnames)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    top5_hits, total = 0, 0
    loader = DataLoader(data.dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    start = time.perf_counter()
    for images, labels in loader:
        features = model.encode_image(images.to(device), normalize=True)
        logits = features @ weights
        topk = logits.topk(min(5, num_classes), dim=1).indices.cpu()
        confusion += torch.bincount(labels * num_classes + topk[:, 0], minlength=num_classes ** 2).view(num_classes, -1)
        top5_hits += (topk == labels[:, None]).any(dim=1).sum().item()
        total += labels.numel()
    elapsed = time.perf_counter() - start
    per_class_total = confusion.sum(dim=1)
    seen = per_class_total > 0
    recall = confusion.diag()[seen].float() / per_class_total[seen].float()
    return {
        "acc1": confusion.diag().sum().item() / total,
        "acc5": top5_hits / total,
        "mean_per_class_recall": recall.mean().item(),
        "num_samples": total,
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
