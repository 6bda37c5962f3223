"""Advice on valid recipes (clipa/recipe/advice.py): a finetune shorter than the measured minimum is
announced by `validate`, `--dry-run` and `plan`, with the number and where it was measured."""

from clipa.recipe.advice import MIN_FINETUNE_STEPS

SHORT = f"train.total_samples={(MIN_FINETUNE_STEPS - 1) * 256}"
LONG = f"train.total_samples={MIN_FINETUNE_STEPS * 256}"


def _short_note(text: str) -> bool:
    text = " ".join(text.split())  # rich wraps long notes at the terminal width
    return (f"under {MIN_FINETUNE_STEPS} steps" in text and "Keeping the gain" in text
            and f"train.total_samples={MIN_FINETUNE_STEPS * 256}" in text)


def test_validate_and_dry_run_announce_a_short_finetune_only(cli, tmp_path):
    short = cli("validate", "tiny/finetune", SHORT)
    assert short.returncode == 0 and _short_note(short.stdout), short.stdout
    assert f"runs {MIN_FINETUNE_STEPS - 1} steps of 256" in " ".join(short.stdout.split())
    long = cli("validate", "tiny/finetune", LONG)
    assert long.returncode == 0 and "Keeping the gain" not in long.stdout, long.stdout
    weights = tmp_path / "start.safetensors"  # --dry-run checks that the start exists, not what it holds
    weights.touch()
    dry = cli("finetune", "tiny/finetune", SHORT, f"init.checkpoint={weights}", "--dry-run")
    assert dry.returncode == 0 and _short_note(dry.stdout), dry.stdout


def test_a_pretraining_recipe_gets_no_finetune_advice(cli):
    result = cli("validate", "tiny/pretrain", "train.total_samples=2560")  # 10 steps, no init.checkpoint
    assert result.returncode == 0 and "Keeping the gain" not in result.stdout, result.stdout


def test_plan_names_the_short_stage(cli, tmp_path):
    from clipa.analysis.plan import plan

    result = plan(["tiny/pretrain", "tiny/finetune"])
    assert not result["stages"][0]["notes"]
    finetune_steps = result["stages"][1]["steps"]
    assert (finetune_steps < MIN_FINETUNE_STEPS) == any(_short_note(n) for n in result["stages"][1]["notes"])
    shown = cli("plan", "tiny/pretrain", "tiny/finetune")
    assert shown.returncode == 0
    assert (finetune_steps < MIN_FINETUNE_STEPS) == _short_note(shown.stdout)


def test_a_short_finetune_from_a_run_at_its_own_image_size_gets_no_note(cli, tmp_path, monkeypatch):
    """The floor is the cost of a change of patch scale: a finetune from a clipa run that trained the same
    architecture at the finetune's image size (a masked first stage) is not told to run longer; one from a
    32 px run, a missing run or a weights file still is."""
    from conftest import RESIZE_32, micro_overrides

    monkeypatch.chdir(tmp_path)
    one_step = micro_overrides(**{"train.total_samples": 32})
    masked = ["reduction.image=random", "reduction.image_size=0", "reduction.mask_ratio=0.75"]
    assert cli("pretrain", "tiny/pretrain", *one_step, *masked, "--out", "masked").returncode == 0
    assert cli("pretrain", "tiny/pretrain", *one_step, *RESIZE_32, "--out", "low_res").returncode == 0
    short = [SHORT, "model.arch=clipa-micro"]
    for start, noted in (("masked", False), ("masked/final", False), ("low_res", True), ("absent", True)):
        result = cli("validate", "tiny/finetune", *short, f"init.checkpoint={start}")
        assert result.returncode == 0 and _short_note(result.stdout) == noted, (start, result.stdout)
    # from the masked start the short finetune's one change left is the text's, 8 -> 32 tokens: that is noted,
    # and keeping 8 tokens is not
    text_note = "changes the text from the first stage's 8 tokens to the native length"
    lengthened = cli("validate", "tiny/finetune", *short, "init.checkpoint=masked")
    assert text_note in " ".join(lengthened.stdout.split()) and "reduction.text_length=8 kept" in \
        " ".join(lengthened.stdout.split()), lengthened.stdout
    kept = cli("validate", "tiny/finetune", *short, "init.checkpoint=masked", "reduction.text_length=8")
    assert kept.returncode == 0 and "changes the text" not in kept.stdout, kept.stdout
    low_res = cli("validate", "tiny/finetune", *short, "init.checkpoint=low_res")  # the patch-scale note only
    assert "changes the text" not in low_res.stdout, low_res.stdout
    # the same masked start, but the finetune changes the image size (48 px): noted
    result = cli("validate", "tiny/finetune", *short, "init.checkpoint=masked", "reduction.image_size=48")
    assert result.returncode == 0 and _short_note(result.stdout), result.stdout
