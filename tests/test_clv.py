"""BG/NBD + Gamma-Gamma predictive CLV (syncd.segments.clv).

References: Fader, Hardie & Lee (2005) "Counting your customers the easy way" [FHL05] and
Fader & Hardie (2013) "The Gamma-Gamma model of monetary value" [FH13].
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest
from scipy import integrate, optimize, special  # type: ignore[import-untyped, unused-ignore]

from syncd.segments import clv as C
from syncd.segments.clv import (
    BgNbdParams,
    GammaGammaParams,
    ModelNotFitted,
    bgnbd_log_likelihood,
    clv,
    expected_order_value,
    expected_purchases,
    expected_purchases_new,
    fit_bgnbd,
    fit_gamma_gamma,
    p_alive,
)

FloatArray = npt.NDArray[np.float64]

# CDNOW estimates published in [FHL05] section 5 (time unit: weeks).
CDNOW = BgNbdParams(r=0.243, alpha=4.414, a=0.793, b=2.426, log_likelihood=0.0, customers=0)
# The same purchase process on a day scale (alpha scales with the time unit: 4.414 weeks * 7).
DAY_TRUE = (0.243, 30.9, 0.793, 2.426)
GG_TRUE = (6.25, 3.74, 15.44)  # [FH13] CDNOW estimates
GG_PARAMS = GammaGammaParams(p=6.25, q=3.74, v=15.44, log_likelihood=0.0, customers=0)


# --------------------------------------------------------------------------------------------
# simulation and independent references


def simulate_bgnbd(
    rng: np.random.Generator, n: int, params: tuple[float, float, float, float], T: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Exact draw from the BG/NBD: lambda ~ Gamma(r, alpha), p ~ Beta(a, b).

    Repeat purchases arrive as a Poisson(lambda) process; the customer drops out right after
    the K-th repeat purchase, K ~ Geometric(p). So x = min(N(T), K), and given N(T) = k the
    arrival times are uniform order statistics on [0, T]: t_x = T * Beta(x, k - x + 1).
    """
    r, alpha, a, b = params
    lam = rng.gamma(r, 1.0 / alpha, n)
    p = rng.beta(a, b, n)
    arrivals = rng.poisson(lam * T)
    x = np.minimum(arrivals, rng.geometric(p))
    tx = np.zeros(n)
    pos = x > 0
    tx[pos] = T[pos] * rng.beta(x[pos], arrivals[pos] - x[pos] + 1)
    return x.astype(np.float64), tx, T.astype(np.float64)


def simulate_spend(
    rng: np.random.Generator, x: FloatArray, params: tuple[float, float, float]
) -> FloatArray:
    """Gamma-Gamma: nu ~ Gamma(q, rate v); the sum of x spends ~ Gamma(p x, rate nu)."""
    p, q, v = params
    nu = rng.gamma(q, 1.0 / v, x.shape[0])
    k = np.maximum(x, 1.0)
    out: FloatArray = rng.gamma(p * k, 1.0 / nu) / k
    return out


def alive_expectation_by_integration(
    params: tuple[float, float, float, float], x: float, T: float, t: float
) -> float:
    """E[Y(t) | alive at T, x] straight from the model's mixing distributions, no 2F1.

    Given alive at T after x repeat purchases: lambda ~ Gamma(r+x, alpha+T), p ~ Beta(a, b+x),
    and E[Y(t) | lambda, p] = (1 - exp(-lambda p t))/p ([FHL05] eq. 7's individual-level
    expectation). lambda is integrated out with the Gamma Laplace transform
    E[exp(-s lambda)] = (rate/(rate+s))^shape; p numerically with scipy.integrate.quad.
    """
    r, alpha, a, b = params
    scale = t / (alpha + T)
    log_beta = float(special.betaln(a, b + x))

    def integrand(p: float) -> float:
        g = -math.expm1(-(r + x) * math.log1p(p * scale)) / p
        return g * math.exp((a - 1) * math.log(p) + (b + x - 1) * math.log1p(-p) - log_beta)

    breaks = sorted({a / (a + b + x), 0.5})  # the posterior mean of p, and mid-range
    value, _ = integrate.quad(
        integrand, 0.0, 1.0, points=breaks, limit=400, epsabs=0.0, epsrel=1e-10
    )
    return float(value)


