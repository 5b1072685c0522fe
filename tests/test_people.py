"""One person per human: guests, accounts, merges and splits, on both stores.

Uses the WooCommerce docs' own payloads: guest order 727 (john.doe@example.com),
customer 25 (the same email, registered), order 723 of customer 26 (joao.silva).
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import SecretStr
from sqlalchemy import Engine, func, select

from syncd.config import WooCommerceSourceSettings
from syncd.ingest import SourceSync, StreamCounts
from syncd.store.models import CUSTOMERS, IDENTITIES, ORDERS
from tests.conftest import fixture


def _sync(engine: Engine) -> SourceSync:
    settings = WooCommerceSourceSettings(
        url="http://127.0.0.1:9", consumer_key=SecretStr("ck_x"), consumer_secret=SecretStr("cs_x")
    )
    sync = SourceSync(engine, "wc", settings)
    for stream in ("customers", "orders"):
        sync.counts[stream] = StreamCounts()
    return sync


def _orders(sync: SourceSync, *payloads: Any, customers: list[Any] | None = None) -> None:
    with sync.engine.begin() as conn:
        sync._commit_orders(conn, sync._parse_orders(list(payloads), customers or []))


def _customers(sync: SourceSync, *payloads: Any) -> None:
    with sync.engine.begin() as conn:
        sync._commit_customers(conn, list(payloads))


def _people(engine: Engine) -> dict[str | None, set[int]]:
    """email of the person → source ids of their orders."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(CUSTOMERS.c.email, ORDERS.c.source_id).join(
                ORDERS, ORDERS.c.customer_id == CUSTOMERS.c.id, isouter=True
            )
        ).all()
    out: dict[str | None, set[int]] = {}
    for email, order in rows:
        out.setdefault(email, set())
        if order is not None:
            out[email].add(order)
    return out


def _count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(CUSTOMERS)).scalar_one())


def _order_723() -> Any:
    return next(o for o in fixture("orders_list.json") if o["id"] == 723)


def _customer(cid: int) -> Any:
    return next(c for c in fixture("customers_list.json") if c["id"] == cid)


def test_guest_who_registers_is_one_person(engine: Engine) -> None:
    sync = _sync(engine)
    guest = copy.deepcopy(fixture("order_single.json"))
    guest["billing"]["email"] = "  John.Doe@EXAMPLE.com "  # as a shopper types it
    _orders(sync, guest)
    assert _people(engine) == {"john.doe@example.com": {727}}
    _customers(sync, fixture("customer_single.json"))  # id 25, john.doe@example.com
    _customers(sync, fixture("customer_single.json"))  # a re-read changes nothing
    assert _count(engine) == 1
    assert _people(engine) == {"john.doe@example.com": {727}}
    with engine.connect() as conn:
        person = conn.execute(select(CUSTOMERS)).one()
        kinds = sorted(conn.execute(select(IDENTITIES.c.kind, IDENTITIES.c.value)).all())
    assert kinds == [("customer_id", "25"), ("email", "john.doe@example.com")]
    assert person.attrs_rank == 2  # the account's own record
    assert person.country == "US" and person.city == "San Francisco"
    # created_at: the earlier of registration (2017-03-21 19:09:28) and the first order
    assert person.created_at.isoformat() == "2017-03-21T19:09:28+00:00"


def test_order_before_its_account_links_by_account_id(engine: Engine) -> None:
    sync = _sync(engine)
    # the account is fetched with the order (the engine does this for unknown ids)
    _orders(sync, _order_723(), customers=[_customer(26)])
    _customers(sync, _customer(26))
    assert _people(engine) == {"joao.silva@example.com": {723}}
    with engine.connect() as conn:
        assert conn.execute(select(ORDERS.c.refunded_minor)).scalar() == 1900


def test_order_of_a_vanished_account_goes_by_email_and_stays_one(engine: Engine) -> None:
    sync = _sync(engine)
    _orders(sync, _order_723())  # account 26 unknown and not served
    _customers(sync, _customer(26))  # later it shows up after all
    assert _count(engine) == 1
    assert _people(engine) == {"joao.silva@example.com": {723}}


def test_email_change_moves_guest_history_the_way_a_fresh_sync_sees_it(engine: Engine) -> None:
    sync = _sync(engine)
    _orders(sync, fixture("order_single.json"))  # guest john.doe@example.com
    _customers(sync, fixture("customer_single.json"))  # account 25 with that email: merged
    changed = copy.deepcopy(fixture("customer_single.json"))
    changed["email"] = "john@new.example.com"
    changed["date_modified_gmt"] = "2017-04-01T00:00:00"
    _customers(sync, changed)
    # the guest order was made under the old address, which no account has now
    assert _people(engine) == {"john@new.example.com": set(), "john.doe@example.com": {727}}
    # a guest order under the account's new email joins the account
    later = copy.deepcopy(fixture("order_single.json"))
    later["id"] = 900
    later["billing"]["email"] = "JOHN@new.example.com"
    _orders(sync, later)
    assert _people(engine) == {"john@new.example.com": {900}, "john.doe@example.com": {727}}


def test_result_does_not_depend_on_arrival_order(store_url: str, tmp_path: Any) -> None:
    from syncd.store.engine import open_store

    guest = fixture("order_single.json")
    second_guest = copy.deepcopy(guest)
    second_guest.update(id=800, date_created_gmt="2018-01-01T00:00:00")
    second_guest["billing"] = {**guest["billing"], "city": "Oakland"}
    results = []
    for order in ([guest, second_guest], [second_guest, guest]):
        engine = open_store(store_url)
        with engine.begin() as conn:
            for table in (
                "order_items",
                "orders",
                "customer_identities",
                "customer_records",
                "customers",
            ):
                conn.exec_driver_sql(f"DELETE FROM {table}")
        sync = _sync(engine)
        for o in order:
            _orders(sync, o)
        with engine.connect() as conn:
            person = conn.execute(
                select(CUSTOMERS.c.email, CUSTOMERS.c.city, CUSTOMERS.c.created_at)
            ).one()
        results.append(tuple(person))
        engine.dispose()
    # the newest order's address wins, the first order dates the person, whatever came first
    assert results[0] == results[1]
    assert results[0][1] == "Oakland"
    assert results[0][2].isoformat() == "2017-03-22T19:28:02+00:00"
