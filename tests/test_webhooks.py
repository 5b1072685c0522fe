"""WooCommerce webhooks: signature, ping, idempotent storage, applying through the polling path.

Deliveries are built the way WooCommerce core builds them (class-wc-webhook.php): the body is
the resource's JSON, signed base64(HMAC-SHA256(body, secret)), with the X-WC-Webhook-*
headers; deletions send {"id": N}; the creation ping is the form body webhook_id=N with no
X-WC headers. Payloads are the WooCommerce docs' examples (tests/fixtures/woocommerce) and the
sandbox store's records; the sandbox (127.0.0.1) answers the calls a poll would also make.
Expected values are computed here from the payloads with Decimal, not with syncd's parsers.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr
from sqlalchemy import Engine, func, select
from starlette.applications import Starlette
from starlette.routing import Route

from syncd.config import Settings, WooCommerceSourceSettings
from syncd.ingest import SourceSync
from syncd.sandbox.server import SandboxServer
from syncd.sandbox.store import SandboxStore
from syncd.segments.recompute import recompute
from syncd.sources import webhooks as webhooks_module
from syncd.sources.inbox import open_inbox
from syncd.sources.webhooks import WebhookIntake
from syncd.sources.woocommerce.webhooks import RESOURCE_EVENTS
from syncd.store.engine import open_store
from syncd.store.models import (
    COUPONS,
    CUSTOMERS,
    EVENTS,
    ORDERS,
    PRODUCTS,
    PROFILES,
    QUARANTINE,
    REFUNDS,
)
from syncd.store.models import CUSTOMER_RECORDS as RECORDS
from tests.conftest import fixture
from tests.storedump import diff, dump

SECRET = "wc-webhook-secret: with spaces & symbols"
UA = "WooCommerce/9.8.0 Hookshot (WordPress/6.8)"


# -- deliveries as WooCommerce sends them -----------------------------------------------


def sign(body: bytes, secret: str = SECRET) -> str:
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


def delivery(
    topic: str, payload: Any, *, delivery_id: str | None = None, secret: str = SECRET
) -> tuple[bytes, dict[str, str]]:
    body = orjson.dumps(payload)
    resource, _, event = topic.partition(".")
    headers = {
        "User-Agent": UA,
        "Content-Type": "application/json",
        "X-WC-Webhook-Source": "https://example.com/",
        "X-WC-Webhook-Topic": topic,
        "X-WC-Webhook-Resource": resource,
        "X-WC-Webhook-Event": event,
        "X-WC-Webhook-Signature": sign(body, secret),
        "X-WC-Webhook-ID": "17",
        "X-WC-Webhook-Delivery-ID": delivery_id or uuid.uuid4().hex,
    }
    return body, headers


def cents(value: str) -> int:
    return int(Decimal(value) * 100)


# -- the service around the intake ------------------------------------------------------


def make_settings(url: str) -> Settings:
    def source(secret: str | None) -> WooCommerceSourceSettings:
        return WooCommerceSourceSettings(
            url=url,
            consumer_key=SecretStr("ck_sandbox"),
            consumer_secret=SecretStr("cs_sandbox"),
            webhook_secret=SecretStr(secret) if secret else None,
            requests_per_second=0,
        )

    return Settings(sources={"shop": source(SECRET), "nosecret": source(None)})


@dataclass
class Harness:
    engine: Engine
    intake: WebhookIntake
    client: httpx.AsyncClient
    changed: list[tuple[str, set[int]]] = field(default_factory=list)

    async def post(
        self, body: bytes, headers: dict[str, str], source: str = "shop"
    ) -> httpx.Response:
        return await self.client.post(f"/webhooks/{source}", content=body, headers=headers)

    async def send(self, topic: str, payload: Any, **kw: Any) -> httpx.Response:
        body, headers = delivery(topic, payload, **kw)
        response = await self.post(body, headers)
        assert response.status_code == 200, response.text
        return response

    async def settle(self, timeout: float = 15.0) -> None:
        """Wait until the worker has applied (or given up on) every stored delivery."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.intake.backlog == 0 and count(self.engine, EVENTS, status="pending") == 0:
                return
            await asyncio.sleep(0.02)
        raise AssertionError("webhook deliveries still pending")


@asynccontextmanager
async def harness(engine: Engine, url: str, *, start: bool = True) -> AsyncIterator[Harness]:
    changed: list[tuple[str, set[int]]] = []

    async def on_applied(source: str, people: set[int]) -> None:
        changed.append((source, people))

    intake = WebhookIntake(engine, make_settings(url), on_applied=on_applied)
    app = Starlette(routes=[Route("/webhooks/{source}", intake.endpoint, methods=["POST"])])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://syncd.test") as client:
        if start:
            await intake.start()
        try:
            yield Harness(engine, intake, client, changed)
        finally:
            await intake.stop(timeout=5)
            intake.close()


