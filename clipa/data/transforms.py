"""Image transforms: a uint8 random-resized crop for training, open_clip's resize + center crop for eval.

Training images travel from the loader workers as uint8 (4x less to copy between processes than
float32) and are normalised on the device, in one vectorised op per batch, as big_vision does.
"""

from __future__ import annotations

import numpy as np
import open_clip
import torch
from PIL import Image

from clipa.data.decode import crop_resize

MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1) * 255
STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1) * 255


class RandomResizedCrop:
    """CLIPA's "resize" reduction: crop a random area (scale) and resize straight to `size`.

    One PIL resize with a crop box (bicubic) replaces torchvision's crop + resize + ToTensor, which
    matters when a 2-core machine must feed hundreds of samples per second. The crop is drawn
    from the sample's own generator (torchvision's algorithm: ten tries at a random area and
    aspect ratio, then a center crop), so it does not depend on which worker makes the batch.
    """

    def __init__(self, size: int, scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)

    def box(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        area = width * height
        log_ratio = (np.log(self.ratio[0]), np.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = np.exp(rng.uniform(*log_ratio))
            w = int(round(np.sqrt(target * aspect)))
            h = int(round(np.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
                return left, top, left + w, top + h
        side = min(width, height)  # fallback: the largest centered square
        left, top = (width - side) // 2, (height - side) // 2
        return left, top, left + side, top + side

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        return crop_resize(image, self, rng if rng is not None else np.random.default_rng(), fast=False)


def train_transform(image_size: int, crop_scale=(0.4, 1.0)) -> RandomResizedCrop:
    return RandomResizedCrop(image_size, crop_scale)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW batch -> float, normalised with the OpenAI CLIP mean/std."""
    mean, std = MEAN.to(images.device), STD.to(images.device)
    return (images.float() - mean) / std


def eval_transform(image_size: int, mean=None, std=None, interpolation: str = "bicubic",
                   resize_mode: str = "shortest"):
    """open_clip's eval preprocessing; a published model's own interpolation and resize mode (CLIPA-v2:
    bilinear squash) matter for reproducing its numbers."""
    return open_clip.image_transform(
        image_size,
        is_train=False,
        mean=mean or open_clip.OPENAI_DATASET_MEAN,
        std=std or open_clip.OPENAI_DATASET_STD,
        interpolation=interpolation,
        resize_mode=resize_mode,
    )
