import json
import os
import subprocess
import sys
import tarfile

import pytest

from conftest import RECIPES, micro_overrides, run_cli


def assert_user_error(result, *fragments):
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert message.startswith("error:"), message
    assert "\n" not in message, f"not one line: {message!r}"
    for fragment in fragments:
        assert fragment in " ".join(message.split()), message


def test_installed_entry_point_version_help_and_user_error():
    """The real console entry point, in a subprocess, as a user runs it."""
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("clipa ")
    assert run_cli("pretrain", "--help").returncode == 0
    assert_user_error(run_cli("validate", "no/such/recipe.toml"), "recipe file not found")


@pytest.mark.parametrize("content, overrides, fragments", [
    (None, [], ["recipe file not found"]),
    ("[optim]\nlr = \n", [], ["TOML syntax error", "line 2"]),
    ("[optim]\nlrr = 1e-3\n", [], ["optim.lrr: unknown key", "did you mean 'optim.lr'"]),
    ("[optim]\nlr = 'fast'\n", [], ['optim.lr: expected float, got "fast"']),
    ("[model]\narch = 'ViT-B-61'\n", [], ['model.arch: unknown architecture "ViT-B-61"']),
    ("", ["model.arch=clipa-tiny", "reduction.image_size=30"], ["reduction.image_size: 30 is not divisible"]),
])
def test_bad_recipes_exit_2_with_one_line(cli, tmp_path, content, overrides, fragments):
    path = tmp_path / "r.toml"
    if content is not None:
        path.write_text(content)
    for command in ("validate", "pretrain"):
        assert_user_error(cli(command, path, *overrides), *fragments)


def test_finetune_requires_an_existing_init_checkpoint(cli, tmp_path):
    path = tmp_path / "ft.toml"
    path.write_text("[model]\narch = 'clipa-tiny'\n")
    assert_user_error(cli("finetune", path), "init.checkpoint: finetune needs weights")
    assert_user_error(cli("finetune", path, f"init.checkpoint={tmp_path / 'missing'}"), "init.checkpoint:", "does not exist")


def test_unknown_dataset_and_model_exit_2(cli, tmp_path):
    assert_user_error(cli("zeroshot", "--model", tmp_path, "--dataset", "imagenet-z"),
                      '--dataset: unknown dataset "imagenet-z"; did you mean "imagenet-r"?')
    assert_user_error(cli("zeroshot", "--model", "ViT-B-61", "--dataset", "synthetic"), "unknown architecture")
    assert_user_error(cli("zeroshot", "--model", "ViT-B-16", "--dataset", "synthetic"), "--pretrained")
    assert_user_error(cli("zeroshot", "--model", tmp_path, "--dataset", "synthetic"), "holds no model")
    assert_user_error(cli("zeroshot", "--model", tmp_path / "nope", "--dataset", "synthetic"), "does not exist")


def test_ls_cp_validate_shipped_recipes(cli, tmp_path):
    listing = cli("ls")
    assert listing.returncode == 0
    shipped = sorted(p.relative_to(RECIPES).with_suffix("").as_posix() for p in RECIPES.rglob("*.toml"))
    assert shipped, "no recipes found"
    for name in shipped:  # as shipped: published weights are checked by name, never downloaded
        assert name in listing.stdout
        assert cli("validate", RECIPES / f"{name}.toml").returncode == 0
    # what a sample is to the model: a masked stage does not read like a resized one
    masked = " ".join(cli("validate", "tiny/pretrain").stdout.split())
    assert "clipa-tiny at 64px (75% of patches masked) / 8 tokens;" in masked, masked
    resized = " ".join(cli("validate", "tiny/pretrain", "reduction.image=resize", "reduction.image_size=32",
                           "reduction.mask_ratio=0").stdout.split())
    assert "clipa-tiny at 32px / 8 tokens;" in resized, resized
    copied = cli("cp", "tiny/pretrain", tmp_path)
    assert copied.returncode == 0
    assert (tmp_path / "pretrain.toml").read_text() == (RECIPES / "tiny" / "pretrain.toml").read_text()
    assert_user_error(cli("cp", "tiny/pretrain", tmp_path), "already exists")
    assert_user_error(cli("cp", "tiny/pretrian", tmp_path), "did you mean tiny/pretrain")


