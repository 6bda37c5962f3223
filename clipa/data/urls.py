"""Which programs reading `data.train` runs, said before they run.

A recipe is code in one respect, like a Makefile: `pipe:CMD` shards run CMD through the shell (users
rely on it for S3, GCS, ...). Nothing else in a recipe reaches a shell: `http(s)://` shards are
fetched by curl started with an argument list (webdataset's own `Pipe`, no shell), so quotes or `$(...)`
in a URL are characters of the URL; other URL schemes, which webdataset would hand to a shell
command it builds itself (gsutil, scp, ...), are refused with the `pipe:` line to write instead.
`commands()` lists what will run; `clipa validate`, `--dry-run` and a run's first log lines show it.

This module imports neither torch nor PIL: recipe validation uses it.
"""

from __future__ import annotations

import shlex
from urllib.parse import urlparse

from clipa.errors import ClipaError

LOCAL = ("", "file")
SHELL_FREE = ("http", "https")


def scheme(url: str) -> str:
    return urlparse(url).scheme.lower()


def curl_argv(url: str) -> list[str]:
    """webdataset's curl options; the URL is taken literally (no curl globbing: clipa expanded the braces),
    and redirects may not leave http(s) (no file:// through a redirect)."""
    return ["curl", "--connect-timeout", "30", "--retry", "30", "--retry-delay", "2", "-f", "-s", "-L", "--globoff",
            "--proto", "=http,https", "--proto-redir", "=http,https", url]


def check_scheme(pattern: str, key: str = "data.train") -> None:
    kind = scheme(pattern)
    if kind in LOCAL or kind in SHELL_FREE or kind == "pipe":
        return
    raise ClipaError(f"{key}: \"{pattern}\": {kind}:// shards are not read directly (webdataset would run a shell "
                     f"command built from the URL); write the command yourself, e.g. \"pipe:gsutil cat {pattern}\" "
                     "for gs://, and it is shown before it runs")


def open_shard(url: str):
    """A binary stream of a non-local shard: pipe: through the shell (as written), http(s) without one."""
    from webdataset.gopen import Pipe, gopen

    kind = scheme(url)
    if kind in SHELL_FREE:
        return Pipe(curl_argv(url), mode="rb", bufsize=8192, shell=False)
    check_scheme(url)
    return gopen(url, "rb")  # pipe:CMD, webdataset's shell=True handler: announced by commands()


def commands(patterns: list[str]) -> list[str]:
    """What reading these shard patterns will run, one line each (braces stand for each shard)."""
    lines = []
    for pattern in patterns:
        kind = scheme(pattern)
        each = ", once per shard the braces expand to" if "{" in pattern else ""
        if kind == "pipe":
            lines.append(f"sh -c {shlex.quote(pattern[len('pipe:'):])}   (shell command from the recipe{each})")
        elif kind in SHELL_FREE:
            lines.append(f"{shlex.join(curl_argv(pattern))}   (no shell{each})")
    return lines
