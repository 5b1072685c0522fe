"""Segments over customer_profiles: membership history, exclusive groups, SQL segments,
backtests and the recorded model fits, on SQLite and Postgres.

The data is written straight into the store (customers and orders rows), so each
test states exactly who qualifies for what.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, delete, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from syncd.config import ConfigError, Settings, load_settings
from syncd.segments import memberships as memberships_module
from syncd.segments import recompute as recompute_module
from syncd.segments.recompute import SegmentError, recompute
from syncd.store.models import (
    CUSTOMER_RECORDS,
    CUSTOMERS,
    MEMBERSHIPS,
    MODEL_FITS,
    ORDERS,
    PROFILES,
    SYNC_RUNS,
)

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


class Shop:
    """Customers (registered accounts) and their orders written directly into the store."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.next_order = 1

    def customer(self, cid: int, country: str = "DE", role: str | None = "customer") -> None:
        """A person with a registered account in ``role`` (None: a guest, known only
        through their orders)."""
        with self.engine.begin() as conn:
            conn.execute(
                insert(CUSTOMERS).values(
                    id=cid, email=f"c{cid}@example.com", country=country, created_at=T0
                )
            )
            if role is not None:
                conn.execute(
                    insert(CUSTOMER_RECORDS).values(
                        source="shop",
                        source_id=cid,
                        customer_id=cid,
                        email=f"c{cid}@example.com",
                        role=role,
                        created_at=T0,
                        modified_at=T0,
                    )
                )

    def order(self, cid: int, when: datetime, total: int = 1000, status: str = "completed") -> int:
        oid = self.next_order
        self.next_order += 1
        with self.engine.begin() as conn:
            conn.execute(
                insert(ORDERS).values(
                    id=oid,
                    source="shop",
                    source_id=oid,
                    customer_id=cid,
                    status=status,
                    currency="EUR",
                    total_minor=total,
                    created_at=when,
                    modified_at=when,
                    coupon_codes=[],
                )
            )
        return oid


@pytest.fixture
def shop(engine: Engine) -> Iterator[Shop]:
    yield Shop(engine)


def settings(**segments: dict[str, Any]) -> Settings:
    return Settings(segments=segments)  # type: ignore[arg-type]


def memberships(engine: Engine) -> set[tuple[str, int, datetime, datetime | None]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                MEMBERSHIPS.c.segment,
                MEMBERSHIPS.c.customer_id,
                MEMBERSHIPS.c.entered_at,
                MEMBERSHIPS.c.exited_at,
            )
        ).all()
    return {(r.segment, r.customer_id, r.entered_at, r.exited_at) for r in rows}


def test_memberships_across_three_recomputes(engine: Engine, shop: Shop) -> None:
    for cid in (1, 2, 3, 4):
        shop.customer(cid)
    shop.order(1, T0 - timedelta(days=10), 20_000)
    shop.order(2, T0 - timedelta(days=10), 5_000)
    cart = shop.order(3, T0 - timedelta(days=2), 7_000, status="pending")
    config = settings(
        big={"rule": "net_revenue_minor >= 10000"},
        carts={"rule": "has_open_cart"},
    )

    # Run 1: customer 1 is big; customer 3 has an open cart.
    t1 = T0
    r1 = recompute(engine, config, now=t1)
    assert {n: c.as_dict() for n, c in r1.segments.items()} == {
        "big": {"size": 1, "entered": 1, "exited": 0},
        "carts": {"size": 1, "entered": 1, "exited": 0},
    }
    assert memberships(engine) == {("big", 1, t1, None), ("carts", 3, t1, None)}

    # Run 2: customer 2 spends enough to be big; customer 3 pays the cart (it leaves
    # "carts") and customer 4 starts one.
    shop.order(2, T0 + timedelta(days=1), 6_000)
    with engine.begin() as conn:
        conn.execute(update(ORDERS).where(ORDERS.c.id == cart).values(status="processing"))
    shop.order(4, T0 + timedelta(days=1), 3_000, status="checkout-draft")
    t2 = T0 + timedelta(days=2)
    r2 = recompute(engine, config, now=t2)
    assert {n: c.as_dict() for n, c in r2.segments.items()} == {
        "big": {"size": 2, "entered": 1, "exited": 0},
        "carts": {"size": 1, "entered": 1, "exited": 1},
    }
    assert memberships(engine) == {
        ("big", 1, t1, None),
        ("big", 2, t2, None),
        ("carts", 3, t1, t2),
        ("carts", 4, t2, None),
    }

    # Run 3: customer 1's big order is refunded in full (status refunded: no longer paid),
    # customer 3 starts a new cart after their purchase: they come back with a new row.
    with engine.begin() as conn:
        conn.execute(update(ORDERS).where(ORDERS.c.customer_id == 1).values(status="refunded"))
    shop.order(3, T0 + timedelta(days=3), 1_500, status="pending")
    t3 = T0 + timedelta(days=4)
    r3 = recompute(engine, config, now=t3)
    assert {n: c.as_dict() for n, c in r3.segments.items()} == {
        "big": {"size": 1, "entered": 0, "exited": 1},
        "carts": {"size": 2, "entered": 1, "exited": 0},
    }
    assert memberships(engine) == {
        ("big", 1, t1, t3),
        ("big", 2, t2, None),
        ("carts", 3, t1, t2),
        ("carts", 3, t3, None),
        ("carts", 4, t2, None),
    }

    # An unchanged recompute changes nothing.
    r4 = recompute(engine, config, now=t3 + timedelta(hours=1))
    assert all(c.entered == 0 and c.exited == 0 for c in r4.segments.values())
    assert len(memberships(engine)) == 5