def p_alive_by_hand(
    params: tuple[float, float, float, float], x: int, tx: float, T: float
) -> float:
    """1/(1 + delta(x>0) a/(b+x-1) ((alpha+T)/(alpha+t_x))^(r+x)), in plain floats."""
    r, alpha, a, b = params
    if x == 0:
        return 1.0
    odds = a / (b + x - 1) * math.pow((alpha + T) / (alpha + tx), r + x)
    return 1.0 / (1.0 + odds)


def _tuple(params: BgNbdParams) -> tuple[float, float, float, float]:
    return (params.r, params.alpha, params.a, params.b)


# --------------------------------------------------------------------------------------------
# parameter recovery


def test_bgnbd_recovers_simulated_parameters() -> None:
    rng = np.random.default_rng(20050501)
    n = 30_000
    x, tx, T = simulate_bgnbd(rng, n, DAY_TRUE, rng.uniform(30.0, 1100.0, n))
    fitted = fit_bgnbd(x, tx, T)
    # Tolerances are ~3.5 asymptotic standard errors. With this design (30k customers, T
    # uniform on 30..1100 days) the observed-information SEs are 1.2% of r, 2.1% of alpha,
    # 4.1% of a and 5.6% of b; over 20 seeds the standardized errors had mean ~0 and sd ~1
    # (no bias) and never exceeded 2.3 SE.
    assert fitted.r == pytest.approx(DAY_TRUE[0], rel=0.045)
    assert fitted.alpha == pytest.approx(DAY_TRUE[1], rel=0.075)
    assert fitted.a == pytest.approx(DAY_TRUE[2], rel=0.15)
    assert fitted.b == pytest.approx(DAY_TRUE[3], rel=0.20)
    assert fitted.customers == n
    # The reported log-likelihood is the total of eq. (6) over the base at the optimum, and it
    # beats the true parameters' (it is the maximum).
    per_customer = bgnbd_log_likelihood(fitted, x, tx, T)
    assert fitted.log_likelihood == pytest.approx(float(per_customer.sum()), rel=1e-10)
    assert fitted.log_likelihood >= float(bgnbd_log_likelihood(DAY_TRUE, x, tx, T).sum())


def test_gamma_gamma_recovers_simulated_parameters() -> None:
    rng = np.random.default_rng(20130101)
    n = 30_000
    x = (1 + rng.poisson(2.0, n)).astype(np.float64)
    m = simulate_spend(rng, x, GG_TRUE)
    fitted = fit_gamma_gamma(x, m)
    # ~3.5 asymptotic SEs: for 30k repeat buyers with x = 1 + Poisson(2) the observed-
    # information SEs are 4.2% of p, 1.3% of q and 5.8% of v (p and v are strongly
    # correlated: the mean spend p v/(q-1) is much better determined than either). Over 20
    # seeds the standardized errors never exceeded 1.6 SE.
    assert fitted.p == pytest.approx(GG_TRUE[0], rel=0.15)
    assert fitted.q == pytest.approx(GG_TRUE[1], rel=0.045)
    assert fitted.v == pytest.approx(GG_TRUE[2], rel=0.20)
    assert fitted.customers == n
    total = float(np.sum(C.gamma_gamma_log_likelihood(fitted, x, m)))
    assert fitted.log_likelihood == pytest.approx(total, rel=1e-10)


def test_fits_are_deterministic() -> None:
    rng = np.random.default_rng(7)
    n = 5_000
    x, tx, T = simulate_bgnbd(rng, n, DAY_TRUE, rng.integers(0, 700, n).astype(np.float64))
    m = simulate_spend(rng, x, GG_TRUE)
    assert fit_bgnbd(x, tx, T) == fit_bgnbd(x, tx, T)
    assert fit_gamma_gamma(x, m) == fit_gamma_gamma(x, m)


