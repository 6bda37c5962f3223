"""Image transforms: a uint8 random-resized crop and the `[data.augment]` ops for training, open_clip's eval transform.

Training images travel from the loader workers as uint8 (4x less to copy between processes than
float32) and are normalised on the device, in one vectorised op per batch, as big_vision does.
"""

from __future__ import annotations

import numpy as np
import open_clip
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image

from clipa.data.decode import crop_resize


class RandomResizedCrop:
    """CLIPA's "resize" reduction: crop a random area (scale) and resize straight to `size`, then the
    per-sample augmentations of `[data.augment]`: flip, colour jitter, grayscale.

    One PIL resize with a crop box (bicubic, or bilinear; PIL antialiases both when shrinking)
    replaces torchvision's crop + resize + ToTensor, which matters when a 2-core machine must feed
    hundreds of samples per second. The crop is drawn from the sample's own generator
    (torchvision's algorithm: ten tries at a random area and aspect ratio, then a center crop), so
    it does not depend on which worker makes the batch; so is every later draw, made after the
    crop's and only for the augmentations that are on (the defaults draw nothing more). Flip,
    jitter and grayscale act on the resized image, as open_clip's pipeline does (crop first): the
    same result as on the source, at a fraction of the pixels.
    """

    def __init__(self, size: int, scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3), interpolation: str = "bicubic",
                 hflip_prob: float = 0.0, color_jitter=(0.0, 0.0, 0.0, 0.0), color_jitter_prob: float = 0.0,
                 gray_scale_prob: float = 0.0):
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)
        self.resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[interpolation]
        self.hflip_prob, self.color_jitter = hflip_prob, tuple(color_jitter)
        self.color_jitter_prob, self.gray_scale_prob = color_jitter_prob, gray_scale_prob

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

    def augment(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Flip, colour jitter (torchvision's ColorJitter: the four ops in a random order, each factor
        uniform in its range) and grayscale of the resized image, drawn from `rng` in that order."""
        if self.hflip_prob and rng.random() < self.hflip_prob:
            image = F.horizontal_flip(image)
        if self.color_jitter_prob and rng.random() < self.color_jitter_prob:
            b, c, s, h = self.color_jitter
            order = rng.permutation(4)
            factors = (rng.uniform(max(0.0, 1 - b), 1 + b), rng.uniform(max(0.0, 1 - c), 1 + c),
                       rng.uniform(max(0.0, 1 - s), 1 + s), rng.uniform(-h, h))
            for op in order:
                if self.color_jitter[op]:
                    image = _JITTER[op](image, float(factors[op]))
        if self.gray_scale_prob and rng.random() < self.gray_scale_prob:
            image = F.rgb_to_grayscale(image, num_output_channels=3)
        return image

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        return crop_resize(image, self, rng if rng is not None else np.random.default_rng(), fast=False)


_JITTER = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)


def train_transform(image_size: int, augment) -> RandomResizedCrop:
    """The training transform of `[data.augment]` (an `AugmentConfig`, or a crop scale alone). No default:
    filling one in here would make data/ import recipe/, which imports data/ to check `data.train`."""
    if isinstance(augment, (tuple, list)):  # a crop scale alone
        return RandomResizedCrop(image_size, augment)
    return RandomResizedCrop(image_size, augment.scale, augment.ratio, augment.interpolation, augment.hflip_prob,
                             augment.color_jitter, augment.color_jitter_prob, augment.gray_scale_prob)


class Normalize:
    """uint8 NCHW batch -> float, normalised with `mean` / `std` (for pixels in [0, 1], open_clip's convention;
    `data.normalize`), one vectorised op per batch on the batch's device. The constants, scaled to 0-255, are
    copied to a device once, not per batch."""

    def __init__(self, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD):
        self.mean, self.std = tuple(mean), tuple(std)
        self._scaled = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        device = images.device
        if device not in self._scaled:
            self._scaled[device] = tuple(torch.tensor(v, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255
                                         for v in (self.mean, self.std))
        mean, std = self._scaled[device]
        return (images.float() - mean) / std


normalize = Normalize()  # OpenAI CLIP's mean/std, clipa's default


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