def count(engine: Engine, table: Any, **where: Any) -> int:
    query = select(func.count()).select_from(table)
    for column, value in where.items():
        query = query.where(table.c[column] == value)
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def stored(engine: Engine, **where: Any) -> int:
    """Deliveries stored: rows of events, plus what a SQLite store's journal holds that is not
    moved into events yet (see syncd.sources.inbox)."""
    inbox = open_inbox(engine)
    try:
        return count(engine, EVENTS, **where) + inbox.unmoved
    finally:
        inbox.close()


def one(engine: Engine, table: Any, source_id: int) -> Any:
    with engine.connect() as conn:
        return conn.execute(
            select(table).where(table.c.source == "shop", table.c.source_id == source_id)
        ).one()


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxServer]:
    store = SandboxStore(seed=3, customers=5, guests=2, orders=12, products=4, coupons=2)
    with SandboxServer(store) as server:
        yield server


@pytest.fixture
def small_shop() -> Iterator[SandboxServer]:
    """A store of its own for a test that changes it. Order 25 is customer 5's only order:
    completed, 51.92 USD, no refunds."""
    store = SandboxStore(
        seed=4, customers=3, guests=1, orders=6, products=3, coupons=0, refund_rate=0
    )
    with SandboxServer(store) as server:
        yield server


async def poll(engine: Engine, url: str) -> None:
    # A poll reads up to its start, exclusive and to the second (WooCommerce's
    # modified_before): a change stamped in this very second is left to the next poll.
    await asyncio.sleep(1.02 - time.time() % 1)
    runner = SourceSync(engine, "shop", make_settings(url).sources["shop"])
    try:
        assert (await runner.run()).status == "success"
    finally:
        await runner.client.aclose()


# -- applying -----------------------------------------------------------------------------


def test_valid_deliveries_are_applied_once_even_when_delivered_twice(
    engine: Engine, sandbox: SandboxServer
) -> None:
    order, customer = fixture("order_single.json"), fixture("customer_single.json")
    product, coupon = fixture("product_single.json"), fixture("coupon_single.json")
    sent = [
        ("customer.created", customer),
        ("product.updated", product),
        ("coupon.created", coupon),
        ("order.created", order),
    ]

    async def go() -> Harness:
        async with harness(engine, sandbox.url) as h:
            for topic, payload in sent:
                body, headers = delivery(topic, payload)
                first = await h.post(body, headers)
                again = await h.post(body, headers)  # a proxy retrying the same request
                assert (first.status_code, first.json()) == (200, {"status": "accepted"})
                assert (again.status_code, again.json()) == (200, {"status": "duplicate"})
            await h.settle()
            return h

    h = asyncio.run(go())
    assert count(engine, EVENTS) == 4
    assert count(engine, EVENTS, status="applied") == 4
    assert (h.intake.stats.received, h.intake.stats.duplicates) == (4, 4)
    assert h.intake.stats.applied == 4
    assert count(engine, QUARANTINE) == 0

    stored_order = one(engine, ORDERS, order["id"])
    assert stored_order.total_minor == cents(order["total"]) == 2935
    assert stored_order.status == order["status"]
    assert stored_order.customer_source_id == 0  # a guest order
    record = one(engine, RECORDS, customer["id"])
    assert record.email == customer["email"].strip().lower()
    assert one(engine, PRODUCTS, product["id"]).price_minor == cents(product["price"])
    stored_coupon = one(engine, COUPONS, coupon["id"])
    assert stored_coupon.code == coupon["code"]
    assert stored_coupon.currency == "USD"  # the sandbox store's, asked as a poll asks
    # The docs' guest order is billed to the account's email: one person (people merge on
    # normalized email), reported changed by both deliveries and by nothing else.
    assert stored_order.customer_id == record.customer_id is not None
    assert h.changed == [("shop", {record.customer_id})] * 2
    assert {source for source, _ in h.changed} == {"shop"}


def test_deliveries_sharing_a_delivery_id_within_a_second_are_both_kept(
    engine: Engine, sandbox: SandboxServer
) -> None:
    # WooCommerce's delivery id is wp_hash(webhook id . unix second): two orders updated in
    # one second by one webhook arrive with the same id but different bodies.
    guest, registered = fixture("orders_list.json")
    registered = {**registered, "customer_id": 0}  # keep this test off the network

    async def go() -> None:
        async with harness(engine, sandbox.url) as h:
            await h.send("order.updated", guest, delivery_id="a" * 32)
            await h.send("order.updated", registered, delivery_id="a" * 32)
            await h.settle()

    asyncio.run(go())
    assert count(engine, EVENTS, status="applied") == 2
    assert count(engine, ORDERS) == 2


def test_an_order_of_an_unseen_account_fetches_the_account_like_a_poll(
    engine: Engine, sandbox: SandboxServer
) -> None:
    order = copy.deepcopy(next(o for o in sandbox.store.orders.values() if o["customer_id"] > 0))
    account = sandbox.store.customers[order["customer_id"]]

    async def go() -> Harness:
        async with harness(engine, sandbox.url) as h:
            await h.send("order.created", order)
            await h.settle()
            return h

    h = asyncio.run(go())
    stored = one(engine, ORDERS, order["id"])
    record = one(engine, RECORDS, account["id"])
    assert stored.customer_id == record.customer_id is not None
    assert record.email == account["email"].strip().lower()
    assert h.changed == [("shop", {record.customer_id})]


