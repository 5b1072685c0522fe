"""The sandbox WooCommerce store, exercised over real HTTP on 127.0.0.1."""

from __future__ import annotations

import base64
import math
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import orjson
import pytest

from syncd.sandbox.server import FaultConfig, SandboxServer
from syncd.sandbox.store import ORDER_STATUSES, SandboxStore
from syncd.sources.woocommerce.auth import OAuth1Auth, QueryStringAuth

KEY, SECRET = "ck_sandbox", "cs_sandbox"
ANCHOR = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
NY = ZoneInfo("America/New_York")
Payload = dict[str, Any]


@pytest.fixture(scope="module")
def store() -> SandboxStore:
    return SandboxStore(seed=1, now=ANCHOR)


@pytest.fixture(scope="module")
def server(store: SandboxStore) -> Iterator[SandboxServer]:
    with SandboxServer(store) as running:
        yield running


@pytest.fixture
def api(server: SandboxServer) -> Iterator[httpx.Client]:
    server.faults = FaultConfig()
    with httpx.Client(base_url=server.api_url, auth=(KEY, SECRET), timeout=10) as client:
        yield client


@pytest.fixture
def live() -> Iterator[SandboxServer]:
    """A small store of its own, for tests that change data or faults."""
    own = SandboxStore(seed=11, customers=30, guests=15, orders=200, products=8, now=ANCHOR)
    with SandboxServer(own) as running:
        yield running


def visible(store: SandboxStore) -> list[Payload]:
    return [o for o in store.orders.values() if o["status"] != "trash"]


def newest_first(orders: list[Payload]) -> list[int]:
    # orderby=date is post_date (site-local) with ID as the tiebreak, descending.
    return [
        o["id"] for o in sorted(orders, key=lambda o: (o["date_created"], o["id"]), reverse=True)
    ]


# ----------------------------------------------------------------------------- pagination


def test_pages_cover_every_visible_order_newest_first(
    api: httpx.Client, store: SandboxStore
) -> None:
    expected = newest_first(visible(store))
    total = len(expected)
    pages = math.ceil(total / 100)
    seen: list[int] = []
    for page in range(1, pages + 1):
        response = api.get("/orders", params={"per_page": 100, "page": page})
        assert response.status_code == 200
        assert response.headers["X-WP-Total"] == str(total)
        assert response.headers["X-WP-TotalPages"] == str(pages)
        seen += [o["id"] for o in response.json()]
    assert seen == expected


def test_link_header_has_prev_and_next(api: httpx.Client, server: SandboxServer) -> None:
    response = api.get("/orders", params={"per_page": 25, "page": 2, "status": "completed"})
    links = dict(
        (rel, url) for url, rel in re.findall(r'<([^>]+)>; rel="(\w+)"', response.headers["Link"])
    )
    base = f"{server.url}/wp-json/wc/v3/orders?"
    assert links == {
        "prev": base + "per_page=25&page=1&status=completed",
        "next": base + "per_page=25&page=3&status=completed",
    }
    last = response.headers["X-WP-TotalPages"]
    final = api.get("/orders", params={"per_page": 25, "page": last, "status": "completed"})
    assert 'rel="next"' not in final.headers["Link"]
    assert 'rel="prev"' in final.headers["Link"]
    first = api.get("/orders", params={"per_page": 25, "status": "completed"})
    assert first.headers["Link"].count("rel=") == 1 and 'rel="next"' in first.headers["Link"]


def test_page_past_the_end_is_empty_with_real_totals(
    api: httpx.Client, store: SandboxStore
) -> None:
    response = api.get("/orders", params={"per_page": 100, "page": 999})
    assert response.status_code == 200
    assert response.json() == []
    assert response.headers["X-WP-Total"] == str(len(visible(store)))


def test_default_page_size_and_offset(api: httpx.Client, store: SandboxStore) -> None:
    expected = newest_first(visible(store))
    assert [o["id"] for o in api.get("/orders").json()] == expected[:10]
    # offset replaces page, as in WP_Query.
    by_offset = api.get("/orders", params={"offset": 7, "per_page": 5, "page": 30})
    assert [o["id"] for o in by_offset.json()] == expected[7:12]


def test_per_page_over_100_is_refused_like_wordpress(api: httpx.Client) -> None:
    assert len(api.get("/orders", params={"per_page": 100}).json()) == 100
    response = api.get("/orders", params={"per_page": 101})
    assert response.status_code == 400
    message = "per_page must be between 1 (inclusive) and 100 (inclusive)"
    assert response.json() == {
        "code": "rest_invalid_param",
        "message": "Invalid parameter(s): per_page",
        "data": {
            "status": 400,
            "params": {"per_page": message},
            "details": {
                "per_page": {"code": "rest_out_of_bounds", "message": message, "data": None}
            },
        },
    }
    page_zero = api.get("/orders", params={"page": 0, "per_page": "ten"}).json()
    assert page_zero["message"] == "Invalid parameter(s): page, per_page"
    assert page_zero["data"]["params"] == {
        "page": "page must be greater than or equal to 1",
        "per_page": "per_page is not of type integer.",
    }


# --------------------------------------------------------------------------- date filters


