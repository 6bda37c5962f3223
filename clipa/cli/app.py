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
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from clipa import __version__
from clipa.errors import ClipaError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Affordable CLIP training: low-token pretraining, short full-length finetuning, zero-shot eval.")
data_app = typer.Typer(no_args_is_help=True, help="Write and inspect datasets.")
app.add_typer(data_app, name="data")
scaling_app = typer.Typer(no_args_is_help=True, help="Scaling laws: fit error against training compute.")
app.add_typer(scaling_app, name="scaling")
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
            # One line, always: logs and scripts grep for it (a message that embeds a library's
            # multi-line text would otherwise spill over several).
            message = " ".join(str(e).split())
            err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
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
    from clipa.recipe.index import resolve_path
    from clipa.recipe.load import load_recipe
    from clipa.stage import Stage

    recipe = load_recipe(resolve_path(recipe_path), overrides or [])
    return recipe, Stage.of(recipe)  # checks the architecture, geometry and towers


def _weights_notes(recipe, cfg: dict, run_dir: Path, init_must_exist: bool) -> list[str]:
    """Check every weights source a fresh run of `recipe` would read, downloading nothing; one line each
    on published ones (cached, or will download on first use) and on the Hugging Face tokenizer."""
    from clipa.model import published
    from clipa.model.towers import check_image_init
    from clipa.model.weights import find_weights
    from clipa.train.checkpoint import CheckpointManager

    notes = []
    # A run resuming from its own checkpoints reads neither init.checkpoint nor image_init.
    fresh = CheckpointManager(run_dir / "checkpoints").latest() is None
    if fresh and recipe.init.checkpoint:
        pub = published.parse(recipe.init.checkpoint, "init.checkpoint")
        if pub is not None and pub.cfg.get("quick_gelu") and not cfg.get("quick_gelu"):
            # open_clip's OpenAI tags: trained with QuickGELU, which only the -quickgelu configs build
            raise ClipaError(f"init.checkpoint: {pub.spec} was trained with QuickGELU, but model.arch "
                             f"{recipe.model.arch} uses GELU; set model.arch = \"{pub.name}-quickgelu\"")
        note = published.check_source(recipe.init.checkpoint, "init.checkpoint")
        if note:
            notes.append(f"init.checkpoint {note}")
        elif init_must_exist:
            find_weights(recipe.init.checkpoint)  # fail now, not after building the model
        elif not Path(recipe.init.checkpoint).exists():  # often an earlier stage's run
            notes.append(f"init.checkpoint {recipe.init.checkpoint} does not exist yet")
    if fresh and recipe.model.image_init:
        note = check_image_init(recipe.model.image_init, cfg["vision_cfg"].get("timm_model_name", ""))
        if note:
            notes.append(f"model.image_init {note}")
    tokenizer = published.tokenizer_note(cfg["text_cfg"])
    if tokenizer:
        notes.append(tokenizer)
    return notes


