"""Nothing finished is ever lost: kills at any point, signals, damaged checkpoints, NaNs, full disks."""

import json
import os
import signal
import subprocess
import sys
import time

import open_clip
import pytest
import torch

from clipa import checkpoint as ckpt
from clipa.checkpoint import CheckpointManager, export_checkpoint
from clipa.errors import ClipaError
from clipa.evaluate.models import load_model
from clipa.recipe import load_recipe
from clipa.train import NonFiniteError, Trainer
from conftest import RECIPES

ARGS = ["train.global_batch_size=32", "train.log_every_steps=1", "data.num_workers=0", "optim.warmup_steps=2",
        "checkpoint.every_steps=2", "checkpoint.keep_last=10"]


def command(out, steps=8, *extra):
    return [sys.executable, "-m", "clipa", "pretrain", "tiny/pretrain", *ARGS, f"train.total_samples={32 * steps}",
            *extra, "--out", str(out)]


def run(out, steps=8, env=None, *extra):
    full_env = dict(os.environ, OMP_NUM_THREADS="2", **(env or {}))
    return subprocess.run(command(out, steps, *extra), env=full_env, capture_output=True, text=True, timeout=600)


def wait_for_logged_steps(run_dir, n, timeout=300):
    """Until the running training has logged n steps (a signal then lands mid-run)."""
    deadline = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{metrics}: fewer than {n} steps after {timeout} s")


