"""Edge cases of incremental sync that lose rows in naive connectors."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import Engine, select

from syncd.ingest import SourceSync, SyncResult
from syncd.sandbox.server import SandboxServer
from syncd.sandbox.store import SandboxStore
from syncd.store.engine import open_store
from syncd.store.models import CUSTOMER_RECORDS as RECORDS
from syncd.store.models import ORDERS
from tests.test_ingest_e2e import settings_for, sync, wait_next_second

pytestmark = pytest.mark.slow


def stamp_now(store: SandboxStore, payload: dict[str, Any], field: str = "date_modified") -> None:
    """Set a WooCommerce date pair (local and _gmt) to the real current second."""
    now = datetime.now(UTC).replace(microsecond=0)
    payload[f"{field}_gmt"] = now.strftime("%Y-%m-%dT%H:%M:%S")
    payload[field] = now.astimezone(store.timezone).strftime("%Y-%m-%dT%H:%M:%S")


def set_status(store: SandboxStore, order_id: int, status: str) -> None:
    """Change an order's status now, as WooCommerce does (trash and restore included)."""
    with store.lock:
        store.orders[order_id]["status"] = status
        stamp_now(store, store.orders[order_id])
        store.touch("orders", order_id)


def stored_orders(engine: Engine) -> dict[int, Any]:
    with engine.connect() as conn:
        return {r.source_id: r for r in conn.execute(select(ORDERS))}


def test_a_row_modified_mid_window_does_not_hide_its_neighbours(store_url: str) -> None:
    """Offset paging over ``orderby=modified``: a row that changes while the window is read
    leaves it, every later row moves one place up, and the row at a page boundary would
    never be read. syncd sees X-WP-Total drop and reads on from its last safe checkpoint."""
    store = SandboxStore(seed=41, customers=40, guests=20, orders=1000)
    with SandboxServer(store) as server:
        respond = server._respond
        first_page_ids: list[int] = []
        done = False

        def mutate_when_page_5_is_asked(query: Any, raw_query: str, path: str) -> Any:
            nonlocal done
            if path == "orders" and query.page == 5 and not done and first_page_ids:
                done = True
                with store.lock:  # a shopper edits an order from page 1 right now
                    order = store.orders[first_page_ids[0]]
                    order["customer_note"] = "please gift-wrap"
                    stamp_now(store, order)
                    store.touch("orders", order["id"])
            body, headers = respond(query, raw_query, path)
            if path == "orders" and query.page == 1 and not first_page_ids:
                first_page_ids.extend(o["id"] for o in orjson.loads(body))
            return body, headers

        server._respond = mutate_when_page_5_is_asked  # type: ignore[method-assign]
        engine = open_store(store_url)
        result = sync(engine, settings_for(server, concurrency=1))
        assert done, "the mutation must happen mid-window"
        assert result.status == "success", result.error
        assert result.counts["orders"].passes >= 3  # the live window was read again
        # every order the store had when the run began is in, none skipped at a boundary
        assert set(stored_orders(engine)) == set(store.orders)
        engine.dispose()


def test_hosts_that_strip_paging_headers_are_read_to_the_last_short_page(tmp_path: Path) -> None:
    store = SandboxStore(seed=42, customers=20, guests=10, orders=350)
    with SandboxServer(store) as server:
        respond = server._respond

        def without_totals(query: Any, raw_query: str, path: str) -> Any:
            body, headers = respond(query, raw_query, path)
            return body, {k: v for k, v in headers.items() if not k.startswith("X-WP-")}

        server._respond = without_totals  # type: ignore[method-assign]
        engine = open_store(f"sqlite:///{tmp_path}/s.db")
        result = sync(engine, settings_for(server))
        assert result.status == "success", result.error
        assert set(stored_orders(engine)) == set(store.orders)
        engine.dispose()


def test_trash_then_restore(store_url: str) -> None:
    store = SandboxStore(seed=43, customers=20, guests=10, orders=120)
    victim = next(i for i, o in store.orders.items() if o["status"] == "completed")
    with SandboxServer(store) as server:
        engine = open_store(store_url)
        settings = settings_for(server)
        assert sync(engine, settings).status == "success"
        set_status(store, victim, "trash")
        wait_next_second()
        assert sync(engine, settings).status == "success"
        row = stored_orders(engine)[victim]
        assert row.status == "trash" and row.deleted_at is not None
        set_status(store, victim, "completed")
        wait_next_second()
        assert sync(engine, settings).status == "success"
        row = stored_orders(engine)[victim]
        assert row.status == "completed" and row.deleted_at is None
        engine.dispose()


def test_a_deleted_account_is_marked_and_its_person_keeps_its_orders(store_url: str) -> None:
    store = SandboxStore(seed=44, customers=30, guests=10, orders=200)
    with SandboxServer(store) as server:
        engine = open_store(store_url)
        settings = settings_for(server)
        assert sync(engine, settings).status == "success"
        buyers = {o["customer_id"] for o in store.orders.values() if o["customer_id"]}
        gone = next(c for c in sorted(store.customers) if c in buyers)
        store.delete_customer(gone)
        wait_next_second()
        result = sync(engine, settings)
        assert result.status == "success", result.error
        assert result.counts["customers"].deleted == 1
        with engine.connect() as conn:
            record = conn.execute(select(RECORDS).where(RECORDS.c.source_id == gone)).one()
            orders = (
                conn.execute(
                    select(ORDERS.c.customer_id).where(ORDERS.c.customer_source_id == gone)
                )
                .scalars()
                .all()
            )
        assert record.deleted_at is not None
        assert orders and set(orders) == {record.customer_id}  # history stays with the person
        engine.dispose()


def test_one_source_sync_object_runs_again(tmp_path: Path) -> None:
    """The daemon keeps one SourceSync per source and runs it on every schedule tick."""
    store = SandboxStore(seed=45, customers=10, guests=5, orders=60)
    with SandboxServer(store) as server:
        engine = open_store(f"sqlite:///{tmp_path}/s.db")

        async def twice() -> list[SyncResult]:
            runner = SourceSync(engine, "wc", settings_for(server))
            try:
                first = await runner.run()
                store.mutate(0.05, seed=1)
                await asyncio.sleep(1.05)  # past the mutation's second (windows end at run start)
                return [first, await runner.run()]
            finally:
                await runner.client.aclose()

        first, second = asyncio.run(twice())
        assert first.status == second.status == "success", (first.error, second.error)
        assert second.counts["orders"].fetched < first.counts["orders"].fetched
        assert set(stored_orders(engine)) == set(store.orders) | store.deleted["orders"]
        engine.dispose()
