"""The code layout stays what the docs promise (docs/development.md): packages by concern, no private names across modules."""

import ast
import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
CLIPA = ROOT / "clipa"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(CLIPA.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _private_imports(path: Path, module: str) -> list[str]:
    """`from clipa.x import _name` (or `alias._name` on a clipa module imported as an alias) where clipa.x is not
    `module` itself."""
    bad, aliases = [], set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clipa"):
            aliases |= {a.asname or a.name for a in node.names if not a.name[0].isupper()}
            if node.module != module:
                bad += [f"{path.name}:{node.lineno} imports {node.module}.{a.name}"
                        for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            bad.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    return bad


def test_no_private_name_crosses_a_module_boundary():
    bad = [line for module, path in _modules().items() for line in _private_imports(path, module)]
    assert not bad, "\n".join(bad)


def test_the_check_sees_a_private_import(tmp_path):
    # The check above must be able to fail: both spellings of a private import are reported, public names are not.
    f = tmp_path / "m.py"
    f.write_text("from clipa.data import loader\nfrom clipa.data.loader import _one_thread_per_worker, resolve_workers\n"
                 "loader._one_thread_per_worker(0)\nloader.resolve_workers(1)\n")
    found = _private_imports(f, "clipa.other")
    assert len(found) == 2 and all("_one_thread_per_worker" in line for line in found)
    assert _private_imports(f, "clipa.data.loader") == ["m.py:3 uses loader._one_thread_per_worker"]


def test_every_package_is_in_the_wheel():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in CLIPA.rglob("__init__.py")}
    assert folders <= listed, f"add {sorted(folders - listed)} to [tool.setuptools] packages in pyproject.toml"


def test_layout_map_matches_the_tree():
    """docs/development.md (linked from the README) maps every package."""
    readme = (ROOT / "docs" / "development.md").read_text()
    section = readme.split("## How the code is laid out", 1)[1].split("\n## ", 1)[0]
    packages = sorted(p.parent.name for p in CLIPA.glob("*/__init__.py") if p.parent.name != "model_configs")
    for name in packages:
        assert f"`clipa/{name}/`" in section, f"docs/development.md 'How the code is laid out' misses clipa/{name}/"
    for mentioned in set(re.findall(r"`clipa/(\w+)/`", section)):
        assert (CLIPA / mentioned).is_dir(), (f"docs/development.md 'How the code is laid out' names clipa/{mentioned}/, "
                                                   "which does not exist")
    # The top floor is the shared vocabulary only, each module named where the map says so; a new one is a decision.
    top = section.split("- top level", 1)[1]
    modules = sorted(p.name for p in CLIPA.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert modules == ["distributed.py", "errors.py", "progress.py", "stage.py"], (
        f"clipa/ top level is {modules}: put a new module in the package of its concern, or add it to the map's "
        "'top level' entry and here")
    assert all(f"`{name}`" in top for name in modules), "docs/development.md 'top level' misses a top-level module"


def test_tables_are_built_in_one_module():
    """The CLI only parses, calls and renders: every rich Table in clipa is built in clipa/cli/render.py."""
    render = CLIPA / "cli" / "render.py"
    bad = []
    for path in sorted(CLIPA.rglob("*.py")):
        if path == render:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module == "rich.table":
                bad.append(f"{path.relative_to(CLIPA)}:{node.lineno} imports rich.table")
    assert not bad, "\n".join(bad)
    assert "from rich.table import Table" in render.read_text()


def _clipa_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The clipa modules `path` imports, at its top or inside a function (a lazy import is still a dependency):
    `from clipa.x import y` counts as clipa.x.y when that is a module, else as clipa.x."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clipa"):
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
            names = subs if len(subs) == len(node.names) else [node.module, *subs]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("clipa")]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def _package(module: str) -> str:
    """clipa.model.build -> model; a top-level module (clipa.stage) is its own package."""
    return module.split(".")[1] if module.count(".") >= 1 else module


