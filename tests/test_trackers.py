"""Trackers (issue 20) with the real libraries, offline: what TensorBoard and W&B hold is what metrics.jsonl
holds; a killed and resumed run continues the same tracker runs without a duplicated step; a tracker that
raises never stops training; a missing library is one line and exit 2 before any work."""

import json
import os
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from clipa.recipe.load import load_recipe
from clipa.recipe.schema import LogConfig
from clipa.run.layout import read_run_recipe
from clipa.train import trackers

from conftest import micro_overrides, run_in_process

RECIPE_KEYS = Path(__file__).resolve().parent.parent / "docs" / "recipes.md"  # every recipe key (the README links it)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # W&B writes its run under RUN_DIR/wandb/ and never talks to a server; console capture is off because
    # the in-process runner swaps sys.stdout under it.
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                       "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true"}.items():
        monkeypatch.setenv(key, value)
    # W&B's in-process runs leave their service's address in WANDB_SERVICE; a child process would attach to
    # that service, which outlives the child when it is killed (a killed run's own service goes with it).
    monkeypatch.delenv("WANDB_SERVICE", raising=False)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _expected(run: Path) -> dict[tuple[str, int], float]:
    """(metric, step) -> value of every number in metrics.jsonl, as a tracker should hold it: the first value
    of a (metric, step) a resumed run logged again."""
    out = {}
    for row in _rows(run):
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                out.setdefault((key, row["step"]), float(value))
    return out


def _tensorboard(run: Path) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / trackers.TENSORBOARD_DIR), size_guidance={"scalars": 0})
    acc.Reload()
    held = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            assert (tag, event.step) not in held, f"{tag} at step {event.step} twice"
            held[(tag, event.step)] = event.value
    return held


