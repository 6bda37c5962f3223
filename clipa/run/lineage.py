"""The one walker of a run's earlier stages: `init.checkpoint` back to the run it names, and on.

`clipa scaling` adds up their compute; the model card (`clipa export`, final/) lists them. Both follow
the same rule: `init.checkpoint` names a run when it is a run directory, its `final/`, or one of its
`checkpoints/step_N`; a relative path is looked up from the current directory, then beside the later
run (as quickstart and `clipa finetune --from` write them). The walk stops at the first name that is
no run here (published weights, a weights file, a moved run), at a run seen before (a loop), or after
`limit` stages (the model card's table stops at ten; `clipa scaling` counts every stage).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from clipa.run.layout import CHECKPOINTS_DIR, FINAL_DIR, complete_checkpoints, is_run_dir, read_run_recipe, step_dir_name, step_of

MAX_STAGES = 10  # a chain of init.checkpoint runs longer than this is cut


@dataclass(frozen=True)
class EarlierRun:
    init: str  # init.checkpoint, as the later run's recipe spells it
    run_dir: Path | None = None  # the run it names; None: no clipa run directory found from here
    step: int | None = None  # the step checkpoint it names; None: the run itself or its final/
    looped: bool = False  # the run was seen before in this walk
    recipe: object = None  # the run's recipe (its config.toml); None with run_dir None or looped

    @property
    def checkpoint(self) -> Path | None:
        """The step checkpoint the weights came from: the one named, else the run's newest complete one."""
        if self.run_dir is None:
            return None
        if self.step is not None:
            return self.run_dir / CHECKPOINTS_DIR / step_dir_name(self.step)
        newest = complete_checkpoints(self.run_dir / CHECKPOINTS_DIR)
        return newest[-1] if newest else None


def run_of(path: Path) -> tuple[Path, int | None] | None:
    """(run directory, step or None) of a path that is a run directory, its final/ or one of its step checkpoints."""
    step = step_of(path)  # a step checkpoint (it holds a config.toml too)
    if step is not None and path.parent.name == CHECKPOINTS_DIR and is_run_dir(path.parent.parent):
        return path.parent.parent, step
    if path.name == FINAL_DIR and is_run_dir(path.parent):
        return path.parent, None
    if is_run_dir(path):
        return path, None
    return None


def find_run(init: str, later_run: Path | None = None) -> tuple[Path, int | None] | None:
    """The run `init` (an init.checkpoint) names, looked up as the module docstring says, else None."""
    path = Path(init)
    candidates = [path]
    if not path.is_absolute() and later_run is not None:
        candidates += [later_run.parent.parent / init, later_run.parent / path.name]
    return next((found for found in map(run_of, candidates) if found is not None), None)


def earlier_runs(recipe, run_dir: Path | None = None, limit: int | None = MAX_STAGES) -> Iterator[EarlierRun]:
    """The runs before `recipe`'s (run in `run_dir`), newest first; the last one yielded may be a dead end
    (`run_dir` None: init names no run here; `looped`). `limit` None: to the end of the chain."""
    seen = {run_dir.resolve()} if run_dir is not None else set()
    for _ in range(limit) if limit is not None else itertools.count():
        init = recipe.init.checkpoint
        if not init:
            return
        found = find_run(init, run_dir)
        if found is None:
            yield EarlierRun(init)
            return
        run_dir, step = found
        if run_dir.resolve() in seen:
            yield EarlierRun(init, run_dir, step, looped=True)
            return
        seen.add(run_dir.resolve())
        recipe = read_run_recipe(run_dir)
        yield EarlierRun(init, run_dir, step, recipe=recipe)
