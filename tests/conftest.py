import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# The suite tests CPU behaviour (bitwise resume, 2-process gloo groups on one device, fp32 timings).
# On a machine with CUDA the trainer would move to the GPU and those tests would fail for the wrong
# reason, so the GPUs are hidden from this process and every process it starts, before torch looks
# for them. Tests marked `gpu` get them back through the `gpu_env` fixture (`pytest --gpu`).
GPU_DEVICES = os.environ.get("CUDA_VISIBLE_DEVICES")
os.environ["CUDA_VISIBLE_DEVICES"] = ""

# Offline and isolated, for this process and every process it starts, before huggingface_hub, timm or
# torch read their settings: no test may download, read a developer's real model cache, or log to a
# real tracker account. A test that needs a cache builds its own (tests/test_published.py).
ISOLATED_HOME = tempfile.mkdtemp(prefix="clipa-tests-home-")
# Removed when the process ends: a suite that left its caches behind filled CI's disk (about 1,200 of them).
atexit.register(shutil.rmtree, ISOLATED_HOME, ignore_errors=True)
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                  HF_HOME=os.path.join(ISOLATED_HOME, "hf"), TORCH_HOME=os.path.join(ISOLATED_HOME, "torch"),
                  XDG_CACHE_HOME=os.path.join(ISOLATED_HOME, "cache"), WANDB_MODE="offline",
                  WANDB_DIR=os.path.join(ISOLATED_HOME, "wandb"))
for credential in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "WANDB_ENTITY", "WANDB_PROJECT",
                   "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME",
                   "MLFLOW_TRACKING_PASSWORD", "CLIPA_DATA"):
    os.environ.pop(credential, None)

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"

# Two cores here: keep torch from oversubscribing when pytest and a child process both run; under
# pytest-xdist (`-n 2`, as CI runs) the workers share the cores between them.
THREADS = max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
torch.set_num_threads(THREADS)
# The processes a test starts keep torch's default (all cores): giving them the worker's one thread
# (OMP_NUM_THREADS) made CI no faster (`.ci/run` 699 s with and without it, 2026-12-07). But they must
# not spin: OpenMP threads busy-wait at every barrier by default, and beside the other worker's process
# a 2-thread `clipa pretrain` of clipa-tiny then ran 3-5x slower (52 s against 17 s; alone, 9 s either way).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def run_cli(*args, cwd=None, timeout=900):
    """Run the installed `clipa` entry point in a subprocess, as a user would."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "clipa", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_torchrun(*args, cwd=None, timeout=600, env=None, check=True):
    """A real 2-process gloo group via torchrun; `--standalone` rendezvouses on a free port, so a port
    still held by an earlier group cannot fail the run. Fails the test with the processes' output
    (unless `check` is false: a run that is meant to die). `env`: extra variables."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_in_process(*args):
    """Invoke the Typer app in this process (fast); same exit codes and streams as the command."""
    from typer.testing import CliRunner

    from clipa.cli.app import app

    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Result(result.exit_code, result.stdout, result.stderr)


@pytest.fixture
def cli():
    return run_in_process


def tiny_overrides(**extra):
    """A few-second training run of the tiny model."""
    base = {"train.global_batch_size": 32, "train.total_samples": 32 * 6, "train.log_every_steps": 2,
            "optim.warmup_steps": 1, "data.num_workers": 0, "checkpoint.every_steps": 0}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


# tiny/pretrain's first stage as shipped before issue #33: resized to 32 px (16 patches) instead of 64 px with
# 75% of the patches masked. For the tests whose subject is a change of image size between stages (position
# embeddings interpolated 4x4 -> 8x8, per-stage shapes in exports and model cards, moments of resized
# tensors), a 32 px stage's own numbers, or a tower that cannot mask (a timm CNN); the tests about the
# shipped recipe's defaults use it as it is.
RESIZE_32 = ["reduction.image=resize", "reduction.image_size=32", "reduction.mask_ratio=0"]


