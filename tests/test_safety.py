"""Untrusted files and recipes, shared run directories (issue 18): each test is one hole closed.

A checkpoint, a model folder or a recipe may come from someone else: nothing loaded runs code, no
recipe value reaches a shell unannounced, nothing is written outside the run directory the user
named, and two runs never share one run directory.
"""

import functools
import http.server
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from clipa.errors import ClipaError
from clipa.model.build import BUNDLED_CONFIGS
from clipa.model.safeload import load_plain, rng_state, set_rng_state
from clipa.train import checkpoint as ckpt
from clipa.train.checkpoint import CheckpointManager

from conftest import micro_overrides, run_in_process


def one_line_error(result, *needles):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 4-step micro-model run with checkpoints at steps 2 and 4 (shared, never modified)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    result = run_in_process("pretrain", "tiny/pretrain", *micro_overrides(**{"train.total_samples": 128,
                                                                             "checkpoint.every_steps": 2}),
                            "--out", out)
    assert result.returncode == 0, result.stderr
    return out


def copy_run(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run


class RunsAShellCommand:
    """What a hostile checkpoint pickles: unpickling it calls os.system."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


# --------------------------------------------------------------------------- 1: nothing loaded runs code


def test_real_training_state_loads_with_weights_only(trained):
    step = trained / "checkpoints" / "step_000004"
    state = torch.load(step / "state.pt", weights_only=True)
    rng = torch.load(step / "rng_rank0.pt", weights_only=True)
    assert state["step"] == 4 and "optimizer" in state and "data_position" in state
    assert set(rng) >= {"python", "numpy", "torch"}


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.standard_normal(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_plain(tmp_path / "rng.pt"))
    again = (random.random(), np.random.standard_normal(), torch.rand(3))
    assert again[:2] == expected[:2] and torch.equal(again[2], expected[2])


def test_rng_files_of_earlier_versions_still_load(tmp_path):
    """Before this change numpy's state was pickled as an array: allowed (arrays only), and restored."""
    from clipa.model.safeload import load_rng

    np.random.seed(5)
    random.seed(5)
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               tmp_path / "old.pt")
    expected = (random.random(), np.random.rand())
    set_rng_state(load_rng(tmp_path / "old.pt"))
    assert (random.random(), np.random.rand()) == expected


@pytest.mark.parametrize("member", ["state.pt", "rng_rank0.pt"])
def test_a_checkpoint_that_would_run_code_is_refused(trained, tmp_path, cli, member):
    run = copy_run(trained, tmp_path)
    marker = tmp_path / "pwned"
    target = run / "checkpoints" / "step_000004" / member
    torch.save({"optimizer": RunsAShellCommand(f"touch {marker}"), "step": 4}, target)
    for extra in ([], ["--resume", str(run / "checkpoints" / "step_000004")]):
        result = cli("pretrain", "tiny/pretrain", *micro_overrides(**{"train.total_samples": 192}), "--out", run, *extra)
        one_line_error(result, str(target), "refused to load", "posix.system")
        assert not marker.exists()
    assert (run / "checkpoints" / "step_000004").is_dir()  # refused, not deleted


# --------------------------------------------------------------------------- 2: no value reaches a shell unannounced


def test_https_shards_are_fetched_without_a_shell(tmp_path):
    """A quote and $(...) in an https URL are URL characters: the shard is read, nothing is run."""
    from clipa.data.shards import write_synthetic
    from clipa.data.sources import ReadOptions, ShardSource, SkipStats
    from clipa.data.spec import SourceSpec

    info = write_synthetic(tmp_path / "data", 8, 8, 32, 0, 0)
    served = tmp_path / "served"
    served.mkdir()
    name = "a'$(touch${IFS}PWNED)'b.tar"  # in webdataset's `curl '{url}'` this runs touch
    shutil.copy(next((tmp_path / "data").rglob("*.tar")), served / name)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/{name}"
        stats = SkipStats()
        cwd = os.getcwd()
        os.chdir(tmp_path)  # where `touch PWNED` would land
        try:
            records = list(ShardSource(SourceSpec(url, 1.0, "shards"), ReadOptions()).read(0, stats))
        finally:
            os.chdir(cwd)
    finally:
        server.shutdown()
    assert len(records) == 8 and info["samples"] == 8
    assert not list(tmp_path.rglob("PWNED"))


