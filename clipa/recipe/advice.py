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
# finetunes are thousands of steps, far above this. What costs the steps is the change of patch scale:
# a first stage at the finetune's resolution with 75% of its patches masked (the same tokens) kept its
# per-class recall and all but a tenth of its R@5 through the 19-step finetune (3 seeds), so a finetune
# from a stage at its own image size gets no note (preflight and plan pass that stage's recipe).
# What such a short finetune still gave back (R@5 0.162 -> 0.145 at clipa-tiny, 0.163 -> 0.150 at
# clipa-small, 3 seeds each) was the text's change from 8 to 32 tokens: with the first stage's 8 tokens
# kept, the same 19 steps ended at the first stage on both metrics (0.167 and 0.169).
MIN_FINETUNE_STEPS = 76


def _steps(recipe: Recipe) -> int:
    return recipe.train.total_samples // recipe.train.global_batch_size


def short_finetune(recipe: Recipe) -> bool:
    """A stage that starts from weights (`init.checkpoint`) and runs fewer than MIN_FINETUNE_STEPS steps: the
    only kind `advice` has anything to say about."""
    return bool(recipe.init.checkpoint) and _steps(recipe) < MIN_FINETUNE_STEPS


def advice(recipe: Recipe, start: Recipe | None = None) -> list[str]:
    """`start`: the recipe of the stage `recipe` finetunes from, when it is known (a clipa run, the stage
    before it in a plan); None: published weights, a weights file, a run not there yet."""
    if not short_finetune(recipe):
        return []
    steps = _steps(recipe)
    same_patch_scale = (start is not None and start.model.arch == recipe.model.arch
                        and start.reduction.image_size == recipe.reduction.image_size)
    if not same_patch_scale:
        return [f"train.total_samples: this finetune runs {steps} steps of {recipe.train.global_batch_size}; "
                f"finetunes under {MIN_FINETUNE_STEPS} steps that change the image size gave back a third of "
                f"the low-resolution stage's retrieval on real images (clipa-tiny; docs/openclipart.md, "
                f"\"Keeping the gain\"); train.total_samples={MIN_FINETUNE_STEPS * recipe.train.global_batch_size} "
                "or more kept it there, and a larger model needs more"]
    short_text = start.reduction.text_length
    if short_text and recipe.reduction.text_length != short_text:
        return [f"reduction.text_length: this {steps}-step finetune changes the text from the first stage's "
                f"{short_text} tokens to {recipe.reduction.text_length or 'the native length'}; from a first "
                f"stage at its own image size, 19 such steps gave back a tenth of the retrieval on real images "
                f"and reduction.text_length={short_text} kept all of it (clipa-tiny and clipa-small, 3 seeds; "
                "docs/openclipart.md, \"Keeping the gain\")"]
    return []
