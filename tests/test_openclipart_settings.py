"""The OpenClipart experiments' definitions (benchmarks/openclipart.py): what makes their comparisons
fair. CLIPA's variants spend the full-token run's training FLOPs, the two-stage comparison finetunes
at the architecture's own geometry from the first stage, and open_clip_train gets the command line
the docs describe. Pure Python: nothing trains here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import openclipart as oc  # noqa: E402
import openclipart_open_clip as ocl  # noqa: E402


@pytest.mark.parametrize("arch", ["clipa-tiny", "clipa-small"])
@pytest.mark.parametrize("samples", [24_576, 8_192])
def test_claim_variants_spend_the_full_token_budget(arch, samples):
    settings = oc.claim_settings(arch, samples, 256)
    full = next(s for s in settings if s.label == "full tokens")
    budget = oc.train_flops(full.pretrain, full.pretrain["train.total_samples"])
    assert full.finetune is None and full.pretrain["train.total_samples"] == samples
    for s in settings[1:]:
        pre, fine = s.pretrain, s.finetune
        spent = oc.train_flops(pre, pre["train.total_samples"]) + oc.train_flops(fine, fine["train.total_samples"])
        # whole batches only: never over the budget, short of it by less than one batch of each stage
        slack = oc.train_flops(pre, 256) + oc.train_flops(fine, 256)
        assert budget - slack <= spent <= budget, (s.label, spent / budget)
        assert pre["reduction.text_length"] == 8 and pre["reduction.image_size"] * 2 == 64  # clipa-* are 64 px
        assert fine.get("reduction.image_size", 0) in (0, 64) and fine["optim.lr"] < pre["optim.lr"] * 1.01
        share = oc.train_flops(fine, fine["train.total_samples"]) / budget
        expected = 0.1 if "10%" in s.label else 0.35 if "35%" in s.label else 0.2
        assert abs(share - expected) < 0.02, (s.label, share)
        if "syntax" in s.label:
            assert pre["reduction.text"] == "syntax"
        if "masked" in s.label:
            assert (fine["reduction.image"], fine["reduction.mask_ratio"]) == ("random", 0.3)
        else:
            assert fine["reduction.mask_ratio"] == 0.0


def test_two_stage_comparison_gives_both_tools_the_same_stages(tmp_path):
    settings = ocl.vs_open_clip_two_stage_settings("clipa-tiny", 30_000, 256)
    stage_tools = [(s.tool, s.finetune_tool or s.tool) for s in settings]
    assert stage_tools == [("open_clip", "open_clip"), ("clipa", "clipa"), ("clipa", "clipa"),
                           ("clipa", "open_clip"), ("open_clip", "clipa"),  # crossovers
                           *[("clipa", "clipa")] * 7]
    assert all(s.pretrain == settings[0].pretrain for s in settings[:5])
    assert all(s.finetune == settings[0].finetune for s in settings[:5] if s is not settings[2])

    def changed(stage: dict, default: dict) -> dict:  # what a row's stage changes from clipa's default settings
        return {k: v for k, v in stage.items() if default.get(k) != v}

    adamw = {"optim.betas": [0.9, 0.999], "optim.eps": 1e-8, "optim.weight_decay": 0.2}
    every = {**adamw, "data.shuffle_buffer": 5000, "data.fast_decode": False}
    default = settings[1]
    # the rows were measured with clipa's old loader defaults, pinned so that a re-run reads the same streams
    for stage in (default.pretrain, default.finetune):
        assert (stage["data.interleave"], stage["data.shuffle_buffer"]) == (1, 2000)
    # the third finetunes with open_clip_train's AdamW settings and nothing else changed
    assert changed(settings[2].pretrain, default.pretrain) == {} and changed(settings[2].finetune, default.finetune) == adamw
    # the last two: AdamW in both stages, then also open_clip_train's shuffle buffer and whole-image decoding
    mixing = [{"data.shuffle_buffer": 5000}, {"data.shuffle_buffer": 8000}, {"data.interleave": 4},
              {"data.interleave": 8}, {"data.interleave": 8, "data.shuffle_buffer": 5000}]
    for row, expected in zip(settings[5:], (adamw, every, *mixing), strict=True):
        assert changed(row.pretrain, default.pretrain) == changed(row.finetune, default.finetune) == expected
    pre, fine = settings[0].pretrain, settings[0].finetune
    assert (pre["reduction.image_size"], pre["reduction.text_length"]) == (32, 16)
    assert (fine["reduction.image_size"], fine["reduction.text_length"], fine["reduction.mask_ratio"]) == (0, 0, 0.0)
    assert fine["train.total_samples"] == 5888 and fine["optim.lr"] == pre["optim.lr"] / 4

    values = {**fine, "data.train": "shards/{0..7}.tar", "train.seed": 2, "init.checkpoint": str(tmp_path / "stage1")}
    cmd, epochs = ocl.open_clip_command(values, tmp_path / "stage2")
    flag = {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("--")}
    # open_clip_train starts from the first stage's export at the model's own geometry
    assert flag["--pretrained"] == str(tmp_path / "stage1" / "final" / "open_clip_model.safetensors")
    assert "--force-image-size" not in flag and "--force-context-length" not in flag
    assert (flag["--lr"], flag["--warmup"], flag["--seed"], epochs) == ("0.0005", "2", "2", 1)
    assert int(flag["--train-num-samples"]) == 5888  # 23 steps of 256, one pass
    # its own AdamW defaults for a model name without "vit", or clipa's settings when asked
    assert (flag["--beta2"], flag["--eps"], flag["--wd"]) == ("0.999", "1e-08", "0.2")
    cmd, _ = ocl.open_clip_command(values, tmp_path / "stage2", optim_from_recipe=True)
    flag = {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("--")}
    assert (flag["--beta2"], flag["--eps"], flag["--wd"]) == ("0.95", "1e-06", "0.1")

    first = ocl.open_clip_command({**pre, "data.train": "shards/{0..7}.tar"}, tmp_path / "stage1")[0]
    assert "--pretrained" not in first and first[first.index("--force-image-size") + 1] == "32"


def test_crossover_runs_each_stage_with_its_own_tool(tmp_path, monkeypatch):
    """The crossover rows: the first stage with one tool, the finetune with the other, from that first
    stage's model. The tools themselves are replaced by recorders here: this checks the dispatch."""
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "train" / "000000.tar").write_bytes(b"")
    calls = []

    def recorder(tool):
        def run(*args, **kwargs):
            command, values, out = (args if tool == "clipa" else ("?", *args))[:3]
            calls.append((tool, values.get("init.checkpoint"), out.name))
            (out / "final").mkdir(parents=True)
            return {"wall_s": 1.0, "final_loss": 1.0, "first_loss": 2.0, "samples_per_s": 1.0, "model": str(out)}
        return run

    monkeypatch.setattr(oc, "clipa_stage", recorder("clipa"))
    monkeypatch.setattr(ocl, "run_open_clip", recorder("open_clip"))
    monkeypatch.setattr(oc, "evaluate", lambda data, model: {"acc1": 0.0})
    settings = {s.label: s for s in ocl.vs_open_clip_two_stage_settings("clipa-tiny", 30_000, 256)}
    for label, tools in [("clipa pretrain, open_clip_train finetune", ("clipa", "open_clip")),
                         ("open_clip_train pretrain, clipa finetune", ("open_clip", "clipa")),
                         ("clipa default settings, two stages", ("clipa", "clipa"))]:
        calls.clear()
        row = oc.run_setting(tmp_path / "data", settings[label], 0, tmp_path / "work")
        assert [c[0] for c in calls] == list(tools)
        assert calls[0][1] is None and calls[1][1] == str(tmp_path / "work" / calls[0][2])  # from stage 1's run
        assert [s["stage"] for s in row["stages"]] == ["pretrain", "finetune"]


