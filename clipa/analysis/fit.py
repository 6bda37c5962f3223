"""Scaling laws: fit zero-shot error against training compute, E = beta * C^alpha (+ e).

As in Cherti et al., "Reproducible scaling laws for contrastive language-image learning" (the
OpenCLIP scaling-law paper): the fit is a least-squares line in log-log space; with an offset `e`
(an irreducible error) it is nonlinear least squares on log E, solved here with numpy only (a
profile grid over `e` for the start, then Levenberg-Marquardt). Confidence intervals (95 %) come
from the covariance of the estimate (Student t, n - p degrees of freedom); the extrapolation's
interval is the delta-method interval of the fitted mean at the target compute.

    from clipa.analysis.points import load_points
    from clipa.analysis.fit import fit_power_law
    points = load_points(["runs/b16-small", "runs/b16-large", "more.json"])
    fit = fit_power_law([p.compute for p in points], [p.error for p in points], offset=True)
    fit.predict(1e22)   # (error, low, high)

Where the points come from: clipa/analysis/points.py; the plot: clipa/analysis/plot.py (`plot_fit`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from clipa.errors import ClipaError

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
