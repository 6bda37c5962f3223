"""The one decode path, for training and evaluation: image bytes (or a reference into a file) -> RGB,
and the training crop. An image reference is the bytes themselves or (path, offset, size), read on
demand; size -1 is the whole file.

Every image is opened here, and one with more pixels than `max_pixels` (data.max_image_pixels;
PIL's own warning threshold by default) is refused before a pixel is decoded. PIL alone only warns
up to twice its threshold, so a 140 kB PNG could still decode to 0.5 GB per worker.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import torch
from PIL import Image

ImageRef = bytes | tuple  # the bytes, or (path, byte offset, size); size -1 = the whole file
MAX_PIXELS = 89_478_485  # data.max_image_pixels's default: PIL's own warning threshold (0.27 GB as RGB)


def open_image(image: ImageRef, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """PIL's lazy open of a referenced image (header only), refused when it has more than `max_pixels`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, whatever PIL's threshold
        opened = Image.open(io.BytesIO(read_bytes(image)))
    width, height = opened.size
    if width * height > max_pixels:
        opened.close()
        raise Image.DecompressionBombError(f"{width}x{height} = {width * height} pixels, over the limit of "
                                           f"{max_pixels} (data.max_image_pixels)")
    return opened


def looks_like_image(head: bytes) -> bool:
    """The first bytes carry a signature PIL can decode (JPEG, PNG, WebP, GIF, BMP)."""
    return (head[:3] == b"\xff\xd8\xff" or head[:8] == b"\x89PNG\r\n\x1a\n"
            or (head[:4] == b"RIFF" and head[8:12] == b"WEBP") or head[:6] in (b"GIF87a", b"GIF89a")
            or head[:2] == b"BM")


MAX_FILE_BYTES = 256 << 20  # an image file (or tar member) larger than this is not read


def open_regular(path: str, max_bytes: int | None = None):
    """A local data file opened for reading: only a regular file (a FIFO would block the open, /dev/zero
    never end), and at most `max_bytes` long. OSError otherwise, naming the path."""
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # non-blocking: a FIFO's open returns
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path}: not a regular file")
        if max_bytes is not None and info.st_size > max_bytes:
            raise OSError(f"{path}: {info.st_size} bytes, over the {max_bytes} an image may have")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(image: ImageRef) -> bytes:
    """The bytes of a reference (an image, or any tar member); OSError when the file is shorter than the
    reference says, is not a regular file, or is (or the member is) larger than MAX_FILE_BYTES."""
    if isinstance(image, bytes):
        return image
    path, offset, size = image
    if size > MAX_FILE_BYTES:
        raise OSError(f"{path}: a {size}-byte member, over the {MAX_FILE_BYTES} an image may have")
    with open_regular(path, MAX_FILE_BYTES if size < 0 else None) as f:
        f.seek(offset)
        data = f.read() if size < 0 else f.read(size)
    if size >= 0 and len(data) != size:
        raise OSError(f"{path} is shorter than its tar header says")
    return data


def draft_factor(box_w: float, box_h: float, size: int) -> int:
    """The largest JPEG DCT reduction (8, 4, 2 or 1) that still leaves the crop >= `size` pixels."""
    factor = 8
    while factor > 1 and (box_w < size * factor or box_h < size * factor):
        factor //= 2
    return factor


def crop_resize(image: Image.Image, crop, rng: np.random.Generator, fast: bool = True) -> torch.Tensor:
    """Random-resized-crop (`crop`: a `RandomResizedCrop`) and resize one image to uint8 [3, S, S], then
    the crop's own augmentations (flip, colour jitter, grayscale) on the resized image.

    The crop box is drawn from the full-resolution size in the header, before any pixel is
    decoded, so the augmentation is the same with and without `fast`. With `fast`, a JPEG whose
    crop is at least 2x the target is decoded by libjpeg at 1/2, 1/4 or 1/8 scale (PIL `draft`),
    which skips most of the inverse DCT and the pixel traffic: the big win at 64-112 px.
    """
    width, height = image.size
    box = crop.box(width, height, rng)
    if fast and image.format == "JPEG":
        factor = draft_factor(box[2] - box[0], box[3] - box[1], crop.size)
        if factor > 1:
            image.draft("RGB", (width // factor, height // factor))
            sx, sy = width / image.size[0], height / image.size[1]
            box = (box[0] / sx, box[1] / sy, box[2] / sx, box[3] / sy)
    out = crop.augment(image.convert("RGB").resize((crop.size, crop.size), crop.resample, box=box), rng)
    return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1)


def decode_crop(image: ImageRef, crop, rng: np.random.Generator, fast: bool = True,
                max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Decode one referenced image and crop it (`crop_resize`)."""
    with open_image(image, max_pixels) as opened:
        return crop_resize(opened, crop, rng, fast)


def open_rgb(image: ImageRef, max_side: int = 0,
             max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, str | None, tuple[int, int]]:
    """(the whole image as RGB, its format, its full size from the header). Every byte is decoded, so a
    truncated body raises; a JPEG is decoded at reduced scale when `max_side` leaves room for it."""
    with open_image(image, max_pixels) as opened:
        fmt, size = opened.format, opened.size
        if max_side and fmt == "JPEG":
            factor = draft_factor(size[0], size[1], max_side)
            if factor > 1:
                opened.draft("RGB", (size[0] // factor, size[1] // factor))
        return opened.convert("RGB"), fmt, size


def decode_image(image: ImageRef, max_side: int = 0, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The whole image as RGB (see `open_rgb`)."""
    return open_rgb(image, max_side, max_pixels)[0]
