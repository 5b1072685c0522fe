"""Segment recompute benchmark: profiles, RFM, CLV and ten rule segments at scale.

Run ``python benchmarks/segments.py``. Generating and loading the full size takes about
6 minutes on a 2-core machine (11 s numpy, ~3.3 min SQLite, ~2.2 min Postgres); then the
recompute runs once per store. It prints figures and never asserts: each target is shown
with PASS or FAIL next to the measurement.

1. Generation. A deterministic shop (fixed seed) of 1,000,000 customers and 5,000,000
   orders over three years ending at ``AS_OF`` (2026-06-30 12:00 UTC) is generated with
   numpy and written straight into the store's tables (``customers``, ``customer_records``
   (the registered accounts, role ``customer``), ``orders``, ``order_items``, ``refunds``,
   ``products``), not through the API. The schema is the
   one syncd's migrations make. SQLite: ``executemany`` in one transaction per table,
   journal and fsync off for the load, the plain indexes dropped and recreated after
   (faster than maintaining them: 195 s against 234 s), then ``ANALYZE``. Postgres:
   binary ``COPY ... FROM STDIN`` on the engine's raw psycopg connection, each block of
   rows built by numpy (no Python per value), with keys, foreign keys and indexes dropped
   for the load and restored after with their exact definitions (about twice as fast as
   loading with them in place), then ``VACUUM ANALYZE`` (so autovacuum does not start
   during the timed run).
   Shape: ~7 % prospects (accounts without orders); per buyer 1 + a gamma-mixed Poisson
   (negative binomial) number of further orders, scaled to the exact total, so about half
   of the buyers buy once (p99 ~40 orders, the heaviest 150+); repeat orders spread over
   a per-customer active period after the first order (so some customers lapse); statuses
   mostly completed, some processing/on-hold/cancelled/failed/refunded, and carts
   (``pending``, ``checkout-draft``), mostly recent; ~5 % of paid orders partially
   refunded and every ``refunded`` order fully refunded (rows in ``refunds``); 1-3 items
   per order on 200 products (160 products, 20 of them variable with 2 variations each;
   1-2 of 15 categories each, a per-customer favourite category); coupons on ~20 % of
   orders (per-customer propensity); WooCommerce order attribution on ~50 %; one
   currency (EUR). ``raw`` columns are NULL.

2. Recompute. For each store, in a fresh child process (launched through ``/bin/sh``, so
   ``ru_maxrss`` is the child's own and the generation's memory does not count):
   ``recompute(engine, settings, now=AS_OF)`` with ten rule segments. The derived tables
   (``customer_profiles``, ``segment_memberships``, ``model_fits``, the segment runs in
   ``sync_runs``) are emptied first, untimed, so every run is a first recompute
   (``--no-reset`` keeps them: a repeat recompute). Printed: wall time, the recompute's
   own per-step ``timings``, segment sizes, and peak RSS: the child's RSS high-water mark
   (``VmHWM``, checked against ``ru_maxrss``) minus its RSS just before the call (after
   imports and opening the store). Postgres' own server memory is not counted.
   Targets: recompute <= 60 s on each store, peak RSS delta <= 2 GB, CLV fit <= 10 s
   (the ``timings`` steps whose name contains "fit").

``--keep`` keeps the generated stores; ``--reuse`` then re-runs the recompute on them
without generating again. ``--generate-only`` stops after the load and its checks.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import multiprocessing
import operator
import os
import resource
import signal
import sqlite3
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import numpy as np
import psycopg
from _common import (
    BenchmarkError,
    die_with_parent,
    heading,
    num,
    print_table,
    run_script_child,
    verdict,
)
from psycopg.copy import QueuedLibpqWriter
from sqlalchemy import Engine, inspect, make_url, text

from syncd.log import configure_logging
from syncd.store.engine import open_store

AS_OF = datetime(2026, 6, 30, 12, 0, tzinfo=UTC)
AS_OF_S = int(AS_OF.timestamp())
DAY = 86_400
HISTORY_DAYS = 3 * 365
SOURCE = "woocommerce"
CURRENCY = "EUR"
SEED = 20260630
DEFAULT_CUSTOMERS = 1_000_000
DEFAULT_ORDERS = 5_000_000
DEFAULT_SQLITE_PATH = Path(tempfile.gettempdir()) / "syncd-bench-segments.db"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/syncd_bench_segments"
CHUNK_ROWS = 250_000  # rows per executemany
PG_CHUNK_ROWS = 100_000  # rows per binary COPY block
CHILD_TIMEOUT = 1800.0

TARGET_RECOMPUTE_S = 60.0
TARGET_PEAK_MB = 2048.0
TARGET_FIT_S = 10.0

# The ten rule segments of the recompute (names as in a config's [segments.<name>]).
SEGMENTS: dict[str, str] = {
    "champions": "rfm_segment = 'champions'",
    "at_risk_or_lapsed": "lifecycle_stage in ('at_risk', 'lapsed')",
    "open_cart_50": "has_open_cart and cart_value_minor >= 5000",
    "big_spenders": "net_revenue_minor > 100000",
    "dormant_180d": "last_order_at < now() - 180d",
    "fading_repeat": "p_alive < 0.3 and orders_count >= 2",
    "germany": "country = 'DE'",
    "clv_mid": "clv_12m_minor between 5000 and 50000",
    "shoe_lovers": "top_category = 'Shoes'",
    "coupon_hunters": "coupon_order_share >= 0.5",
}

# ---------------------------------------------------------------------------
# Vocabularies of the generated shop
# ---------------------------------------------------------------------------

CATEGORIES = [
    "Shoes", "Shirts", "Trousers", "Dresses", "Jackets", "Knitwear", "Sportswear",
    "Underwear", "Socks", "Bags", "Accessories", "Jewellery", "Beauty", "Home", "Kids",
]  # fmt: skip
CATEGORY_WEIGHTS = [14, 12, 9, 8, 7, 6, 7, 5, 5, 6, 6, 3, 5, 4, 3]
COUNTRIES = {  # country: (weight, cities)
    "DE": (36, ["Berlin", "Hamburg", "München", "Köln", "Leipzig"]),
    "AT": (10, ["Wien", "Graz", "Linz"]),
    "CH": (6, ["Zürich", "Basel", "Bern"]),
    "FR": (9, ["Paris", "Lyon", "Lille"]),
    "NL": (8, ["Amsterdam", "Utrecht", "Rotterdam"]),
    "BE": (5, ["Bruxelles", "Antwerpen"]),
    "IT": (7, ["Milano", "Roma", "Torino"]),
    "ES": (6, ["Madrid", "Barcelona", "Valencia"]),
    "PL": (5, ["Warszawa", "Kraków"]),
    "SE": (3, ["Stockholm", "Göteborg"]),
    "DK": (2, ["København", "Aarhus"]),
    "GB": (3, ["London", "Manchester"]),
}
FIRST_NAMES = [
    "Anna", "Ben", "Clara", "David", "Emma", "Felix", "Greta", "Hannah", "Jonas", "Julia",
    "Lena", "Leon", "Lukas", "Marie", "Max", "Mia", "Noah", "Paul", "Sophie", "Tom",
]  # fmt: skip
LAST_NAMES = [
    "Müller", "Schmidt", "Schneider", "Fischer", "Weber", "Meyer", "Wagner", "Becker",
    "Schulz", "Hoffmann", "Dubois", "Martin", "Rossi", "García", "de Vries", "Nowak",
]  # fmt: skip
# status: probability of the generated status before the age adjustments below
STATUSES = [
    "completed", "processing", "on-hold", "cancelled", "refunded", "failed", "pending",
    "checkout-draft",
]  # fmt: skip
STATUS_P = [0.82, 0.04, 0.01, 0.02, 0.02, 0.03, 0.03, 0.03]
PAID = ("completed", "processing")  # syncd's default profiles.paid_statuses
CARTS = ("pending", "checkout-draft")  # syncd's default profiles.cart_statuses
COUPON_SETS = [
    ["WELCOME10"], ["SUMMER20"], ["WINTER15"], ["NEWSLETTER5"], ["BLACKFRIDAY"],
    ["VIP25"], ["FREESHIP"], ["BIRTHDAY"], ["SPRING10"], ["COMEBACK15"], ["APP5"],
    ["STUDENT10"], ["FREESHIP", "WELCOME10"], ["FREESHIP", "VIP25"],
]  # fmt: skip
COUPON_P = [0.2, 0.12, 0.1, 0.1, 0.1, 0.05, 0.08, 0.05, 0.05, 0.05, 0.03, 0.03, 0.03, 0.01]
ATTRIBUTIONS: list[tuple[str, str | None]] = [
    ("organic", "google"), ("organic", "bing"), ("organic", "duckduckgo"),
    ("utm", "google"), ("utm", "facebook"), ("utm", "instagram"), ("utm", "newsletter"),
    ("referral", "instagram.com"), ("referral", "blog.example.org"),
    ("typein", None), ("admin", None),
]  # fmt: skip
ATTRIBUTION_P = [0.28, 0.04, 0.02, 0.14, 0.08, 0.06, 0.04, 0.05, 0.04, 0.20, 0.05]
PAYMENT_METHODS = ["stripe", "paypal", "bacs", "klarna"]
PAYMENT_P = [0.45, 0.35, 0.1, 0.1]
REFUND_REASONS: list[str | None] = [None, "Damaged", "Wrong size", "Changed mind"]


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Columns: numpy data, written as Python values (SQLite) or COPY text (Postgres)
# ---------------------------------------------------------------------------

NULL_TS = -1  # a "ts" column's NULL


@dataclass
class Col:
    """One column of a generated table.

    kind: "int" (int array, ``null`` mask), "ts" (epoch seconds, NULL_TS for NULL),
    "cat" (int codes into ``vocab``, whose entries may be None), "str" (a list of str or
    None), "const" (``data`` for every row).
    """

    name: str
    kind: str
    data: Any
    vocab: Sequence[str | None] | None = None
    null: np.ndarray | None = None


@dataclass
class TableData:
    name: str
    rows: int
    columns: list[Col]


class SqliteRows:
    """Python values for ``executemany``: timestamps as the naive UTC text SQLAlchemy writes
    (``YYYY-MM-DD HH:MM:SS.ffffff``), built from day and time-of-day lookup tables."""

    def __init__(self) -> None:
        self.day0 = (AS_OF_S - (HISTORY_DAYS + 400) * DAY) // DAY
        days = np.arange(self.day0, AS_OF_S // DAY + 2).astype("datetime64[D]")
        self.days: list[str] = np.datetime_as_string(days).tolist()
        self.tods = [f" {s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}.000000" for s in range(DAY)]

    def column(self, col: Col, lo: int, hi: int) -> list[Any]:
        if col.kind == "str":
            values: list[Any] = col.data[lo:hi]
            return values
        if col.kind == "cat":
            assert col.vocab is not None
            return list(map(col.vocab.__getitem__, col.data[lo:hi].tolist()))
        if col.kind == "int":
            out: list[Any] = col.data[lo:hi].astype(np.int64).tolist()
            return self._nulls(out, col.null[lo:hi]) if col.null is not None else out
        if col.kind == "ts":
            secs = col.data[lo:hi]
            mask = secs == NULL_TS
            secs = np.where(mask, AS_OF_S, secs)
            strings: list[Any] = list(
                map(
                    operator.add,
                    map(self.days.__getitem__, (secs // DAY - self.day0).tolist()),
                    map(self.tods.__getitem__, (secs % DAY).tolist()),
                )
            )
            return self._nulls(strings, mask) if mask.any() else strings
        raise ValueError(f"no per-row values for a {col.kind!r} column")

    @staticmethod
    def _nulls(values: list[Any], mask: np.ndarray) -> list[Any]:
        array = np.array(values, dtype=object)
        array[mask] = None
        result: list[Any] = array.tolist()
        return result

    def chunks(
        self, table: TableData, columns: Sequence[Col], size: int = CHUNK_ROWS
    ) -> Iterator[Iterator[tuple[Any, ...]]]:
        for lo in range(0, table.rows, size):
            hi = min(lo + size, table.rows)
            yield zip(*(self.column(c, lo, hi) for c in columns), strict=True)


PG_EPOCH_S = 946_684_800  # 2000-01-01 UTC, Postgres' timestamp epoch
PG_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags, header extension
PG_TRAILER = b"\xff\xff"
PG_NULL = b"\xff\xff\xff\xff"  # a field of length -1
PG_FIXED = {"integer": ">i4", "bigint": ">i8", "smallint": ">i2"}
PG_TEXT = {"character varying", "text", "character", "json", "jsonb"}


class BinaryCopy:
    """``COPY ... FROM STDIN (FORMAT BINARY)`` data for a table's chunks, built with numpy.

    A binary COPY row is a field count then, per field, a length and the value's bytes.
    Each (row, field) is one piece: a slice of a source buffer that holds the row header,
    a NULL field, every fixed-width column's length-prefixed values, and the
    length-prefixed entries of each text column's vocabulary. The chunk is one gather of
    the pieces in row order, so Python never touches a single value.
    """

    def __init__(self, pg_types: dict[str, str]) -> None:
        self.pg_types = pg_types  # column -> information_schema data_type
        self._vocabs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    @staticmethod
    def _vocab(
        values: Sequence[str | None], jsonb: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Length-prefixed entries: (bytes, start per entry, length per entry; -1 = NULL)."""
        prefix = b"\x01" if jsonb else b""  # jsonb's binary format: version 1, then text
        pieces = [
            b"" if v is None else len(prefix + v.encode()).to_bytes(4, "big") + prefix + v.encode()
            for v in values
        ]
        lens = np.array([len(p) for p in pieces], dtype=np.int64)
        starts = np.zeros(len(lens), dtype=np.int64)
        np.cumsum(lens[:-1], out=starts[1:])
        lens[np.array([v is None for v in values], dtype=bool)] = -1
        return np.frombuffer(b"".join(pieces) or b"\0", np.uint8), starts, lens

    def chunk(self, columns: Sequence[Col], lo: int, hi: int) -> bytes:
        rows = hi - lo
        n = len(columns)
        src = np.empty((rows, n + 1), dtype=np.int64)  # piece start in the source buffer
        length = np.empty((rows, n + 1), dtype=np.int64)
        parts: list[np.ndarray] = [
            np.frombuffer(n.to_bytes(2, "big") + PG_NULL, np.uint8)  # header at 0, NULL at 2
        ]
        src[:, 0], length[:, 0] = 0, 2
        base = 6
        for j, col in enumerate(columns, start=1):
            pg_type = self.pg_types[col.name]
            if pg_type in PG_FIXED or pg_type == "timestamp with time zone":
                if col.kind == "ts":
                    secs = col.data[lo:hi]
                    null = secs == NULL_TS
                    values = (secs - PG_EPOCH_S) * 1_000_000
                    dtype = ">i8"
                elif col.kind == "int":
                    null = col.null[lo:hi] if col.null is not None else np.zeros(rows, bool)
                    values = col.data[lo:hi]
                    dtype = PG_FIXED[pg_type]
                else:
                    raise ValueError(f"{col.name}: a {col.kind!r} column into {pg_type}")
                block = np.empty(rows, dtype=[("len", ">i4"), ("value", dtype)])
                block["len"] = block.dtype["value"].itemsize
                block["value"] = values
                width = block.dtype.itemsize
                src[:, j] = np.where(null, 2, base + np.arange(rows) * width)
                length[:, j] = np.where(null, 4, width)
                parts.append(block.view(np.uint8))
                base += rows * width
                continue
            if pg_type not in PG_TEXT:
                raise ValueError(f"{col.name}: no binary COPY for {pg_type}")
            jsonb = pg_type == "jsonb"
            if col.kind == "str":
                flat, starts, lens = self._vocab(col.data[lo:hi], jsonb)
                codes = np.arange(rows)
            elif col.kind in ("cat", "const"):
                if id(col) not in self._vocabs:
                    vocab = [col.data] if col.kind == "const" else col.vocab
                    assert vocab is not None
                    self._vocabs[id(col)] = self._vocab(vocab, jsonb)
                flat, starts, lens = self._vocabs[id(col)]
                codes = np.zeros(rows, np.int64) if col.kind == "const" else col.data[lo:hi]
            else:
                raise ValueError(f"{col.name}: a {col.kind!r} column into {pg_type}")
            null = lens[codes] < 0
            src[:, j] = np.where(null, 2, base + starts[codes])
            length[:, j] = np.where(null, 4, lens[codes])
            parts.append(flat)
            base += len(flat)
        source = np.concatenate(parts)
        # Gather the pieces in row order: a ragged arange of source offsets, as a cumsum of
        # steps that are 1 inside a piece and jump to the next piece's start between pieces.
        src_flat, len_flat = src.ravel(), length.ravel()
        out_start = np.cumsum(len_flat) - len_flat
        step = np.ones(int(len_flat.sum()), dtype=np.int64)
        step[0] = src_flat[0]
        step[out_start[1:]] = src_flat[1:] - (src_flat[:-1] + len_flat[:-1] - 1)
        return source[np.cumsum(step)].tobytes()

    def chunks(
        self, table: TableData, columns: Sequence[Col], size: int = PG_CHUNK_ROWS
    ) -> Iterator[bytes]:
        yield PG_SIGNATURE
        for lo in range(0, table.rows, size):
            yield self.chunk(columns, lo, min(lo + size, table.rows))
        yield PG_TRAILER


