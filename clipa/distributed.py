"""Leaving a process group cleanly.

A gloo group that is still alive when the interpreter exits is torn down by C++ static destructors,
which can abort the process ("terminate called without an active exception", SIGABRT) even though all
work finished; torchrun then reports the whole job as failed. Every entry point leaves the group
explicitly instead.
"""

import torch


def leave_process_group(wait_for_others: bool = True) -> None:
    """Destroy the default process group if there is one. With `wait_for_others`, first wait at a
    barrier so no process tears down its connections while a peer is still talking to it; skip the
    barrier on an error path, where a peer may never arrive."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if wait_for_others:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()
