"""`model.vision_cfg` / `model.text_cfg`: open_clip tower details (pooling, ln_pre, causal mask, activation and
norm settings) set from a recipe over the architecture's own config, checked against open_clip's fields,
and exported as a plain open_clip config."""

import json
import math

import open_clip
import pytest
import torch

from clipa.errors import ClipaError
from clipa.model.build import create_model, recipe_model_config
from clipa.recipe.checks import check_resume_compatible
from clipa.recipe.load import dumps, load_recipe, recipe_from_dict

from conftest import RECIPES, RESIZE_32

TINY = RECIPES / "tiny" / "pretrain.toml"
CLIPA_V2 = ["model.vision_cfg.pool_type=avg", "model.vision_cfg.no_ln_pre=true",
            "model.vision_cfg.final_ln_after_pool=true", "model.text_cfg.pool_type=last",
            "model.text_cfg.no_causal_mask=true", "model.vision_cfg.act_kwargs.approximate=tanh",
            "model.vision_cfg.norm_kwargs.eps=1e-6", "model.text_cfg.norm_kwargs.eps=1e-6"]


def test_overrides_lay_over_the_architecture_and_build_those_towers():
    recipe = load_recipe(TINY, [*CLIPA_V2, *RESIZE_32])  # a stage at 32 px, so its size is not the arch's 64
    assert recipe.model.vision_cfg == {"pool_type": "avg", "no_ln_pre": True, "final_ln_after_pool": True,
                                       "act_kwargs": {"approximate": "tanh"}, "norm_kwargs": {"eps": 1e-6}}
    _, cfg = recipe_model_config(recipe)
    assert cfg["vision_cfg"]["width"] == 128 and cfg["vision_cfg"]["image_size"] == 32  # the arch's, the stage's
    assert cfg["text_cfg"]["pool_type"] == "last" and cfg["text_cfg"]["no_causal_mask"] is True
    model = create_model(cfg)
    visual = model.visual
    assert isinstance(visual.ln_pre, torch.nn.Identity) and visual.pool_type == "avg" and visual.final_ln_after_pool
    assert visual.ln_post.eps == 1e-6 and visual.transformer.resblocks[0].mlp.gelu.approximate == "tanh"
    assert model.attn_mask is None and model.text_pool_type == "last" and model.ln_final.eps == 1e-6

    default = create_model(recipe_model_config(load_recipe(TINY))[1])
    assert isinstance(default.visual.ln_pre, torch.nn.LayerNorm) and default.visual.pool_type == "tok"
    assert default.attn_mask is not None and default.text_pool_type == "argmax"


def test_defaults_come_from_the_architecture_and_the_recipe_wins():
    # open_clip's ViT-L-14-CLIPA.json: GAP without ln_pre, last-token text pooling, no causal mask
    _, cfg = recipe_model_config(load_recipe(RECIPES / "vit_l14" / "pretrain_84.toml"))
    assert {k: cfg["vision_cfg"][k] for k in ("pool_type", "no_ln_pre", "final_ln_after_pool")} == \
        {"pool_type": "avg", "no_ln_pre": True, "final_ln_after_pool": True}
    assert cfg["text_cfg"]["pool_type"] == "last" and cfg["text_cfg"]["no_causal_mask"] is True
    _, cfg = recipe_model_config(load_recipe(RECIPES / "vit_l14" / "pretrain_84.toml",
                                             ["model.vision_cfg.pool_type=tok", "model.text_cfg.no_causal_mask=false"]))
    assert cfg["vision_cfg"]["pool_type"] == "tok" and cfg["vision_cfg"]["no_ln_pre"] is True
    assert cfg["text_cfg"]["no_causal_mask"] is False


def test_export_loads_in_plain_open_clip_with_the_same_outputs(tmp_path):
    from clipa.model.weights import export_open_clip

    _, cfg = recipe_model_config(load_recipe(TINY, [*CLIPA_V2, *RESIZE_32]))  # a 32 px stage, as the images below
    torch.manual_seed(0)
    ours = create_model(cfg).eval()
    export_open_clip(ours, cfg, tmp_path / "export")
    written = json.loads((tmp_path / "export" / "open_clip_config.json").read_text())["model_cfg"]
    assert written["vision_cfg"]["pool_type"] == "avg" and written["text_cfg"]["no_causal_mask"] is True
    theirs, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'export'}")
    theirs.eval()
    assert theirs.visual.pool_type == "avg" and isinstance(theirs.visual.ln_pre, torch.nn.Identity)
    images = torch.randn(3, 3, 32, 32)
    tokens = open_clip.get_tokenizer("ViT-B-32", context_length=8)(["a red circle", "a blue square", "a cat"])
    with torch.no_grad():
        assert torch.equal(theirs.encode_image(images), ours.encode_image(images))
        assert torch.equal(theirs.encode_text(tokens), ours.encode_text(tokens))
        # the details are live: the same weights with a causal mask give other text features
        causal = create_model({**cfg, "text_cfg": {**cfg["text_cfg"], "no_causal_mask": False}}).eval()
        causal.load_state_dict(ours.state_dict())
        assert not torch.allclose(causal.encode_text(tokens), ours.encode_text(tokens), atol=1e-4)


def test_tables_survive_config_toml_and_cannot_change_on_resume(tmp_path):
    import tomllib

    recipe = load_recipe(TINY, CLIPA_V2)
    again = recipe_from_dict(tomllib.loads(dumps(recipe)))
    assert again.model.vision_cfg == recipe.model.vision_cfg and again.model.text_cfg == recipe.model.text_cfg
    with pytest.raises(ClipaError, match=r"^model\.vision_cfg: the checkpoint"):
        check_resume_compatible(load_recipe(TINY), recipe, tmp_path)