def test_modified_after_is_exclusive(api: httpx.Client, store: SandboxStore) -> None:
    pivot = sorted(o["date_modified_gmt"] for o in visible(store))[len(store.orders) // 2]
    params = {"modified_after": pivot, "dates_are_gmt": "true", "orderby": "modified"}
    ids = fetch_all(api, "/orders", {**params, "order": "asc"})
    expected = [o for o in visible(store) if o["date_modified_gmt"] > pivot]
    assert sorted(ids) == sorted(o["id"] for o in expected)
    assert all(store.orders[i]["date_modified_gmt"] > pivot for i in ids)
    # ascending by post_modified (site time), ID as tiebreak
    assert ids == [o["id"] for o in sorted(expected, key=lambda o: (o["date_modified"], o["id"]))]

    one_second_earlier = (datetime.fromisoformat(pivot) - timedelta(seconds=1)).isoformat()
    wider = fetch_all(api, "/orders", {**params, "modified_after": one_second_earlier})
    at_pivot = {o["id"] for o in visible(store) if o["date_modified_gmt"] == pivot}
    assert at_pivot and at_pivot <= set(wider) and not at_pivot & set(ids)


def test_dates_are_gmt_picks_the_column(api: httpx.Client, store: SandboxStore) -> None:
    # An order's own site-local creation time: it is not "after" itself in site time, but its
    # GMT time (4-5 hours later in New York) is.
    pivot = newest_first(visible(store))[len(store.orders) // 3]
    bound = store.orders[pivot]["date_created"]
    local_ids = fetch_all(api, "/orders", {"after": bound})  # dates_are_gmt defaults to false
    gmt_ids = fetch_all(api, "/orders", {"after": bound, "dates_are_gmt": "true"})
    assert set(local_ids) == {o["id"] for o in visible(store) if o["date_created"] > bound}
    assert set(gmt_ids) == {o["id"] for o in visible(store) if o["date_created_gmt"] > bound}
    assert pivot in set(gmt_ids) - set(local_ids)

    before = fetch_all(api, "/orders", {"before": bound, "dates_are_gmt": "1"})
    assert set(before) == {o["id"] for o in visible(store) if o["date_created_gmt"] < bound}


def test_a_utc_offset_is_converted_to_site_time_even_for_gmt_columns(
    api: httpx.Client, store: SandboxStore
) -> None:
    # WP_Date_Query::build_mysql_datetime() turns "...Z" into site-local time before comparing,
    # so with dates_are_gmt a "Z" bound in New York lets 4-5 more hours through.
    pivot = newest_first(visible(store))[len(store.orders) // 3]
    bound = store.orders[pivot]["date_created_gmt"]
    ids = fetch_all(api, "/orders", {"after": bound + "Z", "dates_are_gmt": "true"})
    as_local = store.orders[pivot]["date_created"]
    assert as_local < bound
    assert set(ids) == {o["id"] for o in visible(store) if o["date_created_gmt"] > as_local}
    naive = fetch_all(api, "/orders", {"after": bound, "dates_are_gmt": "true"})
    assert pivot in set(ids) - set(naive)
    assert set(naive) < set(ids)


def test_invalid_dates_are_refused(api: httpx.Client) -> None:
    response = api.get("/orders", params={"modified_after": "2024-13-01T00:00:00"})
    assert response.status_code == 400
    assert response.json()["data"]["params"] == {"modified_after": "Invalid date."}
    assert api.get("/orders", params={"after": "yesterday"}).status_code == 400


# ------------------------------------------------------------------------- status, fields


def test_status_any_hides_trash_and_trash_shows_it(api: httpx.Client, store: SandboxStore) -> None:
    trashed = {o["id"] for o in store.orders.values() if o["status"] == "trash"}
    assert trashed
    any_ids = set(fetch_all(api, "/orders", {"status": "any"}))
    assert any_ids == {o["id"] for o in visible(store)} and not any_ids & trashed
    assert set(fetch_all(api, "/orders", {"status": "trash"})) == trashed
    assert api.get(f"/orders/{min(trashed)}").json()["status"] == "trash"


def test_status_lists_and_repeated_status(api: httpx.Client, store: SandboxStore) -> None:
    wanted = {"processing", "on-hold"}
    expected = {o["id"] for o in store.orders.values() if o["status"] in wanted}
    assert set(fetch_all(api, "/orders", {"status": "processing,on-hold"})) == expected
    assert set(fetch_all(api, "/orders", {"status[]": ["processing", "on-hold"]})) == expected
    response = api.get("/orders", params={"status": "shipped"})
    assert response.status_code == 400
    assert response.json()["data"]["params"]["status"] == (
        "status[0] is not one of any, trash, pending, processing, on-hold, completed, "
        "cancelled, refunded, failed, and checkout-draft."
    )


def test_every_order_status_exists(store: SandboxStore) -> None:
    statuses = {o["status"] for o in store.orders.values()}
    assert statuses == {*ORDER_STATUSES, "trash"}
    for order in store.orders.values():
        paid = order["status"] in ("processing", "completed", "refunded")
        if order["status"] != "trash":
            assert (order["date_paid"] is not None) == paid
        if order["status"] == "completed":
            assert order["date_completed"] is not None
        if order["status"] in ("pending", "failed", "checkout-draft", "on-hold"):
            assert order["date_completed"] is None and order["date_paid_gmt"] is None


def test_fields_keeps_only_requested_fields(api: httpx.Client, store: SandboxStore) -> None:
    rows = api.get("/orders", params={"_fields": "id,date_modified_gmt", "per_page": 50}).json()
    assert len(rows) == 50
    assert all(list(row) == ["id", "date_modified_gmt"] for row in rows)
    assert all(
        row["date_modified_gmt"] == store.orders[row["id"]]["date_modified_gmt"] for row in rows
    )
    nested = api.get("/orders", params={"_fields": "id,billing.email", "per_page": 3}).json()
    assert all(
        list(row) == ["id", "billing"] and list(row["billing"]) == ["email"] for row in nested
    )
    single = api.get(f"/customers/{next(iter(store.customers))}", params={"_fields": "email"})
    assert single.json() == {"email": next(iter(store.customers.values()))["email"]}


def test_include_and_orderby_include(api: httpx.Client, store: SandboxStore) -> None:
    picked = [o["id"] for o in visible(store)][5:25:4]
    in_given_order = api.get(
        "/orders", params={"include": ",".join(map(str, picked)), "orderby": "include"}
    ).json()
    assert [o["id"] for o in in_given_order] == picked
    by_date = api.get("/orders", params={"include": ",".join(map(str, picked))}).json()
    assert [o["id"] for o in by_date] == newest_first([store.orders[i] for i in picked])
    excluded = fetch_all(api, "/orders", {"exclude": ",".join(map(str, picked))})
    assert not set(excluded) & set(picked)
    assert len(excluded) == len(visible(store)) - len(picked)


def test_single_order_is_the_stored_payload(api: httpx.Client, store: SandboxStore) -> None:
    order_id = next(i for i, o in store.orders.items() if o["refunds"])
    assert api.get(f"/orders/{order_id}").json() == store.orders[order_id]
    missing = api.get("/orders/99999999")
    assert missing.status_code == 404
    assert missing.json() == {
        "code": "woocommerce_rest_shop_order_invalid_id",
        "message": "Invalid ID.",
        "data": {"status": 404},
    }


def test_unknown_routes_and_methods(api: httpx.Client) -> None:
    body = {
        "code": "rest_no_route",
        "message": "No route was found matching the URL and request method",
        "data": {"status": 404},
    }
    for response in (
        api.get("/webhooks"),
        api.get("/orders/12/notes"),
        api.post("/orders", json={}),
    ):
        assert response.status_code == 404
        assert response.json() == body


def test_customers_defaults_and_filters(api: httpx.Client, store: SandboxStore) -> None:
    rows = fetch_all(api, "/customers", {})
    # role=customer, orderby=name (display name, which is the user name), order=asc; MySQL
    # compares case-insensitively.
    by_name = sorted(store.customers.values(), key=lambda c: (c["username"].lower(), c["id"]))
    assert rows == [c["id"] for c in by_name]
    everyone = fetch_all(api, "/customers", {"role": "all", "orderby": "id"})
    assert everyone == sorted([*store.customers, *store.staff])
    assert fetch_all(api, "/customers", {"role": "administrator"}) == [1]

    customer = store.customers[max(store.customers)]
    shouted = f"  {customer['email'].upper()} "
    found = api.get("/customers", params={"email": shouted}).json()
    assert [c["id"] for c in found] == [customer["id"]]
    assert found[0] == customer
    refused = api.get("/customers", params={"role": "vip"})
    assert refused.status_code == 400
    assert refused.json()["data"]["params"]["role"] == (
        "role is not one of all, administrator, editor, author, contributor, subscriber, "
        "customer, and shop_manager."
    )


def test_guests_and_returning_guests(store: SandboxStore) -> None:
    guest_orders = [o for o in store.orders.values() if o["customer_id"] == 0]
    emails = [o["billing"]["email"] for o in guest_orders]
    assert len(set(emails)) < len(emails)  # guests come back
    registered = {c["email"].lower() for c in store.customers.values()}
    variants = [e for e in emails if e.strip().lower() in registered and e not in registered]
    assert variants, "guest orders typed with a registered customer's email in other case/spaces"
    assert any(e != e.strip() for e in variants)
    for order in guest_orders:
        assert "_links" in order and "customer" not in order["_links"]


def test_phones_are_typed_like_shoppers_type_them(store: SandboxStore) -> None:
    phones = [c["billing"]["phone"] for c in store.customers.values()]
    assert any(re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", p) for p in phones)
    assert any(p.startswith("+44 ") for p in phones)
    assert any(p.startswith("0049 ") or p.startswith("+49 ") for p in phones)
    assert {c["billing"]["country"] for c in store.customers.values()} >= {"US", "GB", "DE"}


def test_refund_routes(api: httpx.Client, store: SandboxStore) -> None:
    order = next(o for o in store.orders.values() if len(o["refunds"]) >= 1)
    listed = api.get(f"/orders/{order['id']}/refunds").json()
    assert [r["id"] for r in listed] == [r["id"] for r in order["refunds"]]
    for row in listed:
        truth = dict(store.refunds[row["id"]])
        assert truth.pop("parent_id") == order["id"]
        assert row == truth

    everything = fetch_all(api, "/refunds", {})
    assert sorted(everything) == sorted(store.refunds)
    first = api.get("/refunds", params={"per_page": 1}).json()[0]
    assert list(first)[:2] == ["id", "parent_id"]
    # WC_REST_Refunds_Controller unsets post_parent__in: "parent" filters nothing there.
    assert sorted(fetch_all(api, "/refunds", {"parent": order["id"]})) == sorted(store.refunds)
    excluded = fetch_all(api, "/refunds", {"parent_exclude": order["id"]})
    assert sorted(excluded) == sorted(
        i for i, r in store.refunds.items() if r["parent_id"] != order["id"]
    )
    assert api.get("/orders/99999999/refunds").json() == []


def test_refunds_trash_and_restore_as_the_rest_api_makes_them(live: SandboxServer) -> None:
    store = live.store
    order_id = next(
        i for i, o in store.orders.items() if o["status"] == "completed" and not o["refunds"]
    )
    total = Decimal(store.orders[order_id]["total"])
    with httpx.Client(base_url=live.api_url, auth=(KEY, SECRET), timeout=10) as api:

        def order() -> Payload:
            response = api.get(f"/orders/{order_id}")
            assert response.status_code == 200
            return dict(response.json())

        before = order()["date_modified_gmt"]
        small = store.refund_order(order_id, Decimal("1.25"))
        rest = store.refund_order(order_id)  # what is left: the order becomes refunded
        got = order()
        assert got["status"] == "refunded" and got["date_modified_gmt"] >= before
        assert got["refunds"] == [
            {"id": rest["id"], "reason": rest["reason"], "total": f"-{total - Decimal('1.25')}"},
            {"id": small["id"], "reason": small["reason"], "total": "-1.25"},
        ]
        listed = api.get(f"/orders/{order_id}/refunds").json()
        assert [(r["id"], r["amount"]) for r in listed] == [
            (rest["id"], str(total - Decimal("1.25"))),
            (small["id"], "1.25"),
        ]
        assert all("parent_id" not in r for r in listed)

        store.delete_refund(small["id"])
        assert [r["id"] for r in order()["refunds"]] == [rest["id"]]
        assert [r["id"] for r in api.get(f"/orders/{order_id}/refunds").json()] == [rest["id"]]

        store.trash_order(order_id)
        assert order()["status"] == "trash"  # still served, out of the default listing
        assert order_id not in fetch_all(api, "/orders", {"include": order_id})
        assert fetch_all(api, "/orders", {"include": order_id, "status": "trash"}) == [order_id]
        store.set_order_status(order_id, "completed")
        assert order()["status"] == "completed"

        store.delete_order(order_id)
        assert api.get(f"/orders/{order_id}").status_code == 404
        assert rest["id"] not in fetch_all(api, "/refunds", {})


def test_products_and_variations(api: httpx.Client, store: SandboxStore) -> None:
    variable = next(p for p in store.products.values() if p["type"] == "variable")
    rows = api.get(f"/products/{variable['id']}/variations", params={"per_page": 100}).json()
    assert sorted(r["id"] for r in rows) == sorted(variable["variations"])
    assert all(r == store.variations[variable["id"]][r["id"]] for r in rows)
    cheapest = min(Decimal(v["price"]) for v in store.variations[variable["id"]].values())
    assert Decimal(variable["price"]) == cheapest
    products = fetch_all(api, "/products", {"status": "any"})
    assert sorted(products) == sorted(store.products)
    published = fetch_all(api, "/products", {"status": "publish"})
    assert set(published) == {i for i, p in store.products.items() if p["status"] == "publish"}
    assert api.get(f"/products/{variable['id']}").json()["categories"][0].keys() == {
        "id",
        "name",
        "slug",
    }


def test_coupon_usage_matches_orders(api: httpx.Client, store: SandboxStore) -> None:
    counted = {"processing", "on-hold", "completed", "refunded"}
    for coupon in api.get("/coupons", params={"per_page": 100}).json():
        uses = [
            o
            for o in store.orders.values()
            if o["status"] in counted
            and any(c["code"] == coupon["code"] for c in o["coupon_lines"])
        ]
        assert coupon["usage_count"] == len(uses) == len(coupon["used_by"])
        assert coupon["discount_type"] in ("percent", "fixed_cart")
        assert re.fullmatch(r"\d+\.\d{2}", coupon["amount"])


# ------------------------------------------------------------------------------- auth


def test_no_credentials_is_cannot_view(server: SandboxServer) -> None:
    listing = httpx.get(server.api_url + "/orders")
    assert listing.status_code == 401
    assert listing.json() == {
        "code": "woocommerce_rest_cannot_view",
        "message": "Sorry, you cannot list resources.",
        "data": {"status": 401},
    }
    single = httpx.get(server.api_url + "/customers/3")
    assert single.json()["message"] == "Sorry, you cannot view this resource."
    # Arguments are validated before permissions, as in WordPress.
    assert httpx.get(server.api_url + "/orders?per_page=500").status_code == 400


def test_basic_and_query_string_auth(server: SandboxServer) -> None:
    url = server.api_url + "/orders"
    assert httpx.get(url, auth=(KEY, SECRET)).status_code == 200
    assert httpx.get(url, auth=QueryStringAuth(KEY, SECRET)).status_code == 200
    wrong = httpx.get(url, auth=(KEY, "cs_wrong"))
    assert wrong.status_code == 401
    assert wrong.json() == {
        "code": "woocommerce_rest_authentication_error",
        "message": "Consumer secret is invalid.",
        "data": {"status": 401},
    }
    # An unknown key is not an authentication error in WooCommerce: the request is anonymous.
    unknown = httpx.get(url, auth=("ck_nobody", SECRET))
    assert unknown.json()["code"] == "woocommerce_rest_cannot_view"
    bad_query = httpx.get(url, params={"consumer_key": KEY, "consumer_secret": "nope"})
    assert bad_query.json()["message"] == "Consumer secret is invalid."


def test_oauth1_accepted_and_replay_rejected(server: SandboxServer) -> None:
    url = server.api_url + "/orders"
    params: dict[str, str | int] = {
        "modified_after": "2024-01-01T00:00:00",
        "search": "x y+z",
        "per_page": 5,
    }
    good = httpx.get(url, params=params, auth=OAuth1Auth(KEY, SECRET))
    assert good.status_code == 200 and len(good.json()) == 5

    fixed = OAuth1Auth(KEY, SECRET, nonce=lambda: "same-nonce-every-time")
    assert httpx.get(url, auth=fixed).status_code == 200
    replay = httpx.get(url, auth=fixed)
    assert replay.status_code == 401
    assert replay.json() == {
        "code": "woocommerce_rest_authentication_error",
        "message": "Invalid nonce - nonce has already been used.",
        "data": {"status": 401},
    }


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        (
            OAuth1Auth(KEY, "cs_wrong", "HMAC-SHA1"),
            "Invalid signature - provided signature does not match.",
        ),
        (OAuth1Auth(KEY, SECRET, clock=lambda: time.time() - 3600), "Invalid timestamp."),
        (OAuth1Auth("ck_other", SECRET), "Consumer key is invalid."),
    ],
)
def test_oauth1_rejections(server: SandboxServer, auth: OAuth1Auth, message: str) -> None:
    response = httpx.get(server.api_url + "/products", auth=auth)
    assert response.status_code == 401
    assert response.json()["message"] == message


def test_oauth1_is_signed_over_the_store_url(server: SandboxServer) -> None:
    # WooCommerce checks the signature against its home URL, not the Host the client used.
    port = server.url.rsplit(":", 1)[1]
    response = httpx.get(
        f"http://localhost:{port}/wp-json/wc/v3/orders", auth=OAuth1Auth(KEY, SECRET)
    )
    assert response.status_code == 401
    assert response.json()["message"] == "Invalid signature - provided signature does not match."


def test_following_link_headers_with_oauth(server: SandboxServer, store: SandboxStore) -> None:
    with httpx.Client(auth=OAuth1Auth(KEY, SECRET)) as client:
        url: str | None = server.api_url + "/orders?per_page=100&status=completed"
        ids: list[int] = []
        while url:
            response = client.get(url)
            assert response.status_code == 200, response.text
            ids += [o["id"] for o in response.json()]
            url = response.links.get("next", {}).get("url")
    assert sorted(ids) == sorted(i for i, o in store.orders.items() if o["status"] == "completed")


# ------------------------------------------------------------------------------ faults


def test_rate_5xx_one_always_fails(live: SandboxServer) -> None:
    live.faults = FaultConfig(rate_5xx=1.0, seed=4)
    with httpx.Client(base_url=live.api_url, auth=(KEY, SECRET)) as client:
        responses = [client.get("/orders") for _ in range(30)]
    assert {r.status_code for r in responses} == {500, 502, 503}
    json_500 = next(r for r in responses if r.status_code == 500)
    assert json_500.json()["code"] == "internal_server_error"
    html_502 = next(r for r in responses if r.status_code == 502)
    assert html_502.headers["content-type"].startswith("text/html")
    assert "502 Bad Gateway" in html_502.text
    assert {r.fault for r in live.requests} == {"server_error"}


def test_rate_429_sends_retry_after(live: SandboxServer) -> None:
    live.faults = FaultConfig(rate_429=1.0, retry_after="7")
    response = httpx.get(live.api_url + "/orders", auth=(KEY, SECRET))
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "7"
    live.faults = FaultConfig(rate_429=1.0, retry_after=None)
    assert "Retry-After" not in httpx.get(live.api_url + "/orders").headers
    live.faults = FaultConfig()
    assert httpx.get(live.api_url + "/orders", auth=(KEY, SECRET)).status_code == 200


def test_dropped_connection_is_a_transport_error(live: SandboxServer) -> None:
    live.faults = FaultConfig(rate_drop=1.0)
    with pytest.raises(httpx.TransportError):
        httpx.get(live.api_url + "/orders", auth=(KEY, SECRET))
    assert live.requests[-1].fault == "drop" and live.requests[-1].status is None


def test_fault_rates_are_close_to_configured(live: SandboxServer) -> None:
    live.faults = FaultConfig(rate_429=0.2, rate_5xx=0.2, seed=9)
    live.reset_log()
    with httpx.Client(base_url=live.api_url, auth=(KEY, SECRET)) as client:
        statuses = [client.get("/coupons").status_code for _ in range(300)]
    throttled = statuses.count(429)
    failed = sum(1 for s in statuses if s >= 500)
    assert 35 <= throttled <= 85 and 35 <= failed <= 85
    assert statuses.count(200) == 300 - throttled - failed
    log = live.requests
    assert len(log) == 300
    assert sum(1 for r in log if r.fault == "rate_limit") == throttled


def test_latency(live: SandboxServer) -> None:
    live.faults = FaultConfig(latency_ms=120)
    started = time.perf_counter()
    assert httpx.get(live.api_url + "/coupons", auth=(KEY, SECRET)).status_code == 200
    assert time.perf_counter() - started >= 0.12


def test_request_log(live: SandboxServer) -> None:
    live.reset_log()
    with httpx.Client(base_url=live.api_url, auth=(KEY, SECRET)) as client:
        client.get("/orders", params={"page": 2, "per_page": 5})
        client.get("/orders/1/refunds")
        client.get("/nowhere")
    assert [(r.method, r.path, r.status, r.fault) for r in live.requests] == [
        ("GET", "orders", 200, None),
        ("GET", "orders/1/refunds", 200, None),
        ("GET", "nowhere", 404, None),
    ]
    assert live.requests[0].query == {"page": "2", "per_page": "5"}
    live.reset_log()
    assert live.requests == []


def test_headers_date_and_keep_alive(server: SandboxServer) -> None:
    raw = _RawClient(server)
    first = raw.get("/wp-json/wc/v3/coupons?per_page=1")
    second = raw.get("/wp-json/wc/v3/coupons?per_page=2")  # same socket
    assert first[0] == second[0] == 200
    assert len(orjson.loads(second[2])) == 2
    date = parsedate_to_datetime(first[1]["date"])
    assert abs((date - datetime.now(UTC)).total_seconds()) < 60
    raw.close()


# ------------------------------------------------------------------------ determinism, money


def test_same_seed_same_store_different_seed_differs() -> None:
    first = SandboxStore(seed=5, customers=40, guests=20, orders=150, now=ANCHOR)
    second = SandboxStore(seed=5, customers=40, guests=20, orders=150, now=ANCHOR)
    third = SandboxStore(seed=6, customers=40, guests=20, orders=150, now=ANCHOR)

    def dump(value: object) -> bytes:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)

    for kind in ("customers", "orders", "refunds", "products", "variations", "coupons"):
        assert dump(getattr(first, kind)) == dump(getattr(second, kind))
    assert dump(first.orders) != dump(third.orders)
    with SandboxServer(first) as one, SandboxServer(second) as two:
        bodies = [
            httpx.get(s.api_url + "/orders?per_page=100", auth=(KEY, SECRET)).text.replace(
                s.url, ""
            )
            for s in (one, two)
        ]
    assert bodies[0] == bodies[1]


def test_ids_follow_woocommerce_sequences(store: SandboxStore) -> None:
    posts = [*store.orders, *store.refunds, *store.products, *store.coupons]
    posts += [v for table in store.variations.values() for v in table]
    assert len(posts) == len(set(posts))  # one post id sequence
    for refund in store.refunds.values():
        assert refund["id"] > refund["parent_id"]
    orders = sorted(store.orders.values(), key=lambda o: o["id"])
    assert [o["date_created_gmt"] for o in orders] == sorted(o["date_created_gmt"] for o in orders)


def test_dates_are_twins_in_the_site_timezone(store: SandboxStore) -> None:
    real_now = datetime.now(UTC).replace(tzinfo=None).isoformat()
    two_years_before = (ANCHOR - timedelta(days=731)).replace(tzinfo=None).isoformat()
    for order in store.orders.values():
        for field in ("date_created", "date_modified", "date_paid", "date_completed"):
            gmt = order[f"{field}_gmt"]
            if gmt is None:
                assert order[field] is None
                continue
            local = datetime.fromisoformat(gmt).replace(tzinfo=UTC).astimezone(NY)
            assert order[field] == local.replace(tzinfo=None).isoformat()
        assert two_years_before < order["date_created_gmt"] <= order["date_modified_gmt"] < real_now


@pytest.mark.parametrize(("currency", "decimals"), [("USD", 2), ("JPY", 0)])
def test_order_money_adds_up(currency: str, decimals: int, store: SandboxStore) -> None:
    shop = (
        store
        if currency == "USD"
        else SandboxStore(seed=2, orders=400, currency=currency, now=ANCHOR)
    )
    money = re.compile(rf"^-?\d+\.\d{{{decimals}}}$" if decimals else r"^-?\d+$")
    for order in shop.orders.values():
        assert_order_consistent(order, shop, money)


def assert_order_consistent(order: Payload, shop: SandboxStore, money: re.Pattern[str]) -> None:
    def d(value: str) -> Decimal:
        assert money.match(value), value
        return Decimal(value)

    items = order["line_items"]
    assert items
    for item in items:
        assert isinstance(item["price"], int | float) and isinstance(item["quantity"], int)
        assert d(item["total"]) <= d(item["subtotal"])
        assert abs(Decimal(str(item["price"])) * item["quantity"] - d(item["total"])) < Decimal(
            "0.01"
        )
        assert sum((Decimal(t["total"]) for t in item["taxes"]), Decimal(0)) == d(item["total_tax"])
    lines = sum((d(i["total"]) for i in items), Decimal(0))
    cart_tax = sum((d(i["total_tax"]) for i in items), Decimal(0))
    discount = sum((d(i["subtotal"]) - d(i["total"]) for i in items), Decimal(0))
    discount_tax = sum((d(i["subtotal_tax"]) - d(i["total_tax"]) for i in items), Decimal(0))
    shipping = sum((d(s["total"]) for s in order["shipping_lines"]), Decimal(0))
    shipping_tax = sum((d(s["total_tax"]) for s in order["shipping_lines"]), Decimal(0))
    assert d(order["cart_tax"]) == cart_tax
    assert d(order["shipping_total"]) == shipping and d(order["shipping_tax"]) == shipping_tax
    assert d(order["total_tax"]) == cart_tax + shipping_tax
    assert d(order["discount_total"]) == discount and d(order["discount_tax"]) == discount_tax
    assert d(order["total"]) == lines + shipping + cart_tax + shipping_tax
    assert sum((d(c["discount"]) for c in order["coupon_lines"]), Decimal(0)) == discount
    if order["tax_lines"]:
        assert sum((d(t["tax_total"]) for t in order["tax_lines"]), Decimal(0)) == cart_tax
        assert (
            sum((d(t["shipping_tax_total"]) for t in order["tax_lines"]), Decimal(0))
            == shipping_tax
        )
    else:
        assert cart_tax == shipping_tax == 0
    refunded = Decimal(0)
    for entry in order["refunds"]:
        refund = shop.refunds[entry["id"]]
        assert d(entry["total"]) < 0 and d(refund["amount"]) == -d(entry["total"])
        assert refund["parent_id"] == order["id"] and entry["reason"] == refund["reason"]
        refunded += d(refund["amount"])
    assert refunded <= d(order["total"])
    if order["status"] == "refunded":
        assert refunded == d(order["total"])


# ------------------------------------------------------------------------------- changes


def test_mutate_stamps_now_and_incremental_sync_sees_it(live: SandboxServer) -> None:
    shop = live.store
    before = datetime.now(UTC).replace(microsecond=0, tzinfo=None)
    changed = shop.mutate(0.1, seed=3)
    after = datetime.now(UTC).replace(tzinfo=None)
    assert set(changed) == {
        "customers",
        "orders",
        "refunds",
        "products",
        "variations",
        "coupons",
        "deleted_orders",
        "deleted_refunds",
    }
    assert changed["orders"] and changed["customers"]
    for kind in ("customers", "orders", "products", "coupons"):
        for record_id in changed[kind]:
            stamp = datetime.fromisoformat(shop.payload(kind, record_id)["date_modified_gmt"])
            assert before <= stamp <= after, (kind, record_id)

    since = (before - timedelta(seconds=1)).isoformat()
    with httpx.Client(base_url=live.api_url, auth=(KEY, SECRET)) as client:
        params = {"modified_after": since, "dates_are_gmt": "true", "status": "any"}
        seen = fetch_all(client, "/orders", params)
        trashed = fetch_all(client, "/orders", {**params, "status": "trash"})
        assert sorted(seen + trashed) == changed["orders"]
        customers = api_customers_modified_since(client, since)
        assert customers == set(changed["customers"])
        for order_id in changed["deleted_orders"]:
            assert client.get(f"/orders/{order_id}").status_code == 404
            assert order_id in shop.deleted["orders"]
    for refund_id in changed["refunds"]:
        assert shop.refunds[refund_id]["parent_id"] in changed["orders"]
    money = re.compile(r"^-?\d+\.\d{2}$")
    for order_id in changed["orders"]:
        assert_order_consistent(shop.orders[order_id], shop, money)


def test_mutate_moves_orders_forward(live: SandboxServer) -> None:
    shop = live.store
    before = {i: o["status"] for i, o in shop.orders.items()}
    changed = shop.mutate(0.2, seed=8)
    new = [i for i in changed["orders"] if i not in before]
    assert new, "new orders are placed"
    assert any(shop.orders[i]["customer_id"] == 0 for i in new) or len(new) < 3
    moved = {(before[i], shop.orders[i]["status"]) for i in changed["orders"] if i in before}
    allowed_from = {
        "pending": {"processing", "cancelled", "failed", "trash", "pending"},
        "processing": {"completed", "refunded", "trash", "processing"},
        "on-hold": {"processing", "trash", "on-hold"},
    }
    for old, now in moved:
        if old in allowed_from:
            assert now in allowed_from[old], (old, now)
    for order_id in changed["orders"]:
        order = shop.orders[order_id]
        if order["status"] == "completed" and before.get(order_id) == "processing":
            assert order["date_completed_gmt"] == order["date_modified_gmt"]


def test_add_malformed_records_are_served(live: SandboxServer) -> None:
    bad = live.store.add_malformed()
    assert set(bad) == {
        "order_bad_total",
        "order_bad_currency",
        "order_bad_date",
        "customer_without_id",
    }
    with httpx.Client(base_url=live.api_url, auth=(KEY, SECRET)) as client:
        assert client.get(f"/orders/{bad['order_bad_total']}").json()["total"] == "12,34abc"
        assert client.get(f"/orders/{bad['order_bad_currency']}").json()["currency"] == "XYZ"
        dated = client.get(f"/orders/{bad['order_bad_date']}").json()
        assert dated["date_created_gmt"] == "not-a-date"
        newest = client.get("/orders", params={"orderby": "modified", "per_page": 5}).json()
        assert {bad["order_bad_total"], bad["order_bad_date"]} <= {o["id"] for o in newest}
        customers = client.get("/customers", params={"per_page": 100, "orderby": "id"}).json()
        customers += client.get(
            "/customers", params={"per_page": 100, "page": 2, "orderby": "id"}
        ).json()
    assert sum(1 for c in customers if "id" not in c) == 1


# ---------------------------------------------------------------------------- capacity, CLI


def test_serves_300_pages_of_100_orders_per_second(server: SandboxServer) -> None:
    raw = _RawClient(server)
    full_pages = len(visible(server.store)) // 100
    paths = [f"/wp-json/wc/v3/orders?per_page=100&page={p}" for p in range(1, full_pages + 1)]
    for path in paths:
        raw.get(path)
    best = 0.0
    for _ in range(3):  # best of three, so a busy machine does not fail the test by chance
        started = time.perf_counter()
        for n in range(150):
            status, _, body = raw.get(paths[n % len(paths)])
            assert status == 200 and body.count(b'"order_key"') == 100
        best = max(best, 150 / (time.perf_counter() - started))
    raw.close()
    assert best >= 300, f"{best:.0f} pages/s"


def test_command_line_entry_point() -> None:
    command = [
        sys.executable, "-m", "syncd.sandbox", "--port", "0", "--orders", "40",
        "--customers", "10", "--guests", "5", "--key", "ck_cli", "--secret", "cs_cli",
    ]  # fmt: skip
    repo = Path(__file__).resolve().parents[1]
    # A shell's background job (`... &`) ignores SIGINT, and a child inherits an ignored
    # signal: the sandbox would never see the Ctrl-C. A handler, unlike SIG_IGN, is
    # reset to the default in the child, so it starts as from a terminal.
    inherited = signal.getsignal(signal.SIGINT)
    if inherited == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=repo)
    finally:
        signal.signal(signal.SIGINT, inherited)
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(4)]
        url = lines[0].split()[-1]
        assert url.startswith("http://127.0.0.1:")
        assert lines[2].split()[-1] == "ck_cli" and lines[3].split()[-1] == "cs_cli"
        response = httpx.get(url + "/wp-json/wc/v3/orders", auth=("ck_cli", "cs_cli"))
        assert response.status_code == 200
        assert response.headers["X-WP-Total"] != "0"
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0


