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
    try:  # torch >= 2.3: the supported differentiable all-gather
        from torch.distributed._functional_collectives import all_gather_tensor_autograd

        gathered = all_gather_tensor_autograd(features.contiguous(), gather_dim=0, group=dist.group.WORLD)
    except ImportError:  # pragma: no cover - older torch
        import torch.distributed.nn.functional as dist_nn

        gathered = torch.cat(dist_nn.all_gather(features), dim=0)
    return gathered, dist.get_rank() * features.shape[0]


# Rows of the logit matrix computed at once. Above this the loss runs in row chunks, each
# recomputed in the backward pass (activation checkpointing), so memory grows with
# CHUNK x global batch instead of local batch x global batch: at a 65,536 global batch the full
# matrices would take tens of GB per process.
CHUNK_ROWS = 256


def _chunked_sum(fn, rows: torch.Tensor, *args) -> torch.Tensor:
    """sum_k fn(rows[k:k+CHUNK], k, *args), keeping at most one chunk's logits alive."""
    if rows.shape[0] <= CHUNK_ROWS:
        return fn(rows, 0, *args)
    from torch.utils.checkpoint import checkpoint

    total = rows.new_zeros(())
    for start in range(0, rows.shape[0], CHUNK_ROWS):
        total = total + checkpoint(fn, rows[start:start + CHUNK_ROWS], start, *args, use_reentrant=False)
    return total


def _ce_sum(queries: torch.Tensor, start: int, keys: torch.Tensor, scale: torch.Tensor, offset: int) -> torch.Tensor:
    logits = scale * queries @ keys.T
    labels = torch.arange(start, start + queries.shape[0], device=queries.device) + offset
    return F.cross_entropy(logits, labels, reduction="sum")


def infonce_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP over the global batch; features are L2-normalised.

    Computed in fp32 whatever the autocast dtype: the softmax over tens of thousands of
    columns is where bf16 loses precision.
    """
    image_features, text_features = image_features.float(), text_features.float()
    all_images, offset = gather_features(image_features)
    all_texts, _ = gather_features(text_features)
    return infonce_against(image_features, text_features, all_images, all_texts, logit_scale, offset)


def infonce_against(image_features: torch.Tensor, text_features: torch.Tensor, image_columns: torch.Tensor,
                    text_columns: torch.Tensor, logit_scale: torch.Tensor, offset: int) -> torch.Tensor:
    """Symmetric InfoNCE of this process's (fp32) rows against the given columns: image rows against
    `text_columns`, text rows against `image_columns`; row i's positive is column offset + i.
    `infonce_loss` passes the global batch; the queue loss passes the batch plus its queue."""
    scale = logit_scale.float()
    n = image_features.shape[0]
    image_to_text = _chunked_sum(_ce_sum, image_features, text_columns, scale, offset)
    text_to_image = _chunked_sum(_ce_sum, text_features, image_columns, scale, offset)
    return 0.5 * (image_to_text + text_to_image) / n


def _sigmoid_sum(queries: torch.Tensor, start: int, keys: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                 offset: int) -> torch.Tensor:
    logits = scale * queries @ keys.T + bias
    rows = torch.arange(queries.shape[0], device=queries.device)
    labels = -torch.ones_like(logits)
    labels[rows, rows + start + offset] = 1.0
    return -F.logsigmoid(labels * logits).sum()


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Sigmoid loss of SigLIP: every (image, text) pair is an independent binary decision.

    Local images against the texts of the whole global batch, summed over pairs and divided by
    the local batch size: the mean over processes is then the single-process loss over the
    global batch, -sum_ij log sigmoid(y_ij (t x_i.y_j + b)) / B.
    """
    if logit_bias is None:
        raise ValueError("siglip_loss needs the model's logit_bias (build the model with loss.kind = 'siglip')")
    image_features, text_features = image_features.float(), text_features.float()
    all_texts, offset = gather_features(text_features)
    total = _chunked_sum(_sigmoid_sum, image_features, all_texts, logit_scale.float(), logit_bias.float(), offset)
    return total / image_features.shape[0]


LOSSES = {"infonce": infonce_loss, "siglip": siglip_loss}
