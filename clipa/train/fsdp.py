"""train.shard = "fsdp": the model, its gradients and its optimizer state sharded over the processes.

accelerate offers FSDP only on accelerators, so clipa drives torch's FSDP2 (`fully_shard`) itself and
keeps accelerate for launching, autocast and DDP. It is one code path on CPU (gloo) and GPU (NCCL):
the device mesh is the default process group on the accelerator's device type.

- Units: every transformer block of both towers, then the root (embeddings, projections, final
  norms). A block's parameters are gathered just for its forward and backward.
- Scalars: FSDP2 cannot shard 0-dim parameters (open_clip's `logit_scale`, SigLIP's `logit_bias`).
  They stay whole on every process, like DDP's, and their gradients are averaged here.
- Precision: accelerate's autocast, as under DDP; the parameters FSDP gathers stay fp32. Two reasons
  over FSDP2's `MixedPrecisionPolicy(param_dtype=bf16)`: the same op-level precision as DDP (softmax,
  norms and the loss in fp32), so one run can be compared with the other; and with gradient
  accumulation the unsynchronised micro-step gradients accumulate in fp32, where a bf16 parameter
  policy would accumulate them in bf16. The cost is fp32 all-gathers, twice the bytes of bf16.
- Accumulation: gradients are reduce-scattered on the last micro-step only
  (`set_requires_gradient_sync(False)` before it, DDP's `no_sync`); until then each process keeps
  unsharded fp32 gradients of the blocks it has run (docs/performance.md counts the memory).
- A process alone gets a process group of one (accelerate starts none), so CPU offload can also move
  a single-GPU run's weights, gradients and optimizer state into CPU memory.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from clipa.errors import ClipaError
from clipa.train.checkpoint import SHARDS

BLOCK_LISTS = ("resblocks", "blocks", "layer", "layers")  # open_clip's towers, timm trunks, HF text encoders


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks FSDP shards one by one: the children of every block list of either tower."""
    return [block for name, module in model.named_modules()
            if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LISTS
            for block in module]


