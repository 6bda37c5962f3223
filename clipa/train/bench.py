"""`clipa bench`: measured training throughput of token-reduction settings on this machine.

Each setting runs clipa's own training step (ContrastiveStep: forward, InfoNCE, backward) on a
fixed batch, with masks drawn exactly as the data loader draws them. The AdamW update is run but
not timed: its cost is per step, not per token, and at real batch sizes (tens of thousands of
samples per step) it vanishes, while at the few samples per step a CPU can afford it would
dominate. Reported per setting:

  FLOPs/sample    analytic training FLOPs (clipa.cost.flops, the counter `clipa plan` will use)
  speedup         measured samples/s relative to the full-token setting
  FLOP ratio      full-token FLOPs / setting FLOPs (the speedup a perfect implementation gets)
  efficiency      speedup / FLOP ratio (1.0 = every dropped token saved its full cost)
  text select     time to reduce one batch's captions with the setting's text strategy, as a
                  fraction of the step (it runs in the loader workers, off the step's path)

Each setting's steps alternate with steps of the full-token setting (kept in memory), and its
speedup is the median of the paired ratios: on a shared machine, where throughput drifts by tens
of percent over minutes, only measurements taken side by side compare. With `repeats` > 1 the
whole list is measured again, round-robin, and medians over repeats are reported.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator

from clipa.cost.flops import image_tokens, train_flops_per_sample
from clipa.data.synthetic import train_sample
from clipa.model.build import Geometry, arch_config, build_tokenizer, create_model, native_geometry, stage_config
from clipa.model.masking import install_patch_masker
from clipa.recipe.schema import OptimConfig
from clipa.reduction.image import patch_keep_indices
from clipa.reduction.text import TextReducer
from clipa.train.loss import infonce_loss
from clipa.train.optim import build_optimizer
from clipa.train.step import ContrastiveStep


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


class SettingRunner:
    """One setting's model, optimizer and fixed batch (captions reduced and masks drawn exactly as the
    data loader does); `step()` times one training step's forward + backward."""

    def __init__(self, arch: str, setting: Setting, batch: int):
        self.arch, self.setting, self.batch = arch, setting, batch
        geometry = Geometry(setting.image_size, setting.text_length)
        self.cfg = cfg = stage_config(arch, geometry)
        torch.manual_seed(0)
        model = create_model(cfg)
        masker = install_patch_masker(model, setting.image, setting.mask_ratio)
        model.train()
        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        optimizer = build_optimizer(model, OptimConfig())
        model, self.optimizer = accelerator.prepare(model, optimizer)
        self.contrastive_step = ContrastiveStep(model, accelerator.unwrap_model(model), infonce_loss, accelerator,
                                                masker)

        reducer = TextReducer(build_tokenizer(arch, setting.text_length), setting.text, setting.text_length)
        captions = _captions(2 * batch)
        reducer(captions[batch:])  # warm-up: loads the POS lexicon once, as each loader worker does
        rngs = [np.random.default_rng(i) for i in range(batch)]
        t0 = time.perf_counter()
        texts = reducer(captions[:batch], rngs=rngs)
        self.text_select_s = time.perf_counter() - t0
        images = torch.randn(batch, 3, setting.image_size, setting.image_size)
        keep = None
        if masker is not None:
            # The masker's own grid: an open_clip ViT's or a timm ViT's.
            keep = torch.from_numpy(np.stack([patch_keep_indices(setting.image, masker.grid, setting.mask_ratio, r)
                                              for r in rngs]))
        self.micro_batches = [(images.to(accelerator.device), texts.to(accelerator.device), keep)]

    def step(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.contrastive_step(self.micro_batches)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        self.optimizer.step()  # not timed: see the module docstring
        self.optimizer.zero_grad(set_to_none=True)
        return seconds

    def row(self, step_s: float) -> dict:
        s, keep_ratio = self.setting, 1.0 - self.setting.mask_ratio
        return {
            "arch": self.arch, "setting": s.label, "image_size": s.image_size, "text_length": s.text_length,
            "image_tokens": image_tokens(self.cfg, s.image_size, keep_ratio), "text_tokens": s.text_length,
            "flops_per_sample": train_flops_per_sample(self.cfg, s.image_size, s.text_length, keep_ratio),
            "samples_per_s": self.batch / step_s, "step_s": step_s, "text_select_frac": self.text_select_s / step_s,
        }


def paired_speedup(full: SettingRunner, other: SettingRunner, steps: int) -> tuple[float, float, list[float]]:
    """Alternate full-token and reduced steps after one warm-up step each: each reduced step is
    compared with the full step right before it, so a shared machine's slow drifts cancel.
    Returns (median full step s, median reduced step s, the paired speedups)."""
    full.step()
    other.step()
    full_times, other_times = [], []
    for _ in range(steps):
        full_times.append(full.step())
        other_times.append(other.step())
    speedups = [f / o for f, o in zip(full_times, other_times)]
    return statistics.median(full_times), statistics.median(other_times), speedups


def run_bench(archs: list[str], batch: int, steps: int, repeats: int = 1, progress=lambda row: None) -> list[dict]:
    """Every setting against the full-token setting in `steps` alternating pairs; with `repeats` > 1
    the list is measured again, round-robin, and medians over repeats are reported (with the spread
    of the efficiency)."""
    rows = []
    for arch in archs:
        torch.set_flush_denormal(True)
        settings = default_settings(arch)
        full = SettingRunner(arch, settings[0], batch)
        full_times, measured = [], [[] for _ in settings[1:]]
        for _ in range(repeats):
            for i, setting in enumerate(settings[1:]):
                runner = SettingRunner(arch, setting, batch)  # one reduced model in memory at a time
                full_s, step_s, speedups = paired_speedup(full, runner, steps)
                full_times.append(full_s)
                row = runner.row(step_s)
                row["speedup"] = statistics.median(speedups)
                measured[i].append(row)
                progress(row)
        full_row = full.row(statistics.median(full_times))
        full_row.update(speedup=1.0, flop_ratio=1.0, efficiency=1.0, efficiency_range=[1.0, 1.0], repeats=repeats)
        rows.append(full_row)
        for runs in measured:
            row = dict(runs[0])
            row["repeats"] = len(runs)
            for key in ("samples_per_s", "step_s", "text_select_frac", "speedup"):
                row[key] = statistics.median(r[key] for r in runs)
            row["flop_ratio"] = full_row["flops_per_sample"] / row["flops_per_sample"]
            efficiencies = [r["speedup"] / row["flop_ratio"] for r in runs]
            row["efficiency"] = statistics.median(efficiencies)
            row["efficiency_range"] = [min(efficiencies), max(efficiencies)]
            rows.append(row)
    return rows
