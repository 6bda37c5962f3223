"""The bad-input sweep (issue 18): every command against a catalogue of bad inputs.

Each case runs one `clipa` command in a sandbox folder and asserts its pinned outcome: a case in
ACCEPTED exits 0 (each says why it is meant to be accepted); every other case exits 2 with one line
`error: ...` on stderr naming the key or path it is about (the recipe key for generated cases, the
case's own needle otherwise), so deleting a check fails its case. Always: no traceback (the
in-process runner re-raises any exception that is not an exit); no file in the sandbox changed except
under the output the command was given; and the earlier checkpoints of a trained run byte-identical
(checked by hash after the sweep).

Cases are generated: every recipe key with a wrong type, every numeric key out of range, and a
catalogue of bad files (recipes, shards, images, captions, CSVs, weights, checkpoints, model folders,
evaluation data, outputs). Most are validate/dry-run/eval-level and take about a second.
"""

import dataclasses
import hashlib
import io
import json
import os
import shutil
import struct
import tarfile
import typing
import zlib
from pathlib import Path

import pytest
from PIL import Image

from clipa.recipe import schema as recipe_mod

from conftest import micro_overrides, run_in_process, tiny_overrides

# --------------------------------------------------------------------------- the sandbox


def _jpeg(mode="RGB", size=(24, 24), color=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else None).save(buf, format="JPEG")
    return buf.getvalue()


def _png(mode="RGB", size=(24, 24)):
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_bomb():
    """A PNG that says it is 40000 x 40000 pixels (1.6 gigapixels) in a few dozen bytes."""
    header = struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _chunk(b"IEND", b""))


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _good(i):
    return [(f"s{i:03d}.jpg", _jpeg()), (f"s{i:03d}.txt", b"a red circle")]


