"""`customer_profiles`: one row per customer, rebuilt with set-based SQL on SQLite and Postgres.

The README's "customer_profiles" section is the definition this file implements.
The work happens in temporary tables on the recompute's connection, so nothing
but the final swap writes to the store. The big tables are read once or twice, in
the order they are stored, and per-customer tables are keyed by customer (see
``work.create_as``):

1. ``t_ref``, ``t_ord``  the refunds per order; the one scan of ``orders``: every live
   order (paid and carts up to as-of, the others), narrow, keyed by order id;
2. ``t_days``  per customer and day, with sums per currency; ``t_agg`` per customer:
   counts, money converted per currency sum, first/last order, purchase days;
3. ``t_items`` units per customer and product; ``t_top`` the top category (``t_cat``,
   ``t_catname``: the catalogue's categories); ``t_prod`` distinct products and the top
   category. In a full recompute they are made on a second connection meanwhile
   (``_ProductsAside``; not on an in-memory SQLite store, which has one);
4. ``t_first`` the first paid order's attribution; ``t_cart`` the latest open cart;
5. ``t_clv``   per buyer: CLV and RFM scores, computed by the caller with numpy from
   ``clv_inputs`` (``rfm_by_rank``, ``write_scores``);
6. ``t_people`` the customers who are not buyers (``_people``: who is a customer), then
   one INSERT … SELECT into ``customer_profiles`` with the lifecycle stage;
7. ``t_consent`` per channel: each person's latest consent statement, written onto the
   profiles (``write_consent``), or the channel's rule or column.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from fractions import Fraction
from typing import Any, cast

import numpy as np
import psycopg
from numpy.typing import NDArray
from sqlalchemy import Connection, CursorResult, Engine, case, false, text, true, update

from syncd.config import (
    CONSENT_CHANNELS,
    DEFAULT_CUSTOMER_ROLES,
    ConsentSettings,
    ProfileSettings,
    Settings,
)
from syncd.money import exponent
from syncd.segments import work
from syncd.segments.rules import compile_rule
from syncd.store.bulk import indexes_built_after
from syncd.store.models import PRODUCTS, PROFILES

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
        # Times are stored as UTC text; unixepoch() (SQLite 3.38) reads it as UTC seconds,
        # twice as fast as strftime('%s'), which older versions fall back to.
        if sqlite3.sqlite_version_info >= (3, 38):
            return f"(unixepoch({column}) / {EPOCH_DAY})"
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


@dataclass(frozen=True)
class Conversion:
    currency: str | None  # the reporting currency; None when there are no orders at all
    factors: dict[str, Fraction]  # order currency -> reporting minor units per minor unit


def conversion(found: list[str], settings: ProfileSettings) -> Conversion:
    """The reporting currency and a factor for every currency in ``found`` (those of the
    counted orders, paid and carts).

    Raises ProfileError when amounts would otherwise be summed across currencies.
    """
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


_IN_SCOPE = "customer_id IN (SELECT cid FROM t_scope)"


def _orders_from(dialect: str, scoped: bool) -> tuple[str, str]:
    """The FROM and the extra condition of a scan of ``orders o``. ``scoped``: only the
    orders of the customers in ``t_scope`` (an index lookup each); otherwise a full
    scan, which SQLite's planner would sometimes trade for the ``created_at`` index and
    a random read per order."""
    if scoped:
        return "orders o", f" AND o.{_IN_SCOPE}"
    return ("orders o NOT INDEXED" if dialect == "sqlite" else "orders o"), ""


# The orders of a customer: a person's, live (not trashed, not deleted).
_LIVE = "o.customer_id IS NOT NULL AND o.deleted_at IS NULL"
# The orders a profile counts: live, created by the as-of instant.
_COUNTED = f"{_LIVE} AND o.created_at <= :as_of"


def _scan_refunds(conn: Connection, as_of: datetime, scoped: bool) -> None:
    """``t_ref``: the refunds per order: its rows in `refunds` up to the as-of instant;
    ``n`` is NULL for an order the refunds stream has no row for at all (it counts its
    own refund total)."""
    refunds_scope = f" AND order_id IN (SELECT id FROM orders WHERE {_IN_SCOPE})" if scoped else ""
    work.create_as(
        conn,
        "t_ref",
        f"""
        SELECT order_id AS oid, COUNT(*) AS n,
               {_sum("CASE WHEN created_at <= :as_of THEN amount_minor ELSE 0 END")} AS dated
        FROM refunds WHERE order_id IS NOT NULL AND deleted_at IS NULL{refunds_scope}
        GROUP BY order_id
        """,
        {"as_of": as_of},
        key="oid",
    )


# ``t_ord.paid``: what an order is to the profile.
PAID, CART, OTHER = 1, 0, 2


def _scan_orders(
    conn: Connection, settings: ProfileSettings, as_of: datetime, scoped: bool
) -> None:
    """``t_ord``: the one scan of ``orders``: every live order, narrow, keyed by order
    id. Up to the as-of instant: paid ones (``paid`` = PAID) with their refunds from
    ``t_ref``, open-cart candidates (CART) with their cart time; the others (OTHER:
    cancelled, failed, ..., or created after as-of) only make their buyer a customer."""
    dialect = conn.dialect.name
    orders, orders_scope = _orders_from(dialect, scoped)
    # A cart's time is its last modification, or its creation when it was modified
    # after as-of. Postgres keeps the attribution for ``t_first`` (see there).
    attr = f", {attribution_sql('o')} AS attr" if dialect == "postgresql" else ""
    work.create_as(
        conn,
        "t_ord",
        f"""
        SELECT o.id AS oid, o.customer_id AS cid, o.source AS src, o.currency AS cur,
               CASE WHEN o.created_at IS NULL OR o.created_at > :as_of THEN {OTHER}
                    WHEN o.status IN :paid THEN {PAID} WHEN o.status IN :carts THEN {CART}
                    ELSE {OTHER} END AS paid,
               o.total_minor AS total,
               CASE WHEN rf.n IS NULL THEN o.refunded_minor ELSE rf.dated END AS refunded,
               o.created_at AS created_at,
               CASE WHEN o.modified_at IS NOT NULL AND o.modified_at <= :as_of
                    THEN o.modified_at ELSE o.created_at END AS cart_at,
               {epoch_day("o.created_at", dialect)} AS day,
               CASE WHEN {_json_list_not_empty("o.coupon_codes", dialect)} THEN 1 ELSE 0 END
                   AS coupon{attr}
        FROM {orders}
        LEFT JOIN t_ref rf ON rf.oid = o.id
        WHERE {_LIVE}{orders_scope}
        """,
        {
            "as_of": as_of,
            "paid": list(settings.paid_statuses),
            # A status both paid and a cart is paid (the CASE tests paid first).
            "carts": list(settings.cart_statuses),
        },
        key="oid",
    )


def attribution_sql(order: str) -> str:
    """SQL for an order's acquisition source from WooCommerce's attribution meta."""
    kind, utm = f"{order}.attribution_source_type", f"{order}.attribution_utm_source"
    return (
        f"CASE WHEN {kind} IS NULL THEN NULL "
        f"WHEN {utm} IS NULL OR {utm} = '(direct)' THEN {kind} "
        f"ELSE {kind} || ':' || {utm} END"
    )


class _Currencies:
    """SQL over the order currencies in use: amounts are summed per currency (columns
    ``<name><i>``) and converted per customer's sum, never summed across currencies."""

    def __init__(self, conv: Conversion) -> None:
        self.codes = sorted(conv.factors)
        self.factors = [conv.factors[code] for code in self.codes]
        self.params: dict[str, Any] = {}
        for i, (code, factor) in enumerate(zip(self.codes, self.factors, strict=True)):
            self.params.update({f"cur{i}": code, f"num{i}": factor.numerator})
            self.params[f"den{i}"] = factor.denominator

    def sums(self, expr: str, name: str) -> str:
        """One summed column per currency (none without orders)."""
        if len(self.codes) == 1:  # every row is in it
            return f", {_sum(expr)} AS {name}0"
        return "".join(
            f", {_sum(f'CASE WHEN cur = :cur{i} THEN {expr} ELSE 0 END')} AS {name}{i}"
            for i in range(len(self.codes))
        )

    def each(self, template: str, name: str, *, summed: bool = True) -> str:
        """One column per currency from ``template`` (with ``{i}``), summed or as is."""
        return "".join(
            f", {_sum(template.format(i=i)) if summed else template.format(i=i)} AS {name}{i}"
            for i in range(len(self.codes))
        )

    def _convert(self, i: int, amount: str) -> str:
        if self.factors[i] == 1:
            return f"({amount})"
        return _round_div(f"({amount}) * CAST(:num{i} AS BIGINT)", f"CAST(:den{i} AS BIGINT)")

    def converted_total(self, column: str) -> str:
        """The sum over currencies of each per-currency ``column<i>`` converted (SQL)."""
        return " + ".join(self._convert(i, f"{column}{i}") for i in range(len(self.codes))) or "0"

    def converted(self, amount: str, cur: str) -> str:
        """``amount`` in currency ``cur`` (a column) converted (SQL)."""
        if not self.codes:  # no orders
            return "CAST(NULL AS BIGINT)"
        if len(self.codes) == 1:
            return self._convert(0, amount)
        whens = " ".join(
            f"WHEN :cur{i} THEN {self._convert(i, amount)}" for i in range(len(self.codes))
        )
        return f"(CASE {cur} {whens} END)"

    def as_float(self, amounts: str) -> str:
        """The float sum over currencies of ``amounts`` (a template with ``{i}``)
        converted, unrounded."""
        terms = [
            f"({amounts.format(i=i)}) * 1.0 * CAST(:num{i} AS BIGINT) / CAST(:den{i} AS BIGINT)"
            for i in range(len(self.codes))
        ]
        return f"CAST({' + '.join(terms) or '0.0'} AS DOUBLE PRECISION)"


