"""Everything the `clipa` command prints: the two consoles, the one-line error, and every table.

Commands parse their arguments, call the core and hand its results here; nothing else in clipa/cli
builds a table.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from clipa.errors import ClipaError, printable

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
            # Control characters from a recipe value are shown escaped, never sent to the terminal.
            message = printable(" ".join(str(e).split()))
            err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def line(text: str) -> None:
    """A plain line: neither rich markup nor highlighting (it may hold paths and recipe values)."""
    out.print(text, highlight=False, markup=False, soft_wrap=True)


# --------------------------------------------------------------------------- training


def dry_run_table(recipe, stage: str, numbers, native, full_flops: float, start: str, out_dir: Path,
                  data_commands: list[str], trackers: str) -> Table:
    from clipa.model.tower_cfg import tower_summary

    geometry, flops, steps = numbers.geometry, numbers.flops_per_sample, numbers.steps
    batch = recipe.train.global_batch_size
    table = Table(title=f"clipa {stage} {recipe.name} (dry run: nothing is trained)", show_header=False)
    rows = [
        ("model", f"{recipe.model.arch} at {geometry.image_size}px (native {native.image_size}), "
                  f"{geometry.context_length} text tokens (native {native.context_length})"),
        ("image tokens", f"{numbers.image_tokens} per sample ({recipe.reduction.image}"
                         f"{f', mask ratio {recipe.reduction.mask_ratio:g}' if recipe.reduction.mask_ratio else ''})"),
        ("text", f"{geometry.context_length} tokens per caption ({recipe.reduction.text})"),
        ("towers", tower_summary(numbers.model_cfg)),
        ("train FLOPs", f"{flops:.3g} per sample, {flops / full_flops:.2f}x of full length; "
                        f"{flops * steps * batch:.3g} in total"),
        ("data", recipe.data.train),
        *(("runs", command) for command in data_commands),
        ("steps", f"{steps} x {batch} samples = {steps * batch:,}"),
        ("optimizer", f"AdamW lr {recipe.optim.lr:g}, warmup {recipe.optim.warmup_steps}, {recipe.optim.schedule}, "
                      f"wd {recipe.optim.weight_decay:g}, betas {tuple(recipe.optim.betas)}"),
        ("start", start),
        ("run directory", str(out_dir)),
        ("trackers", trackers),
    ]
    for key, value in rows:
        table.add_row(key, Text(value))  # recipe values are shown as written, never read as rich markup
    return table


def quickstart_table(rows: list[dict]) -> Table:
    full = rows[-1]["full_size"]
    table = Table("stage", "image px", "text tokens", "samples", "final loss", "zero-shot acc1", "acc5",
                  f"acc1 at {full} px", "chance", "samples/s", "wall time",
                  title="clipa quickstart (synthetic data, 24 classes)")
    for r in rows:
        table.add_row(r["stage"], str(r["image_size"]), str(r["text_length"]), f"{r['samples']:,}",
                      f"{r['loss']:.3f}", f"{r['acc1']:.3f}", f"{r['acc5']:.3f}", f"{r['acc1_full']:.3f}", f"{r['chance']:.3f}",
                      f"{r['samples_per_s']:.0f}", f"{r['wall_s']:.0f} s")
    return table


# --------------------------------------------------------------------------- recipes and weights


def recipes_table(recipes: dict[str, str]) -> Table:
    table = Table("recipe", "about")
    for name, about in recipes.items():
        table.add_row(name, about)
    return table


def runs_table(runs, root: Path) -> Table:
    table = Table("run", "stage", "recipe", "parent (init.checkpoint)", "steps", "finished", "zero-shot acc1",
                  title=f"runs under {root}/, oldest first")
    for run in runs:
        zeroshot = ", ".join(f"{name} {acc1:.4f}" for name, acc1 in run.zeroshot.items())
        table.add_row(escape(str(run.path)), run.stage, escape(run.name), escape(run.parent or "-"),
                      f"{run.steps_done}/{run.total_steps}", "yes" if run.finished else "no", escape(zeroshot or "-"))
    return table


def models_table(rows: list[dict], filter_text: str | None, timm_models: bool) -> Table:
    table = Table("name (ARCH:TAG)" if not timm_models else "name (model.image_init)", "Hugging Face repository",
                  "cached", title=f"published weights{f' matching {filter_text!r}' if filter_text else ''}")
    for r in rows:
        table.add_row(r["name"], r["hf_hub"] or "-", "yes" if r["cached"] else "-")
    return table


# --------------------------------------------------------------------------- evaluation


def model_label(result: dict) -> str:
    """The weights a result is for: their file or folder, hf-hub:ORG/NAME, or ARCH:TAG (a result names a published
    tag as CLIP_benchmark does, model ARCH and pretrained TAG)."""
    pretrained = result["pretrained"]
    if ":" in pretrained or "/" in pretrained or Path(pretrained).exists():
        return pretrained
    return f"{result['model']}:{pretrained}"


def zeroshot_table(results: list[dict]) -> Table:
    table = Table("dataset", "model", "acc1", "acc5", "mean per-class recall", "chance", "images", "skipped",
                  "images/s", title="zero-shot classification")
    for r in results:
        m = r["metrics"]
        table.add_row(r["dataset"], model_label(r), f"{m['acc1']:.4f}", f"{m['acc5']:.4f}",
                      f"{m['mean_per_class_recall']:.4f}", f"{r['chance']:.4f}", str(m["num_samples"]),
                      str(m["skipped_images"]), f"{m['images_per_s']:.0f}" if m.get("images_per_s") else "-")
    return table


def retrieval_table(dataset: str, m: dict) -> Table:
    table = Table("direction", "R@1", "R@5", "R@10", title=f"retrieval on {dataset}: {m['num_images']} images, "
                                                           f"{m['num_texts']} captions")
    for direction, key in (("text -> image", "image_retrieval"), ("image -> text", "text_retrieval")):
        table.add_row(direction, *(f"{m[f'{key}_recall@{k}']:.4f}" for k in (1, 5, 10)))
    return table


# --------------------------------------------------------------------------- data


def inspect_table(path: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(show_header=False, title=f"clipa data inspect {path}")
    for label, value in rows:
        table.add_row(label, value)
    return table


# --------------------------------------------------------------------------- tools


def _count(x: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:g}"


def plan_table(result: dict) -> Table:
    """A plan, one row per stage and a total."""
    first = result["stages"][0]
    title = (f"clipa plan: {first['gpus']} x {first['gpu']} ({first['peak_tflops']:g} TFLOP/s bf16 peak) at "
             f"MFU {first['mfu']:g}, ${first['price_per_gpu_hour']:g} per accelerator-hour")
    t = Table("stage", "model", "img tok", "txt tok", "GFLOPs/sample (img+txt)", "samples", "FLOPs", "GPU-hours",
              "wall hours", "cost", title=title)
    for s in result["stages"]:
        mask = f", mask {s['mask_ratio']:g}" if s["mask_ratio"] else ""
        t.add_row(s["name"], f"{s['arch']} @ {s['image_size']}px{mask}", str(s["image_tokens"]), str(s["text_tokens"]),
                  f"{s['flops_per_sample'] / 1e9:.1f} ({s['image_flops_per_sample'] / 1e9:.1f}+"
                  f"{s['text_flops_per_sample'] / 1e9:.1f})",
                  _count(s["samples"]), f"{s['total_flops']:.3g}", f"{s['gpu_hours']:,.0f}", f"{s['wall_hours']:,.1f}",
                  f"${s['cost']:,.0f}")
    tot = result["total"]
    t.add_row("total", "", "", "", "", _count(sum(s["samples"] for s in result["stages"])), f"{tot['total_flops']:.3g}",
              f"{tot['gpu_hours']:,.0f}", f"{tot['gpu_hours'] / first['gpus']:,.1f}", f"${tot['cost']:,.0f}",
              style="bold")
    return t


def bench_table(rows: list[dict]) -> Table:
    table = Table("arch", "setting", "img tok", "txt tok", "GFLOPs/sample", "samples/s", "speedup", "FLOP ratio",
                  "efficiency", "eff. range", "text select", title="clipa bench: training step forward + backward, fp32")
    for r in rows:
        table.add_row(r["arch"], r["setting"], str(r["image_tokens"]), str(r["text_tokens"]),
                      f"{r['flops_per_sample'] / 1e9:.2f}", f"{r['samples_per_s']:.1f}", f"{r['speedup']:.2f}x",
                      f"{r['flop_ratio']:.2f}x", f"{r['efficiency']:.2f}",
                      "{:.2f}-{:.2f}".format(*r["efficiency_range"]), f"{100 * r['text_select_frac']:.1f}%")
    return table


def scaling_table(points, fit, metric: str) -> Table:
    table = Table("point", "compute (FLOPs)", f"error (1 - {metric})", "fitted", title="scaling fit")
    for p in points:
        table.add_row(p.label, f"{p.compute:.3g}", f"{p.error:.4f}", f"{fit.predict(p.compute)[0]:.4f}")
    return table


def scaling_summary(points, fit, target: float, metric: str) -> str:
    """The fitted law, its 95% intervals and the extrapolation to `target` FLOPs."""
    lines = [fit.formula() + f"   (n = {fit.n}, residual sd of log error {fit.rmse_log:.3g})",
             f"alpha = {fit.alpha:.4g}  95% CI [{fit.alpha_ci[0]:.4g}, {fit.alpha_ci[1]:.4g}]",
             f"beta  = {fit.beta:.4g}  95% CI [{fit.beta_ci[0]:.4g}, {fit.beta_ci[1]:.4g}]"]
    if fit.e is not None:
        lines.append(f"e     = {fit.e:.4g}  95% CI [{fit.e_ci[0]:.4g}, {fit.e_ci[1]:.4g}]")
    mean, low, high = fit.predict(target)
    lines.append(f"at C = {target:.3g} FLOPs ({target / max(p.compute for p in points):.3g}x the largest point): "
                 f"error {mean:.4f} [{low:.4f}, {high:.4f}], {metric} {1 - mean:.4f} [{1 - high:.4f}, {1 - low:.4f}]")
    return "\n".join(lines)
