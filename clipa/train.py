"""One trainer for every stage: low-token pretraining and full-length finetuning alike.

The loop reads top to bottom: get batch, forward, contrastive loss, backward, clip, step,
clamp the temperature, log, checkpoint. A stage differs from another only by its recipe:
the geometry (image size, text length) and where its weights start.

Resume order, written down once (as big_vision does): the run's own newest checkpoint, else an
explicit `resume` checkpoint, else `init.checkpoint` (weights only, position embeddings
resized), else random initialisation.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from clipa import recipe as recipe_mod
from clipa.checkpoint import CheckpointManager, find_weights, load_state, read_state_dict, set_rng_state
from clipa.data.loader import build_train_loader
from clipa.data.transforms import normalize
from clipa.errors import ClipaError
from clipa.flops import device_peak_flops, image_tokens, train_flops_per_sample
from clipa.loss import LOSSES
from clipa.model import build_tokenizer, create_model, export_open_clip, load_weights, recipe_model_config
from clipa.optim import build_optimizer, build_scheduler
from clipa.progress import RunLog
from clipa.reduction import TextReducer, install_patch_masker
from clipa.step import ContrastiveStep

STAGES = ("pretrain", "finetune")
# Recipe keys that define what a checkpoint *is*; a resumed run may not change them.
_FIXED_ON_RESUME = ("model.arch", "reduction.image", "reduction.image_size", "reduction.mask_ratio", "reduction.text",
                    "reduction.text_length", "train.global_batch_size", "train.seed", "data.train", "loss.kind")


@dataclass
class StageResult:
    run_dir: Path
    steps: int
    samples: int
    wall_time_s: float
    samples_per_s: float
    final_loss: float
    is_main: bool = True  # the process that reports (rank 0)


def _accelerator(precision: str) -> Accelerator:
    on_gpu = torch.cuda.is_available()
    if precision == "auto":
        precision = "bf16" if on_gpu else "fp32"
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    return Accelerator(cpu=not on_gpu, mixed_precision=mixed)


def _to_device(batch, device):
    images, texts, keep = batch
    images = normalize(images.to(device, non_blocking=True))
    keep = keep.to(device, non_blocking=True) if keep is not None else None
    return images, texts.to(device, non_blocking=True), keep


def precision_name(accelerator: Accelerator) -> str:
    return {"no": "fp32"}.get(accelerator.mixed_precision, accelerator.mixed_precision)


def _get(recipe, dotted: str):
    table, key = dotted.split(".")
    return getattr(getattr(recipe, table), key)


def _check_resume_compatible(recipe, saved_config: str, where: Path) -> list[str]:
    """Error on changes that would make the resumed run a different run; list the harmless ones."""
    saved = recipe_mod.recipe_from_dict(recipe_mod.tomllib.loads(saved_config))
    for key in _FIXED_ON_RESUME:
        if _get(saved, key) != _get(recipe, key):
            raise ClipaError(
                f"{key}: the checkpoint {where} was made with {_get(saved, key)!r}, the recipe now says "
                f"{_get(recipe, key)!r}; this cannot change on resume. Use a new --out directory for a new run"
            )
    return [k for k, v in recipe_mod.to_dict(recipe).items() if recipe_mod.to_dict(saved).get(k) != v]


def _prepare_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ClipaError(f"--out: cannot write to {run_dir} ({err.strerror}); choose a writable directory") from None


def train(recipe: recipe_mod.Recipe, stage: str = "pretrain", out_dir: str | Path | None = None,
          resume: str | Path | None = None) -> StageResult:
    """Train one stage; returns where the run lives and how fast it went. Safe to call again to resume."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}")
    geometry, model_cfg = recipe_model_config(recipe)
    run_dir = Path(out_dir or Path("runs") / recipe.name)

    accelerator = _accelerator(recipe.train.precision)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    micro, accumulation = recipe_mod.batch_layout(recipe, world)
    total_steps = recipe.train.total_samples // recipe.train.global_batch_size

    checkpoints = CheckpointManager(run_dir / "checkpoints", recipe.checkpoint.keep_last, rank,
                                    accelerator.wait_for_everyone)
    start_from = checkpoints.latest() or (Path(resume) if resume else None)
    if start_from is None and stage == "finetune" and not recipe.init.checkpoint:
        raise ClipaError("init.checkpoint: finetune needs weights to start from; set init.checkpoint=runs/NAME "
                         "(a pretrain run directory, a checkpoint or an exported model)")
    init_weights = None
    if start_from is None and recipe.init.checkpoint:
        init_weights = read_state_dict(*find_weights(recipe.init.checkpoint))
    if main:
        _prepare_run_dir(run_dir)
    accelerator.wait_for_everyone()

    if accelerator.device.type == "cpu":
        # Weights and activations drifting into denormal range make CPU matmuls many times slower.
        torch.set_flush_denormal(True)
    set_seed(recipe.train.seed)
    model = create_model(model_cfg)
    if init_weights is not None:
        load_weights(model, init_weights)
    masker = install_patch_masker(model, recipe.reduction.image, recipe.reduction.mask_ratio)
    if recipe.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    optimizer = build_optimizer(model, recipe.optim)
    scheduler = build_scheduler(optimizer, recipe.optim, total_steps)

    step, wall_before = 0, 0.0
    notes = []
    if start_from is not None:
        model_state, state, rng = load_state(start_from, rank)
        notes = _check_resume_compatible(recipe, (start_from / "config.toml").read_text(), start_from)
        model.load_state_dict(model_state)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, wall_before = state["step"], state.get("wall_time_s", 0.0)
        if rng is not None:
            set_rng_state(rng)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    config_text = recipe_mod.dumps(recipe)
    if main:
        (run_dir / "config.toml").write_text(config_text, encoding="utf-8")

    text_reducer = TextReducer(build_tokenizer(recipe.model.arch, geometry.context_length), recipe.reduction.text,
                               geometry.context_length)
    mask = (masker.strategy, masker.grid, masker.mask_ratio) if masker else None
    loader = build_train_loader(recipe, geometry, text_reducer, micro_batch=micro, processes=world, rank=rank,
                                start_batch=step * accumulation, num_batches=(total_steps - step) * accumulation,
                                mask=mask)
    contrastive_step = ContrastiveStep(model, unwrapped, LOSSES[recipe.loss.kind], accelerator, masker)
    keep_ratio = 1.0 - recipe.reduction.mask_ratio
    flops_per_sample = train_flops_per_sample(model_cfg, geometry.image_size, geometry.context_length, keep_ratio)
    tokens_per_sample = image_tokens(model_cfg, geometry.image_size, keep_ratio) + geometry.context_length
    peak = device_peak_flops()
    log = RunLog(run_dir / "metrics.jsonl", total_steps, f"{stage} {recipe.name}", start=step, enabled=main)
    if start_from is not None:
        log.message(f"resuming from {start_from} at step {step}/{total_steps}"
                    + (f" (changed since: {', '.join(notes)})" if notes else ""))
    log.message(f"{stage}: {recipe.model.arch} at {geometry.image_size}px / {geometry.context_length} tokens, "
                f"{total_steps} steps of {recipe.train.global_batch_size} = {micro} x {accumulation} accumulation x "
                f"{world} process(es), "
                f"{accelerator.device}, precision {precision_name(accelerator)}")

    def save_checkpoint() -> None:
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                 "samples": step * recipe.train.global_batch_size, "data_position": {"batch": step},
                 "wall_time_s": wall_before + time.perf_counter() - t_start}
        checkpoints.save(step, unwrapped.state_dict() if main else None, state if main else None, config_text)

    max_log_scale = math.log(recipe.train.logit_scale_max)
    loss_sum, loss_count, last_loss = torch.zeros((), device=accelerator.device), 0, float("nan")
    t_start = t_window = time.perf_counter()
    window_steps, data_wait = 0, 0.0
    model.train()
    batches = iter(loader)
    while step < total_steps:
        t_fetch = time.perf_counter()
        micro_batches = [_to_device(next(batches), accelerator.device) for _ in range(accumulation)]
        data_wait += time.perf_counter() - t_fetch
        loss = contrastive_step(micro_batches)
        if recipe.optim.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), recipe.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # CLIP's temperature clamp
            unwrapped.logit_scale.clamp_(0, max_log_scale)
        step += 1
        window_steps += 1
        loss_sum += loss.detach()
        loss_count += 1
        log.advance()

        if step % recipe.train.log_every_steps == 0 or step == total_steps:
            elapsed = time.perf_counter() - t_window
            # The only host sync, once per log step; each process's loss covers its own rows, so
            # the mean over processes is the loss of the global batch.
            last_loss = accelerator.reduce(loss_sum / loss_count, reduction="mean").item()
            samples_per_s = window_steps * recipe.train.global_batch_size / elapsed
            metrics = {
                "step": step, "samples": step * recipe.train.global_batch_size, "stage": stage,
                "lr": scheduler.get_last_lr()[0], "loss": last_loss,
                "logit_scale": unwrapped.logit_scale.exp().item(),
                "samples_per_s": samples_per_s, "tokens_per_s": samples_per_s * tokens_per_sample,
                "tflops": samples_per_s * flops_per_sample / 1e12,
                "mfu": samples_per_s * flops_per_sample / (peak * world) if peak else None,
                "data_wait_frac": data_wait / elapsed, "skipped_samples": 0,
            }
            log.write(metrics, f"step {step}/{total_steps} loss {last_loss:.4f} {samples_per_s:.0f} samples/s")
            loss_sum.zero_()
            loss_count, window_steps, data_wait, t_window = 0, 0, 0.0, time.perf_counter()
        if recipe.checkpoint.every_steps and step % recipe.checkpoint.every_steps == 0 and step < total_steps:
            save_checkpoint()

    wall = time.perf_counter() - t_start
    save_checkpoint()
    if main:
        export_open_clip(unwrapped, model_cfg, run_dir / "final")
    accelerator.wait_for_everyone()
    log.message(f"{stage} done: {run_dir / 'final'}")
    log.close()
    samples = total_steps * recipe.train.global_batch_size
    return StageResult(run_dir, total_steps, samples, wall_before + wall,
                       samples / (wall_before + wall) if wall_before + wall > 0 else 0.0, last_loss, main)
