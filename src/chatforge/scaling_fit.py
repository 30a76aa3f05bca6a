"""Scaling-law fits for the ``chatforge scaling`` ladder (numpy + scipy, no torch).

- ``fit_loss_law``: L(N, D) = E + A/N^α + B/D^β, Chinchilla's approach 3 — Huber loss (δ = 1e-3) on the
  residuals of log L, L-BFGS from a grid of starting points, the best fit kept. ``form="kaplan"`` fits
  L(N, D) = E + ((A/N)^(α/β) + B/D)^β instead (Kaplan et al. 2020's form plus E): the same five
  parameters, but N and D interact — a bigger model also learns more from each token, which the additive
  Chinchilla form cannot say.
- ``fit_compute_law``: L(C) = E + a·C^(−b) on the compute frontier (the best loss at each budget).
- ``isoflop_minimum``: a parabola in log N through one budget's losses (Chinchilla's approach 2), and
  ``fit_frontier``: N_opt(C) and D_opt(C) as power laws through those minima.
- ``fit_metric_vs_loss``: a downstream metric as a sigmoid of the loss (the Llama 3 report's two-step
  prediction: compute → loss → accuracy).
- ``effective_tokens``: what D tokens are worth when they repeat a corpus of U unique tokens (Muennighoff
  et al. 2023): the ladder fits and predicts in these fresh-token equivalents.
- ``bootstrap``: refit on rungs resampled with replacement (within each budget, so every isoFLOP profile
  keeps its size); percentile intervals of any prediction.

N is whatever parameter count the caller uses consistently (the ladder uses non-embedding parameters) and
compute is C = 6·N·D.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np
from scipy.optimize import minimize, nnls
from scipy.special import expit
from threadpoolctl import threadpool_limits

from chatforge.errors import ChatforgeError

HUBER_DELTA = 1e-3
T = TypeVar("T")


class FitError(ChatforgeError):
    """Too few or degenerate points for a fit; ``fit`` names the fit that failed where the caller knows."""

    def __init__(self, message: str, fit: str | None = None) -> None:
        super().__init__(message)
        self.fit = fit


def _one_blas_thread(fn: Callable[..., T]) -> Callable[..., T]:
    """Run ``fn`` with one BLAS thread: scipy's L-BFGS-B makes thousands of tiny BLAS calls, and waking a
    thread pool for each is 5-10× slower on a busy machine."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        with threadpool_limits(limits=1, user_api="blas"):
            return fn(*args, **kwargs)

    return wrapper


def _logsumexp0(u: np.ndarray) -> np.ndarray:
    """log Σ exp over axis 0; scipy's logsumexp costs ~50× more per call on these tiny arrays, and the
    fits call it thousands of times per bootstrap."""
    m = u.max(axis=0)
    return m + np.log(np.exp(u - m).sum(axis=0))


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))


# ---------------------------------------------------------------- L(N, D)


FORMS = ("chinchilla", "kaplan")


