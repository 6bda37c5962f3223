"""benchmarks/loader_speed.py --cores-per-gpu: the decoding cores a recipe's stage needs per accelerator,
from the planner's samples/s per GPU and one loader worker's measured samples/s."""

import importlib.util
import math

from clipa.data.shards import write_synthetic
from clipa.plan import plan

from conftest import REPO


def _loader_speed():
    spec = importlib.util.spec_from_file_location("loader_speed", REPO / "benchmarks" / "loader_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cores_per_gpu_divides_the_planned_rate_by_a_measured_worker(tmp_path):
    train = write_synthetic(tmp_path / "shards", num_samples=48, shard_size=24, image_size=64, eval_per_class=0)["train"]
    bench = _loader_speed()
    slow, fast = (bench.cores_per_gpu(train, ["tiny/pretrain"], "A100", mfu, micro=8, batches=2)[0]
                  for mfu in (0.1, 0.4))
    stage = plan(["tiny/pretrain"], gpu="A100", gpus=1, mfu=0.1)["stages"][0]
    assert math.isclose(slow["samples_per_s_per_gpu"], stage["samples"] / (stage["gpu_hours"] * 3600))
    assert math.isclose(fast["samples_per_s_per_gpu"], 4 * slow["samples_per_s_per_gpu"])  # rate scales with MFU
    for row in (slow, fast):  # the stage's own geometry and text reduction are what the worker was timed on
        assert row["image_size"] == stage["image_size"] and row["text"] == f"truncate {stage['text_tokens']}"
        assert row["worker_samples_per_s"] > 0
        assert row["cores_per_gpu"] == math.ceil(row["samples_per_s_per_gpu"] / row["worker_samples_per_s"]) + 1


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
