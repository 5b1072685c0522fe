"""End to end: the sandbox store (real HTTP on 127.0.0.1) synced into SQLite and Postgres.

Expected values are computed here, independently, from the sandbox's own records with
Decimal arithmetic and plain string handling, never from syncd's normalization.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import Engine, func, select

from syncd.config import Settings, WooCommerceSourceSettings
from syncd.http import ServiceClient, ServiceLimits
from syncd.ingest import SourceSync, SyncResult
from syncd.sandbox.server import FaultConfig, SandboxServer
from syncd.sandbox.store import SandboxStore
from syncd.sources.woocommerce.auth import API_ROOT, make_auth
from syncd.sources.woocommerce.client import WooCommerceClient
from syncd.status import collect_status
from syncd.store.engine import open_store
from syncd.store.models import CUSTOMER_RECORDS as RECORDS
from syncd.store.models import (
    CUSTOMERS,
    ORDERS,
    QUARANTINE,
    REFUNDS,
)
from syncd.store.models import ORDER_ITEMS as ITEMS
from tests.storedump import diff, dump

pytestmark = pytest.mark.slow


def settings_for(server: SandboxServer, **overrides: Any) -> WooCommerceSourceSettings:
    values: dict[str, Any] = {
        "url": server.url,
        "consumer_key": SecretStr(server.consumer_key),
        "consumer_secret": SecretStr(server.consumer_secret),
        "requests_per_second": 0,
        "concurrency": 4,
        **overrides,
    }
    return WooCommerceSourceSettings(**values)


def fast_retry_client(settings: WooCommerceSourceSettings) -> WooCommerceClient:
    """The production client with waits shrunk, so fault tests take seconds, not minutes."""
    http = ServiceClient(
        "woocommerce:test",
        settings.url + API_ROOT,
        limits=ServiceLimits(concurrency=4, max_attempts=30, backoff_base=0.005, backoff_max=0.05),
        auth=make_auth(settings.effective_auth, "ck_sandbox", "cs_sandbox"),
    )
    return WooCommerceClient("wc", settings, client=http)


def sync(
    engine: Engine,
    settings: WooCommerceSourceSettings,
    client: WooCommerceClient | None = None,
    **kw: Any,
) -> SyncResult:
    async def go() -> SyncResult:
        runner = SourceSync(engine, "wc", settings, client=client)
        try:
            return await runner.run(**kw)
        finally:
            await runner.client.aclose()

    return asyncio.run(go())


def cents(value: str) -> int:
    """The test's own money parsing: Decimal, not syncd's."""
    return int(Decimal(value) * 100)


def norm_email(value: str | None) -> str | None:
    return value.strip().lower() if value and value.strip() else None


def wait_next_second() -> None:
    """Windows are bounded above by the run's start, to the second: let a mutation's
    second pass so the next run sees it (a run in the same second sees it one run later)."""
    time.sleep(1.05)


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    store = SandboxStore(seed=11, customers=200, guests=120, orders=2000)
    with SandboxServer(store) as server:
        yield server


def expected_people(store: SandboxStore) -> int:
    """People by the rule, computed from the sandbox: every account, plus every guest email
    no account has (after trimming and lower-casing)."""
    accounts = {**store.customers, **store.staff}
    account_emails = {norm_email(c["email"]) for c in accounts.values()}
    guest_emails = {
        norm_email(o["billing"]["email"])
        for o in store.orders.values()
        if o["customer_id"] == 0 and norm_email(o["billing"].get("email"))
    }
    return len(accounts) + len(guest_emails - account_emails)


def live_people(engine: Engine) -> int:
    live = (
        select(ORDERS.c.customer_id)
        .where(ORDERS.c.deleted_at.is_(None) | (ORDERS.c.status == "trash"))
        .union(select(RECORDS.c.customer_id).where(RECORDS.c.deleted_at.is_(None)))
    )
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).where(CUSTOMERS.c.id.in_(live))).scalar_one())


def test_sync_exact_values_with_refunds_guests_and_deletions(
    sandbox: SandboxServer, store_url: str
) -> None:
    store = sandbox.store
    engine = open_store(store_url)
    settings = settings_for(sandbox, reconcile_every_hours=0)
    first = sync(engine, settings)
    assert first.status == "success", first.error
    changes = store.mutate(0.03, seed=5)  # new orders, refunds, trash, force deletes, email edits
    assert changes["deleted_orders"], "the scenario needs hard deletions"
    wait_next_second()
    second = sync(engine, settings)
    assert second.status == "success", second.error

    assert len(store.orders) >= 2000
    with engine.connect() as conn:
        rows = {r.source_id: r for r in conn.execute(select(ORDERS).where(ORDERS.c.source == "wc"))}
        refunds = {r.source_id: r for r in conn.execute(select(REFUNDS))}
        items = conn.execute(
            select(ORDERS.c.source_id, func.count()).join(ITEMS).group_by(ORDERS.c.source_id)
        ).all()
    guests = 0
    for oid, order in store.orders.items():
        row = rows[oid]
        assert row.total_minor == cents(order["total"]), oid
        assert row.shipping_minor == cents(order["shipping_total"])
        assert row.tax_minor == cents(order["total_tax"])
        assert row.discount_minor == cents(order["discount_total"])
        assert row.status == order["status"]
        expected_refunded = sum(
            (Decimal(r["amount"]) for r in store.refunds.values() if r["parent_id"] == oid),
            Decimal(0),
        )
        assert row.refunded_minor == int(expected_refunded * 100), oid
        assert row.created_at == datetime.fromisoformat(order["date_created_gmt"]).replace(
            tzinfo=UTC
        )
        assert (row.deleted_at is not None) == (order["status"] == "trash")
        guests += order["customer_id"] == 0
    assert guests > 100
    assert {oid: n for oid, n in items if oid in store.orders} == {
        oid: len(o["line_items"]) for oid, o in store.orders.items() if o["line_items"]
    }
    for rid, refund in store.refunds.items():
        assert refunds[rid].amount_minor == cents(refund["amount"])
        assert refunds[rid].order_id == rows[refund["parent_id"]].id
    # force-deleted orders are kept, marked deleted, and stop counting
    for oid in store.deleted["orders"]:
        if oid in rows:
            assert rows[oid].deleted_at is not None and rows[oid].status != "trash"
    assert live_people(engine) == expected_people(store)
    engine.dispose()


def test_incremental_reads_only_what_changed_and_equals_a_fresh_sync(
    sandbox: SandboxServer, tmp_path: Any
) -> None:
    store = sandbox.store
    engine = open_store(f"sqlite:///{tmp_path}/incr.db")
    settings = settings_for(sandbox, reconcile_every_hours=0)
    start_first = datetime.now(UTC).replace(microsecond=0)
    assert sync(engine, settings).status == "success"
    changes = store.mutate(0.01, seed=9)
    wait_next_second()
    sandbox.reset_log()
    second = sync(engine, settings)
    assert second.status == "success", second.error

    # Every orders request of the second run is either a modification window that starts at
    # most overlap_seconds before the first run, an id scan (_fields=id) or a fetch by ids.
    window_start = start_first - timedelta(seconds=settings.overlap_seconds + 1)
    order_reqs = [r for r in sandbox.requests if r.path == "orders"]
    windows = [r for r in order_reqs if "modified_after" in r.query]
    scans = [r for r in order_reqs if r.query.get("_fields") == "id"]
    assert len(windows) + len(scans) == len(order_reqs)
    for r in windows:
        assert (
            datetime.fromisoformat(str(r.query["modified_after"])).replace(tzinfo=UTC)
            >= window_start
        )
    # what the windows must hold, from the sandbox's own dates
    changed = [
        o
        for o in store.orders.values()
        if datetime.fromisoformat(o["date_modified_gmt"]).replace(tzinfo=UTC) > window_start
    ]
    assert len(changed) >= len(set(changes["orders"]) - store.deleted["orders"])
    assert second.counts["orders"].fetched == len(changed)
    live_changed = sum(o["status"] != "trash" for o in changed)
    trashed_changed = len(changed) - live_changed
    expected_pages = max(1, -(-live_changed // 100)) + max(1, -(-trashed_changed // 100))
    assert len(windows) == expected_pages
    total_orders = len(store.orders)
    assert len(scans) == -(
        -sum(o["status"] != "trash" for o in store.orders.values()) // 100
    ) + max(1, -(-sum(o["status"] == "trash" for o in store.orders.values()) // 100))
    assert second.counts["orders"].fetched < total_orders / 10

    # every stream says how fresh it is: cursors at most a few seconds behind the second run
    status = collect_status(engine, Settings(sources={"wc": settings}))
    for name, stream in status["sources"]["wc"]["streams"].items():
        cursor = datetime.fromisoformat(stream["cursor"].replace("Z", "+00:00"))
        assert datetime.now(UTC) - cursor < timedelta(seconds=30), name
    assert status["sources"]["wc"]["last_run"]["status"] == "success"

    fresh = open_store(f"sqlite:///{tmp_path}/fresh.db")
    assert sync(fresh, settings).status == "success"
    a, b = dump(engine, "wc"), dump(fresh, "wc")
    assert a == b, diff(a, b)
    engine.dispose()
    fresh.dispose()


def test_faults_do_not_change_the_result(store_url: str, tmp_path: Any) -> None:
    store = SandboxStore(seed=21, customers=80, guests=40, orders=600)
    with SandboxServer(store) as server:
        clean = open_store(f"sqlite:///{tmp_path}/clean.db")
        # small pages: hundreds of requests, so every kind of fault shows up many times
        settings = settings_for(server, per_page=5)
        assert sync(clean, settings).status == "success"
        server.faults = FaultConfig(
            rate_5xx=0.10, rate_429=0.05, rate_drop=0.02, retry_after="0", seed=3
        )
        server.reset_log()
        engine = open_store(store_url)
        result = sync(engine, settings, client=fast_retry_client(settings))
        assert result.status == "success", result.error
        faults = [r.fault for r in server.requests if r.fault]
        assert len(server.requests) > 150
        assert {"server_error", "rate_limit", "drop"} <= set(faults), faults
        assert result.requests == len(server.requests)  # every retry is a counted request
        a, b = dump(engine, "wc"), dump(clean, "wc")
        assert a == b, diff(a, b)
        engine.dispose()
        clean.dispose()


def test_wrong_secret_fails_fast_with_the_vendors_message(tmp_path: Any) -> None:
    store = SandboxStore(seed=2, customers=5, guests=5, orders=20)
    with SandboxServer(store) as server:
        engine = open_store(f"sqlite:///{tmp_path}/s.db")
        settings = settings_for(server, consumer_secret=SecretStr("cs_wrong"))
        started = time.monotonic()
        result = sync(engine, settings)
        assert time.monotonic() - started < 5
        assert result.status == "failed"
        assert result.error is not None
        assert "authentication failed" in result.error
        assert "401" in result.error
        assert "cs_wrong" not in result.error
        assert len(server.requests) == 1  # a 401 is not retried
        engine.dispose()


def test_bad_records_are_quarantined_and_nothing_else_is_lost(store_url: str) -> None:
    store = SandboxStore(seed=4, customers=30, guests=20, orders=200)
    bad = store.add_malformed()
    wait_next_second()
    with SandboxServer(store) as server:
        engine = open_store(store_url)
        result = sync(engine, settings_for(server))
        assert result.status == "partial"
        assert sum(c.quarantined for c in result.counts.values()) == 4
        with engine.connect() as conn:
            quarantined = {
                (r.stream, r.source_id): r.reason for r in conn.execute(select(QUARANTINE))
            }
            stored = {r[0] for r in conn.execute(select(ORDERS.c.source_id))}
            accounts = conn.execute(select(func.count()).select_from(RECORDS)).scalar()
        assert "total" in quarantined[("orders", str(bad["order_bad_total"]))]
        assert "XYZ" in quarantined[("orders", str(bad["order_bad_currency"]))]
        assert "date_created_gmt" in quarantined[("orders", str(bad["order_bad_date"]))]
        assert [k for k in quarantined if k[0] == "customers"] == [("customers", None)]
        bad_ids = {bad["order_bad_total"], bad["order_bad_currency"], bad["order_bad_date"]}
        assert stored == set(store.orders) - bad_ids
        with_ids = [c for c in store.customers.values() if "id" in c]
        assert len(with_ids) == len(store.customers) - 1
        assert accounts == len(with_ids) + len(store.staff)
        # a second run re-reads them (they are in the overlap) without piling up rows
        wait_next_second()
        again = sync(engine, settings_for(server))
        assert again.status == "partial"
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(QUARANTINE)).scalar() == 4
        engine.dispose()
