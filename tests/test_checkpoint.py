"""Nothing finished is ever lost: kills at any point, signals, damaged checkpoints, NaNs, full disks."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import open_clip
import pytest
import torch

from clipa.errors import ClipaError
from clipa.evaluate.models import load_model
from clipa.recipe.load import load_recipe
from clipa.train import checkpoint as ckpt
from clipa.train.checkpoint import CheckpointManager, export_checkpoint
from clipa.train.trainer import NonFiniteError, Trainer

from conftest import MICRO, RECIPES, RESIZE_32, run_in_process

# the 32 px first stage: the export below is checked on 32 px images
ARGS = [MICRO, "train.global_batch_size=32", "train.log_every_steps=1", "data.num_workers=0", "optim.warmup_steps=2",
        "checkpoint.every_steps=2", "checkpoint.keep_last=10", *RESIZE_32]


def arguments(out, steps=8, *extra):
    return ["pretrain", "tiny/pretrain", *ARGS, f"train.total_samples={32 * steps}", *extra, "--out", str(out)]


def command(out, steps=8, *extra):
    return [sys.executable, "-m", "clipa", *arguments(out, steps, *extra)]


# A run that is killed or signalled is a real process; one that is not (the reference run, a resume) runs in
# this process, which saves a process start (~4 CPU-s of imports) each. Both take this process's torch
# thread count, so their losses compare bit for bit.
THREAD_ENV = {"OMP_NUM_THREADS": str(torch.get_num_threads())}


def run(out, steps=8, env=None, *extra):
    """`clipa pretrain`, in a subprocess when `env` asks for a crash (CLIPA_CRASH_AT kills the process),
    else in this process."""
    if env:
        return subprocess.run(command(out, steps, *extra), env=dict(os.environ, **THREAD_ENV, **env),
                              capture_output=True, text=True, timeout=600)
    return run_in_process(*arguments(out, steps, *extra))


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
    """step -> loss, the last value logged for each step (a resumed run re-logs the steps it redoes);
    evaluation rows carry no loss."""
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
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
    if crash.startswith("checkpoint-write"):  # killed after logging steps past its last complete checkpoint
        report_shows_each_step_once(out, straight, tmp_path / "report")


def report_shows_each_step_once(out, straight, report_dir):
    """`clipa report` after a resume: the steps redone after the checkpoint are logged twice; the plots
    and the summary show each once, with the values of the uninterrupted run."""
    from clipa.analysis.report import read_metrics, report, series

    logged = [row["step"] for row in read_metrics(out) if "loss" in row]
    assert len(logged) > len(set(logged)), logged  # the case this guards: re-logged steps exist
    summary, written = report(out, report_dir)
    assert series(read_metrics(out), "loss") == series(read_metrics(straight), "loss")
    last = max(logged)
    assert f"steps {last}," in summary and report_dir / "loss.png" in written, (summary, written)


def test_sigkill_at_an_arbitrary_moment_then_resume(tmp_path, straight):
    out = tmp_path / "run"
    proc = subprocess.Popen(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, **THREAD_ENV))
    wait_for_logged_steps(out, 5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert run(out).returncode == 0
    assert trajectory(out) == trajectory(straight)


def test_sigterm_saves_exits_zero_and_resumes(tmp_path, straight):
    out = tmp_path / "run"
    proc = subprocess.Popen(command(out, 8, "checkpoint.every_steps=0"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, **THREAD_ENV))
    wait_for_logged_steps(out, 2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "stopped by SIGTERM" in stdout and "Resume by running the same command again" in stdout
    saved = CheckpointManager(out / "checkpoints").latest()
    assert saved is not None and 2 <= int(saved.name.split("_")[1]) < 8
    assert run(out, 8, None, "checkpoint.every_steps=0").returncode == 0
    assert trajectory(out) == trajectory(straight)


def start(out, *extra):
    return subprocess.Popen(command(out, 8, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, **THREAD_ENV, PYTHONUNBUFFERED="1"))


def test_sigint_mid_run_saves_and_exits_zero(tmp_path):
    out = tmp_path / "run"
    proc = start(out, "checkpoint.every_steps=0")
    wait_for_logged_steps(out, 1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
    assert "stopped by SIGINT" in stdout
    saved = CheckpointManager(out / "checkpoints").latest()
    assert saved is not None and ckpt.verify(saved) is None


def test_sigint_during_setup_exits_zero_without_traceback(tmp_path):
    out = tmp_path / "run"
    proc = start(out)
    deadline = time.time() + 300
    while not out.exists() and proc.poll() is None and time.time() < deadline:  # made early in the setup
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert "stopped by SIGINT" in stdout


def test_a_second_signal_exits_at_once(tmp_path):
    out = tmp_path / "run"
    proc = start(out, "checkpoint.every_steps=0")
    wait_for_logged_steps(out, 1)
    # Two different signals: two of the same kind sent together may be merged into one by the kernel.
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)
    t0 = time.time()
    proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and time.time() - t0 < 10
    assert not (out / "final").exists()


def test_damaged_checkpoint_is_never_chosen(tmp_path, straight):
    manager = CheckpointManager(straight / "checkpoints")
    newest = manager.latest()
    assert newest.name == "step_000008"
    copy = tmp_path / "checkpoints"
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

    def __call__(self, micro_batches, loss_fn=None):
        loss = self.inner(micro_batches, loss_fn)
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


@pytest.mark.slow
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


def copy_run(straight, dest, up_to_step):
    """A copy of the straight run as it was after `up_to_step` (later checkpoints and final/ removed)."""
    shutil.copytree(straight, dest)
    shutil.rmtree(dest / "final")
    for path in (dest / "checkpoints").glob("step_*"):
        if int(path.name.split("_")[1]) > up_to_step:
            shutil.rmtree(path)
    (dest / "checkpoints" / "LATEST").write_text(f"step_{up_to_step:06d}\n")
    return dest


def _limit_file_size(limit):
    """In the child: files may not grow past `limit` bytes, and the write fails with EFBIG (as a full
    disk fails with ENOSPC) instead of SIGXFSZ killing the process."""

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_real_write_failure_keeps_earlier_checkpoints(tmp_path, straight):
    # state.pt (AdamW's two moments) is about twice model.safetensors: with files limited to halfway
    # between, the weights are written and torch.save fails, which reports it as RuntimeError, not OSError.
    out = copy_run(straight, tmp_path / "run", up_to_step=4)
    before = {p.name: p.read_bytes() for p in (out / "checkpoints" / "step_000004").iterdir()}
    weights, state = (before[name] for name in ("model.safetensors", "state.pt"))
    assert len(weights) < len(state)
    limit = (len(weights) + len(state)) // 2
    proc = subprocess.run(command(out, 8), env=dict(os.environ, **THREAD_ENV), capture_output=True,
                          text=True, timeout=600, preexec_fn=_limit_file_size(limit))
    assert proc.returncode == 2, proc.stderr
    error = proc.stderr.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert error.startswith("error: checkpoint: could not write") and "step_000006" in error
    assert "are intact" in error and "checkpoint.keep_last" in error
    directory = out / "checkpoints"
    assert sorted(p.name for p in directory.iterdir()) == ["LATEST", "step_000002", "step_000004"]
    assert (directory / "LATEST").read_text() == "step_000004\n"
    assert {p.name: p.read_bytes() for p in (directory / "step_000004").iterdir()} == before
    assert ckpt.verify(directory / "step_000004") is None


def test_explicit_resume_rolls_back_and_replays_bitwise(tmp_path, straight):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    logged = len((out / "metrics.jsonl").read_text().splitlines())
    result = run(out, 8, None, "--resume", str(out / "checkpoints" / "step_000002"))
    assert result.returncode == 0, result.stderr
    assert "step_000002 (--resume) at step 2/8" in result.stdout
    assert "newer checkpoints (step_000004, step_000006, step_000008)" in " ".join(result.stdout.split())
    replayed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()[logged:]]
    original = trajectory(straight)
    # CPU fp32: the same bits from step 3 on, as the uninterrupted run.
    assert [(r["step"], r["loss"]) for r in replayed] == [(s, original[s]) for s in range(3, 9)]
    assert (out / "checkpoints" / "LATEST").read_text().strip() == "step_000008"
    assert ckpt.verify(out / "checkpoints" / "step_000008") is None


def test_a_state_file_missing_an_entry_every_checkpoint_holds_is_one_line_not_a_silent_resume(tmp_path, straight):
    """A state.pt without its scheduler (a damaged file) stops the resume with one line naming the entry;
    restoring parts by name must not quietly keep the freshly built scheduler."""
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    state_file = out / "checkpoints" / "step_000002" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    del state["scheduler"]
    torch.save(state, state_file)
    result = run(out, 8, None, "--resume", str(out / "checkpoints" / "step_000002"))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert 'state.pt has no "scheduler" entry' in errors[0] and "step_000002" in errors[0], errors


def test_resume_from_a_run_directory_at_its_end_rewrites_nothing(tmp_path, straight):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    newest = out / "checkpoints" / "step_000008" / "state.pt"
    stamp = (newest.stat().st_ino, newest.stat().st_mtime_ns)
    result = run(out, 8, None, "checkpoint.keep_last=1", "--resume", str(out))
    assert result.returncode == 0, result.stderr
    assert "step_000008 (--resume) at step 8/8" in " ".join(result.stdout.split())
    # Nothing trained since step 8 was loaded: it is not rewritten (with keep_last=1 a kill during a
    # rewrite would leave no checkpoint at all).
    assert (newest.stat().st_ino, newest.stat().st_mtime_ns) == stamp


def test_bad_resume_paths_exit_2_with_one_line(tmp_path, straight, cli):
    damaged = tmp_path / "step_000004"
    shutil.copytree(straight / "checkpoints" / "step_000004", damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    cases = {damaged: "is damaged", straight / "final": "is not a step checkpoint",
             tmp_path / "missing": "does not exist"}
    for path, problem in cases.items():
        result = cli("pretrain", "tiny/pretrain", *ARGS, "--out", tmp_path / "run", "--resume", path)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith(f"error: --resume: {path}") and problem in result.stderr, result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_saving_a_step_again_replaces_it_and_drops_an_abandoned_trajectory(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    for step, value in ((4, 1.0), (6, 2.0)):
        manager.write(step, {"w": torch.full((3,), value)}, {"step": step}, "name = 'x'\n")
    # A rollback to step 4 continues: step 4 is written again; step 6 belonged to the old trajectory.
    manager.write(4, {"w": torch.full((3,), 3.0)}, {"step": 4}, "name = 'x'\n", rolled_back=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "step_000004"]
    assert (tmp_path / "LATEST").read_text() == "step_000004\n"
    model, state, rng = ckpt.load_state(tmp_path / "step_000004")
    assert model["w"].tolist() == [3.0, 3.0, 3.0] and state == {"step": 4} and rng is not None


def test_a_save_killed_between_its_renames_is_recovered(tmp_path):
    # The same step saved again moves the old directory aside first; a kill right after that rename
    # leaves only `.old-step_4` (and the temporary directory). The next start puts it back.
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.write(4, {"w": torch.full((3,), 1.0)}, {"step": 4}, "name = 'x'\n")
    (tmp_path / "step_000004").rename(tmp_path / ".old-step_000004")
    assert CheckpointManager(tmp_path).latest() is None  # looking does not change anything...
    CheckpointManager(tmp_path).recover()  # ...the trainer's start does
    assert CheckpointManager(tmp_path).latest().name == "step_000004"
    assert ckpt.load_state(tmp_path / "step_000004")[0]["w"].tolist() == [1.0, 1.0, 1.0]
    # A kill after the second rename: the new one is in place, the old one is only deleted.
    (tmp_path / ".old-step_000004").mkdir()
    CheckpointManager(tmp_path).recover()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "step_000004"]


@pytest.mark.slow
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


def test_skipped_fp16_step_backs_off_the_loss_scale_and_clipping_still_works():
    # accelerate makes no grad scaler on CPU, so this drives torch's real GradScaler the way the
    # trainer does: scaled backward, unscale_ (clipping), a non-finite step skipped, the next clipped.
    from clipa.train.parallel import skip_scaled_update

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    x = torch.randn(8, 4)

    def backward(poison):
        optimizer.zero_grad(set_to_none=True)
        loss = model(x).square().mean() * (float("inf") if poison else 1.0)
        scaler.scale(loss).backward()

    for clip in (True, False):
        scale = scaler.get_scale()
        backward(poison=True)
        if clip:
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            assert not torch.isfinite(norm)
        before = [p.detach().clone() for p in model.parameters()]
        skip_scaled_update(scaler, optimizer, unscaled=clip)
        assert scaler.get_scale() == scale * 0.5  # backed off, as GradScaler.step + update would
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

    backward(poison=False)  # the next step clips and steps normally (no "unscale_() has already been called")
    scaler.unscale_(optimizer)
    assert torch.isfinite(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
    scaler.step(optimizer)
    scaler.update()
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_export_command_writes_an_open_clip_directory(tmp_path, straight, cli):
    result = cli("export", straight, tmp_path / "newest")  # a run directory: its newest checkpoint
    assert result.returncode == 0, result.stderr
    assert f"local-dir:{tmp_path / 'newest'}" in " ".join(result.stdout.split())
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'newest'}")
    final, _, _ = open_clip.create_model_and_transforms(f"local-dir:{straight / 'final'}")
    for (name, a), b in zip(model.state_dict().items(), final.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # step 8 is where the run ended
    result = cli("export", straight / "final", tmp_path / "again")
    assert result.returncode == 2 and "is not a step checkpoint" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# A 2-process run's explicit --resume (random patch masks, each rank's data position, bitwise) is in
# tests/test_multiprocess_gaps.py, after its SIGTERM stop; the same command's resume in tests/test_agree.py.
