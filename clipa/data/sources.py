"""Reading training pairs from webdataset shards and CSV/TSV files, and checking them.

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
import bz2
import gzip
import json
import logging
import lzma
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from webdataset.tariterators import base_plus_ext

from clipa.data.csvfile import MissingColumn, read_csv
from clipa.data.decode import ImageRef, decode_image, looks_like_image, open_regular
from clipa.data.spec import SourceSpec, expand
from clipa.data.tar import Prefixed, TarError, TarStream, samples, tar_members
from clipa.errors import ClipaError

log = logging.getLogger("clipa.data")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # img2dataset's formats, in the order we pick one
TAR_EXTS = (".tar", ".tar.gz", ".tgz")
SHARD_REASONS = ("missing_shard", "unreadable_shard", "truncated_shard", "stalled_shard")
_LOG_LIMIT = 100  # per process; the rest are counted (and logged at DEBUG) so a bad dataset cannot flood the log


@dataclass(frozen=True)
class ReadOptions:
    caption_key: str = "txt"  # shard member extension holding the caption, or "json:FIELD[.SUB]"
    csv_image_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_separator: str = ""  # "" = by extension: tab for .tsv, comma otherwise
    read_timeout_s: float = 120.0  # a shard from a command (curl, pipe:) ends after this long without a byte

    @classmethod
    def from_config(cls, data) -> "ReadOptions":
        return cls(data.caption_key, data.csv_image_key, data.csv_caption_key, data.csv_separator,
                   data.read_timeout_s)

    @property
    def caption_member(self) -> str:
        return "json" if self.caption_key.startswith("json:") else self.caption_key.lower()


@dataclass
class Record:
    key: str
    where: str  # shard URL or CSV path, for messages
    image: ImageRef  # bytes, or (path, offset, size) read on demand (clipa.data.decode)
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
        message = f"data: skipped {what}: {reason.replace('_', ' ')}" + (f" ({detail})" if detail else "")
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


def _clean_caption(text) -> tuple[str | None, str | None]:
    """(caption, None) or (None, skip reason)."""
    if text is None:
        return None, "no_caption"
    if not isinstance(text, str):
        text = str(text)
    text = text.strip()
    return (text, None) if text else (None, "empty_caption")


def _local_path(url: str) -> str | None:
    from clipa.data.urls import scheme as url_scheme

    scheme = url_scheme(url)
    if scheme == "":
        return url
    if scheme == "file":
        return re.sub(r"^file://?", "/", url) if url.startswith("file://") else url[5:]
    return None


# --------------------------------------------------------------------------- webdataset shards


class ShardSource:
    """Webdataset shards: a brace pattern, a folder of tars, `pipe:` commands or URLs."""

    kind, unit = "shards", "shard"  # its SourceSpec kind; what one of its len() units is called
    interleaves = True  # data.interleave applies: several shards are read at once and their samples mixed

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
        self.needed = set(IMAGE_EXTS) | {options.caption_member}  # members whose bytes are read

    def __len__(self) -> int:
        return len(self.urls)

    def read(self, unit: int, stats: SkipStats, light: Callable[[], bool] = lambda: False) -> Iterator[Record]:
        url = self.urls[unit]
        members = ((name, (data, head)) for name, data, head in self._members(url, stats, light))
        for key, group in samples(members):
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
                raw = open_regular(path)  # a FIFO or device named as a shard is skipped, not waited on
            else:
                from clipa.data.urls import open_shard

                raw = open_shard(url, self.options.read_timeout_s)
        except FileNotFoundError as err:
            stats.skip("missing_shard", url, None, err.strerror or str(err))
            return
        except Exception as err:  # noqa: BLE001 - any failure to open (permissions, a bad pipe:) skips the shard
            stats.skip("unreadable_shard", url, None, str(err))
            return
        last, failed, abandoned = None, False, False
        try:
            head = raw.read(6)
            decompress = {b"\x1f\x8b": gzip.GzipFile, b"BZ": bz2.BZ2File, b"\xfd7": lzma.LZMAFile}.get(head[:2])
            if path is not None and decompress is None:
                tar = TarStream(raw, os.fstat(raw.fileno()).st_size)  # seekable: light mode can skip image bodies
            else:
                body = Prefixed(head, raw)
                tar = TarStream(decompress(fileobj=body) if decompress else body)
            for item in self._tar_items(tar, path, light):
                last = item[0]
                yield item
        except GeneratorExit:  # the reader stopped early (start-up check, end of run): not the shard's fault
            abandoned = True
            raise
        except Exception as err:  # noqa: BLE001 - bad headers, short reads, zlib, pipe exits: the shard ends here
            failed = True
            reason = "stalled_shard" if isinstance(err, TimeoutError) else "truncated_shard" if last is not None \
                else "unreadable_shard"
            stats.skip(reason, url, None, f"after {last}: {err}" if last else str(err))
        finally:
            try:
                raw.close()
            except Exception as err:  # noqa: BLE001 - a pipe: command that exited non-zero
                # A failing pipe raises on read and again on close (webdataset's Pipe re-checks the
                # exit status): one shard, one count. A pipe closed early dies of SIGPIPE: no fault.
                if not failed and not abandoned:
                    stats.skip("unreadable_shard", url, None, str(err))

    @staticmethod
    def _ext(name: str) -> str | None:
        return (base_plus_ext(name)[1] or "").lower()

    def _tar_items(self, tar: TarStream, path: str | None, light: Callable[[], bool]):
        for name, offset, size in tar_members(tar):
            ext = self._ext(name)
            if ext not in self.needed:
                yield name, None, b""
                continue
            if tar.size is not None and offset + size > tar.size:
                # Checked before reading, so light and full mode see the shard end at the same member.
                raise TarError(f"unexpected end of data in {name}")
            tar.skip_to(offset)
            if tar.size is not None and ext in IMAGE_EXTS and light():
                yield name, (path, offset, size), tar.read(min(16, size))
            else:
                data = tar.read(size)
                if len(data) != size:
                    raise TarError(f"unexpected end of data in {name}")
                yield name, data, data[:16]


# --------------------------------------------------------------------------- CSV / TSV


class CsvSource:
    """Rows of one or more CSV/TSV files: an image path column and a caption column."""

    kind, unit = "csv", "row"
    interleaves = False  # its rows are permuted already

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
        try:
            rows = read_csv(path, o.csv_image_key, o.csv_caption_key, o.csv_separator)
        except MissingColumn as err:
            if err.header is None:
                raise ClipaError(f"data.train: {path} is empty; it needs a header row with "
                                 f"{o.csv_image_key} and {o.csv_caption_key} columns") from None
            key = "data.csv_image_key" if err.column == o.csv_image_key else "data.csv_caption_key"
            raise ClipaError(f"{key}: column \"{err.column}\" is not in {path} (columns: {', '.join(err.header)}); "
                             f"set {key}=<column name>" + ("" if err.separator != "," or len(err.header) > 1 else
                             "; for a tab-separated file name it .tsv or set data.csv_separator")) from None
        self.starts.append(len(self.images))
        self.files.append(str(path))
        self.images += [image for image, _ in rows]
        self.captions += [caption for _, caption in rows]

    def __len__(self) -> int:
        return len(self.images)

    def where(self, unit: int) -> tuple[str, str]:
        i = bisect.bisect_right(self.starts, unit) - 1
        return self.files[i], f"row {unit - self.starts[i] + 1}"

    def read(self, unit: int, stats: SkipStats, light: Callable[[], bool] = lambda: False) -> Iterator[Record]:
        path = self.images[unit]
        if not path:
            stats.skip("no_image", *self.where(unit), f"empty {self.options.csv_image_key}")
            return
        try:
            with open_regular(path) as f:  # a FIFO or device named by a row is skipped, not waited on
                head = f.read(16)
        except FileNotFoundError:
            stats.skip("missing_file", *self.where(unit), path)
            return
        except OSError as err:
            stats.skip("missing_file", *self.where(unit), f"{path}: {err.strerror or err}")
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


# Each SourceSpec kind (clipa/data/spec.py's source_kind) and the source that reads it ("synthetic" is the
# endless built-in stream, clipa/data/synthetic.py). A new format: recognise it in spec.py, add it here.
SOURCES = {ShardSource.kind: ShardSource, CsvSource.kind: CsvSource}


def build_sources(specs: list[SourceSpec], options: ReadOptions) -> list:
    return [SOURCES[s.kind](s, options) for s in specs]


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
                decode_image(record.image, max_side=8)
                return
            except Exception:  # noqa: BLE001 - any decode failure: try the next sample
                stats.skip("corrupt_image", record.where, record.key)
    what = source.unit + ("" if len(source) == 1 else "s")
    found = "; ".join(f"{reason.replace('_', ' ')}: {n}" for reason, n in sorted(stats.counts.items()))
    if stats.counts.get("stalled_shard"):
        raise ClipaError(f"data.train: {source.name} yields no usable sample ({len(source)} {what} read; {found}): "
                         f"no data for {source.options.read_timeout_s:g} s (data.read_timeout_s); check the server or "
                         "command, or raise data.read_timeout_s")
    raise ClipaError(f"data.train: {source.name} yields no usable sample ({len(source)} {what} read; {found}); "
                     "check the path or pattern, and that captions and images are where data.caption_key / "
                     "data.csv_image_key / data.csv_caption_key say")
