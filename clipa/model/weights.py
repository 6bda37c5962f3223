"""Weight files: finding them (run directory, step checkpoint, open_clip export, plain file), reading
them, loading them into a model of another stage's geometry, and writing open_clip exports.

A step checkpoint's training state belongs to `clipa.train.checkpoint`; this module reads only its
weights and recipe (names and layout from clipa.run.layout, the newest loadable checkpoint from
clipa.model.checkpoints), so evaluation and pretrained towers need nothing from the trainer.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from open_clip.model import resize_pos_embed, resize_text_pos_embed

from clipa.errors import ClipaError, first_line
from clipa.model.checkpoints import newest_loadable
from clipa.model.posemb import refresh_sincos
from clipa.model.tokenizer_kwargs import hf_tokenizer
from clipa.run.layout import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    EXPORT_CONFIG,
    EXPORT_WEIGHTS,
    FINAL_DIR,
    MODEL_FILE,
    SHARDED_DIR,
    is_complete,
    read_run_recipe,
)


def find_weights(path: str | Path, key: str = "init.checkpoint") -> tuple[Path, str]:
    """Locate weights in a run directory, a step checkpoint, an exported model or a file.

    Returns (path, kind) with kind "export" (open_clip local dir), "checkpoint" (clipa step
    checkpoint directory) or "file" (a state-dict file). A run directory resolves to its
    exported `final/` if present, else its newest complete checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise ClipaError(f"{key}: {path} does not exist; give a clipa run directory, a checkpoint or an exported model")
    if path.is_file():
        return path, "file"
    if (path / EXPORT_CONFIG).is_file():
        if export_weights_file(path) is not None:
            return path, "export"
        raise ClipaError(f"{key}: {path} has {EXPORT_CONFIG} but no weights file next to it ({EXPORT_WEIGHTS}, "
                         "open_clip_pytorch_model.bin or another .safetensors/.bin/.pth open_clip loads); copy the "
                         "weights into that directory")
    if is_complete(path):
        return path, "checkpoint"
    if (path / FINAL_DIR / EXPORT_CONFIG).is_file():
        return path / FINAL_DIR, "export"
    latest = newest_loadable(path / CHECKPOINTS_DIR)
    if latest is not None:
        return latest, "checkpoint"
    raise ClipaError(
        f"{key}: {path} holds no model (no final/, no complete checkpoints/step_*, no {EXPORT_CONFIG}); "
        "point it at a finished clipa run or an exported model"
    )


def export_weights_file(directory: Path) -> Path | None:
    """The weights file open_clip's `local-dir:` loading picks in an open_clip directory: clipa's
    open_clip_model.safetensors, or what a Hugging Face snapshot holds (open_clip_pytorch_model.bin, ...)."""
    from open_clip.factory import _find_checkpoint_in_dir  # open_clip's own search order and names

    found = _find_checkpoint_in_dir(Path(directory))
    return Path(found) if found else None


def read_weights_file(path: Path) -> dict:
    """A state dict from a weights file, read so that nothing in it can run code: safetensors, else
    torch's restricted unpickler (`weights_only=True`) and nothing else. Not open_clip's or timm's
    loaders: open_clip retries a failing restricted load with the plain unpickler (a pickle made to
    raise TypeError there runs its payload), so no weights file may reach it."""
    from safetensors.torch import load_file

    from clipa.model.safeload import load_plain  # torch-only; the restricted load and its one-line refusal

    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        checkpoint = load_plain(path, mmap=False)  # mmap needs the zip format; older .bin files are not
    except ClipaError:
        raise
    except Exception as err:  # noqa: BLE001 - truncated, not a weights file, a pickle that fails: the same user error
        raise ClipaError(f"{path}: cannot read weights ({type(err).__name__}: {first_line(err, 200)}); give an open_clip, "
                         "timm or safetensors weights file") from None
    # The layouts open_clip's load_state_dict accepts: {"state_dict": ...} (training scripts), "module." (DDP).
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ClipaError(f"{path}: cannot read weights (it holds {type(checkpoint).__name__}, not a state dict); give an "
                         "open_clip, timm or safetensors weights file")
    if str(next(iter(checkpoint))).startswith("module."):
        checkpoint = {k[len("module."):]: v for k, v in checkpoint.items()}
    return checkpoint


def read_state_dict(path: Path, kind: str) -> dict:
    from safetensors.torch import load_file

    if kind == "export":
        if (path / EXPORT_WEIGHTS).is_file():
            return load_file(str(path / EXPORT_WEIGHTS))
        path = export_weights_file(path)  # e.g. open_clip_pytorch_model.bin: read below like any weights file
    if kind == "checkpoint":
        from clipa.model.sharded import read_model_state  # an FSDP run's checkpoint: DCP shards

        if (path / SHARDED_DIR).is_dir():
            return read_model_state(path / SHARDED_DIR)
        return load_file(str(path / MODEL_FILE))
    return read_weights_file(Path(path))


def model_from_checkpoint(path: Path):
    """(model, recipe, geometry, model config) of a step checkpoint: its recipe rebuilds the model it trained."""
    from clipa.model.build import create_model, recipe_model_config

    recipe = read_run_recipe(path)
    geometry, model_cfg = recipe_model_config(recipe)
    model = create_model(model_cfg)
    try:
        model.load_state_dict(read_state_dict(path, "checkpoint"))
    except RuntimeError as err:  # shape or name mismatch: the files of two different checkpoints
        raise ClipaError(f"{path}: its weights do not fit the model its {CONFIG_FILE} describes "
                         f"({first_line(err, 120)}); the checkpoint is damaged or assembled from two runs") from None
    return model, recipe, geometry, model_cfg


