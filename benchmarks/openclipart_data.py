"""OpenClipart as a real image-text benchmark: Debian's CC0 drawings turned into webdataset shards.

Debian's `openclipart-svg` and `openclipart-png` packages hold 8,121 human-made drawings, each
with a title, keywords and often a description in its SVG metadata, filed in 22 top-level
category folders with sub-folders. This module turns them into

  train/{000000..}.tar   img2dataset-style: KEY.jpg (the PNG composited on white, fitted into a
                         square), KEY.txt (the caption rule below), KEY.json (title, keywords,
                         description, category path, source file)
  zeroshot/              CLIP_benchmark's `wds` layout: classnames.txt,
                         zeroshot_classification_templates.txt, test/0.tar with KEY.cls + KEY.jpg
  retrieval/             CLIP_benchmark's retrieval layout: test/0.tar with KEY.jpg + KEY.txt (title)
  summary.json           counts, classes, chance levels

Caption rule (training): the title; then the description's first sentence when it says more than
the title (at most 120 characters); then up to 8 keywords that are not already words of the
title, in the file's order, comma-separated. `"2 dead frogs. 2 dead frogs... nothing more...`
becomes `2 dead frogs. kwaakwaa, squeleton, froggies, green, fenland, froggy, fen, ooze`.

Split: a drawing is held out when the first 8 hex digits of sha1(its file name without the
extension) are 0 modulo 10 (about 10%): deterministic, independent of the package's file order,
the same for every model and seed, and the same for the copies of a drawing that the packages
file in two folders. Held-out drawings never appear in train/; each held-out drawing is
evaluated once (the first copy in path order).

Zero-shot classes: category folders two levels deep (`animals/birds`; deeper folders count
towards their level-two ancestor) with at least `MIN_CLASS_DRAWINGS` drawings in the whole
package. Class names are the folder names made readable, with a few renamed where the folder
name alone is not a description of the pictures (CLASS_NAMES).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

OPENCLIPART = Path("/usr/share/openclipart")
APT_HINT = "sudo apt-get install openclipart-svg openclipart-png"
MIN_CLASS_DRAWINGS = 40
HOLDOUT_MODULUS = 10
KEYWORDS_PER_CAPTION = 8
DESCRIPTION_CHARS = 120
MAX_PIXELS = 20_000_000
# Folder names that do not describe their pictures on their own (checked by looking at them).
CLASS_NAMES = {
    "computer/icons": "computer icons",
    "computer/buttons": "web buttons",
    "computer/hardware": "computer hardware",
    "shapes/stars": "stars",
    "signs_and_symbols/flags": "flags",
    "signs_and_symbols/map_symbols": "map symbols",
    "signs_and_symbols/led": "LED digits",
    "transportation/aiga-symbols": "transport pictograms",
    "transportation/roadsigns": "road signs",
    "special/gradients": "colour gradients",
    "special/patterns": "patterns",
    "recreation/holiday": "holiday decorations",
    "people/stickmen": "stick figures",
    "people/smilies": "smiley faces",
}
TEMPLATES = ["a drawing of {c}.", "a clipart of {c}.", "an illustration of {c}.", "{c}."]


class MissingPackages(Exception):
    pass


@dataclass(frozen=True)
class Drawing:
    png: Path
    rel: str  # path under png/ without the extension, e.g. "animals/birds/acquila_architetto_franc_01"
    title: str
    description: str
    keywords: tuple[str, ...]

    @property
    def category(self) -> str:
        return self.rel.rsplit("/", 1)[0] if "/" in self.rel else ""

    @property
    def class_folder(self) -> str:
        """The level-two category folder (`animals/birds`), or "" for drawings filed at level one."""
        parts = self.rel.split("/")
        return "/".join(parts[:2]) if len(parts) >= 3 else ""

    @property
    def held_out(self) -> bool:
        # By file name, not path: the packages file some drawings in two folders
        # (animals/x.png and animals/amphibian/x.png), and both copies must fall on the same side.
        return int(hashlib.sha1(self.png.stem.encode()).hexdigest()[:8], 16) % HOLDOUT_MODULUS == 0

    @property
    def caption(self) -> str:
        return caption(self.title, self.description, self.keywords)


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text or "").strip()


def caption(title: str, description: str, keywords) -> str:
    parts = [title]
    first = re.split(r"(?<=[.!?])\s", description, maxsplit=1)[0] if description else ""
    if first and first.lower().rstrip(".") not in title.lower() and len(first) <= DESCRIPTION_CHARS:
        parts.append(first)
    title_words = set(re.findall(r"\w+", title.lower()))
    extra = []
    for word in keywords:
        if word.lower() not in title_words and word.lower() not in (e.lower() for e in extra):
            extra.append(word)
        if len(extra) == KEYWORDS_PER_CAPTION:
            break
    text = ". ".join(p.rstrip(".") for p in parts if p)
    return f"{text}. {', '.join(extra)}" if extra else text


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child(node, name: str):
    return next((c for c in node if _local(c.tag) == name), None)


def read_metadata(svg: Path) -> tuple[str, str, tuple[str, ...]]:
    """(title, description, keywords) from an OpenClipart SVG's RDF metadata; empty when absent.

    Matched by local name: the packages use two Creative Commons namespaces (web.resource.org/cc/
    in older files, creativecommons.org/ns# in newer ones). A title that only repeats the creator's
    name (common in some uploaders' files) is dropped, as is a keyword that does."""
    try:
        root = ET.parse(svg).getroot()
    except (ET.ParseError, OSError):
        return "", "", ()
    work = next((e for e in root.iter() if _local(e.tag) == "Work"), None)
    if work is None:
        return "", "", ()
    text = {name: _clean(getattr(_child(work, name), "text", "") or "") for name in ("title", "description")}
    creator = _child(work, "creator")
    creator_name = _clean(next((e.text or "" for e in creator.iter() if _local(e.tag) == "title"), "")
                          if creator is not None else "").lower()
    subject = _child(work, "subject")
    keywords = [_clean(e.text or "") for e in subject.iter() if _local(e.tag) == "li"] if subject is not None else []
    keywords = tuple(k for k in keywords if k and k.lower() != creator_name)
    title = "" if text["title"].lower() == creator_name else text["title"]
    return title, text["description"], keywords


def find_drawings(root: Path = OPENCLIPART) -> list[Drawing]:
    """Every drawing that has both a PNG and a title, sorted by path."""
    png_root, svg_root = root / "png", root / "svg"
    if not png_root.is_dir() or not svg_root.is_dir():
        raise MissingPackages(f"OpenClipart not found under {root}: install it with `{APT_HINT}`")
    drawings = []
    for png in sorted(png_root.rglob("*.png")):
        rel = png.relative_to(png_root).with_suffix("").as_posix()
        title, description, keywords = read_metadata(svg_root / f"{rel}.svg")
        if not title and keywords:  # the creator's name as title: the keywords describe the drawing
            title, keywords = keywords[0], keywords[1:]
        if not title:  # no metadata: the file name, which OpenClipart builds from title and author
            title = png.stem.rsplit("_", 2)[0].replace("_", " ").strip() or png.stem
        drawings.append(Drawing(png, rel, title, description, keywords))
    return drawings


def zeroshot_classes(drawings: list[Drawing], min_drawings: int = MIN_CLASS_DRAWINGS) -> list[str]:
    counts: dict[str, int] = {}
    for d in drawings:
        if d.class_folder:
            counts[d.class_folder] = counts.get(d.class_folder, 0) + 1
    return sorted(c for c, n in counts.items() if n >= min_drawings)


def class_name(folder: str) -> str:
    return CLASS_NAMES.get(folder, folder.split("/")[-1].replace("_", " ").replace("-", " "))


def render(png: Path, size: int) -> bytes | None:
    """The drawing composited on white and fitted into a size x size square (img2dataset's
    "border" resize), as JPEG; None for a PNG that is unreadable or over MAX_PIXELS (19 of the
    package's renderings are 20-620 megapixels, two beyond PIL's decompression-bomb limit: they are
    skipped and counted, not decoded)."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(png)
    except (Image.DecompressionBombError, OSError):
        return None
    if im.width * im.height > MAX_PIXELS:
        im.close()
        return None
    with im:
        im.load()
        rgba = im.convert("RGBA")
    canvas = Image.new("RGB", rgba.size, (255, 255, 255))
    canvas.paste(rgba, mask=rgba.getchannel("A"))
    canvas.thumbnail((size, size), Image.Resampling.BICUBIC)
    square = Image.new("RGB", (size, size), (255, 255, 255))
    square.paste(canvas, ((size - canvas.width) // 2, (size - canvas.height) // 2))
    out = io.BytesIO()
    square.save(out, format="JPEG", quality=92)
    return out.getvalue()


def build(out: Path, image_size: int = 128, shard_size: int = 1000, root: Path = OPENCLIPART,
          min_class_drawings: int = MIN_CLASS_DRAWINGS, log=print) -> dict:
    """Write train shards and the two held-out evaluations under `out`; returns the summary."""
    import webdataset as wds

    drawings = find_drawings(root)
    classes = zeroshot_classes(drawings, min_class_drawings)
    class_index = {c: i for i, c in enumerate(classes)}
    train = [d for d in drawings if not d.held_out]
    seen: set[str] = set()
    held = [d for d in drawings if d.held_out and not (d.png.stem in seen or seen.add(d.png.stem))]
    for sub in ("train", "zeroshot/test", "retrieval/test"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    n_train, skipped = 0, []
    for start in range(0, len(train), shard_size):
        with wds.TarWriter(str(out / "train" / f"{start // shard_size:06d}.tar"), mtime=0) as sink:
            for i, d in enumerate(train[start:start + shard_size], start):
                image = render(d.png, image_size)
                if image is None:
                    skipped.append(d.rel)
                    continue
                sink.write({"__key__": f"{i:06d}", "jpg": image, "txt": d.caption,
                            "json": json.dumps({"title": d.title, "description": d.description,
                                                "keywords": list(d.keywords), "category": d.category,
                                                "source": d.rel})})
                n_train += 1
        log(f"train shard {start // shard_size}: {n_train}/{len(train)} drawings")
    n_zs = n_ret = 0
    with wds.TarWriter(str(out / "zeroshot" / "test" / "0.tar"), mtime=0) as zs, \
            wds.TarWriter(str(out / "retrieval" / "test" / "0.tar"), mtime=0) as ret:
        for i, d in enumerate(held):
            image = render(d.png, image_size)
            if image is None:
                skipped.append(d.rel)
                continue
            ret.write({"__key__": f"{i:06d}", "jpg": image, "txt": d.title})
            n_ret += 1
            if d.class_folder in class_index:
                zs.write({"__key__": f"{i:06d}", "jpg": image, "cls": str(class_index[d.class_folder])})
                n_zs += 1
    (out / "zeroshot" / "classnames.txt").write_text("".join(class_name(c) + "\n" for c in classes))
    (out / "zeroshot" / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    per_class = {class_name(c): sum(1 for d in held if d.class_folder == c and d.rel not in skipped)
                 for c in classes}
    summary = {
        "image_size": image_size, "drawings": len(drawings), "train": n_train, "held_out": len(held),
        "zeroshot_images": n_zs, "retrieval_pairs": n_ret, "skipped": skipped, "zeroshot_classes": [class_name(c) for c in classes],
        "zeroshot_per_class": per_class,
        "chance": {"zeroshot_acc1": 1 / max(1, len(classes)), "zeroshot_acc5": min(1.0, 5 / max(1, len(classes))),
                   "zeroshot_acc1_majority": max(per_class.values(), default=0) / max(1, n_zs),
                   "retrieval_recall@1": 1 / max(1, n_ret), "retrieval_recall@5": min(1.0, 5 / max(1, n_ret))},
        "caption_rule": __doc__.split("Caption rule (training): ")[1].split("\n\n")[0].replace("\n", " "),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