@dataclass(frozen=True)
class LossLaw:
    """L(N, D) = E + A/N^α + B/D^β (``chinchilla``) or E + ((A/N)^(α/β) + B/D)^β (``kaplan``)."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    form: str = "chinchilla"

    def __call__(self, n: Any, d: Any) -> Any:
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        if self.form == "kaplan":
            return self.E + ((self.A / n) ** (self.alpha / self.beta) + self.B / d) ** self.beta
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    def compute_optimal(self, c: float) -> tuple[float, float]:
        """(N, D) minimising L under 6·N·D = C, D_opt = (C/6)/N_opt. Chinchilla: N_opt = G·(C/6)^(β/(α+β));
        Kaplan: minimise (A/N)^(α/β) + 6·B·N/C, so N_opt = ((α/β)·A^(α/β)·C/(6B))^(β/(α+β))."""
        a, b = self.alpha, self.beta
        if self.form == "kaplan":
            n = ((a / b) * self.A ** (a / b) * c / (6.0 * self.B)) ** (b / (a + b))
            return n, (c / 6.0) / n
        g = (a * self.A / (b * self.B)) ** (1.0 / (a + b))
        n = g * (c / 6.0) ** (b / (a + b))
        return n, (c / 6.0) / n

    def frontier(self, c: Any) -> Any:
        """The loss of the compute-optimal allocation at each budget in ``c``."""
        c = np.atleast_1d(np.asarray(c, dtype=float))
        nd = np.array([self.compute_optimal(x) for x in c])
        return self(nd[:, 0], nd[:, 1])

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _law_objective(
    theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray
) -> tuple[float, np.ndarray]:
    """Huber(log L̂ − log L) summed, divided by δ (same minimum, gradients L-BFGS can see), and its gradient."""
    a, b, e, alpha, beta = theta
    u = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    pred = _logsumexp0(u)
    w = np.exp(u - pred)  # softmax weights: d pred / d u
    r = pred - log_l
    g = np.clip(r, -HUBER_DELTA, HUBER_DELTA) / HUBER_DELTA
    grad = np.array(
        [
            (g * w[0]).sum(),
            (g * w[1]).sum(),
            (g * w[2]).sum(),
            -(g * w[0] * log_n).sum(),
            -(g * w[1] * log_d).sum(),
        ]
    )
    return float(_huber(r, HUBER_DELTA).sum() / HUBER_DELTA), grad


def _kaplan_objective(
    theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray
) -> tuple[float, np.ndarray]:
    """The Kaplan form's Huber objective: log L̂ = logsumexp(e, β·logsumexp(u1, u2)) with
    u1 = (α/β)(a − log N), u2 = b − log D."""
    a, b, e, alpha, beta = theta
    u1, u2 = (alpha / beta) * (a - log_n), b - log_d
    inner = _logsumexp0(np.stack([u1, u2]))
    p1 = np.exp(u1 - inner)  # share of the N term inside the bracket
    s = beta * inner
    pred = _logsumexp0(np.stack([np.full_like(s, e), s]))
    w_e, w_s = np.exp(e - pred), np.exp(s - pred)
    r = pred - log_l
    g = np.clip(r, -HUBER_DELTA, HUBER_DELTA) / HUBER_DELTA
    grad = np.array(
        [
            (g * w_s * alpha * p1).sum(),
            (g * w_s * beta * (1 - p1)).sum(),
            (g * w_e).sum(),
            (g * w_s * p1 * (a - log_n)).sum(),
            (g * w_s * (inner - p1 * u1)).sum(),
        ]
    )
    return float(_huber(r, HUBER_DELTA).sum() / HUBER_DELTA), grad


def _kaplan_starts(
    log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, keep: int = 3
) -> list[np.ndarray]:
    """A coarse grid scored in one vectorised pass; the best few seed L-BFGS."""
    lmin = float(log_l.min())
    grid = np.array(
        list(
            itertools.product(
                np.log(np.exp(lmin) * np.array([0.02, 0.3, 0.6, 0.85])),  # E as a share of the best loss
                log_n.mean() + np.array([-4.0, 0.0, 4.0, 8.0]),  # log A around the sizes
                log_d.mean() + np.array([-4.0, 0.0, 4.0, 8.0]),  # log B around the token counts
                (0.1, 0.3, 0.7),
                (0.1, 0.3, 0.7),
            )
        )
    )
    a, b, e, alpha, beta = (grid[:, i : i + 1] for i in range(5))
    inner = np.logaddexp((alpha / beta) * (a - log_n), b - log_d)
    pred = np.logaddexp(e, beta * inner)
    err = _huber(pred - log_l, HUBER_DELTA).sum(axis=1)
    return [grid[i] for i in np.argsort(err)[:keep]]


def _law_starts(log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, keep: int = 3) -> list[np.ndarray]:
    """Starting points by variable projection: on a grid of (α, β) the law is linear in (E, A, B), solved
    by non-negative least squares (relative residuals ≈ log residuals); the best few seed L-BFGS. Much
    cheaper than Chinchilla's full grid of starts, which matters because the bootstrap refits many times."""
    loss = np.exp(log_l)
    scored = []
    for alpha in np.linspace(0.05, 1.5, 16):
        for beta in np.linspace(0.05, 1.5, 16):
            x = np.stack([np.ones_like(loss), np.exp(-alpha * log_n), np.exp(-beta * log_d)], axis=1)
            coef, _ = nnls(x / loss[:, None], np.ones_like(loss))
            pred = x @ coef
            if np.any(pred <= 0):
                continue
            err = float(_huber(np.log(pred) - log_l, HUBER_DELTA).sum())
            e, a_, b_ = (max(c, 1e-8) for c in coef)
            scored.append((err, np.array([math.log(a_), math.log(b_), math.log(e), alpha, beta])))
    scored.sort(key=lambda t: t[0])
    return [th for _, th in scored[:keep]]