# ---------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------


@dataclass
class Dataset:
    tables: list[TableData]
    summary: list[tuple[str, str]] = field(default_factory=list)

    def table(self, name: str) -> TableData:
        return next(t for t in self.tables if t.name == name)


def _choice(
    rng: np.random.Generator, weights: Sequence[float] | np.ndarray, size: int
) -> np.ndarray:
    p = np.asarray(weights, dtype=np.float64)
    return rng.choice(len(p), size=size, p=p / p.sum()).astype(np.int32)


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@dataclass
class Catalog:
    table: TableData
    rows: int  # product table rows (parents and variations)
    price: np.ndarray  # per parent product, minor units
    popularity: np.ndarray  # per parent: probability of a non-favourite pick
    var_start: np.ndarray  # per parent: row index of its first variation (-1: none)
    var_count: np.ndarray
    source_id: np.ndarray  # per product row
    names: list[str]  # per product row
    skus: list[str]
    by_category: list[np.ndarray]  # parent indices per primary category


def make_catalog(rng: np.random.Generator) -> Catalog:
    """160 products (20 variable ones with 2 variations each): 200 rows."""
    parents, variable, per_variable = 160, 20, 2
    n_rows = parents + variable * per_variable
    primary = np.arange(parents) % len(CATEGORIES)
    rng.shuffle(primary)
    second = rng.integers(0, len(CATEGORIES), parents)
    has_second = (rng.random(parents) < 0.35) & (second != primary)
    price = np.clip(np.exp(rng.normal(np.log(3500), 0.6, parents)), 500, 30_000)
    price = (np.round(price / 100) * 100 - 1).astype(np.int64)
    popularity = rng.zipf(1.6, parents).astype(np.float64)
    popularity = np.minimum(popularity, 50.0) * rng.uniform(0.5, 1.5, parents)
    popularity /= popularity.sum()
    is_variable = np.zeros(parents, dtype=bool)
    is_variable[rng.choice(parents, variable, replace=False)] = True
    var_start = np.full(parents, -1, dtype=np.int64)
    var_count = np.zeros(parents, dtype=np.int64)
    var_start[is_variable] = parents + np.arange(variable) * per_variable
    var_count[is_variable] = per_variable

    source_id = np.concatenate(
        [1000 + np.arange(parents), 5000 + np.arange(variable * per_variable)]
    ).astype(np.int64)
    parent_row = np.repeat(np.flatnonzero(is_variable), per_variable)
    names, skus, types, categories = [], [], [], []
    for i in range(parents):
        cats = [CATEGORIES[primary[i]]] + ([CATEGORIES[second[i]]] if has_second[i] else [])
        names.append(f"{CATEGORIES[primary[i]]} {i + 1:03d}")
        skus.append(f"SKU-{source_id[i]}")
        types.append("variable" if is_variable[i] else "simple")
        categories.append(_json(cats))
    sizes = ["S", "M", "L"]
    for j, p in enumerate(parent_row):
        names.append(f"{names[p]} - {sizes[j % per_variable]}")
        skus.append(f"SKU-{source_id[p]}-{sizes[j % per_variable]}")
        types.append("variation")
        categories.append("[]")  # WooCommerce variations carry no categories
    row_price = np.concatenate([price, price[parent_row]])
    parent_sid = np.concatenate([np.zeros(parents, np.int64), source_id[parent_row]])
    created = AS_OF_S - (HISTORY_DAYS + 30) * DAY + rng.integers(0, 60 * DAY, n_rows)
    modified = created + rng.integers(0, HISTORY_DAYS * DAY, n_rows)
    stock = _choice(rng, [0.9, 0.07, 0.03], n_rows)
    table = TableData(
        "products",
        n_rows,
        [
            Col("id", "int", np.arange(1, n_rows + 1)),
            Col("source", "const", SOURCE),
            Col("source_id", "int", source_id),
            Col("parent_source_id", "int", parent_sid, null=parent_sid == 0),
            Col("sku", "str", skus),
            Col("name", "str", names),
            Col("type", "str", types),
            Col("status", "const", "publish"),
            Col("price_minor", "int", row_price),
            Col("currency", "const", CURRENCY),
            Col("categories", "str", categories),
            Col("stock_status", "cat", stock, ["instock", "outofstock", "onbackorder"]),
            Col("created_at", "ts", created),
            Col("modified_at", "ts", np.minimum(modified, AS_OF_S)),
        ],
    )
    by_category = [np.flatnonzero(primary == c) for c in range(len(CATEGORIES))]
    return Catalog(
        table,
        n_rows,
        price,
        popularity,
        var_start,
        var_count,
        source_id,
        names,
        skus,
        by_category,
    )


