"""One trainer for every stage: low-token pretraining and full-length finetuning alike.

The loop reads top to bottom: get the micro-batches of one step, forward + contrastive loss +
backward (exact over the global batch, clipa.train.step), check for non-finite values, clip, step,
clamp the temperature, log, checkpoint. A stage differs from another only by its recipe: the
geometry (image size, text length, masks) and where its weights start.

Resume order, written down once: an explicit `resume` checkpoint (it wins, so a run can roll back
to an earlier step; newer checkpoints of the run are replaced as it continues), else the run's own
newest checkpoint, else `init.checkpoint` (weights only, position embeddings resized), else random
initialisation.

A run never loses finished work: checkpoints are atomic (clipa.train.checkpoint); SIGTERM/SIGINT, from
setup to the final export, finish the current step, save and return (a second signal exits at
once); non-finite losses or gradients skip the update and, after `train.max_nonfinite_steps` in a
row, stop the run with the last good checkpoint intact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

from clipa.cost.accelerators import device_peak_flops
from clipa.data.loader import build_train_loader, check_resume_layout, loader_layout, resolve_workers
from clipa.data.spec import data_commands
from clipa.data.transforms import Normalize
from clipa.distributed import agreed, agreed_min, broadcast_value, fault_point, peer_lost
from clipa.errors import ClipaError, first_line
from clipa.model import published
from clipa.model.build import build_tokenizer, create_model
from clipa.model.masking import install_patch_masker
from clipa.model.towers import apply_locks, load_image_tower
from clipa.model.weights import export_open_clip, find_weights, load_weights, trained_mean_std
from clipa.recipe.checks import check_resume_compatible
from clipa.recipe.load import dumps
from clipa.recipe.schema import Recipe, image_mean_std
from clipa.reduction.text import TextReducer
from clipa.run.layout import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    FINAL_DIR,
    SHARDED_DIR,
    checkpoint_step,
    default_run_dir,
    read_run_recipe,
)
from clipa.run.lock import RunLock, mark_run_dir, open_run_file, write_run_file
from clipa.run.metrics import metrics_path
from clipa.stage import Stage
from clipa.train.checkpoint import CheckpointManager, load_state, set_rng_state
from clipa.train.fsdp import Fsdp
from clipa.train.handover import carry_optimizer_state
from clipa.train.loss import LOSSES
from clipa.train.metrics import MetricsWindow, RunLog
from clipa.train.optim import build_optimizer, build_scheduler
from clipa.train.preflight import preflight
from clipa.train.queue import FeatureQueues, MomentumEncoder, queue_infonce_loss
from clipa.train.signals import StopSignals, agreed_stop
from clipa.train.state import TrainState
from clipa.train.step import ContrastiveStep, clamp_logit_scale
from clipa.train.trackers import Trackers

STAGES = ("pretrain", "finetune")



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


def _accelerator(precision: str, timeout_s: int = 1800) -> Accelerator:
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    on_gpu = torch.cuda.is_available()
    if precision == "auto":
        precision = "bf16" if on_gpu else "fp32"
    if precision == "fp16" and not on_gpu:
        # accelerate has no fp16 autocast on CPU: it would train in fp32 while the log said fp16.
        raise ClipaError('train.precision: "fp16" needs a GPU (on CPU accelerate trains fp32 without saying so); '
                         'use "bf16" or "fp32" here')
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    # The process-group timeout bounds how long a process waits for a peer that is gone or stuck.
    return Accelerator(cpu=not on_gpu, mixed_precision=mixed,
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))])


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


def _to_device(batch, device, normalize: Normalize):
    images, texts, keep = batch
    images = normalize(images.to(device, non_blocking=True))
    keep = keep.to(device, non_blocking=True) if keep is not None else None
    return images, texts.to(device, non_blocking=True), keep


def _normalisation_note(recipe: Recipe, init: str) -> str | None:
    """A note when init.checkpoint's weights were trained with another image mean/std than data.normalize."""
    theirs = trained_mean_std(init)
    ours = [list(v) for v in image_mean_std(recipe.data)]
    if theirs is None or all(math.isclose(a, b, rel_tol=1e-6) for x, y in zip(theirs, ours) for a, b in zip(x, y)):
        return None
    return (f"init.checkpoint {init} was trained with image mean {theirs[0]} / std {theirs[1]}, data.normalize "
            f"(\"{recipe.data.normalize}\") is mean {ours[0]} / std {ours[1]}; the weights start with inputs they "
            "did not learn (set data.normalize to theirs to continue as they trained)")


