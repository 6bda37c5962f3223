"""AdamW with CLIP's weight-decay exclusions and a per-step warmup + cosine schedule."""

from __future__ import annotations

import math

import torch

# Embedding tables by parameter name: open_clip's text tokens and positions, image positions; timm's image positions.
_EMBEDDINGS = ("token_embedding.weight", "positional_embedding", "pos_embed")


def no_decay(name: str, param: torch.nn.Parameter, decay_embeddings: bool = True) -> bool:
    """Gains, biases, the logit scale (and any 0-/1-D tensor) take no weight decay, as in CLIP. With
    `decay_embeddings` False the token and position embedding tables take none either, so only the weight
    matrices of layers decay, as in CLIPA's JAX code (its decay mask is `.*/kernel`)."""
    if not decay_embeddings and name.endswith(_EMBEDDINGS):
        return True
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def build_optimizer(model: torch.nn.Module, optim_cfg) -> torch.optim.AdamW:
    decay, other = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (other if no_decay(name, param, optim_cfg.decay_embeddings) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": optim_cfg.weight_decay},
        {"params": other, "weight_decay": 0.0},
    ]
    kwargs = dict(lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)
    try:
        # The fused kernel: one pass over each tensor for the whole update. On this 2-core CPU it
        # takes a ViT-B/16 step in 0.10 s, against 0.46 s for foreach kernels and 0.38 s for
        # torch's CPU default, the per-tensor loop open_clip_train uses (GPUs gain similarly).
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # a device or torch without the fused kernel (CPU before torch 2.4)
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Linear warmup from 0, then cosine to 0 (or constant). `step` counts from 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, optim_cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, optim_cfg.warmup_steps, total_steps, optim_cfg.schedule)
    )