def _describe(recipe, numbers, stage: str, out_dir: Path, resume: Path | None = None) -> Table:
    from clipa.data.spec import data_commands
    from clipa.flops import train_flops_per_sample
    from clipa.model.build import arch_config, native_geometry
    from clipa.train.checkpoint import CheckpointManager

    geometry, cfg = numbers.geometry, numbers.model_cfg  # the model the trainer builds: timm tower, SigLIP bias included
    native = native_geometry(arch_config(recipe.model.arch))
    flops = numbers.flops_per_sample
    full = train_flops_per_sample(cfg, native.image_size, native.context_length)
    steps = numbers.steps
    latest = resume or CheckpointManager(out_dir / "checkpoints").latest()
    start = (f"resume from {latest}" if latest else
             f"weights from {recipe.init.checkpoint}" if recipe.init.checkpoint else "random initialisation")
    table = Table(title=f"clipa {stage} {recipe.name} (dry run: nothing is trained)", show_header=False)
    rows = [
        ("model", f"{recipe.model.arch} at {geometry.image_size}px (native {native.image_size}), "
                  f"{geometry.context_length} text tokens (native {native.context_length})"),
        ("image tokens", f"{numbers.image_tokens} per sample ({recipe.reduction.image}"
                         f"{f', mask ratio {recipe.reduction.mask_ratio:g}' if recipe.reduction.mask_ratio else ''})"),
        ("text", f"{geometry.context_length} tokens per caption ({recipe.reduction.text})"),
        ("train FLOPs", f"{flops:.3g} per sample, {flops / full:.2f}x of full length; {flops * steps * recipe.train.global_batch_size:.3g} in total"),
        ("data", recipe.data.train),
        *(("runs", command) for command in data_commands(recipe.data.train)),
        ("steps", f"{steps} x {recipe.train.global_batch_size} samples = {steps * recipe.train.global_batch_size:,}"),
        ("optimizer", f"AdamW lr {recipe.optim.lr:g}, warmup {recipe.optim.warmup_steps}, {recipe.optim.schedule}, "
                      f"wd {recipe.optim.weight_decay:g}, betas {tuple(recipe.optim.betas)}"),
        ("start", start),
        ("run directory", str(out_dir)),
    ]
    for key, value in rows:
        table.add_row(key, Text(value))  # recipe values are shown as written, never read as rich markup
    return table


def _train_command(stage: str, recipe_path: str, overrides, out_dir, resume, dry_run) -> None:
    from clipa.recipe.load import dumps

    recipe, numbers = _load(recipe_path, overrides)
    if stage == "finetune" and not recipe.init.checkpoint:
        raise ClipaError("init.checkpoint: finetune needs weights to start from; add init.checkpoint=runs/NAME "
                         "or a published ARCH:TAG / hf-hub:ORG/NAME")
    run_dir = Path(out_dir) if out_dir else Path("runs") / recipe.name
    if dry_run:  # a real run checks these in the trainer (on rank 0, once), before building anything
        from clipa.train.checkpoint import resolve_resume
        from clipa.train.runlock import check_run_dir

        check_run_dir(run_dir)
        if resume:
            resume = resolve_resume(resume)
    # Weights are checked by name (published ones looked up in the cache, never downloaded) before
    # anything is built; a run resuming from a checkpoint reads neither init nor image_init.
    notes = [] if resume else _weights_notes(recipe, numbers.model_cfg, run_dir, init_must_exist=True)
    if dry_run:
        out.print(dumps(recipe), markup=False, highlight=False)
        out.print(_describe(recipe, numbers, stage, run_dir, resume))
        for note in notes:
            out.print(note, highlight=False, markup=False)
        return
    from clipa.train.trainer import train

    result = train(recipe, stage, run_dir, resume=resume)
    if result.is_main and not result.stopped_by:
        out.print(f"{stage} finished: {result.steps} steps, {result.samples_per_s:.0f} samples/s, "
                  f"final loss {result.final_loss:.4f}; model in {result.run_dir / 'final'}")


_OVERRIDES = typer.Argument(None, help="key=value overrides, e.g. optim.lr=1e-3 train.total_samples=1e6")
_OUT = typer.Option(None, "--out", help="Run directory (default runs/<name>).")
_RESUME = typer.Option(None, "--resume", help="Resume from this step checkpoint (or a run directory's newest), "
                       "even if the run has newer ones: those are replaced as it continues.")
_DRY = typer.Option(False, "--dry-run", help="Print the resolved recipe and what would run; train nothing.")


def _stage_command(stage: str, help_text: str) -> None:
    """`clipa pretrain` and `clipa finetune`: the same arguments, one trainer, a different stage."""

    def command(recipe: str = typer.Argument(..., help="Recipe TOML path or shipped recipe name (clipa ls)."),
                overrides: Optional[List[str]] = _OVERRIDES, out_dir: Optional[Path] = _OUT,
                resume: Optional[Path] = _RESUME, dry_run: bool = _DRY) -> None:
        _train_command(stage, recipe, overrides, out_dir, resume, dry_run)

    command.__doc__ = help_text
    app.command(stage)(user_errors(command))


