"""Image <-> text retrieval: recall@1/5/10 as CLIP_benchmark reports them.

  image_retrieval_recall@K  fraction of captions whose image is among the K nearest images
  text_retrieval_recall@K   fraction of images with at least one of their captions among the K nearest captions

Datasets (several captions per image supported, COCO/Flickr style):
  csv        --data-root F.csv (or .tsv): image path + caption columns (`filepath`, `title`); rows that
             share an image path are that image's captions; relative paths resolve against the CSV folder
  wds        CLIP_benchmark's webdataset layout: test/*.tar with `jpg|png|webp` + `txt` (one caption per line)
  synthetic  built-in held-out scenes with their captions
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from clipa.data.synthetic import draw_scene, _rng
from clipa.data.transforms import eval_transform
from clipa.errors import ClipaError
from clipa.evaluate.datasets import read_member, wds_index
from clipa.evaluate.models import LoadedModel

RETRIEVAL_DATASETS = ("csv", "wds", "synthetic")
_RETRIEVAL_STREAM = 0x2E7


class _Images(Dataset):
    def __init__(self, loaders, transform):
        self.loaders, self.transform = loaders, transform

    def __len__(self):
        return len(self.loaders)

    def __getitem__(self, i):
        try:
            image = self.loaders[i]()
        except (OSError, ValueError):
            return None
        return self.transform(image.convert("RGB")), i


def _from_file(path: Path):
    def load():
        with Image.open(path) as image:
            return image.convert("RGB")
    return load


def load_pairs(dataset: str, data_root: str | None, image_column="filepath", caption_column="title",
               synthetic_images: int = 500) -> tuple[list, list[list[str]]]:
    """(image loaders, captions per image)."""
    if dataset == "synthetic":
        scenes = [draw_scene(_rng(_RETRIEVAL_STREAM, 0, i)) for i in range(synthetic_images)]  # held out
        return [lambda s=s: s[0] for s in scenes], [[s[1]] for s in scenes]
    if not data_root:
        raise ClipaError(f"--data-root: required for --dataset {dataset}")
    root = Path(data_root)
    if dataset == "csv":
        if not root.is_file():
            raise ClipaError(f"--data-root: {root} is not a CSV/TSV file")
        delimiter = "\t" if root.suffix.lower() == ".tsv" else ","
        with open(root, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            missing = [c for c in (image_column, caption_column) if c not in (reader.fieldnames or [])]
            if missing:
                raise ClipaError(f"--data-root: {root} has no column {missing[0]!r} (columns: {reader.fieldnames})")
            captions: dict[Path, list[str]] = {}
            for row in reader:
                path = Path(row[image_column])
                captions.setdefault(path if path.is_absolute() else root.parent / path, []).append(row[caption_column])
        return [_from_file(p) for p in captions], list(captions.values())
    if dataset == "wds":
        loaders, captions = [], []
        for shard, parts in wds_index(root):
            image = next((parts[e] for e in ("jpg", "jpeg", "png", "webp") if e in parts), None)
            if image is not None and "txt" in parts:
                text = _read_at(shard, parts["txt"]).decode()
                loaders.append(lambda shard=shard, at=image: Image.open(io.BytesIO(_read_at(shard, at))))
                captions.append([c for c in text.splitlines() if c.strip()])
        return loaders, captions
    raise ClipaError(f"--dataset: unknown retrieval dataset \"{dataset}\" (available: {', '.join(RETRIEVAL_DATASETS)})")


def _read_at(shard: Path, where: tuple[int, int]) -> bytes:
    with open(shard, "rb") as f:
        return read_member(f, where)


def recall_at_k(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                ks=(1, 5, 10)) -> dict:
    """Recall metrics from normalised features; `text_to_image[t]` is caption t's image index."""
    scores = text_features @ image_features.T  # captions x images
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[torch.arange(len(text_to_image)), text_to_image] = True
    metrics = {}
    for k in ks:
        top_images = scores.topk(min(k, scores.shape[1]), dim=1).indices
        metrics[f"image_retrieval_recall@{k}"] = positives.gather(1, top_images).any(dim=1).float().mean().item()
        top_texts = scores.T.topk(min(k, scores.shape[0]), dim=1).indices
        metrics[f"text_retrieval_recall@{k}"] = positives.T.gather(1, top_texts).any(dim=1).float().mean().item()
    return metrics


@torch.no_grad()
def retrieval(loaded: LoadedModel, dataset: str, data_root: str | None = None, image_size: int | None = None,
              batch_size: int = 256) -> dict:
    loaders, captions = load_pairs(dataset, data_root)
    if not loaders:
        raise ClipaError(f"--data-root: {data_root} holds no image-caption pairs")
    model = loaded.model.eval()
    device = next(model.parameters()).device
    size = image_size or loaded.image_size
    start = time.perf_counter()
    features, kept = [], []
    collate = lambda batch: [b for b in batch if b is not None]  # noqa: E731 - unreadable images dropped
    for batch in DataLoader(_Images(loaders, eval_transform(size, loaded.mean, loaded.std)), batch_size=batch_size,
                            collate_fn=collate):
        if batch:
            images = torch.stack([b[0] for b in batch]).to(device)
            features.append(model.encode_image(images, normalize=True).float().cpu())
            kept += [b[1] for b in batch]
    if not kept:
        raise ClipaError(f"--data-root: no readable images in {data_root}")
    new_index = {old: new for new, old in enumerate(kept)}
    texts, owners = [], []
    for old in kept:
        texts += captions[old]
        owners += [new_index[old]] * len(captions[old])
    text_features = torch.cat([model.encode_text(loaded.tokenizer(texts[i:i + batch_size]).to(device),
                                                 normalize=True).float().cpu()
                               for i in range(0, len(texts), batch_size)])
    metrics = recall_at_k(torch.cat(features), text_features, torch.tensor(owners))
    metrics.update(num_images=len(kept), num_texts=len(texts), skipped_images=len(loaders) - len(kept),
                   seconds=time.perf_counter() - start)
    return {"dataset": dataset, "model": loaded.name, "pretrained": loaded.pretrained, "task": "zeroshot_retrieval",
            "metrics": metrics, "language": "en", "image_size": size}