def generate(n_customers: int, n_orders: int, seed: int) -> Dataset:
    """The whole shop as numpy columns; deterministic for a given seed and sizes."""
    rng = np.random.default_rng(seed)
    catalog = make_catalog(rng)
    start_s = AS_OF_S - HISTORY_DAYS * DAY
    span = HISTORY_DAYS * DAY - 2 * 3600  # everything happens at least an hour before AS_OF
    latest = AS_OF_S - 3600
    N = n_customers

    # Customers, in creation order (ids follow), more of them recently (a growing shop).
    created = np.sort(start_s + (rng.random(N) ** 0.75 * span).astype(np.int64))
    registered = rng.random(N) < 0.6
    buyer = ~(registered & (rng.random(N) < 0.12))  # registered accounts that never bought
    buyers = np.flatnonzero(buyer)
    if n_orders < len(buyers):  # tiny runs: fewer buyers than orders otherwise
        buyer[rng.choice(buyers, len(buyers) - n_orders, replace=False)] = False
        buyers = np.flatnonzero(buyer)

    # Orders per buyer: 1 + negative binomial extras (a gamma-mixed Poisson), drawn as a
    # multinomial over the gamma weights so that they add up to n_orders exactly.
    counts = np.zeros(N, dtype=np.int64)
    counts[buyers] = 1
    extra = n_orders - len(buyers)
    if extra > 0:
        weights = rng.gamma(0.25, 1.0, len(buyers))
        counts[buyers] += rng.multinomial(extra, weights / weights.sum())

    # First order: at registration for guests, some days after it for accounts. Later
    # orders: uniform over an active period of (orders - 1) x the customer's rhythm.
    first = created.copy()
    delay = rng.exponential(20 * DAY, N).astype(np.int64)
    first[registered] = np.minimum(created[registered] + delay[registered], latest)
    rhythm = rng.lognormal(np.log(45 * DAY), 0.8, N)
    active = (np.maximum(counts - 1, 0) * rhythm * rng.uniform(0.6, 1.4, N)).astype(np.int64)
    active = np.minimum(active, latest - first)

    cust = np.repeat(np.arange(N, dtype=np.int32), counts)
    first_of = np.zeros(n_orders, dtype=bool)
    first_of[(np.cumsum(counts) - counts)[counts > 0]] = True
    offset = (rng.random(n_orders) * active[cust]).astype(np.int64)
    offset[first_of] = 0
    placed = first[cust] + offset
    by_time = np.argsort(placed, kind="stable")  # order ids follow time, as in a shop
    cust, placed = cust[by_time], placed[by_time]
    del first_of, offset, by_time
    age = AS_OF_S - placed

    # Statuses: processing and on-hold settle after two weeks; most old carts get cancelled.
    status = _choice(rng, STATUS_P, n_orders)
    code = {s: i for i, s in enumerate(STATUSES)}
    old = age > 14 * DAY
    status[old & (status == code["processing"])] = code["completed"]
    status[old & (status == code["on-hold"])] = code["cancelled"]
    stale_cart = np.isin(status, [code[c] for c in CARTS]) & (age > 60 * DAY)
    status[stale_cart & (rng.random(n_orders) < 0.8)] = code["cancelled"]
    is_paid = np.isin(status, [code[s] for s in PAID])
    is_refunded = status == code["refunded"]
    is_cart = np.isin(status, [code[c] for c in CARTS])

    # Items: 1-3 per order; half from the customer's favourite category.
    n_items = _choice(rng, [0.55, 0.30, 0.15], n_orders) + 1
    m = int(n_items.sum())
    item_order = np.repeat(np.arange(n_orders, dtype=np.int64), n_items)
    favourite = _choice(rng, CATEGORY_WEIGHTS, N)
    product = _choice(rng, catalog.popularity, m).astype(np.int64)
    use_fav = rng.random(m) < 0.5
    fav_cat = favourite[cust[item_order[use_fav]]]
    sizes = np.array([len(catalog.by_category[c]) for c in range(len(CATEGORIES))])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    flat = np.concatenate(catalog.by_category)
    pick = starts[fav_cat] + (rng.random(len(fav_cat)) * sizes[fav_cat]).astype(np.int64)
    product[use_fav] = flat[pick]
    del fav_cat, pick, use_fav
    variation_row = np.where(
        catalog.var_count[product] > 0,
        catalog.var_start[product] + (rng.random(m) * catalog.var_count[product]).astype(int),
        -1,
    )
    quantity = _choice(rng, [0.85, 0.11, 0.04], m) + 1
    item_sub = catalog.price[product] * quantity

    # Coupons: a per-customer propensity (mean 0.2), 10 % off the items.
    propensity = rng.beta(0.5, 2.0, N)
    has_coupon = rng.random(n_orders) < propensity[cust]
    coupon_set = np.where(has_coupon, _choice(rng, COUPON_P, n_orders) + 1, 0)
    discount = np.where(has_coupon[item_order], np.round(item_sub * 0.1), 0).astype(np.int64)
    item_total = item_sub - discount
    subtotal = np.bincount(item_order, weights=item_sub, minlength=n_orders).astype(np.int64)
    items_total = np.bincount(item_order, weights=item_total, minlength=n_orders).astype(np.int64)
    shipping = np.where(items_total < 5000, 490, 0).astype(np.int64)
    tax = np.round((items_total + shipping) * 0.19).astype(np.int64)
    total = items_total + shipping + tax

    # Times.
    paid_at = np.where(
        is_paid | is_refunded, placed + rng.integers(30, 900, n_orders), NULL_TS
    ).astype(np.int64)
    completed = status == code["completed"]
    completed_at = np.where(
        completed, np.minimum(placed + rng.integers(DAY, 7 * DAY, n_orders), AS_OF_S), NULL_TS
    ).astype(np.int64)
    modified = np.maximum(np.maximum(placed, paid_at), completed_at)
    modified += rng.integers(0, 600, n_orders)
    cart_touch = placed + (rng.random(n_orders) * np.minimum(2 * DAY, age)).astype(np.int64)
    modified = np.where(is_cart, cart_touch, modified)

    # Refunds: ~5 % of paid orders in part, every refunded order in full, 1-30 days later.
    partial = is_paid & (rng.random(n_orders) < 0.05)
    refunded_orders = np.flatnonzero(partial | is_refunded)
    share = rng.uniform(0.1, 0.9, n_orders)
    amount = np.where(
        is_refunded, total, np.clip(np.round(total * share), 1, total - 1).astype(np.int64)
    )[refunded_orders]
    r_placed = placed[refunded_orders]
    refund_at = r_placed + np.clip(
        rng.integers(DAY, 30 * DAY, len(refunded_orders)), 60, AS_OF_S - r_placed - 1
    )
    refunded_minor = np.zeros(n_orders, dtype=np.int64)
    refunded_minor[refunded_orders] = amount
    modified[refunded_orders] = np.maximum(modified[refunded_orders], refund_at)
    modified = np.minimum(modified, AS_OF_S)
    deleted = rng.random(n_orders) < 0.001  # trashed at the source
    deleted_at = np.where(deleted, np.minimum(modified + DAY, AS_OF_S), NULL_TS)
    modified = np.where(deleted, deleted_at, modified)

    attribution = np.where(rng.random(n_orders) < 0.5, _choice(rng, ATTRIBUTION_P, n_orders), -1)
    types = sorted({t for t, _ in ATTRIBUTIONS})
    utms = sorted({u for _, u in ATTRIBUTIONS if u is not None})
    type_code = np.array([types.index(t) for t, _ in ATTRIBUTIONS] + [len(types)])
    utm_code = np.array([utms.index(u) if u else len(utms) for _, u in ATTRIBUTIONS] + [len(utms)])

    # Customers' own columns.
    country_names = list(COUNTRIES)
    country = _choice(rng, [w for w, _ in COUNTRIES.values()], N)
    city_vocab: list[str | None] = []
    city_start = []
    for _, cities in COUNTRIES.values():
        city_start.append(len(city_vocab))
        city_vocab.extend(cities)
    n_cities = np.array([len(c) for _, c in COUNTRIES.values()])
    city = np.array(city_start)[country] + (rng.random(N) * n_cities[country]).astype(np.int64)
    emails: list[str | None] = [f"customer{i}@example.com" for i in range(1, N + 1)]
    phone_digits = rng.integers(10**7, 10**8, N).tolist()
    has_phone = (rng.random(N) < 0.4).tolist()
    phones = [f"+49151{d}" if h else None for d, h in zip(phone_digits, has_phone, strict=True)]
    postcodes = [f"{p:05d}" for p in rng.integers(1000, 99999, N).tolist()]
    last_order = np.full(N, NULL_TS, dtype=np.int64)
    np.maximum.at(last_order, cust, placed)
    # Attributes of an account come from its record; a guest's from their newest order.
    updated = np.where(registered | (last_order == NULL_TS), created, last_order)

    customers = TableData(
        "customers",
        N,
        [
            Col("id", "int", np.arange(1, N + 1)),
            Col("email", "cat", np.arange(N), emails),
            Col("first_name", "cat", rng.integers(0, len(FIRST_NAMES), N), FIRST_NAMES),
            Col("last_name", "cat", rng.integers(0, len(LAST_NAMES), N), LAST_NAMES),
            Col("phone", "str", phones),
            Col("country", "cat", country, country_names),
            Col("city", "cat", city, city_vocab),
            Col("postcode", "str", postcodes),
            Col("created_at", "ts", created),
            Col("updated_at", "ts", updated),
            Col("attrs_rank", "int", np.where(registered, 2, 1)),
        ],
    )
    # The registered accounts' records: what makes one that never bought a customer
    # (role "customer"; a prospect in the profiles).
    accounts = np.flatnonzero(registered)
    n_accounts = len(accounts)
    records = TableData(
        "customer_records",
        n_accounts,
        [
            Col("id", "int", np.arange(1, n_accounts + 1)),
            Col("source", "const", SOURCE),
            Col("source_id", "int", 10_000 + accounts),
            Col("customer_id", "int", accounts + 1),
            Col("email", "cat", accounts, emails),
            Col("role", "const", "customer"),
            Col("created_at", "ts", created[accounts]),
            Col("modified_at", "ts", created[accounts]),
        ],
    )
    order_ids = np.arange(1, n_orders + 1, dtype=np.int64)
    orders = TableData(
        "orders",
        n_orders,
        [
            Col("id", "int", order_ids),
            Col("source", "const", SOURCE),
            Col("source_id", "int", 100_000 + order_ids),
            Col("customer_id", "int", cust.astype(np.int64) + 1),
            Col("customer_source_id", "int", np.where(registered[cust], 10_000 + cust, 0)),
            Col("email", "cat", cust, emails),
            Col("status", "cat", status, STATUSES),
            Col("currency", "const", CURRENCY),
            Col("total_minor", "int", total),
            Col("subtotal_minor", "int", subtotal),
            Col("discount_minor", "int", subtotal - items_total),
            Col("shipping_minor", "int", shipping),
            Col("tax_minor", "int", tax),
            Col("refunded_minor", "int", refunded_minor),
            Col("coupon_codes", "cat", coupon_set, ["[]"] + [_json(c) for c in COUPON_SETS]),
            Col("payment_method", "cat", _choice(rng, PAYMENT_P, n_orders), PAYMENT_METHODS),
            Col("created_via", "const", "checkout"),
            Col("attribution_source_type", "cat", type_code[attribution], [*types, None]),
            Col("attribution_utm_source", "cat", utm_code[attribution], [*utms, None]),
            Col("created_at", "ts", placed),
            Col("paid_at", "ts", paid_at),
            Col("completed_at", "ts", completed_at),
            Col("modified_at", "ts", modified),
            Col("deleted_at", "ts", deleted_at),
        ],
    )
    named_row = np.where(variation_row >= 0, variation_row, product)
    items = TableData(
        "order_items",
        m,
        [
            Col("id", "int", np.arange(1, m + 1)),
            Col("order_id", "int", item_order + 1),
            Col("source_id", "int", 1_000_000 + np.arange(m)),
            Col("product_source_id", "int", catalog.source_id[product]),
            Col(
                "variation_source_id",
                "int",
                catalog.source_id[np.maximum(variation_row, 0)],
                null=variation_row < 0,
            ),
            Col("sku", "cat", named_row, catalog.skus),
            Col("name", "cat", named_row, catalog.names),
            Col("quantity", "int", quantity),
            Col("subtotal_minor", "int", item_sub),
            Col("total_minor", "int", item_total),
        ],
    )
    n_refunds = len(refunded_orders)
    refunds = TableData(
        "refunds",
        n_refunds,
        [
            Col("id", "int", np.arange(1, n_refunds + 1)),
            Col("source", "const", SOURCE),
            Col("source_id", "int", 50_000_000 + np.arange(n_refunds)),
            Col("order_id", "int", refunded_orders + 1),
            Col("order_source_id", "int", 100_000 + refunded_orders + 1),
            Col("amount_minor", "int", amount),
            Col("currency", "const", CURRENCY),
            Col("reason", "cat", rng.integers(0, len(REFUND_REASONS), n_refunds), REFUND_REASONS),
            Col("created_at", "ts", refund_at),
        ],
    )

    # Distribution summary (syncd's default paid statuses, trashed orders left out).
    live_paid = is_paid & ~deleted
    paid_per = np.bincount(cust[live_paid], minlength=N)
    bought = paid_per[paid_per > 0]
    summary = [
        ("customers", num(N)),
        ("  registered / guests", f"{registered.mean():.1%} / {1 - registered.mean():.1%}"),
        ("  with no order at all", f"{(counts == 0).mean():.1%}"),
        ("  with >= 1 paid order (buyers)", f"{num(len(bought))} ({len(bought) / N:.1%})"),
        ("  one-time buyers (of buyers)", f"{(bought == 1).mean():.1%}"),
        (
            "  paid orders per buyer",
            f"mean {bought.mean():.2f}, median {np.median(bought):.0f}, "
            f"p90 {np.percentile(bought, 90):.0f}, p99 {np.percentile(bought, 99):.0f}, "
            f"max {bought.max()}",
        ),
        ("orders", num(n_orders)),
        (
            "  statuses",
            ", ".join(
                f"{s} {(status == i).mean():.1%}"
                for i, s in enumerate(STATUSES)
                if (status == i).any()
            ),
        ),
        ("  trashed (deleted_at set)", f"{deleted.mean():.2%}"),
        ("  with coupons", f"{has_coupon.mean():.1%}"),
        ("  with attribution", f"{(attribution >= 0).mean():.1%}"),
        (
            "  total_minor (paid)",
            f"mean {total[is_paid].mean() / 100:.2f} EUR, "
            f"p99 {np.percentile(total[is_paid], 99) / 100:.2f} EUR",
        ),
        ("  created_at range", f"{_iso(int(placed.min()))} .. {_iso(int(placed.max()))}"),
        ("order items", f"{num(m)} ({m / n_orders:.2f} per order)"),
        (
            "refunds",
            f"{num(n_refunds)}: {partial.sum() / max(is_paid.sum(), 1):.1%} of paid orders "
            f"partly, {num(is_refunded.sum())} refunded orders in full",
        ),
        (
            "products",
            f"{catalog.rows} rows ({len(catalog.price)} products, "
            f"{catalog.rows - len(catalog.price)} variations), {len(CATEGORIES)} categories",
        ),
    ]
    return Dataset([catalog.table, customers, records, orders, items, refunds], summary)