_stage_command("pretrain", "Train from scratch (or from init.checkpoint) at reduced tokens.")
_stage_command("finetune", "Continue from init.checkpoint at full length (position embeddings are interpolated).")


@app.command()
@user_errors
def validate(recipe: str = typer.Argument(..., help="Recipe TOML path or shipped recipe name."),
             overrides: Optional[List[str]] = _OVERRIDES) -> None:
    """Check a recipe (schema, values, architecture geometry, batch layout) without running anything."""
    import os

    from clipa.recipe.checks import batch_layout

    recipe_obj, numbers = _load(recipe, overrides)
    geometry = numbers.geometry
    # The batch layout depends on the process count: the launcher's WORLD_SIZE when run under
    # one, else 1 (the global-by-micro divisibility and the micro-batch-1 check hold for any count).
    processes = int(os.environ.get("WORLD_SIZE") or 1)
    micro, accumulation = batch_layout(recipe_obj, processes)
    # Published weights are checked by name and looked up in the cache, never downloaded; a local
    # image_init must exist (a run resuming from runs/NAME takes its checkpoint's weights instead).
    notes = _weights_notes(recipe_obj, numbers.model_cfg, Path("runs") / recipe_obj.name, init_must_exist=False)
    out.print(f"[green]ok[/] {recipe}: {recipe_obj.name}, {recipe_obj.model.arch} at {geometry.image_size}px / "
              f"{geometry.context_length} tokens; batch {recipe_obj.train.global_batch_size} = {micro} micro x "
              f"{accumulation} accumulation x {processes} process(es)", highlight=False)
    from clipa.data.spec import data_commands

    for command in data_commands(recipe_obj.data.train):  # a recipe can run commands, like a Makefile
        out.print(f"data.train runs: {command}", highlight=False, markup=False, soft_wrap=True)
    for note in notes:
        out.print(f"note: {note}", highlight=False, markup=False)


@app.command("ls")
@user_errors
def list_recipes() -> None:
    """List the shipped recipes."""
    from clipa.recipe.index import shipped, summary

    table = Table("recipe", "about")
    for name, resource in shipped().items():
        table.add_row(name, summary(resource))
    out.print(table)


@app.command("cp")
@user_errors
def copy_recipe(name: str = typer.Argument(..., help="Shipped recipe name, e.g. tiny/pretrain."),
                dest: Path = typer.Argument(..., help="Destination file or directory.")) -> None:
    """Copy a shipped recipe to edit it."""
    from clipa.recipe.index import copy

    out.print(f"wrote {copy(name, dest)}", highlight=False)


@app.command("models")
@user_errors
def models_command(filter_text: Optional[str] = typer.Argument(None, metavar="[FILTER]",
                                                               help="Show names containing this (e.g. CLIPA, ViT-B-32)."),
                   as_json: bool = typer.Option(False, "--json", help="Print {\"cache_dir\", \"models\": [...]} as JSON."),
                   timm_models: bool = typer.Option(False, "--timm", help="List timm's pretrained image models "
                                                    "instead (for model.image_init = \"timm:NAME.TAG\"); needs FILTER."),
                   cached_only: bool = typer.Option(False, "--cached", help="Only those in the local cache.")) -> None:
    """Published weights by name (open_clip's pretrained tags), marking those already in the local cache."""
    import json

    from huggingface_hub.constants import HF_HUB_CACHE

    from clipa.model import published

    if timm_models and not filter_text:
        raise ClipaError("FILTER: --timm lists thousands of models; give a filter, e.g. `clipa models --timm vit_base`")
    rows = published.list_timm(filter_text) if timm_models else published.list_models(filter_text or "")
    if cached_only:
        rows = [r for r in rows if r["cached"]]
    if not rows and not cached_only:
        from clipa.errors import did_you_mean

        names = sorted({r["arch"] for r in published.list_models()})
        raise ClipaError(f"FILTER: nothing matches \"{filter_text}\"{'' if timm_models else did_you_mean(filter_text, names)}"
                         "; `clipa models` lists everything")
    if as_json:
        print(json.dumps({"cache_dir": str(HF_HUB_CACHE), "models": rows}, indent=2))
        return
    table = Table("name (ARCH:TAG)" if not timm_models else "name (model.image_init)", "Hugging Face repository",
                  "cached", title=f"published weights{f' matching {filter_text!r}' if filter_text else ''}")
    for r in rows:
        table.add_row(r["name"], r["hf_hub"] or "-", "yes" if r["cached"] else "-")
    out.print(table)
    cached = sum(r["cached"] for r in rows)
    out.print(f"{len(rows)} listed, {cached} in the cache ({HF_HUB_CACHE}). Use them as --model ARCH --pretrained TAG, "
              "init.checkpoint = \"ARCH:TAG\" or model.image_init = \"timm:NAME.TAG\"; downloads go to that cache.",
              highlight=False, markup=False)


