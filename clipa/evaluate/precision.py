"""Evaluation precision, as CLIP_benchmark offers it: fp32, or autocast in bf16, fp16 or `amp` (autocast's own
type for the device: fp16 on a GPU, bf16 on a CPU). Default: amp on a GPU, fp32 on a CPU."""

from __future__ import annotations

import contextlib

import torch

from clipa.errors import check_one_of

EVAL_PRECISIONS = ("fp32", "bf16", "fp16", "amp")


def default_precision(device: torch.device | str) -> str:
    return "amp" if torch.device(device).type == "cuda" else "fp32"


def autocast(precision: str | None, device: torch.device | str):
    """A context to evaluate in: `with autocast("bf16", "cpu"): zeroshot(...)`; None = the default for `device`."""
    device = torch.device(device)
    precision = precision or default_precision(device)
    check_one_of(precision, EVAL_PRECISIONS, "precision", key="--precision")
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)  # amp: None, autocast's own choice
    return torch.autocast(device.type, dtype=dtype)
