"""Analytic training FLOPs of an open_clip ViT + text transformer, per sample.

Counts matmuls only, 2 FLOPs per multiply-add, as `torch.utils.flop_counter.FlopCounterMode`
counts them (tests/test_plan.py checks the forward and the training step of the tiny model
against it, exactly):

    image  patch embedding (every patch, before masking), per layer: q/k/v + output projections
           (4 w^2 per token), attention scores and values (2 n^2 w each), MLP (2 w mlp per token);
           the projection of the pooled feature to the joint space.
    text   the same per layer at the stage's text length; the token embedding is a lookup (0 FLOPs).

Training = forward + backward, and the backward costs two forwards (input and weight gradients),
except for the patch embedding, whose input is the image and needs no gradient (weight gradient
only). That is *model* FLOPs, the numerator of MFU: activation recomputation (gradient
checkpointing) and clipa's exact-accumulation re-forward are extra hardware work, not counted.
Layer norms, softmax, GELU and the contrastive logits (2 x batch x embed per sample, < 0.3 %
at CLIPA's sizes) are left out.

A timm image tower (`model.image_tower`) has no analytic formula here: its forward is counted once
by FlopCounterMode on the meta device (shapes only: no memory, no weights). For a timm ViT with
patch masking the count runs with the kept tokens in timm's `patch_drop` slot, where clipa's masker
sits in training (prefix tokens kept, the patch embedding still over every patch).
"""

from __future__ import annotations

import functools


def image_tokens(model_cfg: dict, image_size: int, keep_ratio: float = 1.0) -> int:
    """Tokens the vision transformer runs on: kept patches (as the masker keeps them) + class token."""
    from clipa.reduction.image import keep_count

    v = model_cfg["vision_cfg"]
    if "timm_model_name" in v:  # a timm ViT: its (kept) patches + prefix tokens; a CNN: 0 (no tokens)
        return _timm_count(v["timm_model_name"], image_size, keep_ratio)[1]
    patches = (image_size // v["patch_size"]) ** 2
    return keep_count(patches, 1.0 - keep_ratio) + 1


@functools.lru_cache(maxsize=32)
def _timm_count(name: str, image_size: int, keep_ratio: float = 1.0) -> tuple[float, int, int]:
    """(forward FLOPs, tokens, feature width) of a timm trunk as open_clip builds it (num_classes=0)."""
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from clipa.model.masking import timm_patch_slot
    from clipa.reduction.image import keep_count

    class _KeepFirst(torch.nn.Module):
        """Stands in for clipa's patch masker while counting: keeps the first `n` tokens."""

        def __init__(self, n: int):
            super().__init__()
            self.n = n

        def forward(self, x):
            return x[:, : self.n]

    with torch.device("meta"):
        trunk = timm.create_model(name, pretrained=False, num_classes=0)
        default = trunk.default_cfg.get("input_size", (3, image_size, image_size))[-1]
        if image_size != default and hasattr(trunk, "set_input_size"):
            trunk.set_input_size(img_size=(image_size, image_size))
        trunk.eval()  # one sample: train-mode BatchNorm refuses a 1x1 map of batch 1 (ResNet at 32 px)
        grid = getattr(getattr(trunk, "patch_embed", None), "grid_size", None)
        prefix = getattr(trunk, "num_prefix_tokens", 0)
        tokens = grid[0] * grid[1] + prefix if grid else 0
        if grid and keep_ratio < 1.0 and timm_patch_slot(trunk):  # where training can mask
            tokens = prefix + keep_count(grid[0] * grid[1], 1.0 - keep_ratio)
            trunk.patch_drop = _KeepFirst(tokens)  # which tokens are kept does not change the count
        with FlopCounterMode(display=False) as counter:
            trunk(torch.empty(1, 3, image_size, image_size))
    return float(counter.get_total_flops()), int(tokens), int(trunk.num_features)


def _mlp_width(cfg: dict) -> int:
    return int(cfg.get("width", 512) * cfg.get("mlp_ratio", 4.0))  # open_clip's rounding (bigG: 4.9231)


def forward_breakdown(model_cfg: dict, image_size: int, context_length: int, keep_ratio: float = 1.0) -> dict:
    """Forward matmul FLOPs per sample by tower and part (all floats)."""
    v, t, embed = model_cfg["vision_cfg"], model_cfg["text_cfg"], model_cfg["embed_dim"]
    if "timm_model_name" in v:
        trunk, _, features = _timm_count(v["timm_model_name"], image_size, keep_ratio)
        parts = {"image_trunk": trunk, "image_head": 2.0 * features * embed}
    else:
        vw, vl = v["width"], v["layers"]
        n_img = image_tokens(model_cfg, image_size, keep_ratio)
        all_patches = (image_size // v["patch_size"]) ** 2  # the patch embedding runs before masking
        parts = {
            "image_patch_embed": 2.0 * all_patches * 3 * v["patch_size"] ** 2 * vw,
            "image_attention_proj": 2.0 * vl * n_img * 4 * vw * vw,
            "image_attention_scores": 2.0 * vl * 2 * n_img * n_img * vw,
            "image_mlp": 2.0 * vl * n_img * 2 * vw * _mlp_width(v),
            "image_head": 2.0 * vw * embed,
        }
    tw, tl, n_txt = t.get("width", 512), t.get("layers", 12), context_length
    parts.update({
        "text_attention_proj": 2.0 * tl * n_txt * 4 * tw * tw,
        "text_attention_scores": 2.0 * tl * 2 * n_txt * n_txt * tw,
        "text_mlp": 2.0 * tl * n_txt * 2 * tw * _mlp_width(t),
        "text_head": 2.0 * tw * embed,
    })
    return parts


def train_flops(model_cfg: dict, image_size: int, context_length: int, keep_ratio: float = 1.0) -> dict:
    """Training (forward + backward) model FLOPs per sample: {"image", "text", "total"}."""
    parts = forward_breakdown(model_cfg, image_size, context_length, keep_ratio)
    # Backward = input gradient + weight gradient, one forward each; the patch embedding's input
    # (the pixels) needs no gradient.
    factor = {k: (2.0 if k == "image_patch_embed" else 3.0) for k in parts}
    vision = sum(factor[k] * v for k, v in parts.items() if k.startswith("image_"))
    text = sum(factor[k] * v for k, v in parts.items() if k.startswith("text_"))
    return {"image": vision, "text": text, "total": vision + text}


def train_flops_per_sample(model_cfg: dict, image_size: int, context_length: int, keep_ratio: float = 1.0) -> float:
    return train_flops(model_cfg, image_size, context_length, keep_ratio)["total"]
