"""Which programs reading `data.train` runs, said before they run.

A recipe is code in one respect, like a Makefile: `pipe:CMD` shards run CMD through the shell (users
rely on it for S3, GCS, ...). Nothing else in a recipe reaches a shell: `http(s)://` shards are
fetched by curl started with an argument list (webdataset's own `Pipe`, no shell), so quotes or `$(...)`
in a URL are characters of the URL; other URL schemes, which webdataset would hand to a shell
command it builds itself (gsutil, scp, ...), are refused with the `pipe:` line to write instead.
`commands()` lists what will run; `clipa validate`, `--dry-run` and a run's first log lines show it.

Every read from a command is bounded (`data.read_timeout_s`): a source that stalls (a server that
accepts and never answers, a hung `pipe:` command) ends its shard with a skip naming the wait after
that many seconds without a byte, and the command's process group is killed; a source whose every
shard stalls then ends the run with exit 2 like any unreadable source (clipa/data/streams.py).

This module imports neither torch nor PIL: recipe validation uses it.
"""

from __future__ import annotations

import functools
import os
import re
import select
import shlex
import signal
import subprocess

from clipa.errors import ClipaError, printable

LOCAL = ("", "file")
SHELL_FREE = ("http", "https")
READ_TIMEOUT_S = 120.0  # data.read_timeout_s's default: seconds a shard read may wait for its next byte


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")  # urllib's rule, without its netloc parsing (which raises)


def scheme(url: str) -> str:
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else ""


