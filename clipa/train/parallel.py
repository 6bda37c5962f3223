"""How the model is spread over the processes, behind one surface: chosen once (`parallelism`), after which
the trainer never asks which one it has.

- `Replicated` (train.shard = "ddp"): every process holds the whole model and optimizer state; accelerate
  wraps the model in DDP (several processes) or leaves it alone (one).
- `clipa.train.fsdp.Fsdp` (train.shard = "fsdp"): the model, its gradients and optimizer state sharded.

Both offer, in the order a run uses them:
  shard(model)                        before the optimizer is built (it must hold the parameters the run steps)
  checkpoint_parts(optimizer)         the model and optimizer as named checkpoint parts (clipa.train.checkpoint)
  carry_optimizer_state(opt, init)    a finetune taking over its pretraining's AdamW moments (init.optimizer_state)
  wrap(model, optimizer, compile)     -> (model to call, optimizer to step, unwrapped model)
  micro_step(last)                    one micro-step's backward; gradients synchronise on the `last` only
  clip_and_norm()                     the total gradient norm, after clipping to optim.grad_clip if set
  skip_step(optimizer)                end a skipped (non-finite) step as its update would have
  full_model_state()                  the whole weights for the export (collective under FSDP)
  evaluation_model(build)             a model evaluation can run on every process with unequal batches
  close()                             leave a process group this object started
"""

from __future__ import annotations

import contextlib

import torch
from accelerate import Accelerator

from clipa.errors import ClipaError
from clipa.train.checkpoint import WEIGHTS


def make_accelerator(precision: str, timeout_s: int = 1800) -> Accelerator:
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    on_gpu = torch.cuda.is_available()
    if precision == "auto":
        precision = "bf16" if on_gpu else "fp32"
    if precision == "fp16" and not on_gpu:
        # accelerate has no fp16 autocast on CPU: it would train in fp32 while the log said fp16.
        raise ClipaError('train.precision: "fp16" needs a GPU (on CPU accelerate trains fp32 without saying so); '
                         'use "bf16" or "fp32" here')
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    _forget_the_last_runs_settings()
    # The process-group timeout bounds how long a process waits for a peer that is gone or stuck.
    return Accelerator(cpu=not on_gpu, mixed_precision=mixed,
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))])


def _forget_the_last_runs_settings() -> None:
    """accelerate keeps one mixed precision per process and refuses another ("restart your runtime completely"),
    so a notebook that trained an fp32 run could not train a bf16 one. Each run makes its own Accelerator:
    the last run's settings are cleared first, the process group (accelerate's PartialState) is kept.
    accelerate has no public call for this; `_reset_state` is the one its own tests use."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)


def precision_name(accelerator: Accelerator) -> str:
    return {"no": "fp32"}.get(accelerator.mixed_precision, accelerator.mixed_precision)


def parallelism(recipe, accelerator: Accelerator):
    """The run's `Replicated` or `Fsdp` (train.shard), made before any model exists: FSDP's device mesh, and a
    process group of one for a lone process."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        raise ClipaError("accelerate config: FSDP set in `accelerate config` is not how clipa shards; choose "
                         "multi-GPU there and set train.shard=fsdp in the recipe")
    if recipe.train.shard == "fsdp":
        from clipa.train.fsdp import Fsdp

        return Fsdp(accelerator.device, recipe.train.fsdp.cpu_offload, recipe.train.fsdp.reshard_after_forward,
                    grad_clip=recipe.optim.grad_clip)
    return Replicated(accelerator, recipe.optim.grad_clip)


def total_grad_norm(parameters) -> torch.Tensor:
    """2-norm of all gradients (after DDP's all-reduce they are the same on every process)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def skip_scaled_update(scaler, optimizer, unscaled: bool) -> None:
    """End a skipped (non-finite) step for an fp16 grad scaler as its own `step` would have.

    Not calling `optimizer.step()` also skips GradScaler's inf check and `update()`: its loss scale
    would never back off, and the next step's `unscale_` (grad clipping) would raise "unscale_() has
    already been called". `unscale_` records the overflow; `update()` halves the scale on it and
    resets the per-step state. `optimizer` is the torch optimizer (accelerate's wraps it).
    """
    if scaler is None:
        return
    if not unscaled:
        scaler.unscale_(optimizer)
    scaler.update()


class Replicated:
    """The whole model on every process: accelerate's DDP, or one process alone."""

    def __init__(self, accelerator: Accelerator, grad_clip: float = 0.0):
        self.accelerator, self.grad_clip = accelerator, grad_clip
        self.unwrapped: torch.nn.Module | None = None  # the model itself, as built
        self.model: torch.nn.Module | None = None  # as the trainer calls it: DDP-wrapped, maybe compiled

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        self.unwrapped = model  # DDP wraps it in `wrap`, after the optimizer exists; unwrapping gives this back
        return model

    def checkpoint_parts(self, optimizer) -> dict:
        """The whole weights (model.safetensors, from process 0) and the optimizer state (state.pt)."""
        return {WEIGHTS: self.unwrapped, "optimizer": optimizer}

    def carry_optimizer_state(self, optimizer, init: str) -> str:
        from clipa.train.handover import carry_optimizer_state

        return carry_optimizer_state(optimizer, init)

    def wrap(self, model, optimizer, compile: bool = False):
        model, optimizer = self.accelerator.prepare(model, optimizer)
        unwrapped = self.accelerator.unwrap_model(model)
        if compile:
            # Compiled after prepare, so dynamo sees DDP's buckets; weights are saved from `unwrapped`,
            # whose names carry no `_orig_mod.` prefix. Masks change values, never shapes, per stage:
            # one graph per grad mode, no recompilation per step.
            model = torch.compile(model)
        self.model, self.unwrapped = model, unwrapped
        return model, optimizer, unwrapped

    def micro_step(self, last: bool):
        """DDP's `no_sync` before the last micro-step (nothing to sync for a lone process)."""
        return contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)

    def clip_and_norm(self) -> torch.Tensor:
        if self.grad_clip:  # accelerate's clip also unscales fp16 gradients
            return self.accelerator.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        return total_grad_norm(self.model.parameters())  # clipping at infinity would still rescale every gradient by 1.0

    def skip_step(self, optimizer) -> None:
        skip_scaled_update(self.accelerator.scaler, getattr(optimizer, "optimizer", optimizer),
                           unscaled=bool(self.grad_clip))

    def full_model_state(self) -> dict[str, torch.Tensor]:
        return self.unwrapped.state_dict()

    def evaluation_model(self, build) -> torch.nn.Module:
        return self.unwrapped  # the training weights themselves; `build` is for a sharded model

    def close(self) -> None:
        pass