def test_validate_dry_run_and_the_run_log_show_the_commands_a_recipe_runs(tmp_path, cli):
    shards = "pipe:cat /nonexistent/{0..1}.tar::https://example.invalid/x/{0..3}.tar"
    result = cli("validate", "tiny/pretrain", f"data.train={shards}")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("data.train runs:")]
    assert lines[0] == ("data.train runs: sh -c 'cat /nonexistent/{0..1}.tar'   (shell command from the recipe, "
                        "once per shard the braces expand to: 2 commands)")
    assert lines[1].startswith("data.train runs: curl ") and "'https://example.invalid/x/{0..3}.tar'" in lines[1]
    assert "(no shell" in lines[1]
    dry = cli("pretrain", "tiny/pretrain", f"data.train={shards}", "--dry-run", "--out", tmp_path / "run")
    assert dry.returncode == 0, dry.stderr
    flat = " ".join(dry.stdout.split())
    assert "sh -c 'cat /nonexistent/{0..1}.tar'" in flat and "curl --connect-timeout" in flat
    # a real run says it first, before anything else it logs
    run = cli("pretrain", "tiny/pretrain", *micro_overrides(), "data.train=pipe:cat /nonexistent/{0..1}.tar",
              "--out", tmp_path / "run")
    assert run.returncode == 2  # nothing to read: the source is empty
    assert run.stdout.splitlines()[0].startswith("data.train runs: sh -c 'cat /nonexistent/{0..1}.tar'"), run.stdout


@pytest.mark.parametrize("url", ["gs://bucket/{0..3}.tar", "scp://host/x.tar", "hf://org/x.tar"])
def test_schemes_webdataset_would_wrap_in_a_shell_are_refused(cli, url):
    one_line_error(cli("validate", "tiny/pretrain", f"data.train={url}"), "data.train", url, "pipe:")


# --------------------------------------------------------------------------- 3: a model folder runs no code


def bad_config(tmp_path, **tokenizer_kwargs):
    cfg = json.loads((BUNDLED_CONFIGS / "clipa-tiny.json").read_text())
    cfg["text_cfg"].update(hf_tokenizer_name="bert-base-uncased", tokenizer_kwargs=tokenizer_kwargs)
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("key", ["trust_remote_code", "revision", "token"])
def test_unsafe_tokenizer_kwargs_are_refused(tmp_path, cli, key):
    path = bad_config(tmp_path, **{key: True, "clean": "whitespace"})
    one_line_error(cli("validate", "tiny/pretrain", f"model.arch={path}"), f"tokenizer_kwargs.{key}", "refused")


def test_an_exported_model_with_unsafe_tokenizer_kwargs_is_refused(trained, tmp_path, cli):
    export = tmp_path / "export"
    shutil.copytree(trained / "final", export)
    config = json.loads((export / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"].update(hf_tokenizer_name="bert-base-uncased",
                                           tokenizer_kwargs={"trust_remote_code": True})
    (export / "open_clip_config.json").write_text(json.dumps(config))
    one_line_error(cli("zeroshot", "--model", export, "--dataset", "synthetic"), "trust_remote_code", "refused")


# --------------------------------------------------------------------------- 6: nothing written outside the run directory


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "a/b", "..", "."])
def test_a_name_with_path_parts_is_refused(cli, name):
    one_line_error(cli("validate", "tiny/pretrain", f"name={name}"), "name:", "not a plain name")


def test_a_non_empty_out_that_is_not_a_run_directory_is_refused(tmp_path, cli):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "config.toml").write_text("mine = true\n")
    for extra in (["--dry-run"], []):
        result = cli("pretrain", "tiny/pretrain", *micro_overrides(), "--out", folder, *extra)
        one_line_error(result, f"--out: {folder}", "not a clipa run directory")
    assert sorted(p.name for p in folder.iterdir()) == ["config.toml"]
    assert (folder / "config.toml").read_text() == "mine = true\n"
    one_line_error(cli("pretrain", "tiny/pretrain", "--out", folder / "config.toml"), "is a file")


