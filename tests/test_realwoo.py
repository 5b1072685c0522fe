"""End to end against a real WooCommerce 10 store (WordPress, MariaDB, HPOS) on 127.0.0.1.

The store comes from ``../shared/realwoo`` (see the ``realwoo`` fixtures in conftest.py): one
store per session, seeded once with 100 orders (guests, every status, full and partial refunds,
trashed and permanently deleted orders). syncd reads it through its real code paths: the
``syncd sync`` command with a config file, over OAuth 1.0a (plain HTTP) and over HTTPS with
Basic auth verified against the store's own CA file, into SQLite and Postgres; and its webhook
receiver (the app ``syncd run`` serves) registered in the store as a real webhook.

Expected values come from the store's own MariaDB tables (HPOS ``wp_wc_orders``, ``wp_users``,
``wp_usermeta``), never from its REST API, with Decimal arithmetic done here.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest
import uvicorn
from pydantic import SecretStr
from sqlalchemy import Engine, select

from syncd.config import Settings, WooCommerceSourceSettings
from syncd.ingest import SourceSync
from syncd.metrics import Metrics
from syncd.server import create_app
from syncd.sources.webhooks import WebhookIntake
from syncd.store.engine import open_store
from syncd.store.models import CUSTOMER_RECORDS as RECORDS
from syncd.store.models import CUSTOMERS, ORDERS, PROFILES, REFUNDS
from tests.conftest import POSTGRES_URL, _drop_postgres_database, _fresh_postgres_database

# The first test also waits for the store: up (on a fresh machine with its Debian packages,
# under a minute, more on a slow mirror), seed and the syncs.
pytestmark = [pytest.mark.realwoo, pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "shop"
WEBHOOK_SECRET = "realwoo webhook secret: spaces & symbols"
# The store runs due Action Scheduler actions (which deliver webhooks) every 5 s; a delivery
# seen here took 1.2-5.7 s. A change must reach syncd's store well within this.
WEBHOOK_BOUND_SECONDS = 30.0
# Small pages, so the seeded store's ~100 orders and a dozen same-second refunds span many
# pages, as a store with thousands of orders does at the default of 100.
PER_PAGE = 10


# -- the store's own database (MariaDB), not its API ------------------------------------------


class OrderFacts(NamedTuple):
    status: str
    currency: str
    total_minor: int
    customer_source_id: int  # 0 = guest
    email: str | None  # billing email, trimmed and lower-cased
    refunded_minor: int


class AccountFacts(NamedTuple):
    email: str | None
    role: str
    first_name: str
    last_name: str


@dataclass(frozen=True)
class Facts:
    """What a store holds, in one shape for MariaDB and for syncd's tables."""

    orders: dict[int, OrderFacts]  # trashed orders included, with status "trash"
    refunds: dict[int, tuple[int, int]]  # refund id -> (order id, amount in minor units)
    accounts: dict[int, AccountFacts]  # every WordPress user (WooCommerce reads role=all)


def minor(amount: str) -> int:
    """EUR in cents, by Decimal; the store keeps decimal(26,8)."""
    cents = Decimal(amount) * 100
    assert cents == cents.to_integral_value(), amount
    return int(cents)


def norm_email(value: str | None) -> str | None:
    return value.strip().lower() if value and value.strip() else None


