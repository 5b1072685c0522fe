"""`customer_profiles`: one row per customer, rebuilt with set-based SQL on SQLite and Postgres.

The README's "customer_profiles" section is the definition this file implements.
The work happens in temporary tables on the recompute's connection, so nothing
but the final swap writes to the store:

1. ``t_ord``    the one scan of ``orders``: paid orders and carts up to as-of, narrow;
2. ``t_rates``  the conversion of every order currency into the reporting one;
3. ``t_paid``   the paid orders; ``t_agg`` per customer: counts, money, first/last order;
4. ``t_items``  units per customer and product; ``t_prod``, ``t_top`` from them;
5. ``t_first``  the first paid order's attribution; ``t_cart`` the latest open cart;
6. ``t_clv``    the CLV scores (filled by the caller from numpy, see ``clv_inputs``);
7. ``t_scored`` the RFM ranks, then one INSERT … SELECT into ``customer_profiles``
   with the lifecycle stage.

Per-customer tables have one row per ``cid`` (see ``work.create_as``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from fractions import Fraction
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import Connection, text

from syncd.config import ProfileSettings
from syncd.money import exponent
from syncd.segments import work
from syncd.store.models import PRODUCTS

EPOCH_DAY = 86_400

# (R score, F score) -> named segment: the README's grid.
RFM_GRID: dict[int, tuple[str, str, str, str, str]] = {
    5: ("new", "potential_loyalist", "potential_loyalist", "champions", "champions"),
    4: ("promising", "potential_loyalist", "potential_loyalist", "loyal", "loyal"),
    3: ("about_to_sleep", "about_to_sleep", "need_attention", "loyal", "loyal"),
    2: ("hibernating", "hibernating", "at_risk", "at_risk", "cannot_lose"),
    1: ("lost", "lost", "at_risk", "at_risk", "cannot_lose"),
}


class ProfileError(ValueError):
    """The profiles cannot be computed as configured (e.g. currencies without a rate)."""


def epoch_day(column: str, dialect: str) -> str:
    """SQL for the UTC day number (days since 1970-01-01) of a time column."""
    if dialect == "sqlite":
        # Times are stored as UTC text; strftime('%s') reads it as UTC seconds.
        return f"(CAST(strftime('%s', {column}) AS INTEGER) / {EPOCH_DAY})"
    return f"(({column} AT TIME ZONE 'UTC')::date - DATE '1970-01-01')"


def _json_list_not_empty(column: str, dialect: str) -> str:
    if dialect == "sqlite":
        return f"(COALESCE(json_array_length({column}), 0) > 0)"
    return f"(jsonb_typeof({column}) = 'array' AND jsonb_array_length({column}) > 0)"


def _round_div(num: str, den: str) -> str:
    """SQL integer division num / den rounded half away from zero (den > 0): the same on
    SQLite and Postgres, whose integer division both truncate toward zero."""
    return (
        f"(CASE WHEN ({num}) >= 0 THEN (2 * ({num}) + ({den})) / (2 * ({den})) "
        f"ELSE -((2 * (-({num})) + ({den})) / (2 * ({den}))) END)"
    )


def _conv(amount: str) -> str:
    """SQL converting ``amount`` (minor units, joined to ``t_rates r``) to the reporting
    currency: amount × num / den, rounded half up (away from zero)."""
    return _round_div(f"({amount}) * r.num", "r.den")


@dataclass(frozen=True)
class Conversion:
    currency: str | None  # the reporting currency; None when there are no orders at all
    factors: dict[str, Fraction]  # order currency -> reporting minor units per minor unit


def conversion(conn: Connection, settings: ProfileSettings) -> Conversion:
    """The reporting currency and a factor for every currency the counted orders are in.

    Raises ProfileError when amounts would otherwise be summed across currencies.
    """
    # Every currency of the orders counted (paid and carts): ``t_ord`` holds exactly those.
    found = sorted(conn.execute(text("SELECT DISTINCT cur FROM t_ord")).scalars())
    target = settings.reporting_currency
    if target is None:
        if len(found) > 1:
            raise ProfileError(
                f"profiles.reporting_currency: orders are in {', '.join(found)}: set a "
                "reporting currency and profiles.rates for the others, so amounts are "
                "never summed across currencies"
            )
        target = found[0] if found else None
    if target is None:
        return Conversion(None, {})
    missing = [c for c in found if c != target and c not in settings.rates]
    if missing:
        raise ProfileError(
            f"profiles.rates: orders are in {', '.join(missing)} but there is no rate for "
            f"{'it' if len(missing) == 1 else 'them'} (units of {target} per unit, "
            f'e.g. {missing[0]} = "1.10")'
        )
    factors: dict[str, Fraction] = {}
    for code in found:
        rate = Fraction(1) if code == target else Fraction(settings.rates[code])
        factors[code] = rate * Fraction(10) ** (exponent(target) - exponent(code))
    return Conversion(target, factors)


def _sum(expr: str) -> str:
    # Postgres sums BIGINT into NUMERIC, whose division is not integer division: cast back.
    return f"CAST(SUM({expr}) AS BIGINT)"


def _scan_orders(
    conn: Connection, settings: ProfileSettings, as_of: datetime, scoped: bool
) -> None:
    """``t_ord``: the one scan of ``orders``: every paid order and open-cart candidate up to
    the as-of instant, narrow, with its refunds (``paid`` = 1) or its cart time (0).
    ``scoped``: only the orders of the customers in ``t_scope`` (an index lookup each)."""
    dialect = conn.dialect.name
    in_scope = "customer_id IN (SELECT cid FROM t_scope)"
    orders_scope = f" AND o.{in_scope}" if scoped else ""
    refunds_scope = f" AND order_id IN (SELECT id FROM orders WHERE {in_scope})" if scoped else ""
    # An order's refunds: its rows in `refunds` up to the as-of instant, or, when the
    # refunds stream has no row for it at all, the order's own refund total. A cart's
    # time is its last modification, or its creation when it was modified after as-of.
    work.create_as(
        conn,
        "t_ord",
        f"""
        SELECT o.id AS oid, o.customer_id AS cid, o.source AS src, o.currency AS cur,
               CASE WHEN o.status IN :paid THEN 1 ELSE 0 END AS paid,
               o.total_minor AS total,
               CASE WHEN rf.n IS NULL THEN o.refunded_minor ELSE rf.dated END AS refunded,
               o.created_at AS created_at,
               CASE WHEN o.modified_at IS NOT NULL AND o.modified_at <= :as_of
                    THEN o.modified_at ELSE o.created_at END AS cart_at,
               {epoch_day("o.created_at", dialect)} AS day,
               CASE WHEN {_json_list_not_empty("o.coupon_codes", dialect)} THEN 1 ELSE 0 END
                   AS coupon,
               CASE WHEN o.attribution_source_type IS NULL THEN NULL
                    WHEN o.attribution_utm_source IS NULL
                         OR o.attribution_utm_source = '(direct)' THEN o.attribution_source_type
                    ELSE o.attribution_source_type || ':' || o.attribution_utm_source
               END AS attr
        FROM orders o
        LEFT JOIN (
            SELECT order_id, COUNT(*) AS n,
                   {_sum("CASE WHEN created_at <= :as_of THEN amount_minor ELSE 0 END")}
                       AS dated
            FROM refunds WHERE order_id IS NOT NULL AND deleted_at IS NULL{refunds_scope}
            GROUP BY order_id
        ) rf ON rf.order_id = o.id
        WHERE o.customer_id IS NOT NULL AND o.deleted_at IS NULL
          AND o.created_at <= :as_of AND o.status IN :counted{orders_scope}
        """,
        {
            "as_of": as_of,
            "paid": list(settings.paid_statuses),
            "counted": list(dict.fromkeys([*settings.paid_statuses, *settings.cart_statuses])),
        },
    )


def build_work_tables(
    conn: Connection, settings: ProfileSettings, as_of: datetime, *, scoped: bool = False
) -> Conversion:
    """Steps 1–5: the per-customer metrics, in temporary tables on ``conn`` (``scoped``: of
    the customers in ``t_scope`` only). Returns the currency conversion in use
    (ProfileError when the currencies cannot be reported)."""
    dialect = conn.dialect.name
    _scan_orders(conn, settings, as_of, scoped)
    conv = conversion(conn, settings)

    work.create(conn, "t_rates", "currency VARCHAR(3), num BIGINT, den BIGINT")
    if conv.factors:
        conn.execute(
            text("INSERT INTO t_rates (currency, num, den) VALUES (:c, :n, :d)"),
            [
                {"c": c, "n": f.numerator, "d": f.denominator}
                for c, f in sorted(conv.factors.items())
            ],
        )

    # The paid orders, narrow: every later step reads these instead of `orders`.
    work.create_as(conn, "t_paid", "SELECT * FROM t_ord WHERE paid = 1")
    if dialect == "sqlite":
        conn.execute(text("CREATE INDEX t_paid_oid ON t_paid (oid)"))

    # Per customer and currency first (conversion rounds per currency sum), then per customer.
    work.create_as(
        conn,
        "t_agg",
        f"""
        SELECT g.cid AS cid,
               {_sum("g.cnt")} AS orders_count,
               {_sum(_conv("g.total"))} AS gross,
               {_sum(_conv("g.refunded"))} AS refunded,
               {_sum("g.coupons")} AS coupons,
               MIN(g.first_at) AS first_at, MAX(g.last_at) AS last_at,
               MIN(g.first_day) AS first_day, MAX(g.last_day) AS last_day
        FROM (
            SELECT cid, cur, COUNT(*) AS cnt, {_sum("total")} AS total,
                   {_sum("refunded")} AS refunded, {_sum("coupon")} AS coupons,
                   MIN(created_at) AS first_at,
                   MAX(created_at) AS last_at, MIN(day) AS first_day, MAX(day) AS last_day
            FROM t_paid GROUP BY cid, cur
        ) g
        JOIN t_rates r ON r.currency = g.cur
        GROUP BY g.cid
        """,
        {},
        key=True,
    )

    # Product categories: few rows (the catalogue), expanded in Python so the SQL stays
    # portable (no json_each / jsonb_array_elements split).
    work.create(conn, "t_cat", "src VARCHAR, product BIGINT, category VARCHAR")
    cats: list[dict[str, Any]] = []
    for row in conn.execute(
        PRODUCTS.select()
        .with_only_columns(PRODUCTS.c.source, PRODUCTS.c.source_id, PRODUCTS.c.categories)
        .where(PRODUCTS.c.parent_source_id.is_(None))
    ):
        names = row.categories if isinstance(row.categories, list) else []
        for name in dict.fromkeys(n for n in names if isinstance(n, str) and n):
            cats.append({"s": row.source, "p": row.source_id, "c": name})
    if cats:
        conn.execute(text("INSERT INTO t_cat (src, product, category) VALUES (:s, :p, :c)"), cats)

    # Units per customer and product (a variation's line item names its parent product).
    work.create_as(
        conn,
        "t_items",
        f"""
        SELECT p.cid AS cid, p.src AS src, i.product_source_id AS product,
               {_sum("i.quantity")} AS units
        FROM t_paid p JOIN order_items i ON i.order_id = p.oid
        WHERE i.product_source_id IS NOT NULL AND i.product_source_id > 0
        GROUP BY p.cid, p.src, i.product_source_id
        """,
        {},
    )

    work.create_as(
        conn,
        "t_first",
        """
        SELECT cid, attr FROM (
            SELECT cid, attr,
                   ROW_NUMBER() OVER (PARTITION BY cid ORDER BY created_at, oid) AS n
            FROM t_paid
        ) f WHERE n = 1
        """,
        {},
        key=True,
    )

    # The latest cart; open only when newer than the last paid order (or with none).
    work.create_as(
        conn,
        "t_cart",
        f"""
        SELECT c.cid, c.cart_at, {_conv("c.total")} AS value FROM (
            SELECT cid, cur, total, cart_at,
                   ROW_NUMBER() OVER (PARTITION BY cid ORDER BY cart_at DESC, oid DESC) AS n
            FROM t_ord WHERE paid = 0
        ) c
        JOIN t_rates r ON r.currency = c.cur
        LEFT JOIN t_agg a ON a.cid = c.cid
        WHERE c.n = 1 AND (a.last_at IS NULL OR c.cart_at > a.last_at)
        """,
        {},
        key=True,
    )

    work.create_as(
        conn,
        "t_prod",
        "SELECT cid, COUNT(*) AS distinct_products FROM t_items GROUP BY cid",
        {},
        key=True,
    )
    work.create_as(
        conn,
        "t_top",
        f"""
        SELECT cid, category FROM (
            SELECT cid, category,
                   ROW_NUMBER() OVER (PARTITION BY cid ORDER BY units DESC, category) AS n
            FROM (
                SELECT i.cid, c.category, {_sum("i.units")} AS units
                FROM t_items i
                JOIN t_cat c ON c.src = i.src AND c.product = i.product
                GROUP BY i.cid, c.category
            ) u
        ) t WHERE n = 1
        """,
        {},
        key=True,
    )

    work.create(
        conn,
        "t_clv",
        "cid INTEGER PRIMARY KEY, p_alive DOUBLE PRECISION, exp90 DOUBLE PRECISION, "
        "eov BIGINT, clv BIGINT",
    )
    return conv


@dataclass(frozen=True)
class ClvInputs:
    """Each buyer's (x, t_x, T) in days and average repeat-day value (reporting minor units)."""

    customer_id: NDArray[np.int64]
    frequency: NDArray[np.int64]
    recency: NDArray[np.int64]
    age: NDArray[np.int64]
    monetary: NDArray[np.float64]
    avg_order_value: NDArray[np.float64]


