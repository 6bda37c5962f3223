"""Run under torchrun: one exact-accumulation step in a real process group; rank 0 saves the gradients.

usage: python -m torch.distributed.run --nproc_per_node N tests/distributed_grads.py OUT.pt MICRO [LOSS] [MASKED] [SHARD]

tests/distributed_run.py runs several configurations (and other helpers) in one launch.

SHARD "fsdp" shards the model with clipa's FSDP2 path instead of DDP; the sharded gradients are
gathered whole for the comparison, and the norm clipa clips with is saved beside DTensor's own.
"""

import sys

import torch
from accelerate import Accelerator
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from clipa.distributed import leave_process_group  # noqa: E402
from clipa.model.build import create_model, stage_config  # noqa: E402
from clipa.model.masking import install_patch_masker  # noqa: E402
from clipa.train.loss import LOSSES  # noqa: E402
from clipa.train.step import ContrastiveStep  # noqa: E402

from test_accumulation import GEOMETRY, global_batch  # noqa: E402


def main(out: str, micro: int | str, loss_kind: str = "infonce", masked: str = "0", shard: str = "ddp") -> None:
    micro, masked = int(micro), masked == "1"
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(0)
    model = create_model(stage_config("clipa-tiny", GEOMETRY, loss_kind))
    masker = install_patch_masker(model, "random", 0.5) if masked else None
    if shard == "fsdp":
        return fsdp_step(out, model, masker, accelerator, micro, loss_kind, masked)
    ddp = accelerator.prepare(model)
    ddp.train()
    # DDP's default all-reduce, counting the backward passes that synchronise: `bucket.is_last()`
    # holds once per synchronised backward, so this counts micro-steps outside `no_sync`.
    synced = []

    def counting_allreduce(state, bucket):
        synced.append(bucket.is_last())
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting_allreduce)
    micro_batches = rank_micro_batches(rank, world, micro, masked)
    loss = ContrastiveStep(ddp, model, LOSSES[loss_kind], accelerator, masker)(micro_batches)
    mean_loss = accelerator.reduce(loss, reduction="mean")
    if rank == 0:
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        torch.save({"loss": mean_loss.item(), "grads": grads, "world": world, "micro_steps": len(micro_batches),
                    "synced_backwards": sum(synced)}, out)


def rank_micro_batches(rank, world, micro, masked):
    """This process's rows of the 64-row global batch, in micro-batches."""
    images, texts, keep = global_batch(64, masked)
    per_rank = 64 // world
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    images, texts = images[rows], texts[rows]
    keep = keep[rows] if keep is not None else None
    return [(images[i:i + micro], texts[i:i + micro], None if keep is None else keep[i:i + micro])
            for i in range(0, per_rank, micro)]


def fsdp_step(out, model, masker, accelerator, micro, loss_kind, masked):
    from torch.distributed.tensor import DTensor

    from clipa.train.fsdp import Fsdp

    fsdp = Fsdp(accelerator.device)
    fsdp.shard(model)
    model.train()
    rank, world = accelerator.process_index, accelerator.num_processes
    micro_batches = rank_micro_batches(rank, world, micro, masked)
    loss = ContrastiveStep(model, model, LOSSES[loss_kind], accelerator, masker, fsdp.micro_step)(micro_batches)
    mean_loss = accelerator.reduce(loss, reduction="mean")
    sharded = [p.grad for p in model.parameters() if isinstance(p.grad, DTensor)]
    plain = [p.grad for p in model.parameters() if p.grad is not None and not isinstance(p.grad, DTensor)]
    # DTensor's own total norm of the sharded gradients, with the whole scalars' added once.
    dtensor_norm = torch.linalg.vector_norm(torch.stack([
        torch.nn.utils.get_total_norm(sharded).full_tensor(), torch.nn.utils.get_total_norm(plain)]))
    clipa_norm = fsdp.grad_norm()
    grads = {name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
             for name, p in model.named_parameters() if p.grad is not None}  # collective: every rank gathers
    if rank == 0:
        torch.save({"loss": mean_loss.item(), "grads": grads, "world": world, "micro_steps": len(micro_batches),
                    "sharded": len(sharded), "norm": clipa_norm.item(), "dtensor_norm": dtensor_norm.item()}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
    leave_process_group()
