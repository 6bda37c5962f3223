"""The one CSV/TSV reader, for training (`data.train = "pairs.csv"`) and evaluation (`--dataset csv`)."""

from __future__ import annotations

import csv
import os
from pathlib import Path


class MissingColumn(Exception):
    """`column` is not in the file's header (`header` is None for an empty file); callers word the error."""

    def __init__(self, column: str, header: list[str] | None, separator: str):
        super().__init__(column)
        self.column, self.header, self.separator = column, header, separator


def read_csv(path: Path, image_key: str, caption_key: str, separator: str = "") -> list[tuple[str, str | None]]:
    """(image path, caption or None when the row is short) per non-blank row.

    The separator is a tab for .tsv and a comma otherwise unless given; a BOM is dropped and bytes that
    are not UTF-8 become U+FFFD; header names and image paths are stripped of spaces. Relative image
    paths are relative to the CSV's folder, so a dataset folder can move.
    """
    separator = separator or ("\t" if path.suffix.lower() == ".tsv" else ",")
    csv.field_size_limit(2**31 - 1)  # alt-text can be long; csv's default 128 KiB limit raises
    base = path.resolve().parent
    rows = []
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.reader(f, delimiter=separator)
        header = next(reader, None)
        header = None if header is None else [h.strip() for h in header]
        for column in (image_key, caption_key):
            if header is None or column not in header:
                raise MissingColumn(column, header, separator)
        image_col, caption_col = header.index(image_key), header.index(caption_key)
        for row in reader:
            if not row:
                continue
            image = row[image_col].strip() if image_col < len(row) else ""
            rows.append((str(base / image) if image and not os.path.isabs(image) else image,
                         row[caption_col] if caption_col < len(row) else None))
    return rows
