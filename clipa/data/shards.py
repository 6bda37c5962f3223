"""`clipa data synth`: the built-in synthetic data written as real files.

Training pairs go to webdataset shards in img2dataset's layout (`KEY.jpg`, `KEY.txt`,
`KEY.json`), the zero-shot split to an ImageFolder tree (`eval/red_circle/000000.png`) with
`classnames.txt` and `templates.txt`, so `clipa zeroshot --dataset imagefolder` reads it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import webdataset as wds

from clipa.data.synthetic import CLASSNAMES, TEMPLATES, eval_sample, train_sample
from clipa.errors import ClipaError


def _jpeg(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_synthetic(out: str | Path, num_samples: int = 10_000, shard_size: int = 1_000, image_size: int = 64,
                    eval_per_class: int = 20, seed: int = 0, progress=lambda n: None) -> dict:
    out = Path(out)
    if num_samples < 1 or shard_size < 1 or eval_per_class < 0:
        raise ClipaError("--num-samples and --shard-size must be >= 1, --eval-per-class >= 0")
    try:
        (out / "train").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ClipaError(f"OUT: cannot create {out} ({err.strerror})") from None
    # OUT is a plain folder: each shard is a file clipa opens itself (webdataset's ShardWriter would read
    # OUT as a URL, run "pipe:..." and fail on "v2:..."), and a "%" in OUT is not a format.
    shards = 0
    for first in range(0, num_samples, shard_size):
        with open(out / "train" / f"{shards:05d}.tar", "wb") as f, wds.TarWriter(f) as sink:
            for i in range(first, min(first + shard_size, num_samples)):
                image, caption = train_sample(seed, i, image_size)
                key = f"{i:09d}"
                sink.write({"__key__": key, "jpg": _jpeg(image), "txt": caption,
                            "json": json.dumps({"key": key, "caption": caption, "width": image_size,
                                                "height": image_size}).encode()})
                progress(1)
        shards += 1
    eval_dir = out / "eval"
    for name in CLASSNAMES:
        (eval_dir / name.replace(" ", "_")).mkdir(parents=True, exist_ok=True)
    for i in range(eval_per_class * len(CLASSNAMES)):
        image, label = eval_sample(seed, i, image_size)
        image.save(eval_dir / CLASSNAMES[label].replace(" ", "_") / f"{i:06d}.png")
        progress(1)
    (eval_dir / "classnames.txt").write_text("\n".join(sorted(CLASSNAMES, key=lambda c: c.replace(" ", "_"))) + "\n")
    (eval_dir / "templates.txt").write_text("\n".join(t for t in TEMPLATES) + "\n")
    last = max(0, shards - 1)
    return {"train": str(out / "train" / f"{{00000..{last:05d}}}.tar"), "shards": shards,
            "samples": num_samples, "eval": str(eval_dir), "eval_images": eval_per_class * len(CLASSNAMES)}
