"""`clipa data inspect PATH`: what a dataset holds before a run spends GPU hours on it.

Reads the source in storage order (no shuffling) with the same readers and checks as training,
decodes every image (JPEGs at reduced scale: truncation still fails, since libjpeg must read every
byte) and reports: samples, skipped samples and shards by reason, caption lengths in words and in
CLIP BPE tokens (what `reduction.text_length` cuts), image sizes and formats, and a PNG contact
sheet of the first images with their captions.
"""

from __future__ import annotations

import math
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from clipa.data.decode import open_rgb
from clipa.data.sources import SHARD_REASONS, ReadOptions, SkipStats, build_sources
from clipa.data.spec import parse_train
from clipa.errors import ClipaError

SYNTHETIC_DEFAULT = 256  # samples drawn from the endless synthetic stream when --max-samples is 0
_THUMB = 160


def _stats(values: list[int]) -> dict | None:
    if not values:
        return None
    a = np.asarray(values)
    return {"min": int(a.min()), "mean": float(a.mean()), "median": float(np.median(a)),
            "p95": float(np.percentile(a, 95)), "max": int(a.max())}


class _Summary:
    def __init__(self, name: str, kind: str, units: int | None, unit: str = ""):
        self.name, self.kind, self.units, self.unit = name, kind, units, unit
        self.samples, self.words, self.tokens = 0, [], []
        self.sizes: list[tuple[int, int]] = []
        self.formats: Counter = Counter()
        self.stats = SkipStats()
        self.stats.quiet = True  # counted and shown in the table; a log line per bad sample would bury it

    def add(self, image: Image.Image, fmt: str, caption: str, tokenizer) -> None:
        self.samples += 1
        self.sizes.append(image.size)
        self.formats[fmt or "?"] += 1
        self.words.append(len(caption.split()))
        self.tokens.append(len(tokenizer.encode(caption)))

    def result(self) -> dict:
        skipped = {r: n for r, n in sorted(self.stats.counts.items()) if r not in SHARD_REASONS}
        shards = {r: n for r, n in sorted(self.stats.counts.items()) if r in SHARD_REASONS}
        sides = [min(s) for s in self.sizes]
        return {"name": self.name, "kind": self.kind, "units": self.units, "unit": self.unit, "samples": self.samples,
                "skipped": skipped, "skipped_samples": sum(skipped.values()),
                "corrupt": skipped.get("corrupt_image", 0),
                "bad_shards": shards, "caption_words": _stats(self.words), "caption_tokens": _stats(self.tokens),
                "tokens_over_75": float(np.mean(np.asarray(self.tokens) > 75)) if self.tokens else 0.0,
                "image_min_side": _stats(sides), "formats": dict(self.formats)}


def _decode(record) -> tuple[Image.Image, str, tuple[int, int]]:
    """(image decoded at no less than thumbnail size, format, full size from the header)."""
    return open_rgb(record.image, _THUMB)


def inspect_dataset(path: str, options: ReadOptions | None = None, max_samples: int = 0, sheet: Path | None = None,
                    sheet_count: int = 16) -> dict:
    """Summarise `path` (anything `data.train` accepts); write a contact sheet if `sheet` is given."""
    from open_clip.tokenizer import SimpleTokenizer

    options = options or ReadOptions()
    specs = parse_train(path, key="PATH")
    tokenizer = SimpleTokenizer()
    thumbs: list[tuple[Image.Image, str]] = []
    results = []
    if specs[0].kind == "synthetic":
        from clipa.data.synthetic import SyntheticSource

        source = SyntheticSource()
        summary = _Summary("synthetic", "synthetic", None)
        for index in range(max_samples or SYNTHETIC_DEFAULT):
            image, caption = source.sample(index)
            summary.add(image, "generated", caption, tokenizer)
            if len(thumbs) < sheet_count:
                thumbs.append((image, caption))
        results.append(summary.result())
    else:
        for source in build_sources(specs, options):
            summary = _Summary(source.name, source.kind, len(source), source.unit)
            for unit in range(len(source)):
                for record in source.read(unit, summary.stats):
                    try:
                        image, fmt, size = _decode(record)
                    except Exception as err:  # noqa: BLE001 - anything PIL raises marks the sample corrupt
                        summary.stats.skip("corrupt_image", record.where, record.key, str(err))
                        continue
                    summary.add(image, fmt, record.caption, tokenizer)
                    summary.sizes[-1] = size
                    if len(thumbs) < sheet_count:
                        thumbs.append((image, record.caption))
                    if max_samples and summary.samples >= max_samples:
                        break
                if max_samples and summary.samples >= max_samples:
                    break
            results.append(summary.result())
    if all(r["samples"] == 0 for r in results):
        found = "; ".join(f"{r['name']}: " + (", ".join(f"{k.replace('_', ' ')}: {n}" for k, n in
                                                         {**r["skipped"], **r["bad_shards"]}.items()) or "empty")
                          for r in results)
        raise ClipaError(f"PATH: {path} yields no usable sample ({found}); check the path or pattern and "
                         "--caption-key / --csv-image-key / --csv-caption-key")
    written = None
    if sheet is not None and sheet_count > 0 and thumbs:
        written = write_contact_sheet(thumbs, sheet)
    return {"path": path, "sources": results, "samples": sum(r["samples"] for r in results),
            "skipped_samples": sum(r["skipped_samples"] for r in results), "sheet": str(written) if written else None}


