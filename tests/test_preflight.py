"""One preflight (clipa.train.preflight) for the command, its --dry-run, `clipa validate` and the trainer:
`train()` called from Python refuses what `clipa finetune` refuses, with the same line, before building anything."""

import pytest

from clipa.errors import ClipaError
from clipa.recipe.index import resolve_path
from clipa.recipe.load import load_recipe
from clipa.train.preflight import preflight
from clipa.train.trainer import train

from conftest import tiny_overrides
from test_cli import assert_user_error

QUICKGELU = ("init.checkpoint: ViT-B-32:openai was trained with QuickGELU", 'model.arch = "ViT-B-32-quickgelu"')


def test_train_from_python_refuses_openai_weights_for_a_gelu_model(tmp_path):
    recipe = load_recipe(resolve_path("tiny/finetune"),
                         [*tiny_overrides(), "model.arch=ViT-B-32", "init.checkpoint=ViT-B-32:openai"])
    with pytest.raises(ClipaError) as refused:
        train(recipe, "finetune", tmp_path / "run")
    assert all(fragment in str(refused.value) for fragment in QUICKGELU)
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_train_from_python_refuses_a_finetune_without_weights(tmp_path):
    recipe = load_recipe(resolve_path("tiny/finetune"), [*tiny_overrides(), 'init.checkpoint=""'])
    with pytest.raises(ClipaError, match="init.checkpoint: finetune needs weights to start from"):
        train(recipe, "finetune", tmp_path / "run")


def test_the_command_its_dry_run_and_validate_say_the_same(cli, tmp_path):
    args = ["tiny/finetune", *tiny_overrides(), "model.arch=ViT-B-32", "init.checkpoint=ViT-B-32:openai"]
    assert_user_error(cli("finetune", *args, "--out", tmp_path / "a"), *QUICKGELU)
    assert_user_error(cli("finetune", *args, "--out", tmp_path / "b", "--dry-run"), *QUICKGELU)
    assert_user_error(cli("validate", *args), *QUICKGELU)


def test_the_default_run_directory_is_decided_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(resolve_path("tiny/pretrain"), tiny_overrides())
    assert preflight(recipe, "pretrain").run_dir == tmp_path.joinpath("runs", recipe.name).relative_to(tmp_path)
