"""Checks that need nothing but the recipe: each table's values, the batch layout over the processes,
and what may not change when a run resumes. Each failure is one `ClipaError` naming the key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from clipa.errors import ClipaError, did_you_mean, shown
from clipa.recipe.schema import (
    IMAGE_STRATEGIES,
    INTERPOLATIONS,
    LOSS_KINDS,
    NORMALIZE_CHOICES,
    POS_EMBEDS,
    PRECISIONS,
    QUEUE_KINDS,
    RETRIEVAL_DATASETS,
    SCHEDULES,
    SHARDS,
    TEXT_STRATEGIES,
    ZEROSHOT_DATASETS,
    DataConfig,
    EvalConfig,
    FsdpConfig,
    LogConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    Recipe,
    ReductionConfig,
    TrainConfig,
)
from clipa.reduction.image import IMAGE_MASKS

_NAME = re.compile(r"(?!\.+\Z)[A-Za-z0-9._-]{1,200}")  # fullmatch: "$" would let a final newline in


def _one_of(path: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ClipaError(f"{path}: unknown value {shown(value)}{did_you_mean(value, allowed)} (allowed: {', '.join(allowed)})")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ClipaError(message)


def validate(recipe: Recipe) -> None:
    """Checks that need nothing but the recipe itself, table by table; the first failure is raised."""
    _check_name(recipe.name)
    _check_model(recipe.model)
    _check_data(recipe.data)
    _check_reduction(recipe.reduction)
    _check_optim(recipe.optim)
    _check_train(recipe.train)
    _check_logit_scale_init(recipe.model.logit_scale_init, recipe.train.logit_scale_max)
    _check_loss(recipe.loss, recipe.train.global_batch_size)
    _check_shard(recipe)
    _check(recipe.checkpoint.every_steps >= 0,
           f"checkpoint.every_steps: must be >= 0 (0 = only at the end), got {recipe.checkpoint.every_steps}")
    _check(recipe.checkpoint.keep_last >= 1, f"checkpoint.keep_last: must be >= 1, got {recipe.checkpoint.keep_last}")
    _check_eval(recipe.eval)
    _check_log(recipe.log)
    _check(not recipe.init.optimizer_state or bool(recipe.init.checkpoint),
           "init.optimizer_state: takes the optimizer's moments from init.checkpoint, which is empty; set "
           "init.checkpoint=runs/NAME or init.optimizer_state=false")


def _check_name(name: str) -> None:
    # The run directory defaults to runs/<name>: a separator, "..", or an absolute path would put
    # it (and what clipa writes and replaces there) anywhere on the disk.
    _check(name == "" or bool(_NAME.fullmatch(name)),
           f"name: {shown(name)} is not a plain name; use letters, digits, '.', '_' and '-' (no path "
           "separators, no \"..\"), and --out to choose where the run directory goes")


def _check_model(m: ModelConfig) -> None:
    _check(bool(m.arch), "model.arch: empty; set an open_clip architecture such as \"ViT-B-16\" or \"clipa-tiny\"")
    _check(m.lock_image_unlocked_groups >= 0, "model.lock_image_unlocked_groups: must be >= 0")
    _one_of("model.pos_embed", m.pos_embed, POS_EMBEDS)
    _check(m.lock_text_unlocked_groups >= 0, "model.lock_text_unlocked_groups: must be >= 0")
    _check(not (m.lock_image and m.lock_text and not m.lock_image_unlocked_groups
                and not m.lock_text_unlocked_groups),
           "model.lock_image, model.lock_text: both towers fully locked leaves nothing to train; unlock one")


def _check_data(d: DataConfig) -> None:
    _check(d.num_workers >= -1, f"data.num_workers: must be >= 0 (0 = in the training process) or -1 for "
           f"auto, got {d.num_workers}")
    from clipa.data.spec import parse_train  # torch-free: checks the syntax only, paths are read later

    parse_train(d.train)
    _check(d.shuffle_buffer >= 0, f"data.shuffle_buffer: must be >= 0 (0 = off), got {d.shuffle_buffer}")
    _check(d.interleave >= 1, f"data.interleave: must be >= 1 (1 = one shard at a time), got {d.interleave}")
    _check(d.caption_key.strip() not in ("", "json", "json:"),
           f"data.caption_key: {shown(d.caption_key)} names no caption; use \"txt\" or \"json:FIELD\"")
    _check(bool(d.csv_image_key), "data.csv_image_key: empty; set the CSV column holding image paths, "
           "e.g. \"filepath\"")
    _check(bool(d.csv_caption_key), "data.csv_caption_key: empty; set the CSV column holding captions, "
           "e.g. \"title\"")
    _check(len(d.csv_separator) <= 1, f"data.csv_separator: expected one character or \"\" (by extension), "
           f"got {shown(d.csv_separator)}; write a tab as \"\\t\"")
    _check(0 < d.read_timeout_s <= 86400, f"data.read_timeout_s: must be in (0, 86400] seconds, got "
           f"{d.read_timeout_s}; a source silent this long is stalled")
    _check(d.max_image_pixels >= 64 * 64, f"data.max_image_pixels: must be >= 4096 (a 64x64 image), got "
           f"{d.max_image_pixels}")
    _check(d.synthetic_image_size >= 8, f"data.synthetic_image_size: must be >= 8, got {d.synthetic_image_size}")
    _check_augment(d.augment)
    _check_normalize(d)


def _check_normalize(d: DataConfig) -> None:
    _one_of("data.normalize", d.normalize, NORMALIZE_CHOICES)
    if d.normalize != "custom":
        for key in ("mean", "std"):
            _check(not getattr(d, key), f"data.{key}: applies only with data.normalize = \"custom\" (it is "
                   f"\"{d.normalize}\"); set data.normalize=custom or drop data.{key}")
        return
    for key in ("mean", "std"):
        values = getattr(d, key)
        _check(len(values) == 3, f"data.{key}: data.normalize = \"custom\" needs three numbers (R, G, B), got "
               f"{values}")
        _check(all(0 <= v <= 1 for v in values) and (key == "mean" or all(v > 0 for v in values)),
               f"data.{key}: expected values for pixels in [0, 1] (open_clip's convention, e.g. "
               f"{'[0.485, 0.456, 0.406]' if key == 'mean' else '[0.229, 0.224, 0.225]'}), got {values}"
               + ("; divide 0-255 values by 255" if any(v > 1 for v in values) else ""))


def _check_augment(a) -> None:
    p = "data.augment"
    _check(len(a.scale) == 2 and 0 < a.scale[0] <= a.scale[1] <= 1,
           f"{p}.scale: expected [min, max] with 0 < min <= max <= 1, got {a.scale}")
    _check(len(a.ratio) == 2 and 0 < a.ratio[0] <= a.ratio[1],
           f"{p}.ratio: expected [min, max] aspect ratios with 0 < min <= max, got {a.ratio}")
    _one_of(f"{p}.interpolation", a.interpolation, INTERPOLATIONS)
    for key in ("hflip_prob", "color_jitter_prob", "gray_scale_prob"):
        value = getattr(a, key)
        _check(0 <= value <= 1, f"{p}.{key}: must be in [0, 1], got {value}")
    j = a.color_jitter
    _check(len(j) == 4 and all(x >= 0 for x in j) and j[3] <= 0.5,
           f"{p}.color_jitter: expected [brightness, contrast, saturation, hue], each >= 0 and hue <= 0.5, got {j}")
    _check(not (any(j) and a.color_jitter_prob == 0),
           f"{p}.color_jitter: {j} never applies while {p}.color_jitter_prob is 0; set it (open_clip uses 0.8)")
    _check(not (a.color_jitter_prob and not any(j)),
           f"{p}.color_jitter_prob: {a.color_jitter_prob} with {p}.color_jitter all 0 changes nothing; set "
           f"{p}.color_jitter, e.g. [0.4, 0.4, 0.4, 0.1]")


def _check_reduction(r: ReductionConfig) -> None:
    _one_of("reduction.image", r.image, IMAGE_STRATEGIES)
    _one_of("reduction.text", r.text, TEXT_STRATEGIES)
    _check(r.image_size >= 0, f"reduction.image_size: must be >= 0 (0 = native), got {r.image_size}")
    _check(r.text_length >= 0, f"reduction.text_length: must be >= 0 (0 = native), got {r.text_length}")
    _check(r.text_length != 1, "reduction.text_length: must be >= 2 (start and end tokens) or 0 for native")
    _check(0.0 <= r.mask_ratio < 1.0, f"reduction.mask_ratio: must be in [0, 1), got {r.mask_ratio}")
    _check(
        r.mask_ratio == 0.0 or r.image in IMAGE_MASKS,
        f"reduction.mask_ratio: {r.mask_ratio} needs a masking strategy; set reduction.image to "
        f"{', '.join(IMAGE_MASKS[:-1])} or {IMAGE_MASKS[-1]} (it is \"{r.image}\"), or reduction.mask_ratio=0 to "
        f"{r.image} without masking",
    )


def _check_optim(o: OptimConfig) -> None:
    _check(o.lr > 0, f"optim.lr: must be > 0, got {o.lr}")
    _check(o.warmup_steps >= 0, f"optim.warmup_steps: must be >= 0, got {o.warmup_steps}")
    _check(o.weight_decay >= 0, f"optim.weight_decay: must be >= 0, got {o.weight_decay}")
    _check(
        len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
        f"optim.betas: expected two numbers in [0, 1), got {o.betas}",
    )
    _check(o.eps > 0, f"optim.eps: must be > 0, got {o.eps}")
    _check(o.grad_clip >= 0, f"optim.grad_clip: must be >= 0 (0 = off), got {o.grad_clip}")
    _one_of("optim.schedule", o.schedule, SCHEDULES)


def _check_train(t: TrainConfig) -> None:
    _check(t.dist_timeout_s > 0, f"train.dist_timeout_s: must be > 0 seconds, got {t.dist_timeout_s}")
    _check(t.global_batch_size >= 2, f"train.global_batch_size: must be >= 2 for a contrastive loss, got {t.global_batch_size}")
    _check(t.micro_batch_size >= 0, f"train.micro_batch_size: must be >= 0 (0 = whole batch), got {t.micro_batch_size}")
    _check(t.total_samples >= t.global_batch_size,
           f"train.total_samples: {t.total_samples} is less than one batch (train.global_batch_size = {t.global_batch_size})")
    _one_of("train.precision", t.precision, PRECISIONS)
    _check(t.log_every_steps >= 1, f"train.log_every_steps: must be >= 1, got {t.log_every_steps}")
    _check(t.logit_scale_max > 1, f"train.logit_scale_max: must be > 1, got {t.logit_scale_max}")
    _check(t.max_nonfinite_steps >= 1, f"train.max_nonfinite_steps: must be >= 1, got {t.max_nonfinite_steps}")


# Above this the first logits (cosine similarities times the scale) overflow half precision.
MAX_LOGIT_SCALE_INIT = 1000


def _check_logit_scale_init(init: float, logit_scale_max: float) -> None:
    """After train's checks: the start must lie under the clamp, which would otherwise move it at once."""
    _check(init == 0 or 1 <= init <= min(logit_scale_max, MAX_LOGIT_SCALE_INIT),
           f"model.logit_scale_init: must be 0 (the loss's own) or between 1 and train.logit_scale_max "
           f"({logit_scale_max}, at most {MAX_LOGIT_SCALE_INIT}), got {init}")


