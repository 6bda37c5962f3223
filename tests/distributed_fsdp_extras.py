"""Run under torchrun: train.shard=fsdp with what tests/test_fsdp.py leaves out, through the trainer, in one
2-process group: a locked image tower with the memory-bank queue, and SigLIP (its 0-dim `logit_bias`, left
unsharded). Each case trains 4 steps (a checkpoint every 2), then a copy of the run as it was at step 2
resumes in the same processes (the test is about the restored state, not about a process dying).

Writes OUT/CASE/{straight,resumed}/ and, per rank, OUT/CASE/seen.rank{R}.json: what the trainer held
right after the resume's setup and at the end; rank 0 also OUT/CASE/initial.safetensors (the whole
weights before training).

usage: python -m torch.distributed.run --nproc_per_node 2 tests/distributed_fsdp_extras.py OUT
"""

import json
import shutil
import sys
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import save_file

from clipa.distributed import leave_process_group
from clipa.recipe.load import load_recipe
from clipa.train.trainer import Trainer

from conftest import RECIPES, micro_overrides

CASES = {"locked_bank": ["model.lock_image=true", "loss.queue.kind=memory_bank", "loss.queue.size=64"],
         "siglip": ["loss.kind=siglip"]}


def recipe(extra):
    return load_recipe(RECIPES / "tiny" / "pretrain.toml",
                       [*micro_overrides(**{"train.total_samples": 32 * 4, "train.log_every_steps": 1,
                                           "checkpoint.every_steps": 2, "checkpoint.keep_last": 10}),
                        "train.shard=fsdp", *extra])


def held(trainer) -> dict:
    """What one process's trainer holds: step, the whole scalars, the queue, what the optimizer steps."""
    model = trainer.unwrapped
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    seen = {"step": trainer.step, "logit_scale": model.logit_scale.item(),
            "logit_bias": model.logit_bias.item() if getattr(model, "logit_bias", None) is not None else None,
            "visual_in_optimizer": sum(id(p) in optimized for p in model.visual.parameters()),
            "visual_with_grad": sum(p.grad is not None for p in model.visual.parameters())}
    if trainer.queue.queues is not None:
        state = trainer.queue.queues.state_dict()
        seen["queue"] = {"pointer": int(state["pointer"]), "filled": int(state["filled"]),
                         "images": state["images"].tolist(), "texts": state["texts"].tolist()}
    return seen


def main(out: Path | str) -> None:
    out = Path(out)
    for case, extra in CASES.items():
        runs = out / case
        straight = Trainer(recipe(extra), "pretrain", runs / "straight")
        rank = straight.rank
        initial = straight.parallel.full_model_state()  # collective; whole on rank 0
        if rank == 0:
            save_file({k: v.contiguous() for k, v in initial.items()}, str(runs / "initial.safetensors"))
        straight.run()
        seen = {"straight_end": held(straight)}
        if rank == 0:  # the run as it was after step 2
            copy = runs / "resumed"
            shutil.copytree(runs / "straight", copy)
            shutil.rmtree(copy / "final")
            for path in (copy / "checkpoints").glob("step_*"):
                if path.name != "step_000002":
                    shutil.rmtree(path)
            (copy / "checkpoints" / "LATEST").write_text("step_000002\n")
            lines = (copy / "metrics.jsonl").read_text().splitlines()
            (copy / "metrics.jsonl").write_text("".join(line + "\n" for line in lines
                                                        if json.loads(line)["step"] <= 2))
        dist.barrier()
        resumed = Trainer(recipe(extra), "pretrain", runs / "resumed")
        seen["resumed_start"] = held(resumed)
        resumed.run()
        seen["resumed_end"] = held(resumed)
        (runs / f"seen.rank{rank}.json").write_text(json.dumps(seen))
    leave_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
