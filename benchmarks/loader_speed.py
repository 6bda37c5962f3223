"""Does the data loader keep up with the training step? Loader samples/s vs step samples/s.

    python benchmarks/loader_speed.py [--workers 2] [--sizes 224 112 64] [--source-size 256] [--train]

Writes JPEG shards of the synthetic scenes at `--source-size` px (once, cached in `--out`), then
runs clipa's real training loader (build_train_loader: shard streaming, shuffle buffer, decode,
random-resized crop, BPE tokenisation) at each size, with and without reduced-size JPEG decoding
(data.fast_decode), and one clipa-tiny training step (forward, InfoNCE, backward, AdamW) on a
micro-batch of the same size:

  per worker   loader samples per CPU-second of the loading process (in-process loader, so no
               IPC): what one worker delivers on a core of its own. CPU time, unlike wall time,
               barely moves when other programs share the machine.
  N workers    wall-clock samples/s of the DataLoader with `--workers` worker processes (best of
               `--repeats` interleaved rounds; start-up, shuffle-buffer fill and prefetch untimed).
  step         wall-clock samples/s of the training step with all cores (fastest of `--steps`).
  end-to-end   (--train) `clipa pretrain` at the smallest size on the shards with `--workers`
               workers: samples/s and the fraction of time the step waited for data.

The loader keeps up when its samples/s exceeds the step's. Where workers and the step share the
same few cores (a 2-core CPU), what loading costs the step is the loader's CPU time per sample
against the step's, and the end-to-end row is the direct answer.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def write_shards(out: Path, samples: int, source_size: int) -> str:
    from clipa.data.shards import write_synthetic

    marker = out / f"shards-{samples}-{source_size}.json"
    if marker.is_file():
        return json.loads(marker.read_text())["train"]
    t0 = time.perf_counter()
    info = write_synthetic(out / f"shards-{samples}-{source_size}", num_samples=samples, shard_size=250,
                           image_size=source_size, eval_per_class=0)
    marker.write_text(json.dumps(info))
    print(f"wrote {samples} JPEGs at {source_size}px in {time.perf_counter() - t0:.0f} s: {info['train']}", flush=True)
    return info["train"]


def _loader(train: str, size: int, fast: bool, workers: int, micro: int, batches: int):
    from clipa.data.loader import build_train_loader
    from clipa.model.build import Geometry, build_tokenizer
    from clipa.model.reduction import TextReducer
    from clipa.recipe.load import load_recipe

    recipe = load_recipe(None, [f'data.train="{train}"', f"data.num_workers={workers}", "data.shuffle_buffer=500",
                                f"data.fast_decode={'true' if fast else 'false'}", "data.augment.scale=[0.4, 1.0]"])
    reducer = TextReducer(build_tokenizer("clipa-tiny", 32), "truncate", 32)
    return iter(build_train_loader(recipe, Geometry(size, 32), reducer, micro_batch=micro, processes=1, rank=0,
                                   start_batch=0, num_batches=batches))


def loader_cpu(train: str, size: int, fast: bool, micro: int, batches: int) -> float:
    """Samples per CPU-second of an in-process loader (= one worker on a free core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a worker; idle OpenMP threads spinning would count as CPU time
    try:
        it = _loader(train, size, fast, 0, micro, batches + 1)
        next(it)  # shuffle-buffer fill
        t0 = time.process_time()
        for _ in range(batches):
            next(it)
        return batches * micro / (time.process_time() - t0)
    finally:
        torch.set_num_threads(threads)


def loader_wall(train: str, size: int, fast: bool, workers: int, micro: int, batches: int) -> float:
    # Untimed: one micro-batch per worker (start-up, shuffle-buffer fill), then as many as the
    # DataLoader prefetches (4 per worker), so the timed ones are produced while we wait for them.
    untimed = max(1, workers) * 5
    it = _loader(train, size, fast, workers, micro, untimed + batches)
    for _ in range(untimed):
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * micro / (time.perf_counter() - t0)


def step_speed(size: int, micro: int, steps: int) -> float:
    from clipa.data.transforms import normalize
    from clipa.model.build import Geometry, create_model, stage_config
    from clipa.recipe.schema import OptimConfig
    from clipa.train.loss import infonce_loss
    from clipa.train.optim import build_optimizer

    torch.manual_seed(0)
    model = create_model(stage_config("clipa-tiny", Geometry(size, 32)))
    model.train()
    optimizer = build_optimizer(model, OptimConfig())
    images = torch.randint(0, 256, (micro, 3, size, size), dtype=torch.uint8)
    texts = torch.randint(1, 49000, (micro, 32))
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        out = model(normalize(images), texts)
        loss = infonce_loss(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:  # the first step pays for allocations
            times.append(time.perf_counter() - t0)
    return micro / min(times)


def end_to_end(train: str, size: int, workers: int, batch: int, steps: int) -> dict:
    from clipa.recipe.load import load_recipe
    from clipa.train.trainer import train as run_train

    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(None, [
            "model.arch=clipa-tiny", f'data.train="{train}"', f"data.num_workers={workers}",
            "data.shuffle_buffer=500", f"reduction.image_size={size}", "reduction.text_length=32",
            f"train.global_batch_size={batch}", f"train.total_samples={batch * steps}", "train.precision=fp32",
            f"train.log_every_steps={steps // 2}", "checkpoint.every_steps=0", "optim.warmup_steps=1"])
        run_train(recipe, "pretrain", Path(tmp) / "run")
        lines = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    last = lines[-1]  # the second half of the run: start-up excluded
    return {"samples_per_s": last["samples_per_s"], "data_wait_frac": last["data_wait_frac"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "clipa-loader-bench")
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--source-size", type=int, default=256)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 112, 64])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--micro", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20, help="timed loader micro-batches per setting")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per size")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved loader rounds; the best is reported")
    parser.add_argument("--train", action="store_true", help="also run the end-to-end training at the smallest size")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    train = write_shards(args.out, args.samples, args.source_size)

    rows = []
    for size in args.sizes:
        cpu_full = loader_cpu(train, size, False, args.micro, args.batches)
        cpu_fast = loader_cpu(train, size, True, args.micro, args.batches)
        wall_full = wall_fast = 0.0
        for _ in range(args.repeats):
            wall_full = max(wall_full, loader_wall(train, size, False, args.workers, args.micro, args.batches))
            wall_fast = max(wall_fast, loader_wall(train, size, True, args.workers, args.micro, args.batches))
        step = step_speed(size, args.micro, args.steps)
        rows.append((size, cpu_full, cpu_fast, wall_full, wall_fast, step))
        print(f"{size}px: per worker {cpu_full:.0f} / reduced {cpu_fast:.0f}, {args.workers} workers {wall_full:.0f} / "
              f"reduced {wall_fast:.0f} samples/s; step {step:.0f} samples/s", flush=True)

    print(f"\n{args.source_size}px JPEG shards, micro-batch {args.micro}, {torch.get_num_threads()} torch threads "
          f"for the step\n")
    print(f"| size | loader per worker: full decode | reduced decode | speed-up | {args.workers} workers: full | "
          "reduced | clipa-tiny train step |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for size, cpu_full, cpu_fast, wall_full, wall_fast, step in rows:
        print(f"| {size} px | {cpu_full:.0f}/s | {cpu_fast:.0f}/s | {cpu_fast / cpu_full:.2f}x | {wall_full:.0f}/s | "
              f"{wall_fast:.0f}/s | {step:.0f}/s |")
    if args.train:
        size = min(args.sizes)
        result = end_to_end(train, size, args.workers, batch=args.micro, steps=20)
        print(f"\nend-to-end clipa pretrain at {size}px, batch {args.micro}, {args.workers} workers: "
              f"{result['samples_per_s']:.0f} samples/s, waited for data {100 * result['data_wait_frac']:.0f}% of the time")


if __name__ == "__main__":
    main(sys.argv[1:])