def test_compressed_fit_matches_per_customer_likelihood_on_duplicated_data() -> None:
    # Whole-day data is full of duplicate (x, t_x, T) rows; the weighted, compressed objective
    # must equal the plain per-customer sum, and a shuffled base must give the same fit.
    rng = np.random.default_rng(11)
    n = 20_000
    x, tx, T = simulate_bgnbd(rng, n, DAY_TRUE, rng.integers(0, 400, n).astype(np.float64))
    tx = np.floor(tx)
    fitted = fit_bgnbd(x, tx, T)
    assert fitted.log_likelihood == pytest.approx(
        float(bgnbd_log_likelihood(fitted, x, tx, T).sum()), rel=1e-10
    )
    order = rng.permutation(n)
    shuffled = fit_bgnbd(x[order], tx[order], T[order])
    assert _tuple(shuffled) == pytest.approx(_tuple(fitted), rel=1e-6)


def test_analytic_gradients_match_finite_differences() -> None:
    rng = np.random.default_rng(3)
    n = 3_000
    x, tx, T = simulate_bgnbd(rng, n, DAY_TRUE, rng.uniform(0.0, 900.0, n))
    data = C._compress_bgnbd(x, tx, T)
    theta = np.log(np.array([0.4, 12.0, 1.3, 3.0]))
    numeric = optimize.approx_fprime(theta, lambda th: C._bgnbd_objective(th, data)[0], 1e-7)
    assert C._bgnbd_objective(theta, data)[1] == pytest.approx(numeric, rel=1e-4, abs=1e-7)

    spend = simulate_spend(rng, x, GG_TRUE)
    ok = x > 0
    gg_data = C._compress_gamma_gamma(x[ok], spend[ok])
    theta_gg = np.log(np.array([3.0, 1.5, 20.0]))
    numeric_gg = optimize.approx_fprime(
        theta_gg, lambda th: C._gamma_gamma_objective(th, gg_data)[0], 1e-7
    )
    assert C._gamma_gamma_objective(theta_gg, gg_data)[1] == pytest.approx(
        numeric_gg, rel=1e-4, abs=1e-7
    )


# --------------------------------------------------------------------------------------------
# published CDNOW figures and closed forms


def test_cdnow_conditional_expectation_matches_paper() -> None:
    # [FHL05] section 5: a customer with x=2, t_x=30.43, T=38.86 (weeks) is expected to make
    # 1.226 purchases in the next 39 weeks (published to 3 decimals: +-5e-4).
    got = expected_purchases(CDNOW, 39.0, [2], [30.43], [38.86])
    assert got[0] == pytest.approx(1.226, abs=5e-4)
    # Independent check: P(alive) times the expectation over the posterior mixing
    # distributions, integrated numerically (no hypergeometric function involved).
    reference = p_alive_by_hand(_tuple(CDNOW), 2, 30.43, 38.86) * (
        alive_expectation_by_integration(_tuple(CDNOW), 2, 38.86, 39.0)
    )
    assert got[0] == pytest.approx(reference, rel=1e-9)


def test_cdnow_unconditional_expectation_matches_published_figures() -> None:
    # E[X(t)] for a new CDNOW customer (eq. 9), as in Hardie's BG/NBD spreadsheet for the
    # paper. Those figures come from the unrounded estimates; rounding the four parameters to
    # the paper's 3 decimals moves every E[X(t)] here by up to 0.23% (checked over the corners
    # of the +-0.0005 rounding box), hence rel 0.25% plus half a unit of the 4th decimal.
    weeks = np.array([0.1429, 1.0, 3.0, 31.8571, 32.0, 78.0])
    published = np.array([0.0078, 0.0532, 0.1506, 1.0405, 1.0437, 1.8576])
    got = expected_purchases_new(CDNOW, weeks)
    assert got.shape == weeks.shape
    assert np.all(np.abs(got - published) <= 0.0025 * published + 5e-5)


def test_unconditional_expectation_matches_numerical_integration() -> None:
    # Eq. (9) against E[(1/p)(1 - exp(-lambda p t))] integrated over lambda ~ Gamma(r, alpha)
    # and p ~ Beta(a, b); a customer at T = 0 with x = 0 is exactly that new customer.
    params = _tuple(CDNOW)
    for t in (0.5, 10.0, 78.0, 520.0):
        reference = alive_expectation_by_integration(params, 0.0, 0.0, t)
        assert expected_purchases_new(CDNOW, t) == pytest.approx(reference, rel=1e-9)
    assert float(expected_purchases_new(CDNOW, 0.0)) == 0.0


