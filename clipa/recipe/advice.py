"""Advice on a valid recipe: settings that run, but that a measurement says will disappoint. Each
piece of advice names the number it rests on and where that number was measured, so a user can
judge whether it applies to their scale. Notes, not errors: the recipe still runs.
"""

from __future__ import annotations

from clipa.recipe.schema import Recipe

# docs/openclipart.md, "Keeping the gain": clipa-tiny on OpenClipart, 3 seeds, all from the same
# low-resolution stage: finetunes of 19 and 38 steps (batch 256) at full resolution gave back a third
# of that stage's text->image R@5 (0.171 -> 0.12-0.14), whatever their LR, warmup or optimizer state;
# 76 steps kept it. A floor, not a target: clipa-small (3.3x the FLOPs per sample, seed 0) still gave
# back a fifth at 76 steps (R@5 0.194 -> 0.154), so larger models need more. At CLIPA's own scale
# finetunes are thousands of steps, far above this.
MIN_FINETUNE_STEPS = 76


def advice(recipe: Recipe) -> list[str]:
    notes = []
    steps = recipe.train.total_samples // recipe.train.global_batch_size
    if recipe.init.checkpoint and steps < MIN_FINETUNE_STEPS:
        notes.append(f"train.total_samples: this finetune runs {steps} steps of {recipe.train.global_batch_size}; "
                     f"finetunes under {MIN_FINETUNE_STEPS} steps gave back a third of the low-resolution stage's "
                     f"retrieval on real images (clipa-tiny; docs/openclipart.md, \"Keeping the gain\"); "
                     f"train.total_samples={MIN_FINETUNE_STEPS * recipe.train.global_batch_size} or more kept it there, "
                     "and a larger model needs more")
    return notes