def build_work_tables(
    conn: Connection, settings: ProfileSettings, as_of: datetime, *, scoped: bool = False
) -> tuple[Conversion, ProductTables]:
    """Steps 1–5: the per-customer metrics, in temporary tables on ``conn`` (``scoped``: of
    the customers in ``t_scope`` only). Returns the currency conversion in use
    (ProfileError when the currencies cannot be reported) and the product tables, which
    may still be in the making (``ProductTables.wait`` before reading them)."""
    products: ProductTables
    if not scoped and work.sqlite_file(conn) is not None:
        # Both connections must read the same snapshot: nothing commits between their
        # first reads (``t_ref`` is this one's).
        with _commits_held(conn):
            _scan_refunds(conn, as_of, scoped)
            products = _ProductsAside(conn.engine, settings, as_of)
    elif not scoped and conn.dialect.name == "postgresql":
        _scan_refunds(conn, as_of, scoped)
        # The second connection reads the snapshot of this instant (see _ProductsAside).
        snapshot = conn.execute(text("SELECT pg_export_snapshot()")).scalar_one()
        products = _ProductsAside(conn.engine, settings, as_of, snapshot)
    else:
        _scan_refunds(conn, as_of, scoped)
        products = ProductTables()
    try:
        conv = _customer_tables(conn, settings, as_of, scoped, products)
    except BaseException:
        products.cancel()
        raise
    return conv, products


