"""Run output: metrics.jsonl on disk, a rich progress bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=False)


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLog:
    """Writes metrics for the main process; other processes get a silent instance."""

    def __init__(self, path: Path | None, total: int, description: str, *, start: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.file = open(path, "a", encoding="utf-8") if (enabled and path) else None
        self.progress = None
        if enabled and sys.stdout.isatty():
            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                     console=console)
            self.task = self.progress.add_task(description, total=total, completed=start, status="")
            self.progress.start()
        self.description, self.total = description, total

    def advance(self, n: int = 1) -> None:
        if self.progress:
            self.progress.advance(self.task, n)

    def write(self, metrics: dict, line: str | None = None) -> None:
        if not self.enabled:
            return
        if self.file:
            self.file.write(json.dumps({k: _clean(v) for k, v in metrics.items()}) + "\n")
            self.file.flush()
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


class progress_counter:
    """`with progress_counter("writing", total) as advance: ... advance(1)` — bar or plain lines."""

    def __init__(self, description: str, total: int, every: int = 0):
        self.description, self.total, self.done = description, total, 0
        self.every = every or max(1, total // 10)
        self.bar = None

    def __enter__(self):
        if sys.stdout.isatty():
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn(), console=console)
            self.task = self.bar.add_task(self.description, total=self.total)
            self.bar.start()
        return self.advance

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.bar:
            self.bar.advance(self.task, n)
        elif self.done % self.every < n or self.done == self.total:
            print(f"{self.description} {self.done}/{self.total}", flush=True)

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()
