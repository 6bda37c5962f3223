"""Mixed precision through the whole pipeline on CPU (issue 22, part 1).

bf16 goes through accelerate's CPU autocast exactly as on a GPU: the tiny model pretrains in bf16,
is SIGKILLed and resumed, finetunes, exports and evaluates. Its losses stay within a stated
tolerance of the fp32 run's, the resumed run equals an uninterrupted one, and the export is fp32
and loads in plain open_clip. fp16 has no CPU autocast in accelerate (it silently trains fp32), so
clipa refuses it on CPU instead of logging a precision it does not use; the fp16 GradScaler logic
is covered with torch's real GradScaler in test_checkpoint.py.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, tiny_overrides

pytestmark = pytest.mark.slow  # bf16 matmuls are ~20x slower than fp32 on this CPU

STEPS = 4
COMMON = tiny_overrides(**{"train.total_samples": 32 * STEPS, "train.log_every_steps": 1})


def ok(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def losses_by_step(run_dir):
    """The last logged loss of every step (a resumed run logs the steps after its checkpoint again)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def pretrain(out, precision, *extra, env=None):
    return subprocess.run([sys.executable, "-m", "clipa", "pretrain", "tiny/pretrain", *COMMON,
                           f"train.precision={precision}", *extra, "--out", str(out)],
                          capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))


def test_bf16_pretrain_kill_resume_finetune_export_evaluate(tmp_path):
    fp32, bf16, killed = tmp_path / "fp32", tmp_path / "bf16", tmp_path / "killed"
    ok(pretrain(fp32, "fp32"))
    first = ok(pretrain(bf16, "bf16"))
    assert "precision bf16" in first.stdout + first.stderr
    # killed by SIGKILL after step 3, with a checkpoint at step 2; the same command resumes it
    dead = pretrain(killed, "bf16", "checkpoint.every_steps=2", env={"CLIPA_KILL_AT": "step3:0"})
    assert dead.returncode == -9, dead.stderr[-2000:]
    assert max(losses_by_step(killed)) == 2  # step 3 ran; the kill came before its log line
    ok(pretrain(killed, "bf16", "checkpoint.every_steps=2"))

    exact, mixed, resumed = losses_by_step(fp32), losses_by_step(bf16), losses_by_step(killed)
    assert sorted(exact) == sorted(mixed) == sorted(resumed) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in mixed.values())
    assert resumed == mixed  # kill + resume changes nothing in bf16 either
    # bf16 autocast rounds activations to 8 mantissa bits; over 4 steps the loss (about ln 32 = 3.47)
    # stays within 0.05 of fp32's, while the loss itself moves by more than 0.5 (it is training).
    assert max(abs(mixed[s] - exact[s]) for s in exact) < 0.05, (mixed, exact)
    assert max(abs(exact[s] - exact[1]) for s in exact) > 0.5, exact

    # the exports: fp32 tensors, close to the fp32 run's (bf16 changes the training arithmetic, not the
    # stored weights), and they load in plain open_clip
    w_bf16 = load_file(str(bf16 / "final" / "open_clip_model.safetensors"))
    w_fp32 = load_file(str(fp32 / "final" / "open_clip_model.safetensors"))
    assert {t.dtype for t in w_bf16.values()} == {torch.float32}
    diff = torch.linalg.vector_norm(torch.cat([(w_bf16[k] - w_fp32[k]).flatten() for k in w_fp32]))
    norm = torch.linalg.vector_norm(torch.cat([w.flatten() for w in w_fp32.values()]))
    assert diff / norm < 1e-2, float(diff / norm)
    import open_clip

    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{bf16 / 'final'}")
    assert all(p.dtype == torch.float32 for p in model.parameters())

    fine = tmp_path / "fine"
    ok(run_cli("finetune", "tiny/finetune", *tiny_overrides(**{"train.total_samples": 64}), "train.precision=bf16",
               f"init.checkpoint={bf16}", "--out", fine))
    assert all(math.isfinite(v) for v in losses_by_step(fine).values())
    assert {t.dtype for t in load_file(str(fine / "final" / "open_clip_model.safetensors")).values()} == {torch.float32}
    ok(run_cli("zeroshot", "--model", fine, "--dataset", "synthetic", "--output", tmp_path / "zs.json"))
    metrics = json.loads((tmp_path / "zs.json").read_text())["metrics"]
    assert metrics["num_samples"] > 0 and 0 <= metrics["acc1"] <= metrics["acc5"] <= 1


def test_fp16_on_cpu_is_refused_with_one_line(tmp_path):
    result = run_cli("pretrain", "tiny/pretrain", *tiny_overrides(), "train.precision=fp16", "--out", tmp_path / "run")
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "train.precision" in errors[0] and "bf16" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
