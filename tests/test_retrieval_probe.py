import csv

import numpy as np
import pytest
import torch
from PIL import Image

from clipa.data.decode import decode_image
from clipa.errors import ClipaError
from clipa.evaluate.linear_probe import accuracy, choose_l2, fit_logistic, linear_probe, stratified_split
from clipa.evaluate.models import load_model
from clipa.evaluate.retrieval import load_pairs, recall_at_k, retrieval
from clipa.recipe.load import load_recipe
from clipa.train.trainer import train

from conftest import RECIPES, tiny_overrides


def test_recall_on_a_constructed_case_with_known_ranks():
    # 3 images on the axes; 4 captions: caption 3 is a second caption of image 0.
    images = torch.eye(3)
    texts = torch.nn.functional.normalize(torch.tensor([
        [1.0, 0.5, 0.0],   # image 0 first  -> right at rank 1
        [0.0, 0.2, 1.0],   # image 1 is rank 2 (image 2 first)
        [0.9, 0.0, 0.1],   # image 2 is rank 2 (image 0 first)
        [0.1, 0.3, 0.2],   # of image 0: image 1 first, then 2, then 0 -> rank 3
    ]), dim=-1)
    owners = torch.tensor([0, 1, 2, 0])
    m = recall_at_k(images, texts, owners, ks=(1, 2, 3))
    assert m["image_retrieval_recall@1"] == pytest.approx(1 / 4)
    assert m["image_retrieval_recall@2"] == pytest.approx(3 / 4)
    assert m["image_retrieval_recall@3"] == pytest.approx(1.0)
    # image -> text: image 0's nearest captions: 0 (1.0/|.|) ...; computed by brute force below
    scores = (texts @ images.T).T
    for k in (1, 2, 3):
        expected = np.mean([any(owners[t] == i for t in scores[i].topk(k).indices) for i in range(3)])
        assert m[f"text_retrieval_recall@{k}"] == pytest.approx(expected)


def test_csv_pairs_group_captions_and_resolve_relative_paths(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "img" / name)
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title"])
        writer.writerows([["img/a.png", "first of a"], ["img/b.png", "only b"], ["img/a.png", "second of a"]])
    images, captions = load_pairs("csv", str(tmp_path / "pairs.csv"))
    assert captions == [["first of a", "second of a"], ["only b"]]
    assert decode_image(images[0]).size == (8, 8)
    with pytest.raises(ClipaError, match="has no column 'caption'"):
        load_pairs("csv", str(tmp_path / "pairs.csv"), caption_column="caption")


@pytest.mark.slow
def test_retrieval_and_probe_on_a_trained_model(tmp_path):
    # 60 steps at lr 5e-4: 10 steps left recall@10 at chance (0.020), and 2e-3 at batch 32 can collapse.
    recipe = load_recipe(RECIPES / "tiny" / "pretrain.toml",
                         tiny_overrides(**{"train.total_samples": 32 * 60, "optim.lr": 5e-4, "optim.warmup_steps": 5}))
    loaded = load_model(str(train(recipe, "pretrain", tmp_path / "run").run_dir))
    result = retrieval(loaded, "synthetic")
    m = result["metrics"]
    assert result["task"] == "zeroshot_retrieval" and m["num_images"] == m["num_texts"] == 500
    assert m["image_retrieval_recall@1"] <= m["image_retrieval_recall@5"] <= m["image_retrieval_recall@10"] <= 1
    # Chance for recall@10 over 500 pairs is 10/500; the trained model must beat it by more than 3 standard
    # errors of a guesser (sqrt(p (1 - p) / 500) = 0.0063), in both directions.
    chance = 10 / 500
    margin = 3 * (chance * (1 - chance) / 500) ** 0.5
    assert m["image_retrieval_recall@10"] > chance + margin, m
    assert m["text_retrieval_recall@10"] > chance + margin, m
    probe = linear_probe(loaded, "synthetic", cache_dir=tmp_path / "cache")
    assert probe["metrics"]["acc1"] > 3 / 24  # far above chance (1/24)
    cached = list((tmp_path / "cache").glob("*.pt"))
    assert len(cached) == 2
    again = linear_probe(loaded, "synthetic", cache_dir=tmp_path / "cache")  # served from the cache
    assert again["metrics"]["acc1"] == probe["metrics"]["acc1"]


def test_probe_separates_linearly_separable_features():
    torch.manual_seed(0)
    centers = torch.randn(4, 16) * 3
    labels = torch.arange(4).repeat_interleave(50)
    features = centers[labels] + torch.randn(200, 16) * 0.5
    l2, scores = choose_l2(features, labels, 4)
    probe = fit_logistic(features, labels, 4, l2)
    test_labels = torch.arange(4).repeat_interleave(20)
    assert accuracy(probe, centers[test_labels] + torch.randn(80, 16) * 0.5, test_labels) == 1.0
    assert max(scores.values()) == 1.0


def test_wds_pairs_read_several_captions_per_image(tmp_path):
    import io
    import tarfile

    (tmp_path / "test").mkdir()
    with tarfile.open(tmp_path / "test" / "0.tar", "w") as tar:
        for i in range(3):
            buffer = io.BytesIO()
            Image.fromarray(np.full((8, 8, 3), 50 * i, dtype=np.uint8)).save(buffer, format="PNG")
            for name, data in ((f"{i:03d}.png", buffer.getvalue()), (f"{i:03d}.txt", f"cap {i} a\ncap {i} b\n".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    images, captions = load_pairs("wds", str(tmp_path))
    assert captions == [[f"cap {i} a", f"cap {i} b"] for i in range(3)]
    assert np.asarray(decode_image(images[2]))[0, 0].tolist() == [100, 100, 100]
    with pytest.raises(ClipaError, match="no shards in"):
        load_pairs("wds", str(tmp_path / "test" / "nothing"))


def test_validation_split_is_stratified_by_class():
    labels = torch.tensor([0] * 50 + [1] * 10 + [2] * 5 + [3] * 2)
    val, fit = stratified_split(labels)
    assert sorted(torch.cat([val, fit]).tolist()) == list(range(len(labels)))  # a partition
    assert torch.bincount(labels[val], minlength=4).tolist() == [10, 2, 1, 1]  # 20% of each class, at least one
    assert torch.bincount(labels[fit], minlength=4).tolist() == [40, 8, 4, 1]  # and every class is fitted
    again, _ = stratified_split(labels)
    assert torch.equal(val, again)  # fixed seed


def test_linear_probe_without_data_root_names_the_option(tmp_path):
    # Checked before the model is used (none is needed to get these errors).
    with pytest.raises(ClipaError, match="--data-root: required for --dataset imagefolder"):
        linear_probe(None, "imagefolder", None, cache_dir=tmp_path)
    with pytest.raises(ClipaError, match=r"--data-root: .*nowhere/train is missing; the linear probe needs train/"):
        linear_probe(None, "imagefolder", str(tmp_path / "nowhere"), cache_dir=tmp_path)
