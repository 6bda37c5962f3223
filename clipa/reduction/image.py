"""Image masks: which patches each sample keeps (numpy only; see clipa.reduction for the strategies).

`MASKS` registers each masking strategy once: name -> scores(h, w, mask_ratio, rng), the patches with the
highest scores are kept. Adding a strategy is one function and one entry here (plus its test); the
recipe's choices, the model's masker and the FLOP count all read this table.
"""

from __future__ import annotations

import math

import numpy as np


def keep_count(num_patches: int, mask_ratio: float) -> int:
    return max(1, int(num_patches * (1.0 - mask_ratio)))


def _grid_scores(h: int, w: int, mask_ratio: float, rng: np.random.Generator) -> np.ndarray:
    keep_fraction = 1.0 - mask_ratio
    stride = max(1, int(round(1.0 / math.sqrt(keep_fraction))))
    ys, xs = np.mgrid[0:h, 0:w]
    if stride == 1 and keep_fraction <= 0.5 + 1e-6:
        on_grid = (ys + xs + rng.integers(2)) % 2 == 0  # checkerboard
    else:
        oy, ox = rng.integers(stride, size=2)
        on_grid = ((ys - oy) % stride == 0) & ((xs - ox) % stride == 0)
    # On-grid patches first; ties (too many or too few on the grid) are broken at random.
    return on_grid.ravel() * 2.0 + rng.random(h * w)


def _block_scores(h: int, w: int, mask_ratio: float, rng: np.random.Generator) -> np.ndarray:
    n = h * w
    target = n - keep_count(n, mask_ratio)
    masked = np.zeros((h, w), dtype=bool)
    for _ in range(32):
        if masked.sum() >= target:
            break
        area = rng.uniform(0.1, 0.4) * n
        aspect = math.exp(rng.uniform(-1, 1) * math.log(3.3))
        bh = int(min(h, max(1, round(math.sqrt(area * aspect)))))
        bw = int(min(w, max(1, round(math.sqrt(area / aspect)))))
        top, left = rng.integers(h - bh + 1), rng.integers(w - bw + 1)
        masked[top:top + bh, left:left + bw] = True
    # Unmasked patches first; the exact count is then made up at random within each group.
    return (~masked).ravel() * 2.0 + rng.random(n)


def _random_scores(h: int, w: int, mask_ratio: float, rng: np.random.Generator) -> np.ndarray:
    return rng.random(h * w)


MASKS = {"random": _random_scores, "grid": _grid_scores, "block": _block_scores}
IMAGE_MASKS = tuple(MASKS)
IMAGE_STRATEGIES = ("resize", *IMAGE_MASKS, "none")  # reduction.image


def patch_keep_indices(strategy: str, grid: tuple[int, int], mask_ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of the patches one sample keeps, sorted (raster order preserved)."""
    h, w = grid
    if strategy not in MASKS:
        raise ValueError(f"unknown image mask strategy {strategy!r}")
    scores = MASKS[strategy](h, w, mask_ratio, rng)
    keep = keep_count(h * w, mask_ratio)
    return np.sort(np.argpartition(-scores, keep - 1)[:keep])
