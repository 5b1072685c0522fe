"""`syncd segments`: rebuild the profiles, fit and score the CLV models, evaluate the
segments and record who entered and who left. One transaction: readers see the old
profiles and memberships or the new ones, never a mix.

A backtest (``as_of``) writes nothing to the store but its ``sync_runs`` row: its
profiles go to a temporary copy of ``customer_profiles`` on its own connection (see
``work.shadow``), its memberships are compared and its models fitted but neither is
recorded, and its transaction is rolled back. Everyone else (a push, a scoped
recompute of the daemon, ``syncd status``) reads the live tables throughout."""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from datetime import time as dtime
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import Connection, Engine, insert, select, text

from syncd.config import Settings
from syncd.log import log_run
from syncd.runs import BACKTEST, finish_run, start_run, utc_now
from syncd.segments import clv, work
from syncd.segments.memberships import (
    T_SCOPE,
    SegmentChange,
    SegmentError,
    check_sql_segments,
    record_changes,
    select_members,
)
from syncd.segments.profiles import (
    EPOCH_DAY,
    ClvInputs,
    Conversion,
    ProductTables,
    ProfileError,
    RfmCuts,
    Scores,
    build_work_tables,
    clv_inputs,
    customer_roles,
    rfm_by_cuts,
    rfm_by_rank,
    write_consent,
    write_profiles,
    write_scores,
)
from syncd.store.models import MODEL_FITS, PROFILES

__all__ = ["ProfileError", "RecomputeResult", "SegmentError", "as_of_instant", "recompute"]

HORIZON_DAYS = 90  # expected_orders_90d
# A scoped recompute looks each customer up; past this many a full one is as quick.
SCOPED_MAX_CUSTOMERS = 5000
# model_fits row of each full recompute that recorded memberships: what a scoped one
# scores against (RFM cut points, the CLV parameters, the reporting currency).
SCORING_MODEL = "scoring"


def as_of_instant(day: date) -> datetime:
    """The end of ``day`` in UTC: --as-of counts everything up to and including that day."""
    return datetime.combine(day, dtime.max, tzinfo=UTC)


@dataclass
class RecomputeResult:
    as_of: datetime
    computed_at: datetime
    status: str = "success"  # success | failed
    error: str | None = None
    run_id: int | None = None
    written: bool = True  # profiles, memberships and fits recorded (not for --as-of)
    profiles: int = 0
    buyers: int = 0
    currency: str | None = None
    segments: dict[str, SegmentChange] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    # Customers a scoped recompute covered; None for a full one. ``profiles`` and
    # ``buyers`` then count those customers' rows only.
    scope: int | None = None

    def segment_changes(self) -> dict[str, dict[str, int]]:
        return {name: change.as_dict() for name, change in self.segments.items()}

    def counts(self) -> dict[str, Any]:
        counts: dict[str, Any] = {
            "profiles": self.profiles,
            "buyers": self.buyers,
            "segments": self.segment_changes(),
        }
        if self.scope is not None:
            counts["scope"] = self.scope
        if not self.written:
            counts["as_of"] = self.as_of.isoformat()
        return counts

    def as_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "error": self.error,
            "as_of": self.as_of.isoformat(),
            "memberships_recorded": self.written,
            "profiles": self.profiles,
            "buyers": self.buyers,
            "currency": self.currency,
            "segments": self.segment_changes(),
            "models": self.models,
        }


class _Timer:
    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - started, 3)