def _paper_form(params: tuple[float, float, float, float], x: float, T: float, t: float) -> float:
    """Eq. (10) without P(alive), exactly as printed (overflows for large x)."""
    r, alpha, a, b = params
    z = t / (alpha + T + t)
    with np.errstate(all="ignore"):
        power = ((alpha + T) / (alpha + T + t)) ** (r + x)
        f = special.hyp2f1(r + x, b + x, a + b + x - 1, z)
        return float((a + b + x - 1) / (a - 1) * (1 - power * f))


@pytest.mark.parametrize(
    "params",
    [
        DAY_TRUE,
        (2.0, 5.0, 3.0, 10.0),  # r - a integer: scipy's hyp2f1 is NaN there for z near 1
        (0.5, 0.5, 1.0, 0.3),  # a == 1: removable singularity of (a+b+x-1)/(a-1)
        (0.3, 1.0, 0.2, 0.8),  # a + b == 1: c == 0 for x == 0
        (0.1, 3.0, 25.0, 40.0),
    ],
)
def test_conditional_expectation_stable_for_large_counts(
    params: tuple[float, float, float, float],
) -> None:
    bg = BgNbdParams(*params, log_likelihood=0.0, customers=0)
    cases = [(0, 0.0, 360.0), (3, 200.0, 30.0), (1000, 5000.0, 360.0), (5000, 1000.0, 360.0)]
    for x, T, t in cases:
        got = expected_purchases(bg, t, [x], [T], [T])[0]  # t_x == T: P(alive) is not tiny
        reference = p_alive_by_hand(params, x, T, T) * alive_expectation_by_integration(
            params, x, T, t
        )
        assert np.isfinite(got)
        assert got == pytest.approx(reference, rel=1e-7)
    if params == DAY_TRUE:
        # The printed form of eq. (10) breaks down where ours does not: 0 * inf.
        assert not np.isfinite(_paper_form(params, 5000, 1000.0, 360.0))


def test_p_alive_formula_and_one_time_buyers() -> None:
    params = _tuple(CDNOW)
    x = np.array([0, 0, 2, 1, 10])
    tx = np.array([0.0, 0.0, 30.43, 5.0, 300.0])
    T = np.array([0.0, 500.0, 38.86, 40.0, 1000.0])
    got = p_alive(CDNOW, x, tx, T)
    # one-time buyers are alive for sure under the BG/NBD (dropout only after a repeat buy)
    assert got[0] == 1.0
    assert got[1] == 1.0
    # by hand for x=2: a/(b+1) = 0.793/3.426 = 0.23147; (43.274/34.844)^2.243 = 1.62577;
    # 1/(1 + 0.37631) = 0.72658
    assert got[2] == pytest.approx(0.72658, abs=1e-5)
    for i in range(len(x)):
        assert got[i] == pytest.approx(p_alive_by_hand(params, int(x[i]), tx[i], T[i]), rel=1e-12)
    # no overflow for a long-silent heavy buyer
    assert p_alive(CDNOW, [5000], [10.0], [30000.0])[0] == 0.0


# --------------------------------------------------------------------------------------------
# log-likelihood


def test_log_likelihood_matches_eq6_evaluated_directly() -> None:
    r, alpha, a, b = 0.7, 3.5, 1.4, 2.2

    def beta(u: float, w: float) -> float:
        return math.gamma(u) * math.gamma(w) / math.gamma(u + w)

    def eq6(x: int, tx: float, T: float) -> float:
        common = math.gamma(r + x) * math.pow(alpha, r) / math.gamma(r)
        value = beta(a, b + x) / beta(a, b) * common / math.pow(alpha + T, r + x)
        if x > 0:
            value += beta(a + 1, b + x - 1) / beta(a, b) * common / math.pow(alpha + tx, r + x)
        return value

    rows = [(0, 0.0, 0.0), (0, 0.0, 7.0), (1, 2.0, 9.0), (3, 4.5, 12.0), (6, 20.0, 20.0)]
    x, tx, T = (np.array(col, dtype=np.float64) for col in zip(*rows, strict=True))
    got = bgnbd_log_likelihood((r, alpha, a, b), x, tx, T)
    expected = np.log([eq6(int(xi), ti, Ti) for xi, ti, Ti in rows])
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert got[0] == 0.0  # first order today: likelihood 1


