"""Predictive customer-lifetime value: the BG/NBD purchase model and the Gamma-Gamma spend model.

Both models are fitted by maximum likelihood on the whole customer base in one vectorized pass
(numpy/scipy, log space, analytic gradients, L-BFGS-B over log-parameters) and then used to
score every customer.

References
----------
[FHL05]  Fader, Hardie & Lee (2005), "'Counting Your Customers' the Easy Way: An Alternative to
         the Pareto/NBD Model", Marketing Science 24(2), 275-284. Equation numbers below are
         this paper's: (6) the likelihood of one customer, (9) E[X(t)] for a new customer,
         (10) the conditional expectation E[Y(t) | x, t_x, T].
[FHL08]  Fader, Hardie & Lee (2008), "Computing P(alive) Using the BG/NBD Model" (note 021).
[FHL05b] Fader, Hardie & Lee (2005), "RFM and CLV: Using Iso-Value Curves for Customer Base
         Analysis", Journal of Marketing Research 42(4), 415-430 (the Gamma-Gamma spend model).
[FH13]   Fader & Hardie (2013), "The Gamma-Gamma Model of Monetary Value" (note 025): the
         marginal density of a customer's average spend and its conditional expectation. The
         formulas are quoted below by what they are, not by equation number.

Inputs, one element per customer with at least one paid order
--------------------------------------------------------------
``frequency`` x
    repeat purchase days: distinct days with a paid order, minus one (integer >= 0).
``recency`` t_x
    days between the first and the last purchase day (0 when x == 0).
``T``
    days between the first purchase day and the as-of day (>= t_x; 0 when the first order is
    today).
``monetary`` m
    average value of the repeat purchase days in minor currency units; read only where x > 0.

The time unit is the day throughout: alpha is in days, ``t`` arguments are days. The functions
accept fractional days too (the paper's own example is in fractional weeks).

Model conventions worth knowing
-------------------------------
* Under the BG/NBD a customer can only drop out right after a *repeat* purchase, so a
  one-time buyer (x == 0) is alive with probability 1 (the delta_{x>0} term in (6) and (10)).
  Their expected purchases still decay with T through the posterior of their purchase rate.
* A customer whose first order is today (T == 0, so x == 0) contributes a likelihood of exactly
  1 and is scored like a new customer: E[X(t)] of (9).
* A base without a single repeat buyer carries no information on the dropout process (every
  customer's likelihood is (alpha/(alpha+T))^r whatever a and b are), so ``fit_bgnbd`` raises
  ``ModelNotFitted`` rather than return arbitrary a, b.
* The Gamma-Gamma shape q is constrained to q > 1 (fitted as log(q - 1)): the population mean
  spend p*v/(q - 1), used for one-time buyers, only exists then. A base whose fit runs into that
  boundary raises ``ModelNotFitted``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import integrate, optimize, special  # type: ignore[import-untyped, unused-ignore]

__all__ = [
    "BgNbdParams",
    "GammaGammaParams",
    "ModelNotFitted",
    "bgnbd_log_likelihood",
    "clv",
    "expected_order_value",
    "expected_purchases",
    "expected_purchases_new",
    "fit_bgnbd",
    "fit_gamma_gamma",
    "gamma_gamma_log_likelihood",
    "p_alive",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]

DAYS_PER_MONTH = 30
"""``clv`` works in 30-day months: month i covers days (30*(i-1), 30*i] after the as-of day."""

# Optimizer box, in log-parameter space. Wide enough for any realistic day-scale base
# (alpha is in days), tight enough that exp() of a bound is a finite, well-behaved float.
_LOG_BOUNDS_BGNBD = (
    (math.log(1e-6), math.log(1e5)),  # r
    (math.log(1e-6), math.log(1e9)),  # alpha (days)
    (math.log(1e-6), math.log(1e5)),  # a
    (math.log(1e-6), math.log(1e5)),  # b
)
_LOG_BOUNDS_GG = (
    (math.log(1e-6), math.log(1e5)),  # p
    (math.log(1e-6), math.log(1e5)),  # q - 1
    (math.log(1e-6), math.log(1e12)),  # v (minor currency units)
)
_LBFGS_OPTIONS = {"maxiter": 2000, "ftol": 1e-13, "gtol": 1e-9, "maxcor": 20}

# Where |a - 1| is below this, the (a - 1) division in (9)/(10) loses digits: the removable
# singularity is evaluated as the mean of two points 2*_A_ONE_GUARD either side instead
# (smooth in a, so the error is O(guard^2), below 1e-7 relative).
_A_ONE_GUARD = 2e-5
# Relative nudge of r and b used where hyp2f1 is degenerate (c - a - b exactly an integer with
# z near 1, or c == 0): the expectation is smooth there, so the mean of the two nudged values
# is accurate to well below 1e-12.
_DEGENERATE_NUDGE = 1e-8


class ModelNotFitted(Exception):
    """The base cannot support the model; the message says why (never a NaN fit)."""


@dataclass(frozen=True)
class BgNbdParams:
    """BG/NBD parameters: purchase rate lambda ~ Gamma(r, alpha), dropout p ~ Beta(a, b).

    alpha is in days. ``log_likelihood`` is the total over the customers it was fitted on.
    """

    r: float
    alpha: float
    a: float
    b: float
    log_likelihood: float
    customers: int


@dataclass(frozen=True)
class GammaGammaParams:
    """Gamma-Gamma parameters: spend z ~ Gamma(p, nu), nu ~ Gamma(q, v) across customers.

    v is in minor currency units. ``customers`` counts the repeat buyers it was fitted on.
    """

    p: float
    q: float
    v: float
    log_likelihood: float
    customers: int


# --------------------------------------------------------------------------------------------
# input validation and compression


def _column(name: str, values: npt.ArrayLike) -> FloatArray:
    arr = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr


def _same_length(**columns: FloatArray) -> None:
    lengths = {name: col.shape[0] for name, col in columns.items()}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{name}={n}" for name, n in lengths.items())
        raise ValueError(f"inputs have mismatched lengths: {detail}")


def _first_bad(mask: npt.NDArray[np.bool_]) -> int:
    return int(np.flatnonzero(mask)[0])


def _validate_rft(
    frequency: npt.ArrayLike, recency: npt.ArrayLike, T: npt.ArrayLike
) -> tuple[FloatArray, FloatArray, FloatArray]:
    x = _column("frequency", frequency)
    tx = _column("recency", recency)
    tt = _column("T", T)
    _same_length(frequency=x, recency=tx, T=tt)
    for name, col in (("frequency", x), ("recency", tx), ("T", tt)):
        bad = ~np.isfinite(col) | (col < 0)
        if bad.any():
            i = _first_bad(bad)
            raise ValueError(f"{name} must be finite and >= 0: customer {i} has {col[i]!r}")
    bad = x != np.floor(x)
    if bad.any():
        i = _first_bad(bad)
        raise ValueError(f"frequency must be a whole number: customer {i} has {x[i]!r}")
    bad = tx > tt
    if bad.any():
        i = _first_bad(bad)
        raise ValueError(f"recency must be <= T: customer {i} has recency {tx[i]!r} > T {tt[i]!r}")
    bad = (x == 0) & (tx != 0)
    if bad.any():
        i = _first_bad(bad)
        raise ValueError(
            f"recency must be 0 when frequency is 0: customer {i} has recency {tx[i]!r}"
        )
    return x, tx, tt


def _validate_monetary(monetary: npt.ArrayLike, x: FloatArray) -> FloatArray:
    """Monetary values; read only where x > 0 (anything, NaN included, is accepted elsewhere)."""
    m = _column("monetary", monetary)
    _same_length(frequency=x, monetary=m)
    repeat = x > 0
    bad = repeat & ~(np.isfinite(m) & (m >= 0))
    if bad.any():
        i = _first_bad(bad)
        raise ValueError(
            f"monetary must be finite and >= 0 for repeat buyers: customer {i} has {m[i]!r}"
        )
    return m


def _validate_frequency(frequency: npt.ArrayLike) -> FloatArray:
    x = _column("frequency", frequency)
    bad = ~np.isfinite(x) | (x < 0) | (x != np.floor(x))
    if bad.any():
        i = _first_bad(bad)
        raise ValueError(f"frequency must be a whole number >= 0: customer {i} has {x[i]!r}")
    return x


def _radix_key(columns: tuple[FloatArray, ...]) -> npt.NDArray[np.int64] | None:
    """One int64 per row when every column holds whole numbers >= 0 that fit (mixed radix)."""
    key = np.zeros(columns[0].shape[0], dtype=np.int64)
    capacity = 1
    for col in columns:
        top = float(col.max())
        if float(col.min()) < 0 or top >= 2.0**31 or not np.array_equal(col, np.floor(col)):
            return None
        span = int(top) + 1
        capacity *= span
        if capacity >= 2**62:
            return None
        key *= span
        key += col.astype(np.int64)
    return key


def _unique_rows(*columns: FloatArray) -> tuple[list[FloatArray], FloatArray, IntArray]:
    """Distinct rows of the given equal-length columns, their counts and the inverse index.

    ``rows[k][inverse]`` gives back ``columns[k]``. Whole-day data (the normal case) is packed
    into one int64 key and sorted once; anything else takes a lexsort. No per-row Python.
    """
    n = columns[0].shape[0]
    if n == 0:
        empty = np.zeros(0, dtype=np.float64)
        return [empty.copy() for _ in columns], empty, np.zeros(0, dtype=np.intp)
    key = _radix_key(columns)
    if key is not None:
        order = np.argsort(key)
        sorted_key = key[order]
        starts = np.empty(n, dtype=bool)
        starts[0] = True
        np.not_equal(sorted_key[1:], sorted_key[:-1], out=starts[1:])
    else:
        order = np.lexsort(columns[::-1])
        same = np.ones(n - 1, dtype=bool)
        for col in columns:
            sorted_col = col[order]
            same &= sorted_col[1:] == sorted_col[:-1]
        starts = np.empty(n, dtype=bool)
        starts[0] = True
        np.logical_not(same, out=starts[1:])
    group = np.cumsum(starts) - 1
    inverse = np.empty(n, dtype=np.intp)
    inverse[order] = group
    first = order[starts]
    counts = np.bincount(group).astype(np.float64)
    return [col[first] for col in columns], counts, inverse


def _params_tuple(
    params: BgNbdParams | tuple[float, float, float, float],
) -> tuple[float, float, float, float]:
    if isinstance(params, BgNbdParams):
        values = (params.r, params.alpha, params.a, params.b)
    else:
        r, alpha, a, b = params
        values = (float(r), float(alpha), float(a), float(b))
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"BG/NBD parameters must be finite and > 0, got {values}")
    return values


# --------------------------------------------------------------------------------------------
# BG/NBD likelihood


def bgnbd_log_likelihood(
    params: BgNbdParams | tuple[float, float, float, float],
    frequency: npt.ArrayLike,
    recency: npt.ArrayLike,
    T: npt.ArrayLike,
) -> FloatArray:
    """Per-customer log of the BG/NBD likelihood, eq. (6) of [FHL05].

    L = B(a, b+x)/B(a, b) * Gamma(r+x) alpha^r / (Gamma(r) (alpha+T)^(r+x))
        + delta_{x>0} B(a+1, b+x-1)/B(a, b) * Gamma(r+x) alpha^r / (Gamma(r) (alpha+t_x)^(r+x))

    evaluated in log space: with A1 = ln Gamma(r+x) - ln Gamma(r) + r ln alpha,
    A2 = ln B(a, b+x) - ln B(a, b), A3 = -(r+x) ln(alpha+T) and
    A4 = ln a - ln(b+x-1) - (r+x) ln(alpha+t_x) (using B(a+1, b+x-1) = B(a, b+x) a/(b+x-1)),
    ln L = A1 + A2 + logaddexp(A3, A4) for x > 0 and A1 + A2 + A3 for x == 0. Finite for any
    x, T (no powers or Beta functions are formed outside logs).
    """
    r, alpha, a, b = _params_tuple(params)
    x, tx, tt = _validate_rft(frequency, recency, T)
    rx = r + x
    a1 = special.gammaln(rx) - special.gammaln(r) + r * math.log(alpha)
    a2 = special.betaln(a, b + x) - special.betaln(a, b)
    a3 = -rx * np.log(alpha + tt)
    repeat = x > 0
    a4 = np.full_like(x, -np.inf)
    a4[repeat] = math.log(a) - np.log(b + x[repeat] - 1.0) - rx[repeat] * np.log(alpha + tx[repeat])
    out: FloatArray = a1 + a2 + np.logaddexp(a3, a4)
    return out


def _wsum(weights: FloatArray, values: FloatArray) -> float:
    """sum(weights * values) in one pass, single-threaded: np.einsum does not go through the
    BLAS, whose threads contend badly on a busy 2-core box and whose summation order depends
    on the thread count (so results would not be bit-reproducible across machines)."""
    return float(np.einsum("i,i->", weights, values))


def _bincount(index: IntArray, weights: FloatArray, size: int) -> FloatArray:
    """Sum of ``weights`` per table index (a float array of ``size``)."""
    return np.bincount(index, weights=weights, minlength=size).astype(np.float64, copy=False)


@dataclass(frozen=True)
class _BgNbdData:
    """The base compressed for fitting.

    ln L of (6) splits into A1 + A2 (a function of x), -(r+x) ln(alpha+T) (of x and T) and,
    for repeat buyers only, softplus(k) with k = ln a - ln(b+x-1) + (r+x) ln((alpha+T)/(alpha+
    t_x)) the log-odds of having dropped out. The first two are summed over tables of distinct
    x and distinct T; only the softplus needs the distinct (x, t_x, T) rows, which index those
    tables.
    """

    customers: int
    # distinct x over the whole base and how many customers have each
    ux: FloatArray
    ux_n: FloatArray
    # distinct T over the whole base: customers and total x per value
    uT: FloatArray
    uT_n: FloatArray
    uT_x: FloatArray
    # distinct t_x among repeat buyers
    utx: FloatArray
    # repeat buyers, one row per distinct (x, t_x, T): x, count, and indices into the tables
    x: FloatArray
    n: FloatArray
    ix: IntArray
    iT: IntArray
    itx: IntArray


def _compress_bgnbd(x: FloatArray, tx: FloatArray, tt: FloatArray) -> _BgNbdData:
    (rows_x, rows_tx, rows_T), counts, _ = _unique_rows(x, tx, tt)
    ux, ix = np.unique(rows_x, return_inverse=True)
    uT, iT = np.unique(rows_T, return_inverse=True)
    repeat = rows_x > 0
    utx, itx = np.unique(rows_tx[repeat], return_inverse=True)
    return _BgNbdData(
        customers=int(x.shape[0]),
        ux=ux,
        ux_n=_bincount(ix, counts, ux.size),
        uT=uT,
        uT_n=_bincount(iT, counts, uT.size),
        uT_x=_bincount(iT, counts * rows_x, uT.size),
        utx=utx,
        x=rows_x[repeat],
        n=counts[repeat],
        ix=ix[repeat].astype(np.intp),
        iT=iT[repeat].astype(np.intp),
        itx=itx.astype(np.intp),
    )


def _bgnbd_objective(theta: FloatArray, data: _BgNbdData) -> tuple[float, FloatArray]:
    """Mean negative log-likelihood (6) over the base and its gradient in theta = log params.

    d ln L/d(r, alpha, a, b) per customer, with w = P(dropped out | data) = expit(k) (0 for
    x == 0): d/dr = psi(r+x) - psi(r) + ln alpha - ln(alpha+T) + w ln((alpha+T)/(alpha+t_x));
    d/dalpha = r/alpha - (r+x)/(alpha+T) + w (r+x) (1/(alpha+T) - 1/(alpha+t_x));
    d/da = psi(a+b) - psi(a+b+x) + w/a; d/db = psi(a+b) + psi(b+x) - psi(b) - psi(a+b+x)
    - w/(b+x-1). Chain rule to theta multiplies each by its parameter.
    """
    r, alpha, a, b = (float(v) for v in np.exp(theta))
    total = float(data.customers)
    ux, ux_n = data.ux, data.ux_n
    log_alpha = math.log(alpha)

    # A1 + A2 over distinct x.
    a1 = special.gammaln(r + ux) - special.gammaln(r) + r * log_alpha
    a2 = (
        special.gammaln(a + b)
        + special.gammaln(b + ux)
        - special.gammaln(b)
        - special.gammaln(a + b + ux)
    )
    ll = _wsum(ux_n, a1 + a2)
    psi_ab = float(special.digamma(a + b))
    psi_abx = special.digamma(a + b + ux)
    g_r = _wsum(ux_n, special.digamma(r + ux) - special.digamma(r)) + total * log_alpha
    g_alpha = total * r / alpha
    g_a = _wsum(ux_n, psi_ab - psi_abx)
    g_b = _wsum(ux_n, psi_ab + special.digamma(b + ux) - special.digamma(b) - psi_abx)

    # -(r+x) ln(alpha+T) over distinct T.
    log_T_u = np.log(alpha + data.uT)
    inv_T_u = 1.0 / (alpha + data.uT)
    ll -= r * _wsum(data.uT_n, log_T_u) + _wsum(data.uT_x, log_T_u)
    g_r -= _wsum(data.uT_n, log_T_u)
    g_alpha -= r * _wsum(data.uT_n, inv_T_u) + _wsum(data.uT_x, inv_T_u)

    # softplus(k) over distinct repeat-buyer rows.
    if data.n.size:
        n = data.n
        log_tx_u = np.log(alpha + data.utx)
        inv_tx_u = 1.0 / (alpha + data.utx)
        inv_bx_u = np.zeros_like(ux)
        inv_bx_u[ux > 0] = 1.0 / (b + ux[ux > 0] - 1.0)
        c_u = math.log(a) + np.log(inv_bx_u, out=np.full_like(ux, -np.inf), where=ux > 0)
        dl = log_T_u.take(data.iT)
        dl -= log_tx_u.take(data.itx)
        rx = data.x + r
        k = c_u.take(data.ix)
        k += rx * dl
        e = np.abs(k)
        np.negative(e, out=e)
        np.exp(e, out=e)
        softplus = np.log1p(e)
        softplus += np.maximum(k, 0.0)
        nw = n * special.expit(k)
        ll += _wsum(n, softplus)
        g_r += _wsum(nw, dl)
        nw_rx = nw * rx
        g_alpha += _wsum(_bincount(data.iT, nw_rx, data.uT.size), inv_T_u)
        g_alpha -= _wsum(_bincount(data.itx, nw_rx, data.utx.size), inv_tx_u)
        g_a += float(nw.sum()) / a
        g_b -= _wsum(_bincount(data.ix, nw, ux.size), inv_bx_u)

    grad = -np.array([g_r * r, g_alpha * alpha, g_a * a, g_b * b]) / total
    return -ll / total, grad


def _minimize(
    objective: Callable[[FloatArray], tuple[float, FloatArray]],
    start: FloatArray,
    bounds: tuple[tuple[float, float], ...],
    model: str,
) -> FloatArray:
    lows = np.array([lo for lo, _ in bounds])
    highs = np.array([hi for _, hi in bounds])
    x0 = np.clip(start, lows, highs)
    with np.errstate(all="ignore"):
        result = optimize.minimize(
            objective,
            x0,
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            options=_LBFGS_OPTIONS,
        )
    theta = np.asarray(result.x, dtype=np.float64)
    if not (np.all(np.isfinite(theta)) and math.isfinite(float(result.fun))):
        raise ModelNotFitted(f"{model}: the optimizer did not reach a finite optimum")
    return theta


def fit_bgnbd(
    frequency: npt.ArrayLike,
    recency: npt.ArrayLike,
    T: npt.ArrayLike,
    *,
    min_customers: int = 50,
) -> BgNbdParams:
    """Fit the BG/NBD by maximum likelihood: maximize the sum over customers of ln (6).

    The base is first compressed to distinct (x, t_x, T) rows with counts, and the terms of
    ln (6) that depend on x or T alone are summed over tables of distinct x and T (see
    ``_BgNbdData``), so an evaluation costs one pass over the distinct repeat-buyer rows.
    L-BFGS-B then minimizes the mean negative log-likelihood over
    (ln r, ln alpha, ln a, ln b) with the analytic gradient, from a fixed, data-derived start
    (r = a = b = 1, alpha = total days observed / total repeat purchases, i.e. the pooled
    purchase rate), inside a wide box so every returned value is finite. Deterministic.

    Raises ``ModelNotFitted`` for fewer than ``min_customers`` customers and for a base with no
    repeat buyer (a and b are then unidentifiable). On a small or short base the maximum can
    lie on the edge of the box (e.g. a and b both -> 0: every customer either drops out at
    once or never); the parameters are then finite limits and the predictions stay valid.
    """
    x, tx, tt = _validate_rft(frequency, recency, T)
    customers = int(x.shape[0])
    if customers < min_customers:
        raise ModelNotFitted(
            f"{customers} customers: at least {min_customers} needed to fit BG/NBD"
        )
    repeat_buyers = int(np.count_nonzero(x))
    if repeat_buyers == 0:
        raise ModelNotFitted(
            f"{customers} customers, none with a repeat purchase: the BG/NBD dropout "
            "parameters (a, b) cannot be estimated"
        )
    data = _compress_bgnbd(x, tx, tt)
    alpha0 = max(float(tt.sum()) / float(x.sum()), 1e-3)
    start = np.log(np.array([1.0, alpha0, 1.0, 1.0]))
    theta = _minimize(lambda th: _bgnbd_objective(th, data), start, _LOG_BOUNDS_BGNBD, "BG/NBD")
    r, alpha, a, b = (float(v) for v in np.exp(theta))
    neg_mean, _ = _bgnbd_objective(theta, data)
    return BgNbdParams(
        r=r,
        alpha=alpha,
        a=a,
        b=b,
        log_likelihood=-neg_mean * customers,
        customers=customers,
    )


# --------------------------------------------------------------------------------------------
# BG/NBD predictions


def p_alive(
    params: BgNbdParams,
    frequency: npt.ArrayLike,
    recency: npt.ArrayLike,
    T: npt.ArrayLike,
) -> FloatArray:
    """P(alive at T | x, t_x, T) [FHL08]; 1/P(alive) is the denominator of eq. (10) of [FHL05].

    P = 1 / (1 + delta_{x>0} a/(b+x-1) ((alpha+T)/(alpha+t_x))^(r+x)), evaluated as
    expit(-log odds) so large x or T cannot overflow. One-time buyers (x == 0) get exactly 1:
    the BG/NBD lets a customer drop out only right after a repeat purchase.
    """
    r, alpha, a, b = _params_tuple(params)
    x, tx, tt = _validate_rft(frequency, recency, T)
    return _p_alive(r, alpha, a, b, x, tx, tt)


def _p_alive(
    r: float,
    alpha: float,
    a: float,
    b: float,
    x: FloatArray,
    tx: FloatArray,
    tt: FloatArray,
) -> FloatArray:
    out = np.ones_like(x)
    repeat = x > 0
    xr = x[repeat]
    log_odds = (
        math.log(a)
        - np.log(b + xr - 1.0)
        + (r + xr) * np.log1p((tt[repeat] - tx[repeat]) / (alpha + tx[repeat]))
    )
    out[repeat] = special.expit(-log_odds)
    return out


def _alive_expectation_raw(
    r: float, alpha: float, a: float, b: float, x: FloatArray, tt: FloatArray, t: FloatArray
) -> FloatArray:
    """E[Y(t) | alive at T, x]: (10) of [FHL05] without its P(alive) denominator.

    The paper's form (a+b+x-1)/(a-1) [1 - ((alpha+T)/(alpha+T+t))^(r+x) 2F1(r+x, b+x;
    a+b+x-1; z)], z = t/(alpha+T+t), multiplies a vanishing power by a hypergeometric that
    overflows for large x (inf * 0 = NaN). Euler's transformation 2F1(A, B; C; z) =
    (1-z)^(C-A-B) 2F1(C-A, C-B; C; z) folds the power in:

        (a+b+x-1)/(a-1) [1 - (1-z)^(a-1) 2F1(a+b-1-r, a-1; a+b+x-1; z)]

    whose 2F1 is bounded and converges faster the larger x is.
    """
    z = t / (alpha + tt + t)
    log1mz = -np.log1p(t / (alpha + tt))
    c = a + b + x - 1.0
    f = special.hyp2f1(a + b - 1.0 - r, a - 1.0, c, z)
    power = np.exp((a - 1.0) * log1mz)
    bracket = -np.expm1((a - 1.0) * log1mz) - power * (f - 1.0)
    out: FloatArray = c * bracket / (a - 1.0)
    return np.where(t > 0, out, 0.0)


def _alive_expectation_quad(
    r: float, alpha: float, a: float, b: float, x: float, tt: float, t: float
) -> float:
    """Same quantity as a 1-D integral over the dropout posterior, for the rare degenerate row.

    Given alive at T: lambda ~ Gamma(r+x, alpha+T) and p ~ Beta(a, b+x), and
    E[Y(t) | lambda, p] = (1 - exp(-lambda p t))/p; integrating lambda out leaves
    E_p[(1 - (1 + p t/(alpha+T))^-(r+x)) / p], a bounded integrand.
    """
    if t <= 0:
        return 0.0
    scale = t / (alpha + tt)
    log_beta = float(special.betaln(a, b + x))

    def integrand(p: float) -> float:
        if p <= 0.0:
            return 0.0
        g = -math.expm1(-(r + x) * math.log1p(p * scale)) / p
        return g * math.exp((a - 1.0) * math.log(p) + (b + x - 1.0) * math.log1p(-p) - log_beta)

    value, _ = integrate.quad(integrand, 0.0, 1.0, limit=200)
    return float(value)


def _alive_expectation(
    r: float, alpha: float, a: float, b: float, x: FloatArray, tt: FloatArray, t: FloatArray
) -> FloatArray:
    """``_alive_expectation_raw`` with its removable singularities and failure modes handled."""
    with np.errstate(all="ignore"):
        if abs(a - 1.0) < _A_ONE_GUARD:
            step = 2.0 * _A_ONE_GUARD
            out = 0.5 * (
                _alive_expectation_raw(r, alpha, a - step, b, x, tt, t)
                + _alive_expectation_raw(r, alpha, a + step, b, x, tt, t)
            )
        else:
            out = _alive_expectation_raw(r, alpha, a, b, x, tt, t)
        bad = ~np.isfinite(out)
        if bad.any():
            # scipy's hyp2f1 returns NaN when c - a - b is exactly an integer with z near 1,
            # and the x == 0 row is 0 * inf when a + b == 1 exactly. Both are removable.
            lo, hi = 1.0 - _DEGENERATE_NUDGE, 1.0 + _DEGENERATE_NUDGE
            xb, tb, tlb = x[bad], tt[bad], t[bad]
            out[bad] = 0.5 * (
                _alive_expectation_raw(r * lo, alpha, a, b * hi, xb, tb, tlb)
                + _alive_expectation_raw(r * hi, alpha, a, b * lo, xb, tb, tlb)
            )
        bad = ~np.isfinite(out)
    for i in np.flatnonzero(bad):
        out[i] = _alive_expectation_quad(r, alpha, a, b, float(x[i]), float(tt[i]), float(t[i]))
    return out


def _t_column(t: float | npt.ArrayLike, n: int) -> FloatArray:
    arr = np.asarray(t, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(n, float(arr))
    elif arr.shape != (n,):
        raise ValueError(
            f"t must be a scalar or have one value per customer ({n}), got {arr.shape}"
        )
    if not np.all(np.isfinite(arr) & (arr >= 0)):
        raise ValueError("t must be finite and >= 0")
    return arr


def expected_purchases(
    params: BgNbdParams,
    t: float | npt.ArrayLike,
    frequency: npt.ArrayLike,
    recency: npt.ArrayLike,
    T: npt.ArrayLike,
) -> FloatArray:
    """Expected purchases in (T, T+t] given (x, t_x, T): eq. (10) of [FHL05].

    E[Y(t) | x, t_x, T] = (a+b+x-1)/(a-1) [1 - ((alpha+T)/(alpha+T+t))^(r+x)
    2F1(r+x, b+x; a+b+x-1; t/(alpha+T+t))] * P(alive), evaluated through Euler's transformation
    of the 2F1 (finite for x in the thousands; see ``_alive_expectation_raw``). ``t`` is days,
    a scalar or one value per customer. Computed once per distinct (x, T, t).
    """
    r, alpha, a, b = _params_tuple(params)
    x, tx, tt = _validate_rft(frequency, recency, T)
    tcol = _t_column(t, x.shape[0])
    (ux, uT, ut), _, inverse = _unique_rows(x, tt, tcol)
    alive_e = _alive_expectation(r, alpha, a, b, ux, uT, ut)[inverse]
    out: FloatArray = alive_e * _p_alive(r, alpha, a, b, x, tx, tt)
    return out


def expected_purchases_new(params: BgNbdParams, t: float | npt.ArrayLike) -> FloatArray:
    """E[X(t)] for a customer who just made a first purchase: eq. (9) of [FHL05].

    E[X(t)] = (a+b-1)/(a-1) [1 - (alpha/(alpha+t))^r 2F1(r, b; a+b-1; t/(alpha+t))], which is
    (10) at x = 0, T = 0 (P(alive) = 1). Returns an array shaped like ``t`` (days).
    """
    r, alpha, a, b = _params_tuple(params)
    arr = np.asarray(t, dtype=np.float64)
    flat = arr.reshape(-1)
    if not np.all(np.isfinite(flat) & (flat >= 0)):
        raise ValueError("t must be finite and >= 0")
    zeros = np.zeros_like(flat)
    out: FloatArray = _alive_expectation(r, alpha, a, b, zeros, zeros, flat).reshape(arr.shape)
    return out


# --------------------------------------------------------------------------------------------
# Gamma-Gamma


def _gg_values(params: GammaGammaParams) -> tuple[float, float, float]:
    values = (params.p, params.q, params.v)
    if not all(math.isfinite(v) and v > 0 for v in values) or params.q <= 1:
        raise ValueError(f"Gamma-Gamma parameters must be finite, > 0 and q > 1, got {values}")
    return values


def gamma_gamma_log_likelihood(
    params: GammaGammaParams | tuple[float, float, float],
    frequency: npt.ArrayLike,
    monetary: npt.ArrayLike,
) -> FloatArray:
    """Per-customer log density of the average spend m over x transactions, [FH13]/[FHL05b].

    f(m | p, q, v, x) = Gamma(px+q) / (Gamma(px) Gamma(q)) * v^q m^(px-1) x^(px)
                        / (v + x m)^(px+q)

    (the marginal of m after integrating the customer's spend rate nu ~ Gamma(q, v) out of
    x m | nu ~ Gamma(px, nu)). Defined for x > 0 and m > 0; other customers get NaN.
    """
    if isinstance(params, GammaGammaParams):
        p, q, v = params.p, params.q, params.v
    else:
        p, q, v = (float(value) for value in params)
    x = _validate_frequency(frequency)
    m = _validate_monetary(monetary, x)
    out = np.full_like(x, np.nan)
    ok = (x > 0) & (m > 0)
    xo, mo = x[ok], m[ok]
    px = p * xo
    out[ok] = (
        special.gammaln(px + q)
        - special.gammaln(px)
        - special.gammaln(q)
        + q * math.log(v)
        + (px - 1.0) * np.log(mo)
        + px * np.log(xo)
        - (px + q) * np.log(v + xo * mo)
    )
    return out


@dataclass(frozen=True)
class _GammaGammaData:
    customers: int
    xm: FloatArray  # x * m per distinct (x, m)
    n: FloatArray
    nx: FloatArray  # n * x
    ux: FloatArray
    ux_n: FloatArray
    sum_n_x_log_m: float
    sum_n_log_m: float
    sum_n_x_log_x: float


def _compress_gamma_gamma(x: FloatArray, m: FloatArray) -> _GammaGammaData:
    """Distinct (x, m) pairs with counts; x > 0 and m > 0 already selected."""
    (rows_x, rows_m), n, _ = _unique_rows(x, m)
    ux, ix = np.unique(rows_x, return_inverse=True)
    log_m = np.log(rows_m)
    nx = n * rows_x
    return _GammaGammaData(
        customers=int(x.shape[0]),
        xm=rows_x * rows_m,
        n=n,
        nx=nx,
        ux=ux,
        ux_n=_bincount(ix, n, ux.size),
        sum_n_x_log_m=_wsum(nx, log_m),
        sum_n_log_m=_wsum(n, log_m),
        sum_n_x_log_x=_wsum(nx, np.log(rows_x)),
    )


def _gamma_gamma_objective(theta: FloatArray, data: _GammaGammaData) -> tuple[float, FloatArray]:
    """Mean negative log-likelihood over the repeat buyers, theta = (ln p, ln(q-1), ln v)."""
    p = math.exp(float(theta[0]))
    q_minus_one = math.exp(float(theta[1]))
    q = 1.0 + q_minus_one
    v = math.exp(float(theta[2]))
    total = float(data.customers)
    ux, ux_n = data.ux, data.ux_n
    px = p * ux
    log_v = math.log(v)

    log_vxm = np.log(v + data.xm)
    s_log = _wsum(data.n, log_vxm)
    s_x_log = _wsum(data.nx, log_vxm)
    ll = (
        _wsum(ux_n, special.gammaln(px + q) - special.gammaln(px))
        - total * float(special.gammaln(q))
        + total * q * log_v
        + p * data.sum_n_x_log_m
        - data.sum_n_log_m
        + p * data.sum_n_x_log_x
        - p * s_x_log
        - q * s_log
    )
    psi_pxq = special.digamma(px + q)
    inv_vxm = 1.0 / (v + data.xm)
    g_p = (
        _wsum(ux_n * ux, psi_pxq - special.digamma(px))
        + data.sum_n_x_log_m
        + data.sum_n_x_log_x
        - s_x_log
    )
    g_q = _wsum(ux_n, psi_pxq) - total * float(special.digamma(q)) + total * log_v - s_log
    g_v = total * q / v - p * _wsum(data.nx, inv_vxm) - q * _wsum(data.n, inv_vxm)
    grad = -np.array([g_p * p, g_q * q_minus_one, g_v * v]) / total
    return -ll / total, grad


def fit_gamma_gamma(
    frequency: npt.ArrayLike,
    monetary: npt.ArrayLike,
    *,
    min_customers: int = 30,
) -> GammaGammaParams:
    """Fit the Gamma-Gamma spend model by maximum likelihood on customers with x > 0 and m > 0.

    Maximizes the sum of ln f(m | p, q, v, x) (see ``gamma_gamma_log_likelihood``) over
    distinct (x, m) pairs with counts, by L-BFGS-B over (ln p, ln(q-1), ln v) with the analytic
    gradient, from the fixed start p = 1, q = 2, v = mean spend (population mean p v/(q-1) =
    mean spend). The model assumes spend is independent of purchase frequency [FH13]; check
    the correlation of x and m before relying on it.

    Raises ``ModelNotFitted`` for fewer than ``min_customers`` usable repeat buyers, or when
    the fit runs into q -> 1 (spend so heavy-tailed that the mean order value is undefined).
    """
    x = _validate_frequency(frequency)
    m = _validate_monetary(monetary, x)
    ok = (x > 0) & (m > 0)
    customers = int(np.count_nonzero(ok))
    if customers < min_customers:
        raise ModelNotFitted(
            f"{customers} repeat buyers with a positive spend: at least {min_customers} "
            "needed to fit Gamma-Gamma"
        )
    data = _compress_gamma_gamma(x[ok], m[ok])
    mean_spend = float(m[ok].mean())
    start = np.log(np.array([1.0, 1.0, mean_spend]))
    theta = _minimize(
        lambda th: _gamma_gamma_objective(th, data), start, _LOG_BOUNDS_GG, "Gamma-Gamma"
    )
    if theta[1] <= _LOG_BOUNDS_GG[1][0] + 1e-6:
        raise ModelNotFitted(
            f"Gamma-Gamma on {customers} repeat buyers: the fit runs into q -> 1, the spend "
            "distribution is too heavy-tailed for a finite mean order value"
        )
    neg_mean, _ = _gamma_gamma_objective(theta, data)
    return GammaGammaParams(
        p=math.exp(float(theta[0])),
        q=1.0 + math.exp(float(theta[1])),
        v=math.exp(float(theta[2])),
        log_likelihood=-neg_mean * customers,
        customers=customers,
    )


def expected_order_value(
    params: GammaGammaParams, frequency: npt.ArrayLike, monetary: npt.ArrayLike
) -> FloatArray:
    """E[M | p, q, v, m, x] = p (v + x m) / (p x + q - 1), [FH13]/[FHL05b].

    The posterior mean of the customer's mean spend p/nu, a weighted average of the population
    mean p v/(q-1) (weight (q-1)/(px+q-1)) and the observed m (weight px/(px+q-1)). One-time
    buyers (x == 0) get the population mean p v/(q-1); their ``monetary`` is not read.
    """
    p, q, v = _gg_values(params)
    x = _validate_frequency(frequency)
    m = _validate_monetary(monetary, x)
    m_used = np.where(x > 0, m, 0.0)
    out: FloatArray = p * (v + x * m_used) / (p * x + q - 1.0)
    return out


# --------------------------------------------------------------------------------------------
# CLV


def clv(
    bg: BgNbdParams,
    gg: GammaGammaParams | None,
    frequency: npt.ArrayLike,
    recency: npt.ArrayLike,
    T: npt.ArrayLike,
    monetary: npt.ArrayLike,
    *,
    months: int = 12,
    discount_rate_monthly: float = 0.01,
    fallback_value: npt.ArrayLike | None = None,
) -> FloatArray:
    """Discounted expected value of the next ``months`` 30-day months, per customer.

    CLV = sum_{i=1..months} (E[Y(30 i)] - E[Y(30 (i-1))]) * E[M] / (1 + d)^i

    with E[Y(t)] the conditional expectation (10) of [FHL05] (so month i is days
    (30(i-1), 30i] after the as-of day; months are 30 days, not calendar months) and E[M]
    ``expected_order_value`` under ``gg``. With ``gg`` None the per-customer ``fallback_value``
    is the order value instead (``monetary`` is then not read); with ``gg`` given
    ``fallback_value`` is ignored. Values are in the units of the order value (minor currency
    units). The discounted purchase stream is computed once per distinct (x, T).
    """
    r, alpha, a, b = _params_tuple(bg)
    x, tx, tt = _validate_rft(frequency, recency, T)
    if isinstance(months, bool) or not isinstance(months, int) or months < 0:
        raise ValueError(f"months must be a whole number >= 0, got {months!r}")
    if not (math.isfinite(discount_rate_monthly) and discount_rate_monthly > -1.0):
        raise ValueError(f"discount_rate_monthly must be > -1, got {discount_rate_monthly!r}")

    if gg is not None:
        value = expected_order_value(gg, x, monetary)
    else:
        if fallback_value is None:
            raise ValueError("clv needs fallback_value when gg is None")
        value = _column("fallback_value", fallback_value)
        _same_length(frequency=x, fallback_value=value)
        if not np.all(np.isfinite(value) & (value >= 0)):
            raise ValueError("fallback_value must be finite and >= 0")

    (ux, uT), _, inverse = _unique_rows(x, tt)
    discounted = np.zeros_like(ux)
    previous = np.zeros_like(ux)
    for month in range(1, months + 1):
        horizon = np.full_like(ux, float(DAYS_PER_MONTH * month))
        cumulative = _alive_expectation(r, alpha, a, b, ux, uT, horizon)
        discounted += (cumulative - previous) / (1.0 + discount_rate_monthly) ** month
        previous = cumulative
    out: FloatArray = discounted[inverse] * _p_alive(r, alpha, a, b, x, tx, tt) * value
    return out
