"""Peak memory of one training step: exact accumulation (GradCache) vs a plain step.

    python benchmarks/accumulation_memory.py [--global-batch 4096] [--micro 64] [--arch clipa-tiny]
                                             [--image-size PX] [--text-length TOKENS] [--device cpu|cuda]

Each configuration runs in a fresh process (so high-water marks do not mix) and reports the
memory of the step above the memory held before it (model, optimizer state and the batch itself
are excluded, since they are the same for every configuration):

  plain MICRO                 one ordinary step on a micro-batch
  accumulated GLOBAL/MICRO    one exact step over the global batch, in micro-batches
  plain GLOBAL                one ordinary step on the whole global batch (what accumulation avoids)

Metric. On CUDA: torch.cuda.max_memory_allocated() during the step minus memory_allocated()
before it (live tensors only). On CPU torch has no allocator statistics and tracemalloc does not
see torch's allocations, so the step's memory is the process's peak RSS during the step minus its
RSS before it, with glibc told to mmap every block of 128 KB or more so that freed tensors leave
the RSS (otherwise it would measure allocator retention). Process peak RSS is printed as well.
The image size and text length default to the architecture's native geometry.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys


def child(arch: str, image_size: int, text_length: int, device: str, global_batch: int, micro: int) -> None:
    import psutil
    import torch
    from accelerate import Accelerator

    from clipa.model.build import Geometry, create_model, stage_config
    from clipa.recipe.schema import OptimConfig
    from clipa.train.loss import infonce_loss
    from clipa.train.optim import build_optimizer
    from clipa.train.step import ContrastiveStep

    torch.manual_seed(0)
    cfg = stage_config(arch, Geometry(image_size, text_length))
    model = create_model(cfg, device)
    model.train()
    optimizer = build_optimizer(model, OptimConfig())
    images = torch.randn(global_batch, 3, image_size, image_size, device=device)
    texts = torch.randint(1, cfg["text_cfg"].get("vocab_size", 49408) - 1, (global_batch, text_length), device=device)
    accelerator = Accelerator(cpu=device == "cpu")
    step = ContrastiveStep(model, model, infonce_loss, accelerator)
    micro_batches = [(images[i:i + micro], texts[i:i + micro], None) for i in range(0, global_batch, micro)]
    # Warm up on one micro-batch so allocator pools and optimizer state exist before measuring.
    step(micro_batches[:1])
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = psutil.Process().memory_info().rss
    step(micro_batches)
    optimizer.step()
    if cuda:
        torch.cuda.synchronize()
        step_bytes = torch.cuda.max_memory_allocated() - before
    else:
        step_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before  # ru_maxrss is in KB
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"step_mb": step_bytes / 2**20, "peak_rss_mb": peak_rss / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--global-batch", type=int, default=4096)
    parser.add_argument("--micro", type=int, default=64)
    parser.add_argument("--arch", default="clipa-tiny")
    parser.add_argument("--image-size", type=int, default=0, help="input resolution (default: the arch's native)")
    parser.add_argument("--text-length", type=int, default=0, help="caption tokens (default: the arch's native)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not (args.image_size and args.text_length):
        from clipa.model.build import arch_config, native_geometry

        native = native_geometry(arch_config(args.arch))
        args.image_size = args.image_size or native.image_size
        args.text_length = args.text_length or native.context_length
    if args.child:
        child(args.arch, args.image_size, args.text_length, args.device, *args.child)
        return
    if args.global_batch % args.micro:
        parser.error(f"--global-batch {args.global_batch} is not divisible by --micro {args.micro}")
    accumulated = f"accumulated {args.global_batch} = {args.global_batch // args.micro} x {args.micro}"
    configs = [(f"plain {args.micro}", args.micro, args.micro), (accumulated, args.global_batch, args.micro),
               (f"plain {args.global_batch}", args.global_batch, args.global_batch)]
    rows = {}
    # glibc keeps freed large blocks in the heap once its dynamic mmap threshold has grown, so RSS
    # would report allocator retention rather than live tensors; a fixed threshold makes large
    # tensors mmapped and returned on free, and RSS then tracks what the step really holds.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    for label, global_batch, micro in configs:
        command = [sys.executable, __file__, "--arch", args.arch, "--image-size", str(args.image_size),
                   "--text-length", str(args.text_length), "--device", args.device,
                   "--child", str(global_batch), str(micro)]
        out = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
        rows[label] = json.loads(out.stdout.strip().splitlines()[-1])
    metric = ("peak torch.cuda allocated during the step minus allocated before it" if args.device.startswith("cuda")
              else "peak RSS during the step minus RSS before it")
    print(f"{args.arch}, {args.image_size} px / {args.text_length} tokens, fp32 on {args.device}; "
          f"step memory = {metric}")
    base = rows[f"plain {args.micro}"]["step_mb"]
    print(f"{'configuration':<40} {'step memory MB':>15} {'x plain micro':>14} {'peak RSS MB':>12}")
    for label, r in rows.items():
        print(f"{label:<40} {r['step_mb']:>15.0f} {r['step_mb'] / base:>14.2f} {r['peak_rss_mb']:>12.0f}")
    ratio = rows[accumulated]["step_mb"] / base
    print(f"ratio: step memory of {accumulated} / plain {args.micro} = {ratio:.2f}x "
          f"(target <= 1.30x: {'met' if ratio <= 1.3 else 'NOT met'})")


if __name__ == "__main__":
    main()
