"""open_clip_train on the OpenClipart shards, and the clipa settings that match it one by one.

open_clip_train (from open_clip_torch; it also needs `pandas` and `webdataset<=0.2.86`, see
docs/performance.md) runs unchanged through the same two-line wrapper as benchmarks/vs_open_clip.py
(it does not know clipa's bundled architectures). Its checkpoint is converted to an open_clip
local directory (config JSON + safetensors) so both tools' models go through the same
`clipa zeroshot` / `clipa retrieval` evaluation.

Both tools get the same model config, samples, batch and LR schedule (peak LR, linear warmup,
cosine to 0). open_clip_train keeps its own defaults for everything else: RandomResizedCrop scale
0.9-1.0 (bicubic), AdamW betas 0.9/0.999 and eps 1e-8 for a model name without "vit" (0.98/1e-6
with it), weight decay 0.2, epochs over the shards (without replacement) with a 5,000-sample
shuffle buffer, 1 data worker.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from openclipart import Setting, tiny_recipe

MODEL_CONFIGS = Path(__file__).resolve().parent.parent / "clipa" / "model_configs"
OPEN_CLIP_WRAPPER = (
    "import sys, open_clip; open_clip.add_model_config(sys.argv.pop(1)); "
    "from open_clip_train.main import main; main(sys.argv[1:])"
)
TRAIN_DRAWINGS = 7_326  # drawings in train/ (openclipart_data.build); one open_clip_train "epoch"


def open_clip_defaults(arch: str) -> dict:
    vit = "vit" in arch.lower()
    return {"lr": 5e-4, "beta1": 0.9, "beta2": 0.98 if vit else 0.999, "eps": 1e-6 if vit else 1e-8, "wd": 0.2,
            "crop_scale": [0.9, 1.0]}


def open_clip_command(values: dict, out: Path, optim_from_recipe: bool = False) -> tuple[list[str], int]:
    """open_clip_train's command line for these recipe values, and its number of epochs.
    `optim_from_recipe`: AdamW betas, eps and weight decay from `values` (clipa's settings) instead of
    open_clip_train's defaults."""
    arch, batch, samples = values["model.arch"], values["train.global_batch_size"], values["train.total_samples"]
    steps = samples // batch
    epochs = max(1, round(samples / TRAIN_DRAWINGS))
    per_epoch = steps // epochs * batch  # open_clip_train: steps per epoch = num_samples // batch
    d = open_clip_defaults(arch)
    if optim_from_recipe:
        d.update(beta1=values["optim.betas"][0], beta2=values["optim.betas"][1], eps=values["optim.eps"],
                 wd=values["optim.weight_decay"])
    cmd = [sys.executable, "-c", OPEN_CLIP_WRAPPER, str(MODEL_CONFIGS),
           "--train-data", values["data.train"], "--train-num-samples", str(per_epoch), "--dataset-type", "webdataset",
           "--model", arch, "--batch-size", str(batch), "--epochs", str(epochs), "--precision", "fp32",
           "--workers", "1", "--lr", str(values.get("optim.lr", d["lr"])), "--wd", str(d["wd"]),
           "--beta1", str(d["beta1"]), "--beta2", str(d["beta2"]), "--eps", str(d["eps"]), "--warmup", str(values.get("optim.warmup_steps", 0)),
           "--log-every-n-steps", "10", "--save-frequency", str(epochs), "--logs", str(out.parent),
           "--name", out.name, "--report-to", "", "--seed", str(values.get("train.seed", 0))]
    if values.get("reduction.image_size"):
        cmd += ["--force-image-size", str(values["reduction.image_size"])]
    if values.get("reduction.text_length"):
        cmd += ["--force-context-length", str(values["reduction.text_length"])]
    if values.get("init.checkpoint"):  # a finetune: from the previous stage's export (open_clip resizes pos-embeds)
        cmd += ["--pretrained", str(Path(values["init.checkpoint"]) / "final" / "open_clip_model.safetensors")]
    return cmd, epochs


# clipa's loader defaults before this benchmark changed them (docs/openclipart.md, "What the finetune gap
# was"): the vs-open-clip rows were measured with them, so they are pinned there; a row that varies them says so.
OLD_LOADER = {"data.interleave": 1, "data.shuffle_buffer": 2000}


def open_clip_adamw_values(arch: str) -> dict:
    """open_clip_train's AdamW defaults for `arch` as clipa recipe values."""
    d = open_clip_defaults(arch)
    return {"optim.betas": [d["beta1"], d["beta2"]], "optim.eps": d["eps"], "optim.weight_decay": d["wd"]}


def run_open_clip(values: dict, out: Path, optim_from_recipe: bool = False) -> dict:
    """Train with open_clip_train; returns wall time, losses, throughput and the exported model dir."""
    arch, batch = values["model.arch"], values["train.global_batch_size"]
    cmd, epochs = open_clip_command(values, out, optim_from_recipe)
    t0 = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    wall = time.perf_counter() - t0
    if result.returncode != 0:
        raise RuntimeError(f"open_clip_train failed ({result.returncode}):\n{result.stderr[-3000:]}")
    text = result.stdout + result.stderr
    losses = [float(x) for x in re.findall(r"Contrastive_loss: ([\d.]+)", text)]
    rates = [float(x) for x in re.findall(r", ([\d.]+)/s, [\d.]+/s/gpu", text)]
    model = export_checkpoint(arch, out / "checkpoints" / f"epoch_{epochs}.pt", out / "final",
                              values.get("reduction.image_size", 0), values.get("reduction.text_length", 0))
    return {"wall_s": wall, "final_loss": losses[-1], "first_loss": losses[0],
            "samples_per_s": statistics.median(rates) if rates else float("nan"), "model": str(model),
            "open_clip_epochs": epochs, "open_clip_steps": epochs * (values["train.total_samples"] // batch // epochs)}


def export_checkpoint(arch: str, checkpoint: Path, out: Path, image_size: int = 0, context_length: int = 0) -> Path:
    """open_clip_train checkpoint -> open_clip local directory (what `clipa export` writes), with the
    geometry it was trained at (the --force-* flags)."""
    import torch
    from safetensors.torch import save_file

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    state = {k.removeprefix("module."): v.contiguous() for k, v in state.items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "open_clip_model.safetensors"))
    config = json.loads((MODEL_CONFIGS / f"{arch}.json").read_text()) if (MODEL_CONFIGS / f"{arch}.json").is_file() \
        else __import__("open_clip").get_model_config(arch)
    if image_size:
        config["vision_cfg"]["image_size"] = image_size
    if context_length:
        config["text_cfg"]["context_length"] = context_length
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    checkpoint.unlink()
    return out


def vs_open_clip_settings(arch: str, samples: int, batch: int) -> list[Setting]:
    """open_clip_train's defaults against clipa's tiny recipe settings, then matched one by one.

    Both at half resolution and 16 tokens (`--force-image-size` / `--force-context-length` for
    open_clip_train), the geometry of CLIPA's pretraining stage and 4x cheaper than full tokens on
    this CPU; same peak LR and warmup, cosine to 0, batch, samples and model config."""
    from openclipart import CLIPA_TINY_DEFAULTS

    from clipa.model.build import arch_config, native_geometry

    group = f"vs-open-clip {arch}"
    oc = open_clip_defaults(arch)
    half = native_geometry(arch_config(arch)).image_size // 2
    ours = {**tiny_recipe(arch, samples, batch, image_size=half, text_length=16), **CLIPA_TINY_DEFAULTS, **OLD_LOADER}
    matched = {**ours, "data.augment.scale": oc["crop_scale"], **open_clip_adamw_values(arch)}
    return [
        Setting("open_clip_train defaults", ours, tool="open_clip", group=group),
        Setting("clipa default settings (crop 0.9-1)", ours, group=group),
        Setting("clipa + open_clip's betas 0.9/0.999, eps 1e-8, wd 0.2", matched, group=group),
        Setting("clipa + those + open_clip's 5,000-sample shuffle buffer", {**matched, "data.shuffle_buffer": 5000},
                group=group),
        # clipa decodes a JPEG at 1/2-1/8 scale when the crop is 2x the target or more (data.fast_decode);
        # open_clip_train decodes every image whole
        Setting("clipa + those + whole-image JPEG decoding", {**matched, "data.shuffle_buffer": 5000,
                                                              "data.fast_decode": False}, group=group),
        # the other direction: open_clip_train with clipa's AdamW settings
        Setting("open_clip_train + clipa's betas 0.9/0.95, eps 1e-6, wd 0.1", ours, tool="open_clip", group=group,
                extra={"optim_from_recipe": True}),
        # clipa's loader defaults since the finetune-gap study (docs/openclipart.md): the rows above pin the old ones
        Setting("clipa default settings, new loader (8 shards interleaved, 5,000-sample buffer)",
                {**ours, "data.interleave": 8, "data.shuffle_buffer": 5000}, group=group),
    ]


def vs_open_clip_two_stage_settings(arch: str, samples: int, batch: int) -> list[Setting]:
    """Both tools through CLIPA's two stages: the half-resolution, 16-token pretraining above, then a
    full-resolution, full-length finetune from it (a fifth of the pretraining samples, lr / 4, 2
    warmup steps, no masking: open_clip_train has no token masking in finetuning to match),
    evaluated after each stage; open_clip_train finetunes with `--pretrained` on the first stage's
    export. A low-resolution stage can score higher than the model finetuned from it."""
    from openclipart import CLIPA_TINY_DEFAULTS

    from clipa.model.build import arch_config, native_geometry

    group = f"vs-open-clip two-stage {arch}"
    half = native_geometry(arch_config(arch)).image_size // 2
    pretrain = {**tiny_recipe(arch, samples, batch, image_size=half, text_length=16), **CLIPA_TINY_DEFAULTS,
                **OLD_LOADER}
    adamw = open_clip_adamw_values(arch)
    matched = {**adamw, "data.shuffle_buffer": 5000, "data.fast_decode": False}  # crop 0.9-1.0 is clipa's default
    finetune = {**pretrain, "reduction.image_size": 0, "reduction.text_length": 0, "reduction.image": "resize",
                "reduction.mask_ratio": 0.0, "train.total_samples": samples // 5 // batch * batch,
                "optim.lr": pretrain["optim.lr"] / 4, "optim.warmup_steps": 2}
    return [
        Setting("open_clip_train defaults, two stages", pretrain, finetune, tool="open_clip", group=group),
        Setting("clipa default settings, two stages", pretrain, finetune, group=group),
        # the finetune is where the tools part ways (docs/openclipart.md): clipa with open_clip_train's AdamW there
        Setting("clipa, two stages, finetune with open_clip's AdamW", pretrain, {**finetune, **adamw}, group=group),
        # crossovers: which stage makes the difference after the finetune, the first stage's model or the
        # finetune itself (clipa's first stage is bitwise reproducible per seed, so the first row finetunes
        # exactly the model "clipa default settings, two stages" finetunes)
        Setting("clipa pretrain, open_clip_train finetune", pretrain, finetune, group=group,
                finetune_tool="open_clip"),
        Setting("open_clip_train pretrain, clipa finetune", pretrain, finetune, tool="open_clip", group=group,
                finetune_tool="clipa"),
        # the crossovers put the gap in the first stage: clipa with open_clip_train's settings there (and in
        # the finetune, where they changed nothing), AdamW alone, then everything matched
        Setting("clipa, two stages, open_clip's AdamW in both", {**pretrain, **adamw}, {**finetune, **adamw},
                group=group),
        Setting("clipa, two stages, every setting matched in both", {**pretrain, **matched}, {**finetune, **matched},
                group=group),
        # the shards are in category order (openclipart_data.build writes drawings sorted by path), so how
        # far a loader mixes decides how many categories a batch holds: the shuffle buffer alone, at
        # open_clip_train's size and at more than an epoch (every batch a uniform draw from the epoch)
        *[Setting(f"clipa, two stages, shuffle buffer {n} in both", {**pretrain, "data.shuffle_buffer": n},
                  {**finetune, "data.shuffle_buffer": n}, group=group) for n in (5000, 8000)],
        # or reading several shards at once (data.interleave), with the old 2,000-sample buffer
        *[Setting(f"clipa, two stages, {n} shards interleaved in both", {**pretrain, "data.interleave": n},
                  {**finetune, "data.interleave": n}, group=group) for n in (4, 8)],
        Setting("clipa, two stages, 8 shards interleaved + 5,000-sample buffer in both",
                {**pretrain, "data.interleave": 8, "data.shuffle_buffer": 5000},
                {**finetune, "data.interleave": 8, "data.shuffle_buffer": 5000}, group=group),
    ]
