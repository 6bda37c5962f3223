"""Training and evaluation read data the same way: one tar reader, one CSV reader, one decode path,
one sample-index and seed rule (issue 17). Each test can fail: it compares what both sides read."""

import ast
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from test_data_sources import jpeg, write_shard

from clipa.data.decode import decode_image, read_bytes
from clipa.data.sources import ReadOptions, ShardSource, SkipStats
from clipa.data.spec import parse_train
from clipa.data.streams import sample_indices, sample_rng
from clipa.data.transforms import RandomResizedCrop
from clipa.evaluate.datasets import read_imagefolder, wds_index
from clipa.evaluate.retrieval import load_pairs

CLIPA = Path(__file__).resolve().parent.parent / "clipa"


def test_only_clipa_data_opens_tars_csvs_and_images():
    """No module outside clipa/data/ imports tarfile or csv, or calls PIL's Image.open."""
    bad = []
    for path in sorted(CLIPA.rglob("*.py")):
        if path.parent.name == "data":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            bad += [f"{path.name}:{node.lineno} imports {n}" for n in names if n in ("tarfile", "csv")]
            if (isinstance(node, ast.Attribute) and node.attr == "open" and isinstance(node.value, ast.Name)
                    and node.value.id == "Image"):
                bad.append(f"{path.name}:{node.lineno} calls Image.open")
    assert not bad, "\n".join(bad)


def test_evaluation_indexes_a_shard_as_training_reads_it(tmp_path):
    (tmp_path / "test").mkdir()
    write_shard(tmp_path / "test" / "0.tar", 0, 6, broken={2: "no_caption"})
    trained = list(ShardSource(parse_train(str(tmp_path / "test" / "0.tar"))[0], ReadOptions()).read(0, SkipStats()))
    indexed = wds_index(tmp_path)
    assert [parts.keys() >= {"jpg", "json"} for _, parts in indexed] == [True] * 6  # sample 2 has no txt
    with_caption = [(shard, parts) for shard, parts in indexed if "txt" in parts]
    assert len(with_caption) == len(trained) == 5
    for record, (shard, parts) in zip(trained, with_caption, strict=True):
        assert read_bytes((str(shard), *parts["jpg"])) == record.image
        assert read_bytes((str(shard), *parts["txt"])).decode() == record.caption
    images, captions = load_pairs("wds", str(tmp_path))
    assert captions == [[r.caption] for r in trained]
    assert [np.asarray(decode_image(i)).tolist() for i in images] == [np.asarray(decode_image(r.image)).tolist()
                                                                     for r in trained]


def test_evaluation_reads_a_csv_as_training_reads_it(tmp_path):
    (tmp_path / "img").mkdir()
    for n in range(3):
        (tmp_path / "img" / f"{n}.jpg").write_bytes(jpeg(n))
    # A BOM, spaces around a header name and an image path, a blank line: both sides read the same rows.
    (tmp_path / "pairs.csv").write_bytes("\ufefffilepath , title\n img/0.jpg ,zero\n\nimg/1.jpg,one\nimg/2.jpg,two\n"
                                         .encode())
    from clipa.data.sources import CsvSource

    source = CsvSource(parse_train(str(tmp_path / "pairs.csv"))[0], ReadOptions())
    trained = [r for unit in range(len(source)) for r in source.read(unit, SkipStats())]
    images, captions = load_pairs("csv", str(tmp_path / "pairs.csv"))
    assert captions == [[r.caption] for r in trained] == [["zero"], ["one"], ["two"]]
    assert [i[0] for i in images] == [r.image[0] for r in trained]


def test_evaluation_decodes_files_as_training_does(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("CMYK", (10, 6), (10, 20, 30, 40)).save(tmp_path / "a" / "x.jpg")
    dataset, _ = read_imagefolder(tmp_path, transform=lambda image: image)
    image, label = dataset[0]
    assert label == 0 and image.mode == "RGB"
    assert np.asarray(image).tolist() == np.asarray(decode_image((tmp_path / "a" / "x.jpg").read_bytes())).tolist()


def test_one_crop_path_for_decoded_and_drawn_images():
    """The synthetic source's crop (a PIL image) and the shard crop (bytes) are one function."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3)).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    from clipa.data.decode import decode_crop

    crop = RandomResizedCrop(16, (0.5, 1.0))
    assert torch.equal(crop(image, np.random.default_rng(3)), decode_crop(buffer.getvalue(), crop, np.random.default_rng(3)))


def test_sample_index_and_seed_rule():
    # Micro-batch b of process r holds samples b * micro * processes + r * micro + [0, micro).
    assert list(sample_indices(3, 4, 2, 1)) == [28, 29, 30, 31]
    assert sample_rng(5, 7).integers(1 << 30) == sample_rng(5, 7).integers(1 << 30)
    assert sample_rng(5, 7).integers(1 << 30) != sample_rng(5, 8).integers(1 << 30)