def _customer_tables(
    conn: Connection,
    settings: ProfileSettings,
    as_of: datetime,
    scoped: bool,
    products: ProductTables,
) -> Conversion:
    """``t_ord`` and the per-customer tables from it (``t_prod`` too, unless ``products``
    is making it aside)."""
    _scan_orders(conn, settings, as_of, scoped)
    # The currencies of the orders counted (OTHER ones' amounts are never read).
    pairs = conn.execute(text(f"SELECT DISTINCT src, cur FROM t_ord WHERE paid <> {OTHER}")).all()
    conv = conversion(sorted({cur for _, cur in pairs}), settings)
    money = _Currencies(conv)
    params = money.params

    # Per customer and day: the days count as the CLV model's purchases. Stored in
    # (customer, day) order, so the per-customer sums below read it without a sort.
    work.create_as(
        conn,
        "t_days",
        f"""
        SELECT cid, day, COUNT(*) AS cnt, {_sum("coupon")} AS coupons,
               MIN(created_at) AS first_at, MAX(created_at) AS last_at
               {money.sums("total", "tot")}{money.sums("refunded", "ref")}
        FROM t_ord WHERE paid = {PAID} GROUP BY cid, day
        """,
        params,
        key=("cid", "day"),
    )
    # Per customer; the conversion rounds each currency's sum.
    work.create_as(
        conn,
        "t_agg",
        f"""
        SELECT cid, cnt AS orders_count, {money.converted_total("gross")} AS gross,
               {money.converted_total("refunded")} AS refunded,
               coupons, first_at, last_at, first_day, last_day, days
               {money.each("net{i}", "net", summed=False)}
        FROM (
            SELECT cid, {_sum("cnt")} AS cnt, {_sum("coupons")} AS coupons,
                   MIN(first_at) AS first_at, MAX(last_at) AS last_at,
                   MIN(day) AS first_day, MAX(day) AS last_day, COUNT(*) AS days
                   {money.each("tot{i}", "gross")}{money.each("ref{i}", "refunded")}
                   {money.each("tot{i} - ref{i}", "net")}
            FROM t_days GROUP BY cid
        ) g
        """,
        params,
        key="cid",
    )
    _first_orders(conn, settings, as_of)
    if not isinstance(products, _ProductsAside):
        _product_tables(conn, sorted({src for src, _ in pairs}))

    # The latest cart; open only when newer than the last paid order (or with none).
    work.create_as(
        conn,
        "t_cart",
        f"""
        SELECT c.cid AS cid, c.cart_at AS cart_at, {money.converted("c.total", "c.cur")} AS value
        FROM (
            SELECT cid, cur, total, cart_at,
                   ROW_NUMBER() OVER (PARTITION BY cid ORDER BY cart_at DESC, oid DESC) AS n
            FROM t_ord WHERE paid = {CART}
        ) c
        LEFT JOIN t_agg a ON a.cid = c.cid
        WHERE c.n = 1 AND (a.last_at IS NULL OR c.cart_at > a.last_at)
        """,
        params,
        key="cid",
    )
    work.create(
        conn,
        "t_clv",
        "cid INTEGER, p_alive DOUBLE PRECISION, exp90 DOUBLE PRECISION, "
        "eov BIGINT, clv BIGINT, r INTEGER, f INTEGER, m INTEGER",
        key="cid",
    )
    return conv


