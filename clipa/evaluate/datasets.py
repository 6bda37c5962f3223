"""Zero-shot classification datasets: images, labels, class names and prompt templates.

Layouts under `--data-root` (a sub-folder with the usual name is found too):
  imagenet         ImageFolder of the validation set: val/n01440764/*.JPEG (1,000 WordNet ids)
  imagenet-v2      ImageNetV2's folders named by class index: 0/ .. 999/ (imagenetv2-matched-frequency-format-val)
  imagenet-sketch  sketch/n01440764/*.JPEG (1,000 WordNet ids)
  imagenet-r, -a   imagenet-r/n01443537/*.jpg: 200-class subsets, evaluated over their 200 classes
  imagefolder      one folder per class; names from the folders (`_` read as a space) or classnames.txt
  wds              CLIP_benchmark's webdataset layout: classnames.txt,
                   zeroshot_classification_templates.txt, test/*.tar with `cls` + `jpg|png|webp`
  synthetic        the built-in held-out set (24 classes)

Class names and the 80 OpenAI templates come from open_clip; the WordNet ids of ImageNet and of the
-R/-A subsets from timm's bundled metadata (both are dependencies), so nothing is downloaded.
Template files follow CLIP_benchmark: one prompt per line, `{c}` standing for the class name.
open_clip's `build_zero_shot_classifier` formats *strings* positionally (`t.format(c)`), which
breaks on `{c}`, so every template becomes a callable here. Unreadable images are skipped and
counted, never fatal.
"""

from __future__ import annotations

import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
from PIL import Image
from torch.utils.data import Dataset

from clipa.data.decode import ImageRef, decode_image, read_bytes
from clipa.data.sources import IMAGE_EXTS
from clipa.data.synthetic import SyntheticEvalSet
from clipa.data.tar import TarError, index_tar
from clipa.errors import ClipaError
from clipa.evaluate.names import data_root as find_data_root
from clipa.evaluate.names import reader
from clipa.recipe.schema import ZEROSHOT_DATASETS

DATASETS = ZEROSHOT_DATASETS
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class ZeroShotData:
    name: str
    dataset: object  # dataset[i] -> (transformed image, label), or None for an unreadable image
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
    lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    bad = [line for line in lines if "{c}" not in line]
    if not lines or bad:
        raise ClipaError(f"--templates: {spec} needs one template per line, each with {{c}} for the class name"
                         + (f" (line without it: {bad[0]!r})" if bad else " (file is empty)"))
    return [template_callable(line) for line in lines]


class EvalImages(Dataset):
    """(image, target) items -> (transformed image, target); the image is a PIL image or a reference that
    `clipa.data.decode` reads (a file, a tar member). One that fails to decode yields None (skipped and
    counted)."""

    def __init__(self, items: list[tuple[Image.Image | ImageRef, object]], transform):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        image, target = self.items[index]
        try:  # PIL decodes lazily: a truncated file fails in convert(), so it is inside the try
            image = image.convert("RGB") if isinstance(image, Image.Image) else decode_image(image)
        except (OSError, ValueError, MemoryError, Image.DecompressionBombError):  # one sample, not the run
            return None
        return self.transform(image), target


def file_ref(path: Path | str) -> ImageRef:
    """A reference to a whole image file."""
    return (str(path), 0, -1)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _root(data_root: Path, sub: tuple[str, ...] = ()) -> Path:
    if not data_root.is_dir():
        raise ClipaError(f"--data-root: {data_root} is not a directory; point --data-root at the dataset folder")
    for name in sub:  # accept the parent folder too: imagenet/val, imagenet-r/imagenet-r, ...
        if (data_root / name).is_dir():
            return data_root / name
    return data_root


def _timm_synsets(filename: str) -> list[str]:
    data = pkgutil.get_data("timm.data", f"_info/{filename}")
    if data is None:  # pragma: no cover - timm moved its metadata
        raise ClipaError(f"timm no longer ships _info/{filename}; install timm>=1.0,<2")
    return data.decode().split()


def _wordnet_folders(root: Path, dataset: str, synsets: list[str], transform,
                    named_by: str = "WordNet id") -> EvalImages:
    """Folders named by WordNet id (or class index), labelled by their position in `synsets`; all must be present."""
    index = {wnid: i for i, wnid in enumerate(synsets)}
    folders = {p.name: p for p in _class_folders(root)}
    missing = [w for w in synsets if w not in folders]
    if len(missing) == len(synsets):
        raise ClipaError(f"--data-root: {root} has no class folders named by {named_by} (e.g. {synsets[0]}/); "
                         f"--dataset {dataset} expects {root}/{synsets[0]}/*.jpeg")
    if missing:
        raise ClipaError(f"--data-root: {root} lacks {len(missing)} of the {len(synsets)} class folders of "
                         f"{dataset} (first missing: {missing[0]}/); the split must be complete")
    items = [(file_ref(path), index[w]) for w in synsets for path in _images_in(folders[w])]
    return EvalImages(items, transform)


