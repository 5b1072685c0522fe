"""Windows that neither skip nor repeat rows: ties in the modification sort, and a store
whose clock is not syncd's (issue 18, items 1 and 7)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, parsedate_to_datetime
from typing import Any

import httpx
import pytest
import respx
import structlog
from pydantic import SecretStr
from sqlalchemy import Engine, func, select

from syncd.config import WooCommerceSourceSettings
from syncd.ingest import SourceSync, SyncResult
from syncd.sandbox.server import FaultConfig, SandboxServer
from syncd.sandbox.store import SandboxStore
from syncd.sources.woocommerce.auth import API_ROOT
from syncd.sources.woocommerce.client import WooCommerceClient
from syncd.store.engine import open_store
from syncd.store.models import COUPONS, ORDERS, PRODUCTS, REFUNDS
from tests.test_ingest_e2e import settings_for, wait_next_second

pytestmark = pytest.mark.slow


def run(
    engine: Engine, name: str, settings: WooCommerceSourceSettings, *, full: bool = False
) -> SyncResult:
    async def go() -> SyncResult:
        runner = SourceSync(engine, name, settings)
        try:
            return await runner.run(full=full)
        finally:
            await runner.client.aclose()

    return asyncio.run(go())


def _set_stamp(store: SandboxStore, payload: dict[str, Any], field: str, gmt: str) -> None:
    local = datetime.fromisoformat(gmt).replace(tzinfo=UTC).astimezone(store.timezone)
    payload[f"{field}_gmt"] = gmt
    payload[field] = local.strftime("%Y-%m-%dT%H:%M:%S")


def share_seconds(store: SandboxStore, kind: str, field: str, group: int) -> int:
    """Give every ``group`` records of ``kind`` next to each other in the modification sort
    one shared stamp (the newest of theirs, so no record goes back in time), as a batch of
    refunds or a bulk edit does; returns how many records now share a second."""
    with store.lock:
        entries = store.index(kind)
        ordered = sorted(entries, key=lambda i: (entries[i].modified_gmt, i))
        shared = 0
        for start in range(0, len(ordered), group):
            chunk = ordered[start : start + group]
            stamp = max(entries[i].modified_gmt for i in chunk)
            for record_id in chunk:
                _set_stamp(store, store.payload(kind, record_id), field, stamp)
                store.touch(kind, record_id)
            shared += len(chunk) if len(chunk) > 1 else 0
        return shared


def test_ties_in_the_modification_sort_lose_and_repeat_nothing(store_url: str) -> None:
    """HPOS sorts ``orderby=modified`` with no tie-breaker: rows sharing one second come back
    in another order on each page. Twenty full syncs, each into a source of its own: every
    order and refund is stored exactly once, and the counters count each once."""
    store = SandboxStore(seed=61, customers=40, guests=20, orders=300, refund_rate=0.3)
    # Orders tie in sevens and refunds (sorted by their creation) in fours, so with ten rows
    # a page nearly every page boundary cuts through a group of equal stamps.
    assert share_seconds(store, "orders", "date_modified", 7) == len(store.orders)
    assert share_seconds(store, "refunds", "date_created", 4) >= len(store.refunds) - 3
    assert len(store.refunds) >= 60
    engine = open_store(store_url)
    with SandboxServer(store, faults=FaultConfig(unstable_ties=True, seed=5)) as server:
        settings = settings_for(server, per_page=10)
        for n in range(20):
            name = f"wc{n}"
            result = run(engine, name, settings, full=True)
            assert result.status == "success", result.error
            with engine.connect() as conn:
                for table, expected in ((ORDERS, store.orders), (REFUNDS, store.refunds)):
                    ids = (
                        conn.execute(select(table.c.source_id).where(table.c.source == name))
                        .scalars()
                        .all()
                    )
                    assert len(ids) == len(set(ids)), f"run {n}: a row stored twice"
                    assert set(ids) == set(expected), f"run {n}: {set(expected) - set(ids)} lost"
                runs = conn.execute(select(func.count()).select_from(ORDERS)).scalar_one()
                assert runs == len(store.orders) * (n + 1)
            orders, refunds = result.counts["orders"], result.counts["refunds"]
            assert (orders.fetched, orders.stored) == (len(store.orders), len(store.orders)), n
            assert (refunds.fetched, refunds.stored) == (len(store.refunds), len(store.refunds)), n
            flat = result.flat_counts()  # what the sync-status log line and the run record say
            assert flat["orders.fetched"] == flat["orders.stored"] == len(store.orders)
            assert flat["refunds.fetched"] == flat["refunds.stored"] == len(store.refunds)
    engine.dispose()


def _gmt(value: datetime | None) -> str | None:
    return None if value is None else value.replace(tzinfo=None).isoformat(timespec="seconds")


def assert_every_row_arrived(engine: Engine, store: SandboxStore, step: str) -> None:
    """Every record the store has is stored, in its latest version (by modification time)."""
    with engine.connect() as conn:
        for table, records in (
            (ORDERS, store.orders),
            (PRODUCTS, store.products),
            (COUPONS, store.coupons),
        ):
            stored = {
                r.source_id: _gmt(r.modified_at)
                for r in conn.execute(select(table.c.source_id, table.c.modified_at))
            }
            wanted = {i: p["date_modified_gmt"] for i, p in records.items()}
            missing = {i: m for i, m in wanted.items() if stored.get(i) != m}
            assert not missing, f"{step}: {len(missing)} of {len(wanted)} {table.name} not in"
        refunds = set(conn.execute(select(REFUNDS.c.source_id)).scalars())
        assert set(store.refunds) <= refunds, f"{step}: refunds missing"


@pytest.mark.parametrize(
    "skew", [timedelta(days=2), timedelta(minutes=-30)], ids=["ahead-2d", "behind-30m"]
)
def test_a_store_clock_ahead_or_behind_loses_nothing(store_url: str, skew: timedelta) -> None:
    """The store stamps rows with its own clock. Ahead of syncd, rows look "in the future"
    and a window ending at syncd's now leaves them out; behind by more than the overlap,
    changes fall before the next window starts. Windows end at the store's clock (its Date
    header), so every row arrives on the next sync either way."""
    now = datetime.now(UTC) + skew - timedelta(hours=1)
    store = SandboxStore(seed=62, customers=40, guests=20, orders=300, now=now, clock_skew=skew)
    store.mutate(0.05, seed=1)  # the store's recent changes, stamped by its clock
    wait_next_second()  # a run in the changes' own second sees them one run later
    engine = open_store(store_url)
    with SandboxServer(store) as server:
        date = httpx_date(server.url)
        assert abs(date - (datetime.now(UTC) + skew)) < timedelta(seconds=5)
        settings = settings_for(server, reconcile_every_hours=0)
        first = run(engine, "wc", settings, full=True)
        assert first.status == "success", first.error
        assert_every_row_arrived(engine, store, "first full sync")
        store.mutate(0.05, seed=2)
        wait_next_second()
        second = run(engine, "wc", settings)
        assert second.status == "success", second.error
        assert_every_row_arrived(engine, store, "incremental sync")
    engine.dispose()


def httpx_date(url: str) -> datetime:
    """The Date header the sandbox answers with (even a 401 carries one)."""
    return parsedate_to_datetime(httpx.get(url + "/wp-json/wc/v3/orders").headers["Date"])


API = "https://shop.example" + API_ROOT


def _settings(**overrides: Any) -> WooCommerceSourceSettings:
    values: dict[str, Any] = {
        "url": "https://shop.example",
        "consumer_key": SecretStr("ck_x"),
        "consumer_secret": SecretStr("cs_x"),
        "requests_per_second": 0,
        **overrides,
    }
    return WooCommerceSourceSettings(**values)


def test_store_now_is_the_date_header_never_later_than_the_stores_now() -> None:
    """The store's clock comes from its Date header (whole seconds, the server's second when
    it answered): the bound follows it, to the second, and is never ahead of it."""
    client = WooCommerceClient("wc", _settings())
    stamp = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0)
    with respx.mock:
        route = respx.get(f"{API}/orders").mock(
            return_value=httpx.Response(
                200, json=[], headers={"Date": format_datetime(stamp, usegmt=True)}
            )
        )
        assert client.store_now() is None  # nothing heard yet
        asyncio.run(client.page("orders", {}, 1))
        now = client.store_now()
        assert now is not None and now.microsecond == 0
        # the header's second plus the (sub-second) time since the answer: never less, and
        # never a second past what the store can have reached
        assert stamp <= now <= stamp + timedelta(seconds=1)
        route.mock(return_value=httpx.Response(200, json=[], headers={"Date": "yesterday"}))
        asyncio.run(client.page("orders", {}, 1))
        kept = client.store_now()
        assert kept is not None and stamp <= kept <= stamp + timedelta(seconds=1)
    asyncio.run(client.aclose())


def test_without_a_date_header_windows_end_at_syncds_clock_and_it_is_said_once(
    tmp_path: Any,
) -> None:
    engine = open_store(f"sqlite:///{tmp_path}/s.db")
    fixed = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
    settings = _settings()
    with respx.mock, structlog.testing.capture_logs() as logs:
        route = respx.get(f"{API}/refunds").mock(
            return_value=httpx.Response(
                200, json=[], headers={"X-WP-Total": "0", "X-WP-TotalPages": "0"}
            )
        )

        async def go() -> list[SyncResult]:
            results = []
            for _ in range(2):
                runner = SourceSync(engine, "nodate", settings, clock=lambda: fixed)
                results.append(await runner.run(streams=["refunds"]))
                await runner.client.aclose()
            return results

        results = asyncio.run(go())
    assert [r.status for r in results] == ["success", "success"]
    windows = [c.request for c in route.calls if "modified_before" in c.request.url.params]
    assert windows and {c.url.params["modified_before"] for c in windows} == {"2026-03-01T12:00:00"}
    warned = [e for e in logs if "no usable Date header" in e["event"]]
    assert len(warned) == 1 and warned[0]["source"] == "nodate"
    engine.dispose()
