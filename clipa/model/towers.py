"""Starting from pretrained towers (BASIC / LiT): image-tower weights from a file, and locking.

BASIC initialises the image tower from a classifier pretrained on a large labelled set and then
trains both towers contrastively; LiT locks the pretrained image tower and trains only the text
side. open_clip provides the timm tower adapter and the locking (`lock_image_tower`,
`lock_text_tower`); this module loads the weights (no downloads: a local file or another clipa
model) and applies the recipe's locks. Locked parameters get requires_grad=False, so they have no
gradients and no optimizer state.
"""

from __future__ import annotations

from pathlib import Path

import torch
from open_clip.model import resize_pos_embed

from clipa.errors import ClipaError
from clipa.model.weights import find_weights, read_state_dict

_HEAD_PREFIXES = ("head.", "fc.", "classifier.", "head_drop.", "pre_logits.")


def check_image_init(source: str) -> None:
    """A missing image_init is an error before any work: clipa never downloads weights."""
    if source and not Path(source).exists():
        raise ClipaError(f"model.image_init: {source} does not exist; give a timm checkpoint, a safetensors/.pt "
                         "state dict, or a clipa run / exported model whose image tower to use (nothing is downloaded)")


def _source_state_dict(source: str) -> dict:
    check_image_init(source)
    path = Path(source)
    if path.is_dir():
        return read_state_dict(*find_weights(path, key="model.image_init"))
    return read_state_dict(path, "file")


def load_image_tower(model: torch.nn.Module, source: str) -> int:
    """Load image-tower weights into `model.visual`; returns how many tensors were loaded."""
    state = _source_state_dict(source)
    tower = model.visual
    if any(k.startswith("visual.") for k in state):  # a whole CLIP model: take its image tower
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    timm_tower = hasattr(tower, "trunk")
    if timm_tower:
        target = tower.trunk
        state = {k[len("trunk."):] if k.startswith("trunk.") else k: v for k, v in state.items()
                 if not k.startswith(_HEAD_PREFIXES) and not k.startswith("head.")}
        state = {k: v for k, v in state.items() if not k.startswith("proj")}  # open_clip's projection stays new
        pos = state.get("pos_embed")
        if pos is not None and pos.shape != target.pos_embed.shape:
            from timm.layers import resample_abs_pos_embed

            state["pos_embed"] = resample_abs_pos_embed(
                pos, new_size=list(target.patch_embed.grid_size),
                num_prefix_tokens=0 if getattr(target, "no_embed_class", False) else target.num_prefix_tokens)
    else:
        target = tower
        wrapped = {f"visual.{k}": v for k, v in state.items()}
        resize_pos_embed(wrapped, model)  # open_clip's bicubic resize, class token kept
        state = {k[len("visual."):]: v for k, v in wrapped.items()}
    missing, unexpected = target.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise ClipaError(f"model.image_init: {source} does not fit the image tower (missing {list(missing)[:3]}, "
                         f"unexpected {list(unexpected)[:3]}); check model.arch / model.image_tower")
    return len(state)


def apply_locks(model: torch.nn.Module, model_cfg) -> None:
    """open_clip's locks. With lock_image_freeze_norm (the default) the locked groups' BatchNorm layers
    become FrozenBatchNorm2d: in train mode they still normalise with the pretrained running statistics
    and never update them, so "locked" means the tower's function is fixed, not only its weights.
    (Checkpoints then hold no `num_batches_tracked` for them; plain BatchNorm loads them as they are.)"""
    if model_cfg.lock_image:
        model.lock_image_tower(unlocked_groups=model_cfg.lock_image_unlocked_groups,
                               freeze_bn_stats=model_cfg.lock_image_freeze_norm)
    if model_cfg.lock_text:
        model.lock_text_tower(unlocked_layers=model_cfg.lock_text_unlocked_groups)  # open_clip counts groups
