"""Experiment trackers: every metrics.jsonl row also goes to TensorBoard, Weights & Biases, MLflow or any
other tracker accelerate knows (`[log] trackers`), from rank 0, through accelerate's tracker classes.

- Start-up: a tracker name accelerate does not know, or whose library is not installed, is a recipe
  error (one line, naming the extra to install). `check_trackers` runs in the trainer, `clipa validate` and
  `--dry-run`; nothing is imported from the tracker libraries until a run starts them.
- What is sent: the resolved recipe flattened to `table.key` hyperparameters, plus `stage` and
  `clipa_version`, with credentials in its strings redacted (presigned queries, user:password@, tokens
  in `pipe:` commands: clipa.data.urls.redact); then each row's numbers under their metrics.jsonl names
  at the row's `step`.
- Where: TensorBoard and W&B write under the run directory; MLflow without MLFLOW_TRACKING_URI too
  (`RUN_DIR/mlflow.db`, artifacts in `RUN_DIR/mlartifacts`), not MLflow's `./mlflow.db` / `./mlruns`.
- Resume: the tracker's run id lives in the run directory (`trackers.json`), so a resumed run appends
  to the same W&B / MLflow run (TensorBoard appends to `RUN_DIR/tensorboard/`). A metric is sent only
  for steps after the last one already in metrics.jsonl: the steps a killed run logged after its last
  checkpoint are trained again but not sent twice (trackers keep the first value; metrics.jsonl, and
  so `clipa report`, the last). A SIGKILL can still cost a tracker the rows its own library had not
  yet written (W&B holds the newest steps in memory and in its service process): a gap, never a
  duplicate.
- Failure never costs training: a tracker that fails to start or to log is warned about once and
  skipped or retried silently; metrics.jsonl has every row either way.

accelerate's `Accelerator.log` stops at the first tracker that raises; here each tracker is called on
its own, which is why the classes are used directly rather than through `Accelerator(log_with=...)`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

from rich.console import Console

from clipa.errors import ClipaError, did_you_mean, first_line
from clipa.run.metrics import read_metrics

STATE_FILE = "trackers.json"  # in the run directory: each tracker's run id, so a resume continues that run
TENSORBOARD_DIR = "tensorboard"  # RUN_DIR/tensorboard/: `tensorboard --logdir runs` shows every run
MLFLOW_DB = "mlflow.db"  # RUN_DIR/mlflow.db: MLflow's store when MLFLOW_TRACKING_URI is not set
MLFLOW_ARTIFACTS = "mlartifacts"  # and its artifacts, RUN_DIR/mlartifacts/

# The library each built-in tracker needs and how to install it (clipa's extras for the three common ones).
_LIBRARIES = {
    "tensorboard": (("tensorboard", "tensorboardX"), "pip install 'clipa[tensorboard]'"),
    "wandb": (("wandb",), "pip install 'clipa[wandb]'"),
    "mlflow": (("mlflow",), "pip install 'clipa[mlflow]'"),
    "comet_ml": (("comet_ml",), "pip install comet_ml"),
    "aim": (("aim",), "pip install 'aim<4'"),
    "clearml": (("clearml",), "pip install clearml"),
    "dvclive": (("dvclive",), "pip install dvclive"),
    "swanlab": (("swanlab",), "pip install swanlab"),
    "trackio": (("trackio",), "pip install trackio"),
}

_err = Console(stderr=True, highlight=False, soft_wrap=True)


def _installed(module: str) -> bool:
    if module in sys.modules:  # `sys.modules[name] = None` is Python's way to block an import
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def _known() -> dict:
    """Tracker name -> accelerate tracker class: its built-in ones and any registered with
    `accelerate.tracking.register_tracker_class`."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    return LOGGER_TYPE_TO_CLASS


def check_trackers(log) -> None:
    """Every `log.trackers` name is a tracker accelerate knows and its library is installed."""
    if not log.trackers:
        return
    known = _known()
    for i, name in enumerate(log.trackers):
        if name not in known:
            raise ClipaError(f"log.trackers[{i}]: unknown tracker \"{name}\"{did_you_mean(name, known)} "
                             f"(accelerate's: {', '.join(sorted(known))})")
        modules, install = _LIBRARIES.get(name, ((), ""))
        if modules and not any(_installed(m) for m in modules):
            raise ClipaError(f"log.trackers[{i}]: \"{name}\" needs the {modules[0]} library, which is not installed; "
                             f"{install}")


def run_name(recipe) -> str:
    return recipe.log.run_name or recipe.name


def describe(recipe) -> str:
    """One line for `clipa validate` and `--dry-run`."""
    log = recipe.log
    if not log.trackers:
        return "none (metrics.jsonl only; `clipa report RUN_DIR` plots it)"
    tags = f", tags {', '.join(log.tags)}" if log.tags else ""
    return f"{', '.join(log.trackers)} (project {log.project}, run {run_name(recipe)}{tags}; rank 0)"


