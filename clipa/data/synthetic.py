"""Built-in synthetic image-caption data: procedurally drawn scenes with compositional captions.

Each scene has one main object (shape x color x size x position x texture) on a noisy, sometimes
striped background, plus up to two smaller distractor objects. The caption names the main
object first ("a large striped red triangle at the top left, next to a blue circle"), so
truncated captions keep the words that matter most, as real alt-text tends to.

Everything is a pure function of (seed, index): sample 1,000,000 is drawn without drawing the
999,999 before it, which makes the stream endless, splittable across processes and workers,
and exactly resumable. The zero-shot set ("main object color + shape", 24 classes) is drawn
from a separate seed space, so it is held out from every training stream.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 220),
    "yellow": (235, 215, 35),
    "purple": (145, 50, 190),
    "cyan": (40, 210, 220),
}
SHAPES = ("circle", "square", "triangle", "cross")
TEXTURES = ("plain", "striped", "dotted")
POSITIONS = {
    "top left": (0.25, 0.25), "top": (0.5, 0.25), "top right": (0.75, 0.25),
    "left": (0.25, 0.5), "center": (0.5, 0.5), "right": (0.75, 0.5),
    "bottom left": (0.25, 0.75), "bottom": (0.5, 0.75), "bottom right": (0.75, 0.75),
}
CLASSNAMES = [f"{color} {shape}" for color in COLORS for shape in SHAPES]
TEMPLATES = (
    "a photo of a {c}.",
    "a {c}.",
    "a picture of a {c}.",
    "a drawing of a {c}.",
    "a {c} on a noisy background.",
)
_CAPTIONS = (
    "a {size} {look} at the {pos}{rest}",
    "a photo of a {size} {look}{rest}",
    "{size} {look} in the {pos}{rest}",
    "there is a {look} at the {pos}{rest}",
    "a {look} at the {pos}{rest}",
)
# Evaluation scenes use seed spaces disjoint from training scenes: zero-shot classes, retrieval pairs.
_EVAL_STREAM = 0x5EED_E7A1
_RETRIEVAL_STREAM = 0x2E7


def scene_rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([k & 0xFFFF_FFFF_FFFF_FFFF for k in key])


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "cross":
        a, b = r, r * 0.35
        return [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b),
                (cx + b, cy + b), (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b),
                (cx - a, cy - b), (cx - b, cy - b)]
    raise ValueError(shape)


def _draw_object(canvas: Image.Image, shape: str, color, texture: str, cx, cy, r, rng) -> None:
    mask = Image.new("L", canvas.size, 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=255)
    jitter = rng.integers(-20, 21, size=3)
    fill_color = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(color, jitter))
    fill = Image.new("RGB", canvas.size, fill_color)
    if texture != "plain":
        dark = tuple(int(c * 0.45) for c in fill_color)
        pattern = ImageDraw.Draw(fill)
        w = canvas.size[0]
        step = max(3, int(r / 2.5))
        if texture == "striped":
            for x in range(-w, w, step):
                pattern.line([(x, 0), (x + w, w)], fill=dark, width=max(1, step // 3))
        else:
            for y in range(0, w, step):
                for x in range(0, w, step):
                    pattern.ellipse([x, y, x + step / 2.5, y + step / 2.5], fill=dark)
    canvas.paste(fill, (0, 0), mask)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    base = rng.integers(40, 150, size=3, dtype=np.int16)
    # Uniform integer noise: as good a nuisance as Gaussian here, and several times cheaper to draw.
    noise = (rng.integers(-30, 31, size=(size, size, 1), dtype=np.int16)
             + rng.integers(-12, 13, size=(size, size, 3), dtype=np.int16))
    pixels = base[None, None, :] + noise
    if rng.random() < 0.3:  # faint background stripes
        period = rng.integers(4, 12)
        stripes = (np.arange(size) // period % 2)[None, :, None] * rng.integers(10, 25)
        pixels = pixels + (stripes if rng.random() < 0.5 else stripes.transpose(1, 0, 2))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def draw_scene(rng: np.random.Generator, size: int = 64, label: int | None = None) -> tuple[Image.Image, str, int]:
    """Draw one scene; returns (image, caption, class index of the main object)."""
    colors = list(COLORS)
    if label is None:
        label = int(rng.integers(len(CLASSNAMES)))
    color, shape = colors[label // len(SHAPES)], SHAPES[label % len(SHAPES)]
    big = rng.random() < 0.5
    radius = size * (rng.uniform(0.26, 0.33) if big else rng.uniform(0.17, 0.22))
    pos = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
    px, py = POSITIONS[pos]
    cx = np.clip(px * size + rng.uniform(-0.06, 0.06) * size, radius, size - radius)
    cy = np.clip(py * size + rng.uniform(-0.06, 0.06) * size, radius, size - radius)
    texture = TEXTURES[int(rng.choice(3, p=[0.6, 0.2, 0.2]))]

    image = _background(rng, size)
    distractors = []
    for _ in range(int(rng.choice(3, p=[0.4, 0.4, 0.2]))):
        d_color = colors[int(rng.integers(len(colors)))]
        d_shape = SHAPES[int(rng.integers(len(SHAPES)))]
        d_r = size * rng.uniform(0.08, 0.12)
        # Place distractors away from the main object so it stays the largest visible thing.
        for _attempt in range(8):
            dx, dy = rng.uniform(d_r, size - d_r, size=2)
            if math.hypot(dx - cx, dy - cy) > radius + d_r:
                break
        _draw_object(image, d_shape, COLORS[d_color], "plain", dx, dy, d_r, rng)
        distractors.append(f"{d_color} {d_shape}")
    _draw_object(image, shape, COLORS[color], texture, cx, cy, radius, rng)

    look = f"{'' if texture == 'plain' else texture + ' '}{color} {shape}"
    rest = ""
    if distractors:
        rest = f", next to a {distractors[0]}" + "".join(f" and a {d}" for d in distractors[1:])
    template = _CAPTIONS[int(rng.integers(len(_CAPTIONS)))]
    caption = template.format(size="large" if big else "small", look=look, pos=pos, rest=rest)
    return image, caption, label


def train_sample(seed: int, index: int, size: int = 64) -> tuple[Image.Image, str]:
    image, caption, _ = draw_scene(scene_rng(seed, index), size)
    return image, caption


def eval_sample(seed: int, index: int, size: int = 64) -> tuple[Image.Image, int]:
    """Held-out zero-shot sample `index`: classes cycle so every class has the same count."""
    label = index % len(CLASSNAMES)
    image, _, _ = draw_scene(scene_rng(_EVAL_STREAM, seed, index), size, label=label)
    return image, label


def retrieval_sample(index: int) -> tuple[Image.Image, str]:
    """Held-out retrieval pair `index` (image, caption)."""
    image, caption, _ = draw_scene(scene_rng(_RETRIEVAL_STREAM, 0, index))
    return image, caption


class SyntheticSource:
    """Endless training source: `sample(i)` is scene i of the seed's stream."""

    def __init__(self, seed: int = 0, image_size: int = 64):
        self.seed = seed
        self.image_size = image_size

    def sample(self, index: int) -> tuple[Image.Image, str]:
        return train_sample(self.seed, index, self.image_size)


class SyntheticEvalSet:
    """The held-out zero-shot classification set, as a map-style dataset of (image, label)."""

    classnames = CLASSNAMES
    templates = TEMPLATES

    def __init__(self, seed: int = 0, per_class: int = 40, image_size: int = 64, transform=None):
        self.seed, self.image_size, self.transform = seed, image_size, transform
        self.size = per_class * len(CLASSNAMES)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        image, label = eval_sample(self.seed, index, self.image_size)
        return (self.transform(image) if self.transform else image), label
