"""customer_profiles, exact values: a hand-built store, every column worked out by hand.

The store is built from WooCommerce wc/v3 payloads (customers, orders, refunds, products
with categories and variations, coupons) run through the real ingest (`SourceSync.run`:
parsing, identity resolution, refund linking, trash), served by an in-memory client in
place of HTTP. Two syncs: in the first, Grace is a guest with two orders; in the second
she has registered with the same email, so her guest history joins her account.

Every figure below is worked out by hand from the README ("customer_profiles") with the
arithmetic beside it; none comes from syncd's code. The instant A is 2026-06-30T12:00Z
(A's day 2026-06-30); `profiles.reporting_currency = "EUR"`, `rates = {USD = "0.92"}`.

People (13; 10 buyers; account = WooCommerce customer id):

- alice (11): 4 paid EUR orders, 2 with coupons, 2 partial refunds (one dated after
  03-31), a cancelled order, a paid order after A, a paid order force-deleted at the source
  (still `completed`, with `deleted_at` set by the second sync's id reconciliation).
- bob (12): a guest order typed " Bob@Example.COM " (USD), 2 account orders (USD, EUR),
  a USD refund, a failed order.
- carol (13): no orders: a prospect.
- dave (14): only pending orders: an open cart (modified after A: its time is its creation).
- erin (15): one paid USD order, then two checkout-drafts: the newer is the open cart (USD).
- frank (16): a pending order older than his paid order (no open cart), a cancelled order.
- grace (17): two guest orders before registering (one partly refunded), a trashed order.
- heidi (guest): two orders on one day, as "Heidi@Example.com" and " heidi@example.com".
- ivan (guest): a paid USD order without attribution, a fully refunded order (`refunded`).
- judy (18): one USD order at 23:00 on 05-31, refunded only in the order's own `refunds`.
- ken (19): refund rows before and after A, an on-hold order, a coupon.
- leo (guest): a cancelled and a failed order: a prospect without a cart.
- mia (20): one paid order on A's day; a paid order and a draft an hour after A (ignored).

Products: 101 Classic Tee [Clothing, Tees]; 102 Hoodie (variable) [Clothing] with
variations 201 (S) and 202 (M), which carry no categories of their own; 103 Mug [Home,
Kitchen]; 104 Notebook [Stationery]; 105 Coffee Beans [Coffee]; 106 Espresso Cup
[Kitchen, Coffee].
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

import pytest
from pydantic import SecretStr
from sqlalchemy import Connection, Engine, func, select, text
from sqlalchemy.exc import OperationalError

from syncd.config import ProfileSettings, Settings, WooCommerceSourceSettings
from syncd.ingest import SourceSync
from syncd.segments import profiles
from syncd.segments import recompute as recompute_module
from syncd.segments.recompute import ProfileError, recompute
from syncd.sources.base import Page
from syncd.sources.woocommerce.client import WooCommerceClient
from syncd.store.models import CUSTOMER_RECORDS as RECORDS
from syncd.store.models import CUSTOMERS, ORDERS, PROFILES, QUARANTINE, REFUNDS

Payload = dict[str, Any]

A = datetime(2026, 6, 30, 12, 0, tzinfo=UTC)
END_OF_MARCH = datetime(2026, 3, 31, 23, 59, 59, 999999, tzinfo=UTC)
STORE_TZ = ZoneInfo("Europe/Berlin")  # local dates differ from the _gmt ones (syncd reads _gmt)
SOURCE = WooCommerceSourceSettings(
    url="http://127.0.0.1:9",
    consumer_key=SecretStr("ck_x"),
    consumer_secret=SecretStr("cs_x"),
    reconcile_every_hours=0,  # the second sync reconciles ids: it finds order 1007 gone
)
EUR_WITH_USD_RATE: dict[str, Any] = {"reporting_currency": "EUR", "rates": {"USD": "0.92"}}


def at(text: str) -> datetime:
    """A UTC instant from ``2026-06-30T12:00`` (the test's own parsing)."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# ---------------------------------------------------------------------------------------
# WooCommerce payloads
# ---------------------------------------------------------------------------------------


def _dates(name: str, gmt: str | None) -> dict[str, str | None]:
    """A WooCommerce date pair: store-local ``name`` and UTC ``name_gmt``."""
    if gmt is None:
        return {name: None, f"{name}_gmt": None}
    local = at(gmt).astimezone(STORE_TZ)
    return {name: local.strftime("%Y-%m-%dT%H:%M:%S"), f"{name}_gmt": at(gmt).isoformat()[:19]}


class Person(NamedTuple):
    account: int  # WooCommerce customer id; 0 for a guest
    email: str
    first_name: str
    last_name: str
    country: str


ALICE = Person(11, "alice@example.com", "Alice", "Archer", "DE")
BOB = Person(12, "bob@example.com", "Bob", "Baker", "US")
CAROL = Person(13, "carol@example.com", "Carol", "Chen", "FR")
DAVE = Person(14, "dave@example.com", "Dave", "Dunn", "GB")
ERIN = Person(15, "erin@example.com", "Erin", "Evans", "US")
FRANK = Person(16, "frank@example.com", "Frank", "Fischer", "DE")
GRACE = Person(17, "grace@example.com", "Grace", "Green", "NL")
HEIDI = Person(0, "heidi@example.com", "Heidi", "Hart", "AT")
IVAN = Person(0, "ivan@example.com", "Ivan", "Ivanov", "BG")
JUDY = Person(18, "judy@example.com", "Judy", "Jones", "US")
KEN = Person(19, "ken@example.com", "Ken", "King", "CA")
LEO = Person(0, "leo@example.com", "Leo", "Lopez", "ES")
MIA = Person(20, "mia@example.com", "Mia", "Moreau", "FR")
PEOPLE = (ALICE, BOB, CAROL, DAVE, ERIN, FRANK, GRACE, HEIDI, IVAN, JUDY, KEN, LEO, MIA)
REGISTERED = {
    # account id: registration time
    11: "2025-12-01T10:00",
    12: "2026-01-15T10:00",
    13: "2026-03-10T10:00",
    14: "2026-02-01T10:00",
    15: "2026-05-01T10:00",
    16: "2026-02-20T10:00",
    17: "2026-01-05T10:00",  # after her two guest orders of 2025
    18: "2026-05-30T10:00",
    19: "2026-04-01T10:00",
    20: "2026-06-29T10:00",
}


def _address(p: Person, first_name: str | None = None, email: str | None = None) -> Payload:
    return {
        "first_name": first_name or p.first_name,
        "last_name": p.last_name,
        "company": "",
        "address_1": "1 Main Street",
        "address_2": "",
        "city": "Springfield",
        "state": "",
        "postcode": "12345",
        "country": p.country,
        **({"email": email, "phone": ""} if email is not None else {}),
    }


def customer_payload(p: Person) -> Payload:
    created = REGISTERED[p.account]
    return {
        "id": p.account,
        **_dates("date_created", created),
        **_dates("date_modified", created),
        "email": p.email,
        "first_name": p.first_name,
        "last_name": p.last_name,
        "role": "customer",
        "username": p.email.split("@")[0],
        "billing": _address(p, email=p.email),
        "shipping": _address(p),
        "is_paying_customer": True,
        "avatar_url": "https://secure.gravatar.com/avatar/0?s=96",
        "meta_data": [],
    }


def _category(name: str) -> Payload:
    ids = {"Clothing": 9, "Tees": 14, "Home": 16, "Kitchen": 17, "Stationery": 18, "Coffee": 19}
    return {"id": ids[name], "name": name, "slug": name.lower()}


PRODUCTS: dict[int, tuple[str, str, list[str]]] = {
    # id: (name, price, categories)
    101: ("Classic Tee", "22.00", ["Clothing", "Tees"]),
    102: ("Hoodie", "38.00", ["Clothing"]),
    103: ("Mug", "12.00", ["Home", "Kitchen"]),
    104: ("Notebook", "5.00", ["Stationery"]),
    105: ("Coffee Beans", "20.00", ["Coffee"]),
    106: ("Espresso Cup", "4.99", ["Kitchen", "Coffee"]),
}
VARIATIONS = {201: (102, "S"), 202: (102, "M")}  # variation id: (product, size)


def product_payload(pid: int) -> Payload:
    name, price, categories = PRODUCTS[pid]
    variable = pid == 102
    return {
        "id": pid,
        "name": name,
        "slug": name.lower().replace(" ", "-"),
        **_dates("date_created", "2025-06-01T10:00"),
        **_dates("date_modified", "2025-06-01T10:00"),
        "type": "variable" if variable else "simple",
        "status": "publish",
        "sku": f"SKU-{pid}",
        "price": price,
        "regular_price": "" if variable else price,
        "sale_price": "",
        "stock_status": "instock",
        "parent_id": 0,
        "categories": [_category(c) for c in categories],
        "tags": [],
        "images": [],
        "attributes": [{"id": 1, "name": "Size", "options": ["S", "M"]}] if variable else [],
        "variations": [v for v, (parent, _) in VARIATIONS.items() if parent == pid],
        "meta_data": [],
    }


def variation_payload(vid: int) -> Payload:
    _, size = VARIATIONS[vid]
    # As WooCommerce sends them: no categories (they are the parent product's).
    return {
        "id": vid,
        **_dates("date_created", "2025-06-01T10:00"),
        **_dates("date_modified", "2025-06-01T10:00"),
        "description": "",
        "sku": f"SKU-102-{size}",
        "price": "38.00",
        "regular_price": "38.00",
        "sale_price": "",
        "status": "publish",
        "stock_status": "instock",
        "image": None,
        "attributes": [{"id": 1, "name": "Size", "option": size}],
        "meta_data": [],
    }


def coupon_payload(cid: int, code: str, kind: str, amount: str) -> Payload:
    return {
        "id": cid,
        "code": code,
        "amount": amount,
        **_dates("date_created", "2025-12-01T10:00"),
        **_dates("date_modified", "2025-12-01T10:00"),
        "discount_type": kind,
        "description": "",
        **_dates("date_expires", None),
        "usage_count": 0,
        "individual_use": False,
        "product_ids": [],
        "usage_limit": None,
        "free_shipping": False,
        "meta_data": [],
    }


class Line(NamedTuple):
    product: int  # a variation's line has its product here and the variation below
    quantity: int
    total: str  # after discounts, before tax
    variation: int = 0
    subtotal: str | None = None  # before discounts (default: the total)


def _attribution(source_type: str | None, utm_source: str | None) -> list[Payload]:
    meta: list[Payload] = [{"id": 1, "key": "is_vat_exempt", "value": "no"}]
    if source_type:
        meta.append({"id": 2, "key": "_wc_order_attribution_source_type", "value": source_type})
        meta.append({"id": 3, "key": "_wc_order_attribution_device_type", "value": "Desktop"})
    if utm_source:
        meta.append({"id": 4, "key": "_wc_order_attribution_utm_source", "value": utm_source})
    return meta


PAID = ("processing", "completed", "refunded")


def order_payload(
    oid: int,
    status: str,
    created: str,
    who: Person,
    currency: str,
    total: str,
    lines: Sequence[Line],
    *,
    shipping: str = "0.00",
    coupon: tuple[str, str] | None = None,  # (code, discount)
    attribution: tuple[str | None, str | None] = (None, None),  # (source_type, utm_source)
    refunds: Sequence[tuple[int, str]] = (),  # what the order itself lists: (refund id, amount)
    modified: str | None = None,
    guest_email: str | None = None,  # a guest order: billing email as the shopper typed it
    billing_first_name: str | None = None,
) -> Payload:
    lines_total = sum((Decimal(line.total) for line in lines), Decimal(0))
    assert lines_total + Decimal(shipping) == Decimal(total), f"order {oid} does not add up"
    paid = status in PAID
    completed = status in ("completed", "refunded")
    paid_at = (at(created) + timedelta(minutes=1)).isoformat()[:19] if paid else None
    completed_at = (at(created) + timedelta(days=1)).isoformat()[:19] if completed else None
    modified = modified or completed_at or paid_at or created
    shipping_lines = [
        {
            "id": oid * 10 + 9,
            "method_title": "Flat rate",
            "method_id": "flat_rate",
            "total": shipping,
            "total_tax": "0.00",
            "taxes": [],
            "meta_data": [],
        }
    ]
    coupon_lines = [
        {
            "id": oid * 10 + 8,
            "code": coupon[0] if coupon else "",
            "discount": coupon[1] if coupon else "0.00",
            "discount_tax": "0.00",
            "meta_data": [],
        }
    ]
    items = []
    for n, line in enumerate(lines, 1):
        name = PRODUCTS[line.product][0]
        if line.variation:
            name += f" - {VARIATIONS[line.variation][1]}"
        items.append(
            {
                "id": oid * 10 + n,
                "name": name,
                "product_id": line.product,
                "variation_id": line.variation,
                "quantity": line.quantity,
                "tax_class": "",
                "subtotal": line.subtotal or line.total,
                "subtotal_tax": "0.00",
                "total": line.total,
                "total_tax": "0.00",
                "taxes": [],
                "meta_data": [],
                "sku": f"SKU-{line.product}",
                "price": float(Decimal(line.total) / line.quantity),
            }
        )
    return {
        "id": oid,
        "parent_id": 0,
        "number": str(oid),
        "order_key": f"wc_order_{oid}",
        "created_via": "checkout",
        "version": "9.4.2",
        "status": status,
        "currency": currency,
        **_dates("date_created", created),
        **_dates("date_modified", modified),
        "discount_total": coupon[1] if coupon else "0.00",
        "discount_tax": "0.00",
        "shipping_total": shipping,
        "shipping_tax": "0.00",
        "cart_tax": "0.00",
        "total": total,
        "total_tax": "0.00",
        "prices_include_tax": False,
        "customer_id": 0 if guest_email is not None else who.account,
        "customer_ip_address": "192.0.2.1",
        "customer_user_agent": "Mozilla/5.0",
        "customer_note": "",
        "billing": _address(who, billing_first_name, guest_email or who.email),
        "shipping": _address(who),
        "payment_method": "stripe",
        "payment_method_title": "Credit Card (Stripe)",
        "transaction_id": f"ch_{oid}" if paid else "",
        **_dates("date_paid", paid_at),
        **_dates("date_completed", completed_at),
        "cart_hash": "",
        "meta_data": _attribution(*attribution),
        "line_items": items,
        "tax_lines": [],
        "shipping_lines": shipping_lines if shipping != "0.00" else [],
        "fee_lines": [],
        "coupon_lines": coupon_lines if coupon else [],
        "refunds": [{"id": rid, "reason": "", "total": f"-{amount}"} for rid, amount in refunds],
    }


def refund_payload(rid: int, order_id: int, amount: str, created: str) -> Payload:
    """A row of ``GET /wc/v3/refunds`` (with ``parent_id``, the order)."""
    return {
        "id": rid,
        "parent_id": order_id,
        **_dates("date_created", created),
        "amount": amount,
        "reason": "",
        "refunded_by": 1,
        "refunded_payment": True,
        "meta_data": [],
        "line_items": [],
    }


@dataclass
class Shop:
    customers: list[Payload] = field(default_factory=list)
    orders: list[Payload] = field(default_factory=list)
    refunds: list[Payload] = field(default_factory=list)
    products: list[Payload] = field(default_factory=list)
    variations: dict[int, list[Payload]] = field(default_factory=dict)
    coupons: list[Payload] = field(default_factory=list)


WELCOME = "welcome10"  # 10 %
SPRING = "spring5"  # 5.00 off


def build_shop() -> Shop:
    tee, hoodie, mug, notebook, coffee, cup = 101, 102, 103, 104, 105, 106
    o = order_payload
    # fmt: off
    orders = [
        # -- alice: 4 paid orders in EUR ------------------------------------------------
        o(1001, "completed", "2026-01-10T09:00", ALICE, "EUR", "45.00",
          [Line(tee, 2, "39.60", subtotal="44.00")], shipping="5.40",
          coupon=(WELCOME, "4.40"), attribution=("organic", "google")),
        o(1002, "completed", "2026-02-20T10:00", ALICE, "EUR", "30.00",
          [Line(hoodie, 1, "30.00", variation=201, subtotal="35.00")],
          coupon=(SPRING, "5.00"), attribution=("utm", "newsletter"), refunds=[(7001, "3.00")]),
        o(1003, "processing", "2026-04-15T08:30", ALICE, "EUR", "19.99",
          [Line(mug, 1, "14.99")], shipping="5.00"),
        o(1004, "completed", "2026-06-20T14:00", ALICE, "EUR", "60.00",
          [Line(hoodie, 1, "38.00", variation=202), Line(tee, 1, "22.00")],
          refunds=[(7002, "10.00")]),
        o(1005, "cancelled", "2026-06-25T10:00", ALICE, "EUR", "25.00",
          [Line(tee, 1, "22.00")], shipping="3.00"),
        o(1006, "completed", "2026-07-03T10:00", ALICE, "EUR", "99.00",  # after A
          [Line(notebook, 9, "45.00"), Line(cup, 10, "54.00")]),
        # force-deleted before the second sync: still "completed", deleted_at set
        o(1007, "completed", "2026-03-15T10:00", ALICE, "EUR", "70.00",
          [Line(notebook, 14, "70.00")]),
        # -- bob: a guest order under his email as typed, then two on his account ---------
        o(1010, "completed", "2026-02-01T08:00", BOB, "USD", "10.05",
          [Line(notebook, 1, "10.05")], attribution=("typein", "(direct)"),
          guest_email=" Bob@Example.COM ", billing_first_name="Robert"),
        o(1011, "completed", "2026-05-10T16:00", BOB, "USD", "10.05",
          [Line(notebook, 1, "10.05", subtotal="11.17")], coupon=(WELCOME, "1.12"),
          refunds=[(7003, "2.50")]),
        o(1012, "processing", "2026-06-01T11:00", BOB, "EUR", "20.00",
          [Line(coffee, 2, "16.00")], shipping="4.00", attribution=("utm", "newsletter")),
        o(1013, "failed", "2026-06-10T09:00", BOB, "USD", "15.00", [Line(notebook, 3, "15.00")]),
        # -- dave: only pending orders; the newer one was modified after A ----------------
        o(1021, "pending", "2026-03-20T10:00", DAVE, "EUR", "18.00",
          [Line(mug, 1, "12.00")], shipping="6.00", modified="2026-03-20T10:02"),
        o(1020, "pending", "2026-06-28T18:00", DAVE, "EUR", "35.50",
          [Line(coffee, 1, "20.00"), Line(cup, 1, "4.99"), Line(mug, 1, "10.51")],
          modified="2026-07-02T09:00"),
        # -- erin: one paid USD order, then two checkout-drafts -------------------------
        o(1030, "completed", "2026-05-20T10:00", ERIN, "USD", "30.00",
          [Line(tee, 1, "21.60", subtotal="24.00")], shipping="8.40",
          coupon=(WELCOME, "2.40"), attribution=("utm", "facebook")),
        o(1031, "checkout-draft", "2026-06-25T10:00", ERIN, "USD", "50.00",
          [Line(coffee, 2, "40.00")], shipping="10.00", modified="2026-06-25T10:10"),
        o(1032, "checkout-draft", "2026-06-29T20:00", ERIN, "USD", "10.01",
          [Line(notebook, 2, "10.01")], modified="2026-06-29T20:05"),
        # -- frank: pending, then paid two days later, then cancelled ---------------------
        o(1040, "pending", "2026-03-01T09:00", FRANK, "EUR", "12.00",  # never paid
          [Line(mug, 1, "12.00")], modified="2026-03-01T09:05",
          attribution=("organic", "duckduckgo")),
        o(1041, "completed", "2026-03-03T09:00", FRANK, "EUR", "12.00",
          [Line(mug, 1, "12.00")], attribution=("referral", "blog.example")),
        o(1042, "cancelled", "2026-04-01T10:00", FRANK, "EUR", "40.00", [Line(coffee, 2, "40.00")]),
        # -- grace: two guest orders in 2025, then (registered) a trashed order -----------
        o(1050, "completed", "2025-09-15T10:00", GRACE, "EUR", "80.00",
          [Line(coffee, 4, "80.00")], attribution=("utm", "google"),
          guest_email="GRACE@example.com"),
        o(1051, "completed", "2025-10-20T10:00", GRACE, "EUR", "40.00",
          [Line(coffee, 2, "40.00")], refunds=[(7004, "4.00")], guest_email=" grace@example.com"),
        o(1052, "trash", "2026-02-10T10:00", GRACE, "EUR", "100.00",
          [Line(notebook, 20, "100.00")], modified="2026-02-11T10:00"),
        # -- heidi (guest): two orders the same day, emails typed differently -------------
        o(1060, "completed", "2026-06-05T09:00", HEIDI, "EUR", "25.00",
          [Line(tee, 1, "19.80", subtotal="22.00"), Line(mug, 1, "5.20")],
          coupon=(WELCOME, "2.20"), attribution=("utm", "instagram"),
          guest_email="Heidi@Example.com"),
        o(1061, "processing", "2026-06-05T17:30", HEIDI, "EUR", "15.00",
          [Line(notebook, 3, "15.00")], guest_email=" heidi@example.com"),
        # -- ivan (guest): a paid USD order, a fully refunded one -------------------------
        o(1070, "completed", "2025-11-02T15:00", IVAN, "USD", "10.01",
          [Line(notebook, 1, "10.01")], guest_email="ivan@example.com"),
        o(1071, "refunded", "2026-05-01T12:00", IVAN, "USD", "50.00",
          [Line(coffee, 2, "40.00")], shipping="10.00", refunds=[(7005, "50.00")],
          modified="2026-05-03T12:00", attribution=("organic", "google"),
          guest_email="ivan@example.com"),
        # -- judy: refunded only in the order's own list (no /refunds row) ----------------
        o(1080, "completed", "2026-05-31T23:00", JUDY, "USD", "40.00",
          [Line(hoodie, 1, "40.00", variation=201)], refunds=[(7006, "7.55")],
          attribution=("organic", "google")),
        # -- ken: a refund before A and one after; an on-hold order ----------------------
        o(1090, "completed", "2026-04-20T10:00", KEN, "EUR", "100.00",
          [Line(hoodie, 2, "76.00", variation=202), Line(mug, 1, "12.00")], shipping="12.00",
          refunds=[(7007, "20.00"), (7008, "5.00")], attribution=("organic", "bing")),
        o(1091, "on-hold", "2026-06-01T10:00", KEN, "EUR", "30.00", [Line(notebook, 6, "30.00")]),
        o(1092, "completed", "2026-05-20T07:00", KEN, "EUR", "20.00",
          [Line(coffee, 1, "16.00", subtotal="21.00")], shipping="4.00",
          coupon=(SPRING, "5.00")),
        # -- leo (guest): nothing paid -------------------------------------------------------
        o(1100, "cancelled", "2026-06-10T10:00", LEO, "EUR", "22.00",
          [Line(tee, 1, "22.00")], guest_email="leo@example.com"),
        o(1101, "failed", "2026-06-12T10:00", LEO, "EUR", "22.00",
          [Line(tee, 1, "22.00")], guest_email="leo@example.com"),
        # -- mia: paid on A's day at 08:00; a paid order and a draft after A (13:00) -------
        o(1110, "completed", "2026-06-30T08:00", MIA, "EUR", "9.99",
          [Line(cup, 1, "4.99"), Line(mug, 1, "5.00")], attribution=("utm", "klaviyo")),
        o(1111, "completed", "2026-06-30T13:00", MIA, "EUR", "50.00",
          [Line(notebook, 10, "50.00")]),
        o(1112, "checkout-draft", "2026-06-30T13:30", MIA, "EUR", "12.00",
          [Line(mug, 1, "12.00")], modified="2026-06-30T13:31"),
    ]
    # fmt: on
    refunds = [
        refund_payload(7001, 1002, "3.00", "2026-04-02T10:00"),  # alice, after March
        refund_payload(7002, 1004, "10.00", "2026-06-22T09:00"),  # alice
        refund_payload(7003, 1011, "2.50", "2026-05-12T09:00"),  # bob, USD
        refund_payload(7004, 1051, "4.00", "2025-10-25T10:00"),  # grace
        refund_payload(7005, 1071, "50.00", "2026-05-03T12:00"),  # ivan, the whole order
        # 7006 (judy, 7.55 USD) is only in order 1080's own "refunds" list.
        refund_payload(7007, 1090, "20.00", "2026-04-25T10:00"),  # ken
        refund_payload(7008, 1090, "5.00", "2026-07-05T10:00"),  # ken, after A
    ]
    return Shop(
        customers=[customer_payload(p) for p in PEOPLE if p.account],
        orders=orders,
        refunds=refunds,
        products=[product_payload(pid) for pid in PRODUCTS],
        variations={102: [variation_payload(201), variation_payload(202)]},
        coupons=[
            coupon_payload(501, WELCOME, "percent", "10.00"),
            coupon_payload(502, SPRING, "fixed_cart", "5.00"),
            coupon_payload(503, "summer20", "percent", "20.00"),  # never used
        ],
    )


# ---------------------------------------------------------------------------------------
# Into the store through the real ingest
# ---------------------------------------------------------------------------------------


class ShopClient(WooCommerceClient):
    """Serves a `Shop` as the wc/v3 endpoints would, one page per query.

    Date windows are not applied: every window gets every record. A first sync reads
    everything anyway, and a re-read changes nothing (upserts are idempotent).
    ``status=any`` leaves trash out and ``status=trash`` gives only trash, as WooCommerce does.
    """

    def __init__(self, shop: Shop, source: str = "wc") -> None:
        super().__init__(source, SOURCE)
        self.shop = shop

    async def store_currency(self) -> str | None:
        return "EUR"

    async def page(self, path: str, params: Mapping[str, str], number: int) -> Page:
        items = self._select(path, params) if number == 1 else []
        if "_fields" in params:
            keys = params["_fields"].split(",")
            items = [{k: item.get(k) for k in keys} for item in items]
        return Page(items=items, total=len(items), total_pages=1, number=number)

    def _select(self, path: str, params: Mapping[str, str]) -> list[Payload]:
        if path.startswith("products/") and path.endswith("/variations"):
            return self.shop.variations.get(int(path.split("/")[1]), [])
        rows: list[Payload] = {
            "customers": self.shop.customers,
            "orders": self.shop.orders,
            "refunds": self.shop.refunds,
            "products": self.shop.products,
            "coupons": self.shop.coupons,
        }[path]
        if "include" in params:
            wanted = [int(i) for i in params["include"].split(",")]
            by_id = {row["id"]: row for row in rows}
            return [by_id[i] for i in wanted if i in by_id]
        status = params.get("status")
        if status == "trash":
            return [row for row in rows if row.get("status") == "trash"]
        if status is not None:
            return [row for row in rows if row.get("status") != "trash"]
        return list(rows)


def _sync(engine: Engine, shop: Shop, source: str = "wc") -> None:
    async def go() -> Any:
        runner = SourceSync(engine, source, SOURCE, client=ShopClient(shop, source))
        try:
            return await runner.run()
        finally:
            await runner.client.aclose()

    result = asyncio.run(go())
    assert result.status == "success", result.error


def load_shop(engine: Engine) -> None:
    full = build_shop()
    deleted = 1007  # force-deleted between the syncs (WooCommerce keeps no trace of it)
    shop = Shop(**{**vars(full), "orders": [o for o in full.orders if o["id"] != deleted]})
    # First sync: Grace has not registered yet (her account and its trashed order are not
    # there): her two 2025 orders make a guest person. Order 1007 still exists.
    before = Shop(
        customers=[c for c in shop.customers if c["id"] != GRACE.account],
        orders=[o for o in full.orders if o["id"] != 1052],
        refunds=shop.refunds,
        products=shop.products,
        variations=shop.variations,
        coupons=shop.coupons,
    )
    _sync(engine, before)
    # Second sync: she has registered with that email; her guest history joins the account.
    # Its id reconciliation marks 1007 deleted.
    _sync(engine, shop)

    # The ingest did what the fixture means (so a failure below is about profiles).
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(QUARANTINE)).scalar_one() == 0
        people = dict(conn.execute(select(CUSTOMERS.c.email, CUSTOMERS.c.id)).all())
        assert set(people) == {p.email for p in PEOPLE}
        owners = conn.execute(
            select(ORDERS.c.source_id, ORDERS.c.customer_id, ORDERS.c.email)
        ).all()
        assert len(owners) == len(full.orders)
        gone = conn.execute(
            select(ORDERS.c.status, ORDERS.c.deleted_at).where(ORDERS.c.source_id == deleted)
        ).one()
        assert gone.status == "completed" and gone.deleted_at is not None
        for source_id, person, email in owners:
            assert person == people[email], f"order {source_id} is not {email}'s"
        grace = conn.execute(
            select(RECORDS.c.customer_id).where(RECORDS.c.source_id == GRACE.account)
        ).scalar_one()
        assert grace == people[GRACE.email]
        linked = dict(conn.execute(select(REFUNDS.c.source_id, REFUNDS.c.order_id)).all())
        assert len(linked) == 7 and all(linked.values())  # 7006 has no row