def clv_inputs(conn: Connection, as_of_day: int) -> ClvInputs:
    """Read the model inputs from ``t_paid``/``t_agg`` (one row per buyer, by customer id)."""
    rows = conn.execute(
        text(
            """
            SELECT p.cid, COUNT(DISTINCT p.day) AS days, MIN(a.first_day), MAX(a.last_day),
                   CAST(SUM(CASE WHEN p.day = a.first_day THEN 0.0
                            ELSE (p.total - p.refunded) * 1.0 * r.num / r.den END)
                        AS DOUBLE PRECISION) AS repeat_value,
                   CAST(MIN(a.gross - a.refunded) * 1.0 / MIN(a.orders_count)
                        AS DOUBLE PRECISION) AS aov
            FROM t_paid p
            JOIN t_agg a ON a.cid = p.cid
            JOIN t_rates r ON r.currency = p.cur
            GROUP BY p.cid
            ORDER BY p.cid
            """
        )
    ).all()
    if not rows:
        empty_i = np.zeros(0, dtype=np.int64)
        empty_f = np.zeros(0, dtype=np.float64)
        return ClvInputs(empty_i, empty_i, empty_i, empty_i, empty_f, empty_f)
    cid, days, first, last, repeat_value, aov = (np.asarray(col) for col in zip(*rows, strict=True))
    frequency = days.astype(np.int64) - 1
    with np.errstate(divide="ignore", invalid="ignore"):
        monetary = np.where(
            frequency > 0, repeat_value.astype(np.float64) / np.maximum(frequency, 1), 0.0
        )
    return ClvInputs(
        customer_id=cid.astype(np.int64),
        frequency=frequency,
        recency=(last - first).astype(np.int64),
        age=(as_of_day - first.astype(np.int64)),
        monetary=monetary,
        avg_order_value=aov.astype(np.float64),
    )


