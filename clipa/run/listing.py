"""The runs under `runs/` and the chain between them: which stage each one trained, how far it got, which
run a bare `clipa finetune` continues and which one a bare `clipa zeroshot` evaluates.

Plain Python over a run directory's own files (config.toml, metrics.jsonl, checkpoints/step_N, final/),
no torch, so a notebook can call it as the CLI does:

    >>> from clipa.run.listing import list_runs, run_to_continue, run_to_evaluate
    >>> [run.name for run in list_runs("runs")]

A run is *finished* when its final/ export exists and its newest checkpoint reached the step count of
its recipe (train.total_samples // train.global_batch_size). final/ alone is not enough: a finished
run resumed with a larger total_samples keeps its old final/ until it finishes again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from clipa.errors import ClipaError
from clipa.run.layout import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    FINAL_DIR,
    METRICS_FILE,
    RUNS,
    is_finished_export,
    is_run_dir,
    read_run_recipe,
    saved_steps,
)
from clipa.run.metrics import read_metrics


@dataclass
class Run:
    path: Path
    name: str  # the recipe's name
    stage: str  # pretrain | finetune, as its metrics rows say
    parent: str  # init.checkpoint: the run (or weights) it started from; "" = from scratch
    next: str  # the recipe that continues it ("" = none)
    steps_done: int
    total_steps: int
    finished: bool
    updated: float  # when it last wrote anything (seconds since the epoch)
    zeroshot: dict[str, float] = field(default_factory=dict)  # last logged acc1 per dataset

    def describe(self) -> str:
        state = "finished" if self.finished else "not finished"
        return f"{self.path} ({self.stage}, step {self.steps_done}/{self.total_steps}, {state})"

    def resume_command(self) -> str:
        return f"clipa {self.stage} {self.path / CONFIG_FILE} --out {self.path}"

    def as_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def read_run(path: str | Path) -> Run:
    """What `path` (a run directory: it holds config.toml) trained and how far it got."""
    path = Path(path)
    recipe = read_run_recipe(path)
    rows = read_metrics(path).rows  # a line cut by a kill is left out: the rest still counts
    stages = [row["stage"] for row in rows if isinstance(row.get("stage"), str)]
    # A run that logged nothing yet says nothing of its stage: one with init weights is most likely a finetune.
    stage = stages[-1] if stages else ("finetune" if recipe.init.checkpoint else "pretrain")
    saved = max(saved_steps(path / CHECKPOINTS_DIR), default=0)
    logged = max((row["step"] for row in rows if isinstance(row.get("step"), int)), default=0)
    total = recipe.train.total_samples // recipe.train.global_batch_size
    zeroshot = {}
    for row in rows:  # later rows overwrite earlier ones: the last evaluation wins
        for key, value in row.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "zeroshot" and parts[2] == "acc1" and isinstance(value, (int, float)):
                zeroshot[parts[1]] = value
    finished = is_finished_export(path) and saved >= total
    updated = max(_mtime(path / name) for name in (CONFIG_FILE, METRICS_FILE, FINAL_DIR))
    return Run(path, recipe.name, stage, recipe.init.checkpoint, recipe.next, max(saved, logged), total, finished,
               updated, zeroshot)


def list_runs(root: str | Path = RUNS) -> list[Run]:
    """The run directories under `root` (and one level further down, as `clipa quickstart` nests its
    two runs), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        if is_run_dir(child):
            found.append(child)
        else:
            found += sorted(p for p in child.iterdir() if p.is_dir() and is_run_dir(p))
    runs = []
    for path in found:
        try:
            runs.append(read_run(path))
        except ClipaError:  # a config.toml clipa cannot read is no run to choose; `clipa runs` skips it
            continue
    return sorted(runs, key=lambda run: run.updated)


def _first_pretrain_hint() -> str:
    return "train one first: clipa pretrain tiny/pretrain"


def run_to_continue(from_run: str | Path | None = None, root: str | Path = RUNS) -> tuple[Run, list[str]]:
    """The run a bare `clipa finetune` continues: `from_run`, else the newest finished pretraining run
    under `root`. Returns it and notes on newer runs passed over (never silently). An unfinished run is
    an error naming how to resume it."""
    if from_run is not None:
        path = Path(from_run)
        if not is_run_dir(path):
            raise ClipaError(f"--from: {path} is not a clipa run directory (no config.toml); list runs with `clipa runs`")
        run = read_run(path)
        if not run.finished:
            raise ClipaError(f"--from: {run.describe()}; resume it with `{run.resume_command()}`, then finetune")
        return run, []
    pretrains = [run for run in list_runs(root) if run.stage == "pretrain"]
    if not pretrains:
        raise ClipaError(f"finetune: no pretraining run under {Path(root)}/ to continue; {_first_pretrain_hint()}, "
                         "or give a recipe: clipa finetune RECIPE init.checkpoint=WEIGHTS")
    finished = [run for run in pretrains if run.finished]
    if not finished:
        newest = pretrains[-1]
        raise ClipaError(f"finetune: the newest pretraining run {newest.describe()}; resume it with "
                         f"`{newest.resume_command()}`, then run clipa finetune again")
    chosen = finished[-1]
    notes = [f"note: {run.describe()} is newer; resume it with `{run.resume_command()}` and finetune it with "
             f"`clipa finetune --from {run.path}`" for run in pretrains if run.updated > chosen.updated]
    return chosen, notes


def next_recipe(run: Run) -> str:
    """The recipe that continues `run` (its `next`), or a one-line error saying how to give one."""
    if not run.next:
        raise ClipaError(f"next: {run.path}/{CONFIG_FILE} names no recipe to continue with; give one: "
                         f"clipa finetune RECIPE --from {run.path} (or set next = \"...\" in its recipe)")
    return run.next


def run_to_evaluate(root: str | Path = RUNS) -> Run:
    """The newest finished finetune run under `root`, else the newest finished pretraining run."""
    finished = [run for run in list_runs(root) if run.finished]
    for stage in ("finetune", "pretrain"):
        runs = [run for run in finished if run.stage == stage]
        if runs:
            return runs[-1]
    raise ClipaError(f"--model: not given, and no finished run under {Path(root)}/ to evaluate; give --model "
                     f"(a run directory, an exported model, ARCH:TAG) or {_first_pretrain_hint()}")
