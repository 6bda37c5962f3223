import pytest
import torch

from clipa.errors import ClipaError
from clipa.evaluate.datasets import ZeroShotData, load_templates
from clipa.evaluate.zeroshot import classify

CLASSES = ["cat", "dog", "bird", "fish", "frog", "lion"]


class OneHotModel(torch.nn.Module):
    """A constructed CLIP: an image is a class index painted into its pixels; a caption's
    embedding is the one-hot vector of the class it names. The correct answers are known."""

    def encode_text(self, tokens, normalize=True):
        return torch.nn.functional.one_hot(tokens[:, 0], len(CLASSES)).float()

    def encode_image(self, images, normalize=True):
        # channel 0 holds the predicted class's score pattern: rank classes by stored logits
        return torch.nn.functional.normalize(images[:, 0, 0, : len(CLASSES)], dim=-1)


def tokenizer(texts):
    return torch.tensor([[next(i for i, c in enumerate(CLASSES) if c in t)] for t in texts])


def image_with_ranking(ranking):
    image = torch.zeros(3, 2, 8)
    for place, cls in enumerate(ranking):
        image[0, 0, cls] = 10.0 - place
    return image


def test_metrics_on_known_answers():
    # 6 images: 3 right at top-1, 2 right only within top-5, 1 wrong even at top-5.
    samples = [
        (image_with_ranking([0, 1, 2, 3, 4, 5]), 0),
        (image_with_ranking([1, 0, 2, 3, 4, 5]), 1),
        (image_with_ranking([2, 0, 1, 3, 4, 5]), 2),
        (image_with_ranking([0, 3, 1, 2, 4, 5]), 3),
        (image_with_ranking([0, 1, 2, 3, 4, 5]), 4),
        (image_with_ranking([0, 1, 2, 3, 4, 5]), 5),
    ]
    data = ZeroShotData("constructed", samples, CLASSES, load_templates(None, ["a photo of a {c}.", "a {c}."]))
    metrics = classify(OneHotModel(), tokenizer, data, batch_size=4)
    assert metrics["acc1"] == pytest.approx(3 / 6)
    assert metrics["acc5"] == pytest.approx(5 / 6)
    # every class has one image: mean per-class recall equals acc1 here
    assert metrics["mean_per_class_recall"] == pytest.approx(3 / 6)
    assert metrics["num_samples"] == 6


def test_mean_per_class_recall_weights_classes_equally():
    samples = [(image_with_ranking([0, 1, 2, 3, 4, 5]), 0)] * 8 + [(image_with_ranking([0, 1, 2, 3, 4, 5]), 1)] * 2
    data = ZeroShotData("imbalanced", samples, CLASSES, load_templates(None, ["{c}"]))
    metrics = classify(OneHotModel(), tokenizer, data)
    assert metrics["acc1"] == pytest.approx(0.8)
    assert metrics["mean_per_class_recall"] == pytest.approx((1.0 + 0.0) / 2)


def test_templates_with_braces_c_become_callables(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a photo of a {c}.\n\nitap of the {c}\n")
    templates = load_templates(str(path), None)
    assert [t("dog") for t in templates] == ["a photo of a dog.", "itap of the dog"]
    assert len(load_templates("openai", None)) == 80
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {}\n")
    with pytest.raises(ClipaError, match="each with \\{c\\}"):
        load_templates(str(bad), None)
