"""Building open_clip models for a stage: the architecture's config at the stage's geometry, a timm
image tower, the model and its tokenizer.

open_clip owns the architectures (JSON configs and their registry); this module only decides the
*geometry* of a stage (input resolution and text length) and builds open_clip's model and tokenizer
for it. Moving weights between stages (open_clip's position-embedding resizing) and the `local-dir:`
export are clipa/model/weights.py's.
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
from clipa.model.tokenizer_kwargs import check_tokenizer_kwargs, hf_tokenizer
from clipa.model.tower_cfg import tower_overrides

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
    maskable: bool  # has a ViT token path a patch mask can be put into (clipa.model.masking.install_patch_masker)


@functools.lru_cache(maxsize=None)
def timm_tower(name: str) -> TimmTower:
    """A timm model's patch size, native resolution and maskability, read off the model itself.

    It is built on the meta device (no memory, no weights, a fraction of a second even for ViT-g),
    so `clipa validate` checks the tower the trainer will build, not a guess from its name.
    """
    import timm

    from clipa.model.masking import timm_patch_slot

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
    from clipa.reduction.image import IMAGE_MASKS

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


def recipe_model_config(recipe) -> tuple[Geometry, dict]:
    """The stage's geometry and the full open_clip model config a recipe trains."""
    geometry = stage_geometry(recipe)
    cfg = stage_config(recipe.model.arch, geometry, recipe.loss.kind)
    if recipe.model.logit_scale_init:  # open_clip's CLIP takes the log of the scale
        cfg["init_logit_scale"] = math.log(recipe.model.logit_scale_init)
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
        if name:  # every model source (name, .json, hf-hub:): kwargs and the tokenizer's files checked first
            return hf_tokenizer(name, text_cfg, context_length, f"model.arch: {arch}")
        if arch.endswith(".json"):
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
