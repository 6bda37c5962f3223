"""Analytic training FLOPs of an open_clip ViT + text transformer, per sample.

Counts matmuls only (2 FLOPs per multiply-add): patch embedding, attention projections,
attention scores and values, MLP, output projections; training = 3 x forward (the backward pass
costs two forwards). Layer norms, softmax and the loss are a rounding error at these sizes.
"""

from __future__ import annotations


def _transformer_forward(tokens: int, width: int, layers: int, mlp_width: int) -> float:
    per_layer = 2 * tokens * (4 * width * width + 2 * width * mlp_width) + 2 * 2 * tokens * tokens * width
    return float(layers * per_layer)


def image_tokens(model_cfg: dict, image_size: int, keep_ratio: float = 1.0) -> int:
    """Tokens the vision transformer runs on: kept patches (as the masker keeps them) + class token."""
    from clipa.reduction import keep_count

    v = model_cfg["vision_cfg"]
    patches = (image_size // v["patch_size"]) ** 2
    return keep_count(patches, 1.0 - keep_ratio) + 1


def forward_flops(model_cfg: dict, image_size: int, context_length: int, keep_ratio: float = 1.0) -> dict:
    v, t, embed = model_cfg["vision_cfg"], model_cfg["text_cfg"], model_cfg["embed_dim"]
    n_img = image_tokens(model_cfg, image_size, keep_ratio)
    vw = v["width"]
    all_patches = (image_size // v["patch_size"]) ** 2  # the patch embedding runs before masking
    vision = 2 * all_patches * 3 * v["patch_size"] ** 2 * vw
    vision += _transformer_forward(n_img, vw, v["layers"], int(vw * v.get("mlp_ratio", 4.0)))
    vision += 2 * vw * embed
    tw = t.get("width", 512)
    text = _transformer_forward(context_length, tw, t.get("layers", 12), int(tw * t.get("mlp_ratio", 4.0)))
    text += 2 * tw * embed
    return {"image": vision, "text": text, "total": vision + text}


def train_flops_per_sample(model_cfg: dict, image_size: int, context_length: int, keep_ratio: float = 1.0) -> float:
    return 3.0 * forward_flops(model_cfg, image_size, context_length, keep_ratio)["total"]


# Dense bf16 peak TFLOP/s, for MFU on GPUs; on a CPU clipa reports achieved TFLOP/s only.
PEAK_TFLOPS_BF16 = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "L4": 121.0, "A10": 125.0, "L40S": 362.0,
                    "V100": 125.0, "4090": 165.0, "3090": 71.0}


def device_peak_flops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_TFLOPS_BF16.items():
        if key in name:
            return tflops * 1e12
    return None
