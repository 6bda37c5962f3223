"""Recipes: one dataclass per TOML table, loaded, overridden and validated before any work.

Precedence: command-line `key=value` overrides > recipe file > dataclass defaults.
Every error names the full key path (`optim.lr: expected float, got "fast"`) and, for unknown
keys, the closest valid key. Checks that need the model architecture (patch size, context
length, a timm tower's patch size and maskability) live in `clipa.model.build.recipe_model_config`,
so this module stays free of torch.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

import tomli_w

from clipa.errors import ClipaError, did_you_mean

IMAGE_STRATEGIES = ("resize", "random", "grid", "block", "none")
TEXT_STRATEGIES = ("truncate", "random", "block", "syntax")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "constant")
LOSS_KINDS = ("infonce", "siglip")
QUEUE_KINDS = ("none", "memory_bank", "momentum")
ZEROSHOT_DATASETS = ("synthetic", "imagefolder", "imagenet", "imagenet-v2", "imagenet-sketch", "imagenet-r",
                     "imagenet-a", "wds")
RETRIEVAL_DATASETS = ("csv", "wds", "synthetic")  # as for `clipa retrieval --dataset`
_NAME = re.compile(r"^(?!\.+$)[A-Za-z0-9._-]{1,200}$")


@dataclass
class ModelConfig:
    # open_clip architecture name (`open_clip.list_models()`), a clipa-bundled config such as
    # "clipa-tiny", or the path of an open_clip-style model config JSON.
    arch: str = "ViT-B-16"
    # Image tower from timm instead of the architecture's own (BASIC/LiT style), e.g.
    # "vit_small_patch16_224" or "resnet50"; built without weights, which come from image_init.
    image_tower: str = ""
    # Initial image-tower weights: a timm checkpoint, a safetensors/pt state dict, or another
    # clipa/open_clip model (run directory, export, checkpoint) whose image tower is taken.
    image_init: str = ""
    lock_image: bool = False  # freeze the image tower (LiT)
    lock_image_unlocked_groups: int = 0  # ...except its last N groups: projection, last block + final LN, earlier blocks
    # Locked groups' BatchNorm keeps its pretrained running statistics (no updates in train mode);
    # false lets a locked BN tower's statistics follow the new data.
    lock_image_freeze_norm: bool = True
    lock_text: bool = False  # freeze the text tower
    lock_text_unlocked_groups: int = 0  # ...except its last N groups: projection, last block + final LN, earlier blocks


@dataclass
class DataConfig:
    # "synthetic" (built-in, endless); webdataset shards ("/data/{00000..00099}.tar", a folder of tars,
    # "pipe:CMD", http(s) URLs); a .csv/.tsv of image paths and captions; or a weighted mixture
    # "/data/a/{0..9}.tar@0.7::/data/b.csv@0.3" (`::` separates sources as in open_clip). docs/data.md.
    train: str = "synthetic"
    # Loader processes per training process; -1 = auto (this process's share of the cores, minus one).
    num_workers: int = -1
    # Random-resized-crop area range applied at every stage. 0.9-1.0 (open_clip_train's) held up best
    # on real drawings (docs/openclipart.md); CLIPA's published 0.4-1.0 was at chance there at small
    # scale, so the paper recipes set it explicitly.
    crop_scale: list[float] = field(default_factory=lambda: [0.9, 1.0])
    # Resolution the synthetic images are drawn at before the crop.
    synthetic_image_size: int = 64
    # Shards/rows drawn with replacement, endlessly, instead of epochs that see each sample once.
    resampled: bool = False
    # Samples each loader worker mixes across its shards; 0 = shard order (shards are still shuffled).
    shuffle_buffer: int = 2000
    # Where a shard sample's caption is: a member extension ("txt") or a JSON field ("json:caption").
    caption_key: str = "txt"
    # CSV/TSV columns (open_clip's names by default); relative image paths are relative to the CSV.
    csv_image_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_separator: str = ""  # "" = tab for .tsv, comma otherwise
    # Decode JPEGs at 1/2, 1/4 or 1/8 scale when the crop is that much larger than the target size.
    fast_decode: bool = True
    # Resume shard/CSV streams exactly, by re-reading (not decoding) what each worker consumed; false =
    # start a fresh shuffled stream at once (for remote shards, where re-reading means re-downloading).
    exact_resume: bool = True


@dataclass
class ReductionConfig:
    image: str = "resize"  # resize | random | grid | block | none
    image_size: int = 0  # stage's input resolution (any strategy but none); 0 = the architecture's native size
    mask_ratio: float = 0.0  # fraction of patches dropped by random | grid | block
    text: str = "truncate"  # truncate | random | block | syntax
    text_length: int = 0  # tokens per caption incl. start/end; 0 = the architecture's context length


@dataclass
class OptimConfig:
    lr: float = 5e-4
    warmup_steps: int = 0
    weight_decay: float = 0.2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-6
    schedule: str = "cosine"  # cosine (to 0 after warmup) | constant (after warmup)
    grad_clip: float = 0.0  # max global grad norm; 0 = off


@dataclass
class TrainConfig:
    seed: int = 0
    global_batch_size: int = 256
    micro_batch_size: int = 0  # per process; 0 = global / processes; accumulation = global / (micro x processes)
    total_samples: int = 100_000
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile the model (inductor); the first steps pay for compilation
    log_every_steps: int = 10
    logit_scale_max: float = 100.0  # CLIP clamps the learned temperature at 100
    max_nonfinite_steps: int = 5  # stop after this many non-finite steps in a row (each one is skipped)
    # Seconds a process waits for the others in one collective before the run stops (torch's default).
    dist_timeout_s: int = 1800


@dataclass
class QueueConfig:
    # More negatives without bigger batches: FIFO queues of past image and text features.
    kind: str = "none"  # none | memory_bank (past online features) | momentum (keys of an EMA encoder)
    size: int = 0  # features per modality; a multiple of train.global_batch_size
    momentum: float = 0.995  # EMA decay of the momentum encoder (ALBEF)
    # The queue joins the loss once it is full; with warmup_steps > 0 its filled part joins from
    # that step on even before it is full.
    warmup_steps: int = 0


@dataclass
class LossConfig:
    kind: str = "infonce"  # infonce (CLIP's softmax) | siglip (sigmoid, with a learnable bias)
    queue: QueueConfig = field(default_factory=QueueConfig)


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 3


@dataclass
class EvalConfig:
    every_steps: int = 0  # also every N steps; at the end of the stage whenever a dataset is listed
    zeroshot: list[str] = field(default_factory=list)  # dataset names as for `clipa zeroshot --dataset`
    data_root: str = ""  # --data-root for the datasets that need files
    retrieval: list[str] = field(default_factory=list)  # image-text recall@K datasets, as for `clipa retrieval`
    retrieval_data_root: str = ""  # --data-root of the retrieval datasets (a CSV/TSV, or a wds folder)


@dataclass
class InitConfig:
    # Weights to start from: a clipa run directory, a step checkpoint, or an exported model.
    checkpoint: str = ""


@dataclass
class LogConfig:
    # Experiment trackers the metrics rows also go to, through accelerate: "tensorboard", "wandb",
    # "mlflow", or any tracker accelerate knows (or that was registered with it). Empty = metrics.jsonl only.
    trackers: list[str] = field(default_factory=list)
    project: str = "clipa"  # W&B project, MLflow experiment
    run_name: str = ""  # the tracker run's display name; "" = the recipe name
    tags: list[str] = field(default_factory=list)  # W&B tags, MLflow tags


@dataclass
class Recipe:
    name: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reduction: ReductionConfig = field(default_factory=ReductionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    init: InitConfig = field(default_factory=InitConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # Where the recipe came from (not part of the TOML schema).
    source: str = field(default="", metadata={"internal": True})


# --------------------------------------------------------------------------- typing


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    if typing.get_origin(tp) is list:
        return f"list of {typing.get_args(tp)[0].__name__}"
    return tp.__name__


def _show(value) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


def _coerce(path: str, tp, value):
    """Check `value` against the field type `tp`; ints are accepted where floats are expected."""
    if typing.get_origin(tp) is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ClipaError(f"{path}: expected {_type_name(tp)}, got {_show(value)}")
        return [_coerce(f"{path}[{i}]", item_tp, v) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ClipaError(f"{path}: expected {tp.__name__}, got {_show(value)}")


def _unknown_key(path: str, key: str, valid: list[str]) -> ClipaError:
    full = f"{path}.{key}" if path else key
    hint = did_you_mean(key, valid, cutoff=0.5, quote="'", prefix=f"{path}." if path else "")
    return ClipaError(f"{full}: unknown key{hint} (valid: {', '.join(valid)})")


def _build(cls, table: dict, path: str = ""):
    fields, hints = _fields(cls), _hints(cls)
    kwargs = {}
    for key, value in table.items():
        if key not in fields:
            raise _unknown_key(path, key, list(fields))
        full = f"{path}.{key}" if path else key
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ClipaError(f"{full}: expected a [{full}] table, got {_show(value)}")
            kwargs[key] = _build(tp, value, full)
        else:
            kwargs[key] = _coerce(full, tp, value)
    return cls(**kwargs)


# --------------------------------------------------------------------------- loading


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ClipaError(f"{path}: recipe file not found (list shipped recipes with `clipa ls`)")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        # tomllib's message already carries "(at line N, column M)".
        raise ClipaError(f"{path}: TOML syntax error: {err}") from None
    except UnicodeDecodeError as err:
        raise ClipaError(f"{path}: not UTF-8 text (byte {err.start}); TOML files are UTF-8, save it as such") from None


def read_run_recipe(directory: str | Path) -> Recipe:
    """The recipe a run directory (or one of its step checkpoints) was trained with: its config.toml."""
    return recipe_from_dict(read_toml(Path(directory) / "config.toml"))


def parse_override(text: str) -> tuple[list[str], str]:
    if "=" not in text:
        raise ClipaError(f"override '{text}': expected key=value, for example optim.lr=1e-3")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ClipaError(f"override '{text}': empty key, expected key=value")
    return key.split("."), raw.strip()


def _parse_value(raw: str, tp):
    """Parse an override value by the field's type; TOML syntax works for every type."""
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    else:
        # On the command line `train.total_samples=1e6` means the integer a user would expect.
        if tp is int and isinstance(value, float) and value.is_integer():
            return int(value)
        return value
    if tp is str:
        return raw  # bare words need no quotes: model.arch=ViT-B-16
    if tp is float or tp is int:
        try:
            number = float(raw.replace("_", ""))
        except ValueError:
            return raw
        return int(number) if tp is int and number.is_integer() else number
    if typing.get_origin(tp) is list:
        items = [s.strip() for s in raw.strip("[]").split(",") if s.strip()]
        (item_tp,) = typing.get_args(tp)
        return [_parse_value(s, item_tp) for s in items]
    if tp is bool and raw.lower() in ("yes", "no", "on", "off", "1", "0"):
        return raw.lower() in ("yes", "on", "1")
    return raw


