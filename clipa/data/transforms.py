"""Image transforms: a uint8 random-resized crop for training, open_clip's resize + center crop for eval.

Training images travel from the loader workers as uint8 (4x less to copy between processes than
float32) and are normalised on the device, in one vectorised op per batch, as big_vision does.
"""

from __future__ import annotations

import numpy as np
import open_clip
import torch
from PIL import Image
from torchvision import transforms as T

MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1) * 255
STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1) * 255


class RandomResizedCrop:
    """CLIPA's "resize" reduction: crop a random area (scale) and resize straight to `size`.

    One PIL resize with a crop box (bicubic) replaces torchvision's crop + resize + ToTensor, which
    matters when a 2-core machine must feed hundreds of samples per second. Randomness comes from
    torch's global RNG, like torchvision's, so seeding it makes the crops reproducible.
    """

    def __init__(self, size: int, scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        top, left, h, w = T.RandomResizedCrop.get_params(image, self.scale, self.ratio)
        image = image.resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + w, top + h))
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def train_transform(image_size: int, crop_scale=(0.4, 1.0)) -> RandomResizedCrop:
    return RandomResizedCrop(image_size, crop_scale)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW batch -> float, normalised with the OpenAI CLIP mean/std."""
    mean, std = MEAN.to(images.device), STD.to(images.device)
    return (images.float() - mean) / std


def eval_transform(image_size: int, mean=None, std=None):
    return open_clip.image_transform(
        image_size,
        is_train=False,
        mean=mean or open_clip.OPENAI_DATASET_MEAN,
        std=std or open_clip.OPENAI_DATASET_STD,
    )