def test_segment_removed_from_config_closes_its_rows(engine: Engine, shop: Shop) -> None:
    shop.customer(1)
    shop.order(1, T0 - timedelta(days=1))
    recompute(engine, settings(everyone={"rule": "orders_count >= 1"}), now=T0)
    later = T0 + timedelta(days=1)
    result = recompute(engine, settings(), now=later)
    assert result.segments == {}
    assert memberships(engine) == {("everyone", 1, T0, later)}


def test_exclusive_group_puts_each_customer_in_the_highest_priority_segment(
    engine: Engine, shop: Shop
) -> None:
    for cid in (1, 2, 3):
        shop.customer(cid, country="FR" if cid == 3 else "DE")
    shop.order(1, T0 - timedelta(days=5), 50_000)
    shop.order(2, T0 - timedelta(days=5), 2_000)
    config = settings(
        # Both qualify for "buyers"; customer 1 also for "vip", which outranks it.
        vip={"rule": "net_revenue_minor >= 10000", "group": "tier", "priority": 10},
        buyers={"rule": "orders_count >= 1", "group": "tier", "priority": 1},
        # A SQL segment in the same group, lowest priority: everyone not yet placed.
        rest={
            "sql": "SELECT customer_id FROM customer_profiles",
            "group": "tier",
            "priority": -5,
        },
        # Not in the group: overlaps freely.
        germans={"sql": "SELECT customer_id FROM customer_profiles WHERE country = 'DE';"},
    )
    result = recompute(engine, config, now=T0)
    assert {n: c.size for n, c in result.segments.items()} == {
        "germans": 2,
        "buyers": 1,
        "rest": 1,
        "vip": 1,
    }
    current = {(s, c) for s, c, _, exited in memberships(engine) if exited is None}
    assert current == {
        ("vip", 1),
        ("buyers", 2),
        ("rest", 3),
        ("germans", 1),
        ("germans", 2),
    }


def test_a_failing_sql_segment_names_the_segment(engine: Engine, shop: Shop) -> None:
    config = settings(broken={"sql": "SELECT id FROM no_such_table"})
    with pytest.raises(SegmentError, match=r"^segments\.broken\.sql: the query failed"):
        recompute(engine, config, now=T0)
    with engine.connect() as conn:
        run = conn.execute(
            select(SYNC_RUNS.c.status, SYNC_RUNS.c.error).where(SYNC_RUNS.c.kind == "segments")
        ).one()
    assert run.status == "failed"
    assert run.error.startswith("segments.broken.sql:")