def test_a_variation_refreshes_its_parent_and_siblings(
    engine: Engine, sandbox: SandboxServer
) -> None:
    parent_id = next(pid for pid, vs in sandbox.store.variations.items() if len(vs) > 1)
    variation_id, variation = next(iter(sandbox.store.variations[parent_id].items()))
    # GET /wc/v3/products/{variation id} (the webhook payload) says what it is.
    payload = {**copy.deepcopy(variation), "type": "variation", "parent_id": parent_id}

    async def go() -> None:
        async with harness(engine, sandbox.url) as h:
            await h.send("product.updated", payload)
            await h.settle()

    asyncio.run(go())
    assert one(engine, PRODUCTS, parent_id).type == "variable"
    for vid in sandbox.store.variations[parent_id]:
        assert one(engine, PRODUCTS, vid).parent_source_id == parent_id
    assert one(engine, PRODUCTS, variation_id).price_minor == cents(variation["price"])


def test_deleted_events_mark_rows_deleted_and_report_their_people(
    engine: Engine, sandbox: SandboxServer
) -> None:
    order, customer = fixture("order_single.json"), fixture("customer_single.json")
    product = fixture("product_single.json")

    async def go() -> Harness:
        async with harness(engine, sandbox.url) as h:
            await h.send("order.created", order)
            await h.send("customer.created", customer)
            await h.send("product.created", product)
            await h.settle()
            h.changed.clear()
            await h.send("order.deleted", {"id": order["id"]})
            await h.send("customer.deleted", {"id": customer["id"]})
            # Post hooks may hand WooCommerce the id as a string.
            await h.send("product.deleted", {"id": str(product["id"])})
            await h.settle()
            return h

    h = asyncio.run(go())
    assert one(engine, ORDERS, order["id"]).deleted_at is not None
    assert one(engine, RECORDS, customer["id"]).deleted_at is not None
    assert one(engine, PRODUCTS, product["id"]).deleted_at is not None
    people = {one(engine, ORDERS, order["id"]).customer_id}
    people.add(one(engine, RECORDS, customer["id"]).customer_id)
    assert {p for _, changed in h.changed for p in changed} == people
    assert count(engine, EVENTS, status="applied") == 6


def test_a_late_older_delivery_does_not_roll_a_record_back(
    engine: Engine, sandbox: SandboxServer
) -> None:
    newer = {**fixture("order_single.json"), "status": "completed"}
    older = {**newer, "status": "on-hold", "date_modified_gmt": "2017-03-22T19:00:00"}
    assert older["date_modified_gmt"] < newer["date_modified_gmt"]

    async def go() -> Harness:
        async with harness(engine, sandbox.url) as h:
            await h.send("order.updated", newer)
            await h.settle()
            await h.send("order.updated", older)
            await h.settle()
            return h

    h = asyncio.run(go())
    assert one(engine, ORDERS, newer["id"]).status == "completed"
    assert h.intake.stats.stale == 1
    assert count(engine, EVENTS, status="applied") == 2


def test_a_refund_webhook_brings_the_refund_rows_and_the_profile_net_in_line(
    engine: Engine, small_shop: SandboxServer
) -> None:
    # WooCommerce fires order.updated for a refund (woocommerce_order_refunded), with the
    # order's "refunds" list; profiles count the refund rows. Customer 5's one order, 51.92:
    # refunded 22.29 (seen by a poll), then 6.90 (by webhook only): net 51.92 - 22.29 - 6.90
    # = 22.73. Then the 22.29 refund is deleted (by webhook only): net 51.92 - 6.90 = 45.02.
    store, settings = small_shop.store, make_settings(small_shop.url)
    order = store.orders[25]
    assert (order["customer_id"], order["status"], order["total"]) == (5, "completed", "51.92")
    assert [o["id"] for o in store.orders.values() if o["customer_id"] == 5] == [25]

    def net() -> tuple[int, str]:
        with engine.connect() as conn:
            row = conn.execute(
                select(PROFILES.c.net_revenue_minor, PROFILES.c.currency)
                .join(ORDERS, ORDERS.c.customer_id == PROFILES.c.customer_id)
                .where(ORDERS.c.source_id == 25)
            ).one()
        return row.net_revenue_minor, row.currency

    def refunds() -> dict[int, tuple[int, bool]]:
        with engine.connect() as conn:
            return {
                r.source_id: (r.amount_minor, r.deleted_at is None)
                for r in conn.execute(select(REFUNDS).where(REFUNDS.c.order_source_id == 25))
            }

    async def deliver_order() -> list[tuple[str, set[int]]]:
        async with harness(engine, small_shop.url) as h:
            await h.send("order.updated", copy.deepcopy(store.orders[25]))
            await h.settle()
            assert count(engine, EVENTS, status="pending") == 0
            return h.changed

    def scoped_recompute(changed: list[tuple[str, set[int]]]) -> None:
        # What the daemon does with the people a delivery reports (customers_changed).
        people = {p for _, ps in changed for p in ps}
        assert len(people) == 1
        assert recompute(engine, settings, customers=people).scope == 1

    first = store.refund_order(25, Decimal("22.29"))
    asyncio.run(poll(engine, small_shop.url))
    recompute(engine, settings)  # the full one scoped runs are scored against
    assert net() == (5192 - 2229, "USD")

    second = store.refund_order(25, Decimal("6.90"))
    scoped_recompute(asyncio.run(deliver_order()))
    assert net() == (2273, "USD")
    assert refunds() == {first["id"]: (2229, True), second["id"]: (690, True)}

    store.delete_refund(first["id"])
    scoped_recompute(asyncio.run(deliver_order()))
    assert net() == (4502, "USD")
    assert refunds() == {first["id"]: (2229, False), second["id"]: (690, True)}
    assert one(engine, ORDERS, 25).refunded_minor == 690


