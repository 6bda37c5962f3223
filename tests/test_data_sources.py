"""Streaming data: real tar shards (with broken members and a missing shard), CSV files, mixtures.

Every sample's caption is "sample N", and the stand-in tokenizer turns it back into N, so a batch
says exactly which samples it holds.
"""

import gzip
import io
import json
import logging
import os
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from clipa.data.decode import decode_crop, draft_factor, looks_like_image
from clipa.data.loader import build_train_loader
from clipa.data.sources import ReadOptions, Record, ShardSource, SkipStats
from clipa.data.spec import expand, parse_train
from clipa.data.streams import _Mode
from clipa.data.transforms import RandomResizedCrop
from clipa.errors import ClipaError
from clipa.model.build import Geometry
from clipa.recipe.load import load_recipe


def ids(captions, rngs=None):
    """Stand-in tokenizer: "sample 17" -> [[17]]."""
    return torch.tensor([[int(c.split()[-1])] for c in captions])


def jpeg(i: int, size: int = 24) -> bytes:
    rng = np.random.default_rng(i)
    pixels = (rng.integers(0, 255, size=(size, size, 3))).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_shard(path, first: int, count: int, broken: dict | None = None) -> None:
    """Samples first..first+count-1 written with the installed webdataset's TarWriter.

    `broken` maps a sample number to how it is broken: truncated (JPEG cut in half), garbage (not
    an image), no_caption, empty_caption, no_image.
    """
    broken = broken or {}
    with wds.TarWriter(str(path)) as sink:
        for n in range(first, first + count):
            sample = {"__key__": f"{n:06d}", "jpg": jpeg(n), "txt": f"sample {n}",
                      "json": json.dumps({"caption": f"sample {n}", "n": n}).encode()}
            how = broken.get(n)
            if how == "truncated":
                sample["jpg"] = sample["jpg"][: len(sample["jpg"]) // 2]
            elif how == "garbage":
                sample["jpg"] = b"this is not an image at all"
            elif how == "no_caption":
                del sample["txt"]
            elif how == "empty_caption":
                sample["txt"] = "   "
            elif how == "no_image":
                del sample["jpg"]
            sink.write(sample)


def recipe(train: str, **extra):
    overrides = {"data.train": f'"{train}"', "data.num_workers": 0, "data.shuffle_buffer": 0}
    overrides.update(extra)
    return load_recipe(None, [f"{k}={v}" for k, v in overrides.items()])


def batches(r, *, micro=4, processes=1, rank=0, start=0, count=6):
    loader = build_train_loader(r, Geometry(16, 8), ids, micro_batch=micro, processes=processes, rank=rank,
                                start_batch=start, num_batches=count)
    return list(loader), loader


def sample_ids(got) -> list[int]:
    return [int(t) for _, texts, _ in got for t in texts[:, 0]]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """8 clean shards of 6 samples (0..47)."""
    root = tmp_path_factory.mktemp("shards")
    for s in range(8):
        write_shard(root / f"{s:05d}.tar", s * 6, 6)
    return root


def test_spec_syntax_and_brace_expansion(tmp_path):
    specs = parse_train("/d/a/{000..002}.tar@0.7 :: /d/b.csv@0.3::pipe:cat /d/c.tar")
    assert [(s.pattern, s.weight, s.kind) for s in specs] == [
        ("/d/a/{000..002}.tar", 0.7, "shards"), ("/d/b.csv", 0.3, "csv"), ("pipe:cat /d/c.tar", 1.0, "shards")]
    assert expand("/d/{00008..00011}.tar") == ["/d/00008.tar", "/d/00009.tar", "/d/00010.tar", "/d/00011.tar"]
    for bad, words in [("a.tar::", "empty source"), ("a.tar@0", "must be > 0"), ("synthetic::a.tar", "cannot be mixed")]:
        with pytest.raises(ClipaError, match=words) as err:
            load_recipe(None, [f'data.train="{bad}"'])
        assert str(err.value).startswith("data.train:")
    with pytest.raises(ClipaError, match="data.csv_separator"):
        load_recipe(None, ['data.csv_separator=";;"'])
    # a folder of shards expands to its tars, in order
    for s in (1, 0):
        write_shard(tmp_path / f"{s}.tar", s, 1)
    source = ShardSource(parse_train(str(tmp_path))[0], ReadOptions())
    assert [os.path.basename(u) for u in source.urls] == ["0.tar", "1.tar"]
    # captions from a JSON field instead of KEY.txt; a missing field skips the sample as "no caption"
    def captions(key):
        stats = SkipStats()
        shard = ShardSource(parse_train(str(tmp_path / "1.tar"))[0], ReadOptions(caption_key=key))
        return [r.caption for r in shard.read(0, stats)], dict(stats.counts)
    assert captions("json:caption") == (["sample 1"], {})
    assert captions("json:n") == (["1"], {})
    assert captions("json:missing") == ([], {"no_caption": 1})


def test_tar_grouping_matches_the_installed_webdataset(tmp_path):
    """The pin (webdataset <0.3) exists because 1.x broke open_clip-style grouping; check ours and theirs agree."""
    path = tmp_path / "g.tar"
    with wds.TarWriter(str(path)) as sink:
        for key in ("a/000", "a/001", "x.1"):  # a folder in the key, and a dot (webdataset keys end at the first dot)
            sink.write({"__key__": key, "jpg": jpeg(3), "txt": f"sample {len(key)}", "json": b"{}"})
    ours = [(r.key, r.caption, r.image) for r in ShardSource(parse_train(str(path))[0], ReadOptions()).read(0, SkipStats())]
    theirs = list(wds.tariterators.tarfile_samples([{"url": str(path)}]))
    assert [s["__key__"] for s in theirs] == ["a/000", "a/001", "x"]
    assert [k for k, _, _ in ours] == ["a/000", "a/001"]  # "x" has "1.jpg", not "jpg": no image, skipped
    for (key, caption, image), sample in zip(ours, theirs):
        assert (key, caption, image) == (sample["__key__"], sample["txt"].decode(), sample["jpg"])
    assert int(wds.__version__.split(".")[0]) == 0


def test_an_epoch_reaches_every_sample_once_over_2_ranks_x_2_workers(shards):
    r = recipe(str(shards / "{00000..00007}.tar"), **{"data.num_workers": 2, "data.shuffle_buffer": 4})
    # 4 slots x 2 shards x 6 samples: one epoch is 3 micro-batches of 4 per slot, 6 per rank.
    ranks = [batches(r, processes=2, rank=rank, count=12)[0] for rank in (0, 1)]
    epoch0 = sample_ids(ranks[0][:6]) + sample_ids(ranks[1][:6])
    epoch1 = sample_ids(ranks[0][6:]) + sample_ids(ranks[1][6:])
    assert sorted(epoch0) == list(range(48)) and sorted(epoch1) == list(range(48))
    assert epoch0 != epoch1  # reshuffled per epoch
    again = batches(r, processes=2, rank=1, count=12)[0]
    assert sample_ids(again) == sample_ids(ranks[1])  # deterministic


def test_resume_continues_with_the_same_samples(tmp_path, shards):
    """Mixture of local shards (seek reader), a pipe: source (stream reader) and a CSV; shuffle buffer, 2 workers."""
    csv_dir = tmp_path / "csv"
    (csv_dir / "img").mkdir(parents=True)
    lines = ["filepath,title"]
    for n in range(100, 106):  # 3 rows per slot and epoch: the fast-forward crosses epochs of this source
        (csv_dir / "img" / f"{n}.jpg").write_bytes(jpeg(n))
        lines.append(f"img/{n}.jpg,sample {n}")
    (csv_dir / "train.csv").write_text("\n".join(lines) + "\n")
    piped = tmp_path / "piped"
    piped.mkdir()
    for s in range(4):
        write_shard(piped / f"{s}.tar", 200 + s * 5, 5, broken={201: "no_caption", 212: "garbage"})
    train = (f"{shards}/{{00000..00007}}.tar@2::pipe:cat {piped}/{{0..3}}.tar@1::{csv_dir}/train.csv@1")
    r = recipe(train, **{"data.num_workers": 2, "data.shuffle_buffer": 5})
    full, _ = batches(r, micro=3, count=16)
    resumed, _ = batches(r, micro=3, start=9, count=7)
    assert len(resumed) == 7
    for a, b in zip(full[9:], resumed):
        assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    seen = sample_ids(full)
    assert set(seen) & set(range(48)) and set(seen) & set(range(200, 220)) and not set(seen) & {201, 212}
    assert sum(n in range(100, 106) for n in sample_ids(full[:9])) > 6  # some CSV rows came twice: epoch 2
    # data.exact_resume=false: no fast-forward, a fresh (still deterministic) stream from the resume point
    fresh = [batches(recipe(train, **{"data.num_workers": 2, "data.shuffle_buffer": 5, "data.exact_resume": "false"}),
                     micro=3, start=9, count=4)[0] for _ in range(2)]
    assert sample_ids(fresh[0]) == sample_ids(fresh[1]) != sample_ids(full[9:13])


def test_broken_samples_and_shards_are_skipped_counted_and_logged(tmp_path, caplog):
    broken = {1: "truncated", 2: "garbage", 3: "no_caption", 4: "empty_caption", 5: "no_image"}
    write_shard(tmp_path / "00000.tar", 0, 8, broken)
    write_shard(tmp_path / "00002.tar", 8, 8)
    cut = tmp_path / "00003.tar"  # a shard cut off in the middle of sample 20's image
    write_shard(cut, 16, 8)
    data = cut.read_bytes()
    cut.write_bytes(data[: data.index(b"000020.jpg") + 700])
    r = recipe(str(tmp_path / "{00000..00003}.tar"))  # 00001.tar does not exist
    with caplog.at_level(logging.WARNING, logger="clipa.data"):
        got, loader = batches(r, micro=5, count=3)  # exactly the first epoch: 15 good samples
    first_epoch = sample_ids(got)
    # 0..23 minus the 5 broken ones, minus 20..23 lost with the truncated tail
    assert sorted(first_epoch) == sorted(set(range(20)) - set(broken))
    assert loader.skips["corrupt_image"] == 1 and loader.skips["not_image"] == 1
    assert loader.skips["no_caption"] == 1 and loader.skips["empty_caption"] == 1 and loader.skips["no_image"] == 1
    assert loader.skips["missing_shard"] == 1 and loader.skips["truncated_shard"] == 1
    assert loader.skipped_samples == 5 and loader.skipped_shards == 2
    assert loader.take_skipped() == {"skipped_samples": 5, "skipped_shards": 2}
    assert loader.take_skipped() == {"skipped_samples": 0, "skipped_shards": 0}
    text = caplog.text
    assert f"000001 in {tmp_path / '00000.tar'}: corrupt image" in text
    assert f"000003 in {tmp_path / '00000.tar'}: no caption" in text
    assert f"shard {tmp_path / '00001.tar'}: missing shard" in text
    assert f"shard {cut}: truncated shard" in text


def test_fast_forward_reads_what_the_full_reader_reads(tmp_path):
    """Light mode (no image bodies) and full mode yield the same records, truncated shards included."""
    write_shard(tmp_path / "a.tar", 0, 6, {2: "garbage", 3: "truncated"})
    data = (tmp_path / "a.tar").read_bytes()
    for cut in (data.index(b"000004.jpg") + 600, data.index(b"000005.txt") + 100, len(data) - 1500):
        (tmp_path / "b.tar").write_bytes(data[:cut])
        for name in ("a.tar", "b.tar"):
            source = ShardSource(parse_train(str(tmp_path / name))[0], ReadOptions())
            light, full = _Mode(), _Mode()
            light.light = True
            a, b = list(source.read(0, SkipStats(), light)), list(source.read(0, SkipStats(), full))
            assert [(r.key, r.caption) for r in a] == [(r.key, r.caption) for r in b]
            assert isinstance(a[0].image, tuple) and isinstance(b[0].image, bytes)
            crop = RandomResizedCrop(8)
            for x, y in zip(a, b):
                if x.key != "000003":
                    assert torch.equal(decode_crop(x.image, crop, np.random.default_rng(0)),
                                       decode_crop(y.image, crop, np.random.default_rng(0)))


def test_csv_paths_are_relative_to_the_csv(tmp_path, monkeypatch):
    data = tmp_path / "dataset"
    (data / "images").mkdir(parents=True)
    for n in range(3):
        (data / "images" / f"{n}.jpg").write_bytes(jpeg(n))
    absolute = tmp_path / "elsewhere.jpg"
    absolute.write_bytes(jpeg(3))
    (data / "train.tsv").write_text("path\tcaption\n" + "".join(f"images/{n}.jpg\tsample {n}\n" for n in range(3))
                                    + f"{absolute}\tsample 3\nimages/missing.jpg\tsample 4\n")
    monkeypatch.chdir(tmp_path / "dataset" / "images")  # relative to the CSV, not the working directory
    r = recipe(str(data / "train.tsv"), **{"data.csv_image_key": "path", "data.csv_caption_key": "caption"})
    got, loader = batches(r, micro=2, count=2)
    assert sorted(sample_ids(got)) == [0, 1, 2, 3]
    assert loader.skips["missing_file"] == 1
    with pytest.raises(ClipaError,
                       match=r'data.csv_image_key: column "filepath" is not in .*train.tsv \(columns: path, caption\)'):
        batches(recipe(str(data / "train.tsv")), count=1)


def test_a_source_without_usable_samples_stops_the_run(tmp_path):
    with pytest.raises(ClipaError,
                       match=r"data.train: .*nothing/\{0\.\.3\}.tar yields no usable sample \(4 shards read; missing shard: 4\)"):
        batches(recipe(str(tmp_path / "nothing/{0..3}.tar")), count=1)
    write_shard(tmp_path / "00000.tar", 0, 2)
    write_shard(tmp_path / "00001.tar", 2, 2)
    write_shard(tmp_path / "bad.tar", 0, 3, {0: "garbage", 1: "truncated", 2: "no_caption"})
    with pytest.raises(ClipaError, match="bad.tar yields no usable sample .*corrupt image: 1; no caption: 1; not image: 1"):
        batches(recipe(f"{tmp_path}/{{00000..00001}}.tar::{tmp_path}/bad.tar"), count=1)
    (tmp_path / "empty.csv").write_text("filepath,title\n")
    with pytest.raises(ClipaError, match="empty.csv has no rows"):
        batches(recipe(str(tmp_path / "empty.csv")), count=1)
    with pytest.raises(ClipaError, match=r"has 2 shards but 4 loader streams .*data.resampled=true"):
        batches(recipe(f"{tmp_path}/{{00000..00001}}.tar"), processes=4, count=1)


def test_resampled_streams_are_endless_and_deterministic(tmp_path):
    write_shard(tmp_path / "0.tar", 0, 3)
    write_shard(tmp_path / "1.tar", 3, 3)
    r = recipe(str(tmp_path / "{0..1}.tar"), **{"data.resampled": "true", "data.shuffle_buffer": 4})
    a = [sample_ids(batches(r, micro=3, processes=4, rank=k, count=5)[0]) for k in range(4)]
    b = [sample_ids(batches(r, micro=3, processes=4, rank=k, count=5)[0]) for k in range(4)]
    assert a == b and all(len(x) == 15 and set(x) <= set(range(6)) for x in a)
    assert len({tuple(x) for x in a}) == 4  # each slot draws its own shards


def test_fast_decode_keeps_the_crop_and_decodes_smaller():
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3)).astype(np.uint8)).resize(
        (256, 256)).save(big, format="JPEG")
    record = Record("k", "mem", big.getvalue(), "sample 1")
    crop = RandomResizedCrop(32, (0.5, 1.0))
    slow_rng, fast_rng = np.random.default_rng(1), np.random.default_rng(1)
    slow = decode_crop(record.image, crop, slow_rng, fast=False)
    fast = decode_crop(record.image, crop, fast_rng, fast=True)
    assert slow.shape == fast.shape == (3, 32, 32) and slow.dtype == torch.uint8
    assert slow_rng.random() == fast_rng.random()  # same draws: same crop box
    assert (slow.float() - fast.float()).abs().mean() < 12
    assert draft_factor(181, 256, 32) == 4 and draft_factor(60, 60, 32) == 1 and draft_factor(256, 256, 32) == 8
    assert looks_like_image(big.getvalue()[:16]) and not looks_like_image(b"<html>")