@app.command("export")
@user_errors
def export(checkpoint: Path = typer.Argument(..., help="A step checkpoint (runs/NAME/checkpoints/step_N) or a run directory."),
           out_dir: Path = typer.Argument(..., metavar="OUT", help="New directory for the open_clip model.")) -> None:
    """Write an open_clip local directory (config + safetensors) from any step checkpoint."""
    from clipa.train.checkpoint import export_checkpoint

    path = export_checkpoint(checkpoint, out_dir)
    out.print(f"wrote {path}; load it with open_clip.create_model_and_transforms(\"local-dir:{path}\")", highlight=False)


@app.command()
@user_errors
def plan(recipes: List[str] = typer.Argument(..., metavar="RECIPE...", help="Recipe paths or shipped names, in pipeline order."),
         as_json: bool = typer.Option(False, "--json", help="Print {\"stages\": [...], \"total\": {...}} as JSON."),
         gpu: str = typer.Option("A100", "--gpu", help="Accelerator name (A100, H100, H200, L4, L40S, TPU v5e, ...; "
                                 "see clipa.flops.PEAK_TFLOPS_BF16)."),
         gpus: int = typer.Option(8, "--gpus", help="Accelerators working in parallel (wall hours = GPU-hours / N)."),
         mfu: float = typer.Option(0.27, "--mfu", help="Expected model-FLOPs utilisation; 0.27 is what CLIPA-v2's "
                                   "published H/14 A100-hours imply (docs/plan.md)."),
         price: float = typer.Option(1.576, "--price", help="Dollars per accelerator-hour (1.576: the A100 price "
                                     "implied by the CLIPA-v2 README)."),
         peak_tflops: Optional[float] = typer.Option(None, "--peak-tflops", help="Dense bf16 peak TFLOP/s of an "
                                                     "accelerator not in the table.")) -> None:
    """FLOPs, accelerator-hours and dollars of each stage and of the pipeline, before you spend them."""
    import json

    from clipa.plan import plan as make_plan
    from clipa.plan import table

    result = make_plan(recipes, gpu=gpu, gpus=gpus, mfu=mfu, price=price, peak_tflops=peak_tflops)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        out.print(table(result))


