"""Advice on a valid recipe: settings that run, but that a measurement says will disappoint. Each
piece of advice names the number it rests on and where that number was measured, so a user can
judge whether it applies to their scale. Notes, not errors: the recipe still runs.
"""

from __future__ import annotations

import tomllib

from clipa.recipe.schema import Recipe

# docs/openclipart.md, "Keeping the gain": clipa-tiny on OpenClipart, 3 seeds, all from the same
# low-resolution stage: finetunes of 19 and 38 steps (batch 256) at full resolution gave back a third
# of that stage's text->image R@5 (0.171 -> 0.12-0.14), whatever their LR, warmup or optimizer state;
# 76 steps kept it. A floor, not a target: clipa-small (3.3x the FLOPs per sample, seed 0) still gave
# back a fifth at 76 steps (R@5 0.194 -> 0.154), so larger models need more. At CLIPA's own scale
# finetunes are thousands of steps, far above this. What costs the steps is the change of patch scale:
# a first stage at the finetune's resolution with 75% of its patches masked (the same tokens) kept its
# per-class recall and all but a tenth of its R@5 through the 19-step finetune (3 seeds), so a finetune
# that starts from a run at its own image size gets no note.
MIN_FINETUNE_STEPS = 76


def _same_image_size_as_its_start(recipe: Recipe) -> bool:
    """init.checkpoint names a clipa run here that trained this architecture at this image size (so the
    finetune changes no patch scale). False when it names anything else: published weights, a file."""
    from clipa.run.layout import CONFIG_FILE
    from clipa.run.lineage import find_run

    found = find_run(recipe.init.checkpoint)
    if found is None:
        return False
    try:
        earlier = tomllib.loads((found[0] / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False  # the run's own loader says what is wrong with it when the finetune starts
    model, reduction = earlier.get("model", {}), earlier.get("reduction", {})
    return (model.get("arch") == recipe.model.arch and model.get("arch") is not None
            and reduction.get("image_size", 0) == recipe.reduction.image_size)


def advice(recipe: Recipe) -> list[str]:
    notes = []
    steps = recipe.train.total_samples // recipe.train.global_batch_size
    if recipe.init.checkpoint and steps < MIN_FINETUNE_STEPS and not _same_image_size_as_its_start(recipe):
        notes.append(f"train.total_samples: this finetune runs {steps} steps of {recipe.train.global_batch_size}; "
                     f"finetunes under {MIN_FINETUNE_STEPS} steps that change the image size gave back a third of "
                     f"the low-resolution stage's retrieval on real images (clipa-tiny; docs/openclipart.md, "
                     f"\"Keeping the gain\"); train.total_samples={MIN_FINETUNE_STEPS * recipe.train.global_batch_size} "
                     "or more kept it there, and a larger model needs more")
    return notes
