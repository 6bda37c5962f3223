"""`clipa plan`, `scaling fit`, `report` and `bench`: cost before a run, results after it."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from clipa.cli.render import bench_table, out, plan_table, scaling_summary, scaling_table, user_errors
from clipa.errors import ClipaError


@user_errors
def plan(recipes: List[str] = typer.Argument(..., metavar="RECIPE...", help="Recipe paths or shipped names, in pipeline order."),
         as_json: bool = typer.Option(False, "--json", help="Print {\"stages\": [...], \"total\": {...}} as JSON."),
         gpu: str = typer.Option("A100", "--gpu", help="Accelerator name (A100, H100, H200, L4, L40S, TPU v5e, ...; "
                                 "see clipa.cost.accelerators.PEAK_TFLOPS_BF16)."),
         gpus: int = typer.Option(8, "--gpus", help="Accelerators working in parallel (wall hours = GPU-hours / N)."),
         mfu: float = typer.Option(0.27, "--mfu", help="Expected model-FLOPs utilisation; 0.27 is what CLIPA-v2's "
                                   "published H/14 A100-hours imply (docs/plan.md)."),
         price: float = typer.Option(1.576, "--price", help="Dollars per accelerator-hour (1.576: the A100 price "
                                     "implied by the CLIPA-v2 README)."),
         peak_tflops: Optional[float] = typer.Option(None, "--peak-tflops", help="Dense bf16 peak TFLOP/s of an "
                                                     "accelerator not in the table.")) -> None:
    """FLOPs, accelerator-hours and dollars of each stage and of the pipeline, before you spend them."""
    import json

    from clipa.analysis.plan import plan as make_plan

    result = make_plan(recipes, gpu=gpu, gpus=gpus, mfu=mfu, price=price, peak_tflops=peak_tflops)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        out.print(plan_table(result))
        for stage in result["stages"]:
            for note in stage["notes"]:
                out.print(f"note: {stage['name']}: {note}", highlight=False, markup=False)


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
    from clipa.analysis.fit import fit_power_law
    from clipa.analysis.plot import plot_fit
    from clipa.analysis.points import load_points

    if target_compute is not None and target_compute <= 0:
        raise ClipaError(f"--target-compute: must be > 0 FLOPs, got {target_compute:g}")
    points = load_points(inputs, metric, dataset)
    fit = fit_power_law([p.compute for p in points], [p.error for p in points], offset=offset)
    target = target_compute or 10 * max(p.compute for p in points)
    out.print(scaling_table(points, fit, metric))
    for p in points:
        for note in p.notes:
            out.print(f"  {p.label}: {note}", highlight=False)
    out.print(scaling_summary(points, fit, target, metric), highlight=False)
    out.print(f"wrote {plot_fit(points, fit, plot, target, metric)}", highlight=False)


@user_errors
def report(run_dir: Path = typer.Argument(..., help="A clipa run directory."),
           out_dir: Optional[Path] = typer.Option(None, "--out", help="Where the PNGs go (default RUN_DIR/report).")) -> None:
    """PNG plots (loss, lr, logit scale, throughput, evaluations vs samples seen) and a text summary."""
    from clipa.analysis.report import report as make_report

    summary, written = make_report(run_dir, out_dir)
    out.print(summary, highlight=False)
    out.print(f"wrote {len(written)} plots to {written[0].parent if written else out_dir}", highlight=False)


@user_errors
def bench(arch: List[str] = typer.Option(["clipa-tiny", "ViT-B-16"], "--arch", help="Architectures to measure."),
          batch: int = typer.Option(0, "--batch", help="Samples per step; 0 = 256 for small models (amortises per-step "
                                    "costs), 8 for ViT-B and up."),
          steps: int = typer.Option(3, "--steps", help="Measured steps per setting (after one warm-up step)."),
          repeats: int = typer.Option(1, "--repeats", help="Measure all settings this many times, round-robin; report medians."),
          output: Optional[Path] = typer.Option(None, "--output", help="Also write the rows as JSON.")) -> None:
    """Measured training throughput of token-reduction settings vs the analytic FLOP ratio."""
    import json

    from clipa.model.build import arch_config
    from clipa.train.bench import run_bench

    if steps < 1 or repeats < 1:
        raise ClipaError(f"--steps and --repeats: must be >= 1, got --steps {steps} --repeats {repeats}")
    rows = []
    for name in arch:
        width = arch_config(name)["vision_cfg"].get("width", 768)
        size = batch or (256 if width < 512 else 8)
        rows += run_bench([name], size, steps, repeats,
                          progress=lambda r: print(f"{r['arch']} {r['setting']}: {r['samples_per_s']:.1f} samples/s", flush=True))
    out.print(bench_table(rows))
    if output:
        output.write_text(json.dumps(rows, indent=2) + "\n")
