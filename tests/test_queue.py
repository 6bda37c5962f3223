"""Feature queues and the momentum encoder: math, order, gradients, resume, processes."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from clipa.errors import ClipaError
from clipa.recipe.load import load_recipe
from clipa.train.queue import FeatureQueues, MomentumEncoder, queue_infonce_loss
from clipa.train.trainer import Trainer

from conftest import RECIPES

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
    # memory bank: the batch's own online features are the in-batch columns, the queue the rest
    captured = []
    bank = queue_infonce_loss(img, txt, scale, None, negatives, captured)
    expected = 0.0
    for i in range(5):
        row_i = scale * img[i] @ torch.cat([txt, negatives[1]]).T
        row_t = scale * txt[i] @ torch.cat([img, negatives[0]]).T
        expected += -(row_i[i] - row_i.logsumexp(0)) - (row_t[i] - row_t.logsumexp(0))
    torch.testing.assert_close(bank, expected / 10)
    # what the bank enqueues after the step: this batch's online features, detached
    assert torch.equal(captured[0], img) and torch.equal(captured[1], txt)
    assert not captured[0].requires_grad and not captured[1].requires_grad


def _accumulated_queue_step(batch, micro, kind, masked):
    """One optimizer step's forward/backward as the trainer wires it: momentum keys before the online
    forward, the queue's negatives, the loss over the global batch, then one enqueue."""
    from accelerate import Accelerator

    from clipa.model.build import create_model, stage_config
    from clipa.model.masking import install_patch_masker
    from clipa.train.step import ContrastiveStep

    from test_accumulation import GEOMETRY, split

    torch.manual_seed(0)
    model = create_model(stage_config("clipa-tiny", GEOMETRY))
    masker = install_patch_masker(model, "random", 0.5) if masked else None
    model.train()
    accelerator = Accelerator(cpu=True)
    queues = FeatureQueues(128, 128, "cpu")
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):  # a full queue of earlier features, the same for both layouts
        queues.enqueue(*(F.normalize(torch.randn(64, 128, generator=generator), dim=-1) for _ in range(2)))
    micro_batches = split(batch, micro)
    momentum = MomentumEncoder(model, 0.9) if kind == "momentum" else None
    keys = momentum.keys(micro_batches, accelerator.autocast) if momentum else None
    negatives = queues.negatives(step=0, warmup_steps=0)
    captured = []
    step = ContrastiveStep(model, model, lambda i, t, s, b=None: queue_infonce_loss(i, t, s, keys, negatives, captured),
                           accelerator, masker)
    loss = step(micro_batches)
    queues.enqueue(*(keys if momentum else captured))  # once per optimizer step
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, queues


