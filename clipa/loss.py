"""Contrastive losses with global negatives.

Each process computes the loss for its own rows against the columns of the whole global batch
(the "local loss" form). Features from other processes arrive through an all-gather that carries
gradients, so after DDP averages the gradients over processes they equal the gradients of the
single-process loss over the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_features(features: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All features of the global batch (with gradient) and this process's row offset."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, 0
    import torch.distributed.nn.functional as dist_nn

    gathered = dist_nn.all_gather(features)
    return torch.cat(gathered, dim=0), dist.get_rank() * features.shape[0]


def infonce_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP over the global batch; features are L2-normalised.

    Computed in fp32 whatever the autocast dtype: the softmax over tens of thousands of
    columns is where bf16 loses precision.
    """
    image_features, text_features = image_features.float(), text_features.float()
    all_images, offset = gather_features(image_features)
    all_texts, _ = gather_features(text_features)
    scale = logit_scale.float()
    logits_per_image = scale * image_features @ all_texts.T
    logits_per_text = scale * text_features @ all_images.T
    labels = torch.arange(image_features.shape[0], device=image_features.device) + offset
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))