def test_a_trash_webhook_stores_the_order_a_poll_of_the_trash_stores(
    engine: Engine, small_shop: SandboxServer, tmp_path: Path
) -> None:
    # order.deleted fires on trash only, with {"id": N}; the trashed order is still served
    # with status "trash". A PUT of a status restores it with no webhook of its own (a poll
    # brings it back); any later order.updated of the order carries the live status.
    store = small_shop.store
    asyncio.run(poll(engine, small_shop.url))
    assert one(engine, ORDERS, 24).status == "completed"
    trashed = store.trash_order(24)
    trashed_at = datetime.fromisoformat(trashed["date_modified_gmt"]).replace(tzinfo=UTC)

    async def deliver(topic: str, payload: Any) -> list[tuple[str, set[int]]]:
        async with harness(engine, small_shop.url) as h:
            await h.send(topic, payload)
            await h.settle()
            assert count(engine, EVENTS, status="pending") == 0
            return h.changed

    changed = asyncio.run(deliver("order.deleted", {"id": 24}))
    row = one(engine, ORDERS, 24)
    assert (row.status, row.deleted_at, row.modified_at) == ("trash", trashed_at, trashed_at)
    assert changed == [("shop", {row.customer_id})]
    polled = open_store(f"sqlite:///{tmp_path}/polled.db")
    try:
        asyncio.run(poll(polled, small_shop.url))
        assert diff(dump(engine, "shop"), dump(polled, "shop")) == {}
        by_poll = one(polled, ORDERS, 24)
    finally:
        polled.dispose()
    assert (by_poll.status, by_poll.deleted_at, by_poll.modified_at) == tuple(
        getattr(row, c) for c in ("status", "deleted_at", "modified_at")
    )

    restored = store.set_order_status(24, "completed")
    asyncio.run(deliver("order.updated", copy.deepcopy(restored)))
    row = one(engine, ORDERS, 24)
    assert (row.status, row.deleted_at) == ("completed", None)


def test_a_trash_webhook_for_an_order_deleted_for_good_since_marks_it_deleted(
    engine: Engine, small_shop: SandboxServer
) -> None:
    # Trashed, then force-deleted before the delivery is applied: neither the trash nor the
    # live orders have it any more, so it is marked deleted the way reconciliation marks a
    # missing order (no status to read: the stored one is kept).
    asyncio.run(poll(engine, small_shop.url))
    small_shop.store.trash_order(23)
    small_shop.store.delete_order(23)

    async def go() -> None:
        async with harness(engine, small_shop.url) as h:
            await h.send("order.deleted", {"id": 23})
            await h.settle()

    asyncio.run(go())
    row = one(engine, ORDERS, 23)
    assert (row.status, row.deleted_at is not None) == ("completed", True)
    assert count(engine, EVENTS, status="applied") == 1


@pytest.mark.parametrize("topic", ["order.updated", "order.deleted"])
def test_a_delivery_whose_refunds_or_trash_cannot_be_read_waits_for_a_retry(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, topic: str
) -> None:
    # The store's API is down: nothing of the delivery is stored, it stays pending and is
    # tried again (then polling covers it: the order's refunds and the trash are polled).
    monkeypatch.setattr(webhooks_module, "APPLY_MAX_ATTEMPTS", 1)
    order = {
        **fixture("order_single.json"),
        "refunds": [{"id": 900, "reason": "", "total": "-5.00"}],
    }

    payload = order if topic == "order.updated" else {"id": order["id"]}
    assert_left_pending(engine, topic, payload)
    assert count(engine, ORDERS) == count(engine, REFUNDS) == 0


def assert_left_pending(engine: Engine, topic: str, payload: Any) -> None:
    """Deliver ``payload`` with the store's API unreachable (port 9): the delivery is tried
    once, fails, and stays pending with the error."""

    async def go() -> None:
        async with harness(engine, "http://127.0.0.1:9") as h:
            await h.send(topic, payload)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and h.intake.stats.retries == 0:
                await asyncio.sleep(0.02)

    asyncio.run(go())
    with engine.connect() as conn:
        row = conn.execute(select(EVENTS.c.status, EVENTS.c.attempts, EVENTS.c.error)).one()
    assert (row.status, row.attempts) == ("pending", 1)
    assert row.error


