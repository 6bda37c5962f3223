"""The run directory's names, in one place: every other module asks here instead of spelling them.

```
RUN/
  .clipa-run  .clipa-lock     the marker and the lock (clipa.run.lock)
  config.toml                 resolved recipe (also in every step checkpoint)
  metrics.jsonl               one JSON object per log step (clipa.run.metrics)
  checkpoints/
    LATEST                    the newest step directory's name, replaced last
    step_000500/              model.safetensors (or sharded/ + .metadata), state.pt, rng_rank{R}.pt, config.toml
    .tmp-step_N .old-step_N .damaged-step_N   a save in progress, a replaced one, one moved aside
  final/                      open_clip_config.json + open_clip_model.safetensors (+ README.md)
```

Plain paths and names, no torch: `clipa runs`, `clipa scaling` and a notebook read runs without it.
"""

from __future__ import annotations

import re
from pathlib import Path

from clipa.recipe.load import read_toml, recipe_from_dict

RUNS = Path("runs")  # where a run goes without --out: runs/<recipe name>
CONFIG_FILE = "config.toml"  # the recipe of a run directory and of each of its step checkpoints
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
LATEST_FILE = "LATEST"
STATE_FILE = "state.pt"  # a step checkpoint's training state
MODEL_FILE = "model.safetensors"  # a step checkpoint's weights
SHARDED_DIR = "sharded"  # inside a step checkpoint under train.shard = "fsdp": the DCP directory
METADATA_FILE = ".metadata"  # DCP's index inside SHARDED_DIR
EXPORT_CONFIG = "open_clip_config.json"  # an open_clip `local-dir:` export (final/, clipa export)
EXPORT_WEIGHTS = "open_clip_model.safetensors"
DAMAGED_PREFIX = ".damaged-"  # a damaged checkpoint is renamed aside to .damaged-step_N[-K], never deleted
_STEP_DIR = re.compile(r"^step_(\d+)\Z")  # \Z: "step_2\n" is not a checkpoint


def default_run_dir(name: str) -> Path:
    """Where a run of the recipe called `name` goes when no --out is given."""
    return RUNS / name


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def step_of(path: Path) -> int | None:
    """The step a `step_N` directory name holds, else None."""
    match = _STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoint_step(path: Path) -> int:
    return int(_STEP_DIR.match(Path(path).name).group(1))


def missing_files(path: Path) -> list[str]:
    """What a checkpoint directory lacks: its state, its recipe, and its weights (one file, or DCP shards)."""
    missing = [f for f in (STATE_FILE, CONFIG_FILE) if not (path / f).is_file()]
    if not (path / MODEL_FILE).is_file() and not (path / SHARDED_DIR / METADATA_FILE).is_file():
        missing.insert(0, f"{MODEL_FILE} or {SHARDED_DIR}/{METADATA_FILE}")
    return missing


def is_complete(path: Path) -> bool:
    return bool(_STEP_DIR.match(path.name)) and not missing_files(path)


def complete_checkpoints(directory: Path) -> list[Path]:
    """The complete `step_N` directories of a `checkpoints/`, oldest first (one being written has a temporary name)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=checkpoint_step)


def saved_steps(directory: Path) -> list[int]:
    """The steps of a `checkpoints/`'s `step_N` directories, by name alone (a final name is complete by construction:
    a save renames its directory into place last); for reading a run's progress cheaply, not for loading."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(step for p in directory.iterdir() if (step := step_of(p)) is not None and p.is_dir())


def is_run_dir(path: Path) -> bool:
    """A clipa run directory holds its resolved recipe."""
    return (Path(path) / CONFIG_FILE).is_file()


def is_finished_export(run_dir: Path) -> bool:
    """The run's final/ export exists (finished, if its checkpoints also reached the recipe's steps)."""
    return (Path(run_dir) / FINAL_DIR / EXPORT_CONFIG).is_file()


def read_run_recipe(directory: str | Path):
    """The recipe a run directory (or one of its step checkpoints) was trained with: its config.toml."""
    return recipe_from_dict(read_toml(Path(directory) / CONFIG_FILE))
