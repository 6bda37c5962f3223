"""`clipa pretrain`, `finetune`, `validate`, `export` and `quickstart`: recipes in, runs out."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer

from clipa.cli.render import dry_run_table, line, out, quickstart_table, user_errors
from clipa.errors import ClipaError

OVERRIDES = typer.Argument(None, help="key=value overrides, e.g. optim.lr=1e-3 train.total_samples=1e6")
_OUT = typer.Option(None, "--out", help="Run directory (default runs/<name>).")
_RESUME = typer.Option(None, "--resume", help="Resume from this step checkpoint (or a run directory's newest), "
                       "even if the run has newer ones: those are replaced as it continues.")
_DRY = typer.Option(False, "--dry-run", help="Print the resolved recipe and what would run; train nothing.")


def load(recipe_path: str, overrides: Optional[List[str]]):
    from clipa.recipe.index import resolve_path
    from clipa.recipe.load import load_recipe
    from clipa.stage import Stage

    recipe = load_recipe(resolve_path(recipe_path), overrides or [])
    return recipe, Stage.of(recipe)  # checks the architecture, geometry and towers


def _dry_run(recipe, numbers, stage: str, run_dir: Path, resume: Path | None, notes: list[str]) -> None:
    from clipa.cost.flops import train_flops_per_sample
    from clipa.data.spec import data_commands
    from clipa.model.build import arch_config, native_geometry
    from clipa.model.checkpoints import newest_loadable
    from clipa.recipe.load import dumps
    from clipa.run.layout import CHECKPOINTS_DIR
    from clipa.train import trackers

    native = native_geometry(arch_config(recipe.model.arch))
    full = train_flops_per_sample(numbers.model_cfg, native.image_size, native.context_length)
    latest = resume or newest_loadable(run_dir / CHECKPOINTS_DIR)
    start = (f"resume from {latest}" if latest else
             f"weights from {recipe.init.checkpoint}" if recipe.init.checkpoint else "random initialisation")
    out.print(dumps(recipe), markup=False, highlight=False)
    commands = data_commands(recipe.data.train, timeout=recipe.data.read_timeout_s)
    out.print(dry_run_table(recipe, stage, numbers, native, full, start, run_dir, commands, trackers.describe(recipe)))
    for note in notes:
        out.print(note, highlight=False, markup=False)


def _train(stage: str, recipe_path: str, overrides, out_dir, resume, dry_run) -> None:
    if not dry_run:  # the trainer runs the preflight (on rank 0, once), before building anything
        from clipa.recipe.index import resolve_path
        from clipa.recipe.load import load_recipe
        from clipa.train.trainer import train

        result = train(load_recipe(resolve_path(recipe_path), overrides or []), stage, out_dir, resume=resume)
        if result.is_main and not result.stopped_by:
            out.print(f"{stage} finished: {result.steps} steps, {result.samples_per_s:.0f} samples/s, "
                      f"final loss {result.final_loss:.4f}; model in {result.run_dir / 'final'}")
        return
    from clipa.train.preflight import preflight

    recipe, numbers = load(recipe_path, overrides)
    checked = preflight(recipe, stage, out_dir, resume, numbers=numbers)
    _dry_run(recipe, numbers, stage, checked.run_dir, checked.resume, checked.notes)


_RECIPE = typer.Argument(..., help="Recipe TOML path or shipped recipe name (clipa ls).")


@user_errors
def pretrain(recipe: str = _RECIPE, overrides: Optional[List[str]] = OVERRIDES, out_dir: Optional[Path] = _OUT,
             resume: Optional[Path] = _RESUME, dry_run: bool = _DRY) -> None:
    """Train from scratch (or from init.checkpoint) at reduced tokens."""
    _train("pretrain", recipe, overrides, out_dir, resume, dry_run)


@user_errors
def finetune(recipe: Optional[str] = typer.Argument(None, help="Recipe TOML path or shipped recipe name (clipa ls); "
                                                    "default: the `next` recipe of the run it continues."),
             overrides: Optional[List[str]] = OVERRIDES, out_dir: Optional[Path] = _OUT,
             resume: Optional[Path] = _RESUME, dry_run: bool = _DRY,
             from_run: Optional[Path] = typer.Option(None, "--from", help="Continue this run directory (sets "
                                                     "init.checkpoint to its final/); default without a recipe: "
                                                     "the newest finished pretraining run under runs/.")) -> None:
    """Continue a run at full length (position embeddings are interpolated); bare, the newest finished pretraining run."""
    if recipe is not None and "=" in recipe and not Path(recipe).exists():
        overrides, recipe = [recipe, *(overrides or [])], None  # `clipa finetune optim.lr=1e-4`: an override
    if recipe is None or from_run is not None:
        from clipa.run.listing import next_recipe, run_to_continue

        run, notes = run_to_continue(from_run)
        recipe = recipe or next_recipe(run)
        checkpoint = run.path / "final"
        # Before the user's overrides, so an explicit init.checkpoint=... still wins.
        overrides = [f"init.checkpoint={json.dumps(str(checkpoint))}", *(overrides or [])]  # a TOML string
        line(f"continuing {run.describe()}")
        line(f"recipe     {recipe}" + ("" if recipe != run.next else " (its next)"))
        line(f"checkpoint {checkpoint}")
        for note in notes:
            line(note)
    _train("finetune", recipe, overrides, out_dir, resume, dry_run)


@user_errors
def validate(recipe: str = typer.Argument(..., help="Recipe TOML path or shipped recipe name."),
             overrides: Optional[List[str]] = OVERRIDES) -> None:
    """Check a recipe (schema, values, architecture geometry, batch layout) without running anything."""
    from clipa.data.spec import data_commands
    from clipa.recipe.checks import batch_layout
    from clipa.train import trackers
    from clipa.train.preflight import preflight

    recipe_obj, numbers = load(recipe, overrides)
    # The batch layout depends on the process count: the launcher's WORLD_SIZE when run under
    # one, else 1 (the global-by-micro divisibility and the micro-batch-1 check hold for any count).
    processes = int(os.environ.get("WORLD_SIZE") or 1)
    micro, accumulation = batch_layout(recipe_obj, processes)
    # A recipe alone: an init.checkpoint that is a run still to come is a note, not an error.
    notes = preflight(recipe_obj, numbers=numbers, starting=False).notes
    out.print(f"[green]ok[/] {recipe}: {recipe_obj.name}, {recipe_obj.model.arch} at {numbers.shape}; "
              f"batch {recipe_obj.train.global_batch_size} = {micro} micro x "
              f"{accumulation} accumulation x {processes} process(es)", highlight=False)
    # a recipe can run commands, like a Makefile
    for command in data_commands(recipe_obj.data.train, timeout=recipe_obj.data.read_timeout_s):
        line(f"data.train runs: {command}")
    if recipe_obj.log.trackers:
        line(f"trackers: {trackers.describe(recipe_obj)}")
    for note in notes:
        out.print(f"note: {note}", highlight=False, markup=False)


@user_errors
def export(checkpoint: Path = typer.Argument(..., help="A step checkpoint (runs/NAME/checkpoints/step_N) or a run directory."),
           out_dir: Path = typer.Argument(..., metavar="OUT", help="New directory for the open_clip model.")) -> None:
    """Write an open_clip local directory (config + safetensors) from any step checkpoint."""
    from clipa.train.checkpoint import export_checkpoint

    path = export_checkpoint(checkpoint, out_dir)
    out.print(f"wrote {path}; load it with open_clip.create_model_and_transforms(\"local-dir:{path}\")", highlight=False)


@user_errors
def quickstart(out_dir: Path = typer.Option(Path("runs/quickstart"), "--out", help="Where the two runs go."),
               scale: float = typer.Option(1.0, "--scale",
                                           help="Fraction of the recipes' samples to train on (for a quicker look).")) -> None:
    """Pretrain -> finetune -> zero-shot on the built-in synthetic data, on a CPU, in minutes."""
    from clipa.train.quickstart import run_quickstart

    if not 0 < scale <= 1:
        raise ClipaError(f"--scale: must be in (0, 1], got {scale}")
    out.print(quickstart_table(run_quickstart(out_dir, scale=scale)))
