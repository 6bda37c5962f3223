"""Building open_clip models for a stage, moving weights between stages, and export.

open_clip owns the architectures (JSON configs and their registry), the position-embedding
resizing (`resize_pos_embed`: 2-D bicubic keeping the class token; `resize_text_pos_embed`:
linear, as CLIPA does) and the `local-dir:` export format. This module only decides the
*geometry* of a stage (input resolution and text length) and wires those pieces together.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

from clipa.errors import ClipaError, did_you_mean, first_line
from clipa.model.posemb import set_sincos
from clipa.model.tokenizer_kwargs import check_tokenizer_kwargs

BUNDLED_CONFIGS = Path(__file__).parent.parent / "model_configs"


@functools.cache
def register_configs() -> None:
    """Make clipa's bundled architectures (clipa-tiny, ...) known to open_clip by name. Called where a
    name is looked up, not on import: importing clipa changes no library's registry."""
    open_clip.add_model_config(BUNDLED_CONFIGS)



@dataclass(frozen=True)
class Geometry:
    """What a stage feeds the model: input resolution and tokens per caption."""

    image_size: int
    context_length: int


def arch_config(arch: str, key: str = "model.arch") -> dict:
    """The open_clip model config for an architecture name or a config JSON path; errors name `key`."""
    if arch.endswith(".json"):
        path = Path(arch)
        if not path.is_file():
            raise ClipaError(f"{key}: config file {arch} not found; give an existing JSON path or an open_clip name")
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ClipaError(f"{key}: {arch} is not valid JSON ({err})") from None
        cfg = cfg.get("model_cfg", cfg) if isinstance(cfg, dict) else cfg
        if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise ClipaError(f"{key}: {arch} lacks embed_dim/vision_cfg/text_cfg of an open_clip model config")
        check_tokenizer_kwargs(cfg["text_cfg"], f"{key}: {arch}")
        return cfg
    register_configs()
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        hint = (did_you_mean(arch, open_clip.list_models(), n=3, quote="")
                or "; see `python -c 'import open_clip; print(open_clip.list_models())'`")
        raise ClipaError(f"{key}: unknown architecture \"{arch}\"{hint}")
    return copy.deepcopy(cfg)


def native_geometry(cfg: dict) -> Geometry:
    image_size = cfg["vision_cfg"].get("image_size", 224)
    if isinstance(image_size, (list, tuple)):
        image_size = image_size[0]
    return Geometry(int(image_size), int(cfg["text_cfg"].get("context_length", 77)))


def patch_size(cfg: dict) -> int | None:
    return cfg["vision_cfg"].get("patch_size")


@dataclass(frozen=True)
class TimmTower:
    """What the recipe checks need to know about a timm image tower."""

    name: str
    patch_size: int | None  # None: no patch tokens (ResNet, ConvNeXt, ...), any resolution works
    image_size: int  # the resolution timm's pretrained weights were made at
    maskable: bool  # has a ViT token path a patch mask can be put into (reduction.install_patch_masker)


@functools.lru_cache(maxsize=None)
def timm_tower(name: str) -> TimmTower:
    """A timm model's patch size, native resolution and maskability, read off the model itself.

    It is built on the meta device (no memory, no weights, a fraction of a second even for ViT-g),
    so `clipa validate` checks the tower the trainer will build, not a guess from its name.
    """
    import timm

    from clipa.model.reduction import timm_patch_slot

    cfg = timm.models.get_pretrained_cfg(name)
    native = int((cfg.input_size if cfg is not None else (3, 224, 224))[-1])
    try:
        with torch.device("meta"):
            trunk = timm.create_model(name, pretrained=False)
    except Exception:  # noqa: BLE001 - a model that cannot be built on meta: skip the checks, training will tell
        return TimmTower(name, None, native, True)
    patch = getattr(getattr(trunk, "patch_embed", None), "patch_size", None)
    if isinstance(patch, (tuple, list)):
        patch = max(patch)
    native = int(trunk.pretrained_cfg.get("input_size", (3, native, native))[-1])
    return TimmTower(name, int(patch) if patch else None, native, timm_patch_slot(trunk))


