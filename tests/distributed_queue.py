"""Run under torchrun: each process enqueues its own keys; rank 0 saves what the queue holds.

usage: python -m torch.distributed.run --nproc_per_node 2 tests/distributed_queue.py OUT.pt
"""

import sys

import torch
from accelerate import Accelerator

from clipa.distributed import leave_process_group
from clipa.queue import FeatureQueues, gather_no_grad


def main(out: str) -> None:
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    local_images = torch.full((2, 3), float(rank))  # rank r's keys are all r
    local_texts = torch.full((2, 3), 10.0 + rank)
    queues = FeatureQueues(8, 3, "cpu")
    queues.enqueue(gather_no_grad(local_images), gather_no_grad(local_texts))
    states = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(states, queues.state_dict())
    if rank == 0:
        torch.save(states, out)


if __name__ == "__main__":
    main(sys.argv[1])
    leave_process_group()
