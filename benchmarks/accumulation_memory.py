"""Peak memory of one training step: exact accumulation (GradCache) vs a plain step.

    python benchmarks/accumulation_memory.py [--global-batch 4096] [--micro 64] [--arch clipa-tiny]

Each configuration runs in a fresh process (so high-water marks do not mix) and reports the
peak resident memory of the step above the memory held before it (model, optimizer state and
the batch itself are excluded, since they are the same for every configuration):

  plain MICRO                 one ordinary step on a micro-batch
  accumulated GLOBAL/MICRO    one exact step over the global batch, in micro-batches
  plain GLOBAL                one ordinary step on the whole global batch (what accumulation avoids)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys


def child(arch: str, global_batch: int, micro: int) -> None:
    import torch
    from accelerate import Accelerator

    from clipa.loss import infonce_loss
    from clipa.model import Geometry, create_model, stage_config
    from clipa.optim import build_optimizer
    from clipa.recipe import OptimConfig
    from clipa.step import ContrastiveStep

    torch.manual_seed(0)
    model = create_model(stage_config(arch, Geometry(32, 8)))
    model.train()
    optimizer = build_optimizer(model, OptimConfig())
    images = torch.randn(global_batch, 3, 32, 32)
    texts = torch.randint(1, 49000, (global_batch, 8))
    step = ContrastiveStep(model, model, infonce_loss, Accelerator(cpu=True))
    micro_batches = [(images[i:i + micro], texts[i:i + micro], None) for i in range(0, global_batch, micro)]
    # Warm up on one micro-batch so allocator pools and optimizer state exist before measuring.
    ContrastiveStep(model, model, infonce_loss, Accelerator(cpu=True))(micro_batches[:1])
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    import psutil

    current = psutil.Process().memory_info().rss // 1024
    step(micro_batches)
    optimizer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mb": peak / 1024, "step_mb": (peak - max(current, 0)) / 1024, "before_peak_mb": before / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--global-batch", type=int, default=4096)
    parser.add_argument("--micro", type=int, default=64)
    parser.add_argument("--arch", default="clipa-tiny")
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.arch, *args.child)
        return
    configs = [(f"plain {args.micro}", args.micro, args.micro),
               (f"accumulated {args.global_batch} = {args.global_batch // args.micro} x {args.micro}",
                args.global_batch, args.micro),
               (f"plain {args.global_batch}", args.global_batch, args.global_batch)]
    rows = []
    # glibc keeps freed large blocks in the heap once its dynamic mmap threshold has grown, so RSS
    # would report allocator retention rather than live tensors; a fixed threshold makes large
    # tensors mmapped and returned on free, and RSS then tracks what the step really holds.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    for label, global_batch, micro in configs:
        out = subprocess.run([sys.executable, __file__, "--arch", args.arch, "--child", str(global_batch), str(micro)],
                             capture_output=True, text=True, check=True, env=env)
        rows.append((label, json.loads(out.stdout.strip().splitlines()[-1])))
    base = rows[0][1]["step_mb"]
    print(f"{args.arch}, 32 px / 8 tokens, fp32 on CPU; step memory = peak RSS during the step minus RSS before it")
    print(f"{'configuration':<40} {'step memory MB':>15} {'x plain micro':>14} {'peak RSS MB':>12}")
    for label, r in rows:
        print(f"{label:<40} {r['step_mb']:>15.0f} {r['step_mb'] / base:>14.2f} {r['peak_mb']:>12.0f}")


if __name__ == "__main__":
    main()
