"""Writing step checkpoints that survive a kill at any instant, and reading a run's training state back.

A checkpoint is a directory `checkpoints/step_000500/` holding `model.safetensors`, `state.pt`
(optimizer, scheduler, step, samples seen, data position), `rng_rank{R}.pt` for every process
and `config.toml`. Under train.shard = "fsdp" the weights and the optimizer state are instead DCP
shards in `sharded/` (clipa.model.sharded), written by every process, and `state.pt` holds the rest.
It is written under a temporary name, fsynced, then renamed: a directory with a final `step_*` name
is always complete. `LATEST` names the newest and is replaced last. The names and the list of complete
checkpoints are clipa.run.layout's; checking that one loads, clipa.model.checkpoints's.

What a checkpoint holds is registered as named stateful parts (anything with `state_dict()` and
`load_state_dict()`: model, optimizer, scheduler, scaler, train counters, data position, queues, RNG),
which `save` writes and `restore` reads back in the order they were registered. This module alone
knows which file each part lives in (the part names below); every other name is an entry of
`state.pt`. A part registered as None (no scaler, no queue) is saved as None; a part restores only
from an entry that is there and not None (checkpoints older than the entry carry none), except the
entries every checkpoint has held (`ALWAYS_SAVED`): one of those missing is a damaged file, and an error.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch

from clipa.distributed import agreed, fault_point
from clipa.errors import ClipaError, first_line
from clipa.model.checkpoints import newest_loadable, verify
from clipa.model.safeload import load_plain, load_rng, rng_state, set_rng_state
from clipa.model.weights import fsync_dir, fsync_file, model_from_checkpoint, write_safetensors
from clipa.run.layout import (
    CONFIG_FILE,
    DAMAGED_PREFIX,
    LATEST_FILE,
    MODEL_FILE,
    SHARDED_DIR,
    STATE_FILE,
    checkpoint_step,
    complete_checkpoints,
    is_complete,
    missing_files,
    step_dir_name,
    step_of,
)

# Parts that live outside state.pt, by name; the names are this module's, the files the run directory's format.
WEIGHTS = "model"  # model.safetensors: the whole weights, written by process 0
SHARDS = "sharded"  # sharded/: every process its DCP shards of weights and optimizer state (train.shard = "fsdp")
RNG = "rng"  # rng_rank{R}.pt: every process its own generators
# state.pt entries every clipa checkpoint has held since its first version: one missing means a damaged file,
# not an older one (entries added later, such as the queue, restore only when present)
ALWAYS_SAVED = ("optimizer", "scheduler")
COUNTERS = "train"  # spread over state.pt's top level (step, wall_time_s, ...), where they were before parts had names


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class ProcessRng:
    """The RNG part: this process's Python, NumPy and torch generators."""

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state)


