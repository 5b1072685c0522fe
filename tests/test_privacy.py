"""Privacy requests: ``forget`` against every sandbox destination and the store, resumed
after an interruption, and ``export``."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import Engine, Text, cast, func, insert, or_, select
from sqlalchemy.types import JSON, String
from sqlmodel import SQLModel

from syncd import privacy
from syncd.cli import run_sources
from syncd.config import Settings, load_settings
from syncd.destinations.base import Person, Receipt
from syncd.destinations.klaviyo import KlaviyoDestination
from syncd.identity import e164
from syncd.mapping import LoadedMapping, load_mappings
from syncd.push import push, select_syncs
from syncd.sandbox.destinations import DestinationSandbox
from syncd.sandbox.server import FaultConfig, SandboxServer
from syncd.sandbox.store import SandboxStore
from syncd.segments.recompute import recompute
from syncd.sources.woocommerce.parse import erased_by_eraser
from syncd.store.engine import open_store
from syncd.store.models import (
    CUSTOMER_RECORDS,
    CUSTOMERS,
    EVENTS,
    IDENTITIES,
    MEMBERSHIPS,
    ORDERS,
    PRIVACY_REQUESTS,
    PRIVACY_STEPS,
    PROFILES,
    QUARANTINE,
    REFUNDS,
    SUPPRESSIONS,
    SYNC_RECORDS,
    SYNC_RUNS,
)
from tests.consent_audit import ConsentLedger
from tests.test_cli import Run, base_env, syncd

SECRET = "privacy-webhook-secret"
TOKEN = "privacy-server-token"
AUDIENCE = "aud-1"
FIRST, LAST = "Zebediah", "Quonsetworth"
EMAIL = "zebediah.quonsetworth@example.org"
PHONE_TYPED = "+49 30 901820"  # as typed at checkout
PHONE = "+4930901820"  # E.164
T0 = datetime(2026, 11, 2, 9, 30, tzinfo=UTC)


@dataclass
class World:
    engine: Engine
    settings: Settings
    mappings: list[LoadedMapping]
    box: DestinationSandbox
    shop: SandboxServer
    config: Path
    woo_id: int  # the person's WooCommerce customer id
    cid: int  # their store customer id


def _mapping_files(folder: Path, box: DestinationSandbox, shop: SandboxServer, kl: str) -> None:
    fast = "[limits]\nrequests_per_second = 1000\nconcurrency = 4\n"
    (folder / "klaviyo.toml").write_text(
        f"""destination = "klaviyo"
base_url = "{box.klaviyo_url}"
allow_loopback = true
[credentials]
api_key = "{box.klaviyo.api_key}"
{fast}
[[sync]]
name = "klaviyo-everyone"
segment = "everyone"
mode = "mirror"
object = "{kl}"
[sync.fields]
email = "email"
first_name = "first_name"
"""
    )
    (folder / "mailchimp.toml").write_text(
        f"""destination = "mailchimp"
base_url = "{box.mailchimp_url}"
allow_loopback = true
[credentials]
api_key = "{box.mailchimp.api_key}"
{fast}
[[sync]]
name = "mailchimp-everyone"
segment = "everyone"
mode = "upsert"
object = "{AUDIENCE}"
[sync.fields]
email_address = "email"
"merge_fields.FNAME" = "first_name"
"""
    )
    (folder / "webhook.toml").write_text(
        f"""destination = "webhook"
name = "crm"
base_url = "{box.webhook_url("crm")}"
allow_loopback = true
[credentials]
secret = "{SECRET}"
{fast}
[[sync]]
name = "hook-everyone"
segment = "everyone"
mode = "upsert"
[sync.fields]
email = "email"
name = "first_name"
"""
    )
    (folder / "woocommerce.toml").write_text(
        f"""destination = "woocommerce"