def test_differences_give_the_mean_difference_and_its_standard_error():
    def row(label, seed, pcr, r5, group="g"):
        return {"group": group, "label": label, "seed": seed,
                "stages": [{"stage": "pretrain", "mean_per_class_recall": pcr, "t2i_r5": r5}]}

    rows = [row("base", 0, 0.10, 0.20), row("base", 1, 0.14, 0.20), row("base", 2, 0.12, 0.20),
            row("new", 0, 0.20, 0.30), row("new", 1, 0.22, 0.32), row("other group only", 0, 0.5, 0.5, group="h")]
    text = oc.differences(rows, "base")
    lines = [line for line in text.splitlines() if "| new |" in line]
    # new - base: 0.21 - 0.12; se = sqrt(0.0002 / 2 + 0.0004 / 3) = 0.0153; R@5: 0.31 - 0.20, se sqrt(0.0002 / 2)
    assert lines == ["| g | new | pretrain | 2 vs 3 | +0.090 ± 0.015 | +0.110 ± 0.010 |"]
    assert "other group only" not in text and "| base |" not in text  # nothing to compare against


def test_batch_mixing_measures_same_category_and_same_caption_pairs(tmp_path):
    """Shards in category order, as `build` writes them: read one at a time without a buffer, every batch
    is one category; shuffled across the whole epoch, batches mix."""
    import io
    import json as js

    import webdataset as wds
    from PIL import Image

    (tmp_path / "train").mkdir()
    jpg = io.BytesIO()
    Image.new("RGB", (8, 8), "white").save(jpg, format="JPEG")
    for s in range(4):  # shards 0-1 are category a/x, 2-3 are b/y; two drawings of each shard share a caption
        with wds.TarWriter(str(tmp_path / "train" / f"{s:06d}.tar")) as sink:
            for i in range(4):
                n = s * 4 + i
                sink.write({"__key__": f"{n:06d}", "jpg": jpg.getvalue(), "txt": f"drawing {n - (i == 1)}",
                            "json": js.dumps({"category": "a/x/deeper" if s < 2 else "b/y"}).encode()})
    text = oc.batch_mixing(tmp_path, {"in order": {"data.interleave": 1, "data.shuffle_buffer": 0},
                                      "shuffled": {"data.interleave": 1, "data.shuffle_buffer": 100}},
                           batch=4, batches=4)
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()[2:]}
    # in order: one category per batch (share 1), and the 2 shared captions of each shard: 1 identical pair
    assert rows["in order"] == "| in order | 1.000 [1.000, 1.000] | 1 [1] |"
    assert "(uniform: 0.467)" in text  # 2 categories of 8 drawings: 2 * 8 * 7 / (16 * 15)
    assert float(rows["shuffled"].split(" | ")[1].split()[0]) < 1.0