class CheckpointManager:
    """Owns `RUN/checkpoints/`: what a checkpoint holds (`register`), when one is due (`due`), atomic save of
    the parts and their restore, keep-last-N pruning, finding the newest."""

    def __init__(self, directory: str | Path, keep_last: int = 3, rank: int = 0, barrier=lambda: None, *,
                 every_steps: int = 0, last_step: int = 0, rolled_back: bool = False):
        self.directory = Path(directory)
        self.keep_last, self.rank, self.barrier = keep_last, rank, barrier
        self.every_steps, self.last_step, self.rolled_back = every_steps, last_step, rolled_back
        self.moved_aside: list[str] = []  # notes for the run's log (latest(quarantine=True))
        self.parts: dict[str, Stateful | None] = {}
        self.config_text = ""
        self.restored: tuple[Path, int] | None = None  # the checkpoint `restore` read, and its step

    def register(self, config_text: str, **parts: Stateful | None) -> None:
        """What every checkpoint holds: the resolved recipe (config.toml) and the named parts, in order."""
        self.config_text = config_text
        self.parts.update(parts)

    def due(self, step: int, nonfinite_in_row: int = 0) -> bool:
        """A periodic checkpoint after `step`: every `every_steps`, before the last step (the run's end saves
        anyway). None inside a non-finite streak: "the last good checkpoint" then predates the trouble,
        whatever caused it."""
        return bool(self.every_steps) and step % self.every_steps == 0 and step < self.last_step \
            and not nonfinite_in_row

    def save(self, step: int) -> Path:
        """Write the registered parts as checkpoint `step`; every process calls this (collective)."""
        if self.restored is not None and self.restored[1] == step \
                and self.restored[0].parent.resolve() == self.directory.resolve():
            # Nothing trained since this very checkpoint was loaded (a run resumed at its end):
            # rewriting it could only risk it, e.g. a kill mid-write with keep_last = 1.
            return self.restored[0]
        parts, main = self.parts, self.rank == 0
        state = self._state_entries() if main else None
        write_shards = None
        if SHARDS in parts:
            def write_shards(directory: Path) -> None:
                from clipa.model import sharded

                sharded.save(parts[SHARDS].state_dict(), directory)
        return self.write(step, parts[WEIGHTS].state_dict() if main and WEIGHTS in parts else None, state,
                          self.config_text, rolled_back=self.rolled_back, write_shards=write_shards,
                          rng=parts[RNG].state_dict if RNG in parts else rng_state)

    def _state_entries(self) -> dict:
        """state.pt: every part that has no file of its own, in registration order."""
        state = {}
        for name, part in self.parts.items():
            if name in (WEIGHTS, SHARDS, RNG):
                continue
            saved = part.state_dict() if part is not None else None
            if name == COUNTERS:
                state.update(saved)
            else:
                state[name] = saved
        return state

    def restore(self, checkpoint: Path) -> None:
        """Load every registered part from `checkpoint`, in registration order."""
        model_state, state, rng = load_state(checkpoint, self.rank)
        outside = {WEIGHTS: model_state, RNG: rng, COUNTERS: state}
        for name, part in self.parts.items():
            if name == SHARDS:  # read into this layout's targets, at any number of processes
                from clipa.model import sharded

                target = part.state_dict()
                sharded.load(target, checkpoint / SHARDED_DIR)
                part.load_state_dict(target)
                continue
            if name in ALWAYS_SAVED and name not in state:
                raise ClipaError(f"checkpoint {checkpoint}: its {STATE_FILE} has no \"{name}\" entry, which every "
                                 "clipa checkpoint holds: the file is damaged; resume from an earlier checkpoint "
                                 "with --resume, or move this one away")
            saved = outside[name] if name in outside else state.get(name)
            if part is not None and saved is not None:
                part.load_state_dict(saved)
        self.restored = (checkpoint, state["step"])

    def complete(self) -> list[Path]:
        return complete_checkpoints(self.directory)

    def recover(self) -> None:
        """Finish a same-step save killed between its two renames (see `write`).

        Rank 0 puts `.old-step_N` back when the new `step_N` never landed, and deletes it when the
        new one did. Only the trainer calls this, holding the run lock: commands that merely look at
        a run directory never change it.
        """
        if self.rank == 0 and self.directory.is_dir():
            for old in self.directory.glob(".old-step_*"):
                final = self.directory / old.name[len(".old-"):]
                if final.exists():
                    shutil.rmtree(old, ignore_errors=True)
                elif not missing_files(old):
                    old.rename(final)

    def latest(self, quarantine: bool = False) -> Path | None:
        """The newest checkpoint that loads (clipa.model.checkpoints.newest_loadable).

        A damaged one is skipped with a warning, never chosen; with `quarantine` (the trainer's rank 0
        only: looking never changes a run directory) it is also renamed aside to `.damaged-step_N`, kept
        for inspection and out of every later choice.
        """
        def move_aside(path: Path, problem: str) -> None:
            aside = _aside_name(path)
            path.rename(aside)
            fsync_dir(self.directory)
            self.moved_aside.append(f"damaged checkpoint {path} ({first_line(problem, 160)}) moved aside to "
                                    f"{aside.name}")

        return newest_loadable(self.directory, move_aside if quarantine and self.rank == 0 else None)

    def check_free_space(self, checkpoint_bytes: int) -> None:
        """Refuse to start when the disk cannot hold even one more checkpoint."""
        self.directory.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.directory).free
        if free < 1.1 * checkpoint_bytes:
            raise ClipaError(f"--out: {self.directory} has {free / 2**30:.2f} GiB free, a checkpoint needs about "
                             f"{checkpoint_bytes / 2**30:.2f} GiB; free some space or choose another --out")

    def write(self, step: int, model_state: dict | None, state: dict | None, config_text: str,
              rolled_back: bool = False, write_shards=None, rng=rng_state) -> Path:
        """The files of checkpoint `step`. Every process calls this (it writes its RNG state, as `rng()`
        returns it); rank 0 writes the rest and renames.

        `rolled_back`: this run started from an explicit `--resume` to an earlier step, so higher
        steps belong to the abandoned trajectory and are deleted once this one is in place.
        `write_shards(directory)`: under FSDP, every process writes its shards of the weights and
        optimizer state there (collective); `model_state` is then None.
        """
        final = self.directory / step_dir_name(step)
        tmp = self.directory / f".tmp-{final.name}"
        moved: list[Path] = []  # `.old-step_N` while a same-step save replaces it

        def begin():
            fault_point("save", self.rank)
            if self.rank == 0:
                self.directory.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()

        def finish():
            if self.rank != 0:
                return
            if model_state is not None:
                write_safetensors(model_state, tmp / MODEL_FILE)
            _crash_point("checkpoint-write", step)
            _save_fsync(state, tmp / STATE_FILE)
            (tmp / CONFIG_FILE).write_text(config_text, encoding="utf-8")
            fsync_file(tmp / CONFIG_FILE)
            fsync_dir(tmp)
            if final.exists():  # the same step again (e.g. after an explicit --resume rolled back)
                # Moved aside, deleted only once the new one is in place: a kill between the two
                # renames leaves `.old-step_*`, which `recover` puts back on the next start.
                old = self.directory / f".old-{final.name}"
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
                moved.append(old)
            tmp.rename(final)
            fsync_dir(self.directory)
            for old in moved:
                shutil.rmtree(old, ignore_errors=True)
            _crash_point("before-latest", step)
            pointer_tmp = self.directory / f".{LATEST_FILE}.tmp"
            pointer_tmp.write_text(final.name + "\n")
            fsync_file(pointer_tmp)
            os.replace(pointer_tmp, self.directory / LATEST_FILE)
            fsync_dir(self.directory)
            self.prune(final, drop_newer=rolled_back)

        try:
            # Each phase ends with every process knowing whether any failed (it doubles as the
            # barrier): a save error on one process stops all of them with the same message.
            _agreed_phase(begin)
            if write_shards is not None:
                _agreed_phase(lambda: write_shards(tmp / SHARDED_DIR))
            _agreed_phase(lambda: _save_fsync(rng(), tmp / f"rng_rank{self.rank}.pt"))
            _agreed_phase(finish)
        except ClipaError as err:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                for old in moved:
                    if old.exists() and not final.exists():
                        old.rename(final)  # the failed write replaced nothing
            raise ClipaError(f"checkpoint: could not write {final} ({err}); the earlier checkpoints in "
                             f"{self.directory} are intact. Free space on that disk (or lower checkpoint.keep_last) "
                             "and rerun the same command to resume") from None
        self.barrier()
        return final

    def prune(self, newest: Path | None = None, drop_newer: bool = False) -> None:
        """Keep the newest `keep_last`; `newest` (the one just written) is never deleted.

        With `drop_newer` (only after an explicit `--resume` roll-back), checkpoints with a higher step
        than `newest` belong to the abandoned trajectory; they are deleted, else a later automatic
        resume (which takes the highest step) would jump back onto it. Without it a higher step is
        never deleted: it can only be there because it could not be read a moment ago.
        """
        if newest is not None and drop_newer:
            for path in self.complete():
                if checkpoint_step(path) > checkpoint_step(newest):
                    shutil.rmtree(path, ignore_errors=True)
        newest = newest or self.latest()
        complete = self.complete()
        for path in complete[: max(0, len(complete) - self.keep_last)]:
            if path != newest:
                shutil.rmtree(path, ignore_errors=True)
        for stale in self.directory.glob(".tmp-step_*"):  # left behind by a killed writer
            shutil.rmtree(stale, ignore_errors=True)


