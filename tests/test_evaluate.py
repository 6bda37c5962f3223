"""Evaluation: numbers equal an independent computation, layouts, sharding, bad input, eval during training."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clipa.data.shards import write_synthetic
from clipa.data.transforms import eval_transform
from clipa.errors import ClipaError
from clipa.evaluate.datasets import _timm_synsets, load_templates, load_zeroshot_data
from clipa.evaluate.models import load_model
from clipa.evaluate.zeroshot import zeroshot
from clipa.recipe import load_recipe
from clipa.train import train
from conftest import RECIPES, run_torchrun, tiny_overrides

HELPER = str(Path(__file__).with_name("distributed_eval.py"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    info = write_synthetic(root / "synth", num_samples=1, shard_size=1, eval_per_class=3)
    recipe = load_recipe(RECIPES / "tiny" / "pretrain.toml", tiny_overrides(**{"train.total_samples": 32 * 10}))
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


def test_two_process_evaluation_equals_one_process(trained, tmp_path):
    run_dir, eval_dir = trained
    out = tmp_path / "result.json"
    run_torchrun(HELPER, run_dir, eval_dir, out, timeout=300)
    two = json.loads(out.read_text())
    one = zeroshot(load_model(str(run_dir)), "imagefolder", str(eval_dir))
    assert two["world"] == 2
    for key in ("acc1", "acc5", "mean_per_class_recall", "num_samples"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], abs=1e-12), key


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


def test_wds_layout_and_unreadable_images_are_counted(trained, tmp_path):
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


def test_imagefolder_bad_input(tmp_path):
    _png(tmp_path / "a" / "1.png")
    _png(tmp_path / "b" / "1.png")
    (tmp_path / "classnames.txt").write_text("only one\n")
    with pytest.raises(ClipaError, match="lists 1 class names but .* has 2 class folders"):
        load_zeroshot_data("imagefolder", eval_transform(32), str(tmp_path))
    with pytest.raises(ClipaError, match="is not a directory"):
        load_zeroshot_data("imagefolder", eval_transform(32), str(tmp_path / "nope"))
    assert len(load_templates("simple", None)) == 7


def test_eval_during_training_appends_results(tmp_path):
    recipe = load_recipe(RECIPES / "tiny" / "pretrain.toml",
                         tiny_overrides(**{"eval.every_steps": 2, "eval.zeroshot": '["synthetic"]'}))
    train(recipe, "pretrain", tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "zeroshot/synthetic/acc1" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert all(0 <= r["zeroshot/synthetic/acc1"] <= r["zeroshot/synthetic/acc5"] <= 1 for r in evals)
    with pytest.raises(ClipaError, match="eval.data_root: needed by eval.zeroshot"):
        load_recipe(None, ['eval.zeroshot=["imagenet"]'])


def test_report_plots_every_series_and_summarises(tmp_path, cli):
    recipe = load_recipe(RECIPES / "tiny" / "pretrain.toml",
                         tiny_overrides(**{"eval.every_steps": 3, "eval.zeroshot": '["synthetic"]'}))
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