def _iso(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M")


# ---------------------------------------------------------------------------
# Stores
# ---------------------------------------------------------------------------

LOAD_TABLES = ("products", "customers", "customer_records", "orders", "order_items", "refunds")


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def remove_sqlite(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            Path(f"{path}{suffix}").unlink()


def _pg_admin(url: str) -> psycopg.Connection[Any]:
    u = make_url(url)
    return psycopg.connect(
        host=u.host or "127.0.0.1",
        port=u.port or 5432,
        user=u.username,
        password=u.password,
        dbname="postgres",
        autocommit=True,
    )


def _pg_dbname(url: str) -> str:
    name = make_url(url).database
    if not name:
        raise BenchmarkError(f"no database name in {url}")
    return name


def drop_postgres(url: str) -> None:
    with _pg_admin(url) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{_pg_dbname(url)}" WITH (FORCE)')


def create_postgres(url: str) -> None:
    drop_postgres(url)
    with _pg_admin(url) as admin:
        admin.execute(f'CREATE DATABASE "{_pg_dbname(url)}"')


def postgres_exists(url: str) -> bool:
    with _pg_admin(url) as admin:
        row = admin.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (_pg_dbname(url),)
        ).fetchone()
    return row is not None


@dataclass
class LoadReport:
    store: str
    table_s: dict[str, float]
    finish_s: float  # indexes, sequences, ANALYZE
    finish_what: str
    total_s: float
    size_bytes: int


def _sql_literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(int(value))


def load_sqlite(path: Path, data: Dataset, rebuild_indexes: bool) -> LoadReport:
    """``executemany`` per table in one transaction, journal and fsync off for the load."""
    started = time.perf_counter()
    remove_sqlite(path)
    open_store(sqlite_url(path)).dispose()  # the schema, by syncd's migrations
    conn = sqlite3.connect(path, isolation_level=None)
    rows = SqliteRows()
    table_s: dict[str, float] = {}
    try:
        for pragma in (
            "journal_mode=OFF",
            "synchronous=OFF",
            "foreign_keys=OFF",
            "cache_size=-1000000",  # 1 GB
            "temp_store=MEMORY",
            "locking_mode=EXCLUSIVE",
        ):
            conn.execute(f"PRAGMA {pragma}")
        indexes: list[str] = []
        if rebuild_indexes:  # the CREATE INDEX statements (constraints' indexes stay)
            names = ", ".join(f"'{t}'" for t in LOAD_TABLES)
            for name, sql in conn.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'index' "
                f"AND sql IS NOT NULL AND tbl_name IN ({names})"
            ).fetchall():
                conn.execute(f'DROP INDEX "{name}"')
                indexes.append(sql)
        for table in data.tables:
            mark = time.perf_counter()
            bound = [c for c in table.columns if c.kind != "const"]
            names = ", ".join(c.name for c in table.columns)
            values = ", ".join(
                _sql_literal(c.data) if c.kind == "const" else "?" for c in table.columns
            )
            sql = f"INSERT INTO {table.name} ({names}) VALUES ({values})"
            conn.execute("BEGIN")
            for chunk in rows.chunks(table, bound):
                conn.executemany(sql, chunk)
            conn.execute("COMMIT")
            table_s[table.name] = time.perf_counter() - mark
        mark = time.perf_counter()
        for sql in indexes:
            conn.execute(sql)
        index_s = time.perf_counter() - mark
        conn.execute("ANALYZE")
        conn.execute("PRAGMA locking_mode=NORMAL")
        conn.execute("PRAGMA journal_mode=WAL")  # back to the store's mode
        finish_s = time.perf_counter() - mark
    finally:
        conn.close()
    what = (f"recreate {len(indexes)} indexes {index_s:.1f} s + " if indexes else "") + "ANALYZE"
    return LoadReport(
        "sqlite", table_s, finish_s, what, time.perf_counter() - started, sqlite_size(path)
    )