def test_a_sql_segment_cannot_write_through_a_function(engine: Engine, shop: Shop) -> None:
    # A subquery cannot hold a DELETE, but a function called from a SELECT can write:
    # the recompute runs segment SQL in a read-only savepoint (Postgres).
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite has no SQL function that writes")
    shop.customer(1)
    shop.order(1, T0 - timedelta(days=5))
    with engine.begin() as conn:
        conn.execute(text("CREATE SEQUENCE probe"))
    sneaky = "SELECT customer_id FROM customer_profiles WHERE nextval('probe') > 0"
    with pytest.raises(
        SegmentError, match=r"^segments\.sneaky\.sql: the query failed.*read-only transaction"
    ):
        recompute(engine, settings(sneaky={"sql": sneaky}), now=T0)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT is_called FROM probe")).scalar() is False
    # The same recompute with a plain SQL segment writes its memberships as before.
    plain = "SELECT customer_id FROM customer_profiles"
    assert recompute(engine, settings(plain={"sql": plain}), now=T0).segments["plain"].size == 1
    assert {(s, c) for s, c, _, _ in memberships(engine)} == {("plain", 1)}


def test_sql_without_customer_id_is_refused(engine: Engine) -> None:
    config = settings(nocol={"sql": "SELECT email FROM customer_profiles"})
    with pytest.raises(SegmentError, match=r"^segments\.nocol\.sql: .*customer_id"):
        recompute(engine, config, now=T0)


def test_a_rule_with_an_unknown_column_is_a_config_error(tmp_path: Any) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[segments.vip]\nrule = "revenue > 100"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    message = str(info.value)
    assert "segments.vip.rule: unknown column 'revenue'" in message
    assert "net_revenue_minor" in message  # the columns that exist are listed


def test_as_of_reports_the_past_day_and_records_nothing(
    engine: Engine, shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    shop.customer(1)
    shop.order(1, datetime(2026, 3, 10, 9, 0, tzinfo=UTC), 4_000)
    shop.order(1, datetime(2026, 3, 31, 23, 59, 59, tzinfo=UTC), 1_000)  # last second counts
    shop.order(1, datetime(2026, 4, 1, 0, 0, tzinfo=UTC), 9_000)  # the next day does not
    config = settings(everyone={"rule": "orders_count >= 1"})
    # The profiles the backtest's segments are evaluated on, on its own connection.
    read: list[Any] = []
    select_members = recompute_module.select_members

    def reading(conn: Connection, *args: Any, **kwargs: Any) -> Any:
        read.extend(conn.execute(select(PROFILES)).all())
        return select_members(conn, *args, **kwargs)

    monkeypatch.setattr(recompute_module, "select_members", reading)
    result = recompute(engine, config, as_of=date(2026, 3, 31))
    assert result.as_of == datetime(2026, 3, 31, 23, 59, 59, 999999, tzinfo=UTC)
    assert result.written is False
    assert result.segments["everyone"].as_dict() == {"size": 1, "entered": 1, "exited": 0}
    (row,) = read
    assert (row.customer_id, row.orders_count, row.gross_revenue_minor) == (1, 2, 5_000)
    assert row.days_since_last_order == 0
    assert row.as_of == result.as_of
    # Nothing recorded: no membership, no profile, no model fit.
    assert memberships(engine) == set()
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(PROFILES)).scalar_one() == 0
        assert conn.execute(select(func.count()).select_from(MODEL_FITS)).scalar_one() == 0


def test_model_fits_are_kept_with_the_reason_when_not_fitted(engine: Engine, shop: Shop) -> None:
    shop.customer(1)
    shop.order(1, T0 - timedelta(days=3))
    result = recompute(engine, settings(), now=T0)
    assert result.models["bgnbd"]["r"] is None
    assert "50" in result.models["bgnbd"]["error"]  # the minimum it needs
    with engine.connect() as conn:
        fits = conn.execute(select(MODEL_FITS).order_by(MODEL_FITS.c.model)).all()
    assert [(f.model, f.customers) for f in fits] == [
        ("bgnbd", 1),
        ("gamma_gamma", 0),
        ("scoring", 1),  # what a scoped recompute scores against: no CLV fits to use
    ]
    assert fits[0].params is None and fits[1].params is None
    assert all(f.error and f.as_of == T0 for f in fits[:2])
    assert fits[2].params["bgnbd"] is None and fits[2].params["gamma_gamma"] is None


