"""Every published number a shipped CLIPA recipe carries, pinned to the released config it comes from.

`PUBLISHED` is the audit table (issue 21 part 4), the one place these numbers live: one row per recipe and
key, with the released file (and the line of it) the value is read from. A key is a recipe key
(`optim.lr`), a key of the open_clip config the recipe resolves to (`vision_cfg.pool_type`: the
architecture's config with `model.vision_cfg` over it), or a derived number (`lr_base` = optim.lr /
(global batch // 256), trap 1; `steps` = total_samples // global batch). Where a recipe deliberately differs,
`DEVIATIONS` holds its value and the recipe's header comment must name the key and say why.

Sources: UCSC-VLAA/CLIPA master 3800508 and t5x e19162b; mlfoundations/open_clip's model configs as installed
(src/open_clip/model_configs). docs/clipa_recipes.md has the prose and the traps.
"""

import math
from pathlib import Path

import pytest

from clipa.model.build import recipe_model_config
from clipa.recipe.load import load_recipe

from conftest import RECIPES

M, T5X = "UCSC-VLAA/CLIPA@master:", "UCSC-VLAA/CLIPA@t5x:"
JAX = M + "clipa_jax/"
H_PT70, H_PT84 = JAX + "configs/model_h/70_8_pre_training.py", JAX + "configs/model_h/84_8_pre_training.py"
H_FT224 = JAX + "configs/model_h/unmask_tuning_224_scheduleX4.py"
H_FT336 = JAX + "configs/model_h/unmask_tuning_336_scheduleX1.py"
G_PT = T5X + "clipa_jax/configs/model_bigG/70_8_pre_training.py"
G_FT224 = T5X + "clipa_jax/configs/model_bigG/unmask_tuning_224_scheduleX4.py"
G_FT336 = T5X + "clipa_jax/configs/model_bigG/unmask_tuning_336_scheduleX1.py"
VIT, TEXT = JAX + "models/vit.py", JAX + "models/text_transformer.py"
OPS, SIMCLR, OPTAX = JAX + "transforms/ops_image.py", JAX + "transforms/simclr_aug.py", JAX + "optim/build_optax.py"
TOWERS = JAX + "models/two_towers.py"
TORCH = M + "clipa_torch/"
B_PT, B_FT = TORCH + "scripts/exp/gpu/vit_b16/i50_t16_pretrain.sh", TORCH + "scripts/exp/gpu/vit_b16/i50_t16_finetune.sh"
B_CFG = TORCH + "open_clip/model_configs/ViT-B-16-CL16.json"
OPEN_CLIP = "mlfoundations/open_clip:src/open_clip/model_configs/"


