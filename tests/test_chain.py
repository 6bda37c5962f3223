"""The chain of stages as users type it: a pretraining recipe names its finetune (`next`), a bare
`clipa finetune` continues the newest finished pretraining run, a bare `clipa zeroshot` evaluates the
newest finished run, and `clipa runs` lists them. Run directories are written by hand here (the files
clipa reads: config.toml, metrics.jsonl, checkpoints/step_N/, final/); tests/test_end_to_end.py trains
the real chain."""

import json
import os
import time

import pytest

from clipa.errors import ClipaError
from clipa.recipe.index import resolve_path, shipped
from clipa.recipe.load import dumps, load_recipe
from clipa.run.listing import list_runs, read_run, run_to_continue, run_to_evaluate

# BASIC and LiT train a timm classifier's image tower; no shipped finetune recipe builds that tower, so
# they name none (checked below: the day one exists, they must name it).
SINGLE_STAGE = {"basic/vit_b16_unlocked", "lit/vit_b16_locked"}


def launch_stage(name):
    """`pretrain` or `finetune`, from the launch command on a shipped recipe's first line."""
    first = shipped()[name].read_text(encoding="utf-8").splitlines()[0]
    return "pretrain" if " pretrain " in first else "finetune"


def test_every_shipped_pretraining_recipe_names_a_finetune_of_the_same_architecture():
    pretraining = [name for name in shipped() if launch_stage(name) == "pretrain"]
    assert "tiny/pretrain" in pretraining and len(pretraining) >= 7
    finetunes = {(r.model.arch, r.model.image_tower) for r in (load_recipe(resolve_path(name)) for name in shipped()
                                                              if launch_stage(name) == "finetune")}
    for name in pretraining:
        recipe = load_recipe(resolve_path(name))
        if name in SINGLE_STAGE:
            assert recipe.next == "" and (recipe.model.arch, recipe.model.image_tower) not in finetunes, name
            continue
        assert recipe.next, f"{name}: names no finetune (next = ...)"
        partner = load_recipe(resolve_path(recipe.next))
        assert launch_stage(recipe.next) == "finetune", (name, recipe.next)
        for key in ("arch", "image_tower", "vision_cfg", "text_cfg"):
            assert getattr(partner.model, key) == getattr(recipe.model, key), (name, recipe.next, key)
        # The partner's own default init is this recipe's run, or a later finetune of it names the chain on.
        assert partner.init.checkpoint, recipe.next


def test_a_finetune_that_names_a_second_finetune_keeps_the_architecture():
    for name in shipped():
        recipe = load_recipe(resolve_path(name))
        if recipe.next and launch_stage(name) == "finetune":
            assert load_recipe(resolve_path(recipe.next)).model.arch == recipe.model.arch, name


def test_next_is_validated_and_found_beside_its_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ClipaError) as err:
        load_recipe(None, ['next="tiny/finetuen"'])
    assert str(err.value).startswith('next: "tiny/finetuen" is neither a shipped recipe')
    assert load_recipe(None, ['next="tiny/finetune"']).next == "tiny/finetune"
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "ft.toml").write_text("[model]\narch = 'clipa-tiny'\n")
    (folder / "pre.toml").write_text("next = 'ft.toml'\n[model]\narch = 'clipa-tiny'\n")
    recipe = load_recipe(folder / "pre.toml")
    assert recipe.next == str(folder / "ft.toml")  # kept in config.toml in a form found from any folder
    with pytest.raises(ClipaError, match="next: expected str"):
        load_recipe(None, ["next=3"])


def fake_run(root, name, stage, steps_done, total_steps=4, final=True, age=0.0, init="", next_="", acc1=None):
    """A run directory as the trainer leaves it, `age` seconds old."""
    overrides = [f"name={name}", "train.global_batch_size=8", f"train.total_samples={8 * total_steps}",
                 f'init.checkpoint="{init}"', f'next="{next_}"']
    path = root / name
    (path / "checkpoints" / f"step_{steps_done:06d}").mkdir(parents=True)
    (path / "config.toml").write_text(dumps(load_recipe(None, overrides)))
    rows = [{"step": s, "stage": stage, "loss": 1.0} for s in range(1, steps_done + 1)]
    if acc1 is not None:
        rows.append({"step": steps_done, "stage": stage, "zeroshot/synthetic/acc1": acc1})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if final:
        (path / "final").mkdir()
        (path / "final" / "open_clip_config.json").write_text("{}")
        (path / "final" / "open_clip_model.safetensors").write_bytes(b"")
    stamp = time.time() - 1000 + age * -1
    for item in (path / "config.toml", path / "metrics.jsonl", path / "final"):
        if item.exists():
            os.utime(item, (stamp, stamp))
    return path


