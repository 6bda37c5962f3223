"""fp16 with the loss scaler through the trainer (issue 32): an overflow skips the step and is counted, the
scale halves, the checkpoint holds the scaler, and a resume restores it and replays the run.

accelerate makes fp16 autocast and a GradScaler on accelerators only, and clipa refuses fp16 on CPU (it
would train fp32 while saying fp16; tests/test_mixed_precision.py). Torch itself has both on CPU, so the
trainer's accelerator here is accelerate's own fp16 Accelerator with the two attributes accelerate sets on a
GPU (`native_amp`, `scaler`): everything after that (scaled backward, unscale and clip, the skipped-step
bookkeeping, saving and restoring the scaler) is the trainer's real path.
"""

import json

import pytest
import torch

from clipa.recipe.load import load_recipe
from clipa.train import parallel as parallel_module
from clipa.train.trainer import Trainer

from conftest import RECIPES, RESIZE_32, tiny_overrides

pytestmark = pytest.mark.slow  # fp16 matmuls on this CPU are slow, as bf16's (tests/test_mixed_precision.py)

# High enough that some steps' scaled fp16 gradients overflow, low enough that others do not.
INIT_SCALE = 3e5


class RecordingScaler(torch.amp.GradScaler):
    """torch's CPU GradScaler, recording (scale before, scale after) at every update."""

    def __init__(self):
        super().__init__("cpu", init_scale=INIT_SCALE, growth_interval=1000)  # no growth within the test
        self.updates = []

    def update(self, new_scale=None):
        before = self.get_scale()
        super().update(new_scale)
        self.updates.append((before, self.get_scale()))


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    def accelerator(precision, timeout_s=1800):
        assert precision == "fp16"
        AcceleratorState._reset_state(reset_partial_state=True)  # the precision is process-wide in accelerate
        made = Accelerator(cpu=True, mixed_precision="fp16")
        assert made.scaler is None and not made.native_amp  # what accelerate gives on CPU
        made.native_amp, made.scaler = True, RecordingScaler()  # what it gives on a GPU
        return made

    monkeypatch.setattr(parallel_module, "make_accelerator", accelerator)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def recipe():
    # the 32 px first stage: the overflow pattern below is its
    return load_recipe(RECIPES / "tiny" / "pretrain.toml",
                       [*tiny_overrides(**{"train.total_samples": 32 * 4, "train.log_every_steps": 1,
                                           "checkpoint.every_steps": 1, "checkpoint.keep_last": 10}),
                        "train.precision=fp16", "optim.grad_clip=1.0", *RESIZE_32])


def test_fp16_overflow_skips_the_step_halves_the_scale_and_resume_restores_the_scaler(tmp_path, fp16_on_cpu):
    from test_checkpoint import copy_run, trajectory

    from clipa.train.checkpoint import load_state

    straight = Trainer(recipe(), "pretrain", tmp_path / "straight")
    result = straight.run()
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    skipped = [row["skipped_steps"] for row in rows]
    updates = straight.accelerator.scaler.updates
    # One scaler update per step; an overflowing step is skipped (counted in metrics.jsonl, its loss not
    # averaged in) and halves the scale, a finite one keeps it.
    assert len(updates) == 4 and skipped == [0, 1, 0, 1], (skipped, updates)
    assert result.skipped_steps == 2
    for (before, after), skip in zip(updates, skipped, strict=True):
        assert after == (before / 2 if skip else before), updates
    assert [row["loss"] is None for row in rows] == [bool(s) for s in skipped]
    # The optimizer stepped only on the finite steps, on fp32 master weights.
    optimizer = straight.optimizer.optimizer
    assert {int(s["step"]) for s in optimizer.state.values()} == {2}
    assert all(p.dtype == torch.float32 for p in straight.unwrapped.parameters())
    # Each checkpoint holds the scaler as it was after that step (none is written inside a non-finite streak:
    # not at steps 2 and 4, but at the end).
    assert sorted(p.name for p in (tmp_path / "straight" / "checkpoints").glob("step_*")) == \
        ["step_000001", "step_000003", "step_000004"]
    for step in (1, 3, 4):
        _, state, _ = load_state(tmp_path / "straight" / "checkpoints" / f"step_{step:06d}")
        assert state["scaler"]["scale"] == INIT_SCALE / 2 ** sum(skipped[:step]), step

    # The run as it was after step 3, resumed: the scale is step 3's, not the initial one, and step 4
    # replays (the same overflow, the same halving).
    run = copy_run(tmp_path / "straight", tmp_path / "resumed", up_to_step=3)
    resumed = Trainer(recipe(), "pretrain", run)
    assert resumed.step == 3 and resumed.accelerator.scaler.get_scale() == INIT_SCALE / 2
    resumed.run()
    assert resumed.accelerator.scaler.updates == updates[3:]
    assert trajectory(run) == trajectory(tmp_path / "straight")
