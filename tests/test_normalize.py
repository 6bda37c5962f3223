"""`data.normalize`: validated, fixed on resume, applied to training batches, recorded in the export's
preprocess_cfg and used by clipa's evaluation, so plain open_clip preprocesses an export as training did."""

from pathlib import Path

import open_clip
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from clipa.data.shards import write_synthetic
from clipa.data.transforms import Normalize, normalize
from clipa.errors import ClipaError
from clipa.evaluate.models import load_model
from clipa.evaluate.zeroshot import zeroshot
from clipa.recipe.checks import check_resume_compatible
from clipa.recipe.load import load_recipe
from clipa.recipe.schema import NORMALIZATIONS, image_mean_std
from clipa.train.trainer import train

from conftest import RECIPES, RESIZE_32, tiny_overrides

TINY = RECIPES / "tiny" / "pretrain.toml"
MEAN, STD = [0.3, 0.4, 0.5], [0.2, 0.25, 0.3]  # neither OpenAI's nor ImageNet's nor 0.5/0.5


def test_the_named_normalisations_are_open_clips():
    from open_clip import constants as c

    assert NORMALIZATIONS["openai"] == (c.OPENAI_DATASET_MEAN, c.OPENAI_DATASET_STD)
    assert NORMALIZATIONS["imagenet"] == (c.IMAGENET_MEAN, c.IMAGENET_STD)
    assert NORMALIZATIONS["inception"] == (c.INCEPTION_MEAN, c.INCEPTION_STD)
    assert image_mean_std(load_recipe(TINY).data) == NORMALIZATIONS["openai"]  # the default: old runs unchanged


