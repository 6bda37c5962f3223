"""`clipa bench`: measured training throughput of token-reduction settings on this machine.

Each setting runs clipa's own training step (ContrastiveStep: forward, InfoNCE, backward) on a
fixed batch, with masks drawn exactly as the data loader draws them. The AdamW update is run but
not timed: its cost is per step, not per token, and at real batch sizes (tens of thousands of
samples per step) it vanishes, while at the few samples per step a CPU can afford it would
dominate. Reported per setting:

  FLOPs/sample    analytic training FLOPs (clipa.flops, the counter `clipa plan` will use)
  speedup         measured samples/s relative to the full-token setting
  FLOP ratio      full-token FLOPs / setting FLOPs (the speedup a perfect implementation gets)
  efficiency      speedup / FLOP ratio (1.0 = every dropped token saved its full cost)
  text select     time to reduce one batch's captions with the setting's text strategy, as a
                  fraction of the step (it runs in the loader workers, off the step's path)

Timings use the median of the measured steps after warm-up; ratios come from one run, so
machine noise that hits every setting alike cancels out. With `repeats` > 1 the whole list of
settings is measured again, round-robin, and the median over repeats is reported.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator

from clipa.data.synthetic import train_sample
from clipa.flops import image_tokens, train_flops_per_sample
from clipa.loss import infonce_loss
from clipa.model import Geometry, arch_config, build_tokenizer, create_model, native_geometry, stage_config
from clipa.optim import build_optimizer
from clipa.recipe import OptimConfig
from clipa.reduction import TextReducer, image_grid, install_patch_masker, patch_keep_indices
from clipa.step import ContrastiveStep


@dataclass(frozen=True)
class Setting:
    label: str
    image_size: int
    text_length: int
    image: str = "resize"
    mask_ratio: float = 0.0
    text: str = "truncate"


def _round_to_patch(size: float, patch: int) -> int:
    return max(patch, int(round(size / patch)) * patch)


def default_settings(arch: str) -> list[Setting]:
    cfg = arch_config(arch)
    native = native_geometry(cfg)
    patch = cfg["vision_cfg"]["patch_size"]
    full_img, full_txt = native.image_size, native.context_length
    sizes = sorted({_round_to_patch(full_img * f, patch) for f in (1 / 2, 3 / 8, 2 / 7)}, reverse=True)
    texts = [t for t in (32, 16, 8) if t < full_txt]
    half = sizes[0]
    settings = [Setting(f"full {full_img}px / {full_txt} tok", full_img, full_txt, image="none")]
    settings += [Setting(f"resize {s}px", s, full_txt) for s in sizes]
    settings += [Setting(f"{m} mask {r:g}", full_img, full_txt, image=m, mask_ratio=r)
                 for m, r in (("random", 0.5), ("random", 0.75), ("grid", 0.75), ("block", 0.5))]
    settings += [Setting(f"text {t} truncate", full_img, t) for t in texts]
    short = texts[1] if len(texts) > 1 else texts[0]
    settings += [Setting(f"text {short} {s}", full_img, short, text=s) for s in ("random", "block", "syntax")]
    settings += [Setting(f"resize {half}px + text {texts[0]}", half, texts[0])]
    return settings


def _captions(n: int) -> list[str]:
    # Long, real-looking captions so every text strategy actually has to cut.
    base = [train_sample(0, i)[1] for i in range(n)]
    return [f"{c}, in a photo taken outdoors on a sunny day with many other objects around it" for c in base]


def measure(arch: str, setting: Setting, batch: int, steps: int, warmup: int = 1) -> dict:
    geometry = Geometry(setting.image_size, setting.text_length)
    cfg = stage_config(arch, geometry)
    torch.manual_seed(0)
    model = create_model(cfg)
    masker = install_patch_masker(model, setting.image, setting.mask_ratio)
    model.train()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    optimizer = build_optimizer(model, OptimConfig())
    model, optimizer = accelerator.prepare(model, optimizer)
    step = ContrastiveStep(model, accelerator.unwrap_model(model), infonce_loss, accelerator, masker)

    reducer = TextReducer(build_tokenizer(arch, setting.text_length), setting.text, setting.text_length)
    captions = _captions(2 * batch)
    reducer(captions[batch:])  # warm-up: loads the POS lexicon once, as each loader worker does
    captions = captions[:batch]
    rngs = [np.random.default_rng(i) for i in range(batch)]
    t0 = time.perf_counter()
    texts = reducer(captions, rngs=rngs)
    text_select_s = time.perf_counter() - t0
    images = torch.randn(batch, 3, setting.image_size, setting.image_size)
    keep = None
    if masker is not None:
        grid = image_grid(cfg, setting.image_size)
        keep = torch.from_numpy(np.stack([patch_keep_indices(setting.image, grid, setting.mask_ratio, r) for r in rngs]))
    micro_batches = [(images.to(accelerator.device), texts.to(accelerator.device), keep)]

    times = []
    for i in range(warmup + steps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(micro_batches)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step_s = statistics.median(times)
    keep_ratio = 1.0 - setting.mask_ratio
    return {
        "arch": arch, "setting": setting.label, "image_size": setting.image_size, "text_length": setting.text_length,
        "image_tokens": image_tokens(cfg, setting.image_size, keep_ratio), "text_tokens": setting.text_length,
        "flops_per_sample": train_flops_per_sample(cfg, setting.image_size, setting.text_length, keep_ratio),
        "samples_per_s": batch / step_s, "step_s": step_s, "text_select_frac": text_select_s / step_s,
    }


def run_bench(archs: list[str], batch: int, steps: int, repeats: int = 1, progress=lambda row: None) -> list[dict]:
    """Measure every setting `repeats` times, round-robin, so slow drifts of a shared machine hit all
    settings alike; each repeat's speedups are taken against that repeat's full-token step, and the
    median over repeats is reported (with the spread of the efficiency)."""
    rows = []
    for arch in archs:
        torch.set_flush_denormal(True)
        settings = default_settings(arch)
        runs = [[] for _ in settings]
        for _ in range(repeats):
            for i, setting in enumerate(settings):
                row = measure(arch, setting, batch, steps)
                row["speedup"] = row["samples_per_s"] / (runs[0][-1] if i else row)["samples_per_s"]
                runs[i].append(row)
                progress(row)
        for measured in runs:
            row = dict(measured[0])
            row["repeats"] = len(measured)
            row["samples_per_s"] = statistics.median(r["samples_per_s"] for r in measured)
            row["step_s"] = statistics.median(r["step_s"] for r in measured)
            row["text_select_frac"] = statistics.median(r["text_select_frac"] for r in measured)
            row["speedup"] = statistics.median(r["speedup"] for r in measured)
            row["flop_ratio"] = runs[0][0]["flops_per_sample"] / row["flops_per_sample"]
            efficiencies = [r["speedup"] / row["flop_ratio"] for r in measured]
            row["efficiency"] = statistics.median(efficiencies)
            row["efficiency_range"] = [min(efficiencies), max(efficiencies)]
            rows.append(row)
    return rows
