"""Every check a run needs before it starts, in one function: `clipa pretrain` / `finetune`, their `--dry-run`,
`clipa validate` and the trainer all call `preflight`, so `train()` from a notebook refuses what the command
refuses (a finetune without weights to start from, published OpenAI weights into a GELU model, ...).

Nothing here builds a model or downloads anything: published weights are looked up by name in the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clipa.errors import ClipaError
from clipa.recipe.advice import advice, short_finetune
from clipa.recipe.schema import Recipe
from clipa.run.layout import CHECKPOINTS_DIR, default_run_dir
from clipa.run.lineage import earlier_runs
from clipa.run.lock import check_run_dir
from clipa.stage import Stage


@dataclass
class Preflight:
    numbers: Stage  # the stage's geometry, model config, steps, tokens and FLOPs
    run_dir: Path
    resume: Path | None  # the verified checkpoint `resume` names
    notes: list[str]  # the recipe's own notes, then one line per weights source (cached, will download, ...)


def preflight(recipe: Recipe, stage: str | None = None, run_dir: str | Path | None = None,
              resume: str | Path | None = None, *, numbers: Stage | None = None, starting: bool = True) -> Preflight:
    """Check `recipe` for a run of `stage` (pretrain | finetune; None: either, as `clipa validate` checks a
    recipe) in `run_dir` (default runs/<name>), resuming from `resume` if given.

    `starting`: a run starts there (or `--dry-run` shows one): the run directory must be usable and a local
    `init.checkpoint` must exist. Without it (`clipa validate`) the recipe alone is checked, and an
    `init.checkpoint` that is an earlier stage's run still to come is a note.
    """
    from clipa.train.checkpoint import resolve_resume
    from clipa.train.trackers import check_trackers

    numbers = numbers or Stage.of(recipe)  # checks the architecture, geometry and towers
    if stage == "finetune" and not recipe.init.checkpoint:
        raise ClipaError("init.checkpoint: finetune needs weights to start from; add init.checkpoint=runs/NAME "
                         "or a published ARCH:TAG / hf-hub:ORG/NAME")
    run_dir = Path(run_dir) if run_dir else default_run_dir(recipe.name)
    if starting:
        check_run_dir(run_dir)
    check_trackers(recipe.log)  # a missing tracker library stops the run before any work
    if resume:
        resume = resolve_resume(resume)
    # Weights are checked by name (published ones looked up in the cache, never downloaded) before
    # anything is built; a run resuming from a checkpoint reads neither init nor image_init.
    # Only a finetune short enough for a note reads the run it starts from (whether it changes image size or text length).
    noted = advice(recipe, start_recipe(recipe, run_dir)) if short_finetune(recipe) else []
    notes = recipe.notes + noted + ([] if resume else weights_notes(recipe, numbers.model_cfg, run_dir, starting))
    return Preflight(numbers, run_dir, resume, notes)


def start_recipe(recipe: Recipe, run_dir: Path) -> Recipe | None:
    """The recipe of the clipa run `init.checkpoint` names, found as the model card and `clipa scaling` find
    it (clipa/run/lineage.py); None: published weights, a weights file, a run not there yet, or one whose
    config does not load (the run's start says why)."""
    try:
        start = next(earlier_runs(recipe, run_dir, limit=1), None)
    except ClipaError:
        return None
    return start.recipe if start is not None else None


def weights_notes(recipe, cfg: dict, run_dir: Path, init_must_exist: bool) -> list[str]:
    """Check every weights source a fresh run of `recipe` would read, downloading nothing; one line each
    on published ones (cached, or will download on first use) and on the Hugging Face tokenizer."""
    from clipa.model import published
    from clipa.model.checkpoints import newest_loadable
    from clipa.model.towers import check_image_init
    from clipa.model.weights import find_weights

    notes = []
    # A run resuming from its own checkpoints reads neither init.checkpoint nor image_init.
    fresh = newest_loadable(run_dir / CHECKPOINTS_DIR) is None
    if fresh and recipe.init.checkpoint:
        pub = published.parse(recipe.init.checkpoint, "init.checkpoint")
        if pub is not None and pub.cfg.get("quick_gelu") and not cfg.get("quick_gelu"):
            # open_clip's OpenAI tags: trained with QuickGELU, which only the -quickgelu configs build
            raise ClipaError(f"init.checkpoint: {pub.spec} was trained with QuickGELU, but model.arch "
                             f"{recipe.model.arch} uses GELU; set model.arch = \"{pub.name}-quickgelu\"")
        note = published.check_source(recipe.init.checkpoint, "init.checkpoint")
        if note:
            notes.append(f"init.checkpoint {note}")
        elif init_must_exist:
            find_weights(recipe.init.checkpoint)  # fail now, not after building the model
        elif not Path(recipe.init.checkpoint).exists():  # often an earlier stage's run
            notes.append(f"init.checkpoint {recipe.init.checkpoint} does not exist yet")
    if fresh and recipe.model.image_init:
        note = check_image_init(recipe.model.image_init, cfg["vision_cfg"].get("timm_model_name", ""))
        if note:
            notes.append(f"model.image_init {note}")
    tokenizer = published.tokenizer_note(cfg["text_cfg"])
    if tokenizer:
        notes.append(tokenizer)
    return notes


def normalisation_note(recipe: Recipe, init: str) -> str | None:
    """A note when init.checkpoint's weights were trained with another image mean/std than data.normalize."""
    import math

    from clipa.model.weights import trained_mean_std
    from clipa.recipe.schema import image_mean_std

    theirs = trained_mean_std(init)
    ours = [list(v) for v in image_mean_std(recipe.data)]
    if theirs is None or all(math.isclose(a, b, rel_tol=1e-6) for x, y in zip(theirs, ours) for a, b in zip(x, y)):
        return None
    return (f"init.checkpoint {init} was trained with image mean {theirs[0]} / std {theirs[1]}, data.normalize "
            f"(\"{recipe.data.normalize}\") is mean {ours[0]} / std {ours[1]}; the weights start with inputs they "
            "did not learn (set data.normalize to theirs to continue as they trained)")