@scaling_app.command("fit")
@user_errors
def scaling_fit(inputs: List[Path] = typer.Argument(..., metavar="RUNS_OR_JSON...",
                                                    help="clipa run directories and/or JSON files of points."),
                offset: bool = typer.Option(False, "--offset", help="Fit an irreducible error too: beta * C^alpha + e."),
                target_compute: Optional[float] = typer.Option(None, "--target-compute", help="Extrapolate to this "
                                                               "many training FLOPs (default: 10x the largest)."),
                plot: Path = typer.Option(Path("scaling_fit.png"), "--plot", help="PNG plot to write."),
                metric: str = typer.Option("acc1", "--metric", help="Zero-shot metric; error = 1 - metric."),
                dataset: Optional[str] = typer.Option(None, "--dataset", help="Which zeroshot_*.json result to use "
                                                      "when a run directory holds several.")) -> None:
    """Power-law fit of zero-shot error against training compute, with 95% intervals and a plot."""
    from clipa.scaling import fit_power_law, load_points, plot_fit

    if target_compute is not None and target_compute <= 0:
        raise ClipaError(f"--target-compute: must be > 0 FLOPs, got {target_compute:g}")
    points = load_points(inputs, metric, dataset)
    fit = fit_power_law([p.compute for p in points], [p.error for p in points], offset=offset)
    target = target_compute or 10 * max(p.compute for p in points)
    table = Table("point", "compute (FLOPs)", f"error (1 - {metric})", "fitted", title="scaling fit")
    for p in points:
        table.add_row(p.label, f"{p.compute:.3g}", f"{p.error:.4f}", f"{fit.predict(p.compute)[0]:.4f}")
    out.print(table)
    for p in points:
        for note in p.notes:
            out.print(f"  {p.label}: {note}", highlight=False)
    lines = [fit.formula() + f"   (n = {fit.n}, residual sd of log error {fit.rmse_log:.3g})",
             f"alpha = {fit.alpha:.4g}  95% CI [{fit.alpha_ci[0]:.4g}, {fit.alpha_ci[1]:.4g}]",
             f"beta  = {fit.beta:.4g}  95% CI [{fit.beta_ci[0]:.4g}, {fit.beta_ci[1]:.4g}]"]
    if fit.e is not None:
        lines.append(f"e     = {fit.e:.4g}  95% CI [{fit.e_ci[0]:.4g}, {fit.e_ci[1]:.4g}]")
    mean, low, high = fit.predict(target)
    lines.append(f"at C = {target:.3g} FLOPs ({target / max(p.compute for p in points):.3g}x the largest point): "
                 f"error {mean:.4f} [{low:.4f}, {high:.4f}], {metric} {1 - mean:.4f} [{1 - high:.4f}, {1 - low:.4f}]")
    out.print("\n".join(lines), highlight=False)
    out.print(f"wrote {plot_fit(points, fit, plot, target, metric)}", highlight=False)


# --------------------------------------------------------------------------- evaluation


# Options shared by the evaluation commands (zeroshot, retrieval, linear-probe).
_MODEL = typer.Option(..., "--model", help="Run dir, exported model dir, local-dir:PATH, hf-hub:ORG/NAME, ARCH:TAG, or an "
                      "architecture / model-config JSON with --pretrained.")
_PRETRAINED = typer.Option(None, "--pretrained", help="Weights for an architecture: a published tag (clipa models ARCH) "
                           "or a weights file (e.g. an open_clip_train epoch_N.pt).")
_IMAGE_SIZE = typer.Option(None, "--image-size", help="Evaluate at this resolution (the image position embedding "
                           "is resized, as finetuning does).")
_TEXT_LENGTH = typer.Option(None, "--text-length", help="Tokens per prompt/caption (the text position embedding is "
                            "resized; the tokenizer truncates to it).")
_BATCH_SIZE = typer.Option(256, "--batch-size", help="Images per batch in each process.")
_NUM_WORKERS = typer.Option(None, "--num-workers", min=0, help="Image-decoding worker processes per evaluating process "
                            "(0 = decode in the main process; default: this process's share of the cores minus one, "
                            "at most 4).")
_OUTPUT = typer.Option(None, "--output", help="Write results as JSON (CLIP_benchmark shape), one object per file; "
                       "{dataset} in the name is replaced by the dataset name (several datasets without it: "
                       "NAME_DATASET.json next to NAME.json).")


