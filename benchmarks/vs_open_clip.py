"""clipa vs open_clip_train: same shards, architecture, batch, precision and steps, measured in one run.

    python benchmarks/vs_open_clip.py [--arch clipa-tiny --arch ViT-B-16] [--repeats 3] [--out FILE.json]

For each architecture and token setting (full tokens; CLIPA's half resolution + short text; 50%
patch dropout) this runs, round-robin, `--repeats` times:

  bare        a plain open_clip model (same forced size / patch dropout / context length) doing
              forward + ClipLoss + backward + AdamW on random tensors already in memory: the cost
              of the model alone, with no data loading, no logging, nothing else;
  open_clip   `python -m open_clip_train.main` on webdataset shards written by `clipa data synth`;
  clipa       `clipa pretrain` on the same shards with the same settings.

Throughput is the steady state of each training run: the wall time between the end of step
`--warmup` and the last step (so start-up, model creation and the first, slow steps are not
counted), data loading, loss and logging included. `model-only` subtracts the time the step
waited for data. Ratios (clipa / open_clip_train, clipa / bare) are taken within a repeat and the
median over repeats is reported. MFU is against this machine's fp32 matmul peak, which the
benchmark measures first (the best of several large square matmuls).

open_clip_train needs one workaround here: it does not know clipa's bundled `clipa-tiny`
architecture, so it is started through a two-line wrapper that registers the architecture's JSON
config with `open_clip.add_model_config` and then calls `open_clip_train.main.main` unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from clipa.cost.accelerators import measure_matmul_peak
from clipa.cost.flops import train_flops_per_sample
from clipa.model.build import arch_config, native_geometry

MODEL_CONFIGS = Path(__file__).resolve().parent.parent / "clipa" / "model_configs"
OPEN_CLIP_WRAPPER = (
    "import sys, open_clip; open_clip.add_model_config(sys.argv.pop(1)); "
    "from open_clip_train.main import main; main(sys.argv[1:])"
)
# Same optimisation settings for both tools (open_clip_train's flags in brackets).
LR, WD, EPS, BETAS, WARMUP = 5e-4, 0.2, 1e-6, (0.9, 0.95), 2


@dataclass(frozen=True)
class Setting:
    label: str
    image_size: int
    text_length: int
    patch_dropout: float = 0.0


@dataclass(frozen=True)
class ArchPlan:
    arch: str
    batch: int
    steps: int
    warmup: int  # steps excluded from the steady state
    shard_image_size: int
    settings: tuple[Setting, ...]


def plans(arch: str, batch: int = 0, steps: int = 0) -> ArchPlan:
    native = native_geometry(arch_config(arch))
    size, ctx = native.image_size, native.context_length
    patch = arch_config(arch)["vision_cfg"]["patch_size"]
    half = max(patch, size // 2 // patch * patch)
    short = 32 if ctx > 32 else 16
    settings = (Setting(f"full {size}px / {ctx} tok", size, ctx),
                Setting(f"{half}px / {short} tok", half, short),
                Setting(f"{size}px, patch dropout 0.5", size, ctx, 0.5))
    small = arch_config(arch)["vision_cfg"].get("width", 768) < 512
    return ArchPlan(arch, batch or (128 if small else 8), steps or (24 if small else 7), 4 if small else 2,
                    size, settings)


def bare_step(arch: str, setting: Setting, batch: int, steps: int) -> float:
    """Seconds per forward + loss + backward + AdamW step of a plain open_clip model, inputs in memory."""
    import open_clip
    from open_clip.loss import ClipLoss

    torch.manual_seed(0)
    model = open_clip.create_model(arch, force_image_size=setting.image_size,
                                   force_patch_dropout=setting.patch_dropout or None,
                                   force_context_length=setting.text_length, output_dict=True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    loss_fn = ClipLoss()
    images = torch.randn(batch, 3, setting.image_size, setting.image_size)
    texts = torch.randint(1, 49_000, (batch, setting.text_length))
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        out = model(images, texts)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _steady(step_times: list[float], wait_times: list[float], warmup: int, batch: int) -> dict:
    """Samples/s over the steps after `warmup`, and the same with the data wait removed."""
    total, wait = sum(step_times[warmup:]), sum(wait_times[warmup:])
    n = len(step_times) - warmup
    if n < 1:
        raise RuntimeError(f"only {len(step_times)} steps were logged; need more than the {warmup} warm-up steps")
    return {"samples_per_s": n * batch / total, "model_samples_per_s": n * batch / (total - wait),
            "data_wait_frac": wait / total, "steps_measured": n}


LOG_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+ .*?Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+), ([\d.e+]+)/s")


def run_open_clip(plan: ArchPlan, setting: Setting, shards: str, num_samples: int, workdir: Path) -> dict:
    name = f"oc-{int(time.time() * 1000)}"
    cmd = [sys.executable, "-c", OPEN_CLIP_WRAPPER, str(MODEL_CONFIGS),
           "--train-data", shards, "--train-num-samples", str(num_samples), "--dataset-type", "webdataset",
           "--model", plan.arch, "--batch-size", str(plan.batch), "--epochs", "1", "--precision", "fp32",
           "--workers", "1", "--lr", str(LR), "--wd", str(WD), "--eps", str(EPS), "--beta1", str(BETAS[0]),
           "--beta2", str(BETAS[1]), "--warmup", str(WARMUP), "--log-every-n-steps", "1", "--save-frequency", "0",
           "--logs", str(workdir), "--name", name, "--report-to", "", "--seed", "0",
           "--force-image-size", str(setting.image_size), "--force-context-length", str(setting.text_length)]
    if setting.patch_dropout:
        cmd += ["--force-patch-dropout", str(setting.patch_dropout)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    shutil.rmtree(workdir / name, ignore_errors=True)  # its checkpoint: 1.7 GB for ViT-B-16
    lines = LOG_LINE.findall(result.stdout + result.stderr)
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"open_clip_train failed ({result.returncode}):\n{result.stderr[-3000:]}")
    # With --log-every-n-steps 1 open_clip_train resets its meters after every line, so each line's
    # "Data (t)" and "Batch (t)" are that step's own times.
    data_times = [float(data) for _, data, _, _ in lines]
    step_times = [float(batch) for _, _, batch, _ in lines]
    return _steady(step_times, data_times, plan.warmup, plan.batch)


def run_clipa(plan: ArchPlan, setting: Setting, shards: str, workdir: Path, compile: bool = False) -> dict:
    recipe = workdir / f"clipa-{int(time.time() * 1000)}.toml"
    # open_clip_train random-resized-crops every image to the model's size; so does clipa's "resize".
    image = "random" if setting.patch_dropout else "resize"
    recipe.write_text(f"""