@pytest.mark.parametrize("override, message", [
    ("model.vision_cfg.pool_typ=avg", "model.vision_cfg.pool_typ: unknown open_clip vision_cfg field; did you mean "
                                      "'model.vision_cfg.pool_type'?"),
    ("model.text_cfg.casual_mask=false", "model.text_cfg.casual_mask: unknown open_clip text_cfg field"),
    ("model.vision_cfg.pool_type=cls", "model.vision_cfg.pool_type: unknown value 'cls' (allowed: tok, avg; tok = "
                                       "the class token"),
    ("model.text_cfg.pool_type=none", "model.text_cfg.pool_type: unknown value 'none'"),
    ("model.vision_cfg.no_ln_pre=3", "model.vision_cfg.no_ln_pre: expected bool, got 3"),
    ("model.vision_cfg.image_size=32", "model.vision_cfg.image_size: not settable here: the stage's resolution is "
                                       "reduction.image_size"),
    ("model.vision_cfg.pos_embed_type=sin_cos_2d", "model.vision_cfg.pos_embed_type: not settable here: position "
                                                   "embeddings are model.pos_embed"),
    ("model.vision_cfg.patch_dropout=0.5", "reduction.mask_ratio"),
    ("model.text_cfg.context_length=8", "reduction.text_length"),
    ("model.vision_cfg.patch_size=4", "model.vision_cfg.patch_size: not settable here: the tower's size belongs to "
                                      "the architecture: give a model-config JSON as model.arch"),
    ("model.text_cfg.width=64", "model.text_cfg.width: not settable here: the tower's size"),
    ("model.vision_cfg.output_tokens=true", "model.vision_cfg.output_tokens: not settable here"),
    ("model.text_cfg.embed_cls=true", "model.text_cfg.embed_cls: not settable here"),
    ("model.text_cfg.hf_model_name=bert-base-uncased", "model.text_cfg.hf_model_name: not settable here"),
    ("model.vision_cfg=fast", "model.vision_cfg: expected a [model.vision_cfg] table"),
])
def test_bad_tower_keys_are_one_line_errors_naming_the_key(cli, override, message):
    result = cli("validate", "tiny/pretrain", override)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_vision_fields_on_a_timm_tower_are_refused(cli):
    result = cli("validate", "tiny/pretrain", "model.image_tower=vit_tiny_patch16_224", "model.vision_cfg.no_ln_pre=true")
    assert result.returncode == 2 and "model.vision_cfg: sets open_clip ViT fields, but the image tower is timm's" \
        in result.stderr, result.stderr


V2_TRAINING = [*CLIPA_V2, "model.pos_embed=sincos2d", "train.logit_scale_max=inf", "optim.decay_embeddings=false",
               "data.augment.interpolation=bilinear", "data.augment.color_jitter=[0.32, 0.32, 0.32, 0.08]",
               "data.augment.color_jitter_prob=0.8", "data.augment.gray_scale_prob=0.2"]


@pytest.mark.slow
def test_a_clipa_v2_style_pipeline_trains_and_exports_to_open_clip(tmp_path, cli):
    """What the v2 recipes set, on the tiny model: pretrain at 32 px / 8 tokens, finetune at 64 px with masking,
    the export loads in plain open_clip with the same towers and outputs."""
    from clipa.evaluate.models import load_model

    from conftest import tiny_overrides

    pre, fine = tmp_path / "pre", tmp_path / "fine"
    result = cli("pretrain", "tiny/pretrain", *tiny_overrides(**{"train.total_samples": 64}), *V2_TRAINING,
                 "--out", pre)
    assert result.returncode == 0, result.stderr
    result = cli("finetune", "tiny/finetune", *tiny_overrides(**{"train.total_samples": 64}), *V2_TRAINING,
                 f"init.checkpoint={pre}", "--out", fine)
    assert result.returncode == 0, result.stderr
    config = json.loads((fine / "final" / "open_clip_config.json").read_text())["model_cfg"]
    assert config["vision_cfg"]["act_kwargs"] == {"approximate": "tanh"} and config["text_cfg"]["pool_type"] == "last"
    theirs, _, _ = open_clip.create_model_and_transforms(f"local-dir:{fine / 'final'}")
    ours = load_model(str(fine / "final")).model.eval()
    images, tokens = torch.randn(2, 3, 64, 64), torch.randint(1, 400, (2, 32))
    with torch.no_grad():
        assert torch.allclose(theirs.eval().encode_image(images), ours.encode_image(images), atol=1e-6)
        assert torch.allclose(theirs.encode_text(tokens), ours.encode_text(tokens), atol=1e-6)
    metrics = [json.loads(line) for line in (fine / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["loss"]) for m in metrics if "loss" in m)


def test_weights_of_other_towers_are_refused_naming_the_tables():
    from clipa.model.weights import load_weights

    _, cfg = recipe_model_config(load_recipe(TINY, ["model.vision_cfg.no_ln_pre=true"]))
    no_ln_pre = create_model(cfg).state_dict()
    with pytest.raises(ClipaError, match=r"missing \['visual.ln_pre.weight'.*model.vision_cfg / text_cfg"):
        load_weights(create_model(recipe_model_config(load_recipe(TINY))[1]), no_ln_pre)