def test_log_likelihood_finite_for_huge_counts() -> None:
    x = np.array([5000.0, 5000.0, 20000.0])
    tx = np.array([9000.0, 100.0, 29000.0])
    T = np.array([9000.0, 30000.0, 30000.0])
    got = bgnbd_log_likelihood(CDNOW, x, tx, T)
    assert np.all(np.isfinite(got))
    # (a density in time^-x, so it may well be positive.) Where t_x == T both terms of (6)
    # share the time factor, so ln L = A1 - (r+x) ln(alpha+T) + ln(B(a,b+x) + B(a+1,b+x-1))
    # - ln B(a,b): an independent arrangement of the same quantity.
    r, alpha, a, b = _tuple(CDNOW)
    xs, Ts = 5000.0, 9000.0
    ratio_1 = math.exp(special.betaln(a, b + xs) - special.betaln(a, b))
    ratio_2 = math.exp(special.betaln(a + 1, b + xs - 1) - special.betaln(a, b))
    reference = (
        special.gammaln(r + xs)
        - special.gammaln(r)
        + r * math.log(alpha)
        - (r + xs) * math.log(alpha + Ts)
        + math.log(ratio_1 + ratio_2)
    )
    assert got[0] == pytest.approx(reference, rel=1e-12)


# --------------------------------------------------------------------------------------------
# Gamma-Gamma


def test_gamma_gamma_conditional_expectation_by_hand() -> None:
    # E[M | x=2, m=30] = p (v + x m) / (p x + q - 1) = 6.25 * 75.44 / 15.24 = 471.5 / 15.24
    got = expected_order_value(GG_PARAMS, [2, 0], [30.0, np.nan])
    assert got[0] == pytest.approx(30.938320, abs=1e-6)
    # one-time buyer: the population mean p v / (q - 1) = 96.5 / 2.74
    assert got[1] == pytest.approx(35.218978, abs=1e-6)


def test_gamma_gamma_fits_only_repeat_buyers_with_positive_spend() -> None:
    rng = np.random.default_rng(5)
    x = (1 + rng.poisson(2.0, 400)).astype(np.float64)
    m = simulate_spend(rng, x, GG_TRUE)
    base = fit_gamma_gamma(x, m)
    padded_x = np.concatenate([x, np.zeros(50), np.full(5, 3.0)])
    padded_m = np.concatenate([m, np.full(50, np.nan), np.zeros(5)])
    assert fit_gamma_gamma(padded_x, padded_m) == base


# --------------------------------------------------------------------------------------------
# edges


def test_tiny_base_is_not_fitted() -> None:
    with pytest.raises(ModelNotFitted, match="12 customers: at least 50 needed to fit BG/NBD"):
        fit_bgnbd(np.ones(12), np.ones(12), np.full(12, 5.0))
    with pytest.raises(ModelNotFitted, match=r"3 repeat buyers .* at least 30"):
        fit_gamma_gamma([1, 2, 3, 0], [10.0, 20.0, 30.0, 0.0])


def test_base_of_one_time_buyers_is_not_fitted() -> None:
    n = 500
    with pytest.raises(ModelNotFitted, match="none with a repeat purchase"):
        fit_bgnbd(np.zeros(n), np.zeros(n), np.arange(n, dtype=np.float64))
    with pytest.raises(ModelNotFitted):
        fit_gamma_gamma(np.zeros(n), np.zeros(n))


