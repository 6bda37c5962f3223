"""Sharded checkpoint files (train.shard = "fsdp"): torch.distributed.checkpoint (DCP), read without running code.

Every process writes its own shards (`__R_0.distcp`) of the model and optimizer state; nothing is
gathered on one process. The coordinator writes `.metadata`, the index of which file holds which
slice of which tensor, so a checkpoint loads at any number of processes (DCP reshards on load) or
without a process group at all (`read_model_state`: `clipa export`, `init.checkpoint`).

DCP's own reader is not safe for a checkpoint from elsewhere: `FileSystemReader.read_metadata` is a
bare `pickle.load` of `.metadata`, and `DefaultLoadPlanner.load_bytes` unpickles every non-tensor
value (the optimizer's hyperparameters) with `torch.load(weights_only=False)` (torch 2.14; neither
has a weights_only switch). Either runs whatever code the file names. clipa reads both through
restricted unpicklers instead: `.metadata` may name only DCP's metadata classes, torch dtypes,
layouts and `torch.Size`, and paths; the values only tensors and plain containers
(`weights_only=True`). The tensor data itself DCP already reads with `weights_only=True`.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path, PurePath

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from clipa.errors import ClipaError, first_line
from clipa.run.layout import METADATA_FILE, SHARDED_DIR

# What a DCP `.metadata` pickle may name: DCP's inert metadata records (dataclasses and one enum, whose
# construction has no side effects), paths, and torch's dtypes, layouts and Size. Nothing else: no
# function, and no other class of these modules (e.g. `FileSystemWriter` creates directories).
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "StorageMeta", "MetadataIndex", "ChunkStorageMetadata",
                                              "TensorProperties", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if module == "torch.serialization" and name == "_get_layout":  # a lookup in torch's layouts, by name
            return torch.serialization._get_layout
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


def read_metadata(directory: Path) -> Metadata:
    """The checkpoint's index, unpickled with the restricted unpickler; a ClipaError if it asks for more.
    OSError passes through (a storage problem, not a bad file)."""
    path = Path(directory) / METADATA_FILE
    with open(path, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f).load()
        except pickle.UnpicklingError as err:
            raise ClipaError(f"{path}: refused to load: {first_line(err, 160)}; clipa never runs code from a "
                             "checkpoint. Use a checkpoint written by clipa from a source you trust") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise ClipaError(f"{path}: not a torch.distributed.checkpoint index")
    for info in metadata.storage_data.values():
        name = PurePath(str(getattr(info, "relative_path", "")))
        # Only files of this directory: a crafted index must not make the reader open files elsewhere.
        if len(name.parts) != 1 or name.name in ("", ".", ".."):
            raise ClipaError(f"{path}: names a data file outside its directory ({name}); the checkpoint is damaged")
    return metadata


class SafeReader(FileSystemReader):
    """DCP's file reader with the restricted `.metadata` unpickler."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # as FileSystemReader.read_metadata does
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner whose non-tensor values load with `weights_only=True`."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element  # as DefaultLoadPlanner.load_bytes

        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def save(state: dict, directory: Path) -> None:
    """Every process writes its shards of `state` (DTensors, plain tensors, plain values) into `directory`;
    collective. Files are fsynced; the caller makes the directory's appearance atomic."""
    dcp.save(state, storage_writer=FileSystemWriter(directory, single_file_per_rank=True, sync_files=True,
                                                    thread_count=1))


def load(state: dict, directory: Path, no_dist: bool = False) -> None:
    """Fill `state` in place from `directory`, resharding to `state`'s layout; collective unless `no_dist`."""
    dcp.load(state, storage_reader=SafeReader(directory), planner=SafeLoadPlanner(), no_dist=no_dist)


def read_model_state(directory: Path) -> dict[str, torch.Tensor]:
    """The full model state dict from a sharded checkpoint, on this process alone (no process group
    needed, none used): for `clipa export`, `init.checkpoint` and evaluation."""
    metadata = read_metadata(directory)
    template = {key[len("model."):]: torch.empty(md.size, dtype=md.properties.dtype)
                for key, md in metadata.state_dict_metadata.items()
                if key.startswith("model.") and isinstance(md, TensorStorageMetadata)}
    state = {"model": template}
    with warnings.catch_warnings():  # DCP warns that no process group means one process: that is the intent
        warnings.simplefilter("ignore", UserWarning)
        load(state, directory, no_dist=True)
    return state["model"]


def damage(directory: Path) -> str | None:
    """None if the index loads and every slice it lists lies inside its file, else what is wrong. Cheap
    (sizes, not contents: DCP stores no checksums); OSError propagates (the storage, not the files)."""
    try:
        metadata = read_metadata(directory)
    except FileNotFoundError as err:
        return f"{type(err).__name__}: {err}"
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever the unpickler raises on bad bytes is damage
        return f"{METADATA_FILE}: {first_line(err, 160)}"
    ends: dict[str, int] = {}
    for info in metadata.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        path = Path(directory) / name
        if not path.is_file():
            return f"{SHARDED_DIR}/{name} is missing"
        if path.stat().st_size < end:
            return f"{SHARDED_DIR}/{name} is truncated ({path.stat().st_size} of at least {end} bytes)"
    return None
