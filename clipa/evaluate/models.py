"""Loading a model to evaluate: a clipa run, a step checkpoint, an exported model, or open_clip weights.

Accepted `--model` values:
  runs/NAME                     a clipa run directory (its final/ model, else its newest checkpoint)
  runs/NAME/checkpoints/step_N  a step checkpoint
  runs/NAME/final, local-dir:P  an exported open_clip local directory
  ViT-B-16 --pretrained F       an open_clip architecture (or clipa-tiny) plus a local weights file
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

from clipa import recipe as recipe_mod
from clipa.checkpoint import CONFIG_FILE, find_weights, read_state_dict
from clipa.errors import ClipaError
from clipa.model import (EXPORT_CONFIG, arch_config, build_tokenizer, create_model, load_weights, native_geometry,
                         recipe_model_config, stage_config)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    image_size: int
    mean: tuple
    std: tuple
    name: str  # architecture or path, for result files
    pretrained: str  # where the weights came from


def _from_export(path: Path) -> LoadedModel:
    config = json.loads((path / EXPORT_CONFIG).read_text(encoding="utf-8"))
    model = open_clip.create_model(f"local-dir:{path}", device="cpu")
    model.output_dict = True
    pre = config.get("preprocess_cfg", {})
    image_size = pre.get("size") or config["model_cfg"]["vision_cfg"]["image_size"]
    if isinstance(image_size, (list, tuple)):
        image_size = image_size[0]
    return LoadedModel(model, open_clip.get_tokenizer(f"local-dir:{path}"), int(image_size),
                       tuple(pre.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                       tuple(pre.get("std", open_clip.OPENAI_DATASET_STD)), str(path), str(path))


def _from_checkpoint(path: Path) -> LoadedModel:
    recipe = recipe_mod.recipe_from_dict(recipe_mod.tomllib.loads((path / CONFIG_FILE).read_text(encoding="utf-8")))
    geometry, model_cfg = recipe_model_config(recipe)
    model = create_model(model_cfg)
    model.load_state_dict(read_state_dict(path, "checkpoint"))
    return LoadedModel(model, build_tokenizer(recipe.model.arch, geometry.context_length), geometry.image_size,
                       open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD, recipe.model.arch, str(path))


def load_model(spec: str, pretrained: str | None = None) -> LoadedModel:
    if spec.startswith("local-dir:"):
        spec = spec[len("local-dir:"):]
        if not (Path(spec) / EXPORT_CONFIG).is_file():
            raise ClipaError(f"--model: {spec} has no {EXPORT_CONFIG}; export a model with clipa first")
    path = Path(spec)
    if path.exists():
        if pretrained:
            raise ClipaError(f"--pretrained: only used with an architecture name; {spec} already holds weights")
        where, kind = find_weights(path, key="--model")
        if kind == "file":
            raise ClipaError(f"--model: {spec} is a weights file; pass the architecture as --model and the file as --pretrained")
        return _from_export(where) if kind == "export" else _from_checkpoint(where)
    if not pretrained:
        if "/" in spec or spec.startswith("."):
            raise ClipaError(f"--model: {spec} does not exist; give a clipa run directory, an exported model, or an "
                             "open_clip architecture with --pretrained FILE")
        arch_config(spec)  # names an unknown architecture precisely
        raise ClipaError(f"--pretrained: {spec} is an architecture; give its weights with --pretrained FILE "
                         "(clipa never downloads weights)")
    if not Path(pretrained).is_file():
        raise ClipaError(f"--pretrained: {pretrained} is not a file")
    cfg = arch_config(spec)
    geometry = native_geometry(cfg)
    model = create_model(stage_config(spec, geometry))
    load_weights(model, read_state_dict(Path(pretrained), "file"), key="--pretrained")
    return LoadedModel(model, build_tokenizer(spec, geometry.context_length), geometry.image_size,
                       open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD, spec, pretrained)