def jax_v2(cfg: str, arch: str) -> list[tuple]:
    """What every CLIPA-v2 JAX stage shares: optimiser, augmentation, towers, temperature."""
    oc = OPEN_CLIP + f"{arch}.json"
    return [
        ("optim.betas", [0.9, 0.95], f"{cfg}: config.optax b1=0.9, b2=0.95"),
        ("optim.eps", 1e-8, f"{cfg}: optax_name 'scale_by_adam' (optax's default eps)"),
        ("optim.weight_decay", 0.2, f"{cfg}: config.wd = 0.2"),
        ("optim.decay_embeddings", False, f"{OPTAX}: wd_mults default [('.*/kernel$', 1.0)]"),
        ("optim.schedule", "cosine", f"{cfg}: decay_type='cosine', min_lr=0"),
        ("data.augment.scale", [0.4, 1.0], f"{cfg}: inception_crop(area_min=40) (area_max 100)"),
        ("data.augment.ratio", [0.75, 1.33], f"{OPS}: get_inception_crop -> tf.image.sample_distorted_bounding_box "
                                             "default aspect_ratio_range"),
        ("data.augment.interpolation", "bilinear", f"{cfg}: inception_crop(method='bilinear', antialias=True)"),
        ("data.augment.hflip_prob", 0.0, f"{cfg}: config.input.pp has no flip"),
        ("data.augment.color_jitter", [0.32, 0.32, 0.32, 0.08],
         f"{cfg}: simclr_jitter_gray(jitter_strength=0.4); {SIMCLR}: color_jitter = 0.8/0.8/0.8/0.2 x strength"),
        ("data.augment.color_jitter_prob", 0.8, f"{OPS}: simclr_jitter_gray random_apply(color_jitter_t, p=0.8)"),
        ("data.augment.gray_scale_prob", 0.2, f"{OPS}: simclr_jitter_gray random_apply(to_grayscale, p=0.2)"),
        ("data.normalize", "imagenet", f"{cfg}: config.cpu_unit8 = True; "
         + (f"{T5X}clipa_jax/models_t5x/two_towers.py: Model.__call__" if cfg.startswith(T5X) else
            f"{JAX}main.py: update_fn") + ": (image - 255 x (0.485, 0.456, 0.406)) / (255 x (0.229, 0.224, 0.225))"),
        ("model.pos_embed", "sincos2d", f"{cfg}: config.model.image posemb='sincos2d'"),
        ("vision_cfg.pool_type", "avg", f"{cfg}: config.model.image pool_type='gap'; {oc}"),
        ("vision_cfg.no_ln_pre", True, f"{VIT}: no LayerNorm before the encoder; {oc}"),
        ("vision_cfg.final_ln_after_pool", True, f"{VIT}: pool_type 'gap' = mean, then encoder_norm; {oc}"),
        ("vision_cfg.act_kwargs", {"approximate": "tanh"}, f"{VIT}: MlpBlock nn.gelu(x, approximate=True)"),
        ("vision_cfg.norm_kwargs", {"eps": 1e-6}, f"{VIT}: nn.LayerNorm() (flax's default epsilon 1e-6)"),
        ("text_cfg.pool_type", "last", f"{cfg}: config.model.text pool_type='last'; {oc}"),
        ("text_cfg.no_causal_mask", True, f"{TEXT}: encoder without an attention mask; {oc}"),
        ("text_cfg.act_kwargs", {"approximate": "tanh"}, f"{TEXT}: MlpBlock nn.gelu(x, approximate=True)"),
        ("text_cfg.norm_kwargs", {"eps": 1e-6}, f"{TEXT}: nn.LayerNorm() (flax's default epsilon 1e-6)"),
        ("text_cfg.hf_tokenizer_name", "bert-base-uncased", f"{cfg}: txt='bert_base' vocab.txt; {oc}"),
        ("train.logit_scale_max", math.inf, f"{TOWERS}: temperature learned as a log, never clamped"),
    ]