def _agreed_phase(work) -> None:
    """Run `work` on every process; any failure becomes the same one-line ClipaError on all of them."""
    with agreed():
        try:
            work()
        except ClipaError:
            raise
        except Exception as err:  # noqa: BLE001 - torch.save reports a full disk as RuntimeError, not OSError
            reason = err.strerror if isinstance(err, OSError) and err.strerror else f"{type(err).__name__}: {err}"
            raise ClipaError(first_line(reason)) from None


def _crash_point(where: str, step: int) -> None:
    """Crash-consistency tests kill the process here: CLIPA_CRASH_AT=checkpoint-write:4 (SIGKILL)."""
    target = os.environ.get("CLIPA_CRASH_AT")
    if target and target == f"{where}:{step}":
        os.kill(os.getpid(), 9)


def _aside_name(path: Path) -> Path:
    aside = path.with_name(DAMAGED_PREFIX + path.name)
    n = 1
    while aside.exists():
        aside, n = path.with_name(f"{DAMAGED_PREFIX}{path.name}-{n}"), n + 1
    return aside


def _save_fsync(obj, path: Path) -> None:
    torch.save(obj, path)
    fsync_file(path)


def load_state(checkpoint: Path, rank: int = 0) -> tuple[dict | None, dict, dict | None]:
    """(model state dict, or None for a sharded checkpoint, which the FSDP trainer reads itself;
    training state; this rank's RNG state or None).

    Nothing here runs code from the files (safetensors, and `weights_only=True` for the rest), and
    the training state is memory-mapped: every process of a node reads the same pages.
    """
    from safetensors.torch import load_file

    model_state = None if (checkpoint / SHARDED_DIR).is_dir() else load_file(str(checkpoint / MODEL_FILE))
    state = load_plain(checkpoint / STATE_FILE)
    rng_path = checkpoint / f"rng_rank{rank}.pt"
    rng = load_rng(rng_path) if rng_path.is_file() else None
    return model_state, state, rng