def _first_orders(conn: Connection, settings: ProfileSettings, as_of: datetime) -> None:
    """``t_first``: the attribution of each buyer's first paid order (by time, then id).

    SQLite looks each buyer's first order up in the orders' (customer, created_at) index,
    3 s for a million buyers where sorting every paid order takes 8; Postgres pays 15 µs
    for each such lookup and sorts ``t_ord`` instead (4 s)."""
    params: dict[str, Any] = {}
    if conn.dialect.name == "sqlite":
        params = {"as_of": as_of, "paid": list(settings.paid_statuses)}
        select_sql = f"""
            SELECT a.cid AS cid, (
                SELECT {attribution_sql("o")} FROM orders o
                WHERE o.customer_id = a.cid AND o.deleted_at IS NULL
                  AND o.created_at <= :as_of AND o.status IN :paid
                ORDER BY o.created_at, o.id LIMIT 1
            ) AS attr
            FROM t_agg a
        """
    else:
        select_sql = f"""
            SELECT cid, attr FROM (
                SELECT cid, attr,
                       ROW_NUMBER() OVER (PARTITION BY cid ORDER BY created_at, oid) AS n
                FROM t_ord WHERE paid = {PAID}
            ) f WHERE n = 1
        """
    work.create_as(conn, "t_first", select_sql, params, key="cid")


class ProductTables:
    """``t_prod`` on the recompute's connection: made there already."""

    def wait(self, conn: Connection) -> None:
        """Have the tables on ``conn`` (raises what making them raised)."""

    def cancel(self) -> None:
        """Stop making them, if that is still going on (the recompute failed)."""


