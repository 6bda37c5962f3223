"""Loading a model to evaluate: a clipa run, a step checkpoint, an exported model, or open_clip weights.

Accepted `--model` values:
  runs/NAME                     a clipa run directory (its final/ model, else its newest checkpoint)
  runs/NAME/checkpoints/step_N  a step checkpoint
  runs/NAME/final, local-dir:P  an exported open_clip local directory (open_clip_model.safetensors, or
                                open_clip_pytorch_model.bin and the other names open_clip looks for)
  ViT-B-16 --pretrained F       an open_clip architecture (or clipa-tiny) plus a local weights file
  my_arch.json --pretrained F   an open_clip model-config JSON plus a weights file (e.g. an open_clip_train
                                epoch_N.pt: its "state_dict", "module." prefixes dropped; loaded weights-only)
  ViT-B-32 --pretrained TAG     an open_clip pretrained tag (also spelled ViT-B-32:TAG), downloaded and cached
                                by open_clip through huggingface_hub (clipa.model.published)
  hf-hub:ORG/NAME               an open_clip model on the Hugging Face Hub, likewise

`image_size` / `text_length` evaluate at another geometry than the model's own: the model is rebuilt
at that geometry and its weights loaded with the position embeddings resized the way finetuning
does it (`clipa.model.build.load_weights`: bicubic for the image grid, linear for text), and the tokenizer
truncates to the new length. Changing only the transform would feed the model a token grid its
position embedding does not have.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import open_clip
import torch

from clipa.errors import ClipaError, first_line
from clipa.model import published
from clipa.model.build import (
    arch_config,
    build_tokenizer,
    create_model,
    native_geometry,
    patch_size,
    set_timm_input_size,
    stage_config,
)
from clipa.model.tokenizer_kwargs import check_tokenizer_kwargs, hf_tokenizer
from clipa.model.weights import (
    EXPORT_CONFIG,
    find_weights,
    load_weights,
    model_from_checkpoint,
    preprocess_cfg,
    read_state_dict,
)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    image_size: int
    mean: tuple
    std: tuple
    name: str  # result files' "model", as CLIP_benchmark writes it: architecture, local-dir:EXPORT, hf-hub:ORG/NAME
    pretrained: str  # where the weights came from (a pretrained tag, a file or folder), results' "pretrained"
    # What `at_geometry` needs to rebuild the model at another image size / text length.
    model_cfg: dict | None = field(default=None, repr=False)
    make_tokenizer: Callable[[int], object] | None = field(default=None, repr=False)
    context_length: int | None = None
    # open_clip's eval preprocessing beyond mean/std: CLIPA-v2's published weights were evaluated with a
    # bilinear squash, OpenAI/LAION's with a bicubic shortest-side resize and center crop.
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"


def _export_tokenizer(path: Path, context_length: int):
    """What `open_clip.get_tokenizer("local-dir:PATH")` builds (a Hugging Face tokenizer saved in the folder, else
    open_clip's own), with the folder's tokenizer_kwargs and files checked first."""
    text_cfg = json.loads((path / EXPORT_CONFIG).read_text(encoding="utf-8"))["model_cfg"]["text_cfg"]
    if text_cfg.get("hf_tokenizer_name"):
        return hf_tokenizer(str(path), text_cfg, context_length, f"--model: {path / EXPORT_CONFIG}")
    return open_clip.get_tokenizer(f"local-dir:{path}", context_length=context_length)


def _from_export(path: Path) -> LoadedModel:
    try:
        config = json.loads((path / EXPORT_CONFIG).read_text(encoding="utf-8"))
        text_cfg = config["model_cfg"]["text_cfg"]
    except (ValueError, KeyError, TypeError) as err:
        raise ClipaError(f"--model: {path / EXPORT_CONFIG} is not an open_clip model config ({type(err).__name__}: "
                         f"{first_line(err, 120)}); export the model again with clipa export") from None
    # open_clip's get_tokenizer hands these to Hugging Face's from_pretrained: refused unless harmless.
    check_tokenizer_kwargs(text_cfg, f"--model: {path / EXPORT_CONFIG}")
    # Built from its config and loaded by clipa, not by open_clip's `local-dir:` loading: open_clip reads a
    # .bin with a loader that falls back to the unrestricted unpickler (clipa.model.weights.read_weights_file).
    try:
        model = create_model(config["model_cfg"])
        state = read_state_dict(path, "export")
    except ClipaError:
        raise
    except Exception as err:  # noqa: BLE001 - truncated weights, a config open_clip cannot build: a bad folder
        raise ClipaError(f"--model: {path} does not load with open_clip ({type(err).__name__}: "
                         f"{first_line(err, 160)}); export the model again or check its files") from None
    load_weights(model, state, key=f"--model: {path}")
    pre = config.get("preprocess_cfg", {})
    image_size = pre.get("size") or config["model_cfg"]["vision_cfg"].get("image_size", 224)
    if isinstance(image_size, (list, tuple)):
        image_size = image_size[0]
    context_length = int(config["model_cfg"].get("text_cfg", {}).get("context_length", 77))
    return LoadedModel(model, _export_tokenizer(path, context_length), int(image_size),
                       tuple(pre.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                       tuple(pre.get("std", open_clip.OPENAI_DATASET_STD)), f"local-dir:{path}", str(path),
                       config["model_cfg"], functools.partial(_export_tokenizer, path), context_length,
                       pre.get("interpolation", "bicubic"), pre.get("resize_mode", "shortest"))


def result_names(pub: published.Published) -> tuple[str, str]:
    """(model, pretrained) as CLIP_benchmark writes them for the same weights, so result tables line up:
    `ViT-B-32:laion2b_s34b_b79k` -> ("ViT-B-32", "laion2b_s34b_b79k"); a Hub model keeps its spec."""
    return (pub.name, pub.tag) if pub.kind == "tag" else (pub.spec, pub.spec)


def _from_published(pub: published.Published) -> LoadedModel:
    """An open_clip tag or Hub repository: open_clip fetches config and weights into the Hugging Face
    cache (or finds them there); the model is built and loaded the way every other source is."""
    found = published.fetch_open_clip(pub, "--model")
    model_cfg = copy.deepcopy(found.model_cfg)
    geometry = native_geometry(model_cfg)
    model = create_model(model_cfg)
    load_weights(model, read_state_dict(found.weights, "file"), key="--model")
    make_tokenizer = functools.partial(build_tokenizer, found.tokenizer_name, text_cfg=model_cfg["text_cfg"])
    pre = found.preprocess
    size = pre.get("size") or geometry.image_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    return LoadedModel(model, make_tokenizer(geometry.context_length), int(size),
                       tuple(pre.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                       tuple(pre.get("std", open_clip.OPENAI_DATASET_STD)), *result_names(pub), model_cfg,
                       make_tokenizer, geometry.context_length, pre.get("interpolation", "bicubic"),
                       pre.get("resize_mode", "shortest"))


def _from_checkpoint(path: Path) -> LoadedModel:
    """A step checkpoint, preprocessed as its run trained: `data.normalize` and `data.augment.interpolation`."""
    model, recipe, geometry, model_cfg = model_from_checkpoint(path)
    pre = preprocess_cfg(geometry.image_size, recipe.data)
    return LoadedModel(model, build_tokenizer(recipe.model.arch, geometry.context_length), geometry.image_size,
                       tuple(pre["mean"]), tuple(pre["std"]), recipe.model.arch, str(path), model_cfg,
                       functools.partial(build_tokenizer, recipe.model.arch), geometry.context_length,
                       pre["interpolation"], pre["resize_mode"])


# 256 x 256 patches: beyond it one image's attention no longer fits any accelerator's memory
MAX_PATCHES = 2 ** 16


def at_geometry(loaded: LoadedModel, image_size: int | None = None, text_length: int | None = None) -> LoadedModel:
    """`loaded` rebuilt to take `image_size` px images and `text_length` tokens (None: unchanged).

    Position embeddings are resized by `clipa.model.build.load_weights` (open_clip's resizers, as in
    finetuning); a timm image trunk is loaded at its own size and then resampled by timm's
    `set_input_size`, as open_clip's `force_image_size` does.
    """
    size = image_size or loaded.image_size
    length = text_length or loaded.context_length
    if size == loaded.image_size and length == loaded.context_length:
        return loaded
    if loaded.model_cfg is None or loaded.make_tokenizer is None:
        raise ClipaError(f"--image-size/--text-length: {loaded.name} was not loaded with load_model, so it cannot be "
                         "rebuilt at another geometry; load it with clipa.evaluate.models.load_model")
    if size < 1:
        raise ClipaError(f"--image-size: must be a positive number of pixels, got {size}")
    patch = patch_size(loaded.model_cfg)
    if patch and size % patch:
        lower = size - size % patch
        raise ClipaError(f"--image-size: {size} is not divisible by the patch size {patch} of {loaded.name}; "
                         f"use {lower or patch} or {lower + patch}")
    # checked before building: a huge grid can allocate (and swap) instead of failing at once
    if patch and (size // patch) ** 2 > MAX_PATCHES:
        raise ClipaError(f"--image-size: {size} px is {(size // patch) ** 2:,} patches of {patch} px, more than "
                         f"{MAX_PATCHES:,}; choose a smaller size")
    if length is not None and length < 2:
        raise ClipaError(f"--text-length: needs at least 2 tokens (start and end of text), got {length}")
    cfg = copy.deepcopy(loaded.model_cfg)
    timm_trunk = "timm_model_name" in cfg["vision_cfg"]
    cfg["vision_cfg"]["image_size"] = loaded.image_size if timm_trunk else size
    if length is not None:
        cfg["text_cfg"]["context_length"] = length
    device = next(loaded.model.parameters()).device
    try:
        model = create_model(cfg)
    except (RuntimeError, MemoryError) as err:  # e.g. --image-size 100000: a position grid of 10^8 tokens
        raise ClipaError(f"--image-size/--text-length: a {size} px / {length} token model does not fit in memory "
                         f"({first_line(err, 100)}); choose a smaller size") from None
    load_weights(model, {k: v.cpu() for k, v in loaded.model.state_dict().items()}, key="--model")
    if timm_trunk:
        set_timm_input_size(model.visual, size)
        cfg["vision_cfg"]["image_size"] = size
    tokenizer = loaded.make_tokenizer(length) if length != loaded.context_length else loaded.tokenizer
    return replace(loaded, model=model.to(device), tokenizer=tokenizer, image_size=size, model_cfg=cfg,
                   context_length=length)


def load_model(spec: str, pretrained: str | None = None, image_size: int | None = None,
               text_length: int | None = None) -> LoadedModel:
    """The model `spec` names (see the module docstring), at `image_size` / `text_length` if given."""
    return at_geometry(_load(spec, pretrained), image_size, text_length)


def _load(spec: str, pretrained: str | None) -> LoadedModel:
    pub = published.parse(spec, "--model", pretrained)
    if pub is not None:
        return _from_published(pub)
    if spec.startswith("local-dir:"):
        spec = spec[len("local-dir:"):]
        if not (Path(spec) / EXPORT_CONFIG).is_file():
            raise ClipaError(f"--model: {spec} has no {EXPORT_CONFIG}; export a model with clipa first")
    path = Path(spec)
    config_json = spec.endswith(".json") and path.is_file()  # a model config, whose weights come with --pretrained
    if path.exists() and not config_json:
        if pretrained:
            raise ClipaError(f"--pretrained: only used with an architecture name; {spec} already holds weights")
        where, kind = find_weights(path, key="--model")
        if kind == "file":
            raise ClipaError(f"--model: {spec} is a weights file; pass the architecture as --model and the file as --pretrained")
        return _from_export(where) if kind == "export" else _from_checkpoint(where)
    if not pretrained:
        if config_json:
            raise ClipaError(f"--pretrained: {spec} is a model config; give its weights with --pretrained FILE")
        if "/" in spec or spec.startswith("."):
            raise ClipaError(f"--model: {spec} does not exist; give a clipa run directory, an exported model, "
                             "hf-hub:ORG/NAME, or an open_clip architecture with --pretrained FILE or TAG")
        arch_config(spec, key="--model")  # names an unknown architecture precisely
        from open_clip.pretrained import list_pretrained_tags_by_model

        tags = list_pretrained_tags_by_model(spec)
        raise ClipaError(f"--pretrained: {spec} is an architecture; give its weights with --pretrained FILE"
                         + (f" or a published tag ({', '.join(tags[:6])}{', ...' if len(tags) > 6 else ''}; "
                            f"`clipa models {spec}`)" if tags else ""))
    if not Path(pretrained).is_file():
        raise ClipaError(f"--pretrained: {pretrained} is not a file")
    cfg = arch_config(spec, key="--model")
    geometry = native_geometry(cfg)
    model_cfg = stage_config(spec, geometry)
    model = create_model(model_cfg)
    load_weights(model, read_state_dict(Path(pretrained), "file"), key="--pretrained")
    return LoadedModel(model, build_tokenizer(spec, geometry.context_length), geometry.image_size,
                       open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD, spec, pretrained,
                       model_cfg, functools.partial(build_tokenizer, spec), geometry.context_length)