def recompute(
    engine: Engine,
    settings: Settings,
    as_of: date | None = None,
    *,
    now: datetime | None = None,
    customers: Collection[int] | None = None,
) -> RecomputeResult:
    """Recompute profiles and segments as of now (``now`` pins it, for tests) or as of the
    end of the day ``as_of`` (a backtest: profiles are computed as of then, memberships
    compared and models fitted, and nothing of it is written to the store; the run is
    recorded under the kind BACKTEST).

    ``customers`` (not with ``as_of``) scopes the recompute to those people: their profiles
    and memberships are rebuilt, scored against the last full recompute's RFM cut points
    and CLV fits, and everyone else is left as is. It is what webhooks trigger. It runs
    in full instead when there is no earlier full recompute to score against, or when
    more than SCOPED_MAX_CUSTOMERS are given.

    Raises ProfileError or SegmentError for a configuration that cannot run (the run is
    recorded as failed first); other failures are recorded and re-raised.
    """
    if customers is not None and as_of is not None:
        raise ValueError("a scoped recompute is as of now: customers and as_of exclude")
    computed_at = utc_now()
    instant = as_of_instant(as_of) if as_of is not None else (now or computed_at)
    result = RecomputeResult(as_of=instant, computed_at=computed_at, written=as_of is None)
    started = time.monotonic()
    kind = "segments" if result.written else BACKTEST
    result.run_id = start_run(engine, kind, "segments")
    try:
        scoring = None
        if customers is not None and len(customers) <= SCOPED_MAX_CUSTOMERS:
            scoring = _last_scoring(engine)
        if scoring is not None and customers is not None:
            result.scope = len(set(customers))
            _recompute(engine, settings, result, set(customers), scoring)
        else:
            _recompute(engine, settings, result)
    except Exception as exc:
        result.status = "failed"
        result.error = str(exc) if isinstance(exc, ProfileError | SegmentError) else repr(exc)
        raise
    finally:
        finish_run(engine, result.run_id, result.status, result.counts(), result.error)
        log_run(
            kind,
            "segments",
            result.status,
            started,
            {"profiles": result.profiles, "buyers": result.buyers},
            error=result.error,
            **({"scope": result.scope} if result.scope is not None else {}),
            segments=result.segment_changes(),
            as_of=instant.isoformat(),
        )
    return result


def _recompute(
    engine: Engine,
    settings: Settings,
    result: RecomputeResult,
    scope: set[int] | None = None,
    scoring: _Scoring | None = None,
) -> None:
    """The recompute, in one transaction: of everyone, or (``scope`` with the ``scoring``
    to score them against) of those customers only. A backtest's transaction is rolled
    back, its profiles written to a shadow of ``customer_profiles``."""
    scoped = scoring is not None
    timer = _Timer(result.timings)
    profiles = settings.profiles
    as_of = result.as_of
    as_of_day = int(as_of.timestamp()) // EPOCH_DAY
    with timer.step("check_segments"):
        check_sql_segments(engine, settings.segments)
    products: ProductTables | None = None
    with engine.connect() as conn:
        try:
            conn.begin()
            if not result.written:
                # A backtest writes its profiles (and its segments read them) in a
                # temporary table of the same name on this connection: the live one is
                # neither written nor locked, so pushes and webhook recomputes go on
                # reading and writing it meanwhile. (Writing the live table in a
                # transaction never committed would hold Postgres' TRUNCATE lock, which
                # stops every reader, and SQLite's one write lock, for the whole run.)
                work.shadow(conn, PROFILES.name)
            if scoring is not None:
                _scope_table(conn, scope or set())
            with timer.step("metrics"):
                conv, products = build_work_tables(conn, profiles, as_of, scoped=scoped)
            if scoring is not None and conv.currency is None:  # nobody here has an order
                conv = Conversion(scoring.currency, {})
            result.currency = conv.currency
            with timer.step("clv_read"):
                inputs = clv_inputs(conn, conv, as_of_day)
            result.buyers = len(inputs.customer_id)
            if scoring is not None:
                bg, gg = scoring.bg, scoring.gg
                with timer.step("clv_score"):
                    rfm = rfm_by_cuts(inputs, as_of_day, scoring.cuts)
                    _score(conn, settings, inputs, rfm, bg, gg)
            else:
                rfm, cuts = rfm_by_rank(inputs, as_of_day)
                bg, gg = _fit_and_score(conn, settings, inputs, rfm, result, timer)
            with timer.step("products_wait"):
                products.wait(conn)
            with timer.step("profiles"):
                result.profiles = write_profiles(
                    conn,
                    profiles,
                    conv,
                    as_of,
                    as_of_day,
                    result.computed_at,
                    bg is not None,
                    scoped=scoped,
                    roles=customer_roles(settings),
                )
                write_consent(conn, settings.consent, as_of, scoped=scoped)
            if scoring is None and result.written:
                kept = _Scoring(cuts, bg, gg, conv.currency)
                conn.execute(insert(MODEL_FITS), [kept.row(result)])
            with timer.step("segments"):
                sizes = select_members(conn, settings.segments, as_of, scoped=scoped)
                result.segments = record_changes(
                    conn, sizes, as_of, write=result.written, scoped=scoped
                )
            if result.written:
                with timer.step("commit"):
                    conn.commit()
        finally:
            if products is not None:
                products.cancel()
            if conn.in_transaction():
                conn.rollback()
            with timer.step("cleanup"):
                work.drop_all(conn)
    if not scoped and result.written and engine.dialect.name == "postgresql":
        # The tables were just rewritten: fresh statistics now, not whenever autovacuum
        # comes, or the next scoped recompute's plans scan them instead of looking up the
        # few customers it covers (a second instead of a tenth).
        with timer.step("analyze"), engine.begin() as conn:
            conn.execute(text("ANALYZE customer_profiles, segment_memberships"))