def _check_shard(recipe: Recipe) -> None:
    """train.shard and what FSDP cannot be combined with (yet); any number of processes, 1 included."""
    t = recipe.train
    _one_of("train.shard", t.shard, SHARDS)
    if t.shard != "fsdp":
        changed = [k for k, v in dataclasses.asdict(t.fsdp).items() if v != getattr(FsdpConfig(), k)]
        _check(not changed, f"train.fsdp.{changed[0] if changed else ''}: applies only with train.shard = \"fsdp\" "
               f"(it is \"{t.shard}\"); set train.shard=fsdp or drop the key")
        return
    refuse = 'with train.shard = "fsdp" is not supported'
    _check(t.precision != "fp16", f'train.precision: "fp16" {refuse} (the FSDP path runs no fp16 loss scaler); use '
           '"bf16" or "fp32"')
    _check(not t.compile, f"train.compile: true {refuse} (untested); set train.compile=false or train.shard=ddp")
    _check(recipe.loss.queue.kind != "momentum",
           f'loss.queue.kind: "momentum" {refuse} (the EMA encoder would be a full unsharded copy); use '
           '"memory_bank" or train.shard=ddp')


def _check_loss(loss: LossConfig, global_batch_size: int) -> None:
    _one_of("loss.kind", loss.kind, LOSS_KINDS)
    q = loss.queue
    _one_of("loss.queue.kind", q.kind, QUEUE_KINDS)
    if q.kind == "none":
        return
    _check(loss.kind == "infonce", f"loss.queue.kind: \"{q.kind}\" queues work with loss.kind = \"infonce\"")
    _check(q.size > 0 and q.size % global_batch_size == 0,
           f"loss.queue.size: {q.size} is not a positive multiple of train.global_batch_size ({global_batch_size}); "
           f"use e.g. {max(1, round(q.size / global_batch_size)) * global_batch_size}")
    _check(0.0 <= q.momentum < 1.0, f"loss.queue.momentum: must be in [0, 1), got {q.momentum}")
    _check(q.warmup_steps >= 0, f"loss.queue.warmup_steps: must be >= 0, got {q.warmup_steps}")


