"""Forward and backward of one optimizer step over the whole global batch, exact for the contrastive loss.

A contrastive loss does not split into per-micro-batch losses: every row's softmax runs over the
columns of the *whole* global batch. Summing micro-batch losses (open_clip_train's accumulation)
trains a different loss with fewer negatives. clipa uses two-pass feature caching (GradCache,
as in BASIC):

  1. embed every micro-batch without a graph and keep only the features;
  2. compute the loss over all features (all processes' columns via all-gather) and its gradient
     with respect to the features and the temperature;
  3. re-forward each micro-batch with the same randomness (same patch masks, same dropout RNG)
     and backpropagate the cached feature gradients through it.

Peak memory is one micro-batch's activations plus the features of the global batch. Gradients
are synchronised across processes only on the last micro-step (`no_sync` before it), and the
temperature's gradient is added exactly once, on that last micro-step.
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
    def __init__(self, model, unwrapped, loss_fn, accelerator, masker=None):
        self.model, self.unwrapped, self.loss_fn = model, unwrapped, loss_fn
        self.accelerator, self.masker = accelerator, masker

    def _forward(self, images, texts, keep):
        if self.masker is not None:
            self.masker.use(keep)
        with self.accelerator.autocast():
            return self.model(images, texts)

    def _loss(self, out) -> torch.Tensor:
        return self.loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias"))

    def __call__(self, micro_batches: list[tuple]) -> torch.Tensor:
        """Accumulate the gradients of the global-batch loss into .grad; returns the loss (detached)."""
        if len(micro_batches) == 1:
            out = self._forward(*micro_batches[0])
            loss = self._loss(out)
            self.accelerator.backward(loss)
            return loss.detach()
        return self._cached(micro_batches)

    def _cached(self, micro_batches: list[tuple]) -> torch.Tensor:
        device = self.accelerator.device
        rng_before, image_features, text_features = [], [], []
        with torch.no_grad():  # pass 1: features only
            for images, texts, keep in micro_batches:
                rng_before.append(_rng_state(device))
                out = self._forward(images, texts, keep)
                image_features.append(out["image_features"])
                text_features.append(out["text_features"])
        rng_after = _rng_state(device)

        # Loss over the whole batch on leaf copies of the features and of the temperature.
        images_leaf = torch.cat(image_features).detach().float().requires_grad_()
        texts_leaf = torch.cat(text_features).detach().float().requires_grad_()
        del image_features, text_features  # one copy of the global batch's features is enough
        scale_leaf = self.unwrapped.logit_scale.detach().float().exp().requires_grad_()
        leaves = [images_leaf, texts_leaf, scale_leaf]
        bias_leaf = None
        if getattr(self.unwrapped, "logit_bias", None) is not None:
            bias_leaf = self.unwrapped.logit_bias.detach().float().requires_grad_()
            leaves.append(bias_leaf)
        loss = self.loss_fn(images_leaf, texts_leaf, scale_leaf, bias_leaf)
        grads = torch.autograd.grad(loss, leaves)
        grad_images, grad_texts, grad_scale = grads[:3]
        grad_bias = grads[3] if bias_leaf is not None else None
        del leaves, images_leaf, texts_leaf, grads

        offset = 0
        last = len(micro_batches) - 1
        for i, (images, texts, keep) in enumerate(micro_batches):  # pass 2: replay and backpropagate
            rows = slice(offset, offset + images.shape[0])
            offset += images.shape[0]
            _set_rng_state(rng_before[i], device)
            sync = contextlib.nullcontext() if i == last else self.accelerator.no_sync(self.model)
            with sync:
                out = self._forward(images, texts, keep)
                surrogate = (out["image_features"].float() * grad_images[rows]).sum() \
                    + (out["text_features"].float() * grad_texts[rows]).sum()
                if i == last:  # the temperature (and bias) gradient, counted once
                    surrogate = surrogate + (out["logit_scale"].float() * grad_scale).sum()
                    if grad_bias is not None:
                        surrogate = surrogate + (out["logit_bias"].float() * grad_bias).sum()
                self.accelerator.backward(surrogate)
        _set_rng_state(rng_after, device)
        return loss.detach()
