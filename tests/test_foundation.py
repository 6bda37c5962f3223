"""The trainer's basics (schedule, temperature clamp, precision) and the model-loading errors a user meets first."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from clipa.evaluate.models import load_model
from clipa.model.build import arch_config, create_model, native_geometry, stage_config
from clipa.recipe.load import load_recipe
from clipa.train.parallel import make_accelerator
from clipa.train.trainer import train

from conftest import RECIPES, run_cli, tiny_overrides
from test_cli import assert_user_error


def _random_weights(arch: str, path: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(stage_config(arch, native_geometry(arch_config(arch))))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model


def test_logged_lr_is_warmup_then_cosine_and_the_temperature_is_clamped(tmp_path):
    lr, warmup, steps = 1e-3, 3, 8
    recipe = load_recipe(RECIPES / "tiny" / "pretrain.toml", tiny_overrides(**{
        "train.total_samples": 32 * steps, "train.log_every_steps": 1, "optim.warmup_steps": warmup,
        "optim.lr": lr, "train.logit_scale_max": 10}))
    train(recipe, "pretrain", tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [line for line in lines if "lr" in line]
    assert [line["step"] for line in logged] == list(range(1, steps + 1))
    # Step s (1-based) trains at: linear warmup s/warmup, then cosine from 1 to 0 over the remaining steps.
    expected = [lr * s / warmup if s <= warmup else lr * 0.5 * (1 + math.cos(math.pi * (s - 1 - warmup) / (steps - warmup)))
                for s in range(1, steps + 1)]
    assert [line["lr"] for line in logged] == pytest.approx(expected, rel=1e-9)
    # CLIP starts at 1/0.07 = 14.3; the clamp holds the learned temperature at train.logit_scale_max.
    scales = [line["logit_scale"] for line in logged]
    assert max(scales) <= 10 * (1 + 1e-6)
    assert scales[0] == pytest.approx(10, rel=1e-5)


def test_logit_scale_init_is_where_a_model_from_scratch_starts(tmp_path):
    from clipa.errors import ClipaError
    from clipa.model.build import recipe_model_config

    def start(**keys) -> float:
        recipe = load_recipe(RECIPES / "tiny" / "pretrain.toml", tiny_overrides(**keys))
        return create_model(recipe_model_config(recipe)[1]).logit_scale.exp().item()

    assert start() == pytest.approx(1 / 0.07, rel=1e-5)  # CLIP's
    assert start(**{"loss.kind": "siglip"}) == pytest.approx(10, rel=1e-5)  # SigLIP's
    assert start(**{"model.logit_scale_init": 30}) == pytest.approx(30, rel=1e-5)
    assert start(**{"model.logit_scale_init": 30, "loss.kind": "siglip"}) == pytest.approx(30, rel=1e-5)
    # and the trainer starts there: the first logged value is one optimizer step (lr 1e-3 on the log) away
    recipe = load_recipe(RECIPES / "tiny" / "pretrain.toml", tiny_overrides(**{
        "train.total_samples": 64, "train.log_every_steps": 1, "optim.lr": 1e-3, "model.logit_scale_init": 30}))
    train(recipe, "pretrain", tmp_path / "run")
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert next(line["logit_scale"] for line in logged if "logit_scale" in line) == pytest.approx(30, rel=3e-3)
    # above the clamp it would be clamped at once: refused up front
    with pytest.raises(ClipaError, match="model.logit_scale_init: must be 0 .* between 1 and train.logit_scale_max"):
        load_recipe(RECIPES / "tiny" / "pretrain.toml", tiny_overrides(**{"model.logit_scale_init": 200}))


def test_precision_auto_is_fp32_on_cpu_and_bf16_reaches_accelerate():
    """One after the other in one process, as a notebook trains runs: accelerate keeps one precision per
    process and refuses another, so each run's Accelerator must start from its own settings."""
    from accelerate.state import AcceleratorState

    try:
        for precision, expected in [("auto", "no"), ("bf16", "bf16"), ("fp32", "no"), ("bf16", "bf16")]:
            accelerator = make_accelerator(precision)
            assert accelerator.mixed_precision == expected, precision
            assert accelerator.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_architecture_plus_weights_file_loads_those_weights(tmp_path, cli):
    original = _random_weights("clipa-tiny", tmp_path / "tiny.safetensors")
    loaded = load_model("clipa-tiny", str(tmp_path / "tiny.safetensors"))
    images = torch.randn(2, 3, loaded.image_size, loaded.image_size)
    original.eval(), loaded.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_image(images), original.encode_image(images))
    out = tmp_path / "r.json"
    result = cli("zeroshot", "--model", "clipa-tiny", "--pretrained", tmp_path / "tiny.safetensors",
                 "--dataset", "synthetic", "--output", out)
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["pretrained"] == str(tmp_path / "tiny.safetensors")


def test_weights_of_another_architecture_or_not_weights_at_all_exit_2(tmp_path, cli):
    _random_weights("clipa-tiny", tmp_path / "tiny.safetensors")
    assert_user_error(cli("zeroshot", "--model", "clipa-small", "--pretrained", tmp_path / "tiny.safetensors",
                          "--dataset", "synthetic"),
                      "--pretrained: weights do not match the architecture")
    assert_user_error(cli("finetune", "tiny/finetune", "model.arch=clipa-small",
                          f"init.checkpoint={tmp_path / 'tiny.safetensors'}", "--out", tmp_path / "run"),
                      "init.checkpoint: weights do not match the architecture")
    (tmp_path / "notes.pt").write_text("not a weights file\nsecond line\n")
    assert_user_error(cli("zeroshot", "--model", "clipa-tiny", "--pretrained", tmp_path / "notes.pt",
                          "--dataset", "synthetic"), "cannot read weights")
    assert_user_error(cli("zeroshot", "--model", "ViT-B-61", "--pretrained", tmp_path / "notes.pt",
                          "--dataset", "synthetic"), '--model: unknown architecture "ViT-B-61"')


