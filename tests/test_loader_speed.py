"""benchmarks/loader_speed.py --cores-per-gpu: the decoding cores a recipe's stage needs per accelerator,
from the planner's samples/s per GPU and one loader worker's measured samples/s."""

import importlib.util

import pytest

from clipa.analysis.plan import plan
from clipa.data.shards import write_synthetic

from conftest import REPO


def _loader_speed():
    spec = importlib.util.spec_from_file_location("loader_speed", REPO / "benchmarks" / "loader_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cores_per_gpu_divides_the_planned_rate_by_a_measured_worker(tmp_path, monkeypatch):
    train = write_synthetic(tmp_path / "shards", num_samples=48, shard_size=24, image_size=64, eval_per_class=0)["train"]
    bench = _loader_speed()
    measured = bench.cores_per_gpu(train, ["tiny/pretrain"], "A100", 0.1, micro=8, batches=2)[0]
    assert measured["worker_samples_per_s"] > 0  # a real worker timed on real shards
    # The arithmetic with a worker of exactly 3000 samples/s, timed on the stage's own geometry and text:
    timed = []
    monkeypatch.setattr(bench, "loader_cpu", lambda train, size, fast, micro, batches, **stage:
                        timed.append((size, stage["text"])) or 3000.0)
    slow, fast = (bench.cores_per_gpu(train, ["tiny/pretrain"], "A100", mfu, micro=8, batches=2)[0]
                  for mfu in (0.1, 0.4))
    assert timed == [(64, ("truncate", 8))] * 2 and slow["text"] == "truncate 8" and slow["image_size"] == 64
    # By hand: an A100's 312 TFLOP/s x MFU over the stage's training FLOPs per sample (clipa-tiny at
    # 64 px with 75% of the patches masked / 8 tokens, counted by clipa.cost.flops: test_plan checks that count).
    flops = plan(["tiny/pretrain"], gpu="A100", gpus=1, mfu=0.1)["stages"][0]["flops_per_sample"]
    assert slow["samples_per_s_per_gpu"] == pytest.approx(312e12 * 0.1 / flops, rel=1e-12)
    assert fast["samples_per_s_per_gpu"] == pytest.approx(312e12 * 0.4 / flops, rel=1e-12)
    # 126,621,696 FLOPs/sample: 246,403 samples/s at 10 % MFU = 82.13 workers of 3000/s -> 83 (a
    # part-used worker is a whole core) + 1 core for the training process; at 40 %: 985,613/s =
    # 328.54 workers -> 329 + 1.
    assert flops == 126_621_696
    assert (slow["workers_per_gpu"], slow["cores_per_gpu"]) == (pytest.approx(82.134423, rel=1e-6), 84)
    assert (fast["workers_per_gpu"], fast["cores_per_gpu"]) == (pytest.approx(328.537694, rel=1e-6), 330)


def test_interleave_times_each_value_in_alternating_rounds(tmp_path, monkeypatch):
    import clipa.data.loader as loader_module

    train = write_synthetic(tmp_path / "shards", num_samples=48, shard_size=8, image_size=64, eval_per_class=0)["train"]
    real = loader_module.build_train_loader
    seen = []  # (interleave, shuffle buffer, workers) of every loader the benchmark builds, in order

    def recording(recipe, *args, **kwargs):
        seen.append((recipe.data.interleave, recipe.data.shuffle_buffer, recipe.data.num_workers))
        return real(recipe, *args, **kwargs)

    monkeypatch.setattr(loader_module, "build_train_loader", recording)
    rows = _loader_speed().interleave_speeds(train, 32, [1, 3], workers=0, micro=4, batches=2, repeats=2,
                                             shuffle_buffer=16)
    assert [r["interleave"] for r in rows] == [1, 3]
    assert all(r["worker_samples_per_s"] > 0 and r["workers_samples_per_s"] > 0 for r in rows)
    # each round: value 1 (per worker, then through the DataLoader), then value 3; two rounds
    assert seen == [(1, 16, 0), (1, 16, 0), (3, 16, 0), (3, 16, 0)] * 2