@pytest.mark.slow
def test_train_and_inspect_on_shards(tmp_path, cli):
    from clipa.data.shards import write_synthetic
    from clipa.train.trainer import train

    from conftest import RECIPES, tiny_overrides

    info = write_synthetic(tmp_path / "synth", num_samples=96, shard_size=24, eval_per_class=0)
    assert expand(info["train"]) == [str(tmp_path / "synth" / "train" / f"{s:05d}.tar") for s in range(4)]
    r = load_recipe(RECIPES / "tiny" / "pretrain.toml", tiny_overrides(**{
        "data.train": f'"{info["train"]}"', "train.total_samples": 64, "data.shuffle_buffer": 16}))
    result = train(r, "pretrain", tmp_path / "run")
    assert result.steps == 2 and (tmp_path / "run" / "final").is_dir()

    broken = tmp_path / "broken"
    broken.mkdir()
    write_shard(broken / "0.tar", 0, 6, {1: "truncated", 2: "no_caption"})
    sheet = tmp_path / "sheet.png"
    res = cli("data", "inspect", f"{broken}/{{0..1}}.tar", "--sheet", sheet)
    assert res.returncode == 0, res.stderr
    assert "samples" in res.stdout and "│ 4 " in res.stdout and "corrupt image: 1, no caption: 1" in res.stdout
    assert "missing shard: 1" in res.stdout
    assert Image.open(sheet).size[0] > 100
    res = cli("data", "inspect", "synthetic", "--max-samples", "8", "--sheet-count", "0")
    assert res.returncode == 0 and "synthetic" in res.stdout
    res = cli("data", "inspect", str(tmp_path / "none.csv"))
    assert res.returncode == 2 and "none.csv not found" in res.stderr


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_agrees_with_tarfile(tmp_path, fmt):
    """Long names (ustar prefix, GNU longname, pax path), other member types, and gzip, against tarfile."""
    from clipa.data.tar import TarStream, tar_members

    path = tmp_path / "t.tar"
    names = ["d/" + "x" * 120 + "/000001.jpg", "d/" + "x" * 120 + "/000001.txt", "short.txt", "é/ü.jpg"]
    with tarfile.open(path, "w", format=fmt) as tar:
        tar.addfile(tarfile.TarInfo("d"))  # a non-file member between the files
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            data = bytes([i]) * (700 * i + 3)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    expected = [(m.name, m.offset_data, m.size) for m in tarfile.open(path) if m.isreg()]
    with open(path, "rb") as f:
        assert list(tar_members(TarStream(f, os.path.getsize(path)))) == expected
    with open(path, "rb") as f:  # as a pipe would deliver it
        assert list(tar_members(TarStream(io.BytesIO(f.read())))) == expected
    write_shard(tmp_path / "s.tar", 0, 3)
    (tmp_path / "s.tgz").write_bytes(gzip.compress((tmp_path / "s.tar").read_bytes()))
    plain = [r.caption for r in ShardSource(parse_train(str(tmp_path / "s.tar"))[0], ReadOptions()).read(0, SkipStats())]
    packed = [r.caption for r in ShardSource(parse_train(str(tmp_path / "s.tgz"))[0], ReadOptions()).read(0, SkipStats())]
    assert plain == packed == ["sample 0", "sample 1", "sample 2"]