BAD_SAMPLES = {
    "corrupt_jpeg": [("b.jpg", b"\xff\xd8\xff\xe0" + os.urandom(200)), ("b.txt", b"x")],
    "truncated_jpeg": [("b.jpg", _jpeg(size=(64, 64))[:200]), ("b.txt", b"x")],
    "corrupt_png": [("b.png", b"\x89PNG\r\n\x1a\n" + os.urandom(100)), ("b.txt", b"x")],
    "cmyk_jpeg": [("b.jpg", _jpeg("CMYK")), ("b.txt", b"a cmyk image")],
    "png_16bit": [("b.png", _png("I;16")), ("b.txt", b"a 16-bit image")],
    "png_rgba": [("b.png", _png("RGBA")), ("b.txt", b"a transparent image")],
    "decompression_bomb": [("b.png", _png_bomb()), ("b.txt", b"x")],
    "empty_caption": [("b.jpg", _jpeg()), ("b.txt", b"")],
    "non_utf8_caption": [("b.jpg", _jpeg()), ("b.txt", b"caf\xe9 \xff\xfe")],
    "huge_caption": [("b.jpg", _jpeg()), ("b.txt", b"word " * 20_000)],  # 100 kB
    "malformed_json_caption": [("b.jpg", _jpeg()), ("b.json", b"{not json")],
    "no_image": [("b.txt", b"caption only")],
}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    run = root / "trained"
    # clipa-micro: the cases read its files and checkpoints; none depends on the model's size
    result = run_in_process("pretrain", "tiny/pretrain", *micro_overrides(**{"train.total_samples": 128,
                                                                              "checkpoint.every_steps": 2}),
                            "--out", run)
    assert result.returncode == 0, result.stderr
    shards = root / "shards"
    shards.mkdir()
    for name, members in BAD_SAMPLES.items():  # each bad sample between good ones
        _tar(shards / f"{name}.tar", _good(0) + members + _good(1))
    _tar(shards / "empty.tar", [])
    (shards / "random_bytes.tar").write_bytes(os.urandom(4096))
    whole = (shards / "cmyk_jpeg.tar").read_bytes()
    (shards / "truncated.tar").write_bytes(whole[: len(whole) // 2])
    files = root / "files"
    files.mkdir()
    (files / "empty.toml").write_text("")
    (files / "not_toml.toml").write_text("name = [unclosed\n")
    (files / "non_utf8.toml").write_bytes(b"name = \"caf\xe9\"\n")
    (files / "huge.toml").write_text("# " + "x" * 1_000_000 + "\n")
    (files / "unknown_table.toml").write_text("[modle]\narch = \"clipa-tiny\"\n")
    (files / "junk.bin").write_bytes(os.urandom(2048))
    weights = (run / "final" / "open_clip_model.safetensors").read_bytes()
    (files / "truncated.safetensors").write_bytes(weights[:4096])
    (files / "empty.safetensors").write_bytes(b"")
    (files / "no_c.txt").write_text("a photo of a thing\n")
    (files / "non_utf8_templates.txt").write_bytes(b"a photo of a {c} \xff\n")
    (files / "points.json").write_text("{not json")
    (files / "points_shape.json").write_text(json.dumps([{"compute": "a lot", "error": 2}]))
    (files / "a_file").write_text("I am a file\n")
    (files / "metrics_garbage").mkdir()
    (files / "metrics_garbage" / "config.toml").write_text((run / "config.toml").read_text())
    (files / "metrics_garbage" / "metrics.jsonl").write_bytes(b"{\"step\": 1, \"loss\": \n\xff\xfe garbage\n")
    csvs = root / "csv"
    csvs.mkdir()
    Image.new("RGB", (24, 24)).save(csvs / "ok.png")
    (csvs / "missing_column.csv").write_text("path,caption\nok.png,a thing\n")
    (csvs / "missing_images.csv").write_text("filepath,title\nnope.png,a thing\nok.png,ok\n")
    (csvs / "non_utf8.csv").write_bytes(b"filepath,title\nok.png,caf\xe9\n")
    (csvs / "empty.csv").write_text("")
    (csvs / "huge_caption.csv").write_text("filepath,title\nok.png," + "word " * 20_000 + "\n")
    # model folders and checkpoints that are wrong in one way each
    models = root / "models"
    models.mkdir()
    for name in ("truncated_weights", "config_not_json", "config_no_model_cfg"):
        shutil.copytree(run / "final", models / name)
    (models / "truncated_weights" / "open_clip_model.safetensors").write_bytes(weights[:4096])
    (models / "config_not_json" / "open_clip_config.json").write_text("{")
    (models / "config_no_model_cfg" / "open_clip_config.json").write_text("{}")
    for name in ("bad_config", "truncated_state", "other_arch"):
        shutil.copytree(run / "checkpoints" / "step_000004", models / name / "step_000004")
    (models / "bad_config" / "step_000004" / "config.toml").write_bytes(b"model = \xff\xfe")
    state = models / "truncated_state" / "step_000004" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    other = models / "other_arch" / "step_000004" / "config.toml"
    written = other.read_text()
    assert 'arch = "clipa-micro"' in written
    other.write_text(written.replace('arch = "clipa-micro"', 'arch = "clipa-small"'))
    imagefolder = root / "imagefolder"
    (imagefolder / "cat").mkdir(parents=True)
    (imagefolder / "cat" / "bad.jpg").write_bytes(b"not an image")
    (imagefolder / "dog").mkdir()
    Image.new("RGB", (24, 24)).save(imagefolder / "dog" / "ok.png")
    (root / "empty_dir").mkdir()
    # the trained run's checkpoints as they are before any case runs (checked after the sweep)
    (root / "trained-hashes.json").write_text(json.dumps(_hashes(run / "checkpoints")))
    return root


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def _hashes(directory: Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- the catalogue

R = "tiny/pretrain"
FAST = tiny_overrides()


def _recipe_key_cases():
    """Every recipe key wrong in turn: a wrong type; numbers also negative and huge; strings also empty."""
    cases = []
    hints = typing.get_type_hints(recipe_mod.Recipe)
    for table, table_type in hints.items():
        if table in ("source", "notes"):  # internal, not recipe keys
            continue
        if not dataclasses.is_dataclass(table_type):
            fields = {table: table_type}
            prefix = ""
        else:
            fields = typing.get_type_hints(table_type)
            prefix = f"{table}."
        for key, tp in fields.items():
            if dataclasses.is_dataclass(tp):  # loss.queue
                for sub, sub_tp in typing.get_type_hints(tp).items():
                    cases += _values(f"{prefix}{key}.{sub}", sub_tp)
            else:
                cases += _values(f"{prefix}{key}", tp)
    return cases


def _values(key, tp):
    """Each case names the key its error must name (ACCEPTED lists the values that are fine)."""
    wrong = {int: "fast", float: "fast", bool: "maybe", str: "[1, 2]"}.get(tp, "fast")
    out = [(f"recipe-{key}-wrong-type", ["validate", R, f"{key}={wrong}"], key)]
    if tp in (int, float):
        out.append((f"recipe-{key}-negative", ["validate", R, f"{key}=-7"], key))
        out.append((f"recipe-{key}-huge", ["validate", R, f"{key}=1e300" if tp is float else f"{key}={10**30}"], key))
    if tp is str:
        out.append((f"recipe-{key}-empty", ["validate", R, f"{key}="], key))
    return out


# Cases meant to be accepted (exit 0), and why; every other case must exit 2 naming its key or path.
ACCEPTED = {
    # in range: an empty name or path means "none" / "from --out", and huge numbers are merely large
    **dict.fromkeys([f"recipe-{k}-empty" for k in (
        "name", "model.image_tower", "model.image_init", "data.csv_separator", "eval.data_root",
        "eval.retrieval_data_root", "init.checkpoint", "log.run_name", "next")], "empty is the default (none / by extension)"),
    **dict.fromkeys([f"recipe-{k}-huge" for k in (
        "model.lock_image_unlocked_groups", "model.lock_text_unlocked_groups", "data.num_workers",
        "data.synthetic_image_size", "data.shuffle_buffer", "data.interleave", "reduction.image_size", "optim.lr",
        "optim.warmup_steps", "optim.weight_decay", "optim.eps", "optim.grad_clip", "train.seed",
        "train.total_samples", "train.log_every_steps", "train.logit_scale_max", "train.max_nonfinite_steps",
        "train.dist_timeout_s", "checkpoint.every_steps", "checkpoint.keep_last", "eval.every_steps",
        "data.max_image_pixels")],
        "large but valid; `validate` checks ranges, not budgets"),
    "recipe-train.seed-negative": "any integer is a seed",
    "recipe-log.tags-wrong-type": "a string is one tag",
    # loss.queue.* is checked only when a queue is on (loss.queue.kind = \"none\" in tiny/pretrain)
    **dict.fromkeys([f"recipe-loss.queue.{k}-{v}" for k in ("size", "momentum", "warmup_steps")
                     for v in ("negative", "huge")], "unused while loss.queue.kind = \"none\""),
    # a bad sample between good ones is skipped and counted, not an error
    **dict.fromkeys([f"inspect-shard-{name}" for name in [*BAD_SAMPLES, "truncated"]],
                    "bad samples are skipped and counted"),
    **dict.fromkeys([f"{cmd}-csv-{name}" for cmd in ("inspect", "retrieval")
                     for name in ("missing_images", "non_utf8", "huge_caption")], "bad rows are skipped and counted"),
    "zeroshot-corrupt-image": "a corrupt image is skipped and counted",
    "zeroshot-templates-non-utf8": "undecodable bytes are replaced",
    "recipe-empty": "every key keeps its default",
    "recipe-huge-comment": "a comment is not a value",
    # validate and --dry-run check syntax and names; the files are read (and refused) by the run
    "validate-train-missing-csv": "validate reads no data",
    "dry-run-bad-shards": "--dry-run reads no data",
    "init-junk-file": "--dry-run checks init.checkpoint exists; the run refuses it (test_untrusted.py)",
    "image-init-junk": "validate reads no weights",
}


def _data_cases():
    cases = []
    for name in [*BAD_SAMPLES, "empty", "random_bytes", "truncated"]:
        cases.append((f"inspect-shard-{name}", ["data", "inspect", "{root}/shards/" + f"{name}.tar", "--sheet",
                                                "{out}/sheet.png"], "{root}/shards/" + f"{name}.tar"))
    cases.append(("inspect-json-caption-malformed", ["data", "inspect", "{root}/shards/malformed_json_caption.tar",
                                                     "--caption-key", "json:caption", "--sheet-count", "0"],
                  "{root}/shards/malformed_json_caption.tar"))
    for name in ("missing_column", "missing_images", "non_utf8", "empty", "huge_caption"):
        cases.append((f"inspect-csv-{name}", ["data", "inspect", "{root}/csv/" + f"{name}.csv", "--sheet-count", "0"],
                      "{root}/csv/" + f"{name}.csv"))
        cases.append((f"retrieval-csv-{name}", ["retrieval", "--model", "{root}/trained", "--dataset", "csv",
                                                "--data-root", "{root}/csv/" + f"{name}.csv", "--num-workers", "0"],
                      "--data-root: {root}/csv/" + f"{name}.csv"))
    cases += [
        ("inspect-missing", ["data", "inspect", "{root}/nope/{0..3}.tar", "--sheet-count", "0"], "{root}/nope/{0..3}.tar"),
        ("inspect-dir-without-tars", ["data", "inspect", "{root}/empty_dir", "--sheet-count", "0"], "{root}/empty_dir"),
        ("validate-train-missing-csv", ["validate", R, "data.train={root}/nope.csv"], None),
        ("validate-train-weight-zero", ["validate", R, "data.train={root}/shards/empty.tar@0"], "data.train"),
        ("validate-train-unknown-scheme", ["validate", R, "data.train=s3://bucket/{0..9}.tar"], "data.train"),
        ("dry-run-bad-shards", ["pretrain", R, *FAST, "data.train={root}/shards/random_bytes.tar", "--dry-run",
                                "--out", "{out}/run"], None),
        ("synth-negative", ["data", "synth", "{out}/synth", "--num-samples", "-1"], "--num-samples"),
        ("synth-out-is-file", ["data", "synth", "{root}/files/a_file", "--num-samples", "4"], "{root}/files/a_file"),
    ]
    return cases


def _file_cases():
    files = "{root}/files"
    return [
        ("recipe-missing", ["validate", "{root}/nope.toml"], "{root}/nope.toml"),
        ("recipe-is-dir", ["validate", "{root}/empty_dir"], "{root}/empty_dir"),
        ("recipe-empty", ["validate", f"{files}/empty.toml"], None),
        ("recipe-not-toml", ["validate", f"{files}/not_toml.toml"], "{root}/files/not_toml.toml"),
        ("recipe-non-utf8", ["validate", f"{files}/non_utf8.toml"], "{root}/files/non_utf8.toml"),
        ("recipe-huge-comment", ["validate", f"{files}/huge.toml"], None),
        ("recipe-unknown-table", ["validate", f"{files}/unknown_table.toml"], "modle"),
        ("recipe-unknown-shipped", ["validate", "tiny/pretrian"], "tiny/pretrian"),
        ("override-no-equals", ["validate", R, "optim.lr"], "optim.lr"),
        ("override-unknown-key", ["validate", R, "optim.learning_rate=1"], "optim.learning_rate"),
        ("override-huge-value", ["validate", R, "name=" + "x" * 100_000], "name:"),
        ("plan-bad-recipe", ["plan", f"{files}/not_toml.toml"], "{root}/files/not_toml.toml"),
        ("plan-bad-gpus", ["plan", R, "--gpus", "0"], "--gpus"),
        ("cp-unknown", ["cp", "nope/recipe", "{out}/r.toml"], "nope/recipe"),
        ("init-junk-file", ["pretrain", R, *FAST, f"init.checkpoint={files}/junk.bin", "--dry-run", "--out",
                            "{out}/run"], None),
        ("init-missing", ["finetune", "tiny/finetune", *FAST, "init.checkpoint={root}/nope", "--dry-run", "--out",
                          "{out}/run"], "init.checkpoint: {root}/nope"),
        ("image-init-junk", ["validate", R, f"model.image_init={files}/junk.bin"], None),
        ("resume-truncated-state", ["pretrain", R, *FAST, "--resume", "{root}/models/truncated_state/step_000004",
                                    "--out", "{out}/run"], "--resume: {root}/models/truncated_state/step_000004"),
        ("resume-bad-config", ["pretrain", R, *FAST, "--resume", "{root}/models/bad_config/step_000004", "--out",
                               "{out}/run"], "{root}/models/bad_config/step_000004/config.toml"),
        ("resume-other-arch", ["pretrain", R, *FAST, "--resume", "{root}/models/other_arch/step_000004", "--out",
                               "{out}/run"], "model.arch"),
        ("resume-a-file", ["pretrain", R, *FAST, "--resume", f"{files}/junk.bin", "--out", "{out}/run"],
         "--resume: {root}/files/junk.bin"),
        ("export-missing", ["export", "{root}/nope", "{out}/export"], "CHECKPOINT: {root}/nope"),
        ("export-out-is-file", ["export", "{root}/trained", f"{files}/a_file"], "OUT: {root}/files/a_file"),
        ("export-out-not-empty", ["export", "{root}/trained", "{root}/trained"], "OUT: {root}/trained"),
        ("export-bad-config", ["export", "{root}/models/bad_config/step_000004", "{out}/export"],
         "{root}/models/bad_config/step_000004/config.toml"),
        ("export-truncated-state", ["export", "{root}/models/truncated_state/step_000004", "{out}/export"],
         "CHECKPOINT: {root}/models/truncated_state/step_000004"),
        ("zeroshot-truncated-weights", ["zeroshot", "--model", "{root}/models/truncated_weights", "--dataset",
                                        "synthetic"], "--model: {root}/models/truncated_weights"),
        ("zeroshot-config-not-json", ["zeroshot", "--model", "{root}/models/config_not_json", "--dataset",
                                      "synthetic"], "--model: {root}/models/config_not_json/open_clip_config.json"),
        ("zeroshot-config-no-model-cfg", ["zeroshot", "--model", "{root}/models/config_no_model_cfg", "--dataset",
                                          "synthetic"], "--model: {root}/models/config_no_model_cfg/open_clip_config.json"),
        ("zeroshot-checkpoint-bad-config", ["zeroshot", "--model", "{root}/models/bad_config/step_000004",
                                            "--dataset", "synthetic"], "{root}/models/bad_config/step_000004/config.toml"),
        ("zeroshot-checkpoint-other-arch", ["zeroshot", "--model", "{root}/models/other_arch/step_000004",
                                            "--dataset", "synthetic"], "{root}/models/other_arch/step_000004"),
        ("zeroshot-pretrained-truncated", ["zeroshot", "--model", "clipa-tiny", "--pretrained",
                                           f"{files}/truncated.safetensors", "--dataset", "synthetic"],
                                            "{root}/files/truncated.safetensors"),
        ("zeroshot-pretrained-empty", ["zeroshot", "--model", "clipa-tiny", "--pretrained",
                                       f"{files}/empty.safetensors", "--dataset", "synthetic"], "{root}/files/empty.safetensors"),
        ("zeroshot-pretrained-junk", ["zeroshot", "--model", "clipa-tiny", "--pretrained", f"{files}/junk.bin",
                                      "--dataset", "synthetic"], "{root}/files/junk.bin"),
        ("zeroshot-weights-of-another-arch", ["zeroshot", "--model", "clipa-small", "--pretrained",
                                              "{root}/trained/final/open_clip_model.safetensors", "--dataset",
                                              "synthetic"], "--pretrained"),
        ("zeroshot-unknown-dataset", ["zeroshot", "--model", "{root}/trained", "--dataset", "imagenett"], "--dataset"),
        ("zeroshot-missing-root", ["zeroshot", "--model", "{root}/trained", "--dataset", "imagefolder",
                                   "--data-root", "{root}/nope"], "--data-root: {root}/nope"),
        ("zeroshot-empty-imagefolder", ["zeroshot", "--model", "{root}/trained", "--dataset", "imagefolder",
                                        "--data-root", "{root}/empty_dir"], "--data-root: {root}/empty_dir"),
        ("zeroshot-corrupt-image", ["zeroshot", "--model", "{root}/trained", "--dataset", "imagefolder",
                                    "--data-root", "{root}/imagefolder", "--num-workers", "0"], None),
        ("zeroshot-templates-without-c", ["zeroshot", "--model", "{root}/trained", "--dataset", "synthetic",
                                          "--templates", f"{files}/no_c.txt"], "--templates: {root}/files/no_c.txt"),
        ("zeroshot-templates-non-utf8", ["zeroshot", "--model", "{root}/trained", "--dataset", "synthetic",
                                         "--templates", f"{files}/non_utf8_templates.txt", "--num-workers", "0"], None),
        ("zeroshot-output-under-a-file", ["zeroshot", "--model", "{root}/trained", "--dataset", "synthetic",
                                          "--output", f"{files}/a_file/result.json", "--num-workers", "0"],
                                           "--output: cannot write {root}/files/a_file/result.json"),
        ("zeroshot-batch-size-zero", ["zeroshot", "--model", "{root}/trained", "--dataset", "synthetic",
                                      "--batch-size", "0"], "--batch-size"),
        ("zeroshot-huge-image-size", ["zeroshot", "--model", "{root}/trained", "--dataset", "synthetic",
                                      "--image-size", "100000"], "--image-size"),
        ("zeroshot-text-length-one", ["zeroshot", "--model", "{root}/trained", "--dataset", "synthetic",
                                      "--text-length", "1"], "--text-length"),
        ("retrieval-wds-empty", ["retrieval", "--model", "{root}/trained", "--dataset", "wds", "--data-root",
                                 "{root}/empty_dir"], "--data-root"),
        ("linear-probe-missing-root", ["linear-probe", "--model", "{root}/trained", "--dataset", "imagefolder",
                                       "--data-root", "{root}/nope"], "--data-root: {root}/nope"),
        ("report-missing", ["report", "{root}/nope"], "RUN_DIR: {root}/nope"),
        ("report-garbage-metrics", ["report", f"{files}/metrics_garbage", "--out", "{out}/report"],
         "{root}/files/metrics_garbage/metrics.jsonl"),
        ("scaling-missing", ["scaling", "fit", "{root}/nope.json", "--plot", "{out}/fit.png"], "{root}/nope.json"),
        ("scaling-not-json", ["scaling", "fit", f"{files}/points.json", "--plot", "{out}/fit.png"], "{root}/files/points.json"),
        ("scaling-wrong-shape", ["scaling", "fit", f"{files}/points_shape.json", "--plot", "{out}/fit.png"],
         "{root}/files/points_shape.json"),
        ("bench-zero-steps", ["bench", "--steps", "0"], "--steps"),
        ("quickstart-scale-zero", ["quickstart", "--scale", "0", "--out", "{out}/qs"], "--scale"),
        ("pretrain-name-escapes", ["pretrain", R, *FAST, "name=../../escaped", "--dry-run"], "name:"),
        ("pretrain-out-not-a-run", ["pretrain", R, *FAST, "--out", "{root}/csv", "--dry-run"], "--out: {root}/csv"),
        ("pretrain-out-is-file", ["pretrain", R, *FAST, "--out", f"{files}/a_file"], "--out: {root}/files/a_file"),
    ]


CASES = _recipe_key_cases() + _data_cases() + _file_cases()


def test_every_case_has_a_pinned_outcome():
    """A case is accepted (ACCEPTED says why) or names what its error is about; none is both or neither."""
    for case_id, _, needle in CASES:
        assert needle is not None or case_id in ACCEPTED, case_id
    assert set(ACCEPTED) <= {c[0] for c in CASES}, set(ACCEPTED) - {c[0] for c in CASES}


@pytest.mark.parametrize("argv,needle", [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(sandbox, tmp_path, monkeypatch, argv, needle, request):
    out = tmp_path / "out"  # the only place a command may write
    monkeypatch.chdir(tmp_path)  # default run directories (runs/NAME) land here too
    def fill(text):
        return text.replace("{root}", str(sandbox)).replace("{out}", str(out))

    args = [fill(a) for a in argv]
    before = _snapshot(sandbox)
    result = run_in_process(*args)  # an exception other than an exit propagates: a traceback fails the test
    accepted = request.node.callspec.id in ACCEPTED
    assert result.returncode == (0 if accepted else 2), (result.returncode, result.stdout[-2000:],
                                                         result.stderr[-2000:])
    if not accepted:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert fill(needle) in lines[0], (fill(needle), lines[0])
    assert "Traceback" not in result.stdout + result.stderr
    assert _snapshot(sandbox) == before, "a file outside the command's output changed"
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and out not in p.parents]
    assert not outside, outside
    SWEPT.add(request.node.callspec.id)


SWEPT: set[str] = set()  # the cases that ran to the end in this session


def test_sweep_left_the_trained_checkpoints_byte_identical(sandbox):
    """Runs after the sweep (file order; `--dist loadfile` keeps a file on one worker): the trained
    run's checkpoints hash as they did when the sandbox was made, before any case ran."""
    if SWEPT != {c[0] for c in CASES}:  # alone, or a selection, or a case failed (and is red already)
        pytest.skip(f"{len(SWEPT)} of {len(CASES)} cases ran to the end: run the whole sweep for this check")
    recorded = json.loads((sandbox / "trained-hashes.json").read_text())
    assert _hashes(sandbox / "trained" / "checkpoints") == recorded


def test_case_count():
    """docs/training.md ("Untrusted files") states how many cases the sweep runs; keep it true."""
    readme = (Path(__file__).resolve().parent.parent / "docs" / "training.md").read_text(encoding="utf-8")
    assert f"{len(CASES)} cases" in readme, len(CASES)
