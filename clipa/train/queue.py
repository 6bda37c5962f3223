"""More negatives without bigger batches: feature queues and a momentum encoder.

memory_bank  FIFO queues of the online model's own (detached) image and text features from
             past steps, used as extra negatives. Cheap, but the features were made by older
             weights, and a fast-changing encoder makes them stale.
momentum     MoCo/ALBEF: an exponential moving average of both towers computes the keys, under
             no_grad and *before* the online forward (its activations are freed before the
             online graph is built, which keeps peak memory down). Image->text logits run over
             the batch's momentum text keys plus the text queue, text->image over the momentum
             image keys plus the image queue; slowly moving keys stay consistent with the queue.

With exact accumulation the keys of the whole global batch (gathered from every process, in rank
order) are enqueued once per optimizer step, after the loss; a skipped (non-finite) step
enqueues nothing and leaves the EMA alone. Queues, pointer and momentum weights are part of the
checkpoint, so a resumed run continues identically.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from clipa.model.masking import PatchMasker
from clipa.train.loss import gather_features, infonce_against


def gather_no_grad(features: torch.Tensor) -> torch.Tensor:
    """All processes' rows in rank order, without autograd (keys and queue entries need none)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    parts = [torch.empty_like(features) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, features.contiguous())
    return torch.cat(parts)


class FeatureQueues:
    """One FIFO queue per modality; its size is a multiple of the global batch, so a step's
    features are written in one slice and the queue wraps exactly at its end."""

    def __init__(self, size: int, dim: int, device):
        self.images = torch.zeros(size, dim, device=device)
        self.texts = torch.zeros(size, dim, device=device)
        self.pointer, self.filled = 0, 0

    @property
    def size(self) -> int:
        return self.images.shape[0]

    @torch.no_grad()
    def enqueue(self, images: torch.Tensor, texts: torch.Tensor) -> None:
        n = images.shape[0]
        if self.size % n:
            raise ValueError(f"queue size {self.size} is not a multiple of the {n} features enqueued per step")
        self.images[self.pointer:self.pointer + n] = images.detach().float()
        self.texts[self.pointer:self.pointer + n] = texts.detach().float()
        self.pointer = (self.pointer + n) % self.size
        self.filled = min(self.size, self.filled + n)

    def negatives(self, step: int, warmup_steps: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The queue's negatives for this step, or None while it may not join the loss yet."""
        if self.filled == self.size or (warmup_steps and step >= warmup_steps and self.filled):
            # Order is irrelevant to the loss; the filled slots are the first `filled` rows.
            return self.images[:self.filled], self.texts[:self.filled]
        return None

    def state_dict(self) -> dict:
        return {"images": self.images.cpu(), "texts": self.texts.cpu(), "pointer": self.pointer, "filled": self.filled}

    def load_state_dict(self, state: dict) -> None:
        self.images.copy_(state["images"])
        self.texts.copy_(state["texts"])
        self.pointer, self.filled = int(state["pointer"]), int(state["filled"])


class MomentumEncoder:
    """An EMA copy of both towers (and of the patch masker, so keys see the same tokens)."""

    def __init__(self, model: torch.nn.Module, momentum: float):
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)
        self.model.train()  # same token reduction as the online model; no dropout in CLIP towers
        self.momentum = momentum
        # The copy's own masker (open_clip ViT's patch_dropout or a timm ViT's patch_drop slot), fed
        # the online model's indices, so keys see exactly the tokens the online forward sees.
        self.masker = next((m for m in self.model.modules() if isinstance(m, PatchMasker)), None)

    @torch.no_grad()
    def keys(self, micro_batches, autocast) -> tuple[torch.Tensor, torch.Tensor]:
        images, texts = [], []
        for batch_images, batch_texts, keep in micro_batches:
            if keep is not None:
                self.masker.use(keep)
            with autocast():
                out = self.model(batch_images, batch_texts)
            images.append(out["image_features"].float())
            texts.append(out["text_features"].float())
        return gather_no_grad(torch.cat(images)), gather_no_grad(torch.cat(texts))

    @torch.no_grad()
    def update(self, online: torch.nn.Module) -> None:
        """theta_m <- m * theta_m + (1 - m) * theta (one fused multi-tensor op)."""
        ema = [p for p in self.model.parameters()]
        current = [p.detach() for p in online.parameters()]
        torch._foreach_lerp_(ema, current, 1.0 - self.momentum)


class QueuedNegatives:
    """The recipe's `[loss.queue]` in a run: the queues (None for kind "none"), the momentum encoder (kind
    "momentum"), each step's loss with them and what follows its update, and the checkpoint part `queue`."""

    def __init__(self, cfg, embed_dim: int, device, model: torch.nn.Module):
        self.warmup_steps = cfg.warmup_steps
        self.queues = FeatureQueues(cfg.size, embed_dim, device) if cfg.kind != "none" else None
        self.momentum = None
        if cfg.kind == "momentum":  # starts as a copy of the online weights (a restore then loads its own)
            self.momentum = MomentumEncoder(model, cfg.momentum)
            self.momentum.model.to(device)

    def step_loss(self, micro_batches, step: int, online: torch.nn.Module, autocast):
        """This step's loss function (None: the plain loss) and what to do after its update: with queues,
        momentum keys (computed before the online forward) and the queue's negatives join the InfoNCE columns."""
        if self.queues is None:
            return None, lambda: None
        keys = self.momentum.keys(micro_batches, autocast) if self.momentum else None
        negatives = self.queues.negatives(step, self.warmup_steps)
        captured: list = []

        def loss_fn(images, texts, scale, bias=None):
            return queue_infonce_loss(images, texts, scale, keys, negatives, captured)

        def after_update() -> None:  # EMA update, then enqueue the step's keys (or online features)
            if self.momentum is not None:
                self.momentum.update(online)
                self.queues.enqueue(*keys)
            else:
                self.queues.enqueue(*captured)
        return loss_fn, after_update

    def state_dict(self) -> dict | None:
        if self.queues is None:
            return None
        return {"queues": self.queues.state_dict(),
                "momentum": self.momentum.model.state_dict() if self.momentum is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if self.queues is None:
            return
        self.queues.load_state_dict(state["queues"])
        if self.momentum is not None:
            self.momentum.model.load_state_dict(state["momentum"])


def queue_infonce_loss(image_features, text_features, logit_scale, keys=None, negatives=None,
                       captured: list | None = None) -> torch.Tensor:
    """InfoNCE whose columns are the batch (momentum keys, or the online features) plus the queue.

    Local rows against global columns as in `infonce_loss`; the positive of row i is column
    offset + i, the batch's own pair. `captured` receives the gathered online features, for the
    memory bank to enqueue after the step.
    """
    image_features, text_features = image_features.float(), text_features.float()
    all_images, offset = gather_features(image_features)
    all_texts, _ = gather_features(text_features)
    if captured is not None:
        captured[:] = [all_images.detach(), all_texts.detach()]
    image_columns, text_columns = keys if keys is not None else (all_images, all_texts)
    if negatives is not None:
        image_columns = torch.cat([image_columns, negatives[0]])
        text_columns = torch.cat([text_columns, negatives[1]])
    return infonce_against(image_features, text_features, image_columns, text_columns, logit_scale, offset)
