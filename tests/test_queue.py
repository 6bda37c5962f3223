"""Feature queues and the momentum encoder: math, order, gradients, resume, processes."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clipa.errors import ClipaError
from clipa.queue import FeatureQueues, MomentumEncoder, queue_infonce_loss
from clipa.recipe import load_recipe
from clipa.train import Trainer
from conftest import RECIPES, run_torchrun

ARGS = ["train.global_batch_size=16", "train.log_every_steps=1", "data.num_workers=0", "checkpoint.every_steps=2",
        "checkpoint.keep_last=10", "loss.queue.size=48", "loss.queue.warmup_steps=1"]


def test_ema_matches_a_hand_computation():
    online = torch.nn.Linear(2, 1)
    with torch.no_grad():
        online.weight.fill_(1.0)
        online.bias.fill_(2.0)
    momentum = MomentumEncoder(online, 0.9)
    with torch.no_grad():
        momentum.model.weight.fill_(3.0)
        momentum.model.bias.fill_(-1.0)
    momentum.update(online)
    assert momentum.model.weight.tolist() == [[pytest.approx(0.9 * 3.0 + 0.1 * 1.0)] * 2]
    assert momentum.model.bias.item() == pytest.approx(0.9 * -1.0 + 0.1 * 2.0)


def test_queue_wraps_around_in_fifo_order():
    queue = FeatureQueues(6, 1, "cpu")
    assert queue.negatives(step=0, warmup_steps=0) is None
    for value in range(4):  # batches [0,0.5], [1,1.5], [2,2.5], [3,3.5]
        queue.enqueue(torch.tensor([[value], [value + 0.5]]), torch.tensor([[-value], [-value - 0.5]]))
        if value == 0:
            assert queue.negatives(step=0, warmup_steps=0) is None  # not full yet
            partial = queue.negatives(step=5, warmup_steps=5)  # warmup over: the filled part joins
            assert partial[0].flatten().tolist() == [0.0, 0.5]
    assert queue.images.flatten().tolist() == [3.0, 3.5, 1.0, 1.5, 2.0, 2.5]
    assert queue.texts.flatten().tolist() == [-3.0, -3.5, -1.0, -1.5, -2.0, -2.5]
    assert queue.pointer == 2 and queue.filled == 6
    with pytest.raises(ValueError, match="not a multiple"):
        queue.enqueue(torch.zeros(4, 1), torch.zeros(4, 1))


def test_queued_loss_equals_a_direct_computation():
    torch.manual_seed(0)
    img, txt = (F.normalize(torch.randn(5, 8), dim=-1) for _ in range(2))
    keys = tuple(F.normalize(torch.randn(5, 8), dim=-1) for _ in range(2))
    negatives = tuple(F.normalize(torch.randn(7, 8), dim=-1) for _ in range(2))
    scale = torch.tensor(10.0)
    got = queue_infonce_loss(img, txt, scale, keys, negatives)
    expected = 0.0
    for i in range(5):
        row_i = scale * img[i] @ torch.cat([keys[1], negatives[1]]).T
        row_t = scale * txt[i] @ torch.cat([keys[0], negatives[0]]).T
        expected += -(row_i[i] - row_i.logsumexp(0)) - (row_t[i] - row_t.logsumexp(0))
    torch.testing.assert_close(got, expected / 10)
    # memory bank: the batch's own online features are the in-batch columns
    bank = queue_infonce_loss(img, txt, scale, None, negatives)
    row = scale * img[0] @ torch.cat([txt, negatives[1]]).T
    assert bank > 0 and torch.isfinite(bank) and row.shape == (12,)


@pytest.mark.parametrize("kind", ["momentum", "memory_bank"])
def test_training_with_queues_keeps_gradients_off_the_keys(tmp_path, kind):
    recipe = load_recipe(RECIPES / "tiny" / "pretrain.toml", [*ARGS, "train.total_samples=64", f"loss.queue.kind={kind}"])
    trainer = Trainer(recipe, "pretrain", tmp_path / "run")
    result = trainer.run()
    assert result.steps == 4 and trainer.queues.filled == 48 and trainer.queues.pointer == 16
    assert not trainer.queues.images.requires_grad and not trainer.queues.texts.requires_grad
    if kind == "momentum":
        params = list(trainer.momentum.model.parameters())
        assert all(not p.requires_grad and p.grad is None for p in params)
        # the EMA moved towards the online weights but is not equal to them
        online = dict(trainer.unwrapped.named_parameters())
        moved = [name for name, p in trainer.momentum.model.named_parameters() if not torch.equal(p, online[name])]
        assert moved


def test_queue_state_round_trips_through_a_checkpoint(tmp_path):
    extra = [*ARGS, "train.total_samples=96", "loss.queue.kind=momentum"]
    straight = Trainer(load_recipe(RECIPES / "tiny" / "pretrain.toml", extra), "pretrain", tmp_path / "a")
    straight.run()
    Trainer(load_recipe(RECIPES / "tiny" / "pretrain.toml", extra), "pretrain", tmp_path / "b").run()
    for name in ("step_000004", "step_000006"):
        shutil.rmtree(tmp_path / "b" / "checkpoints" / name)
    shutil.rmtree(tmp_path / "b" / "final")
    resumed = Trainer(load_recipe(RECIPES / "tiny" / "pretrain.toml", extra), "pretrain", tmp_path / "b")
    assert resumed.step == 2 and resumed.queues.filled == 32
    resumed.run()
    assert torch.equal(resumed.queues.images, straight.queues.images)
    for a, b in zip(resumed.momentum.model.parameters(), straight.momentum.model.parameters()):
        assert torch.equal(a, b)
    losses = lambda d: {json.loads(l)["step"]: json.loads(l)["loss"] for l in (d / "metrics.jsonl").read_text().splitlines()}  # noqa: E731,E741
    assert losses(tmp_path / "b") == losses(tmp_path / "a")


def test_two_processes_enqueue_every_process_keys(tmp_path):
    out = tmp_path / "states.pt"
    run_torchrun(Path(__file__).with_name("distributed_queue.py"), out, timeout=300)
    states = torch.load(out, weights_only=False)
    for state in states:  # both processes hold the same queue: rank 0's keys, then rank 1's
        assert state["images"][:4, 0].tolist() == [0.0, 0.0, 1.0, 1.0]
        assert state["texts"][:4, 0].tolist() == [10.0, 10.0, 11.0, 11.0]
        assert state["filled"] == 4 and state["pointer"] == 4


@pytest.mark.parametrize("override, message", [
    ("loss.queue.size=50", "loss.queue.size: 50 is not a positive multiple of train.global_batch_size (16)"),
    ("loss.queue.momentum=1.0", "loss.queue.momentum: must be in [0, 1)"),
    ("loss.queue.kind=moco", 'loss.queue.kind: unknown value "moco"'),
])
def test_bad_queue_settings(override, message):
    with pytest.raises(ClipaError) as info:
        load_recipe(RECIPES / "tiny" / "pretrain.toml", [*ARGS, "loss.queue.kind=momentum", override])
    assert message in str(info.value)