@pytest.mark.parametrize("workers, resampled, interleave", [(2, "false", 1), (0, "true", 1), (0, "false", 3)])
def test_a_source_that_dies_mid_run_stops_with_a_clear_error(tmp_path, workers, resampled, interleave):
    """Shards deleted after the start-up check: the run stops naming the source instead of looping forever."""
    for s in range(4):
        write_shard(tmp_path / f"{s}.tar", s * 3, 3)
    pattern = str(tmp_path / "{0..3}.tar")
    r = recipe(pattern, **{"data.num_workers": workers, "data.resampled": resampled, "data.interleave": interleave})
    loader = build_train_loader(r, Geometry(16, 8), ids, micro_batch=2, processes=1, rank=0, start_batch=0,
                                num_batches=1000)
    for s in range(4):
        (tmp_path / f"{s}.tar").unlink()
    with pytest.raises(ClipaError) as err:
        list(loader)
    message = str(err.value)
    assert message.startswith(f"data.train: {pattern} stopped yielding samples") and "missing shard:" in message
    assert "\n" not in message and "Traceback" not in message  # the worker's message, not torch's wrapper


def test_a_dead_source_ends_clipa_pretrain_with_exit_2(tmp_path, cli):
    """A pipe: shard that works for the start-up check only (think: credentials that expire)."""
    from conftest import RECIPES, tiny_overrides

    write_shard(tmp_path / "0.tar", 0, 8)
    (tmp_path / "ok").touch()
    script = tmp_path / "once.sh"
    script.write_text(f'[ -e "{tmp_path}/ok" ] && rm "{tmp_path}/ok" && exec cat "{tmp_path}/0.tar"\nexit 1\n')
    res = cli("pretrain", RECIPES / "tiny" / "pretrain.toml", *tiny_overrides(**{
        "data.train": f'"pipe:sh {script}"', "data.num_workers": 1}), "--out", tmp_path / "run")
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"error: data.train: pipe:sh {script} stopped yielding samples" in res.stderr
    assert "unreadable shard: 1)" in res.stderr and "Traceback" not in res.stderr, res.stderr