@pytest.mark.parametrize("kind, masked", [("momentum", False), ("momentum", True), ("memory_bank", False)])
def test_accumulated_queue_step_equals_one_big_step(kind, masked):
    from test_accumulation import assert_same_gradients, global_batch

    batch = global_batch(masked=masked)
    loss_big, big, queue_big = _accumulated_queue_step(batch, 64, kind, masked)
    loss_acc, acc, queue_acc = _accumulated_queue_step(batch, 16, kind, masked)
    assert loss_acc == pytest.approx(loss_big, rel=1e-6)
    assert "logit_scale" in big
    assert_same_gradients(acc, big)
    # the whole global batch's keys, in batch order, entered the queue once: 64 rows at the pointer
    for queue in (queue_big, queue_acc):
        assert queue.pointer == 64 and queue.filled == 128
    torch.testing.assert_close(queue_acc.images, queue_big.images, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(queue_acc.texts, queue_big.texts, rtol=1e-5, atol=1e-6)
    assert not torch.equal(queue_big.images[:64], queue_big.images[64:])  # the new rows replaced the oldest


@pytest.mark.parametrize("kind", ["momentum", "memory_bank"])
def test_training_with_queues_keeps_gradients_off_the_keys(tmp_path, kind):
    recipe = load_recipe(RECIPES / "tiny" / "pretrain.toml", [*ARGS, "train.total_samples=64", f"loss.queue.kind={kind}"])
    trainer = Trainer(recipe, "pretrain", tmp_path / "run")
    initial = {name: p.detach().clone() for name, p in trainer.unwrapped.named_parameters()}
    result = trainer.run()
    assert result.steps == 4 and trainer.queue.queues.filled == 48 and trainer.queue.queues.pointer == 16
    assert not trainer.queue.queues.images.requires_grad and not trainer.queue.queues.texts.requires_grad
    if kind == "momentum":
        params = list(trainer.queue.momentum.model.parameters())
        assert all(not p.requires_grad and p.grad is None for p in params)
        # the EMA moved towards the online weights but is not equal to them
        online = dict(trainer.unwrapped.named_parameters())
        ema = dict(trainer.queue.momentum.model.named_parameters())
        assert any(not torch.equal(ema[name], online[name]) for name in online)
        # ... and it was updated at all: an encoder left at its starting copy fails here. Every weight the
        # optimizer moved, the EMA moved in the same direction, by less (decay 0.995 over 4 steps).
        for name, start in initial.items():
            online_moved, ema_moved = online[name] - start, ema[name] - start
            if online_moved.abs().max() > 1e-6:
                assert ema_moved.abs().max() > 0, f"{name}: momentum encoder never updated"
                assert ema_moved.norm() < online_moved.norm(), name
                assert F.cosine_similarity(ema_moved.flatten(), online_moved.flatten(), dim=0) > 0.5, name


def test_the_queue_enters_the_trainers_loss(tmp_path):
    """The same run with and without a memory bank: identical at step 1 (an empty queue adds nothing),
    different from step 2 on, once the queue's negatives join the loss (warmup_steps=1). A trainer that
    built the queue but never passed it to the loss fails here."""
    def losses(name, *extra):
        recipe = load_recipe(RECIPES / "tiny" / "pretrain.toml", [*ARGS, "train.total_samples=64", *extra])
        Trainer(recipe, "pretrain", tmp_path / name).run()
        lines = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return {line["step"]: line["loss"] for line in lines if "loss" in line}

    plain, queued = losses("plain"), losses("queued", "loss.queue.kind=memory_bank")
    assert sorted(plain) == sorted(queued) == [1, 2, 3, 4]
    assert queued[1] == pytest.approx(plain[1], rel=1e-6)
    # Step 2 sees the same weights and batch in both runs (step 1 was identical): the queue's 16 extra
    # negatives in the softmax make its loss larger. Later steps differ in weights as well.
    assert queued[2] > plain[2] * 1.01, (plain, queued)
    assert all(queued[step] != pytest.approx(plain[step], rel=1e-6) for step in (3, 4)), (plain, queued)


@pytest.mark.parametrize("kind", ["momentum", "memory_bank"])
@pytest.mark.slow
def test_queue_state_round_trips_through_a_checkpoint(tmp_path, kind):
    extra = [*ARGS, "train.total_samples=96", f"loss.queue.kind={kind}"]
    straight = Trainer(load_recipe(RECIPES / "tiny" / "pretrain.toml", extra), "pretrain", tmp_path / "a")
    straight.run()
    # The same run interrupted after step 2: its directory as it was then (runs are deterministic on CPU).
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for name in ("step_000004", "step_000006"):
        shutil.rmtree(tmp_path / "b" / "checkpoints" / name)
    shutil.rmtree(tmp_path / "b" / "final")
    resumed = Trainer(load_recipe(RECIPES / "tiny" / "pretrain.toml", extra), "pretrain", tmp_path / "b")
    assert resumed.step == 2 and resumed.queue.queues.filled == 32 and resumed.queue.queues.pointer == 32
    assert resumed.queue.queues.texts[:32].abs().sum() > 0 and not resumed.queue.queues.texts[32:].any()
    resumed.run()
    ours, theirs = resumed.queue.queues, straight.queue.queues
    assert torch.equal(ours.images, theirs.images) and torch.equal(ours.texts, theirs.texts)
    assert (ours.pointer, ours.filled) == (theirs.pointer, theirs.filled)
    if kind == "momentum":
        for a, b in zip(resumed.queue.momentum.model.parameters(), straight.queue.momentum.model.parameters()):
            assert torch.equal(a, b)
    else:
        assert resumed.queue.momentum is None
    losses = lambda d: {json.loads(l)["step"]: json.loads(l)["loss"] for l in (d / "metrics.jsonl").read_text().splitlines()}  # noqa: E731,E741
    assert losses(tmp_path / "b") == losses(tmp_path / "a")


@pytest.mark.parametrize("override, message", [
    ("loss.queue.size=50", "loss.queue.size: 50 is not a positive multiple of train.global_batch_size (16)"),
    ("loss.queue.momentum=1.0", "loss.queue.momentum: must be in [0, 1)"),
    ("loss.queue.momentum=-0.1", "loss.queue.momentum: must be in [0, 1)"),
    ("loss.queue.kind=moco", 'loss.queue.kind: unknown value "moco"'),
])
def test_bad_queue_settings(override, message):
    with pytest.raises(ClipaError) as info:
        load_recipe(RECIPES / "tiny" / "pretrain.toml", [*ARGS, "loss.queue.kind=momentum", override])
    assert message in str(info.value)


@pytest.mark.parametrize("override, message", [
    ("loss.queue.size=50", "loss.queue.size: 50 is not a positive multiple of train.global_batch_size (16); use e.g. 48"),
    ("loss.queue.momentum=1.0", "loss.queue.momentum: must be in [0, 1), got 1.0"),
])
def test_bad_queue_settings_exit_2_from_the_cli(cli, tmp_path, override, message):
    from test_cli import assert_user_error

    args = [RECIPES / "tiny" / "pretrain.toml", *ARGS, "loss.queue.kind=momentum", override]
    assert_user_error(cli("validate", *args), message)
    assert_user_error(cli("pretrain", *args, "--out", tmp_path / "run"), message)
    assert not (tmp_path / "run").exists()  # refused before any work
    # The queue's settings are inert without a queue, and only checked when one is on.
    assert cli("validate", RECIPES / "tiny" / "pretrain.toml", *ARGS, "loss.queue.kind=none", override).returncode == 0