# ------------------------------------------------------------------------------- helpers


def fetch_all(client: httpx.Client, path: str, params: dict[str, Any]) -> list[int]:
    ids: list[int] = []
    page = 1
    while True:
        response = client.get(path, params={**params, "per_page": 100, "page": page})
        assert response.status_code == 200, response.text
        ids += [row["id"] for row in response.json()]
        if page >= int(response.headers["X-WP-TotalPages"]):
            return ids
        page += 1


def api_customers_modified_since(client: httpx.Client, since: str) -> set[int]:
    # /customers has no modified_after (WooCommerce docs): scan with _fields and filter.
    rows: list[Payload] = []
    page = 1
    while True:
        params: dict[str, str | int] = {
            "per_page": 100,
            "page": page,
            "_fields": "id,date_modified_gmt",
            "orderby": "id",
        }
        response = client.get("/customers", params=params)
        rows += response.json()
        if page >= int(response.headers["X-WP-TotalPages"]):
            break
        page += 1
    return {row["id"] for row in rows if row["date_modified_gmt"] > since}


# ------------------------------------------------------------------ write-back routes


def test_put_customer_meta_data_follows_update_meta_data(live: SandboxServer) -> None:
    store = live.store
    customer_id = next(iter(store.customers))
    before = dict(store.customers[customer_id])
    with httpx.Client(base_url=live.api_url, auth=(KEY, SECRET), timeout=10) as client:
        listed = client.get("/customers", params={"include": customer_id}).json()[0]
        assert listed["meta_data"] == []
        first = client.put(
            f"/customers/{customer_id}",
            json={
                "meta_data": [{"key": "syncd_clv", "value": "10.00"}, {"key": "tier", "value": "a"}]
            },
        )
        assert first.status_code == 200
        meta = {m["key"]: m for m in first.json()["meta_data"]}
        assert meta["syncd_clv"]["value"] == "10.00" and isinstance(meta["syncd_clv"]["id"], int)
        # Without an id the key's value is replaced in place (same row id).
        second = client.put(
            f"/customers/{customer_id}",
            json={"meta_data": [{"key": "syncd_clv", "value": "12.50"}]},
        ).json()
        rows = [m for m in second["meta_data"] if m["key"] == "syncd_clv"]
        assert rows == [{"id": meta["syncd_clv"]["id"], "key": "syncd_clv", "value": "12.50"}]
        # With an id that row takes the key and value; a null value deletes the row.
        third = client.put(
            f"/customers/{customer_id}",
            json={
                "meta_data": [
                    {"id": meta["tier"]["id"], "key": "tier", "value": "b"},
                    {"key": "syncd_clv", "value": None},
                ],
                "first_name": "Renamed",
            },
        ).json()
        assert [(m["key"], m["value"]) for m in third["meta_data"]] == [("tier", "b")]
        assert third["first_name"] == "Renamed"
        assert third["date_modified_gmt"] > before["date_modified_gmt"]
        # The list cache sees the change.
        listed = client.get("/customers", params={"include": customer_id}).json()[0]
        assert listed["first_name"] == "Renamed" and listed["meta_data"] == third["meta_data"]

        unknown = client.put("/customers/999999", json={"first_name": "x"})
        assert unknown.status_code == 400
        assert unknown.json()["code"] == "woocommerce_rest_invalid_id"
        bad = client.put(f"/customers/{customer_id}", json={"email": "nope"})
        assert bad.status_code == 400 and bad.json()["code"] == "rest_invalid_param"
        broken = client.put(
            f"/customers/{customer_id}", content=b"{", headers={"Content-Type": "application/json"}
        )
        assert broken.status_code == 400 and broken.json()["code"] == "rest_invalid_json"
    anonymous = httpx.put(f"{live.api_url}/customers/{customer_id}", json={"first_name": "x"})
    assert anonymous.status_code == 401
    assert anonymous.json()["code"] == "woocommerce_rest_cannot_edit"
    assert store.customers[customer_id]["first_name"] == "Renamed"