def profile_settings(**profiles: Any) -> Settings:
    return Settings(sources={"wc": SOURCE}, profiles=ProfileSettings(**profiles))


# ---------------------------------------------------------------------------------------
# Expected profiles at A = 2026-06-30T12:00Z, worked out by hand
# ---------------------------------------------------------------------------------------

# No paid order (every column that is null or zero without one).
PROSPECT: dict[str, Any] = {
    "orders_count": 0,
    "gross_revenue_minor": 0,
    "refunded_minor": 0,
    "net_revenue_minor": 0,
    "currency": "EUR",  # the reporting currency, for every row
    "avg_order_value_minor": None,
    "first_order_at": None,
    "last_order_at": None,
    "days_since_last_order": None,
    "avg_days_between_orders": None,
    "distinct_products": 0,
    "top_category": None,
    "coupon_order_share": None,
    "acquisition_source": None,
    "r_score": None,
    "f_score": None,
    "m_score": None,
    "rfm_segment": None,
    "lifecycle_stage": "prospect",
    "has_open_cart": False,
    "cart_value_minor": None,
    "cart_updated_at": None,
}
NO_CART: dict[str, Any] = {
    "has_open_cart": False,
    "cart_value_minor": None,
    "cart_updated_at": None,
}

# RFM over the N = 10 buyers; score = 1 + floor(5 × (rank − 1) ÷ 10) = 1 + floor((rank − 1) / 2),
# rank = 1 + the number of buyers strictly worse.
#
# | buyer | days | worse | R | orders | worse | F | net   | worse | M | segment (R, F)     |
# |-------|------|-------|---|--------|-------|---|-------|-------|---|--------------------|
# | grace | 253  | 0     | 1 | 2      | 5     | 3 | 11600 | 8     | 5 | at_risk            |
# | ivan  | 240  | 1     | 1 | 1      | 0     | 1 | 921   | 0     | 1 | lost               |
# | frank | 119  | 2     | 2 | 1      | 0     | 1 | 1200  | 2     | 2 | hibernating        |
# | erin  | 41   | 3     | 2 | 1      | 0     | 1 | 2760  | 3     | 2 | hibernating        |
# | ken   | 41   | 3     | 2 | 2      | 5     | 3 | 10000 | 7     | 4 | at_risk            |
# | judy  | 30   | 5     | 3 | 1      | 0     | 1 | 2985  | 4     | 3 | about_to_sleep     |
# | bob   | 29   | 6     | 4 | 3      | 8     | 5 | 3619  | 5     | 3 | loyal              |
# | heidi | 25   | 7     | 4 | 2      | 5     | 3 | 4000  | 6     | 4 | potential_loyalist |
# | alice | 10   | 8     | 5 | 4      | 9     | 5 | 14199 | 9     | 5 | champions          |
# | mia   | 0    | 9     | 5 | 1      | 0     | 1 | 999   | 1     | 1 | new                |
#
# Lifecycle: ratio = days ÷ rhythm, rhythm = avg_days_between_orders (repeat buyers) or 60
# (one order), at least 7; the CLV model is not fitted (10 buyers < 50), so only the ratios.
EXPECTED_AT_A: dict[str, dict[str, Any]] = {
    ALICE.email: {
        # 1001, 1002, 1003, 1004 (1005 cancelled; 1006 after A; 1007 deleted at the source)
        "orders_count": 4,
        "gross_revenue_minor": 15499,  # 45.00 + 30.00 + 19.99 + 60.00 EUR
        "refunded_minor": 1300,  # rows 7001 (3.00, 04-02) + 7002 (10.00, 06-22)
        "net_revenue_minor": 14199,  # 15499 − 1300
        "currency": "EUR",
        "avg_order_value_minor": 3550,  # 14199 ÷ 4 = 3549.75 → 3550
        "first_order_at": at("2026-01-10T09:00"),
        "last_order_at": at("2026-06-20T14:00"),
        "days_since_last_order": 10,  # 06-20 → 06-30
        "avg_days_between_orders": 161 / 3,  # 01-10 → 06-20 = 161 days, ÷ (4 − 1) = 53.67
        "distinct_products": 3,  # tee, hoodie (variations 201 and 202 are one product), mug
        "top_category": "Clothing",  # Clothing 5 (tee 2+1, hoodie 1+1), Tees 3, Home 1, Kitchen 1
        "coupon_order_share": 0.5,  # 1001 (welcome10), 1002 (spring5): 2 of 4
        "acquisition_source": "organic:google",  # 1001's attribution
        "r_score": 5,
        "f_score": 5,
        "m_score": 5,
        "rfm_segment": "champions",
        "lifecycle_stage": "active",  # 10 ÷ 53.67 = 0.19
        **NO_CART,
    },
    BOB.email: {
        "orders_count": 3,  # guest 1010 (" Bob@Example.COM ") + 1011 + 1012; 1013 failed
        # USD: 10.05 + 10.05 = 20.10 → 2010 × 0.92 = 1849.2 → 1849 (per order it would be
        # 925 + 925 = 1850: conv applies to the per-currency sum); EUR 20.00 → 3849
        "gross_revenue_minor": 3849,
        "refunded_minor": 230,  # row 7003: 2.50 USD → 250 × 0.92 = 230
        "net_revenue_minor": 3619,  # 3849 − 230
        "currency": "EUR",
        "avg_order_value_minor": 1206,  # 3619 ÷ 3 = 1206.33 → 1206
        "first_order_at": at("2026-02-01T08:00"),
        "last_order_at": at("2026-06-01T11:00"),
        "days_since_last_order": 29,  # 06-01 → 06-30
        "avg_days_between_orders": 60.0,  # 02-01 → 06-01 = 120 days, ÷ 2
        "distinct_products": 2,  # notebook, coffee beans
        "top_category": "Coffee",  # Coffee 2 (1012: 2 bags) ties Stationery 2: alphabetical
        "coupon_order_share": 1 / 3,  # 1011
        "acquisition_source": "typein",  # 1010: typein, utm_source "(direct)": no suffix
        "r_score": 4,
        "f_score": 5,
        "m_score": 3,
        "rfm_segment": "loyal",
        "lifecycle_stage": "active",  # 29 ÷ 60 = 0.48
        **NO_CART,  # 1013 failed is no cart
    },
    CAROL.email: {**PROSPECT},
    DAVE.email: {
        **PROSPECT,
        # the latest pending order is 1020 (1021 is older); modified 07-02, after A, so its
        # time is its creation
        "has_open_cart": True,
        "cart_value_minor": 3550,  # 35.50 EUR
        "cart_updated_at": at("2026-06-28T18:00"),
    },
    ERIN.email: {
        "orders_count": 1,  # 1030
        "gross_revenue_minor": 2760,  # 30.00 USD → 3000 × 0.92 = 2760
        "refunded_minor": 0,
        "net_revenue_minor": 2760,
        "currency": "EUR",
        "avg_order_value_minor": 2760,
        "first_order_at": at("2026-05-20T10:00"),
        "last_order_at": at("2026-05-20T10:00"),
        "days_since_last_order": 41,  # 05-20 → 06-30
        "avg_days_between_orders": None,
        "distinct_products": 1,
        "top_category": "Clothing",  # the tee: Clothing 1, Tees 1, alphabetical
        "coupon_order_share": 1.0,
        "acquisition_source": "utm:facebook",
        "r_score": 2,
        "f_score": 1,
        "m_score": 2,
        "rfm_segment": "hibernating",
        "lifecycle_stage": "active",  # one order 41 days ago (> 30: not new); 41 ÷ 60 = 0.68
        # the latest checkout-draft, 1032 (1031 is older): 10.01 USD → 1001 × 0.92 = 920.92
        "has_open_cart": True,
        "cart_value_minor": 921,
        "cart_updated_at": at("2026-06-29T20:05"),  # its modification
    },
    FRANK.email: {
        "orders_count": 1,  # 1041 (1042 cancelled)
        "gross_revenue_minor": 1200,
        "refunded_minor": 0,
        "net_revenue_minor": 1200,
        "currency": "EUR",
        "avg_order_value_minor": 1200,
        "first_order_at": at("2026-03-03T09:00"),
        "last_order_at": at("2026-03-03T09:00"),
        "days_since_last_order": 119,  # 03-03 → 06-30
        "avg_days_between_orders": None,
        "distinct_products": 1,
        "top_category": "Home",  # the mug: Home 1, Kitchen 1, alphabetical
        "coupon_order_share": 0.0,
        "acquisition_source": "referral:blog.example",  # 1041's: the first *paid* order
        "r_score": 2,
        "f_score": 1,
        "m_score": 2,
        "rfm_segment": "hibernating",
        "lifecycle_stage": "at_risk",  # 119 ÷ 60 = 1.98 > 1.5
        **NO_CART,  # pending 1040 (03-01) is older than the paid 1041 (03-03)
    },
    GRACE.email: {
        "orders_count": 2,  # guest 1050 and 1051 (before registering); 1052 is trashed
        "gross_revenue_minor": 12000,  # 80.00 + 40.00
        "refunded_minor": 400,  # row 7004
        "net_revenue_minor": 11600,
        "currency": "EUR",
        "avg_order_value_minor": 5800,
        "first_order_at": at("2025-09-15T10:00"),
        "last_order_at": at("2025-10-20T10:00"),
        "days_since_last_order": 253,  # 2025-10-20 → 2026-06-30
        "avg_days_between_orders": 35.0,  # 09-15 → 10-20
        "distinct_products": 1,
        "top_category": "Coffee",
        "coupon_order_share": 0.0,
        "acquisition_source": "utm:google",
        "r_score": 1,
        "f_score": 3,
        "m_score": 5,
        "rfm_segment": "at_risk",
        "lifecycle_stage": "churned",  # 253 ÷ 35 = 7.2 > 6
        **NO_CART,
    },
    HEIDI.email: {
        "orders_count": 2,  # guest 1060 ("Heidi@Example.com") and 1061 (" heidi@example.com")
        "gross_revenue_minor": 4000,  # 25.00 + 15.00
        "refunded_minor": 0,
        "net_revenue_minor": 4000,
        "currency": "EUR",
        "avg_order_value_minor": 2000,
        "first_order_at": at("2026-06-05T09:00"),
        "last_order_at": at("2026-06-05T17:30"),
        "days_since_last_order": 25,  # 06-05 → 06-30
        "avg_days_between_orders": 0.0,  # same day: 0 days ÷ 1
        "distinct_products": 3,  # tee, mug, notebook
        "top_category": "Stationery",  # Stationery 3 (3 notebooks), the others 1 each
        "coupon_order_share": 0.5,
        "acquisition_source": "utm:instagram",  # 1060, the earlier of the two
        "r_score": 4,
        "f_score": 3,
        "m_score": 4,
        "rfm_segment": "potential_loyalist",
        "lifecycle_stage": "lapsed",  # rhythm max(0, 7) = 7; 25 ÷ 7 = 3.6 > 3
        **NO_CART,
    },
    IVAN.email: {
        "orders_count": 1,  # 1070; 1071 is status refunded: not a paid order
        "gross_revenue_minor": 921,  # 10.01 USD → 1001 × 0.92 = 920.92 → 921
        "refunded_minor": 0,  # 7005 is on the refunded order, which does not count
        "net_revenue_minor": 921,
        "currency": "EUR",
        "avg_order_value_minor": 921,
        "first_order_at": at("2025-11-02T15:00"),
        "last_order_at": at("2025-11-02T15:00"),
        "days_since_last_order": 240,  # 2025-11-02 → 2026-06-30
        "avg_days_between_orders": None,
        "distinct_products": 1,  # the notebook (1071's coffee does not count)
        "top_category": "Stationery",
        "coupon_order_share": 0.0,
        "acquisition_source": None,  # 1070 has no attribution meta (1071's does not count)
        "r_score": 1,
        "f_score": 1,
        "m_score": 1,
        "rfm_segment": "lost",
        "lifecycle_stage": "lapsed",  # 240 ÷ 60 = 4.0 > 3
        **NO_CART,
    },
    JUDY.email: {
        "orders_count": 1,  # 1080
        "gross_revenue_minor": 3680,  # 40.00 USD → 4000 × 0.92 = 3680
        # no row in refunds for 1080: its own refunded_minor, 7.55 USD → 755 × 0.92 = 694.6
        "refunded_minor": 695,
        "net_revenue_minor": 2985,  # 3680 − 695
        "currency": "EUR",
        "avg_order_value_minor": 2985,
        "first_order_at": at("2026-05-31T23:00"),
        "last_order_at": at("2026-05-31T23:00"),
        # 05-31 → 06-30 = 30 days (a difference of dates: only 29.5 × 24 h have elapsed)
        "days_since_last_order": 30,
        "avg_days_between_orders": None,
        "distinct_products": 1,
        "top_category": "Clothing",  # variation 201's product, the hoodie
        "coupon_order_share": 0.0,
        "acquisition_source": "organic:google",
        "r_score": 3,
        "f_score": 1,
        "m_score": 3,
        "rfm_segment": "about_to_sleep",
        "lifecycle_stage": "new",  # one order, 30 days ago: at most new_days (30)
        **NO_CART,
    },
    KEN.email: {
        "orders_count": 2,  # 1090, 1092 (1091 is on-hold)
        "gross_revenue_minor": 12000,  # 100.00 + 20.00
        "refunded_minor": 2000,  # row 7007 (04-25); row 7008 (5.00) is dated after A
        "net_revenue_minor": 10000,
        "currency": "EUR",
        "avg_order_value_minor": 5000,
        "first_order_at": at("2026-04-20T10:00"),
        "last_order_at": at("2026-05-20T07:00"),
        "days_since_last_order": 41,  # 05-20 → 06-30 (same day as erin's, 3 hours earlier)
        "avg_days_between_orders": 30.0,  # 04-20 → 05-20
        "distinct_products": 3,  # hoodie, mug, coffee beans
        "top_category": "Clothing",  # Clothing 2 (2 hoodies), Home 1, Kitchen 1, Coffee 1
        "coupon_order_share": 0.5,  # 1092
        "acquisition_source": "organic:bing",  # 1090
        "r_score": 2,
        "f_score": 3,
        "m_score": 4,
        "rfm_segment": "at_risk",
        "lifecycle_stage": "active",  # 41 ÷ 30 = 1.37 ≤ 1.5
        **NO_CART,
    },
    LEO.email: {**PROSPECT},  # cancelled and failed orders only: neither paid nor a cart
    MIA.email: {
        "orders_count": 1,  # 1110 at 08:00; 1111 at 13:00 is after A (12:00)
        "gross_revenue_minor": 999,
        "refunded_minor": 0,
        "net_revenue_minor": 999,
        "currency": "EUR",
        "avg_order_value_minor": 999,
        "first_order_at": at("2026-06-30T08:00"),
        "last_order_at": at("2026-06-30T08:00"),
        "days_since_last_order": 0,
        "avg_days_between_orders": None,
        "distinct_products": 2,  # espresso cup, mug
        # each category of a product counts: Kitchen 2 (cup, mug), Coffee 1, Home 1
        "top_category": "Kitchen",
        "coupon_order_share": 0.0,
        "acquisition_source": "utm:klaviyo",
        "r_score": 5,
        "f_score": 1,
        "m_score": 1,
        "rfm_segment": "new",
        "lifecycle_stage": "new",
        **NO_CART,  # draft 1112 was created after A
    },
}