class _ProductsAside(ProductTables):
    """The product tables made on a second connection, in a thread, while the recompute's
    connection works through the orders: each connection runs one statement at a time,
    so the line items take the second core. At a million customers that is 30 s of
    SQLite work that saved 5–8 s on the 2-vCPU CI machine (whose second vCPU adds about
    half of one), and 35 s of Postgres work that saved 24–30 s (the server runs each
    connection in a process of its own; it makes no parallel plan over temp tables).
    The thread's connection starts reading (its snapshot) before this returns; ``wait``
    copies ``t_prod`` over.

    On SQLite nothing commits meanwhile (``_commits_held``), so both read one snapshot.
    On Postgres the thread imports ``snapshot``, exported by the recompute's connection
    just before its scan of the orders; that connection reads at READ COMMITTED, so an
    order committed in the instant between the two counts in the money figures and,
    until the next recompute, not in the product figures.
    """

    def __init__(
        self,
        engine: Engine,
        settings: ProfileSettings,
        as_of: datetime,
        snapshot: str | None = None,
    ) -> None:
        self._reading = threading.Event()
        self._dbapi: Any = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="syncd-products")
        self._result = self._pool.submit(self._make, engine, settings, as_of, snapshot)
        self._reading.wait()

    def _make(
        self, engine: Engine, settings: ProfileSettings, as_of: datetime, snapshot: str | None
    ) -> Connection | list[Any]:
        """``t_prod``: its rows from SQLite, read here while the recompute's connection
        works on; a Postgres connection with the table on it, left open for ``wait``
        to copy the table from, server to server."""
        try:
            conn = engine.connect()
            try:
                self._dbapi = conn.connection.dbapi_connection
                if snapshot is None:
                    conn.exec_driver_sql("BEGIN")
                    conn.execute(text("SELECT 1 FROM orders LIMIT 1"))  # the snapshot
                else:
                    # An id the server made ("00000003-0000001B-1"); a utility statement
                    # takes no bound parameter.
                    if not _SNAPSHOT_ID.fullmatch(snapshot):
                        raise ValueError(f"unexpected snapshot id {snapshot!r}")
                    conn = conn.execution_options(isolation_level="REPEATABLE READ")
                    conn.exec_driver_sql(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
            except BaseException:
                conn.close()
                raise
        finally:
            self._reading.set()
        try:
            _paid_orders(conn, settings, as_of)
            sources = conn.execute(text("SELECT DISTINCT src FROM t_ord")).scalars()
            _product_tables(conn, sorted(sources))
            if conn.dialect.name == "postgresql":
                return conn
            rows = _tuples(conn.exec_driver_sql(f"SELECT {', '.join(_PROD)} FROM t_prod"))
        except BaseException:
            _close_work(conn)
            raise
        _close_work(conn)
        return rows

    def wait(self, conn: Connection) -> None:
        made = self._result.result()
        self._pool.shutdown()
        work.create(conn, "t_prod", _PROD_COLUMNS, key="cid")
        if isinstance(made, list):
            _insert_rows(conn, "t_prod", _PROD, made)
        else:
            try:
                _copy_rows(made, conn, "t_prod", _PROD)
            finally:
                _close_work(made)
        work.analyze(conn, "t_prod")

    def cancel(self) -> None:
        if not self._result.done() and self._dbapi is not None:
            # Thread-safe: the running statement fails at once. The connection may have
            # been closed since the check, which is as good.
            with contextlib.suppress(sqlite3.ProgrammingError, psycopg.Error):
                if isinstance(self._dbapi, sqlite3.Connection):
                    self._dbapi.interrupt()
                else:
                    self._dbapi.cancel()
        self._pool.shutdown()
        if self._result.exception() is None:
            made = self._result.result()
            if isinstance(made, Connection) and not made.closed:  # made, never copied
                _close_work(made)


def _close_work(conn: Connection) -> None:
    """End a work connection: its transaction, its work tables, and the connection."""
    try:
        conn.rollback()
        work.drop_all(conn)
    finally:
        conn.close()


def _copy_rows(source: Connection, target: Connection, table: str, columns: Sequence[str]) -> None:
    """Copy a Postgres work table from one connection to another, COPY to COPY in the
    server's text format: no Python object per row or value."""
    names = ", ".join(columns)
    out_raw = cast(psycopg.Connection[Any], source.connection.dbapi_connection)
    in_raw = cast(psycopg.Connection[Any], target.connection.dbapi_connection)
    with (
        out_raw.cursor() as out_cur,
        in_raw.cursor() as in_cur,
        out_cur.copy(f"COPY {table} ({names}) TO STDOUT") as out,
        in_cur.copy(f"COPY {table} ({names}) FROM STDIN") as into,
    ):
        for block in out:
            into.write(block)


_PROD = ("cid", "distinct_products", "category")
_PROD_COLUMNS = "cid INTEGER, distinct_products INTEGER, category VARCHAR"
_SNAPSHOT_ID = re.compile(r"[0-9A-F]+(-[0-9A-F]+)+")


def _tuples(result: CursorResult[Any]) -> list[Any]:
    """The rows as the driver's plain tuples, lighter than SQLAlchemy's rows by the
    million."""
    return list(result.cursor.fetchall()) if result.cursor is not None else []


@contextmanager
def _commits_held(conn: Connection) -> Iterator[None]:
    """No connection, of any process, commits to the SQLite file store of ``conn`` while
    this holds its write lock (a connection of its own, which writes nothing)."""
    path = work.sqlite_file(conn)
    assert path is not None
    holder = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        yield
    finally:
        holder.close()  # rolls back


def _paid_orders(conn: Connection, settings: ProfileSettings, as_of: datetime) -> None:
    """``t_ord`` with only what the product tables read: the paid orders' ids, customers
    and sources (the same orders as ``_scan_orders`` marks paid)."""
    orders, _ = _orders_from(conn.dialect.name, scoped=False)
    work.create_as(
        conn,
        "t_ord",
        f"""
        SELECT o.id AS oid, o.customer_id AS cid, o.source AS src, {PAID} AS paid
        FROM {orders} WHERE {_COUNTED} AND o.status IN :paid
        """,
        {"as_of": as_of, "paid": list(settings.paid_statuses)},
        key="oid",
    )


def _product_tables(conn: Connection, sources: list[str]) -> None:
    """``t_items`` (units per customer and product; a variation's line item names its
    parent product), ``t_top`` (the top category) and ``t_prod`` (distinct products and
    the top category: what the profiles read).

    With one source the product id alone says which product (grouping on the source's
    name too cost 4 s at a million customers). ``t_items`` has no key: building it keyed
    costs more (2 s) than the sort it would spare ``t_prod``."""
    src = "i.src" if len(sources) > 1 else ":src0"
    params: dict[str, Any] = {"src0": sources[0] if sources else ""}
    work.create_as(
        conn,
        "t_items",
        f"""
        SELECT p.cid AS cid, {"p.src AS src, " if len(sources) > 1 else ""}
               i.product_source_id AS product, {_sum("i.quantity")} AS units
        FROM t_ord p JOIN order_items i ON i.order_id = p.oid
        WHERE p.paid = {PAID} AND i.product_source_id IS NOT NULL AND i.product_source_id > 0
        GROUP BY p.cid, {"p.src, " if len(sources) > 1 else ""}i.product_source_id
        """,
        {},
    )
    # Product categories: few rows (the catalogue), expanded in Python so the SQL stays
    # portable (no json_each / jsonb_array_elements split). Each category is a position
    # in name order (code points), so the top one is a MAX over integers.
    by_product: dict[tuple[str, int], list[str]] = {}
    for row in conn.execute(
        PRODUCTS.select()
        .with_only_columns(PRODUCTS.c.source, PRODUCTS.c.source_id, PRODUCTS.c.categories)
        .where(PRODUCTS.c.parent_source_id.is_(None))
    ):
        names = row.categories if isinstance(row.categories, list) else []
        found = [n for n in dict.fromkeys(names) if isinstance(n, str) and n]
        if found:
            by_product[(row.source, row.source_id)] = found
    names = sorted({name for found in by_product.values() for name in found})
    position = {name: pos for pos, name in enumerate(names)}
    work.create(conn, "t_catname", "pos INTEGER PRIMARY KEY, name VARCHAR")
    work.create(
        conn, "t_cat", "product BIGINT, src VARCHAR, pos INTEGER, PRIMARY KEY (product, src, pos)"
    )
    if names:
        conn.execute(
            text("INSERT INTO t_catname (pos, name) VALUES (:p, :n)"),
            [{"p": pos, "n": name} for pos, name in enumerate(names)],
        )
        conn.execute(
            text("INSERT INTO t_cat (product, src, pos) VALUES (:p, :s, :c)"),
            [
                {"p": product, "s": source, "c": position[name]}
                for (source, product), found in sorted(by_product.items())
                for name in found
            ],
        )
    # The most units, then the first name: the greatest units × n + (n − 1 − position).
    # The name is joined here: joined in the profile insert, the unanalyzed t_catname
    # made Postgres scan every customer in a scoped recompute (1 s instead of 0.01 s).
    n = max(len(names), 1)
    work.create_as(
        conn,
        "t_top",
        f"""
        SELECT t.cid AS cid, n.name AS category
        FROM (
            SELECT cid, {n - 1} - MAX(units * {n} + {n - 1} - pos) % {n} AS pos
            FROM (
                SELECT i.cid AS cid, c.pos AS pos, {_sum("i.units")} AS units
                FROM t_items i JOIN t_cat c ON c.product = i.product AND c.src = {src}
                GROUP BY i.cid, c.pos
            ) u
            GROUP BY cid
        ) t
        JOIN t_catname n ON n.pos = t.pos
        """,
        params,
        key="cid",
    )
    work.create_as(
        conn,
        "t_prod",
        """
        SELECT d.cid AS cid, d.distinct_products AS distinct_products, t.category AS category
        FROM (SELECT cid, COUNT(*) AS distinct_products FROM t_items GROUP BY cid) d
        LEFT JOIN t_top t ON t.cid = d.cid
        """,
        {},
        key="cid",
    )


@dataclass(frozen=True)
class ClvInputs:
    """Each buyer's (x, t_x, T) in days, average repeat-day value and average order value
    (reporting minor units), and the RFM measures, by customer id."""

    customer_id: NDArray[np.int64]
    frequency: NDArray[np.int64]
    recency: NDArray[np.int64]
    age: NDArray[np.int64]
    monetary: NDArray[np.float64]
    avg_order_value: NDArray[np.float64]
    days_since: NDArray[np.int64]
    orders_count: NDArray[np.int64]
    net: NDArray[np.int64]


def clv_inputs(conn: Connection, conv: Conversion, as_of_day: int) -> ClvInputs:
    """Read the buyers' model inputs from ``t_agg`` and their first day in ``t_days``."""
    money = _Currencies(conv)
    first_day_net = money.as_float("a.net{i} - (d.tot{i} - d.ref{i})")
    statement = work.bound(
        f"""
        SELECT a.cid, a.days, a.first_day, a.last_day, a.orders_count,
               a.gross - a.refunded AS net, {first_day_net} AS repeat_value
        FROM t_agg a JOIN t_days d ON d.cid = a.cid AND d.day = a.first_day
        ORDER BY a.cid
        """,
        money.params,
    )
    # Plain tuples straight into one float array (every integer here is far below 2**53):
    # SQLAlchemy rows and a per-column conversion took twice as long at a million buyers.
    table = np.array(_tuples(conn.execute(statement, money.params)), dtype=np.float64)
    table = table.reshape(-1, 7)
    cid, days, first, last, orders, net = (table[:, i].astype(np.int64) for i in range(6))
    repeat_value = table[:, 6]
    frequency = days - 1
    return ClvInputs(
        customer_id=cid,
        frequency=frequency,
        recency=last - first,
        age=as_of_day - first,
        monetary=np.where(frequency > 0, repeat_value / np.maximum(frequency, 1), 0.0),
        avg_order_value=net / np.maximum(orders, 1),
        days_since=as_of_day - last,
        orders_count=orders,
        net=net,
    )


def write_scores(
    conn: Connection,
    customer_id: NDArray[np.int64],
    rfm: tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]],
    p_alive: Sequence[float | None],
    expected_90d: Sequence[float | None],
    order_value: Sequence[int | None],
    clv_12m: Sequence[int | None],
) -> None:
    """Fill ``t_clv`` with the buyers' model scores and RFM scores."""
    r, f, m = (s.tolist() for s in rfm)
    rows = list(
        zip(customer_id.tolist(), p_alive, expected_90d, order_value, clv_12m, r, f, m, strict=True)
    )
    columns = ("cid", "p_alive", "exp90", "eov", "clv", "r", "f", "m")
    _insert_rows(conn, "t_clv", columns, rows)
    work.analyze(conn, "t_clv")


