"""Which `tokenizer_kwargs` of a model config may reach Hugging Face's `from_pretrained`.

A model config JSON travels with a model folder. open_clip passes its `text_cfg.tokenizer_kwargs`
to `HFTokenizer` and on to `AutoTokenizer.from_pretrained`, where `trust_remote_code=True` runs
Python shipped with the tokenizer and `revision`, `token`, `proxies`, `force_download`... change what
is fetched and from where. Only keys that shape tokenization pass; any other is refused, naming it.
"""

from __future__ import annotations

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