def hyperparameters(recipe, stage: str) -> dict:
    """The resolved recipe as flat `table.key` values (lists as JSON text, which every tracker takes),
    plus the stage and clipa's version."""
    from clipa import __version__
    from clipa.recipe.load import to_dict

    flat = {}

    def walk(table: dict, prefix: str) -> None:
        for key, value in table.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                value = json.dumps(value) if isinstance(value, list) else value
                flat[prefix + key] = redact(value) if isinstance(value, str) else value

    from clipa.data.urls import redact

    walk(to_dict(recipe), "")
    flat.update(stage=stage, clipa_version=__version__)
    return flat


def _last_steps(run_dir: Path) -> dict[str, int]:
    """The last step each metric already has in metrics.jsonl (sent by an earlier attempt of this run)."""
    last: dict[str, int] = {}
    for row in read_metrics(run_dir).rows:  # a line cut short by a kill is left out
        try:
            step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            continue
        for key in row:
            last[key] = max(step, last.get(key, step))
    return last


def _read_state(run_dir: Path) -> dict:
    try:
        state = json.loads((run_dir / STATE_FILE).read_text(encoding="utf-8"))
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_state(run_dir: Path, state: dict) -> None:
    tmp = run_dir / f"{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, run_dir / STATE_FILE)


class Trackers:
    """The recipe's trackers for one run (rank 0 only): `log(row)` after each metrics.jsonl row, `finish()`."""

    def __init__(self, recipe, stage: str, run_dir: Path):
        self.run_dir, self.active, self.failed, self.finished = Path(run_dir), [], set(), False
        self.exported_mlflow_uri = False
        self.state = _read_state(self.run_dir)
        self.sent = _last_steps(self.run_dir)  # per metric, the last step the trackers have (in metrics.jsonl)
        config = hyperparameters(recipe, stage)
        for name in recipe.log.trackers:
            try:
                tracker = self._start(name, recipe, stage)
                tracker.store_init_configuration(config)
            except Exception as err:  # noqa: BLE001 - a tracker that cannot start costs nothing but itself
                self._warn(f"{name} did not start ({type(err).__name__}: {first_line(err, 200)}); training goes on "
                           "without it, metrics.jsonl has every row")
                continue
            self.active.append((name, tracker))

    def _start(self, name: str, recipe, stage: str):
        log, cls = recipe.log, _known()[name]
        state = self.state.get(name, {})
        if name == "tensorboard":
            tracker = cls(TENSORBOARD_DIR, str(self.run_dir))  # writes RUN_DIR/tensorboard/
        elif name == "wandb":
            if "id" not in state:  # stored before the run starts: a kill at any later point resumes it
                self.state[name] = state = {"id": os.urandom(4).hex()}
                _write_state(self.run_dir, self.state)
            tracker = cls(log.project, id=state["id"], resume="allow", name=run_name(recipe), tags=log.tags or None,
                          job_type=stage, dir=str(self.run_dir))
        elif name == "mlflow":
            import mlflow

            # MLflow's default store is ./mlruns, in whatever directory the run was started from
            uri, artifacts = os.environ.get("MLFLOW_TRACKING_URI"), None
            if not uri:
                # mlflow.set_tracking_uri exports the URI to os.environ; finish() takes it back, or the
                # next run in this process (a notebook, a test) would log into this run's store
                self.exported_mlflow_uri = True
                uri = f"sqlite:///{(self.run_dir / MLFLOW_DB).resolve()}"
                artifacts = (self.run_dir / MLFLOW_ARTIFACTS).resolve().as_uri()
            mlflow.set_tracking_uri(uri)  # also replaces an earlier run's default in this process
            tracker = cls(log.project, logging_dir=artifacts, run_id=state.get("run_id"), run_name=run_name(recipe),
                          tags={"stage": stage, **{tag: "true" for tag in log.tags}})
        elif cls.requires_logging_directory:
            tracker = cls(log.project, str(self.run_dir))
        else:
            tracker = cls(log.project)
        if hasattr(tracker, "start"):  # older accelerate starts a tracker in its constructor
            tracker.start()
        if name == "mlflow" and "run_id" not in state:
            self.state[name] = {"run_id": tracker.active_run.info.run_id}
            _write_state(self.run_dir, self.state)
        return tracker

    def _warn(self, text: str) -> None:
        _err.print(f"warning: log.trackers: {text}", markup=False)

    def log(self, row: dict) -> None:
        """The row's finite numbers at its step, except those a tracker already has at or after that step
        (sent by an earlier attempt of this run, or earlier in this one)."""
        step = int(row["step"])
        values = {key: value for key, value in row.items()
                  if key != "step" and isinstance(value, (int, float)) and math.isfinite(value)
                  and step > self.sent.get(key, -1)}
        if not values:
            return
        self.sent.update(dict.fromkeys(values, step))
        for name, tracker in self.active:
            try:
                tracker.log(values, step=step)
            except Exception as err:  # noqa: BLE001 - training and metrics.jsonl go on
                if name not in self.failed:
                    self.failed.add(name)
                    self._warn(f"{name} failed at step {step} ({type(err).__name__}: {first_line(err, 200)}); "
                               "training goes on and metrics.jsonl has every row; later failures of "
                               f"{name} are not reported")

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        for name, tracker in self.active:
            try:
                tracker.finish()
            except Exception as err:  # noqa: BLE001
                self._warn(f"{name} did not finish cleanly ({type(err).__name__}: {first_line(err, 200)})")
        if self.exported_mlflow_uri:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
