"""One trainer for every stage: low-token pretraining and full-length finetuning alike.

The loop reads top to bottom: get the micro-batches of one step, forward + contrastive loss +
backward (exact over the global batch, clipa.step), check for non-finite values, clip, step,
clamp the temperature, log, checkpoint. A stage differs from another only by its recipe: the
geometry (image size, text length, masks) and where its weights start.

Resume order, written down once: an explicit `resume` checkpoint (it wins, so a run can roll back
to an earlier step; newer checkpoints of the run are replaced as it continues), else the run's own
newest checkpoint, else `init.checkpoint` (weights only, position embeddings resized), else random
initialisation.

A run never loses finished work: checkpoints are atomic (clipa.checkpoint); SIGTERM/SIGINT, from
setup to the final export, finish the current step, save and return (a second signal exits at
once); non-finite losses or gradients skip the update and, after `train.max_nonfinite_steps` in a
row, stop the run with the last good checkpoint intact.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

from clipa import published
from clipa import recipe as recipe_mod
from clipa.checkpoint import (
    CheckpointManager,
    checkpoint_step,
    load_state,
    resolve_resume,
    set_rng_state,
)
from clipa.data.loader import build_train_loader, check_resume_layout, loader_layout
from clipa.data.transforms import normalize
from clipa.errors import ClipaError
from clipa.flops import device_peak_flops, image_tokens, train_flops_per_sample
from clipa.loss import LOSSES
from clipa.model import build_tokenizer, create_model, export_open_clip, load_weights, recipe_model_config
from clipa.optim import build_optimizer, build_scheduler
from clipa.progress import RunLog
from clipa.queue import FeatureQueues, MomentumEncoder, queue_infonce_loss
from clipa.reduction import TextReducer, install_patch_masker
from clipa.step import ContrastiveStep, clamp_logit_scale
from clipa.towers import apply_locks, load_image_tower

STAGES = ("pretrain", "finetune")
# Recipe keys that define what a checkpoint *is*; a resumed run may not change them.
_FIXED_ON_RESUME = ("model.arch", "reduction.image", "reduction.image_size", "reduction.mask_ratio", "reduction.text",
                    "reduction.text_length", "train.global_batch_size", "train.seed", "data.train", "loss.kind", "loss.queue")


class NonFiniteError(ClipaError):
    """Too many non-finite steps in a row; the last good checkpoint is intact."""


@dataclass
class StageResult:
    run_dir: Path
    steps: int
    samples: int
    wall_time_s: float
    samples_per_s: float
    final_loss: float
    is_main: bool = True  # the process that reports (rank 0)
    stopped_by: str | None = None  # signal name when the run was asked to stop early
    skipped_steps: int = 0  # updates skipped for non-finite loss or gradients


def _accelerator(precision: str) -> Accelerator:
    on_gpu = torch.cuda.is_available()
    if precision == "auto":
        precision = "bf16" if on_gpu else "fp32"
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    return Accelerator(cpu=not on_gpu, mixed_precision=mixed)


def _total_grad_norm(parameters) -> torch.Tensor:
    """2-norm of all gradients (after DDP's all-reduce they are the same on every process)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def skip_scaled_update(scaler, optimizer, unscaled: bool) -> None:
    """End a skipped (non-finite) step for an fp16 grad scaler as its own `step` would have.

    Not calling `optimizer.step()` also skips GradScaler's inf check and `update()`: its loss scale
    would never back off, and the next step's `unscale_` (grad clipping) would raise "unscale_() has
    already been called". `unscale_` records the overflow; `update()` halves the scale on it and
    resets the per-step state. `optimizer` is the torch optimizer (accelerate's wraps it).
    """
    if scaler is None:
        return
    if not unscaled:
        scaler.unscale_(optimizer)
    scaler.update()


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
    old, new = recipe_mod.to_dict(saved), recipe_mod.to_dict(recipe)
    return [f"{table}.{key}" for table, values in new.items() if isinstance(values, dict)
            for key, value in values.items() if old.get(table, {}).get(key) != value]


def _prepare_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ClipaError(f"--out: cannot write to {run_dir} ({err.strerror}); choose a writable directory") from None


class StopSignals:
    """SIGTERM/SIGINT ask the loop to stop after the current step; a second one exits at once."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        if hasattr(signal, "SIGTERM") and _in_main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received:  # second signal: the user means it
            os._exit(128 + signum)
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class Trainer:
    """Assembles model, optimizer, data and checkpoints for one stage, then runs the loop."""

    def __init__(self, recipe: recipe_mod.Recipe, stage: str, out_dir: str | Path | None = None,
                 resume: str | Path | None = None):
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}")
        self.recipe, self.stage = recipe, stage
        self.geometry, self.model_cfg = recipe_model_config(recipe)
        # Before anything slow: a tokenizer that cannot load (e.g. Hugging Face without transformers)
        # or a text strategy it cannot do is a recipe error, reported in a second, not after the model.
        self.text_reducer = TextReducer(build_tokenizer(recipe.model.arch, self.geometry.context_length),
                                        recipe.reduction.text, self.geometry.context_length)
        self.run_dir = Path(out_dir or Path("runs") / recipe.name)
        self.accelerator = accelerator = _accelerator(recipe.train.precision)
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.main = accelerator.is_main_process
        self.micro, self.accumulation = recipe_mod.batch_layout(recipe, self.world)
        self.total_steps = recipe.train.total_samples // recipe.train.global_batch_size
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", recipe.checkpoint.keep_last, self.rank,
                                             accelerator.wait_for_everyone)
        self.checkpoints.recover()

        # An explicit resume wins over the run's own checkpoints: that is how a run rolls back.
        self.explicit_resume = bool(resume)
        start_from = resolve_resume(resume) if resume else self.checkpoints.latest()
        self.replaced = [p.name for p in self.checkpoints.complete()
                         if resume and checkpoint_step(p) > checkpoint_step(start_from)]
        if start_from is None and stage == "finetune" and not recipe.init.checkpoint:
            raise ClipaError("init.checkpoint: finetune needs weights to start from; set init.checkpoint=runs/NAME "
                             "(a pretrain run directory, a checkpoint or an exported model)")
        init_weights = None
        if start_from is None and recipe.init.checkpoint:
            # Published weights: the first process downloads into the shared cache, the others then read it.
            with accelerator.main_process_first():
                init_weights = published.state_dict(recipe.init.checkpoint, "init.checkpoint")
        if self.main:
            _prepare_run_dir(self.run_dir)
        accelerator.wait_for_everyone()

        if accelerator.device.type == "cpu":
            # Weights and activations drifting into denormal range make CPU matmuls many times slower.
            torch.set_flush_denormal(True)
        set_seed(recipe.train.seed)
        model = create_model(self.model_cfg)
        if init_weights is not None:
            load_weights(model, init_weights)
        if start_from is None and recipe.model.image_init:
            with accelerator.main_process_first():
                load_image_tower(model, recipe.model.image_init, self.model_cfg["vision_cfg"].get("timm_model_name", ""))
        apply_locks(model, recipe.model)
        self.masker = install_patch_masker(model, recipe.reduction.image, recipe.reduction.mask_ratio)
        if recipe.train.grad_checkpointing:
            model.set_grad_checkpointing(True)
        if self.main:  # a checkpoint holds the weights and AdamW's two moments, all fp32
            self.checkpoints.check_free_space(3 * 4 * sum(p.numel() for p in model.parameters()))
        optimizer = build_optimizer(model, recipe.optim)
        self.scheduler = build_scheduler(optimizer, recipe.optim, self.total_steps)

        self.step, self.wall_before, self.skipped_total, self.notes = 0, 0.0, 0, []
        self.start_from = start_from
        queue_state = self._restore(model, optimizer, start_from) if start_from is not None else None
        self.start_step = self.step
        self.queues, self.momentum = self._build_queues(model, queue_state)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.unwrapped = accelerator.unwrap_model(self.model)
        if recipe.train.compile:
            # Compiled after prepare, so dynamo sees DDP's buckets; weights are saved from `unwrapped`,
            # whose names carry no `_orig_mod.` prefix. Masks change values, never shapes, per stage:
            # one graph per grad mode, no recompilation per step.
            self.model = torch.compile(self.model)
        self.config_text = recipe_mod.dumps(recipe)
        if self.main:
            (self.run_dir / "config.toml").write_text(self.config_text, encoding="utf-8")
        self.contrastive_step = ContrastiveStep(self.model, self.unwrapped, LOSSES[recipe.loss.kind], accelerator,
                                                self.masker)

    def _restore(self, model, optimizer, checkpoint: Path) -> dict | None:
        """Load the training state; returns the queue state, applied once the queues exist."""
        model_state, state, rng = load_state(checkpoint, self.rank)
        self.notes = _check_resume_compatible(self.recipe, (checkpoint / "config.toml").read_text(), checkpoint)
        model.load_state_dict(model_state)
        optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.step, self.wall_before = state["step"], state.get("wall_time_s", 0.0)
        self.skipped_total = state.get("skipped_steps", 0)
        check_resume_layout(state.get("data_position"), self.recipe.data, self.world, self.micro, self.main)
        if rng is not None:
            set_rng_state(rng)
        return state.get("queue")

    def _build_queues(self, model, restored: dict | None = None):
        cfg = self.recipe.loss.queue
        if cfg.kind == "none":
            return None, None
        queues = FeatureQueues(cfg.size, self.model_cfg["embed_dim"], self.accelerator.device)
        momentum = None
        if cfg.kind == "momentum":  # starts as a copy of the (initialised or restored) online weights
            momentum = MomentumEncoder(model, cfg.momentum)
            momentum.model.to(self.accelerator.device)
        if restored is not None:
            queues.load_state_dict(restored["queues"])
            if momentum is not None:
                momentum.model.load_state_dict(restored["momentum"])
        return queues, momentum

    def _queue_state(self) -> dict | None:
        if self.queues is None:
            return None
        return {"queues": self.queues.state_dict(),
                "momentum": self.momentum.model.state_dict() if self.momentum is not None else None}

    def save_checkpoint(self, elapsed: float) -> Path:
        own = self.start_from is not None and self.start_from.parent.resolve() == self.checkpoints.directory.resolve()
        if own and self.step == self.start_step:
            # Nothing trained since this very checkpoint was loaded (a run resumed at its end):
            # rewriting it could only risk it, e.g. a kill mid-write with keep_last = 1.
            return self.start_from
        scaler = self.accelerator.scaler
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None, "step": self.step,
                 "samples": self.step * self.recipe.train.global_batch_size,
                 "data_position": {"micro_batch": self.step * self.accumulation,
                                   **loader_layout(self.recipe.data, self.world, self.micro)},
                 "wall_time_s": self.wall_before + elapsed, "skipped_steps": self.skipped_total,
                 "queue": self._queue_state()}
        return self.checkpoints.save(self.step, self.unwrapped.state_dict() if self.main else None,
                                     state if self.main else None, self.config_text)

    def _loader(self):
        recipe, geometry = self.recipe, self.geometry
        text_reducer = self.text_reducer
        mask = (self.masker.strategy, self.masker.grid, self.masker.mask_ratio) if self.masker else None
        return build_train_loader(recipe, geometry, text_reducer, micro_batch=self.micro, processes=self.world,
                                  rank=self.rank, start_batch=self.step * self.accumulation,
                                  num_batches=(self.total_steps - self.step) * self.accumulation, mask=mask)

    def _prepare_queue_loss(self, micro_batches):
        """Momentum keys (computed before the online forward) and the queue's negatives for this step."""
        if self.queues is None:
            return None, None
        keys = self.momentum.keys(micro_batches, self.accelerator.autocast) if self.momentum else None
        negatives = self.queues.negatives(self.step, self.recipe.loss.queue.warmup_steps)
        captured: list = []
        self.contrastive_step.loss_fn = lambda images, texts, scale, bias=None: queue_infonce_loss(
            images, texts, scale, keys, negatives, captured)
        return keys, captured

    def _advance_queues(self, keys, captured) -> None:
        """After an optimizer step: EMA update, then enqueue the step's keys (or online features)."""
        if self.queues is None:
            return
        if self.momentum is not None:
            self.momentum.update(self.unwrapped)
            self.queues.enqueue(*keys)
        else:
            self.queues.enqueue(*captured)

    def _clips(self) -> bool:
        """Whether `_finite_update` goes through accelerate's clip (which unscales fp16 gradients)."""
        return bool(self.recipe.optim.grad_clip) or self.accelerator.distributed_type == DistributedType.FSDP

    def _finite_update(self, loss: torch.Tensor) -> bool:
        """Clip (if asked) and report whether loss and gradients are finite, agreed by all processes."""
        if self._clips():
            grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(),
                                                         self.recipe.optim.grad_clip or float("inf"))
        else:  # the norm only: clipping at infinity would still rescale every gradient by 1.0
            grad_norm = _total_grad_norm(self.model.parameters())
        finite = torch.isfinite(loss.detach().float()) & torch.isfinite(torch.as_tensor(grad_norm).float())
        finite = self.accelerator.reduce(finite.float().to(self.accelerator.device), reduction="sum")
        return bool(finite.item() == self.world)  # one host sync per step: the price of never stepping on NaN

    def run(self, signals: StopSignals | None = None) -> StageResult:
        """The loop. `signals` comes from `train()`, which listens from before setup; else it listens now."""
        recipe, accelerator = self.recipe, self.accelerator
        keep_ratio = 1.0 - recipe.reduction.mask_ratio
        flops_per_sample = train_flops_per_sample(self.model_cfg, self.geometry.image_size,
                                                  self.geometry.context_length, keep_ratio)
        tokens_per_sample = image_tokens(self.model_cfg, self.geometry.image_size, keep_ratio) \
            + self.geometry.context_length
        peak = device_peak_flops(accelerator.device.type)
        batch = recipe.train.global_batch_size
        log = RunLog(self.run_dir / "metrics.jsonl", self.total_steps, f"{self.stage} {recipe.name}",
                     start=self.step, enabled=self.main)
        if self.start_from is not None:
            log.message(f"resuming from {self.start_from}{' (--resume)' if self.explicit_resume else ''} at step "
                        f"{self.step}/{self.total_steps}"
                        + (f" (changed since: {', '.join(self.notes)})" if self.notes else ""))
        if self.replaced:
            log.message(f"note: {self.checkpoints.directory} holds newer checkpoints ({', '.join(self.replaced)}); "
                        "they are replaced or deleted as this run saves. After an interruption, rerun without "
                        "--resume to continue this run")
        resume_hint = (f"Resume by running the same command {'without --resume ' if self.explicit_resume else ''}"
                       f"again (same --out {self.run_dir}).")
        log.message(f"{self.stage}: {recipe.model.arch} at {self.geometry.image_size}px / "
                    f"{self.geometry.context_length} tokens, {self.total_steps} steps of {batch} = {self.micro} x "
                    f"{self.accumulation} accumulation x {self.world} process(es), {accelerator.device}, "
                    f"precision {precision_name(accelerator)}")

        max_log_scale = math.log(recipe.train.logit_scale_max)
        loss_sum, loss_count, last_loss = torch.zeros((), device=accelerator.device), 0, float("nan")
        window_steps, window_skipped, nonfinite_in_row, data_wait = 0, 0, 0, 0.0
        t_start = t_window = time.perf_counter()
        self.model.train()
        loader = self._loader()
        batches = iter(loader)
        with (StopSignals() if signals is None else contextlib.nullcontext(signals)) as signals:
            if stop := self._agreed_stop(signals):  # signalled during setup: nothing trained, nothing to save
                log.message(f"stopped by {stop} before step {self.step + 1}; nothing new to save. {resume_hint}")
                log.close()
                return self._result(time.perf_counter() - t_start, last_loss, stopped_by=stop)
            while self.step < self.total_steps:
                t_fetch = time.perf_counter()
                micro_batches = [_to_device(next(batches), accelerator.device) for _ in range(self.accumulation)]
                data_wait += time.perf_counter() - t_fetch
                keys, captured = self._prepare_queue_loss(micro_batches)
                loss = self.contrastive_step(micro_batches)
                if self._finite_update(loss):
                    self.optimizer.step()
                    self._advance_queues(keys, captured)
                    nonfinite_in_row = 0
                    loss_sum += loss.detach()
                    loss_count += 1
                else:  # skip the update; the step still counts, so the data and schedule move on
                    skip_scaled_update(accelerator.scaler, self.optimizer.optimizer, unscaled=self._clips())
                    nonfinite_in_row += 1
                    window_skipped += 1
                    self.skipped_total += 1
                step_lr = self.scheduler.get_last_lr()[0]  # the rate this step used, for the log
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                temperature = clamp_logit_scale(self.model, self.unwrapped, max_log_scale)  # valid under FSDP too
                self.step += 1
                window_steps += 1
                log.advance()
                if nonfinite_in_row >= recipe.train.max_nonfinite_steps:
                    log.close()
                    last_good = self.checkpoints.latest()
                    raise NonFiniteError(
                        f"train.max_nonfinite_steps: {nonfinite_in_row} steps in a row had a non-finite loss or "
                        f"gradient (steps {self.step - nonfinite_in_row + 1}-{self.step}); stopped without saving. "
                        f"Last good checkpoint: {last_good or 'none'}. Lower optim.lr, raise optim.warmup_steps or "
                        "set optim.grad_clip, then rerun the same command to resume")

                if self.step % recipe.train.log_every_steps == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    elapsed, t_window = now - t_window, now  # the log write below counts in the next window
                    # The host sync happens here, once per log step; each process's loss covers its
                    # own rows, so the mean over processes is the loss of the global batch.
                    mean = accelerator.reduce(loss_sum / max(loss_count, 1), reduction="mean").item()
                    last_loss = mean if loss_count else float("nan")
                    samples_per_s = window_steps * batch / elapsed
                    log.write({
                        "step": self.step, "samples": self.step * batch, "stage": self.stage,
                        "lr": step_lr, "loss": last_loss,
                        "logit_scale": temperature.item(),
                        "samples_per_s": samples_per_s, "tokens_per_s": samples_per_s * tokens_per_sample,
                        "tflops": samples_per_s * flops_per_sample / 1e12,
                        "mfu": samples_per_s * flops_per_sample / (peak * self.world) if peak else None,
                        "data_wait_frac": data_wait / elapsed, **loader.take_skipped(accelerator),
                        "skipped_steps": window_skipped,
                    }, f"step {self.step}/{self.total_steps} loss {last_loss:.4f} {samples_per_s:.0f} samples/s")
                    loss_sum.zero_()
                    loss_count, window_steps, window_skipped, data_wait = 0, 0, 0, 0.0
                if self.evaluates and recipe.eval.every_steps and self.step % recipe.eval.every_steps == 0 \
                        and self.step < self.total_steps:
                    self.evaluate(log)
                stop = self._agreed_stop(signals)
                every = recipe.checkpoint.every_steps
                # No periodic checkpoint inside a non-finite streak: "the last good checkpoint" then
                # predates the trouble, whatever caused it.
                periodic = every and self.step % every == 0 and self.step < self.total_steps and not nonfinite_in_row
                if stop or periodic:
                    saved = self.save_checkpoint(time.perf_counter() - t_start)
                if stop:
                    log.message(f"stopped by {stop} after step {self.step}/{self.total_steps}; checkpoint {saved}. "
                                + resume_hint)
                    log.close()
                    return self._result(time.perf_counter() - t_start, last_loss, stopped_by=stop)

        wall = time.perf_counter() - t_start
        self.save_checkpoint(wall)
        if self.main:
            export_open_clip(self.unwrapped, self.model_cfg, self.run_dir / "final")
        if self.evaluates:
            self.evaluate(log)
        accelerator.wait_for_everyone()
        log.message(f"{self.stage} done: {self.run_dir / 'final'}")
        log.close()
        return self._result(wall, last_loss)

    @property
    def evaluates(self) -> bool:
        return bool(self.recipe.eval.zeroshot or self.recipe.eval.retrieval)

    def evaluate(self, log: RunLog) -> dict:
        """The recipe's `[eval]` zero-shot and retrieval datasets on the current weights, on every process."""
        import open_clip

        from clipa.evaluate.models import LoadedModel
        from clipa.evaluate.retrieval import retrieval
        from clipa.evaluate.zeroshot import zeroshot

        loaded = LoadedModel(self.unwrapped, build_tokenizer(self.recipe.model.arch, self.geometry.context_length),
                             self.geometry.image_size, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD,
                             self.recipe.model.arch, str(self.run_dir))
        row = {"step": self.step, "samples": self.step * self.recipe.train.global_batch_size, "stage": self.stage}
        masker_was = self.masker.keep if self.masker else None
        for name in self.recipe.eval.zeroshot:
            result = zeroshot(loaded, name, self.recipe.eval.data_root or None)
            for metric in ("acc1", "acc5", "mean_per_class_recall"):
                row[f"zeroshot/{name}/{metric}"] = result["metrics"][metric]
            log.message(f"step {self.step}: zero-shot {name} acc1 {result['metrics']['acc1']:.4f} "
                        f"acc5 {result['metrics']['acc5']:.4f}")
        for name in self.recipe.eval.retrieval:
            result = retrieval(loaded, name, self.recipe.eval.retrieval_data_root or None)
            recalls = {k: v for k, v in result["metrics"].items() if "recall@" in k}
            row.update({f"retrieval/{name}/{k}": v for k, v in recalls.items()})
            log.message(f"step {self.step}: retrieval {name} image R@1 {recalls['image_retrieval_recall@1']:.4f} "
                        f"text R@1 {recalls['text_retrieval_recall@1']:.4f}")
        log.write(row)
        self.model.train()
        if self.masker:
            self.masker.use(masker_was)
        return row

    def _agreed_stop(self, signals: StopSignals) -> str | None:
        """All processes stop at the same step if any of them was signalled."""
        if self.world == 1:
            return signals.received
        flag = torch.tensor(1.0 if signals.received else 0.0, device=self.accelerator.device)
        if self.accelerator.reduce(flag, reduction="sum").item() > 0:
            return signals.received or "SIGTERM"
        return None

    def _result(self, wall: float, last_loss: float, stopped_by: str | None = None) -> StageResult:
        total = self.wall_before + wall
        samples = self.step * self.recipe.train.global_batch_size
        return StageResult(self.run_dir, self.step, samples, total, samples / total if total > 0 else 0.0,
                           last_loss, self.main, stopped_by, self.skipped_total)


def train(recipe: recipe_mod.Recipe, stage: str = "pretrain", out_dir: str | Path | None = None,
          resume: str | Path | None = None) -> StageResult:
    """Train one stage; returns where the run lives and how fast it went. Call again to resume."""
    # Listening from the start: a signal during setup, the final save, export or evaluation stops
    # (or lets finish) cleanly instead of raising KeyboardInterrupt; a second one exits at once.
    with StopSignals() as signals:
        return Trainer(recipe, stage, out_dir, resume).run(signals)