@pytest.mark.slow
def test_metrics_count_skips_of_every_process_and_resume_warns_on_a_new_layout(tmp_path, caplog):
    """2 real processes (torchrun) over shards with broken members and a missing shard; then a 1-process resume."""
    from clipa.data.loader import check_resume_layout
    from clipa.train.trainer import Trainer

    from conftest import RECIPES, run_torchrun, tiny_overrides

    for s in range(7):  # 7.tar is missing; every shard's first sample is broken (bad body or not an image)
        write_shard(tmp_path / f"{s}.tar", s * 6, 6, {s * 6: "truncated" if s % 2 else "garbage"})
    train = str(tmp_path / "{0..7}.tar")
    overrides = tiny_overrides(**{"data.train": f'"{train}"', "train.global_batch_size": 8, "train.total_samples": 32,
                                  "data.shuffle_buffer": 0})
    run_torchrun("-m", "clipa", "pretrain", RECIPES / "tiny" / "pretrain.toml", *overrides, "--out", tmp_path / "run",
                 cwd=tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in lines] == [2, 4]
    # What each rank's loader skips in those 4 steps of micro-batch 4 (the same streams, read here).
    per_rank = [batches(recipe(train), micro=4, processes=2, rank=k, count=4)[1] for k in (0, 1)]
    assert all(loader.skipped_samples > 0 for loader in per_rank)  # rank 0's count alone would be short
    assert sum(loader.skipped_shards for loader in per_rank) >= 1
    assert sum(row["skipped_samples"] for row in lines) == sum(loader.skipped_samples for loader in per_rank)
    assert sum(row["skipped_shards"] for row in lines) == sum(loader.skipped_shards for loader in per_rank)

    # The checkpoint holds the layout; resuming in 1 process (micro-batch 8) warns that the position is approximate.
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_000004" / "state.pt", weights_only=False)
    assert state["data_position"] == {"micro_batch": 4, "processes": 2, "num_workers": 0, "micro_batch_size": 4,
                                      "exact_resume": True, "shuffle_buffer": 0, "interleave": 8}
    with caplog.at_level(logging.WARNING, logger="clipa.data"):
        Trainer(load_recipe(RECIPES / "tiny" / "pretrain.toml", overrides), "pretrain", tmp_path / "run")
    assert "data position is approximate" in caplog.text and "processes 2 -> 1, micro-batch 4 -> 8" in caplog.text
    data = recipe(train, **{"data.num_workers": 3}).data
    saved = {"micro_batch": 4, "processes": 1, "num_workers": 3, "micro_batch_size": 8, "exact_resume": True,
             "shuffle_buffer": 0, "interleave": 8}
    assert check_resume_layout(saved, data, 1, 8) is None  # same layout: exact, silent
    # another buffer or interleave reads other samples: said, with the values that resume exactly
    changed = check_resume_layout({**saved, "shuffle_buffer": 2000, "interleave": 1}, data, 1, 8)
    assert "data.shuffle_buffer 2000 -> 0, data.interleave 1 -> 8" in changed
    assert changed.endswith("cores), data.shuffle_buffer=2000, data.interleave=1")
    # a checkpoint from before interleave was saved read one shard at a time; its buffer is not known
    before = {k: v for k, v in saved.items() if k not in ("shuffle_buffer", "interleave")}
    assert "data.interleave 1 -> 8" in check_resume_layout(before, data, 1, 8)
    assert "shuffle_buffer" not in check_resume_layout(before, data, 1, 8)
    assert "data.num_workers 2 -> 3" in check_resume_layout({**saved, "num_workers": 2}, data, 1, 8)
    assert check_resume_layout({**saved, "num_workers": 0}, recipe(train, **{"data.num_workers": 1}).data, 1, 8) is None
    assert check_resume_layout({"micro_batch": 4}, data, 2, 4) is None  # an older checkpoint: nothing to compare
    assert check_resume_layout(saved, recipe("synthetic").data, 2, 4) is None  # index-addressed: always exact