def test_customers_batch(live: SandboxServer) -> None:
    store = live.store
    ids = list(store.customers)[:3]
    with httpx.Client(base_url=live.api_url, auth=(KEY, SECRET), timeout=10) as client:
        too_many = {"update": [{"id": i, "first_name": "x"} for i in ids] * 34}
        response = client.post("/customers/batch", json=too_many)
        assert response.status_code == 413
        assert response.json() == {
            "code": "woocommerce_rest_request_entity_too_large",
            "message": "Unable to accept more than 100 items for this request.",
            "data": {"status": 413},
        }
        assert all(store.customers[i]["first_name"] != "x" for i in ids)

        response = client.post(
            "/customers/batch",
            json={
                "create": [{"email": "new.buyer@example.com", "first_name": "New"}],
                "update": [
                    {"id": ids[0], "meta_data": [{"key": "syncd_segment", "value": "vip"}]},
                    {"id": 999999, "meta_data": [{"key": "syncd_segment", "value": "vip"}]},
                ],
                "delete": [ids[1]],
            },
        )
        assert response.status_code == 200
        result = response.json()
        created = result["create"][0]
        assert created["email"] == "new.buyer@example.com" and created["role"] == "customer"
        assert result["update"][0]["meta_data"][0]["value"] == "vip"
        assert result["update"][1] == {
            "id": 999999,
            "error": {
                "code": "woocommerce_rest_invalid_id",
                "message": "Invalid resource ID.",
                "data": {"status": 400},
            },
        }
        assert result["delete"][0]["id"] == ids[1]
        assert client.get(f"/customers/{ids[1]}").status_code == 404
        assert client.get(f"/customers/{created['id']}").json()["first_name"] == "New"
        duplicate = client.post(
            "/customers/batch", json={"create": [{"email": "NEW.buyer@example.com"}]}
        ).json()
        assert duplicate["create"][0]["error"]["code"] == "registration-error-email-exists"
        assert set(client.post("/customers/batch", json={"update": []}).json()) == set()
    anonymous = httpx.post(f"{live.api_url}/customers/batch", json={"delete": [ids[2]]})
    assert anonymous.status_code == 401
    assert anonymous.json()["code"] == "woocommerce_rest_cannot_batch"
    assert ids[2] in store.customers


class _RawClient:
    """A minimal keep-alive HTTP/1.1 client, so timings measure the server, not httpx."""

    def __init__(self, server: SandboxServer) -> None:
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        self._socket = socket.create_connection((host, int(port)))
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._file = self._socket.makefile("rb")
        self._auth = base64.b64encode(f"{KEY}:{SECRET}".encode()).decode()

    def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        request = (
            f"GET {path} HTTP/1.1\r\nHost: sandbox\r\nAuthorization: Basic {self._auth}\r\n\r\n"
        )
        self._socket.sendall(request.encode())
        status = int(self._file.readline().split()[1])
        headers: dict[str, str] = {}
        while (line := self._file.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers, self._file.read(int(headers["content-length"]))

    def close(self) -> None:
        self._file.close()
        self._socket.close()
