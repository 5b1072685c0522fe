"""Backtests (``syncd segments --as-of``) leave the live tables alone, on SQLite and
Postgres: customer_profiles, segment_memberships and model_fits stay as the last live
recompute left them, after the backtest and while it runs, so a push after it (or
during it) sends nothing, and ``syncd status`` still shows the last live recompute.

The shop: customers 1–80, customer ``c`` with ``1 + c % 4`` paid orders, the k-th
(k = 0, 1, …) ``200 - 37k - c % 9`` days before T0 (2026-06-01 12:00 UTC), of
``1000 + 37c`` cents each. The backtest day, 2026-02-15, ends 105.5 days before T0:
orders k = 0, 1, 2 (118 days before T0 or earlier) count, k = 3 (81–89 days before)
does not. So the 20 customers with ``c % 4 == 3`` have 4 orders now and 3 then;
everyone else has the same orders at both instants.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, select, text

from syncd.config import Settings
from syncd.mapping import load_mappings
from syncd.metrics import Metrics
from syncd.push import PushResult, push, select_syncs
from syncd.sandbox.destinations import DestinationSandbox
from syncd.segments import recompute as recompute_module
from syncd.segments.recompute import recompute
from syncd.status import collect_status
from syncd.store.engine import open_store
from syncd.store.models import PROFILES, SYNC_RUNS
from tests.test_cli import base_env, syncd
from tests.test_segments import Shop

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
DAY = date(2026, 2, 15)
SECRET = "hook-secret"
SEGMENTS = {
    "everyone": {"rule": "orders_count >= 1"},
    "four_orders": {"rule": "orders_count >= 4"},
}
# The customers with four orders now and three at the end of DAY.
FOUR_NOW = [c for c in range(1, 81) if c % 4 == 3]


def fill(shop: Shop) -> None:
    for cid in range(1, 81):
        shop.customer(cid)
        for k in range(1 + cid % 4):
            shop.order(cid, T0 - timedelta(days=200 - 37 * k - cid % 9), 1_000 + 37 * cid)


@pytest.fixture
def shop(engine: Engine) -> Iterator[Shop]:
    shop = Shop(engine)
    fill(shop)
    yield shop


def live_tables(engine: Engine) -> dict[str, list[Any]]:
    """The three tables a recompute writes, every column as the store holds it."""
    with engine.connect() as conn:
        return {
            table: [
                tuple(row)
                for row in conn.execute(text(f"SELECT * FROM {table} ORDER BY {key}")).all()
            ]
            for table, key in (
                ("customer_profiles", "customer_id"),
                ("segment_memberships", "id"),
                ("model_fits", "id"),
            )
        }


def changes(result: Any) -> dict[str, tuple[int, int, int]]:
    return {n: (c.size, c.entered, c.exited) for n, c in result.segments.items()}


def test_a_backtest_leaves_profiles_memberships_and_fits_as_the_live_run_left_them(
    engine: Engine, shop: Shop
) -> None:
    config = Settings(segments=SEGMENTS)  # type: ignore[arg-type]
    live = recompute(engine, config, now=T0)
    assert changes(live) == {"everyone": (80, 80, 0), "four_orders": (20, 20, 0)}
    before = live_tables(engine)
    assert len(before["customer_profiles"]) == 80
    assert len(before["model_fits"]) == 3  # bgnbd, gamma_gamma, scoring
    status_before = collect_status(engine, config)["segments"]

    backtest = recompute(engine, config, as_of=DAY)

    # Its own figures: as of the end of DAY, compared with the live memberships.
    assert backtest.as_of == datetime(2026, 2, 15, 23, 59, 59, 999999, tzinfo=UTC)
    assert (backtest.written, backtest.profiles, backtest.buyers) == (False, 80, 80)
    assert changes(backtest) == {"everyone": (80, 0, 0), "four_orders": (0, 0, 20)}
    assert backtest.models["bgnbd"]["r"] is not None  # it fitted a model, and kept none
    assert backtest.models["bgnbd"]["customers"] == 80
    # The store: exactly as the live recompute left it.
    assert live_tables(engine) == before
    # Its run is recorded as a backtest; status still shows the live recompute.
    with engine.connect() as conn:
        runs = conn.execute(
            select(SYNC_RUNS.c.kind, SYNC_RUNS.c.status, SYNC_RUNS.c.counts).order_by(
                SYNC_RUNS.c.id
            )
        ).all()
    assert [(r.kind, r.status) for r in runs] == [
        ("segments", "success"),
        ("backtest", "success"),
    ]
    assert runs[1].counts == {
        "profiles": 80,
        "buyers": 80,
        "as_of": "2026-02-15T23:59:59.999999+00:00",
        "segments": {
            "everyone": {"size": 80, "entered": 0, "exited": 0},
            "four_orders": {"size": 0, "entered": 0, "exited": 20},
        },
    }
    assert collect_status(engine, config)["segments"] == status_before
    # The metrics' job ages: the live recompute's, no backtest series.
    body = Metrics(engine, config).render()[0].decode()
    ages = [line for line in body.splitlines() if line.startswith("syncd_last_success")]
    assert [line.split(" ")[0] for line in ages] == [
        'syncd_last_success_timestamp_seconds{kind="segments",name="segments"}'
    ]


def test_during_a_backtest_others_read_and_write_the_live_profiles(
    engine: Engine, shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the backtest evaluates its segments (its profiles written by then): another
    connection reads the live profiles, without waiting, and a scoped recompute (what a
    webhook triggers in ``syncd run``) reads and rewrites live rows only."""
    config = Settings(segments=SEGMENTS)  # type: ignore[arg-type]
    recompute(engine, config, now=T0)
    before = live_tables(engine)
    seen: dict[str, Any] = {}
    real = recompute_module.select_members

    def select_members(conn: Connection, *args: Any, **kwargs: Any) -> Any:
        if seen:  # the scoped recompute's own call
            return real(conn, *args, **kwargs)
        # The backtest's own connection sees its profiles: three orders for customer 3.
        seen["backtest"] = conn.execute(
            select(PROFILES.c.orders_count).where(PROFILES.c.customer_id == 3)
        ).scalar_one()
        with engine.begin() as other:
            if engine.dialect.name == "postgresql":
                # A lock held on the live table would make this fail, not hang.
                other.execute(text("SET LOCAL lock_timeout = '2s'"))
            seen["other"] = [
                tuple(r)
                for r in other.execute(text("SELECT * FROM customer_profiles ORDER BY 1")).all()
            ]
        seen["scoped"] = recompute(engine, config, now=T0 + timedelta(days=1), customers={3})
        seen["after_scoped"] = live_tables(engine)
        return real(conn, *args, **kwargs)

    monkeypatch.setattr(recompute_module, "select_members", select_members)
    backtest = recompute(engine, config, as_of=DAY)

    assert seen["backtest"] == 3
    assert seen["other"] == before["customer_profiles"]
    scoped = seen["scoped"]
    # Customer 3 as of T0 + 1 day: four orders, in both segments of live sizes.
    assert (scoped.scope, scoped.profiles, scoped.buyers) == (1, 1, 1)
    assert changes(scoped) == {"everyone": (80, 0, 0), "four_orders": (20, 0, 0)}
    with engine.connect() as conn:
        three = conn.execute(select(PROFILES).where(PROFILES.c.customer_id == 3)).one()
    assert (three.orders_count, three.as_of) == (4, T0 + timedelta(days=1))
    # The backtest is what it is whatever ran meanwhile, and changed nothing after.
    assert changes(backtest) == {"everyone": (80, 0, 0), "four_orders": (0, 0, 20)}
    assert live_tables(engine) == seen["after_scoped"]


