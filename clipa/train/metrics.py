"""Run output: metrics.jsonl on disk, progress on the console (clipa/progress.py); the metrics window the
training loop fills between two log rows."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from clipa.progress import console, progress_bar
from clipa.run.lock import open_run_file


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLog:
    """Writes metrics for the main process; other processes get a silent instance."""

    def __init__(self, path: Path | None, total: int, description: str, *, start: int = 0, enabled: bool = True,
                 trackers=None, every: int = 1):
        self.enabled, self.every = enabled, every  # a training row every `every` steps and at the last
        self.trackers = trackers  # clipa.train.trackers.Trackers: each row also goes to TensorBoard, W&B, ...
        self.file = os.fdopen(open_run_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a", encoding="utf-8") \
            if (enabled and path) else None
        self.progress, self.task = progress_bar(description, total, start, status=True) if enabled else (None, None)
        self.description, self.total = description, total

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total

    def advance(self, n: int = 1) -> None:
        if self.progress:
            self.progress.advance(self.task, n)

    def write(self, metrics: dict, line: str | None = None) -> None:
        if not self.enabled:
            return
        if self.file:
            self.file.write(json.dumps({k: _clean(v) for k, v in metrics.items()}) + "\n")
            self.file.flush()
        if self.trackers:
            self.trackers.log(metrics)
        if line:
            if self.progress:
                self.progress.update(self.task, status=line)
            else:
                print(f"{self.description} {line}", flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.progress.console if self.progress else console).print(text, soft_wrap=True, highlight=False)

    def close(self) -> None:
        if self.progress:
            self.progress.stop()
        if self.file:
            self.file.close()
        if self.trackers:
            self.trackers.finish()


class MetricsWindow:
    """What the loop accumulates between two log rows; the loss stays on the device (no host sync per step)."""

    def __init__(self, device):
        self.loss_sum = torch.zeros((), device=device)
        self.last_loss = float("nan")
        self.reset(time.perf_counter())

    def reset(self, now: float) -> None:
        self.loss_sum.zero_()
        self.losses, self.steps, self.skipped, self.data_wait, self.started = 0, 0, 0, 0.0, now

    def step(self, loss, finite: bool) -> None:
        self.steps += 1
        if finite:
            self.loss_sum += loss.detach()
            self.losses += 1
        else:
            self.skipped += 1

    def row(self, accelerator, batch: int, tokens_per_sample: int, flops_per_sample: float, peak: float | None) -> dict:
        """Throughput and mean loss of the window (one host sync), then a fresh window.

        Each process's loss covers its own rows, so the mean over processes is the loss of the global batch.
        """
        now = time.perf_counter()
        elapsed = now - self.started  # the log write after this counts in the next window
        mean = accelerator.reduce(self.loss_sum / max(self.losses, 1), reduction="mean").item()
        self.last_loss = mean if self.losses else float("nan")
        samples_per_s = self.steps * batch / elapsed
        row = {"loss": self.last_loss, "samples_per_s": samples_per_s, "tokens_per_s": samples_per_s * tokens_per_sample,
               "tflops": samples_per_s * flops_per_sample / 1e12,
               "mfu": samples_per_s * flops_per_sample / (peak * accelerator.num_processes) if peak else None,
               "data_wait_frac": self.data_wait / elapsed, "skipped_steps": self.skipped}
        self.reset(now)
        return row
