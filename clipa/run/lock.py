"""One run per run directory, and clipa writes only into run directories.

Two runs on one directory would damage each other (the same `.tmp-step_N`, each pruning the other's
checkpoints, interleaved metrics.jsonl). Rank 0 therefore holds an OS lock (`flock`) on
`RUN/.clipa-lock` for the whole run; the file names the holder's PID and host, so a second run can
say who holds it. The kernel (or, on NFS, the lock lease) releases the lock when the holder dies,
so a lock file left by a dead process (a node failure, a SLURM requeue) is simply taken over: no
PID is ever probed, and a live holder elsewhere is never mistaken for a dead one.

A run directory is marked when clipa creates it (or finds it empty): `RUN/.clipa-run`. A non-empty
`--out` without that marker (or the `.clipa-lock` of a run from before the marker) is refused, so
clipa never overwrites config.toml or replaces final/ in some other folder, even one that looks like
a run (a config.toml and a checkpoints/).

Nothing in a run directory is reached through a symbolic link: a link among its entries (or among
checkpoints/) is refused by name before anything is written, and the files clipa writes there are
opened with O_NOFOLLOW and must be regular files. Otherwise a `.clipa-lock` or `config.toml` link
would have its target truncated, and pruning would delete inside a linked `checkpoints/`.

The lock dies with the process that took it: a process forked after it (a DataLoader worker)
closes its inherited copy of the descriptor at once, so a worker that outlives a killed rank 0
does not keep the run locked.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

from clipa.errors import ClipaError

LOCK_FILE = ".clipa-lock"
MARKER = ".clipa-run"  # written when clipa creates (or finds empty) a run directory


def _links(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_symlink())


def check_run_dir(run_dir: Path, key: str = "--out") -> None:
    """Refuse a path that exists and is not an empty directory or a clipa run directory, and a run
    directory with a symbolic link among its entries or its checkpoints."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise ClipaError(f"{key}: {run_dir} is a file, not a run directory; choose a new directory")
    entries = {p.name for p in run_dir.iterdir()}
    if entries and not entries & {MARKER, LOCK_FILE}:
        raise ClipaError(f"{key}: {run_dir} is not empty and is not a clipa run directory (it has no {MARKER}); "
                         "clipa would write config.toml and final/ into it. Choose a new or empty directory")
    checkpoints = run_dir / "checkpoints"
    links = _links(run_dir) + (_links(checkpoints) if checkpoints.is_dir() and not checkpoints.is_symlink() else [])
    if links:
        raise ClipaError(f"{key}: {links[0]} is a symbolic link; clipa writes and deletes in a run directory "
                         "through no link. Remove it (or choose another --out)")


def open_run_file(path: Path, flags: int, mode: int = 0o644) -> int:
    """os.open for a file in a run directory: never through a symbolic link, and only a regular file."""
    import stat

    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ClipaError(f"--out: {path} is a symbolic link; clipa writes in a run directory through no link. "
                             "Remove it") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ClipaError(f"--out: {path} is not a regular file; remove it")
    return fd


def write_run_file(path: Path, text: str) -> None:
    """Replace a run directory's file's content (config.toml), through no symbolic link."""
    with os.fdopen(open_run_file(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "w", encoding="utf-8") as f:
        f.write(text)


def mark_run_dir(run_dir: Path) -> None:
    """Make `run_dir` (checked by check_run_dir) a marked clipa run directory; also proves it is writable."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = open_run_file(run_dir / MARKER, os.O_WRONLY | os.O_CREAT)
    try:
        if os.fstat(fd).st_size == 0:
            os.write(fd, b"a clipa run directory: clipa writes here and refuses folders without this file\n")
            os.fsync(fd)
    finally:
        os.close(fd)


def prepare_run_dir(run_dir: Path) -> None:
    """Mark the (checked) run directory as clipa's and prove it writable, through no symbolic link."""
    try:
        mark_run_dir(run_dir)
        probe = run_dir / ".write-test"
        probe.unlink(missing_ok=True)  # a stale probe (or a link: unlink removes the link, not its target)
        os.close(open_run_file(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        probe.unlink()
    except OSError as err:
        raise ClipaError(f"--out: cannot write to {run_dir} ({err.strerror}); choose a writable directory") from None


# Descriptors of locks this process holds: a forked child (a DataLoader worker) closes its copies, so
# an flock lock, which lives as long as any descriptor of it, dies with the process that took it.
_HELD: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _HELD:
        try:
            os.close(fd)  # never flock(LOCK_UN) here: that would release the parent's lock
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


def _describe(holder: dict) -> str:
    return f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')} since {holder.get('since', '?')}"


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        holder = json.loads(raw.decode("utf-8"))
        return holder if isinstance(holder, dict) else {}
    except ValueError:
        return {}


class RunLock:
    """`with RunLock(run_dir):` or acquire()/release(). Held by one process (rank 0) of a run."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None
        self.previous: dict = {}  # the holder recorded in a stale lock file that was taken over

    def acquire(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = open_run_file(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise ClipaError(f"--out: {self.path.parent} is in use by another clipa run ({_describe(holder)}); wait "
                             "for it to finish or stop it, or choose another --out") from None
        except OSError as err:  # a filesystem without locks: refusing is safer than running unguarded
            os.close(fd)
            raise ClipaError(f"--out: cannot lock {self.path} ({err.strerror}); put the run directory on a "
                             "filesystem that supports file locks") from None
        self.previous = _read(fd)  # a dead holder's record, if any: its lock died with it
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(me) + "\n").encode("utf-8"))
        os.fsync(fd)
        self.fd = fd
        _HELD.add(fd)
        return self

    @property
    def took_over(self) -> str | None:
        """Who held the lock before this run took it over (a process that is gone), else None."""
        return _describe(self.previous) if self.previous else None

    def release(self) -> None:
        if self.fd is not None:
            import fcntl

            _HELD.discard(self.fd)
            os.ftruncate(self.fd, 0)  # a clean end leaves no holder behind; a crash leaves its record
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
