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

import time
from pathlib import Path

import torch

from clipa.data.csvfile import MissingColumn, read_csv
from clipa.data.synthetic import retrieval_sample
from clipa.data.transforms import eval_transform
from clipa.errors import ClipaError, check_one_of
from clipa.evaluate.datasets import EvalImages, file_ref, wds_image, wds_index, wds_text
from clipa.evaluate.models import LoadedModel, at_geometry
from clipa.evaluate.sharding import gather_batches, shard_range
from clipa.evaluate.sharding import shard as shard_dataset
from clipa.evaluate.zeroshot import eval_loader
from clipa.recipe.schema import RETRIEVAL_DATASETS  # one list for the CLI and recipes


def load_pairs(dataset: str, data_root: str | None, image_column="filepath", caption_column="title",
               synthetic_images: int = 500) -> tuple[list, list[list[str]]]:
    """(images, captions per image): an image is a PIL image or a reference `clipa.data.decode` reads."""
    if dataset == "synthetic":
        scenes = [retrieval_sample(i) for i in range(synthetic_images)]  # held out
        return [image for image, _ in scenes], [[caption] for _, caption in scenes]
    if not data_root:
        raise ClipaError(f"--data-root: required for --dataset {dataset}")
    root = Path(data_root)
    if dataset == "csv":
        if not root.is_file():
            raise ClipaError(f"--data-root: {root} is not a CSV/TSV file")
        try:  # read as training reads CSVs; rows that share an image path are that image's captions
            rows = read_csv(root, image_column, caption_column)
        except MissingColumn as err:
            raise ClipaError(f"--data-root: {root} has no column {err.column!r} (columns: {err.header})") from None
        captions: dict[str, list[str]] = {}
        for image, caption in rows:
            if caption is not None:
                captions.setdefault(image, []).append(caption)
        return [file_ref(p) for p in captions], list(captions.values())
    if dataset == "wds":
        images, captions = [], []
        for shard, parts in wds_index(root):
            image = wds_image(shard, parts)
            if image is not None and "txt" in parts:
                images.append(image)
                captions.append([c for c in wds_text(shard, parts["txt"]).splitlines() if c.strip()])
        return images, captions
    check_one_of(dataset, RETRIEVAL_DATASETS, "retrieval dataset")
    raise AssertionError(f"{dataset} is in RETRIEVAL_DATASETS but has no reader")  # pragma: no cover


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


def _collate(batch):
    kept = [b for b in batch if b is not None]  # unreadable images dropped (counted by the caller)
    if not kept:
        return None, None
    return torch.stack([b[0] for b in kept]), torch.tensor([b[1] for b in kept])


@torch.no_grad()
def retrieval(loaded: LoadedModel, dataset: str, data_root: str | None = None, image_size: int | None = None,
              batch_size: int = 256, num_workers: int = 0, text_length: int | None = None) -> dict:
    """Recall@1/5/10 of `loaded` on a named dataset (CLIP_benchmark-shaped result). In a process
    group each process encodes every world-th image and caption; features are gathered in order."""
    loaded = at_geometry(loaded, image_size, text_length)
    pairs, captions = load_pairs(dataset, data_root)
    if not pairs:
        raise ClipaError(f"--data-root: {data_root} holds no image-caption pairs")
    model = loaded.model.eval()
    device = next(model.parameters()).device
    size = loaded.image_size
    start = time.perf_counter()
    indices, features = [], []
    transform = eval_transform(size, loaded.mean, loaded.std, loaded.interpolation, loaded.resize_mode)
    images = EvalImages([(image, i) for i, image in enumerate(pairs)], transform)
    for batch, index in eval_loader(shard_dataset(images), batch_size, num_workers, collate_fn=_collate):
        if batch is not None:
            features.append(model.encode_image(batch.to(device), normalize=True).float().cpu())
            indices.append(index)
    gathered = gather_batches(indices, features)
    if gathered is None:
        raise ClipaError(f"--data-root: no readable images in {data_root}")
    kept, image_features = gathered
    texts, owners = [], []
    for new, old in enumerate(kept.tolist()):
        texts += captions[old]
        owners += [new] * len(captions[old])
    if not texts:
        raise ClipaError(f"--data-root: {data_root}: every caption is empty")
    mine = list(shard_range(len(texts)))
    text_index, text_features = [], []
    for i in range(0, len(mine), batch_size):
        chunk = mine[i:i + batch_size]
        tokens = loaded.tokenizer([texts[t] for t in chunk]).to(device)
        text_features.append(model.encode_text(tokens, normalize=True).float().cpu())
        text_index.append(torch.tensor(chunk))
    _, text_features = gather_batches(text_index, text_features)
    metrics = recall_at_k(image_features, text_features, torch.tensor(owners))
    metrics.update(num_images=len(kept), num_texts=len(texts), skipped_images=len(pairs) - len(kept),
                   seconds=time.perf_counter() - start)
    return {"dataset": dataset, "model": loaded.name, "pretrained": loaded.pretrained, "task": "zeroshot_retrieval",
            "metrics": metrics, "language": "en", "image_size": size, "text_length": loaded.context_length}
