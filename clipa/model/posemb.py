"""Fixed 2-D sin-cos image position embeddings, as CLIPA-v2 trains them.

CLIPA-v2 (JAX, big_vision's `posemb_sincos_2d`) uses omega_i = 10000^(-i / (D/4 - 1)) for
i < D/4 and the layout [sin x, cos x, sin y, cos y] (x = column, y = row), with zeros for the class
token; the embedding is not trained and is recomputed for every grid, so a stage at another
resolution gets the exact grid instead of an interpolated one. open_clip's `sin_cos_2d` is MAE's
formula (denominator D/4, rows and columns swapped), so clipa writes its own values into open_clip's
frozen `positional_embedding`; exports say `pos_embed_type = "sin_cos_2d"` and carry the values,
so plain open_clip loads them unchanged.
"""

from __future__ import annotations

import torch

SINCOS_MARK = "clipa_sincos2d"  # set on a vision tower whose position embedding is the fixed grid


def sincos_2d(grid: int, width: int, temperature: float = 10_000.0) -> torch.Tensor:
    """(1 + grid*grid, width): zeros for the class token, then the patches row by row."""
    if width % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs a width divisible by 4, got {width}")
    quarter = width // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / max(quarter - 1, 1))
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                          indexing="ij")
    x = x.flatten()[:, None] * omega[None]
    y = y.flatten()[:, None] * omega[None]
    patches = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)
    return torch.cat([torch.zeros(1, width, dtype=torch.float64), patches]).float()


def uses_sincos(model: torch.nn.Module) -> bool:
    return getattr(getattr(model, "visual", None), SINCOS_MARK, False)


def set_sincos(model: torch.nn.Module) -> None:
    """Mark the model's open_clip ViT as fixed sin-cos and write the grid for its own resolution."""
    visual = model.visual
    setattr(visual, SINCOS_MARK, True)
    refresh_sincos(model)


def refresh_sincos(model: torch.nn.Module) -> None:
    """Recompute the fixed grid (after weights from another resolution were loaded and resized)."""
    if not uses_sincos(model):
        return
    visual = model.visual
    rows, cols = visual.grid_size
    if rows != cols:
        raise ValueError(f"sin-cos position embeddings need a square patch grid, got {rows}x{cols}")
    pos = visual.positional_embedding
    with torch.no_grad():
        pos.copy_(sincos_2d(rows, pos.shape[-1]).to(pos.device, pos.dtype))
    pos.requires_grad_(False)