def precision_name(accelerator: Accelerator) -> str:
    return {"no": "fp32"}.get(accelerator.mixed_precision, accelerator.mixed_precision)


def _prepare_run_dir(run_dir: Path) -> None:
    """Mark the (checked) run directory as clipa's and prove it writable, through no symbolic link."""
    try:
        mark_run_dir(run_dir)
        probe = run_dir / ".write-test"
        probe.unlink(missing_ok=True)  # a stale probe (or a link: unlink removes the link, not its target)
        os.close(open_run_file(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        probe.unlink()
    except OSError as err:
        raise ClipaError(f"--out: cannot write to {run_dir} ({err.strerror}); choose a writable directory") from None


class Trainer:
    """Assembles model, optimizer, data and checkpoints for one stage (`setup`), then runs the loop (`run`)."""

    def __init__(self, recipe: Recipe, stage: str, out_dir: str | Path | None = None,
                 resume: str | Path | None = None):
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}")
        self.recipe, self.stage = recipe, stage
        self.run_dir = Path(out_dir or default_run_dir(recipe.name))
        self.state = TrainState()
        self.lock: RunLock | None = None
        try:
            self.setup(resume)
        except BaseException:
            self.close()  # a failed setup leaves the run directory free
            raise

    def close(self) -> None:
        """Release the run directory (the OS also releases it if the process dies), and a process
        group of one that FSDP started."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if getattr(self, "fsdp", None) is not None:
            self.fsdp.close()

    @property
    def step(self) -> int:
        return self.state.step

    # ------------------------------------------------------------------ setup

    def setup(self, resume: str | Path | None = None) -> None:
        recipe = self.recipe
        self.spec = Stage.of(recipe)  # geometry, model config, steps, tokens and FLOPs of this stage
        self.geometry, self.model_cfg, self.total_steps = self.spec.geometry, self.spec.model_cfg, self.spec.steps
        # Before anything slow: a tokenizer that cannot load (e.g. Hugging Face without transformers)
        # or a text strategy it cannot do is a recipe error, reported in a second, not after the model.
        self.text_reducer = TextReducer(build_tokenizer(recipe.model.arch, self.geometry.context_length),
                                        recipe.reduction.text, self.geometry.context_length)
        self.accelerator = accelerator = _accelerator(recipe.train.precision, recipe.train.dist_timeout_s)
        if accelerator.distributed_type == DistributedType.FSDP:
            raise ClipaError("accelerate config: FSDP set in `accelerate config` is not how clipa shards; choose "
                             "multi-GPU there and set train.shard=fsdp in the recipe")
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        # FSDP's device mesh (and a group of one for a lone process) before any model exists.
        self.fsdp = Fsdp(accelerator.device, recipe.train.fsdp.cpu_offload, recipe.train.fsdp.reshard_after_forward) \
            if recipe.train.shard == "fsdp" else None
        self.main = accelerator.is_main_process
        if self.world > 1 and recipe.data.num_workers < 0:
            # "auto" is this process's share of its node's cores; nodes can differ, and streaming sources
            # split their shards by (process, worker): every process must use the same count.
            workers = agreed_min(resolve_workers(recipe.data.num_workers))
            recipe = self.recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data,
                                                                                         num_workers=workers))
        self.micro, self.accumulation = self.spec.layout(self.world)
        init_weights = self._find_start(resume)
        self.notes = []
        with agreed():  # reading weights and state can fail on one process only (its node's view of the files)
            fault_point("restore", self.rank)
            model, optimizer = self._build_model(init_weights)
            queue_state = self._restore(model, optimizer, self.start_from) if self.start_from is not None else None
            if self.start_from is None and recipe.init.optimizer_state:
                if self.fsdp is not None:
                    raise ClipaError("init.optimizer_state: not with train.shard=fsdp (the moments are sharded); "
                                     "set init.optimizer_state=false")
                self.notes.append(carry_optimizer_state(optimizer, recipe.init.checkpoint))
            self.config_text = dumps(recipe)
            if self.main:
                write_run_file(self.run_dir / CONFIG_FILE, self.config_text)
        self.start_step = self.state.step
        self.queues, self.momentum = self._build_queues(model, queue_state)
        if self.fsdp is not None:  # sharded already (_build_model); accelerate adds autocast only
            self.model, self.optimizer, self.unwrapped = model, optimizer, model
        else:
            self.model, self.optimizer = accelerator.prepare(model, optimizer)
            self.unwrapped = accelerator.unwrap_model(self.model)
        if recipe.train.compile:
            # Compiled after prepare, so dynamo sees DDP's buckets; weights are saved from `unwrapped`,
            # whose names carry no `_orig_mod.` prefix. Masks change values, never shapes, per stage:
            # one graph per grad mode, no recompilation per step.
            self.model = torch.compile(self.model)
        self.contrastive_step = ContrastiveStep(self.model, self.unwrapped, LOSSES[recipe.loss.kind], accelerator,
                                                self.masker, self.fsdp.micro_step if self.fsdp else None)

    def _find_start(self, resume) -> dict | None:
        """Where training starts (the resume order in the module docstring); returns where init weights are.

        Rank 0 alone owns the run directory (it checks and locks it) and decides where the run starts
        (verifying that checkpoint once); every process learns the decision, or the same error.
        """
        self.checkpoints = CheckpointManager(self.run_dir / CHECKPOINTS_DIR, self.recipe.checkpoint.keep_last, self.rank,
                                             self.accelerator.wait_for_everyone)
        self.explicit_resume = bool(resume)
        self.replaced: list[str] = []
        start_from, init_weights = None, None
        self.init_note = None
        with agreed():
            fault_point("setup", self.rank)
            if self.main:
                # The checks `clipa pretrain` / `finetune`, --dry-run and `clipa validate` run too.
                explicit = preflight(self.recipe, self.stage, self.run_dir, resume, numbers=self.spec).resume
                _prepare_run_dir(self.run_dir)
                self.lock = RunLock(self.run_dir).acquire()
                self.checkpoints.recover()
                # An explicit resume wins over the run's own checkpoints: that is how a run rolls back.
                start_from = explicit or self.checkpoints.latest(quarantine=True)
                self.replaced = [p.name for p in self.checkpoints.complete()
                                 if resume and checkpoint_step(p) > checkpoint_step(start_from)]
                if start_from is None and self.recipe.init.checkpoint:
                    init_weights = self.recipe.init.checkpoint
                    if published.parse(init_weights, "init.checkpoint") is None:
                        find_weights(init_weights)  # a local path that is wrong fails here, on every process
                        self.init_note = _normalisation_note(self.recipe, init_weights)
        self.start_from, init_weights = broadcast_value((start_from, init_weights))
        if init_weights is None:
            return None
        # Rank 0 reads first (a published name is downloaded into the shared cache once), then the
        # others; a file that fails on any process ends every process with the same line.
        weights = None
        for readers_turn in (self.main, not self.main):
            with agreed():
                if readers_turn:
                    weights = published.state_dict(init_weights, "init.checkpoint")
        return weights

    def _build_model(self, init_weights: dict | None):
        recipe = self.recipe
        if self.accelerator.device.type == "cpu":
            # Weights and activations drifting into denormal range make CPU matmuls many times slower.
            torch.set_flush_denormal(True)
        set_seed(recipe.train.seed)
        model = create_model(self.model_cfg)
        if init_weights is not None:
            load_weights(model, init_weights)
        if self.start_from is None and recipe.model.image_init:
            # Published weights: the first process downloads into the shared cache, the others then read it.
            with self.accelerator.main_process_first():
                load_image_tower(model, recipe.model.image_init, self.model_cfg["vision_cfg"].get("timm_model_name", ""))
        apply_locks(model, recipe.model)
        self.masker = install_patch_masker(model, recipe.reduction.image, recipe.reduction.mask_ratio)
        if recipe.train.grad_checkpointing:
            model.set_grad_checkpointing(True)
        if self.main:  # a checkpoint holds the weights and AdamW's two moments, all fp32
            self.checkpoints.check_free_space(3 * 4 * sum(p.numel() for p in model.parameters()))
        if self.fsdp is not None:  # the optimizer must hold the sharded parameters, so it comes after
            self.fsdp.shard(model)
        optimizer = build_optimizer(model, recipe.optim)
        self.scheduler = build_scheduler(optimizer, recipe.optim, self.total_steps)
        return model, optimizer

    def _restore(self, model, optimizer, checkpoint: Path) -> dict | None:
        """Load the training state; returns the queue state, applied once the queues exist."""
        self.notes = check_resume_compatible(self.recipe, read_run_recipe(checkpoint), checkpoint)
        model_state, state, rng = load_state(checkpoint, self.rank)
        if self.fsdp is not None:  # train.shard is fixed on resume: a sharded checkpoint, at any process count
            self.fsdp.load(optimizer, checkpoint / SHARDED_DIR)
        else:
            model.load_state_dict(model_state)
            optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.state.load_state_dict(state)
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

    # ------------------------------------------------------------------ the loop

    def run(self, signals: StopSignals | None = None) -> StageResult:
        """The loop. `signals` comes from `train()`, which listens from before setup; else it listens now.
        The run directory's lock is released when the loop ends, however it ends."""
        try:
            return self._run(signals)
        except Exception as err:
            if self.world > 1 and peer_lost(err):
                # Another process died or raised mid-step; this one learns of it as a gloo/NCCL error in
                # the next collective. Its own log has the cause; this process's report is one line.
                raise ClipaError(f"process {self.rank}: another process of this run stopped during step "
                                 f"{self.state.step + 1} ({first_line(err, 120)}); its log says why. Last "
                                 f"checkpoint: {self.checkpoints.latest() or 'none'}. {self._resume_hint}") from None
            raise
        finally:
            self.close()

    def _run(self, signals: StopSignals | None) -> StageResult:
        recipe, accelerator, state = self.recipe, self.accelerator, self.state
        log = self._open_log()
        max_log_scale = math.log(recipe.train.logit_scale_max)
        window = MetricsWindow(accelerator.device)
        normalize = Normalize(*image_mean_std(recipe.data))  # data.normalize, on the device, one op per batch
        t_start = time.perf_counter()
        self.model.train()
        loader = self._loader()
        batches = iter(loader)
        with (StopSignals() if signals is None else contextlib.nullcontext(signals)) as signals:
            if stop := agreed_stop(signals, accelerator):  # signalled during setup: nothing trained, nothing to save
                log.message(f"stopped by {stop} before step {state.step + 1}; nothing new to save. {self._resume_hint}")
                log.close()
                return self._result(time.perf_counter() - t_start, window.last_loss, stopped_by=stop)
            while state.step < self.total_steps:
                t_fetch = time.perf_counter()
                micro_batches = [_to_device(next(batches), accelerator.device, normalize) for _ in range(self.accumulation)]
                window.data_wait += time.perf_counter() - t_fetch
                loss_fn, after_update = self._queue_loss(micro_batches)
                loss = self.contrastive_step(micro_batches, loss_fn)
                finite = self._finite_update(loss)
                if finite:
                    self.optimizer.step()
                    after_update()
                else:  # skip the update; the step still counts, so the data and schedule move on
                    skip_scaled_update(accelerator.scaler, getattr(self.optimizer, "optimizer", self.optimizer),
                                       unscaled=self._clips())
                step_lr = self.scheduler.get_last_lr()[0]  # the rate this step used, for the log
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                temperature = clamp_logit_scale(self.unwrapped, max_log_scale)
                state.finished(finite)
                fault_point(f"step{state.step}", self.rank)
                window.step(loss, finite)
                log.advance()
                self._stop_if_nonfinite(log)
                if state.step % recipe.train.log_every_steps == 0 or state.step == self.total_steps:
                    self._log_window(log, window, loader, step_lr, temperature)
                if self.evaluates and recipe.eval.every_steps and state.step % recipe.eval.every_steps == 0 \
                        and state.step < self.total_steps:
                    self.evaluate(log)
                if stop := self._checkpoint_or_stop(signals, log, time.perf_counter() - t_start):
                    return self._result(time.perf_counter() - t_start, window.last_loss, stopped_by=stop)
        return self._finish(log, time.perf_counter() - t_start, window.last_loss)

    def _open_log(self) -> RunLog:
        metrics = metrics_path(self.run_dir)
        trackers = Trackers(self.recipe, self.stage, self.run_dir, metrics) if self.main and self.recipe.log.trackers \
            else None
        log = RunLog(metrics, self.total_steps, f"{self.stage} {self.recipe.name}", start=self.state.step,
                     enabled=self.main, trackers=trackers)
        # a recipe can run commands, like a Makefile
        for command in data_commands(self.recipe.data.train, timeout=self.recipe.data.read_timeout_s):
            log.message(f"data.train runs: {command}")
        for note in self.checkpoints.moved_aside:
            log.message(f"note: {note}")
        if self.init_note and self.start_from is None:
            log.message(f"note: {self.init_note}")
        if self.start_from is None:
            for note in self.notes:  # what a finetune took over besides the weights
                log.message(note)
        if self.lock is not None and self.lock.took_over:
            log.message(f"note: took over {self.run_dir}'s lock from {self.lock.took_over}, which is gone")
        if self.start_from is not None:
            log.message(f"resuming from {self.start_from}{' (--resume)' if self.explicit_resume else ''} at step "
                        f"{self.state.step}/{self.total_steps}"
                        + (f" (changed since: {', '.join(self.notes)})" if self.notes else ""))
        if self.replaced:
            log.message(f"note: {self.checkpoints.directory} holds newer checkpoints ({', '.join(self.replaced)}); "
                        "they are replaced or deleted as this run saves. After an interruption, rerun without "
                        "--resume to continue this run")
        log.message(f"{self.stage}: {self.recipe.model.arch} at {self.geometry.image_size}px / "
                    f"{self.geometry.context_length} tokens, {self.total_steps} steps of {self.spec.global_batch} = "
                    f"{self.micro} x {self.accumulation} accumulation x {self.world} process(es){self._nodes}, "
                    f"{self.accelerator.device}, precision {precision_name(self.accelerator)}")
        return log

    @property
    def _nodes(self) -> str:
        """' on N nodes (M per node)' when the launcher (torchrun, accelerate) spread the processes over
        several machines, else nothing."""
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or self.world)
        return f" on {self.world // per_node} nodes ({per_node} per node)" if 0 < per_node < self.world else ""

    @property
    def _resume_hint(self) -> str:
        return (f"Resume by running the same command {'without --resume ' if self.explicit_resume else ''}"
                f"again (same --out {self.run_dir}).")

    def _queue_loss(self, micro_batches):
        """This step's loss function and what to do after its update: with queues, momentum keys
        (computed before the online forward) and the queue's negatives join the InfoNCE columns."""
        if self.queues is None:
            return None, lambda: None
        keys = self.momentum.keys(micro_batches, self.accelerator.autocast) if self.momentum else None
        negatives = self.queues.negatives(self.state.step, self.recipe.loss.queue.warmup_steps)
        captured: list = []

        def loss_fn(images, texts, scale, bias=None):
            return queue_infonce_loss(images, texts, scale, keys, negatives, captured)

        def after_update() -> None:  # EMA update, then enqueue the step's keys (or online features)
            if self.momentum is not None:
                self.momentum.update(self.unwrapped)
                self.queues.enqueue(*keys)
            else:
                self.queues.enqueue(*captured)
        return loss_fn, after_update

    def _clips(self) -> bool:
        """Whether `_finite_update` goes through accelerate's clip (which unscales fp16 gradients)."""
        return bool(self.recipe.optim.grad_clip) and self.fsdp is None

    def _finite_update(self, loss: torch.Tensor) -> bool:
        """Clip (if asked) and report whether loss and gradients are finite, agreed by all processes."""
        if self.fsdp is not None:  # the norm over every process's shards
            grad_norm = self.fsdp.clip_grad_norm_(self.recipe.optim.grad_clip) if self.recipe.optim.grad_clip \
                else self.fsdp.grad_norm()
        elif self._clips():
            grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(),
                                                         self.recipe.optim.grad_clip or float("inf"))
        else:  # the norm only: clipping at infinity would still rescale every gradient by 1.0
            grad_norm = _total_grad_norm(self.model.parameters())
        finite = torch.isfinite(loss.detach().float()) & torch.isfinite(torch.as_tensor(grad_norm).float())
        finite = self.accelerator.reduce(finite.float().to(self.accelerator.device), reduction="sum")
        return bool(finite.item() == self.world)  # one host sync per step: the price of never stepping on NaN

    def _stop_if_nonfinite(self, log: RunLog) -> None:
        streak, step = self.state.nonfinite_in_row, self.state.step
        if streak >= self.recipe.train.max_nonfinite_steps:
            log.close()
            raise NonFiniteError(
                f"train.max_nonfinite_steps: {streak} steps in a row had a non-finite loss or "
                f"gradient (steps {step - streak + 1}-{step}); stopped without saving. "
                f"Last good checkpoint: {self.checkpoints.latest() or 'none'}. Lower optim.lr, raise "
                "optim.warmup_steps or set optim.grad_clip, then rerun the same command to resume")

    def _log_window(self, log: RunLog, window: MetricsWindow, loader, lr: float, temperature) -> None:
        step, batch = self.state.step, self.spec.global_batch
        stats = window.row(self.accelerator, batch, self.spec.tokens_per_sample, self.spec.flops_per_sample,
                           device_peak_flops(self.accelerator.device.type))
        log.write({"step": step, "samples": step * batch, "stage": self.stage, "lr": lr, "loss": stats["loss"],
                   "logit_scale": temperature.item(), **stats, **loader.take_skipped(self.accelerator)},
                  f"step {step}/{self.total_steps} loss {stats['loss']:.4f} {stats['samples_per_s']:.0f} samples/s")

    def _checkpoint_or_stop(self, signals: StopSignals, log: RunLog, elapsed: float) -> str | None:
        """Save on schedule or when signalled; returns the signal's name when the run must stop."""
        stop, step, every = agreed_stop(signals, self.accelerator), self.state.step, self.recipe.checkpoint.every_steps
        # No periodic checkpoint inside a non-finite streak: "the last good checkpoint" then
        # predates the trouble, whatever caused it.
        periodic = every and step % every == 0 and step < self.total_steps and not self.state.nonfinite_in_row
        if stop or periodic:
            saved = self.save_checkpoint(elapsed)
        if stop:
            log.message(f"stopped by {stop} after step {step}/{self.total_steps}; checkpoint {saved}. "
                        + self._resume_hint)
            log.close()
        return stop

    def _finish(self, log: RunLog, wall: float, last_loss: float) -> StageResult:
        saved = self.save_checkpoint(wall)
        # Under FSDP every process sends its shards to process 0, which writes the whole model.
        full_state = self.fsdp.full_model_state() if self.fsdp is not None else None
        if self.main:  # final/ gets the same model card as `clipa export` writes
            from clipa.model.card import model_card

            card = model_card(Path(saved), self.recipe, self.model_cfg,
                              sum(p.numel() for p in self.unwrapped.parameters()), self.run_dir / FINAL_DIR)
            export_open_clip(self.unwrapped, self.model_cfg, self.run_dir / FINAL_DIR, readme=card, state_dict=full_state,
                             data=self.recipe.data)
        if self.evaluates:
            self.evaluate(log)
        self.accelerator.wait_for_everyone()
        log.message(f"{self.stage} done: {self.run_dir / FINAL_DIR}")
        log.close()
        return self._result(wall, last_loss)

    def _loader(self):
        mask = (self.masker.strategy, self.masker.grid, self.masker.mask_ratio) if self.masker else None
        step = self.state.step
        return build_train_loader(self.recipe, self.geometry, self.text_reducer, micro_batch=self.micro,
                                  processes=self.world, rank=self.rank, start_batch=step * self.accumulation,
                                  num_batches=(self.total_steps - step) * self.accumulation, mask=mask)

    # ------------------------------------------------------------------ checkpoints, evaluation, result

    def save_checkpoint(self, elapsed: float) -> Path:
        own = self.start_from is not None and self.start_from.parent.resolve() == self.checkpoints.directory.resolve()
        if own and self.state.step == self.start_step:
            # Nothing trained since this very checkpoint was loaded (a run resumed at its end):
            # rewriting it could only risk it, e.g. a kill mid-write with keep_last = 1.
            return self.start_from
        scaler, step = self.accelerator.scaler, self.state.step
        # Under FSDP the optimizer state is sharded: it goes with the model into the DCP shards.
        optimizer_state = self.optimizer.state_dict() if self.fsdp is None else None
        state = {"optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None,
                 **self.state.state_dict(elapsed), "samples": step * self.spec.global_batch,
                 "data_position": {"micro_batch": step * self.accumulation,
                                   **loader_layout(self.recipe.data, self.world, self.micro)},
                 "queue": self._queue_state()}
        if self.fsdp is not None:
            return self.checkpoints.save(step, None, state if self.main else None, self.config_text,
                                         rolled_back=self.explicit_resume,
                                         write_shards=lambda directory: self.fsdp.save(self.optimizer, directory))
        return self.checkpoints.save(step, self.unwrapped.state_dict() if self.main else None,
                                     state if self.main else None, self.config_text, rolled_back=self.explicit_resume)

    def _queue_state(self) -> dict | None:
        if self.queues is None:
            return None
        return {"queues": self.queues.state_dict(),
                "momentum": self.momentum.model.state_dict() if self.momentum is not None else None}

    @property
    def evaluates(self) -> bool:
        return bool(self.recipe.eval.zeroshot or self.recipe.eval.retrieval)

    def evaluate(self, log: RunLog) -> dict:
        """The recipe's `[eval]` zero-shot and retrieval datasets on the current weights, on every process."""
        from clipa.evaluate.models import LoadedModel
        from clipa.evaluate.retrieval import retrieval
        from clipa.evaluate.zeroshot import zeroshot

        # Under FSDP evaluation runs on a whole copy on every process (each evaluates its share of the data,
        # unequal in batches, which sharded forwards could not be); it lives for this evaluation only.
        model = self.fsdp.whole_copy(lambda: create_model(self.model_cfg)) if self.fsdp is not None else self.unwrapped
        loaded = LoadedModel(model, build_tokenizer(self.recipe.model.arch, self.geometry.context_length),
                             self.geometry.image_size, *image_mean_std(self.recipe.data), self.recipe.model.arch,
                             str(self.run_dir), interpolation=self.recipe.data.augment.interpolation)
        row = {"step": self.step, "samples": self.step * self.spec.global_batch, "stage": self.stage}
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

    def _result(self, wall: float, last_loss: float, stopped_by: str | None = None) -> StageResult:
        total = self.state.wall_before + wall
        samples = self.state.step * self.spec.global_batch
        return StageResult(self.run_dir, self.state.step, samples, total, samples / total if total > 0 else 0.0,
                           last_loss, self.main, stopped_by, self.state.skipped_steps)


def train(recipe: Recipe, stage: str = "pretrain", out_dir: str | Path | None = None,
          resume: str | Path | None = None) -> StageResult:
    """Train one stage; returns where the run lives and how fast it went. Call again to resume."""
    # Listening from the start: a signal during setup, the final save, export or evaluation stops
    # (or lets finish) cleanly instead of raising KeyboardInterrupt; a second one exits at once.
    with StopSignals() as signals:
        trainer = Trainer(recipe, stage, out_dir, resume)
        try:
            return trainer.run(signals)
        finally:
            trainer.close()
