"""Every chart clipa draws, through one small PIL canvas (PIL is already a dependency, so a report or a fit plot
works on any machine clipa runs on, without matplotlib): `line_chart` for one series of a run (`clipa report`),
`plot_fit` for a scaling fit (`clipa scaling fit`). Both draw on a `Chart`: linear or log axes, their ticks and
grid, the frame, a title and axis labels, then lines, bands, dots and marks in data coordinates.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from clipa.errors import ClipaError

BLUE, RED, GREEN, GRID = (31, 119, 180), (214, 39, 40), (44, 160, 44), (230, 230, 230)


def font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def log_ticks(low: float, high: float) -> list[float]:
    """Tick values for a log axis over [low, high]: 1-2-5 (or 1..9) x 10^k, whichever gives 3-8 ticks."""
    for mantissas in ((1,), (1, 2, 5), (1, 2, 3, 4, 5, 6, 7, 8, 9)):
        ticks = [m * 10.0 ** k for k in range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1)
                 for m in mantissas if low <= m * 10.0 ** k <= high]
        if len(ticks) >= 3:
            return ticks
    return ticks


def linear_ticks(low: float, high: float, n: int = 5) -> list[float]:
    if high <= low:
        return [low]
    return [low + (high - low) * i / (n - 1) for i in range(n)]


def tick_label(v: float) -> str:
    """1e22, 2.5e-05 as 2.5e-5, 0.03 as 0.03: short enough for an axis."""
    if v == 0 or 1e-3 <= abs(v) < 1e4:
        return f"{v:.4g}"
    exponent = math.floor(math.log10(abs(v)))
    mantissa = v / 10 ** exponent
    return f"{'-' if v < 0 else ''}1e{exponent}" if abs(abs(mantissa) - 1) < 1e-9 else f"{mantissa:.3g}e{exponent}"


class Chart:
    """A white `size` canvas whose plot area sits inside `margins` (left, right, top, bottom) and maps data
    in `x_range` x `y_range` to pixels, each axis linear or log."""

    def __init__(self, size: tuple[int, int], margins: tuple[int, int, int, int], x_range: tuple[float, float],
                 y_range: tuple[float, float], log_x: bool = False, log_y: bool = False, font_size: int = 16,
                 tick_font_size: int = 13):
        self.image = Image.new("RGB", size, "white")
        self.draw = ImageDraw.Draw(self.image, "RGBA")
        (width, height), (left, right, top, bottom) = size, margins
        self.box = (left, top, width - right, height - bottom)
        self.x_range, self.y_range, self.log_x, self.log_y = x_range, y_range, log_x, log_y
        self.font, self.small = font(font_size), font(tick_font_size)

    @staticmethod
    def _fraction(v: float, low: float, high: float, log: bool) -> float:
        if log:
            return (math.log(v) - math.log(low)) / (math.log(high) - math.log(low))
        return (v - low) / (high - low)

    def px(self, x: float, y: float) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + self._fraction(x, *self.x_range, self.log_x) * (x1 - x0),
                y1 - self._fraction(y, *self.y_range, self.log_y) * (y1 - y0))

    def axes(self, title: str, x_label: str, y_label: str | None = None) -> None:
        """Grid lines and labels at the ticks, the frame, the title above and the axis labels."""
        x0, y0, x1, y1 = self.box
        (xlo, xhi), (ylo, yhi) = self.x_range, self.y_range
        for tick in (log_ticks if self.log_x else linear_ticks)(xlo, xhi):
            x, _ = self.px(tick, ylo)
            self.draw.line([(x, y0), (x, y1)], fill=GRID)
            self.draw.text((x, y1 + 6), tick_label(tick), fill="black", font=self.small, anchor="ma")
        for tick in (log_ticks if self.log_y else linear_ticks)(ylo, yhi):
            _, y = self.px(xlo, tick)
            self.draw.line([(x0, y), (x1, y)], fill=GRID)
            self.draw.text((x0 - 6, y), tick_label(tick), fill="black", font=self.small, anchor="rm")
        self.draw.rectangle([x0, y0, x1, y1], outline="black")
        width, height = self.image.size
        self.draw.text((width / 2, y0 / 2), title, fill="black", font=self.font, anchor="mm")
        self.draw.text((width / 2, height - 22), x_label, fill="black", font=self.font, anchor="ma")
        if y_label:
            axis = Image.new("RGBA", (300, 24), (255, 255, 255, 0))
            ImageDraw.Draw(axis).text((150, 12), y_label, fill="black", font=self.font, anchor="mm")
            axis = axis.rotate(90, expand=True)
            self.image.paste(axis, (8, int(y0 + (y1 - y0) / 2 - 150)), axis)

    def line(self, xy, color=BLUE, width: int = 2) -> None:
        pixels = [self.px(x, y) for x, y in xy]
        if len(pixels) > 1:
            self.draw.line(pixels, fill=color, width=width)

    def band(self, xs, lows, highs, color=(*BLUE, 50)) -> None:
        upper = [self.px(x, y) for x, y in zip(xs, highs)]
        lower = [self.px(x, y) for x, y in zip(xs, lows)]
        self.draw.polygon(upper + lower[::-1], fill=color)

    def dots(self, xy, radius: float = 2, color=BLUE, outline=None) -> None:
        for x, y in xy:
            px, py = self.px(x, y)
            self.draw.ellipse([px - radius, py - radius, px + radius, py + radius], fill=color, outline=outline)

    def mark(self, x: float, y: float, low: float, high: float, text: str, color=GREEN) -> None:
        """A cross at (x, y) with a vertical interval [low, high] and a label to its upper left."""
        px, py = self.px(x, y)
        self.draw.line([(px, self.px(x, low)[1]), (px, self.px(x, high)[1])], fill=color, width=2)
        self.draw.line([(px - 7, py - 7), (px + 7, py + 7)], fill=color, width=3)
        self.draw.line([(px - 7, py + 7), (px + 7, py - 7)], fill=color, width=3)
        self.draw.text((px - 10, py - 12), text, fill=color, font=self.small, anchor="rb")

    def save(self, path: Path) -> None:
        self.image.save(path, format="PNG")


def line_chart(points: list[tuple[float, float]], title: str, path: Path) -> None:
    """One series of a run against samples seen (`clipa report`): a line, its points while they are few."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xmin, xmax = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    ymin, ymax = min(ys), max(ys)
    if ymax - ymin < 1e-12:
        ymin, ymax = ymin - 0.5, ymax + 0.5
    chart = Chart((640, 360), (76, 20, 40, 52), (xmin, xmax), (ymin, ymax), font_size=14, tick_font_size=11)
    chart.axes(title, "samples seen")
    chart.line(points)
    chart.dots(points if len(points) <= 60 else points[-1:])
    chart.save(path)