def _insert_rows(
    conn: Connection, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
) -> None:
    """Bulk-insert plain rows into a work table: COPY on Postgres, executemany on SQLite
    (both straight on the driver: no SQLAlchemy row per row)."""
    if not rows:
        return
    raw = conn.connection.dbapi_connection
    assert raw is not None
    names = ", ".join(columns)
    if conn.dialect.name == "postgresql":
        copy_sql = f"COPY {table} ({names}) FROM STDIN"
        with raw.cursor() as cur, cur.copy(copy_sql) as copy:  # type: ignore[attr-defined]
            for row in rows:
                copy.write_row(row)
        return
    cursor = raw.cursor()
    try:
        marks = ", ".join("?" for _ in columns)
        cursor.executemany(f"INSERT INTO {table} ({names}) VALUES ({marks})", rows)
    finally:
        cursor.close()


def rfm_segment_sql() -> str:
    """SQL CASE naming the RFM segment from columns r and f of ``t_clv v``."""
    whens = [
        f"WHEN v.r = {r} AND v.f = {f + 1} THEN '{name}'"
        for r, names in RFM_GRID.items()
        for f, name in enumerate(names)
    ]
    return "CASE " + " ".join(whens) + " END"


@dataclass(frozen=True)
class RfmCuts:
    """Where each RFM score steps up, as the last full recompute ranked its buyers.

    A score is ``1 + (5 * (rank - 1)) // buyers``: with the buyers' values sorted, the
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


Scores = tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]


def _rfm_measures(inputs: ClvInputs, as_of_day: int) -> Scores:
    """Each measure as a value where more is better: the last order's day, orders, net."""
    return as_of_day - inputs.days_since, inputs.orders_count, inputs.net


