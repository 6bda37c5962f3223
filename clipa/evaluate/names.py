"""Evaluation dataset names and where their files are, in clipa's spelling and CLIP_benchmark's.

A name is one of clipa's (`imagenet`, `imagenet-v2`, ..., `wds`), one of CLIP_benchmark's for the same
data (`imagenet1k`, `imagenetv2`, `imagenet_sketch`, ...), or CLIP_benchmark's `wds/NAME` (its webdataset
layout; several in one call, each under its own root). Results keep the name as given, so a table built
from CLIP_benchmark's JSON files and clipa's lines up row for row.

Where the files are, first match wins:
  --data-root PATH          as given; CLIP_benchmark's `{dataset}` (and `{dataset_cleaned}`) in it is replaced
                            by the name (for wds/NAME: NAME, as CLIP_benchmark does), so one option serves several
  $CLIPA_DATA/FOLDER        a folder holding every dataset by name: imagenet/, imagenet-v2/, imagenet-sketch/,
                            imagenet-r/, imagenet-a/, wds_NAME/ (the name of CLIP_benchmark's Hugging Face repos)
No torch here: the CLI checks names before it loads a model.
"""

from __future__ import annotations

import os
from pathlib import Path

from clipa.errors import ClipaError, did_you_mean
from clipa.recipe.schema import ZEROSHOT_DATASETS

DATA_ENV = "CLIPA_DATA"
# CLIP_benchmark's name -> clipa's reader of the same files.
CLIP_BENCHMARK_NAMES = {"imagenet1k": "imagenet", "imagenetv2": "imagenet-v2", "imagenet_sketch": "imagenet-sketch",
                        "imagenet-r": "imagenet-r", "imagenet-a": "imagenet-a"}
# What each reader expects under its folder (said when the folder is missing or wrong).
LAYOUTS = {
    "imagenet": "val/n01440764/*.JPEG, the validation set's 1,000 WordNet-id folders",
    "imagenet-v2": "0/ .. 999/, ImageNetV2's class-index folders",
    "imagenet-sketch": "sketch/n01440764/*.JPEG, 1,000 WordNet-id folders",
    "imagenet-r": "n01443537/*.jpg, 200 WordNet-id folders",
    "imagenet-a": "n01498041/*.jpg, 200 WordNet-id folders",
    "imagefolder": "CLASS/IMAGE.jpg, one folder per class",
    "wds": "classnames.txt and test/0.tar ..., CLIP_benchmark's webdataset",
}


def reader(name: str, key: str = "--dataset") -> str:
    """clipa's reader for a dataset name (clipa's, CLIP_benchmark's, or wds/NAME), or a one-line error."""
    if name in ZEROSHOT_DATASETS:
        return name
    if name in CLIP_BENCHMARK_NAMES:
        return CLIP_BENCHMARK_NAMES[name]
    if name.startswith("wds/") and len(name) > len("wds/"):
        return "wds"
    known = list(dict.fromkeys([*ZEROSHOT_DATASETS, *CLIP_BENCHMARK_NAMES]))
    raise ClipaError(f"{key}: unknown dataset \"{name}\"{did_you_mean(name, known)} (available: {', '.join(known)}, "
                     "wds/NAME)")


def folder(name: str) -> str:
    """The folder under $CLIPA_DATA that holds `name`."""
    if name.startswith("wds/"):
        return "wds_" + name[len("wds/"):].replace("/", "-")
    return reader(name)


def locate(name: str, data_root: str | None) -> tuple[str | None, str]:
    """(the folder or file to read `name` from, where that came from, for messages); (None, "") when
    neither --data-root nor $CLIPA_DATA says."""
    if data_root:
        short = name[len("wds/"):] if name.startswith("wds/") else name
        path = data_root.replace("{dataset}", short).replace("{dataset_cleaned}", short.replace("/", "-"))
        return path, "--data-root" if path == data_root else f"--data-root {data_root}"
    env = os.environ.get(DATA_ENV)
    if env and name != "synthetic":
        return str(Path(env) / folder(name)), f"${DATA_ENV}/{folder(name)}"
    return None, ""


def data_root(name: str, given: str | None) -> Path | None:
    """The folder (or file) to read `name` from (`locate`), checked to exist; None for synthetic. The
    one-line error says where it looked, the layout expected there and how to point clipa at it."""
    kind = reader(name)
    if kind == "synthetic":
        return None
    where, origin = locate(name, given)
    layout = f"(layout: {LAYOUTS[kind]})"
    if where is None:
        raise ClipaError(f"--data-root: required for --dataset {name}; pass --data-root PATH or set {DATA_ENV} to "
                         f"a folder holding {folder(name)}/ {layout}")
    if not Path(where).exists():
        raise ClipaError(f"--data-root: {where} (from {origin}) does not exist; --dataset {name} reads it "
                         f"{layout}. Point --data-root at the dataset or set {DATA_ENV} to a folder holding "
                         f"{folder(name)}/")
    return Path(where)


def output_slug(name: str) -> str:
    """The name as it goes into a file name: CLIP_benchmark's slug (wds/NAME -> NAME, `/` -> `_`)."""
    short = name[len("wds/"):] if name.startswith("wds/") else name
    return short.replace("/", "_")
