"""Untrusted files and recipes, round two (issue 34): each test is one hole closed, reproduced first.

Real inputs throughout: real pickles, a real offline Hugging Face cache, a real local socket server,
real symlinks. Each test names the finding it closes.
"""

import collections
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides


def one_line_error(result, *needles):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------- 1: a pipe: hidden in braces


@pytest.mark.parametrize("where", ["validate", "dry-run", "pretrain", "mixture", "inspect"])
def test_a_pipe_command_hidden_in_braces_is_refused_and_never_runs(tmp_path, cli, monkeypatch, where):
    monkeypatch.chdir(tmp_path)  # where `touch PWNED` lands if it runs
    hidden = f"{{pipe:touch PWNED,{tmp_path}/00000.tar}}"
    train = f"{tmp_path}/a.tar@0.7::{hidden}@0.3" if where == "mixture" else hidden
    argv = {"validate": ["validate", "tiny/pretrain", f"data.train={train}"],
            "mixture": ["validate", "tiny/pretrain", f"data.train={train}"],
            "dry-run": ["pretrain", "tiny/pretrain", f"data.train={train}", "--dry-run", "--out", tmp_path / "r"],
            "pretrain": ["pretrain", "tiny/pretrain", *tiny_overrides(), f"data.train={train}", "--out", tmp_path / "r"],
            "inspect": ["data", "inspect", train, "--sheet-count", "0"]}[where]
    key = "PATH" if where == "inspect" else "data.train"
    one_line_error(cli(*argv), f"{key}: ", 'expands to "pipe:touch PWNED"', "write the scheme before the braces")
    assert not (tmp_path / "PWNED").exists()


def test_inspect_announces_the_commands_it_runs(tmp_path, cli):
    result = cli("data", "inspect", "pipe:cat /nonexistent/{0..1}.tar", "--sheet-count", "0")
    assert result.stdout.splitlines()[0].startswith("PATH runs: sh -c 'cat /nonexistent/{0..1}.tar'"), result.stdout


def test_control_characters_in_an_announced_command_are_shown_escaped(cli):
    """An ESC sequence plus a carriage return would erase the announced line on a terminal."""
    result = cli("validate", "tiny/pretrain", "data.train=pipe:cat x.tar; touch PWNED\x1b[2K\r/data/{0..1}.tar")
    assert result.returncode == 0, result.stderr
    announced = [line for line in result.stdout.splitlines() if line.startswith("data.train runs:")]
    assert len(announced) == 1 and "touch PWNED\\x1b[2K\\r/data/" in announced[0], result.stdout
    assert "\x1b" not in result.stdout and "\r" not in result.stdout
    bad = cli("validate", "tiny/pretrain", "data.train=gs://b\x1b[2K/x.tar")
    assert "\x1b" not in bad.stderr and "\\x1b" in one_line_error(bad, "data.train")


# --------------------------------------------------------------------------- 2 and 3: weights and tokenizers


class FailsWhenRestricted:
    """A tensor pickled with a 3-item BUILD state. The plain unpickler hands it to Tensor.__setstate__, which
    accepts it; torch's restricted unpickler calls Tensor.set_(*state), which raises TypeError: the error on
    which open_clip's load_state_dict retries with the plain unpickler."""

    def __reduce_ex__(self, protocol):
        rebuild, args = torch.zeros(1).__reduce_ex__(2)
        return rebuild, args, (False, None, collections.OrderedDict())


class RunsAShellCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def evil_weights(path, marker):
    torch.save({"a": FailsWhenRestricted(), "b": RunsAShellCommand(f"touch {marker}")}, path)
    return path


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A real offline Hugging Face cache: an open_clip repository whose weights are the pickle above, one whose
    config asks for trust_remote_code, one whose tokenizer repository ships code; plus the same pickle as a
    plain file and as the .bin of an exported model folder."""
    from test_published import put_in_cache

    from conftest import run_in_process

    tmp = tmp_path_factory.mktemp("hub")
    marker = tmp / "PWNED"
    run = tmp / "run"
    assert run_in_process("pretrain", "tiny/pretrain", *tiny_overrides(), "--out", run).returncode == 0
    config = json.loads((run / "final" / "open_clip_config.json").read_text())
    evil = evil_weights(tmp / "evil.bin", marker)
    export = tmp / "evil_export"
    export.mkdir()
    (export / "open_clip_config.json").write_text(json.dumps(config))
    shutil.copy(evil, export / "open_clip_pytorch_model.bin")
    hf_home = tmp / "hf"
    put_in_cache(hf_home, "clipa-test/evil-bin", {"open_clip_config.json": json.dumps(config).encode(),
                                                  "open_clip_pytorch_model.bin": evil})
    weights = run / "final" / "open_clip_model.safetensors"
    remote = json.loads(json.dumps(config))
    remote["model_cfg"]["text_cfg"].update(hf_tokenizer_name="clipa-test/tokenizer",
                                           tokenizer_kwargs={"trust_remote_code": True})
    put_in_cache(hf_home, "clipa-test/remote-kwargs", {"open_clip_config.json": json.dumps(remote).encode(),
                                                       "open_clip_model.safetensors": weights})
    code = json.loads(json.dumps(config))
    code["model_cfg"]["text_cfg"].update(hf_tokenizer_name="clipa-test/tokenizer-with-code")
    put_in_cache(hf_home, "clipa-test/code-tokenizer", {"open_clip_config.json": json.dumps(code).encode(),
                                                        "open_clip_model.safetensors": weights})
    put_in_cache(hf_home, "clipa-test/tokenizer-with-code", {
        "tokenizer_config.json": json.dumps({"auto_map": {"AutoTokenizer": ["tok.Tok", None]}}).encode(),
        "tok.py": f"import os\nos.system('touch {marker}')\n".encode()})
    return {"tmp": tmp, "marker": marker, "evil": evil, "export": export, "hf_home": hf_home}


def test_the_crafted_pickle_runs_its_command_in_a_loader_that_falls_back(hub, tmp_path, monkeypatch):
    """The premise: open_clip's loader, on a torch whose plain torch.load is unrestricted (< 2.6, stood in for
    by TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD), runs the command; torch's restricted loader raises TypeError."""
    from open_clip.factory import load_state_dict

    marker = tmp_path / "ran"
    evil = evil_weights(tmp_path / "evil.bin", marker)
    with pytest.raises(TypeError):
        torch.load(evil, weights_only=True)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.warns(UserWarning, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        load_state_dict(str(evil))  # the restricted load raised TypeError; the retry ran the command
    assert marker.exists()


def test_a_weights_file_never_reaches_a_loader_that_falls_back(hub):
    """Every weights path, with torch's plain load unrestricted as before 2.6: exit 2 naming the file, no command."""
    from test_published import hf_env, run_commands

    tmp, evil = hub["tmp"], hub["evil"]
    fast = tiny_overrides()
    commands = [["zeroshot", "--model", "clipa-tiny", "--pretrained", evil, "--dataset", "synthetic"],
                ["pretrain", "tiny/pretrain", *fast, f"init.checkpoint={evil}", "--out", tmp / "r1"],
                ["pretrain", "tiny/pretrain", *fast, f"model.image_init={evil}", "--out", tmp / "r2"],
                ["zeroshot", "--model", hub["export"], "--dataset", "synthetic"],
                ["zeroshot", "--model", "hf-hub:clipa-test/evil-bin", "--dataset", "synthetic"]]
    results = run_commands(tmp, hf_env(hub["hf_home"], TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1"), commands)
    for command, result in zip(commands, results):
        line = one_line_error(result, "cannot read weights", "TypeError")
        assert "evil.bin" in line or "open_clip_pytorch_model.bin" in line, (command, line)
    assert not hub["marker"].exists()


def test_hub_models_get_the_tokenizer_checks_of_local_ones(hub):
    """hf-hub: configs' tokenizer_kwargs pass the allowlist, and a tokenizer repository shipping code is refused."""
    from test_published import hf_env, run_commands

    commands = [["zeroshot", "--model", "hf-hub:clipa-test/remote-kwargs", "--dataset", "synthetic"],
                ["zeroshot", "--model", "hf-hub:clipa-test/code-tokenizer", "--dataset", "synthetic"]]
    kwargs, code = run_commands(hub["tmp"], hf_env(hub["hf_home"]), commands)
    one_line_error(kwargs, "tokenizer_kwargs.trust_remote_code is refused")
    one_line_error(code, '"clipa-test/tokenizer-with-code" is refused', "tok.py")
    assert not hub["marker"].exists()


# --------------------------------------------------------------------------- 4, 5, 6: the run directory and its lock


def marked_run(tmp_path):
    from clipa.run.lock import mark_run_dir

    run = tmp_path / "run"
    mark_run_dir(run)
    return run


@pytest.mark.parametrize("entry", [".clipa-lock", "config.toml", "metrics.jsonl", "checkpoints", "checkpoints/step_2"])
def test_a_symlink_in_a_run_directory_is_refused_and_its_target_untouched(tmp_path, cli, entry):
    run = marked_run(tmp_path)
    target = tmp_path / "precious"
    target.mkdir() if entry.startswith("checkpoints") else target.write_text("keep me\n")
    (run / "checkpoints").mkdir(exist_ok=entry != "checkpoints") if entry != "checkpoints" else None
    (run / entry).symlink_to(target)
    for extra in (["--dry-run"], []):
        one_line_error(cli("pretrain", "tiny/pretrain", *tiny_overrides(), "--out", run, *extra),
                       f"--out: {run / entry} is a symbolic link")
    assert target.is_dir() if entry.startswith("checkpoints") else target.read_text() == "keep me\n"


@pytest.mark.parametrize("name", [".clipa-lock", "config.toml", "metrics.jsonl"])
def test_run_files_are_opened_through_no_symlink(tmp_path, name):
    """Past the check (a link made after it): the open itself refuses the link, the target is untouched."""
    from clipa.errors import ClipaError
    from clipa.run.lock import RunLock, write_run_file
    from clipa.train.metrics import RunLog

    run = marked_run(tmp_path)
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    (run / name).symlink_to(target)
    with pytest.raises(ClipaError, match=f"{run / name} is a symbolic link"):
        if name == ".clipa-lock":
            RunLock(run).acquire()
        elif name == "config.toml":
            write_run_file(run / name, "name = 'x'\n")
        else:
            RunLog(run / name, 1, "x", enabled=True)
    assert target.read_text() == "keep me\n"


def test_a_folder_that_looks_like_a_run_but_is_not_marked_is_refused(tmp_path, cli):
    from clipa.run.lock import check_run_dir, prepare_run_dir

    folder = tmp_path / "project"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.toml").write_text("mine = true\n")
    one_line_error(cli("pretrain", "tiny/pretrain", *tiny_overrides(), "--out", folder, "--dry-run"),
                   f"--out: {folder} is not empty and is not a clipa run directory (it has no .clipa-run)")
    assert (folder / "config.toml").read_text() == "mine = true\n"
    run = tmp_path / "run"
    prepare_run_dir(run)  # what the trainer does with a new (or empty) --out
    (run / "config.toml").write_text("name = 'x'\n")
    check_run_dir(run)  # marked: taken as a run directory
    assert sorted(p.name for p in run.iterdir()) == [".clipa-run", "config.toml"]


def test_the_lock_dies_with_its_holder_not_with_a_forked_worker(tmp_path):
    """A DataLoader worker forked after the lock was taken must not keep the run locked once rank 0 is gone."""
    import signal

    from clipa.run.lock import RunLock

    run = marked_run(tmp_path)
    lock = RunLock(run).acquire()
    ready, started = os.pipe()
    child = os.fork()
    if child == 0:  # the worker: says it started, then is blocked in a read for ever
        try:
            os.write(started, b"x")
            os.read(os.pipe()[0], 1)
        finally:
            os._exit(0)
    try:
        assert os.read(ready, 1) == b"x"
        os.close(lock.fd)  # the holder dies (SIGKILL: no unlock, the kernel closes its descriptors)
        lock.fd = None
        RunLock(run).acquire().release()  # the rerun takes the lock
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(ready), os.close(started)


# --------------------------------------------------------------------------- 8: the starting weights inside the agreement


@pytest.mark.slow  # a real 2-process group
def test_a_bad_init_checkpoint_ends_both_processes_with_exit_2_and_the_same_line(tmp_path):
    from test_agree import launch_two

    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(2048))
    procs = launch_two(["pretrain", "tiny/pretrain", *tiny_overrides(), f"init.checkpoint={junk}",
                        "train.dist_timeout_s=60", "--out", tmp_path / "run"], tmp_path)
    results = [proc.communicate(timeout=120) + (proc.returncode,) for proc in procs]
    lines = [[line for line in stderr.splitlines() if line.startswith("error:")] for _, stderr, _ in results]
    assert [code for _, _, code in results] == [2, 2], results
    assert all(len(ls) == 1 and "Traceback" not in stderr for ls, (_, stderr, _) in zip(lines, results)), results
    assert lines[0] == lines[1] and f"{junk}: " in lines[0][0], lines


# --------------------------------------------------------------------------- 7: a stalled source


@pytest.fixture
def silent_server():
    """A local HTTP port that accepts connections and never answers."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_a_read_from_a_stalled_command_ends_and_its_process_group_is_killed():
    import time

    from clipa.data.urls import open_shard

    stream = open_shard("pipe:sleep 60 | cat", timeout=0.5)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"no data for 0.5 s \(data.read_timeout_s\)"):
        stream.read(512)
    assert time.monotonic() - start < 3
    stream.close()
    def alive() -> list[str]:  # the shell's children not yet gone (zombies waiting to be reaped are gone)
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == stream.proc.pid and fields[0] != "Z":
                found.append(stat.parent.name)
        return found

    deadline = time.monotonic() + 5  # SIGKILL is delivered at once, but a busy machine may take a moment to reap
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive()


def test_a_source_that_accepts_and_never_answers_ends_the_run_with_exit_2(silent_server, cli, tmp_path):
    import time

    start = time.monotonic()
    result = cli("pretrain", "tiny/pretrain", *tiny_overrides(), f"data.train={silent_server}/0.tar",
                 "data.read_timeout_s=1", "--out", tmp_path / "run")
    one_line_error(result, "data.train", "no data for 1 s (data.read_timeout_s)")
    assert time.monotonic() - start < 60
    assert "--speed-time 1" in result.stdout  # curl's own bound, in the announced command


def test_read_timeout_must_be_positive(cli):
    one_line_error(cli("validate", "tiny/pretrain", "data.read_timeout_s=0"), "data.read_timeout_s: must be in")


# --------------------------------------------------------------------------- 11: clipa data synth OUT is a folder


@pytest.mark.parametrize("name", ["pipe:touch PWNED", "v2:data", "50%d"])
def test_synth_out_is_a_plain_folder(tmp_path, cli, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    result = cli("data", "synth", name, "--num-samples", "3", "--shard-size", "2", "--eval-per-class", "0",
                 "--image-size", "16")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "PWNED").exists()
    assert sorted(p.name for p in (tmp_path / name / "train").iterdir()) == ["00000.tar", "00001.tar"]


# --------------------------------------------------------------------------- 9: images between PIL's limit and twice it


def png_header_only(width, height):
    """A PNG whose header says width x height, in a few dozen bytes (its body would be a bomb)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_an_image_between_pils_limit_and_twice_it_is_refused_in_every_decode_path():
    import io
    import warnings

    import numpy as np
    from PIL import Image

    from clipa.data.decode import decode_crop, decode_image, open_rgb
    from clipa.data.transforms import train_transform
    from clipa.recipe.schema import AugmentConfig

    bomb = png_header_only(10_000, 10_000)  # 100 Mpx: above PIL's 89.5 Mpx warning, below its 179 Mpx error
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Image.open(io.BytesIO(bomb))  # PIL alone: a warning, then it would decode 0.3 GB
    assert any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught)
    for decode in (lambda: decode_image(bomb), lambda: open_rgb(bomb, 64),
                   lambda: decode_crop(bomb, train_transform(32, AugmentConfig()), np.random.default_rng(0))):
        with pytest.raises(Image.DecompressionBombError, match=r"10000x10000 = 100000000 pixels.*data.max_image_pixels"):
            decode()
    small = png_header_only(100, 100)
    with pytest.raises(Image.DecompressionBombError, match="over the limit of 4096"):
        decode_image(small, max_pixels=4096)  # the recipe key sets the limit


# --------------------------------------------------------------------------- 10: special files named by a CSV


@pytest.fixture
def alarm():
    """Fail, not hang: a read that blocks for ever raises after 20 s."""
    import signal

    def hung(*_):
        pytest.fail("blocked for ever")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_csv_rows_naming_special_files_are_skipped_not_waited_on(tmp_path, alarm):
    from PIL import Image

    from clipa.data.decode import read_bytes
    from clipa.data.sources import CsvSource, ReadOptions, SkipStats
    from clipa.data.spec import parse_train

    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.truncate(300 << 20)  # sparse: 300 MB that take no disk
    csv = tmp_path / "rows.csv"
    csv.write_text(f"filepath,title\n/dev/zero,zero\n{fifo},fifo\n{tmp_path}/ok.png,ok\n")
    source = CsvSource(parse_train(str(csv))[0], ReadOptions())
    stats = SkipStats()
    stats.quiet = True
    got = [record for unit in range(len(source)) for record in source.read(unit, stats)]
    assert [r.caption for r in got] == ["ok"] and stats.counts["missing_file"] == 2
    for path in ("/dev/zero", fifo, big):
        with pytest.raises(OSError, match="not a regular file|over the"):
            read_bytes((str(path), 0, -1))


def test_a_memory_error_on_one_evaluation_image_skips_it(monkeypatch):
    from clipa.evaluate import datasets

    def exhausted(*_, **__):
        raise MemoryError

    monkeypatch.setattr(datasets, "decode_image", exhausted)
    assert datasets.EvalImages([(("x.png", 0, -1), 0)], transform=lambda image: image)[0] is None


# --------------------------------------------------------------------------- 12: clipa export deletes nothing it did not create


def _export(out, **kw):
    from clipa.model.weights import export_open_clip

    return export_open_clip(torch.nn.Linear(2, 2), {"vision_cfg": {"image_size": 32}, "text_cfg": {}}, out,
                            replace=False, **kw)


def test_export_leaves_sibling_folders_of_its_names_alone(tmp_path):
    for sibling in (".out.old", ".out.tmp"):
        (tmp_path / sibling).mkdir()
        (tmp_path / sibling / "mine.txt").write_text("keep me\n")
    _export(tmp_path / "out")
    assert (tmp_path / "out" / "open_clip_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.old", ".out.tmp", "out"]
    assert all((tmp_path / s / "mine.txt").read_text() == "keep me\n" for s in (".out.old", ".out.tmp"))


def test_an_export_racing_another_replaces_nothing(tmp_path, monkeypatch):
    from clipa.errors import ClipaError
    from clipa.model import weights

    out = tmp_path / "out"
    real = weights.write_safetensors

    def meanwhile(state, path):  # a second export finishes first
        out.mkdir()
        (out / "theirs.txt").write_text("the other export\n")
        real(state, path)

    monkeypatch.setattr(weights, "write_safetensors", meanwhile)
    with pytest.raises(ClipaError, match=f"OUT: {out} cannot take the export"):
        _export(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]


# --------------------------------------------------------------------------- 13: secrets and files leave the run

SECRET_TRAIN = ("https://bucket.s3.amazonaws.com/x/{0..9}.tar?X-Amz-Signature=SIGSECRET&X-Amz-Credential=CREDSECRET"
                "::https://alice:PWSECRET@host/y.tar"
                "::pipe:AWS_SECRET_ACCESS_KEY=KEYSECRET aws s3 cp s3://b/{0..3}.tar - --token TOKSECRET")


@pytest.mark.parametrize("text, shown", [
    ("https://h/x.tar?sig=S&a=b", "https://h/x.tar?<redacted>"),
    ("https://alice:pw@h/x.tar", "https://<redacted>@h/x.tar"),
    ("pipe:HF_TOKEN=hf_abc curl -H 'Authorization: Bearer xyz' https://h/x.tar",
     "pipe:HF_TOKEN=<redacted> curl -H 'Authorization: Bearer <redacted>' https://h/x.tar"),
    ("pipe:tool --password=p --api-key k /data/{0..9}.tar",
     "pipe:tool --password=<redacted> --api-key <redacted> /data/{0..9}.tar"),
    ("/data/laion/{00000..41407}.tar@0.7::b.csv@0.3", "/data/laion/{00000..41407}.tar@0.7::b.csv@0.3"),
])
def test_credentials_are_redacted(text, shown):
    from clipa.data.urls import redact

    assert redact(text) == shown


def test_trackers_and_the_model_card_get_data_train_redacted():
    from clipa.model import card
    from clipa.recipe.load import load_recipe
    from clipa.train.trackers import hyperparameters

    recipe = load_recipe(None, [f"data.train={SECRET_TRAIN}"])
    sent = json.dumps(hyperparameters(recipe, "pretrain")) + card._describe_stage(recipe, "pretrain", 0)[0]
    for secret in ("SIGSECRET", "CREDSECRET", "PWSECRET", "KEYSECRET", "TOKSECRET"):
        assert secret not in sent, secret
    assert "aws s3 cp s3://b/{0..3}.tar" in sent  # what ran is still said


def test_mlflow_without_a_tracking_uri_writes_into_the_run(tmp_path, monkeypatch):
    """Not ./mlruns in whatever directory the run was started from."""
    mlflow = pytest.importorskip("mlflow")
    from clipa.recipe.load import load_recipe
    from clipa.train import trackers

    seen = {}

    class Recording:  # accelerate's MLflowTracker, minus the 25 s SQLite schema migration
        def __init__(self, project, logging_dir=None, **kw):
            seen.update(uri=mlflow.get_tracking_uri(), artifacts=logging_dir)
            self.active_run = type("Run", (), {"info": type("Info", (), {"run_id": "r1"})})()

        def store_init_configuration(self, config):
            pass

        def finish(self):
            pass

    monkeypatch.setattr(trackers, "_known", lambda: {"mlflow": Recording})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    first = trackers.Trackers(load_recipe(None, ['log.trackers=["mlflow"]']), "pretrain", run)
    assert seen == {"uri": f"sqlite:///{run / 'mlflow.db'}", "artifacts": (run / "mlartifacts").as_uri()}
    first.finish()  # mlflow exported the run's store to os.environ; the next run in this process picks its own
    assert "MLFLOW_TRACKING_URI" not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")  # the user's choice wins
    trackers.Trackers(load_recipe(None, ['log.trackers=["mlflow"]', "name=b"]), "pretrain", tmp_path / "b")
    assert seen == {"uri": "http://mlflow.example:5000", "artifacts": None}


# --------------------------------------------------------------------------- 14: small ones


def test_a_name_ending_in_a_newline_is_refused(cli, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "run\\n"\n')  # TOML's escape: the name is "run" and a newline
    one_line_error(cli("validate", recipe), "name:", "not a plain name")


def test_a_step_directory_name_ending_in_a_newline_is_not_a_checkpoint(tmp_path):
    from test_safety import small_checkpoints

    manager = small_checkpoints(tmp_path, steps=(2,))
    (tmp_path / "step_000002").rename(tmp_path / "step_000009\n")
    assert manager.complete() == []


def test_a_state_file_that_raises_type_error_is_one_line(tmp_path):
    from clipa.errors import ClipaError
    from clipa.model.safeload import load_plain

    marker = tmp_path / "ran"
    evil = evil_weights(tmp_path / "state.pt", marker)
    with pytest.raises(ClipaError, match=r"state.pt: cannot read weights or state \(TypeError"):
        load_plain(evil)
    assert not marker.exists()


def test_a_local_file_does_not_shadow_a_shipped_recipe(tmp_path, monkeypatch):
    from clipa.recipe.index import find, resolve_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "pretrain").write_text('name = "shadow"\n')
    (tmp_path / "mine.toml").write_text('name = "mine"\n')
    with __import__("importlib").resources.as_file(find("tiny/pretrain")) as shipped:
        assert resolve_path("tiny/pretrain") == shipped
    assert resolve_path("mine.toml") == Path("mine.toml")  # an explicit .toml path is taken as given