def write_clv_scores(
    conn: Connection,
    customer_id: NDArray[np.int64],
    p_alive: Sequence[float | None],
    expected_90d: Sequence[float | None],
    order_value: Sequence[int | None],
    clv_12m: Sequence[int | None],
) -> None:
    """Fill ``t_clv`` (COPY on Postgres, executemany on SQLite)."""
    rows = list(zip(customer_id.tolist(), p_alive, expected_90d, order_value, clv_12m, strict=True))
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        raw = conn.connection.dbapi_connection
        assert raw is not None
        copy_sql = "COPY t_clv (cid, p_alive, exp90, eov, clv) FROM STDIN"
        with raw.cursor() as cur, cur.copy(copy_sql) as copy:  # type: ignore[attr-defined]
            for row in rows:
                copy.write_row(row)
        return
    raw = conn.connection.dbapi_connection
    assert raw is not None
    cursor = raw.cursor()
    try:
        cursor.executemany(
            "INSERT INTO t_clv (cid, p_alive, exp90, eov, clv) VALUES (?, ?, ?, ?, ?)", rows
        )
    finally:
        cursor.close()


def rfm_segment_sql() -> str:
    """SQL CASE naming the RFM segment from columns r and f."""
    whens = [
        f"WHEN r = {r} AND f = {f + 1} THEN '{name}'"
        for r, names in RFM_GRID.items()
        for f, name in enumerate(names)
    ]
    return "CASE " + " ".join(whens) + " END"