def push_settings(tmp_path: Path, sandbox: DestinationSandbox) -> Settings:
    path = tmp_path / "dest.toml"
    path.write_text(
        f"""
destination = "webhook"
base_url = "{sandbox.webhook_url("crm")}"
allow_loopback = true
[credentials]
secret = "{SECRET}"
[limits]
requests_per_second = 200

[[sync]]
name = "hook"
segment = "everyone"
mode = "upsert"
[sync.fields]
email = "email"
orders = "orders_count"
revenue = "net_revenue_minor"
"""
    )
    return Settings.model_validate(
        {"segments": SEGMENTS, "destinations": {"mappings": [str(path)]}}
    )


def run_push(settings: Settings, engine: Engine) -> PushResult:
    (result,) = asyncio.run(push(engine, select_syncs(load_mappings(settings), None)))
    return result


def test_a_push_after_a_backtest_sends_nothing(engine: Engine, shop: Shop, tmp_path: Path) -> None:
    with DestinationSandbox() as sandbox:
        receiver = sandbox.webhooks.add("crm", SECRET)
        settings = push_settings(tmp_path, sandbox)
        recompute(engine, settings, now=T0)
        first = run_push(settings, engine)
        assert (first.status, first.counts.added) == ("success", 80)
        by_key = {r["key"]: r["data"] for r in receiver.records}
        assert by_key["3"] == {"email": "c3@example.com", "orders": 4, "revenue": 4 * 1_111}

        recompute(engine, settings, as_of=DAY)
        sandbox.reset_logs()
        again = run_push(settings, engine)
        assert (again.counts.unchanged, again.counts.updated, again.counts.requests) == (80, 0, 0)
        assert sandbox.requests == []


def test_cli_backtest_prints_its_figures_and_status_shows_the_live_run(
    store_url: str, tmp_path: Path
) -> None:
    engine = open_store(store_url)
    try:
        fill(Shop(engine))
    finally:
        engine.dispose()
    config = tmp_path / "config.toml"
    config.write_text(
        f'[store]\nurl = "{store_url}"\n\n'
        '[segments.everyone]\nrule = "orders_count >= 1"\n\n'
        '[segments.four_orders]\nrule = "orders_count >= 4"\n'
    )
    env = base_env(SYNCD_CONFIG=str(config))
    live = syncd("segments", "--json", env=env)
    assert live.returncode == 0, live.output
    status_before = json.loads(syncd("status", "--json", env=env).stdout)["segments"]
    assert status_before["last_run"]["counts"]["segments"]["four_orders"]["size"] == 20

    backtest = syncd("segments", "--as-of", DAY.isoformat(), "--json", env=env)
    assert backtest.returncode == 0, backtest.output
    data = json.loads(backtest.stdout)
    assert data["as_of"] == "2026-02-15T23:59:59.999999+00:00"
    assert (data["memberships_recorded"], data["profiles"], data["buyers"]) == (False, 80, 80)
    assert data["segments"] == {
        "everyone": {"size": 80, "entered": 0, "exited": 0},
        "four_orders": {"size": 0, "entered": 0, "exited": 20},
    }
    status_after = json.loads(syncd("status", "--json", env=env).stdout)["segments"]
    assert status_after == status_before
    assert status_after["sizes"]["four_orders"]["size"] == 20
