"""Does the data loader keep up with the training step? Loader samples/s vs step samples/s.

    python benchmarks/loader_speed.py [--workers 2] [--sizes 224 112 64] [--source-size 256] [--train]
    python benchmarks/loader_speed.py --cores-per-gpu vit_l14/pretrain_84 vit_h14/pretrain_84 [--gpu A100]
    python benchmarks/loader_speed.py --interleave 1 8 [--shuffle-buffer 5000] [--shards "DIR/{000000..000007}.tar"]

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

  cores per GPU  (--cores-per-gpu RECIPE...) what each recipe's stage needs per accelerator: the
               planner's samples/s per GPU (`clipa plan` at --gpu and --mfu) over one worker's
               measured samples/s at that recipe's image size, crop and text reduction, plus one
               core for the training process itself.

  interleave   (--interleave N...) the same two loader rates at the smallest size for each
               `data.interleave` value (shards each worker reads at once), in alternating rounds so
               that the machine's load falls on every value alike; `--shards` times real shards.

The loader keeps up when its samples/s exceeds the step's. Where workers and the step share the
same few cores (a 2-core CPU), what loading costs the step is the loader's CPU time per sample
against the step's, and the end-to-end row is the direct answer.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # step_timing, also when loaded by file path


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


def _loader(train: str, size: int, fast: bool, workers: int, micro: int, batches: int,
            crop_scale=(0.4, 1.0), text: tuple[str, int] = ("truncate", 32), interleave: int = 1,
            shuffle_buffer: int = 500):
    from clipa.data.loader import build_train_loader
    from clipa.model.build import Geometry, build_tokenizer
    from clipa.recipe.load import load_recipe
    from clipa.reduction.text import TextReducer

    # interleave 1 unless asked: the tables in docs/data.md were measured reading one shard at a time
    recipe = load_recipe(None, [f'data.train="{train}"', f"data.num_workers={workers}",
                                f"data.shuffle_buffer={shuffle_buffer}", f"data.interleave={interleave}",
                                f"data.fast_decode={'true' if fast else 'false'}",
                                f"data.augment.scale=[{crop_scale[0]}, {crop_scale[1]}]"])
    # clipa-tiny's BPE tokenizer for every recipe: the published models' tokenizers (CLIPA-v2's BERT) are
    # downloads, and what the loader spends on a caption is the reduction, not the vocabulary.
    reducer = TextReducer(build_tokenizer("clipa-tiny", 77), text[0], text[1])
    return iter(build_train_loader(recipe, Geometry(size, text[1]), reducer, micro_batch=micro, processes=1, rank=0,
                                   start_batch=0, num_batches=batches))


def loader_cpu(train: str, size: int, fast: bool, micro: int, batches: int, **stage) -> float:
    """Samples per CPU-second of an in-process loader (= one worker on a free core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a worker; idle OpenMP threads spinning would count as CPU time
    try:
        it = _loader(train, size, fast, 0, micro, batches + 1, **stage)
        next(it)  # shuffle-buffer fill
        t0 = time.process_time()
        for _ in range(batches):
            next(it)
        return batches * micro / (time.process_time() - t0)
    finally:
        torch.set_num_threads(threads)


def loader_wall(train: str, size: int, fast: bool, workers: int, micro: int, batches: int, **stage) -> float:
    # Untimed: one micro-batch per worker (start-up, shuffle-buffer fill), then as many as the
    # DataLoader prefetches (4 per worker), so the timed ones are produced while we wait for them.
    untimed = max(1, workers) * 5
    it = _loader(train, size, fast, workers, micro, untimed + batches, **stage)
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

    def step():
        out = model(normalize(images), texts)
        loss = infonce_loss(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    from step_timing import fastest_rate

    return fastest_rate(step, micro, steps)


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


def cores_per_gpu(train: str, recipes: list[str], gpu: str, mfu: float, micro: int, batches: int) -> list[dict]:
    """Per recipe: the planner's samples/s per accelerator against one loader worker's measured samples/s."""
    from clipa.analysis.plan import plan
    from clipa.recipe.index import resolve_path
    from clipa.recipe.load import load_recipe

    rows = []
    for name in recipes:
        recipe = load_recipe(resolve_path(name))
        stage = plan([recipe], gpu=gpu, gpus=1, mfu=mfu)["stages"][0]
        per_gpu = stage["samples"] / (stage["gpu_hours"] * 3600.0)
        per_worker = loader_cpu(train, stage["image_size"], recipe.data.fast_decode, micro, batches,
                                crop_scale=tuple(recipe.data.augment.scale),
                                text=(recipe.reduction.text, stage["text_tokens"]))
        rows.append({"recipe": name, "model": stage["arch"], "image_size": stage["image_size"],
                     "text": f"{recipe.reduction.text} {stage['text_tokens']}", "gpu": stage["gpu"], "mfu": mfu,
                     "samples_per_s_per_gpu": per_gpu, "worker_samples_per_s": per_worker,
                     "workers_per_gpu": per_gpu / per_worker, "cores_per_gpu": math.ceil(per_gpu / per_worker) + 1})
    return rows


def interleave_speeds(train: str, size: int, values: list[int], workers: int, micro: int, batches: int,
                      repeats: int, shuffle_buffer: int) -> list[dict]:
    """Per `data.interleave` value: the best per-worker CPU rate and the best wall rate over `repeats`
    rounds, each round timing every value once (in turn), so that load on the machine is shared."""
    best = {v: {"interleave": v, "worker_samples_per_s": 0.0, "workers_samples_per_s": 0.0} for v in values}
    for _ in range(repeats):
        for v in values:
            stage = {"interleave": v, "shuffle_buffer": shuffle_buffer}
            row = best[v]
            row["worker_samples_per_s"] = max(row["worker_samples_per_s"],
                                              loader_cpu(train, size, False, micro, batches, **stage))
            row["workers_samples_per_s"] = max(row["workers_samples_per_s"],
                                               loader_wall(train, size, False, workers, micro, batches, **stage))
    return [best[v] for v in values]


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
    parser.add_argument("--cores-per-gpu", nargs="+", metavar="RECIPE", default=[],
                        help="instead: the decoding cores each recipe's stage needs per accelerator")
    parser.add_argument("--gpu", default="A100", help="accelerator for --cores-per-gpu (as `clipa plan --gpu`)")
    parser.add_argument("--mfu", type=float, default=0.27, help="model-FLOPs utilisation for --cores-per-gpu")
    parser.add_argument("--interleave", type=int, nargs="+", metavar="N", default=[],
                        help="instead: loader rates at the smallest size for each data.interleave value")
    parser.add_argument("--shuffle-buffer", type=int, default=500, help="data.shuffle_buffer for --interleave")
    parser.add_argument("--shards", help="--interleave on these shards (a brace pattern) instead of synthetic ones")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    train = args.shards or write_shards(args.out, args.samples, args.source_size)
    if args.interleave:
        size = min(args.sizes)
        rows = interleave_speeds(train, size, args.interleave, args.workers, args.micro, args.batches, args.repeats,
                                 args.shuffle_buffer)
        print(f"\n{train}: {size} px, shuffle buffer {args.shuffle_buffer}, micro-batch {args.micro}, "
              f"best of {args.repeats} alternating rounds\n")
        print(f"| data.interleave | loader per worker | {args.workers} workers |")
        print("|---:|---:|---:|")
        for r in rows:
            print(f"| {r['interleave']} | {r['worker_samples_per_s']:.0f}/s | {r['workers_samples_per_s']:.0f}/s |")
        print(json.dumps(rows))
        return
    if args.cores_per_gpu:
        rows = cores_per_gpu(train, args.cores_per_gpu, args.gpu, args.mfu, args.micro, args.batches)
        print(f"\n{args.source_size}px JPEG shards; one worker = one core; GPU samples/s from `clipa plan` at MFU "
              f"{args.mfu:g}\n")
        print(f"| recipe | model @ px | text | {args.gpu} samples/s (plan) | one worker samples/s | workers per GPU | "
              "cores per GPU (+1 trainer) |")
        print("|---|---|---|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['recipe']} | {r['model']} @ {r['image_size']} | {r['text']} | {r['samples_per_s_per_gpu']:.0f} | "
                  f"{r['worker_samples_per_s']:.0f} | {r['workers_per_gpu']:.1f} | {r['cores_per_gpu']} |")
        print(json.dumps(rows))
        return

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
