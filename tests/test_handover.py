"""init.optimizer_state: a finetune takes over the first stage's AdamW moments."""

import pytest
import torch

from clipa.errors import ClipaError
from clipa.model.safeload import load_plain
from clipa.recipe.load import load_recipe
from clipa.train.checkpoint import STATE_FILE, CheckpointManager
from clipa.train.trainer import Trainer, train

from conftest import RECIPES, RESIZE_32, tiny_overrides


def finetune_recipe(init, **extra):
    return load_recipe(RECIPES / "tiny" / "finetune.toml", tiny_overrides(**{"init.checkpoint": str(init), **extra}))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    run = tmp_path_factory.mktemp("handover") / "pretrain"
    # the 32 px first stage: the finetune resizes both position tables
    train(load_recipe(RECIPES / "tiny" / "pretrain.toml", [*tiny_overrides(**{"train.total_samples": 32 * 3}), *RESIZE_32]),
          "pretrain", run)
    return run


def test_finetune_takes_over_the_moments_of_every_tensor_whose_shape_is_unchanged(pretrained, tmp_path):
    theirs = load_plain(CheckpointManager(pretrained / "checkpoints").latest() / STATE_FILE, mmap=False)["optimizer"]
    trainer = Trainer(finetune_recipe(pretrained, **{"init.optimizer_state": "true"}), "finetune", tmp_path / "ft")
    try:
        names = {id(p): n for n, p in trainer.unwrapped.named_parameters()}
        params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
        their_state = [theirs["state"][i] for g in theirs["param_groups"] for i in g["params"]]
        fresh = []
        for param, moments in zip(params, their_state):
            state = trainer.optimizer.state[param]
            if moments["exp_avg"].shape != param.shape:
                fresh.append(names[id(param)])
                assert not state  # resized: a fresh start
                continue
            assert torch.equal(state["exp_avg"], moments["exp_avg"]) and torch.equal(state["exp_avg_sq"], moments["exp_avg_sq"])
            assert float(state["step"]) == float(moments["step"]) > 0
        # 32 px -> 64 px and 8 -> 32 tokens: exactly the two position tables were resized
        assert sorted(fresh) == ["positional_embedding", "visual.positional_embedding"]
        # the finetune's own schedule (warmup 1: its peak at once), not the first stage's position in its own
        assert [g["lr"] for g in trainer.optimizer.param_groups] == [trainer.recipe.optim.lr] * 2 == [5e-4] * 2
        assert any("108 of 110" in note for note in trainer.notes), trainer.notes
    finally:
        trainer.close()


def test_without_the_key_the_finetune_starts_a_fresh_optimizer(pretrained, tmp_path):
    trainer = Trainer(finetune_recipe(pretrained), "finetune", tmp_path / "ft")
    try:
        assert not trainer.optimizer.state
    finally:
        trainer.close()


def test_an_exported_model_has_no_moments_to_take_over(pretrained, tmp_path):
    with pytest.raises(ClipaError, match=r"^init.optimizer_state: init.checkpoint .*final holds no training state"):
        Trainer(finetune_recipe(pretrained / "final", **{"init.optimizer_state": "true"}), "finetune", tmp_path / "ft")


def test_another_architecture_is_refused_naming_the_key(pretrained, tmp_path):
    recipe = finetune_recipe(pretrained, **{"init.optimizer_state": "true", "model.lock_image": "true"})
    with pytest.raises(ClipaError, match=r"^init.optimizer_state: the optimizer of .* holds other parameters"):
        Trainer(recipe, "finetune", tmp_path / "ft")


def test_the_key_needs_an_init_checkpoint(cli):
    result = cli("validate", "tiny/pretrain", "init.optimizer_state=true")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: init.optimizer_state: takes the optimizer's moments")