def _timm_name(recipe, cfg: dict) -> str:
    """The timm image tower a recipe trains: model.image_tower, or one the architecture config names."""
    return recipe.model.image_tower or cfg["vision_cfg"].get("timm_model_name", "")


def _check_divisible(image_size: int, patch: int, of: str) -> None:
    if image_size % patch:
        lower, upper = image_size - image_size % patch, image_size - image_size % patch + patch
        raise ClipaError(
            f"reduction.image_size: {image_size} is not divisible by the patch size {patch} of {of}; "
            f"use {lower or upper} or {upper}"
        )


def stage_geometry(recipe) -> Geometry:
    """The stage's geometry from `[reduction]`, checked against the architecture (and its timm tower)."""
    cfg = arch_config(recipe.model.arch)
    native = native_geometry(cfg)
    timm_name = _timm_name(recipe, cfg)
    if recipe.model.image_tower:
        _check_timm_name(timm_name)
    tower = timm_tower(timm_name) if timm_name else None
    native_image = tower.image_size if tower else native.image_size
    red = recipe.reduction
    if red.image == "none":
        if red.image_size not in (0, native_image):
            raise ClipaError(
                f"reduction.image_size: {red.image_size} conflicts with reduction.image=\"none\" (native "
                f"{native_image}); use reduction.image=\"resize\" to train at another resolution"
            )
        image_size = native_image
    else:
        image_size = red.image_size or native_image
    if tower is not None:
        if tower.patch_size:  # a ViT trunk would silently crop the remainder
            _check_divisible(image_size, tower.patch_size, f"timm model {tower.name}"
                             + (" (model.image_tower)" if recipe.model.image_tower else ""))
    elif patch_size(cfg):
        _check_divisible(image_size, patch_size(cfg), recipe.model.arch)
    context_length = red.text_length or native.context_length
    if context_length > native.context_length:
        raise ClipaError(
            f"reduction.text_length: {context_length} exceeds the context length {native.context_length} of "
            f"{recipe.model.arch}; use at most {native.context_length}"
        )
    return Geometry(image_size, context_length)


def check_masking(recipe, cfg: dict) -> None:
    """A patch-masking strategy needs an image tower with patch tokens; say so before any model is built."""
    from clipa.model.reduction import IMAGE_MASKS

    red = recipe.reduction
    if red.image not in IMAGE_MASKS or red.mask_ratio == 0.0:
        return
    timm_name = _timm_name(recipe, cfg)
    if timm_name:
        if not timm_tower(timm_name).maskable:
            raise ClipaError(f"reduction.image: \"{red.image}\" masking needs a ViT image tower with patch tokens; "
                             f"timm model \"{timm_name}\" has none to drop; use reduction.image=\"resize\" "
                             "(a smaller reduction.image_size) to reduce its tokens")
    elif not patch_size(cfg):
        raise ClipaError(f"reduction.image: \"{red.image}\" masking needs an open_clip ViT image tower; "
                         f"{recipe.model.arch} has no patch tokens to drop; use reduction.image=\"resize\"")


def stage_config(arch: str, geometry: Geometry, loss_kind: str = "infonce") -> dict:
    cfg = arch_config(arch)
    cfg["vision_cfg"]["image_size"] = geometry.image_size
    cfg["text_cfg"]["context_length"] = geometry.context_length
    if loss_kind == "siglip" and "init_logit_bias" not in cfg:
        # SigLIP's initialisation: temperature 10 and bias -10, so that early on almost every pair
        # is (correctly) a negative.
        cfg["init_logit_scale"] = math.log(10.0)
        cfg["init_logit_bias"] = -10.0
    return cfg


def _check_timm_name(timm_name: str) -> None:
    import timm

    if not timm.is_model(timm_name):
        raise ClipaError(f"model.image_tower: unknown timm model \"{timm_name}\""
                         + (did_you_mean(timm_name, timm.list_models(), n=3, quote="") or "; see timm.list_models()"))


def with_timm_image_tower(cfg: dict, timm_name: str) -> dict:
    """Replace the config's image tower by a timm model (open_clip's TimmModel adapter)."""
    _check_timm_name(timm_name)
    cfg = copy.deepcopy(cfg)
    cfg["vision_cfg"] = {"timm_model_name": timm_name, "timm_model_pretrained": False, "timm_pool": "",
                         "timm_proj": "linear", "image_size": cfg["vision_cfg"].get("image_size", 224)}
    return cfg