def test_gamma_gamma_with_infinite_mean_spend_is_not_fitted() -> None:
    # nu ~ Gamma(q=0.6): the population mean spend p v/(q-1) does not exist, so the fit runs
    # into the q > 1 constraint and refuses rather than return an absurd population mean.
    rng = np.random.default_rng(13)
    x = (1 + rng.poisson(1.0, 5_000)).astype(np.float64)
    m = simulate_spend(rng, x, (2.0, 0.6, 10.0))
    with pytest.raises(ModelNotFitted, match="q -> 1"):
        fit_gamma_gamma(x, m)


def test_customer_whose_first_order_is_today_scores_finite() -> None:
    rng = np.random.default_rng(9)
    n = 4_000
    x, tx, T = simulate_bgnbd(rng, n, DAY_TRUE, rng.integers(0, 800, n).astype(np.float64))
    m = simulate_spend(rng, x, GG_TRUE)
    x[0], tx[0], T[0], m[0] = 0.0, 0.0, 0.0, np.nan
    bg = fit_bgnbd(x, tx, T)
    gg = fit_gamma_gamma(x, m)
    assert p_alive(bg, x, tx, T)[0] == 1.0
    first = expected_purchases(bg, 365.0, x, tx, T)[0]
    assert first == pytest.approx(float(expected_purchases_new(bg, 365.0)), rel=1e-12)
    values = clv(bg, gg, x, tx, T, m)
    assert np.all(np.isfinite(values))
    assert np.all(values >= 0)
    assert values[0] > 0


def test_clv_is_discounted_monthly_sum() -> None:
    bg = BgNbdParams(*DAY_TRUE, log_likelihood=0.0, customers=0)
    x = np.array([0, 0, 4, 12])
    tx = np.array([0.0, 0.0, 100.0, 600.0])
    T = np.array([0.0, 300.0, 400.0, 610.0])
    m = np.array([np.nan, np.nan, 2500.0, 4100.0])
    months, d = 6, 0.02
    order_value = expected_order_value(GG_PARAMS, x, m)
    expected = np.zeros(4)
    for i in range(1, months + 1):
        step = expected_purchases(bg, 30.0 * i, x, tx, T) - expected_purchases(
            bg, 30.0 * (i - 1), x, tx, T
        )
        expected += step * order_value / (1 + d) ** i
    got = clv(bg, GG_PARAMS, x, tx, T, m, months=months, discount_rate_monthly=d)
    assert got == pytest.approx(expected, rel=1e-10)

    fallback = np.array([1000.0, 1000.0, 2000.0, 3000.0])
    no_gg = clv(
        bg, None, x, tx, T, m, months=months, discount_rate_monthly=d, fallback_value=fallback
    )
    assert no_gg == pytest.approx(expected / order_value * fallback, rel=1e-10)
    with pytest.raises(ValueError, match="fallback_value"):
        clv(bg, None, x, tx, T, m)
    assert np.all(clv(bg, GG_PARAMS, x, tx, T, m, months=0) == 0)


@pytest.mark.parametrize(
    ("frequency", "recency", "T", "message"),
    [
        ([1, -1], [1.0, 0.0], [2.0, 2.0], "frequency must be finite and >= 0"),
        ([1, 1], [-1.0, 0.0], [2.0, 2.0], "recency must be finite and >= 0"),
        ([1, 1], [3.0, 0.0], [2.0, 2.0], "recency must be <= T"),
        ([1, 1], [1.0, 1.0], [2.0], "mismatched lengths"),
        ([1.5, 1], [1.0, 1.0], [2.0, 2.0], "whole number"),
        ([0, 1], [1.0, 1.0], [2.0, 2.0], "recency must be 0 when frequency is 0"),
        ([1, 1], [1.0, 1.0], [np.nan, 2.0], "T must be finite"),
    ],
)
def test_invalid_inputs_raise(
    frequency: list[float], recency: list[float], T: list[float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        bgnbd_log_likelihood(CDNOW, frequency, recency, T)
    with pytest.raises(ValueError, match=message):
        fit_bgnbd(frequency, recency, T, min_customers=1)


def test_invalid_monetary_raises() -> None:
    with pytest.raises(ValueError, match="monetary"):
        expected_order_value(GG_PARAMS, [2, 1], [-5.0, 1.0])
    with pytest.raises(ValueError, match="mismatched lengths"):
        fit_gamma_gamma([1, 2], [1.0])
