"""Zero-shot classification: acc1, acc5 and mean per-class recall, as CLIP_benchmark computes them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from open_clip import build_zero_shot_classifier
from torch.utils.data import DataLoader, default_collate

from clipa.data.loader import one_thread_per_worker
from clipa.data.transforms import eval_transform
from clipa.errors import ClipaError
from clipa.evaluate.datasets import ZeroShotData, load_zeroshot_data
from clipa.evaluate.models import LoadedModel, at_geometry
from clipa.evaluate.sharding import shard, sum_over_processes


def _collate(batch):
    """Drop unreadable images (None) and count them."""
    kept = [b for b in batch if b is not None]
    if not kept:
        return None, None, len(batch)
    images, labels = default_collate(kept)
    return images, labels, len(batch) - len(kept)


def eval_loader(dataset, batch_size: int, num_workers: int, collate_fn=_collate) -> DataLoader:
    """Decoding in `num_workers` processes, one thread each (the model gets the cores' threads)."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False, collate_fn=collate_fn,
                      worker_init_fn=one_thread_per_worker if num_workers else None)


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
    counts = torch.zeros(num_classes * num_classes + 2, dtype=torch.long)  # confusion, top-5 hits, skipped
    loader = eval_loader(shard(data.dataset), batch_size, num_workers)
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
    counts = sum_over_processes(counts, device)
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
             image_size: int | None = None, batch_size: int = 256, num_workers: int = 0,
             text_length: int | None = None) -> dict:
    """Evaluate a loaded model on a named dataset; returns the CLIP_benchmark-shaped result.

    `image_size` / `text_length` evaluate at another geometry (the model is rebuilt with resized
    position embeddings, see `at_geometry`); in a process group the data is split over processes."""
    loaded = at_geometry(loaded, image_size, text_length)
    size = loaded.image_size
    transform = eval_transform(size, loaded.mean, loaded.std, loaded.interpolation, loaded.resize_mode)
    data = load_zeroshot_data(dataset, transform, data_root, templates)
    metrics = classify(loaded.model, loaded.tokenizer, data, batch_size=batch_size, num_workers=num_workers)
    return {
        "dataset": dataset, "model": loaded.name, "pretrained": loaded.pretrained,
        "task": "zeroshot_classification", "metrics": metrics, "language": "en",
        "num_classes": len(data.classnames), "chance": 1.0 / len(data.classnames), "image_size": size,
        "text_length": loaded.context_length,
    }


def write_result(result: dict, path: str | Path) -> None:
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    except OSError as err:
        raise ClipaError(f"--output: cannot write {path} ({err.strerror or err}); choose a writable file path") from None


def output_paths(output: str | Path, datasets: list[str]) -> list[Path]:
    """Where `--output` puts each dataset's result: one CLIP_benchmark object per file, never a list.

    A `{dataset}` in the name is replaced by the dataset's name (results/{dataset}.json). Without
    it, one dataset writes OUTPUT itself and several write OUTPUT's name with `_DATASET` inserted
    before the suffix, next to it (results.json -> results_imagenet.json, results_imagenet-v2.json).
    A name goes into a file name as CLIP_benchmark puts it there: wds/cars -> cars.
    """
    from clipa.evaluate.names import output_slug

    output = str(output)
    datasets = [output_slug(name) for name in datasets]
    if "{dataset}" in output:
        return [Path(output.replace("{dataset}", name)) for name in datasets]
    if len(datasets) == 1:
        return [Path(output)]
    path = Path(output)
    return [path.with_name(f"{path.stem}_{name}{path.suffix}") for name in datasets]
