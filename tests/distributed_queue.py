"""Run under torchrun: both queue kinds through the trainer's own paths, in a real 2-process group.

momentum     MomentumEncoder.keys (which must gather every process's keys) -> FeatureQueues.enqueue
memory_bank  queue_infonce_loss(captured=...) (the gathered online features) -> FeatureQueues.enqueue
Each rank sees different data; rank 0 saves every rank's queues and its own un-gathered rows.

usage: python -m torch.distributed.run --nproc_per_node 2 tests/distributed_queue.py OUT.pt
"""

import sys

import torch
from accelerate import Accelerator

from clipa.distributed import leave_process_group
from clipa.model.build import Geometry, create_model, stage_config
from clipa.train.queue import FeatureQueues, MomentumEncoder, queue_infonce_loss


def main(out: str) -> None:
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    torch.manual_seed(0)  # the same weights on every rank, as after DDP's broadcast
    model = create_model(stage_config("clipa-tiny", Geometry(32, 8)))
    model.train()
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own samples
    images = torch.randn(4, 3, 32, 32, generator=generator)
    texts = torch.randint(1, 49000, (4, 8), generator=generator)
    micro_batches = [(images[:2], texts[:2], None), (images[2:], texts[2:], None)]  # accumulation 2

    momentum = MomentumEncoder(model, 0.9)
    keys = momentum.keys(micro_batches, accelerator.autocast)
    momentum_queue = FeatureQueues(16, 128, "cpu")
    momentum_queue.enqueue(*keys)
    with torch.no_grad():
        local_keys = momentum.model(images, texts)

    out_online = model(images, texts)
    captured = []
    loss = queue_infonce_loss(out_online["image_features"], out_online["text_features"], out_online["logit_scale"],
                              captured=captured)
    loss.backward()
    bank_queue = FeatureQueues(16, 128, "cpu")
    bank_queue.enqueue(*captured)

    state = {
        "momentum": momentum_queue.state_dict(), "memory_bank": bank_queue.state_dict(),
        "local": {"momentum": (local_keys["image_features"], local_keys["text_features"]),
                  "memory_bank": (out_online["image_features"].detach(), out_online["text_features"].detach())},
    }
    states = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(states, state)
    if rank == 0:
        torch.save(states, out)


if __name__ == "__main__":
    main(sys.argv[1])
    leave_process_group()
