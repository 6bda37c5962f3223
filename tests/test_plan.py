"""`clipa plan`, the analytic FLOP counter behind it, and the shipped paper recipes."""

import json

import pytest
import torch

from clipa.analysis import plan as plan_mod
from clipa.cost import accelerators, flops
from clipa.recipe.load import load_recipe

from conftest import RECIPES, REPO

# A config small enough to count by hand.
SMALL = {"embed_dim": 8, "vision_cfg": {"image_size": 32, "layers": 2, "width": 16, "patch_size": 8},
         "text_cfg": {"context_length": 4, "width": 8, "layers": 1, "heads": 2}}


def _forward(cfg: dict, *geometry) -> dict:
    """Forward FLOPs per tower: the parts of flops.forward_breakdown added up."""
    parts = flops.forward_breakdown(cfg, *geometry)
    image = sum(v for k, v in parts.items() if k.startswith("image_"))
    text = sum(v for k, v in parts.items() if k.startswith("text_"))
    return {"image": image, "text": text, "total": image + text}


def test_flops_match_a_hand_count():
    # image: 32 px / patch 8 = 16 patches + CLS = 17 tokens, width 16, MLP 64, 2 layers
    patch_embed = 2 * 16 * (3 * 8 * 8) * 16  # 98,304: every patch, before masking
    per_layer = 2 * 17 * 4 * 16 * 16 + 2 * 2 * 17 * 17 * 16 + 2 * 17 * 2 * 16 * 64  # proj + scores/values + MLP
    image = patch_embed + 2 * per_layer + 2 * 16 * 8  # + head to embed 8
    # text: 4 tokens, width 8, MLP 32, 1 layer
    text = 2 * 4 * 4 * 8 * 8 + 2 * 2 * 4 * 4 * 8 + 2 * 4 * 2 * 8 * 32 + 2 * 8 * 8
    assert (image, text) == (344_448, 6_784)
    assert _forward(SMALL, 32, 4) == {"image": image, "text": text, "total": image + text}
    # training: backward = 2 forwards, except the patch embedding (no gradient for the pixels)
    assert flops.train_flops_per_sample(SMALL, 32, 4) == 3 * (image - patch_embed) + 2 * patch_embed + 3 * text == 955_392
    # masking half the patches: int(16 x 0.5) = 8 kept + CLS; the patch embedding still sees all 16
    assert flops.image_tokens(SMALL, 32, keep_ratio=0.5) == 9
    per_layer_masked = 2 * 9 * 4 * 256 + 2 * 2 * 81 * 16 + 2 * 9 * 2 * 16 * 64
    assert _forward(SMALL, 32, 4, 0.5)["image"] == patch_embed + 2 * per_layer_masked + 256