def _eval_model(model: str, pretrained: Optional[str], image_size: Optional[int] = None,
                text_length: Optional[int] = None, batch_size: int = 1):
    """Join the launcher's process group (torchrun / accelerate launch; none for a plain call) and
    load the model onto its device. Returns (model, whether this process prints and writes)."""
    from clipa.evaluate.models import load_model
    from clipa.evaluate.sharding import join_launcher

    for option, value, least in (("--batch-size", batch_size, 1), ("--image-size", image_size, 1),
                                 ("--text-length", text_length, 2)):
        if value is not None and value < least:
            raise ClipaError(f"{option}: must be >= {least}, got {value}")
    accelerator = join_launcher()
    loaded = load_model(model, pretrained, image_size, text_length)
    loaded.model.to(accelerator.device)
    return loaded, accelerator.is_main_process


def _decode_workers(num_workers: Optional[int]) -> int:
    from clipa.data.loader import resolve_workers

    return min(4, resolve_workers(-1)) if num_workers is None else num_workers


def _write_outputs(results: list[dict], output: Optional[Path]) -> None:
    from clipa.evaluate.zeroshot import output_paths, write_result

    if output:
        for result, path in zip(results, output_paths(output, [r["dataset"] for r in results])):
            write_result(result, path)
            out.print(f"wrote {path}", highlight=False)


def _results_table(results: list[dict]) -> Table:
    table = Table("dataset", "model", "acc1", "acc5", "mean per-class recall", "chance", "images", "skipped",
                  "images/s", title="zero-shot classification")
    for r in results:
        m = r["metrics"]
        table.add_row(r["dataset"], r["pretrained"], f"{m['acc1']:.4f}", f"{m['acc5']:.4f}",
                      f"{m['mean_per_class_recall']:.4f}", f"{r['chance']:.4f}", str(m["num_samples"]),
                      str(m["skipped_images"]), f"{m['images_per_s']:.0f}" if m.get("images_per_s") else "-")
    return table


@app.command()
@user_errors
def zeroshot(model: str = _MODEL,
             dataset: List[str] = typer.Option(..., "--dataset", help="imagenet | imagenet-v2 | imagenet-sketch | imagenet-r | imagenet-a | imagefolder | wds | synthetic (repeat for several)."),
             data_root: Optional[str] = typer.Option(None, "--data-root", help="Dataset folder (all but synthetic)."),
             pretrained: Optional[str] = _PRETRAINED,
             templates: Optional[str] = typer.Option(None, "--templates", help="openai | simple | FILE (one {c} template per line)."),
             image_size: Optional[int] = _IMAGE_SIZE,
             text_length: Optional[int] = _TEXT_LENGTH,
             batch_size: int = _BATCH_SIZE,
             num_workers: Optional[int] = _NUM_WORKERS,
             output: Optional[Path] = _OUTPUT,
             ) -> None:
    """Zero-shot classification: acc1, acc5, mean per-class recall (split over torchrun/accelerate processes)."""
    from clipa.errors import check_one_of
    from clipa.evaluate.datasets import DATASETS
    from clipa.evaluate.zeroshot import zeroshot as run_zeroshot

    for name in dataset:
        check_one_of(name, DATASETS, "dataset")  # before the model loads
    repeated = sorted({name for name in dataset if dataset.count(name) > 1})
    if repeated:
        raise ClipaError(f"--dataset: {repeated[0]} is given more than once; list each dataset once")
    loaded, main = _eval_model(model, pretrained, image_size, text_length, batch_size)
    workers = _decode_workers(num_workers)
    results = [run_zeroshot(loaded, name, data_root, templates, batch_size=batch_size, num_workers=workers)
               for name in dataset]
    if main:
        out.print(_results_table(results))
        _write_outputs(results, output)