def write_contact_sheet(items: list[tuple[Image.Image, str]], out: Path, thumb: int = _THUMB) -> Path:
    """A grid of thumbnails (whole image, letterboxed) with the first lines of each caption below."""
    font = ImageFont.load_default()
    chars = max(8, thumb // 7)
    lines = 3
    line_h = 12
    cell_w, cell_h = thumb + 8, thumb + 8 + lines * line_h + 4
    cols = math.ceil(math.sqrt(len(items)))
    rows = math.ceil(len(items) / cols)
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (image, caption) in enumerate(items):
        x, y = (i % cols) * cell_w + 4, (i // cols) * cell_h + 4
        box = Image.new("RGB", (thumb, thumb), (235, 235, 235))
        small = ImageOps.contain(image.convert("RGB"), (thumb, thumb), Image.BICUBIC)
        box.paste(small, ((thumb - small.size[0]) // 2, (thumb - small.size[1]) // 2))
        sheet.paste(box, (x, y))
        wrapped = textwrap.wrap(caption, chars)[:lines]
        if len(textwrap.wrap(caption, chars)) > lines:
            wrapped[-1] = wrapped[-1][: chars - 3] + "..."
        for j, line in enumerate(wrapped):
            draw.text((x, y + thumb + 2 + j * line_h), line.encode("latin-1", "replace").decode("latin-1"),
                      fill=(0, 0, 0), font=font)
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(out, format="PNG")
    except OSError as err:
        raise ClipaError(f"--sheet: cannot write {out} ({err.strerror or err}); choose a writable path") from None
    return out


def summary_rows(summary: dict) -> list[tuple[str, str]]:
    """(label, value) rows for the command's table, one block per source."""

    def fmt(stats: dict | None, unit: str) -> str:
        if not stats:
            return "-"
        return (f"min {stats['min']}, mean {stats['mean']:.1f}, median {stats['median']:.0f}, "
                f"p95 {stats['p95']:.0f}, max {stats['max']} {unit}")

    rows = []
    for r in summary["sources"]:
        rows.append(("source", f"{r['name']} ({r['kind']}" + (f", {r['units']} {r['unit']}s)" if r["units"] is not None
                                                             else ", endless: first samples only)")))
        rows.append(("samples", f"{r['samples']:,}"))
        skipped = ", ".join(f"{k.replace('_', ' ')}: {n}" for k, n in r["skipped"].items()) or "none"
        rows.append(("skipped samples", f"{r['skipped_samples']:,} ({skipped})"))
        rows.append(("corrupt images", f"{r['corrupt']:,}"))
        if r["bad_shards"]:
            rows.append(("bad shards", ", ".join(f"{k.replace('_', ' ')}: {n}" for k, n in r["bad_shards"].items())))
        rows.append(("caption words", fmt(r["caption_words"], "words")))
        rows.append(("caption tokens", fmt(r["caption_tokens"], "BPE tokens") +
                     f"; {100 * r['tokens_over_75']:.1f}% cut at 77"))
        rows.append(("image shorter side", fmt(r["image_min_side"], "px")))
        rows.append(("formats", ", ".join(f"{k} {v}" for k, v in sorted(r["formats"].items())) or "-"))
    if summary["sheet"]:
        rows.append(("contact sheet", summary["sheet"]))
    return rows
