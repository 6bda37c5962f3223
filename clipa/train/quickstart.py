"""`clipa quickstart`: the whole CLIPA pipeline on the built-in data, on a CPU, in minutes.

pretrain (recipes/tiny/pretrain: 64 px with 75% of the patches masked, 8 tokens) -> zero-shot ->
finetune (recipes/tiny/finetune: 64 px, 32 tokens, text position embeddings interpolated) -> zero-shot;
one row per stage for the table `clipa quickstart` prints.
"""

from __future__ import annotations

import time
from pathlib import Path

from clipa.evaluate.models import at_geometry, load_model
from clipa.evaluate.zeroshot import write_result, zeroshot
from clipa.model.build import arch_config, native_geometry
from clipa.recipe.index import resolve_path
from clipa.recipe.load import load_recipe
from clipa.stage import Stage
from clipa.train.trainer import train


def _scaled(recipe, scale: float) -> None:
    batch = recipe.train.global_batch_size
    recipe.train.total_samples = max(batch, int(recipe.train.total_samples * scale) // batch * batch)
    steps = Stage.of(recipe).steps
    # a shortened run keeps at most a third of its steps warming up (the shipped recipes warm up
    # for a fifth to a third, so at scale 1 they run as written)
    recipe.optim.warmup_steps = min(recipe.optim.warmup_steps, max(0, steps // 3))
    recipe.train.log_every_steps = max(1, min(recipe.train.log_every_steps, steps // 5))


def run_quickstart(out_dir: str | Path = "runs/quickstart", scale: float = 1.0) -> list[dict]:
    out_dir = Path(out_dir)
    rows = []
    init = ""
    for stage in ("pretrain", "finetune"):
        overrides = [f"init.checkpoint={init}"] if init else []
        recipe = load_recipe(resolve_path(f"tiny/{stage}"), overrides)
        _scaled(recipe, scale)
        run_dir = out_dir / stage
        start = time.perf_counter()
        result = train(recipe, stage, run_dir)
        wall = time.perf_counter() - start
        model = load_model(str(run_dir))
        evaluation = zeroshot(model, "synthetic")
        write_result(evaluation, run_dir / "zeroshot_synthetic.json")
        m = evaluation["metrics"]
        # the same model at the architecture's full geometry, where the finished model is evaluated:
        # a low-resolution stage scoring higher at its own size than at full size is what the finetune
        # must make up (docs/openclipart.md, "Keeping the gain")
        native = native_geometry(arch_config(recipe.model.arch))
        at_full = (evaluation["image_size"], evaluation["text_length"]) == (native.image_size, native.context_length)
        full = evaluation if at_full else zeroshot(at_geometry(model, native.image_size, native.context_length),
                                                   "synthetic")
        rows.append({"stage": stage, "image_size": evaluation["image_size"],
                     "text_length": recipe.reduction.text_length or "full", "samples": result.samples,
                     "acc1": m["acc1"], "acc5": m["acc5"], "chance": evaluation["chance"],
                     "acc1_full": full["metrics"]["acc1"], "full_size": native.image_size,
                     "samples_per_s": result.samples_per_s, "wall_s": wall, "loss": result.final_loss})
        init = str(run_dir)
    return rows