# clipa-micro (a bundled config): both towers, clipa-tiny's tokenizer, resolution and patch size, ~0.8 M
# parameters, so a checkpoint with AdamW's state is ~10 MB instead of ~100 MB. For the tests whose subject
# does not depend on the model's size (checkpoints, resume, signals, locks, agreement, trackers,
# distributed equality); tests about the tiny recipes or about learning keep clipa-tiny.
MICRO = "model.arch=clipa-micro"


def micro_overrides(**extra):
    """tiny_overrides with the micro model."""
    return tiny_overrides(**{"model.arch": "clipa-micro", **extra})


def pytest_addoption(parser):
    parser.addoption("--gpu", action="store_true", help="run the tests marked gpu (needs CUDA)")


# The files that take longest, longest first (worker-seconds of `pytest -n 2 --durations=0`, 2026-12-07).
# CI runs `-n 2 --dist loadfile --no-loadscope-reorder`: each file goes whole to the next free worker in
# this order, so the long files start first and the many short ones fill in at the end. xdist's own order
# (most tests first) started the two longest files, the quickstart and the end-to-end pipeline (~100 s
# each), last, and one worker ran them alone while the other waited.
LONGEST_FIRST = ("test_foundation.py", "test_end_to_end.py", "test_checkpoint.py", "test_published.py",
                 "test_agree.py", "test_fsdp.py", "test_multiprocess_gaps.py", "test_gpu_check.py",
                 "test_evaluate.py", "test_mixed_precision.py", "test_distributed.py", "test_cli.py")


def _longest_first(items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


def pytest_collection_modifyitems(config, items):
    _longest_first(items)
    if config.getoption("--gpu"):
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run `python -m pytest --gpu -m gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gpu_env():
    """The environment with the machine's GPUs visible again, for a `gpu` test's subprocesses. With
    --gpu on a machine without CUDA the test fails instead of passing without having run."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if GPU_DEVICES is None:
        env.pop("CUDA_VISIBLE_DEVICES")
    else:
        env["CUDA_VISIBLE_DEVICES"] = GPU_DEVICES
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"], env=env,
                           capture_output=True, text=True)
    assert probe.returncode == 0 and int(probe.stdout.strip() or 0) > 0, "--gpu given, but torch sees no CUDA device"
    return env


# --------------------------------------------------------------------------- skips CI does not accept
# A test that skips because something it needs is missing (a package, Debian's openclipart drawings) is
# green, so an apt outage or a dropped extra would hide it. CLIPA_REQUIRE names what must be present:
# a skip whose reason names one of them becomes a failure. `all` turns every skip into a failure except
# those on SKIPS_ALLOWED: what no CPU machine can have, and a package deliberately left out of the dev
# extra for its weight (CLIP_benchmark pulls a 104 MB wheel of Java jars; its result schema is pinned
# by a test that always runs). CI sets CLIPA_REQUIRE=all.
SKIPS_ALLOWED = ("needs a CUDA GPU", "not a dev dependency")


def _required() -> set[str]:
    return {name.strip().lower() for name in os.environ.get("CLIPA_REQUIRE", "").split(",") if name.strip()}


def _skip_is_refused(reason: str) -> bool:
    required = _required()
    if not required or any(allowed in reason for allowed in SKIPS_ALLOWED):
        return False
    return "all" in required or any(name in reason.lower() for name in required)


def _refuse_skip(report) -> None:
    """Turn a skipped report into a failure when CLIPA_REQUIRE asks for what the skip says is missing."""
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if _skip_is_refused(reason):
        report.outcome = "failed"
        report.longrepr = f"skipped, but CLIPA_REQUIRE={os.environ['CLIPA_REQUIRE']} requires it: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _refuse_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield  # a module-level pytest.importorskip skips the whole module at collection
    _refuse_skip(outcome.get_result())
