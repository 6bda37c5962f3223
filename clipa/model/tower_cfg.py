"""`model.vision_cfg` / `model.text_cfg`: open_clip tower fields laid over an architecture's config.

Written here rather than passed to open_clip blindly because open_clip ignores unknown fields and
accepts values that give a CLIP model no pooled feature: every field is checked against the
installed open_clip's `CLIPVisionCfg` / `CLIPTextCfg` (name and type), and fields that another
recipe key owns are refused naming that key.
"""

from __future__ import annotations

import copy

from clipa.errors import ClipaError, did_you_mean

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