def test_select_keeps_labels_matching_only_and_drops_excluded():
    settings = oc.claim_settings("clipa-tiny", 24_576, 256)
    labels = [s.label for s in oc.select(settings, ["full tokens", "then full"], ["masked"])]
    assert labels == ["full tokens", "CLIPA: 1/2 res + 8 tok truncate, then full",
                      "CLIPA: 1/2 res + 8 tok syntax, then full"]
    assert oc.select(settings, [], []) == settings
    assert [s.label for s in oc.select(settings, [], ["CLIPA"])] == ["full tokens"]


def test_defaults_rows_change_one_thing_each_and_load_as_recipes():
    from clipa.recipe.load import load_recipe

    settings = oc.defaults_settings("clipa-tiny", 30_000, 256)
    shipped = next(s for s in settings if s.label == "shipped tiny recipe").pretrain
    chosen = next(s for s in settings if s.label.startswith("crop 0.9-1.0 (")).pretrain
    for s in settings:
        # the rows on top of the chosen crop are compared with the chosen crop's row, the rest with the shipped one
        against = chosen if s.label.startswith("crop 0.9-1.0,") else shipped
        changed = {k for k in s.pretrain if s.pretrain[k] != against.get(k)}
        things = {k.removesuffix("_prob") for k in changed}  # colour jitter's strength and probability are one
        assert len(things) == (0 if s.pretrain is against else 1), (s.label, changed)
        recipe = load_recipe(None, oc.overrides({"data.train": "shards/{000000..000007}.tar", **s.pretrain}))
        assert recipe.data.augment.scale == s.pretrain["data.augment.scale"]
    by_label = {s.label: s.pretrain for s in settings}
    assert by_label["crop 0.9-1.0, aspect 1:1 (no aspect jitter)"]["data.augment.ratio"] == [1.0, 1.0]
    assert by_label["crop 0.9-1.0, bilinear"]["data.augment.interpolation"] == "bilinear"
    # every setting varied on the old shipped recipe is varied again on today's default crop
    for label in by_label.keys() - {"shipped tiny recipe"}:
        if not label.startswith("crop "):
            assert by_label[f"crop 0.9-1.0, {label}"] == {**by_label[label], "data.augment.scale": [0.9, 1.0]}
    jitter = by_label["crop 0.9-1.0, colour jitter 0.4/0.4/0.4/0.1 (p 0.8)"]
    assert jitter["data.augment.color_jitter_prob"] == 0.8
    assert by_label["crop 0.9-1.0, flip 0.5"]["data.augment.hflip_prob"] == 0.5