class Fsdp:
    """Shards one model and owns what changes with sharding: gradient sync, norm, state dicts. The trainer
    uses it through the surface clipa.train.parallel describes, as it uses `Replicated`."""

    def __init__(self, device: torch.device, cpu_offload: bool = False, reshard_after_forward: bool = True,
                 grad_clip: float = 0.0):
        from torch.distributed.device_mesh import init_device_mesh

        self.device, self.cpu_offload, self.reshard_after_forward = device, cpu_offload, reshard_after_forward
        self.grad_clip = grad_clip
        self.own_group = not dist.is_initialized()
        if self.own_group:
            # One process: a group of one in memory (no rendezvous, no port).
            backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        self.world = dist.get_world_size()
        self.mesh = init_device_mesh(device.type, (self.world,))
        self.model: torch.nn.Module | None = None
        self.replicated: list[torch.nn.Parameter] = []

    def close(self) -> None:
        """Leave the group this object started (one process); a launcher's group is the launcher's."""
        if self.own_group and dist.is_initialized():
            dist.destroy_process_group()
        self.own_group = False

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """Shard `model` in place (its parameters become DTensors): build the optimizer after this."""
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        offload = CPUOffloadPolicy(pin_memory=self.device.type == "cuda") if self.cpu_offload else OffloadPolicy()
        options = dict(mesh=self.mesh, reshard_after_forward=self.reshard_after_forward, offload_policy=offload)
        self.replicated = [p for p in model.parameters() if p.ndim == 0]
        for p in self.replicated:  # fully_shard moves what it manages; these it does not manage
            p.data = p.data.to(self.device)
        for block in transformer_blocks(model):
            fully_shard(block, **options)
        fully_shard(model, ignored_params=set(self.replicated), **options)
        self.model = model
        return model

    def carry_optimizer_state(self, optimizer, init: str) -> str:
        raise ClipaError("init.optimizer_state: not with train.shard=fsdp (the moments are sharded); "
                         "set init.optimizer_state=false")

    def wrap(self, model, optimizer, compile: bool = False):
        """Sharded already (`shard`); accelerate adds autocast only. train.compile is refused with FSDP (recipe)."""
        return model, optimizer, model

    # ------------------------------------------------------------------ one step

    @contextlib.contextmanager
    def micro_step(self, last: bool):
        """One micro-step's backward: gradients are reduce-scattered on the `last` only (DDP's no_sync
        before it); then the whole (replicated) scalars' gradients are averaged like DDP's."""
        self.model.set_requires_gradient_sync(last)
        yield
        if last:
            self._average_replicated_grads()

    def _average_replicated_grads(self) -> None:
        grads = [p.grad for p in self.replicated if p.grad is not None]
        if self.world == 1 or not grads:
            return
        # One all-reduce for all of them; gloo has no AVG, so sum and divide.
        flat = torch.stack([g.detach().reshape(()) for g in grads]).to(self.device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for g, value in zip(grads, (flat / self.world).to(grads[0].device), strict=True):
            g.copy_(value)

    def grad_norm(self) -> torch.Tensor:
        """The 2-norm of the whole gradient, the same on every process (fp32, on the accelerator device).

        Each process sums the squares of its own shards and the sums are all-reduced: shards partition
        every sharded gradient, so the total is exact, and it is the number DTensor's
        `get_total_norm(...).full_tensor()` gives. Done by hand so it also works when CPU offload
        keeps the shards in CPU memory while the group is NCCL (a DTensor reduction would hand CPU
        tensors to NCCL). The replicated scalars are counted once, not once per process.
        """
        sharded_sq = torch.zeros((), device=self.device)
        replicated_sq = torch.zeros((), device=self.device)
        for p in self.model.parameters():
            if p.grad is None:
                continue
            if isinstance(p.grad, DTensor):
                sharded_sq += p.grad.to_local().detach().float().pow(2).sum().to(self.device)
            else:
                replicated_sq += p.grad.detach().float().pow(2).sum().to(self.device)
        if self.world > 1:
            dist.all_reduce(sharded_sq, op=dist.ReduceOp.SUM)
        return (sharded_sq + replicated_sq).sqrt()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale every gradient (each process its shards) so the total norm is at most `max_norm`;
        returns the norm before clipping, as torch's clip_grad_norm_ does."""
        total = self.grad_norm()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in self.model.parameters():
            if p.grad is not None:
                local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                local.detach().mul_(coef.to(local.device, local.dtype))
        return total

    def clip_and_norm(self) -> torch.Tensor:
        """The norm over every process's shards, after clipping to `grad_clip` if set."""
        return self.clip_grad_norm_(self.grad_clip) if self.grad_clip else self.grad_norm()

    def skip_step(self, optimizer) -> None:
        pass  # no loss scaler to back off: train.precision "fp16" is refused with FSDP (recipe)

    # ------------------------------------------------------------------ checkpoints, export, evaluation

    def checkpoint_parts(self, optimizer: torch.optim.Optimizer) -> dict:
        """Weights and optimizer state as DCP shards (any number of processes reads them back); state.pt
        keeps an empty "optimizer" entry, as it always has."""
        return {SHARDS: ShardedState(self.model, optimizer), "optimizer": None}

    def evaluation_model(self, build) -> torch.nn.Module:
        """A whole copy on every process (each evaluates its share of the data, unequal in batches, which
        sharded forwards could not be); it lives for one evaluation only."""
        return self.whole_copy(build)

    def whole_copy(self, build) -> torch.nn.Module:
        """An unsharded copy of the model on this process's device (`build()` makes the blank one): every
        process gathers the whole weights (collective), e.g. for evaluation. Building draws no random
        numbers from the training's generators."""
        with torch.random.fork_rng(devices=[]):
            copy = build()  # in CPU memory
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        copy.load_state_dict(state)
        del state  # before the copy moves to the device: never two whole models there at once
        return copy.to(self.device)

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """The whole model's state dict on process 0, in CPU memory (empty elsewhere); collective: the
        shards are gathered one tensor at a time, so no process holds more than the result."""
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class ShardedState:
    """The checkpoint part of a sharded run: model and optimizer state, each process its own shards (DTensors).
    The checkpoint writes it with DCP and reads it back into `state_dict()`'s targets (this layout's, at any
    number of processes) before `load_state_dict`."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optim_state}

    def load_state_dict(self, state: dict) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