def trajectory(run_dir):
    """step -> loss, the last value logged for each step (a resumed run re-logs the steps it redoes)."""
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        losses[row["step"]] = row["loss"]
    return losses


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    result = run(out)
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("crash", ["checkpoint-write:4", "before-latest:6"])
def test_sigkill_during_checkpointing_then_resume_is_bitwise_identical(tmp_path, straight, crash):
    out = tmp_path / "run"
    killed = run(out, env={"CLIPA_CRASH_AT": crash})
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "final").exists()
    resumed = run(out)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    # CPU, fp32, one thread layout: the resumed trajectory is bitwise the uninterrupted one.
    assert trajectory(out) == trajectory(straight)
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_sigkill_at_an_arbitrary_moment_then_resume(tmp_path, straight):
    out = tmp_path / "run"
    proc = subprocess.Popen(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, OMP_NUM_THREADS="2"))
    wait_for_logged_steps(out, 5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert run(out).returncode == 0
    assert trajectory(out) == trajectory(straight)


def test_sigterm_saves_exits_zero_and_resumes(tmp_path, straight):
    out = tmp_path / "run"
    proc = subprocess.Popen(command(out, 8, "checkpoint.every_steps=0"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
    wait_for_logged_steps(out, 2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "stopped by SIGTERM" in stdout and "Resume by running the same command again" in stdout
    saved = CheckpointManager(out / "checkpoints").latest()
    assert saved is not None and 2 <= int(saved.name.split("_")[1]) < 8
    assert run(out, 8, None, "checkpoint.every_steps=0").returncode == 0
    assert trajectory(out) == trajectory(straight)


def test_damaged_checkpoint_is_never_chosen(tmp_path, straight):
    manager = CheckpointManager(straight / "checkpoints")
    newest = manager.latest()
    assert newest.name == "step_000008"
    copy = tmp_path / "checkpoints"
    import shutil

    shutil.copytree(straight / "checkpoints", copy)
    weights = copy / "step_000008" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated by a failing disk
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        assert CheckpointManager(copy).latest().name == "step_000006"
    (copy / "step_000006" / "state.pt").write_bytes(b"not a zip")
    with pytest.warns(UserWarning):
        assert CheckpointManager(copy).latest().name == "step_000004"
    (copy / ".tmp-step_000010").mkdir()  # a killed writer's leftovers are never a candidate
    with pytest.warns(UserWarning):
        assert CheckpointManager(copy).latest().name == "step_000004"


def test_keep_last_keeps_exactly_the_newest(tmp_path):
    recipe = load_recipe(RECIPES / "tiny" / "pretrain.toml",
                         [*ARGS, "train.total_samples=192", "checkpoint.every_steps=1", "checkpoint.keep_last=2"])
    Trainer(recipe, "pretrain", tmp_path / "run").run()
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["LATEST", "step_000005", "step_000006"]
    assert (tmp_path / "run" / "checkpoints" / "LATEST").read_text().strip() == "step_000006"


class FaultyStep:
    """Wraps the real step: on chosen steps the loss and every gradient become NaN."""

    def __init__(self, trainer, bad):
        self.trainer, self.inner, self.bad = trainer, trainer.contrastive_step, bad

    def __call__(self, micro_batches):
        loss = self.inner(micro_batches)
        if self.bad(self.trainer.step + 1):
            for p in self.trainer.model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
            return loss * float("nan")
        return loss


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    recipe = load_recipe(RECIPES / "tiny" / "pretrain.toml", [*ARGS, "train.total_samples=192"])
    trainer = Trainer(recipe, "pretrain", tmp_path / "run")
    trainer.contrastive_step = FaultyStep(trainer, lambda step: step in (3, 4))
    result = trainer.run()
    assert result.skipped_steps == 2 and result.steps == 6
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 0, 0]
    assert all(torch.isfinite(p).all() for p in load_model(str(tmp_path / "run")).model.parameters())


def test_too_many_nonfinite_steps_stop_with_the_last_good_checkpoint(tmp_path):
    recipe = load_recipe(RECIPES / "tiny" / "pretrain.toml",
                         [*ARGS, "train.total_samples=320", "train.max_nonfinite_steps=3"])
    trainer = Trainer(recipe, "pretrain", tmp_path / "run")
    trainer.contrastive_step = FaultyStep(trainer, lambda step: step >= 5)
    with pytest.raises(NonFiniteError, match=r"3 steps in a row.*steps 5-7.*step_000004"):
        trainer.run()
    good = CheckpointManager(tmp_path / "run" / "checkpoints").latest()
    assert good.name == "step_000004" and ckpt.verify(good) is None
    assert not (tmp_path / "run" / "final").exists()


def test_export_any_checkpoint_loads_in_open_clip(tmp_path, straight):
    step4 = straight / "checkpoints" / "step_000004"
    out = export_checkpoint(step4, tmp_path / "exported")
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    ours = load_model(str(step4))
    images = torch.randn(2, 3, 32, 32)
    model.eval(), ours.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), ours.model.encode_image(images))
    with pytest.raises(ClipaError, match="exists and is not empty"):
        export_checkpoint(step4, tmp_path / "exported")


def test_unwritable_output_and_full_disk_are_reported_before_damage(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    recipe = load_recipe(RECIPES / "tiny" / "pretrain.toml", [*ARGS, "train.total_samples=64"])
    with pytest.raises(ClipaError, match="--out: cannot write to"):
        Trainer(recipe, "pretrain", blocker / "run")

    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: type("U", (), {"free": 1024})())
    with pytest.raises(ClipaError, match="GiB free, a checkpoint needs about"):
        Trainer(recipe, "pretrain", tmp_path / "full")


def test_failed_checkpoint_write_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    recipe = load_recipe(RECIPES / "tiny" / "pretrain.toml", [*ARGS, "train.total_samples=192"])
    trainer = Trainer(recipe, "pretrain", tmp_path / "run")
    real = ckpt.write_safetensors

    def fail_at_step_4(state, path):
        if "step_000004" in str(path):
            raise OSError(28, "No space left on device")
        real(state, path)

    monkeypatch.setattr(ckpt, "write_safetensors", fail_at_step_4)
    with pytest.raises(ClipaError, match=r"could not write .*step_000004 \(No space left on device\).*intact"):
        trainer.run()
    directory = tmp_path / "run" / "checkpoints"
    assert CheckpointManager(directory).latest().name == "step_000002"
    assert not list(directory.glob(".tmp-*"))


def test_resume_rejects_changes_that_make_another_run(tmp_path):
    first = load_recipe(RECIPES / "tiny" / "pretrain.toml", [*ARGS, "train.total_samples=64"])
    Trainer(first, "pretrain", tmp_path / "run").run()
    changed = load_recipe(RECIPES / "tiny" / "pretrain.toml", [*ARGS, "train.total_samples=64",
                                                               "reduction.text_length=16"])
    with pytest.raises(ClipaError, match="reduction.text_length: the checkpoint .* cannot change on resume"):
        Trainer(changed, "pretrain", tmp_path / "run")
    allowed = load_recipe(RECIPES / "tiny" / "pretrain.toml", [*ARGS, "train.total_samples=128",
                                                               "train.log_every_steps=2"])
    trainer = Trainer(allowed, "pretrain", tmp_path / "run")
    assert trainer.step == 2 and set(trainer.notes) == {"train.total_samples", "train.log_every_steps"}