_SIZE = "the tower's size belongs to the architecture: give a model-config JSON as model.arch"
# open_clip config fields that `model.vision_cfg` / `model.text_cfg` may not set, and why: the architecture or
# another recipe key owns them, or clipa's training (pooled features, its FLOP count, its text reductions)
# cannot use them. The tables are for how a tower computes, not how big it is.
_REFUSED = {
    "vision_cfg": {
        **dict.fromkeys(("layers", "width", "head_width", "mlp_ratio", "patch_size"), _SIZE),
        "image_size": "the stage's resolution is reduction.image_size",
        "patch_dropout": "patches are dropped by reduction.image and reduction.mask_ratio",
        "pos_embed_type": "position embeddings are model.pos_embed (\"learned\" | \"sincos2d\")",
        "output_tokens": "clipa trains on the pooled features",
        "attentional_pool": "clipa trains CLIP towers (pool_type \"tok\" | \"avg\"), not CoCa's attentional pooler",
        "attn_pooler_queries": "clipa trains CLIP towers, not CoCa's attentional pooler",
        "attn_pooler_heads": "clipa trains CLIP towers, not CoCa's attentional pooler",
    },
    "text_cfg": {
        **dict.fromkeys(("layers", "width", "heads", "mlp_ratio", "vocab_size"), _SIZE),
        "proj_type": "the text features are projected to the joint space the loss compares (open_clip's \"linear\")",
        "context_length": "the stage's text length is reduction.text_length",
        "output_tokens": "clipa trains on the pooled features",
        "embed_cls": "CoCa's appended class token is not part of clipa's text reductions or FLOP count",
        "final_ln_after_pool": "open_clip's text transformer does not read it (its final LayerNorm precedes pooling)",
        "hf_tokenizer_name": "the tokenizer belongs to the architecture: use a model-config JSON as model.arch",
        "tokenizer_kwargs": "the tokenizer belongs to the architecture: use a model-config JSON as model.arch",
        "tokenizer_mode": "the tokenizer belongs to the architecture: use a model-config JSON as model.arch",
    },
}
_REFUSED_PREFIX = {"vision_cfg": ("timm_", "a timm image tower is model.image_tower"),
                   "text_cfg": ("hf_", "a Hugging Face text tower belongs to the architecture: use a model-config "
                                "JSON as model.arch")}
# Values open_clip accepts that give a CLIP model a pooled feature (its 'none' returns every token).
_BLOCKS = (("default", "custom"), "custom = open_clip's CustomResidualAttentionBlock, which qk_norm / scale_* need")
_CHOICES = {
    ("vision_cfg", "block_type"): _BLOCKS,
    ("text_cfg", "block_type"): _BLOCKS,
    ("vision_cfg", "pool_type"): (("tok", "avg"), "tok = the class token, avg = the mean of the patch tokens"),
    ("text_cfg", "pool_type"): (("argmax", "last", "first", "eos"),
                                "argmax = where the highest token id is (OpenAI's end token), last / first = that "
                                "position, eos = where text_cfg.eos_id is"),
}


def _open_clip_fields(kind: str) -> dict:
    """Field name -> type of open_clip's CLIPVisionCfg / CLIPTextCfg (the installed version's own list)."""
    import typing

    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    return typing.get_type_hints(CLIPVisionCfg if kind == "vision_cfg" else CLIPTextCfg)


def _fits(tp, value) -> bool:
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return any(_fits(a, value) for a in args if a is not type(None))
    if origin is tuple:
        return isinstance(value, list) and all(_fits(a, v) for a, v in zip(args, value)) and len(value) == len(args)
    if tp is dict or origin is dict:
        return isinstance(value, dict)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return True


def _type_text(tp) -> str:
    import typing

    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union:
        return " or ".join(_type_text(a) for a in args)
    if typing.get_origin(tp) is tuple:
        return f"list of {len(args)} {_type_text(args[0])}"
    return {dict: "table"}.get(tp, getattr(tp, "__name__", str(tp)))