def rfm_by_rank(inputs: ClvInputs, as_of_day: int) -> tuple[Scores, RfmCuts]:
    """The README's scores: ``1 + floor(5 × (rank − 1) ÷ N)``, rank = 1 + the number of
    buyers strictly worse; and the cuts they make (see RfmCuts)."""
    n = len(inputs.customer_id)
    scores = []
    cuts: list[tuple[int | None, ...]] = []
    for value in _rfm_measures(inputs, as_of_day):
        ordered = np.sort(value)
        worse = np.searchsorted(ordered, value, side="left")  # strictly smaller values
        score = (1 + (5 * worse) // max(n, 1)).astype(np.int64)
        scores.append(score)
        cuts.append(
            tuple(
                int(value[score <= k].max()) if bool((score <= k).any()) else None
                for k in range(1, 5)
            )
        )
    return (scores[0], scores[1], scores[2]), RfmCuts(cuts[0], cuts[1], cuts[2], n)


def rfm_by_cuts(inputs: ClvInputs, as_of_day: int, cuts: RfmCuts) -> Scores:
    """The scores against an earlier full recompute's cuts (a scoped recompute)."""
    scores = []
    measures = _rfm_measures(inputs, as_of_day)
    for value, steps in zip(measures, (cuts.r, cuts.f, cuts.m), strict=True):
        score = np.ones(len(value), dtype=np.int64)
        for cut in steps:
            if cut is None:  # no buyer scored this low: every value passes
                score += 1
            else:
                score += (value > cut).astype(np.int64)
        scores.append(score)
    return scores[0], scores[1], scores[2]


def customer_roles(settings: Settings) -> dict[str, list[str]]:
    """Each configured source's ``customer_roles``: the accounts that are customers
    without an order (see ``_people``)."""
    return {name: list(source.customer_roles) for name, source in settings.sources.items()}


def _people(conn: Connection, roles: Mapping[str, Sequence[str]], scoped: bool) -> None:
    """``t_people``: the customers besides the buyers (``t_agg``): people with a live
    order that is not paid (a cart, a cancelled or failed order) and people with a live
    account in one of its source's customer roles (``roles``; a source no longer
    configured keeps the default). Nobody else is a customer: a staff account that never
    ordered, a person known only through trashed or deleted orders (their rows stay in
    the store for the record)."""
    params: dict[str, Any] = {}
    accepted = []
    for i, (source, names) in enumerate(sorted(roles.items())):
        if names:
            accepted.append(f"(r.source = :role_src{i} AND r.role IN :roles{i})")
            params.update({f"role_src{i}": source, f"roles{i}": list(names)})
    unconfigured = ""
    if roles:
        unconfigured = " AND r.source NOT IN :role_srcs"
        params["role_srcs"] = sorted(roles)
    accepted.append(f"(r.role IN :default_roles{unconfigured})")
    params["default_roles"] = list(DEFAULT_CUSTOMER_ROLES)
    scope = f" AND r.{_IN_SCOPE}" if scoped else ""
    work.create_as(
        conn,
        "t_people",
        f"""
        SELECT cid FROM t_ord WHERE paid <> {PAID}
        UNION
        SELECT r.customer_id AS cid FROM customer_records r
        WHERE r.deleted_at IS NULL AND ({" OR ".join(accepted)}){scope}
        """,
        params,
        key="cid",
    )


def write_profiles(
    conn: Connection,
    settings: ProfileSettings,
    conv: Conversion,
    as_of: datetime,
    as_of_day: int,
    computed_at: datetime,
    bgnbd_fitted: bool,
    *,
    scoped: bool = False,
    roles: Mapping[str, Sequence[str]],
) -> int:
    """Step 7: replace ``customer_profiles`` with the new rows. Returns the row count.

    A row is written for each customer: a buyer, or one of ``t_people`` (``roles``: each
    source's customer roles, see ``customer_roles``). ``scoped``: only the rows of the
    customers in ``t_scope`` are replaced (one who is no longer a customer, or no longer
    in ``customers``, loses its row)."""
    _people(conn, roles, scoped)
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
    if scoped:
        scope = " AND c.id IN (SELECT cid FROM t_scope)"
        delete = "DELETE FROM customer_profiles WHERE customer_id IN (SELECT cid FROM t_scope)"
    else:
        scope = ""
        delete = (
            "DELETE FROM customer_profiles" if dialect == "sqlite" else "TRUNCATE customer_profiles"
        )
    conn.execute(text(delete))
    params: dict[str, Any] = {
        "as_of": as_of,
        "as_of_day": as_of_day,
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
    # A full write follows a TRUNCATE, which holds the table locked until the commit: its
    # key is then built once after the rows (Postgres) rather than row by row.
    with contextlib.nullcontext() if scoped else indexes_built_after(conn, "customer_profiles"):
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
                   COALESCE(pr.distinct_products, 0), pr.category,
                   CASE WHEN b.cid IS NOT NULL THEN b.coupons * 1.0 / b.orders_count END,
                   fi.attr,
                   v.r, v.f, v.m,
                   CASE WHEN b.cid IS NOT NULL THEN {rfm_segment_sql()} END,
                   v.p_alive, v.exp90,
                   CASE WHEN b.cid IS NOT NULL
                        THEN COALESCE(v.eov, {_round_div("b.net", "b.orders_count")}) END,
                   v.clv,
                   {lifecycle},
                   CASE WHEN ca.cid IS NOT NULL THEN {true} ELSE {false} END, ca.value, ca.cart_at,
                   :as_of, :computed_at
            FROM customers c
            LEFT JOIN (
                SELECT a.cid, a.orders_count, a.gross, a.refunded, a.gross - a.refunded AS net,
                       a.coupons, a.first_at, a.last_at,
                       :as_of_day - a.last_day AS days_since,
                       CASE WHEN a.orders_count >= 2
                            THEN (a.last_day - a.first_day) * 1.0 / (a.orders_count - 1) END
                           AS avg_gap
                FROM t_agg a
            ) b ON b.cid = c.id
            LEFT JOIN t_first fi ON fi.cid = c.id
            LEFT JOIN t_prod pr ON pr.cid = c.id
            LEFT JOIN t_cart ca ON ca.cid = c.id
            LEFT JOIN t_clv v ON v.cid = c.id
            LEFT JOIN t_people q ON q.cid = c.id
            WHERE (b.cid IS NOT NULL OR q.cid IS NOT NULL){scope}
            """,
                params,
            ),
            params,
        )
    return int(result.rowcount or 0)


def write_consent(
    conn: Connection, settings: ConsentSettings, as_of: datetime, *, scoped: bool = False
) -> None:
    """Step 8: ``consent_<channel>``, ``_at`` and ``_source`` of the profiles just written.

    A channel read from meta keys takes each person's latest statement up to ``as_of``
    (a withdrawal and a grant stated at the same instant: the withdrawal wins, the safe
    reading); nobody without a statement consents. A channel with a ``rule`` is the rule
    over the profile, one with a ``column`` that boolean column, both stated at ``as_of``.
    """
    in_scope = " AND s.customer_id IN (SELECT cid FROM t_scope)" if scoped else ""
    for channel in CONSENT_CHANNELS:
        rules = settings.channel(channel)
        given, at, source = (PROFILES.c[f"consent_{channel}{s}"] for s in ("", "_at", "_source"))
        scope = [PROFILES.c.customer_id.in_(text("SELECT cid FROM t_scope"))] if scoped else []
        if rules.rule is not None or rules.column is not None:
            condition = (
                compile_rule(rules.rule, PROFILES, now=as_of)
                if rules.rule is not None
                else PROFILES.c[str(rules.column)].is_(True)
            )
            conn.execute(
                update(PROFILES)
                .where(*scope)
                .values(
                    {
                        given: case((condition, true()), else_=false()),
                        at: as_of,
                        source: rules.describe(),
                    }
                )
            )
            continue
        work.create_as(
            conn,
            "t_consent",
            f"""
            SELECT cid, granted, stated_at, source FROM (
                SELECT s.customer_id AS cid, s.granted, s.stated_at, s.source,
                       ROW_NUMBER() OVER (
                           PARTITION BY s.customer_id
                           ORDER BY s.stated_at DESC, s.granted ASC, s.id DESC
                       ) AS n
                FROM consent_statements s
                WHERE s.channel = :channel AND s.stated_at <= :as_of{in_scope}
            ) latest WHERE n = 1
            """,
            {"channel": channel, "as_of": as_of},
            key="cid",
        )
        work.analyze(conn, "t_consent")
        conn.execute(
            text(
                f"""
                UPDATE customer_profiles SET consent_{channel} = t.granted,
                    consent_{channel}_at = t.stated_at, consent_{channel}_source = t.source
                FROM t_consent t WHERE t.cid = customer_profiles.customer_id
                """
            )
        )