base_url = "{shop.url}"
allow_loopback = true
[credentials]
consumer_key = "{shop.consumer_key}"
consumer_secret = "{shop.consumer_secret}"
{fast}
[[sync]]
name = "woo-everyone"
segment = "everyone"
mode = "upsert"
[sync.fields]
id = "woocommerce_id"
"meta.syncd_segments" = "segments | join"
"meta.syncd_lifecycle" = "lifecycle_stage"
"""
    )


def _make_person_unique(store: SandboxStore) -> int:
    """Give one registered customer with orders names, email and phone no one else has, on
    their account and on every order, so a scan of the store finds only them."""
    with store.lock:
        owners = [o["customer_id"] for o in store.orders.values() if o["customer_id"]]
        woo_id = max(set(owners), key=owners.count)
        customer = store.customers[woo_id]
        customer.update(email=EMAIL, first_name=FIRST, last_name=LAST)
        for block in (customer["billing"], customer["shipping"]):
            block.update(first_name=FIRST, last_name=LAST)
        customer["billing"].update(email=EMAIL, phone=PHONE_TYPED)
        # They agreed to marketing email (the Mailchimp for WooCommerce plugin's opt-in,
        # syncd's default email consent key), so every destination has them.
        customer["meta_data"] = [
            *customer.get("meta_data", []),
            {"id": 90001, "key": "mailchimp_woocommerce_is_subscribed", "value": "1"},
        ]
        store._reindex("customers", woo_id)
        for order in store.orders.values():
            if order["customer_id"] == woo_id:
                order["billing"].update(
                    first_name=FIRST, last_name=LAST, email=EMAIL, phone=PHONE_TYPED
                )
                order["shipping"].update(first_name=FIRST, last_name=LAST)
                store._reindex("orders", order["id"])
    return woo_id


@pytest.fixture
def world(store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    # Klaviyo's bulk import is a job polled until done: the sandbox finishes it at once,
    # so the first wait need not be Klaviyo's second.
    monkeypatch.setattr(KlaviyoDestination, "poll_interval", 0.01)
    store = SandboxStore(seed=5, customers=25, guests=10, orders=80, products=8, coupons=2)
    woo_id = _make_person_unique(store)
    with SandboxServer(store) as shop, DestinationSandbox() as box:
        box.klaviyo.limits_enabled = False
        klaviyo_list = box.klaviyo.add_list(name="Everyone")
        box.mailchimp.add_list(AUDIENCE, "Audience")
        box.webhooks.add("crm", SECRET)
        _mapping_files(tmp_path, box, shop, klaviyo_list)
        config = tmp_path / "config.toml"
        config.write_text(
            f"""[store]
url = "{store_url}"

[sources.shop]
type = "woocommerce"
url = "{shop.url}"
consumer_key = "{shop.consumer_key}"
consumer_secret = "{shop.consumer_secret}"

[segments.everyone]
rule = "orders_count >= 1"

[destinations]
mappings = ["klaviyo.toml", "mailchimp.toml", "webhook.toml", "woocommerce.toml"]

[server]
token = "{TOKEN}"
"""
        )
        settings = load_settings(config)
        mappings = load_mappings(settings, env={})
        ConsentLedger.grant("email", EMAIL)
        engine = open_store(store_url)
        try:
            results = asyncio.run(run_sources(settings, engine, ["shop"], False))
            assert not any(r.error for r in results)
            recompute(engine, settings, None)
            pushed = asyncio.run(push(engine, select_syncs(mappings, None)))
            assert all(r.status == "success" for r in pushed), [r.as_json() for r in pushed]
            with engine.connect() as conn:
                cid = conn.execute(
                    select(CUSTOMERS.c.id).where(CUSTOMERS.c.email == EMAIL)
                ).scalar_one()
            yield World(engine, settings, mappings, box, shop, config, woo_id, cid)
        finally:
            engine.dispose()


def _add_traces(engine: Engine, cid: int) -> None:
    """What webhooks, quarantine and a vendor's error message leave behind about them."""
    with engine.begin() as conn:
        conn.execute(
            insert(EVENTS).values(
                source="shop",
                delivery_id="d-1",
                body_sha256="0" * 64,
                topic="order.updated",
                resource="order",
                event="updated",
                received_at=T0,
                status="applied",
                attempts=0,
                payload={"id": 1, "billing": {"email": EMAIL.upper(), "phone": PHONE_TYPED}},
            )
        )
        conn.execute(
            insert(QUARANTINE).values(
                source="shop",
                stream="orders",
                source_id="999",
                record_key="999",
                reason="bad total",
                payload={"billing": {"email": EMAIL, "first_name": FIRST}},
                first_seen_at=T0,
                seen_at=T0,
                times_seen=1,
            )
        )
        conn.execute(
            insert(SYNC_RUNS).values(
                kind="destination",
                name="hook-everyone",
                started_at=T0,
                status="partial",
                error=f"receiver said: no such contact {EMAIL}",
            )
        )


def _text_hits(engine: Engine, needles: list[str]) -> list[str]:
    """table.column for every value in the store holding one of ``needles`` (any case)."""
    hits = []
    with engine.connect() as conn:
        for table in SQLModel.metadata.sorted_tables:
            for column in table.columns:
                if not isinstance(column.type, String | Text | JSON):
                    continue
                text = func.lower(cast(column, Text))
                match = or_(*(text.contains(n.lower(), autoescape=True) for n in needles))
                count = conn.execute(select(func.count()).where(match).select_from(table)).scalar()
                if count:
                    hits.append(f"{table.name}.{column.name}")
    return hits


def _totals(engine: Engine, cid: int) -> tuple[Any, ...]:
    with engine.connect() as conn:
        orders = conn.execute(
            select(func.count(), func.sum(ORDERS.c.total_minor), func.sum(ORDERS.c.refunded_minor))
        ).one()
        refunds = conn.execute(select(func.sum(REFUNDS.c.amount_minor))).scalar()
        others = conn.execute(
            select(PROFILES.c.customer_id, PROFILES.c.net_revenue_minor, PROFILES.c.orders_count)
            .where(PROFILES.c.customer_id != cid)
            .order_by(PROFILES.c.customer_id)
        ).all()
        mine = conn.execute(
            select(func.count(), func.sum(ORDERS.c.total_minor)).where(ORDERS.c.customer_id == cid)
        ).one()
    return tuple(orders), refunds, [tuple(r) for r in others], tuple(mine)


