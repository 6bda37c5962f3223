"""What a finetune takes over from the stage before it, besides the weights: AdamW's moments.

A fresh AdamW's first updates are sign-like (m / sqrt(v) is about +-1 for every parameter whatever
its gradient's scale), so a short finetune at a new geometry starts with a jolt of size `lr` in
every weight. Carrying the first stage's moments (`init.optimizer_state`) lets the finetune scale
its first steps by gradients the model has already seen. Parameters whose shape changed between the
stages (position embeddings resized to the new resolution or text length) start with fresh moments.
The LR schedule is not carried: the finetune has its own peak, warmup and length.
"""

from __future__ import annotations

from pathlib import Path

import torch

from clipa.errors import ClipaError
from clipa.model.checkpoints import newest_loadable
from clipa.model.safeload import load_plain
from clipa.run.layout import CHECKPOINTS_DIR, STATE_FILE, is_complete

KEY = "init.optimizer_state"


def training_state_of(init: str) -> Path:
    """The step checkpoint whose training state `init.checkpoint` names: the checkpoint itself, or a run
    directory's newest complete one. An exported model or a weights file has no optimizer state."""
    path = Path(init)
    if path.is_dir() and is_complete(path):
        return path
    latest = newest_loadable(path / CHECKPOINTS_DIR) if path.is_dir() else None
    if latest is None:
        raise ClipaError(f"{KEY}: init.checkpoint {init} holds no training state (only a clipa run directory or a "
                         "step checkpoint has the optimizer's moments); point init.checkpoint at one, or set "
                         f"{KEY}=false")
    return latest


def carry_optimizer_state(optimizer: torch.optim.Optimizer, init: str) -> str:
    """Load the moments of `init`'s optimizer into `optimizer` (same architecture, locks and weight-decay
    groups, so the parameters line up group by group); returns a note saying how many were carried."""
    checkpoint = training_state_of(init)
    theirs = load_plain(checkpoint / STATE_FILE, mmap=False).get("optimizer")
    if theirs is None:
        raise ClipaError(f"{KEY}: {checkpoint} was written by a sharded (FSDP) run; its moments are in DCP shards, "
                         f"which a finetune cannot take over: set {KEY}=false")
    ours = optimizer.state_dict()
    sizes = [len(g["params"]) for g in ours["param_groups"]]
    if sizes != [len(g["params"]) for g in theirs["param_groups"]]:
        raise ClipaError(f"{KEY}: the optimizer of {checkpoint} holds other parameters than this stage's (groups of "
                         f"{[len(g['params']) for g in theirs['param_groups']]} against {sizes}: another architecture "
                         f"or other locked towers); set {KEY}=false")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    their_ids = [i for group in theirs["param_groups"] for i in group["params"]]
    carried = {}
    for our_id, their_id, param in zip((i for g in ours["param_groups"] for i in g["params"]), their_ids, params):
        moments = theirs["state"].get(their_id)
        if moments is not None and moments["exp_avg"].shape == param.shape:
            carried[our_id] = {k: v.clone() for k, v in moments.items()}
    optimizer.load_state_dict({"state": carried, "param_groups": ours["param_groups"]})
    return (f"{KEY}: AdamW moments of {len(carried)} of {len(params)} parameter tensors carried from {checkpoint} "
            f"({len(params) - len(carried)} resized or new: fresh moments)")
