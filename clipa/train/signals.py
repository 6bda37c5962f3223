"""SIGTERM/SIGINT stop a run cleanly: finish the step, save, return; a second signal exits at once."""

from __future__ import annotations

import os
import signal
import threading

import torch


class StopSignals:
    """SIGTERM/SIGINT ask the loop to stop after the current step; a second one exits at once."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        if hasattr(signal, "SIGTERM") and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received:  # second signal: the user means it
            os._exit(128 + signum)
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def agreed_stop(signals: StopSignals, accelerator) -> str | None:
    """All processes stop at the same step if any of them was signalled."""
    if accelerator.num_processes == 1:
        return signals.received
    flag = torch.tensor(1.0 if signals.received else 0.0, device=accelerator.device)
    if accelerator.reduce(flag, reduction="sum").item() > 0:
        return signals.received or "SIGTERM"
    return None
