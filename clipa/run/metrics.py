"""The one reader of a run's metrics.jsonl (the trainer writes it: clipa.train.metrics.RunLog).

One rule for a line that is not a JSON object (a line cut by a kill, or damage): it is left out of
`rows` and its number is listed in `unreadable`. Readers that want the last values (`clipa runs`,
`clipa scaling`, the model card, the trackers' resume) use the rows; `clipa report`, which draws every
row, refuses a file with unreadable lines and names the first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from clipa.run.layout import METRICS_FILE


@dataclass
class Metrics:
    path: Path
    rows: list[dict] = field(default_factory=list)
    unreadable: list[int] = field(default_factory=list)  # 1-based numbers of lines that are not a JSON object


def metrics_path(run_dir: Path) -> Path:
    return Path(run_dir) / METRICS_FILE


def read_metrics(run_dir: Path) -> Metrics:
    """The rows of `run_dir`/metrics.jsonl (none when the file does not exist), blank lines ignored."""
    path = metrics_path(run_dir)
    metrics = Metrics(path)
    if not path.is_file():
        return metrics
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            metrics.rows.append(row)
        else:
            metrics.unreadable.append(number)
    return metrics
