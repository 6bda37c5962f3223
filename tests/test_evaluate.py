"""Evaluation: numbers equal an independent computation, layouts, sharding, bad input, eval during training."""

import csv
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from clipa.data.shards import write_synthetic
from clipa.data.transforms import eval_transform
from clipa.errors import ClipaError
from clipa.evaluate.datasets import _timm_synsets, load_templates, load_zeroshot_data
from clipa.evaluate.linear_probe import linear_probe
from clipa.evaluate.models import load_model
from clipa.evaluate.retrieval import retrieval
from clipa.evaluate.zeroshot import output_paths, zeroshot
from clipa.recipe.load import load_recipe
from clipa.train.trainer import train

from conftest import RECIPES, RESIZE_32, micro_overrides, run_torchrun, tiny_overrides

HELPER = str(Path(__file__).with_name("distributed_eval.py"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    info = write_synthetic(root / "synth", num_samples=1, shard_size=1, eval_per_class=3)
    # the 32 px first stage: evaluating at 48 px below grows its position embeddings
    recipe = load_recipe(RECIPES / "tiny" / "pretrain.toml", [*tiny_overrides(**{"train.total_samples": 32 * 10}),
                                                              *RESIZE_32])
    run = train(recipe, "pretrain", root / "run")
    return run.run_dir, Path(info["eval"])


def test_zeroshot_equals_open_clip_classifier_and_a_plain_loop(trained):
    run_dir, eval_dir = trained
    result = zeroshot(load_model(str(run_dir)), "imagefolder", str(eval_dir), batch_size=7)

    # Independent computation: plain open_clip on the exported model, one image at a time.
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{run_dir / 'final'}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{run_dir / 'final'}")
    model.eval()
    folders = sorted(p for p in eval_dir.iterdir() if p.is_dir())
    names = [line.strip() for line in (eval_dir / "classnames.txt").read_text().splitlines() if line.strip()]
    templates = [line for line in (eval_dir / "templates.txt").read_text().splitlines() if line.strip()]
    with torch.no_grad():
        weights = open_clip.build_zero_shot_classifier(model, tokenizer, names,
                                                       [lambda c, t=t: t.replace("{c}", c) for t in templates])
        hits1 = hits5 = total = 0
        for label, folder in enumerate(folders):
            for path in sorted(folder.glob("*.png")):
                image = preprocess(Image.open(path).convert("RGB"))[None]
                logits = model.encode_image(image, normalize=True) @ weights
                top5 = logits.topk(5).indices[0].tolist()
                hits1 += top5[0] == label
                hits5 += label in top5
                total += 1
    assert result["metrics"]["num_samples"] == total == 72
    assert result["metrics"]["acc1"] == pytest.approx(hits1 / total)
    assert result["metrics"]["acc5"] == pytest.approx(hits5 / total)


def zeroshot_args(trained) -> list:
    run_dir, eval_dir = trained
    return ["--model", run_dir, "--dataset", "imagefolder", "--data-root", eval_dir, "--num-workers", "0",
            "--batch-size", "16"]


@pytest.fixture(scope="module")
def two_processes(trained, tmp_path_factory):
    """One 2-process launch (tests/distributed_eval.py): retrieval and the probe's features split over the group,
    then `clipa zeroshot` in the same group; each rank's CLI exit code and output in OUT.cli.rankR.json."""
    run_dir, eval_dir = trained
    tmp = tmp_path_factory.mktemp("two_processes")
    folders = sorted(p for p in eval_dir.iterdir() if p.is_dir())
    names = [line.strip() for line in (eval_dir / "classnames.txt").read_text().splitlines() if line.strip()]
    with open(tmp / "pairs.csv", "w", newline="") as f:  # 24 images, 2 captions for every third one
        writer = csv.writer(f)
        writer.writerow(["filepath", "title"])
        for i, (folder, name) in enumerate(zip(folders, names)):
            image = sorted(folder.glob("*.png"))[0]
            writer.writerow([image, f"a photo of a {name}"])
            if i % 3 == 0:
                writer.writerow([image, f"a {name}"])
    (tmp / "probe").mkdir()
    for split in ("train", "test"):
        (tmp / "probe" / split).symlink_to(eval_dir, target_is_directory=True)
    out = tmp / "result.json"
    run_torchrun(HELPER, run_dir, tmp / "pairs.csv", tmp / "probe", tmp / "cache2", out,
                 *zeroshot_args(trained), "--output", tmp / "two.json", cwd=tmp, timeout=300)
    return tmp


@pytest.mark.slow
def test_cli_under_torchrun_splits_the_work_and_matches_one_process(trained, two_processes, tmp_path, cli):
    # Two processes each classify half the images; rank 0 alone prints the table and writes the JSON.
    ranks = [json.loads((two_processes / f"result.json.cli.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["code"] for r in ranks] == [0, 0], ranks
    assert ranks[0]["stdout"].count("zero-shot classification") == 1 and ranks[0]["stdout"].count("wrote ") == 1
    assert "zero-shot classification" not in ranks[1]["stdout"] and "wrote " not in ranks[1]["stdout"]
    one = cli("zeroshot", *zeroshot_args(trained), "--output", tmp_path / "one.json")
    assert one.returncode == 0, one.stderr
    two_json, one_json = json.loads((two_processes / "two.json").read_text()), json.loads((tmp_path / "one.json").read_text())
    for result in (two_json, one_json):
        del result["metrics"]["images_per_s"]  # timing, not a result
    assert two_json == one_json
    assert one_json["metrics"]["num_samples"] == 72


@pytest.mark.slow
def test_retrieval_and_probe_features_split_over_two_processes(trained, two_processes):
    run_dir, _ = trained
    two = json.loads((two_processes / "result.json").read_text())
    assert two["world"] == 2
    loaded = load_model(str(run_dir))
    one_retrieval = retrieval(loaded, "csv", str(two_processes / "pairs.csv"), batch_size=4)["metrics"]
    one_probe = linear_probe(loaded, "imagefolder", str(two_processes / "probe"), two_processes / "cache1",
                             batch_size=8)["metrics"]
    assert two["retrieval"]["metrics"]["num_images"] == 24 and two["retrieval"]["metrics"]["num_texts"] == 32
    for key, value in one_retrieval.items():
        if key != "seconds":
            assert two["retrieval"]["metrics"][key] == pytest.approx(value, abs=1e-9), key
    assert two["probe"]["metrics"]["num_train"] == one_probe["num_train"] == 72
    assert two["probe"]["metrics"]["acc1"] == pytest.approx(one_probe["acc1"], abs=1e-9)
    assert two["probe"]["metrics"]["l2"] == one_probe["l2"]
    assert len(list((two_processes / "cache2").glob("*.pt"))) == 2  # written once, by rank 0


def test_image_size_and_text_length_rebuild_the_model(trained):
    run_dir, eval_dir = trained
    default = load_model(str(run_dir))
    assert (default.image_size, default.context_length) == (32, 8)  # the 32 px first stage's geometry
    native = zeroshot(default, "imagefolder", str(eval_dir), batch_size=16)
    same = zeroshot(load_model(str(run_dir), image_size=32, text_length=8), "imagefolder", str(eval_dir), batch_size=16)
    del native["metrics"]["images_per_s"], same["metrics"]["images_per_s"]
    assert same == native
    # 48 px and 16 tokens: position embeddings resized (6x6 grid + class token; 16 text positions)
    resized = zeroshot(default, "imagefolder", str(eval_dir), image_size=48, text_length=16, batch_size=16)
    assert (resized["image_size"], resized["text_length"]) == (48, 16)
    m = resized["metrics"]
    assert m["num_samples"] == 72 and m["skipped_images"] == 0
    bigger = load_model(str(run_dir), image_size=48, text_length=16)
    # evaluating at 48 px is evaluating the model loaded at 48 px, and it is not the 32 px evaluation
    loaded_at_48 = zeroshot(bigger, "imagefolder", str(eval_dir), batch_size=16)
    del m["images_per_s"], loaded_at_48["metrics"]["images_per_s"]
    assert loaded_at_48["metrics"] == m
    assert (m["acc1"], m["acc5"], m["mean_per_class_recall"]) != (
        native["metrics"]["acc1"], native["metrics"]["acc5"], native["metrics"]["mean_per_class_recall"])
    assert bigger.model.visual.positional_embedding.shape[0] == 37 and bigger.model.positional_embedding.shape[0] == 16
    assert bigger.tokenizer(["a red circle"]).shape == (1, 16)
    with pytest.raises(ClipaError, match="--image-size: 50 is not divisible by the patch size 8.*use 48 or 56"):
        load_model(str(run_dir), image_size=50)


def test_cli_image_size_and_text_length(trained, cli, tmp_path):
    run_dir, eval_dir = trained
    result = cli("zeroshot", "--model", run_dir, "--dataset", "imagefolder", "--data-root", eval_dir,
                 "--image-size", "48", "--text-length", "16", "--num-workers", "0", "--output", tmp_path / "cli.json")
    assert result.returncode == 0, result.stderr
    assert "imagefolder" in result.stdout and "72" in result.stdout
    written = json.loads((tmp_path / "cli.json").read_text())
    assert (written["image_size"], written["text_length"]) == (48, 16)
    # The geometry reached the model: the CLI's numbers are those of the model rebuilt at 48 px / 16 tokens,
    # and differ from the model's own 32 px / 8 tokens.
    at_48 = zeroshot(load_model(str(run_dir), image_size=48, text_length=16), "imagefolder", str(eval_dir))["metrics"]
    native = zeroshot(load_model(str(run_dir)), "imagefolder", str(eval_dir))["metrics"]
    for metrics in (written["metrics"], at_48, native):
        del metrics["images_per_s"]
    assert written["metrics"] == pytest.approx(at_48)
    assert written["metrics"] != pytest.approx(native)


def test_open_clip_bin_directory_and_architecture_with_pretrained_file(trained, tmp_path, cli):
    # A Hugging Face snapshot of an open_clip model: open_clip_config.json + open_clip_pytorch_model.bin.
    run_dir, eval_dir = trained
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    shutil.copy(run_dir / "final" / "open_clip_config.json", snapshot)
    torch.save(load_file(str(run_dir / "final" / "open_clip_model.safetensors")), snapshot / "open_clip_pytorch_model.bin")
    reference = zeroshot(load_model(str(run_dir)), "imagefolder", str(eval_dir), batch_size=16)["metrics"]
    from_bin = zeroshot(load_model(str(snapshot)), "imagefolder", str(eval_dir), batch_size=16)["metrics"]
    assert from_bin["acc1"] == reference["acc1"] and from_bin["acc5"] == reference["acc5"]
    (snapshot / "open_clip_pytorch_model.bin").rename(tmp_path / "weights.bin")
    with pytest.raises(ClipaError, match="has open_clip_config.json but no weights file"):
        load_model(str(snapshot))
    # --model ARCH --pretrained FILE: clipa-tiny at its native 64 px / 32 tokens, the same resizing as
    # evaluating the run at that geometry.
    result = cli("zeroshot", "--model", "clipa-tiny", "--pretrained", tmp_path / "weights.bin", "--dataset",
                 "imagefolder", "--data-root", eval_dir, "--num-workers", "0", "--output", tmp_path / "arch.json")
    assert result.returncode == 0, result.stderr
    arch = json.loads((tmp_path / "arch.json").read_text())
    at_native = zeroshot(load_model(str(run_dir), image_size=64, text_length=32), "imagefolder", str(eval_dir))
    assert (arch["model"], arch["image_size"], arch["text_length"]) == ("clipa-tiny", 64, 32)
    assert arch["metrics"]["acc1"] == at_native["metrics"]["acc1"]


def test_output_writes_one_clip_benchmark_object_per_file(trained, tmp_path, cli):
    run_dir, eval_dir = trained
    assert output_paths(tmp_path / "r.json", ["imagenet"]) == [tmp_path / "r.json"]
    assert output_paths(tmp_path / "r.json", ["imagenet", "imagenet-v2"]) == [tmp_path / "r_imagenet.json",
                                                                            tmp_path / "r_imagenet-v2.json"]
    assert output_paths("out/{dataset}/zs.json", ["wds", "imagenet-a"]) == [Path("out/wds/zs.json"),
                                                                             Path("out/imagenet-a/zs.json")]
    result = cli("zeroshot", "--model", run_dir, "--dataset", "imagefolder", "--data-root", eval_dir,
                 "--num-workers", "0", "--output", tmp_path / "res" / "{dataset}.json")
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "res" / "imagefolder.json").read_text())
    assert isinstance(written, dict) and written["dataset"] == "imagefolder"
    assert written["task"] == "zeroshot_classification" and set(written["metrics"]) >= {"acc1", "acc5", "mean_per_class_recall"}
    twice = cli("zeroshot", "--model", run_dir, "--dataset", "imagefolder", "--dataset", "imagefolder",
                "--data-root", eval_dir)
    assert twice.returncode == 2 and "given more than once" in twice.stderr


def _png(path: Path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)


def test_imagenet_r_layout_maps_wordnet_ids_to_its_200_classes(tmp_path):
    subset = _timm_synsets("imagenet_r_synsets.txt")
    root = tmp_path / "imagenet-r"
    for i, wnid in enumerate(subset):
        _png(root / "imagenet-r" / wnid / f"{i}.jpg".replace(".jpg", ".png"))
    data = load_zeroshot_data("imagenet-r", eval_transform(32), str(root))
    assert len(data.classnames) == 200 and len(data.templates) == 80
    assert data.classnames[0] == open_clip.IMAGENET_CLASSNAMES[_timm_synsets("imagenet_synsets.txt").index(subset[0])]
    assert [label for _, label in data.dataset.items] == list(range(200))


def test_imagenet_v2_layout_folders_named_by_class_index(tmp_path):
    root = tmp_path / "imagenet-v2"
    for i in range(1000):
        (root / "imagenetv2-matched-frequency-format-val" / str(i)).mkdir(parents=True)
    _png(root / "imagenetv2-matched-frequency-format-val" / "0" / "a.png")
    _png(root / "imagenetv2-matched-frequency-format-val" / "999" / "b.png")
    data = load_zeroshot_data("imagenet-v2", eval_transform(32), str(root))
    assert data.classnames == list(open_clip.IMAGENET_CLASSNAMES)
    assert [label for _, label in data.dataset.items] == [0, 999]
    synsets = _timm_synsets("imagenet_synsets.txt")
    (tmp_path / "wnids" / synsets[0]).mkdir(parents=True)  # an ImageNet layout is not ImageNetV2's
    with pytest.raises(ClipaError, match=r"no class folders named by class index \(0/ \.\. 999/\)"):
        load_zeroshot_data("imagenet-v2", eval_transform(32), str(tmp_path / "wnids"))
    (root / "imagenetv2-matched-frequency-format-val" / "500").rmdir()
    with pytest.raises(ClipaError, match="lacks 1 of the 1000 class folders of imagenet-v2 .first missing: 500/"):
        load_zeroshot_data("imagenet-v2", eval_transform(32), str(root))


def test_imagenet_a_layout_maps_wordnet_ids_to_its_200_classes(tmp_path):
    subset = _timm_synsets("imagenet_a_synsets.txt")
    assert subset != _timm_synsets("imagenet_r_synsets.txt")
    for i, wnid in enumerate(subset):
        _png(tmp_path / "imagenet-a" / wnid / f"{i}.png")
    data = load_zeroshot_data("imagenet-a", eval_transform(32), str(tmp_path))  # parent folder accepted
    synsets = _timm_synsets("imagenet_synsets.txt")
    assert data.classnames == [open_clip.IMAGENET_CLASSNAMES[synsets.index(w)] for w in subset]
    assert [label for _, label in data.dataset.items] == list(range(200))
    shutil.rmtree(tmp_path / "imagenet-a" / subset[7])
    with pytest.raises(ClipaError, match=f"lacks 1 of the 200 class folders of imagenet-a .first missing: {subset[7]}"):
        load_zeroshot_data("imagenet-a", eval_transform(32), str(tmp_path))


def _tar(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png_bytes(value: int, noise: bool = False) -> bytes:
    pixels = np.random.RandomState(value).randint(0, 255, (32, 32, 3), dtype=np.uint8) if noise \
        else np.full((16, 16, 3), value, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_wds_label_outside_classnames_is_a_one_line_error(trained, tmp_path, cli):
    run_dir, _ = trained
    (tmp_path / "classnames.txt").write_text("red circle\nblue square\n")
    _tar(tmp_path / "test" / "0.tar", {"0000.png": _png_bytes(1), "0000.cls": b"1"})
    _tar(tmp_path / "test" / "1.tar", {"0001.png": _png_bytes(2), "0001.cls": b"0",
                                       "0002.png": _png_bytes(3), "0002.cls": b"7"})
    with pytest.raises(ClipaError, match=r"1\.tar: label 7 is outside the 2 classes of .*classnames\.txt \(valid: 0\.\.1\)"):
        load_zeroshot_data("wds", eval_transform(32), str(tmp_path))
    result = cli("zeroshot", "--model", run_dir, "--dataset", "wds", "--data-root", tmp_path, "--num-workers", "0")
    assert result.returncode == 2 and "label 7 is outside the 2 classes" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_truncated_image_in_retrieval_shard_is_skipped_and_shown(trained, tmp_path, cli):
    run_dir, _ = trained
    members = {}
    for i in range(4):
        members[f"{i:04d}.png"] = _png_bytes(i, noise=True)[: 600 if i == 2 else None]  # 2: header only, cut short
        members[f"{i:04d}.txt"] = f"caption {i}\nanother caption {i}\n".encode()
    _tar(tmp_path / "test" / "0.tar", members)
    result = retrieval(load_model(str(run_dir)), "wds", str(tmp_path))
    m = result["metrics"]
    assert (m["num_images"], m["num_texts"], m["skipped_images"]) == (3, 6, 1)
    shown = cli("retrieval", "--model", run_dir, "--dataset", "wds", "--data-root", tmp_path, "--num-workers", "0")
    assert shown.returncode == 0, shown.stderr
    assert "3 images, 6 captions" in shown.stdout and "skipped images (unreadable): 1" in shown.stdout


def test_imagenet_layout_needs_every_class_folder(tmp_path):
    synsets = _timm_synsets("imagenet_synsets.txt")
    for wnid in synsets[:-1]:
        (tmp_path / "val" / wnid).mkdir(parents=True)
    with pytest.raises(ClipaError, match=f"lacks 1 of the 1000 class folders.*first missing: {synsets[-1]}"):
        load_zeroshot_data("imagenet", eval_transform(32), str(tmp_path))
    with pytest.raises(ClipaError, match="no class folders named by WordNet id"):
        load_zeroshot_data("imagenet-sketch", eval_transform(32), str(tmp_path / "val" / synsets[0]))
    with pytest.raises(ClipaError, match="--data-root: required for --dataset imagenet"):
        load_zeroshot_data("imagenet", eval_transform(32), None)


def test_wds_layout_and_unreadable_images_are_counted(trained, tmp_path, cli):
    run_dir, _ = trained
    root = tmp_path / "wds"
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("red circle\nblue square\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for i in range(6):
            buffer = io.BytesIO()
            Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)).save(buffer, format="PNG")
            payload = buffer.getvalue() if i != 5 else b"not an image"
            for name, data in ((f"{i:04d}.png", payload), (f"{i:04d}.cls", str(i % 2).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    result = zeroshot(load_model(str(run_dir)), "wds", str(root))
    assert result["metrics"]["num_samples"] == 5 and result["metrics"]["skipped_images"] == 1
    assert result["num_classes"] == 2
    shown = cli("zeroshot", "--model", run_dir, "--dataset", "wds", "--data-root", root, "--num-workers", "2")
    assert shown.returncode == 0, shown.stderr
    row = next(line for line in shown.stdout.splitlines() if line.startswith("│ wds"))
    assert [cell.strip() for cell in row.split("│")][7:9] == ["5", "1"]  # images, skipped


def test_imagefolder_bad_input(tmp_path):
    _png(tmp_path / "a" / "1.png")
    _png(tmp_path / "b" / "1.png")
    (tmp_path / "classnames.txt").write_text("only one\n")
    with pytest.raises(ClipaError, match="lists 1 class names but .* has 2 class folders"):
        load_zeroshot_data("imagefolder", eval_transform(32), str(tmp_path))
    with pytest.raises(ClipaError, match=r"nope \(from --data-root\) does not exist; --dataset imagefolder reads it "
                                         r"\(layout: CLASS/IMAGE.jpg, one folder per class\)"):
        load_zeroshot_data("imagefolder", eval_transform(32), str(tmp_path / "nope"))
    with pytest.raises(ClipaError, match="is not a directory"):
        load_zeroshot_data("imagefolder", eval_transform(32), str(tmp_path / "classnames.txt"))
    assert len(load_templates("simple", None)) == 7


def test_eval_during_training_appends_results(tmp_path):
    recipe = load_recipe(RECIPES / "tiny" / "pretrain.toml",
                         micro_overrides(**{"eval.every_steps": 2, "eval.zeroshot": '["synthetic"]',
                                            "eval.retrieval": '["synthetic"]', "checkpoint.every_steps": 2,
                                            "checkpoint.keep_last": 3}))
    train(recipe, "pretrain", tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "zeroshot/synthetic/acc1" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    # the first and the last row equal a separate evaluation of that step's checkpoint (the model the
    # row was taken from, not the one before or after its update)
    for r in (evals[0], evals[-1]):
        step = tmp_path / "run" / "checkpoints" / f"step_{r['step']:06d}"
        model = load_model(str(step))
        zs, ret = zeroshot(model, "synthetic")["metrics"], retrieval(model, "synthetic")["metrics"]
        assert (r["zeroshot/synthetic/acc1"], r["zeroshot/synthetic/acc5"]) == pytest.approx(
            (zs["acc1"], zs["acc5"]), abs=1e-6), (r, zs)
        for side in ("image", "text"):  # the retrieval recalls in the same rows
            for k in (1, 5, 10):
                key = f"{side}_retrieval_recall@{k}"
                assert r[f"retrieval/synthetic/{key}"] == pytest.approx(ret[key], abs=1e-6), (r["step"], key)
    assert len({r["retrieval/synthetic/image_retrieval_recall@5"] for r in evals}) > 1  # the model changed
    with pytest.raises(ClipaError, match="eval.retrieval_data_root: needed by eval.retrieval"):
        load_recipe(None, ['eval.retrieval=["csv"]'])
    with pytest.raises(ClipaError, match='eval.retrieval.0.: unknown value "coco"'):
        load_recipe(None, ['eval.retrieval=["coco"]'])
    with pytest.raises(ClipaError, match="eval.data_root: needed by eval.zeroshot"):
        load_recipe(None, ['eval.zeroshot=["imagenet"]'])


def test_report_plots_every_series_and_summarises(tmp_path, cli):
    recipe = load_recipe(RECIPES / "tiny" / "pretrain.toml",
                         micro_overrides(**{"eval.every_steps": 3, "eval.zeroshot": '["synthetic"]'}))
    train(recipe, "pretrain", tmp_path / "run")
    result = cli("report", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    pngs = sorted(p.name for p in (tmp_path / "run" / "report").glob("*.png"))
    assert {"loss.png", "lr.png", "logit_scale.png", "zeroshot_synthetic_acc1.png"} <= set(pngs)
    with Image.open(tmp_path / "run" / "report" / "loss.png") as image:
        pixels = np.asarray(image)
    assert (pixels[:, :, 2] > 150).sum() > 50 and (pixels[:, :, 0] < 60).sum() > 50  # a drawn blue line
    assert "zeroshot/synthetic/acc1: last" in result.stdout and "loss " in result.stdout
    bad = cli("report", tmp_path)
    assert bad.returncode == 2 and "metrics.jsonl not found" in bad.stderr


def test_an_absurd_image_size_is_refused_before_the_model_is_built(tmp_path):
    """clipa-micro's position grid at 100,000 px (~20 GB) would allocate and swap rather than fail, so
    the size is checked before the model is built (clipa-tiny's larger grid failed at once)."""
    from safetensors.torch import save_file

    from clipa.model.build import arch_config, create_model

    weights = tmp_path / "micro.safetensors"
    save_file(create_model(arch_config("clipa-micro")).state_dict(), str(weights))
    assert load_model("clipa-micro", pretrained=str(weights), image_size=2048).image_size == 2048  # 65,536 patches
    with pytest.raises(ClipaError, match=r"^--image-size: 100000 px is 156,250,000 patches of 8 px, more than 65,536"):
        load_model("clipa-micro", pretrained=str(weights), image_size=100000)