@pytest.mark.parametrize("name", ["openai", "imagenet", "custom"])
def test_the_device_op_is_torchvisions_normalize(name):
    overrides = [f"data.normalize={name}"] + ([f"data.mean={MEAN}", f"data.std={STD}"] if name == "custom" else [])
    mean, std = image_mean_std(load_recipe(TINY, overrides).data)
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    expected = T.Normalize(mean, std)(images.float() / 255)
    torch.testing.assert_close(Normalize(mean, std)(images), expected, rtol=1e-5, atol=1e-5)
    if name == "openai":
        torch.testing.assert_close(normalize(images), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (["data.normalize=clip"], "data.normalize: unknown value"),
    (["data.normalize=custom"], "data.mean: data.normalize = \"custom\" needs three numbers"),
    (["data.normalize=custom", "data.mean=[0.5, 0.5, 0.5]"], "data.std: data.normalize = \"custom\" needs three"),
    (["data.normalize=custom", "data.mean=[123.7, 116.3, 103.5]", "data.std=[0.2, 0.2, 0.2]"],
     "data.mean: expected values for pixels in [0, 1]"),
    (["data.normalize=custom", "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.2, 0, 0.2]"],
     "data.std: expected values for pixels in [0, 1]"),
    (["data.mean=[0.5, 0.5, 0.5]"], "data.mean: applies only with data.normalize = \"custom\""),
    (["data.normalize=imagenet", "data.std=[0.5, 0.5, 0.5]"], "data.std: applies only with data.normalize"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ClipaError) as err:
        load_recipe(TINY, overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_validate_exits_2_with_one_line(cli):
    result = cli("validate", TINY, "data.normalize=vgg")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "data.normalize: unknown value" in result.stderr


@pytest.mark.parametrize("key, value", [("normalize", "imagenet"), ("mean", MEAN)])
def test_changing_it_on_resume_is_refused(tmp_path, key, value):
    saved = load_recipe(TINY, ["data.normalize=custom", f"data.mean={MEAN}", f"data.std={STD}"]
                        if key == "mean" else [])
    now = load_recipe(TINY, ["data.normalize=custom", f"data.mean={[0.5, 0.5, 0.5]}", f"data.std={STD}"]
                      if key == "mean" else [f"data.normalize={value}"])
    with pytest.raises(ClipaError, match=f"data.{key}: the checkpoint .* cannot change on resume"):
        check_resume_compatible(now, saved, tmp_path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two steps of the tiny recipe with a custom normalisation and bilinear crops."""
    root = tmp_path_factory.mktemp("normalize")
    info = write_synthetic(root / "synth", num_samples=1, shard_size=1, eval_per_class=1)
    overrides = tiny_overrides(**{"train.global_batch_size": 16, "train.total_samples": 16 * 2,
                                  "data.normalize": "custom", "data.mean": MEAN,
                                  "data.std": STD, "data.augment.interpolation": "bilinear"})
    run = train(load_recipe(TINY, [*overrides, *RESIZE_32]), "pretrain", root / "run")  # 32 px, as checked below
    return run.run_dir, Path(info["eval"])


def test_the_export_preprocesses_in_plain_open_clip_as_training_did(trained):
    run_dir, _ = trained
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{run_dir / 'final'}")
    norm = next(t for t in preprocess.transforms if isinstance(t, T.Normalize))
    resize = next(t for t in preprocess.transforms if isinstance(t, T.Resize))
    assert list(norm.mean) == MEAN and list(norm.std) == STD
    assert resize.interpolation == T.InterpolationMode.BILINEAR
    # clipa's loaders agree, for the export and for a step checkpoint of the run
    checkpoint = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    for spec in (run_dir / "final", checkpoint):
        loaded = load_model(str(spec))
        assert (list(loaded.mean), list(loaded.std), loaded.interpolation) == (MEAN, STD, "bilinear"), spec


def test_clipa_zeroshot_on_the_export_sees_what_open_clip_sees(trained):
    """The image features (hence the logits against any classifier) of clipa's zero-shot path on the
    export equal plain open_clip's preprocess + model, image by image."""
    run_dir, eval_dir = trained
    loaded = load_model(f"local-dir:{run_dir / 'final'}")
    seen = []
    encode = loaded.model.encode_image
    loaded.model.encode_image = lambda images, **kw: seen.append(encode(images, **kw)) or seen[-1]
    result = zeroshot(loaded, "imagefolder", str(eval_dir), batch_size=64)
    ours = torch.cat(seen)

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{run_dir / 'final'}")
    model.eval()
    paths = sorted(eval_dir.glob("*/*.png"))
    images = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        theirs = model.encode_image(images, normalize=True)
        weights = open_clip.build_zero_shot_classifier(model, loaded.tokenizer, ["a", "b", "c"], ["{}".format])
    assert result["metrics"]["num_samples"] == len(paths) == len(ours)
    torch.testing.assert_close(ours @ weights, theirs @ weights, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # and the check can fail: OpenAI's mean/std with bicubic, what every export said before, gives other features
    old = open_clip.image_transform(32, is_train=False, interpolation="bicubic")
    with torch.no_grad():
        before = model.encode_image(torch.stack([old(Image.open(p).convert("RGB")) for p in paths]), normalize=True)
    assert not torch.allclose(before, theirs, atol=1e-3)


def test_a_finetune_from_weights_trained_otherwise_gets_a_note(trained):
    from clipa.model.weights import trained_mean_std
    from clipa.train.preflight import normalisation_note

    run_dir, _ = trained
    checkpoint = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    assert trained_mean_std(run_dir) == trained_mean_std(checkpoint) == (MEAN, STD)  # final/, then the recipe
    finetune = RECIPES / "tiny" / "finetune.toml"
    note = normalisation_note(load_recipe(finetune), str(run_dir))
    assert note.startswith(f"init.checkpoint {run_dir} was trained with image mean {MEAN}") and "openai" in note
    same = load_recipe(finetune, ["data.normalize=custom", f"data.mean={MEAN}", f"data.std={STD}"])
    assert normalisation_note(same, str(run_dir)) is None
