"""`clipa report RUN_DIR`: PNG plots and a text summary of a run, from its metrics.jsonl.

One small line chart per series (loss, learning rate, logit scale, throughput and every evaluation
metric) against samples seen, drawn by clipa/analysis/plot.py (PIL, no matplotlib).
"""

from __future__ import annotations

import math
from pathlib import Path

from clipa.analysis.plot import line_chart
from clipa.errors import ClipaError
from clipa.run.metrics import read_metrics as read_metrics_file

TRAIN_SERIES = ("loss", "lr", "logit_scale", "samples_per_s")


def read_metrics(run_dir: Path) -> list[dict]:
    """Every row of the run's metrics.jsonl; a report draws them all, so a line that does not read is an error."""
    metrics = read_metrics_file(run_dir)
    if not metrics.path.is_file():
        raise ClipaError(f"RUN_DIR: {metrics.path} not found; give a clipa run directory")
    if metrics.unreadable:
        raise ClipaError(f"{metrics.path}: line {metrics.unreadable[0]} is not JSON (a partially written line?)")
    if not metrics.rows:
        raise ClipaError(f"{metrics.path}: no metrics yet")
    return metrics.rows


def series(rows: list[dict], key: str) -> list[tuple[float, float]]:
    """(samples, value) points of one metric; a resumed run's re-logged steps keep their last value."""
    by_step = {}
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            by_step[(row.get("stage"), row["step"])] = (float(row.get("samples", row["step"])), float(value))
    return sorted(by_step.values())


def report(run_dir: str | Path, out_dir: str | Path | None = None) -> tuple[str, list[Path]]:
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    out = Path(out_dir) if out_dir else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    eval_keys = sorted({k for row in rows for k in row if k.startswith("zeroshot/")})
    written = []
    for key in (*TRAIN_SERIES, *eval_keys):
        points = series(rows, key)
        if points:
            path = out / f"{key.replace('/', '_')}.png"
            line_chart(points, f"{run_dir.name}: {key}", path)
            written.append(path)
    train_rows = [r for r in rows if "loss" in r]
    last = train_rows[-1] if train_rows else rows[-1]
    lines = [f"run {run_dir}", f"steps {last['step']}, samples {last.get('samples', '?'):,}"
             if isinstance(last.get("samples"), int) else f"steps {last['step']}"]
    if train_rows:
        first_loss = next((r["loss"] for r in train_rows if r.get("loss") is not None), None)
        if first_loss is not None and last.get("loss") is not None:
            lines.append(f"loss {first_loss:.4f} -> {last['loss']:.4f}")
        speeds = [r["samples_per_s"] for r in train_rows if r.get("samples_per_s")]
        if speeds:
            lines.append(f"throughput median {sorted(speeds)[len(speeds) // 2]:.1f} samples/s")
        skipped = sum(r.get("skipped_steps", 0) or 0 for r in train_rows)
        lines.append(f"skipped steps (non-finite) {skipped}")
    for key in eval_keys:
        points = series(rows, key)
        best = max(points, key=lambda p: p[1])
        lines.append(f"{key}: last {points[-1][1]:.4f}, best {best[1]:.4f} at {best[0]:,.0f} samples")
    summary = "\n".join(lines)
    (out / "summary.txt").write_text(summary + "\n", encoding="utf-8")
    return summary, written