def test_finished_means_final_and_every_step(tmp_path):
    done = read_run(fake_run(tmp_path, "done", "pretrain", 4, acc1=0.25))
    assert (done.finished, done.steps_done, done.total_steps, done.zeroshot) == (True, 4, 4, {"synthetic": 0.25})
    # A finished run resumed with more samples keeps its old final/ until it finishes again.
    assert not read_run(fake_run(tmp_path, "extended", "pretrain", 4, total_steps=8)).finished
    assert not read_run(fake_run(tmp_path, "killed", "pretrain", 2, final=False)).finished


def test_bare_finetune_takes_the_newest_finished_pretraining_run_and_says_what_it_passed_over(tmp_path):
    fake_run(tmp_path, "old", "pretrain", 4, age=300, next_="tiny/finetune")
    fake_run(tmp_path, "new", "pretrain", 4, age=200, next_="tiny/finetune")
    fake_run(tmp_path, "tuned", "finetune", 4, age=150, init="runs/new/final")  # a finetune is never continued bare
    fake_run(tmp_path, "newest", "pretrain", 1, final=False, age=100)
    run, notes = run_to_continue(root=tmp_path)
    assert run.path == tmp_path / "new"
    assert len(notes) == 1 and f"{tmp_path / 'newest'} (pretrain, step 1/4, not finished) is newer" in notes[0]
    assert f"clipa pretrain {tmp_path / 'newest' / 'config.toml'} --out {tmp_path / 'newest'}" in notes[0]


def test_an_unfinished_run_is_never_continued(tmp_path):
    with pytest.raises(ClipaError, match=r"^finetune: no pretraining run under .*; train one first: clipa pretrain "
                                         "tiny/pretrain"):
        run_to_continue(root=tmp_path)
    half = fake_run(tmp_path, "half", "pretrain", 2, final=False)
    with pytest.raises(ClipaError, match=r"^finetune: the newest pretraining run .*half \(pretrain, step 2/4, not "
                                         r"finished\); resume it with `clipa pretrain .*half/config.toml --out"):
        run_to_continue(root=tmp_path)
    with pytest.raises(ClipaError, match=r"^--from: .*half \(pretrain, step 2/4, not finished\); resume it with"):
        run_to_continue(half)
    with pytest.raises(ClipaError, match=r"^--from: .*nothing is not a clipa run directory \(no config.toml\)"):
        run_to_continue(tmp_path / "nothing")


def test_bare_evaluation_takes_a_finished_finetune_before_a_newer_pretraining_run(tmp_path):
    with pytest.raises(ClipaError, match=r"^--model: not given, and no finished run under"):
        run_to_evaluate(tmp_path)
    fake_run(tmp_path, "ft", "finetune", 4, age=300)
    fake_run(tmp_path, "pre", "pretrain", 4, age=200)
    fake_run(tmp_path, "ft2", "finetune", 2, final=False, age=100)
    assert run_to_evaluate(tmp_path).path == tmp_path / "ft"
    assert [r.name for r in list_runs(tmp_path)] == ["ft", "pre", "ft2"]  # oldest first


# --------------------------------------------------------------------------- the commands


def one_line_error(result, start):
    assert result.returncode == 2, result.stdout + result.stderr
    message = result.stderr.strip()
    assert "\n" not in message and "Traceback" not in message, message
    assert message.startswith(f"error: {start}"), message