# Columns that hold for every row here: the CLV model is not fitted (fewer than 50 buyers),
# so the predictions are null and the expected order value falls back to the average.
UNFITTED = ("p_alive", "expected_orders_90d", "clv_12m_minor")
FLOATS = ("avg_days_between_orders", "coupon_order_share")


def check_profiles(
    engine: Engine,
    expected: Mapping[str, Mapping[str, Any]],
    as_of: datetime,
    read: Sequence[Mapping[str, Any]] | None = None,
) -> None:
    """Every expected column of every row (of customer_profiles, or the profile rows
    ``read`` elsewhere), all differences reported at once."""
    with engine.connect() as conn:
        people = {r.email: r for r in conn.execute(select(CUSTOMERS))}
        if read is None:
            read = [r._asdict() for r in conn.execute(select(PROFILES))]
    rows = {r["email"]: r for r in read}
    assert sorted(rows) == sorted(p.email for p in PEOPLE)  # every person, prospects included
    by_email = {p.email: p for p in PEOPLE}
    problems: list[str] = []
    for email, want in expected.items():
        got = rows[email]
        person = by_email[email]
        want = {
            **want,
            "customer_id": people[email].id,
            "email": email,
            "first_name": person.first_name,  # bob's guest order says "Robert": the account wins
            "last_name": person.last_name,
            "country": person.country,
            "as_of": as_of,
            "expected_order_value_minor": want["avg_order_value_minor"],
            **dict.fromkeys(UNFITTED),
        }
        for column, value in want.items():
            actual = got[column]
            if column in FLOATS and value is not None and actual is not None:
                same = actual == pytest.approx(value, rel=1e-9, abs=1e-12)
            else:
                same = actual == value and type(actual) is type(value)
            if not same:
                problems.append(f"{email}: {column}: expected {value!r}, got {actual!r}")
        computed = got["computed_at"]
        if computed is None or computed < as_of:
            problems.append(
                f"{email}: computed_at: expected a time at or after A, got {computed!r}"
            )
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------