def test_the_clipa_console_script_is_installed():
    script = Path(sys.executable).parent / "clipa"
    assert script.is_file(), f"{script} missing: is clipa installed in this environment?"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("clipa "), result.stderr


@pytest.mark.slow
def test_quickstart_runs_both_stages_and_prints_the_table(tmp_path):
    # 25 + 16 steps. Measured here with the masked 64 px first stage: acc1 0.080 (pretrain) and 0.143
    # (finetune) against the bound below of 0.061, and the pretraining loss 5.71 -> 5.44. With the 32 px
    # first stage it was 0.135 and 0.149, loss 5.67 -> 4.88, and at 0.05 (12 + 8 steps) both stayed at chance.
    result = run_cli("quickstart", "--scale", "0.1", "--out", tmp_path / "qs")
    assert result.returncode == 0, result.stderr[-3000:]
    starts = ("│ pretrain", "│ finetune", "| pretrain", "| finetune")
    rows = [line for line in result.stdout.splitlines() if line.strip().startswith(starts)]
    assert len(rows) == 2, result.stdout
    assert "acc1 at 64 px" in result.stdout, result.stdout
    # each stage's first line says what a sample is to the model (the first stage masks, it does not resize)
    flat = " ".join(result.stdout.split())
    assert "pretrain: clipa-tiny at 64px (75% of patches masked) / 8 tokens," in flat, result.stdout[:3000]
    assert "finetune: clipa-tiny at 64px (30% of patches masked) / 32 tokens," in flat, result.stdout[:3000]
    # that column is the pretraining stage evaluated at the finetune's 64 px (what the finetune starts from)
    from clipa.evaluate.models import load_model
    from clipa.evaluate.zeroshot import zeroshot

    at_full = zeroshot(load_model(str(tmp_path / "qs" / "pretrain"), image_size=64, text_length=32), "synthetic")
    assert f"{at_full['metrics']['acc1']:.3f}" in rows[0].split(), (at_full["metrics"], rows[0])
    # tiny/pretrain's reduced tokens (64 px with 75% of the patches masked, 8 tokens), tiny/finetune's full
    geometry = {"pretrain": (64, 8), "finetune": (64, 32)}
    for stage in ("pretrain", "finetune"):
        result = json.loads((tmp_path / "qs" / stage / "zeroshot_synthetic.json").read_text())
        metrics = result["metrics"]
        assert 0 <= metrics["acc1"] <= metrics["acc5"] <= 1
        # Above chance (1/24) by more than 3 standard errors of a guesser's accuracy on this many images.
        chance, n = 1 / 24, metrics["num_samples"]
        assert metrics["acc1"] > chance + 3 * math.sqrt(chance * (1 - chance) / n), (stage, metrics)
        assert (result["image_size"], result["text_length"]) == geometry[stage]
        weights = load_file(str(tmp_path / "qs" / stage / "final" / "open_clip_model.safetensors"))
        image_px, text_tokens = geometry[stage]
        assert weights["visual.positional_embedding"].shape[0] == (image_px // 8) ** 2 + 1
        assert weights["positional_embedding"].shape[0] == text_tokens
        if stage == "pretrain":  # the loss fell over the pretraining
            lines = [json.loads(line) for line in (tmp_path / "qs" / stage / "metrics.jsonl").read_text().splitlines()]
            losses = [line["loss"] for line in lines if "loss" in line]
            assert len(losses) >= 2 and losses[-1] < losses[0] - 0.2, losses


@pytest.mark.slow
def test_a_built_wheel_ships_the_recipes_and_model_configs(tmp_path):
    """A regular (non-editable) install: build the wheel from a copy of the source, unpack it, and run
    clipa from there, so `clipa ls`, `validate` and the bundled model config cannot come from the tree."""
    import shutil
    import zipfile

    pytest.importorskip("setuptools", reason="building the wheel without isolation needs setuptools")
    root = Path(__file__).resolve().parents[1]
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns(".git", ".ci-venv", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".clipa-cache", "benchmarks", "docs")
    shutil.copytree(root, source, ignore=ignore)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("clipa-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    assert {"clipa/recipes/tiny/pretrain.toml", "clipa/recipes/tiny/finetune.toml",
            "clipa/model_configs/clipa-tiny.json"} <= names
    env = dict(__import__("os").environ, PYTHONPATH=str(tmp_path / "site"))
    where = subprocess.run([sys.executable, "-c", "import clipa; print(clipa.__file__)"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert where.stdout.strip().startswith(str(tmp_path / "site")), where
    listed = subprocess.run([sys.executable, "-m", "clipa", "ls"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert listed.returncode == 0 and "tiny/pretrain" in listed.stdout and "vit_b16" in listed.stdout, listed.stderr
    checked = subprocess.run([sys.executable, "-m", "clipa", "validate", "tiny/pretrain"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stderr
