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
    assert [s.tool for s in settings] == ["open_clip", "clipa", "clipa"]
    assert settings[0].pretrain == settings[1].pretrain == settings[2].pretrain
    assert settings[0].finetune == settings[1].finetune
    # the third finetunes with open_clip_train's AdamW settings and nothing else changed
    changed = {k: v for k, v in settings[2].finetune.items() if settings[1].finetune[k] != v}
    assert changed == {"optim.betas": [0.9, 0.999], "optim.eps": 1e-8, "optim.weight_decay": 0.2}
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
