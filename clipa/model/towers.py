"""Starting from pretrained towers (BASIC / LiT): image-tower weights, and locking.

BASIC initialises the image tower from a classifier pretrained on a large labelled set and then
trains both towers contrastively; LiT locks the pretrained image tower and trains only the text
side. open_clip provides the timm tower adapter and the locking (`lock_image_tower`,
`lock_text_tower`); this module loads the weights (a published timm tag `timm:NAME.TAG`, which timm
downloads and caches, an open_clip `ARCH:TAG` / `hf-hub:` model whose image tower is taken, a local
file, or another clipa model) and applies the recipe's locks. Locked parameters get requires_grad=False, so they have no
gradients and no optimizer state.
"""

from __future__ import annotations

from pathlib import Path

import torch
from open_clip.model import resize_pos_embed

from clipa.errors import ClipaError
from clipa.model import published
from clipa.model.weights import find_weights, read_state_dict

_HEAD_PREFIXES = ("head.", "fc.", "classifier.", "head_drop.", "pre_logits.")


def check_image_init(source: str, timm_tower: str = "") -> str | None:
    """Check model.image_init before any work, without downloading: a published name must resolve (and a
    timm tag must be of the recipe's timm tower), a local path must exist. Returns a line saying whether
    published weights are cached (None for a local path)."""
    if not source:
        return None
    pub = published.parse(source, "model.image_init")
    if pub is None:
        if not Path(source).exists():
            raise ClipaError(f"model.image_init: {source} does not exist; give a published timm tag (timm:NAME.TAG), "
                             "a timm checkpoint, a safetensors/.pt state dict, or a clipa run / exported model whose "
                             "image tower to use")
        return None
    if pub.kind == "timm" and pub.name != timm_tower:
        fix = (f"set model.image_tower = \"{pub.name}\"" if not timm_tower else
               f"use timm:{timm_tower}.TAG or model.image_tower = \"{pub.name}\"")
        raise ClipaError(f"model.image_init: {source} holds timm {pub.name} weights, but the image tower is "
                         f"{'timm ' + timm_tower if timm_tower else 'open_clip' + chr(39) + 's own'}; {fix}")
    return published.cache_note(pub)


def _source_state_dict(source: str, timm_tower: str) -> dict:
    check_image_init(source, timm_tower)
    pub = published.parse(source, "model.image_init")
    if pub is not None:
        return published.state_dict(source, "model.image_init")
    path = Path(source)
    if path.is_dir():
        return read_state_dict(*find_weights(path, key="model.image_init"))
    return read_state_dict(path, "file")


def load_image_tower(model: torch.nn.Module, source: str, timm_tower: str = "") -> int:
    """Load image-tower weights into `model.visual` (a timm tower named `timm_tower`, or open_clip's own);
    returns how many tensors were loaded."""
    tower = model.visual
    state = _source_state_dict(source, timm_tower)
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
