"""One run per run directory, and clipa writes only into run directories.

Two runs on one directory would damage each other (the same `.tmp-step_N`, each pruning the other's
checkpoints, interleaved metrics.jsonl). Rank 0 therefore holds an OS lock (`flock`) on
`RUN/.clipa-lock` for the whole run; the file names the holder's PID and host, so a second run can
say who holds it. The kernel (or, on NFS, the lock lease) releases the lock when the holder dies,
so a lock file left by a dead process (a node failure, a SLURM requeue) is simply taken over: no
PID is ever probed, and a live holder elsewhere is never mistaken for a dead one.

The lock file also marks the directory as a clipa run directory: a non-empty `--out` without it
(or without the config.toml + metrics.jsonl/checkpoints of a run from before the lock) is refused,
so clipa never overwrites config.toml or replaces final/ in some other folder.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from clipa.errors import ClipaError

LOCK_FILE = ".clipa-lock"


def check_run_dir(run_dir: Path, key: str = "--out") -> None:
    """Refuse a path that exists and is not an empty directory or a clipa run directory."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise ClipaError(f"{key}: {run_dir} is a file, not a run directory; choose a new directory")
    entries = {p.name for p in run_dir.iterdir()}
    if not entries or LOCK_FILE in entries:
        return
    if "config.toml" in entries and entries & {"metrics.jsonl", "checkpoints"}:  # a run from before the lock file
        return
    raise ClipaError(f"{key}: {run_dir} is not empty and is not a clipa run directory (it has no {LOCK_FILE}); "
                     "clipa would write config.toml and final/ into it. Choose a new or empty directory")


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
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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
        return self

    @property
    def took_over(self) -> str | None:
        """Who held the lock before this run took it over (a process that is gone), else None."""
        return _describe(self.previous) if self.previous else None

    def release(self) -> None:
        if self.fd is not None:
            import fcntl

            os.ftruncate(self.fd, 0)  # a clean end leaves no holder behind; a crash leaves its record
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