def read_imagefolder(root: Path, transform) -> tuple[EvalImages, list[str]]:
    folders = _class_folders(root)
    if not folders:
        raise ClipaError(f"--data-root: {root} has no class folders; expected {root}/CLASS/IMAGE.jpg")
    classnames = [p.name.replace("_", " ") for p in folders]
    names_file = root / "classnames.txt"
    if names_file.is_file():
        names = [line.strip() for line in names_file.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        if len(names) != len(folders):
            raise ClipaError(f"{names_file}: lists {len(names)} class names but {root} has {len(folders)} "
                             "class folders; give one name per folder, in sorted folder order")
        classnames = names
    items = [(file_ref(path), label) for label, folder in enumerate(folders) for path in _images_in(folder)]
    if not items:
        raise ClipaError(f"--data-root: {root} has class folders but no images ({', '.join(IMAGE_SUFFIXES)})")
    return EvalImages(items, transform), classnames


def wds_index(root: Path) -> list[tuple[Path, dict[str, tuple[int, int]]]]:
    """CLIP_benchmark's webdataset split under `root` (test/*.tar, else *.tar), indexed once:
    (shard, {extension: (byte offset, size)}) per sample, so a sample is read with one seek."""
    shards = sorted((root / "test").glob("*.tar")) or sorted(root.glob("*.tar"))
    if not shards:
        raise ClipaError(f"--data-root: no shards in {root / 'test'} (expected test/0.tar, ...)")
    samples = []
    for shard in shards:
        try:
            samples += [(shard, parts) for _, parts in index_tar(shard)]
        except (OSError, TarError) as err:
            raise ClipaError(f"--data-root: cannot read shard {shard} ({err})") from None
    return samples


def wds_image(shard: Path, parts: dict[str, tuple[int, int]]) -> ImageRef | None:
    """The sample's image member (the first of training's IMAGE_EXTS it has), or None."""
    where = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
    return None if where is None else (str(shard), *where)


def wds_text(shard: Path, where: tuple[int, int]) -> str:
    return read_bytes((str(shard), *where)).decode("utf-8", errors="replace")


def wds_classification(root: Path, transform, num_classes: int | None = None) -> EvalImages:
    """CLIP_benchmark's webdataset classification split with random access (see `wds_index`),
    so the split can be sharded across processes like any map-style dataset.

    Labels are read and checked against the class names up front (a few bytes per sample): a label
    outside classnames.txt is a broken dataset, named with its shard, not a crash mid-evaluation."""
    items = []
    for shard, parts in wds_index(root):
        image = wds_image(shard, parts)
        if image is not None and "cls" in parts:
            items.append((image, _label(wds_text(shard, parts["cls"]).strip(), shard, root, num_classes)))
    return EvalImages(items, transform)


def _label(text: str, shard: Path, root: Path, num_classes: int | None) -> int:
    try:
        label = int(text)
    except ValueError:
        raise ClipaError(f"--data-root: {shard}: a .cls member holds {text!r}, not a class index") from None
    if num_classes is not None and not 0 <= label < num_classes:
        raise ClipaError(f"--data-root: {shard}: label {label} is outside the {num_classes} classes of "
                         f"{root / 'classnames.txt'} (valid: 0..{num_classes - 1}); the shards and "
                         "classnames.txt belong to different datasets")
    return label


def _wds(root: Path, transform, templates: str | None, name: str = "wds") -> ZeroShotData:
    names_file = root / "classnames.txt"
    if not names_file.is_file():
        raise ClipaError(f"--data-root: {names_file} is missing (CLIP_benchmark webdataset layout)")
    classnames = [line.strip() for line in names_file.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    template_file = root / "zeroshot_classification_templates.txt"
    default = [t for t in template_file.read_text(encoding="utf-8", errors="replace").splitlines() if t.strip()] \
        if template_file.is_file() else ["a photo of a {c}."]
    return ZeroShotData(name, wds_classification(root, transform, len(classnames)), classnames,
                        load_templates(templates, default))


def load_zeroshot_data(name: str, transform, data_root: str | None = None, templates: str | None = None,
                       synthetic_per_class: int = 40) -> ZeroShotData:
    """The dataset `name` (clipa's or CLIP_benchmark's name, or wds/NAME; see clipa.evaluate.names) from
    `data_root`, else from $CLIPA_DATA."""
    kind = reader(name)
    if kind == "synthetic":
        dataset = SyntheticEvalSet(per_class=synthetic_per_class, transform=transform)
        return ZeroShotData(name, dataset, list(dataset.classnames), load_templates(templates, dataset.templates))
    where = find_data_root(name, data_root)

    def root(*sub: str) -> Path:
        return _root(where, sub)

    if kind == "imagefolder":
        folder = root()
        dataset, classnames = read_imagefolder(folder, transform)
        found = folder / "templates.txt"
        lines = found.read_text(encoding="utf-8", errors="replace").splitlines() if found.is_file() else []
        default = [line for line in lines if line.strip()] or ["a photo of a {c}."]
        return ZeroShotData(name, dataset, classnames, load_templates(templates, default))
    if kind == "wds":
        return _wds(root(), transform, templates, name)
    openai = load_templates(templates, OPENAI_IMAGENET_TEMPLATES)
    synsets = _timm_synsets("imagenet_synsets.txt")
    if kind in ("imagenet", "imagenet-sketch"):
        folder = root("val") if kind == "imagenet" else root("sketch")
        return ZeroShotData(name, _wordnet_folders(folder, name, synsets, transform), list(IMAGENET_CLASSNAMES), openai)
    if kind == "imagenet-v2":
        folder = root("imagenetv2-matched-frequency-format-val")
        folders = [str(i) for i in range(1000)]
        return ZeroShotData(name, _wordnet_folders(folder, name, folders, transform, "class index (0/ .. 999/)"),
                            list(IMAGENET_CLASSNAMES), openai)
    if kind in ("imagenet-r", "imagenet-a"):
        subset = _timm_synsets(f"imagenet_{kind[-1]}_synsets.txt")
        names = [IMAGENET_CLASSNAMES[synsets.index(w)] for w in subset]
        return ZeroShotData(name, _wordnet_folders(root(kind), name, subset, transform), names, openai)
    raise AssertionError(f"{kind} is in DATASETS but has no reader")  # pragma: no cover
