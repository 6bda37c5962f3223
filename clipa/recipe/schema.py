"""The recipe's schema: one dataclass per TOML table, with its defaults and the allowed values.

Reading a recipe file and applying `key=value` overrides is `clipa.recipe.load`; the checks that need
nothing but the recipe (values, batch layout, resume compatibility) are `clipa.recipe.checks`. Checks
that need the model architecture live in `clipa.model.build.recipe_model_config`, so the recipe stays
free of torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from clipa.reduction.image import IMAGE_STRATEGIES  # noqa: F401 - each strategy is registered there once
from clipa.reduction.text import TEXT_STRATEGIES  # noqa: F401

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "constant")
LOSS_KINDS = ("infonce", "siglip")
QUEUE_KINDS = ("none", "memory_bank", "momentum")
POS_EMBEDS = ("auto", "learned", "sincos2d")
SHARDS = ("ddp", "fsdp")
ZEROSHOT_DATASETS = ("synthetic", "imagefolder", "imagenet", "imagenet-v2", "imagenet-sketch", "imagenet-r",
                     "imagenet-a", "wds")
RETRIEVAL_DATASETS = ("csv", "wds", "synthetic")  # as for `clipa retrieval --dataset`


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
    # Image position embeddings: "sincos2d" = CLIPA-v2's fixed 2-D sin-cos grid, not trained and
    # recomputed for each stage's resolution; "learned" = trained, interpolated between stages (a
    # learned stage after a sincos2d one starts from the grid, resized bicubically); "auto" = what
    # the architecture's config says (open_clip's vision_cfg.pos_embed_type, learned if absent).
    pos_embed: str = "auto"
    # The learned temperature's starting value (the logit scale, 1/tau); 0 = the loss's own: CLIP's
    # 1/0.07 = 14.3 for infonce, SigLIP's 10. Only a model trained from scratch starts there: a stage
    # that continues a run (init) keeps the run's learned value.
    logit_scale_init: float = 0.0
    # open_clip tower details over the architecture's own config (its vision_cfg / text_cfg), by open_clip's
    # field names: e.g. vision pool_type "tok" (CLS) | "avg" (GAP over patches), no_ln_pre,
    # final_ln_after_pool, act_kwargs, norm_kwargs; text pool_type "argmax" | "last" | "first" | "eos",
    # no_causal_mask, pad_id, eos_id. Keys other recipe keys own (image_size, context_length, patch_dropout,
    # pos_embed_type, timm_*/hf_*/tokenizer fields) are refused; checked against open_clip in
    # clipa.model.tower_cfg.tower_overrides.
    vision_cfg: dict = field(default_factory=dict)
    text_cfg: dict = field(default_factory=dict)


INTERPOLATIONS = ("bicubic", "bilinear")
# Image normalisation (`data.normalize`): open_clip's named (mean, std) pairs, for pixels in [0, 1];
# "custom" takes `data.mean` / `data.std`.
NORMALIZATIONS = {
    "openai": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),  # CLIP, open_clip
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # CLIPA-v2's JAX code (big_vision vgg_value_range)
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # big_vision value_range(-1, 1): SigLIP
}
NORMALIZE_CHOICES = (*NORMALIZATIONS, "custom")


@dataclass
class AugmentConfig:
    """Per-sample training augmentations (open_clip's --aug-cfg), every draw from the sample's own
    generator. Applied in this order: crop and resize, flip, colour jitter, grayscale."""

    # Random-resized-crop area range applied at every stage. 0.9-1.0 (open_clip_train's) held up best
    # on real drawings (docs/openclipart.md); CLIPA's published 0.4-1.0 was at chance there at small
    # scale, so the paper recipes set it explicitly.
    scale: list[float] = field(default_factory=lambda: [0.9, 1.0])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # crop aspect (width/height) range
    interpolation: str = "bicubic"  # bicubic | bilinear; both antialiased (PIL) when shrinking
    hflip_prob: float = 0.0  # horizontal flip (CLIP trains without)
    # [brightness, contrast, saturation, hue] as torchvision's ColorJitter: factors drawn from
    # [1-x, 1+x] (hue: shift in [-x, x], x <= 0.5), applied in random order with color_jitter_prob.
    color_jitter: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    color_jitter_prob: float = 0.0
    gray_scale_prob: float = 0.0


# Old keys still read: where they live now (load.py moves them and notes the move).
RENAMED = {"data.crop_scale": "data.augment.scale"}


@dataclass
class DataConfig:
    # "synthetic" (built-in, endless); webdataset shards ("/data/{00000..00099}.tar", a folder of tars,
    # "pipe:CMD", http(s) URLs); a .csv/.tsv of image paths and captions; or a weighted mixture
    # "/data/a/{0..9}.tar@0.7::/data/b.csv@0.3" (`::` separates sources as in open_clip). docs/data.md.
    train: str = "synthetic"
    # Loader processes per training process; -1 = auto (this process's share of the cores, minus one).
    num_workers: int = -1
    # Training-image augmentation (random-resized crop, flip, colour jitter, grayscale); the old
    # `data.crop_scale` is still read, as `data.augment.scale`.
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Image mean/std, applied on the device to every training batch, recorded in the export's preprocess_cfg
    # and used by evaluation: "openai" (CLIP's) | "imagenet" (CLIPA-v2's JAX runs) | "inception" (0.5/0.5,
    # i.e. pixels in [-1, 1]) | "custom" (data.mean and data.std: three numbers each, for pixels in [0, 1]).
    normalize: str = "openai"
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    # Resolution the synthetic images are drawn at before the crop.
    synthetic_image_size: int = 64
    # Shards/rows drawn with replacement, endlessly, instead of epochs that see each sample once.
    resampled: bool = False
    # Samples each loader worker mixes across its shards; 0 = shard order (shards are still shuffled).
    # 5,000 (open_clip_train's) and 8 interleaved shards mixed category-ordered real shards like a full
    # shuffle; one shard at a time with 2,000 did not (docs/openclipart.md, "What the finetune gap was").
    shuffle_buffer: int = 5000
    # Shards each loader worker reads at once, taking each sample from a random one of them (CSV rows are
    # permuted already): shards written in class or source order then mix at no memory cost (docs/data.md).
    interleave: int = 8
    # Where a shard sample's caption is: a member extension ("txt") or a JSON field ("json:caption").
    caption_key: str = "txt"
    # CSV/TSV columns (open_clip's names by default); relative image paths are relative to the CSV.
    csv_image_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_separator: str = ""  # "" = tab for .tsv, comma otherwise
    # Seconds a shard read from a command (https:// by curl, pipe:) may wait for its next byte; past it
    # the shard is skipped as unreadable (a stalled source), and a source whose every shard stalls ends
    # the run with exit 2.
    read_timeout_s: float = 120.0
    # Images with more pixels are skipped as corrupt before a pixel is decoded (decompression bombs); the
    # default is PIL's own warning threshold (89,478,485 px, 0.27 GB as RGB), which PIL alone only warns at.
    max_image_pixels: int = 89_478_485
    # Decode JPEGs at 1/2, 1/4 or 1/8 scale when the crop is that much larger than the target size.
    fast_decode: bool = True
    # Resume shard/CSV streams exactly, by re-reading (not decoding) what each worker consumed; false =
    # start a fresh shuffled stream at once (for remote shards, where re-reading means re-downloading).
    exact_resume: bool = True


def image_mean_std(data: DataConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) that `data.normalize` (and data.mean / data.std for "custom") names."""
    if data.normalize == "custom":
        return tuple(float(x) for x in data.mean), tuple(float(x) for x in data.std)
    return NORMALIZATIONS[data.normalize]


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
    # Token and position embedding tables take weight decay (CLIP / open_clip: every matrix but gains and
    # biases); false = only layers' weight matrices decay, as CLIPA's JAX code does (decay mask `.*/kernel`).
    decay_embeddings: bool = True


@dataclass
class FsdpConfig:
    """Options of train.shard = "fsdp" (torch's FSDP2 `fully_shard`, per transformer block; docs/performance.md)."""

    # Keep the sharded parameters, gradients and optimizer state in CPU memory (the optimizer step runs
    # on the CPU): the GPU holds only the blocks being computed. Slower; for models that do not fit otherwise.
    cpu_offload: bool = False
    # Free each block's gathered parameters after its forward and gather them again for its backward:
    # one more all-gather per block and step for a smaller peak. false keeps them from forward to backward.
    reshard_after_forward: bool = True


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
    # How processes share the model: "ddp" = a full copy each (accelerate's DDP); "fsdp" = parameters,
    # gradients and optimizer state sharded over the processes (torch FSDP2), sharded checkpoints.
    shard: str = "ddp"
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)


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
    # Also take over AdamW's moments from init.checkpoint's training state (a run directory's newest
    # checkpoint, or a step checkpoint), instead of a fresh optimizer whose first steps move every
    # weight by about the LR; resized position embeddings start fresh. The LR schedule is the stage's own.
    optimizer_state: bool = False


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
    # The recipe of the stage that continues this one (a shipped name such as "tiny/finetune", or a recipe
    # file): what a bare `clipa finetune` runs after this run, with init.checkpoint set to it. "" = none.
    next: str = ""
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
    # One line per old key the recipe used (`RENAMED`), for validate and --dry-run to print.
    notes: list[str] = field(default_factory=list, metadata={"internal": True})
