"""The README's first example, exactly as a user types it, from an empty directory:

    clipa pretrain tiny/pretrain
    clipa finetune
    clipa zeroshot --dataset synthetic

(in this process, with a few steps' total_samples as overrides), then what hangs off that chain: `clipa runs`,
bf16 evaluation agreeing with fp32, and result files that CLIP_benchmark's own tooling reads row for row with
its own."""

import csv
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from conftest import run_in_process, tiny_overrides

# The columns CLIP_benchmark 1.6.2 writes for an evaluation (clip_benchmark/cli.py, main_eval's `dump`:
# dataset, model, pretrained, task, metrics, language) and the metrics of its zero-shot classification
# (metrics/zeroshot_classification.py, evaluate()). Pinned here because the package is not a dev dependency:
# it pulls pycocoevalcap (a 104 MB wheel of Java jars) and scikit-learn + scipy for tasks clipa does not run.
CLIP_BENCHMARK_KEYS = {"dataset", "model", "pretrained", "task", "metrics", "language"}
CLIP_BENCHMARK_ZEROSHOT_METRICS = {"acc1", "acc5", "mean_per_class_recall"}


def clip_benchmark_build_rows(paths):
    """CLIP_benchmark 1.6.2's `build` (cli.py, main_build), row by row: metrics flattened into the row, then
    `model_fullname` = model + " " + pretrained. `clip_benchmark build` runs this when the package is there."""
    rows = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        row = {}
        row.update(data["metrics"])
        row.update(data)
        del row["metrics"]
        row["model_fullname"] = row["model"] + " " + row["pretrained"]
        rows.append(row)
    return rows


class Template:
    """clipa's template (a callable) as CLIP_benchmark's classifier uses one: `template.format(c=classname)`."""

    def __init__(self, fn):
        self.fn = fn

    def format(self, c):
        return self.fn(c)


class WithClasses:
    """A dataset as CLIP_benchmark's metric code reads one: it asks `dataloader.dataset.classes`."""

    def __init__(self, dataset, classes):
        self.dataset, self.classes = dataset, classes

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index]


