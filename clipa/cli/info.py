"""`clipa ls`, `cp`, `models` and `runs`: the shipped recipes, the published weights and the runs trained here."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from clipa.cli.render import line, models_table, out, recipes_table, runs_table, user_errors
from clipa.errors import ClipaError


@user_errors
def list_recipes() -> None:
    """List the shipped recipes."""
    from clipa.recipe.index import shipped, summary

    out.print(recipes_table({name: summary(resource) for name, resource in shipped().items()}))


@user_errors
def runs(root: Path = typer.Option(Path("runs"), "--root", help="The folder holding the run directories."),
         as_json: bool = typer.Option(False, "--json", help="Print a JSON list of the runs (one object each: path, "
                                      "name, stage, parent, next, steps_done, total_steps, finished, updated, "
                                      "zeroshot).")) -> None:
    """The runs under runs/: stage, recipe, parent run, steps done / total, finished, last zero-shot acc1."""
    import json

    from clipa.run.listing import list_runs

    found = list_runs(root)
    if as_json:
        print(json.dumps([run.as_dict() for run in found], indent=2))
    elif not found:
        line(f"no runs under {root}/; start one with: clipa pretrain tiny/pretrain")
    else:
        out.print(runs_table(found, root))


@user_errors
def copy_recipe(name: str = typer.Argument(..., help="Shipped recipe name, e.g. tiny/pretrain."),
                dest: Path = typer.Argument(..., help="Destination file or directory.")) -> None:
    """Copy a shipped recipe to edit it."""
    from clipa.recipe.index import copy

    out.print(f"wrote {copy(name, dest)}", highlight=False)


@user_errors
def models(filter_text: Optional[str] = typer.Argument(None, metavar="[FILTER]",
                                                       help="Show names containing this (e.g. CLIPA, ViT-B-32)."),
           as_json: bool = typer.Option(False, "--json", help="Print {\"cache_dir\", \"models\": [...]} as JSON."),
           timm_models: bool = typer.Option(False, "--timm", help="List timm's pretrained image models "
                                            "instead (for model.image_init = \"timm:NAME.TAG\"); needs FILTER."),
           cached_only: bool = typer.Option(False, "--cached", help="Only those in the local cache.")) -> None:
    """Published weights by name (open_clip's pretrained tags), marking those already in the local cache."""
    import json

    from huggingface_hub.constants import HF_HUB_CACHE

    from clipa.errors import did_you_mean
    from clipa.model import published

    if timm_models and not filter_text:
        raise ClipaError("FILTER: --timm lists thousands of models; give a filter, e.g. `clipa models --timm vit_base`")
    rows = published.list_timm(filter_text) if timm_models else published.list_models(filter_text or "")
    if cached_only:
        rows = [r for r in rows if r["cached"]]
    if not rows and not cached_only:
        names = sorted({r["arch"] for r in published.list_models()})
        raise ClipaError(f"FILTER: nothing matches \"{filter_text}\"{'' if timm_models else did_you_mean(filter_text, names)}"
                         "; `clipa models` lists everything")
    if as_json:
        print(json.dumps({"cache_dir": str(HF_HUB_CACHE), "models": rows}, indent=2))
        return
    out.print(models_table(rows, filter_text, timm_models))
    cached = sum(r["cached"] for r in rows)
    out.print(f"{len(rows)} listed, {cached} in the cache ({HF_HUB_CACHE}). Use them as --model ARCH --pretrained TAG, "
              "init.checkpoint = \"ARCH:TAG\" or model.image_init = \"timm:NAME.TAG\"; downloads go to that cache.",
              highlight=False, markup=False)
