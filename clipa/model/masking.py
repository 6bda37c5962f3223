"""Putting a patch mask into a vision tower: `PatchMasker` in open_clip's `patch_dropout` slot (or a timm
ViT's `patch_drop` slot). Which patches each sample keeps is chosen by clipa.reduction.image, in the data
workers; this module only applies the indices it is handed.
"""

from __future__ import annotations

import torch
from torch import nn

from clipa.reduction.image import IMAGE_MASKS


class PatchMasker(nn.Module):
    """Drops patch tokens after position embedding; sits in open_clip's `patch_dropout` slot.

    The data loader draws each sample's mask (from that sample's own seed, in the loader
    workers, off the training step's critical path) and the trainer hands the batch's indices
    over with `use(keep)` before the forward. Re-forwarding the same micro-batch with the same
    indices therefore sees the same tokens, as exact gradient accumulation requires.
    """

    def __init__(self, strategy: str, mask_ratio: float, grid: tuple[int, int], prefix_tokens: int = 1):
        super().__init__()
        self.strategy, self.mask_ratio, self.grid = strategy, mask_ratio, tuple(grid)
        self.prefix_tokens = prefix_tokens  # class/register tokens ahead of the patches, always kept
        self.keep: torch.Tensor | None = None

    def use(self, keep: torch.Tensor | None) -> None:
        self.keep = keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.mask_ratio == 0.0:
            return x  # evaluation always sees every patch, as in CLIPA
        if self.keep is None:
            raise RuntimeError("PatchMasker: call use(keep_indices) before a training forward")
        if self.keep.shape[0] != x.shape[0]:
            raise RuntimeError(f"PatchMasker: {self.keep.shape[0]} masks for a batch of {x.shape[0]}")
        prefix, patches = x[:, :self.prefix_tokens], x[:, self.prefix_tokens:]
        index = self.keep.to(x.device).unsqueeze(-1).expand(-1, -1, patches.shape[-1])
        return torch.cat([prefix, torch.gather(patches, 1, index)], dim=1)


def timm_patch_slot(trunk: nn.Module | None) -> bool:
    """Whether a timm trunk has the ViT token path masking needs: patch_embed -> _pos_embed ->
    patch_drop -> norm_pre -> blocks (timm's VisionTransformer and its subclasses such as DeiT).
    Other timm families (ResNet, ConvNeXt, EVA with its index-returning patch_drop...) have no slot
    a plain token mask fits."""
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(trunk, VisionTransformer) and not getattr(trunk, "dynamic_img_size", False)


def install_patch_masker(model: nn.Module, strategy: str, mask_ratio: float) -> PatchMasker | None:
    """Put a PatchMasker into the model's vision tower; None when nothing is masked."""
    if strategy not in IMAGE_MASKS or mask_ratio == 0.0:
        return None
    visual = model.visual
    if hasattr(visual, "patch_dropout") and hasattr(visual, "grid_size"):  # open_clip's own ViT
        masker = PatchMasker(strategy, mask_ratio, visual.grid_size)
        visual.patch_dropout = masker
        return masker
    trunk = getattr(visual, "trunk", None)  # open_clip's TimmModel adapter
    if timm_patch_slot(trunk):
        # After the position embedding, so kept patches carry their own positions; timm puts the
        # class and register tokens first (`num_prefix_tokens`), and they are always kept.
        masker = PatchMasker(strategy, mask_ratio, trunk.patch_embed.grid_size, trunk.num_prefix_tokens)
        trunk.patch_drop = masker
        return masker
    from clipa.errors import ClipaError

    if trunk is not None:
        name = getattr(trunk, "pretrained_cfg", {}).get("architecture") or type(trunk).__name__
        raise ClipaError(f"reduction.image: \"{strategy}\" masking needs a ViT image tower with patch tokens; timm model "
                         f"\"{name}\" ({type(trunk).__name__}) has none to drop; use reduction.image=\"resize\" "
                         "(a smaller reduction.image_size) to reduce its tokens")
    raise ClipaError(f"reduction.image: \"{strategy}\" masking needs an open_clip ViT image tower; "
                     f"{type(visual).__name__} has no patch tokens to drop; use reduction.image=\"resize\"")
