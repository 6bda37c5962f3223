"""What only a GPU can show (`python -m pytest --gpu -m gpu` on a CUDA machine; skipped elsewhere).

The rest of the suite hides the GPUs (conftest.py) so that its CPU assertions hold on any machine;
these tests get them back and train through the real CLI on CUDA.
"""

import json
import math
import subprocess
import sys

import pytest

from conftest import tiny_overrides


def test_the_suite_hides_gpus_from_cpu_tests_and_their_subprocesses():
    import torch

    assert not torch.cuda.is_available()
    seen = subprocess.run([sys.executable, "-c", "import os; print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')))"],
                          capture_output=True, text=True)
    assert seen.stdout.strip() == "''"


def _pretrain(out, env, *extra):
    return subprocess.run([sys.executable, "-m", "clipa", "pretrain", "tiny/pretrain",
                           *tiny_overrides(**{"train.total_samples": 32 * 6, "train.log_every_steps": 1}),
                           *extra, "--out", str(out)], env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.gpu
def test_bf16_on_cuda_trains_resumes_bitwise_and_exports_fp32(tmp_path, gpu_env):
    straight = _pretrain(tmp_path / "straight", gpu_env, "train.precision=bf16")
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "cuda" in straight.stdout + straight.stderr and "precision bf16" in straight.stdout + straight.stderr
    dead = _pretrain(tmp_path / "killed", dict(gpu_env, CLIPA_KILL_AT="step3:0"), "train.precision=bf16",
                     "checkpoint.every_steps=2")
    assert dead.returncode == -9
    resumed = _pretrain(tmp_path / "killed", gpu_env, "train.precision=bf16", "checkpoint.every_steps=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def losses(run):
        return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "loss" in r}

    assert all(math.isfinite(v) for v in losses(tmp_path / "straight").values())
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "straight" / "final" / "open_clip_model.safetensors"))
    assert {str(t.dtype) for t in weights.values()} == {"torch.float32"}
