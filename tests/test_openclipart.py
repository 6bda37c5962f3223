"""The OpenClipart benchmark's data builder, on a handful of the real package's drawings.

Skipped when Debian's openclipart-svg/openclipart-png are not installed (`.ci/run` installs them).
Nothing built here feeds another test: the unit tests keep making their own data.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import openclipart_data as oc  # noqa: E402

pytestmark = pytest.mark.skipif(not (oc.OPENCLIPART / "svg").is_dir() or not (oc.OPENCLIPART / "png").is_dir(),
                                reason="needs Debian's openclipart-svg and openclipart-png")

# Real drawings: two copies of one drawing in two folders, two level-two classes, one level-one file.
PICKED = [
    "animals/2_dead_frogs_lumen_desig_01", "animals/amphibian/2_dead_frogs_lumen_desig_01",
    "animals/architetto_francesco_ro_01",
]


def _pick(root: Path, extra_per_folder: int = 4) -> list[str]:
    """PICKED plus the first few drawings of two level-two folders, linked into a package-shaped tree."""
    chosen = list(PICKED)
    for folder in ("animals/birds", "food/fruit"):
        pngs = sorted((oc.OPENCLIPART / "png" / folder).glob("*.png"))
        held = [p for p in pngs if _held(p.stem)][:2]  # both sides of the split in every folder
        pngs = [p for p in pngs if not _held(p.stem)][:extra_per_folder] + held
        chosen += [p.relative_to(oc.OPENCLIPART / "png").with_suffix("").as_posix() for p in pngs]
    for rel in chosen:
        for kind in ("png", "svg"):
            target = root / kind / f"{rel}.{kind}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(oc.OPENCLIPART / kind / f"{rel}.{kind}")
    return chosen


def _held(stem: str) -> bool:
    return int(hashlib.sha1(stem.encode()).hexdigest()[:8], 16) % 10 == 0


def _members(tar: Path) -> dict[str, bytes]:
    with tarfile.open(tar) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isfile()}


def test_caption_rule_on_real_metadata():
    title, description, keywords = oc.read_metadata(oc.OPENCLIPART / "svg" / f"{PICKED[0]}.svg")
    assert title == "2 dead frogs"
    assert description.startswith("2 dead frogs...")
    assert keywords[:3] == ("kwaakwaa", "squeleton", "froggies")
    # The description repeats the title (dropped); "dead" is a title word (skipped); 8 keywords.
    assert oc.caption(title, description, keywords) == \
        "2 dead frogs. kwaakwaa, squeleton, froggies, green, fenland, froggy, fen, ooze"
    # A description that says more is kept (its first sentence), and keywords are not repeated.
    assert oc.caption("cat", "A black cat. Sitting.", ["cat", "pet", "Pet", "black"]) == "cat. A black cat. pet, black"
    # Older files use another Creative Commons namespace and the creator's name as title.
    title, _, keywords = oc.read_metadata(oc.OPENCLIPART / "svg" / f"{PICKED[2]}.svg")
    assert title == ""
    assert "animal" in keywords and "architetto francesco rollandin" not in keywords


@pytest.mark.slow  # reads the metadata of all 8,121 drawings (about 15 s)
def test_split_is_by_drawing_and_deterministic():
    drawings = oc.find_drawings()
    assert len(drawings) > 8000
    held = [d for d in drawings if d.held_out]
    assert 0.08 < len(held) / len(drawings) < 0.12
    # Copies of one drawing in two folders fall on the same side.
    by_stem: dict[str, set[bool]] = {}
    for d in drawings:
        by_stem.setdefault(d.png.stem, set()).add(d.held_out)
    assert all(len(sides) == 1 for sides in by_stem.values())
    # The rule is the documented one: sha1 of the file name, first 8 hex digits, 0 mod 10.
    for d in drawings[:200]:
        assert d.held_out == _held(d.png.stem)
    classes = oc.zeroshot_classes(drawings)
    assert len(classes) >= 20 and "animals/birds" in classes


def test_build_is_deterministic_and_keeps_held_out_drawings_out_of_training(tmp_path):
    root = tmp_path / "openclipart"
    chosen = _pick(root)
    a = oc.build(tmp_path / "a", image_size=32, root=root, min_class_drawings=2, log=lambda *_: None)
    b = oc.build(tmp_path / "b", image_size=32, root=root, min_class_drawings=2, log=lambda *_: None)
    assert a == b
    for tar in ("train/000000.tar", "zeroshot/test/0.tar", "retrieval/test/0.tar"):
        assert (tmp_path / "a" / tar).read_bytes() == (tmp_path / "b" / tar).read_bytes(), tar
    drawings = {d.rel: d for d in oc.find_drawings(root)}
    assert set(drawings) == set(chosen)
    train = _members(tmp_path / "a" / "train" / "000000.tar")
    metas = [json.loads(v) for k, v in train.items() if k.endswith(".json")]
    sources = {m["source"] for m in metas}
    held_stems = {Path(r).name for r, d in drawings.items() if d.held_out}
    assert sources == {r for r, d in drawings.items() if not d.held_out}
    assert not {Path(s).name for s in sources} & held_stems
    for key, value in train.items():
        if key.endswith(".txt"):
            meta = json.loads(train[key[:-4] + ".json"])
            assert value.decode() == drawings[meta["source"]].caption
        if key.endswith(".jpg"):
            from PIL import Image
            image = Image.open(io.BytesIO(value))
            assert image.size == (32, 32) and image.mode == "RGB"
    assert a["held_out"] >= 4 and a["train"] == len(sources)
    retrieval = _members(tmp_path / "a" / "retrieval" / "test" / "0.tar")
    titles = sorted(v.decode() for k, v in retrieval.items() if k.endswith(".txt"))
    assert titles == sorted(d.title for d in drawings.values() if d.held_out)
    zeroshot = _members(tmp_path / "a" / "zeroshot" / "test" / "0.tar")
    labels = sorted(int(v) for k, v in zeroshot.items() if k.endswith(".cls"))
    assert labels == [0, 0, 1, 1]  # two held-out drawings from each of the two classes
    names = (tmp_path / "a" / "zeroshot" / "classnames.txt").read_text().split("\n")[:-1]
    assert names == a["zeroshot_classes"] and {"birds", "fruit"} <= set(names)


def test_build_without_the_packages_names_the_apt_command(tmp_path):
    result = subprocess.run([sys.executable, str(BENCHMARKS / "openclipart.py"), "build", str(tmp_path / "out"),
                             "--package-root", str(tmp_path / "missing")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "apt-get install openclipart-svg openclipart-png" in result.stderr