class MariaDB:
    """The store's database through the ``mariadb`` client as root over its unix socket
    (installed with the server; no Python driver needed)."""

    def __init__(self, store: dict[str, Any]) -> None:
        self.defaults = Path(store["dir"]) / "conf" / "my.cnf"

    def rows(self, sql: str) -> list[list[str | None]]:
        out = subprocess.run(
            ["mariadb", f"--defaults-file={self.defaults}", "-uroot", "wordpress", "-N", "-B"],
            input=sql,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        return [
            [None if value == "NULL" else value for value in line.split("\t")]
            for line in out.splitlines()
        ]

    def facts(self) -> Facts:
        # HPOS (WooCommerce 10 default for a new store): orders and refunds are rows of
        # wp_wc_orders, type shop_order / shop_order_refund; statuses carry the "wc-" prefix
        # except "trash"; a refund's total_amount is negative.
        refunds: dict[int, tuple[int, int]] = {}
        for rid, parent, total in self.rows(
            "SELECT id, parent_order_id, total_amount FROM wp_wc_orders"
            " WHERE type = 'shop_order_refund'"
        ):
            assert rid and parent and total
            refunds[int(rid)] = (int(parent), -minor(total))
        refunded: dict[int, int] = {}
        for parent, amount in refunds.values():
            refunded[parent] = refunded.get(parent, 0) + amount
        orders: dict[int, OrderFacts] = {}
        for oid, status, currency, total, customer, email in self.rows(
            "SELECT id, status, currency, total_amount, customer_id, billing_email"
            " FROM wp_wc_orders WHERE type = 'shop_order'"
        ):
            assert oid and status and currency and total
            orders[int(oid)] = OrderFacts(
                status=status.removeprefix("wc-"),
                currency=currency,
                total_minor=minor(total),
                customer_source_id=int(customer or 0),
                email=norm_email(email),
                refunded_minor=refunded.get(int(oid), 0),
            )
        accounts: dict[int, AccountFacts] = {}
        for uid, email, caps, first, last in self.rows(
            "SELECT u.ID, u.user_email, c.meta_value, f.meta_value, l.meta_value FROM wp_users u"
            " LEFT JOIN wp_usermeta c ON c.user_id = u.ID AND c.meta_key = 'wp_capabilities'"
            " LEFT JOIN wp_usermeta f ON f.user_id = u.ID AND f.meta_key = 'first_name'"
            " LEFT JOIN wp_usermeta l ON l.user_id = u.ID AND l.meta_key = 'last_name'"
        ):
            assert uid
            # wp_capabilities is a PHP-serialized array {role: true}; the REST customer's
            # "role" is the first of them (WooCommerce 10.0, WC_Customer_Data_Store).
            roles = re.findall(r's:\d+:"([^"]+)";b:1;', caps or "")
            accounts[int(uid)] = AccountFacts(
                norm_email(email), roles[0] if roles else "", first or "", last or ""
            )
        return Facts(orders, refunds, accounts)


# -- syncd's store ------------------------------------------------------------------------------


def stored_facts(engine: Engine) -> tuple[Facts, set[int]]:
    """syncd's rows in the same shape, and the ids of orders it marked gone for good."""
    orders: dict[int, OrderFacts] = {}
    gone: set[int] = set()
    with engine.connect() as conn:
        for row in conn.execute(select(ORDERS).where(ORDERS.c.source == SOURCE)):
            if row.deleted_at is not None and row.status != "trash":
                gone.add(row.source_id)
                continue
            status = row.status
            if (row.deleted_at is not None) != (status == "trash"):
                # a trashed order is kept with status "trash" and marked deleted: anything
                # else shows in the comparison
                status = f"{status} (deleted_at={row.deleted_at})"
            orders[row.source_id] = OrderFacts(
                status,
                row.currency,
                row.total_minor,
                row.customer_source_id,
                row.email,
                row.refunded_minor,
            )
        refunds = {
            row.source_id: (row.order_source_id, row.amount_minor)
            for row in conn.execute(
                select(REFUNDS).where(REFUNDS.c.source == SOURCE, REFUNDS.c.deleted_at.is_(None))
            )
        }
        accounts = {
            row.source_id: AccountFacts(
                row.email,
                row.role or "",
                row.raw.get("first_name") or "",
                row.raw.get("last_name") or "",
            )
            for row in conn.execute(
                select(RECORDS).where(RECORDS.c.source == SOURCE, RECORDS.c.deleted_at.is_(None))
            )
        }
    return Facts(orders, refunds, accounts), gone


def assert_links(engine: Engine) -> None:
    """Orders and refunds point at the right rows: a registered order at its account's person,
    a guest order at the person of its billing email, a refund at its order's row; and each
    customer account's person has the account's email and names."""
    with engine.connect() as conn:
        orders = conn.execute(select(ORDERS).where(ORDERS.c.source == SOURCE)).all()
        records = {
            r.source_id: r for r in conn.execute(select(RECORDS).where(RECORDS.c.source == SOURCE))
        }
        people = {p.id: p for p in conn.execute(select(CUSTOMERS))}
        refunds = conn.execute(select(REFUNDS).where(REFUNDS.c.source == SOURCE)).all()
    row_ids = {o.source_id: o.id for o in orders}
    for order in orders:
        if order.customer_source_id:
            assert order.customer_id == records[order.customer_source_id].customer_id, order
        elif order.email:
            assert people[order.customer_id].email == order.email, order
    for refund in refunds:
        assert refund.order_id == row_ids[refund.order_source_id], refund
    for record in records.values():
        if record.deleted_at is None and record.role == "customer":
            person = people[record.customer_id]
            first, last = record.raw.get("first_name") or None, record.raw.get("last_name") or None
            assert (person.email, person.first_name, person.last_name) == (
                record.email,
                first,
                last,
            ), record.source_id


def assert_same(stored: Facts, expected: Facts) -> None:
    # One assert per table, so a failure shows pytest's diff of just that table.
    assert stored.orders == expected.orders
    assert stored.refunds == expected.refunds
    assert stored.accounts == expected.accounts


# -- the store's REST API, for changes --------------------------------------------------------


def rest_client(store: dict[str, Any]) -> httpx.Client:
    """HTTPS with Basic auth, TLS verified against the store's own certificate."""
    return httpx.Client(
        base_url=store["https_url"] + "/wp-json/wc/v3/",
        auth=(store["consumer_key"], store["consumer_secret"]),
        verify=ssl.create_default_context(cafile=store["ca_file"]),
        trust_env=False,  # no proxy for 127.0.0.1, no CA bundle from the environment
        timeout=120,
    )


def call(api: httpx.Client, method: str, path: str, **kw: Any) -> Any:
    response = api.request(method, path, **kw)
    assert response.is_success, (method, path, response.status_code, response.text[:500])
    return response.json()


def product_ids(db: MariaDB) -> list[int]:
    rows = db.rows(
        "SELECT ID FROM wp_posts WHERE post_type = 'product' AND post_status = 'publish'"
        " ORDER BY ID LIMIT 3"
    )
    return [int(r[0] or 0) for r in rows]


def new_order(
    api: httpx.Client, db: MariaDB, customer_id: int = 0, status: str = "processing"
) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:10]
    body: dict[str, Any] = {
        "status": status,
        "set_paid": status in ("processing", "completed"),
        "payment_method": "bacs",
        "currency": "EUR",
        "customer_id": customer_id,
        "line_items": [{"product_id": p, "quantity": n} for n, p in enumerate(product_ids(db), 1)],
        "shipping_lines": [{"method_id": "flat_rate", "method_title": "Flat", "total": "4.90"}],
    }
    if not customer_id:
        body["billing"] = {
            "first_name": "Gast",
            "last_name": tag,
            "email": f"Guest-{tag}@Example.com",  # stored as typed; syncd lower-cases
            "country": "DE",
        }
    return dict(call(api, "POST", "orders", json=body))