def stage(cfg: str, *, res: int, image: str, mask: float, text: str, length: int, batch: int, samples: int,
          base: float, warmup: int) -> list[tuple]:
    return [
        ("reduction.image_size", res, f"{cfg}: parse_arg res={res}"),
        ("reduction.image", image, f"{cfg}: config.mask_ratio = {mask} ({'random masking' if mask else 'none'})"),
        ("reduction.mask_ratio", mask, f"{cfg}: config.mask_ratio = {mask}"),
        ("reduction.text", text, f"{cfg}: {'noun_tokenize' if text == 'syntax' else 'bert_tokenize'}(max_len=...)"),
        ("reduction.text_length", length, f"{cfg}: parse_arg token_len={length}"),
        ("train.global_batch_size", batch, f"{cfg}: parse_arg batchsize={batch}"),
        ("train.total_samples", samples, f"{cfg}: total_steps = seen samples // batchsize"),
        ("steps", samples // batch, f"{cfg}: config.total_steps"),
        ("lr_base", base, f"{cfg}: config.lr = {base:g} * (batchsize // 256)"),
        ("optim.lr", base * (batch // 256), f"{cfg}: config.lr"),
        ("optim.warmup_steps", warmup, f"{cfg}: warmup_steps"),
    ]


IN1K_X10K = 1_281_167 * 10_000  # imagenet_samples * vitual_imagenet_epoch
PT = dict(image="resize", mask=0.0, text="syntax", length=8, batch=65_536, samples=IN1K_X10K, warmup=3_200)
FT224 = dict(res=224, image="random", text="truncate", length=32, samples=131_072_000 * 4)
FT336 = dict(res=336, image="random", mask=0.4, text="truncate", length=32, batch=16_384, samples=131_072_000,
             base=1e-7, warmup=26_214_400 // 16_384)

B16_COMMON = [
    ("optim.betas", [0.9, 0.95], f"{B_PT}: --beta1 0.9 --beta2 0.95"),
    ("optim.eps", 1e-6, f"{TORCH}training/params.py: get_default_params (ViT): eps 1.0e-6"),
    ("optim.weight_decay", 0.2, f"{B_PT}: --wd 0.2"),
    ("optim.decay_embeddings", True, f"{TORCH}training/main.py: exclude = ndim < 2 or bn/ln/bias/logit_scale"),
    ("optim.schedule", "cosine", f"{TORCH}training/params.py: --lr-scheduler default 'cosine'"),
    ("data.augment.scale", [0.4, 1.0], f"{B_PT}: --aug-cfg scale='(0.4, 1.0)'"),
    ("data.augment.ratio", [3 / 4, 4 / 3], f"{TORCH}open_clip/transform.py: RandomResizedCrop default ratio"),
    ("data.augment.interpolation", "bicubic", f"{TORCH}open_clip/transform.py: interpolation=BICUBIC"),
    ("data.augment.hflip_prob", 0.0, f"{TORCH}open_clip/transform.py: no flip"),
    ("data.normalize", "openai", f"{TORCH}open_clip/transform.py: image_transform mean/std default "
                                 "OPENAI_DATASET_MEAN/STD"),
    ("data.augment.color_jitter_prob", 0.0, f"{B_PT}: --aug-cfg sets no color_jitter_prob"),
    ("data.augment.gray_scale_prob", 0.0, f"{B_PT}: --aug-cfg sets no gray_scale_prob"),
    ("vision_cfg.pool_type", "tok", f"{B_CFG}: no global_average_pool (class token)"),
    ("vision_cfg.no_ln_pre", False, f"{TORCH}open_clip/transformer.py: ln_pre=True"),
    ("text_cfg.pool_type", "argmax", f"{TORCH}open_clip/model.py: encode_text x[arange, text.argmax(dim=-1)]"),
    ("text_cfg.no_causal_mask", False, f"{TORCH}open_clip/model.py: transformer(x, attn_mask=self.attn_mask)"),
    ("text_cfg.vocab_size", 49_408, f"{B_CFG}: vocab_size 49408"),
    ("reduction.text", "truncate", f"{B_CFG}: open_clip tokenizer truncation"),
    ("reduction.text_length", 16, f"{B_CFG}: context_length 16"),
    ("train.logit_scale_max", 100.0, f"{TORCH}training/train.py: logit_scale.clamp_(0, math.log(100))"),
]

PUBLISHED: dict[str, list[tuple]] = {
    "vit_h14/pretrain_70": jax_v2(H_PT70, "ViT-H-14-CLIPA") + stage(H_PT70, res=70, base=8e-6, **PT),
    "vit_h14/pretrain_84": jax_v2(H_PT84, "ViT-H-14-CLIPA") + stage(H_PT84, res=84, base=8e-6, **PT),
    "vit_h14/finetune_224": jax_v2(H_FT224, "ViT-H-14-CLIPA") + stage(
        H_FT224, mask=0.3, batch=32_768, base=4e-7, warmup=26_214_400 // 32_768, **FT224),
    "vit_h14/finetune_336": jax_v2(H_FT336, "ViT-H-14-CLIPA") + stage(H_FT336, **FT336),
    # L/14: the repo has no L/14 config; H/14's with L/14 towers (trap 2, inferred)
    "vit_l14/pretrain_84": jax_v2(H_PT84, "ViT-L-14-CLIPA") + stage(H_PT84, res=84, base=8e-6, **PT),
    "vit_l14/finetune_224": jax_v2(H_FT224, "ViT-L-14-CLIPA") + stage(
        H_FT224, mask=0.3, batch=32_768, base=4e-7, warmup=26_214_400 // 32_768, **FT224),
    "vit_l14/finetune_336": jax_v2(H_FT336, "ViT-L-14-CLIPA") + stage(H_FT336, **FT336),
    "vit_l14/finetune_336_released": jax_v2(H_FT336, "ViT-L-14-CLIPA") + stage(H_FT336, **FT336),
    "vit_bigg14/pretrain_84": jax_v2(G_PT, "ViT-bigG-14-CLIPA") + stage(G_PT, res=70, base=4e-6, **PT),
    "vit_bigg14/finetune_224": jax_v2(G_FT224, "ViT-bigG-14-CLIPA") + stage(
        G_FT224, mask=0.4, batch=16_384, base=4e-7, warmup=0, **FT224),
    "vit_bigg14/finetune_336": jax_v2(G_FT336, "ViT-bigG-14-CLIPA") + stage(G_FT336, **FT336),
    "vit_b16/pretrain_112": B16_COMMON + [
        ("reduction.image", "resize", f"{B_PT}: --force-image-size 112, no patch dropout"),
        ("reduction.image_size", 112, f"{B_PT}: --force-image-size 112"),
        ("reduction.mask_ratio", 0.0, f"{B_PT}: no --force-patch-dropout"),
        ("train.global_batch_size", 65_536, f"{B_PT}: --batch-size 8192 x torchrun --nproc_per_node 8"),
        ("optim.lr", 2.048e-3, f"{B_PT}: --lr 2.048e-3"),
        ("lr_base", 8e-6, f"{B_PT}: --lr 2.048e-3 at batch 65,536 (trap 1)"),
        ("optim.warmup_steps", 782, f"{B_PT}: --warmup 782"),
        ("model.pos_embed", "sincos2d", f"{B_PT}: --pos-embed 'sin_cos_2d'"),
        # train.total_samples: the script says --epochs=6 of its LAION-400M copy, no sample count (trap 12)
    ],
    "vit_b16/finetune_224": B16_COMMON + [
        ("reduction.image", "resize", f"{B_FT}: no --force-image-size, no patch dropout (trap 3)"),
        ("reduction.image_size", 224, f"{B_CFG}: image_size 224"),
        ("reduction.mask_ratio", 0.0, f"{B_FT}: no --force-patch-dropout (trap 3)"),
        ("train.global_batch_size", 8_192, f"{B_FT}: --batch-size 1024 x torchrun --nproc_per_node 8"),
        ("train.total_samples", 131_072_000, f"{B_FT}: --train-num-samples 131072000 --epochs=1"),
        ("optim.lr", 2.56e-5, f"{B_FT}: --lr 2.56e-5"),
        ("lr_base", 8e-7, f"{B_FT}: --lr 2.56e-5 at batch 8,192 (trap 1)"),
        ("optim.warmup_steps", 3_072, f"{B_FT}: --warmup 3072"),
        ("model.pos_embed", "learned", f"{B_FT}: --pos-embed 'learnable'"),
    ],
}

# (recipe, key) -> clipa's value where the recipe deliberately differs; its header names the key and says why.
DEVIATIONS = {
    ("vit_bigg14/pretrain_84", "reduction.image_size"): 84,  # trap 14: the README's runs are 12.8B@84
}


def _value(recipe, model_cfg: dict, key: str):
    if key == "lr_base":
        return recipe.optim.lr / (recipe.train.global_batch_size // 256)
    if key == "steps":
        return recipe.train.total_samples // recipe.train.global_batch_size
    if key.startswith(("vision_cfg.", "text_cfg.")):
        tower, name = key.split(".")
        return model_cfg[tower].get(name, _OPEN_CLIP_DEFAULTS[tower].get(name))
    value = recipe
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _open_clip_defaults() -> dict:
    import dataclasses

    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    return {name: {f.name: f.default for f in dataclasses.fields(cls)}
            for name, cls in (("vision_cfg", CLIPVisionCfg), ("text_cfg", CLIPTextCfg))}


_OPEN_CLIP_DEFAULTS = _open_clip_defaults()


def _same(ours, published) -> bool:
    if isinstance(published, float) or isinstance(ours, float):
        return isinstance(ours, (int, float)) and not isinstance(ours, bool) and (
            ours == published or math.isclose(ours, published, rel_tol=1e-9))
    if isinstance(published, list):
        return isinstance(ours, list) and len(ours) == len(published) and all(map(_same, ours, published))
    return type(ours) is type(published) and ours == published


def _header(name: str) -> str:
    lines = (RECIPES / f"{name}.toml").read_text(encoding="utf-8").splitlines()
    return "\n".join(line for line in lines[: next(i for i, x in enumerate(lines) if not x.startswith("#"))])


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_recipe_carries_the_published_numbers(name):
    recipe = load_recipe(RECIPES / f"{name}.toml")
    _, model_cfg = recipe_model_config(recipe)
    wrong = []
    for key, published, source in PUBLISHED[name]:
        ours = _value(recipe, model_cfg, key)
        if (name, key) in DEVIATIONS:
            assert not _same(ours, published), f"{name} {key}: now the published {published!r}; drop the deviation"
            assert _same(ours, DEVIATIONS[name, key]), f"{name} {key}: {ours!r}, the deviation says otherwise"
            assert key in _header(name), f"{name}: deviates on {key} without saying so in its header"
        elif not _same(ours, published):
            wrong.append(f"{key}: recipe {ours!r}, published {published!r} ({source})")
    assert not wrong, f"{name} drifted from the released config:\n" + "\n".join(wrong)


def test_every_shipped_clipa_recipe_is_audited_and_every_row_cites_a_file():
    shipped = {str(p.relative_to(RECIPES).with_suffix("")) for p in Path(RECIPES).glob("vit_*/*.toml")}
    assert shipped == set(PUBLISHED), "a CLIPA recipe without rows in PUBLISHED (or rows for a removed one)"
    for name, rows in PUBLISHED.items():
        keys = [key for key, _, _ in rows]
        assert len(keys) == len(set(keys)), f"{name}: a key twice"
        for key, _, source in rows:
            assert source.startswith(("UCSC-VLAA/CLIPA@", "mlfoundations/open_clip:")) and (
                ".py" in source or ".json" in source or ".sh" in source), f"{name} {key}: cite the file"
    for name, key in DEVIATIONS:
        assert key in {k for k, _, _ in PUBLISHED[name]}


def test_a_drifted_number_is_caught(tmp_path):
    """The check can fail: a recipe with one published number changed is reported with its source."""
    text = (RECIPES / "vit_h14" / "finetune_224.toml").read_text(encoding="utf-8")
    drifted = tmp_path / "finetune_224.toml"
    drifted.write_text(text.replace("warmup_steps = 800", "warmup_steps = 1_600"), encoding="utf-8")
    recipe = load_recipe(drifted)
    _, model_cfg = recipe_model_config(recipe)
    rows = {key: (published, source) for key, published, source in PUBLISHED["vit_h14/finetune_224"]}
    assert _value(recipe, model_cfg, "optim.warmup_steps") == 1_600
    assert not _same(_value(recipe, model_cfg, "optim.warmup_steps"), rows["optim.warmup_steps"][0])
    assert _same(_value(recipe, model_cfg, "optim.lr"), rows["optim.lr"][0])
    assert not _same(1, 1.0000001) and not _same(True, 1) and _same([0.4, 1], [0.4, 1.0])