def test_single_stage_new_loader_row_is_clipas_current_loader_defaults():
    from clipa.recipe.schema import Recipe

    settings = {s.label: s for s in ocl.vs_open_clip_settings("clipa-tiny", 30_000, 256)}
    old = settings["clipa default settings (crop 0.9-1)"].pretrain
    new = settings["clipa default settings, new loader (8 shards interleaved, 5,000-sample buffer)"].pretrain
    assert {k for k in new if new[k] != old[k]} == {"data.interleave", "data.shuffle_buffer"}
    defaults = Recipe().data
    assert (new["data.interleave"], new["data.shuffle_buffer"]) == (defaults.interleave, defaults.shuffle_buffer)


def _run(group: str, label: str, seed: int, stages: list[tuple[float, float, float]]) -> dict:
    """A results row: (TFLOPs, seconds, per-class recall) per stage; R@5 is twice the recall."""
    return {"group": group, "label": label, "seed": seed, "tool": "clipa", "notes": "",
            "stages": [{"stage": f"stage{i}", "train_flops": f * 1e12, "wall_s": w, "mean_per_class_recall": r,
                        "t2i_r5": 2 * r} for i, (f, w, r) in enumerate(stages)]}


def test_plot_draws_the_mean_of_each_stage_at_its_cumulative_flops(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [_run("claim tiny 8k", "full tokens", 0, [(4.0, 50, 0.04)]),
            _run("claim tiny 8k", "full tokens", 1, [(4.0, 70, 0.06)]),
            _run("claim small 24k", "CLIPA", 0, [(32.0, 300, 0.10), (8.0, 100, 0.08)]),
            _run("claim small 24k", "CLIPA", 1, [(32.0, 340, 0.12), (8.0, 120, 0.06)])]
    fig = oc.plot(rows, tmp_path / "claim.png")
    assert (tmp_path / "claim.png").stat().st_size > 1000
    flops_recall, flops_r5, wall_recall = fig.axes
    # the first line drawn for each setting is its mean over seeds, stage by stage, at cumulative FLOPs
    full, clipa = flops_recall.lines[0], [line for line in flops_recall.lines if len(line.get_xdata()) == 2][0]
    assert list(full.get_xdata()) == [4.0] and list(full.get_ydata()) == pytest.approx([0.05])
    assert list(clipa.get_xdata()) == [32.0, 40.0] and list(clipa.get_ydata()) == pytest.approx([0.11, 0.07])
    r5 = [line for line in flops_r5.lines if len(line.get_xdata()) == 2][0]
    assert list(r5.get_ydata()) == pytest.approx([0.22, 0.14])
    assert max(x for line in wall_recall.lines for x in line.get_xdata()) == pytest.approx(430)  # mean of 400 and 460
    # 4 to 40 TFLOPs and 60 to 430 s span more than 4x: logarithmic axes; a single budget stays linear
    assert [ax.get_xscale() for ax in fig.axes] == ["log", "log", "log"]
    narrow = oc.plot([r for r in rows if r["group"] == "claim small 24k"], tmp_path / "small.png")
    assert [ax.get_xscale() for ax in narrow.axes] == ["linear", "linear", "linear"]


def test_claim_lr_sets_every_stage_and_names_its_group():
    default = {s.label: s for s in oc.claim_settings("clipa-small", 24_576, 256)}
    small = {s.label: s for s in oc.claim_settings("clipa-small", 24_576, 256, lr=5e-4)}
    assert default.keys() == small.keys()
    for label, s in small.items():
        assert s.group == "claim clipa-small 24k lr 0.0005" and default[label].group == "claim clipa-small 24k"
        assert s.pretrain["optim.lr"] == 5e-4 and default[label].pretrain["optim.lr"] == 2e-3
        if s.finetune:  # at the same fraction of the pretrain LR (a quarter, or all of it for that row)
            assert s.finetune["optim.lr"] == pytest.approx(default[label].finetune["optim.lr"] / 4)
        # nothing else moves: same samples per stage, same FLOPs
        for stage in ("pretrain", "finetune"):
            ours, theirs = getattr(s, stage) or {}, getattr(default[label], stage) or {}
            assert {k for k in ours if ours[k] != theirs.get(k)} <= {"optim.lr"}