def resolve_resume(path: str | Path, key: str = "--resume") -> Path:
    """The step checkpoint a path names (`--resume`, `clipa export`): a checkpoint directory, or a run
    directory's (or its `checkpoints/`) newest complete one; verified, so a damaged one is an error."""
    path = Path(path)
    if not path.exists():
        raise ClipaError(f"{key}: {path} does not exist; give runs/NAME/checkpoints/step_N or a run directory")
    if path.is_dir() and step_of(path) is not None and not is_complete(path):
        missing = missing_files(path)
        raise ClipaError(f"{key}: {path} is an incomplete checkpoint (missing {', '.join(missing)}); "
                         "give an earlier step_N or the run directory")
    if is_complete(path):
        checkpoint = path
    else:
        directory = path if path.is_dir() and path.name == "checkpoints" else path / "checkpoints"
        checkpoint = CheckpointManager(directory).latest() if path.is_dir() else None
        if checkpoint is None:
            raise ClipaError(f"{key}: {path} is not a step checkpoint and holds no complete checkpoints/step_N "
                             "(an exported model holds weights only, no training state)")
    problem = verify(checkpoint)
    if problem:
        raise ClipaError(f"{key}: {checkpoint} is damaged ({problem}); give an earlier checkpoints/step_N")
    return checkpoint


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Any step checkpoint (or a run directory's newest) -> an open_clip `local-dir:` directory with a model card."""
    from clipa.model.card import model_card
    from clipa.model.weights import export_open_clip

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ClipaError(f"OUT: {out_dir} is a file; choose a new directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ClipaError(f"OUT: {out_dir} exists and is not empty; choose a new directory")
    path = resolve_resume(checkpoint, key="CHECKPOINT")
    model, recipe, _, model_cfg = model_from_checkpoint(path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    readme = model_card(path, recipe, model_cfg, sum(p.numel() for p in model.parameters()), out_dir)
    return export_open_clip(model, model_cfg, out_dir, readme=readme, data=recipe.data, replace=False)
