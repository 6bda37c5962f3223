"""A training stage's numbers, computed once from its recipe: geometry, model config, steps, batch
layout, tokens and FLOPs per sample. The trainer, `--dry-run`, `clipa plan`, `clipa scaling` and
`clipa quickstart` all read them from here, so they cannot disagree.

One word each: a `Stage` object is held as `numbers` (`numbers = Stage.of(recipe)`: the stage's numbers);
`stage` on its own is "pretrain" or "finetune", as `train(recipe, stage)`, metrics.jsonl rows and `clipa runs`
spell it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from clipa.cost.flops import image_tokens, train_flops
from clipa.model.build import Geometry, recipe_model_config
from clipa.recipe.checks import batch_layout
from clipa.recipe.schema import Recipe


@dataclass(frozen=True)
class Stage:
    recipe: Recipe
    geometry: Geometry  # input resolution and text length of this stage
    model_cfg: dict  # the open_clip config the trainer builds (timm tower, SigLIP bias included)
    steps: int  # optimizer steps: whole global batches only

    @classmethod
    def of(cls, recipe: Recipe) -> Stage:
        geometry, model_cfg = recipe_model_config(recipe)  # checks the architecture, geometry and towers
        return cls(recipe, geometry, model_cfg, recipe.train.total_samples // recipe.train.global_batch_size)

    # Counted on first use: a timm tower's count builds the trunk, which `clipa validate` need not pay for.
    @functools.cached_property
    def image_tokens(self) -> int:
        """Image tokens per sample after masking (class token included)."""
        return image_tokens(self.model_cfg, self.geometry.image_size, self.keep_ratio)

    @functools.cached_property
    def flops(self) -> dict:
        """Training FLOPs per sample: {"image", "text", "total"}."""
        return train_flops(self.model_cfg, self.geometry.image_size, self.geometry.context_length, self.keep_ratio)

    @property
    def keep_ratio(self) -> float:
        return 1.0 - self.recipe.reduction.mask_ratio

    @property
    def shape(self) -> str:
        """What one sample is to the model in this stage, as the run's first line and `clipa validate` print it:
        "64px (75% of patches masked) / 8 tokens" (a masked stage and a resized one must not read alike)."""
        mask = self.recipe.reduction.mask_ratio
        masked = f" ({mask:.0%} of patches masked)" if mask else ""
        return f"{self.geometry.image_size}px{masked} / {self.geometry.context_length} tokens"

    @property
    def global_batch(self) -> int:
        return self.recipe.train.global_batch_size

    @property
    def samples(self) -> int:
        """What the trainer runs: whole steps."""
        return self.steps * self.global_batch

    @property
    def tokens_per_sample(self) -> int:
        return self.image_tokens + self.geometry.context_length

    @property
    def flops_per_sample(self) -> float:
        return self.flops["total"]

    @property
    def total_flops(self) -> float:
        return self.flops_per_sample * self.samples

    def layout(self, processes: int) -> tuple[int, int]:
        """(micro-batch per process, accumulation steps) on `processes` processes."""
        return batch_layout(self.recipe, processes)