@dataclass(frozen=True)
class RfmCuts:
    """Where each RFM score steps up, as the last full recompute ranked its buyers.

    A score is ``1 + (5 * (RANK() - 1)) / buyers``: with the buyers' values sorted, the
    score passes k exactly when the value is above the greatest value scored k or less.
    ``r`` holds those values as the day of the last order (R ranks the days since it,
    descending), ``f`` as orders, ``m`` as net revenue (minor units); None where no buyer
    scored k or less. A scoped recompute scores its customers against these, so their
    scores are the ones the full recompute would give them among the other buyers as they
    were then; the next full recompute ranks everyone again.
    """

    r: tuple[int | None, ...]
    f: tuple[int | None, ...]
    m: tuple[int | None, ...]
    buyers: int

    def as_params(self) -> dict[str, Any]:
        return {"r": list(self.r), "f": list(self.f), "m": list(self.m), "buyers": self.buyers}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> RfmCuts:
        return cls(
            tuple(params["r"]), tuple(params["f"]), tuple(params["m"]), int(params["buyers"])
        )


_BELOW_ALL = -(2**62)  # a cut no buyer scored at or under: every value passes it


def rfm_cuts(conn: Connection, as_of_day: int) -> RfmCuts:
    """The cuts of the ranking ``write_profiles`` just made (``t_scored``)."""
    picks = ", ".join(
        f"MAX(CASE WHEN {score} <= {k} THEN {value} END)"
        for score, value in (
            ("r", f"{as_of_day} - days_since"),
            ("f", "orders_count"),
            ("m", "net"),
        )
        for k in range(1, 5)
    )
    row = conn.execute(text(f"SELECT COUNT(*), {picks} FROM t_scored")).one()
    values = [None if v is None else int(v) for v in row[1:]]
    return RfmCuts(tuple(values[0:4]), tuple(values[4:8]), tuple(values[8:12]), int(row[0]))