def _scope_table(conn: Connection, customers: set[int]) -> None:
    """``t_scope``: the customers a scoped recompute covers."""
    work.create(conn, "t_scope", "cid BIGINT PRIMARY KEY")
    if customers:
        conn.execute(insert(T_SCOPE), [{"cid": c} for c in sorted(customers)])
    # Without statistics Postgres takes the scope for a large table and scans the
    # memberships instead of looking the few customers up.
    work.analyze(conn, "t_scope")


@dataclass(frozen=True)
class _Scoring:
    """What a scoped recompute scores against (see SCORING_MODEL)."""

    cuts: RfmCuts
    bg: clv.BgNbdParams | None
    gg: clv.GammaGammaParams | None
    currency: str | None

    def row(self, result: RecomputeResult) -> dict[str, Any]:
        params = {
            "rfm": self.cuts.as_params(),
            "bgnbd": None if self.bg is None else vars(self.bg),
            "gamma_gamma": None if self.gg is None else vars(self.gg),
            "currency": self.currency,
        }
        row = _fit_row(SCORING_MODEL, params, None, self.cuts.buyers, None)
        row.update(as_of=result.as_of, fitted_at=result.computed_at)
        return row


def _last_scoring(engine: Engine) -> _Scoring | None:
    with engine.connect() as conn:
        params = conn.execute(
            select(MODEL_FITS.c.params)
            .where(MODEL_FITS.c.model == SCORING_MODEL)
            .order_by(MODEL_FITS.c.id.desc())
            .limit(1)
        ).scalar()
    if not params:
        return None
    bg, gg = params.get("bgnbd"), params.get("gamma_gamma")
    return _Scoring(
        RfmCuts.from_params(params["rfm"]),
        clv.BgNbdParams(**bg) if bg else None,
        clv.GammaGammaParams(**gg) if gg else None,
        params.get("currency"),
    )


