"""Fixed 2-D sin-cos image position embeddings as CLIPA-v2 trains them (issue 21, part 2)."""

import json
import math

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from clipa.model.posemb import sincos_2d

from conftest import REPO, RESIZE_32, tiny_overrides


def test_formula_is_big_visions_posemb_sincos_2d():
    width, grid = 16, 3
    pos = sincos_2d(grid, width)
    assert pos.shape == (1 + grid * grid, width)
    assert torch.equal(pos[0], torch.zeros(width))  # the class token gets zeros
    quarter = width // 4
    omega = [10_000 ** (-i / (quarter - 1)) for i in range(quarter)]  # 1 ... 1e-4: D/4 - 1 in the denominator
    for row in range(grid):
        for col in range(grid):
            got = pos[1 + row * grid + col]  # patches row by row
            want = ([math.sin(col * w) for w in omega] + [math.cos(col * w) for w in omega]
                    + [math.sin(row * w) for w in omega] + [math.cos(row * w) for w in omega])
            assert got.tolist() == pytest.approx(want, abs=1e-6)
    # not open_clip's MAE formula (denominator D/4, rows first), which CLIPA's JAX runs did not use
    from open_clip.pos_embed import get_2d_sincos_pos_embed

    assert not torch.allclose(pos, torch.from_numpy(get_2d_sincos_pos_embed(width, grid, cls_token=True)).float())


def test_an_open_clip_config_with_sin_cos_2d_gets_clipas_grid():
    from clipa.model.build import create_model

    cfg = json.loads((REPO / "clipa" / "model_configs" / "clipa-tiny.json").read_text())
    cfg["vision_cfg"].update(pos_embed_type="sin_cos_2d", image_size=32)  # open_clip's key, honoured by clipa
    model = create_model(cfg)
    assert torch.equal(model.visual.positional_embedding.detach(), sincos_2d(4, 128))
    assert not model.visual.positional_embedding.requires_grad


def image_pos(run_dir):
    return load_file(str(run_dir / "final" / "open_clip_model.safetensors"))["visual.positional_embedding"]


@pytest.mark.slow
def test_sincos_stays_fixed_is_recomputed_per_stage_and_exports_load_in_open_clip(tmp_path, cli):
    pre, fine, learned = tmp_path / "pre", tmp_path / "fine", tmp_path / "learned"
    result = cli("pretrain", "tiny/pretrain", *tiny_overrides(**{"train.total_samples": 128}), *RESIZE_32,
                 "model.pos_embed=sincos2d", "--out", pre)
    assert result.returncode == 0, result.stderr
    assert torch.equal(image_pos(pre), sincos_2d(4, 128))  # 32 px / patch 8; trained, yet unchanged
    result = cli("finetune", "tiny/finetune", *tiny_overrides(**{"train.total_samples": 64}), "model.pos_embed=sincos2d",
                 f"init.checkpoint={pre}", "--out", fine)
    assert result.returncode == 0, result.stderr
    # 64 px: the exact 8x8 grid, not the 4x4 one interpolated
    assert torch.equal(image_pos(fine), sincos_2d(8, 128))
    assert json.loads((fine / "final" / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"][
        "pos_embed_type"] == "sin_cos_2d"

    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{fine / 'final'}")
    assert torch.equal(model.visual.positional_embedding.detach(), sincos_2d(8, 128))
    assert not model.visual.positional_embedding.requires_grad
    from clipa.evaluate.models import load_model

    ours = load_model(str(fine / "final")).model.eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.eval().encode_image(images), ours.encode_image(images), atol=1e-6)
    # evaluated at another size (`clipa zeroshot --image-size 32`), the grid is recomputed too
    assert torch.equal(load_model(str(fine / "final"), image_size=32).model.visual.positional_embedding.detach(),
                       sincos_2d(4, 128))

    # a learned finetune starts from the grid resized bicubically (open_clip's antialiased resize) and trains it
    from clipa.model.build import create_model
    from clipa.model.weights import load_weights

    cfg = json.loads((REPO / "clipa" / "model_configs" / "clipa-tiny.json").read_text())
    start = create_model(cfg)  # 64 px, learned
    load_weights(start, load_file(str(pre / "final" / "open_clip_model.safetensors")))
    expected = {"visual.positional_embedding": sincos_2d(4, 128)}
    open_clip.model.resize_pos_embed(expected, start)
    assert torch.equal(start.visual.positional_embedding.detach(), expected["visual.positional_embedding"])
    result = cli("finetune", "tiny/finetune", *tiny_overrides(**{"train.total_samples": 64}), "model.pos_embed=learned",
                 "optim.warmup_steps=0", f"init.checkpoint={pre}", "--out", learned)
    assert result.returncode == 0, result.stderr
    moved = (image_pos(learned) - expected["visual.positional_embedding"]).abs().max()
    assert moved > 1e-4, float(moved)  # trained


def test_sincos_on_a_timm_tower_is_refused(cli):
    result = cli("validate", "tiny/pretrain", "model.pos_embed=sincos2d", "model.image_tower=vit_tiny_patch16_224")
    assert result.returncode == 2 and "model.pos_embed" in result.stderr, result.stderr
