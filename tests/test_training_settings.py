"""Recipe settings that change how a step trains, each through a real (tiny, few-step) training run,
with an assertion that the setting took effect: loss.kind=siglip, optim.grad_clip,
optim.schedule=constant, train.grad_checkpointing=true."""

import json
import math

import pytest
from safetensors.torch import load_file

from clipa.recipe.load import load_recipe
from clipa.train.trainer import Trainer, train

from conftest import RECIPES, tiny_overrides


def recipe(**extra):
    return load_recipe(RECIPES / "tiny" / "pretrain.toml", tiny_overrides(**{"train.log_every_steps": 1, **extra}))


def logged(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "loss" in line]


def test_siglip_trains_with_the_sigmoid_loss_and_a_learned_bias(tmp_path):
    run = train(recipe(**{"loss.kind": "siglip"}), "pretrain", tmp_path / "run")
    losses = [line["loss"] for line in logged(run.run_dir)]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    # The sigmoid loss starts near -log(sigmoid(scale * cos - 10)) ~ 10 per positive pair (bias -10,
    # random features); InfoNCE on 32 pairs starts near log(32) = 3.5.
    assert losses[0] > 6, losses
    assert losses[-1] < losses[0] - 1, losses
    weights = load_file(str(run.run_dir / "final" / "open_clip_model.safetensors"))
    assert weights["logit_bias"].numel() == 1
    assert weights["logit_bias"].item() != pytest.approx(-10.0, abs=1e-4)  # the bias is trained


def test_constant_schedule_holds_the_lr_after_warmup(tmp_path):
    run = train(recipe(**{"optim.schedule": "constant", "optim.warmup_steps": 2, "optim.lr": 1e-3}), "pretrain",
                tmp_path / "run")
    assert [line["lr"] for line in logged(run.run_dir)] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3], rel=1e-9)


def _moved(extra, run_dir):
    """How far a 3-step run moves the weights from their initial values (L2 over all parameters)."""
    trainer = Trainer(recipe(**{"train.total_samples": 96, "optim.weight_decay": 0.0, **extra}), "pretrain", run_dir)
    start = [p.detach().clone() for p in trainer.unwrapped.parameters()]
    trainer.run()
    return math.sqrt(sum(float((p.detach() - s).pow(2).sum()) for p, s in zip(trainer.unwrapped.parameters(), start,
                                                                                strict=True)))


@pytest.mark.slow
def test_grad_clip_bounds_the_update(tmp_path):
    """AdamW divides out a gradient's scale, except through eps: clipping the global norm to 1e-9 leaves
    gradients far below eps (1e-8 per element at most), so the updates all but vanish. Without the clip
    the same run moves the weights by orders of magnitude more."""
    free = _moved({}, tmp_path / "free")
    clipped = _moved({"optim.grad_clip": 1e-9}, tmp_path / "clipped")
    assert free > 0.01
    assert clipped < free / 100, (clipped, free)


@pytest.mark.slow
def test_grad_checkpointing_recomputes_the_forward_and_changes_nothing_else(tmp_path):
    """With train.grad_checkpointing every transformer block runs twice per step (forward, then again
    in the backward); the losses are those of the run without it."""
    def run(flag, name):
        trainer = Trainer(recipe(**{"train.total_samples": 96, "train.grad_checkpointing": str(flag).lower()}), "pretrain",
                          tmp_path / name)
        calls = {"image": 0, "text": 0}
        # Count calls of forward itself: torch's checkpoint recomputes it in the backward without
        # running module hooks again, so a forward hook would see one call either way.
        for tower, block in (("image", trainer.unwrapped.visual.transformer.resblocks[0]),
                             ("text", trainer.unwrapped.transformer.resblocks[0])):
            def counted(*args, _forward=block.forward, _tower=tower, **kwargs):
                calls[_tower] += 1
                return _forward(*args, **kwargs)
            block.forward = counted
        trainer.run()
        return calls, [line["loss"] for line in logged(tmp_path / name)]

    plain_calls, plain_losses = run(False, "plain")
    ckpt_calls, ckpt_losses = run(True, "ckpt")
    assert plain_calls == {"image": 3, "text": 3}
    assert ckpt_calls == {"image": 6, "text": 6}
    assert ckpt_losses == pytest.approx(plain_losses, rel=1e-5)