def ok(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The three commands in an empty directory; (the directory, each command's result)."""
    home = tmp_path_factory.mktemp("empty")
    quick = tiny_overrides(**{"train.total_samples": 32 * 8})
    before = os.getcwd()
    os.chdir(home)
    try:
        assert not any(home.iterdir())
        pre = ok(run_in_process("pretrain", "tiny/pretrain", *quick))
        fine = ok(run_in_process("finetune", *quick))
        zs = ok(run_in_process("zeroshot", "--dataset", "synthetic", "--num-workers", "0", "--output", "zs.json"))
    finally:
        os.chdir(before)
    return home, pre, fine, zs


def test_pretrain_then_bare_finetune_then_bare_zeroshot_from_an_empty_directory(chain):
    home, _, fine, zs = chain
    assert fine.stdout.splitlines()[:3] == ["continuing runs/tiny-pretrain (pretrain, step 8/8, finished)",
                                            "recipe     tiny/finetune (its next)",
                                            "checkpoint runs/tiny-pretrain/final"], fine.stdout[:500]
    assert (home / "runs" / "tiny-finetune" / "final" / "open_clip_model.safetensors").is_file()
    assert 'checkpoint = "runs/tiny-pretrain/final"' in (home / "runs" / "tiny-finetune" / "config.toml").read_text()
    assert zs.stdout.splitlines()[0] == "model: runs/tiny-finetune (newest finished finetune run; choose another with --model)"
    assert "zero-shot classification" in zs.stdout
    result = json.loads((home / "zs.json").read_text())
    assert (result["dataset"], result["precision"]) == ("synthetic", "fp32")
    assert (result["model"], result["pretrained"]) == ("local-dir:runs/tiny-finetune/final", "runs/tiny-finetune/final")
    # the numbers are that run's: the same evaluation of runs/tiny-finetune, asked for by name
    from clipa.evaluate.models import load_model
    from clipa.evaluate.zeroshot import zeroshot

    named = zeroshot(load_model(str(home / "runs" / "tiny-finetune")), "synthetic")["metrics"]
    for key in ("num_samples", "acc1", "acc5", "mean_per_class_recall"):
        assert result["metrics"][key] == named[key], (key, result["metrics"], named)


def test_runs_lists_the_chain(chain, monkeypatch):
    home = chain[0]
    monkeypatch.chdir(home)
    listed = json.loads(ok(run_in_process("runs", "--json")).stdout)
    assert [(r["name"], r["stage"], r["finished"], r["steps_done"], r["total_steps"]) for r in listed] == [
        ("tiny-pretrain", "pretrain", True, 8, 8), ("tiny-finetune", "finetune", True, 8, 8)]
    assert listed[1]["parent"] == "runs/tiny-pretrain/final" and listed[0]["next"] == "tiny/finetune"


def test_bf16_evaluation_agrees_with_fp32(chain):
    """bf16 autocast gives fp32's logits within 0.01 (cosine units) and fp32's prediction on every image that
    fp32 decides by a clear margin, so acc1 differs only by images fp32 itself calls near ties. (On a trained
    model that is within one image; this 2-step model is near chance, with most logits within 0.02 of each
    other, so most of its decisions are ties that any rounding flips.)"""
    import torch
    from open_clip import build_zero_shot_classifier

    from clipa.data.transforms import eval_transform
    from clipa.evaluate.datasets import load_zeroshot_data
    from clipa.evaluate.models import load_model
    from clipa.evaluate.precision import autocast

    loaded = load_model(str(chain[0] / "runs" / "tiny-finetune"))
    model = loaded.model.eval()
    data = load_zeroshot_data("synthetic", eval_transform(loaded.image_size, loaded.mean, loaded.std,
                                                          loaded.interpolation, loaded.resize_mode))
    images = torch.stack([data.dataset[i][0] for i in range(len(data.dataset))])
    labels = torch.tensor([data.dataset[i][1] for i in range(len(data.dataset))])
    logits = {}
    for precision in ("fp32", "bf16"):
        with torch.no_grad(), autocast(precision, "cpu"):
            weights = build_zero_shot_classifier(model, loaded.tokenizer, data.classnames, data.templates,
                                                 num_classes_per_batch=10, device="cpu")
            logits[precision] = torch.cat([(model.encode_image(batch, normalize=True) @ weights).float()
                                           for batch in images.split(64)])
    assert logits["bf16"].dtype == torch.float32 and logits["fp32"].shape == (len(images), len(data.classnames))
    error = (logits["bf16"] - logits["fp32"]).abs().max().item()
    assert 0 < error < 0.01, error  # > 0: bf16 really computed in bf16 (not fp32 twice)
    top2 = logits["fp32"].topk(2).values
    clear = top2[:, 0] - top2[:, 1] > 0.02
    assert torch.equal(logits["bf16"][clear].argmax(1), logits["fp32"][clear].argmax(1))
    hits = {precision: int((value.argmax(1) == labels).sum()) for precision, value in logits.items()}
    assert abs(hits["bf16"] - hits["fp32"]) <= 1 + int((~clear).sum()), (hits, int((~clear).sum()))


def test_result_json_lines_up_with_clip_benchmarks_build(chain, tmp_path):
    home = chain[0]
    ours = json.loads((home / "zs.json").read_text())
    assert CLIP_BENCHMARK_KEYS <= set(ours) and CLIP_BENCHMARK_ZEROSHOT_METRICS <= set(ours["metrics"])
    assert (ours["task"], ours["language"], ours["pretrained"]) == ("zeroshot_classification", "en",
                                                                    "runs/tiny-finetune/final")
    [row] = clip_benchmark_build_rows([home / "zs.json"])
    assert row["model_fullname"] == "local-dir:runs/tiny-finetune/final runs/tiny-finetune/final"
    assert row["acc1"] == ours["metrics"]["acc1"] and row["dataset"] == "synthetic"


@pytest.mark.skipif(importlib.util.find_spec("clip_benchmark") is None,
                    reason="clip_benchmark is not installed (pip install clip_benchmark: not a dev dependency, see "
                           "CLIP_BENCHMARK_KEYS)")
def test_clip_benchmark_itself_writes_the_same_keys_and_values_and_builds_one_table(chain, tmp_path, monkeypatch):
    """CLIP_benchmark's own zero-shot metric code on the same exported model and images, its own `dump`, then
    `clip_benchmark build` over its file and clipa's: the same columns, the same numbers."""
    import open_clip
    import torch
    from clip_benchmark import cli as cb_cli
    from clip_benchmark.metrics import zeroshot_classification as cb_zeroshot

    from clipa.evaluate.datasets import load_zeroshot_data

    home = chain[0]
    final = home / "runs" / "tiny-finetune" / "final"
    # CLIP_benchmark 1.6.2's accuracy() calls float() on a one-element array, which numpy 2 refuses: the same
    # sum, taken as a Python number.
    def accuracy(output, target, topk=(1,)):
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]

    monkeypatch.setattr(cb_zeroshot, "accuracy", accuracy)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{final}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{final}")
    model.eval()
    data = load_zeroshot_data("synthetic", preprocess)
    loader = torch.utils.data.DataLoader(WithClasses(data.dataset, data.classnames), batch_size=64)
    templates = [Template(t) for t in data.templates]  # its classifier calls template.format(c=classname)
    metrics = cb_zeroshot.evaluate(model, loader, tokenizer, data.classnames, templates, device="cpu", amp=False)
    model_name = f"local-dir:{final}"
    # --pretrained is ignored by open_clip for local-dir: models; a user names the weights' folder, as clipa does.
    theirs = {"dataset": "synthetic", "model": model_name, "pretrained": str(final), "task": "zeroshot_classification",
              "metrics": metrics, "language": "en"}  # main_eval's dump, as it builds it
    (tmp_path / "theirs.json").write_text(json.dumps(theirs))
    monkeypatch.chdir(home)
    ok(run_in_process("zeroshot", "--model", model_name, "--dataset", "synthetic", "--num-workers", "0",
                      "--output", tmp_path / "ours.json"))
    ours = json.loads((tmp_path / "ours.json").read_text())
    assert set(theirs) <= set(ours) and set(metrics) <= set(ours["metrics"])
    for key in CLIP_BENCHMARK_KEYS - {"metrics"}:
        assert ours[key] == theirs[key], key
    for key, value in metrics.items():
        assert ours["metrics"][key] == pytest.approx(value, abs=1.5 / ours["metrics"]["num_samples"]), key

    monkeypatch.setattr(sys, "argv", ["clip_benchmark", "build", str(tmp_path / "theirs.json"),
                                      str(tmp_path / "ours.json"), "--output", str(tmp_path / "table.csv")])
    cb_cli.main()
    with open(tmp_path / "table.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and rows[0]["model_fullname"] == rows[1]["model_fullname"]
    for column in ("dataset", "model", "pretrained", "task", "language", "model_fullname"):
        assert rows[0][column] == rows[1][column], column
    assert rows == [{k: str(v) for k, v in row.items()} | {k: "" for k in set(rows[0]) - set(row)}
                    for row in clip_benchmark_build_rows([tmp_path / "theirs.json", tmp_path / "ours.json"])]


def write_wds(root, classnames, labels):
    """CLIP_benchmark's webdataset classification layout: classnames.txt, templates, test/0.tar of png + cls."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("".join(f"{name}\n" for name in classnames))
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for i, label in enumerate(labels):
            buffer = io.BytesIO()
            Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)).save(buffer, format="PNG")
            for name, data in ((f"{i:04d}.png", buffer.getvalue()), (f"{i:04d}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_several_wds_datasets_in_one_call_each_under_its_own_root(chain, tmp_path, monkeypatch):
    monkeypatch.chdir(chain[0])
    write_wds(tmp_path / "bench" / "cars", ["red circle", "blue square"], [0, 1, 0])
    write_wds(tmp_path / "bench" / "pets", ["cat", "dog", "bird"], [2, 1])
    shown = ok(run_in_process("zeroshot", "--dataset", "wds/cars", "--dataset", "wds/pets", "--data-root",
                              tmp_path / "bench" / "{dataset}", "--num-workers", "0", "--output",
                              tmp_path / "out" / "{dataset}.json"))
    cars, pets = (json.loads((tmp_path / "out" / f"{name}.json").read_text()) for name in ("cars", "pets"))
    assert (cars["dataset"], cars["num_classes"], cars["metrics"]["num_samples"]) == ("wds/cars", 2, 3)
    assert (pets["dataset"], pets["num_classes"], pets["metrics"]["num_samples"]) == ("wds/pets", 3, 2)
    assert "wds/cars" in shown.stdout and "wds/pets" in shown.stdout


def test_the_readme_opens_with_these_commands():
    """The README's first example is the chain the fixture above runs (plus the CLIPA_DATA line, which needs
    ImageNet), and it shows what the chain prints, including the lines the tests above check."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    first = readme.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert first == ["clipa pretrain tiny/pretrain", "clipa finetune", "clipa zeroshot --dataset synthetic",
                     "CLIPA_DATA=/path/to/datasets clipa zeroshot --dataset imagenet     # when ImageNet is there"]
    shown = readme.split("```\n$ clipa pretrain tiny/pretrain\n", 1)[1].split("```", 1)[0]
    for text in ("recipe     tiny/finetune (its next)\ncheckpoint runs/tiny-pretrain/final\n",
                 "model: runs/tiny-finetune (newest finished finetune run; choose another with --model)\n",
                 "error: --data-root: /path/to/datasets/imagenet (from $CLIPA_DATA/imagenet) does not exist"):
        assert text in shown, text
    assert len(readme.splitlines()) < 300
