"""Who is a customer: accounts in a customer role, and people with a live order.

syncd reads ``/customers?role=all`` (WooCommerce 10.0 REST: every WordPress user,
administrators and shop managers included) so that a staff member's orders link to their
account. Those accounts are not customers until they order; a guest known only through
a trashed or force-deleted order (often spam or a test) is no customer at all. Neither
is in ``customer_profiles``, in a segment, or sent to a destination; their rows stay in
the store for the record.

The store is built from wc/v3 payloads through the real ingest (as in test_profiles),
then ``recompute`` and a Mailchimp mirror push against the destination sandbox.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from syncd.config import Settings
from syncd.ingest import SourceSync
from syncd.mapping import load_mappings
from syncd.push import PushResult, push, select_syncs
from syncd.sandbox.destinations import DestinationSandbox
from syncd.segments.recompute import recompute
from syncd.store.models import CUSTOMER_RECORDS as RECORDS
from syncd.store.models import CUSTOMERS, MEMBERSHIPS, ORDERS, PROFILES, QUARANTINE
from tests.test_profiles import (
    SOURCE,
    Line,
    Payload,
    Person,
    Shop,
    ShopClient,
    customer_payload,
    order_payload,
    product_payload,
)

A = datetime(2026, 6, 30, 12, 0, tzinfo=UTC)
MUG = 103  # test_profiles' Mug [Home, Kitchen], 12.00

# Accounts (WooCommerce user ids 11..20 are registered in test_profiles.REGISTERED).
ADMIN = Person(11, "admin@example.com", "Ada", "Admin", "DE")  # administrator, no order
MANAGER = Person(12, "manager@example.com", "Max", "Manager", "DE")  # shop_manager, no order
BUYING_MANAGER = Person(13, "buying.manager@example.com", "Bea", "Buyer", "DE")  # + an order
CAROL = Person(14, "carol@example.com", "Carol", "Chen", "FR")  # customer, no order
SUBSCRIBER = Person(15, "subscriber@example.com", "Sam", "Sub", "FR")  # subscriber, no order
CANCELLED_ADMIN = Person(16, "cancelled.admin@example.com", "Cy", "Cancel", "DE")  # cancelled
GONE = Person(17, "gone@example.com", "Gus", "Gone", "NL")  # customer, account deleted
# Guests (customer_id 0).
TRASHED = Person(0, "trashed.guest@example.com", "Tom", "Trash", "DE")  # only order trashed
DELETED = Person(0, "deleted.guest@example.com", "Dee", "Deleted", "DE")  # only order deleted
GUEST = Person(0, "guest@example.com", "Gina", "Guest", "AT")  # a completed order
QUARANTINED = Person(0, "quarantined.guest@example.com", "Quin", "Q", "DE")  # only order bad

ROLES = {
    ADMIN: "administrator",
    MANAGER: "shop_manager",
    BUYING_MANAGER: "shop_manager",
    CAROL: "customer",
    SUBSCRIBER: "subscriber",
    CANCELLED_ADMIN: "administrator",
    GONE: "customer",
}
TRASHED_ORDER, DELETED_ORDER, GUEST_ORDER, BAD_ORDER = 3001, 3002, 3003, 3004
CUSTOMERS_BY_DEFAULT = {BUYING_MANAGER, CAROL, CANCELLED_ADMIN, GUEST}
NOT_CUSTOMERS = {ADMIN, MANAGER, SUBSCRIBER, GONE, TRASHED, DELETED, QUARANTINED}


def account(p: Person) -> Payload:
    return {**customer_payload(p), "role": ROLES[p]}


def mug_order(oid: int, status: str, who: Person, **kw: Any) -> Payload:
    guest = {"guest_email": who.email} if not who.account else {}
    return order_payload(
        oid, status, "2026-06-01T10:00", who, "EUR", "12.00", [Line(MUG, 1, "12.00")], **kw, **guest
    )


def build() -> Shop:
    return Shop(
        customers=[account(p) for p in ROLES],
        orders=[
            mug_order(3010, "completed", BUYING_MANAGER),
            mug_order(3011, "cancelled", CANCELLED_ADMIN),
            mug_order(TRASHED_ORDER, "trash", TRASHED, modified="2026-06-02T10:00"),
            mug_order(DELETED_ORDER, "completed", DELETED),
            mug_order(GUEST_ORDER, "completed", GUEST),
            # Quarantined (no valid currency): stored nowhere but in `quarantine`.
            {**mug_order(BAD_ORDER, "completed", QUARANTINED), "currency": "EURO"},
        ],
        products=[product_payload(MUG)],
    )


def sync(engine: Engine, shop: Shop) -> None:
    async def go() -> Any:
        runner = SourceSync(engine, "wc", SOURCE, client=ShopClient(shop))
        try:
            return await runner.run()
        finally:
            await runner.client.aclose()

    result = asyncio.run(go())
    # "partial": the bad order is quarantined (load() checks it is the only record there).
    assert result.status == "partial" and result.error is None, result.error


def load(engine: Engine) -> Shop:
    """Two syncs: between them order DELETED_ORDER is force-deleted (WooCommerce keeps no
    trace; the second sync's id reconciliation marks it) and GONE's account is deleted."""
    shop = build()
    sync(engine, shop)
    shop.orders = [o for o in shop.orders if o["id"] != DELETED_ORDER]
    shop.customers = [c for c in shop.customers if c["id"] != GONE.account]
    sync(engine, shop)
    # The ingest kept everyone for the record: each is a person with their rows.
    with engine.connect() as conn:
        people = set(conn.execute(select(CUSTOMERS.c.email)).scalars())
        assert people == {p.email for p in ROLES} | {TRASHED.email, DELETED.email, GUEST.email}
        roles = dict(conn.execute(select(RECORDS.c.source_id, RECORDS.c.role)).all())
        assert roles == {p.account: role for p, role in ROLES.items()}
        dead = dict(
            conn.execute(
                select(ORDERS.c.source_id, ORDERS.c.status).where(ORDERS.c.deleted_at.is_not(None))
            ).all()
        )
        assert dead == {TRASHED_ORDER: "trash", DELETED_ORDER: "completed"}
        bad = conn.execute(select(QUARANTINE.c.stream, QUARANTINE.c.source_id)).all()
        assert bad == [("orders", str(BAD_ORDER))]
    return shop


def settings(roles: list[str] | None = None, mappings: list[str] | None = None) -> Settings:
    source = SOURCE if roles is None else SOURCE.model_copy(update={"customer_roles": roles})
    return Settings.model_validate(
        {
            "sources": {"wc": source},
            "segments": {
                "everyone": {"rule": "orders_count >= 0"},
                "buyers": {"rule": "orders_count >= 1"},
                # A SQL segment reading `customers` (everyone in the store) directly.
                "sql_everyone": {"sql": "SELECT id AS customer_id FROM customers"},
            },
            "destinations": {"mappings": mappings or []},
        }
    )


def profiles(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        return {r.email: r for r in conn.execute(select(PROFILES))}


def members(engine: Engine, segment: str) -> set[str]:
    with engine.connect() as conn:
        return set(
            conn.execute(
                select(CUSTOMERS.c.email)
                .join(MEMBERSHIPS, MEMBERSHIPS.c.customer_id == CUSTOMERS.c.id)
                .where(MEMBERSHIPS.c.segment == segment, MEMBERSHIPS.c.exited_at.is_(None))
            ).scalars()
        )


def emails(people: set[Person]) -> set[str]:
    return {p.email for p in people}


def test_staff_without_orders_and_guests_of_dead_orders_are_not_customers(
    engine: Engine,
) -> None:
    load(engine)
    result = recompute(engine, settings(), now=A)
    got = profiles(engine)
    assert set(got) == emails(CUSTOMERS_BY_DEFAULT)
    assert result.profiles == 4 and result.buyers == 2
    # The shop manager who bought is a buyer; the administrator with a cancelled order
    # and the registered customer without one are prospects.
    assert (got[BUYING_MANAGER.email].orders_count, got[BUYING_MANAGER.email].lifecycle_stage) == (
        1,
        "new",  # one order 29 days before A
    )
    assert got[BUYING_MANAGER.email].net_revenue_minor == 1200
    assert got[CANCELLED_ADMIN.email].lifecycle_stage == "prospect"
    assert (got[CAROL.email].orders_count, got[CAROL.email].lifecycle_stage) == (0, "prospect")
    assert members(engine, "everyone") == emails(CUSTOMERS_BY_DEFAULT)
    assert members(engine, "buyers") == {BUYING_MANAGER.email, GUEST.email}
    assert members(engine, "sql_everyone") == emails(CUSTOMERS_BY_DEFAULT)
    # Kept in the store for the record.
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(CUSTOMERS)).scalar_one() == 10


def test_customer_roles_adds_subscribers_as_prospects(engine: Engine) -> None:
    load(engine)
    recompute(engine, settings(["customer", "subscriber"]), now=A)
    got = profiles(engine)
    assert set(got) == emails(CUSTOMERS_BY_DEFAULT | {SUBSCRIBER})
    assert got[SUBSCRIBER.email].lifecycle_stage == "prospect"
    assert members(engine, "everyone") == emails(CUSTOMERS_BY_DEFAULT | {SUBSCRIBER})


def test_no_customer_roles_leaves_only_people_with_orders(engine: Engine) -> None:
    load(engine)
    recompute(engine, settings([]), now=A)
    assert set(profiles(engine)) == {BUYING_MANAGER.email, CANCELLED_ADMIN.email, GUEST.email}


# ---------------------------------------------------------------------------------------
# Pushes: a Mailchimp mirror of "everyone" against the destination sandbox
# ---------------------------------------------------------------------------------------

LIST = "aud1"


@pytest.fixture
def sandbox() -> Iterator[DestinationSandbox]:
    with DestinationSandbox() as box:
        box.mailchimp.add_list(LIST)
        yield box


def mirror(sandbox: DestinationSandbox, tmp_path: Path) -> list[str]:
    path = tmp_path / "mailchimp.toml"
    path.write_text(
        f"""
destination = "mailchimp"
base_url = "{sandbox.mailchimp_url}"
allow_loopback = true
[credentials]
api_key = "{sandbox.mailchimp.api_key}"

[[sync]]
name = "mc-everyone"
segment = "everyone"
mode = "mirror"
object = "{LIST}"
# Who is a customer is the subject here, not consent (tests/test_consent.py).
consent = "none"
consent_reason = "tests who is a customer"
[sync.fields]
email_address = "email"
"merge_fields.FNAME" = "first_name"
[sync.options]
tag = "everyone"
"""
    )
    return [str(path)]


def run_push(config: Settings, engine: Engine) -> PushResult:
    (result,) = asyncio.run(push(engine, select_syncs(load_mappings(config), None)))
    return result


def sent(sandbox: DestinationSandbox) -> str:
    """Every body Mailchimp received, as one text to search for a quoted address."""
    return "\n".join(json.dumps(r.body) for r in sandbox.mailchimp.requests if r.body)


def quoted(email: str) -> str:
    return json.dumps(email)  # "admin@example.com", not a piece of "cancelled.admin@..."


def test_no_staff_or_dead_order_address_is_pushed(
    engine: Engine, sandbox: DestinationSandbox, tmp_path: Path
) -> None:
    load(engine)
    config = settings(mappings=mirror(sandbox, tmp_path))
    recompute(engine, config, now=A)
    assert run_push(config, engine).counts.added == 4
    assert sandbox.mailchimp.segment_members(LIST, "everyone") == emails(CUSTOMERS_BY_DEFAULT)
    bodies = sent(sandbox)
    assert quoted(GUEST.email) in bodies  # the search finds an address that was sent
    for person in NOT_CUSTOMERS:
        assert quoted(person.email) not in bodies, person
        assert sandbox.mailchimp.member(LIST, person.email) is None


@pytest.mark.parametrize("scoped", [False, True], ids=["full", "scoped"])
def test_a_guest_whose_order_is_trashed_leaves_segments_and_the_destination(
    engine: Engine, sandbox: DestinationSandbox, tmp_path: Path, scoped: bool
) -> None:
    shop = load(engine)
    config = settings(mappings=mirror(sandbox, tmp_path))
    recompute(engine, config, now=A)
    run_push(config, engine)
    assert GUEST.email in sandbox.mailchimp.segment_members(LIST, "everyone")

    # The store trashes the guest's only order (spam): it comes back with status "trash".
    shop.orders = [
        mug_order(GUEST_ORDER, "trash", GUEST, modified="2026-06-29T10:00")
        if o["id"] == GUEST_ORDER
        else o
        for o in shop.orders
    ]
    sync(engine, shop)
    later = datetime(2026, 6, 30, 13, 0, tzinfo=UTC)
    with engine.connect() as conn:
        guest = conn.execute(
            select(CUSTOMERS.c.id).where(CUSTOMERS.c.email == GUEST.email)
        ).scalar_one()
    result = recompute(engine, config, now=later, customers={guest} if scoped else None)
    assert result.scope == (1 if scoped else None)
    assert GUEST.email not in profiles(engine)
    assert set(profiles(engine)) == emails(CUSTOMERS_BY_DEFAULT - {GUEST})
    assert members(engine, "everyone") == emails(CUSTOMERS_BY_DEFAULT - {GUEST})
    with engine.connect() as conn:
        exits = conn.execute(
            select(MEMBERSHIPS.c.segment, MEMBERSHIPS.c.exited_at).where(
                MEMBERSHIPS.c.customer_id == guest
            )
        ).all()
    assert sorted(exits) == [("buyers", later), ("everyone", later), ("sql_everyone", later)]

    counts = run_push(config, engine).counts
    assert (counts.removed, counts.added) == (1, 0)
    assert sandbox.mailchimp.segment_members(LIST, "everyone") == emails(
        CUSTOMERS_BY_DEFAULT - {GUEST}
    )