@app.command()
@user_errors
def retrieval(model: str = _MODEL,
              dataset: str = typer.Option(..., "--dataset", help="csv | wds | synthetic."),
              data_root: Optional[str] = typer.Option(None, "--data-root", help="CSV/TSV file (csv) or dataset folder (wds)."),
              pretrained: Optional[str] = _PRETRAINED,
              image_size: Optional[int] = _IMAGE_SIZE,
              text_length: Optional[int] = _TEXT_LENGTH,
              batch_size: int = _BATCH_SIZE,
              num_workers: Optional[int] = _NUM_WORKERS,
              output: Optional[Path] = _OUTPUT,
              ) -> None:
    """Image <-> text retrieval: recall@1/5/10 (several captions per image supported)."""
    from clipa.errors import check_one_of
    from clipa.evaluate.retrieval import RETRIEVAL_DATASETS
    from clipa.evaluate.retrieval import retrieval as run_retrieval

    check_one_of(dataset, RETRIEVAL_DATASETS, "retrieval dataset")  # before the model loads
    loaded, main = _eval_model(model, pretrained, image_size, text_length, batch_size)
    result = run_retrieval(loaded, dataset, data_root, batch_size=batch_size, num_workers=_decode_workers(num_workers))
    if not main:
        return
    m = result["metrics"]
    table = Table("direction", "R@1", "R@5", "R@10", title=f"retrieval on {dataset}: {m['num_images']} images, "
                                                           f"{m['num_texts']} captions")
    for direction, key in (("text -> image", "image_retrieval"), ("image -> text", "text_retrieval")):
        table.add_row(direction, *(f"{m[f'{key}_recall@{k}']:.4f}" for k in (1, 5, 10)))
    out.print(table)
    out.print(f"skipped images (unreadable): {m['skipped_images']}", highlight=False)
    _write_outputs([result], output)


@app.command("linear-probe")
@user_errors
def linear_probe_command(model: str = _MODEL,
                         dataset: str = typer.Option(..., "--dataset", help="imagefolder (train/ and test/ folders) | synthetic."),
                         data_root: Optional[str] = typer.Option(None, "--data-root"),
                         pretrained: Optional[str] = _PRETRAINED,
                         cache: Optional[Path] = typer.Option(None, "--cache", help="Feature cache folder (default .clipa-cache/features)."),
                         batch_size: int = _BATCH_SIZE,
                         num_workers: Optional[int] = _NUM_WORKERS,
                         output: Optional[Path] = _OUTPUT,
                         ) -> None:
    """Logistic-regression probe on frozen image features; L2 chosen on a class-stratified validation split."""
    from clipa.evaluate.linear_probe import linear_probe

    loaded, main = _eval_model(model, pretrained, batch_size=batch_size)
    result = linear_probe(loaded, dataset, data_root, cache, batch_size=batch_size,
                          num_workers=_decode_workers(num_workers))
    if not main:
        return
    m = result["metrics"]
    out.print(f"linear probe on {dataset}: top-1 {m['acc1']:.4f} (L2 {m['l2']:g} chosen on validation; "
              f"{m['num_train']} train / {m['num_test']} test images)", highlight=False)
    _write_outputs([result], output)


@app.command("report")
@user_errors
def report_command(run_dir: Path = typer.Argument(..., help="A clipa run directory."),
                   out_dir: Optional[Path] = typer.Option(None, "--out", help="Where the PNGs go (default RUN_DIR/report).")) -> None:
    """PNG plots (loss, lr, logit scale, throughput, evaluations vs samples seen) and a text summary."""
    from clipa.report import report

    summary, written = report(run_dir, out_dir)
    out.print(summary, highlight=False)
    out.print(f"wrote {len(written)} plots to {written[0].parent if written else out_dir}", highlight=False)


# --------------------------------------------------------------------------- benchmarks