def _deletion_requests(box: DestinationSandbox) -> dict[str, int]:
    counts = {"klaviyo": 0, "mailchimp": 0, "webhook": 0}
    for r in box.requests:
        if "data-privacy-deletion-jobs" in r.path:
            counts["klaviyo"] += 1
        elif r.path.endswith("/actions/delete-permanent"):
            counts["mailchimp"] += 1
        elif r.vendor == "webhook" and r.body and r.body.get("mode") == "erasure":
            counts["webhook"] += 1
    return counts


def test_forget_erases_the_person_everywhere_and_keeps_the_totals(world: World) -> None:
    engine, box = world.engine, world.box
    _add_traces(engine, world.cid)
    before = _totals(engine, world.cid)
    assert before[3][0] >= 2  # the person has several orders
    with engine.connect() as conn:
        figures = select(PROFILES.c.orders_count, PROFILES.c.net_revenue_minor).where(
            PROFILES.c.customer_id == world.cid
        )
        mine = conn.execute(figures).one()
    with engine.connect() as conn:
        assert (
            conn.execute(
                select(func.count())
                .select_from(SYNC_RECORDS)
                .where(SYNC_RECORDS.c.record_key == str(world.cid))
            ).scalar()
            == 4
        )
    assert box.mailchimp.lists[AUDIENCE].members.get(EMAIL) is not None
    assert any(
        m.get("key") == "syncd_segments"
        for m in world.shop.store.payload("customers", world.woo_id)["meta_data"]
    )

    result = asyncio.run(privacy.forget(engine, world.mappings, EMAIL))

    assert result.done, result.as_json()
    steps = {s.name: s for s in result.steps}
    assert set(steps) == {
        "destination:klaviyo",
        "destination:mailchimp",
        "destination:crm",
        "destination:woocommerce",
        "store",
    }
    assert all(s.status == "done" for s in steps.values()), result.as_json()
    # Klaviyo: one deletion by email, one by phone; the profile is gone.
    assert {"email": EMAIL, "profile_id": None} not in box.klaviyo.deletions
    assert next(d for d in box.klaviyo.deletions if "email" in d)["email"] == EMAIL
    assert any(d.get("phone_number") == PHONE for d in box.klaviyo.deletions)
    assert all(p.get("email") != EMAIL for p in box.klaviyo.profiles.values())
    # Mailchimp: permanently deleted (cannot be re-imported).
    assert EMAIL not in box.mailchimp.lists[AUDIENCE].members
    assert EMAIL in box.mailchimp.lists[AUDIENCE].forgotten
    # Webhook: one signed erasure record naming the person and their record keys.
    erasures = [r for r in box.webhooks["crm"].records if r["action"] == "erasure"]
    assert len(erasures) == 1
    assert erasures[0]["data"]["email"] == EMAIL
    assert erasures[0]["data"]["record_keys"] == {"hook-everyone": str(world.cid)}
    assert steps["destination:crm"].receipt is not None
    # WooCommerce: syncd's own meta gone from the customer; the account itself is left.
    meta = world.shop.store.payload("customers", world.woo_id)["meta_data"]
    assert not any(str(m.get("key")).startswith("syncd_") for m in meta)
    assert "Erase Personal Data" in (steps["destination:woocommerce"].detail or "")

    # The store: no plaintext left anywhere, totals and everyone else's figures unchanged.
    assert _text_hits(engine, [EMAIL, FIRST, LAST, PHONE, PHONE_TYPED]) == []
    after = _totals(engine, world.cid)
    assert after == before
    with engine.connect() as conn:
        assert (
            conn.execute(
                select(func.count())
                .select_from(IDENTITIES)
                .where(IDENTITIES.c.customer_id == world.cid)
            ).scalar()
            == 0
        )
        assert (
            conn.execute(
                select(CUSTOMER_RECORDS.c.raw).where(CUSTOMER_RECORDS.c.customer_id == world.cid)
            ).scalar()
            is None
        )
        request = conn.execute(select(PRIVACY_REQUESTS)).one()
        assert request.status == "done" and request.identifiers is None
        assert privacy.is_suppressed(conn, email=EMAIL.upper())
        assert privacy.is_suppressed(conn, phone=PHONE)
        assert not privacy.is_suppressed(conn, email="someone.else@example.org")
        suppressed = conn.execute(privacy.suppressed_customer_ids()).scalars().all()
        assert suppressed == [world.cid]
        hashes = conn.execute(select(SUPPRESSIONS.c.email_hash)).scalars().all()
        assert EMAIL not in "".join(hashes)
    # A recompute builds an anonymous profile: the revenue still counts.
    recompute(engine, world.settings, None)
    assert _text_hits(engine, [EMAIL, FIRST, LAST, PHONE, PHONE_TYPED]) == []
    assert _totals(engine, world.cid) == before
    with engine.connect() as conn:
        assert conn.execute(figures).one() == mine
        assert (
            conn.execute(
                select(PROFILES.c.email).where(PROFILES.c.customer_id == world.cid)
            ).scalar()
            is None
        )


