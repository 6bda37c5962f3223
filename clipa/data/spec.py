"""The `data.train` string: which sources, of which kind, mixed with which weights.

    "synthetic"                                   the built-in endless stream
    "/data/laion/{00000..41407}.tar"              webdataset shards (brace expansion)
    "/data/laion"                                 a folder: every .tar / .tar.gz / .tgz in it
    "pipe:curl -sL https://host/x/{0..99}.tar"    shards read from a shell command's stdout
    "https://host/x/{0..99}.tar"                  shards over HTTP(S) (curl, started without a shell)
    "/data/cc3m/train.csv"                        a CSV/TSV of image paths and captions
    "/data/laion/{00000..41407}.tar@0.7::/data/cc3m/train.csv@0.3"   a weighted mixture

Sources are separated by `::`, as open_clip's `--train-data` separates them, so an open_clip
training string works unchanged. `@W` at the end of a source is its relative sampling weight
(default 1; weights need not sum to 1). `data.train` stays a plain TOML string: overrides on the
command line (`data.train=...`) and the resume check (a checkpoint's `data.train` must match) work
on it as on any other string key.

This module imports neither torch nor PIL: recipe validation uses it to check the syntax only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from clipa.errors import ClipaError

SEPARATOR = "::"
_WEIGHT = re.compile(r"^(?P<spec>.*?)@(?P<weight>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)$", re.S)
_EXAMPLE = '"/data/a/{00000..00099}.tar@0.7::/data/b/train.csv@0.3"'


@dataclass(frozen=True)
class SourceSpec:
    pattern: str  # as written, braces unexpanded
    weight: float
    kind: str  # synthetic | shards | csv


def source_kind(pattern: str) -> str:
    if pattern == "synthetic":
        return "synthetic"
    if pattern.lower().endswith((".csv", ".tsv")):
        return "csv"
    return "shards"


def parse_train(value: str, key: str = "data.train") -> list[SourceSpec]:
    """Split `data.train` into sources; errors name the key and show the syntax."""
    if not value.strip():
        raise ClipaError(f"{key}: empty; set \"synthetic\", a shard pattern, a .csv/.tsv path, or a mixture "
                         f"like {_EXAMPLE}")
    specs = []
    for part in value.split(SEPARATOR):
        part = part.strip()
        if not part:
            raise ClipaError(f"{key}: empty source in \"{value}\"; separate sources with '::', e.g. {_EXAMPLE}")
        weight = 1.0
        match = _WEIGHT.match(part)
        if match:
            part, weight = match.group("spec").strip(), float(match.group("weight"))
            if not part:
                raise ClipaError(f"{key}: weight without a source in \"{value}\"; write SOURCE@WEIGHT, e.g. {_EXAMPLE}")
            if weight <= 0:
                raise ClipaError(f"{key}: weight of \"{part}\" must be > 0, got {weight:g}; drop the source instead")
        if source_kind(part) == "shards":
            from clipa.data.urls import check_pattern

            check_pattern(part, key)  # every URL the braces expand to, not only the pattern
        specs.append(SourceSpec(part, weight, source_kind(part)))
    if len(specs) > 1 and any(s.kind == "synthetic" for s in specs):
        raise ClipaError(f"{key}: \"synthetic\" cannot be mixed with other sources; write its shards with "
                         "`clipa data synth OUT` and mix those instead")
    return specs


def expand(pattern: str) -> list[str]:
    """Brace-expand a pattern the way webdataset does (`{000..099}` keeps the zero padding)."""
    from clipa.data.urls import expand as expand_urls

    return expand_urls(pattern)


def data_commands(value: str, key: str = "data.train", timeout: float | None = None) -> list[str]:
    """The programs reading `data.train` will start (clipa/data/urls.py): shown before they run."""
    from clipa.data.urls import READ_TIMEOUT_S, commands

    return commands([s.pattern for s in parse_train(value, key) if s.kind == "shards"], key,
                    READ_TIMEOUT_S if timeout is None else timeout)