def test_restart_applies_deliveries_left_pending(engine: Engine, sandbox: SandboxServer) -> None:
    order, customer = fixture("order_single.json"), fixture("customer_single.json")

    async def receive_only() -> None:
        # A process that stored and answered, then died before its worker applied anything.
        async with harness(engine, sandbox.url, start=False) as h:
            await h.send("order.created", order)
            await h.send("customer.created", customer)

    async def restart() -> Harness:
        async with harness(engine, sandbox.url) as h:
            await h.settle()
            return h

    asyncio.run(receive_only())
    assert stored(engine, status="pending") == 2
    assert count(engine, ORDERS) == count(engine, RECORDS) == 0
    h = asyncio.run(restart())
    assert count(engine, EVENTS, status="applied") == 2
    assert one(engine, ORDERS, order["id"]).total_minor == cents(order["total"])
    assert one(engine, RECORDS, customer["id"]).deleted_at is None
    assert h.intake.stats.applied == 2
    assert all(lag >= 0 for _, lag in h.intake.stats.drain_lag())


def test_a_delivery_that_cannot_be_applied_stays_pending_for_a_retry(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The store is down: a coupon's amounts need its currency, which a poll would ask for.
    monkeypatch.setattr(webhooks_module, "APPLY_MAX_ATTEMPTS", 1)
    coupon = fixture("coupon_single.json")

    assert_left_pending(engine, "coupon.updated", coupon)
    assert count(engine, COUPONS) == 0


def test_webhooks_of_every_record_give_the_store_a_poll_gives(
    engine: Engine, sandbox: SandboxServer, tmp_path: Path
) -> None:
    # One code path: every record of the sandbox store delivered as a webhook (in an order a
    # poll would not use, variations by themselves) must leave what a full poll leaves.
    store = sandbox.store
    sent: list[tuple[str, Any]] = []
    for parent_id, variations in store.variations.items():
        for variation in variations.values():
            sent.append(
                ("product.updated", {**variation, "type": "variation", "parent_id": parent_id})
            )
    sent += [("order.created", o) for o in store.orders.values()]
    sent += [("customer.updated", c) for c in [*store.customers.values(), *store.staff.values()]]
    sent += [("product.created", p) for p in store.products.values()]
    sent += [("coupon.created", c) for c in store.coupons.values()]

    async def deliver() -> None:
        async with harness(engine, sandbox.url) as h:
            for topic, payload in sent:
                await h.send(topic, copy.deepcopy(payload))
            await h.settle()

    asyncio.run(deliver())
    polled = open_store(f"sqlite:///{tmp_path}/polled.db")
    try:
        asyncio.run(poll(polled, sandbox.url))
        by_webhook, by_poll = dump(engine, "shop"), dump(polled, "shop")
    finally:
        polled.dispose()
    # Refunds have no webhook topic: an order's delivery reads the refunds it lists.
    assert by_poll["refunds"]
    assert diff(by_webhook, by_poll) == {}
    assert len(by_poll["orders"]) == len(store.orders)
    assert len(by_poll["products"]) == len(store.products) + sum(
        map(len, store.variations.values())
    )
    assert count(engine, EVENTS, status="applied") == len(sent)
    assert count(engine, QUARANTINE) == 0


# -- rejecting ------------------------------------------------------------------------------


def test_forged_unsigned_and_malformed_deliveries_change_nothing(
    engine: Engine, sandbox: SandboxServer
) -> None:
    order = fixture("order_single.json")
    body, good = delivery("order.updated", order)

    def with_headers(**changes: str | None) -> dict[str, str]:
        out = {k: v for k, v in good.items() if k not in changes}
        out.update({k: v for k, v in changes.items() if v is not None})
        return out

    def signed(raw: bytes, **changes: str | None) -> tuple[bytes, dict[str, str]]:
        return raw, with_headers(**{"X-WC-Webhook-Signature": sign(raw), **changes})

    cases: list[tuple[str, bytes, dict[str, str], str, int]] = [
        ("unsigned", body, with_headers(**{"X-WC-Webhook-Signature": None}), "shop", 401),
        ("wrong secret", *delivery("order.updated", order, secret="guess"), "shop", 401),
        (
            "tampered body",
            body.replace(b'"29.35"', b'"0.01"'),
            good,
            "shop",
            401,
        ),
        ("garbage signature", body, with_headers(**{"X-WC-Webhook-Signature": "%%"}), "shop", 401),
        ("signed non-JSON", *signed(b"{not json"), "shop", 400),
        ("signed JSON list", *signed(b"[1,2]"), "shop", 400),
        ("signed without id", *signed(b'{"status":"processing"}'), "shop", 400),
        ("string id on an update", *signed(b'{"id":"727"}'), "shop", 400),
        ("NUL in a string", *signed(b'{"id":727,"note":"a\\u0000b"}'), "shop", 400),
        (
            "custom action topic",
            *signed(
                body,
                **{"X-WC-Webhook-Topic": "action.woocommerce_add_to_cart"},
                **{"X-WC-Webhook-Resource": "action"},
                **{"X-WC-Webhook-Event": "woocommerce_add_to_cart"},
            ),
            "shop",
            400,
        ),
        (
            "topic and resource disagree",
            *signed(body, **{"X-WC-Webhook-Resource": "customer"}),
            "shop",
            400,
        ),
        ("unknown source", body, good, "elsewhere", 404),
        ("source without a secret", body, good, "nosecret", 404),
    ]

    async def go() -> Harness:
        async with harness(engine, sandbox.url) as h:
            for name, raw, headers, source, status in cases:
                response = await h.post(raw, headers, source)
                assert response.status_code == status, (name, response.text)
                if status == 401:
                    assert "X-WC-Webhook-Signature" in response.headers["WWW-Authenticate"]
            big = b"{" + b" " * (webhooks_module.MAX_BODY_BYTES + 1) + b"}"
            response = await h.post(*signed(big))
            assert response.status_code == 413
            await h.settle()
            return h

    h = asyncio.run(go())
    assert stored(engine) == 0
    for table in (ORDERS, CUSTOMERS):
        assert count(engine, table) == 0
    # The signed delivery with NUL (Postgres stores none) is kept in the quarantine.
    with engine.connect() as conn:
        kept = conn.execute(select(QUARANTINE.c.record_key, QUARANTINE.c.reason)).all()
    assert [(k, "NUL" in r) for k, r in kept] == [("727", True)]
    assert h.intake.stats.rejected == {
        "unsigned": 1,
        "bad_signature": 3,
        "malformed": 5,
        "unknown_topic": 2,
        "unknown_source": 2,
        "too_large": 1,
    }
    assert h.changed == []


def deep_delivery(topic: str, payload: dict[str, Any], depth: int) -> tuple[bytes, dict[str, str]]:
    """A signed delivery of ``payload`` with a metadata value nested so that the body is
    ``depth`` levels deep (written out: orjson does not write past 254 levels)."""
    body, headers = delivery(topic, {**payload, "meta_data": [{"id": 1, "value": "@"}]})
    # body, meta_data's list, its object: 3 levels; the value's lists make the rest.
    body = body.replace(b'"@"', b"[" * (depth - 3) + b"]" * (depth - 3))
    return body, {**headers, "X-WC-Webhook-Signature": sign(body)}


def test_a_delivery_nested_too_deep_is_quarantined_alone_and_its_neighbours_applied(
    engine: Engine, sandbox: SandboxServer
) -> None:
    # One signed delivery nested 300 deep (the intake parsed up to 1,024 levels, the store's
    # JSON writer fails past 254) among 30 good ones sent at once: on SQLite the journal
    # retried its batch forever; on Postgres the shared write failed all 31.
    base = fixture("order_single.json")
    good = [{**base, "id": 5000 + n} for n in range(30)]
    poison = deep_delivery("order.updated", {**base, "id": 6000}, 300)
    later = {**base, "id": 7000}

    async def go() -> None:
        async with harness(engine, sandbox.url) as h:
            sent = [delivery("order.updated", p) for p in good]
            sent.insert(15, poison)
            answers = await asyncio.gather(*(h.post(b, hd) for b, hd in sent))
            codes = [a.status_code for a in answers]
            # 422: signed, valid JSON, but past what the store keeps (400 is for a body that
            # is not a delivery at all; 413 for one over the size limit).
            assert codes == [200] * 15 + [422] + [200] * 15
            assert answers[15].json()["error"] == "too_deep"
            await h.settle()
            await h.send("order.updated", later)
            await h.settle()
            assert h.intake.stats.quarantined == 1
        # A restart on the same store: nothing stuck, the poison refused again.
        async with harness(engine, sandbox.url) as h:
            again = await h.post(*sent[15])
            assert again.status_code == 422
            await h.send("order.updated", {**later, "id": 7001})
            await h.settle()

    asyncio.run(go())
    with engine.connect() as conn:
        ids = set(
            conn.execute(select(ORDERS.c.source_id).where(ORDERS.c.source == "shop")).scalars()
        )
        quarantined = conn.execute(select(QUARANTINE)).all()
    assert ids == {5000 + n for n in range(30)} | {7000, 7001}
    assert count(engine, EVENTS, status="applied") == 32
    assert stored(engine) == 32
    assert [(q.stream, q.record_key, q.times_seen) for q in quarantined] == [("orders", "6000", 2)]
    assert "too deep: JSON nested over 64 levels" in quarantined[0].reason
    assert quarantined[0].payload["id"] == 6000
    assert quarantined[0].payload["json_start"].startswith('{"id":6000,')


def test_a_record_nested_too_deep_is_quarantined_by_the_polling_path(
    engine: Engine, sandbox: SandboxServer
) -> None:
    # The store's limits hold for polled records as for deliveries: a record past them is
    # quarantined with the reason by the handlers a polled page goes through, not a crash
    # of the batch (the JSON writer failed past 254 levels, and Postgres takes no NUL).
    base = fixture("order_single.json")
    deep = orjson.loads(deep_delivery("order.updated", {**base, "id": 8001}, 300)[0])
    nul = {**base, "id": 8002, "customer_note": "a\x00b"}
    fine = {**base, "id": 8003}

    async def go() -> None:
        runner = SourceSync(engine, "shop", make_settings(sandbox.url).sources["shop"])
        try:
            await runner.apply_payloads("orders", [deep, nul, fine])
        finally:
            await runner.client.aclose()

    asyncio.run(go())
    with engine.connect() as conn:
        ids = list(conn.execute(select(ORDERS.c.source_id)).scalars())
        kept = conn.execute(
            select(QUARANTINE.c.record_key, QUARANTINE.c.reason, QUARANTINE.c.payload).order_by(
                QUARANTINE.c.record_key
            )
        ).all()
    assert ids == [8003]
    assert [(k, r) for k, r, _ in kept] == [
        ("8001", "too deep: JSON nested over 64 levels"),
        ("8002", "holds a NUL character, which Postgres cannot store"),
    ]
    # What is kept in place of a value the store cannot keep: its id, why, its start.
    assert kept[0].payload["id"] == 8001 and kept[0].payload["json_start"] == ""
    assert kept[1].payload["json_start"].startswith('{"id":8002,')


def test_the_creation_ping_gets_exactly_200_and_stores_nothing(
    engine: Engine, sandbox: SandboxServer
) -> None:
    # WC_Webhook::deliver_ping: wp_safe_remote_post with the body "webhook_id=N", no X-WC headers.
    async def go() -> Harness:
        async with harness(engine, sandbox.url) as h:
            ping = {"User-Agent": UA, "Content-Type": "application/x-www-form-urlencoded"}
            response = await h.post(b"webhook_id=42", ping)
            assert response.status_code == 200
            assert (await h.post(b"webhook_id=42", {"User-Agent": UA})).status_code == 200
            assert (await h.post(b"webhook_id=42", ping, "elsewhere")).status_code == 404
            # Not a ping: unsigned and not that body.
            assert (await h.post(b"webhook_id=42&x=1", ping)).status_code == 401
            return h

    h = asyncio.run(go())
    assert h.intake.stats.pings == 2
    assert stored(engine) == 0


def test_deliveries_are_answered_well_under_200_ms(engine: Engine, sandbox: SandboxServer) -> None:
    base = fixture("order_single.json")

    async def go() -> list[float]:
        async with harness(engine, sandbox.url) as h:
            times = []
            for n in range(60):
                body, headers = delivery("order.updated", {**base, "id": 10_000 + n})
                started = time.perf_counter()
                response = await h.post(body, headers)
                times.append(time.perf_counter() - started)
                assert response.status_code == 200
            await h.settle()
            return sorted(times)

    times = asyncio.run(go())
    assert times[int(len(times) * 0.95)] < 0.2
    assert count(engine, ORDERS) == 60


# -- fuzzing ----------------------------------------------------------------------------------

_RESOURCES = RESOURCE_EVENTS
_TOPICS = [f"{r}.{e}" for r, es in RESOURCE_EVENTS.items() for e in es]
_header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=0, max_size=200
)
_json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


