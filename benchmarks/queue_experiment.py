"""More negatives at a small batch: none vs memory bank vs momentum encoder, same steps.

    python benchmarks/queue_experiment.py [--batch 32] [--steps 400] [--queue 1024] [--out runs/queue-exp]

Each variant trains the tiny recipe (recipes/tiny/pretrain: 32 px, 8 tokens) from the same seed in
its own process, then evaluates zero-shot on the built-in held-out set. Reports acc1/acc5, the
median training throughput (step time) and the peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path


def child(out: str, batch: int, steps: int, kind: str, size: int) -> None:
    from clipa.evaluate.models import load_model
    from clipa.evaluate.zeroshot import zeroshot
    from clipa.recipe.index import resolve_path
    from clipa.recipe.load import load_recipe
    from clipa.train.trainer import train

    overrides = [f"train.global_batch_size={batch}", f"train.total_samples={batch * steps}", "checkpoint.every_steps=0",
                 "train.log_every_steps=20", "optim.warmup_steps=20", f"loss.queue.kind={kind}",
                 # tiny/pretrain as it was when this was measured (it masks at 64 px since issue #33)
                 "reduction.image=resize", "reduction.image_size=32", "reduction.mask_ratio=0"]
    if kind != "none":
        overrides += [f"loss.queue.size={size}"]
    result = train(load_recipe(resolve_path("tiny/pretrain"), overrides), "pretrain", out)
    metrics = zeroshot(load_model(out), "synthetic")["metrics"]
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    speeds = sorted(r["samples_per_s"] for r in rows if "samples_per_s" in r)
    print(json.dumps({"kind": kind, "acc1": metrics["acc1"], "acc5": metrics["acc5"],
                      "step_ms": 1000 * batch / speeds[len(speeds) // 2], "loss": result.final_loss,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--queue", type=int, default=1024)
    parser.add_argument("--out", default="runs/queue-exp")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.batch, args.steps, args.child[1], args.queue)
        return
    rows = []
    for kind in ("none", "memory_bank", "momentum"):
        out = subprocess.run([sys.executable, __file__, "--batch", str(args.batch), "--steps", str(args.steps),
                              "--queue", str(args.queue), "--child", f"{args.out}/{kind}", kind],
                             capture_output=True, text=True, check=True, env=dict(os.environ))
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"batch {args.batch}, {args.steps} steps, queue {args.queue} per modality; zero-shot on synthetic (24 classes)")
    print(f"{'negatives':<12} {'acc1':>6} {'acc5':>6} {'final loss':>10} {'step ms':>8} {'peak RSS MB':>12}")
    for r in rows:
        print(f"{r['kind']:<12} {r['acc1']:>6.3f} {r['acc5']:>6.3f} {r['loss']:>10.3f} {r['step_ms']:>8.1f} "
              f"{r['peak_rss_mb']:>12.0f}")


if __name__ == "__main__":
    main()