def tower_overrides(recipe, cfg: dict) -> dict:
    """`cfg` with the recipe's `model.vision_cfg` / `model.text_cfg` laid over the architecture's own towers.

    Keys are open_clip's field names, checked against the installed open_clip's CLIPVisionCfg / CLIPTextCfg
    (type included); fields another recipe key owns are refused naming that key. What the recipe leaves
    out keeps the architecture's value (open_clip's default if the architecture says nothing), so the
    exported config is a plain open_clip config.
    """
    cfg = copy.deepcopy(cfg)
    for kind in ("vision_cfg", "text_cfg"):
        table = getattr(recipe.model, kind)
        if not table:
            continue
        key, tower = f"model.{kind}", cfg[kind]
        if kind == "vision_cfg" and "timm_model_name" in tower:
            raise ClipaError(f"{key}: sets open_clip ViT fields, but the image tower is timm's "
                             f"{tower['timm_model_name']}; remove {key} or model.image_tower")
        if kind == "vision_cfg" and isinstance(tower.get("layers"), (list, tuple)):
            raise ClipaError(f"{key}: sets open_clip ViT fields, but {recipe.model.arch} has a ResNet image tower")
        if kind == "text_cfg" and "hf_model_name" in tower:
            raise ClipaError(f"{key}: sets open_clip text-transformer fields, but {recipe.model.arch}'s text tower is "
                             f"Hugging Face's {tower['hf_model_name']}; remove {key}")
        fields = _open_clip_fields(kind)
        prefix, prefix_reason = _REFUSED_PREFIX[kind]
        for name, value in table.items():
            full = f"{key}.{name}"
            if name in _REFUSED[kind] or name.startswith(prefix):
                raise ClipaError(f"{full}: not settable here: {_REFUSED[kind].get(name, prefix_reason)}")
            if name not in fields:
                valid = [f for f in fields if f not in _REFUSED[kind] and not f.startswith(prefix)]
                hint = did_you_mean(name, valid, quote="'", prefix=f"{key}.")
                raise ClipaError(f"{full}: unknown open_clip {kind} field{hint} (valid: {', '.join(valid)})")
            if not _fits(fields[name], value):
                raise ClipaError(f"{full}: expected {_type_text(fields[name])}, got {value!r}")
            choices, meaning = _CHOICES.get((kind, name), (None, ""))
            if choices and value not in choices:
                raise ClipaError(f"{full}: unknown value {value!r}{did_you_mean(value, choices)} "
                                 f"(allowed: {', '.join(choices)}; {meaning})")
        cfg[kind] = {**tower, **copy.deepcopy(table)}
    return cfg


def tower_summary(cfg: dict) -> str:
    """One line of the pooling and attention details a model config resolves to (for --dry-run)."""
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    if "timm_model_name" in v:
        image = f"image: timm {v['timm_model_name']}"
    else:
        pool = {"tok": "class token", "avg": "mean of patches"}.get(v.get("pool_type", "tok"), v.get("pool_type"))
        image = (f"image: pool {pool}{', LN after pool' if v.get('final_ln_after_pool') else ''}, "
                 f"{'no ln_pre' if v.get('no_ln_pre') else 'ln_pre'}, pos-emb {v.get('pos_embed_type', 'learnable')}")
    if "hf_model_name" in t:
        text = f"text: Hugging Face {t['hf_model_name']}"
    else:
        text = (f"text: pool {t.get('pool_type', 'argmax')}, "
                f"{'bidirectional' if t.get('no_causal_mask') else 'causal mask'}")
    extra = [f"{side} {name} {tower[name]}" for side, tower in (("image", v), ("text", t))
             for name in ("act_kwargs", "norm_kwargs") if tower.get(name)]
    return "; ".join([image, text, *extra])