def _json(value: Any) -> bytes:
    # The standard library, not orjson: it writes integers beyond 64 bits and Infinity,
    # which the intake must refuse cleanly.
    return json.dumps(value).encode()


_bodies = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(str.encode),
    st.dictionaries(st.sampled_from(["id", "status", "total", "customer_id"]), _json_value).map(
        _json
    ),
    st.builds(lambda i: _json({"id": i}), st.one_of(st.integers(), st.text(max_size=5))),
    # Records with an id (as large as JSON allows) and anything else: these get stored.
    st.builds(
        lambda i, rest: _json({**rest, "id": i}),
        st.integers(min_value=-1, max_value=2**70),
        st.dictionaries(st.text(max_size=8), _json_value, max_size=4),
    ),
    st.just(_json(fixture("order_single.json"))),
    st.integers(min_value=0).map(lambda n: f"webhook_id={n}".encode()),
)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    body=_bodies,
    # Weighted towards signed deliveries to known sources: the paths past the signature.
    signing=st.sampled_from(["good", "good", "good", "none", "other secret", "junk"]),
    topic=st.one_of(st.sampled_from(_TOPICS), st.none(), _header_text),
    resource=st.one_of(st.none(), st.sampled_from(sorted(_RESOURCES)), _header_text),
    delivery_id=st.one_of(st.none(), _header_text),
    webhook_id=st.one_of(st.none(), _header_text, st.integers().map(str)),
)
def test_fuzzed_deliveries_never_get_a_server_error(
    engine: Engine,
    body: bytes,
    signing: str,
    topic: str | None,
    resource: str | None,
    delivery_id: str | None,
    webhook_id: str | None,
) -> None:
    headers = {"User-Agent": UA, "Content-Type": "application/json"}
    signatures = {"good": sign(body), "other secret": sign(body, "nope"), "junk": "x" * 44}
    if signing in signatures:
        headers["X-WC-Webhook-Signature"] = signatures[signing]
    for name, value in (
        ("X-WC-Webhook-Topic", topic),
        ("X-WC-Webhook-Resource", resource),
        ("X-WC-Webhook-Delivery-ID", delivery_id),
        ("X-WC-Webhook-ID", webhook_id),
    ):
        if value is not None:
            headers[name] = value
    before = stored(engine)

    async def go() -> httpx.Response:
        # No worker: this is about the request path (applying has its own tests).
        async with harness(engine, "http://127.0.0.1:9", start=False) as h:
            return await h.post(body, headers)

    response = asyncio.run(go())
    assert response.status_code in (200, 400, 401, 404, 413), response.text
    event(f"status {response.status_code}")  # shown by --hypothesis-show-statistics
    after = stored(engine)
    if response.status_code != 200 or signing != "good":
        assert after == before
    assert after - before in (0, 1)