def apply_override(table: dict, override: str) -> None:
    """Apply one `key=value` override to a raw recipe table, typed by the field it names."""
    keys, raw = parse_override(override)
    cls, node, path = Recipe, table, ""
    for i, key in enumerate(keys):
        fields = _fields(cls)
        if key not in fields:
            raise _unknown_key(path, key, list(fields))
        path = f"{path}.{key}" if path else key
        tp = _hints(cls)[key]
        last = i == len(keys) - 1
        if dataclasses.is_dataclass(tp):
            if last:
                raise ClipaError(f"{path}: is a table; override one of its keys, e.g. {path}.{next(iter(_fields(tp)))}=...")
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ClipaError(f"{path}: expected a table in the recipe file")
            cls = tp
        elif not last:
            raise ClipaError(f"{path}: is not a table, cannot set {'.'.join(keys)}")
        else:
            node[key] = _parse_value(raw, tp)


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a recipe file (or the defaults, if `path` is None), apply overrides, validate."""
    table = read_toml(path) if path is not None else {}
    for override in overrides:
        apply_override(table, override)
    recipe = _build(Recipe, table)
    if path is not None:
        recipe.source = str(path)
        if not recipe.name:
            recipe.name = Path(path).stem
    validate(recipe)
    return recipe


def recipe_from_dict(table: dict) -> Recipe:
    recipe = _build(Recipe, table)
    validate(recipe)
    return recipe


def to_dict(recipe: Recipe) -> dict:
    out = {}
    for name in _fields(Recipe):
        value = getattr(recipe, name)
        out[name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


def dumps(recipe: Recipe) -> str:
    return tomli_w.dumps(to_dict(recipe))


def save(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(dumps(recipe), encoding="utf-8")


# --------------------------------------------------------------------------- validation


def _one_of(path: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ClipaError(f"{path}: unknown value {_show(value)}{did_you_mean(value, allowed)} (allowed: {', '.join(allowed)})")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ClipaError(message)


def validate(recipe: Recipe) -> None:
    """Checks that need nothing but the recipe itself."""
    r = recipe
    # The run directory defaults to runs/<name>: a separator, "..", or an absolute path would put
    # it (and what clipa writes and replaces there) anywhere on the disk.
    _check(r.name == "" or bool(_NAME.match(r.name)),
           f"name: {_show(r.name)} is not a plain name; use letters, digits, '.', '_' and '-' (no path "
           "separators, no \"..\"), and --out to choose where the run directory goes")
    _check(r.train.dist_timeout_s > 0, f"train.dist_timeout_s: must be > 0 seconds, got {r.train.dist_timeout_s}")
    _check(bool(r.model.arch), "model.arch: empty; set an open_clip architecture such as \"ViT-B-16\" or \"clipa-tiny\"")
    _check(r.model.lock_image_unlocked_groups >= 0, "model.lock_image_unlocked_groups: must be >= 0")
    _check(r.model.lock_text_unlocked_groups >= 0, "model.lock_text_unlocked_groups: must be >= 0")
    _check(not (r.model.lock_image and r.model.lock_text and not r.model.lock_image_unlocked_groups
                and not r.model.lock_text_unlocked_groups),
           "model.lock_image, model.lock_text: both towers fully locked leaves nothing to train; unlock one")
    _check(r.data.num_workers >= -1, f"data.num_workers: must be >= 0 (0 = in the training process) or -1 for "
           f"auto, got {r.data.num_workers}")
    from clipa.data.spec import parse_train  # torch-free: checks the syntax only, paths are read later

    parse_train(r.data.train)
    _check(r.data.shuffle_buffer >= 0, f"data.shuffle_buffer: must be >= 0 (0 = off), got {r.data.shuffle_buffer}")
    _check(r.data.caption_key.strip() not in ("", "json", "json:"),
           f"data.caption_key: {_show(r.data.caption_key)} names no caption; use \"txt\" or \"json:FIELD\"")
    _check(bool(r.data.csv_image_key), "data.csv_image_key: empty; set the CSV column holding image paths, "
           "e.g. \"filepath\"")
    _check(bool(r.data.csv_caption_key), "data.csv_caption_key: empty; set the CSV column holding captions, "
           "e.g. \"title\"")
    _check(len(r.data.csv_separator) <= 1, f"data.csv_separator: expected one character or \"\" (by extension), "
           f"got {_show(r.data.csv_separator)}; write a tab as \"\\t\"")
    _check(
        len(r.data.crop_scale) == 2 and 0 < r.data.crop_scale[0] <= r.data.crop_scale[1] <= 1,
        f"data.crop_scale: expected [min, max] with 0 < min <= max <= 1, got {r.data.crop_scale}",
    )
    _check(r.data.synthetic_image_size >= 8, f"data.synthetic_image_size: must be >= 8, got {r.data.synthetic_image_size}")
    _one_of("reduction.image", r.reduction.image, IMAGE_STRATEGIES)
    _one_of("reduction.text", r.reduction.text, TEXT_STRATEGIES)
    _check(r.reduction.image_size >= 0, f"reduction.image_size: must be >= 0 (0 = native), got {r.reduction.image_size}")
    _check(r.reduction.text_length >= 0, f"reduction.text_length: must be >= 0 (0 = native), got {r.reduction.text_length}")
    _check(r.reduction.text_length != 1, "reduction.text_length: must be >= 2 (start and end tokens) or 0 for native")
    _check(
        0.0 <= r.reduction.mask_ratio < 1.0,
        f"reduction.mask_ratio: must be in [0, 1), got {r.reduction.mask_ratio}",
    )
    _check(
        r.reduction.mask_ratio == 0.0 or r.reduction.image in ("random", "grid", "block"),
        f"reduction.mask_ratio: {r.reduction.mask_ratio} needs a masking strategy; set reduction.image to "
        f"random, grid or block (it is \"{r.reduction.image}\")",
    )
    _check(r.optim.lr > 0, f"optim.lr: must be > 0, got {r.optim.lr}")
    _check(r.optim.warmup_steps >= 0, f"optim.warmup_steps: must be >= 0, got {r.optim.warmup_steps}")
    _check(r.optim.weight_decay >= 0, f"optim.weight_decay: must be >= 0, got {r.optim.weight_decay}")
    _check(
        len(r.optim.betas) == 2 and all(0 <= b < 1 for b in r.optim.betas),
        f"optim.betas: expected two numbers in [0, 1), got {r.optim.betas}",
    )
    _check(r.optim.eps > 0, f"optim.eps: must be > 0, got {r.optim.eps}")
    _check(r.optim.grad_clip >= 0, f"optim.grad_clip: must be >= 0 (0 = off), got {r.optim.grad_clip}")
    _one_of("optim.schedule", r.optim.schedule, SCHEDULES)
    t = r.train
    _check(t.global_batch_size >= 2, f"train.global_batch_size: must be >= 2 for a contrastive loss, got {t.global_batch_size}")
    _check(t.micro_batch_size >= 0, f"train.micro_batch_size: must be >= 0 (0 = whole batch), got {t.micro_batch_size}")
    _check(t.total_samples >= t.global_batch_size,
           f"train.total_samples: {t.total_samples} is less than one batch (train.global_batch_size = {t.global_batch_size})")
    _one_of("train.precision", t.precision, PRECISIONS)
    _check(t.log_every_steps >= 1, f"train.log_every_steps: must be >= 1, got {t.log_every_steps}")
    _check(t.logit_scale_max > 1, f"train.logit_scale_max: must be > 1, got {t.logit_scale_max}")
    _check(t.max_nonfinite_steps >= 1, f"train.max_nonfinite_steps: must be >= 1, got {t.max_nonfinite_steps}")
    _one_of("loss.kind", r.loss.kind, LOSS_KINDS)
    q = r.loss.queue
    _one_of("loss.queue.kind", q.kind, QUEUE_KINDS)
    if q.kind != "none":
        _check(r.loss.kind == "infonce", f"loss.queue.kind: \"{q.kind}\" queues work with loss.kind = \"infonce\"")
        _check(q.size > 0 and q.size % t.global_batch_size == 0,
               f"loss.queue.size: {q.size} is not a positive multiple of train.global_batch_size ({t.global_batch_size}); "
               f"use e.g. {max(1, round(q.size / t.global_batch_size)) * t.global_batch_size}")
        _check(0.0 <= q.momentum < 1.0, f"loss.queue.momentum: must be in [0, 1), got {q.momentum}")
        _check(q.warmup_steps >= 0, f"loss.queue.warmup_steps: must be >= 0, got {q.warmup_steps}")
    _check(r.checkpoint.every_steps >= 0,
           f"checkpoint.every_steps: must be >= 0 (0 = only at the end), got {r.checkpoint.every_steps}")
    _check(r.checkpoint.keep_last >= 1, f"checkpoint.keep_last: must be >= 1, got {r.checkpoint.keep_last}")
    _check(r.eval.every_steps >= 0, f"eval.every_steps: must be >= 0, got {r.eval.every_steps}")
    for i, name in enumerate(r.eval.zeroshot):
        _one_of(f"eval.zeroshot[{i}]", name, ZEROSHOT_DATASETS)
        if name != "synthetic" and not r.eval.data_root:
            raise ClipaError(f"eval.data_root: needed by eval.zeroshot[{i}] = \"{name}\"; set the dataset folder")
    for i, name in enumerate(r.eval.retrieval):
        _one_of(f"eval.retrieval[{i}]", name, RETRIEVAL_DATASETS)
        if name != "synthetic" and not r.eval.retrieval_data_root:
            raise ClipaError(f"eval.retrieval_data_root: needed by eval.retrieval[{i}] = \"{name}\"; set the CSV/TSV "
                             "file or the webdataset folder")
    _check(len(set(r.log.trackers)) == len(r.log.trackers), f"log.trackers: {r.log.trackers} names a tracker twice")
    _check(bool(r.log.project.strip()), "log.project: empty; set the W&B project / MLflow experiment, e.g. \"clipa\"")


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


# Recipe keys that define what a checkpoint *is*; a resumed run may not change them.
_FIXED_ON_RESUME = ("model.arch", "model.image_tower", "reduction.image", "reduction.image_size",
                    "reduction.mask_ratio", "reduction.text", "reduction.text_length", "train.global_batch_size",
                    "train.seed", "data.train", "loss.kind", "loss.queue")


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
    old, new = to_dict(saved), to_dict(recipe)
    return [f"{table}.{key}" for table, values in new.items() if isinstance(values, dict)
            for key, value in values.items() if old.get(table, {}).get(key) != value]
