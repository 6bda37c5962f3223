"""A real 2-process gloo group (torchrun) trains exactly like one process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import MICRO, run_torchrun

HELPER = str(__import__("pathlib").Path(__file__).with_name("distributed_grads.py"))

COMMON = [MICRO, "train.global_batch_size=64", "train.total_samples=192", "train.log_every_steps=1", "data.num_workers=0",
          "checkpoint.every_steps=0", "optim.warmup_steps=1", "reduction.image=random", "reduction.mask_ratio=0.5"]


def run(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_with_accumulation_match_one_process(tmp_path):
    # 2 processes x micro 16 x 2 accumulation steps  vs  1 process x micro 64
    two = run_torchrun("-m", "clipa", "pretrain", "tiny/pretrain", *COMMON, "train.micro_batch_size=16",
                       "--out", tmp_path / "two", cwd=tmp_path)
    assert two.stdout.count("pretrain finished") == 1  # only rank 0 reports
    run([sys.executable, "-m", "clipa", "pretrain", "tiny/pretrain", *COMMON, "--out", tmp_path / "one"], tmp_path)
    for a, b in zip(losses(tmp_path / "two"), losses(tmp_path / "one"), strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (a, b)
    # The losses show every step but the last; the final weights show the last update, which moves
    # weights by up to about the last step's lr (1e-3 here): they must agree to a tenth of it (a missing
    # or different final step fails every tensor). Rounding noise in gradients that are mathematically zero
    # (attention key biases) reaches AdamW as about noise/eps of an lr step: ~1e-5 here.
    assert_final_weights_agree(tmp_path / "two", tmp_path / "one")


def assert_final_weights_agree(run, reference):
    """final/ weights equal to a tenth of the last step's learning rate (test_fsdp uses it too)."""
    rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    last_lr = [row["lr"] for row in rows if "lr" in row][-1]
    ours = load_file(str(run / "final" / "open_clip_model.safetensors"))
    theirs = load_file(str(reference / "final" / "open_clip_model.safetensors"))
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=last_lr / 10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("loss_kind, masked", [("infonce", "1"), ("siglip", "0")])
@pytest.mark.slow
def test_two_process_gradients_equal_one_process(tmp_path, loss_kind, masked):
    from test_accumulation import assert_same_gradients, global_batch, gradients, split

    out = tmp_path / "grads.pt"
    run_torchrun(HELPER, out, "8", loss_kind, masked, cwd=tmp_path)
    saved = torch.load(out, weights_only=False)
    assert saved["world"] == 2
    # 32 rows per process in micro-batches of 8: four micro-steps, gradients all-reduced on the last
    # only (three skipped by no_sync); equal gradients below show that one sync carried everything.
    assert saved["micro_steps"] == 4 and saved["synced_backwards"] == 1
    loss, expected = gradients(split(global_batch(64, masked == "1"), 64), loss_kind, masked == "1")
    assert saved["loss"] == pytest.approx(loss, rel=1e-6)
    assert_same_gradients(saved["grads"], expected)
