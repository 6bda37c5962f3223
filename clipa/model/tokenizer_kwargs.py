"""Which `tokenizer_kwargs` of a model config may reach Hugging Face's `from_pretrained`.

A model config JSON travels with a model folder. open_clip passes its `text_cfg.tokenizer_kwargs`
to `HFTokenizer` and on to `AutoTokenizer.from_pretrained`, where `trust_remote_code=True` runs
Python shipped with the tokenizer and `revision`, `token`, `proxies`, `force_download`... change what
is fetched and from where. Only keys that shape tokenization pass; any other is refused, naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

from clipa.errors import ClipaError

# open_clip HFTokenizer's own options, and tokenizer options that only change how text is split.
SAFE_KEYS = frozenset({"clean", "strip_sep_token", "language", "tokenizer_mode", "do_lower_case",
                       "clean_up_tokenization_spaces", "model_max_length", "padding_side", "truncation_side",
                       "add_prefix_space", "use_fast", "strip_accents", "tokenize_chinese_chars"})


def check_tokenizer_kwargs(text_cfg: dict, where: str) -> dict:
    """The config's tokenizer_kwargs, if every key is known to be safe; else a ClipaError naming the key."""
    kwargs = text_cfg.get("tokenizer_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ClipaError(f"{where}: text_cfg.tokenizer_kwargs must be a JSON object, got {type(kwargs).__name__}")
    for key in kwargs:
        if key not in SAFE_KEYS:
            raise ClipaError(f"{where}: text_cfg.tokenizer_kwargs.{key} is refused: clipa passes only keys that "
                             f"shape tokenization ({', '.join(sorted(SAFE_KEYS))}); remove it from the model config")
    return kwargs


def check_tokenizer_source(name: str, where: str) -> None:
    """Refuse a Hugging Face tokenizer (a local folder, or a Hub repository already in the cache) that ships
    code: `auto_map` in its tokenizer_config.json or a .py file. clipa never passes `trust_remote_code`, so
    transformers would not run it; refusing names the problem instead of failing inside transformers, and
    holds if a later transformers changes its default. A repository not yet cached is fetched by transformers,
    which still runs no code without `trust_remote_code`."""
    folder = Path(name)
    if not folder.is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return
        cached = try_to_load_from_cache(name, "tokenizer_config.json") if "/" in name or name else None
        if not isinstance(cached, str):
            return
        folder = Path(cached).parent
    code = sorted(p.name for p in folder.glob("*.py"))
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    if code or (isinstance(config, dict) and config.get("auto_map")):
        shipped = ", ".join(code) if code else "auto_map in tokenizer_config.json"
        raise ClipaError(f"{where}: text_cfg.hf_tokenizer_name \"{name}\" is refused: that tokenizer ships code "
                         f"({shipped}), which clipa never runs; point hf_tokenizer_name at a tokenizer without code")


def hf_tokenizer(name: str, text_cfg: dict, context_length: int, where: str):
    """open_clip's HFTokenizer for `name` with the config's tokenizer_kwargs, both checked first. Built here,
    never through `open_clip.get_tokenizer`, which hands a hub or local config's kwargs on unchecked."""
    import open_clip

    kwargs = check_tokenizer_kwargs(text_cfg, where)
    check_tokenizer_source(name, where)
    return open_clip.tokenizer.HFTokenizer(name, context_length=context_length, **kwargs)
