"""Progress on the console, for any long loop (training, writing shards): a rich bar on a terminal,
plain lines otherwise (logs, CI, pipes)."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=False)


def progress_bar(description: str, total: int, completed: int = 0, status: bool = False):
    """(a started rich bar, its task) on a terminal, else (None, None); `status` adds a text field."""
    if not sys.stdout.isatty():
        return None, None
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               *([TextColumn("{task.fields[status]}")] if status else []), TimeElapsedColumn(), TimeRemainingColumn()]
    bar = Progress(*columns, console=console)
    task = bar.add_task(description, total=total, completed=completed, **({"status": ""} if status else {}))
    bar.start()
    return bar, task


class progress_counter:
    """`with progress_counter("writing", total) as advance: ... advance(1)` — bar or plain lines."""

    def __init__(self, description: str, total: int, every: int = 0):
        self.description, self.total, self.done = description, total, 0
        self.every = every or max(1, total // 10)
        self.bar = None

    def __enter__(self):
        self.bar, self.task = progress_bar(self.description, self.total)
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