name = "vs-open-clip"
[model]
arch = "{plan.arch}"
[data]
train = "{shards}"
num_workers = 1
crop_scale = [0.9, 1.0]  # open_clip_train's RandomResizedCrop scale
[reduction]
image = "{image}"
image_size = {setting.image_size}
mask_ratio = {setting.patch_dropout}
text = "truncate"
text_length = {setting.text_length}
[optim]
lr = {LR}
warmup_steps = {WARMUP}
weight_decay = {WD}
eps = {EPS}
betas = [{BETAS[0]}, {BETAS[1]}]
[train]
global_batch_size = {plan.batch}
total_samples = {plan.batch * plan.steps}
precision = "fp32"
log_every_steps = 1
compile = {str(compile).lower()}
[checkpoint]
every_steps = 0
keep_last = 1
""")
    out = workdir / recipe.stem
    result = subprocess.run([sys.executable, "-m", "clipa", "pretrain", str(recipe), "--out", str(out)],
                            capture_output=True, text=True, env=_env())
    if result.returncode != 0:
        raise RuntimeError(f"clipa failed ({result.returncode}):\n{result.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "samples_per_s" in r]
    shutil.rmtree(out)  # checkpoint and export: 1.7 GB for ViT-B-16
    recipe.unlink()
    step_times = [plan.batch / r["samples_per_s"] for r in rows]
    wait_times = [t * r["data_wait_frac"] for t, r in zip(step_times, rows)]
    return _steady(step_times, wait_times, plan.warmup, plan.batch)


def _env() -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1")


def write_shards(root: Path, image_size: int, num_samples: int) -> str:
    """Synthetic pairs as webdataset shards (8 shards, so both tools' workers each get some)."""
    from clipa.data.shards import write_synthetic

    return write_synthetic(root / f"shards-{image_size}px", num_samples, max(16, num_samples // 8), image_size,
                           eval_per_class=1, seed=0)["train"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", help="architectures (default: clipa-tiny and ViT-B-16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=0, help="0 = 128 for clipa-tiny, 8 for ViT-B-16")
    parser.add_argument("--steps", type=int, default=0, help="steps per training run (0 = 24 tiny, 7 ViT-B-16)")
    parser.add_argument("--compile", action="store_true",
                        help="also run clipa with train.compile=true (compilation falls in the warm-up steps)")
    parser.add_argument("--workdir", default="", help="where shards and runs go (default: a temporary folder)")
    parser.add_argument("--out", default="", help="also write every measurement as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="clipa-vs-open-clip-"))
    workdir.mkdir(parents=True, exist_ok=True)

    peak = measure_matmul_peak()
    print(f"measured fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads)", flush=True)
    results = []
    for arch in args.arch or ["clipa-tiny", "ViT-B-16"]:
        plan = plans(arch, args.batch, args.steps)
        num_samples = plan.batch * plan.steps
        shards = write_shards(workdir, plan.shard_image_size, max(num_samples * 2, 512))
        cfg = arch_config(arch)
        for repeat in range(args.repeats):
            for setting in plan.settings:
                keep = 1.0 - setting.patch_dropout
                flops = train_flops_per_sample(cfg, setting.image_size, setting.text_length, keep)
                bare_s = bare_step(arch, setting, plan.batch, max(2, plan.steps // 3))
                oc = run_open_clip(plan, setting, shards, num_samples, workdir)
                ours = run_clipa(plan, setting, shards, workdir)
                row = {"arch": arch, "setting": setting.label, "repeat": repeat, "batch": plan.batch,
                       "flops_per_sample": flops, "peak_flops": peak,
                       "bare_samples_per_s": plan.batch / bare_s, "open_clip": oc, "clipa": ours}
                compiled = ""
                if args.compile:
                    row["clipa_compiled"] = run_clipa(plan, setting, shards, workdir, compile=True)
                    compiled = f", clipa compiled {row['clipa_compiled']['samples_per_s']:.1f}"
                results.append(row)
                if args.out:  # after every row: a failure later keeps what was measured
                    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
                print(f"[{repeat + 1}/{args.repeats}] {arch} {setting.label}: bare {plan.batch / bare_s:.1f}, "
                      f"open_clip_train {oc['samples_per_s']:.1f}, clipa {ours['samples_per_s']:.1f}{compiled} "
                      "samples/s", flush=True)
    print_summary(results)


def print_summary(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("arch", "setting", "batch", "open_clip_train samples/s", "clipa samples/s", "clipa ÷ open_clip",
                  "model-only ÷", "clipa ÷ bare step", "MFU bare", "MFU open_clip", "MFU clipa", "clipa data wait",
                  "compiled ÷ open_clip",
                  title=f"clipa vs open_clip_train, fp32, median of {max(r['repeat'] for r in results) + 1} repeats")
    keys = list(dict.fromkeys((r["arch"], r["setting"]) for r in results))
    for arch, label in keys:
        rows = [r for r in results if (r["arch"], r["setting"]) == (arch, label)]

        def med(fn):
            return statistics.median(fn(r) for r in rows)

        def mfu(samples_per_s_of):
            return med(lambda r: samples_per_s_of(r) * r["flops_per_sample"] / r["peak_flops"])

        table.add_row(
            arch, label, str(rows[0]["batch"]),
            f"{med(lambda r: r['open_clip']['samples_per_s']):.1f}", f"{med(lambda r: r['clipa']['samples_per_s']):.1f}",
            f"{med(lambda r: r['clipa']['samples_per_s'] / r['open_clip']['samples_per_s']):.2f}",
            f"{med(lambda r: r['clipa']['model_samples_per_s'] / r['open_clip']['model_samples_per_s']):.2f}",
            f"{med(lambda r: r['clipa']['samples_per_s'] / r['bare_samples_per_s']):.2f}",
            f"{100 * mfu(lambda r: r['bare_samples_per_s']):.0f}%",
            f"{100 * mfu(lambda r: r['open_clip']['samples_per_s']):.0f}%",
            f"{100 * mfu(lambda r: r['clipa']['samples_per_s']):.0f}%",
            f"{100 * med(lambda r: r['clipa']['data_wait_frac']):.1f}%",
            f"{med(lambda r: r['clipa_compiled']['samples_per_s'] / r['open_clip']['samples_per_s']):.2f}"
            if "clipa_compiled" in rows[0] else "-")
    Console(width=240).print(table)


if __name__ == "__main__":
    main()