def recipe_model_config(recipe) -> tuple[Geometry, dict]:
    """The stage's geometry and the full open_clip model config a recipe trains."""
    geometry = stage_geometry(recipe)
    cfg = stage_config(recipe.model.arch, geometry, recipe.loss.kind)
    if recipe.model.image_tower:
        cfg = with_timm_image_tower(cfg, recipe.model.image_tower)
    cfg = tower_overrides(recipe, cfg)
    if recipe.model.pos_embed != "auto":
        if "timm_model_name" in cfg["vision_cfg"]:
            raise ClipaError(f"model.pos_embed: \"{recipe.model.pos_embed}\" applies to open_clip ViT image towers; "
                             f"the timm tower {cfg['vision_cfg']['timm_model_name']} keeps its own; use \"auto\"")
        cfg["vision_cfg"]["pos_embed_type"] = {"learned": "learnable", "sincos2d": "sin_cos_2d"}[recipe.model.pos_embed]
    check_masking(recipe, cfg)
    return geometry, cfg


def create_model(model_cfg: dict, device: str | torch.device = "cpu") -> torch.nn.Module:
    """An open_clip model (random init, no downloads) from a full model config dict."""
    cfg = copy.deepcopy(model_cfg)
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg["text_cfg"]
    if "timm_model_name" in cfg["vision_cfg"]:
        cfg["vision_cfg"]["timm_model_pretrained"] = False  # weights come from the user, never a hub
    if "hf_model_name" in cfg["text_cfg"]:
        cfg["text_cfg"]["hf_model_pretrained"] = False
    model_cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    model = model_cls(**cfg)
    model.output_dict = True
    if "timm_model_name" in cfg["vision_cfg"]:
        set_timm_input_size(model.visual, cfg["vision_cfg"].get("image_size", 224))
    elif cfg["vision_cfg"].get("pos_embed_type") == "sin_cos_2d":
        set_sincos(model)  # CLIPA-v2's formula, not open_clip's MAE one (clipa.model.posemb)
    return model.to(device)


def set_timm_input_size(tower, image_size: int) -> None:
    """open_clip builds timm trunks at their default input size; CLIPA's resize needs another.

    timm ViTs resample their position embedding in `set_input_size`; convolutional trunks take
    any size as they are.
    """
    trunk = tower.trunk
    default = getattr(trunk, "default_cfg", {}).get("input_size", (3, image_size, image_size))[-1]
    if image_size != default and hasattr(trunk, "set_input_size"):
        trunk.set_input_size(img_size=(image_size, image_size))
    tower.image_size = (image_size, image_size)


def build_tokenizer(arch: str, context_length: int, text_cfg: dict | None = None):
    """open_clip's tokenizer for the architecture, truncating to the stage's text length.

    The default (OpenAI BPE) tokenizer ships inside open_clip, so nothing is downloaded; the
    "truncate" reduction is exactly its behaviour: keep the first tokens, end with EOT. A Hugging Face
    tokenizer (CLIPA-v2's bert-base-uncased) comes from the Hugging Face cache, downloaded by
    transformers on first use. `arch` may be `hf-hub:ORG/NAME` with the repository's `text_cfg` given.
    """
    register_configs()  # clipa's bundled configs, for get_tokenizer too
    text_cfg = text_cfg if text_cfg is not None else arch_config(arch)["text_cfg"]
    name = text_cfg.get("hf_tokenizer_name")
    try:
        if arch.endswith(".json"):
            if name:
                return open_clip.tokenizer.HFTokenizer(name, context_length=context_length,
                                                       **check_tokenizer_kwargs(text_cfg, f"model.arch: {arch}"))
            return open_clip.SimpleTokenizer(context_length=context_length)
        return open_clip.get_tokenizer(arch, context_length=context_length)
    except ImportError as err:  # CLIPA-v2 configs use a BERT tokenizer through Hugging Face transformers
        raise ClipaError(f"model.arch: {arch} uses the Hugging Face tokenizer {name!r}, "
                         f"which needs `pip install 'clipa[hf]'` (transformers) ({err})") from None
    except OSError as err:  # not in the Hugging Face cache, and offline (or no such tokenizer)
        raise ClipaError(f"model.arch: {arch}: cannot load the Hugging Face tokenizer {name!r} ({first_line(err)}); "
                         f"download it once with `hf download {name}` (or unset HF_HUB_OFFLINE), or point "
                         "`hf_tokenizer_name` in a model-config JSON (model.arch=PATH.json) at a local tokenizer "
                         "directory") from None
