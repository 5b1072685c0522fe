"""Parsing WooCommerce payloads (the docs' own examples) into store rows.

Expected values are read off the fixture by hand, not from the program.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime

import pytest

from syncd.sources.base import BadRecord, record_key
from syncd.sources.woocommerce.parse import (
    parse_coupon,
    parse_customer,
    parse_order,
    parse_product,
    parse_refund,
)
from tests.conftest import fixture


def test_guest_order_from_the_docs() -> None:
    order = parse_order(fixture("order_single.json"), "wc")
    row = order.row
    assert row["source_id"] == 727
    assert row["customer_source_id"] == 0  # a guest
    assert row["email"] == "john.doe@example.com"
    assert row["status"] == "processing"
    assert row["currency"] == "USD"
    assert row["total_minor"] == 2935  # "29.35"
    assert row["shipping_minor"] == 1000  # "10.00"
    assert row["tax_minor"] == 135  # total_tax "1.35"
    assert row["discount_minor"] == 0
    assert row["subtotal_minor"] == 1800  # line subtotals "6.00" + "12.00"
    assert row["refunded_minor"] == 0
    assert row["created_at"] == datetime(2017, 3, 22, 19, 28, 2, tzinfo=UTC)  # the _gmt twin
    assert row["paid_at"] == datetime(2017, 3, 22, 19, 28, 8, tzinfo=UTC)
    assert row["completed_at"] is None
    assert row["modified_at"] == datetime(2017, 3, 22, 19, 28, 8, tzinfo=UTC)
    assert row["deleted_at"] is None
    assert [(i["source_id"], i["quantity"], i["total_minor"]) for i in order.items] == [
        (315, 2, 600),
        (316, 1, 1200),
    ]
    assert order.items[1]["product_source_id"] == 22
    assert order.items[1]["variation_source_id"] == 23
    assert order.items[0]["variation_source_id"] is None  # variation_id 0 means none
    assert order.items[1]["sku"] == "Bar3"
    assert order.items[0]["sku"] is None
    # the billing phone "(555) 555-5555" is not a valid number: null, not garbage
    assert order.person().phone is None
    assert order.person().country == "US"
    assert order.person().city == "San Francisco"


def test_order_attribution_from_meta_data() -> None:
    payload = copy.deepcopy(fixture("order_single.json"))
    assert parse_order(payload, "wc").row["attribution_source_type"] is None  # none in the docs
    payload["meta_data"] = [
        {"id": 1, "key": "_wc_order_attribution_source_type", "value": " referral "},
        {"id": 2, "key": "_wc_order_attribution_utm_source", "value": "facebook.com"},
        {"id": 3, "key": "_wc_order_attribution_session_pages", "value": "4"},
        {"id": 4, "key": "_wc_order_attribution_utm_medium", "value": ""},
        "not an object",
    ]
    row = parse_order(payload, "wc").row
    assert (row["attribution_source_type"], row["attribution_utm_source"]) == (
        "referral",
        "facebook.com",
    )


def test_registered_order_with_refunds() -> None:
    order = next(o for o in fixture("orders_list.json") if o["id"] == 723)
    row = parse_order(order, "wc").row
    assert row["customer_source_id"] == 26
    assert row["total_minor"] == 3900
    # refunds on the order are negative strings: "-10.00" and "-9.00"
    assert row["refunded_minor"] == 1900


def test_zero_decimal_and_three_decimal_currencies() -> None:
    order = copy.deepcopy(fixture("order_single.json"))
    order.update(
        currency="JPY", total="2935", shipping_total="1000", total_tax="0", discount_total="0"
    )
    for line in order["line_items"]:
        line["subtotal"] = line["total"] = "600"
    assert parse_order(order, "wc").row["total_minor"] == 2935
    order.update(currency="KWD", total="29.350", shipping_total="10.000", total_tax="1.350")
    assert parse_order(order, "wc").row["total_minor"] == 29350


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"total": "12,34abc"}, "total"),
        ({"currency": "XYZ"}, "XYZ"),
        ({"date_created_gmt": "not-a-date"}, "date_created_gmt"),
        ({"id": None}, "id"),
        ({"customer_id": -3}, "customer_id"),
    ],
)
def test_bad_orders_say_why(change: dict[str, object], reason: str) -> None:
    order = copy.deepcopy(fixture("order_single.json"))
    order.update(change)
    with pytest.raises(BadRecord, match=reason):
        parse_order(order, "wc")


def test_trashed_order_is_marked_deleted() -> None:
    order = copy.deepcopy(fixture("order_single.json"))
    order["status"] = "trash"
    row = parse_order(order, "wc").row
    assert row["deleted_at"] == datetime(2017, 3, 22, 19, 28, 8, tzinfo=UTC)


def test_customer_from_the_docs() -> None:
    c = parse_customer(fixture("customer_single.json"), "wc")
    assert c.source_id == 25
    assert c.person.email == "john.doe@example.com"
    assert c.person.first_name == "John"
    assert c.person.rank == 2
    assert c.record["created_at"] == datetime(2017, 3, 21, 19, 9, 28, tzinfo=UTC)
    assert c.record["modified_at"] == datetime(2017, 3, 21, 19, 9, 30, tzinfo=UTC)
    assert c.record["role"] == "customer"


def test_refunds_from_the_docs() -> None:
    refunds = fixture("refunds_list.json")  # GET /orders/723/refunds: no parent_id in the payload
    rows = [parse_refund(r, "wc", "USD", order_source_id=723) for r in refunds]
    assert [(r["source_id"], r["amount_minor"], r["order_source_id"]) for r in rows] == [
        (726, 1000, 723),
        (724, 900, 723),
    ]
    assert rows[0]["created_at"] == datetime(2017, 3, 21, 20, 7, 11, tzinfo=UTC)
    with pytest.raises(BadRecord, match="parent_id"):
        parse_refund(refunds[0], "wc", "USD")  # the global /refunds list always has parent_id


def test_product_and_coupon_from_the_docs() -> None:
    p = parse_product(fixture("product_single.json"), "wc", "USD")
    assert (p["source_id"], p["price_minor"], p["categories"], p["stock_status"]) == (
        794,
        2199,
        ["Clothing", "T-shirts"],
        "instock",
    )
    coupon = parse_coupon(fixture("coupon_single.json"), "wc", "USD")
    assert coupon["code"] == "10off"
    assert coupon["discount_type"] == "percent"
    assert coupon["percent_bp"] == 1000  # "10.00" percent
    assert coupon["amount_minor"] is None


def test_record_key_of_id_less_payloads_is_stable() -> None:
    assert record_key({"id": 5}) == "5"
    a = record_key({"email": "x@example.com", "b": 1})
    assert a.startswith("sha256:") and a == record_key({"b": 1, "email": "x@example.com"})