def test_an_interrupted_forget_resumes_without_asking_a_confirmed_destination_again(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, box = world.engine, world.box
    box.reset_logs()
    real = KlaviyoDestination.forget

    async def broken(self: Any, person: Person, targets: Any, fields: Any) -> Receipt:
        raise RuntimeError("connection reset while asking Klaviyo")

    monkeypatch.setattr(KlaviyoDestination, "forget", broken)
    first = asyncio.run(privacy.forget(engine, world.mappings, EMAIL))
    assert not first.done
    statuses = {s.name: s.status for s in first.steps}
    assert statuses["destination:klaviyo"] == "failed"
    assert next(s for s in first.steps if s.name == "destination:klaviyo").last_error == (
        "connection reset while asking Klaviyo"
    )
    assert {statuses[n] for n in statuses if n != "destination:klaviyo"} == {"done"}
    assert _deletion_requests(box) == {"klaviyo": 0, "mailchimp": 1, "webhook": 1}
    with engine.connect() as conn:
        pending = privacy.pending_steps(conn)
        # The request still knows how to reach Klaviyo, though the store forgot them.
        identifiers = conn.execute(select(PRIVACY_REQUESTS.c.identifiers)).scalar_one()
    assert [(p["step"], p["status"]) for p in pending] == [("destination:klaviyo", "failed")]
    assert identifiers["email"] == EMAIL

    monkeypatch.setattr(KlaviyoDestination, "forget", real)
    # The daemon's retry (and a second `syncd forget` of the same person) resume the
    # request: only Klaviyo is asked.
    # Not at once: a failed step waits privacy.retry_delay (5 minutes after the first).
    early = asyncio.run(privacy.retry_pending(engine, world.mappings))
    assert [r.done for r in early] == [False]
    assert _deletion_requests(box)["klaviyo"] == 0
    later = datetime.now(UTC) + timedelta(minutes=6)
    again = asyncio.run(privacy.retry_pending(engine, world.mappings, now=later))
    assert len(again) == 1 and again[0].done and again[0].request == first.request
    assert _deletion_requests(box) == {"klaviyo": 2, "mailchimp": 1, "webhook": 1}
    with engine.connect() as conn:
        steps = conn.execute(select(PRIVACY_STEPS.c.name, PRIVACY_STEPS.c.attempts)).all()
        assert dict(steps)["destination:klaviyo"] == 2
        assert dict(steps)["destination:mailchimp"] == 1
        assert conn.execute(select(PRIVACY_REQUESTS.c.identifiers)).scalar() is None
        assert privacy.pending_steps(conn) == []
    assert _text_hits(engine, [EMAIL, FIRST, LAST, PHONE, PHONE_TYPED]) == []


def test_a_forget_by_customer_id_and_a_resynced_person_is_anonymized_again(world: World) -> None:
    engine = world.engine
    result = asyncio.run(privacy.forget(engine, world.mappings, customer_id=world.woo_id))
    assert result.done
    # The store's next full sync brings their account and orders back, address and all:
    # ingest erases them again in the same transactions, before anyone can read them.
    asyncio.run(run_sources(world.settings, engine, ["shop"], True))
    assert _text_hits(engine, [EMAIL, FIRST, LAST, PHONE, PHONE_TYPED]) == []
    with engine.begin() as conn:
        assert privacy.scrub_suppressed(conn) == 0
    assert _text_hits(engine, [EMAIL, FIRST, LAST, PHONE, PHONE_TYPED]) == []


def _mentions(box: DestinationSandbox) -> list[str]:
    """Requests any destination sandbox received that carry the person's email, names or
    phone."""
    needles = [EMAIL.lower(), FIRST.lower(), LAST.lower(), PHONE, PHONE_TYPED]
    return [
        f"{r.vendor} {r.method} {r.path}"
        for r in box.requests
        if any(n in json.dumps(r.body).lower() for n in needles)
    ]


def test_after_forget_a_full_resync_and_push_send_them_nowhere(world: World) -> None:
    engine, box = world.engine, world.box
    assert asyncio.run(privacy.forget(engine, world.mappings, email=EMAIL)).done
    box.reset_logs()
    # The store still has them: a full re-read brings their account and orders back.
    results = asyncio.run(run_sources(world.settings, engine, ["shop"], True))
    assert not any(r.error for r in results)
    recompute(engine, world.settings, None)
    pushed = asyncio.run(push(engine, select_syncs(world.mappings, None), full=True))
    assert all(r.status == "success" for r in pushed), [r.as_json() for r in pushed]
    assert box.requests, "the full push sent the others again"
    assert _mentions(box) == []
    # Nor did the write-back tag their account again.
    meta = world.shop.store.payload("customers", world.woo_id)["meta_data"]
    assert [m for m in meta if str(m.get("key", "")).startswith("syncd_")] == []
    assert EMAIL not in box.mailchimp.lists[AUDIENCE].members
    assert box.klaviyo.profile_by_email(EMAIL) is None
    assert _text_hits(engine, [EMAIL, FIRST, LAST, PHONE, PHONE_TYPED]) == []


def test_an_order_the_eraser_anonymized_opens_a_request_during_the_sync(world: World) -> None:
    engine, store = world.engine, world.shop.store
    with engine.connect() as conn:
        order_id, total = conn.execute(
            select(ORDERS.c.source_id, ORDERS.c.total_minor)
            .where(ORDERS.c.customer_id == world.cid)
            .order_by(ORDERS.c.source_id)
            .limit(1)
        ).one()
    # What WooCommerce's eraser leaves of an order (WC_Privacy_Erasers::
    # remove_order_personal_data): the address anonymized, the amounts kept.
    with store.lock:
        order = store.orders[order_id]
        order["billing"].update(first_name="", last_name="", phone="", email="deleted@site.invalid")
        order["shipping"].update(first_name="", last_name="")
        store._reindex("orders", order_id)
    results = asyncio.run(run_sources(world.settings, engine, ["shop"], True))
    assert not any(r.error for r in results)
    with engine.connect() as conn:
        request = conn.execute(select(PRIVACY_REQUESTS)).one()
        # Opened without the mappings: only the store step so far.
        steps = conn.execute(select(PRIVACY_STEPS.c.name)).scalars().all()
        # The order stays with its buyer, amount and all; the placeholder is no email.
        kept = conn.execute(
            select(ORDERS.c.customer_id, ORDERS.c.total_minor, ORDERS.c.email).where(
                ORDERS.c.source_id == order_id
            )
        ).one()
    assert request.requested_by == "woocommerce-eraser" and request.status == "pending"
    assert steps == ["store"]
    assert tuple(kept) == (world.cid, total, None)
    # The service's next privacy run adds a step per destination and completes them all.
    (done,) = asyncio.run(privacy.retry_pending(engine, world.mappings))
    assert done.done
    assert {s.name for s in done.steps} == {
        "store",
        "destination:klaviyo",
        "destination:mailchimp",
        "destination:crm",
        "destination:woocommerce",
    }
    # Klaviyo once by email, once by phone (one identifier per deletion request).
    assert _deletion_requests(world.box) == {"klaviyo": 2, "mailchimp": 1, "webhook": 1}
    assert _text_hits(engine, [EMAIL, FIRST, LAST, PHONE, PHONE_TYPED]) == []


def test_an_order_erased_by_woocommerce_opens_a_request_the_service_completes(
    world: World,
) -> None:
    engine = world.engine
    with engine.connect() as conn:
        order_id = conn.execute(
            select(ORDERS.c.source_id).where(ORDERS.c.customer_id == world.cid).limit(1)
        ).scalar_one()
    names = world.mappings
    with engine.begin() as conn:
        rid = privacy.request_for_erased(conn, names, source="shop", order_id=order_id)
        assert privacy.request_for_erased(conn, names, source="shop", order_id=10**9) is None
    assert rid is not None
    results = asyncio.run(privacy.retry_pending(engine, world.mappings))
    assert [(r.request, r.done) for r in results] == [(rid, True)]
    with engine.connect() as conn:
        request = conn.execute(select(PRIVACY_REQUESTS)).one()
    assert request.requested_by == "woocommerce-eraser"
    assert EMAIL not in world.box.mailchimp.lists[AUDIENCE].members
    assert _text_hits(engine, [EMAIL, FIRST, LAST, PHONE, PHONE_TYPED]) == []
    # Already forgotten: the next anonymized order of theirs opens nothing.
    with engine.begin() as conn:
        again = privacy.request_for_erased(conn, names, source="shop", customer_id=world.woo_id)
        assert again is None


def test_forget_of_an_unknown_customer_id_is_refused(world: World) -> None:
    with pytest.raises(privacy.PrivacyError, match="no customer 987654"):
        asyncio.run(privacy.forget(world.engine, world.mappings, customer_id=987654))
    with world.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(PRIVACY_REQUESTS)).scalar() == 0


