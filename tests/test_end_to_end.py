"""The whole pipeline through the installed CLI, as a user runs it: `clipa data synth` shards ->
`clipa pretrain` on those shards -> `clipa finetune` from that run -> `clipa zeroshot` and
`clipa linear-probe` on the finetuned run, each in its own subprocess. Accuracies must beat chance
(1/24) by a wide margin, so a pipeline that silently trains on the wrong data, drops the init
weights or evaluates an untrained model fails."""

import json
import math
import shutil

import pytest

from conftest import run_cli

CHANCE = 1 / 24


def above_chance(accuracy, chance, n):
    """Above a guesser's accuracy by more than 3 of its standard errors on n samples."""
    return accuracy > chance + 3 * math.sqrt(chance * (1 - chance) / n)


def ok(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def metrics_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_synth_shards_pretrain_finetune_zeroshot_linear_probe_through_the_cli(tmp_path):
    data = tmp_path / "synth"
    ok(run_cli("data", "synth", data, "--num-samples", 4096, "--shard-size", 1024, "--eval-per-class", 16))
    shards = sorted((data / "train").glob("*.tar"))
    assert len(shards) == 4
    # The linear probe's train/ and test/ class folders: the written eval images, 10 and 6 per class
    # (5 and 3 left the probe's test accuracy within noise of chance).
    for folder in sorted(p for p in (data / "eval").iterdir() if p.is_dir()):
        images = sorted(folder.glob("*.png"))
        assert len(images) == 16
        for split, part in (("train", images[:10]), ("test", images[10:])):
            (tmp_path / "probe" / split / folder.name).mkdir(parents=True)
            for image in part:
                shutil.copy(image, tmp_path / "probe" / split / folder.name / image.name)

    common = ["data.num_workers=0", "checkpoint.every_steps=0", "train.global_batch_size=64"]
    pre = tmp_path / "pre"
    # lr 5e-4: the tiny recipe's 2e-3 collapses to a uniform loss (ln 64) at batch 64 within 32 steps.
    ok(run_cli("pretrain", "tiny/pretrain", *common, f"data.train={data / 'train'}", "train.total_samples=4096",
               "optim.lr=5e-4", "optim.warmup_steps=6", "train.log_every_steps=8", "--out", pre))
    logged = metrics_of(pre)
    losses = [m["loss"] for m in logged if "loss" in m]
    assert losses[-1] < losses[0] - 0.3, losses  # it learned from the shards
    assert f'train = "{data / "train"}"' in (pre / "config.toml").read_text()

    fine = tmp_path / "fine"
    ok(run_cli("finetune", "tiny/finetune", *common, f"data.train={data / 'train'}", f"init.checkpoint={pre}",
               "train.total_samples=256", "train.log_every_steps=1", "--out", fine))

    card = (fine / "final" / "README.md").read_text()  # a run's final/ carries the export's model card
    assert "# tiny-finetune" in card and "local-dir:" in card and "tiny-pretrain" in card, card[:2000]

    zs = ok(run_cli("zeroshot", "--model", fine, "--dataset", "imagefolder", "--data-root", data / "eval",
                    "--num-workers", 0, "--output", tmp_path / "zs.json"))
    result = json.loads((tmp_path / "zs.json").read_text())
    assert (result["image_size"], result["text_length"]) == (64, 32)  # the finetune's geometry
    assert result["metrics"]["num_samples"] == 384
    assert above_chance(result["metrics"]["acc1"], CHANCE, 384), result["metrics"]  # > 0.073
    assert above_chance(result["metrics"]["acc5"], 5 * CHANCE, 384), result["metrics"]  # > 0.271
    assert "zero-shot classification" in zs.stdout

    ok(run_cli("linear-probe", "--model", fine, "--dataset", "imagefolder", "--data-root", tmp_path / "probe",
               "--num-workers", 0, "--cache", tmp_path / "cache", "--output", tmp_path / "lp.json"))
    probe = json.loads((tmp_path / "lp.json").read_text())
    assert (probe["metrics"]["num_train"], probe["metrics"]["num_test"]) == (240, 144)
    assert above_chance(probe["metrics"]["acc1"], CHANCE, 144), probe["metrics"]  # > 0.092
