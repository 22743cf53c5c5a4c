"""OpenERF's free-centre 2-D Gaussian fit, on ``scipy.optimize.least_squares``.

The model (OpenERF's ``fit_2d_gaussian``, optionally tilted) is fitted by least squares to the
map ``p`` normalised to mass 1, over **every pixel** of the map:

``G(y, x) = A * sqrt(det P) / (2 pi) * exp(-1/2 (d^T P d))``, ``d = (y - yc, x - xc)``,

with the precision matrix ``P = L L^T``, ``L = [[e^u, 0], [w, e^v]]`` (``w = 0``: axis-aligned,
``sigma_y = e^-u``, ``sigma_x = e^-v``). This parametrisation keeps ``P`` positive definite at
every step, so MINPACK's unconstrained Levenberg-Marquardt (``method="lm"``) applies.

**Exact shortcuts for the axis-aligned model** (the logged one). ``G = A fy(y) fx(x)`` is an
outer product, and the sum of squared residuals over all ``H x W`` pixels is rewritten,
exactly, as the squared norm of ``h + w + 2`` residuals instead of ``H W``:

* Outside the map's support (the bounding box ``Y x X`` of its non-zero pixels, padded by two
  pixels, ``h x w``) ``p = 0`` and the residual is ``G``: its squares sum to
  ``A^2 (|fy_out|^2 |fx|^2 + |fy_in|^2 |fx_out|^2)``, two residuals made of 1-D norms.
* On the window, with ``Q`` the window of ``p``, ``q = Q fx`` and ``n = |fx|``:
  ``|A fy fx^T - Q|^2 = |A n fy - q / n|^2 + (|Q|^2 - |q|^2 / n^2)``, and the last term is
  ``|R fx|^2 / n^2`` with ``R^T R = |Q|^2 I - Q^T Q`` (a positive semi-definite ``w x w``
  matrix, factorised once per map by Cholesky): ``h`` residuals ``A n fy - q / n`` and ``w``
  residuals ``R fx / n``.

So an iteration costs three matrix-vector products with the window (microseconds to a few
milliseconds) instead of evaluating and factorising an ``H W x 5`` Jacobian (a 247-px field:
62,000 residuals; a 1024-px map with a global field: a million). The one-off factorisation
costs ``O(h w^2 + w^3)``. The tilted model is not separable and is fitted on the whole map.

**Degenerate fits** are flagged (``degenerate`` set, ``converged=False``): a fitted sigma
below :data:`MIN_SIGMA` (the Gaussian's +-1 sigma band is narrower than one pixel: its width
is not measured by the pixels), a non-positive amplitude, or a second optimum as good as the
best one but elsewhere (a symmetric "+" of thin arms is fitted as well by its horizontal as by
its vertical bar). For the last check the fit is restarted from the optimum with its two
widths swapped (an elongated optimum) or stretched 2x along one axis and squeezed along the
other, both ways round (a round one, possibly a saddle between two bars).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["MIN_SIGMA", "GaussianFit", "fit_gaussian", "nan_fit"]

#: A fitted sigma (pixels) below this makes a fit degenerate.
MIN_SIGMA = 0.5
#: Two optima whose residual sums of squares differ by less than this fraction of the map's
#: total sum of squares about its mean (i.e. whose R² differ by less) are "as good".
EQUAL_COST = 1e-6
_LOG_STRETCH = math.log(2.0)
_CLIP = 30.0  # |u|, |v| beyond this (sigma outside e^-30 .. e^30 px) is clipped


@dataclass(frozen=True)
class GaussianFit:
    """A 2-D Gaussian fitted to an ERF map normalised to sum 1 (OpenERF's model).

    ``G(y, x) = amplitude * N((y, x); centre, covariance)``, ``N`` the normalised bivariate
    normal density, so ``amplitude`` is the share of the map's mass the Gaussian carries
    (1 for a map that is exactly Gaussian and well inside the input).

    Attributes:
        amplitude: integral of the fitted Gaussian over the plane, in units of the map's mass.
        centre: ``(y, x)`` in pixel indices (free: not tied to the theoretical centre).
        sigma: ``(sigma_y, sigma_x)``, square roots of the covariance's diagonal, in pixels.
        covariance: ``((s_yy, s_yx), (s_xy, s_xx))`` in pixels²; diagonal unless fitted with
            ``rotated=True``.
        r2: ``1 - Var(G - p) / Var(p)`` over all pixels (``p`` the normalised map): OpenERF's
            R², which subtracts the residual's mean (1: a perfect fit).
        rotated: whether the covariance was free to tilt (``False``: axis-aligned, as OpenERF).
        converged: the optimiser met its tolerance and the fit is not degenerate.
        degenerate: why the fit does not describe the map, else ``None``: ``"sub-pixel"`` (a
            sigma below :data:`MIN_SIGMA`), ``"amplitude"`` (not positive) or ``"ambiguous"``
            (another optimum fits as well).
    """

    amplitude: float
    centre: tuple[float, float]
    sigma: tuple[float, float]
    covariance: tuple[tuple[float, float], tuple[float, float]]
    r2: float
    rotated: bool = False
    converged: bool = True
    degenerate: str | None = None


def nan_fit(rotated: bool) -> GaussianFit:
    """The fit of a map that is zero everywhere: every number NaN, not converged."""
    nan = math.nan
    return GaussianFit(nan, (nan, nan), (nan, nan), ((nan, nan), (nan, nan)), nan, rotated, False)


def _factor(idx: np.ndarray, c: float, e: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``f = e / sqrt(2 pi) exp(-(e (idx - c))^2 / 2)`` and its log-derivatives along ``c``
    and ``log e``."""
    s = e * (idx - c)
    f = e / math.sqrt(2 * math.pi) * np.exp(-0.5 * s * s)
    return f, s * e, 1.0 - s * s


def _norm(
    f: np.ndarray, g1: np.ndarray, g2: np.ndarray, mask: np.ndarray | None
) -> tuple[float, float, float]:
    """``|f[mask]|`` and its derivatives along the two parameters whose ``d log f`` are
    ``g1``, ``g2`` (``d|f| = sum f^2 g / |f|``; 0 where the norm underflows to 0)."""
    if mask is not None:
        f, g1, g2 = f[mask], g1[mask], g2[mask]
    f2 = f * f
    n = math.sqrt(float(f2.sum()))
    if n == 0.0:
        return 0.0, 0.0, 0.0
    return n, float(f2 @ g1) / n, float(f2 @ g2) / n


class _Dense:
    """The tilted model, evaluated on every pixel of the map."""

    def __init__(self, x: np.ndarray, total: float) -> None:
        self.p = x / total
        self.target = self.p.ravel()
        self.squares = float(self.target @ self.target)
        self.rows = np.arange(x.shape[0], dtype=np.float64)[:, None]
        self.cols = np.arange(x.shape[1], dtype=np.float64)[None, :]
        self.size = self.target.size

    def _grid(self, theta: np.ndarray) -> tuple[np.ndarray, ...]:
        eu, ev, w = _exp(theta[3]), _exp(theta[4]), float(theta[5])
        dy, dx = self.rows - theta[1], self.cols - theta[2]
        s, t = eu * dy + w * dx, ev * dx
        base = (eu * ev / (2 * math.pi)) * np.exp(-0.5 * (s * s + t * t))
        return base, s, t, dy, dx

    def residuals(self, theta: np.ndarray) -> np.ndarray:
        return (theta[0] * self._grid(theta)[0]).ravel() - self.target

    def jacobian(self, theta: np.ndarray) -> np.ndarray:
        eu, ev, w = _exp(theta[3]), _exp(theta[4]), float(theta[5])
        base, s, t, dy, dx = self._grid(theta)
        g = theta[0] * base
        cols = [
            base,
            g * (s * eu),
            g * (s * w + t * ev),
            g * (1.0 - s * eu * dy),
            g * (1.0 - t * t),
        ]
        cols.append(g * (-s * dx))
        return np.stack([c.ravel() for c in cols], axis=1)

    def sums(self, theta: np.ndarray) -> tuple[float, float]:
        res = self.residuals(theta)
        return float(res.sum()), float(res @ res)


def _exp(v: float) -> float:
    return math.exp(min(max(v, -_CLIP), _CLIP))


class _Separable:
    """The axis-aligned model, with the exact shortcuts of the module docs."""

    def __init__(self, x: np.ndarray, total: float) -> None:
        h, w = self.shape = x.shape
        rows = np.flatnonzero(x.any(1))
        cols = np.flatnonzero(x[rows[0] : rows[-1] + 1].any(0))
        self.y0, self.y1 = max(int(rows[0]) - 2, 0), min(int(rows[-1]) + 3, h)
        self.x0, self.x1 = max(int(cols[0]) - 2, 0), min(int(cols[-1]) + 3, w)
        self.q = x[self.y0 : self.y1, self.x0 : self.x1] / total  # p on the window
        self.squares = float((self.q * self.q).sum())  # sum p^2 over the map
        # |Q|^2 - |Q f|^2 / |f|^2 = |R f|^2 / |f|^2 with R^T R = |Q|^2 I - Q^T Q (positive
        # semi-definite): Cholesky, or the eigen-decomposition where that matrix is singular
        gram = self.q.T @ self.q
        m = np.trace(gram) * np.eye(gram.shape[0]) - gram
        try:
            self.r = np.linalg.cholesky(m).T
        except np.linalg.LinAlgError:  # a rank-one window (an exactly separable map)
            lam, v = np.linalg.eigh(gram)
            lam = np.maximum(lam, 0.0)
            self.r = np.sqrt(np.maximum(lam.sum() - lam, 0.0))[:, None] * v.T
        self.rows = np.arange(h, dtype=np.float64)
        self.cols = np.arange(w, dtype=np.float64)
        self.in_y = np.zeros(h, dtype=bool)
        self.in_y[self.y0 : self.y1] = True
        self.in_x = np.zeros(w, dtype=bool)
        self.in_x[self.x0 : self.x1] = True
        self.outside = not (self.in_y.all() and self.in_x.all())
        self.size = self.q.shape[0] + self.q.shape[1] + (2 if self.outside else 0)
        self._memo: tuple[bytes, Any, Any] = (b"", None, None)

    def _eval(self, theta: np.ndarray, jac: bool) -> tuple[np.ndarray, np.ndarray | None]:
        amp = float(theta[0])
        key = theta.tobytes()
        if self._memo[0] != key:  # MINPACK asks for the Jacobian where it had the residuals
            self._memo = (
                key,
                _factor(self.rows, theta[1], _exp(theta[3])),
                _factor(self.cols, theta[2], _exp(theta[4])),
            )
        (fy, gy_c, gy_u), (fx, gx_c, gx_v) = self._memo[1], self._memo[2]
        wy, wx = fy[self.in_y], fx[self.in_x]  # the factors on the window
        n = math.sqrt(float(wx @ wx))
        q = self.q @ wx
        r2 = self.r @ wx / n
        r1 = amp * n * wy - q / n
        extra: list[tuple[float, list[float]]] = []
        if self.outside:  # A |fy_out| |fx| and A |fy_in| |fx_out|, with their gradients
            y_out, y_in = _norm(fy, gy_c, gy_u, ~self.in_y), _norm(fy, gy_c, gy_u, self.in_y)
            x_all, x_out = _norm(fx, gx_c, gx_v, None), _norm(fx, gx_c, gx_v, ~self.in_x)
            for (ny, dyc, dyu), (nx, dxc, dxv) in ((y_out, x_all), (y_in, x_out)):
                grad = [ny * nx, amp * dyc * nx, amp * ny * dxc, amp * dyu * nx, amp * ny * dxv]
                extra.append((amp * ny * nx, grad))
        res = np.concatenate([r1, r2, [e[0] for e in extra]])
        if not jac:
            return res, None
        out = np.zeros((self.size, 5))
        hq = r1.size
        out[:hq, 0] = n * wy
        out[:hq, 1] = amp * n * wy * gy_c[self.in_y]
        out[:hq, 3] = amp * n * wy * gy_u[self.in_y]
        for k, g in ((2, gx_c), (4, gx_v)):  # the x parameters move fx
            dwx = wx * g[self.in_x]
            dn = float(wx @ dwx) / n
            out[:hq, k] = amp * dn * wy - (self.q @ dwx) / n + q * dn / (n * n)
            out[hq : hq + r2.size, k] = self.r @ dwx / n - r2 * dn / n
        for row, (_, grad) in enumerate(extra):
            out[hq + r2.size + row] = grad
        return res, out

    def residuals(self, theta: np.ndarray) -> np.ndarray:
        return self._eval(theta, False)[0]

    def jacobian(self, theta: np.ndarray) -> np.ndarray:
        jac = self._eval(theta, True)[1]
        assert jac is not None
        return jac

    def sums(self, theta: np.ndarray) -> tuple[float, float]:
        """Sum and sum of squares of the residuals over every pixel of the map."""
        res = self.residuals(theta)
        fy, _, _ = _factor(self.rows, theta[1], _exp(theta[3]))
        fx, _, _ = _factor(self.cols, theta[2], _exp(theta[4]))
        return float(theta[0]) * float(fy.sum()) * float(fx.sum()) - 1.0, float(res @ res)


def _theta_from(
    centre: tuple[float, float], cov: tuple[float, float, float], rotated: bool
) -> np.ndarray:
    """Parameters ``(1, yc, xc, u, v[, w])`` of a unit-amplitude Gaussian of covariance
    ``(s_yy, s_xx, s_yx)``."""
    cyy, cxx, cyx = cov
    if not rotated or cyy * cxx - cyx * cyx <= 0:
        cyx = 0.0
    det = cyy * cxx - cyx * cyx
    a, b, c = cxx / det, -cyx / det, cyy / det  # the precision matrix [[a, b], [b, c]]
    u = 0.5 * math.log(a)
    v = 0.5 * math.log((a * c - b * b) / a)
    extra = [b / math.exp(u)] if rotated else []
    return np.array([1.0, centre[0], centre[1], u, v, *extra])


def _covariance(theta: np.ndarray, rotated: bool) -> tuple[float, float, float]:
    eu2 = math.exp(2 * min(max(theta[3], -_CLIP), _CLIP))
    ev2 = math.exp(2 * min(max(theta[4], -_CLIP), _CLIP))
    w = float(theta[5]) if rotated else 0.0
    det = eu2 * ev2
    return (w * w + ev2) / det, eu2 / det, -w * math.sqrt(eu2) / det


def _solve(
    problem: _Separable | _Dense, theta0: np.ndarray, tol: float = 1e-12
) -> tuple[np.ndarray, float, bool]:
    from scipy.optimize import least_squares

    method = "lm" if problem.size >= theta0.size else "trf"
    sol = least_squares(
        problem.residuals,
        theta0,
        jac=problem.jacobian,
        method=method,
        x_scale="jac",
        ftol=tol,
        xtol=tol,
        gtol=tol,
        max_nfev=200 * (theta0.size + 1),
    )
    ok = bool(sol.success) and bool(np.all(np.isfinite(sol.x)))
    return sol.x, float(2.0 * sol.cost), ok


def _restarts(theta: np.ndarray, rotated: bool) -> list[np.ndarray]:
    """Where a second optimum could be: an elongated fit's mirror image (widths swapped); for
    a round one (possibly a saddle between two bars) the widths stretched 2x one way and
    squeezed the other, both ways round."""
    sy, sx = _sigmas(theta, rotated)
    if abs(sy - sx) > 1e-2 * max(sy, sx):
        swapped = theta.copy()
        swapped[3], swapped[4] = theta[4], theta[3]
        return [swapped]
    out = []
    for sign in (1.0, -1.0):
        stretched = theta.copy()
        stretched[3] += sign * _LOG_STRETCH
        stretched[4] -= sign * _LOG_STRETCH
        out.append(stretched)
    return out


def _sigmas(theta: np.ndarray, rotated: bool) -> np.ndarray:
    return np.sqrt(np.asarray(_covariance(theta, rotated)[:2]))


def _distinct(a: np.ndarray, b: np.ndarray, rotated: bool) -> bool:
    sa, sb = _sigmas(a, rotated), _sigmas(b, rotated)
    moved = max(abs(a[1] - b[1]), abs(a[2] - b[2])) > 0.05
    return bool(moved or np.any(np.abs(sa - sb) > 1e-2 * np.maximum(sa, sb)))


def fit_gaussian(
    x: np.ndarray,
    *,
    rotated: bool = False,
    start: GaussianFit | None = None,
    check_unique: bool = True,
    tol: float = 1e-12,
) -> GaussianFit:
    """Fit the model to a validated, non-negative 2-D float64 map ``x``, normalised here to
    ``p = x / sum(x)`` (a map that is zero everywhere: :func:`nan_fit`).

    Args:
        x: the map.
        rotated: also fit the covariance's off-diagonal term.
        start: a fit to start from (the full map's fit for a bootstrap resample); default:
            the map's moments, the covariance floored at a quarter pixel² (a delta's scale).
        check_unique: restart from stretched widths to detect a second, equally good optimum.
        tol: MINPACK's ``ftol``, ``xtol`` and ``gtol`` (the bootstrap's resamples, started at
            the full map's optimum, use ``1e-9``: far below their own spread).
    """
    if not x.any():
        return nan_fit(rotated)
    total = float(x.sum())
    problem: _Separable | _Dense = _Dense(x, total) if rotated else _Separable(x, total)
    if start is not None and all(math.isfinite(v) for v in (*start.centre, *start.sigma)):
        (cyy, cyx), (_, cxx) = start.covariance
        theta0 = _theta_from(start.centre, (cyy, cxx, cyx), rotated)
        theta0[0] = start.amplitude if start.amplitude > 0 else 1.0
    else:
        if isinstance(problem, _Separable):  # all of p's mass is on the window
            (my, mx), cov = _moments(problem.q, rotated)
            theta0 = _theta_from((my + problem.y0, mx + problem.x0), cov, rotated)
        else:
            theta0 = _theta_from(*_moments(problem.p, rotated), rotated)
    theta, cost, ok = _solve(problem, theta0, tol)
    degenerate = None
    if min(_sigmas(theta, rotated)) < MIN_SIGMA:
        degenerate = "sub-pixel"  # not worth restarting: the widths are not measured at all
    elif check_unique:
        spread = problem.squares - 1.0 / x.size  # sum (p - mean p)^2 over the map
        optima = [(cost, theta, ok)]
        for other in _restarts(theta, rotated):  # located roughly, polished if better
            t2, c2, ok2 = _solve(problem, other, tol=1e-8)
            optima.append((c2, t2, ok2))
        best = min(range(len(optima)), key=lambda k: optima[k][0])
        if best:
            theta, cost, ok = _solve(problem, optima[best][1])
            optima[best] = (cost, theta, ok)
        if any(
            c - cost <= EQUAL_COST * spread and _distinct(theta, t, rotated)
            for k, (c, t, _) in enumerate(optima)
            if k != best
        ):
            degenerate = "ambiguous"
    cyy, cxx, cyx = _covariance(theta, rotated)
    sigma = (math.sqrt(cyy), math.sqrt(cxx))
    if degenerate is None and min(sigma) < MIN_SIGMA:
        degenerate = "sub-pixel"
    if degenerate is None and not theta[0] > 0:
        degenerate = "amplitude"
    total, squares = problem.sums(theta)
    npix = x.size
    var_p = problem.squares / npix - (1.0 / npix) ** 2
    var_res = squares / npix - (total / npix) ** 2
    r2 = math.nan if var_p <= 0.0 else 1.0 - var_res / var_p
    return GaussianFit(
        amplitude=float(theta[0]),
        centre=(float(theta[1]), float(theta[2])),
        sigma=sigma,
        covariance=((cyy, cyx), (cyx, cxx)),
        r2=float(r2),
        rotated=rotated,
        converged=ok and degenerate is None,
        degenerate=degenerate,
    )


def _moments(
    p: np.ndarray, rotated: bool
) -> tuple[tuple[float, float], tuple[float, float, float]]:
    """Centroid and covariance ``(s_yy, s_xx, s_yx)`` of ``p`` (mass 1), variances floored at
    a quarter pixel²."""
    py, px = p.sum(1), p.sum(0)
    y = np.arange(p.shape[0], dtype=np.float64)
    x = np.arange(p.shape[1], dtype=np.float64)
    my, mx = float(py @ y), float(px @ x)
    cyy = max(float(py @ (y - my) ** 2), 0.25)
    cxx = max(float(px @ (x - mx) ** 2), 0.25)
    cyx = float((y - my) @ p @ (x - mx)) if rotated else 0.0
    return (my, mx), (cyy, cxx, cyx)