# -- the command line and the HTTP endpoint ----------------------------------------------------


def _cli(world: World, *args: str, timeout: float = 120) -> Run:
    return syncd("--config", str(world.config), *args, env=base_env(), timeout=timeout)


def test_cli_forget_prints_a_receipt_per_step_and_exits_1_while_one_is_pending(
    world: World,
) -> None:
    exported = _cli(world, "export", EMAIL)
    assert exported.returncode == 0, exported.stderr
    document = json.loads(exported.stdout)
    with world.engine.connect() as conn:
        totals = conn.execute(
            select(ORDERS.c.source_id, ORDERS.c.total_minor)
            .where(ORDERS.c.customer_id == world.cid)
            .order_by(ORDERS.c.created_at)
        ).all()
    assert [(o["source_id"], o["total_minor"]) for o in document["orders"]] == [
        tuple(t) for t in totals
    ]
    assert {s["destination"] for s in document["sent_to"]} == {
        "klaviyo",
        "mailchimp",
        "webhook",
        "woocommerce",
    }

    receiver = world.box.webhooks["crm"]
    receiver.reject = lambda record: "the CRM is read-only today"
    first = _cli(world, "forget", EMAIL)
    assert first.returncode == 1, first.stderr
    lines = first.stdout.splitlines()
    with world.engine.connect() as conn:
        rid = conn.execute(
            select(PRIVACY_REQUESTS.c.id).where(PRIVACY_REQUESTS.c.kind == "forget")
        ).scalar_one()
    assert lines[0] == f"privacy request {rid}:"
    assert any(
        line.startswith("  destination:klaviyo: done: profile deletion requested by email")
        for line in lines
    )
    assert "  destination:crm: failed: " in first.stdout
    assert "the CRM is read-only today" in first.stdout
    status = _cli(world, "status", "--json")
    pending = json.loads(status.stdout)["privacy"]["pending_steps"]
    assert [(p["request"], p["step"], p["status"]) for p in pending] == [
        (rid, "destination:crm", "failed")
    ]
    text = _cli(world, "status")
    assert f"privacy request {rid} (cli," in text.stdout
    assert "destination:crm failed after 1 attempt(s)" in text.stdout

    receiver.reject = None
    world.box.reset_logs()
    second = _cli(world, "forget", EMAIL)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "  destination:crm: done [receipt " in second.stdout
    # Only the receiver that had not confirmed is asked again.
    assert _deletion_requests(world.box) == {"klaviyo": 0, "mailchimp": 0, "webhook": 1}
    assert json.loads(_cli(world, "status", "--json").stdout)["privacy"]["pending_steps"] == []
    usage = _cli(world, "forget")
    assert usage.returncode == 2 and "give an EMAIL or --customer ID" in usage.stderr