def test_flops_match_torch_flop_counter_on_the_tiny_model():
    """FlopCounterMode counts every matmul the real open_clip model runs (math attention so the
    attention matmuls show up as bmm); the analytic count must agree, forward and training step."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from clipa.model.build import Geometry, create_model, stage_config

    cfg = stage_config("clipa-tiny", Geometry(32, 8))
    model = create_model(cfg)
    images, texts = torch.randn(2, 3, 32, 32), torch.randint(0, 1000, (2, 8))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as forward:
        with torch.no_grad():
            model(images, texts)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as step:
        out = model(images, texts)
        (out["image_features"].sum() + out["text_features"].sum()).backward()
    assert forward.get_total_flops() / 2 == pytest.approx(_forward(cfg, 32, 8)["total"], rel=0.01)
    assert step.get_total_flops() / 2 == pytest.approx(flops.train_flops_per_sample(cfg, 32, 8), rel=0.01)


def test_timm_image_tower_is_counted_on_the_meta_device():
    """A timm tower (model.image_tower) is counted by FlopCounterMode without weights; for a timm ViT
    that equals the analytic count of the same transformer."""
    timm_cfg = {"embed_dim": 128, "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "image_size": 112},
                "text_cfg": SMALL["text_cfg"]}
    same_vit = {"embed_dim": 128, "vision_cfg": {"image_size": 112, "layers": 12, "width": 192, "patch_size": 16},
                "text_cfg": SMALL["text_cfg"]}
    assert flops.image_tokens(timm_cfg, 112) == flops.image_tokens(same_vit, 112) == 50
    timm_parts, vit = flops.forward_breakdown(timm_cfg, 112, 4), _forward(same_vit, 112, 4)
    assert timm_parts["image_trunk"] + timm_parts["image_head"] == pytest.approx(vit["image"], rel=1e-6)
    assert flops.train_flops_per_sample(timm_cfg, 112, 4) > 0


def test_accelerator_names():
    assert accelerators.match_accelerator("NVIDIA A100-SXM4-80GB") == "A100"
    assert accelerators.match_accelerator("NVIDIA H100 PCIe") == "H100 PCIe"
    assert accelerators.match_accelerator("NVIDIA L40S") == "L40S"
    assert accelerators.match_accelerator("tpu-v5e") == accelerators.match_accelerator("v5e") == "TPU v5e"
    assert accelerators.match_accelerator("abacus") is None
    assert all(v > 0 for v in accelerators.PEAK_TFLOPS_BF16.values())


def test_json_shape_and_costs_add_up(cli):
    names = ["vit_h14/pretrain_84", "vit_h14/finetune_224", "vit_h14/finetune_336"]
    result = cli("plan", *names, "--json", "--gpu", "H100", "--gpus", "16", "--mfu", "0.4", "--price", "2.5")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {"stages", "total"}
    assert set(data["total"]) == {"total_flops", "gpu_hours", "cost"}
    assert [s["recipe"] for s in data["stages"]] == names
    for s in data["stages"]:
        assert {"recipe", "total_flops", "gpu_hours", "cost"} <= set(s)
        assert s["total_flops"] == pytest.approx(s["flops_per_sample"] * s["samples"])
        assert s["flops_per_sample"] == pytest.approx(s["image_flops_per_sample"] + s["text_flops_per_sample"])
        assert s["gpu_hours"] == pytest.approx(s["total_flops"] / (989e12 * 0.4) / 3600)
        assert s["cost"] == pytest.approx(s["gpu_hours"] * 2.5)
        assert s["wall_hours"] == pytest.approx(s["gpu_hours"] / 16)
    for key in ("total_flops", "gpu_hours", "cost"):
        assert data["total"][key] == pytest.approx(sum(s[key] for s in data["stages"]))
    pre, ft224, ft336 = data["stages"]
    assert (pre["image_tokens"], pre["text_tokens"], pre["steps"]) == (37, 8, 195_490)
    assert (ft224["image_tokens"], ft336["image_tokens"]) == (180, 346)  # 179 of 256 and 345 of 576 patches + CLS
    # the table form prints the same totals
    table = cli("plan", *names, "--gpu", "H100", "--gpus", "16", "--mfu", "0.4", "--price", "2.5")
    assert table.returncode == 0 and f"${data['total']['cost']:,.0f}" in table.stdout


def test_defaults_reproduce_the_published_h14_cost(cli):
    """CLIPA-v2 H/14, 12.8B@84 + 512M@224 on A100s: 7,776 GPU-hours, $12,247 (docs/plan.md)."""
    data = json.loads(cli("plan", "vit_h14/pretrain_84", "vit_h14/finetune_224", "--json").stdout)
    assert data["total"]["gpu_hours"] == pytest.approx(7776, rel=0.03)
    assert data["total"]["cost"] == pytest.approx(12247, rel=0.03)
    assert plan_mod.hours(data["total"]["total_flops"], 312, 1.0) / 7776 == pytest.approx(plan_mod.DEFAULT_MFU, abs=0.01)
    direct = plan_mod.plan(["vit_h14/pretrain_84", "vit_h14/finetune_224"])  # the CLI's defaults are the module's
    assert direct["total"] == pytest.approx(data["total"])


@pytest.mark.parametrize("args, fragment", [
    (["tiny/pretrain", "--gpu", "abacus"], '--gpu: unknown accelerator "abacus"'),
    (["tiny/pretrain", "--mfu", "0"], "--mfu: must be in (0, 1]"),
    (["tiny/pretrain", "--gpus", "0"], "--gpus: must be >= 1"),
    (["tiny/pretrain", "--price", "-1"], "--price: must be >= 0"),
    (["no/such/recipe.toml"], "recipe file not found"),
])
def test_bad_plan_input_exits_2(cli, args, fragment):
    result = cli("plan", *args)
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith("error:") and fragment in result.stderr and "Traceback" not in result.stderr


def test_custom_peak():
    a = plan_mod.plan(["tiny/pretrain"], gpu="my-chip", peak_tflops=100.0, mfu=0.5, gpus=1)
    assert a["stages"][0]["gpu"] == "my-chip"
    assert a["total"]["gpu_hours"] == pytest.approx(a["total"]["total_flops"] / 50e12 / 3600)


# --------------------------------------------------------------------------- shipped paper recipes

# What each shipped paper recipe is: its architecture and the stage it starts from. Its published numbers
# (resolution, masking, text, batch, LR, warmup, samples, optimiser, augmentation, towers) are pinned, with
# the released file of each, in tests/test_published_configs.py: one table, not two.
PAPER = {
    "vit_b16/pretrain_112": dict(arch="ViT-B-16", init=None),
    "vit_b16/finetune_224": dict(arch="ViT-B-16", init="vit_b16/pretrain_112"),
    "vit_h14/pretrain_70": dict(arch="ViT-H-14-CLIPA", init=None),
    # The FT336 stage again, started from CLIPA-v2's released L/14 weights (a published ARCH:TAG).
    "vit_l14/finetune_336_released": dict(arch="ViT-L-14-CLIPA", init="ViT-L-14-CLIPA:datacomp1b"),
}
for _m, _arch in (("l14", "ViT-L-14-CLIPA"), ("h14", "ViT-H-14-CLIPA"), ("bigg14", "ViT-bigG-14-CLIPA")):
    PAPER[f"vit_{_m}/pretrain_84"] = dict(arch=_arch, init=None)
    PAPER[f"vit_{_m}/finetune_224"] = dict(arch=_arch, init=f"vit_{_m}/pretrain_84")
    PAPER[f"vit_{_m}/finetune_336"] = dict(arch=_arch, init=f"vit_{_m}/finetune_224")


def test_every_paper_recipe_is_checked():
    shipped = {p.relative_to(RECIPES).with_suffix("").as_posix() for p in RECIPES.glob("vit_*/*.toml")}
    assert shipped == set(PAPER)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_recipe_launches_as_its_header_says_and_chains_its_stages(name):
    from clipa.model.build import stage_geometry

    want = PAPER[name]
    path = RECIPES / f"{name}.toml"
    r = load_recipe(path)
    geometry = stage_geometry(r)  # what `clipa validate` checks
    assert r.model.arch == want["arch"]
    assert (geometry.image_size, geometry.context_length) == (r.reduction.image_size, r.reduction.text_length)
    assert r.train.precision == "bf16" and r.data.train != "synthetic"
    per_process = r.train.global_batch_size // 8
    assert per_process % r.train.micro_batch_size == 0  # 8 GPUs as launched
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# accelerate launch --multi_gpu --num_processes 8 -m clipa ")
    assert lines[0].endswith(f" recipes/{name}.toml")
    assert (" pretrain " if "pretrain" in name else " finetune ") in lines[0]
    if want["init"] and ":" in want["init"]:  # published weights by name
        assert r.init.checkpoint == want["init"]
    elif want["init"]:
        previous = load_recipe(RECIPES / f"{want['init']}.toml")
        assert r.init.checkpoint == f"runs/{previous.name}"
    else:
        assert r.init.checkpoint == ""
    if name == "vit_b16/pretrain_112":  # inferred, not published (trap 12, docs/clipa_recipes.md): 2,000 ImageNet epochs
        assert r.train.total_samples == 2_000 * 1_281_167


@pytest.mark.parametrize("arch, image_size, text_length, mask_ratio", [
    ("ViT-B-16", 224, 77, 0.0), ("ViT-B-16", 112, 32, 0.0), ("ViT-B-16", 224, 77, 0.75), ("clipa-tiny", 64, 32, 0.5),
])
def test_training_flops_match_torch_flop_counter_at_full_and_reduced_tokens(arch, image_size, text_length, mask_ratio):
    """Real forward + backward passes (one sample) against the analytic count, within 5%."""
    import numpy as np
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from clipa.model.build import Geometry, create_model, stage_config
    from clipa.model.masking import install_patch_masker
    from clipa.reduction.image import patch_keep_indices

    cfg = stage_config(arch, Geometry(image_size, text_length))
    model = create_model(cfg)
    masker = install_patch_masker(model, "random", mask_ratio)
    model.train()
    if masker is not None:
        keep = patch_keep_indices("random", masker.grid, mask_ratio, np.random.default_rng(0))
        masker.use(torch.from_numpy(keep)[None])
    images, texts = torch.randn(1, 3, image_size, image_size), torch.randint(0, 1000, (1, text_length))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(images, texts)
        (out["image_features"].sum() + out["text_features"].sum()).backward()
    analytic = flops.train_flops_per_sample(cfg, image_size, text_length, 1.0 - mask_ratio)
    assert counter.get_total_flops() == pytest.approx(analytic, rel=0.05)  # one sample


def test_masked_timm_vit_is_counted_at_its_kept_tokens():
    """Patch masking on a timm ViT (clipa's masker in timm's patch_drop slot) counts the kept tokens,
    the same as the analytic count of the equivalent open_clip ViT."""
    timm_cfg = {"embed_dim": 128, "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "image_size": 112},
                "text_cfg": SMALL["text_cfg"]}
    same_vit = {"embed_dim": 128, "vision_cfg": {"image_size": 112, "layers": 12, "width": 192, "patch_size": 16},
                "text_cfg": SMALL["text_cfg"]}
    assert flops.image_tokens(timm_cfg, 112, 0.5) == flops.image_tokens(same_vit, 112, 0.5) < 50
    timm_parts, vit = flops.forward_breakdown(timm_cfg, 112, 4, 0.5), _forward(same_vit, 112, 4, 0.5)
    assert timm_parts["image_trunk"] + timm_parts["image_head"] == pytest.approx(vit["image"], rel=1e-6)
    assert flops.train_flops_per_sample(timm_cfg, 112, 4, 0.5) < flops.train_flops_per_sample(timm_cfg, 112, 4)


def _published_rows():
    """The rows of docs/plan.md's "Every published row" table, parsed from the document itself."""
    doc = (REPO / "docs" / "plan.md").read_text()
    rows = []
    for line in doc.split("Every published row", 1)[1].splitlines():
        if line.startswith("| ") and not line.startswith("| model") and "---" not in line:
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.append(cells)
        elif rows and not line.startswith("|"):
            break
    return rows


