"""Reading clipa step checkpoints back: whether one loads (`verify`), and the newest one that does.

The names and the list of complete `checkpoints/step_N` belong to clipa.run.layout (no torch); writing
them to clipa.train.checkpoint. This module reads their files (safetensors, DCP shards, the state's
zip), so finding weights to start from or evaluate (clipa.model.weights) needs nothing from the trainer.
"""

from __future__ import annotations

import time
import warnings
import zipfile
from pathlib import Path

from clipa.errors import ClipaError
from clipa.run.layout import MODEL_FILE, SHARDED_DIR, STATE_FILE, complete_checkpoints

READ_TRIES = 3  # an OSError while reading a checkpoint is retried this often before the run stops


def newest_loadable(directory: Path, on_damage=None) -> Path | None:
    """The newest checkpoint of `directory` (a run's checkpoints/) that loads.

    A directory with a final `step_*` name is complete by construction (it is renamed into place after its
    files are fsynced), so it is trusted even when a kill came before LATEST was updated. A disk can still
    corrupt a file after the fact: such a checkpoint is passed over, with a warning, or handed to
    `on_damage(path, problem)` (the trainer moves it aside). A file that cannot be read at all (EIO,
    ESTALE) is not damage: `verify` retries and then stops with an error, so a storage hiccup never
    silently rolls a run back.
    """
    for path in reversed(complete_checkpoints(directory)):
        problem = verify(path)
        if problem is None:
            return path
        if on_damage is None:
            warnings.warn(f"skipping damaged checkpoint {path}: {problem}", stacklevel=3)
        else:
            on_damage(path, problem)
    return None


def _damage(path: Path) -> str | None:
    """None if the checkpoint's files read back whole, else what is wrong; OSError propagates."""
    from safetensors import safe_open

    from clipa.model import sharded  # torch.distributed.checkpoint: imported when a checkpoint is read

    try:
        if (path / SHARDED_DIR).is_dir():
            problem = sharded.damage(path / SHARDED_DIR)
            if problem:
                return problem
        else:
            with safe_open(str(path / MODEL_FILE), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    f.get_slice(key)
        # torch.save writes a zip archive: checking every member's CRC reads the file once without
        # unpickling gigabytes of optimizer state twice.
        with zipfile.ZipFile(path / STATE_FILE) as archive:
            bad = archive.testzip()
        if bad is not None:
            return f"{STATE_FILE}: member {bad} is corrupt"
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:  # a file gone: that is damage
        return f"{type(err).__name__}: {err}"
    except OSError:  # EIO, ESTALE, ...: the storage, not the checkpoint (verify retries)
        raise
    except Exception as err:  # noqa: BLE001 - whatever else the readers raise on bad bytes is damage
        return f"{type(err).__name__}: {err}"
    return None


def verify(path: Path, tries: int = READ_TRIES, delay_s: float = 1.0) -> str | None:
    """None if the checkpoint's files load, else what is wrong with them (damage).

    An OSError while reading (EIO, ESTALE on network storage) says nothing about the checkpoint:
    it is retried `tries` times, then raises a ClipaError (exit 2) rather than passing the
    checkpoint over, which would roll the run back to an older one without anyone asking.
    """
    for attempt in range(tries):
        try:
            return _damage(path)
        except OSError as err:
            reason = err.strerror or str(err)
            if attempt + 1 < tries:
                time.sleep(delay_s * (attempt + 1))
    raise ClipaError(f"checkpoint: cannot read {path} ({reason}; tried {tries} times); nothing was changed. Check "
                     "the storage (a network mount that went away, a failing disk) and rerun the same command")