# --------------------------------------------------------------------------- 4: one run per run directory


def _clipa(out, *extra, env=None):
    return subprocess.Popen([sys.executable, "-m", "clipa", "pretrain", "tiny/pretrain", *extra, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


@pytest.mark.slow
def test_a_second_run_on_a_locked_run_directory_exits_2_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    # The holder stops answering after its first step (CLIPA_HANG_AT): it holds the lock as a long run does,
    # without training on a core beside the second run for the whole test.
    first = _clipa(out, *micro_overrides(**{"train.total_samples": 32 * 20, "train.log_every_steps": 1}),
                   env={"CLIPA_HANG_AT": "step1:0"})
    try:
        lock = out / ".clipa-lock"
        deadline = time.time() + 300
        while not (lock.exists() and lock.read_text().strip()) and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        holder = json.loads(lock.read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        second = _clipa(out, *micro_overrides())
        stdout, stderr = second.communicate(timeout=300)
        one_line_error(subprocess.CompletedProcess(second.args, second.returncode, stdout, stderr),
                       f"--out: {out} is in use", f"PID {first.pid} on host {socket.gethostname()}")
    finally:
        first.kill()  # a node failure: no cleanup at all
        first.communicate()
    # The dead holder's record is still in the file; its lock died with it and is taken over.
    assert json.loads((out / ".clipa-lock").read_text())["pid"] == first.pid
    # (the run that takes over is this process: the lock knows processes, not commands)
    third = run_in_process("pretrain", "tiny/pretrain", *micro_overrides(**{"train.total_samples": 64}), "--out", out)
    assert third.returncode == 0, third.stderr
    assert f"took over {out}'s lock from PID {first.pid}" in " ".join(third.stdout.split())
    assert (out / ".clipa-lock").read_text() == ""  # a clean end names no holder


def test_the_lock_is_released_when_a_run_fails_in_this_process(tmp_path):
    from clipa.recipe.index import resolve_path
    from clipa.recipe.load import load_recipe
    from clipa.run.lock import RunLock
    from clipa.train.trainer import Trainer

    recipe = load_recipe(resolve_path("tiny/pretrain"), micro_overrides(**{"init.checkpoint": str(tmp_path / "no")}))
    with pytest.raises(ClipaError, match="init.checkpoint"):
        Trainer(recipe, "pretrain", tmp_path / "run")
    with RunLock(tmp_path / "run"):  # free again
        pass


# --------------------------------------------------------------------------- 5: damage is not a hiccup


def small_checkpoints(directory, steps=(2, 4)):
    manager = CheckpointManager(directory, keep_last=10)
    for step in steps:
        manager.write(step, {"w": torch.full((3,), float(step))}, {"step": step}, "name = 'x'\n")
    return manager


def test_a_damaged_checkpoint_is_moved_aside_by_the_trainer_only(tmp_path):
    manager = small_checkpoints(tmp_path)
    weights = tmp_path / "step_000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    with pytest.warns(UserWarning, match="skipping damaged"):
        assert manager.latest().name == "step_000002"  # looking changes nothing
    assert (tmp_path / "step_000004").is_dir()
    assert manager.latest(quarantine=True).name == "step_000002"
    assert "moved aside to .damaged-step_000004" in manager.moved_aside[0]
    assert (tmp_path / ".damaged-step_000004" / "model.safetensors").stat().st_size == 20  # kept, not deleted
    assert [p.name for p in manager.complete()] == ["step_000002"]


def unreadable(path):
    """Replace a file by a link to one whose every read fails in the kernel (ENODEV): a real OSError."""
    kept = path.with_name(path.name + ".real")
    path.rename(kept)
    path.symlink_to("/proc/self/pagemap")
    return kept


def test_verify_retries_an_unreadable_checkpoint_then_raises_or_reads_it(tmp_path):
    """verify() alone (no run): the retries, the error, a retry that reads. A run stopped by that error, with
    nothing deleted, is the next test."""
    manager = small_checkpoints(tmp_path)
    kept = unreadable(tmp_path / "step_000004" / "model.safetensors")
    with pytest.raises(ClipaError, match=r"cannot read .*step_000004.*tried 2 times"):
        ckpt.verify(tmp_path / "step_000004", tries=2, delay_s=0.01)
    # a moment later it reads again: the retry finds it whole, nothing was skipped
    link = tmp_path / "step_000004" / "model.safetensors"
    threading.Timer(0.3, lambda: (link.unlink(), kept.rename(link))).start()
    assert ckpt.verify(tmp_path / "step_000004", tries=3, delay_s=0.5) is None
    assert manager.latest().name == "step_000004"


def test_a_run_whose_newest_checkpoint_cannot_be_read_stops_and_deletes_nothing(trained, tmp_path, cli):
    run = copy_run(trained, tmp_path)
    unreadable(run / "checkpoints" / "step_000004" / "model.safetensors")
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    result = cli("pretrain", "tiny/pretrain", *micro_overrides(**{"train.total_samples": 192,
                                                                 "checkpoint.every_steps": 1}), "--out", run)
    one_line_error(result, "checkpoint: cannot read", "step_000004", "tried 3 times")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_higher_steps_are_deleted_only_after_an_explicit_roll_back(tmp_path):
    manager = small_checkpoints(tmp_path, (2, 4, 6))
    manager.write(2, {"w": torch.zeros(3)}, {"step": 2}, "name = 'x'\n")  # not a roll-back: 4 and 6 stay
    assert [p.name for p in manager.complete()] == ["step_000002", "step_000004", "step_000006"]
    manager.write(2, {"w": torch.ones(3)}, {"step": 2}, "name = 'x'\n", rolled_back=True)
    assert [p.name for p in manager.complete()] == ["step_000002"]


# --------------------------------------------------------------------------- 9: smaller exits with a traceback


@pytest.mark.parametrize("option", ["--batch-size", "--image-size", "--text-length"])
def test_zero_sizes_in_evaluation_exit_2(trained, cli, option):
    one_line_error(cli("zeroshot", "--model", trained, "--dataset", "synthetic", option, "0"), option)


def test_retrieval_reads_non_utf8_captions_like_training(trained, tmp_path, cli):
    from PIL import Image

    rows = []
    for i in range(3):
        Image.new("RGB", (32, 32), (80 * i, 40, 200)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,".encode() + b"caf\xe9 number " + str(i).encode())  # latin-1, not UTF-8
    (tmp_path / "captions.csv").write_bytes(b"filepath,title\n" + b"\n".join(rows) + b"\n")
    result = cli("retrieval", "--model", trained, "--dataset", "csv", "--data-root", tmp_path / "captions.csv",
                 "--num-workers", "0")
    assert result.returncode == 0, result.stderr
    assert "3 images" in result.stdout


def test_image_tower_cannot_change_on_resume(trained, tmp_path, cli):
    run = copy_run(trained, tmp_path)
    result = cli("pretrain", "tiny/pretrain", *micro_overrides(**{"train.total_samples": 192}),
                 "model.image_tower=vit_tiny_patch16_224", "reduction.image_size=0", "--out", run)
    one_line_error(result, "model.image_tower: the checkpoint", "cannot change on resume")


def test_export_to_a_file_exits_2_and_a_folder_of_an_earlier_name_is_left_alone(trained, tmp_path, cli):
    target = tmp_path / "model.bin"
    target.write_text("keep me")
    one_line_error(cli("export", trained, target), f"OUT: {target} is a file")
    assert target.read_text() == "keep me"
    out = tmp_path / "export"
    leftover = tmp_path / ".export.tmp"  # a killed export of an earlier version, or someone's folder (#34):
    leftover.mkdir()                      # clipa export deletes nothing it did not create in this call
    (leftover / "open_clip_model.safetensors").write_bytes(b"half")
    result = cli("export", trained, out)
    assert result.returncode == 0, result.stderr
    assert (leftover / "open_clip_model.safetensors").read_bytes() == b"half"
    assert (out / "open_clip_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".export.tmp", "export", "model.bin"]  # its own temp: gone
