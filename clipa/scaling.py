"""Scaling laws: fit zero-shot error against training compute, E = beta * C^alpha (+ e).

As in Cherti et al., "Reproducible scaling laws for contrastive language-image learning" (the
OpenCLIP scaling-law paper): the fit is a least-squares line in log-log space; with an offset `e`
(an irreducible error) it is nonlinear least squares on log E, solved here with numpy only (a
profile grid over `e` for the start, then Levenberg-Marquardt). Confidence intervals (95 %) come
from the covariance of the estimate (Student t, n - p degrees of freedom); the extrapolation's
interval is the delta-method interval of the fitted mean at the target compute.

    from clipa.scaling import load_points, fit_power_law
    points = load_points(["runs/b16-small", "runs/b16-large", "more.json"])
    fit = fit_power_law([p.compute for p in points], [p.error for p in points], offset=True)
    fit.predict(1e22)   # (error, low, high)

Points come from clipa run directories (compute = analytic training FLOPs of the samples actually
run, following `init.checkpoint` back through earlier stages; error = 1 - acc1 of a
`zeroshot_*.json` in the run directory, or of the last evaluation row in metrics.jsonl) or from JSON
files: a list of {"compute": C, "error": E} (or "acc1" instead of "error"), or CLIP_benchmark results
(`{"metrics": {"acc1": ...}, ...}`) with an added "compute", alone or in a list.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clipa.errors import ClipaError
from clipa.run.layout import is_run_dir, read_run_recipe
from clipa.run.lineage import earlier_runs
from clipa.run.metrics import read_metrics

LEVEL = 0.95
# Two-sided 95 % Student t quantiles (t_0.975) for 1..30 degrees of freedom.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def t_quantile(dof: int) -> float:
    """t_0.975 with `dof` degrees of freedom (table to 30, Cornish-Fisher expansion beyond)."""
    if dof < 1:
        raise ValueError("dof must be >= 1")
    if dof <= len(_T975):
        return _T975[dof - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * dof) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * dof ** 2)


# --------------------------------------------------------------------------- points


@dataclass
class Point:
    compute: float  # training FLOPs
    error: float  # 1 - metric, in (0, 1)
    label: str
    notes: list[str] = field(default_factory=list)


def _check_point(compute, error, where: str) -> tuple[float, float]:
    if isinstance(compute, bool) or not isinstance(compute, (int, float)) or not math.isfinite(compute) or compute <= 0:
        raise ClipaError(f"{where}: \"compute\" must be a positive number of FLOPs, got {compute!r}")
    if isinstance(error, bool) or not isinstance(error, (int, float)) or not 0 < error < 1:
        raise ClipaError(f"{where}: error must be in (0, 1) (1 - accuracy as a fraction), got {error!r}")
    return float(compute), float(error)


def _metric_of(result: dict, metric: str):
    metrics = result.get("metrics")
    if isinstance(metrics, dict) and metric in metrics:
        return metrics[metric]
    if metric in result:
        return result[metric]
    return None


def _error_of(item: dict, metric: str, where: str):
    if "error" in item:
        return item["error"]
    value = _metric_of(item, metric)
    if value is None:
        raise ClipaError(f"{where}: no \"error\" and no \"{metric}\" (top level or under \"metrics\"); "
                         f"give one, or pick another --metric")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 1:
        raise ClipaError(f"{where}: {metric} = {value} looks like a percentage; write fractions in [0, 1]")
    return 1.0 - value if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def points_from_json(path: Path, metric: str = "acc1") -> list[Point]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ClipaError(f"{path}: not valid JSON ({err})") from None
    if isinstance(data, dict) and isinstance(data.get("points"), list):
        data = data["points"]
    items = data if isinstance(data, list) else [data]
    points = []
    for i, item in enumerate(items):
        where = f"{path}[{i}]" if isinstance(data, list) else str(path)
        if not isinstance(item, dict):
            raise ClipaError(f"{where}: expected an object with \"compute\" and \"error\", got {item!r}")
        if "compute" not in item:
            raise ClipaError(f"{where}: no \"compute\" (training FLOPs); add it to each result")
        compute, error = _check_point(item["compute"], _error_of(item, metric, where), where)
        label = str(item.get("label") or item.get("name") or item.get("pretrained") or where)
        points.append(Point(compute, error, label))
    return points


def _logged_samples(run: Path) -> int:
    logged = [row["samples"] for row in read_metrics(run).rows if isinstance(row.get("samples"), (int, float))]
    if not logged:
        raise ClipaError(f"{run}/metrics.jsonl: no training rows with \"samples\"; is {run} a clipa run "
                         "directory that has trained at least one log step?")
    return max(logged)


def run_compute(run: Path, step: int | None = None) -> tuple[float, list[str]]:
    """Training FLOPs of a run directory's stage (up to `step`, else the samples it logged), plus
    those of the runs its `init.checkpoint` came from (clipa.run.lineage's walk). Returns (FLOPs, notes)."""
    from clipa.stage import Stage

    recipe = read_run_recipe(run)
    stages, loop, missing = [(run, step, recipe)], [], []  # newest first; why the walk stopped, if it says
    for earlier in earlier_runs(recipe, run, limit=None):  # every stage's compute counts: no cut
        if earlier.run_dir is None:
            missing = [f"{stages[-1][0].name}: init.checkpoint {earlier.init} is not a run directory here; its compute "
                       "is not counted"]
        elif earlier.looped:
            loop = [f"{earlier.run_dir}: init.checkpoint loops back; counted once"]
        else:
            stages.append((earlier.run_dir, earlier.step, earlier.recipe))
    flops, notes = 0.0, []
    for where, at_step, stage_recipe in stages:
        per_sample = Stage.of(stage_recipe).flops_per_sample
        samples = at_step * stage_recipe.train.global_batch_size if at_step is not None else _logged_samples(where)
        flops += per_sample * samples
        notes.insert(0, f"{where.name}: {samples:,} samples x {per_sample:.3g} FLOPs")
    # oldest first: a loop before the first stage, a run not found right after the stage that names it
    return flops, loop + notes[:1] + missing + notes[1:]


def _eval_row_metric(rows: list[dict], metric: str, dataset: str | None):
    """The metric from the last metrics.jsonl row that carries it ("acc1", ".../acc1", "..._acc1")."""
    for row in reversed(rows):
        for k, v in row.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            if k == metric or k.endswith(("/" + metric, "_" + metric, "." + metric)):
                if dataset is None or dataset in k or row.get("dataset") == dataset:
                    return v
    return None


def _zeroshot_result(run: Path, metric: str, dataset: str | None):
    files = sorted(run.glob("zeroshot_*.json"))
    results = []
    for f in files:
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ClipaError(f"{f}: not valid JSON ({err})") from None
        for item in data if isinstance(data, list) else [data]:
            if isinstance(item, dict) and _metric_of(item, metric) is not None:
                results.append((f, item))
    if dataset is not None:
        results = [(f, r) for f, r in results if r.get("dataset") == dataset or f.stem == f"zeroshot_{dataset}"]
    if len(results) > 1:
        names = ", ".join(sorted({str(r.get("dataset", f.name)) for f, r in results}))
        raise ClipaError(f"{run}: several zero-shot results ({names}); choose one with --dataset")
    return (results[0][1], results[0][0]) if results else (None, None)


def points_from_run(run: Path, metric: str = "acc1", dataset: str | None = None) -> Point:
    result, source = _zeroshot_result(run, metric, dataset)
    if result is not None:
        value, where = _metric_of(result, metric), str(source)
    else:
        value, where = _eval_row_metric(read_metrics(run).rows, metric, dataset), f"{run}/metrics.jsonl"
    if value is None:
        which = f"zeroshot_{dataset}.json" if dataset else "zeroshot_*.json"
        raise ClipaError(f"{run}: no zero-shot result: no {which} with {metric} and no evaluation rows in "
                         f"metrics.jsonl; write one with `clipa zeroshot --model {run} --dataset D --output "
                         f"{run}/zeroshot_D.json`")
    if isinstance(value, (int, float)) and value > 1:
        raise ClipaError(f"{where}: {metric} = {value} looks like a percentage; results hold fractions in [0, 1]")
    compute, notes = run_compute(run)
    compute, error = _check_point(compute, 1.0 - value, where)
    return Point(compute, error, run.name, notes)


def load_points(inputs, metric: str = "acc1", dataset: str | None = None) -> list[Point]:
    """Points from run directories and JSON files, in the order given."""
    points = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise ClipaError(f"{path}: does not exist; give clipa run directories or JSON files of "
                             "{\"compute\", \"error\"} points")
        if path.is_dir():
            if not is_run_dir(path):
                raise ClipaError(f"{path}: not a clipa run directory (no config.toml)")
            points.append(points_from_run(path, metric, dataset))
        else:
            points.extend(points_from_json(path, metric))
    return points


# --------------------------------------------------------------------------- fit


@dataclass
class Fit:
    """E = beta * C^alpha + e, fitted on log E. Intervals are 95 % (low, high)."""

    alpha: float
    beta: float
    e: float | None
    alpha_ci: tuple[float, float]
    beta_ci: tuple[float, float]
    e_ci: tuple[float, float] | None
    n: int
    rmse_log: float  # residual standard deviation of log E
    # internals for prediction: params (a, alpha[, e]) with log E = log(exp(a + alpha (log C - x0)) + e)
    params: np.ndarray = field(repr=False)
    cov: np.ndarray = field(repr=False)
    x0: float = field(repr=False)
    t: float = field(repr=False)

    def _grad(self, log_c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _model(self.params, np.atleast_1d(log_c) - self.x0, self.e is not None)

    def predict(self, compute) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Fitted error at `compute` FLOPs and its 95 % confidence band (arrays, or floats for a float)."""
        scalar = np.ndim(compute) == 0
        y, jac = self._grad(np.log(np.asarray(compute, dtype=float)))
        sd = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", jac, self.cov, jac), 0.0))
        out = np.exp(y), np.exp(y - self.t * sd), np.exp(y + self.t * sd)
        return tuple(float(v[0]) for v in out) if scalar else out

    def formula(self) -> str:
        text = f"error = {self.beta:.4g} * C^{self.alpha:.4g}"
        return text + (f" + {self.e:.4g}" if self.e is not None else "")

    def as_dict(self) -> dict:
        out = {"alpha": self.alpha, "alpha_ci": list(self.alpha_ci), "beta": self.beta, "beta_ci": list(self.beta_ci),
               "n": self.n, "rmse_log": self.rmse_log}
        if self.e is not None:
            out.update(e=self.e, e_ci=list(self.e_ci))
        return out


def _model(params: np.ndarray, dx: np.ndarray, offset: bool) -> tuple[np.ndarray, np.ndarray]:
    """log E and its Jacobian with respect to (a, alpha[, e])."""
    u = np.exp(params[0] + params[1] * dx)
    if not offset:
        return np.log(u), np.stack([np.ones_like(dx), dx], axis=1)
    total = u + params[2]
    return np.log(total), np.stack([u / total, u * dx / total, 1.0 / total], axis=1)


def _linear(dx: np.ndarray, y: np.ndarray) -> np.ndarray:
    design = np.stack([np.ones_like(dx), dx], axis=1)
    return np.linalg.lstsq(design, y, rcond=None)[0]


def _levenberg_marquardt(params: np.ndarray, dx: np.ndarray, y: np.ndarray, iterations: int = 200) -> np.ndarray:
    """Minimise sum (log E_model - log E)^2 over (a, alpha, e), keeping 0 <= e < min E."""
    e_max = float(np.exp(y).min()) * (1 - 1e-9)
    lam = 1e-3

    def cost(p):
        return float(np.sum((_model(p, dx, True)[0] - y) ** 2))

    current = cost(params)
    for _ in range(iterations):
        pred, jac = _model(params, dx, True)
        residual = y - pred
        jtj, jtr = jac.T @ jac, jac.T @ residual
        improved = False
        while lam < 1e12:
            step = np.linalg.solve(jtj + lam * np.diag(np.diag(jtj) + 1e-12), jtr)
            trial = params + step
            trial[2] = min(max(trial[2], 0.0), e_max)
            new = cost(trial)
            if new < current:
                done = current - new < 1e-15 * max(current, 1e-30)
                params, current, lam, improved = trial, new, max(lam / 10, 1e-12), True
                break
            lam *= 10
        if not improved or done:
            break
    return params


def fit_power_law(compute, error, offset: bool = False) -> Fit:
    """Fit E = beta * C^alpha (+ e) to points; 95 % intervals from the estimate's covariance."""
    c = np.asarray(compute, dtype=float)
    err = np.asarray(error, dtype=float)
    n, p = len(c), 3 if offset else 2
    if n != len(err):
        raise ClipaError("scaling fit: compute and error have different lengths")
    if n < 3:
        raise ClipaError(f"scaling fit: need at least 3 points, got {n}; add more runs or results")
    if offset and n < 4:
        raise ClipaError(f"scaling fit --offset: fits 3 parameters and needs at least 4 points to estimate "
                         f"their uncertainty, got {n}; drop --offset or add points")
    if np.any(c <= 0) or np.any((err <= 0) | (err >= 1)):
        raise ClipaError("scaling fit: compute must be > 0 and error in (0, 1)")
    x = np.log(c)
    if np.ptp(x) == 0:
        raise ClipaError("scaling fit: every point has the same compute; the exponent needs a range of compute")
    x0 = float(x.mean())
    dx, y = x - x0, np.log(err)
    if not offset:
        params = _linear(dx, y)
    else:
        # Profile over the offset: for each e, the exact log-log line through (C, E - e), scored on log E.
        best = None
        for e in np.linspace(0.0, err.min() * 0.999, 400):
            a, alpha = _linear(dx, np.log(err - e))
            trial = np.array([a, alpha, e])
            score = float(np.sum((_model(trial, dx, True)[0] - y) ** 2))
            if best is None or score < best[0]:
                best = (score, trial)
        params = _levenberg_marquardt(best[1], dx, y)
    pred, jac = _model(params, dx, offset)
    rss = float(np.sum((y - pred) ** 2))
    dof = n - p
    s2 = rss / dof
    cov = s2 * np.linalg.pinv(jac.T @ jac)
    t = t_quantile(dof)
    sd = np.sqrt(np.maximum(np.diag(cov), 0.0))
    alpha = float(params[1])
    log_beta = float(params[0] - params[1] * x0)
    var_log_beta = cov[0, 0] + x0 ** 2 * cov[1, 1] - 2 * x0 * cov[0, 1]
    sd_log_beta = math.sqrt(max(var_log_beta, 0.0))
    e = float(params[2]) if offset else None
    return Fit(
        alpha=alpha, beta=math.exp(log_beta), e=e,
        alpha_ci=(alpha - t * sd[1], alpha + t * sd[1]),
        beta_ci=(math.exp(log_beta - t * sd_log_beta), math.exp(log_beta + t * sd_log_beta)),
        e_ci=(e - t * sd[2], e + t * sd[2]) if offset else None,
        n=n, rmse_log=math.sqrt(rss / n), params=params, cov=cov, x0=x0, t=t,
    )


# --------------------------------------------------------------------------- plot


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _nice_ticks(low: float, high: float) -> list[float]:
    """Tick values for a log axis over [low, high]: 1-2-5 (or 1..9) x 10^k, whichever gives 3-8 ticks."""
    for mantissas in ((1,), (1, 2, 5), (1, 2, 3, 4, 5, 6, 7, 8, 9)):
        ticks = [m * 10.0 ** k for k in range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1)
                 for m in mantissas if low <= m * 10.0 ** k <= high]
        if len(ticks) >= 3:
            return ticks
    return ticks


def _label(v: float) -> str:
    if 1e-3 <= v < 1e4:
        return f"{v:g}"
    exponent = math.floor(math.log10(v))
    mantissa = v / 10 ** exponent
    return f"1e{exponent}" if abs(mantissa - 1) < 1e-9 else f"{mantissa:g}e{exponent}"


def plot_fit(points: list[Point], fit: Fit, out: str | Path, target: float | None = None,
             metric: str = "acc1") -> Path:
    """A log-log PNG: the points, the fitted curve with its 95 % band, and the extrapolation (PIL only)."""
    from PIL import Image, ImageDraw

    out = Path(out)
    if not out.parent.is_dir():
        raise ClipaError(f"--plot: directory {out.parent} does not exist")
    W, H, left, right, top, bottom = 900, 620, 90, 30, 60, 70
    c = np.array([p.compute for p in points])
    e = np.array([p.error for p in points])
    c_lo, c_hi = c.min() / 1.5, max(c.max(), target or 0) * 1.5
    grid = np.exp(np.linspace(math.log(c_lo), math.log(c_hi), 200))
    mean, band_lo, band_hi = fit.predict(grid)
    shown = [e.min(), e.max(), mean.min(), mean.max()]
    if target:
        shown += list(fit.predict(target))
    y_lo, y_hi = max(min(shown) / 1.15, 1e-6), min(max(shown) * 1.15, 1.0)
    band_lo, band_hi = np.clip(band_lo, y_lo, y_hi), np.clip(band_hi, y_lo, y_hi)
    lx0, lx1, ly0, ly1 = math.log(c_lo), math.log(c_hi), math.log(y_lo), math.log(y_hi)

    def px(cx, ey):
        return (left + (math.log(cx) - lx0) / (lx1 - lx0) * (W - left - right),
                top + (ly1 - math.log(ey)) / (ly1 - ly0) * (H - top - bottom))

    image = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(image, "RGBA")
    font, small = _font(16), _font(13)
    draw.polygon([px(g, v) for g, v in zip(grid, band_hi)] + [px(g, v) for g, v in zip(grid[::-1], band_lo[::-1])],
                 fill=(31, 119, 180, 50))
    for tick in _nice_ticks(c_lo, c_hi):
        x, _ = px(tick, y_lo)
        draw.line([(x, top), (x, H - bottom)], fill=(230, 230, 230))
        draw.text((x, H - bottom + 6), _label(tick), fill="black", font=small, anchor="ma")
    for tick in _nice_ticks(y_lo, y_hi):
        _, y = px(c_lo, tick)
        draw.line([(left, y), (W - right, y)], fill=(230, 230, 230))
        draw.text((left - 6, y), _label(tick), fill="black", font=small, anchor="rm")
    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    draw.line([px(g, v) for g, v in zip(grid, np.clip(mean, y_lo, y_hi))], fill=(31, 119, 180), width=3)
    for ci, ei in zip(c, e):
        x, y = px(ci, ei)
        draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=(214, 39, 40), outline="black")
    if target:
        t_mean, t_lo, t_hi = fit.predict(target)
        x, y = px(target, t_mean)
        _, ylo = px(target, max(t_lo, y_lo))
        _, yhi = px(target, min(t_hi, y_hi))
        draw.line([(x, ylo), (x, yhi)], fill=(44, 160, 44), width=2)
        draw.line([(x - 7, y - 7), (x + 7, y + 7)], fill=(44, 160, 44), width=3)
        draw.line([(x - 7, y + 7), (x + 7, y - 7)], fill=(44, 160, 44), width=3)
        draw.text((x - 10, y - 12), f"{t_mean:.3f} at {_label(target)}", fill=(44, 160, 44), font=small, anchor="rb")
    draw.text((W / 2, 18), f"{fit.formula()}   (n = {fit.n}, 95% band)", fill="black", font=font, anchor="ma")
    draw.text((W / 2, H - 22), "training compute C (FLOPs)", fill="black", font=font, anchor="ma")
    axis = Image.new("RGBA", (300, 24), (255, 255, 255, 0))
    ImageDraw.Draw(axis).text((150, 12), f"error = 1 - {metric}", fill="black", font=font, anchor="mm")
    axis = axis.rotate(90, expand=True)
    image.paste(axis, (8, top + (H - top - bottom) // 2 - 150), axis)
    image.save(out, format="PNG")
    return out
