"""The `clipa` command line: parse, call the plain-Python core, map errors to exit codes.

Exit codes: 0 success; 2 bad usage, recipe, path or name (one line naming it and the fix);
1 an unexpected failure (with a traceback, because that is a bug to report).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from clipa import __version__
from clipa.errors import ClipaError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Affordable CLIP training: low-token pretraining, short full-length finetuning, zero-shot eval.")
data_app = typer.Typer(no_args_is_help=True, help="Write and inspect datasets.")
app.add_typer(data_app, name="data")
# Off a terminal (logs, CI, pipes) rich would wrap tables at 80 columns; results tables are wider.
out = Console() if sys.stdout.isatty() else Console(width=200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def user_errors(fn):
    """Turn a ClipaError into `error: ...` on stderr and exit code 2, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ClipaError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        out.print(f"clipa {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


# --------------------------------------------------------------------------- recipes


def _load(recipe_path: str, overrides: Optional[List[str]]):
    from clipa.model import stage_geometry
    from clipa.recipe import load_recipe
    from clipa.recipes_index import resolve_path

    recipe = load_recipe(resolve_path(recipe_path), overrides or [])
    return recipe, stage_geometry(recipe)


def _describe(recipe, geometry, stage: str, out_dir: Path) -> Table:
    from clipa.checkpoint import CheckpointManager
    from clipa.flops import image_tokens, train_flops_per_sample
    from clipa.model import native_geometry, stage_config, arch_config

    cfg = stage_config(recipe.model.arch, geometry)
    native = native_geometry(arch_config(recipe.model.arch))
    keep_ratio = 1.0 - recipe.reduction.mask_ratio
    flops = train_flops_per_sample(cfg, geometry.image_size, geometry.context_length, keep_ratio)
    full = train_flops_per_sample(arch_config(recipe.model.arch), native.image_size, native.context_length)
    steps = recipe.train.total_samples // recipe.train.global_batch_size
    latest = CheckpointManager(out_dir / "checkpoints").latest()
    start = (f"resume from {latest}" if latest else
             f"weights from {recipe.init.checkpoint}" if recipe.init.checkpoint else "random initialisation")
    table = Table(title=f"clipa {stage} {recipe.name} (dry run: nothing is trained)", show_header=False)
    rows = [
        ("model", f"{recipe.model.arch} at {geometry.image_size}px (native {native.image_size}), "
                  f"{geometry.context_length} text tokens (native {native.context_length})"),
        ("image tokens", f"{image_tokens(cfg, geometry.image_size, keep_ratio)} per sample ({recipe.reduction.image}"
                         f"{f', mask ratio {recipe.reduction.mask_ratio:g}' if recipe.reduction.mask_ratio else ''})"),
        ("text", f"{geometry.context_length} tokens per caption ({recipe.reduction.text})"),
        ("train FLOPs", f"{flops:.3g} per sample, {flops / full:.2f}x of full length; {flops * steps * recipe.train.global_batch_size:.3g} in total"),
        ("data", recipe.data.train),
        ("steps", f"{steps} x {recipe.train.global_batch_size} samples = {steps * recipe.train.global_batch_size:,}"),
        ("optimizer", f"AdamW lr {recipe.optim.lr:g}, warmup {recipe.optim.warmup_steps}, {recipe.optim.schedule}, "
                      f"wd {recipe.optim.weight_decay:g}, betas {tuple(recipe.optim.betas)}"),
        ("start", start),
        ("run directory", str(out_dir)),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table


def _train_command(stage: str, recipe_path: str, overrides, out_dir, resume, dry_run) -> None:
    from clipa import recipe as recipe_mod
    from clipa.checkpoint import find_weights

    recipe, geometry = _load(recipe_path, overrides)
    if stage == "finetune" and not recipe.init.checkpoint:
        raise ClipaError("init.checkpoint: finetune needs weights to start from; add init.checkpoint=runs/NAME")
    run_dir = Path(out_dir) if out_dir else Path("runs") / recipe.name
    if resume:
        find_weights(resume, key="--resume")
    if recipe.init.checkpoint:
        find_weights(recipe.init.checkpoint)  # fail now, not after building the model
    if dry_run:
        out.print(recipe_mod.dumps(recipe), markup=False, highlight=False)
        out.print(_describe(recipe, geometry, stage, run_dir))
        return
    from clipa.train import train

    result = train(recipe, stage, run_dir, resume=resume)
    if result.is_main and not result.stopped_by:
            out.print(f"{stage} finished: {result.steps} steps, {result.samples_per_s:.0f} samples/s, "
                  f"final loss {result.final_loss:.4f}; model in {result.run_dir / 'final'}")


_OVERRIDES = typer.Argument(None, help="key=value overrides, e.g. optim.lr=1e-3 train.total_samples=1e6")
_OUT = typer.Option(None, "--out", help="Run directory (default runs/<name>).")
_RESUME = typer.Option(None, "--resume", help="Resume from this checkpoint when the run directory has none.")
_DRY = typer.Option(False, "--dry-run", help="Print the resolved recipe and what would run; train nothing.")


@app.command()
@user_errors
def pretrain(recipe: str = typer.Argument(..., help="Recipe TOML path or shipped recipe name (clipa ls)."),
             overrides: Optional[List[str]] = _OVERRIDES, out_dir: Optional[Path] = _OUT,
             resume: Optional[Path] = _RESUME, dry_run: bool = _DRY) -> None:
    """Train from scratch (or from init.checkpoint) at reduced tokens."""
    _train_command("pretrain", recipe, overrides, out_dir, resume, dry_run)


@app.command()
@user_errors
def finetune(recipe: str = typer.Argument(..., help="Recipe TOML path or shipped recipe name (clipa ls)."),
             overrides: Optional[List[str]] = _OVERRIDES, out_dir: Optional[Path] = _OUT,
             resume: Optional[Path] = _RESUME, dry_run: bool = _DRY) -> None:
    """Continue from init.checkpoint at full length (position embeddings are interpolated)."""
    _train_command("finetune", recipe, overrides, out_dir, resume, dry_run)


@app.command()
@user_errors
def validate(recipe: str = typer.Argument(..., help="Recipe TOML path or shipped recipe name."),
             overrides: Optional[List[str]] = _OVERRIDES) -> None:
    """Check a recipe (schema, values, architecture geometry) without running anything."""
    recipe_obj, geometry = _load(recipe, overrides)
    out.print(f"[green]ok[/] {recipe}: {recipe_obj.name}, {recipe_obj.model.arch} at {geometry.image_size}px / "
              f"{geometry.context_length} tokens", highlight=False)
    if recipe_obj.init.checkpoint and not Path(recipe_obj.init.checkpoint).exists():
        out.print(f"note: init.checkpoint {recipe_obj.init.checkpoint} does not exist yet", highlight=False)


@app.command("ls")
@user_errors
def list_recipes() -> None:
    """List the shipped recipes."""
    from clipa.recipes_index import shipped, summary

    table = Table("recipe", "about")
    for name, resource in shipped().items():
        table.add_row(name, summary(resource))
    out.print(table)


@app.command("cp")
@user_errors
def copy_recipe(name: str = typer.Argument(..., help="Shipped recipe name, e.g. tiny/pretrain."),
                dest: Path = typer.Argument(..., help="Destination file or directory.")) -> None:
    """Copy a shipped recipe to edit it."""
    from clipa.recipes_index import copy

    out.print(f"wrote {copy(name, dest)}", highlight=False)


@app.command("export")
@user_errors
def export(checkpoint: Path = typer.Argument(..., help="A step checkpoint (runs/NAME/checkpoints/step_N) or a run directory."),
           out_dir: Path = typer.Argument(..., metavar="OUT", help="New directory for the open_clip model.")) -> None:
    """Write an open_clip local directory (config + safetensors) from any step checkpoint."""
    from clipa.checkpoint import export_checkpoint

    path = export_checkpoint(checkpoint, out_dir)
    out.print(f"wrote {path}; load it with open_clip.create_model_and_transforms(\"local-dir:{path}\")", highlight=False)


# --------------------------------------------------------------------------- evaluation


def _results_table(results: list[dict]) -> Table:
    table = Table("dataset", "model", "acc1", "acc5", "mean per-class recall", "chance", "images", "images/s",
                  title="zero-shot classification")
    for r in results:
        m = r["metrics"]
        table.add_row(r["dataset"], r["pretrained"], f"{m['acc1']:.4f}", f"{m['acc5']:.4f}",
                      f"{m['mean_per_class_recall']:.4f}", f"{r['chance']:.4f}", str(m["num_samples"]),
                      f"{m['images_per_s']:.0f}" if m.get("images_per_s") else "-")
    return table


@app.command()
@user_errors
def zeroshot(model: str = typer.Option(..., "--model", help="Run dir, exported model dir, local-dir:PATH, or an architecture with --pretrained."),
             dataset: List[str] = typer.Option(..., "--dataset", help="synthetic | imagefolder (repeat for several)."),
             data_root: Optional[str] = typer.Option(None, "--data-root", help="Dataset folder (imagefolder)."),
             pretrained: Optional[str] = typer.Option(None, "--pretrained", help="Weights file for an architecture name."),
             templates: Optional[str] = typer.Option(None, "--templates", help="openai | simple | FILE (one {c} template per line)."),
             image_size: Optional[int] = typer.Option(None, "--image-size", help="Evaluate at this resolution."),
             batch_size: int = typer.Option(256, "--batch-size"),
             output: Optional[Path] = typer.Option(None, "--output", help="Write results as JSON (CLIP_benchmark shape)."),
             ) -> None:
    """Zero-shot classification: acc1, acc5, mean per-class recall."""
    from clipa.evaluate.datasets import DATASETS
    from clipa.evaluate.models import load_model
    from clipa.evaluate.zeroshot import write_result, zeroshot as run_zeroshot

    for name in dataset:
        if name not in DATASETS:
            raise ClipaError(f"--dataset: unknown dataset \"{name}\" (available: {', '.join(DATASETS)})")
    loaded = load_model(model, pretrained)
    results = [run_zeroshot(loaded, name, data_root, templates, image_size, batch_size) for name in dataset]
    out.print(_results_table(results))
    if output:
        write_result(results[0] if len(results) == 1 else results, output)
        out.print(f"wrote {output}", highlight=False)


# --------------------------------------------------------------------------- benchmarks


@app.command()
@user_errors
def bench(arch: List[str] = typer.Option(["clipa-tiny", "ViT-B-16"], "--arch", help="Architectures to measure."),
          batch: int = typer.Option(0, "--batch", help="Samples per step; 0 = 64 for small models, 8 for ViT-B and up."),
          steps: int = typer.Option(3, "--steps", help="Measured steps per setting (after one warm-up step)."),
          output: Optional[Path] = typer.Option(None, "--output", help="Also write the rows as JSON.")) -> None:
    """Measured training throughput of token-reduction settings vs the analytic FLOP ratio."""
    import json

    from clipa.bench import run_bench
    from clipa.model import arch_config

    if steps < 1:
        raise ClipaError(f"--steps: must be >= 1, got {steps}")
    rows = []
    for name in arch:
        width = arch_config(name)["vision_cfg"].get("width", 768)
        size = batch or (64 if width < 512 else 8)
        rows += run_bench([name], size, steps,
                          progress=lambda r: print(f"{r['arch']} {r['setting']}: {r['samples_per_s']:.1f} samples/s", flush=True))
    table = Table("arch", "setting", "img tok", "txt tok", "GFLOPs/sample", "samples/s", "speedup", "FLOP ratio",
                  "efficiency", "text select", title="clipa bench: training step forward + backward, fp32")
    for r in rows:
        table.add_row(r["arch"], r["setting"], str(r["image_tokens"]), str(r["text_tokens"]),
                      f"{r['flops_per_sample'] / 1e9:.2f}", f"{r['samples_per_s']:.1f}", f"{r['speedup']:.2f}x",
                      f"{r['flop_ratio']:.2f}x", f"{r['efficiency']:.2f}", f"{100 * r['text_select_frac']:.1f}%")
    out.print(table)
    if output:
        output.write_text(json.dumps(rows, indent=2) + "\n")


# --------------------------------------------------------------------------- data and quickstart


@data_app.command("synth")
@user_errors
def data_synth(out_dir: Path = typer.Argument(..., metavar="OUT", help="Output folder."),
               num_samples: int = typer.Option(10_000, "--num-samples"),
               shard_size: int = typer.Option(1_000, "--shard-size"),
               image_size: int = typer.Option(64, "--image-size"),
               eval_per_class: int = typer.Option(20, "--eval-per-class"),
               seed: int = typer.Option(0, "--seed")) -> None:
    """Write the synthetic data as webdataset shards plus an ImageFolder zero-shot split."""
    from clipa.data.shards import write_synthetic
    from clipa.data.synthetic import CLASSNAMES
    from clipa.progress import progress_counter

    total = num_samples + eval_per_class * len(CLASSNAMES)
    with progress_counter("writing", total) as advance:
        info = write_synthetic(out_dir, num_samples, shard_size, image_size, eval_per_class, seed, progress=advance)
    out.print(f"wrote {info['samples']} training pairs in {info['shards']} shards: data.train = \"{info['train']}\"\n"
              f"wrote {info['eval_images']} zero-shot images: --dataset imagefolder --data-root {info['eval']}",
              highlight=False)


@app.command()
@user_errors
def quickstart(out_dir: Path = typer.Option(Path("runs/quickstart"), "--out", help="Where the two runs go."),
               scale: float = typer.Option(1.0, "--scale", help="Fraction of the recipes' samples to train on (for a quicker look).")) -> None:
    """Pretrain -> finetune -> zero-shot on the built-in synthetic data, on a CPU, in minutes."""
    from clipa.quickstart import format_table, run_quickstart

    if not 0 < scale <= 1:
        raise ClipaError(f"--scale: must be in (0, 1], got {scale}")
    rows = run_quickstart(out_dir, scale=scale)
    out.print(format_table(rows))


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
