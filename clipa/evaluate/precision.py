"""Evaluation precision, as CLIP_benchmark offers it: fp32, or autocast in bf16, fp16 or `amp` (autocast's own
type for the device: fp16 on a GPU, bf16 on a CPU). Default: amp on a GPU, fp32 on a CPU.

torch is imported inside the functions: the CLI checks the name before anything slow is imported."""

from __future__ import annotations

import contextlib

from clipa.errors import check_one_of

EVAL_PRECISIONS = ("fp32", "bf16", "fp16", "amp")


def resolve(precision: str | None, device) -> str:
    """`precision`, checked, or the default for `device` (a torch.device or its name) when None."""
    if precision is None:
        import torch

        return "amp" if torch.device(device).type == "cuda" else "fp32"
    check_one_of(precision, EVAL_PRECISIONS, "precision", key="--precision")
    return precision


def autocast(precision: str | None, device):
    """A context to evaluate in: `with autocast("bf16", "cpu"): zeroshot(...)`; None = the default for `device`."""
    import torch

    device = torch.device(device)
    precision = resolve(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)  # amp: None, autocast's own choice
    return torch.autocast(device.type, dtype=dtype)