def test_bare_commands_in_an_empty_directory_say_what_to_run_first(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CLIPA_DATA", raising=False)
    one_line_error(cli("finetune"), "finetune: no pretraining run under runs/ to continue; train one first: "
                                    "clipa pretrain tiny/pretrain")
    one_line_error(cli("finetune", "optim.lr=1e-4"), "finetune: no pretraining run")  # an override, not a recipe
    one_line_error(cli("zeroshot", "--dataset", "synthetic"), "--model: not given, and no finished run under runs/")
    one_line_error(cli("retrieval", "--dataset", "synthetic"), "--model: not given")
    one_line_error(cli("linear-probe", "--dataset", "synthetic"), "--model: not given")
    one_line_error(cli("zeroshot", "--dataset", "synthetic", "--precision", "fp64"), '--precision: unknown precision "fp64"')
    shown = cli("runs")
    assert shown.returncode == 0 and "no runs under runs/" in shown.stdout
    assert json.loads(cli("runs", "--json").stdout) == []


def test_bare_finetune_dry_run_prints_its_choice_and_sets_init(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake_run(tmp_path / "runs", "tiny-pretrain", "pretrain", 4, next_="tiny/finetune")
    shown = cli("finetune", "train.total_samples=2560", "--dry-run")
    assert shown.returncode == 0, shown.stderr
    first = shown.stdout.splitlines()[:3]
    assert first == ["continuing runs/tiny-pretrain (pretrain, step 4/4, finished)",
                     "recipe     tiny/finetune (its next)", "checkpoint runs/tiny-pretrain/final"], first
    assert 'checkpoint = "runs/tiny-pretrain/final"' in shown.stdout and "total_samples = 2560" in shown.stdout
    # An explicit init.checkpoint override still wins over the chosen run.
    other = cli("finetune", "init.checkpoint=runs/tiny-pretrain", "--dry-run")
    assert other.returncode == 0 and 'checkpoint = "runs/tiny-pretrain"\n' in other.stdout
    listed = json.loads(cli("runs", "--json").stdout)
    assert [(r["name"], r["stage"], r["finished"], r["next"]) for r in listed] == [
        ("tiny-pretrain", "pretrain", True, "tiny/finetune")]
    table = cli("runs").stdout
    assert "tiny-pretrain" in table and "4/4" in table


def test_a_run_that_names_no_finetune_says_how_to_give_one(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake_run(tmp_path / "runs", "mine", "pretrain", 4)
    one_line_error(cli("finetune", "--dry-run"), "next: runs/mine/config.toml names no recipe to continue with; give "
                                                 "one: clipa finetune RECIPE --from runs/mine")
    shown = cli("finetune", "tiny/finetune", "--from", "runs/mine", "--dry-run")
    assert shown.returncode == 0, shown.stderr
    assert "recipe     tiny/finetune\n" in shown.stdout and 'checkpoint = "runs/mine/final"' in shown.stdout


# --------------------------------------------------------------------------- where the datasets are


def test_dataset_names_clipas_and_clip_benchmarks(tmp_path, monkeypatch):
    from clipa.evaluate.names import data_root, folder, output_slug, reader

    assert [reader(n) for n in ("imagenet1k", "imagenetv2", "imagenet_sketch", "imagenet-r", "imagenet-a",
                                "wds/cars", "imagenet-v2")] == ["imagenet", "imagenet-v2", "imagenet-sketch",
                                                                "imagenet-r", "imagenet-a", "wds", "imagenet-v2"]
    assert (folder("wds/vtab/cifar10"), output_slug("wds/vtab/cifar10")) == ("wds_vtab-cifar10", "vtab_cifar10")
    with pytest.raises(ClipaError, match=r'^--dataset: unknown dataset "imagenet1"; did you mean "imagenet1k"\? '
                                         r'\(available: .*imagenet_sketch, wds/NAME\)$'):
        reader("imagenet1")
    with pytest.raises(ClipaError, match=r'^--dataset: unknown dataset "wds/"'):
        reader("wds/")
    # CLIPA_DATA: each dataset by name under one folder; --data-root wins; synthetic needs neither.
    (tmp_path / "imagenet-v2").mkdir()
    (tmp_path / "wds_cars").mkdir()
    monkeypatch.setenv("CLIPA_DATA", str(tmp_path))
    assert data_root("imagenetv2", None) == tmp_path / "imagenet-v2"
    assert data_root("wds/cars", None) == tmp_path / "wds_cars"
    assert data_root("imagenet-v2", str(tmp_path)) == tmp_path
    assert data_root("synthetic", None) is None
    # CLIP_benchmark's {dataset} in --data-root: wds/NAME -> NAME, so several wds sets each find their own root.
    (tmp_path / "bench" / "cars").mkdir(parents=True)
    assert data_root("wds/cars", str(tmp_path / "bench" / "{dataset}")) == tmp_path / "bench" / "cars"


def test_missing_data_says_where_it_looked_the_layout_and_how_to_point_clipa_at_it(tmp_path, monkeypatch):
    from clipa.evaluate.names import data_root

    monkeypatch.delenv("CLIPA_DATA", raising=False)
    with pytest.raises(ClipaError) as err:
        data_root("imagenet1k", None)
    assert str(err.value) == ("--data-root: required for --dataset imagenet1k; pass --data-root PATH or set "
                              "CLIPA_DATA to a folder holding imagenet/ (layout: val/n01440764/*.JPEG, the "
                              "validation set's 1,000 WordNet-id folders)")
    monkeypatch.setenv("CLIPA_DATA", str(tmp_path))
    with pytest.raises(ClipaError) as err:
        data_root("imagenet", None)
    assert str(err.value).startswith(f"--data-root: {tmp_path / 'imagenet'} (from $CLIPA_DATA/imagenet) does not "
                                     "exist; --dataset imagenet reads it (layout: val/n01440764/*.JPEG")
    assert str(err.value).endswith("Point --data-root at the dataset or set CLIPA_DATA to a folder holding imagenet/")
    with pytest.raises(ClipaError, match=r"^--data-root: .*bench/cars \(from --data-root .*bench/\{dataset\}\) does "
                                         r"not exist; --dataset wds/cars reads it \(layout: classnames.txt"):
        data_root("wds/cars", str(tmp_path / "bench" / "{dataset}"))


def test_data_errors_from_the_command_line(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLIPA_DATA", str(tmp_path / "datasets"))
    one_line_error(cli("zeroshot", "--dataset", "imagenet", "--model", "ViT-B-16"),
                   f"--data-root: {tmp_path / 'datasets' / 'imagenet'} (from $CLIPA_DATA/imagenet) does not exist")
    one_line_error(cli("zeroshot", "--dataset", "imagenet_sketchh", "--model", "ViT-B-16"),
                   '--dataset: unknown dataset "imagenet_sketchh"; did you mean "imagenet_sketch"?')
    one_line_error(cli("zeroshot", "--dataset", "synthetic", "--dataset", "synthetic", "--model", "ViT-B-16"),
                   "--dataset: synthetic is given more than once; list each dataset once")
    monkeypatch.delenv("CLIPA_DATA")
    one_line_error(cli("zeroshot", "--dataset", "wds/cars", "--model", "ViT-B-16"),
                   "--data-root: required for --dataset wds/cars; pass --data-root PATH or set CLIPA_DATA to a "
                   "folder holding wds_cars/")


def test_results_name_published_weights_as_clip_benchmark_does():
    """`--model ViT-B-32:laion2b_s34b_b79k` writes model ViT-B-32, pretrained laion2b_s34b_b79k (CLIP_benchmark's
    `--model ViT-B-32 --pretrained laion2b_s34b_b79k`), so the two tools' rows share model_fullname."""
    from clipa.cli.render import model_label
    from clipa.evaluate.models import result_names
    from clipa.model.published import parse

    assert result_names(parse("ViT-B-32:laion2b_s34b_b79k", "--model", None)) == ("ViT-B-32", "laion2b_s34b_b79k")
    assert result_names(parse("ViT-B-32", "--model", "laion2b_s34b_b79k")) == ("ViT-B-32", "laion2b_s34b_b79k")
    assert result_names(parse("hf-hub:org/name", "--model", None)) == ("hf-hub:org/name", "hf-hub:org/name")
    assert model_label({"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}) == "ViT-B-32:laion2b_s34b_b79k"
    assert model_label({"model": "local-dir:runs/a/final", "pretrained": "runs/a/final"}) == "runs/a/final"


def test_unfinished_runs_and_bad_names_from_the_command_line(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake_run(tmp_path / "runs", "half", "pretrain", 2, final=False, next_="tiny/finetune")
    one_line_error(cli("finetune"), "finetune: the newest pretraining run runs/half (pretrain, step 2/4, not finished); "
                                    "resume it with `clipa pretrain runs/half/config.toml --out runs/half`")
    one_line_error(cli("finetune", "--from", "runs/half"), "--from: runs/half (pretrain, step 2/4, not finished)")
    one_line_error(cli("finetune", "--from", "runs/nothing"), "--from: runs/nothing is not a clipa run directory")
    one_line_error(cli("zeroshot", "--dataset", "synthetic"), "--model: not given, and no finished run under runs/")
    one_line_error(cli("validate", "tiny/pretrain", 'next="tiny/finetuen"'), 'next: "tiny/finetuen" is neither')
