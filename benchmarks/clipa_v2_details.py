"""CLIPA-v2's training details at small scale: sin-cos vs learned position embeddings, and its
colour augmentations, across the resolution change from pretraining to finetuning.

    python benchmarks/clipa_v2_details.py [--seeds 2] [--pretrain-samples 24000] [--out runs/v2-details]

Each variant pretrains the tiny recipe at 32 px / 8 tokens (a 4x4 patch grid) and finetunes it at
64 px / 32 tokens (8x8, 30% of the patches dropped) on the synthetic scenes, as the shipped tiny
pipeline does. Zero-shot acc1 on the held-out scenes is measured three times: after pretraining at
its own 32 px, after pretraining at 64 px (no finetune: what the position embeddings carry across
the grid change, CLIPA's "inverse scaling" premise at 2x resolution), and after the finetune at 64 px.

  learned      open_clip's learned embedding, interpolated bicubically 4x4 -> 8x8 between stages
  sincos2d     CLIPA-v2's fixed 2-D sin-cos grid, recomputed for each grid (nothing interpolated)
  + jitter     CLIPA-v2's H/g/G augmentation: colour jitter 0.32/0.32/0.32/0.08 at p 0.8, gray p 0.2

Synthetic scenes decide nothing about defaults (docs/openclipart.md); what this measures is whether
the mechanism behaves as the paper says at a resolution change, on data where colour is a class cue
(so jitter is expected to cost accuracy here, as it can on real data with colour words in captions).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from clipa.evaluate.models import load_model
from clipa.evaluate.zeroshot import zeroshot
from clipa.recipe.index import resolve_path
from clipa.recipe.load import load_recipe
from clipa.train.trainer import train

JITTER = ["data.augment.color_jitter=[0.32, 0.32, 0.32, 0.08]", "data.augment.color_jitter_prob=0.8",
          "data.augment.gray_scale_prob=0.2"]
VARIANTS = {
    "learned": ["model.pos_embed=\"learned\""],
    "sincos2d": ["model.pos_embed=\"sincos2d\""],
    "learned + jitter": ["model.pos_embed=\"learned\"", *JITTER],
    "sincos2d + jitter": ["model.pos_embed=\"sincos2d\"", *JITTER],
}
COMMON = ["checkpoint.every_steps=0", "train.log_every_steps=20"]
# the first stage at 32 px, as tiny/pretrain was when this was measured (it masks at 64 px since issue #33)
RESIZE_32 = ["reduction.image=resize", "reduction.image_size=32", "reduction.mask_ratio=0"]


def acc1(run_dir: Path, image_size: int | None = None) -> float:
    return zeroshot(load_model(str(run_dir), image_size=image_size), "synthetic")["metrics"]["acc1"]


def run_variant(label: str, extra: list[str], seed: int, pretrain_samples: int, out: Path) -> dict:
    where = out / f"{label.replace(' + ', '-')}-seed{seed}"
    pretrain = load_recipe(resolve_path("tiny/pretrain"), [*COMMON, *RESIZE_32, *extra, f"train.seed={seed}",
                                                           f"train.total_samples={pretrain_samples}"])
    pre = train(pretrain, "pretrain", where / "pretrain")
    finetune = load_recipe(resolve_path("tiny/finetune"), [*COMMON, *extra, f"train.seed={seed + 100}",
                                                           f"init.checkpoint=\"{pre.run_dir}\""])
    fin = train(finetune, "finetune", where / "finetune")
    return {"label": label, "seed": seed, "pretrain_acc1": acc1(pre.run_dir),
            "pretrain_acc1_at_64px": acc1(pre.run_dir, image_size=64), "finetune_acc1": acc1(fin.run_dir),
            "pretrain_loss": pre.final_loss, "finetune_loss": fin.final_loss}


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(rows: list[dict]) -> str:
    lines = ["| variant | seeds | acc1 after pretrain (32 px) | same model at 64 px | after finetune (64 px) |",
             "|---|---:|---:|---:|---:|"]
    for label in dict.fromkeys(r["label"] for r in rows):
        mine = [r for r in rows if r["label"] == label]
        lines.append(f"| {label} | {len(mine)} | " + " | ".join(
            _spread([r[k] for r in mine]) for k in ("pretrain_acc1", "pretrain_acc1_at_64px", "finetune_acc1")) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--pretrain-samples", type=int, default=24_000)
    parser.add_argument("--only", action="append", help="run only variants whose label contains this")
    parser.add_argument("--out", default="runs/v2-details")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = [json.loads(x) for x in results.read_text().splitlines()] if results.is_file() else []
    for seed in range(args.seeds):  # round-robin, so a cut-short run has every variant at low seeds
        for label, extra in VARIANTS.items():
            if args.only and not any(o in label for o in args.only):
                continue
            if any((r["label"], r["seed"]) == (label, seed) for r in done):
                continue
            row = run_variant(label, extra, seed, args.pretrain_samples, out)
            done.append(row)
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print(table(done))


if __name__ == "__main__":
    main()