@app.command()
@user_errors
def bench(arch: List[str] = typer.Option(["clipa-tiny", "ViT-B-16"], "--arch", help="Architectures to measure."),
          batch: int = typer.Option(0, "--batch", help="Samples per step; 0 = 256 for small models (amortises per-step costs), 8 for ViT-B and up."),
          steps: int = typer.Option(3, "--steps", help="Measured steps per setting (after one warm-up step)."),
          repeats: int = typer.Option(1, "--repeats", help="Measure all settings this many times, round-robin; report medians."),
          output: Optional[Path] = typer.Option(None, "--output", help="Also write the rows as JSON.")) -> None:
    """Measured training throughput of token-reduction settings vs the analytic FLOP ratio."""
    import json

    from clipa.bench import run_bench
    from clipa.model.build import arch_config

    if steps < 1 or repeats < 1:
        raise ClipaError(f"--steps and --repeats: must be >= 1, got --steps {steps} --repeats {repeats}")
    rows = []
    for name in arch:
        width = arch_config(name)["vision_cfg"].get("width", 768)
        size = batch or (256 if width < 512 else 8)
        rows += run_bench([name], size, steps, repeats,
                          progress=lambda r: print(f"{r['arch']} {r['setting']}: {r['samples_per_s']:.1f} samples/s", flush=True))
    table = Table("arch", "setting", "img tok", "txt tok", "GFLOPs/sample", "samples/s", "speedup", "FLOP ratio",
                  "efficiency", "eff. range", "text select", title="clipa bench: training step forward + backward, fp32")
    for r in rows:
        table.add_row(r["arch"], r["setting"], str(r["image_tokens"]), str(r["text_tokens"]),
                      f"{r['flops_per_sample'] / 1e9:.2f}", f"{r['samples_per_s']:.1f}", f"{r['speedup']:.2f}x",
                      f"{r['flop_ratio']:.2f}x", f"{r['efficiency']:.2f}",
                      "{:.2f}-{:.2f}".format(*r["efficiency_range"]), f"{100 * r['text_select_frac']:.1f}%")
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
    from clipa.train.metrics import progress_counter

    total = num_samples + eval_per_class * len(CLASSNAMES)
    with progress_counter("writing", total) as advance:
        info = write_synthetic(out_dir, num_samples, shard_size, image_size, eval_per_class, seed, progress=advance)
    out.print(f"wrote {info['samples']} training pairs in {info['shards']} shards: data.train = \"{info['train']}\"\n"
              f"wrote {info['eval_images']} zero-shot images: --dataset imagefolder --data-root {info['eval']}",
              highlight=False)


@data_app.command("inspect")
@user_errors
def data_inspect(path: str = typer.Argument(..., metavar="PATH",
                                            help='Shards ("/data/{00000..00099}.tar"), a .csv/.tsv, "synthetic", '
                                                 'or any data.train string.'),
                 max_samples: int = typer.Option(0, "--max-samples", help="Stop each source after this many good "
                                                 "samples (0 = read everything; synthetic: 256)."),
                 sheet: Path = typer.Option(Path("contact_sheet.png"), "--sheet", help="PNG contact sheet to write."),
                 sheet_count: int = typer.Option(16, "--sheet-count", help="Images on the sheet (0 = no sheet)."),
                 caption_key: str = typer.Option("txt", "--caption-key", help='Shard caption: "txt" or "json:FIELD".'),
                 csv_image_key: str = typer.Option("filepath", "--csv-image-key"),
                 csv_caption_key: str = typer.Option("title", "--csv-caption-key"),
                 csv_separator: str = typer.Option("", "--csv-separator", help='"" = tab for .tsv, comma otherwise.'),
                 ) -> None:
    """Sample count, caption lengths, corrupt samples and a contact sheet of a dataset."""
    from clipa.data.inspect import inspect_dataset, summary_rows
    from clipa.data.sources import ReadOptions

    if max_samples < 0 or sheet_count < 0:
        raise ClipaError("--max-samples and --sheet-count: must be >= 0")
    options = ReadOptions(caption_key, csv_image_key, csv_caption_key, csv_separator)
    summary = inspect_dataset(path, options, max_samples, sheet if sheet_count else None, sheet_count)
    table = Table(show_header=False, title=f"clipa data inspect {path}")
    for label, value in summary_rows(summary):
        table.add_row(label, value)
    out.print(table)


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
    from clipa.distributed import leave_process_group

    try:
        app()
    except SystemExit as done:
        leave_process_group(wait_for_others=done.code in (0, None))
        raise
    except BaseException:
        leave_process_group(wait_for_others=False)
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
