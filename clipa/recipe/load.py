"""Reading a recipe: TOML file -> `key=value` overrides -> dataclasses -> validation, and back to TOML.

Precedence: command-line `key=value` overrides > recipe file > dataclass defaults. Every error names
the full key path (`optim.lr: expected float, got "fast"`) and, for unknown keys, the closest valid key.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

import tomli_w

from clipa.errors import ClipaError, did_you_mean, shown
from clipa.recipe.checks import validate
from clipa.recipe.schema import RENAMED, Recipe

# --------------------------------------------------------------------------- tables from TOML values


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    if typing.get_origin(tp) is list:
        return f"list of {typing.get_args(tp)[0].__name__}"
    return tp.__name__


def _coerce(path: str, tp, value):
    """Check `value` against the field type `tp`; ints are accepted where floats are expected."""
    if typing.get_origin(tp) is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ClipaError(f"{path}: expected {_type_name(tp)}, got {shown(value)}")
        return [_coerce(f"{path}[{i}]", item_tp, v) for i, v in enumerate(value)]
    if tp is dict:  # an open_clip config table (model.vision_cfg); its keys are checked against open_clip
        if isinstance(value, dict):
            return value
        raise ClipaError(f"{path}: expected a [{path}] table of open_clip config fields, got {shown(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ClipaError(f"{path}: expected {tp.__name__}, got {shown(value)}")


def _unknown_key(path: str, key: str, valid: list[str]) -> ClipaError:
    full = f"{path}.{key}" if path else key
    hint = did_you_mean(key, valid, cutoff=0.5, quote="'", prefix=f"{path}." if path else "")
    return ClipaError(f"{full}: unknown key{hint} (valid: {', '.join(valid)})")


def _build(cls, table: dict, path: str = ""):
    fields, hints = _fields(cls), _hints(cls)
    kwargs = {}
    for key, value in table.items():
        if key not in fields:
            raise _unknown_key(path, key, list(fields))
        full = f"{path}.{key}" if path else key
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ClipaError(f"{full}: expected a [{full}] table, got {shown(value)}")
            kwargs[key] = _build(tp, value, full)
        else:
            kwargs[key] = _coerce(full, tp, value)
    return cls(**kwargs)


# --------------------------------------------------------------------------- loading


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ClipaError(f"{path}: recipe file not found (list shipped recipes with `clipa ls`)")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        # tomllib's message already carries "(at line N, column M)".
        raise ClipaError(f"{path}: TOML syntax error: {err}") from None
    except UnicodeDecodeError as err:
        raise ClipaError(f"{path}: not UTF-8 text (byte {err.start}); TOML files are UTF-8, save it as such") from None


def parse_override(text: str) -> tuple[list[str], str]:
    if "=" not in text:
        raise ClipaError(f"override '{text}': expected key=value, for example optim.lr=1e-3")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ClipaError(f"override '{text}': empty key, expected key=value")
    return key.split("."), raw.strip()


def _parse_value(raw: str, tp):
    """Parse an override value by the field's type; TOML syntax works for every type."""
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    else:
        # On the command line `train.total_samples=1e6` means the integer a user would expect.
        if tp is int and isinstance(value, float) and value.is_integer():
            return int(value)
        return value
    if tp is str:
        return raw  # bare words need no quotes: model.arch=ViT-B-16
    if tp is float or tp is int:
        try:
            number = float(raw.replace("_", ""))
        except ValueError:
            return raw
        return int(number) if tp is int and number.is_integer() else number
    if typing.get_origin(tp) is list:
        items = [s.strip() for s in raw.strip("[]").split(",") if s.strip()]
        (item_tp,) = typing.get_args(tp)
        return [_parse_value(s, item_tp) for s in items]
    if tp is bool and raw.lower() in ("yes", "no", "on", "off", "1", "0"):
        return raw.lower() in ("yes", "on", "1")
    return raw


def _field_type(dotted: str):
    cls = Recipe
    for key in dotted.split("."):
        cls = _hints(cls)[key]
    return cls


def _pop(table: dict, dotted: str):
    *tables, key = dotted.split(".")
    for name in tables:
        table = table.get(name)
        if not isinstance(table, dict):
            return None
    return table.pop(key, None)


def _renamed(table: dict) -> list[str]:
    """Move each old key (`RENAMED`) the raw table sets to its new place; one note per move. Setting
    both the old and the new key is an error naming both."""
    notes = []
    for old, new in RENAMED.items():
        value = _pop(table, old)
        if value is None:
            continue
        *tables, key = new.split(".")
        node = table
        for name in tables:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ClipaError(f"{'.'.join(tables)}: expected a table in the recipe file")
        if key in node:
            raise ClipaError(f"{old}, {new}: both set; {old} is the old name of {new}, keep only {new}")
        node[key] = value
        notes.append(f"{old} is deprecated: read as {new}; rename it in the recipe")
    return notes


def apply_override(table: dict, override: str) -> None:
    """Apply one `key=value` override to a raw recipe table, typed by the field it names."""
    keys, raw = parse_override(override)
    dotted = ".".join(keys)
    if dotted in RENAMED:  # kept under its old name; `_renamed` moves it with the recipe file's own
        *tables, key = keys
        node = table
        for name in tables:
            node = node.setdefault(name, {})
        node[key] = _parse_value(raw, _field_type(RENAMED[dotted]))
        return
    cls, node, path = Recipe, table, ""
    for i, key in enumerate(keys):
        fields = _fields(cls)
        if key not in fields:
            raise _unknown_key(path, key, list(fields))
        path = f"{path}.{key}" if path else key
        tp = _hints(cls)[key]
        last = i == len(keys) - 1
        if dataclasses.is_dataclass(tp):
            if last:
                raise ClipaError(f"{path}: is a table; override one of its keys, e.g. {path}.{next(iter(_fields(tp)))}=...")
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ClipaError(f"{path}: expected a table in the recipe file")
            cls = tp
        elif tp is dict and not last:  # a key inside an open_clip config table: model.vision_cfg.pool_type=avg
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ClipaError(f"{path}: expected a table in the recipe file")
            *inner, leaf = keys[i + 1:]
            for name in inner:
                node = node.setdefault(name, {})
                if not isinstance(node, dict):
                    raise ClipaError(f"{path}.{name}: is not a table, cannot set {'.'.join(keys)}")
            node[leaf] = _parse_value(raw, None)
            return
        elif not last:
            raise ClipaError(f"{path}: is not a table, cannot set {'.'.join(keys)}")
        else:
            node[key] = _parse_value(raw, tp)


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a recipe file (or the defaults, if `path` is None), apply overrides, validate."""
    table = read_toml(path) if path is not None else {}
    for override in overrides:
        apply_override(table, override)
    notes = _renamed(table)
    recipe = _build(Recipe, table)
    recipe.notes = notes
    if path is not None:
        recipe.source = str(path)
        if not recipe.name:
            recipe.name = Path(path).stem
    validate(recipe)
    # Checked where the recipe is read from its file (a run's config.toml keeps what was found then).
    from clipa.recipe.index import find_next

    recipe.next = find_next(recipe)
    return recipe


def recipe_from_dict(table: dict) -> Recipe:
    notes = _renamed(table)
    recipe = _build(Recipe, table)
    recipe.notes = notes
    validate(recipe)
    return recipe


def to_dict(recipe: Recipe) -> dict:
    out = {}
    for name in _fields(Recipe):
        value = getattr(recipe, name)
        out[name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


def dumps(recipe: Recipe) -> str:
    return tomli_w.dumps(to_dict(recipe))


def save(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(dumps(recipe), encoding="utf-8")