def _check_eval(e: EvalConfig) -> None:
    _check(e.every_steps >= 0, f"eval.every_steps: must be >= 0, got {e.every_steps}")
    for i, name in enumerate(e.zeroshot):
        _one_of(f"eval.zeroshot[{i}]", name, ZEROSHOT_DATASETS)
        if name != "synthetic" and not e.data_root:
            raise ClipaError(f"eval.data_root: needed by eval.zeroshot[{i}] = \"{name}\"; set the dataset folder")
    for i, name in enumerate(e.retrieval):
        _one_of(f"eval.retrieval[{i}]", name, RETRIEVAL_DATASETS)
        if name != "synthetic" and not e.retrieval_data_root:
            raise ClipaError(f"eval.retrieval_data_root: needed by eval.retrieval[{i}] = \"{name}\"; set the CSV/TSV "
                             "file or the webdataset folder")


def _check_log(log: LogConfig) -> None:
    _check(len(set(log.trackers)) == len(log.trackers), f"log.trackers: {log.trackers} names a tracker twice")
    _check(bool(log.project.strip()), "log.project: empty; set the W&B project / MLflow experiment, e.g. \"clipa\"")


# --------------------------------------------------------------------------- batch layout


def _or(values) -> str:
    return " or ".join(str(v) for v in values)