# -- hostile senders: bodies read only when signed, bounded in memory (issue 19) ---------


def counting_reads(app: Any, read: list[int]) -> Any:
    """``app`` with every body byte it takes from the client added to ``read``."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        async def counted() -> Any:
            message = await receive()
            read.append(len(message.get("body", b"")))
            return message

        await app(scope, counted, send)

    return wrapped


async def chunks(body: bytes, size: int = 65536, wait: asyncio.Event | None = None) -> Any:
    for start in range(0, len(body), size):
        if wait is not None and start >= len(body) // 2:
            await wait.wait()
        yield body[start : start + size]


def test_an_unsigned_large_body_is_refused_before_it_is_read(
    engine: Engine, sandbox: SandboxServer
) -> None:
    order = fixture("order_single.json")
    big = orjson.dumps({**order, "note": "x" * 7_900_000})
    _, headers = delivery("order.updated", order)
    del headers["X-WC-Webhook-Signature"]

    async def go() -> tuple[list[httpx.Response], list[int]]:
        intake = WebhookIntake(engine, make_settings(sandbox.url))
        read: list[int] = []
        app = Starlette(routes=[Route("/webhooks/{source}", intake.endpoint, methods=["POST"])])
        transport = httpx.ASGITransport(app=counting_reads(app, read))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                answers = [
                    await client.post("/webhooks/shop", content=chunks(big), headers=headers),
                    # Without X-WC headers it could be the creation ping: a few bytes only.
                    await client.post(
                        "/webhooks/shop", content=chunks(big), headers={"User-Agent": UA}
                    ),
                ]
        finally:
            intake.close()
        return answers, read

    answers, read = asyncio.run(go())
    # Not a byte of the first; one 64 KiB chunk of the second (over the ping's 64 bytes).
    assert sum(read) <= 65536
    assert [a.status_code for a in answers] == [401, 401]
    assert all(a.headers["connection"] == "close" for a in answers)
    assert stored(engine) == 0


def test_bodies_held_across_requests_are_capped_and_a_bad_signature_keeps_nothing(
    monkeypatch: pytest.MonkeyPatch, engine: Engine, sandbox: SandboxServer
) -> None:
    monkeypatch.setattr(webhooks_module, "MAX_BUFFERED_BYTES", 1_000_000)
    order = fixture("order_single.json")
    body = orjson.dumps({**order, "note": "x" * 700_000})
    _, forged = delivery("order.updated", order, secret="a guess")  # wrong signature

    async def go() -> tuple[int, int, WebhookIntake]:
        async with harness(engine, sandbox.url) as h:
            release = asyncio.Event()
            first = asyncio.create_task(
                h.client.post("/webhooks/shop", content=chunks(body, wait=release), headers=forged)
            )
            while h.intake.buffered.held < 350_000:  # the first has half its body in
                await asyncio.sleep(0.005)
            second = await h.client.post("/webhooks/shop", content=body, headers=forged)
            release.set()
            return (await first).status_code, second.status_code, h.intake

    first, second, intake = asyncio.run(go())
    assert second == 503  # its 700 kB would have made over 1 MB held at once
    assert first == 401  # read in full, then refused for its signature
    assert intake.buffered.peak <= 1_000_000
    assert intake.buffered.held == 0  # nothing of either body is kept
    assert intake.stats.rejected == {"busy": 1, "bad_signature": 1}
    assert stored(engine) == 0


def test_a_flood_of_forged_requests_logs_one_line_per_reason(
    engine: Engine, sandbox: SandboxServer
) -> None:
    import structlog

    order = fixture("order_single.json")
    body, headers = delivery("order.updated", order)
    unsigned = {k: v for k, v in headers.items() if k != "X-WC-Webhook-Signature"}
    forged = {**headers, "X-WC-Webhook-Signature": sign(body, "a guess")}

    async def go() -> None:
        async with harness(engine, sandbox.url) as h:
            for _ in range(50):
                assert (await h.post(body, unsigned)).status_code == 401
                assert (await h.post(body, forged)).status_code == 401

    with structlog.testing.capture_logs() as logs:
        asyncio.run(go())
    rejected = [e for e in logs if e["event"] == "webhook delivery rejected"]
    assert sorted(e["reason"] for e in rejected) == ["bad_signature", "unsigned"]