def _package_imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for module, path in modules.items():
        for target in _clipa_imports(path, modules):
            if _package(target) != _package(module):
                edges.setdefault(_package(module), set()).add(_package(target))
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one member (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            visit(v)
    return out


# Which package may import which (docs/development.md): dependencies point one way.
_NEVER = {
    "data": {"train", "evaluate", "model"},  # data/ feeds the trainer and evaluation and needs no model
    "reduction": {"train", "model", "data", "evaluate", "run", "recipe", "cli"},  # the strategies, for all of them
    "model": {"train", "evaluate"},
    "run": {"train", "model", "data", "evaluate", "cli"},  # the run directory's names, below everything that uses it
    "recipe": {"train", "model", "evaluate", "run", "cli"},
    "cost": {"train", "evaluate", "data", "run", "cli"},  # counted from the model config, below the trainer it prices
    "analysis": {"train", "evaluate", "model", "data", "cli"},  # reads run directories and JSON, after the runs
}


def _forbidden(edges: dict[str, set[str]]) -> list[str]:
    return [f"clipa/{a}/ imports clipa/{b}/" for a, banned in _NEVER.items() for b in sorted(edges.get(a, set()) & banned)]


def test_dependencies_point_one_way():
    """No package imports one it must not (not even lazily), and no import cycle, between modules or between
    packages, hides behind lazy imports."""
    modules = _modules()
    packages = _package_imports(modules)
    assert not _forbidden(packages), "\n".join(_forbidden(packages))
    assert not _cycles(packages), f"package import cycles: {_cycles(packages)}"
    module_edges = {m: _clipa_imports(p, modules) - {m} for m, p in modules.items()}
    assert not _cycles(module_edges), f"import cycles: {_cycles(module_edges)}"


def test_the_dependency_checks_can_fail(tmp_path):
    # A lazy `from clipa.train.checkpoint import ...` inside model/ is seen, and a two-module cycle is found.
    (tmp_path / "clipa" / "model").mkdir(parents=True)
    (tmp_path / "clipa" / "train").mkdir()
    weights, checkpoint = tmp_path / "clipa" / "model" / "weights.py", tmp_path / "clipa" / "train" / "checkpoint.py"
    weights.write_text("def find():\n    from clipa.train.checkpoint import CheckpointManager\n")
    checkpoint.write_text("from clipa.model.weights import find\n")
    modules = {"clipa.model.weights": weights, "clipa.train.checkpoint": checkpoint}
    assert _forbidden(_package_imports(modules)) == ["clipa/model/ imports clipa/train/"]
    assert _cycles({m: _clipa_imports(p, modules) for m, p in modules.items()}) == [sorted(modules)]
    assert _cycles(_package_imports(modules)) == [["model", "train"]]


def _literal_names(path: Path, name: str) -> tuple:
    """The names of a top-level `NAME = (...)` tuple, or the keys of a `NAME = {...}` dict, read without importing."""
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            value = node.value
            return tuple(ast.literal_eval(k) for k in value.keys) if isinstance(value, ast.Dict) else ast.literal_eval(value)
    raise AssertionError(f"{path.relative_to(ROOT)} no longer assigns {name}")


def test_the_recipe_accepts_exactly_the_losses_the_trainer_has():
    """A new loss is two files (docs/development.md): its LOSSES entry in clipa/train/loss.py and its name in
    clipa/recipe/schema.py's LOSS_KINDS, which the torch-free recipe validates against. Forgetting either is caught
    here, not by a recipe refused or a KeyError at the first step."""
    losses = _literal_names(CLIPA / "train" / "loss.py", "LOSSES")
    kinds = _literal_names(CLIPA / "recipe" / "schema.py", "LOSS_KINDS")
    assert sorted(losses) == sorted(kinds), f"clipa/train/loss.py LOSSES {losses} != clipa/recipe/schema.py LOSS_KINDS {kinds}"


def test_torch_free_packages_import_no_torch():
    """clipa/run/ (names, lock, metrics, lineage, listing) loads without torch: `clipa runs`, `clipa scaling` and a
    notebook read run directories without paying for it; clipa/reduction/ (mask sampling, caption reduction) and the
    recipe too: a data worker picks its tokens without the model package; clipa/cost/ (FLOP counts, accelerator
    peaks) imports torch only inside the functions that count a timm tower or measure a peak, and
    clipa/analysis/ (`clipa report`, `clipa scaling`, `clipa plan`) not at all."""
    import subprocess

    code = ("import sys; import clipa.run.layout, clipa.run.lock, clipa.run.metrics, clipa.run.lineage, clipa.run.listing, "
            "clipa.reduction.image, clipa.reduction.text, clipa.reduction.syntax, clipa.recipe.load, "
            "clipa.cost.flops, clipa.cost.accelerators, clipa.analysis.plan, "
            "clipa.analysis.report, clipa.analysis.points, clipa.analysis.fit, clipa.analysis.plot; "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'open_clip', 'timm'}); "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, (f"clipa/run/, reduction/, recipe/, cost/ or analysis/ import "
                                    f"{result.stdout or result.stderr}")


def _repo_texts():
    for folder in ("clipa", "tests", "benchmarks", "recipes", "docs", ".ci"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".toml", ".md", "") and path.is_file():
                yield path, path.read_text(encoding="utf-8", errors="replace")
    for name in ("README.md", "CHANGELOG.md", "pyproject.toml"):
        yield ROOT / name, (ROOT / name).read_text(encoding="utf-8")


def test_cited_documents_and_traps_exist():
    """A reader can follow every `docs/X.md` the repository cites, and every "trap N" to its item."""
    traps = (ROOT / "docs" / "clipa_recipes.md").read_text().split("\n## Traps\n", 1)[1]
    numbered = {int(n) for n in re.findall(r"^(\d+)\. ", traps, re.M)}
    assert numbered == set(range(1, len(numbered) + 1)) and len(numbered) >= 14
    bad = []
    for path, text in _repo_texts():
        name = path.relative_to(ROOT)
        if path == Path(__file__).resolve():
            continue
        if name.as_posix() != "docs/clipa_recipes.md":  # its docs/ paths are other repositories' (open_clip's)
            bad += [f"{name} cites {doc}" for doc in set(re.findall(r"\bdocs/[\w./-]+\.md", text))
                    if not (ROOT / doc).is_file()]
        bad += [f"{name} cites {doc}" for doc in ("DESIGN.md", "CLIPA_RECIPES") if doc in text]
        if path.suffix in (".toml", ".py"):
            cited = {int(n) for group in re.findall(r"\b[Tt]raps? (\d+(?:, \d+)*)", text) for n in group.split(", ")}
            bad += [f"{name} cites trap {n}" for n in sorted(cited - numbered)]
            if cited and "docs/clipa_recipes.md" not in text:
                bad.append(f"{name} cites traps without saying where they are (docs/clipa_recipes.md)")
    assert not bad, "\n".join(bad)
