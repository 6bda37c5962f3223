"""Zero-shot classification datasets: images, labels, class names and prompt templates.

Template files follow CLIP_benchmark: one prompt per line, `{c}` standing for the class name.
open_clip's `build_zero_shot_classifier` formats *strings* positionally (`t.format(c)`), which
breaks on `{c}`, so every template becomes a callable here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
from torchvision.datasets import ImageFolder

from clipa.data.synthetic import SyntheticEvalSet
from clipa.errors import ClipaError

DATASETS = ("synthetic", "imagefolder")


@dataclass
class ZeroShotData:
    name: str
    dataset: object  # map-style: dataset[i] -> (transformed image, label)
    classnames: list[str]
    templates: list[Callable[[str], str]]


def template_callable(text: str) -> Callable[[str], str]:
    return lambda c: text.replace("{c}", c)


def load_templates(spec: str | None, default) -> list[Callable[[str], str]]:
    if spec is None:
        return [t if callable(t) else template_callable(t) for t in default]
    if spec == "openai":
        return list(OPENAI_IMAGENET_TEMPLATES)
    if spec == "simple":
        return list(SIMPLE_IMAGENET_TEMPLATES)
    path = Path(spec)
    if not path.is_file():
        raise ClipaError(f"--templates: {spec} is neither openai, simple nor a file of templates")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = [line for line in lines if "{c}" not in line]
    if not lines or bad:
        raise ClipaError(f"--templates: {spec} needs one template per line, each with {{c}} for the class name"
                         + (f" (line without it: {bad[0]!r})" if bad else " (file is empty)"))
    return [template_callable(line) for line in lines]


def _imagefolder(root: Path, transform) -> tuple[ImageFolder, list[str]]:
    if not root.is_dir():
        raise ClipaError(f"--data-root: {root} is not a directory; point it at a folder with one sub-folder per class")
    try:
        dataset = ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as err:
        raise ClipaError(f"--data-root: {root} is not an image folder ({err}); expected {root}/CLASS/IMAGE.jpg") from None
    classnames = [c.replace("_", " ") for c in dataset.classes]
    names_file = root / "classnames.txt"
    if names_file.is_file():
        names = [line.strip() for line in names_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(names) != len(dataset.classes):
            raise ClipaError(f"{names_file}: lists {len(names)} class names but {root} has {len(dataset.classes)} "
                             "class folders; give one name per folder, in sorted folder order")
        classnames = names
    return dataset, classnames


def load_zeroshot_data(name: str, transform, data_root: str | None = None, templates: str | None = None,
                       synthetic_per_class: int = 40) -> ZeroShotData:
    if name == "synthetic":
        dataset = SyntheticEvalSet(per_class=synthetic_per_class, transform=transform)
        return ZeroShotData(name, dataset, list(dataset.classnames), load_templates(templates, dataset.templates))
    if name == "imagefolder":
        if not data_root:
            raise ClipaError("--data-root: required for --dataset imagefolder (a folder with one sub-folder per class)")
        root = Path(data_root)
        dataset, classnames = _imagefolder(root, transform)
        default = [line for line in (root / "templates.txt").read_text().splitlines() if line.strip()] \
            if (root / "templates.txt").is_file() else ["a photo of a {c}."]
        return ZeroShotData(name, dataset, classnames, load_templates(templates, default))
    raise ClipaError(f"--dataset: unknown dataset \"{name}\" (available: {', '.join(DATASETS)})")
