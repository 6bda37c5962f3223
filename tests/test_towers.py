"""Pretrained image towers (timm or another clipa model), locking, and their errors."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from clipa.errors import ClipaError
from clipa.recipe import load_recipe
from clipa.train import Trainer, train
from conftest import RECIPES, tiny_overrides


def recipe(*extra, **kw):
    return load_recipe(RECIPES / "tiny" / "pretrain.toml", [*tiny_overrides(**kw), *extra])


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    return train(recipe(), "pretrain", tmp_path_factory.mktemp("towers") / "source").run_dir


def test_image_tower_from_another_clipa_run_is_loaded_exactly(tmp_path, pretrained_run):
    trainer = Trainer(recipe(f"model.image_init={pretrained_run}"), "pretrain", tmp_path / "run")
    source = load_model_state(pretrained_run)
    for name, value in trainer.unwrapped.visual.state_dict().items():
        assert torch.equal(value, source[f"visual.{name}"]), name
    # the text tower is not taken from the source
    assert not torch.equal(trainer.unwrapped.token_embedding.weight, source["token_embedding.weight"])


def load_model_state(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "open_clip_model.safetensors"))


def test_locked_image_tower_is_unchanged_and_absent_from_the_optimizer(tmp_path, pretrained_run):
    trainer = Trainer(recipe(f"model.image_init={pretrained_run}", "model.lock_image=true"), "pretrain", tmp_path / "r")
    before = {k: v.clone() for k, v in trainer.unwrapped.visual.state_dict().items()}
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in optimized for p in trainer.unwrapped.visual.parameters())
    text_before = trainer.unwrapped.text_projection.detach().clone()
    trainer.run()
    for name, value in trainer.unwrapped.visual.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in trainer.unwrapped.visual.parameters())
    assert not torch.equal(trainer.unwrapped.text_projection, text_before)  # the text side trained


def test_unlocked_last_groups_are_exactly_those(tmp_path):
    trainer = Trainer(recipe("model.lock_image=true", "model.lock_image_unlocked_groups=2",
                             "model.lock_text=true", "model.lock_text_unlocked_groups=2"), "pretrain", tmp_path / "r")
    model = trainer.unwrapped
    trainable_visual = {n for n, p in model.visual.named_parameters() if p.requires_grad}
    last = len(model.visual.transformer.resblocks) - 1
    # open_clip's groups: [stem], block 0 .. block N-2, [block N-1 + ln_post], proj
    assert trainable_visual == {n for n, _ in model.visual.named_parameters()
                                if n.startswith(f"transformer.resblocks.{last}.") or n.startswith("ln_post") or n == "proj"}
    trainable_text = {n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("visual.")}
    assert {n.split(".")[2] for n in trainable_text if n.startswith("transformer.resblocks.")} == {str(last)}
    assert {"ln_final.weight", "text_projection", "logit_scale"} <= trainable_text
    assert "token_embedding.weight" not in trainable_text and "positional_embedding" not in trainable_text


def test_timm_tower_loads_a_timm_checkpoint_at_a_reduced_resolution(tmp_path):
    source = timm.create_model("vit_tiny_patch16_224", num_classes=10)
    path = tmp_path / "vit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    trainer = Trainer(recipe("model.image_tower=vit_tiny_patch16_224", f"model.image_init={path}",
                             "reduction.image_size=64", "model.lock_image=true"), "pretrain", tmp_path / "run")
    trunk = trainer.unwrapped.visual.trunk
    assert trunk.pos_embed.shape[1] == 16 + 1  # 4x4 patches at 64 px, resampled from 14x14
    assert torch.equal(trunk.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert torch.equal(trunk.patch_embed.proj.weight, source.patch_embed.proj.weight)
    result = trainer.run()
    assert result.steps == 6


def test_tower_errors_are_clear(tmp_path):
    with pytest.raises(ClipaError, match="model.image_init: .*nope.safetensors does not exist"):
        Trainer(recipe(f"model.image_init={tmp_path / 'nope.safetensors'}"), "pretrain", tmp_path / "a")
    with pytest.raises(ClipaError, match='reduction.image: "random" masking needs an open_clip ViT image tower'):
        Trainer(recipe("model.image_tower=resnet18", "reduction.image=random", "reduction.mask_ratio=0.5"),
                "pretrain", tmp_path / "b")
    with pytest.raises(ClipaError, match='model.image_tower: unknown timm model "vit_tinny_patch16_224"'):
        Trainer(recipe("model.image_tower=vit_tinny_patch16_224"), "pretrain", tmp_path / "c")
    with pytest.raises(ClipaError, match="both towers fully locked"):
        recipe("model.lock_image=true", "model.lock_text=true")
