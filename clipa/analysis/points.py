"""The points of a scaling fit: (training compute, zero-shot error) per run directory or JSON result.

Points come from clipa run directories (compute = analytic training FLOPs of the samples actually
run, following `init.checkpoint` back through earlier stages; error = 1 - acc1 of a
`zeroshot_*.json` in the run directory, or of the last evaluation row in metrics.jsonl) or from JSON
files: a list of {"compute": C, "error": E} (or "acc1" instead of "error"), or CLIP_benchmark results
(`{"metrics": {"acc1": ...}, ...}`) with an added "compute", alone or in a list.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from clipa.errors import ClipaError
from clipa.run.layout import is_run_dir, read_run_recipe
from clipa.run.lineage import earlier_runs
from clipa.run.metrics import read_metrics


@dataclass
class Point:
    compute: float  # training FLOPs
    error: float  # 1 - metric, in (0, 1)
    label: str
    notes: list[str] = field(default_factory=list)


def _check_point(compute, error, where: str) -> tuple[float, float]:
    if isinstance(compute, bool) or not isinstance(compute, (int, float)) or not math.isfinite(compute) or compute <= 0:
        raise ClipaError(f"{where}: \"compute\" must be a positive number of FLOPs, got {compute!r}")
    if isinstance(error, bool) or not isinstance(error, (int, float)) or not 0 < error < 1:
        raise ClipaError(f"{where}: error must be in (0, 1) (1 - accuracy as a fraction), got {error!r}")
    return float(compute), float(error)


def _metric_of(result: dict, metric: str):
    metrics = result.get("metrics")
    if isinstance(metrics, dict) and metric in metrics:
        return metrics[metric]
    if metric in result:
        return result[metric]
    return None


def _error_of(item: dict, metric: str, where: str):
    if "error" in item:
        return item["error"]
    value = _metric_of(item, metric)
    if value is None:
        raise ClipaError(f"{where}: no \"error\" and no \"{metric}\" (top level or under \"metrics\"); "
                         f"give one, or pick another --metric")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 1:
        raise ClipaError(f"{where}: {metric} = {value} looks like a percentage; write fractions in [0, 1]")
    return 1.0 - value if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def points_from_json(path: Path, metric: str = "acc1") -> list[Point]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ClipaError(f"{path}: not valid JSON ({err})") from None
    if isinstance(data, dict) and isinstance(data.get("points"), list):
        data = data["points"]
    items = data if isinstance(data, list) else [data]
    points = []
    for i, item in enumerate(items):
        where = f"{path}[{i}]" if isinstance(data, list) else str(path)
        if not isinstance(item, dict):
            raise ClipaError(f"{where}: expected an object with \"compute\" and \"error\", got {item!r}")
        if "compute" not in item:
            raise ClipaError(f"{where}: no \"compute\" (training FLOPs); add it to each result")
        compute, error = _check_point(item["compute"], _error_of(item, metric, where), where)
        label = str(item.get("label") or item.get("name") or item.get("pretrained") or where)
        points.append(Point(compute, error, label))
    return points


def _logged_samples(run: Path) -> int:
    logged = [row["samples"] for row in read_metrics(run).rows if isinstance(row.get("samples"), (int, float))]
    if not logged:
        raise ClipaError(f"{run}/metrics.jsonl: no training rows with \"samples\"; is {run} a clipa run "
                         "directory that has trained at least one log step?")
    return max(logged)


def run_compute(run: Path, step: int | None = None) -> tuple[float, list[str]]:
    """Training FLOPs of a run directory's stage (up to `step`, else the samples it logged), plus
    those of the runs its `init.checkpoint` came from (clipa.run.lineage's walk). Returns (FLOPs, notes)."""
    from clipa.stage import Stage

    recipe = read_run_recipe(run)
    stages, loop, missing = [(run, step, recipe)], [], []  # newest first; why the walk stopped, if it says
    for earlier in earlier_runs(recipe, run, limit=None):  # every stage's compute counts: no cut
        if earlier.run_dir is None:
            missing = [f"{stages[-1][0].name}: init.checkpoint {earlier.init} is not a run directory here; its compute "
                       "is not counted"]
        elif earlier.looped:
            loop = [f"{earlier.run_dir}: init.checkpoint loops back; counted once"]
        else:
            stages.append((earlier.run_dir, earlier.step, earlier.recipe))
    flops, notes = 0.0, []
    for where, at_step, stage_recipe in stages:
        per_sample = Stage.of(stage_recipe).flops_per_sample
        samples = at_step * stage_recipe.train.global_batch_size if at_step is not None else _logged_samples(where)
        flops += per_sample * samples
        notes.insert(0, f"{where.name}: {samples:,} samples x {per_sample:.3g} FLOPs")
    # oldest first: a loop before the first stage, a run not found right after the stage that names it
    return flops, loop + notes[:1] + missing + notes[1:]


def _eval_row_metric(rows: list[dict], metric: str, dataset: str | None):
    """The metric from the last metrics.jsonl row that carries it ("acc1", ".../acc1", "..._acc1")."""
    for row in reversed(rows):
        for k, v in row.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            if k == metric or k.endswith(("/" + metric, "_" + metric, "." + metric)):
                if dataset is None or dataset in k or row.get("dataset") == dataset:
                    return v
    return None


def _zeroshot_result(run: Path, metric: str, dataset: str | None):
    files = sorted(run.glob("zeroshot_*.json"))
    results = []
    for f in files:
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ClipaError(f"{f}: not valid JSON ({err})") from None
        for item in data if isinstance(data, list) else [data]:
            if isinstance(item, dict) and _metric_of(item, metric) is not None:
                results.append((f, item))
    if dataset is not None:
        results = [(f, r) for f, r in results if r.get("dataset") == dataset or f.stem == f"zeroshot_{dataset}"]
    if len(results) > 1:
        names = ", ".join(sorted({str(r.get("dataset", f.name)) for f, r in results}))
        raise ClipaError(f"{run}: several zero-shot results ({names}); choose one with --dataset")
    return (results[0][1], results[0][0]) if results else (None, None)


def points_from_run(run: Path, metric: str = "acc1", dataset: str | None = None) -> Point:
    result, source = _zeroshot_result(run, metric, dataset)
    if result is not None:
        value, where = _metric_of(result, metric), str(source)
    else:
        value, where = _eval_row_metric(read_metrics(run).rows, metric, dataset), f"{run}/metrics.jsonl"
    if value is None:
        which = f"zeroshot_{dataset}.json" if dataset else "zeroshot_*.json"
        raise ClipaError(f"{run}: no zero-shot result: no {which} with {metric} and no evaluation rows in "
                         f"metrics.jsonl; write one with `clipa zeroshot --model {run} --dataset D --output "
                         f"{run}/zeroshot_D.json`")
    if isinstance(value, (int, float)) and value > 1:
        raise ClipaError(f"{where}: {metric} = {value} looks like a percentage; results hold fractions in [0, 1]")
    compute, notes = run_compute(run)
    compute, error = _check_point(compute, 1.0 - value, where)
    return Point(compute, error, run.name, notes)


def load_points(inputs, metric: str = "acc1", dataset: str | None = None) -> list[Point]:
    """Points from run directories and JSON files, in the order given."""
    points = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise ClipaError(f"{path}: does not exist; give clipa run directories or JSON files of "
                             "{\"compute\", \"error\"} points")
        if path.is_dir():
            if not is_run_dir(path):
                raise ClipaError(f"{path}: not a clipa run directory (no config.toml)")
            points.append(points_from_run(path, metric, dataset))
        else:
            points.extend(points_from_json(path, metric))
    return points
