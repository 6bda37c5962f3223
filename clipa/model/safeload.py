"""Training state that loads without running code.

A checkpoint travels (shared on a cluster, downloaded): whatever `torch.load` unpickles with
`weights_only=False` may execute code. Every piece of training state clipa writes (optimizer,
scheduler, step counters, data position, queues, the RNG of every process) is therefore made of
tensors and plain containers (dict, list, tuple, str, int, float, bool, None), which torch's
restricted unpickler (`weights_only=True`) loads; `mmap=True` maps the file instead of copying it
into memory, so a large optimizer state is not held twice per process.
"""

from __future__ import annotations

import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch

from clipa.errors import ClipaError, first_line


def rng_state() -> dict:
    """Python, numpy and torch generator states as tensors and plain values."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    if isinstance(py, tuple):  # written by clipa before 0.x's plain format: random.getstate() as is
        random.setstate(py)
    else:
        random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    if isinstance(npy, tuple):  # likewise np.random.get_state()
        np.random.set_state(npy)
    else:
        np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                             npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_array_globals() -> list:
    """What unpickling a plain numpy array needs (no function of the file's choosing): earlier clipa
    versions stored numpy's RNG state as one."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_rng(path: Path):
    """A `rng_rank*.pt`: plain values, or (older checkpoints) numpy arrays; nothing else."""
    with torch.serialization.safe_globals(_numpy_array_globals()):
        return load_plain(path, mmap=False)


def load_plain(path: Path, mmap: bool = True):
    """`torch.load` that only reconstructs tensors and plain containers.

    A file whose pickle names anything else (a function to call, a class to build) is refused
    before any of it runs: a ClipaError naming the file. OSError passes through unchanged, so the
    caller can tell a storage hiccup from a file that is bad.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        # torch's message is a paragraph about its own defaults; the one fact that matters is
        # which global the pickle asked for (e.g. "posix.system"). Without one the file is not a
        # pickle at all (a text file: "Unsupported operand 110"): damaged, not hostile.
        found = re.search(r"GLOBAL ([\w.]+)", str(err)) or re.search(r"global[s]?:? ([\w.]+)", str(err))
        if found:
            raise ClipaError(f"{path}: refused to load: it holds more than tensors and plain values (it asks for "
                             f"{found.group(1)}); clipa never runs code from a checkpoint. Use a checkpoint written "
                             "by clipa from a source you trust") from None
        detail = re.search(r"error: \s*(.+?)\s*\n\s*\n", str(err))
        raise ClipaError(f"{path}: cannot read weights or state ({detail.group(1) if detail else first_line(err, 120)}); "
                         "the file is damaged or not a checkpoint/weights file; nothing in it was run") from None
    except (OSError, ClipaError):
        raise
    except Exception as err:  # noqa: BLE001 - a pickle made to fail inside the restricted loader (TypeError, ...)
        raise ClipaError(f"{path}: cannot read weights or state ({type(err).__name__}: {first_line(err, 120)}); the "
                         "file is damaged or not a checkpoint/weights file; nothing in it was run") from None