def test_every_profile_column_at_a_fixed_instant(engine: Engine) -> None:
    load_shop(engine)
    settings = profile_settings(**EUR_WITH_USD_RATE)
    recompute(engine, settings, now=A)
    check_profiles(engine, EXPECTED_AT_A, A)
    # Rebuilt in full each time: a second recompute at the same instant gives the same rows.
    recompute(engine, settings, now=A)
    check_profiles(engine, EXPECTED_AT_A, A)

    # (Here rather than in a test of its own, to spare a store: each costs a Postgres database.)
    # The orders are in EUR and USD: never summed silently.
    with pytest.raises(ProfileError) as caught:
        recompute(engine, profile_settings(), now=A)
    assert isinstance(caught.value, ValueError)
    message = str(caught.value)
    assert "EUR" in message and "USD" in message and "reporting_currency" in message, message
    with pytest.raises(ProfileError) as caught:
        recompute(engine, profile_settings(reporting_currency="EUR"), now=A)
    message = str(caught.value)
    assert "USD" in message and "rates" in message, message
    # The product tables were being made on a second connection: stopped, and closed.
    assert not [t for t in threading.enumerate() if t.name.startswith("syncd-products")]
    assert engine.pool.checkedout() == 0


# As of 2026-03-31 (A = 2026-03-31T23:59:59.999999Z): orders and refund rows created up to
# then. Five buyers, N = 5: score = 1 + floor(5 × (rank − 1) ÷ 5) = rank.
#
# | buyer | days | R | orders | F | net   | M | segment (R, F)  |
# |-------|------|---|--------|---|-------|---|-----------------|
# | grace | 162  | 1 | 2      | 4 | 11600 | 5 | at_risk         |
# | ivan  | 149  | 2 | 1      | 1 | 921   | 1 | hibernating     |
# | bob   | 58   | 3 | 1      | 1 | 925   | 2 | about_to_sleep  |
# | alice | 39   | 4 | 2      | 4 | 7500  | 4 | loyal           |
# | frank | 28   | 5 | 1      | 1 | 1200  | 3 | new             |
#
# (F: one-order buyers have nobody worse, rank 1; the two-order ones have 3 worse, rank 4.)
EXPECTED_END_OF_MARCH: dict[str, dict[str, Any]] = {
    ALICE.email: {
        "orders_count": 2,  # 1001, 1002 (1003 is 04-15; 1007 of 03-15 is deleted)
        "gross_revenue_minor": 7500,  # 45.00 + 30.00
        "refunded_minor": 0,  # row 7001 on 1002 is dated 04-02: not yet
        "net_revenue_minor": 7500,
        "currency": "EUR",
        "avg_order_value_minor": 3750,
        "first_order_at": at("2026-01-10T09:00"),
        "last_order_at": at("2026-02-20T10:00"),
        "days_since_last_order": 39,  # 02-20 → 03-31
        "avg_days_between_orders": 41.0,  # 01-10 → 02-20
        "distinct_products": 2,  # tee, hoodie
        "top_category": "Clothing",  # Clothing 3 (2 tees, 1 hoodie), Tees 2
        "coupon_order_share": 1.0,
        "acquisition_source": "organic:google",
        "r_score": 4,
        "f_score": 4,
        "m_score": 4,
        "rfm_segment": "loyal",
        "lifecycle_stage": "active",  # 39 ÷ 41 = 0.95
        **NO_CART,
    },
    BOB.email: {
        "orders_count": 1,  # the guest order 1010
        "gross_revenue_minor": 925,  # 10.05 USD → 1005 × 0.92 = 924.6 → 925
        "refunded_minor": 0,
        "net_revenue_minor": 925,
        "currency": "EUR",
        "avg_order_value_minor": 925,
        "first_order_at": at("2026-02-01T08:00"),
        "last_order_at": at("2026-02-01T08:00"),
        "days_since_last_order": 58,  # 02-01 → 03-31
        "avg_days_between_orders": None,
        "distinct_products": 1,
        "top_category": "Stationery",
        "coupon_order_share": 0.0,
        "acquisition_source": "typein",
        "r_score": 3,
        "f_score": 1,
        "m_score": 2,
        "rfm_segment": "about_to_sleep",
        "lifecycle_stage": "active",  # one order 58 days ago; 58 ÷ 60 = 0.97
        **NO_CART,
    },
    DAVE.email: {
        **PROSPECT,
        # the latest pending order created by then is 1021 (1020 is 06-28), modified 03-20
        "has_open_cart": True,
        "cart_value_minor": 1800,
        "cart_updated_at": at("2026-03-20T10:02"),
    },
    FRANK.email: {
        "orders_count": 1,
        "gross_revenue_minor": 1200,
        "refunded_minor": 0,
        "net_revenue_minor": 1200,
        "currency": "EUR",
        "avg_order_value_minor": 1200,
        "first_order_at": at("2026-03-03T09:00"),
        "last_order_at": at("2026-03-03T09:00"),
        "days_since_last_order": 28,  # 03-03 → 03-31
        "avg_days_between_orders": None,
        "distinct_products": 1,
        "top_category": "Home",
        "coupon_order_share": 0.0,
        "acquisition_source": "referral:blog.example",
        "r_score": 5,
        "f_score": 1,
        "m_score": 3,
        "rfm_segment": "new",
        "lifecycle_stage": "new",  # one order, 28 days ago
        **NO_CART,  # pending 1040 is older than 1041
    },
    GRACE.email: {
        **EXPECTED_AT_A[GRACE.email],  # 2025's orders and refund, as at A, except:
        "days_since_last_order": 162,  # 2025-10-20 → 2026-03-31
        "r_score": 1,
        "f_score": 4,
        "m_score": 5,
        "rfm_segment": "at_risk",
        "lifecycle_stage": "lapsed",  # 162 ÷ 35 = 4.6 > 3 (trashed 1052 of 02-10 never counts)
    },
    IVAN.email: {
        **EXPECTED_AT_A[IVAN.email],  # 1070 as at A, except:
        "days_since_last_order": 149,  # 2025-11-02 → 2026-03-31
        "r_score": 2,
        "f_score": 1,
        "m_score": 1,
        "rfm_segment": "hibernating",
        "lifecycle_stage": "at_risk",  # 149 ÷ 60 = 2.48 > 1.5
    },
    # No paid order and no cart created by the end of March:
    CAROL.email: {**PROSPECT},
    ERIN.email: {**PROSPECT},  # her order and drafts are from May and June
    HEIDI.email: {**PROSPECT},
    JUDY.email: {**PROSPECT},
    KEN.email: {**PROSPECT},  # first order 04-20
    LEO.email: {**PROSPECT},
    MIA.email: {**PROSPECT},
}