def _fit_and_score(
    conn: Connection,
    settings: Settings,
    inputs: ClvInputs,
    rfm: Scores,
    result: RecomputeResult,
    timer: _Timer,
) -> tuple[clv.BgNbdParams | None, clv.GammaGammaParams | None]:
    """Fit BG/NBD and Gamma-Gamma on the buyers, score them (and their ``rfm`` scores)
    into ``t_clv``, keep the fits in ``model_fits``. Returns the fits (None where a model
    was not fitted)."""
    cfg = settings.profiles.clv
    x = inputs.frequency
    monetary = np.maximum(inputs.monetary, 0.0)
    bg: clv.BgNbdParams | None = None
    gg: clv.GammaGammaParams | None = None
    bg_error = gg_error = None
    with timer.step("clv_fit"):
        try:
            bg = clv.fit_bgnbd(x, inputs.recency, inputs.age, min_customers=cfg.min_customers)
        except clv.ModelNotFitted as exc:
            bg_error = str(exc)
        try:
            gg = clv.fit_gamma_gamma(x, monetary, min_customers=cfg.min_repeat_buyers)
        except clv.ModelNotFitted as exc:
            gg_error = str(exc)
    with timer.step("clv_score"):
        _score(conn, settings, inputs, rfm, bg, gg)
    fitted_at = utc_now()
    fits: list[dict[str, Any]] = []
    if bg is not None:
        params = {"r": bg.r, "alpha": bg.alpha, "a": bg.a, "b": bg.b}
        result.models["bgnbd"] = {
            **params,
            "log_likelihood": bg.log_likelihood,
            "customers": bg.customers,
            "time_unit": "day",
            "error": None,
        }
        fits.append(_fit_row("bgnbd", params, bg.log_likelihood, bg.customers, None))
    else:
        result.models["bgnbd"] = {
            **dict.fromkeys(("r", "alpha", "a", "b", "log_likelihood")),
            "customers": len(x),
            "time_unit": "day",
            "error": bg_error,
        }
        fits.append(_fit_row("bgnbd", None, None, len(x), bg_error))
    if gg is not None:
        params = {"p": gg.p, "q": gg.q, "v": gg.v}
        result.models["gamma_gamma"] = {
            **params,
            "log_likelihood": gg.log_likelihood,
            "customers": gg.customers,
            "error": None,
        }
        fits.append(_fit_row("gamma_gamma", params, gg.log_likelihood, gg.customers, None))
    else:
        result.models["gamma_gamma"] = {
            **dict.fromkeys(("p", "q", "v", "log_likelihood")),
            "customers": int((x > 0).sum()),
            "error": gg_error,
        }
        fits.append(_fit_row("gamma_gamma", None, None, int((x > 0).sum()), gg_error))
    for row in fits:
        row.update(as_of=result.as_of, fitted_at=fitted_at)
    if result.written:  # a backtest's fits are reported, not kept
        conn.execute(insert(MODEL_FITS), fits)
    return bg, gg


def _score(
    conn: Connection,
    settings: Settings,
    inputs: ClvInputs,
    rfm: Scores,
    bg: clv.BgNbdParams | None,
    gg: clv.GammaGammaParams | None,
) -> None:
    """Score the buyers of ``inputs`` with the fitted models into ``t_clv``, with their
    ``rfm`` scores."""
    cfg = settings.profiles.clv
    x, t_x, big_t = inputs.frequency, inputs.recency, inputs.age
    monetary = np.maximum(inputs.monetary, 0.0)
    n = len(x)
    order_value = (
        clv.expected_order_value(gg, x, monetary) if gg is not None else inputs.avg_order_value
    )
    p_alive: list[float | None] = [None] * n
    expected: list[float | None] = [None] * n
    value_12m: list[int | None] = [None] * n
    if bg is not None:
        p_alive = _floats(clv.p_alive(bg, x, t_x, big_t))
        expected = _floats(clv.expected_purchases(bg, HORIZON_DAYS, x, t_x, big_t))
        value_12m = _minor(
            clv.clv(
                bg,
                gg,
                x,
                t_x,
                big_t,
                monetary,
                months=12,
                discount_rate_monthly=cfg.discount_rate_monthly,
                # A customer refunded more than they paid has no negative future value.
                fallback_value=np.maximum(inputs.avg_order_value, 0.0),
            )
        )
    write_scores(conn, inputs.customer_id, rfm, p_alive, expected, _minor(order_value), value_12m)


def _fit_row(
    model: str,
    params: Mapping[str, Any] | None,
    log_likelihood: float | None,
    customers: int,
    error: str | None,
) -> dict[str, Any]:
    return {
        "model": model,
        "params": params,
        "log_likelihood": log_likelihood,
        "customers": customers,
        "error": error,
    }


def _floats(values: NDArray[np.float64]) -> list[float | None]:
    """Finite values as floats, anything else as None (never NaN in the store)."""
    out: list[float | None] = np.where(np.isfinite(values), values, np.nan).tolist()
    return [None if v != v else v for v in out]


def _minor(values: NDArray[np.float64]) -> list[int | None]:
    """Amounts in minor units, rounded half away from zero; non-finite as None."""
    finite = np.isfinite(values)
    rounded = np.where(finite, np.sign(values) * np.floor(np.abs(values) + 0.5), 0.0)
    ints: list[int] = rounded.astype(np.int64).tolist()
    flags: list[bool] = finite.tolist()
    return [v if ok else None for v, ok in zip(ints, flags, strict=True)]