def test_model_fits_are_kept_with_their_parameters(engine: Engine, shop: Shop) -> None:
    # 80 customers with 1-4 order days each: enough to fit both models.
    for cid in range(1, 81):
        shop.customer(cid)
        for k in range(1 + cid % 4):
            shop.order(cid, T0 - timedelta(days=200 - 37 * k - cid % 9), 1_000 + 37 * cid)
    result = recompute(engine, settings(), now=T0)
    bg = result.models["bgnbd"]
    assert bg["customers"] == 80 and bg["time_unit"] == "day"
    assert all(bg[k] > 0 for k in ("r", "alpha", "a", "b"))
    with engine.connect() as conn:
        fit = conn.execute(select(MODEL_FITS).where(MODEL_FITS.c.model == "bgnbd")).one()
        scored = conn.execute(
            select(func.count()).where(PROFILES.c.p_alive.is_not(None))
        ).scalar_one()
    assert fit.params == {k: bg[k] for k in ("r", "alpha", "a", "b")}
    assert fit.log_likelihood == pytest.approx(bg["log_likelihood"])
    assert scored == 80

    # A scoped recompute of unchanged customers gives them exactly the full recompute's
    # rows: the stored fits score them the same, and the RFM cuts reproduce their ranks
    # (ties included: these customers share order counts and recency days).
    def rows() -> dict[int, dict[str, Any]]:
        with engine.connect() as conn:
            return {
                r.customer_id: {k: v for k, v in r._mapping.items() if k != "computed_at"}
                for r in conn.execute(select(PROFILES))
            }

    full = rows()
    scoped = recompute(engine, settings(), now=T0, customers=set(range(1, 81, 3)))
    assert scoped.scope == 27 and scoped.profiles == 27
    assert rows() == full


def test_profiles_follow_deleted_customers(engine: Engine, shop: Shop) -> None:
    shop.customer(1)
    shop.customer(2)
    config = settings(everyone={"rule": "orders_count >= 0"})
    recompute(engine, config, now=T0)
    with engine.begin() as conn:
        conn.execute(delete(CUSTOMERS).where(CUSTOMERS.c.id == 2))
    later = T0 + timedelta(hours=1)
    result = recompute(engine, config, now=later)
    assert result.profiles == 1
    assert ("everyone", 2, T0, later) in memberships(engine)


def _index_definitions(engine: Engine, table: str) -> set[str]:
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            sql = "SELECT indexdef FROM pg_indexes WHERE tablename = :t"
        else:
            sql = (
                "SELECT coalesce(sql, name) FROM sqlite_master "
                "WHERE tbl_name = :t AND type = 'index'"
            )
        return set(conn.execute(text(sql), {"t": table}).scalars())


def test_a_first_fill_of_the_memberships_keeps_their_indexes_and_rules(
    engine: Engine, shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every first fill takes the bulk path (indexes built after the rows, on Postgres).
    monkeypatch.setattr(memberships_module, "FIRST_FILL_ROWS", 1)
    tables = ("segment_memberships", "customer_profiles")
    before = {t: _index_definitions(engine, t) for t in tables}
    assert len(before["segment_memberships"]) >= 2
    # SQLite keeps the profiles' integer key as the rowid: no index of its own.
    assert bool(before["customer_profiles"]) == (engine.dialect.name == "postgresql")
    for cid in (1, 2, 3):
        shop.customer(cid)
    shop.order(1, T0 - timedelta(days=10), 20_000)
    shop.order(2, T0 - timedelta(days=10), 5_000)
    config = settings(big={"rule": "net_revenue_minor >= 10000"}, all={"rule": "orders_count >= 0"})
    r1 = recompute(engine, config, now=T0)
    assert {n: c.as_dict() for n, c in r1.segments.items()} == {
        "all": {"size": 3, "entered": 3, "exited": 0},
        "big": {"size": 1, "entered": 1, "exited": 0},
    }
    assert {t: _index_definitions(engine, t) for t in before} == before
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(PROFILES)).scalar_one() == 3
    # The open-membership rule is enforced again: one open row per segment and customer.
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(insert(MEMBERSHIPS).values(segment="big", customer_id=1, entered_at=T0))
    # The next recompute is not a first fill; it diffs against the rows as usual.
    shop.order(2, T0 + timedelta(days=1), 6_000)
    t2 = T0 + timedelta(days=2)
    r2 = recompute(engine, config, now=t2)
    assert r2.segments["big"].as_dict() == {"size": 2, "entered": 1, "exited": 0}
    assert memberships(engine) == {
        ("all", 1, T0, None),
        ("all", 2, T0, None),
        ("all", 3, T0, None),
        ("big", 1, T0, None),
        ("big", 2, t2, None),
    }