def _pg_drop_keys_and_indexes(cur: psycopg.Cursor[Any], tables: list[str]) -> list[str]:
    """Drop the tables' keys, foreign keys (also those pointing at them) and indexes.

    Returns the statements that put them back, exactly as the migrations made them: keys,
    then indexes, then foreign keys (validated). Building an index once over the loaded
    rows is several times faster than maintaining it row by row.
    """
    oids = (
        "SELECT oid FROM pg_class WHERE relname = ANY(%(t)s) AND relkind = 'r' "
        "AND pg_table_is_visible(oid)"
    )
    params = {"t": tables}
    fks = cur.execute(
        "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
        f"WHERE contype = 'f' AND (conrelid IN ({oids}) OR confrelid IN ({oids}))",
        params,
    ).fetchall()
    keys = cur.execute(
        "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
        f"WHERE contype IN ('p', 'u') AND conrelid IN ({oids})",
        params,
    ).fetchall()
    plain = cur.execute(
        "SELECT i.oid::regclass::text, pg_get_indexdef(i.oid) FROM pg_index x "
        "JOIN pg_class i ON i.oid = x.indexrelid "
        f"WHERE x.indrelid IN ({oids}) AND NOT EXISTS "
        "(SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid AND c.contype <> 'f')",
        params,
    ).fetchall()
    for table, name, _ in fks + keys:
        cur.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
    for name, _ in plain:
        cur.execute(f"DROP INDEX {name}")
    return [
        *(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {sql}' for table, name, sql in keys),
        *(sql for _, sql in plain),
        *(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {sql}' for table, name, sql in fks),
    ]


def load_postgres(url: str, data: Dataset, rebuild_indexes: bool) -> LoadReport:
    """Binary ``COPY`` per table on the engine's raw DBAPI connection, then VACUUM ANALYZE."""
    started = time.perf_counter()
    create_postgres(url)
    engine = open_store(url)  # the schema, by syncd's migrations
    table_s: dict[str, float] = {}
    try:
        raw = engine.raw_connection()
        try:
            conn = raw.driver_connection
            assert isinstance(conn, psycopg.Connection)
            with conn.cursor() as cur:
                # For the load only: no foreign key triggers (the data is consistent), no
                # wait for the WAL flush at commit, memory for the index builds.
                cur.execute("SET session_replication_role = replica")
                cur.execute("SET synchronous_commit = off")
                cur.execute("SET maintenance_work_mem = '1GB'")
                tables = [t.name for t in data.tables]
                restore = _pg_drop_keys_and_indexes(cur, tables) if rebuild_indexes else []
                for table in data.tables:
                    mark = time.perf_counter()
                    pg_types = dict(
                        cur.execute(
                            "SELECT column_name, data_type FROM information_schema.columns "
                            "WHERE table_name = %s AND table_schema = current_schema()",
                            (table.name,),
                        ).fetchall()
                    )
                    copier = BinaryCopy(pg_types)
                    names = ", ".join(c.name for c in table.columns)
                    sql = f"COPY {table.name} ({names}) FROM STDIN (FORMAT BINARY)"
                    with cur.copy(sql, writer=QueuedLibpqWriter(cur)) as copy:
                        for block in copier.chunks(table, table.columns):
                            copy.write(block)
                    table_s[table.name] = time.perf_counter() - mark
                cur.execute("RESET session_replication_role")
                mark = time.perf_counter()
                for sql in restore:
                    cur.execute(sql)
                index_s = time.perf_counter() - mark
                for name in tables:  # ids were given: move the sequences past them
                    cur.execute(
                        f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), "
                        f"(SELECT coalesce(max(id), 0) + 1 FROM {name}), false)"
                    )
            conn.commit()
            conn.autocommit = True
            for name in tables:
                conn.execute(f"VACUUM (ANALYZE) {name}")
            conn.autocommit = False
            finish_s = time.perf_counter() - mark
        finally:
            raw.close()
    finally:
        engine.dispose()
    what = (
        f"restore {len(restore)} constraints and indexes {index_s:.1f} s + " if restore else ""
    ) + "VACUUM ANALYZE"
    return LoadReport(
        "postgres", table_s, finish_s, what, time.perf_counter() - started, postgres_size(url)
    )


def store_counts(url: str) -> dict[str, int]:
    engine = open_store(url)
    try:
        with engine.connect() as conn:
            return {
                t: int(conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one())
                for t in LOAD_TABLES
            }
    finally:
        engine.dispose()


def sqlite_size(path: Path) -> int:
    files = [Path(f"{path}{suffix}") for suffix in ("", "-wal")]
    return sum(f.stat().st_size for f in files if f.exists())


def postgres_size(url: str) -> int:
    with _pg_admin(url) as admin:
        row = admin.execute("SELECT pg_database_size(%s)", (_pg_dbname(url),)).fetchone()
    return int(row[0]) if row else 0


# ---------------------------------------------------------------------------
# The recompute, in a child process
# ---------------------------------------------------------------------------

# What a recompute derives, emptied before each timed run (a first recompute).
DERIVED_TABLES = ("segment_memberships", "customer_profiles", "model_fits")


def reset_derived(engine: Engine) -> None:
    tables = set(inspect(engine).get_table_names())
    # TRUNCATE on Postgres: no dead rows left for autovacuum to clean up during the run.
    verb = "TRUNCATE" if engine.dialect.name == "postgresql" else "DELETE FROM"
    with engine.begin() as conn:
        for table in DERIVED_TABLES:
            if table in tables:
                conn.execute(text(f"{verb} {table}"))
        if "sync_runs" in tables:
            conn.execute(text("DELETE FROM sync_runs WHERE kind = 'segments'"))


def _status_kib(key: str) -> int | None:
    """A line of /proc/self/status in KiB (Linux), e.g. VmRSS or VmHWM."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def child_recompute(url: str, reset: bool) -> int:
    """In a fresh process: reset the derived tables, time the recompute; one JSON line."""
    if sys.platform.startswith("linux"):
        die_with_parent()
    configure_logging("warning", stream=sys.stderr)
    report: dict[str, Any] = {}
    try:
        from syncd.config import SegmentSettings, Settings, StoreSettings

        try:
            from syncd.segments.recompute import recompute
        except ImportError as exc:
            report["error"] = f"syncd.segments.recompute is not available: {exc}"
            print(json.dumps(report), flush=True)
            return 3
        settings = Settings(
            store=StoreSettings(url=url),
            segments={name: SegmentSettings(rule=rule) for name, rule in SEGMENTS.items()},
        )
        engine = open_store(url)
        try:
            if reset:
                reset_derived(engine)
            gc.collect()
            report["baseline_kib"] = _status_kib("VmRSS")
            report["ru_baseline_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            started = time.perf_counter()
            result = recompute(engine, settings, now=AS_OF)
            report["wall_s"] = time.perf_counter() - started
            report["peak_kib"] = _status_kib("VmHWM")
            report["ru_peak_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            report["scoped"] = time_scoped(engine, settings)
        finally:
            engine.dispose()
        for key in ("status", "profiles", "buyers"):  # when the result has them
            value = getattr(result, key, None)
            if isinstance(value, str | int):
                report[key] = value
        timings = getattr(result, "timings", None) or {}
        report["timings"] = {str(k): float(v) for k, v in dict(timings).items()}
        segments = getattr(result, "segments", None) or {}
        sizes = {str(name): getattr(seg, "size", None) for name, seg in dict(segments).items()}
        report["segments"] = {k: None if v is None else int(v) for k, v in sizes.items()}
    except Exception as exc:
        traceback.print_exc()
        report["error"] = f"{type(exc).__name__}: {exc}"
        print(json.dumps(report), flush=True)
        return 1
    print(json.dumps(report), flush=True)
    return 0


SCOPES = (1, 10, 100, 1000)  # customers per scoped recompute (what a webhook batch changes)


def time_scoped(engine: Engine, settings: Any) -> dict[str, float]:
    """Seconds of a recompute scoped to 1, 10, 100 and 1,000 customers from the middle of the
    base, after the full one (what it scores against); the webhook path's recompute."""
    from syncd.segments.recompute import recompute

    with engine.connect() as conn:
        total = conn.execute(text("SELECT COUNT(*) FROM customers")).scalar_one()
        ids = list(
            conn.execute(
                text("SELECT id FROM customers ORDER BY id LIMIT :n OFFSET :skip"),
                {"n": max(SCOPES), "skip": total // 2},
            ).scalars()
        )
    timings: dict[str, float] = {}
    for size in SCOPES:
        started = time.perf_counter()
        result = recompute(engine, settings, now=AS_OF, customers=ids[:size])
        timings[str(size)] = time.perf_counter() - started
        if result.scope is None:
            raise BenchmarkError("the scoped recompute ran in full")
    return timings


def run_child_recompute(url: str, reset: bool) -> dict[str, Any]:
    """:func:`child_recompute` in a new process, forked by ``/bin/sh``.

    Linux carries ``ru_maxrss`` over fork + exec: a child forked straight from this process
    would report the generation's high-water mark. The shell, a small process, forks it.
    """
    args = ["--recompute-only", "--url", url, *([] if reset else ["--no-reset"])]
    try:
        out = run_script_child(str(Path(__file__).resolve()), args, CHILD_TIMEOUT, "the recompute")
    except BenchmarkError as exc:
        return {"error": str(exc)}
    lines = [line for line in out.strip().splitlines() if line.startswith("{")]
    if not lines:
        return {"error": "the recompute printed no report"}
    report: dict[str, Any] = json.loads(lines[-1])
    return report


def print_recompute(store: str, report: dict[str, Any]) -> dict[str, bool]:
    """The figures of one store's recompute; returns target -> met."""
    if "error" in report:
        print(f"  recompute failed: {report['error']}")
        return {}
    wall = float(report["wall_s"])
    facts = [f"{k} {num(v) if isinstance(v, int) else v}" for k, v in report.items()
             if k in ("status", "profiles", "buyers")]  # fmt: skip
    if facts:
        print(f"  result: {', '.join(facts)}")
    timings: dict[str, float] = report.get("timings", {})
    if timings:
        print("  timings reported by the recompute (s):")
        print_table(["step", "s"], [[k, f"{v:.2f}"] for k, v in timings.items()])
        print(f"  sum of steps {sum(timings.values()):.2f} s of {wall:.2f} s wall")
    else:
        print("  the recompute reported no per-step timings")
    segments: dict[str, int | None] = report.get("segments", {})
    if segments:
        print("  segment sizes:")
        print_table(
            ["segment", "rule", "members"],
            [
                [name, SEGMENTS.get(name, "?"), "?" if size is None else num(size)]
                for name, size in segments.items()
            ],
        )
    ru_peak: int = report["ru_peak_kib"]
    peak: int = report.get("peak_kib") or ru_peak  # no /proc: ru_maxrss (KiB on Linux)
    baseline: int = report.get("baseline_kib") or report["ru_baseline_kib"]
    delta_mb = (peak - baseline) / 1024
    if ru_peak and peak and abs(ru_peak - peak) > 0.1 * peak:
        print(
            f"  note: ru_maxrss {ru_peak / 1024:,.0f} MB but VmHWM {peak / 1024:,.0f} MB: "
            "ru_maxrss may not be the child's own"
        )
    fit_steps = {k: v for k, v in timings.items() if "fit" in k.lower()}
    fit_s = sum(fit_steps.values()) if fit_steps else None
    results = {
        "recompute": wall <= TARGET_RECOMPUTE_S,
        "peak RSS": delta_mb <= TARGET_PEAK_MB,
    }
    rows = [
        [
            "recompute wall time",
            f"{wall:.2f} s",
            f"<= {TARGET_RECOMPUTE_S:g} s",
            verdict(results["recompute"]),
        ],
        [
            "peak RSS (high-water mark - baseline)",
            f"{delta_mb:,.0f} MB",
            f"<= {TARGET_PEAK_MB:,.0f} MB",
            verdict(results["peak RSS"]),
        ],
    ]
    if fit_s is None:
        rows.append(["CLV fit", "n/a (no '*fit*' step in timings)", f"<= {TARGET_FIT_S:g} s", "?"])
    else:
        results["CLV fit"] = fit_s <= TARGET_FIT_S
        rows.append(
            [
                f"CLV fit ({' + '.join(fit_steps)})",
                f"{fit_s:.2f} s",
                f"<= {TARGET_FIT_S:g} s",
                verdict(results["CLV fit"]),
            ]
        )
    print(
        f"  child RSS: {baseline / 1024:,.0f} MB before the call (imports, store open), "
        f"high-water mark {peak / 1024:,.0f} MB"
    )
    scoped: dict[str, float] = report.get("scoped", {})
    if scoped:
        print(
            "  scoped recompute (the webhook path; its budget is part of the p95 <= 2 s from "
            "receipt to destination): "
            + ", ".join(f"{num(int(n))} customers {s:.2f} s" for n, s in scoped.items())
        )
    print_table([f"{store}", "measured", "target", "result"], rows)
    return results


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Generate a large shop straight into the store and time a full segment "
        "recompute (profiles, RFM, CLV, ten rule segments) on SQLite and Postgres."
    )
    parser.add_argument("--customers", type=int, default=DEFAULT_CUSTOMERS)
    parser.add_argument("--orders", type=int, default=DEFAULT_ORDERS)
    parser.add_argument("--store", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--seed", type=int, default=SEED, help=argparse.SUPPRESS)
    parser.add_argument(
        "--sqlite-path", type=Path, default=DEFAULT_SQLITE_PATH, help="(default: %(default)s)"
    )
    parser.add_argument(
        "--postgres-url",
        default=DEFAULT_POSTGRES_URL,
        help="a database the benchmark may drop and create (default: %(default)s)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the generated stores (for --reuse)"
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="skip generation: recompute on the stores a --keep run left",
    )
    parser.add_argument("--generate-only", action="store_true", help="generate and load, then stop")
    parser.add_argument(
        "--no-reset",
        action="store_true",
        help="keep the previous recompute's profiles and memberships (a repeat recompute)",
    )
    parser.add_argument(
        "--load",
        choices=("rebuild-indexes", "keep-indexes"),
        default="rebuild-indexes",
        help="rebuild: drop the indexes (SQLite: the plain ones; Postgres: also keys and "
        "foreign keys) for the load and recreate them after, the faster way; keep: load "
        "with them in place (default: %(default)s)",
    )
    parser.add_argument(
        "--parallel-load",
        action="store_true",
        help="with both stores, load them side by side in two processes (per-table times "
        "then overlap; it only helps with a free core)",
    )
    parser.add_argument("--recompute-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    return parser


def _on_sigterm(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def _cleanup(stores: Sequence[str], args: argparse.Namespace) -> None:
    for store in stores:
        with contextlib.suppress(Exception):
            if store == "sqlite":
                remove_sqlite(args.sqlite_path)
            else:
                drop_postgres(args.postgres_url)


def _load_child(conn: Connection, load: Callable[[], LoadReport]) -> None:
    """In a forked process: run ``load`` and send back its report or its error."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    try:
        conn.send(("ok", load()))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def _load_side_by_side(
    first: Callable[[], LoadReport], second: Callable[[], LoadReport]
) -> tuple[LoadReport, LoadReport]:
    """``first`` here while a forked child (sharing the generated arrays) runs ``second``."""
    ctx = multiprocessing.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_load_child, args=(sender, second), daemon=True)
    child.start()
    sender.close()
    try:
        mine = first()
        try:
            status, payload = receiver.recv()
        except EOFError:
            raise BenchmarkError(f"the load process died (exit code {child.exitcode})") from None
        if status != "ok":
            raise BenchmarkError(f"load failed: {payload}")
        return mine, payload
    finally:
        if child.is_alive():
            child.terminate()
        child.join(timeout=30)


def _generate_and_load(
    stores: Sequence[str], urls: dict[str, str], args: argparse.Namespace
) -> None:
    heading(f"Generation: {args.customers:,} customers, {args.orders:,} orders (seed {args.seed})")
    started = time.perf_counter()
    data = generate(args.customers, args.orders, args.seed)
    gen_s = time.perf_counter() - started
    print(f"  numpy generation: {gen_s:.1f} s")
    width = max(len(k) for k, _ in data.summary)
    for key, value in data.summary:
        print(f"  {key.ljust(width)}  {value}")
    expected = {t.name: t.rows for t in data.tables}
    rebuild = args.load == "rebuild-indexes"
    loaders: dict[str, Callable[[], LoadReport]] = {
        "sqlite": lambda: load_sqlite(args.sqlite_path, data, rebuild),
        "postgres": lambda: load_postgres(args.postgres_url, data, rebuild),
    }
    loading = time.perf_counter()
    reports: dict[str, LoadReport] = {}
    side_by_side = len(stores) == 2 and args.parallel_load
    if side_by_side:
        print(f"\n  loading {' and '.join(stores)} side by side (two processes) ...", flush=True)
        reports[stores[0]], reports[stores[1]] = _load_side_by_side(
            loaders[stores[0]], loaders[stores[1]]
        )
    for store in stores:
        if not side_by_side:
            reports[store] = loaders[store]()
        report = reports[store]
        heading(f"Load into {store}")
        counts = store_counts(urls[store])
        rows = [
            [
                t,
                num(counts[t]),
                num(expected[t]),
                "ok" if counts[t] == expected[t] else "MISMATCH",
                f"{report.table_s.get(t, 0):.1f}",
            ]
            for t in LOAD_TABLES
        ]
        print_table(["table", "rows in store", "generated", "", "load (s)"], rows)
        print(
            f"  {report.finish_what}: {report.finish_s:.1f} s; whole load {report.total_s:.1f} s "
            f"(migrations included); store size {report.size_bytes / 2**20:,.0f} MiB"
        )
        if any(counts[t] != expected[t] for t in LOAD_TABLES):
            raise BenchmarkError(f"{store}: the store's row counts differ from the generated")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print()
    if side_by_side:
        print(
            f"  both loads side by side: {time.perf_counter() - loading:.1f} s wall "
            "(the per-table times above overlap)"
        )
    print(
        f"  generation + load: {time.perf_counter() - started:.1f} s "
        f"(this process' peak RSS {peak_mb:,.0f} MB)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    if args.recompute_only:
        if not args.url:
            raise SystemExit("--recompute-only needs --url")
        return child_recompute(args.url, reset=not args.no_reset)
    if args.reuse and args.generate_only:
        raise SystemExit("--reuse and --generate-only exclude each other")
    if args.customers < 1 or args.orders < 1:
        raise SystemExit("--customers and --orders must be positive")

    configure_logging("warning", stream=sys.stderr)
    stores = ["sqlite", "postgres"] if args.store == "both" else [args.store]
    urls = {"sqlite": sqlite_url(args.sqlite_path), "postgres": args.postgres_url}
    print(
        f"syncd segments benchmark: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
        f"as of {AS_OF:%Y-%m-%d %H:%M} UTC, stores: {', '.join(stores)}"
    )
    started = time.perf_counter()
    remove = not (args.keep or args.reuse)  # a reused store is never removed
    try:
        if args.reuse:
            for store in stores:
                exists = (
                    args.sqlite_path.exists()
                    if store == "sqlite"
                    else postgres_exists(args.postgres_url)
                )
                if not exists:
                    raise BenchmarkError(f"--reuse: no {store} store (run with --keep first)")
                counts = store_counts(urls[store])
                size = (
                    sqlite_size(args.sqlite_path)
                    if store == "sqlite"
                    else postgres_size(args.postgres_url)
                )
                print(
                    f"  reusing {store}: "
                    + ", ".join(f"{t} {num(n)}" for t, n in counts.items())
                    + f"; {size / 2**20:,.0f} MiB"
                )
        else:
            _generate_and_load(stores, urls, args)
            gc.collect()
        if not args.generate_only:
            all_results: dict[str, dict[str, bool]] = {}
            for store in stores:
                heading(f"Recompute on {store}")
                report = run_child_recompute(urls[store], reset=not args.no_reset)
                all_results[store] = print_recompute(store, report)
            heading("Summary")
            for store, results in all_results.items():
                line = ", ".join(f"{k} {verdict(v)}" for k, v in results.items()) or "no result"
                print(f"  {store}: {line}")
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        if remove:
            _cleanup(stores, args)
        return 130
    except BenchmarkError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        if remove:
            _cleanup(stores, args)
        return 1
    if remove:
        _cleanup(stores, args)
        print("\n  generated stores removed (--keep keeps them)")
    else:
        kept = [str(args.sqlite_path) if s == "sqlite" else args.postgres_url for s in stores]
        print(f"\n  stores kept: {', '.join(kept)} (re-run the recompute with --reuse)")
    print(f"  total runtime: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
