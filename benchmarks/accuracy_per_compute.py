"""Accuracy for a fixed training-FLOP budget: full-token training only vs CLIPA, at two model sizes.

    python benchmarks/accuracy_per_compute.py [--budget-tflops 12] [--arch clipa-tiny --arch clipa-small]
                                              [--out runs/accuracy-per-compute]

Per architecture, the same budget of analytic training FLOPs (clipa.cost.flops, the counter behind
`clipa plan` and the logged MFU) is spent two ways on the built-in synthetic data:

  full   one stage at the native 64 px / 32 tokens;
  clipa  low-token pretraining at 32 px / 8 tokens (16 patches instead of 64) for
         `1 - finetune_share` of the budget, then a finetune at 64 px / 32 tokens with 30% of the
         patches dropped (CLIPA-v2's finetune masking) for the rest, as in recipes/tiny.

Both use recipes/tiny's optimiser settings (batch 256, lr 2e-3, warmup scaled to the run).
Each result is zero-shot acc1 on the held-out 24-class set at 64 px, with the FLOPs actually
spent and the wall time of the training stages on this machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from clipa.cost.flops import train_flops_per_sample
from clipa.evaluate.models import load_model
from clipa.evaluate.zeroshot import zeroshot
from clipa.model.build import arch_config
from clipa.recipe.index import resolve_path
from clipa.recipe.load import load_recipe
from clipa.train.trainer import train

BATCH = 256
# (image px, text tokens, fraction of patches kept) of each stage
FULL = (64, 32, 1.0)
LOW = (32, 8, 1.0)
FINETUNE = (64, 32, 0.7)


def _samples(flops: float, per_sample: float) -> int:
    return max(BATCH, int(flops / per_sample) // BATCH * BATCH)


def _stage(arch: str, stage: str, geometry: tuple, samples: int, out: Path, init: str = "") -> tuple[float, float]:
    """Train one stage; returns (FLOPs spent, wall seconds)."""
    size, length, keep = geometry
    recipe_name = "tiny/finetune" if stage == "finetune" else "tiny/pretrain"
    steps = samples // BATCH
    overrides = [f"model.arch={arch}", f"train.global_batch_size={BATCH}", f"train.total_samples={samples}",
                 f"reduction.image={'random' if keep < 1 else 'resize'}", f"reduction.image_size={size}",
                 f"reduction.mask_ratio={round(1 - keep, 4)}", f"reduction.text_length={length}", "optim.lr=2e-3",
                 f"optim.warmup_steps={min(50, steps // 5)}", f"train.log_every_steps={max(1, steps // 10)}",
                 "checkpoint.every_steps=0", f"init.checkpoint={init}"]
    recipe = load_recipe(resolve_path(recipe_name), overrides)
    start = time.perf_counter()
    train(recipe, stage, out)
    wall = time.perf_counter() - start
    return samples * train_flops_per_sample(arch_config(arch), size, length, keep), wall


def run(arch: str, budget: float, finetune_share: float, out: Path) -> list[dict]:
    cfg = arch_config(arch)
    rows = []
    full_samples = _samples(budget, train_flops_per_sample(cfg, *FULL))
    flops, wall = _stage(arch, "pretrain", FULL, full_samples, out / arch / "full")
    rows.append({"arch": arch, "method": "full tokens", "stages": f"{full_samples:,} @ 64px/32tok",
                 "flops": flops, "wall_s": wall, "run": str(out / arch / "full")})

    ft_samples = _samples(budget * finetune_share, train_flops_per_sample(cfg, *FINETUNE))
    pre_budget = budget - ft_samples * train_flops_per_sample(cfg, *FINETUNE)
    pre_samples = _samples(pre_budget, train_flops_per_sample(cfg, *LOW))
    pre_flops, pre_wall = _stage(arch, "pretrain", LOW, pre_samples, out / arch / "clipa-pretrain")
    ft_flops, ft_wall = _stage(arch, "finetune", FINETUNE, ft_samples, out / arch / "clipa-finetune",
                               init=str(out / arch / "clipa-pretrain"))
    rows.append({"arch": arch, "method": "CLIPA", "stages": f"{pre_samples:,} @ 32px/8tok + {ft_samples:,} @ "
                 "64px/32tok mask 0.3", "flops": pre_flops + ft_flops, "wall_s": pre_wall + ft_wall,
                 "run": str(out / arch / "clipa-finetune")})
    for row in rows:
        metrics = zeroshot(load_model(row["run"]), "synthetic")["metrics"]
        row.update(acc1=metrics["acc1"], acc5=metrics["acc5"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", action="append", help="architectures (default: clipa-tiny and clipa-small)")
    parser.add_argument("--budget-tflops", type=float, default=12.0, help="training FLOPs per method and model")
    parser.add_argument("--finetune-share", type=float, default=0.2, help="CLIPA: share of the budget for finetuning")
    parser.add_argument("--out", default="runs/accuracy-per-compute")
    args = parser.parse_args()
    out = Path(args.out)
    rows = []
    for arch in args.arch or ["clipa-tiny", "clipa-small"]:
        rows += run(arch, args.budget_tflops * 1e12, args.finetune_share, out)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"budget {args.budget_tflops:g} TFLOPs per method and model; zero-shot on the held-out synthetic set")
    print("| arch | method | samples | training TFLOPs | wall time | zero-shot acc1 | acc5 |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['method']} | {r['stages']} | {r['flops'] / 1e12:.1f} | {r['wall_s']:.0f} s | "
              f"{r['acc1']:.3f} | {r['acc5']:.3f} |")


if __name__ == "__main__":
    main()