# The shipped recipes behind each (model, schedule) of the table; LAION-2B and DataComp-1B share recipes.
_ROW_RECIPES = {
    ("L/14", "12.8B@84 + 512M@224"): ["vit_l14/pretrain_84", "vit_l14/finetune_224"],
    ("L/14", "12.8B@84 + 512M@224 + 128M@336"): ["vit_l14/pretrain_84", "vit_l14/finetune_224", "vit_l14/finetune_336"],
    ("H/14", "12.8B@70 + 512M@224"): ["vit_h14/pretrain_70", "vit_h14/finetune_224"],
    ("H/14", "12.8B@84 + 512M@224"): ["vit_h14/pretrain_84", "vit_h14/finetune_224"],
    ("H/14", "12.8B@84 + 512M@224 + 128M@336"): ["vit_h14/pretrain_84", "vit_h14/finetune_224", "vit_h14/finetune_336"],
    ("bigG/14", "12.8B@84 + 512M@224"): ["vit_bigg14/pretrain_84", "vit_bigg14/finetune_224"],
    ("bigG/14", "12.8B@84 + 512M@224 + 128M@336"): ["vit_bigg14/pretrain_84", "vit_bigg14/finetune_224",
                                                     "vit_bigg14/finetune_336"],
}


def test_every_published_row_of_docs_plan_table_is_what_plan_computes():
    """docs/plan.md's table (L/14, H/14 at 70 and 84 px, bigG/14, with and without the 336 px stage) is
    recomputed from the shipped recipes at the defaults. Tolerances are the table's rounding: FLOPs
    printed to 3 significant digits (rel 0.5 %), A100-hours and dollars to the unit (abs 1). The
    published hours are checked against the plan within the deviation the document claims (3 % for
    H/14 and bigG/14, 15 % for L/14), so a change of FLOP count or recipe that breaks the calibration fails."""
    rows = _published_rows()
    assert len(rows) == 8, rows
    num = lambda s: float(s.split()[0].replace(",", ""))  # noqa: E731  "3,636 (-9%)" -> 3636.0
    for model, data, schedule, total_flops, published_h, planned_h, published_usd, planned_usd, mfu in rows:
        result = plan_mod.plan(_ROW_RECIPES[(model, schedule)])["total"]
        label = f"{model} {data} {schedule}"
        assert result["total_flops"] == pytest.approx(num(total_flops), rel=0.005), label
        assert result["gpu_hours"] == pytest.approx(num(planned_h), abs=1), label
        assert result["cost"] == pytest.approx(num(planned_usd), abs=1), label
        assert result["gpu_hours"] == pytest.approx(num(published_h), rel=0.15 if model == "L/14" else 0.03), label
        implied = plan_mod.hours(result["total_flops"], 312, 1.0) / num(published_h)  # the MFU they imply
        assert implied == pytest.approx(num(mfu), abs=0.001), label