def test_mixture_follows_the_weights(tmp_path):
    for s in range(2):
        write_shard(tmp_path / f"a{s}.tar", s * 50, 50)
        write_shard(tmp_path / f"b{s}.tar", 1000 + s * 50, 50)
    for wa, wb in ((0.8, 0.2), (1, 3)):
        r = recipe(f"{tmp_path}/a{{0..1}}.tar@{wa}::{tmp_path}/b{{0..1}}.tar@{wb}")
        got = sample_ids(batches(r, micro=10, count=50)[0])  # 500 samples: binomial sd of the share ~0.02
        share = sum(n < 1000 for n in got) / len(got)
        assert abs(share - wa / (wa + wb)) < 0.06, (wa, wb, share)


def test_shuffle_buffer_mixes_samples_across_and_within_shards(shards):
    train = str(shards / "{00000..00007}.tar")
    one_shard = {"data.interleave": 1}  # one shard at a time, so that the buffer alone mixes
    plain = sample_ids(batches(recipe(train, **one_shard), micro=8, count=6)[0])  # one epoch: 48 samples
    mixed = sample_ids(batches(recipe(train, **one_shard, **{"data.shuffle_buffer": 16}), micro=8, count=6)[0])
    assert sorted(plain) == sorted(mixed) == list(range(48))
    # Without a buffer each shard is read whole and in order: runs of 6 consecutive samples.
    assert all(plain[i:i + 6] == list(range(plain[i], plain[i] + 6)) for i in range(0, 48, 6))
    shard_of = [n // 6 for n in mixed]
    assert sum(a != b for a, b in zip(shard_of, shard_of[1:])) > 20  # shards interleave
    assert any(m[i:i + 6] != sorted(m[i:i + 6]) for m in [mixed] for i in range(0, 48, 6))


def test_interleave_reads_several_shards_at_once_and_resumes_exactly(shards):
    """Shards in order (think: written class by class): one at a time, a batch holds one shard's samples;
    interleaved, every batch mixes several, each sample still once per epoch, deterministic, resumable."""
    train = str(shards / "{00000..00007}.tar")

    def shards_per_batch(got):
        return [len({n // 6 for n in sample_ids([b])}) for b in got]

    one = batches(recipe(train, **{"data.interleave": 1}), micro=6, count=8)[0]  # one epoch: 8 batches of 6
    four = batches(recipe(train, **{"data.interleave": 4}), micro=6, count=16)[0]
    assert shards_per_batch(one) == [1] * 8
    assert min(shards_per_batch(four)) >= 2 and sum(shards_per_batch(four[:8])) >= 20
    assert sorted(sample_ids(four[:8])) == sorted(sample_ids(four[8:])) == list(range(48))
    for n in range(8):  # within a shard, samples keep their order: a shard is still read front to back
        from_shard = [i for i in sample_ids(four[:8]) if i // 6 == n]
        assert from_shard == sorted(from_shard)
    r = recipe(train, **{"data.interleave": 3, "data.shuffle_buffer": 5, "data.num_workers": 2})
    full = batches(r, micro=4, count=20)[0]
    assert sample_ids(batches(r, micro=4, count=20)[0]) == sample_ids(full)
    resumed = batches(r, micro=4, start=13, count=7)[0]  # past the first epoch of each worker
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[0], b[0]) for a, b in zip(full[13:], resumed, strict=True))
    with pytest.raises(ClipaError, match=r"data.interleave: must be >= 1 \(1 = one shard at a time\), got 0"):
        recipe(train, **{"data.interleave": 0})


def test_fast_decode_uses_pil_draft(monkeypatch):
    """The reduced-size decode is really applied (libjpeg scaling via Image.draft), and only with fast_decode."""
    from PIL import JpegImagePlugin

    calls = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        calls.append((size, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3)).astype(np.uint8)).save(big, format="JPEG")
    record = Record("k", "mem", big.getvalue(), "sample 1")
    crop = RandomResizedCrop(16, (0.9, 1.0))  # a crop of ~240 px for 16 px: 1/8 scale
    decode_crop(record.image, crop, np.random.default_rng(1), fast=False)
    assert calls == []
    out = decode_crop(record.image, crop, np.random.default_rng(1), fast=True)
    assert calls == [((32, 32), (32, 32))] and out.shape == (3, 16, 16)  # decoded at 32x32, not 256x256


def test_resolve_workers(monkeypatch):
    from clipa.data.loader import resolve_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_workers(5) == 5 and resolve_workers(0) == 0  # explicit values are kept
    assert resolve_workers(-1) == 7  # 8 cores, one left for the trainer
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resolve_workers(-1) == 3  # the node's cores are shared by its 2 processes
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert resolve_workers(-1) == 1  # never 0: at least one worker
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(128)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert resolve_workers(-1) == 16  # capped
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS has no affinity call: all cores
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert resolve_workers(-1) == 3


def test_a_failing_pipe_shard_counts_once():
    stats = SkipStats()
    source = ShardSource(parse_train("pipe:sh -c 'echo oops >&2; exit 3'")[0], ReadOptions())
    assert list(source.read(0, stats)) == [] and dict(stats.counts) == {"unreadable_shard": 1}
