"""`[data.augment]`: per-sample augmentation as recipe data (issue 21, part 1).

The defaults reproduce the crop from before the table existed; every draw comes from the sample's
own generator, so any worker/process/accumulation layout gives the same tensors.
"""

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image

from clipa.data.decode import decode_crop
from clipa.data.loader import build_train_loader
from clipa.data.transforms import RandomResizedCrop, train_transform
from clipa.errors import ClipaError
from clipa.model.build import Geometry
from clipa.recipe.load import load_recipe, recipe_from_dict
from clipa.recipe.schema import AugmentConfig

ROOT = Path(__file__).resolve().parent.parent
ON = ["data.augment.hflip_prob=0.5", "data.augment.color_jitter=[0.4, 0.4, 0.4, 0.1]",
      "data.augment.color_jitter_prob=0.8", "data.augment.gray_scale_prob=0.2"]


def jpeg(seed: int, size=(96, 72)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, size=(size[1], size[0], 3)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def before(data: bytes, crop, rng, fast: bool) -> torch.Tensor:
    """The crop as it was before `[data.augment]` (main at 7c635bb: decode.crop_resize), verbatim."""
    from clipa.data.decode import draft_factor

    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        box = crop.box(width, height, rng)
        if fast and image.format == "JPEG":
            factor = draft_factor(box[2] - box[0], box[3] - box[1], crop.size)
            if factor > 1:
                image.draft("RGB", (width // factor, height // factor))
                sx, sy = width / image.size[0], height / image.size[1]
                box = (box[0] / sx, box[1] / sy, box[2] / sx, box[3] / sy)
        out = image.convert("RGB").resize((crop.size, crop.size), Image.BICUBIC, box=box)
        return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1)


@pytest.mark.parametrize("fast", [False, True])
def test_defaults_reproduce_the_crop_from_before(fast):
    crop = train_transform(16, AugmentConfig())
    assert crop.scale == (0.9, 1.0) and crop.ratio == (3 / 4, 4 / 3) and crop.resample == Image.BICUBIC
    for i in range(12):
        data = jpeg(i, (160, 120))
        a, b = np.random.default_rng([i, 7]), np.random.default_rng([i, 7])
        assert torch.equal(decode_crop(data, crop, a, fast), before(data, crop, b, fast))
        assert a.random() == b.random()  # nothing more drawn: the caption/patch draws that follow are unchanged


def _synthetic_batches(overrides=(), *, micro=8, processes=1, count=2, workers=0):
    r = load_recipe(None, ["data.num_workers=" + str(workers), "data.synthetic_image_size=40", *overrides])
    out = []
    for rank in range(processes):
        loader = build_train_loader(r, Geometry(24, 8), lambda caps, rngs=None: torch.zeros(len(caps), 1, dtype=torch.long),
                                    micro_batch=micro, processes=processes, rank=rank, start_batch=0, num_batches=count)
        out.append([images for images, _, _ in loader])
    # micro-batch b of every rank, in rank order: the global batch b
    return torch.cat([torch.cat([out[r][b] for r in range(processes)]) for b in range(count)])


# sha256 of the two fixed-seed synthetic batches below, computed by the code before `[data.augment]`
# (commit 7c635bb, with `data.crop_scale=[0.4, 1.0]`). Stored, not recomputed from git, so a shallow
# clone checks it too. A Pillow whose JPEG codec or resize rounds differently changes it: recompute
# then from 7c635bb (`git archive 7c635bb clipa`), never from this tree.
DIGEST_BEFORE_AUGMENT = "2fb0d2f0f3fb85253c98a9400510ef07eb7acd352ca9a91cc02968736a977f0d"


def test_default_batches_equal_the_code_before_the_change():
    """The whole training loader (decode, crop, resize, batching) gives the pre-`[data.augment]` bytes."""
    batches = _synthetic_batches(["data.augment.scale=[0.4, 1.0]"])
    assert hashlib.sha256(batches.numpy().tobytes()).hexdigest() == DIGEST_BEFORE_AUGMENT


def test_augmentations_do_not_depend_on_the_layout():
    """Jitter + grayscale + flip on: 0 vs 2 workers, 1 vs 2 processes, accumulation, all the same tensors."""
    ref = _synthetic_batches(ON)
    assert not torch.equal(ref, _synthetic_batches())  # the augmentations did something
    assert torch.equal(ref, _synthetic_batches(ON, workers=2))
    assert torch.equal(ref, _synthetic_batches(ON, micro=4, processes=2))
    assert torch.equal(ref, _synthetic_batches(ON, micro=4, count=4))  # two micro-batches per global batch


def _one(crop, seed=3):
    return decode_crop(jpeg(seed), crop, np.random.default_rng(seed), fast=False)


def test_each_op_is_torchvisions():
    plain = _one(RandomResizedCrop(24, (0.5, 1.0)))
    as_pil = Image.fromarray(plain.permute(1, 2, 0).numpy())
    flipped = _one(RandomResizedCrop(24, (0.5, 1.0), hflip_prob=1.0))
    assert torch.equal(flipped, plain.flip(-1))
    gray = _one(RandomResizedCrop(24, (0.5, 1.0), gray_scale_prob=1.0))
    expected = np.asarray(F.rgb_to_grayscale(as_pil, num_output_channels=3))
    assert torch.equal(gray, torch.from_numpy(expected.copy()).permute(2, 0, 1))
    # brightness only, always: the factor is the 1st of the four uniforms drawn after the permutation
    jittered = _one(RandomResizedCrop(24, (0.5, 1.0), color_jitter=(0.4, 0, 0, 0), color_jitter_prob=1.0))
    rng = np.random.default_rng(3)
    with Image.open(io.BytesIO(jpeg(3))) as im:
        RandomResizedCrop(24, (0.5, 1.0)).box(*im.size, rng)
    rng.random(), rng.permutation(4)
    factor = rng.uniform(0.6, 1.4)
    expected = np.asarray(F.adjust_brightness(as_pil, float(factor)))
    assert torch.equal(jittered, torch.from_numpy(expected.copy()).permute(2, 0, 1))
    bilinear = _one(RandomResizedCrop(24, (0.5, 1.0), interpolation="bilinear"))
    assert not torch.equal(bilinear, plain)


def test_the_old_key_still_works_with_a_note(tmp_path):
    old = tmp_path / "old.toml"
    old.write_text("[data]\ncrop_scale = [0.5, 1.0]\n")
    r = load_recipe(old)
    assert r.data.augment.scale == [0.5, 1.0]
    assert r.notes == ["data.crop_scale is deprecated: read as data.augment.scale; rename it in the recipe"]
    assert load_recipe(None, ["data.crop_scale=[0.6, 1]"]).data.augment.scale == [0.6, 1.0]
    # a run directory written before the rename reads back
    assert recipe_from_dict({"data": {"crop_scale": [0.7, 1.0]}}).data.augment.scale == [0.7, 1.0]
    both = tmp_path / "both.toml"
    both.write_text("[data]\ncrop_scale = [0.5, 1.0]\n[data.augment]\nscale = [0.5, 1.0]\n")
    with pytest.raises(ClipaError, match=r"^data.crop_scale, data.augment.scale: both set"):
        load_recipe(both)


def test_validate_and_dry_run_print_the_note(tmp_path, cli):
    old = tmp_path / "old.toml"
    old.write_text((ROOT / "recipes/tiny/pretrain.toml").read_text().replace("augment.scale", "crop_scale"))
    for args in (["validate", old], ["pretrain", old, "--dry-run", "--out", tmp_path / "run"]):
        result = cli(*args)
        assert result.returncode == 0, result.stderr
        assert "data.crop_scale is deprecated: read as data.augment.scale" in result.stdout


@pytest.mark.parametrize("override, message", [
    ("data.augment.scale=[0, 1]", "data.augment.scale: expected [min, max] with 0 < min <= max <= 1"),
    ("data.augment.scale=[0.5]", "data.augment.scale: expected [min, max]"),
    ("data.augment.ratio=[2, 1]", "data.augment.ratio: expected [min, max] aspect ratios"),
    ("data.augment.interpolation=nearest", "data.augment.interpolation: unknown value"),
    ("data.augment.hflip_prob=1.5", "data.augment.hflip_prob: must be in [0, 1]"),
    ("data.augment.gray_scale_prob=-0.1", "data.augment.gray_scale_prob: must be in [0, 1]"),
    ("data.augment.color_jitter_prob=2", "data.augment.color_jitter_prob: must be in [0, 1]"),
    ("data.augment.color_jitter=[0.4, 0.4, 0.4]", "data.augment.color_jitter: expected [brightness"),
    ("data.augment.color_jitter=[0.4, 0.4, 0.4, 0.6]", "data.augment.color_jitter: expected [brightness"),
    ("data.augment.color_jitter=[0.4, 0, 0, 0]", "data.augment.color_jitter: [0.4, 0.0, 0.0, 0.0] never applies"),
    ("data.augment.color_jitter_prob=0.8", "data.augment.color_jitter_prob: 0.8 with data.augment.color_jitter all 0"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ClipaError) as err:
        load_recipe(None, [override])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_recipe_key_reference_lists_every_augment_key():
    table = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8").split("## Recipe keys", 1)[1].split("\n## ", 1)[0]
    for key in AugmentConfig.__dataclass_fields__:
        assert f"`data.augment.{key}`" in table, key
