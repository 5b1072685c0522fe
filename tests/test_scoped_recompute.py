"""A recompute scoped to the customers a webhook changed: their profiles and memberships are
rebuilt, scored against the last full recompute, and nobody else's rows move.

Ten buyers, customer i with one order of i x 10.00 EUR placed 20 - i days before T0, so a full
recompute ranks them 1..10 on recency and on money (all tie on frequency):
r = m = 1 + (5 * (i - 1)) // 10 = 1, 1, 2, 2, 3, 3, 4, 4, 5, 5 and f = 1 for everyone.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select, update

from syncd.segments import recompute as recompute_module
from syncd.segments.recompute import SCORING_MODEL, recompute
from syncd.store.models import MEMBERSHIPS, MODEL_FITS, ORDERS, PROFILES, SYNC_RUNS
from tests.test_segments import Shop, memberships, settings

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
DAY = 86400
CONFIG = settings(
    repeat={"rule": "orders_count >= 2"},
    big={"rule": "net_revenue_minor >= 9000"},
)


def profiles(engine: Engine) -> dict[int, Any]:
    with engine.connect() as conn:
        return {r.customer_id: r for r in conn.execute(select(PROFILES)).all()}


@pytest.fixture
def ten(engine: Engine) -> Shop:
    shop = Shop(engine)
    for i in range(1, 11):
        shop.customer(i)
        shop.order(i, T0 - timedelta(days=20 - i), total=i * 1000)
    return shop


def test_the_full_recompute_keeps_the_rfm_cuts_to_score_against(engine: Engine, ten: Shop) -> None:
    recompute(engine, CONFIG, now=T0)
    got = profiles(engine)
    assert [got[i].r_score for i in range(1, 11)] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert [got[i].m_score for i in range(1, 11)] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert {got[i].f_score for i in range(1, 11)} == {1}
    with engine.connect() as conn:
        params = conn.execute(
            select(MODEL_FITS.c.params).where(MODEL_FITS.c.model == SCORING_MODEL)
        ).scalar_one()
    day0 = int(T0.timestamp()) // DAY
    # Where each score steps up: the greatest value scored k or less, k = 1..4.
    assert params["rfm"] == {
        "r": [day0 - 18, day0 - 16, day0 - 14, day0 - 12],  # last order of customers 2, 4, 6, 8
        "f": [1, 1, 1, 1],
        "m": [2000, 4000, 6000, 8000],
        "buyers": 10,
    }
    assert params["currency"] == "EUR"


def test_a_scoped_recompute_rebuilds_only_the_changed_customers(engine: Engine, ten: Shop) -> None:
    t1, t2, t3 = T0, T0 + timedelta(days=2), T0 + timedelta(days=3)
    recompute(engine, CONFIG, now=t1)
    before = profiles(engine)
    assert memberships(engine) == {("big", 9, t1, None), ("big", 10, t1, None)}

    # Customer 3 buys again (70.00): two orders, 100.00 net, the newest last order.
    ten.order(3, T0 + timedelta(days=1), total=7000)
    result = recompute(engine, CONFIG, now=t2, customers={3})
    assert result.scope == 1 and result.profiles == 1 and result.buyers == 1
    assert result.segment_changes() == {
        "repeat": {"size": 1, "entered": 1, "exited": 0},
        "big": {"size": 3, "entered": 1, "exited": 0},
    }
    after = profiles(engine)
    three = after[3]
    assert (three.orders_count, three.net_revenue_minor, three.currency) == (2, 10_000, "EUR")
    assert three.last_order_at == T0 + timedelta(days=1)
    assert three.days_since_last_order == 1 and three.as_of == t2
    # Above every cut: the top score on each axis, as a full ranking would give it (the
    # only buyer with 2 orders, the most money, the latest order).
    assert (three.r_score, three.f_score, three.m_score) == (5, 5, 5)
    assert three.rfm_segment == "champions"
    for i in set(before) - {3}:
        assert after[i] == before[i], i  # untouched, as_of t1 included
    assert memberships(engine) == {
        ("big", 9, t1, None),
        ("big", 10, t1, None),
        ("big", 3, t2, None),
        ("repeat", 3, t2, None),
    }
    with engine.connect() as conn:
        run = conn.execute(select(SYNC_RUNS).order_by(SYNC_RUNS.c.id.desc()).limit(1)).one()
    assert run.kind == "segments" and run.counts["scope"] == 1

    # Customer 10's order is deleted and customer 99 (unknown here) is in the scope too:
    # 10 keeps a profile without orders and leaves "big"; 99 gets nothing.
    with engine.begin() as conn:
        conn.execute(update(ORDERS).where(ORDERS.c.customer_id == 10).values(deleted_at=t3))
    result = recompute(engine, CONFIG, now=t3, customers={10, 99})
    # Only the segments these customers are in, entered or left are reported.
    assert result.segment_changes() == {"big": {"size": 2, "entered": 0, "exited": 1}}
    gone = profiles(engine)
    assert 99 not in gone
    assert (gone[10].orders_count, gone[10].r_score, gone[10].lifecycle_stage) == (
        0,
        None,
        "prospect",
    )
    assert ("big", 10, t1, t3) in memberships(engine)

    # The next full recompute ranks everyone again and agrees on customer 3.
    full = recompute(engine, CONFIG, now=t3)
    assert full.scope is None
    assert (profiles(engine)[3].r_score, profiles(engine)[3].f_score) == (5, 5)


def test_without_an_earlier_full_recompute_or_past_the_limit_it_runs_in_full(
    engine: Engine, ten: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = recompute(engine, CONFIG, now=T0, customers={3})
    assert first.scope is None and first.profiles == 10  # nothing to score against yet
    monkeypatch.setattr(recompute_module, "SCOPED_MAX_CUSTOMERS", 1)
    wide = recompute(engine, CONFIG, now=T0 + timedelta(days=1), customers={3, 4})
    assert wide.scope is None and wide.profiles == 10
    narrow = recompute(engine, CONFIG, now=T0 + timedelta(days=1), customers={4})
    assert narrow.scope == 1 and narrow.profiles == 1
    with engine.connect() as conn:
        open_rows = conn.execute(
            select(MEMBERSHIPS.c.segment, MEMBERSHIPS.c.customer_id).where(
                MEMBERSHIPS.c.exited_at.is_(None)
            )
        ).all()
    assert sorted(open_rows) == [("big", 9), ("big", 10)]