def _nearest_divisors(n: int, near: int) -> list[int]:
    """The divisors of n just below and just above `near` (micro-batch sizes that fit n)."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    below = [d for d in divisors if d < near]
    above = [d for d in divisors if d > near]
    return ([below[-1]] if below else []) + ([above[0]] if above else [])


def _nearest_multiples(n: int, step: int) -> list[int]:
    """Multiples of `step` just below and just above n (global batch sizes that fit the layout)."""
    low = n // step * step
    return ([low] if low >= max(step, 2) else []) + [low + step]


def batch_layout(recipe: Recipe, num_processes: int) -> tuple[int, int]:
    """(micro-batch per process, accumulation steps): global = micro x accumulation x processes.

    Every message suggests values that do fit: `clipa validate` runs this with WORLD_SIZE (or 1)
    processes, `pretrain` with the real count.
    """
    t = recipe.train
    processes = f"{num_processes} process{'es' if num_processes != 1 else ''}"
    per_process, remainder = divmod(t.global_batch_size, num_processes)
    if remainder or per_process == 0:
        raise ClipaError(
            f"train.global_batch_size: {t.global_batch_size} is not divisible by the {processes}; "
            f"use {_or(_nearest_multiples(t.global_batch_size, num_processes))}"
        )
    micro = t.micro_batch_size or per_process
    accumulation, remainder = divmod(per_process, micro)
    if remainder or accumulation == 0:
        raise ClipaError(
            f"train.global_batch_size: {t.global_batch_size} is not divisible by train.micro_batch_size ({micro}) x "
            f"{processes}; use train.micro_batch_size = {_or(_nearest_divisors(per_process, micro))} (divides the "
            f"{per_process} samples per process) or train.global_batch_size = "
            f"{_or(_nearest_multiples(t.global_batch_size, micro * num_processes))}"
        )
    if micro == 1 and recipe.loss.kind == "infonce":
        # One-sample forwards starve the device; the suggestion is the smallest micro-batch that fits.
        fix = (f"train.micro_batch_size = {_nearest_divisors(per_process, 1)[0]} (or more, dividing {per_process})"
               if per_process > 1 else f"train.global_batch_size >= {2 * num_processes} ({processes})")
        key = "train.micro_batch_size: 1" if t.micro_batch_size else \
            f"train.global_batch_size: {t.global_batch_size} over {processes} gives micro-batches of 1"
        raise ClipaError(f"{key} with loss.kind = \"infonce\" is not supported; use {fix} or loss.kind = \"siglip\"")
    return micro, accumulation


# --------------------------------------------------------------------------- resume


# Recipe keys that define what a checkpoint *is*; a resumed run may not change them.
_FIXED_ON_RESUME = ("model.arch", "model.image_tower", "model.vision_cfg", "model.text_cfg", "model.pos_embed",
                    "reduction.image", "reduction.image_size", "reduction.mask_ratio", "reduction.text",
                    "reduction.text_length", "train.global_batch_size", "train.seed", "data.train",
                    "data.normalize", "data.mean", "data.std", "loss.kind",
                    "loss.queue", "train.shard")  # a DDP checkpoint holds one weights file, an FSDP one DCP shards


def _get(recipe, dotted: str):
    table, key = dotted.split(".")
    return getattr(getattr(recipe, table), key)


def check_resume_compatible(recipe: Recipe, saved: Recipe, where: Path) -> list[str]:
    """Error on changes that would make the resumed run a different run (`saved`: the recipe of the
    checkpoint at `where`); list the harmless ones."""
    for key in _FIXED_ON_RESUME:
        if _get(saved, key) != _get(recipe, key):
            raise ClipaError(
                f"{key}: the checkpoint {where} was made with {_get(saved, key)!r}, the recipe now says "
                f"{_get(recipe, key)!r}; this cannot change on resume. Use a new --out directory for a new run"
            )
    old, new = dataclasses.asdict(saved), dataclasses.asdict(recipe)
    return [f"{table}.{key}" for table, values in new.items() if isinstance(values, dict)
            for key, value in values.items() if old.get(table, {}).get(key) != value]