def _wandb_records(path: Path):
    """W&B's own protobuf records from an offline run's .wandb file (its LevelDB-style log: a 7-byte file
    header, then records of [crc32, length, type] + data in 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding to the block's end
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _wandb(run: Path):
    """Every offline W&B run file of the run directory, in order: their run ids, config, and history."""
    ids, config, history = set(), {}, {}
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files, list((run / "wandb").iterdir())
    for path in files:
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
                config["__run__"] = record.run
            elif kind == "config":
                config.update({item.key: json.loads(item.value_json) for item in record.config.update})
            elif kind == "history":
                items = {"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                         for item in record.history.item}
                step = items.pop("_step")
                for key, value in items.items():
                    if not key.startswith("_"):
                        assert (key, step) not in history, f"{key} at step {step} twice"
                        history[(key, step)] = float(value)
    return ids, config, history


def _approx(held: dict, expected: dict):
    assert held.keys() == expected.keys(), (sorted(held.keys() ^ expected.keys()))
    for key, value in expected.items():
        assert held[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key


def _train(out: Path, *extra):
    """Three steps of the micro model, each logged."""
    return run_in_process("pretrain", "tiny/pretrain", *micro_overrides(**{"train.total_samples": 32 * 3,
                                                                          "train.log_every_steps": 1}), *extra,
                          "--out", out)


@pytest.mark.slow  # W&B's service and a zero-shot evaluation: about 35 s here
def test_tensorboard_and_wandb_hold_exactly_the_metrics_rows(tmp_path):
    out = tmp_path / "run"
    result = _train(out, 'log.trackers=["tensorboard", "wandb"]', 'log.tags=["smoke", "tiny"]',
                    'eval.zeroshot=["synthetic"]')
    assert result.returncode == 0, result.stderr[-3000:]
    expected = _expected(out)
    assert ("zeroshot/synthetic/acc1", 3) in expected and ("loss", 2) in expected  # training and evaluation rows
    _approx(_tensorboard(out), expected)

    ids, config, history = _wandb(out)
    assert ids == {json.loads((out / trackers.STATE_FILE).read_text())["wandb"]["id"]}
    _approx(history, expected)
    run = config.pop("__run__")
    assert (run.project, run.display_name, list(run.tags), run.job_type) == ("clipa", "tiny-pretrain",
                                                                             ["smoke", "tiny"], "pretrain")
    # The resolved recipe, flattened, plus the stage and clipa's version.
    assert config["optim.lr"] == read_run_recipe(out).optim.lr and config["name"] == "tiny-pretrain"
    assert config["train.global_batch_size"] == 32 and config["loss.queue.kind"] == "none"
    assert config["stage"] == "pretrain" and config["clipa_version"]
    assert json.loads(config["log.trackers"]) == ["tensorboard", "wandb"]


@pytest.mark.slow
def test_sigkill_then_resume_continues_the_same_runs_without_a_duplicated_step(tmp_path):
    out = tmp_path / "run"
    # Logged every step, checkpointed every 3; killed after step 5 (step 4 logged after the last checkpoint).
    command = [sys.executable, "-m", "clipa", "pretrain", "tiny/pretrain",
               *micro_overrides(**{"train.log_every_steps": 1, "checkpoint.every_steps": 3}),
               'log.trackers=["tensorboard", "wandb"]', "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    killed = subprocess.run(command, env=dict(env, CLIPA_KILL_AT="step5:0"), capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    first_id = json.loads((out / trackers.STATE_FILE).read_text())["wandb"]["id"]
    assert [row["step"] for row in _rows(out)] == [1, 2, 3, 4]
    resumed = run_in_process(*command[3:])  # the resume is not about the process: in this one (no start-up cost)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    steps = [row["step"] for row in _rows(out) if "loss" in row]
    assert steps == [1, 2, 3, 4, 4, 5, 6]  # metrics.jsonl keeps both step-4 rows (clipa report reads the last)

    expected = _expected(out)
    tensorboard = _tensorboard(out)  # raises on a duplicated (metric, step)
    _approx(tensorboard, expected)
    assert sorted({step for _, step in tensorboard}) == [1, 2, 3, 4, 5, 6]
    ids, _, history = _wandb(out)  # two offline run files (one per attempt), one run id; raises on a duplicate
    assert ids == {first_id} and len(list((out / "wandb").glob("offline-run-*"))) == 2
    # The kill can cost W&B the newest rows it had not written yet (a gap, never a duplicate); what it holds
    # is what metrics.jsonl holds, and every step after the resume point is there.
    assert {key: expected[key] for key in history} == pytest.approx(history, rel=1e-6)
    assert {key: value for key, value in expected.items() if key[1] >= 5}.items() <= history.items()


def _flaky_tracker_classes():
    """Real accelerate GeneralTracker subclasses, registered by name like any tracker: one fails from step 2
    on (a full disk), one cannot start (a service out of reach)."""
    from accelerate.tracking import GeneralTracker

    class FlakyTracker(GeneralTracker):
        name = "flaky"
        requires_logging_directory = False
        calls: list = []

        def __init__(self, run_name, **kwargs):
            super().__init__()

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            FlakyTracker.calls.append(("config", values))

        def log(self, values, step=None, **kwargs):
            FlakyTracker.calls.append(("log", step))
            if step >= 2:
                raise OSError(28, "No space left on device")

    class BrokenTracker(FlakyTracker):
        name = "broken"

        def start(self):
            raise ConnectionError("service unreachable")

    return FlakyTracker, BrokenTracker


def test_a_tracker_that_raises_never_stops_training(tmp_path, request):
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, register_tracker_class

    flaky, broken = _flaky_tracker_classes()
    for cls in (flaky, broken):
        register_tracker_class(cls)
        request.addfinalizer(lambda name=cls.name: LOGGER_TYPE_TO_CLASS.pop(name, None))
    out = tmp_path / "run"
    result = _train(out, 'log.trackers=["broken", "flaky", "tensorboard"]')
    assert result.returncode == 0, result.stderr[-3000:]
    assert [row["step"] for row in _rows(out)] == [1, 2, 3]  # metrics.jsonl has every row
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: log.trackers:")]
    assert len(warnings) == 2, result.stderr  # one for the tracker that did not start, one (not two) for flaky
    assert "broken did not start (ConnectionError: service unreachable)" in warnings[0]
    assert "flaky failed at step 2 (OSError: [Errno 28] No space left on device)" in warnings[1]
    assert [c for c in flaky.calls if c[0] == "log"] == [("log", 1), ("log", 2), ("log", 3)]  # still tried
    _approx(_tensorboard(out), _expected(out))  # the others are not held up by the failing one


def test_a_resumed_run_sends_only_steps_after_those_already_in_metrics_jsonl(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    before = [{"step": 2, "loss": 4.0, "stage": "pretrain"}, {"step": 4, "loss": 3.5, "stage": "pretrain"},
              {"step": 4, "zeroshot/synthetic/acc1": 0.25}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in before) + '{"step": 6, "lo')
    recipe = load_recipe(None, ['log.trackers=["tensorboard"]', "name=t"])
    sink = trackers.Trackers(recipe, "pretrain", run)
    sink.log({"step": 4, "loss": 3.6, "samples": 128, "mfu": None, "lr": float("nan"), "stage": "pretrain"})
    sink.log({"step": 4, "zeroshot/synthetic/acc1": 0.3})
    sink.log({"step": 6, "loss": 3.0, "samples": 192})
    sink.log({"step": 6, "zeroshot/synthetic/acc1": 0.5, "samples": 192})
    sink.finish()
    sink.finish()  # idempotent: RunLog.close can come twice on a stop path
    # samples at step 4 had no value yet; what metrics.jsonl had at step 4 is not sent again; None/NaN never.
    assert _tensorboard(run) == {("samples", 4): 128.0, ("loss", 6): 3.0, ("samples", 6): 192.0,
                                 ("zeroshot/synthetic/acc1", 6): 0.5}


def test_mlflow_resumes_its_run_by_the_stored_id(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")  # dev installs mlflow-skinny; CI's CLIPA_REQUIRE=all fails this skip
    # The local file store: mlflow-skinny has no SQLite store, and MLflow 3 asks for this opt-in to use it.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run = tmp_path / "run"
    run.mkdir()
    recipe = load_recipe(None, ['log.trackers=["mlflow"]', "name=t", 'log.tags=["smoke"]'])
    first = trackers.Trackers(recipe, "finetune", run)
    first.log({"step": 1, "loss": 2.0})
    first.finish()
    run_id = json.loads((run / trackers.STATE_FILE).read_text())["mlflow"]["run_id"]
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    second = trackers.Trackers(recipe, "finetune", run)
    second.log({"step": 1, "loss": 2.5})
    second.log({"step": 2, "loss": 1.5})
    second.finish()
    client = mlflow.tracking.MlflowClient()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 2.0), (2, 1.5)]
    data = client.get_run(run_id).data
    assert data.params["optim.lr"] == str(recipe.optim.lr) and data.params["stage"] == "finetune"
    assert data.tags["smoke"] == "true" and data.tags["mlflow.runName"] == "t"
    assert len(client.search_runs([client.get_experiment_by_name("clipa").experiment_id])) == 1


@pytest.mark.parametrize("name, modules, extra", [("wandb", ["wandb"], "pip install 'clipa[wandb]'"),
                                                  ("tensorboard", ["tensorboard", "tensorboardX"],
                                                   "pip install 'clipa[tensorboard]'"),
                                                  ("mlflow", ["mlflow"], "pip install 'clipa[mlflow]'")])
def test_a_missing_tracker_library_is_one_line_and_exit_2_before_any_work(tmp_path, monkeypatch, name, modules,
                                                                          extra):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed: `import wandb` raises
    out = tmp_path / "run"
    for argv in (["validate", "tiny/pretrain"], ["pretrain", "tiny/pretrain", "--dry-run", "--out", out],
                 ["pretrain", "tiny/pretrain", *micro_overrides(), "--out", out]):
        result = run_in_process(*argv, f"log.trackers={name}")
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [f"error: log.trackers[0]: \"{name}\" needs the {modules[0]} "
                                                      f"library, which is not installed; {extra}"]
    assert not out.exists()


def test_unknown_or_repeated_trackers_are_recipe_errors(cli):
    result = cli("validate", "tiny/pretrain", "log.trackers=[\"wandbb\"]")
    assert result.returncode == 2 and 'unknown tracker "wandbb"; did you mean "wandb"?' in result.stderr
    result = cli("validate", "tiny/pretrain", "log.trackers=[\"wandb\", \"wandb\"]")
    assert result.returncode == 2 and "log.trackers:" in result.stderr and "twice" in result.stderr
    result = cli("validate", "tiny/pretrain", "log.project=")
    assert result.returncode == 2 and "log.project: empty" in result.stderr


def test_validate_and_dry_run_show_the_trackers(cli, tmp_path):
    result = cli("validate", "tiny/pretrain", 'log.trackers=["tensorboard", "wandb"]', "log.run_name=first")
    assert result.returncode == 0
    assert "trackers: tensorboard, wandb (project clipa, run first; rank 0)" in result.stdout
    result = cli("pretrain", "tiny/pretrain", "--dry-run", "--out", tmp_path / "run")
    assert "none (metrics.jsonl only; `clipa report RUN_DIR` plots it)" in result.stdout
    assert LogConfig().trackers == []  # nothing changes for users who do not ask


def test_every_log_key_is_in_the_recipe_key_table():
    table = RECIPE_KEYS.read_text(encoding="utf-8").split("## Recipe keys", 1)[1].split("\n## ", 1)[0]
    for key in LogConfig.__dataclass_fields__:
        assert f"`log.{key}`" in table, f"docs/recipes.md's key table misses log.{key}"
