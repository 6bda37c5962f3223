"""The model card (`README.md`) that `clipa export` writes beside the open_clip files.

It says what the folder holds (architecture, geometry, parameters), how it was made (every recipe
stage back through `init.checkpoint`, with its data and samples), what the run measured last (loss
and any zero-shot / retrieval evaluations), and how to load it with open_clip from the folder
(`local-dir:`) or after `hf upload` (`hf-hub:`). Everything comes from the run's own files
(config.toml, metrics.jsonl); nothing is looked up online.
"""

from __future__ import annotations

import json
from pathlib import Path

from clipa.data.urls import redact
from clipa.model import published
from clipa.run.layout import checkpoint_step, read_run_recipe
from clipa.run.lineage import earlier_runs
from clipa.run.metrics import read_metrics


def _stage_of(checkpoint: Path) -> str:
    """pretrain / finetune, from the run's metrics (the recipe itself does not say)."""
    for row in read_metrics(checkpoint.parent.parent).rows:
        if "stage" in row:
            return row["stage"]
    return "stage"


def _describe_stage(recipe, stage: str, samples_seen: int) -> tuple[str, int]:
    from clipa.model.build import stage_geometry

    geometry = stage_geometry(recipe)
    red = recipe.reduction
    image = f"{geometry.image_size} px ({red.image}" + (f", {red.mask_ratio:g} of patches masked" if red.mask_ratio else "") + ")"
    seen = f"{samples_seen:,} of {recipe.train.total_samples:,}"
    return (f"| {stage} `{recipe.name}` | {image} | {geometry.context_length} tokens ({red.text}) | "
            f"{recipe.train.global_batch_size:,} | {seen} | {recipe.optim.lr:g} | `{redact(recipe.data.train)}` |"), \
        samples_seen


def _origin(recipe) -> str:
    if recipe.model.image_init:
        return f"random initialisation; image tower from `{recipe.model.image_init}`"
    return "random initialisation"


def _earlier_stages(recipe, run_dir: Path) -> tuple[list[tuple[str, int]], str]:
    """Table rows of the stages before this one (oldest first, clipa.run.lineage's walk) and where the first
    one started."""
    rows, origin = [], _origin(recipe)
    for earlier in earlier_runs(recipe, run_dir):
        source, checkpoint = earlier.init, None if earlier.looped else earlier.checkpoint
        if checkpoint is None:  # published weights, a file, an export of no run here, a run since moved away
            if published.parse(source, "init.checkpoint") is not None:
                origin = f"published weights `{source}`"
            elif not Path(source).exists():
                origin = f"`{source}` (not found when exported)"
            else:
                origin = f"`{source}`"
            break
        current = read_run_recipe(checkpoint)
        samples = checkpoint_step(checkpoint) * current.train.global_batch_size
        rows.insert(0, _describe_stage(current, _stage_of(checkpoint), samples))
        origin = _origin(current)
    return rows, origin


def _final_metrics(run_dir: Path) -> list[str]:
    """The last training loss and the last value of every evaluation the run logged."""
    last: dict[str, tuple[int, float]] = {}
    for row in read_metrics(run_dir).rows:
        for key, value in row.items():
            if isinstance(value, (int, float)) and (key == "loss" or key.startswith(("zeroshot/", "retrieval/"))):
                last[key] = (row.get("step", 0), value)
    lines = [f"| {key} | {value:.4f} | {step} |" for key, (step, value) in sorted(last.items())]
    for path in sorted(run_dir.glob("zeroshot_*.json")):  # clipa zeroshot --output files kept in the run
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
            lines.append(f"| zeroshot {result['dataset']} acc1 | {result['metrics']['acc1']:.4f} | final |")
        except (ValueError, KeyError, TypeError):
            continue
    return lines


def model_card(checkpoint: Path, recipe, model_cfg: dict, num_params: int, out_dir: Path) -> str:
    """The README.md text for an export of `checkpoint` (a step checkpoint of a clipa run)."""
    run_dir = checkpoint.parent.parent
    samples = checkpoint_step(checkpoint) * recipe.train.global_batch_size
    earlier, origin = _earlier_stages(recipe, run_dir)
    stages = earlier + [_describe_stage(recipe, _stage_of(checkpoint), samples)]
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    tower = vision.get("timm_model_name") or (f"ViT, width {vision.get('width')}, {vision.get('layers')} layers, "
                                              f"patch {vision.get('patch_size')}")
    tokenizer = text.get("hf_tokenizer_name") or "OpenAI BPE (open_clip's SimpleTokenizer)"
    metrics = _final_metrics(run_dir)
    lines = [
        "---",
        "library_name: open_clip",
        "pipeline_tag: zero-shot-image-classification",
        "tags: [clip, clipa, open_clip]",
        "---",
        "",
        f"# {recipe.name}",
        "",
        f"A CLIP model trained with clipa (CLIPA inverse-scaling recipes: few tokens first, full length briefly), "
        f"exported from `{checkpoint}` in open_clip's format.",
        "",
        "## Model",
        "",
        f"- architecture: `{recipe.model.arch}`"
        + (f" with timm image tower `{recipe.model.image_tower}`" if recipe.model.image_tower else ""),
        f"- image tower: {tower}; input {vision.get('image_size')} px",
        f"- text tower: width {text.get('width')}, {text.get('layers')} layers, context length "
        f"{text.get('context_length')}; tokenizer {tokenizer}",
        f"- embedding dimension {model_cfg.get('embed_dim')}; {num_params / 1e6:.1f}M parameters",
        "",
        "## Training",
        "",
        f"Started from {redact(origin)}. Stages, oldest first:",
        "",
        "| stage | image | text | batch | samples seen | peak lr | data |",
        "|---|---|---|---|---|---|---|",
        *(row for row, _ in stages),
        "",
        f"Samples seen in all: {sum(seen for _, seen in stages):,}.",
        "",
        "## Final metrics",
        "",
        *(["| metric | value | step |", "|---|---|---|", *metrics] if metrics else ["The run logged no metrics."]),
        "",
        "## Load it",
        "",
        "```python",
        "import open_clip",
        "",
        f'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{out_dir}")',
        f'tokenizer = open_clip.get_tokenizer("local-dir:{out_dir}")',
        "```",
        "",
        "Publish the folder and load it back from the Hugging Face Hub:",
        "",
        "```bash",
        f"hf upload ORG/NAME {out_dir} .",
        "clipa zeroshot --model hf-hub:ORG/NAME --dataset imagenet --data-root /data/imagenet",
        "```",
        "",
        "```python",
        'model, _, preprocess = open_clip.create_model_and_transforms("hf-hub:ORG/NAME")',
        'tokenizer = open_clip.get_tokenizer("hf-hub:ORG/NAME")',
        "```",
        "",
        'Finetune it further with clipa: `init.checkpoint = "hf-hub:ORG/NAME"` (or this folder\'s path).',
        "",
    ]
    return "\n".join(lines)