def test_dry_run_prints_resolved_recipe_and_trains_nothing(cli, tmp_path):
    result = cli("pretrain", "tiny/pretrain", "optim.lr=0.001", "--dry-run", "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert "lr = 0.001" in result.stdout
    assert "dry run" in result.stdout and "64px" in result.stdout and "mask ratio 0.75" in result.stdout
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_data_synth_then_train_view_and_zeroshot_imagefolder(cli, tmp_path):
    result = cli("data", "synth", tmp_path / "synth", "--num-samples", 25, "--shard-size", 10, "--eval-per-class", 2)
    assert result.returncode == 0, result.stderr
    shards = sorted((tmp_path / "synth" / "train").glob("*.tar"))
    assert [s.name for s in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
    assert sorted(names[:3]) == ["000000000.jpg", "000000000.json", "000000000.txt"]
    import webdataset as wds

    samples = list(wds.WebDataset([str(s) for s in shards], shardshuffle=False).decode("pil").to_tuple("jpg", "txt"))
    assert len(samples) == 25 and samples[0][0].size == (64, 64)
    classes = [p for p in (tmp_path / "synth" / "eval").iterdir() if p.is_dir()]
    assert len(classes) == 24 and all(len(list(c.glob("*.png"))) == 2 for c in classes)

    # Train on the shards just written (25 samples, read again each epoch), not on the built-in stream.
    train_dir = tmp_path / "synth" / "train"
    run = cli("pretrain", "tiny/pretrain", *micro_overrides(**{"data.train": train_dir}), "--out", tmp_path / "run")
    assert run.returncode == 0, run.stderr
    assert f'train = "{train_dir}"' in (tmp_path / "run" / "config.toml").read_text()
    builtin = cli("pretrain", "tiny/pretrain", *micro_overrides(), "--out", tmp_path / "builtin")
    assert builtin.returncode == 0, builtin.stderr

    def losses(run_dir):
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [line["loss"] for line in lines if "loss" in line]
    # Same model, seed and steps: only the data differs, so the losses must too.
    assert losses(tmp_path / "run") != pytest.approx(losses(tmp_path / "builtin"), rel=1e-4)
    out_json = tmp_path / "zs.json"
    zs = cli("zeroshot", "--model", tmp_path / "run", "--dataset", "imagefolder", "--dataset", "synthetic",
             "--data-root", tmp_path / "synth" / "eval", "--output", out_json)
    assert zs.returncode == 0, zs.stderr
    # several datasets without {dataset} in --output: one CLIP_benchmark object per file, zs_DATASET.json
    results = [json.loads((tmp_path / f"zs_{name}.json").read_text()) for name in ("imagefolder", "synthetic")]
    assert not out_json.exists() and [r["dataset"] for r in results] == ["imagefolder", "synthetic"]
    from clipa.evaluate.models import load_model
    from clipa.evaluate.zeroshot import zeroshot

    model = load_model(str(tmp_path / "run"))
    for r, root in zip(results, (str(tmp_path / "synth" / "eval"), None)):
        assert r["task"] == "zeroshot_classification" and r["language"] == "en"
        # each file holds its own dataset's numbers: those of a separate evaluation of that dataset
        alone = zeroshot(model, r["dataset"], data_root=root)["metrics"]
        assert {k: r["metrics"][k] for k in ("acc1", "acc5", "mean_per_class_recall", "num_samples")} == pytest.approx(
            {k: alone[k] for k in ("acc1", "acc5", "mean_per_class_recall", "num_samples")}, abs=1e-6), (r, alone)
    assert [r["metrics"]["num_samples"] for r in results] == [48, 960]
    assert "zero-shot classification" in zs.stdout


def test_v2_recipe_without_transformers_is_a_clear_error(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed: importing it fails
    result = cli("pretrain", "vit_h14/pretrain_84", "--out", tmp_path / "run")
    assert_user_error(result, "model.arch: ViT-H-14-CLIPA uses the Hugging Face tokenizer", "pip install 'clipa[hf]'")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_v2_recipe_without_tokenizer_files_offline_is_a_clear_error(tmp_path):
    pytest.importorskip("transformers")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))  # an empty cache, no network
    result = subprocess.run([sys.executable, "-m", "clipa", "pretrain", "vit_h14/pretrain_84", "--out",
                             str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "cannot load the Hugging Face tokenizer 'bert-base-uncased'" in result.stderr
    assert "hf download bert-base-uncased" in result.stderr
