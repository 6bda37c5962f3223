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

import re
import shlex

from clipa.errors import ClipaError, printable

LOCAL = ("", "file")
SHELL_FREE = ("http", "https")


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")  # urllib's rule, without its netloc parsing (which raises)


def scheme(url: str) -> str:
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else ""


def curl_argv(url: str) -> list[str]:
    """webdataset's curl options; the URL is taken literally (no curl globbing: clipa expanded the braces),
    and redirects may not leave http(s) (no file:// through a redirect)."""
    return ["curl", "--connect-timeout", "30", "--retry", "30", "--retry-delay", "2", "-f", "-s", "-L", "--globoff",
            "--proto", "=http,https", "--proto-redir", "=http,https", url]


def _family(url: str) -> str:
    """local | http | pipe | the unknown scheme: what kind of reader a URL gets."""
    kind = scheme(url)
    return "local" if kind in LOCAL else "http" if kind in SHELL_FREE else kind


def expand(pattern: str) -> list[str]:
    """Brace-expand a pattern the way webdataset does (`{000..099}` keeps the zero padding)."""
    import braceexpand  # a webdataset dependency; pure Python

    return list(braceexpand.braceexpand(pattern))


def check_pattern(pattern: str, key: str = "data.train") -> list[str]:
    """The URLs a shard pattern expands to, each checked. The scheme must be written before the braces:
    the announcement (`commands`) and the check read the pattern as written, so a `pipe:` hidden in
    braces (`{pipe:CMD,x.tar}`) would otherwise run unannounced."""
    check_scheme(pattern, key)
    urls = expand(pattern)
    for url in urls:
        check_scheme(url, key)
        if _family(url) != _family(pattern):
            raise ClipaError(f"{key}: \"{printable(pattern)}\" expands to \"{printable(url)}\", a {_family(url)} "
                             "source the pattern does not start with; write the scheme before the braces "
                             "(e.g. \"pipe:CMD /data/{0..9}.tar\"), one source per scheme joined with '::'")
    return urls


def check_scheme(pattern: str, key: str = "data.train") -> None:
    kind = scheme(pattern)
    if kind in LOCAL or kind in SHELL_FREE or kind == "pipe":
        return
    raise ClipaError(f"{key}: \"{printable(pattern)}\": {kind}:// shards are not read directly (webdataset would run a shell "
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


def commands(patterns: list[str], key: str = "data.train") -> list[str]:
    """What reading these shard patterns will run, one line each (braces stand for each shard), with
    control characters shown escaped (an ESC sequence could otherwise erase the line on a terminal)."""
    lines = []
    for pattern in patterns:
        count = len(set(check_pattern(pattern, key)))  # the scheme of every URL is the pattern's
        each = f", once per shard the braces expand to: {count} commands" if count > 1 else ""
        family = _family(pattern)
        if family == "pipe":
            lines.append(f"sh -c {shlex.quote(pattern[len('pipe:'):])}   (shell command from the recipe{each})")
        elif family == "http":
            lines.append(f"{shlex.join(curl_argv(pattern))}   (no shell{each})")
    return [printable(line) for line in lines]