@_one_blas_thread
def fit_loss_law(
    n: Sequence[float],
    d: Sequence[float],
    loss: Sequence[float],
    inits: Sequence[np.ndarray] | None = None,
    search: bool = True,
    form: str = "chinchilla",
) -> LossLaw:
    """Fit L(N, D) (``form``: chinchilla or kaplan) in log space; ``inits`` (vectors
    ``[log A, log B, log E, α, β]``) add starting points; ``search=False`` starts from them alone (bootstrap
    refits near a known optimum)."""
    if form not in FORMS:
        raise FitError(f"L(N, D): form must be one of {', '.join(FORMS)}, got {form!r}")
    n_, d_, l_ = (np.asarray(x, dtype=float) for x in (n, d, loss))
    if len(l_) < 5:
        raise FitError(f"L(N, D) has 5 parameters and needs at least 5 runs, got {len(l_)}")
    if np.any(n_ <= 0) or np.any(d_ <= 0) or np.any(l_ <= 0):
        raise FitError("L(N, D): N, D and the losses must be positive")
    if len(np.unique(n_)) < 2 or len(np.unique(d_)) < 2:
        raise FitError("L(N, D): needs at least two distinct model sizes and two distinct token counts")
    log_n, log_d, log_l = np.log(n_), np.log(d_), np.log(l_)
    # E below the best observed loss; exponents in a physical range.
    bounds = [(-20.0, 60.0), (-20.0, 60.0), (-10.0, float(log_l.min())), (0.01, 3.0), (0.01, 3.0)]
    best: tuple[float, np.ndarray] | None = None
    objective, starts = (
        (_kaplan_objective, _kaplan_starts) if form == "kaplan" else (_law_objective, _law_starts)
    )
    grid = starts(log_n, log_d, log_l) if search or not inits else []
    if form == "kaplan" and grid:
        # The additive fit is a good start: where one term dominates, (A'/N)^α = A/N^α at A' = A^(1/α).
        c = fit_loss_law(n_, d_, l_)
        grid.append(
            np.array([math.log(c.A) / c.alpha, math.log(c.B) / c.beta, math.log(c.E), c.alpha, c.beta])
        )
    for x0 in [*(inits or []), *grid]:
        x0 = np.clip(np.asarray(x0, dtype=float), [b[0] for b in bounds], [b[1] for b in bounds])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = minimize(
                objective,
                x0,
                args=(log_n, log_d, log_l),
                jac=True,
                method="L-BFGS-B",
                bounds=bounds,
                options={"maxiter": 2000},
            )
        if np.all(np.isfinite(res.x)) and (best is None or res.fun < best[0]):
            best = (float(res.fun), res.x)
    if best is None:
        raise FitError("L(N, D): every starting point diverged")
    a, b, e, alpha, beta = best[1]
    return LossLaw(
        E=math.exp(e), A=math.exp(a), alpha=float(alpha), B=math.exp(b), beta=float(beta), form=form
    )


