"""What a pipeline of stages will cost before you run it: tokens, FLOPs, accelerator-hours, dollars.

    from clipa.analysis.plan import plan
    p = plan(["vit_h14/pretrain_84", "vit_h14/finetune_224"], gpu="A100", gpus=8)
    p["total"]["gpu_hours"], p["total"]["cost"]

FLOPs are clipa's analytic model FLOPs (`clipa.cost.flops`: matmuls of both towers, forward + backward),
counted over the samples the trainer will actually run (whole steps). Time is
FLOPs / (peak x MFU): `mfu` is the model-FLOPs utilisation you expect to reach, by default the one
implied by CLIPA-v2's published H/14 A100-hours (docs/plan.md). The result is plain data in the
shape `clipa plan --json` prints (documented in docs/plan.md):

    {"stages": [{"recipe", "total_flops", "gpu_hours", "cost", ...}], "total": {"total_flops", "gpu_hours", "cost"}}
"""

from __future__ import annotations

from clipa.cost.accelerators import PEAK_TFLOPS_BF16, match_accelerator
from clipa.errors import ClipaError
from clipa.recipe.advice import advice

DEFAULT_GPU = "A100"
DEFAULT_GPUS = 8
# Model-FLOPs utilisation implied by CLIPA-v2's published A100-hours for H/14 12.8B@84 + 512M@224
# (7,776 h -> 0.273); the other published rows imply 0.235-0.277 (docs/plan.md).
DEFAULT_MFU = 0.27
# $ per accelerator-hour implied by the CLIPA-v2 README: every cost row / GPU-hours = $1.576
# (A100 80GB on Google Cloud, 2023), except bigG-336 ($1.645).
DEFAULT_PRICE = 1.576


def accelerator_peak(gpu: str, peak_tflops: float | None = None) -> tuple[str, float]:
    """(name, dense bf16 peak TFLOP/s) of an accelerator name, or of an explicit peak."""
    if peak_tflops is not None:
        if peak_tflops <= 0:
            raise ClipaError(f"--peak-tflops: must be > 0, got {peak_tflops:g}")
        return gpu, float(peak_tflops)
    key = match_accelerator(gpu)
    if key is None:
        raise ClipaError(f"--gpu: unknown accelerator \"{gpu}\" (known: {', '.join(PEAK_TFLOPS_BF16)}); "
                         "or give its dense bf16 peak with --peak-tflops")
    return key, PEAK_TFLOPS_BF16[key]


def _load(recipe) -> tuple[str, object]:
    from clipa.recipe.index import resolve_path
    from clipa.recipe.load import load_recipe
    from clipa.recipe.schema import Recipe

    if isinstance(recipe, Recipe):
        return recipe.source or recipe.name, recipe
    return str(recipe), load_recipe(resolve_path(recipe))


def stage_flops(recipe) -> dict:
    """Tokens and training FLOPs of one recipe (a `Recipe`): per sample and in total."""
    from clipa.stage import Stage

    numbers = Stage.of(recipe)
    return {
        "name": recipe.name, "arch": recipe.model.arch, "image_size": numbers.geometry.image_size,
        "mask_ratio": recipe.reduction.mask_ratio, "image_tokens": numbers.image_tokens,
        "text_tokens": numbers.geometry.context_length, "tokens_per_sample": numbers.tokens_per_sample,
        "global_batch_size": numbers.global_batch, "steps": numbers.steps, "samples": numbers.samples,
        "image_flops_per_sample": numbers.flops["image"], "text_flops_per_sample": numbers.flops["text"],
        "flops_per_sample": numbers.flops_per_sample, "total_flops": numbers.total_flops,
    }


def hours(total_flops: float, peak_tflops: float, mfu: float) -> float:
    """Accelerator-hours to run `total_flops` at `mfu` of `peak_tflops`."""
    return total_flops / (peak_tflops * 1e12 * mfu) / 3600.0


def plan(recipes, gpu: str = DEFAULT_GPU, gpus: int = DEFAULT_GPUS, mfu: float = DEFAULT_MFU,
         price: float = DEFAULT_PRICE, peak_tflops: float | None = None) -> dict:
    """Plan a pipeline: recipe paths, shipped names ("vit_h14/pretrain_84") or `Recipe` objects."""
    if not recipes:
        raise ClipaError("plan: give at least one recipe (a TOML path or a shipped name, see `clipa ls`)")
    if gpus < 1:
        raise ClipaError(f"--gpus: must be >= 1, got {gpus}")
    if not 0 < mfu <= 1:
        raise ClipaError(f"--mfu: must be in (0, 1], a fraction of the peak (e.g. 0.3), got {mfu:g}")
    if price < 0:
        raise ClipaError(f"--price: must be >= 0 dollars per accelerator-hour, got {price:g}")
    gpu_name, peak = accelerator_peak(gpu, peak_tflops)
    stages = []
    start = None  # the stage before, which the next one finetunes from (the finetune-length note needs it)
    for recipe in recipes:
        source, loaded = _load(recipe)
        stage = {"recipe": source, **stage_flops(loaded), "notes": loaded.notes + advice(loaded, start)}
        start = loaded
        gpu_hours = hours(stage["total_flops"], peak, mfu)
        stage.update({"gpu": gpu_name, "gpus": gpus, "peak_tflops": peak, "mfu": mfu, "price_per_gpu_hour": price,
                      "gpu_hours": gpu_hours, "wall_hours": gpu_hours / gpus, "cost": gpu_hours * price})
        stages.append(stage)
    total = {key: sum(s[key] for s in stages) for key in ("total_flops", "gpu_hours", "cost")}
    return {"stages": stages, "total": total}
