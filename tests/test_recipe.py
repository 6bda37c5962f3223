import pytest

from clipa.errors import ClipaError
from clipa.recipe.checks import batch_layout
from clipa.recipe.load import load_recipe, save, to_dict
from clipa.recipe.schema import Recipe

from conftest import RECIPES


def write(tmp_path, text, name="r.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_and_name_from_file(tmp_path):
    recipe = load_recipe(write(tmp_path, "[model]\narch = 'clipa-tiny'\n", "my-run.toml"))
    assert recipe.name == "my-run"
    assert recipe.model.arch == "clipa-tiny"
    assert recipe.optim.betas == [0.9, 0.95]
    assert recipe.train.precision == "auto"


def test_overrides_are_typed_by_field(tmp_path):
    path = write(tmp_path, "[optim]\nlr = 1e-3\n")
    recipe = load_recipe(path, ["optim.lr=3e-4", "train.total_samples=1_000_000", "optim.betas=[0.8, 0.9]",
                                  "train.grad_checkpointing=true", "model.arch=ViT-B-16",
                                  "train.global_batch_size=512", "eval.zeroshot=synthetic,imagefolder",
                                  "eval.data_root=/data/eval", "optim.warmup_steps=1e2"])
    assert recipe.optim.lr == 3e-4 and isinstance(recipe.optim.lr, float)
    assert recipe.train.total_samples == 1_000_000
    assert recipe.optim.betas == [0.8, 0.9]
    assert recipe.train.grad_checkpointing is True
    assert recipe.model.arch == "ViT-B-16"
    assert recipe.eval.zeroshot == ["synthetic", "imagefolder"]
    assert recipe.optim.warmup_steps == 100
    # an int where a float is expected is accepted and stored as float
    assert load_recipe(path, ["optim.lr=1"]).optim.lr == 1.0


def test_override_precedence_over_file(tmp_path):
    path = write(tmp_path, "[train]\nseed = 5\n")
    assert load_recipe(path).train.seed == 5
    assert load_recipe(path, ["train.seed=7"]).train.seed == 7


@pytest.mark.parametrize("text, override, expected", [
    ("[optim]\nlr = 'fast'\n", None, 'optim.lr: expected float, got "fast"'),
    ("[optim]\nlrr = 1.0\n", None, "optim.lrr: unknown key; did you mean 'optim.lr'?"),
    ("[trian]\nseed = 1\n", None, "trian: unknown key; did you mean 'train'?"),
    ("[train]\nseed = 1.5\n", None, "train.seed: expected int, got 1.5"),
    ("[train]\nseed = true\n", None, "train.seed: expected int, got True"),
    ("model = 3\n", None, "model: expected a [model] table"),
    ("", "optim.lr=fast", 'optim.lr: expected float, got "fast"'),
    ("", "optim.betas=0.9", "optim.betas: expected list of float"),
    ("", "optim.learning_rate=1", "optim.learning_rate: unknown key"),
    ("", "optim=1", "optim: is a table"),
    ("", "nokey", "expected key=value"),
    ("", "reduction.image=rezise", 'reduction.image: unknown value "rezise"; did you mean "resize"?'),
    ("", "reduction.mask_ratio=1.0", "reduction.mask_ratio: must be in [0, 1)"),
    ("", "train.precision=fp8", "train.precision: unknown value"),
    ("", "loss.kind=triplet", "loss.kind: unknown value"),
    ("", "train.total_samples=10", "train.total_samples: 10 is less than one batch"),
    # the way back from a masking recipe (tiny/pretrain) to resizing is named in the error
    ("[reduction]\nimage = 'random'\nmask_ratio = 0.75\n", "reduction.image=resize",
     'reduction.mask_ratio: 0.75 needs a masking strategy; set reduction.image to random, grid or block (it is '
     '"resize"), or reduction.mask_ratio=0 to resize without masking'),
])
def test_errors_name_the_key(tmp_path, text, override, expected):
    with pytest.raises(ClipaError) as info:
        load_recipe(write(tmp_path, text), [override] if override else [])
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_and_syntax_error_line(tmp_path):
    with pytest.raises(ClipaError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.toml")
    bad = write(tmp_path, "[optim]\nlr = 1e-3\nwarmup_steps = = 3\n")
    with pytest.raises(ClipaError, match=r"TOML syntax error.*line 3"):
        load_recipe(bad)


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(RECIPES / "tiny" / "pretrain.toml", ["optim.lr=1e-4"])
    out = tmp_path / "config.toml"
    save(recipe, out)
    again = load_recipe(out)
    assert to_dict(again) == to_dict(recipe)


def test_batch_layout_derives_accumulation():
    recipe = Recipe()
    recipe.train.global_batch_size = 64
    assert batch_layout(recipe, 2) == (32, 1)
    recipe.train.micro_batch_size = 8
    assert batch_layout(recipe, 2) == (8, 4)
    assert batch_layout(recipe, 1) == (8, 8)
    recipe.train.micro_batch_size = 12
    with pytest.raises(ClipaError, match="not divisible by train.micro_batch_size"):
        batch_layout(recipe, 2)
    recipe.train.micro_batch_size = 1
    with pytest.raises(ClipaError, match="train.micro_batch_size: 1 with loss.kind"):
        batch_layout(recipe, 2)
    recipe.train.micro_batch_size = 0
    recipe.train.global_batch_size = 63
    with pytest.raises(ClipaError, match="not divisible by the 2 processes"):
        batch_layout(recipe, 2)