def _scored_by_rank() -> str:
    return """
        1 + (5 * (RANK() OVER (ORDER BY b.days_since DESC) - 1)) / COUNT(*) OVER () AS r,
        1 + (5 * (RANK() OVER (ORDER BY b.orders_count) - 1)) / COUNT(*) OVER () AS f,
        1 + (5 * (RANK() OVER (ORDER BY b.net) - 1)) / COUNT(*) OVER () AS m"""


def _scored_by_cuts(cuts: RfmCuts, params: dict[str, Any]) -> str:
    """The score columns against ``cuts`` (their values go into ``params``)."""
    columns = []
    for score, value, values in (
        ("r", ":as_of_day - b.days_since", cuts.r),
        ("f", "b.orders_count", cuts.f),
        ("m", "b.net", cuts.m),
    ):
        steps = []
        for k, cut in enumerate(values, start=1):
            params[f"{score}{k}"] = _BELOW_ALL if cut is None else cut
            steps.append(f"CASE WHEN {value} > :{score}{k} THEN 1 ELSE 0 END")
        columns.append(f"1 + {' + '.join(steps)} AS {score}")
    return ",\n".join(columns)


def write_profiles(
    conn: Connection,
    settings: ProfileSettings,
    conv: Conversion,
    as_of: datetime,
    as_of_day: int,
    computed_at: datetime,
    bgnbd_fitted: bool,
    cuts: RfmCuts | None = None,
) -> int:
    """Step 7: replace ``customer_profiles`` with the new rows. Returns the row count.

    With ``cuts`` (a scoped recompute) only the rows of the customers in ``t_scope`` are
    replaced (a customer no longer in ``customers`` loses its row), RFM scored against
    the cuts."""
    dialect = conn.dialect.name
    life = settings.lifecycle
    true, false = ("1", "0") if dialect == "sqlite" else ("TRUE", "FALSE")
    ratio = (
        "(b.days_since * 1.0 / (CASE WHEN b.orders_count >= 2 AND b.avg_gap > :min_rhythm "
        "THEN b.avg_gap WHEN b.orders_count >= 2 THEN :min_rhythm "
        "ELSE :default_rhythm END))"
    )
    p_alive = "COALESCE(v.p_alive, 1.0)" if bgnbd_fitted else "1.0"
    lifecycle = f"""
        CASE WHEN b.cid IS NULL THEN 'prospect'
             WHEN b.orders_count = 1 AND b.days_since <= :new_days THEN 'new'
             WHEN {ratio} > :churned_ratio OR {p_alive} < :churned_p THEN 'churned'
             WHEN {ratio} > :lapsed_ratio OR {p_alive} < :lapsed_p THEN 'lapsed'
             WHEN {ratio} > :at_risk_ratio OR {p_alive} < :at_risk_p THEN 'at_risk'
             ELSE 'active' END
    """
    # RFM: ranks over the buyers (the README's formula), one row per buyer.
    scored_params: dict[str, Any] = {"as_of_day": as_of_day}
    scores = _scored_by_rank() if cuts is None else _scored_by_cuts(cuts, scored_params)
    work.create_as(
        conn,
        "t_scored",
        f"""
        SELECT b.*, {scores}
        FROM (
            SELECT a.cid, a.orders_count, a.gross, a.refunded, a.gross - a.refunded AS net,
                   a.coupons, a.first_at, a.last_at,
                   :as_of_day - a.last_day AS days_since,
                   CASE WHEN a.orders_count >= 2
                        THEN (a.last_day - a.first_day) * 1.0 / (a.orders_count - 1) END
                       AS avg_gap
            FROM t_agg a
        ) b
        """,
        scored_params,
        key=True,
    )
    if cuts is not None:
        scope = " WHERE c.id IN (SELECT cid FROM t_scope)"
        delete = "DELETE FROM customer_profiles WHERE customer_id IN (SELECT cid FROM t_scope)"
    else:
        scope = ""
        delete = (
            "DELETE FROM customer_profiles" if dialect == "sqlite" else "TRUNCATE customer_profiles"
        )
    conn.execute(text(delete))
    params: dict[str, Any] = {
        "as_of": as_of,
        "computed_at": computed_at,
        "currency": conv.currency,
        "new_days": life.new_days,
        "default_rhythm": float(max(life.default_rhythm_days, life.min_rhythm_days)),
        "min_rhythm": float(life.min_rhythm_days),
        "churned_ratio": life.churned_ratio,
        "lapsed_ratio": life.lapsed_ratio,
        "at_risk_ratio": life.at_risk_ratio,
        "churned_p": life.churned_p_alive,
        "lapsed_p": life.lapsed_p_alive,
        "at_risk_p": life.at_risk_p_alive,
    }
    result = conn.execute(
        work.bound(
            f"""
        INSERT INTO customer_profiles (
            customer_id, email, first_name, last_name, country,
            orders_count, gross_revenue_minor, refunded_minor, net_revenue_minor, currency,
            avg_order_value_minor, first_order_at, last_order_at, days_since_last_order,
            avg_days_between_orders, distinct_products, top_category, coupon_order_share,
            acquisition_source, r_score, f_score, m_score, rfm_segment,
            p_alive, expected_orders_90d, expected_order_value_minor, clv_12m_minor,
            lifecycle_stage, has_open_cart, cart_value_minor, cart_updated_at,
            as_of, computed_at
        )
        SELECT c.id, c.email, c.first_name, c.last_name, c.country,
               COALESCE(b.orders_count, 0), COALESCE(b.gross, 0), COALESCE(b.refunded, 0),
               COALESCE(b.net, 0), :currency,
               CASE WHEN b.cid IS NOT NULL THEN {_round_div("b.net", "b.orders_count")} END,
               b.first_at, b.last_at, b.days_since, b.avg_gap,
               COALESCE(pr.distinct_products, 0), top.category,
               CASE WHEN b.cid IS NOT NULL THEN b.coupons * 1.0 / b.orders_count END,
               fi.attr, b.r, b.f, b.m,
               CASE WHEN b.cid IS NOT NULL THEN {rfm_segment_sql()} END,
               v.p_alive, v.exp90,
               CASE WHEN b.cid IS NOT NULL
                    THEN COALESCE(v.eov, {_round_div("b.net", "b.orders_count")}) END,
               v.clv,
               {lifecycle},
               CASE WHEN ca.cid IS NOT NULL THEN {true} ELSE {false} END, ca.value, ca.cart_at,
               :as_of, :computed_at
        FROM customers c
        LEFT JOIN t_scored b ON b.cid = c.id
        LEFT JOIN t_prod pr ON pr.cid = c.id
        LEFT JOIN t_top top ON top.cid = c.id
        LEFT JOIN t_first fi ON fi.cid = c.id
        LEFT JOIN t_cart ca ON ca.cid = c.id
        LEFT JOIN t_clv v ON v.cid = c.id{scope}
        """,
            params,
        ),
        params,
    )
    return int(result.rowcount or 0)