def load_weights(model: torch.nn.Module, state_dict: dict, key: str = "init.checkpoint") -> None:
    """Load weights from another stage, resizing image (bicubic) and text (linear) position embeddings."""
    state_dict = dict(state_dict)
    try:
        resize_pos_embed(state_dict, model)
        resize_text_pos_embed(state_dict, model)
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except (AssertionError, RuntimeError, ValueError) as err:
        # open_clip's resizers assert on a width change; load_state_dict raises on shape mismatches.
        reason = first_line(err, 200) or type(err).__name__
        raise ClipaError(f"{key}: weights do not match the architecture ({reason}); check model.arch (and "
                         "model.vision_cfg / text_cfg) against the run or model that produced them") from None
    if missing or unexpected:
        raise ClipaError(
            f"{key}: weights do not match the architecture (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); check model.arch (and model.vision_cfg / text_cfg) against the run that produced "
            "them"
        )
    refresh_sincos(model)  # a fixed sin-cos grid is recomputed for this resolution, never interpolated


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_safetensors(state_dict: dict, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(path))
    fsync_file(path)


def preprocess_cfg(image_size, data=None) -> dict:
    """open_clip's `preprocess_cfg` for a model trained with `data` (a recipe's `DataConfig`; None = its
    defaults): the mean/std of `data.normalize` and the crop's `data.augment.interpolation`, so that
    `open_clip.create_model_and_transforms("local-dir:...")` preprocesses as training did. Evaluation
    resizes the shortest side and center-crops (open_clip's default), as clipa's own evaluation does."""
    from clipa.recipe.schema import DataConfig, image_mean_std

    data = DataConfig() if data is None else data
    mean, std = image_mean_std(data)
    return {"size": image_size, "mean": list(mean), "std": list(std),
            "interpolation": data.augment.interpolation, "resize_mode": "shortest"}


def trained_mean_std(path: str | Path) -> tuple[list, list] | None:
    """The image mean/std the weights at `path` were trained with: a clipa run's or checkpoint's
    `data.normalize`, an export's `preprocess_cfg`; None for a bare weights file (it does not say)."""
    where, kind = find_weights(path)
    if kind == "export":
        pre = json.loads((where / EXPORT_CONFIG).read_text(encoding="utf-8")).get("preprocess_cfg", {})
        return (list(pre["mean"]), list(pre["std"])) if "mean" in pre and "std" in pre else None
    if kind == "checkpoint":
        from clipa.recipe.schema import image_mean_std

        return tuple(list(v) for v in image_mean_std(read_run_recipe(where).data))
    return None


def export_open_clip(model: torch.nn.Module, model_cfg: dict, out_dir: str | Path, readme: str | None = None,
                     state_dict: dict | None = None, data=None, replace: bool = True) -> Path:
    """Write an open_clip `local-dir:` directory atomically (temp dir, fsync, rename).

    `replace` (the trainer's `final/`, in the run directory it holds the lock of): the temporary and
    the set-aside names are fixed per destination, so the next export removes what a killed one left
    behind, and a failed one removes its own. Without it (`clipa export OUT`, into a folder clipa does
    not own): the temporary folder is new (a unique name beside OUT), nothing else is deleted, and an
    OUT that another writer filled meanwhile is not replaced.

    A Hugging Face tokenizer (CLIPA-v2's BERT) is saved into the directory too: open_clip's
    `get_tokenizer("local-dir:...")` reads it from there, not from the name in the config.
    `readme` is the model card (README.md), if any. `state_dict`: the weights, when `model`'s own are
    sharded (FSDP gathers them first); default `model.state_dict()`. `data`: the recipe's `DataConfig`, whose
    normalisation and interpolation the export's `preprocess_cfg` records (`preprocess_cfg`).
    """
    out_dir = Path(out_dir)
    old = out_dir.with_name(f".{out_dir.name}.old")
    if replace:
        tmp = out_dir.with_name(f".{out_dir.name}.tmp")
        if old.exists() and not out_dir.exists():
            old.rename(out_dir)  # killed between the two renames below: the previous export is whole
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        if replace:
            tmp.mkdir(parents=True)
        else:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg(model_cfg["vision_cfg"]["image_size"], data)}
        (tmp / EXPORT_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
        write_safetensors(model.state_dict() if state_dict is None else state_dict, tmp / EXPORT_WEIGHTS)
        text_cfg = model_cfg["text_cfg"]
        if text_cfg.get("hf_tokenizer_name"):
            tokenizer = hf_tokenizer(text_cfg["hf_tokenizer_name"], text_cfg, text_cfg.get("context_length", 77),
                                     "model_cfg")
            tokenizer.tokenizer.save_pretrained(str(tmp))
        if readme is not None:
            (tmp / "README.md").write_text(readme, encoding="utf-8")
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not replace:
        try:
            os.rename(tmp, out_dir)  # onto nothing or an empty folder; a filled one raises
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ClipaError(f"OUT: {out_dir} cannot take the export ({err.strerror}); another export may have "
                             "written it meanwhile. Nothing was replaced; choose a new directory") from None
    elif out_dir.exists():
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old)
    else:
        tmp.rename(out_dir)
    fsync_dir(out_dir.parent)
    return out_dir