def test_profiles_as_of_an_earlier_day(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The backtest's profiles, as its segments see them on its own connection; the live
    customer_profiles stays as it was (empty: no live recompute ran)."""
    load_shop(engine)
    read: list[dict[str, Any]] = []
    select_members = recompute_module.select_members

    def reading(conn: Connection, *args: Any, **kwargs: Any) -> Any:
        read.extend(r._asdict() for r in conn.execute(select(PROFILES)))
        return select_members(conn, *args, **kwargs)

    monkeypatch.setattr(recompute_module, "select_members", reading)
    recompute(engine, profile_settings(**EUR_WITH_USD_RATE), as_of=date(2026, 3, 31))
    check_profiles(engine, EXPECTED_END_OF_MARCH, END_OF_MARCH, read)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(PROFILES)).scalar_one() == 0


def test_two_sources_number_their_products_apart(engine: Engine) -> None:
    """Two stores number their products independently: 101 is the Classic Tee in `wc`
    [Clothing, Tees] and an atlas in `wc2` [Books]. Zoe (a guest in both, one person by
    her email) buys one tee in wc and three atlases in wc2: 2 distinct products, and the
    top category is Books (3 units) before Clothing and Tees (1 each). Taking product ids
    for products across sources would make it 1 product and Clothing (4 units, before Tees
    by name)."""
    zoe = Person(0, "zoe@example.com", "Zoe", "Zhang", "DE")
    atlas = {
        **product_payload(101),
        "name": "Atlas",
        "slug": "atlas",
        "categories": [{"id": 40, "name": "Books", "slug": "books"}],
    }

    def bought(oid: int, created: str, total: str, line: Line) -> Payload:
        return order_payload(
            oid, "completed", created, zoe, "EUR", total, [line], guest_email=zoe.email
        )

    tee = bought(9001, "2026-06-01T10:00", "22.00", Line(101, 1, "22.00"))
    atlases = bought(9002, "2026-06-02T10:00", "30.00", Line(101, 3, "30.00"))
    _sync(engine, Shop(orders=[tee], products=[product_payload(101)]), "wc")
    _sync(engine, Shop(orders=[atlases], products=[atlas]), "wc2")
    settings = Settings(sources={"wc": SOURCE, "wc2": SOURCE})
    recompute(engine, settings, now=A)
    with engine.connect() as conn:
        row = conn.execute(select(PROFILES)).one()
    assert (row.email, row.orders_count, row.net_revenue_minor) == (zoe.email, 2, 5200)
    assert (row.distinct_products, row.top_category) == (2, "Books")


def test_product_tables_read_the_same_snapshot_as_the_orders(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The product tables are made on a second connection while the first reads the
    orders. On SQLite both start reading while no connection can commit, and an order
    committed afterwards is in neither: the second connection reads one snapshot
    throughout. (The recompute then fails at its first write, as it always has on SQLite
    when another process commits meanwhile: WAL refuses a stale writer.) On Postgres the
    second connection reads the snapshot the first exported: the order is not in it."""
    load_shop(engine)
    settings = profile_settings(**EUR_WITH_USD_RATE)
    with engine.connect() as conn:
        alice = conn.execute(
            select(CUSTOMERS.c.id).where(CUSTOMERS.c.email == ALICE.email)
        ).scalar_one()
        paid = conn.execute(
            select(func.count())
            .select_from(ORDERS)
            .where(
                ORDERS.c.status.in_(["processing", "completed"]),
                ORDERS.c.deleted_at.is_(None),
                ORDERS.c.customer_id.is_not(None),
                ORDERS.c.created_at <= A,
            )
        ).scalar_one()
    seen: list[int] = []
    make = profiles._paid_orders

    def commit_an_order() -> None:
        with engine.begin() as other:
            other.execute(
                ORDERS.insert(),
                {
                    "source": "wc",
                    "source_id": 9999,
                    "customer_id": alice,
                    "status": "completed",
                    "currency": "EUR",
                    "total_minor": 1000,
                    "subtotal_minor": 1000,
                    "discount_minor": 0,
                    "shipping_minor": 0,
                    "tax_minor": 0,
                    "refunded_minor": 0,
                    "created_at": at("2026-06-29T10:00"),
                },
            )

    def paid_orders_counted(conn: Any, *args: Any) -> None:
        if engine.dialect.name == "sqlite":
            commit_an_order()  # after the second connection's first read
        make(conn, *args)
        seen.append(conn.execute(text("SELECT COUNT(*) FROM t_ord")).scalar_one())

    class AfterTheExport(profiles._ProductsAside):
        def __init__(self, *args: Any) -> None:
            commit_an_order()  # after the snapshot's export, before its import
            super().__init__(*args)

    monkeypatch.setattr(profiles, "_paid_orders", paid_orders_counted)
    if engine.dialect.name == "sqlite":
        with pytest.raises(OperationalError, match="database is locked"):
            recompute(engine, settings, now=A)
    else:
        monkeypatch.setattr(profiles, "_ProductsAside", AfterTheExport)
        recompute(engine, settings, now=A)
    assert seen == [paid]  # not paid + 1
    assert not [t for t in threading.enumerate() if t.name.startswith("syncd-products")]
    assert engine.pool.checkedout() == 0


def test_a_recompute_failing_after_the_product_tables_closes_their_connection(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The product tables were made on the second connection, and the recompute fails
    before copying them over: that connection is closed all the same (a pool that lost
    one per failed run would run dry)."""
    load_shop(engine)
    made = threading.Event()
    make = profiles._product_tables

    def product_tables(*args: Any) -> None:
        make(*args)
        made.set()

    def failing(*args: Any) -> Any:
        assert made.wait(30)
        raise RuntimeError("the CLV inputs failed")

    monkeypatch.setattr(profiles, "_product_tables", product_tables)
    monkeypatch.setattr("syncd.segments.recompute.clv_inputs", failing)
    with pytest.raises(RuntimeError, match="CLV inputs"):
        recompute(engine, profile_settings(**EUR_WITH_USD_RATE), now=A)
    assert not [t for t in threading.enumerate() if t.name.startswith("syncd-products")]
    assert engine.pool.checkedout() == 0


def test_the_snapshot_is_taken_while_no_one_can_commit(engine: Engine) -> None:
    if engine.dialect.name != "sqlite":
        pytest.skip("a SQLite store's lock")
    path = engine.url.database
    assert path is not None
    with engine.connect() as conn, profiles._commits_held(conn):
        writer = sqlite3.connect(path, timeout=0, isolation_level=None)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            writer.execute("BEGIN IMMEDIATE")
    writer.execute("BEGIN IMMEDIATE")  # free again
    writer.close()
