import math

import pytest
import torch
import torch.nn.functional as F

from clipa.errors import ClipaError
from clipa.model.build import Geometry, arch_config, create_model, stage_config, stage_geometry
from clipa.model.weights import load_weights
from clipa.recipe.load import load_recipe


def tiny(**overrides):
    return load_recipe(None, ["model.arch=clipa-tiny", *[f"{k}={v}" for k, v in overrides.items()]])


def test_stage_geometry_defaults_and_reduction():
    assert stage_geometry(tiny()) == Geometry(64, 32)
    assert stage_geometry(tiny(**{"reduction.image_size": 32, "reduction.text_length": 8})) == Geometry(32, 8)
    assert stage_geometry(tiny(**{"reduction.image": "none"})) == Geometry(64, 32)


@pytest.mark.parametrize("overrides, message", [
    ({"reduction.image_size": 30}, "reduction.image_size: 30 is not divisible by the patch size 8 of clipa-tiny; use 24 or 32"),
    ({"reduction.text_length": 77}, "reduction.text_length: 77 exceeds the context length 32"),
    ({"reduction.image": "none", "reduction.image_size": 32}, "conflicts with reduction.image=\"none\""),
])
def test_stage_geometry_errors(overrides, message):
    with pytest.raises(ClipaError) as info:
        stage_geometry(tiny(**overrides))
    assert message in str(info.value)


def test_unknown_arch_suggests_close_names():
    with pytest.raises(ClipaError, match=r'unknown architecture "ViT-B-61".*did you mean.*ViT-B-16'):
        arch_config("ViT-B-61")


def test_standard_open_clip_architectures_stay_available():
    assert arch_config("ViT-B-16")["vision_cfg"]["patch_size"] == 16
    assert arch_config("clipa-tiny")["vision_cfg"]["patch_size"] == 8


def test_arch_from_json_path(tmp_path):
    import json

    path = tmp_path / "my-model.json"
    path.write_text(json.dumps(arch_config("clipa-tiny")))
    assert stage_geometry(load_recipe(None, [f"model.arch={path}"])) == Geometry(64, 32)


def test_finetune_weights_are_interpolated_from_pretrain_geometry():
    torch.manual_seed(0)
    small = create_model(stage_config("clipa-tiny", Geometry(32, 8)))
    big = create_model(stage_config("clipa-tiny", Geometry(64, 32)))
    source = small.state_dict()
    load_weights(big, source)

    # Image: class token kept, the 4x4 grid resized bicubically (antialiased) to 8x8.
    old = source["visual.positional_embedding"]
    width = old.shape[1]
    grid = old[1:].reshape(1, 4, 4, width).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(8, 8), mode="bicubic", antialias=True, align_corners=False)
    expected = expected.permute(0, 2, 3, 1).reshape(64, width)
    new = big.visual.positional_embedding.detach()
    assert torch.equal(new[0], old[0])
    torch.testing.assert_close(new[1:], expected)
    # Corners of an upsampled grid stay close to the source corners; the middle is a blend.
    assert new.shape == (65, width)

    # Text: 8 positions resized linearly to 32, first position reproduced at its left edge.
    old_text = source["positional_embedding"]
    expected_text = F.interpolate(old_text.T[None], size=32, mode="linear", align_corners=False)[0].T
    torch.testing.assert_close(big.positional_embedding.detach(), expected_text)
    torch.testing.assert_close(big.positional_embedding[0].detach(), old_text[0])

    # Everything else is copied unchanged.
    for name, value in big.state_dict().items():
        if "positional_embedding" not in name and name in source:
            assert torch.equal(value, source[name]), name
    assert math.isclose(big.logit_scale.item(), small.logit_scale.item())


def test_load_weights_rejects_another_architecture():
    tiny_model = create_model(stage_config("clipa-tiny", Geometry(64, 32)))
    other = arch_config("clipa-tiny")
    other["vision_cfg"]["layers"] = 2
    with pytest.raises(ClipaError, match="weights do not match the architecture"):
        load_weights(create_model(other), tiny_model.state_dict())
