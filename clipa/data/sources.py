"""Reading training pairs from webdataset shards and CSV/TSV files, checking and decoding them.

A source is a list of *units* that can be dealt out to loader streams: the shards of a shard
pattern, the rows of a CSV. `source.read(unit, stats)` yields `Record`s: the key, where it came
from, the image (bytes, or a reference read on demand) and the caption. Samples that cannot be
used are skipped, counted in `SkipStats` by reason and logged with their shard and key; they
never stop a run.

Two kinds of checks, on purpose:
  cheap   done while reading (no pixel decoding): an image member exists and starts with a known
          image signature, the caption exists and is not empty, the shard or file opens.
  decode  done when the batch is built: the image decodes (truncated or garbled bodies fail here).
The stream a worker reads is a pure function of the cheap checks, so a resumed worker can
fast-forward through it without decoding a single image (see clipa/data/streams.py).

Reading local, uncompressed tars seeks over members instead of streaming them; in "light" mode
(fast-forward) it does not even read image bodies, only their first bytes and a reference to
the rest, which makes skipping a consumed stream cost little more than reading tar headers.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import logging
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image

from clipa.data.spec import SourceSpec, expand
from clipa.errors import ClipaError

log = logging.getLogger("clipa.data")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # img2dataset's formats, in the order we pick one
TAR_EXTS = (".tar", ".tar.gz", ".tgz")
SHARD_REASONS = ("missing_shard", "unreadable_shard", "truncated_shard")
# A shard's own files (webdataset's __index__ etc.) are never samples.
_META = re.compile(r"__[^/]*__($|/)")
_LOG_LIMIT = 100  # per process; the rest are counted (and logged at DEBUG) so a bad dataset cannot flood the log


@dataclass(frozen=True)
class ReadOptions:
    caption_key: str = "txt"  # shard member extension holding the caption, or "json:FIELD[.SUB]"
    csv_image_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_separator: str = ""  # "" = by extension: tab for .tsv, comma otherwise

    @classmethod
    def from_config(cls, data) -> "ReadOptions":
        return cls(data.caption_key, data.csv_image_key, data.csv_caption_key, data.csv_separator)

    @property
    def caption_member(self) -> str:
        return "json" if self.caption_key.startswith("json:") else self.caption_key.lower()


@dataclass
class Record:
    key: str
    where: str  # shard URL or CSV path, for messages
    image: bytes | tuple  # bytes, or (path, offset, size) read on demand; size -1 = the whole file
    caption: str


class SkipStats:
    """Skipped samples and shards by reason, for this process; `take()` returns what is new."""

    def __init__(self):
        self.counts: Counter = Counter()
        self._taken: Counter = Counter()
        self.quiet = False  # while fast-forwarding: those skips were reported before the checkpoint
        self.logged = 0

    def skip(self, reason: str, where: str, key: str | None, detail: str = "") -> None:
        self.counts[reason] += 1
        if self.quiet:
            return
        what = f"shard {where}" if key is None else f"{key} in {where}"
        message = f"skipped {what}: {reason.replace('_', ' ')}" + (f" ({detail})" if detail else "")
        self.logged += 1
        if self.logged <= _LOG_LIMIT:
            log.warning(message + (" [further skips are counted, and logged at DEBUG level]"
                                   if self.logged == _LOG_LIMIT else ""))
        else:
            log.debug(message)

    def take(self) -> dict[str, int]:
        new = self.counts - self._taken
        self._taken = Counter(self.counts)
        return dict(new)

    def samples(self) -> int:
        return sum(n for reason, n in self.counts.items() if reason not in SHARD_REASONS)


def looks_like_image(head: bytes) -> bool:
    """The first bytes carry a signature PIL can decode (JPEG, PNG, WebP, GIF, BMP)."""
    return (head[:3] == b"\xff\xd8\xff" or head[:8] == b"\x89PNG\r\n\x1a\n"
            or (head[:4] == b"RIFF" and head[8:12] == b"WEBP") or head[:6] in (b"GIF87a", b"GIF89a")
            or head[:2] == b"BM")


def _clean_caption(text) -> tuple[str | None, str | None]:
    """(caption, None) or (None, skip reason)."""
    if text is None:
        return None, "no_caption"
    if not isinstance(text, str):
        text = str(text)
    text = text.strip()
    return (text, None) if text else (None, "empty_caption")


def _local_path(url: str) -> str | None:
    scheme = urlparse(url).scheme
    if scheme == "":
        return url
    if scheme == "file":
        return re.sub(r"^file://?", "/", url) if url.startswith("file://") else url[5:]
    return None


def _base_plus_ext(name: str):
    # Imported here: webdataset is only needed once shards are read. Same key rule as webdataset
    # (and so open_clip): the key is everything before the first dot of the file name.
    from webdataset.tariterators import base_plus_ext

    return base_plus_ext(name)


# --------------------------------------------------------------------------- webdataset shards


class ShardSource:
    """Webdataset shards: a brace pattern, a folder of tars, `pipe:` commands or URLs."""

    kind = "shards"

    def __init__(self, spec: SourceSpec, options: ReadOptions):
        self.name, self.weight, self.options = spec.pattern, spec.weight, options
        urls: list[str] = []
        for url in expand(spec.pattern):
            path = _local_path(url)
            if path is not None and os.path.isdir(path):
                urls += sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(TAR_EXTS))
            else:
                urls.append(url)
        if not urls:
            raise ClipaError(f"data.train: {spec.pattern} holds no .tar shards; point it at shard files, e.g. "
                             f"\"{spec.pattern.rstrip('/')}/{{00000..00099}}.tar\"")
        self.urls = urls
        caption_member = options.caption_member
        self.needed = set(IMAGE_EXTS) | {caption_member}

    def __len__(self) -> int:
        return len(self.urls)

    def unit_name(self, unit: int) -> str:
        return self.urls[unit]

    def read(self, unit: int, stats: SkipStats, light: Callable[[], bool] = lambda: False) -> Iterator[Record]:
        url = self.urls[unit]
        key, group = None, {}
        for name, data, head in self._members(url, stats, light):
            prefix, ext = _base_plus_ext(name)
            if prefix is None:
                continue
            ext = ext.lower()
            # A new key, or a repeated extension under the same key, starts a new sample (as
            # open_clip's tolerant grouping does) instead of raising like webdataset's.
            if prefix != key or ext in group:
                if key is not None:
                    record = self._record(key, group, url, stats)
                    if record is not None:
                        yield record
                key, group = prefix, {}
            group[ext] = (data, head)
        if key is not None:
            record = self._record(key, group, url, stats)
            if record is not None:
                yield record

    def _record(self, key: str, group: dict, url: str, stats: SkipStats) -> Record | None:
        image = next((group[e] for e in IMAGE_EXTS if e in group and group[e][0] is not None), None)
        if image is None:
            stats.skip("no_image", url, key, f"no member .{'/.'.join(IMAGE_EXTS)}")
            return None
        data, head = image
        if not looks_like_image(head):
            stats.skip("not_image", url, key, f"starts with {head[:8]!r}")
            return None
        caption, reason = self._caption(group)
        if reason:
            stats.skip(reason, url, key, self.options.caption_key)
            return None
        return Record(key, url, data, caption)

    def _caption(self, group: dict) -> tuple[str | None, str | None]:
        member = group.get(self.options.caption_member)
        if member is None or member[0] is None:
            return None, "no_caption"
        raw = member[0]
        if not self.options.caption_key.startswith("json:"):
            return _clean_caption(raw.decode("utf-8", errors="replace"))
        try:
            value = json.loads(raw)
        except ValueError:
            return None, "no_caption"
        for part in self.options.caption_key[5:].split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return _clean_caption(value)

    def _members(self, url: str, stats: SkipStats, light: Callable[[], bool]):
        """(name, data or None, first bytes) for every regular member; data only for needed ones."""
        path = _local_path(url)
        try:
            if path is not None:
                stream = open(path, "rb")
            else:
                from webdataset.gopen import gopen

                stream = gopen(url, "rb")
        except FileNotFoundError as err:
            stats.skip("missing_shard", url, None, err.strerror or str(err))
            return
        except Exception as err:  # noqa: BLE001 - any failure to open (permissions, a bad pipe:) skips the shard
            stats.skip("unreadable_shard", url, None, str(err))
            return
        last = None
        try:
            if path is not None and stream.read(6)[:3] not in (b"\x1f\x8b\x08", b"BZh", b"\xfd7z"):
                members = self._seek_members(stream, path, light)
            else:
                if path is not None:
                    stream.seek(0)
                members = self._stream_members(stream)
            for item in members:
                last = item[0]
                yield item
        except Exception as err:  # noqa: BLE001 - tarfile, zlib, pipe exits: the shard ends here
            reason = "truncated_shard" if last is not None else "unreadable_shard"
            stats.skip(reason, url, None, f"after {last}: {err}" if last else str(err))
        finally:
            try:
                stream.close()
            except Exception as err:  # noqa: BLE001 - a pipe: command that exited non-zero
                stats.skip("unreadable_shard", url, None, str(err))

    @staticmethod
    def _ext(name: str) -> str | None:
        return (_base_plus_ext(name)[1] or "").lower()

    def _seek_members(self, stream, path: str, light: Callable[[], bool]):
        size = os.fstat(stream.fileno()).st_size
        stream.seek(0)
        tar = tarfile.open(fileobj=stream, mode="r:")
        while True:
            info = tar.next()
            if info is None:
                return
            tar.members = []  # tarfile keeps every header otherwise; shards can hold 10^5 members
            if not info.isreg() or _META.match(info.name):
                continue
            ext = self._ext(info.name)
            if ext not in self.needed:
                yield info.name, None, b""
                continue
            if info.offset_data + info.size > size:
                # The same rule in light and full mode, so both see the shard end at this member.
                raise tarfile.ReadError(f"unexpected end of data in {info.name}")
            stream.seek(info.offset_data)
            if light() and ext in IMAGE_EXTS:
                yield info.name, (path, info.offset_data, info.size), stream.read(min(16, info.size))
            else:
                data = stream.read(info.size)
                yield info.name, data, data[:16]

    def _stream_members(self, stream):
        tar = tarfile.open(fileobj=stream, mode="r|*")
        for info in tar:
            tar.members = []
            if not info.isreg() or _META.match(info.name):
                continue
            if self._ext(info.name) not in self.needed:
                yield info.name, None, b""
                continue
            data = tar.extractfile(info).read()
            if len(data) != info.size:
                raise tarfile.ReadError(f"unexpected end of data in {info.name}")
            yield info.name, data, data[:16]


# --------------------------------------------------------------------------- CSV / TSV


class CsvSource:
    """Rows of one or more CSV/TSV files: an image path column and a caption column."""

    kind = "csv"

    def __init__(self, spec: SourceSpec, options: ReadOptions):
        self.name, self.weight, self.options = spec.pattern, spec.weight, options
        self.images: list[str] = []
        self.captions: list[str | None] = []
        self.starts: list[int] = []
        self.files: list[str] = []
        for path in expand(spec.pattern):
            self._load(Path(path))
        if not self.images:
            raise ClipaError(f"data.train: {spec.pattern} has no rows; add rows under the header "
                             f"({options.csv_image_key}, {options.csv_caption_key})")

    def _load(self, path: Path) -> None:
        o = self.options
        if not path.is_file():
            raise ClipaError(f"data.train: CSV file {path} not found; check the path (relative paths are "
                             "resolved from the current directory)")
        separator = o.csv_separator or ("\t" if path.suffix.lower() == ".tsv" else ",")
        csv.field_size_limit(2**31 - 1)  # alt-text can be long; csv's default 128 KiB limit raises
        base = path.resolve().parent
        self.starts.append(len(self.images))
        self.files.append(str(path))
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
            reader = csv.reader(f, delimiter=separator)
            header = next(reader, None)
            if header is None:
                raise ClipaError(f"data.train: {path} is empty; it needs a header row with "
                                 f"{o.csv_image_key} and {o.csv_caption_key} columns")
            header = [h.strip() for h in header]
            columns = []
            for key, value in (("data.csv_image_key", o.csv_image_key), ("data.csv_caption_key", o.csv_caption_key)):
                if value not in header:
                    raise ClipaError(f"{key}: column \"{value}\" is not in {path} (columns: {', '.join(header)}); "
                                     f"set {key}=<column name>" + ("" if separator != "," or len(header) > 1 else
                                     "; for a tab-separated file name it .tsv or set data.csv_separator"))
                columns.append(header.index(value))
            image_col, caption_col = columns
            for row in reader:
                if not row:
                    continue
                image = row[image_col].strip() if image_col < len(row) else ""
                # Relative image paths are relative to the CSV's folder, so a dataset folder can move.
                self.images.append(str(base / image) if image and not os.path.isabs(image) else image)
                self.captions.append(row[caption_col] if caption_col < len(row) else None)

    def __len__(self) -> int:
        return len(self.images)

    def unit_name(self, unit: int) -> str:
        return self.images[unit]

    def where(self, unit: int) -> tuple[str, str]:
        i = bisect.bisect_right(self.starts, unit) - 1
        return self.files[i], f"row {unit - self.starts[i] + 1}"

    def read(self, unit: int, stats: SkipStats, light: Callable[[], bool] = lambda: False) -> Iterator[Record]:
        path = self.images[unit]
        if not path:
            stats.skip("no_image", *self.where(unit), f"empty {self.options.csv_image_key}")
            return
        try:
            with open(path, "rb") as f:
                head = f.read(16)
        except FileNotFoundError:
            stats.skip("missing_file", *self.where(unit), path)
            return
        except OSError as err:
            stats.skip("missing_file", *self.where(unit), f"{path}: {err.strerror}")
            return
        if not looks_like_image(head):
            stats.skip("not_image", *self.where(unit), path)
            return
        caption, reason = _clean_caption(self.captions[unit])
        if reason:
            stats.skip(reason, *self.where(unit), self.options.csv_caption_key)
            return
        csv_path, row = self.where(unit)
        yield Record(f"{row} ({path})", csv_path, (path, 0, -1), caption)


def build_sources(specs: list[SourceSpec], options: ReadOptions) -> list:
    return [CsvSource(s, options) if s.kind == "csv" else ShardSource(s, options) for s in specs]


# --------------------------------------------------------------------------- decoding


def image_bytes(record: Record) -> bytes:
    if isinstance(record.image, bytes):
        return record.image
    path, offset, size = record.image
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read() if size < 0 else f.read(size)
    if size >= 0 and len(data) != size:
        raise OSError(f"{path} is shorter than its tar header says")
    return data


def draft_factor(box_w: float, box_h: float, size: int) -> int:
    """The largest JPEG DCT reduction (8, 4, 2 or 1) that still leaves the crop >= `size` pixels."""
    factor = 8
    while factor > 1 and (box_w < size * factor or box_h < size * factor):
        factor //= 2
    return factor


def decode_crop(record: Record, crop, rng: np.random.Generator, fast: bool = True) -> torch.Tensor:
    """Decode, random-resized-crop and resize one image to uint8 [3, S, S].

    The crop box is drawn from the full-resolution size in the header, before any pixel is
    decoded, so the augmentation is the same with and without `fast`. With `fast`, a JPEG whose
    crop is at least 2x the target is decoded by libjpeg at 1/2, 1/4 or 1/8 scale (PIL `draft`),
    which skips most of the inverse DCT and the pixel traffic: the big win at 64-112 px.
    """
    with Image.open(io.BytesIO(image_bytes(record))) as image:
        width, height = image.size
        box = crop.box(width, height, rng)
        if fast and image.format == "JPEG":
            factor = draft_factor(box[2] - box[0], box[3] - box[1], crop.size)
            if factor > 1:
                image.draft("RGB", (width // factor, height // factor))
                sx, sy = width / image.size[0], height / image.size[1]
                box = (box[0] / sx, box[1] / sy, box[2] / sx, box[3] / sy)
        rgb = image.convert("RGB")
        out = rgb.resize((crop.size, crop.size), Image.BICUBIC, box=box)
    return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1)


def decode_full(record: Record, max_side: int = 0) -> Image.Image:
    """Decode the whole image (every byte: a truncated body raises); JPEGs at reduced scale if `max_side`."""
    with Image.open(io.BytesIO(image_bytes(record))) as image:
        if max_side and image.format == "JPEG":
            factor = draft_factor(image.size[0], image.size[1], max_side)
            if factor > 1:
                image.draft("RGB", (image.size[0] // factor, image.size[1] // factor))
        return image.convert("RGB")


def check_not_empty(source, options: ReadOptions | None = None) -> None:
    """Stop before training when a source has no usable sample at all, naming it.

    Reads the units in order until one sample decodes; on real data that is the first sample of
    the first shard (milliseconds). Only a broken source is read to its end.
    """
    stats = SkipStats()
    stats.quiet = True
    for unit in range(len(source)):
        for record in source.read(unit, stats):
            try:
                decode_full(record, max_side=8)
                return
            except Exception:  # noqa: BLE001 - any decode failure: try the next sample
                stats.skip("corrupt_image", record.where, record.key)
    what = "shards" if source.kind == "shards" else "rows"
    found = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in sorted(stats.counts.items())) or "nothing"
    raise ClipaError(f"data.train: {source.name} yields no usable sample ({len(source)} {what} read: {found}); "
                     "check the path or pattern, and that captions and images are where data.caption_key / "
                     "data.csv_image_key / data.csv_caption_key say")