def law_init(law: LossLaw) -> np.ndarray:
    return np.array([math.log(law.A), math.log(law.B), math.log(law.E), law.alpha, law.beta])


# ---------------------------------------------------------------- L(C)


@dataclass(frozen=True)
class ComputeLaw:
    """L(C) = E + a·C^(−b)."""

    E: float
    a: float
    b: float

    def __call__(self, c: Any) -> Any:
        return self.E + self.a * np.asarray(c, dtype=float) ** (-self.b)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@_one_blas_thread
def fit_compute_law(c: Sequence[float], loss: Sequence[float]) -> ComputeLaw:
    """Fit L(C) in log space (Huber on log residuals), E bounded below the best loss."""
    c_, l_ = np.asarray(c, dtype=float), np.asarray(loss, dtype=float)
    if len(l_) < 3 or len(np.unique(c_)) < 3:
        raise FitError(
            f"L(C) has 3 parameters and needs at least 3 distinct budgets, got {len(np.unique(c_))}"
        )
    log_c, log_l = np.log(c_), np.log(l_)
    # Fit log a around the data's scale so the starting points do not depend on the units of C.
    c0 = float(np.exp(log_c.mean()))
    x = log_c - math.log(c0)

    def obj(theta: np.ndarray) -> tuple[float, np.ndarray]:
        la, b, e = theta
        u = np.stack([la - b * x, np.full_like(x, e)])
        pred = _logsumexp0(u)
        w = np.exp(u - pred)
        r = pred - log_l
        g = np.clip(r, -HUBER_DELTA, HUBER_DELTA) / HUBER_DELTA
        grad = np.array([(g * w[0]).sum(), -(g * w[0] * x).sum(), (g * w[1]).sum()])
        return float(_huber(r, HUBER_DELTA).sum() / HUBER_DELTA), grad

    # Starts by variable projection: for fixed b the law is linear in (E, a).
    starts = []
    for b in np.linspace(0.02, 1.5, 40):
        m = np.stack([np.ones_like(x), np.exp(-b * x)], axis=1)
        coef, _ = nnls(m / l_[:, None], np.ones_like(l_))
        pred = m @ coef
        if np.all(pred > 0):
            err = float(_huber(np.log(pred) - log_l, HUBER_DELTA).sum())
            starts.append((err, [math.log(max(coef[1], 1e-8)), b, math.log(max(coef[0], 1e-8))]))
    starts.sort(key=lambda t: t[0])
    bounds = [(-20.0, 20.0), (1e-3, 3.0), (-10.0, float(log_l.min()))]
    best: tuple[float, np.ndarray] | None = None
    for _, x0 in starts[:3] or [(0.0, [0.0, 0.2, float(log_l.min()) - 0.5])]:
        x0 = np.clip(x0, [u[0] for u in bounds], [u[1] for u in bounds])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = minimize(obj, x0, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": 2000})
        if np.all(np.isfinite(res.x)) and (best is None or res.fun < best[0]):
            best = (float(res.fun), res.x)
    if best is None:
        raise FitError("L(C): every starting point diverged")
    la, b, e = best[1]
    # a·(C/c0)^(−b) = (a·c0^b)·C^(−b)
    return ComputeLaw(E=math.exp(e), a=math.exp(la + b * math.log(c0)), b=float(b))


# ---------------------------------------------------------------- isoFLOP profiles


@dataclass(frozen=True)
class IsoflopMinimum:
    budget: float
    n_opt: float
    loss: float
    method: str  # "parabola" (vertex inside the sampled sizes) or "sampled" (the best rung)
    coeffs: tuple[float, ...] = ()  # parabola in log N: c2·x² + c1·x + c0


def isoflop_minimum(budget: float, n: Sequence[float], loss: Sequence[float]) -> IsoflopMinimum:
    """The loss-minimising size at one budget: the vertex of a parabola in log N when it is a minimum
    inside the sampled range, else the best sampled size."""
    n_, l_ = np.asarray(n, dtype=float), np.asarray(loss, dtype=float)
    if len(l_) == 0:
        raise FitError(f"budget {budget:.3g}: no runs")
    i = int(np.argmin(l_))
    if len(np.unique(n_)) >= 3:
        x = np.log(n_)
        c2, c1, c0 = np.polyfit(x, l_, 2)
        if c2 > 0:
            xv = -c1 / (2 * c2)
            if x.min() <= xv <= x.max():
                return IsoflopMinimum(
                    budget, float(math.exp(xv)), float(c0 - c1**2 / (4 * c2)), "parabola", (c2, c1, c0)
                )
        return IsoflopMinimum(
            budget, float(n_[i]), float(l_[i]), "sampled", (float(c2), float(c1), float(c0))
        )
    return IsoflopMinimum(budget, float(n_[i]), float(l_[i]), "sampled")


@dataclass(frozen=True)
class Frontier:
    """Approach 2: N_opt = kn·C^a and D_opt = C/(6·N_opt) = kd·C^(1−a) through the isoFLOP minima."""

    kn: float
    a: float

    def n_opt(self, c: Any) -> Any:
        return self.kn * np.asarray(c, dtype=float) ** self.a

    def d_opt(self, c: Any) -> Any:
        return np.asarray(c, dtype=float) / (6.0 * self.n_opt(c))

    def tokens_per_param(self, c: Any) -> Any:
        return self.d_opt(c) / self.n_opt(c)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def fit_frontier(minima: Sequence[IsoflopMinimum]) -> Frontier:
    """N_opt(C) through the minima that are parabola vertices (an edge minimum only bounds the optimum);
    needs two such budgets."""
    inside = [m for m in minima if m.method == "parabola"]
    if len(inside) < 2:
        raise FitError(
            f"isoFLOP frontier: {len(inside)} budget(s) have their minimum inside the sampled sizes, need 2;"
            " the ladder's sizes do not bracket the optimum"
        )
    kn, a = fit_power([m.budget for m in inside], [m.n_opt for m in inside])
    return Frontier(kn=kn, a=a)


def fit_power(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """y = k·x^p by least squares in log-log space; returns (k, p)."""
    lx, ly = np.log(np.asarray(x, dtype=float)), np.log(np.asarray(y, dtype=float))
    if len(lx) < 2 or np.ptp(lx) == 0:
        raise FitError("power law: needs at least two distinct x values")
    p, lk = np.polyfit(lx, ly, 1)
    return float(math.exp(lk)), float(p)


# ---------------------------------------------------------------- downstream metric vs loss


@dataclass(frozen=True)
class MetricLaw:
    """metric = floor + (ceil − floor)·σ(k·(L0 − L)): chance level at high loss, ``ceil`` at low loss."""

    floor: float
    ceil: float
    k: float
    L0: float

    def __call__(self, loss: Any) -> Any:
        return self.floor + (self.ceil - self.floor) * expit(
            self.k * (self.L0 - np.asarray(loss, dtype=float))
        )

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@_one_blas_thread
def fit_metric_vs_loss(loss: Sequence[float], metric: Sequence[float], floor: float) -> MetricLaw:
    """Least-squares sigmoid of the metric in the loss, with ``floor`` (chance) fixed."""
    l_, m_ = np.asarray(loss, dtype=float), np.asarray(metric, dtype=float)
    if len(l_) < 3:
        raise FitError(f"metric vs loss needs at least 3 runs, got {len(l_)}")

    def obj(theta: np.ndarray) -> float:
        ceil, k, l0 = theta
        pred = floor + (ceil - floor) * expit(k * (l0 - l_))
        return float(((pred - m_) ** 2).sum())

    lo_ceil = max(floor + 1e-3, float(m_.max()) * 0.9)
    bounds = [(min(lo_ceil, 1.0 - 1e-6), 1.0), (1e-3, 100.0), (float(l_.min()) - 5.0, float(l_.max()) + 5.0)]
    best: tuple[float, np.ndarray] | None = None
    for ceil, k, l0 in itertools.product((1.0,), (1.0, 6.0), np.quantile(l_, [0.0, 0.5, 1.0])):
        x0 = np.clip([ceil, k, l0], [b[0] for b in bounds], [b[1] for b in bounds])
        res = minimize(obj, x0, method="L-BFGS-B", bounds=bounds)
        if best is None or res.fun < best[0]:
            best = (float(res.fun), res.x)
    assert best is not None
    ceil, k, l0 = best[1]
    return MetricLaw(floor=float(floor), ceil=float(ceil), k=float(k), L0=float(l0))


# ---------------------------------------------------------------- bootstrap


@_one_blas_thread
def bootstrap(
    n_points: int,
    refit: Callable[[np.ndarray], dict[str, float]],
    samples: int,
    seed: int = 0,
    groups: Sequence[Any] | None = None,
) -> dict[str, np.ndarray]:
    """Call ``refit(indices)`` on ``samples`` resamples (with replacement) of ``n_points`` runs; collects
    each returned quantity. With ``groups`` (a label per run, e.g. its budget) each group is resampled
    within itself, so every group keeps its number of runs. Resamples whose fit fails (e.g. a single model
    size drawn) are skipped."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(groups if groups is not None else [0] * n_points)
    members = [np.flatnonzero(labels == g) for g in dict.fromkeys(labels.tolist())]
    out: dict[str, list[float]] = {}
    for _ in range(samples):
        idx = np.concatenate([rng.choice(m, len(m)) for m in members])
        try:
            vals = refit(idx)
        except FitError:
            continue
        for k, v in vals.items():
            out.setdefault(k, []).append(float(v))
    return {k: np.asarray(v) for k, v in out.items()}


@_one_blas_thread
def prediction_noise(
    law: LossLaw,
    n: Sequence[float],
    d: Sequence[float],
    relative_sd: float,
    at: tuple[float, float],
    samples: int = 100,
    seed: int = 0,
) -> float:
    """How much run-to-run noise alone moves a prediction: refit ``law``'s form on its own losses at the
    ladder's (N, D) times log-normal noise of ``relative_sd``, and return the relative standard deviation
    of the refits' predictions at ``at`` = (N, D). A parametric check: the law is taken as the truth."""
    n_, d_ = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
    rng = np.random.default_rng(seed)
    clean = law(n_, d_)
    point = float(law(*at))
    init = law_init(law)
    preds = []
    for _ in range(samples):
        noisy = clean * np.exp(rng.normal(0.0, relative_sd, len(clean)))
        try:
            refit = fit_loss_law(n_, d_, noisy, inits=[init], form=law.form)
        except FitError:
            continue
        preds.append(float(refit(*at)) / point - 1.0)
    return float(np.std(preds)) if len(preds) > 1 else float("nan")


def effective_tokens(tokens: Any, unique: float, rstar: float) -> Any:
    """D tokens drawn from U unique ones are worth D' = U + U·R*·(1 − e^(−R/R*)) fresh tokens, R = D/U − 1
    the repeats (Muennighoff et al. 2023, "Scaling Data-Constrained Language Models"): each further epoch
    adds less, and R* (their fit: 15.4) is the repeats after which one is worth 1/e of a fresh epoch.
    D ≤ U is D itself; ``rstar`` 0 turns the correction off."""
    d = np.asarray(tokens, dtype=float)
    if rstar <= 0 or unique <= 0:
        return d
    repeats = np.maximum(d / unique - 1.0, 0.0)
    return np.minimum(d, unique) + unique * rstar * -np.expm1(-repeats / rstar)


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central percentile interval; (nan, nan) when there are no values."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return (math.nan, math.nan)
    lo, hi = np.quantile(v, [(1 - level) / 2, (1 + level) / 2])
    return (float(lo), float(hi))