@pytest.mark.slow
def test_forget_killed_between_destinations_is_completed_by_the_next_call(world: World) -> None:
    # Mailchimp (the second step) answers slowly: the kill lands after Klaviyo confirmed.
    world.box.set_faults(FaultConfig(latency_ms=4000), vendor="mailchimp")
    cmd = [sys.executable, "-m", "syncd", "--config", str(world.config), "forget", EMAIL]
    proc = subprocess.Popen(
        cmd, env=base_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with world.engine.connect() as conn:
                done = (
                    conn.execute(
                        select(PRIVACY_STEPS.c.name).where(PRIVACY_STEPS.c.status == "done")
                    )
                    .scalars()
                    .all()
                )
            if done:
                break
            time.sleep(0.05)
        assert done == ["destination:klaviyo"]
        time.sleep(0.3)  # Mailchimp's request is in flight
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    asked = _deletion_requests(world.box)
    assert asked["klaviyo"] == 2 and asked["webhook"] == 0
    world.box.set_faults(FaultConfig(), vendor="mailchimp")
    again = _cli(world, "forget", EMAIL)
    assert again.returncode == 0, again.stdout + again.stderr
    asked = _deletion_requests(world.box)
    # Klaviyo confirmed before the kill: never asked again. The rest were asked once
    # (Mailchimp's in-flight request may have been answered before the kill: a second
    # ask then gets 404, which is done too).
    assert asked["klaviyo"] == 2 and asked["webhook"] == 1 and asked["mailchimp"] in (1, 2)
    assert _text_hits(world.engine, [EMAIL, FIRST, LAST, PHONE, PHONE_TYPED]) == []


def test_http_forget_needs_the_token_and_answers_202(world: World) -> None:
    from starlette.testclient import TestClient

    from syncd.metrics import Metrics
    from syncd.server import create_app

    engine, settings = world.engine, world.settings
    untokened = settings.model_copy(
        update={"server": settings.server.model_copy(update={"token": None})}
    )
    with TestClient(create_app(engine, untokened, Metrics(engine, untokened))) as client:
        refused = client.post("/privacy/forget", json={"email": EMAIL})
    assert refused.status_code == 403
    app = create_app(engine, settings, Metrics(engine, settings), mappings=world.mappings)
    with TestClient(app) as client:
        assert client.post("/privacy/forget", json={"email": EMAIL}).status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        bad = client.post("/privacy/forget", json={"email": EMAIL, "customer_id": 3}, headers=auth)
        assert bad.status_code == 400
        unknown = client.post("/privacy/forget", json={"customer_id": 987654}, headers=auth)
        assert unknown.status_code == 400 and "no customer 987654" in unknown.json()["detail"]
        accepted = client.post("/privacy/forget", json={"email": EMAIL}, headers=auth)
    assert accepted.status_code == 202
    assert accepted.json() == {"request": 1, "status": "pending"}
    with engine.connect() as conn:
        request = conn.execute(select(PRIVACY_REQUESTS)).one()
        steps = conn.execute(select(PRIVACY_STEPS.c.status)).scalars().all()
    # The steps ran after the answer.
    assert request.requested_by == "http" and request.status == "done"
    assert set(steps) == {"done"}
    assert EMAIL not in world.box.mailchimp.lists[AUDIENCE].members


# -- export ----------------------------------------------------------------------------------


_EXPORT_ORDERS: list[dict[str, Any]] = [
    {
        "id": 10,
        "source": "shop",
        "source_id": 501,
        "customer_id": 1,
        "email": "ann@example.com",
        "status": "completed",
        "currency": "EUR",
        "total_minor": 12345,
        "tax_minor": 1971,
        "created_at": T0,
    },
    {
        "id": 11,
        "source": "shop",
        "source_id": 502,
        "customer_id": 1,
        "email": "ann@example.com",
        "status": "refunded",
        "currency": "EUR",
        "total_minor": 999,
        "refunded_minor": 999,
        "created_at": datetime(2026, 11, 20, tzinfo=UTC),
    },
    {
        "id": 12,
        "source": "shop",
        "source_id": 503,
        "customer_id": 2,
        "email": "bob@example.com",
        "status": "completed",
        "currency": "EUR",
        "total_minor": 7000,
        "created_at": T0,
    },
]


def _export_fixture(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(
            insert(CUSTOMERS),
            [
                {"id": 1, "email": "ann@example.com", "first_name": "Ann", "attrs_rank": 2},
                {"id": 2, "email": "bob@example.com", "first_name": "Bob", "attrs_rank": 1},
            ],
        )
        conn.execute(
            insert(IDENTITIES),
            [
                {"customer_id": 1, "source": "shop", "kind": "customer_id", "value": "17"},
                {"customer_id": 1, "source": "shop", "kind": "email", "value": "ann@example.com"},
            ],
        )
        conn.execute(
            insert(ORDERS),
            [{"tax_minor": 0, "refunded_minor": 0, **order} for order in _EXPORT_ORDERS],
        )
        conn.execute(
            insert(REFUNDS).values(
                source="shop",
                source_id=601,
                order_id=11,
                order_source_id=502,
                amount_minor=999,
                currency="EUR",
                created_at=T0,
            )
        )
        conn.execute(
            insert(PROFILES).values(
                customer_id=1,
                email="ann@example.com",
                orders_count=2,
                gross_revenue_minor=13344,
                refunded_minor=999,
                net_revenue_minor=12345,
                currency="EUR",
                lifecycle_stage="active",
            )
        )
        conn.execute(insert(MEMBERSHIPS).values(segment="vip", customer_id=1, entered_at=T0))
        conn.execute(
            insert(SYNC_RECORDS),
            [
                {
                    "sync": "klaviyo-everyone",
                    "record_key": "1",
                    "content_hash": 1,
                    "status": "sent",
                    "in_destination": True,
                    "dest_id": "01KPROFILE",
                    "sent_at": T0,
                    "updated_at": T0,
                },
                {
                    "sync": "hook-everyone",
                    "record_key": "1",
                    "content_hash": 2,
                    "status": "sent",
                    "in_destination": True,
                    "dest_id": None,
                    "sent_at": T0,
                    "updated_at": T0,
                },
                {
                    "sync": "hook-everyone",
                    "record_key": "2",
                    "content_hash": 3,
                    "status": "sent",
                    "in_destination": True,
                    "dest_id": None,
                    "sent_at": T0,
                    "updated_at": T0,
                },
            ],
        )


@dataclass
class _FakeMapping:
    """The parts of a LoadedMapping export reads: name, destination type, syncs' keys."""

    name: str
    destination: str
    keys: dict[str, str]

    @property
    def spec(self) -> Any:
        return SimpleNamespace(destination=self.destination)

    @property
    def syncs(self) -> list[Any]:
        return [SimpleNamespace(name=n, spec=SimpleNamespace(key=k)) for n, k in self.keys.items()]


def test_export_returns_the_orders_with_exact_amounts_and_where_they_were_sent(
    engine: Engine,
) -> None:
    _export_fixture(engine)
    with engine.begin() as conn:
        # A sync keyed on order ids: its record "1" is an order, not customer 1.
        conn.execute(
            insert(SYNC_RECORDS).values(
                sync="orders-model",
                record_key="1",
                content_hash=4,
                status="sent",
                in_destination=True,
                sent_at=T0,
                updated_at=T0,
            )
        )
    mappings = [
        _FakeMapping("crm", "webhook", {"orders-model": "order_id", "hook-everyone": "customer_id"})
    ]
    document = privacy.export(engine, " Ann@Example.com ", mappings=mappings)
    json.dumps(document)  # JSON-able as is
    assert document["subject"] == {"email": "ann@example.com"}
    assert [c["id"] for c in document["customers"]] == [1]
    orders = document["orders"]
    assert [(o["source_id"], o["total_minor"], o["currency"]) for o in orders] == [
        (501, 12345, "EUR"),
        (502, 999, "EUR"),
    ]
    assert orders[0]["tax_minor"] == 1971 and orders[1]["refunded_minor"] == 999
    assert [r["amount_minor"] for r in document["refunds"]] == [999]
    assert document["profiles"][0]["net_revenue_minor"] == 12345
    assert [m["segment"] for m in document["segment_memberships"]] == ["vip"]
    assert {(i["kind"], i["value"]) for i in document["identities"]} == {
        ("customer_id", "17"),
        ("email", "ann@example.com"),
    }
    sent = {s["sync"]: s for s in document["sent_to"]}
    assert set(sent) == {"klaviyo-everyone", "hook-everyone"}
    assert sent["klaviyo-everyone"]["destination_id"] == "01KPROFILE"
    # klaviyo-everyone is no longer configured: taken as keyed on the customer id.
    assert sent["klaviyo-everyone"]["mapping"] is None
    assert (sent["hook-everyone"]["mapping"], sent["hook-everyone"]["destination"]) == (
        "crm",
        "webhook",
    )
    assert sent["hook-everyone"]["last_sent_at"] == T0.isoformat()
    assert document["suppressed"] is False
    with engine.connect() as conn:
        request = conn.execute(select(PRIVACY_REQUESTS)).one()
    assert (request.kind, request.status, request.requested_by) == ("export", "done", "cli")
    assert "ann" not in request.subject_hash


def test_the_salt_is_made_once_and_hashes_do_not_reveal_the_address(engine: Engine) -> None:
    with engine.begin() as conn:
        salt = privacy.store_salt(conn)
        assert privacy.store_salt(conn) == salt and len(salt) == 32
        hashed = privacy.email_hash(salt, " Ann@Example.COM")
    assert hashed == privacy.email_hash(salt, "ann@example.com")
    import hashlib

    assert hashed != hashlib.sha256(b"ann@example.com").hexdigest()
    assert privacy.phone_hash(salt, "not a phone") is None
    assert privacy.phone_hash(salt, e164("+49 30 901820")) == privacy.phone_hash(salt, PHONE)


def test_the_webhook_sandbox_checks_an_erasure_record_as_the_wire_format_says() -> None:
    import httpx
    import orjson

    from syncd.destinations.webhook import signature

    with DestinationSandbox() as box:
        receiver = box.webhooks.add("crm", SECRET)

        def post(data: dict[str, Any]) -> httpx.Response:
            body = orjson.dumps(
                {
                    "sync": "crm",
                    "mode": "erasure",
                    "action": "erasure",
                    "batch_id": "a" * 64,
                    "sent_at": "2026-12-07T10:00:00.000Z",
                    "records": [{"key": "privacy-request-1", "id": None, "data": data}],
                }
            )
            headers = {
                "Content-Type": "application/json",
                "X-Syncd-Signature": signature(SECRET, body),
            }
            return httpx.post(box.webhook_url("crm"), content=body, headers=headers)

        refused = post({"email": EMAIL})
        assert refused.status_code == 400 and "erasure" in refused.json()["message"]
        good = {"email": EMAIL, "phone": None, "record_keys": {}, "dest_ids": {}}
        assert post(good).status_code == 200
        assert [r["action"] for r in receiver.records] == ["erasure"]


def test_raw_payloads_older_than_the_retention_are_dropped_and_the_rows_stay(
    engine: Engine,
) -> None:
    _export_fixture(engine)
    now = datetime(2026, 12, 7, tzinfo=UTC)
    with engine.begin() as conn:
        for oid, modified in ((10, datetime(2026, 10, 1, tzinfo=UTC)), (11, now)):
            conn.execute(
                ORDERS.update()
                .where(ORDERS.c.id == oid)
                .values(raw={"billing": {"email": "ann@example.com"}}, modified_at=modified)
            )
        cleared = privacy.prune_raw_payloads(conn, 30, now=now)
    assert cleared["orders"] == 1
    with engine.connect() as conn:
        rows = conn.execute(
            select(ORDERS.c.id, ORDERS.c.raw, ORDERS.c.total_minor)
            .where(ORDERS.c.id.in_((10, 11)))
            .order_by(ORDERS.c.id)
        ).all()
    assert [(r.id, r.raw is None, r.total_minor) for r in rows] == [
        (10, True, 12345),
        (11, False, 999),
    ]
    with pytest.raises(ValueError), engine.begin() as conn:
        privacy.prune_raw_payloads(conn, 0)


def test_failed_steps_back_off_up_to_six_hours() -> None:
    assert [privacy.retry_delay(n) for n in (1, 2, 3)] == [
        timedelta(minutes=5),
        timedelta(minutes=10),
        timedelta(minutes=20),
    ]
    assert privacy.retry_delay(50) == timedelta(hours=6)


def test_woocommerce_erased_payloads_are_recognized() -> None:
    assert erased_by_eraser({"billing": {"email": "deleted@site.invalid"}})
    assert not erased_by_eraser({"billing": {"email": "ann@example.com"}})
