"""Starting from a pretrained image tower: locked vs unlocked vs from scratch, same steps.

    python benchmarks/towers_experiment.py [--source RUN] [--steps 60] [--out runs/towers-exp]

The "pretrained" tower is the image tower of an earlier clipa run (trained here first unless
--source is given), saved as a standalone safetensors file of the bare tower, as a user would
bring a backbone. Each variant then trains the tiny recipe at 32 px / 8 tokens for the same
steps from a different seed and data order, and is evaluated zero-shot on the held-out set.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import load_file, save_file

from clipa.evaluate.models import load_model
from clipa.evaluate.zeroshot import zeroshot
from clipa.recipe.index import resolve_path
from clipa.recipe.load import load_recipe
from clipa.train.trainer import train

COMMON = ["checkpoint.every_steps=0", "train.log_every_steps=20", "optim.warmup_steps=10",
          # tiny/pretrain as it was when this was measured (it masks at 64 px since issue #33)
          "reduction.image=resize", "reduction.image_size=32", "reduction.mask_ratio=0"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", help="a clipa run whose image tower to start from")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", default="runs/towers-exp")
    args = parser.parse_args()
    out = Path(args.out)
    source = Path(args.source) if args.source else None
    if source is None:
        source = train(load_recipe(resolve_path("tiny/pretrain"), [*COMMON, "train.total_samples=32000"]),
                       "pretrain", out / "source").run_dir
    weights = load_file(str(source / "final" / "open_clip_model.safetensors"))
    tower = {k[len("visual."):]: v for k, v in weights.items() if k.startswith("visual.")}
    tower_file = out / "image_tower.safetensors"
    out.mkdir(parents=True, exist_ok=True)
    save_file(tower, str(tower_file))
    source_acc = zeroshot(load_model(str(source)), "synthetic")["metrics"]["acc1"]

    variants = {"from scratch": [], "pretrained, locked": [f"model.image_init={tower_file}", "model.lock_image=true"],
                "pretrained, unlocked": [f"model.image_init={tower_file}"]}
    rows = []
    for label, extra in variants.items():
        recipe = load_recipe(resolve_path("tiny/pretrain"), [
            *COMMON, "train.seed=7", f"train.global_batch_size={args.batch}",
            f"train.total_samples={args.batch * args.steps}", *extra])
        run = train(recipe, "pretrain", out / label.replace(", ", "-").replace(" ", "-"))
        metrics = zeroshot(load_model(str(run.run_dir)), "synthetic")["metrics"]
        rows.append((label, metrics["acc1"], metrics["acc5"], run.final_loss, run.samples_per_s))
    print(f"image tower from {source} (its own zero-shot acc1 {source_acc:.3f}); {args.steps} steps x {args.batch}, "
          "32 px / 8 tokens, seed 7")
    print(f"{'image tower':<22} {'acc1':>6} {'acc5':>6} {'final loss':>10} {'samples/s':>10}")
    for label, acc1, acc5, loss, speed in rows:
        print(f"{label:<22} {acc1:>6.3f} {acc5:>6.3f} {loss:>10.3f} {speed:>10.0f}")


if __name__ == "__main__":
    main()
