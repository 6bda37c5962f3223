"""Forward and backward of one optimizer step over the whole global batch, exact for the contrastive loss.

A contrastive loss does not split into per-micro-batch losses: every row's softmax runs over the
columns of the *whole* global batch. open_clip_train's accumulation caches every micro-batch's
features, then re-forwards each micro-batch and computes a loss with its fresh features in place
of the cached ones (the other micro-batches' cached features serve as negatives), so it computes
the loss k times, counts the logit-scale gradient once per micro-batch and syncs gradients on every
micro-step. clipa instead does an exact two-pass re-forward (GradCache, as in BASIC):

  1. embed every micro-batch without a graph and keep only the features;
  2. compute the loss of the global batch once over all features (all processes' columns via
     all-gather) and its gradient with respect to the features and the temperature;
  3. re-forward each micro-batch with the same randomness (same patch masks, same dropout RNG)
     and backpropagate the cached feature gradients through it.

The gradient is therefore the gradient of the global-batch loss, not a sum of micro-batch losses.
Peak memory is one micro-batch's activations plus the fp32 feature gradients of the global batch
(the features themselves are freed before pass 2). Gradients are synchronised across processes
only once, on the last micro-step (`no_sync` before it), and the temperature's gradient is added
exactly once, on that last micro-step.
"""

from __future__ import annotations

import contextlib

import torch


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


class ContrastiveStep:
    """`micro_step(last)`: the context of one micro-step's forward and backward, which synchronises
    gradients only when `last`; the trainer passes its parallelism's (clipa.train.parallel), the default is
    DDP's (`no_sync` before the last)."""

    def __init__(self, model, unwrapped, loss_fn, accelerator, masker=None, micro_step=None):
        self.model, self.unwrapped, self.loss_fn = model, unwrapped, loss_fn
        self.accelerator, self.masker = accelerator, masker
        self.micro_step = micro_step or self._ddp_micro_step

    def _ddp_micro_step(self, last: bool):
        return contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)

    def _forward(self, images, texts, keep):
        if self.masker is not None:
            self.masker.use(keep)
        with self.accelerator.autocast():
            return self.model(images, texts)

    def __call__(self, micro_batches: list[tuple], loss_fn=None) -> torch.Tensor:
        """Accumulate the gradients of the global-batch loss into .grad; returns the loss (detached).

        `loss_fn` is this step's loss (the queue loss closes over this step's keys and negatives);
        None: the loss given at construction."""
        loss_fn = loss_fn or self.loss_fn
        if len(micro_batches) == 1:
            with self.micro_step(last=True):
                out = self._forward(*micro_batches[0])
                loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias"))
                self.accelerator.backward(loss)
            return loss.detach()
        return self._cached(micro_batches, loss_fn)

    def _cached(self, micro_batches: list[tuple], loss_fn) -> torch.Tensor:
        device = self.accelerator.device
        rng_before, cache, scale, bias = self._embed(micro_batches)  # pass 1
        rng_after = _rng_state(device)

        # Loss and its gradient over the whole batch, on the cached features and on leaf copies of
        # the temperature (and bias) as the forward computed them.
        leaves = [cache[0].requires_grad_(), cache[1].requires_grad_(), scale.detach().float().requires_grad_()]
        if bias is not None:
            leaves.append(bias.detach().float().requires_grad_())
        loss = loss_fn(*leaves[:3], leaves[3] if bias is not None else None)
        grads = torch.autograd.grad(loss, leaves)
        # The features are not needed again, only their gradients; the loss's graph still refers
        # to them, so only the detached value is kept.
        loss = loss.detach()
        del leaves, cache, scale, bias
        self._replay(micro_batches, rng_before, *grads)  # pass 2
        del grads
        _set_rng_state(rng_after, device)
        return loss

    def _embed(self, micro_batches: list[tuple]):
        """Pass 1: every micro-batch's features without a graph, and the RNG state before each forward."""
        device = self.accelerator.device
        total = sum(images.shape[0] for images, _, _ in micro_batches)
        rng_before, cache = [], None
        with torch.no_grad():  # pass 1: features only
            offset = 0
            for images, texts, keep in micro_batches:
                rng_before.append(_rng_state(device))
                out = self._forward(images, texts, keep)
                if cache is None:
                    # One preallocated fp32 buffer per modality: no list of small tensors plus a
                    # torch.cat copy (twice the memory, and a fragmented heap that is never returned).
                    # Temperature and bias come from the forward's output, not from the parameters:
                    # under FSDP the parameters are sharded outside forward.
                    cache = [out[key].new_empty((total, out[key].shape[1]), dtype=torch.float32)
                             for key in ("image_features", "text_features")]
                    scale, bias = out["logit_scale"], out.get("logit_bias")
                rows = slice(offset, offset + images.shape[0])
                offset += images.shape[0]
                cache[0][rows] = out["image_features"]
                cache[1][rows] = out["text_features"]
                del out
        return rng_before, cache, scale, bias

    def _replay(self, micro_batches: list[tuple], rng_before, grad_images, grad_texts, grad_scale, grad_bias=None):
        """Pass 2: re-forward each micro-batch with its pass-1 randomness and backpropagate the cached
        feature gradients; gradients sync on the last micro-step only, where the temperature's is added."""
        device = self.accelerator.device
        offset = 0
        last = len(micro_batches) - 1
        for i, (images, texts, keep) in enumerate(micro_batches):  # pass 2: replay and backpropagate
            rows = slice(offset, offset + images.shape[0])
            offset += images.shape[0]
            _set_rng_state(rng_before[i], device)
            with self.micro_step(i == last):
                out = self._forward(images, texts, keep)
                surrogate = (out["image_features"].float() * grad_images[rows]).sum() \
                    + (out["text_features"].float() * grad_texts[rows]).sum()
                if i == last:  # the temperature (and bias) gradient, counted once
                    surrogate = surrogate + (out["logit_scale"].float() * grad_scale).sum()
                    if grad_bias is not None:
                        surrogate = surrogate + (out["logit_bias"].float() * grad_bias).sum()
                del out  # the graph lives in `surrogate`; the forward's outputs need not outlive it
                self.accelerator.backward(surrogate)
                del surrogate


def clamp_logit_scale(unwrapped, max_log_scale: float) -> torch.Tensor:
    """CLIP's temperature clamp, log t in [0, log max], in place on the parameter; returns t (a
    0-dim tensor, no host sync) for the metrics.

    The parameter is whole on every process under DDP and FSDP alike (clipa's FSDP leaves 0-dim
    parameters unsharded, clipa.train.fsdp), so the clamp is the same everywhere.
    """
    with torch.no_grad():
        unwrapped.logit_scale.clamp_(0, max_log_scale)
        return unwrapped.logit_scale.detach().exp()