def plot_fit(points, fit, out: str | Path, target: float | None = None, metric: str = "acc1") -> Path:
    """A log-log PNG of a scaling fit (clipa/analysis/fit.py): the points, the fitted curve with its 95 % band,
    and the extrapolation to `target` compute."""
    out = Path(out)
    if not out.parent.is_dir():
        raise ClipaError(f"--plot: directory {out.parent} does not exist")
    c = np.array([p.compute for p in points])
    e = np.array([p.error for p in points])
    c_lo, c_hi = c.min() / 1.5, max(c.max(), target or 0) * 1.5
    grid = np.exp(np.linspace(math.log(c_lo), math.log(c_hi), 200))
    mean, band_lo, band_hi = fit.predict(grid)
    shown = [e.min(), e.max(), mean.min(), mean.max()]
    if target:
        shown += list(fit.predict(target))
    y_lo, y_hi = max(min(shown) / 1.15, 1e-6), min(max(shown) * 1.15, 1.0)
    chart = Chart((900, 620), (90, 30, 60, 70), (c_lo, c_hi), (y_lo, y_hi), log_x=True, log_y=True)
    chart.band(grid, np.clip(band_lo, y_lo, y_hi), np.clip(band_hi, y_lo, y_hi))
    chart.axes(f"{fit.formula()}   (n = {fit.n}, 95% band)", "training compute C (FLOPs)", f"error = 1 - {metric}")
    chart.line(zip(grid, np.clip(mean, y_lo, y_hi)), width=3)
    chart.dots(zip(c, e), radius=5, color=RED, outline="black")
    if target:
        t_mean, t_lo, t_hi = fit.predict(target)
        chart.mark(target, t_mean, max(t_lo, y_lo), min(t_hi, y_hi), f"{t_mean:.3f} at {tick_label(target)}")
    chart.save(out)
    return out
