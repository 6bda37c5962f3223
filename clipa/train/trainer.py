"""One trainer for every stage: low-token pretraining and full-length finetuning alike.

The loop reads top to bottom: fetch the micro-batches of one step, forward + contrastive loss + backward
(exact over the global batch, clipa.train.step), update (clip, and step unless a loss or gradient is
non-finite; clamp the temperature), then log, evaluate and checkpoint, each when its component says it is
due. A stage differs from another only by its recipe: the geometry (image size, text length, masks) and
where its weights start. DDP or FSDP is chosen once (clipa.train.parallel); the loop never asks which.

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
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import set_seed

from clipa.cost.accelerators import device_peak_flops
from clipa.data.loader import DataPosition, build_train_loader, resolve_workers
from clipa.data.spec import data_commands
from clipa.data.transforms import Normalize
from clipa.distributed import agreed, agreed_min, broadcast_value, fault_point, peer_lost, processes_per_node
from clipa.errors import ClipaError, first_line
from clipa.model import published
from clipa.model.build import build_tokenizer, create_model
from clipa.model.masking import install_patch_masker
from clipa.model.towers import apply_locks, load_image_tower
from clipa.model.weights import export_open_clip, find_weights, load_weights
from clipa.recipe.checks import check_resume_compatible
from clipa.recipe.load import dumps
from clipa.recipe.schema import Recipe, image_mean_std
from clipa.reduction.text import TextReducer
from clipa.run.layout import CHECKPOINTS_DIR, CONFIG_FILE, FINAL_DIR, checkpoint_step, default_run_dir, read_run_recipe
from clipa.run.lock import RunLock, prepare_run_dir, write_run_file
from clipa.run.metrics import metrics_path
from clipa.stage import Stage
from clipa.train import parallel
from clipa.train.checkpoint import CheckpointManager, ProcessRng
from clipa.train.evaluation import Evaluator
from clipa.train.loss import LOSSES
from clipa.train.metrics import MetricsWindow, RunLog
from clipa.train.optim import build_optimizer, build_scheduler
from clipa.train.preflight import normalisation_note, preflight
from clipa.train.queue import QueuedNegatives
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


def _to_device(batch, device, normalize: Normalize):
    images, texts, keep = batch
    images = normalize(images.to(device, non_blocking=True))
    keep = keep.to(device, non_blocking=True) if keep is not None else None
    return images, texts.to(device, non_blocking=True), keep


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
        self.parallel = None
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
        if self.parallel is not None:
            self.parallel.close()

    @property
    def step(self) -> int:
        return self.state.step

    # ------------------------------------------------------------------ setup

    def setup(self, resume: str | Path | None = None) -> None:
        recipe = self.recipe
        self.numbers = Stage.of(recipe)  # geometry, model config, steps, tokens and FLOPs of this stage
        self.geometry, self.model_cfg, self.total_steps = self.numbers.geometry, self.numbers.model_cfg, self.numbers.steps
        self.state.global_batch = self.numbers.global_batch
        # Before anything slow: a tokenizer that cannot load (e.g. Hugging Face without transformers)
        # or a text strategy it cannot do is a recipe error, reported in a second, not after the model.
        self.text_reducer = TextReducer(build_tokenizer(recipe.model.arch, self.geometry.context_length),
                                        recipe.reduction.text, self.geometry.context_length)
        self.accelerator = accelerator = parallel.make_accelerator(recipe.train.precision, recipe.train.dist_timeout_s)
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.parallel = parallel.parallelism(recipe, accelerator)  # DDP or FSDP, once, before any model exists
        self.main = accelerator.is_main_process
        if self.world > 1 and recipe.data.num_workers < 0:
            # "auto" is this process's share of its node's cores; nodes can differ, and streaming sources
            # split their shards by (process, worker): every process must use the same count.
            workers = agreed_min(resolve_workers(recipe.data.num_workers))
            recipe = self.recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data,
                                                                                         num_workers=workers))
        self.micro, self.accumulation = self.numbers.layout(self.world)
        init_weights = self._find_start(resume)
        self.notes = []
        with agreed():  # reading weights and state can fail on one process only (its node's view of the files)
            fault_point("restore", self.rank)
            model, optimizer = self._build_model(init_weights)
            self.queue = QueuedNegatives(recipe.loss.queue, self.model_cfg["embed_dim"], accelerator.device, model)
            position = DataPosition(recipe.data, self.world, self.micro, lambda: self.state.step * self.accumulation,
                                    self.main)
            # What a checkpoint holds, in the order it is saved and restored; clipa.train.checkpoint knows the files.
            self.checkpoints.register(dumps(recipe), **self.parallel.checkpoint_parts(optimizer),
                                      scheduler=self.scheduler, scaler=accelerator.scaler, train=self.state,
                                      data_position=position, queue=self.queue, rng=ProcessRng())
            if self.start_from is not None:
                self.notes = check_resume_compatible(recipe, read_run_recipe(self.start_from), self.start_from)
                self.checkpoints.restore(self.start_from)
            elif recipe.init.optimizer_state:
                self.notes.append(self.parallel.carry_optimizer_state(optimizer, recipe.init.checkpoint))
            if self.main:
                write_run_file(self.run_dir / CONFIG_FILE, self.checkpoints.config_text)
        self.model, self.optimizer, self.unwrapped = self.parallel.wrap(model, optimizer, recipe.train.compile)
        self.contrastive_step = ContrastiveStep(self.model, self.unwrapped, LOSSES[recipe.loss.kind], accelerator,
                                                self.masker, self.parallel.micro_step)
        self.evaluator = Evaluator(recipe, self.stage, self.numbers, self.run_dir, self.parallel, self.model, self.masker)

    def _find_start(self, resume) -> dict | None:
        """Where training starts (the resume order in the module docstring); returns where init weights are.

        Rank 0 alone owns the run directory (it checks and locks it) and decides where the run starts
        (verifying that checkpoint once); every process learns the decision, or the same error.
        """
        self.checkpoints = CheckpointManager(self.run_dir / CHECKPOINTS_DIR, self.recipe.checkpoint.keep_last, self.rank,
                                             self.accelerator.wait_for_everyone,
                                             every_steps=self.recipe.checkpoint.every_steps, last_step=self.total_steps,
                                             rolled_back=bool(resume))
        self.explicit_resume = bool(resume)
        self.replaced: list[str] = []
        start_from, init_weights = None, None
        self.init_note = None
        with agreed():
            fault_point("setup", self.rank)
            if self.main:
                # The checks `clipa pretrain` / `finetune`, --dry-run and `clipa validate` run too.
                explicit = preflight(self.recipe, self.stage, self.run_dir, resume, numbers=self.numbers).resume
                prepare_run_dir(self.run_dir)
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
                        self.init_note = normalisation_note(self.recipe, init_weights)
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
        model = self.parallel.shard(model)  # the optimizer must hold the parameters the run steps: after this
        optimizer = build_optimizer(model, recipe.optim)
        self.scheduler = build_scheduler(optimizer, recipe.optim, self.total_steps)
        return model, optimizer

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
        accelerator, state = self.accelerator, self.state
        log = self._open_log()
        window = MetricsWindow(accelerator.device)
        normalize = Normalize(*image_mean_std(self.recipe.data))  # data.normalize, on the device, one op per batch
        state.start_clock()
        self.model.train()
        loader = self._loader()
        batches = iter(loader)
        with (StopSignals() if signals is None else contextlib.nullcontext(signals)) as signals:
            if stop := agreed_stop(signals, accelerator):  # signalled during setup: nothing trained, nothing to save
                log.message(f"stopped by {stop} before step {state.step + 1}; nothing new to save. {self._resume_hint}")
                log.close()
                return self._result(window.last_loss, stopped_by=stop)
            while state.step < self.total_steps:
                t_fetch = time.perf_counter()
                micro_batches = [_to_device(next(batches), accelerator.device, normalize) for _ in range(self.accumulation)]
                window.data_wait += time.perf_counter() - t_fetch
                loss_fn, after_update = self.queue.step_loss(micro_batches, state.step, self.unwrapped,
                                                             accelerator.autocast)
                loss = self.contrastive_step(micro_batches, loss_fn)
                finite, lr, temperature = self._update(loss, after_update)
                state.finished(finite)
                fault_point(f"step{state.step}", self.rank)
                window.step(loss, finite)
                log.advance()
                self._stop_if_nonfinite(log)
                if log.due(state.step):
                    self._log_window(log, window, loader, lr, temperature)
                if self.evaluator.due(state.step):
                    self.evaluator(log, state.step)
                if stop := self._checkpoint_or_stop(signals, log):
                    return self._result(window.last_loss, stopped_by=stop)
        return self._finish(log, window.last_loss)

    def _update(self, loss: torch.Tensor, after_update) -> tuple[bool, float, torch.Tensor]:
        """Clip (if asked), then step unless the loss or a gradient is non-finite on any process; the step
        counts either way (data and schedule move on). Returns whether it updated, the learning rate it
        used (for the log) and the clamped temperature."""
        grad_norm = self.parallel.clip_and_norm()
        finite = torch.isfinite(loss.detach().float()) & torch.isfinite(torch.as_tensor(grad_norm).float())
        finite = self.accelerator.reduce(finite.float().to(self.accelerator.device), reduction="sum")
        finite = bool(finite.item() == self.world)  # one host sync per step: the price of never stepping on NaN
        if finite:
            self.optimizer.step()
            after_update()
        else:
            self.parallel.skip_step(self.optimizer)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return finite, lr, clamp_logit_scale(self.unwrapped, math.log(self.recipe.train.logit_scale_max))

    def _open_log(self) -> RunLog:
        metrics = metrics_path(self.run_dir)
        trackers = Trackers(self.recipe, self.stage, self.run_dir) if self.main and self.recipe.log.trackers \
            else None
        log = RunLog(metrics, self.total_steps, f"{self.stage} {self.recipe.name}", start=self.state.step,
                     enabled=self.main, trackers=trackers, every=self.recipe.train.log_every_steps)
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
        log.message(f"{self.stage}: {self.recipe.model.arch} at {self.numbers.shape}, "
                    f"{self.total_steps} steps of {self.numbers.global_batch} = "
                    f"{self.micro} x {self.accumulation} accumulation x {self.world} process(es){self._nodes}, "
                    f"{self.accelerator.device}, precision {parallel.precision_name(self.accelerator)}")
        return log

    @property
    def _nodes(self) -> str:
        """' on N nodes (M per node)' when the launcher (torchrun, accelerate) spread the processes over
        several machines, else nothing."""
        per_node = processes_per_node(self.world)
        return f" on {self.world // per_node} nodes ({per_node} per node)" if 0 < per_node < self.world else ""

    @property
    def _resume_hint(self) -> str:
        return (f"Resume by running the same command {'without --resume ' if self.explicit_resume else ''}"
                f"again (same --out {self.run_dir}).")

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
        step, batch = self.state.step, self.numbers.global_batch
        stats = window.row(self.accelerator, batch, self.numbers.tokens_per_sample, self.numbers.flops_per_sample,
                           device_peak_flops(self.accelerator.device.type))
        log.write({"step": step, "samples": step * batch, "stage": self.stage, "lr": lr, "loss": stats["loss"],
                   "logit_scale": temperature.item(), **stats, **loader.take_skipped(self.accelerator)},
                  f"step {step}/{self.total_steps} loss {stats['loss']:.4f} {stats['samples_per_s']:.0f} samples/s")

    def _checkpoint_or_stop(self, signals: StopSignals, log: RunLog) -> str | None:
        """Save when due or when signalled; returns the signal's name when the run must stop."""
        stop, step = agreed_stop(signals, self.accelerator), self.state.step
        if stop or self.checkpoints.due(step, self.state.nonfinite_in_row):
            saved = self.checkpoints.save(step)
        if stop:
            log.message(f"stopped by {stop} after step {step}/{self.total_steps}; checkpoint {saved}. "
                        + self._resume_hint)
            log.close()
        return stop

    def _finish(self, log: RunLog, last_loss: float) -> StageResult:
        self.state.stop_clock()  # the last checkpoint and the result count the same training time
        saved = self.checkpoints.save(self.state.step)
        weights = self.parallel.full_model_state()  # under FSDP every process sends its shards to process 0
        if self.main:  # final/ gets the same model card as `clipa export` writes
            from clipa.model.card import model_card

            card = model_card(Path(saved), self.recipe, self.model_cfg,
                              sum(p.numel() for p in self.unwrapped.parameters()), self.run_dir / FINAL_DIR)
            export_open_clip(self.unwrapped, self.model_cfg, self.run_dir / FINAL_DIR, readme=card, state_dict=weights,
                             data=self.recipe.data)
        if self.evaluator.enabled:
            self.evaluator(log, self.state.step)
        self.accelerator.wait_for_everyone()
        log.message(f"{self.stage} done: {self.run_dir / FINAL_DIR}")
        log.close()
        return self._result(last_loss)

    def _loader(self):
        mask = (self.masker.strategy, self.masker.grid, self.masker.mask_ratio) if self.masker else None
        step = self.state.step
        return build_train_loader(self.recipe, self.geometry, self.text_reducer, micro_batch=self.micro,
                                  processes=self.world, rank=self.rank, start_batch=step * self.accumulation,
                                  num_batches=(self.total_steps - step) * self.accumulation, mask=mask)

    def _result(self, last_loss: float, stopped_by: str | None = None) -> StageResult:
        total = self.state.wall_before + self.state.elapsed()
        samples = self.state.step * self.numbers.global_batch
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