def curl_argv(url: str, timeout: float = READ_TIMEOUT_S) -> list[str]:
    """webdataset's curl options; the URL is taken literally (no curl globbing: clipa expanded the braces),
    redirects may not leave http(s) (no file:// through a redirect), and a transfer slower than a byte
    a second for `timeout` seconds ends (its retries too: clipa also stops reading after `timeout`)."""
    wait = f"{max(1, round(timeout))}"
    return ["curl", "--connect-timeout", "30", "--retry", "30", "--retry-delay", "2", "--retry-max-time", wait,
            "--speed-limit", "1", "--speed-time", wait, "-f", "-s", "-L", "--globoff",
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
    return list(_checked_urls(pattern, key))


@functools.lru_cache(maxsize=16)
def _checked_urls(pattern: str, key: str) -> tuple[str, ...]:
    # Cached: validating a recipe reads its pattern three times (the data check, the source list, the
    # announced commands), and DataComp's 140,000-shard pattern takes about a second to expand and check.
    check_scheme(pattern, key)
    urls = expand(pattern)
    for url in urls:
        check_scheme(url, key)
        if _family(url) != _family(pattern):
            raise ClipaError(f"{key}: \"{printable(pattern)}\" expands to \"{printable(url)}\", a {_family(url)} "
                             "source the pattern does not start with; write the scheme before the braces "
                             "(e.g. \"pipe:CMD /data/{0..9}.tar\"), one source per scheme joined with '::'")
    return tuple(urls)


def check_scheme(pattern: str, key: str = "data.train") -> None:
    kind = scheme(pattern)
    if kind in LOCAL or kind in SHELL_FREE or kind == "pipe":
        return
    raise ClipaError(f"{key}: \"{printable(pattern)}\": {kind}:// shards are not read directly (webdataset would run a shell "
                     f"command built from the URL); write the command yourself, e.g. \"pipe:gsutil cat {pattern}\" "
                     "for gs://, and it is shown before it runs")


class BoundedPipe:
    """A command's stdout as a binary stream whose every read waits at most `timeout` s for data.

    A non-zero exit is an OSError at the end of the data (as webdataset's Pipe); `close` ends the
    command's whole process group (a shell's children too) if it does not end by itself.
    """

    def __init__(self, argv, *, shell: bool, timeout: float, what: str):
        self.timeout, self.what = timeout, what
        self.proc = subprocess.Popen(argv, shell=shell, stdout=subprocess.PIPE, bufsize=0, start_new_session=True)
        self._fd = self.proc.stdout.fileno()
        self._buf, self._eof, self.closed = bytearray(), False, False

    def _fill(self) -> None:
        ready, _, _ = select.select([self._fd], [], [], self.timeout)
        if not ready:
            raise TimeoutError(f"no data for {self.timeout:g} s (data.read_timeout_s)")
        chunk = os.read(self._fd, 1 << 16)
        if chunk:
            self._buf += chunk
            return
        self._eof = True
        try:
            status = self.proc.wait(self.timeout)  # its output ended: it exits now, or it hangs
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{self.what}: closed its output but did not exit for {self.timeout:g} s") from None
        if status not in (0, 141, -signal.SIGPIPE):
            raise OSError(f"{self.what}: exit {status}")

    def read(self, n: int = -1) -> bytes:
        while (n < 0 or len(self._buf) < n) and not self._eof:
            self._fill()
        n = len(self._buf) if n < 0 else min(n, len(self._buf))
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.proc.stdout.close()  # a writer gets SIGPIPE
        try:
            status = self.proc.wait(min(5.0, self.timeout))
        except subprocess.TimeoutExpired:  # stalled (or ignoring SIGPIPE): its whole group goes
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
            return
        if not self._eof and status not in (0, 141, -signal.SIGPIPE):
            raise OSError(f"{self.what}: exit {status}")


def open_shard(url: str, timeout: float = READ_TIMEOUT_S):
    """A binary stream of a non-local shard: pipe: through the shell (as written, announced by commands()),
    http(s) by curl without one; every read bounded by `timeout` seconds."""
    kind = scheme(url)
    if kind in SHELL_FREE:
        return BoundedPipe(curl_argv(url, timeout), shell=False, timeout=timeout, what=f"curl {url}")
    check_scheme(url)
    return BoundedPipe(url[len("pipe:"):], shell=True, timeout=timeout, what=url)


def commands(patterns: list[str], key: str = "data.train", timeout: float = READ_TIMEOUT_S) -> list[str]:
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
            lines.append(f"{shlex.join(curl_argv(pattern, timeout))}   (no shell{each})")
    return [printable(line) for line in lines]


# --------------------------------------------------------------------------- secrets in what leaves the run

_SECRET_NAME = r"[A-Za-z0-9_]*(?:TOKEN|SECRET|PASSWORD|PASSWD|KEY|CREDENTIAL|CREDENTIALS|AUTH|SIGNATURE|SESSION)[A-Za-z0-9_]*"
_REDACTIONS = [
    (re.compile(r"(?<=://)[^\s/@'\"]+(?=@)"), "<redacted>"),  # user:password@ (or a token as the user)
    (re.compile(r"(?<=[A-Za-z][A-Za-z0-9+.-]://)([^\s?'\"]*)\?[^\s'\"]+"), r"\1?<redacted>"),  # presigned queries
    (re.compile(rf"\b({_SECRET_NAME})=([^\s'\"]+)", re.IGNORECASE), r"\1=<redacted>"),  # AWS_SECRET_ACCESS_KEY=...
    (re.compile(r"(--?(?:token|password|passwd|secret|api[-_]?key|auth)[= ]+)([^\s'\"]+)", re.IGNORECASE),
     r"\1<redacted>"),
    (re.compile(r"(authorization:\s*(?:bearer\s+|basic\s+|token\s+)?)([^\s'\"]+)", re.IGNORECASE), r"\1<redacted>"),
]


def redact(text: str) -> str:
    """`text` (a data.train value, a command, a path) with what looks like a credential replaced by
    <redacted>: a URL's query string (presigned signatures) and user:password@, NAME=value where NAME
    says token/secret/password/key, --token/--password values, Authorization headers. For everything a
    recipe sends outside its run directory (model cards, trackers); config.toml keeps the value."""
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text
