"""Pretrained image towers (timm or another clipa model), locking, and their errors."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from clipa.errors import ClipaError
from clipa.recipe.load import load_recipe
from clipa.train.trainer import Trainer, train

from conftest import RECIPES, RESIZE_32, tiny_overrides


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
    # the optimizer holds exactly the unlocked parameters: locked ones cost no optimizer state
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}


def test_locked_text_tower_is_absent_from_the_optimizer(tmp_path):
    trainer = Trainer(recipe("model.lock_text=true"), "pretrain", tmp_path / "r")
    model = trainer.unwrapped
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    text = {n: p for n, p in model.named_parameters() if not n.startswith("visual.") and n != "logit_scale"}
    assert {"token_embedding.weight", "positional_embedding", "text_projection", "ln_final.weight"} <= set(text)
    assert not [n for n, p in text.items() if id(p) in optimized or p.requires_grad]
    assert all(id(p) in optimized for p in model.visual.parameters())  # the image side still trains


def test_timm_tower_unlocked_last_groups_are_exactly_those(tmp_path):
    trainer = Trainer(recipe("model.image_tower=vit_tiny_patch16_224", "model.lock_image=true",
                             "model.lock_image_unlocked_groups=2"), "pretrain", tmp_path / "r")
    visual = trainer.unwrapped.visual
    # timm's groups for a ViT: [stem], blocks.0 .. blocks.10, [blocks.11 + final norm]; open_clip's new
    # projection head is never locked
    assert {n for n, p in visual.named_parameters() if p.requires_grad} == {
        n for n, _ in visual.named_parameters() if n.startswith(("trunk.blocks.10.", "trunk.blocks.11.", "trunk.norm.", "head."))}
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert {n for n, p in visual.named_parameters() if id(p) in optimized} == \
        {n for n, p in visual.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("freeze", [True, False])
def test_locked_batchnorm_statistics_stay_frozen_by_default(tmp_path, freeze):
    extra = [] if freeze else ["model.lock_image_freeze_norm=false"]
    # resized to 32 px: a CNN has no patch tokens to mask
    trainer = Trainer(recipe("model.image_tower=resnet18", "model.lock_image=true", *RESIZE_32, *extra,
                             **{"train.global_batch_size": 8, "train.total_samples": 16}), "pretrain", tmp_path / "r")
    trunk = trainer.unwrapped.visual.trunk
    stats = {n: b.clone() for n, b in trunk.named_buffers() if n.endswith(("running_mean", "running_var"))}
    assert len(stats) == 2 * 20  # resnet18's 20 BatchNorm layers
    trainer.run()
    changed = [n for n, b in trunk.named_buffers() if n in stats and not torch.equal(b, stats[n])]
    if freeze:  # the default: a locked tower computes what it computed before training
        assert changed == []
    else:  # the contrast that makes the check meaningful: train-mode BN moves its statistics
        assert len(changed) == len(stats)


def test_timm_vit_tower_masks_patch_tokens_before_its_blocks(tmp_path):
    trainer = Trainer(recipe("model.image_tower=vit_tiny_patch16_224", "reduction.image_size=64",
                             "reduction.image=grid", "reduction.mask_ratio=0.5",
                             **{"train.global_batch_size": 8, "train.total_samples": 16}), "pretrain", tmp_path / "r")
    trunk = trainer.unwrapped.visual.trunk
    assert trunk.patch_drop is trainer.masker and trainer.masker.grid == (4, 4)
    seen = []

    def check(module, inputs, output):  # what the slot receives (cls + 16 patches) and passes on
        x = inputs[0]
        if module.training:
            kept = torch.gather(x[:, 1:], 1, module.keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            assert torch.equal(output[:, :1], x[:, :1]) and torch.equal(output[:, 1:], kept)

    trunk.patch_drop.register_forward_hook(check)
    trunk.blocks[0].register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].shape[1]))
    result = trainer.run()
    assert result.steps == 2 and seen and set(seen) == {1 + 8}  # the class token + int(16 * 0.5) kept patches


def test_patch_masker_keeps_every_prefix_token():
    """timm ViTs with register or distillation tokens put them first (num_prefix_tokens); none is dropped."""
    from clipa.model.masking import PatchMasker

    masker = PatchMasker("random", 0.5, (2, 2), prefix_tokens=3)
    masker.train()
    x = torch.arange(2 * 7, dtype=torch.float32).reshape(2, 7, 1)
    masker.use(torch.tensor([[0, 3], [1, 2]]))
    assert masker(x)[..., 0].tolist() == [[0, 1, 2, 3, 6], [7, 8, 9, 11, 12]]


def test_timm_tower_geometry_comes_from_the_timm_model():
    from clipa.model.build import Geometry, stage_geometry

    with pytest.raises(ClipaError, match=r"reduction.image_size: 40 is not divisible by the patch size 16 of timm "
                                         r"model vit_tiny_patch16_224 \(model.image_tower\); use 32 or 48"):
        stage_geometry(recipe("model.image_tower=vit_tiny_patch16_224", "reduction.image_size=40"))
    # clipa-tiny's own patch is 8, so 40 px would pass a check against the architecture instead
    assert stage_geometry(recipe("reduction.image_size=40")).image_size == 40
    # native resolution: the timm model's, not the architecture's
    assert stage_geometry(recipe("model.image_tower=vit_base_patch16_384", "reduction.image_size=0")) == Geometry(384, 8)
    assert stage_geometry(recipe("model.image_tower=resnet18", "reduction.image_size=40")).image_size == 40


@pytest.mark.slow
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
    with pytest.raises(ClipaError, match='reduction.image: "random" masking needs a ViT image tower with patch tokens; '
                                         'timm model "resnet18" has none to drop; use reduction.image="resize"'):
        Trainer(recipe("model.image_tower=resnet18", "reduction.image=random", "reduction.mask_ratio=0.5"),
                "pretrain", tmp_path / "b")
    with pytest.raises(ClipaError, match='model.image_tower: unknown timm model "vit_tinny_patch16_224"'):
        Trainer(recipe("model.image_tower=vit_tinny_patch16_224"), "pretrain", tmp_path / "c")
    with pytest.raises(ClipaError, match="both towers fully locked"):
        recipe("model.lock_image=true", "model.lock_text=true")


@pytest.mark.parametrize("overrides, fragments", [
    (["model.image_init={missing}"], ["model.image_init:", "nope.safetensors does not exist", "timm:NAME.TAG"]),
    (["model.image_tower=vit_tiny_patch16_224", "reduction.image_size=40"],
     ["reduction.image_size: 40 is not divisible by the patch size 16 of timm model vit_tiny_patch16_224", "use 32 or 48"]),
    (["model.image_tower=resnet18", "reduction.image=block", "reduction.mask_ratio=0.5"],
     ['reduction.image: "block" masking needs a ViT image tower', 'timm model "resnet18"', 'reduction.image="resize"']),
])
def test_tower_errors_exit_2_from_validate_and_pretrain(cli, tmp_path, overrides, fragments):
    from test_cli import assert_user_error

    overrides = [o.format(missing=tmp_path / "nope.safetensors") for o in overrides]
    for command in ("validate", "pretrain"):
        args = [RECIPES / "tiny" / "pretrain.toml", *tiny_overrides(), *overrides]
        assert_user_error(cli(command, *args, "--out", tmp_path / "run") if command == "pretrain" else cli(command, *args),
                          *fragments)
