"""The recipes shipped inside the package (`recipes/` in the repository, `clipa.recipes` installed)."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from clipa.errors import ClipaError, did_you_mean, shown


def _root():
    return resources.files("clipa.recipes")


def shipped() -> dict[str, object]:
    """Recipe name (path under recipes/ without .toml, e.g. "tiny/pretrain") -> resource."""
    found = {}

    def walk(node, prefix: str) -> None:
        for child in node.iterdir():
            if child.is_dir() and not child.name.startswith(("_", ".")):
                walk(child, f"{prefix}{child.name}/")
            elif child.name.endswith(".toml"):
                found[prefix + child.name[: -len(".toml")]] = child

    walk(_root(), "")
    return dict(sorted(found.items()))


def summary(resource) -> str:
    """The recipe's first comment line that is not its launch command."""
    for line in resource.read_text(encoding="utf-8").splitlines():
        text = line.lstrip("# ").strip()
        if line.startswith("#") and text and not text.startswith(("clipa ", "accelerate ")):
            return text
    return ""


def find(name: str):
    recipes = shipped()
    key = name[: -len(".toml")] if name.endswith(".toml") else name
    key = key[len("recipes/"):] if key.startswith("recipes/") else key
    if key not in recipes:
        raise ClipaError(f"{name}: no shipped recipe of that name{did_you_mean(key, recipes, quote='')} (see `clipa ls`)")
    return recipes[key]


def resolve_path(name: str | Path) -> Path:
    """A `.toml` path as given; else the shipped recipe of that name (`clipa pretrain tiny/pretrain`), which
    a file `./tiny/pretrain` does not shadow; else the path as given."""
    path = Path(name)
    if path.exists() and str(name).endswith(".toml"):
        return path
    try:
        resource = find(str(name))
    except ClipaError:
        if path.exists():
            return path
        raise ClipaError(f"{name}: recipe file not found (list shipped recipes with `clipa ls`)") from None
    with resources.as_file(resource) as real:
        return Path(real)


def find_next(recipe) -> str:
    """`recipe.next` checked to name a recipe: a shipped name, a file (as given, or beside the recipe's own
    file), or "" for none. Returns the form a later `clipa finetune` finds from any folder."""
    name = recipe.next
    if not name:
        return ""
    if Path(name).is_file() or name.removesuffix(".toml").removeprefix("recipes/") in shipped():
        return name
    beside = Path(recipe.source).parent / name if recipe.source else None
    if beside is not None and beside.is_file():
        return str(beside)
    raise ClipaError(f"next: {shown(name)} is neither a shipped recipe (clipa ls) nor a recipe file; name the recipe "
                     "that continues this stage, e.g. next = \"tiny/finetune\", or \"\" for none")


def copy(name: str, dest: str | Path) -> Path:
    resource = find(name)
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / resource.name
    if dest.exists():
        raise ClipaError(f"{dest}: already exists; choose another destination or remove it first")
    if not dest.parent.is_dir():
        raise ClipaError(f"{dest.parent}: directory does not exist")
    with resources.as_file(resource) as real:
        shutil.copyfile(real, dest)
    return dest
