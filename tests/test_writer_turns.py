"""No writer lock held across a wait on the network (issue 19): on SQLite the jobs and the
webhook applies take turns per write transaction, so a source job stuck on a store that
never answers, or a push stuck on a destination that never answers, does not hold up a
webhook delivery. Real HTTP on 127.0.0.1: the store sandbox, a TCP server that accepts and
never answers, and a proxy that answers a collection's first page and never the second."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import Engine, select, update

from syncd.config import WooCommerceSourceSettings
from syncd.daemon import Daemon
from syncd.ingest import SourceSync
from syncd.mapping import load_mappings
from syncd.sandbox.server import SandboxServer
from syncd.sandbox.store import SandboxStore
from syncd.segments.recompute import recompute
from syncd.store.engine import open_store, writer_lock
from syncd.store.models import COUPONS
from syncd.store.models import CUSTOMER_RECORDS as RECORDS
from syncd.store.models import SYNC_RUNS as RUNS
from syncd.store.models import SYNC_STATE as STATE
from tests.conftest import fixture
from tests.test_daemon import hook_mapping, make_settings, presync, wait_for_job_threads
from tests.test_shutdown import HungStore
from tests.test_webhooks import harness

APPLY_WITHIN = 2.0  # s: a delivery waits for a write transaction, never for the network


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    # The lock is SQLite's: on Postgres it is a no-op and writers run side by side.
    eng = open_store(f"sqlite:///{tmp_path}/store.db")
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture(scope="module")
def shop() -> Iterator[SandboxServer]:
    store = SandboxStore(seed=5, customers=15, guests=5, orders=40, products=3, coupons=30)
    with SandboxServer(store) as server:
        yield server


def _running(engine: Engine, kind: str) -> bool:
    with engine.connect() as conn:
        return (
            conn.execute(
                select(RUNS.c.id).where(RUNS.c.kind == kind, RUNS.c.status == "running")
            ).first()
            is not None
        )


async def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.05)


async def _apply_a_delivery(engine: Engine, url: str) -> float:
    """Seconds from a signed customer.updated delivery to its record in the store."""
    customer = fixture("customer_single.json")
    async with harness(engine, url) as h:
        sent = time.monotonic()
        await h.send("customer.updated", customer)
        await h.settle(timeout=APPLY_WITHIN + 3)
        took = time.monotonic() - sent
    with engine.connect() as conn:
        email = conn.execute(
            select(RECORDS.c.email).where(
                RECORDS.c.source == "shop", RECORDS.c.source_id == customer["id"]
            )
        ).scalar()
    assert email == customer["email"].strip().lower()
    return took


def test_a_webhook_is_applied_while_a_source_job_waits_on_a_store_that_never_answers(
    sqlite_engine: Engine, shop: SandboxServer
) -> None:
    engine = sqlite_engine
    with HungStore() as hung:
        settings = make_settings(shop, url=hung.url)  # source "wc" at the silent server

        async def main() -> float:
            daemon = Daemon(engine, settings, [], catch_up=True, recompute_every=None)
            await daemon.start()
            try:
                # The catch-up sync of "wc" is under way and waits on the store's answer.
                await _wait(lambda: bool(hung.accepted), 10, "the sync to reach the store")
                await _wait(lambda: _running(engine, "source"), 10, "the run to be recorded")
                took = await _apply_a_delivery(engine, shop.url)
                assert _running(engine, "source")  # the job was still stuck meanwhile
                return took
            finally:
                await daemon.stop(timeout=5)

        took = asyncio.run(main())
        wait_for_job_threads()
    assert took < APPLY_WITHIN, took


def test_a_webhook_is_applied_while_a_push_waits_on_a_destination_that_never_answers(
    sqlite_engine: Engine, shop: SandboxServer, tmp_path: Path
) -> None:
    engine = sqlite_engine
    with HungStore() as hung:

        class Hung:  # the destination's address: the mapping's webhook URL
            @staticmethod
            def webhook_url(receiver: str) -> str:
                return f"{hung.url}/hooks/{receiver}"

        mapping = hook_mapping(tmp_path, Hung(), "everyone", "everyone")  # type: ignore[arg-type]
        settings = make_settings(shop, mappings=[mapping])
        presync(engine, settings)
        recompute(engine, settings)

        async def main() -> float:
            daemon = Daemon(
                engine, settings, load_mappings(settings), catch_up=False, recompute_every=None
            )
            await daemon.start()
            try:
                assert daemon.run_now("destination:to-everyone")
                await _wait(lambda: bool(hung.accepted), 10, "the push to reach the destination")
                await asyncio.sleep(0.3)  # its batch is sent and waits for an answer
                took = await _apply_a_delivery(engine, shop.url)
                assert _running(engine, "destination")
                return took
            finally:
                await daemon.stop(timeout=5)

        took = asyncio.run(main())
        wait_for_job_threads()
    assert took < APPLY_WITHIN, took


class FirstPageOnly:
    """A proxy on 127.0.0.1 in front of the store sandbox: it forwards every request but
    those for page 2 or later of ``path``, which it holds without an answer until closed."""

    def __init__(self, upstream: str, path: str) -> None:
        self.forwarded: list[Any] = []  # the bodies of ``path``'s pages it answered
        self.held = 0
        released = self._released = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                page = int(parse_qs(parts.query).get("page", ["1"])[0])
                if parts.path.endswith(f"/{path}") and page >= 2:
                    owner.held += 1
                    released.wait()
                    return
                answer = httpx.get(upstream + self.path, timeout=10)
                if parts.path.endswith(f"/{path}"):
                    owner.forwarded.append(answer.json())
                self.send_response(answer.status_code)
                for name in ("Content-Type", "Date", "X-WP-Total", "X-WP-TotalPages"):
                    if name in answer.headers:
                        self.send_header(name, answer.headers[name])
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> FirstPageOnly:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()


def _gmt(value: str) -> datetime:
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


def test_a_page_waiting_for_the_next_one_is_committed_with_its_cursor_and_frees_the_store(
    sqlite_engine: Engine, shop: SandboxServer
) -> None:
    engine = sqlite_engine
    with FirstPageOnly(shop.url, "coupons") as proxy:
        settings = WooCommerceSourceSettings(
            url=proxy.url,
            consumer_key=SecretStr(shop.consumer_key),
            consumer_secret=SecretStr(shop.consumer_secret),
            auth="query",
            requests_per_second=None,
            per_page=10,
            streams=["coupons"],
        )

        async def main() -> None:
            runner = SourceSync(engine, "stuck", settings)
            task = asyncio.create_task(runner.run())
            try:
                await _wait(lambda: proxy.held > 0 and proxy.forwarded, 10, "page 2 asked")
                # Page 1 is in the store with its cursor while page 2 is on its way: the
                # transaction did not wait for the network (it batches only pages that
                # are already there).
                await _wait(lambda: _coupons(engine) == 10, APPLY_WITHIN, "page 1 committed")
                # The window's full first page (the trash's first page and the clock probe
                # are the other coupons requests answered).
                (page1,) = [body for body in proxy.forwarded if len(body) == 10]
                newest = max(_gmt(c["date_modified_gmt"]) for c in page1)
                assert _cursor(engine) == newest
                # And another writer gets its turn at once.
                started = time.monotonic()
                wrote = await asyncio.wait_for(asyncio.to_thread(_write, engine), APPLY_WITHIN)
                assert wrote and time.monotonic() - started < APPLY_WITHIN
                assert not task.done()
            finally:
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                await runner.client.aclose()

        asyncio.run(main())
    # Cut off mid-window: the committed page and its cursor stand, for the next run.
    assert _coupons(engine) == 10
    with engine.connect() as conn:
        assert conn.execute(select(RUNS.c.status)).scalars().all() == ["abandoned"]


def _coupons(engine: Engine) -> int:
    with engine.connect() as conn:
        return len(conn.execute(select(COUPONS.c.id).where(COUPONS.c.source == "stuck")).all())


def _cursor(engine: Engine) -> datetime | None:
    with engine.connect() as conn:
        value: datetime | None = conn.execute(
            select(STATE.c.cursor).where(STATE.c.source == "stuck", STATE.c.stream == "coupons")
        ).scalar()
    return value


def _write(engine: Engine) -> bool:
    """A write in turn, as a webhook apply writes (see WebhookIntake)."""
    with writer_lock(engine), engine.begin() as conn:
        conn.execute(
            update(STATE)
            .where(STATE.c.source == "stuck", STATE.c.stream == "coupons")
            .values(updated_at=datetime.now(UTC))
        )
    return True


def test_a_delivery_waiting_on_the_store_api_does_not_hold_up_the_other_writers(
    sqlite_engine: Engine,
) -> None:
    engine = sqlite_engine
    order = fixture("order_single.json")
    order["customer_id"] = 4242  # an account the store has not seen: fetched before storing
    with HungStore() as hung:

        async def main() -> None:
            async with harness(engine, hung.url) as h:
                await h.send("order.created", order)
                await _wait(lambda: bool(hung.accepted), 10, "the apply to ask the store")
                started = time.monotonic()
                wrote = await asyncio.wait_for(asyncio.to_thread(_write, engine), APPLY_WITHIN)
                assert wrote and time.monotonic() - started < APPLY_WITHIN
                assert h.intake.stats.applied == 0  # still waiting on the store

        asyncio.run(main())
