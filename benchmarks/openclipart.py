"""OpenClipart: real drawings with human-written titles as clipa's accuracy benchmark.

    python benchmarks/openclipart.py build DATA [--image-size 128]
    python benchmarks/openclipart.py defaults DATA --arch clipa-tiny --seeds 3 [--samples 30000]
    python benchmarks/openclipart.py vs-open-clip DATA --arch clipa-tiny --seeds 3
    python benchmarks/openclipart.py claim DATA --arch clipa-tiny --seeds 3
    python benchmarks/openclipart.py mixing DATA
    python benchmarks/openclipart.py table RESULTS.jsonl [--group G] [--against SETTING] [--plot PNG]

`build` turns Debian's `openclipart-svg` + `openclipart-png` packages into webdataset shards and
two held-out evaluations (see openclipart_data.py for the caption rule, the split and the
classes) and prints the chance levels. Every other command trains with `clipa pretrain` /
`clipa finetune` (subprocesses, exactly as a user runs them), evaluates with `clipa zeroshot
--dataset wds` and `clipa retrieval --dataset wds` on the held-out drawings, and appends one JSON
row per (setting, seed) to `--results` (default DATA/results.jsonl), so an interrupted sweep keeps
what it measured and `table` summarises any subset: mean, standard deviation and range over seeds.

  defaults       one training default changed at a time from the shipped tiny recipe's settings
                 (crop area, betas, eps, weight decay, LR, warmup, temperature clamp, text length)
  vs-open-clip   clipa's default recipe against open_clip_train's defaults on the same shards,
                 model, samples, batch and LR schedule; then the settings matched one by one
  claim          full tokens vs CLIPA (low-resolution + short/syntax text, then a short
                 full-length finetune, with and without masking) at equal training FLOPs
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import openclipart_data  # noqa: E402

STAGE_KEYS = ("model.arch", "reduction.image", "reduction.image_size", "reduction.mask_ratio", "reduction.text",
              "reduction.text_length")


@dataclass
class Setting:
    """One training configuration: recipe overrides for one stage, or two stages (pretrain, finetune)."""
    label: str
    pretrain: dict
    finetune: dict | None = None
    tool: str = "clipa"  # clipa | open_clip
    group: str = ""
    finetune_tool: str = ""  # the other tool finetunes the first stage's model (a crossover); "" = `tool`
    notes: str = ""
    extra: dict = field(default_factory=dict)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def overrides(values: dict) -> list[str]:
    return [f"{key}={toml_value(value)}" for key, value in values.items()]


def train_shards(data: Path) -> str:
    shards = sorted((data / "train").glob("*.tar"))
    if not shards:
        raise SystemExit(f"no shards in {data / 'train'}: run `python benchmarks/openclipart.py build {data}` first")
    return str(data / "train" / f"{{{shards[0].stem}..{shards[-1].stem}}}.tar")


def _run(cmd: list[str], what: str) -> str:
    # OMP_WAIT_POLICY=PASSIVE unless set: sweeps share this machine with other work, and OpenMP threads that
    # busy-wait at every barrier slowed a clipa-small pretraining beside another run from 142 to 4 samples/s.
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({result.returncode}): {' '.join(cmd)}\n{result.stderr[-3000:]}")
    return result.stdout


def clipa_stage(command: str, values: dict, out: Path) -> dict:
    """Run `clipa pretrain|finetune` with these recipe values; returns the last metrics row and wall time."""
    base = "tiny/pretrain" if command == "pretrain" else "tiny/finetune"
    # tiny/pretrain masks 75% of the patches at 64 px since issue #33; the settings here name their image
    # reduction and expect the resize it had before (a setting's own values still win)
    pinned = ["reduction.image=\"resize\"", "reduction.mask_ratio=0.0"] if command == "pretrain" else []
    t0 = time.perf_counter()
    _run([sys.executable, "-m", "clipa", command, base, *pinned, *overrides(values), "--out", str(out)], f"clipa {command}")
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    return {"wall_s": wall, "final_loss": losses[-1], "first_loss": losses[0],
            "samples_per_s": statistics.median(r["samples_per_s"] for r in rows if "samples_per_s" in r)}


def evaluate(data: Path, model: str, image_size: int = 0) -> dict:
    """Zero-shot (28 classes) and retrieval (titles) on the held-out drawings."""
    with tempfile.TemporaryDirectory() as tmp:
        size = ["--image-size", str(image_size)] if image_size else []
        _run([sys.executable, "-m", "clipa", "zeroshot", "--model", model, "--dataset", "wds", "--data-root",
              str(data / "zeroshot"), "--output", f"{tmp}/zs.json", "--num-workers", "0", *size], "clipa zeroshot")
        _run([sys.executable, "-m", "clipa", "retrieval", "--model", model, "--dataset", "wds", "--data-root",
              str(data / "retrieval"), "--output", f"{tmp}/ret.json", "--num-workers", "0", *size], "clipa retrieval")
        zs = json.loads(Path(f"{tmp}/zs.json").read_text())["metrics"]
        ret = json.loads(Path(f"{tmp}/ret.json").read_text())["metrics"]
    return {"acc1": zs["acc1"], "acc5": zs["acc5"], "mean_per_class_recall": zs["mean_per_class_recall"],
            "i2t_r1": ret["text_retrieval_recall@1"], "i2t_r5": ret["text_retrieval_recall@5"],
            "t2i_r1": ret["image_retrieval_recall@1"], "t2i_r5": ret["image_retrieval_recall@5"]}


def train_flops(values: dict, samples: int) -> float:
    from clipa.cost.flops import train_flops_per_sample
    from clipa.model.build import arch_config, native_geometry

    cfg = arch_config(values["model.arch"])
    native = native_geometry(cfg)
    size = values.get("reduction.image_size") or native.image_size
    length = values.get("reduction.text_length") or native.context_length
    keep = 1.0 - values.get("reduction.mask_ratio", 0.0) if values.get("reduction.image") in ("random", "grid", "block") else 1.0
    return train_flops_per_sample(cfg, size, length, keep) * samples


def _kept_pretrain(workdir: Path, values: dict, seed: int) -> Path:
    """The run directory of a first stage that several finetunes share (`Setting.extra["share_pretrain"]`):
    named by its recipe values and seed, so equal first stages are trained once per seed."""
    digest = hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]
    return workdir / f"shared-pretrain-{digest}-{seed}"


def run_setting(data: Path, setting: Setting, seed: int, workdir: Path) -> dict:
    """Train one setting with one seed; evaluate after every stage; remove the run directories (a shared
    first stage is kept, with its evaluation in `stage.json`, for the next setting that starts from it)."""
    row = {"label": setting.label, "group": setting.group, "tool": setting.tool, "seed": seed,
           "notes": setting.notes, "stages": []}
    runs, stage_dirs = [], []
    try:
        stages = [("pretrain", setting.pretrain)] + ([("finetune", setting.finetune)] if setting.finetune else [])
        previous = None
        for command, values in stages:
            out = workdir / f"{setting.group}-{setting.label}-{seed}-{command}".replace(" ", "_").replace("/", "_")
            values = {"data.train": train_shards(data), "train.seed": seed, "checkpoint.every_steps": 0,
                      "eval.zeroshot": [], **values}
            if command == "pretrain" and setting.extra.get("share_pretrain"):
                out = _kept_pretrain(workdir, values, seed)
                if (out / "stage.json").is_file():
                    row["stages"].append(json.loads((out / "stage.json").read_text()))
                    previous = out
                    stage_dirs.append(out)
                    continue
            else:
                runs.append(out)
            shutil.rmtree(out, ignore_errors=True)
            if command == "finetune":
                values["init.checkpoint"] = str(previous)
            tool = setting.finetune_tool if command == "finetune" and setting.finetune_tool else setting.tool
            if tool == "open_clip":
                from openclipart_open_clip import run_open_clip
                stage = run_open_clip(values, out, optim_from_recipe=setting.extra.get("optim_from_recipe", False))
                model = stage.pop("model")
            else:
                stage = clipa_stage(command, values, out)
                model = str(out)
            stage.update(evaluate(data, model))
            stage.update({"stage": command, "train_flops": train_flops(values, values["train.total_samples"]),
                          "values": values})
            row["stages"].append(stage)
            if command == "pretrain" and setting.extra.get("share_pretrain"):
                (out / "stage.json").write_text(json.dumps(stage))
            previous = out
            stage_dirs.append(out)
        if setting.extra.get("average_with_start"):  # weight-space ensemble of the start and the finetune
            alpha = setting.extra["average_with_start"]
            averaged = workdir / f"{row['stages'][-1]['stage']}-averaged"
            runs.append(averaged)
            average_with_start(stage_dirs[-2], stage_dirs[-1], averaged, alpha)
            row["stages"].append({"stage": f"average {alpha:g}", "train_flops": 0.0, "wall_s": 0.0,
                                  "final_loss": row["stages"][-1]["final_loss"], **evaluate(data, str(averaged))})
    finally:
        for out in runs:
            shutil.rmtree(out, ignore_errors=True)
    return row


def average_with_start(pretrain_run: Path, finetune_run: Path, out: Path, alpha: float) -> None:
    """An open_clip directory holding (1 - alpha) * start + alpha * finetuned weights (WiSE-FT): the start
    is the first stage's final model with its position embeddings resized to the finetune's geometry,
    exactly as the finetune loaded it."""
    from safetensors.torch import load_file, save_file

    from clipa.model.build import create_model
    from clipa.model.weights import EXPORT_CONFIG, EXPORT_WEIGHTS, load_weights

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(finetune_run / "final", out)
    model = create_model(json.loads((out / EXPORT_CONFIG).read_text())["model_cfg"])
    load_weights(model, load_file(str(pretrain_run / "final" / EXPORT_WEIGHTS)))
    start, tuned = model.state_dict(), load_file(str(out / EXPORT_WEIGHTS))
    mixed = {k: ((1 - alpha) * start[k].float() + alpha * v.float()).to(v.dtype) if v.is_floating_point() else v
             for k, v in tuned.items()}
    save_file(mixed, str(out / EXPORT_WEIGHTS))


def select(settings: list[Setting], only: list[str], exclude: list[str]) -> list[Setting]:
    """The settings whose label contains one of `only` (all when empty) and none of `exclude`."""
    return [s for s in settings
            if (not only or any(o in s.label for o in only)) and not any(x in s.label for x in exclude)]


def sweep(data: Path, settings: list[Setting], seeds: int, results: Path, workdir: Path) -> None:
    done = {(r["group"], r["label"], r["seed"]) for r in read_results(results)}
    for seed in range(seeds):  # round-robin over settings, so a cut-short sweep has every setting at low seeds
        for setting in settings:
            if (setting.group, setting.label, seed) in done:
                continue
            t0 = time.perf_counter()
            row = run_setting(data, setting, seed, workdir)
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            last = row["stages"][-1]
            print(f"[{setting.group}] {setting.label} seed {seed}: acc1 {last['acc1']:.3f} acc5 {last['acc5']:.3f} "
                  f"t2i R@1 {last['t2i_r1']:.3f} loss {last['final_loss']:.3f} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)


def read_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{mean:.3f} ± {sd:.3f} [{min(values):.3f}, {max(values):.3f}]"


def table(rows: list[dict]) -> str:
    """Markdown: one line per (group, setting, stage); mean ± sd [min, max] over seeds."""
    lines = ["| group | setting | stage | seeds | zero-shot acc1 | mean per-class recall | acc5 | retrieval t2i R@1 | "
             "i2t R@1 | t2i R@5 | final loss | train TFLOPs | wall s |", "|" + "---|" * 13]
    keys = list(dict.fromkeys((r["group"], r["label"]) for r in rows))
    for g, label in keys:
        runs = [r for r in rows if (r["group"], r["label"]) == (g, label)]
        for i, stage in enumerate(runs[0]["stages"]):
            per = [r["stages"][i] for r in runs if len(r["stages"]) > i]
            flops = sum(r["stages"][j]["train_flops"] for j in range(i + 1) for r in runs[:1])
            wall = statistics.fmean(sum(s["wall_s"] for s in r["stages"][:i + 1]) for r in runs)
            lines.append(f"| {g} | {label} | {stage['stage']} | {len(per)} | "
                         + " | ".join(_spread([s[k] for s in per])
                                    for k in ("acc1", "mean_per_class_recall", "acc5", "t2i_r1", "i2t_r1", "t2i_r5"))
                         + f" | {statistics.fmean(s['final_loss'] for s in per):.3f} | {flops / 1e12:.1f} | {wall:.0f} |")
    return "\n".join(lines)


def differences(rows: list[dict], against: str, metrics=("mean_per_class_recall", "t2i_r5")) -> str:
    """Markdown: each setting's difference from the setting labelled `against` in its group, stage by
    stage: the difference of the means over seeds ± its standard error (sqrt(sd_a^2/n_a + sd_b^2/n_b)),
    so a difference can be read against the seed noise that both rows carry."""
    lines = ["| group | setting | stage | seeds | " + " | ".join(f"Δ {m}" for m in metrics) + " |",
             "|" + "---|" * (4 + len(metrics))]
    for g, label in dict.fromkeys((r["group"], r["label"]) for r in rows):
        base = [r for r in rows if (r["group"], r["label"]) == (g, against)]
        runs = [r for r in rows if (r["group"], r["label"]) == (g, label)]
        if label == against or not base:
            continue
        for i, stage in enumerate(runs[0]["stages"]):
            cells = []
            for metric in metrics:
                a = [r["stages"][i][metric] for r in runs if len(r["stages"]) > i]
                # a stage the baseline does not have (a weight average after the finetune) is set
                # against the baseline's finished model
                b = [r["stages"][min(i, len(r["stages"]) - 1)][metric] for r in base]
                se = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5 \
                    if min(len(a), len(b)) > 1 else float("nan")
                cells.append(f"{statistics.fmean(a) - statistics.fmean(b):+.3f} ± {se:.3f}")
            lines.append(f"| {g} | {label} | {stage['stage']} | {len(runs)} vs {len(base)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, metrics: tuple[str, ...] = ("mean_per_class_recall", "t2i_r5")):
    """Accuracy after every stage against cumulative training FLOPs (one panel per metric) and against
    wall time: each seed a faint dot, the mean over seeds with its standard deviation as a marker
    with error bars, the stages of a setting joined by a line (a CLIPA run is two points: its
    low-token stage, then the finetune). Both x axes are logarithmic when the points span more than
    4x (several budgets or model sizes in one plot). Returns the figure. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"mean_per_class_recall": "zero-shot mean per-class recall", "t2i_r5": "text→image R@5",
             "t2i_r1": "text→image R@1", "acc1": "zero-shot acc1"}
    panels = [(m, "train_flops") for m in metrics] + [(metrics[0], "wall_s")]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5))
    keys = list(dict.fromkeys((r["group"], r["label"]) for r in rows))
    markers = "osD^v<>"
    for ki, (group, label) in enumerate(keys):
        runs = [r for r in rows if (r["group"], r["label"]) == (group, label)]
        stages = min(len(r["stages"]) for r in runs)
        for ax, (metric, x_key) in zip(axes, panels):
            scale = 1e12 if x_key == "train_flops" else 1.0
            points = []
            for i in range(stages):
                xs = [sum(s[x_key] for s in r["stages"][:i + 1]) / scale for r in runs]
                ys = [r["stages"][i][metric] for r in runs]
                ax.scatter(xs, ys, color=f"C{ki}", alpha=0.3, s=12)
                sd = statistics.stdev(ys) if len(ys) > 1 else 0.0
                points.append((statistics.fmean(xs), statistics.fmean(ys), sd))
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], color=f"C{ki}",
                        marker=markers[ki % len(markers)], markersize=7, capsize=3,
                        label=f"{group}: {label} ({len(runs)} seeds)" if ax is axes[0] else None)
            ax.set_xlabel("training TFLOPs (analytic, cumulative over stages)" if x_key == "train_flops"
                          else "wall time, s (this 2-core CPU, shared: indicative only)")
            ax.set_ylabel(f"{names.get(metric, metric)} (held-out OpenClipart)")
            ax.grid(alpha=0.3)
    for ax in axes:
        xs = [x for line in ax.lines for x in line.get_xdata()]
        if min(xs) > 0 and max(xs) > 4 * min(xs):
            ax.set_xscale("log")
    fig.legend(loc="lower center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0.08 + 0.035 * ((len(keys) + 1) // 2), 1, 1))
    fig.savefig(path, dpi=100)
    return fig


def batch_mixing(data: Path, settings: dict[str, dict], batch: int = 256, batches: int = 29) -> str:
    """Markdown: how far each loader setting mixes the shards, which are in category order (`build`
    writes drawings sorted by path): over the first epoch's batches, the share of a batch's negative
    pairs whose two drawings share a category folder (level two, as the zero-shot classes), against
    that share for a uniformly shuffled epoch. A contrastive batch whose negatives share the positive's
    category teaches little about telling categories apart. clipa's own sample stream (one loader
    stream, data.num_workers = 1 as in the sweeps; a batch is that many consecutive samples of it),
    without decoding a pixel; each sample is mapped to its drawing by shard and key."""
    import collections
    import tarfile

    from clipa.data.loader import build_source
    from clipa.data.sources import SkipStats
    from clipa.data.streams import StreamingTrainStream, _Mode
    from clipa.recipe.load import load_recipe

    category = {}
    for shard in sorted((data / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    category[(shard.name, member.name[:-5])] = "/".join(meta["category"].split("/")[:2])

    def same_share(labels: list[str]) -> float:
        n = len(labels)
        return sum(c * (c - 1) for c in collections.Counter(labels).values()) / (n * (n - 1))

    uniform = same_share(list(category.values()))  # two drawings of a uniformly shuffled epoch
    lines = [f"| loader setting | same-category pairs per batch: mean [min, max] (uniform: {uniform:.3f}) | "
             "identical-caption pairs per batch: mean [max] |", "|---|---|---|"]
    for label, values in settings.items():
        recipe = load_recipe(None, overrides({"data.train": train_shards(data), **values}))
        stream = StreamingTrainStream(build_source(recipe), None, None, micro_batch=batch, seed=recipe.train.seed,
                                      shuffle_buffer=recipe.data.shuffle_buffer, interleave=recipe.data.interleave)
        records = stream.records(0, SkipStats(), _Mode())
        shares, twins = [], []
        for _ in range(batches):
            batch_records = [next(records) for _ in range(batch)]
            shares.append(same_share([category[(Path(r.where).name, r.key)] for r in batch_records]))
            twins.append(sum(c * (c - 1) // 2 for c in collections.Counter(r.caption.strip() for r in batch_records).values()))
        lines.append(f"| {label} | {statistics.fmean(shares):.3f} [{min(shares):.3f}, {max(shares):.3f}] | "
                     f"{statistics.fmean(twins):.0f} [{max(twins)}] |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The experiments

def tiny_recipe(arch: str, samples: int, batch: int, image_size: int = 0, text_length: int = 0) -> dict:
    """The shipped tiny pretrain recipe's settings before this benchmark (0 = native geometry)."""
    return {"model.arch": arch, "reduction.image": "resize", "reduction.image_size": image_size,
            "reduction.text": "truncate", "reduction.text_length": text_length, "data.augment.scale": [0.6, 1.0], "optim.lr": 2e-3, "optim.warmup_steps": 50,
            "optim.weight_decay": 0.1, "optim.betas": [0.9, 0.95], "optim.eps": 1e-6,
            "train.global_batch_size": batch, "train.total_samples": samples, "data.num_workers": 1,
            "train.log_every_steps": 10}


def defaults_settings(arch: str, samples: int, batch: int) -> list[Setting]:
    """At the tiny pretrain recipe's geometry (32 px, 8 tokens), where CLIPA spends its compute."""
    base = tiny_recipe(arch, samples, batch, image_size=32, text_length=8)
    chosen_crop = {"data.augment.scale": [0.9, 1.0]}
    # One setting changed at a time, on the tiny recipe as it was (the first, old-loader sweep ran
    # the first four) and again on top of the chosen crop, which is what clipa ships now (compare
    # with the "crop 0.9-1.0" row; docs/openclipart.md has both tables).
    one_change = {
        "betas 0.9/0.98": {"optim.betas": [0.9, 0.98]},
        "eps 1e-8": {"optim.eps": 1e-8},
        "lr 1e-3": {"optim.lr": 1e-3},
        "weight decay 0.2": {"optim.weight_decay": 0.2},
        "lr 4e-3": {"optim.lr": 4e-3},
        "lr 5e-4": {"optim.lr": 5e-4},  # for clipa-small, which trains worse than tiny at 2e-3
        "warmup 10": {"optim.warmup_steps": 10},
        "betas 0.9/0.999": {"optim.betas": [0.9, 0.999]},
        "temperature clamp 50": {"train.logit_scale_max": 50.0},
        "text 16 tokens": {"reduction.text_length": 16},
    }
    on_chosen_crop_only = {
        "aspect 1:1 (no aspect jitter)": {"data.augment.ratio": [1.0, 1.0]},
        "aspect 1:2-2:1": {"data.augment.ratio": [0.5, 2.0]},
        "bilinear": {"data.augment.interpolation": "bilinear"},
        "flip 0.5": {"data.augment.hflip_prob": 0.5},
        # at this budget the learned temperature hardly moves from where it starts (14.3 -> 14.0),
        # so its initial value is a setting in its own right and the clamp at 100 is never reached
        "temperature init 30": {"model.logit_scale_init": 30.0},
        "temperature init 7": {"model.logit_scale_init": 7.0},
        # SimCLR's strength; one augmentation, so its two keys count as one change
        "colour jitter 0.4/0.4/0.4/0.1 (p 0.8)": {"data.augment.color_jitter": [0.4, 0.4, 0.4, 0.1],
                                                   "data.augment.color_jitter_prob": 0.8},
    }
    changes = {  # in the order they run (round-robin over seeds: a cut-short sweep has the first ones)
        "shipped tiny recipe": {},
        "crop 0.9-1.0 (open_clip_train)": chosen_crop,
        "crop 0.4-1.0 (CLIPA)": {"data.augment.scale": [0.4, 1.0]},
        **one_change,
        **{f"crop 0.9-1.0, {name}": {**chosen_crop, **change}
           for name, change in {**on_chosen_crop_only, **one_change}.items()},
    }
    return [Setting(name, {**base, **change}, group=f"defaults {arch}") for name, change in changes.items()]


# Chosen on this benchmark (docs/openclipart.md): the training defaults of the tiny recipes
# (crop 0.9-1.0 replaced the synthetic-tuned 0.6-1.0; the rest measured no better or worse).
CLIPA_TINY_DEFAULTS = {"data.augment.scale": [0.9, 1.0], "optim.betas": [0.9, 0.95], "optim.eps": 1e-6,
                       "optim.weight_decay": 0.1, "optim.lr": 2e-3, "optim.warmup_steps": 50}


def claim_settings(arch: str, samples: int, batch: int, lr: float = 0.0) -> list[Setting]:
    """At the training FLOPs of `samples` at full tokens: full tokens, and CLIPA's two stages.

    CLIPA pretrains at half resolution (a quarter of the image tokens) with 8-token captions, then
    finetunes at full length for the FLOPs of 20% of the full-token samples (CLIPA-v2 spends
    4-5% on finetuning at its scale; a tiny budget needs a larger share to adapt to the new patch
    scale), optionally dropping 30% of the patches while it finetunes as CLIPA-v2 does."""
    from clipa.model.build import arch_config, native_geometry

    base = {**tiny_recipe(arch, samples, batch), **CLIPA_TINY_DEFAULTS}
    base["optim.warmup_steps"] = min(base["optim.warmup_steps"], samples // batch // 5)  # short budgets
    if lr:  # another size's own LR (every stage scales with it); the group says so
        base["optim.lr"] = lr
    native = native_geometry(arch_config(arch))
    low = {"reduction.image_size": native.image_size // 2, "reduction.text_length": 8}
    full_flops = train_flops(base, samples)
    group = f"claim {arch} {samples // 1000}k" + (f" lr {lr:g}" if lr else "")

    def clipa(text: str, mask: float, share: float = 0.2, lr_div: float = 4) -> tuple[dict, dict]:
        finetune = {**base, "optim.lr": base["optim.lr"] / lr_div, "optim.warmup_steps": 2}
        # the tiny finetune recipe masks 30%; the unmasked variant says so explicitly
        finetune.update({"reduction.image": "random", "reduction.mask_ratio": mask} if mask else
                        {"reduction.image": "resize", "reduction.mask_ratio": 0.0})
        ft_samples = int(share * full_flops / train_flops(finetune, 1)) // batch * batch
        finetune["train.total_samples"] = ft_samples
        pretrain = {**base, **low, "reduction.text": text}
        pt_samples = int((full_flops - train_flops(finetune, ft_samples)) / train_flops(pretrain, 1)) // batch * batch
        pretrain["train.total_samples"] = pt_samples
        pretrain["optim.warmup_steps"] = min(CLIPA_TINY_DEFAULTS["optim.warmup_steps"], pt_samples // batch // 5)
        return pretrain, finetune

    return [
        Setting("full tokens", base, group=group),
        Setting("CLIPA: 1/2 res + 8 tok truncate, then full", *clipa("truncate", 0.0), group=group),
        Setting("CLIPA: 1/2 res + 8 tok truncate, then full with 30% masked", *clipa("truncate", 0.3), group=group),
        Setting("CLIPA: 1/2 res + 8 tok syntax, then full", *clipa("syntax", 0.0), group=group),
        # the finetune recipe: how much of the budget, at what LR (run with --only "finetune")
        Setting("CLIPA truncate, finetune 10% of FLOPs", *clipa("truncate", 0.0, share=0.1), group=group),
        Setting("CLIPA truncate, finetune 35% of FLOPs", *clipa("truncate", 0.0, share=0.35), group=group),
        Setting("CLIPA truncate, finetune at the pretrain LR", *clipa("truncate", 0.0, lr_div=1), group=group),
    ]


def handover_settings(arch: str, samples: int, batch: int, lr: float = 0.0) -> list[Setting]:
    """The finetune that keeps the gain (issue #33): CLIPA's two stages at `samples`' full-token FLOPs,
    every variant finetuning from the same low-resolution stage (trained once per seed) unless it
    changes the split of the budget. One thing changed at a time against the claim's 20% finetune
    at lr / 4 with 2 warmup steps."""
    claim = {s.label: s for s in claim_settings(arch, samples, batch, lr)}
    pretrain, finetune = claim["CLIPA: 1/2 res + 8 tok truncate, then full"].pretrain, \
        claim["CLIPA: 1/2 res + 8 tok truncate, then full"].finetune
    group = f"handover {arch} {samples // 1000}k" + (f" lr {lr:g}" if lr else "")
    peak = pretrain["optim.lr"]
    steps = finetune["train.total_samples"] // batch
    variants = {  # in the order they run
        "lr / 4, warmup 2 (the claim's finetune)": {},
        "lr / 10": {"optim.lr": peak / 10},
        "lr / 40 (CLIPA's published ratio)": {"optim.lr": peak / 40},
        "lr / 4, warmup a third of the steps": {"optim.warmup_steps": steps // 3},
        "text stays 8 tokens": {"reduction.text_length": 8},
        "lr / 4, then average 0.5 with the start": {},
        "optimizer state carried, lr / 4, no warmup": {"init.optimizer_state": True, "optim.warmup_steps": 0},
        "optimizer state carried, lr / 10, no warmup": {"init.optimizer_state": True, "optim.lr": peak / 10,
                                                          "optim.warmup_steps": 0},
        "optimizer state carried, lr / 4, warmup 2": {"init.optimizer_state": True},
        # longer finetunes from the same first stage (more FLOPs than the claim's split: a length study)
        "lr / 4, warmup a third, 2x the finetune steps": {"optim.warmup_steps": 2 * steps // 3,
                                                           "train.total_samples": 2 * steps * batch},
        "lr / 4, warmup a third, 4x the finetune steps": {"optim.warmup_steps": 4 * steps // 3,
                                                           "train.total_samples": 4 * steps * batch},
    }
    # the same 4x finetune inside the claim's budget: the first stage gives up the FLOPs it costs
    extra_flops = train_flops(finetune, 3 * steps * batch)
    shortened = {**pretrain, "train.total_samples": int(pretrain["train.total_samples"] - extra_flops
                                                        / train_flops(pretrain, 1)) // batch * batch}
    shortened["optim.warmup_steps"] = min(pretrain["optim.warmup_steps"], shortened["train.total_samples"] // batch // 5)
    longer = {**finetune, **variants["lr / 4, warmup a third, 4x the finetune steps"]}
    settings = [Setting(label, pretrain, {**finetune, **change}, group=group,
                        extra={"share_pretrain": True, **({"average_with_start": 0.5} if "average" in label else {})})
                for label, change in variants.items()]
    # The first stage at the full 64 px with 75% of the patches dropped (the same 16 image tokens as 32 px):
    # the patch scale then does not change at the handover, which is what the 32 px stage's finetune
    # spends its steps on. Its samples fill the same FLOPs as the 32 px stage's.
    masked = {**pretrain, "reduction.image": "random", "reduction.image_size": 0, "reduction.mask_ratio": 0.75}
    masked["train.total_samples"] = int(train_flops(pretrain, pretrain["train.total_samples"])
                                        / train_flops(masked, 1)) // batch * batch
    return settings + [Setting("4x the finetune steps, first stage shortened to the same FLOPs", shortened, longer,
                               group=group, extra={"share_pretrain": True}),
                       Setting("full tokens", claim["full tokens"].pretrain, group=group),
                       Setting("first stage 64 px with 75% masked, then the claim's finetune", masked, finetune,
                               group=group, extra={"share_pretrain": True}),
                       Setting("first stage 64 px with 75% masked, then 4x the finetune steps", masked, longer,
                               group=group, extra={"share_pretrain": True}),
                       # with no change of patch scale, what is left of the handover: the text's 8 -> 32 tokens
                       # and the finetune's learning rate
                       Setting("first stage 64 px with 75% masked, then lr / 10", masked,
                               {**finetune, "optim.lr": peak / 10}, group=group, extra={"share_pretrain": True}),
                       Setting("first stage 64 px with 75% masked, then text stays 8 tokens", masked,
                               {**finetune, "reduction.text_length": 8}, group=group,
                               extra={"share_pretrain": True})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write shards and held-out evaluations from the installed packages")
    b.add_argument("data")
    b.add_argument("--image-size", type=int, default=128)
    b.add_argument("--shard-size", type=int, default=1000)
    b.add_argument("--package-root", default=str(openclipart_data.OPENCLIPART),
                   help="where the packages put the drawings (png/ and svg/)")
    for name in ("defaults", "vs-open-clip", "claim", "handover"):
        p = sub.add_parser(name)
        p.add_argument("data")
        p.add_argument("--arch", action="append")
        p.add_argument("--seeds", type=int, default=3)
        p.add_argument("--samples", type=int, default=0, help="training samples (default depends on the command)")
        p.add_argument("--batch", type=int, default=256)
        p.add_argument("--only", action="append", help="run only settings whose label contains this")
        p.add_argument("--exclude", action="append", help="skip settings whose label contains this")
        p.add_argument("--results", default="")
        p.add_argument("--workdir", default="")
        if name in ("claim", "handover"):
            p.add_argument("--budget", type=float, action="append",
                           help="compute budgets as multiples of --samples at full tokens (repeatable; default 1)")
            p.add_argument("--lr", type=float, default=0.0,
                           help="peak LR instead of the tiny recipe's 2e-3 (finetunes at a quarter of it)")
    m = sub.add_parser("mixing", help="same-category and identical-caption pairs per batch under clipa's loader "
                                      "settings (no training)")
    m.add_argument("data")
    t = sub.add_parser("table")
    t.add_argument("results")
    t.add_argument("--group", default="")
    t.add_argument("--plot", default="", help="also plot accuracy against FLOPs and wall time (PNG; needs matplotlib)")
    t.add_argument("--against", default="", help="also print every setting's difference from this one (± its se)")
    args = parser.parse_args()

    if args.command == "build":
        try:
            summary = openclipart_data.build(Path(args.data), args.image_size, args.shard_size, Path(args.package_root))
        except openclipart_data.MissingPackages as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2)
        chance = summary["chance"]
        print(f"{summary['train']} training drawings, {summary['held_out']} held out; zero-shot: "
              f"{summary['zeroshot_images']} images in {len(summary['zeroshot_classes'])} classes (chance acc1 "
              f"{chance['zeroshot_acc1']:.3f}, acc5 {chance['zeroshot_acc5']:.3f}, majority class "
              f"{chance['zeroshot_acc1_majority']:.3f}); retrieval: {summary['retrieval_pairs']} pairs (chance R@1 "
              f"{chance['retrieval_recall@1']:.4f}, R@5 {chance['retrieval_recall@5']:.4f}); "
              f"{len(summary['skipped'])} PNGs skipped (over 20 megapixels or unreadable)")
        return
    if args.command == "mixing":
        print(batch_mixing(Path(args.data), {
            "one shard at a time, 2,000-sample buffer (clipa's old defaults)": {"data.interleave": 1},
            "one shard at a time, 5,000-sample buffer (as open_clip_train)": {"data.interleave": 1,
                                                                               "data.shuffle_buffer": 5000},
            "one shard at a time, 8,000-sample buffer (a full shuffle)": {"data.interleave": 1,
                                                                          "data.shuffle_buffer": 8000},
            "4 shards interleaved, 2,000-sample buffer": {"data.interleave": 4, "data.shuffle_buffer": 2000},
            "8 shards interleaved, 2,000-sample buffer": {"data.interleave": 8, "data.shuffle_buffer": 2000},
            "8 shards interleaved, 5,000-sample buffer": {"data.interleave": 8, "data.shuffle_buffer": 5000}}))
        return
    if args.command == "table":
        rows = [r for r in read_results(Path(args.results)) if not args.group or r["group"].startswith(args.group)]
        print(table(rows))
        if args.against:
            print("\n" + differences(rows, args.against))
        if args.plot:
            plot(rows, Path(args.plot))
        return

    data = Path(args.data)
    results = Path(args.results or data / "results.jsonl")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="clipa-openclipart-"))
    workdir.mkdir(parents=True, exist_ok=True)
    settings: list[Setting] = []
    for arch in args.arch or ["clipa-tiny"]:
        if args.command == "defaults":
            settings += defaults_settings(arch, args.samples or 30_000, args.batch)
        elif args.command == "vs-open-clip":
            from openclipart_open_clip import vs_open_clip_settings, vs_open_clip_two_stage_settings
            settings += vs_open_clip_settings(arch, args.samples or 30_000, args.batch)
            settings += vs_open_clip_two_stage_settings(arch, args.samples or 30_000, args.batch)
        else:
            make = handover_settings if args.command == "handover" else claim_settings
            for budget in args.budget or [1.0]:
                settings += make(arch, int((args.samples or 30_000) * budget), args.batch, args.lr)
    settings = select(settings, args.only or [], args.exclude or [])
    sweep(data, settings, args.seeds, results, workdir)
    print(table([r for r in read_results(results) if r["group"] in {s.group for s in settings}]))


if __name__ == "__main__":
    main()
