"""The processes of one run: they agree, and they leave their process group cleanly.

Agreeing: a failure on any process of a run is every process's failure. Without it, a check that fails
on one process (rank 0's run-directory lock, free space, a save error; a data path another node cannot
read) ends that process while the others wait in the next collective until the process-group timeout,
or forever. Work that can fail on some processes only runs inside `agreed()`: at its end every process
learns whether any of them failed, and all raise the same one-line ClipaError (exit 2). One process
alone (or no process group) raises directly. `broadcast_value` and `agreed_min` make one value every
process's.

Leaving: a gloo group that is still alive when the interpreter exits is torn down by C++ static
destructors, which can abort the process ("terminate called without an active exception", SIGABRT)
even though all work finished; torchrun then reports the whole job as failed. Every entry point leaves
the group explicitly instead (`leave_process_group`).
"""

from __future__ import annotations

import contextlib
import os

import torch

from clipa.errors import ClipaError, first_line


def processes_per_node(default: int) -> int:
    """This machine's processes of the run, as the launcher (torchrun, accelerate) says in LOCAL_WORLD_SIZE;
    `default` when no launcher set it."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or default)


def _group_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@contextlib.contextmanager
def agreed():
    """Run the block on every process, then fail on all of them if it failed on any."""
    failure, original = None, None
    try:
        yield
    except ClipaError as err:
        failure, original = str(err), err
    except Exception as err:  # noqa: BLE001 - a bug on one process must still end the others
        failure = f"unexpected {type(err).__name__}: {first_line(err, 200)}"
        original = err
    if _group_size() > 1:
        dist = torch.distributed
        failures: list = [None] * dist.get_world_size()
        try:
            dist.all_gather_object(failures, failure)
        except (dist.DistError, RuntimeError) as err:  # a peer died, or hung past the process-group timeout
            raise ClipaError(f"process {dist.get_rank()}: the other processes did not answer ({first_line(err, 160)}); "
                             "one of them died or hung (see its log). train.dist_timeout_s bounds the wait") from None
        rank, failure = next(((r, f) for r, f in enumerate(failures) if f), (None, None))
        if failure is not None and not isinstance(original, ClipaError) and original is not None \
                and rank == dist.get_rank():
            raise original  # this process's own bug: its traceback is the report
        if failure is not None:
            raise ClipaError(failure if rank == 0 else f"process {rank}: {failure}") from None
    elif original is not None:
        raise original


def broadcast_value(value, src: int = 0):
    """`value` as process `src` has it, on every process (any picklable value; our own processes only)."""
    if _group_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def agreed_min(value: int) -> int:
    """The smallest of every process's `value`."""
    if _group_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return int(t.item())


def peer_lost(err: BaseException) -> bool:
    """Whether `err` is a collective failing because another process of the group is gone: torch's
    distributed errors (DistError and its subclasses), or the RuntimeError that gloo raises when a
    peer's connection closes."""
    dist = torch.distributed
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("[gloo" in text.lower() or "connection closed by peer" in text.lower()
                                              or "connection reset by peer" in text.lower())


def fault_point(where: str, rank: int) -> None:
    """Tests inject trouble on one process: CLIPA_FAIL_AT=setup:1 raises a ClipaError at `setup` on rank 1;
    CLIPA_HANG_AT=setup:1 makes rank 1 stop answering there (a stuck process); CLIPA_KILL_AT=step3:1
    kills rank 1 with SIGKILL after its third step (the OOM killer, a node failure)."""
    if os.environ.get("CLIPA_FAIL_AT") == f"{where}:{rank}":
        raise ClipaError(f"injected failure at {where} on process {rank} (CLIPA_FAIL_AT)")
    if os.environ.get("CLIPA_KILL_AT") == f"{where}:{rank}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("CLIPA_HANG_AT") == f"{where}:{rank}":
        import signal
        import time

        # A stuck process still dies when its launcher ends the run: without this, clipa's SIGTERM
        # handler (save at the next step) would keep it asleep through torchrun's 30 s grace period.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(24 * 3600)


def leave_process_group(wait_for_others: bool = True) -> None:
    """Destroy the default process group if there is one. With `wait_for_others`, first wait at a
    barrier so no process tears down its connections while a peer is still talking to it; skip the
    barrier on an error path, where a peer may never arrive."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if wait_for_others:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()