def new_customer(api: httpx.Client, first_name: str = "Neu") -> dict[str, Any]:
    tag = uuid.uuid4().hex[:10]
    return dict(
        call(
            api,
            "POST",
            "customers",
            json={
                "email": f"new-{tag}@example.com",
                "first_name": first_name,
                "last_name": tag,
                "username": f"new-{tag}",
            },
        )
    )


def wait_next_second() -> None:
    """Modification times have whole-second precision and syncd's windows end at its start,
    to the second: let the second of the last change pass before syncing again."""
    time.sleep(1.05)


# -- the sync scenario: seeded store, sync, change through the API, sync again --------------

LANES = ("sqlite-oauth1", "sqlite-https", "postgres-oauth1", "postgres-https")


@dataclass
class Lane:
    """One syncd store synced from the real store over one transport."""

    name: str
    store_url: str
    config: Path
    runs: list[tuple[int, str]] = field(default_factory=list)  # exit status, stderr
    facts: list[tuple[Facts, set[int]]] = field(default_factory=list)
    link_errors: list[str] = field(default_factory=list)

    @staticmethod
    def env() -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
        # The CA comes from the config's verify_tls, not from the environment.
        for name in ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE"):
            env.pop(name, None)
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        return env

    def start(self) -> subprocess.Popen[bytes]:
        """``syncd sync`` with this lane's config, in the background (lanes sync side by side)."""
        log = self.config.with_suffix(f".{len(self.runs)}.log")
        with log.open("wb") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "syncd", "--config", str(self.config), "sync", SOURCE],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env(),
                cwd=self.config.parent,
            )

    def finish(self, process: subprocess.Popen[bytes]) -> None:
        """Wait for the run, then read what it stored."""
        status = process.wait(timeout=240)
        log = self.config.with_suffix(f".{len(self.runs)}.log")
        self.runs.append((status, log.read_text(errors="replace")))
        engine = open_store(self.store_url)
        try:
            self.facts.append(stored_facts(engine))
            try:
                assert_links(engine)
            except AssertionError as exc:
                self.link_errors.append(f"after sync {len(self.runs)}: {exc}")
        finally:
            engine.dispose()

    def profile(self) -> set[str | None]:
        """``syncd segments`` with this lane's config; the emails of the profiled people."""
        done = subprocess.run(
            [sys.executable, "-m", "syncd", "--config", str(self.config), "segments"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=self.env(),
            cwd=self.config.parent,
            timeout=240,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        engine = open_store(self.store_url)
        try:
            with engine.connect() as conn:
                return {
                    row.email
                    for row in conn.execute(
                        select(CUSTOMERS.c.email).join(
                            PROFILES, PROFILES.c.customer_id == CUSTOMERS.c.id
                        )
                    )
                }
        finally:
            engine.dispose()

    def check_run(self, number: int) -> None:
        status, output = self.runs[number]
        assert status == 0, f"syncd sync exited {status}:\n{output[-3000:]}"


def sync_lanes(lanes: Iterable[Lane]) -> None:
    started = [(lane, lane.start()) for lane in lanes]
    for lane, process in started:
        lane.finish(process)


def write_config(path: Path, store: dict[str, Any], store_url: str, transport: str) -> None:
    lines = [
        "[store]",
        f"url = {json.dumps(store_url)}",
        "",
        f"[sources.{SOURCE}]",
        'type = "woocommerce"',
        f"consumer_key = {json.dumps(store['consumer_key'])}",
        f"consumer_secret = {json.dumps(store['consumer_secret'])}",
        "requests_per_second = 0",
        f"per_page = {PER_PAGE}",
        # Permanent deletes show in no modified-since listing: reconcile ids on every run.
        "reconcile_every_hours = 0",
    ]
    if transport == "oauth1":
        # Over plain HTTP WooCommerce accepts only OAuth 1.0a signatures.
        lines += [f"url = {json.dumps(store['http_url'])}", 'auth = "oauth1"']
    else:
        lines += [
            f"url = {json.dumps(store['https_url'])}",
            'auth = "basic"',
            # the store's self-signed certificate is its own CA
            f"verify_tls = {json.dumps(store['ca_file'])}",
        ]
    path.write_text("\n".join(lines) + "\n")


@dataclass
class Changes:
    """What the scenario changed through the REST API (ids), checked in the database too."""

    completed: int = 0
    partial_refund: tuple[int, int, int] = (0, 0, 0)  # order, refund id, cents
    full_refund: tuple[int, int] = (0, 0)  # order, refund id
    trashed: int = 0
    restored: int = 0  # trashed by the seed, brought back with PUT status
    deleted: list[int] = field(default_factory=list)  # batch delete: permanent
    guest_order: int = 0
    trashed_guest_order: int = 0
    registered_order: int = 0
    renamed_customer: tuple[int, str, str] = (0, "", "")  # id, new email, new first name
    created_customer: int = 0
    created_customer_order: int = 0


def change_the_store(store: dict[str, Any], db: MariaDB, seeded: dict[str, Any]) -> Changes:
    """Complete, refund (partial and full), trash, restore, batch delete, new orders (guest
    and registered, and a new customer's), a customer's new email and name."""
    before = db.facts()
    seed_orders = set(seeded["orders"])
    untouched = sorted(
        oid
        for oid, o in before.orders.items()
        if oid in seed_orders
        and o.refunded_minor == 0
        and o.status in ("processing", "on-hold", "completed")
    )
    by_status: dict[str, list[int]] = {}
    for oid in untouched:
        by_status.setdefault(before.orders[oid].status, []).append(oid)
    changes = Changes()
    with rest_client(store) as api:
        changes.completed = by_status["processing"].pop(0)
        call(api, "PUT", f"orders/{changes.completed}", json={"status": "completed"})

        target = by_status["completed"].pop(0)
        refund = call(
            api,
            "POST",
            f"orders/{target}/refunds",
            json={"amount": "12.34", "reason": "realwoo partial", "api_refund": False},
        )
        changes.partial_refund = (target, int(refund["id"]), 1234)

        target = by_status["on-hold"].pop(0)
        amount = Decimal(before.orders[target].total_minor) / 100
        refund = call(
            api,
            "POST",
            f"orders/{target}/refunds",
            json={"amount": f"{amount:.2f}", "reason": "realwoo full", "api_refund": False},
        )
        changes.full_refund = (target, int(refund["id"]))

        changes.trashed = by_status["processing"].pop(0)
        call(api, "DELETE", f"orders/{changes.trashed}")  # no force: to the trash

        changes.restored = sorted(seeded["trashed"])[0]
        # WooCommerce 10.0: PUT status on a trashed order untrashes it (no order.restored)
        call(api, "PUT", f"orders/{changes.restored}", json={"status": "on-hold"})

        registered = next(o for o in by_status["processing"] if before.orders[o].customer_source_id)
        guest = next(o for o in by_status["processing"] if not before.orders[o].customer_source_id)
        changes.deleted = sorted([registered, guest])
        # the batch endpoint's delete is always permanent, whatever "force" says
        call(api, "POST", "orders/batch", json={"delete": changes.deleted})

        changes.guest_order = int(new_order(api, db)["id"])
        # a guest known only by an order that went to the trash (spam, a test order)
        changes.trashed_guest_order = int(new_order(api, db)["id"])
        call(api, "DELETE", f"orders/{changes.trashed_guest_order}")
        someone = sorted(c for c in seeded["customers"] if c in before.accounts)[0]
        changes.registered_order = int(
            new_order(api, db, customer_id=someone, status="on-hold")["id"]
        )

        renamed = sorted(seeded["customers"])[-1]
        email = f"Renamed-{uuid.uuid4().hex[:8]}@example.com"
        call(api, "PUT", f"customers/{renamed}", json={"email": email, "first_name": "Umbenannt"})
        changes.renamed_customer = (renamed, email.lower(), "Umbenannt")

        changes.created_customer = int(new_customer(api)["id"])
        changes.created_customer_order = int(
            new_order(api, db, customer_id=changes.created_customer, status="completed")["id"]
        )
    return changes


@dataclass
class Scenario:
    seeded: dict[str, Any]
    first: Facts  # the store's database after seeding
    second: Facts  # ... and after the changes
    changes: Changes
    lanes: dict[str, Lane]


@pytest.fixture(scope="module")
def scenario(
    realwoo_seeded: tuple[dict[str, Any], dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Scenario]:
    store, seeded = realwoo_seeded
    db = MariaDB(store)
    folder = tmp_path_factory.mktemp("realwoo-lanes")
    lanes: dict[str, Lane] = {}
    databases: list[str] = []
    try:
        for name in LANES:
            dialect, transport = name.split("-")
            if dialect == "postgres":
                if not POSTGRES_URL:
                    continue
                database, url = _fresh_postgres_database()
                databases.append(database)
            else:
                url = f"sqlite:///{folder / name}.db"
            config = folder / f"{name}.toml"
            write_config(config, store, url, transport)
            lanes[name] = Lane(name, url, config)
        first = db.facts()
        started = time.monotonic()
        sync_lanes(lanes.values())
        synced = time.monotonic()
        changes = change_the_store(store, db, seeded)
        wait_next_second()
        changed = time.monotonic()
        sync_lanes(lanes.values())
        print(
            f"realwoo: {len(lanes)} lanes side by side: first sync {synced - started:.1f} s, "
            f"changes {changed - synced:.1f} s, second sync {time.monotonic() - changed:.1f} s"
        )
        yield Scenario(seeded, first, db.facts(), changes, lanes)
    finally:
        for database in databases:
            _drop_postgres_database(database)


def lane_of(scenario: Scenario, name: str) -> Lane:
    if name not in scenario.lanes:
        pytest.skip("SYNCD_TEST_POSTGRES_URL is not set")
    return scenario.lanes[name]


@pytest.mark.parametrize("lane", LANES)
def test_first_sync_equals_the_store_database(scenario: Scenario, lane: str) -> None:
    run = lane_of(scenario, lane)
    run.check_run(0)
    stored, gone = run.facts[0]
    # nothing the store ever held is missing or extra: the seed's permanently deleted
    # orders were gone before syncd first looked, so they never appear
    assert_same(stored, scenario.first)
    assert gone == set()
    assert not set(scenario.seeded["deleted"]) & set(stored.orders)
    assert [e for e in run.link_errors if e.startswith("after sync 1:")] == []


@pytest.mark.parametrize("lane", LANES)
def test_sync_after_changes_equals_the_store_database(scenario: Scenario, lane: str) -> None:
    run = lane_of(scenario, lane)
    run.check_run(1)
    stored, gone = run.facts[1]
    assert_same(stored, scenario.second)
    # the batch-deleted orders are kept in syncd, marked gone for good (not "trash")
    assert gone == set(scenario.changes.deleted)
    assert run.link_errors == []


def customers_of(facts: Facts) -> set[str | None]:
    """Who syncd must profile, by email: accounts in the default ``customer_roles``
    (``customer``) and whoever has an order that is not trashed (deleted ones are gone from
    the database); never staff without orders, never a guest known only by trashed orders."""
    people = {a.email for a in facts.accounts.values() if a.role == "customer"}
    for order in facts.orders.values():
        if order.status != "trash":
            account = facts.accounts.get(order.customer_source_id)
            people.add(account.email if account else order.email)
    return people


@pytest.fixture(scope="module")
def profiled(scenario: Scenario) -> dict[str, set[str | None]]:
    """``syncd segments`` on one lane per store kind, after the second sync: the emails of
    the people it profiled."""
    out: dict[str, set[str | None]] = {}
    for name in ("sqlite-https", "postgres-https"):
        if name in scenario.lanes:
            out[name] = scenario.lanes[name].profile()
    return out


@pytest.mark.parametrize("lane", ["sqlite-https", "postgres-https"])
def test_profiles_hold_the_stores_customers_only(
    scenario: Scenario, profiled: dict[str, set[str | None]], lane: str
) -> None:
    lane_of(scenario, lane)
    expected = customers_of(scenario.second)
    admin = scenario.second.accounts[1]
    assert admin.role == "administrator"
    assert admin.email not in expected
    spam = scenario.second.orders[scenario.changes.trashed_guest_order]
    assert (spam.status, spam.customer_source_id) == ("trash", 0)
    assert spam.email not in expected
    assert profiled[lane] == expected


def test_the_changes_reached_the_store_database(scenario: Scenario) -> None:
    """The scenario did what it says (else the comparisons above would prove little)."""
    c, before, after = scenario.changes, scenario.first, scenario.second
    assert after.orders[c.completed].status == "completed"
    order, refund_id, cents = c.partial_refund
    assert after.refunds[refund_id] == (order, cents)
    assert after.orders[order].status == before.orders[order].status
    order, refund_id = c.full_refund
    assert after.refunds[refund_id] == (order, before.orders[order].total_minor)
    assert after.orders[order].status == "refunded"
    assert before.orders[c.trashed].status == "processing"
    assert after.orders[c.trashed].status == "trash"
    assert before.orders[c.restored].status == "trash"
    assert after.orders[c.restored].status == "on-hold"
    assert all(oid in before.orders and oid not in after.orders for oid in c.deleted)
    assert after.orders[c.guest_order].customer_source_id == 0
    assert after.orders[c.guest_order].email is not None
    assert after.orders[c.registered_order].customer_source_id > 0
    uid, email, first_name = c.renamed_customer
    assert after.accounts[uid].email == email != before.accounts[uid].email
    assert after.accounts[uid].first_name == first_name
    assert after.accounts[c.created_customer].role == "customer"
    assert c.created_customer not in before.accounts
    assert after.orders[c.created_customer_order].customer_source_id == c.created_customer
    # the seed's mix is there: guests, trash, refunds, an admin who is no customer
    assert sum(o.customer_source_id == 0 for o in before.orders.values()) > 20
    refund_ids = set(scenario.seeded["refunds"]["refund_ids"])
    assert len(refund_ids) == 12 and refund_ids <= set(before.refunds)
    assert before.accounts[1].role == "administrator"


# -- webhooks: the store delivers to syncd's receiver -----------------------------------------

TOPICS = ("order.created", "order.updated", "order.deleted", "customer.created", "customer.updated")


@dataclass
class Receiver:
    """syncd's webhook intake behind the service's app, served by uvicorn on 127.0.0.1."""

    engine: Engine
    intake: WebhookIntake
    settings: Settings
    hooks: list[int]  # the webhooks registered in the store

    def poll(self) -> None:
        """One polling run into the same store (what the daemon does every few minutes)."""

        async def run() -> None:
            sync = SourceSync(self.engine, SOURCE, self.settings.sources[SOURCE])
            try:
                result = await sync.run()
            finally:
                await sync.client.aclose()
            assert result.status == "success", result.error

        asyncio.run(run())


def serve_in_thread(
    app: Any, intake: WebhookIntake
) -> tuple[uvicorn.Server, threading.Thread, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))

    async def main() -> None:
        await intake.start()
        try:
            await server.serve(sockets=[sock])
        finally:
            await intake.stop(timeout=5)

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the receiver did not start"
        time.sleep(0.05)
    return server, thread, port


@contextmanager
def webhook_receiver(store: dict[str, Any], folder: Path) -> Iterator[Receiver]:
    """The receiver on a free port, with the store's webhooks pointing at it; both removed
    afterwards (no deliveries to a receiver that is gone)."""
    engine = open_store(f"sqlite:///{folder}/hooks.db")
    settings = Settings(
        sources={
            SOURCE: WooCommerceSourceSettings(
                url=store["http_url"],  # the intake's own reads go over OAuth 1.0a
                consumer_key=SecretStr(store["consumer_key"]),
                consumer_secret=SecretStr(store["consumer_secret"]),
                webhook_secret=SecretStr(WEBHOOK_SECRET),
                requests_per_second=0,
            )
        }
    )
    intake = WebhookIntake(engine, settings)
    app = create_app(engine, settings, Metrics(engine, settings), webhook=intake.endpoint)
    server, thread, port = serve_in_thread(app, intake)
    hooks: list[int] = []
    try:
        with rest_client(store) as api:
            for topic in TOPICS:
                hook = call(
                    api,
                    "POST",
                    "webhooks",
                    json={
                        "name": f"syncd {topic}",
                        "topic": topic,
                        "delivery_url": f"http://127.0.0.1:{port}/webhooks/{SOURCE}",
                        "secret": WEBHOOK_SECRET,
                        "status": "active",
                    },
                )
                hooks.append(int(hook["id"]))
        yield Receiver(engine, intake, settings, hooks)
    finally:
        with rest_client(store) as api:
            for hook_id in hooks:
                api.delete(f"webhooks/{hook_id}", params={"force": "true"})
        server.should_exit = True
        thread.join(timeout=15)
        intake.close()
        engine.dispose()


Check = Callable[[Facts, Facts], bool]  # (syncd's store, the store's database) -> arrived?


def settle(engine: Engine, db: MariaDB, checks: dict[str, Check]) -> dict[str, float | None]:
    """Seconds until each check holds, all watched at once; None when one did not hold
    within WEBHOOK_BOUND_SECONDS."""
    start = time.monotonic()
    pending = dict(checks)
    seconds: dict[str, float | None] = {}
    while pending:
        elapsed = time.monotonic() - start
        stored, expected = stored_facts(engine)[0], db.facts()
        for what, check in list(pending.items()):
            if check(stored, expected):
                seconds[what] = elapsed
                del pending[what]
        if elapsed > WEBHOOK_BOUND_SECONDS:
            break
        time.sleep(0.25)
    seconds.update(dict.fromkeys(pending))
    return seconds


def same_order(oid: int) -> Check:
    return lambda stored, expected: stored.orders.get(oid) == expected.orders[oid]


def same_refunds(oid: int) -> Check:
    """The order and its refunds, as refunds rows with the store's ids and amounts."""

    def of(facts: Facts) -> dict[int, tuple[int, int]]:
        return {rid: refund for rid, refund in facts.refunds.items() if refund[0] == oid}

    return lambda stored, expected: same_order(oid)(stored, expected) and of(stored) == of(expected)


def same_account(uid: int) -> Check:
    return lambda stored, expected: stored.accounts.get(uid) == expected.accounts[uid]


@dataclass
class HookScenario:
    pings: int  # creation pings answered
    rejected: dict[str, int]  # deliveries refused, by reason
    statuses: list[str]  # the webhooks' status in the store afterwards
    seconds: dict[str, float | None]  # change -> seconds until in syncd's store (None: never)
    ids: dict[str, int]
    stored: Facts  # at the end, in syncd's store
    expected: Facts  # ... and in the store's database
    restored_by_poll: bool  # the untrashed order as the store has it after the next poll


@pytest.fixture(scope="module")
def hooks(
    realwoo_seeded: tuple[dict[str, Any], dict[str, Any]],
    tmp_path_factory: pytest.TempPathFactory,
) -> HookScenario:
    """Changes made through the API in three rounds; each round waits for all its changes to
    reach syncd's store by webhook alone (no polling runs), timing each. On the seeded store,
    whichever module fixture comes first: new orders need its products."""
    store = realwoo_seeded[0]
    db = MariaDB(store)
    folder = tmp_path_factory.mktemp("realwoo-hooks")
    seconds: dict[str, float | None] = {}
    with webhook_receiver(store, folder) as rx, rest_client(store) as api:
        pings = rx.intake.stats.pings
        ids = {"customer": int(new_customer(api, "Hook")["id"])}
        ids["guest"] = int(new_order(api, db)["id"])
        ids["registered"] = int(new_order(api, db, customer_id=ids["customer"])["id"])
        ids["to complete"] = int(new_order(api, db, status="processing")["id"])
        ids["to refund"] = int(new_order(api, db, status="completed")["id"])
        ids["to trash"] = int(new_order(api, db, status="on-hold")["id"])
        seconds |= settle(
            rx.engine,
            db,
            {
                "new customer": same_account(ids["customer"]),
                "new guest order": same_order(ids["guest"]),
                "new registered order": same_order(ids["registered"]),
                "new processing order": same_order(ids["to complete"]),
                "new completed order": same_order(ids["to refund"]),
                "new on-hold order": same_order(ids["to trash"]),
            },
        )

        call(api, "PUT", f"orders/{ids['to complete']}", json={"status": "completed"})
        # order.updated fires on woocommerce_order_refunded; its payload lists the refunds
        call(
            api,
            "POST",
            f"orders/{ids['to refund']}/refunds",
            json={"amount": "5.55", "reason": "hook partial", "api_refund": False},
        )
        call(api, "DELETE", f"orders/{ids['to trash']}")  # trash: order.deleted {"id": N}
        call(
            api,
            "PUT",
            f"customers/{ids['customer']}",
            json={"email": f"changed-{ids['customer']}@example.com", "last_name": "Geändert"},
        )
        seconds |= settle(
            rx.engine,
            db,
            {
                "order completed": same_order(ids["to complete"]),
                "partial refund": same_refunds(ids["to refund"]),
                "order trashed": same_order(ids["to trash"]),
                "customer changed": same_account(ids["customer"]),
            },
        )

        rest = Decimal(db.facts().orders[ids["to refund"]].total_minor - 555) / 100
        call(
            api,
            "POST",
            f"orders/{ids['to refund']}/refunds",
            json={"amount": f"{rest:.2f}", "reason": "hook rest", "api_refund": False},
        )
        # Untrash. WooCommerce 10.0 sends no webhook at all for this (no order.restored, no
        # order.updated: Action Scheduler gets no delivery): only polling brings it back.
        call(api, "PUT", f"orders/{ids['to trash']}", json={"status": "processing"})
        seconds |= settle(rx.engine, db, {"full refund": same_refunds(ids["to refund"])})
        # what webhooks alone brought, before the poll
        stored, expected = stored_facts(rx.engine)[0], db.facts()
        rx.poll()
        restored_by_poll = same_order(ids["to trash"])(stored_facts(rx.engine)[0], db.facts())
        statuses = [str(call(api, "GET", f"webhooks/{h}")["status"]) for h in rx.hooks]
        rejected = dict(rx.intake.stats.rejected)
    for what, took in seconds.items():
        print(f"webhook: {what}: " + ("not within the bound" if took is None else f"{took:.1f} s"))
    return HookScenario(pings, rejected, statuses, seconds, ids, stored, expected, restored_by_poll)


def assert_arrived(hooks: HookScenario, *changes: str) -> None:
    took = {what: hooks.seconds[what] for what in changes}
    late = [what for what, seconds in took.items() if seconds is None]
    assert late == [], f"not in syncd's store within {WEBHOOK_BOUND_SECONDS:.0f} s: {took}"


def test_webhooks_are_registered_after_the_ping(hooks: HookScenario) -> None:
    # WooCommerce pings the delivery URL (unsigned form body webhook_id=N) when a webhook is
    # created; anything but 200 would have failed the creation or left it inactive.
    assert hooks.pings == len(TOPICS)
    assert hooks.statuses == ["active"] * len(TOPICS)
    assert hooks.rejected == {}  # every delivery was signed right


def test_webhook_new_orders_and_customers_reach_syncd_within_seconds(hooks: HookScenario) -> None:
    assert_arrived(
        hooks,
        "new customer",
        "new guest order",
        "new registered order",
        "new processing order",
        "new completed order",
        "new on-hold order",
    )
    registered = hooks.stored.orders[hooks.ids["registered"]]
    assert registered.customer_source_id == hooks.ids["customer"]
    assert hooks.stored.orders[hooks.ids["guest"]].customer_source_id == 0


def test_webhook_completion_reaches_syncd(hooks: HookScenario) -> None:
    assert_arrived(hooks, "order completed")
    assert hooks.stored.orders[hooks.ids["to complete"]].status == "completed"


def test_webhook_refunds_reach_syncd_as_refunds_rows(hooks: HookScenario) -> None:
    assert_arrived(hooks, "partial refund", "full refund")
    oid = hooks.ids["to refund"]
    order = hooks.expected.orders[oid]
    assert (order.status, order.refunded_minor) == ("refunded", order.total_minor)
    refunds = sorted(r for r in hooks.expected.refunds.values() if r[0] == oid)
    assert refunds == sorted([(oid, 555), (oid, order.total_minor - 555)])
    assert {rid: r for rid, r in hooks.stored.refunds.items() if r[0] == oid} == {
        rid: r for rid, r in hooks.expected.refunds.items() if r[0] == oid
    }


def test_webhook_trash_reaches_syncd_and_a_poll_brings_the_order_back(hooks: HookScenario) -> None:
    assert_arrived(hooks, "order trashed")
    assert hooks.restored_by_poll
    assert hooks.expected.orders[hooks.ids["to trash"]].status == "processing"


def test_webhook_customer_change_reaches_syncd(hooks: HookScenario) -> None:
    assert_arrived(hooks, "new customer", "customer changed")
    uid = hooks.ids["customer"]
    assert hooks.stored.accounts[uid] == AccountFacts(
        f"changed-{uid}@example.com", "customer", "Hook", hooks.expected.accounts[uid].last_name
    )
    assert hooks.expected.accounts[uid].last_name == "Geändert"
