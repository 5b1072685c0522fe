"""The WooCommerce write-back adapter against respx: request bodies, auth, per-row outcomes.

Customer objects in responses are the docs' "Retrieve a customer" example
(tests/fixtures/woocommerce/customer_single.json); error entries have the shape of
WC_REST_Controller::batch_items (``{"id": N, "error": {code, message, data}}``) with
the customers controller's own message for an unknown id.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import time
from collections.abc import Awaitable, Sequence
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
import respx
from pydantic import SecretStr

from syncd.destinations import destination_class
from syncd.destinations.base import BatchRejected, Item, NoOptions, Outcome, SyncTarget
from syncd.destinations.woocommerce import NOT_REGISTERED, WooCommerceDestination
from syncd.http import ApiError, AuthError, ServiceLimits
from syncd.sources.woocommerce.auth import verify_oauth1
from tests.conftest import fixture

HTTPS_STORE = "https://shop.example.com"
HTTP_STORE = "http://shop.test"
BATCH_PATH = "/wp-json/wc/v3/customers/batch"
KEY, SECRET = "ck_0123456789abcdef", "cs_fedcba9876543210"
CREDENTIALS = {"consumer_key": SecretStr(KEY), "consumer_secret": SecretStr(SECRET)}
TARGET = SyncTarget(name="clv-writeback", mode="upsert", object=None, options=NoOptions())
# Unpaced and quick to give up: tests must not wait on the adapter's gentle defaults.
FAST = ServiceLimits(requests_per_second=None, max_attempts=2, backoff_base=0.001)
UNKNOWN_ID = {
    "code": "woocommerce_rest_invalid_id",
    "message": "Invalid resource ID.",
    "data": {"status": 400},
}


def run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    return asyncio.run(main())


def make(base_url: str | None = HTTPS_STORE) -> WooCommerceDestination:
    return WooCommerceDestination("shop", CREDENTIALS, NoOptions(), base_url=base_url, limits=FAST)


async def send(dest: WooCommerceDestination, items: Sequence[Item]) -> list[Outcome]:
    try:
        return await dest.send(TARGET, "upsert", items)
    finally:
        await dest.aclose()


def customer(number: int, meta: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = copy.deepcopy(fixture("customer_single.json"))
    body["id"] = number
    body["meta_data"] = meta or []
    return body


def echo_batch(request: httpx.Request) -> httpx.Response:
    """A store where every id exists: each update answers with its customer object."""
    sent = json.loads(request.content)
    return httpx.Response(200, json={"update": [customer(u["id"]) for u in sent["update"]]})


def test_registered_in_the_registry() -> None:
    assert destination_class("woocommerce") is WooCommerceDestination
    assert WooCommerceDestination.modes == frozenset({"upsert"})
    assert WooCommerceDestination.credential_names == ("consumer_key", "consumer_secret")


def test_batch_body_meta_data_and_basic_auth_over_https() -> None:
    items = [
        Item(
            key="person:1",
            payload={
                "id": 25,
                "meta": {
                    "syncd_segments": ["vip", "at_risk"],
                    "syncd_clv_12m": 123.45,
                    "syncd_stage": "loyal",
                    "syncd_flags": {"b": 1, "a": True},
                    "syncd_churn": None,
                },
                "first_name": "John",
                "billing": {"phone": "(555) 555-5555"},
            },
        ),
        # The id as a string of digits (a TEXT column) is the same customer id.
        Item(key="person:2", payload={"id": "26", "meta": {"syncd_clv_12m": 0}}),
    ]
    with respx.mock(assert_all_called=False) as router:
        route = router.post(f"{HTTPS_STORE}{BATCH_PATH}").mock(side_effect=echo_batch)
        outcomes = run(send(make(), items))

    assert route.call_count == 1
    request = route.calls[0].request
    assert request.url.query == b""  # credentials travel in the header, not the URL
    expected = "Basic " + base64.b64encode(f"{KEY}:{SECRET}".encode()).decode()
    assert request.headers["Authorization"] == expected
    assert request.headers["Content-Type"] == "application/json"
    body = json.loads(request.content)
    assert list(body) == ["update"]  # no create, no delete
    first, second = body["update"]
    assert first["id"] == 25
    assert first["first_name"] == "John"
    assert first["billing"] == {"phone": "(555) 555-5555"}
    assert first["meta_data"] == [
        {"key": "syncd_segments", "value": '["vip","at_risk"]'},  # JSON text, order kept
        {"key": "syncd_clv_12m", "value": 123.45},  # numbers as they are
        {"key": "syncd_stage", "value": "loyal"},
        {"key": "syncd_flags", "value": '{"a":true,"b":1}'},  # sorted keys: stable text
        {"key": "syncd_churn", "value": None},
    ]
    assert "meta" not in first and "last_name" not in first
    assert second == {"id": 26, "meta_data": [{"key": "syncd_clv_12m", "value": 0}]}
    assert outcomes == [Outcome.accepted("25"), Outcome.accepted("26")]


def test_oauth1_signed_query_over_plain_http() -> None:
    items = [Item(key="p", payload={"id": 7, "meta": {"syncd_clv_12m": 1}})]
    with respx.mock(assert_all_called=False) as router:
        route = router.post(host="shop.test", path=BATCH_PATH).mock(side_effect=echo_batch)
        outcomes = run(send(make(HTTP_STORE), items))

    request = route.calls[0].request
    assert "Authorization" not in request.headers  # Basic over plain http would leak
    params = parse_qsl(request.url.query.decode())
    names = {name for name, _ in params}
    assert {"oauth_consumer_key", "oauth_signature", "oauth_nonce", "oauth_timestamp"} <= names
    assert dict(params)["oauth_consumer_key"] == KEY
    # WooCommerce's own check accepts it (and would refuse a wrong secret).
    url = f"{HTTP_STORE}{BATCH_PATH}"
    assert verify_oauth1("POST", url, params, KEY, SECRET, now=time.time()) is None
    assert verify_oauth1("POST", url, params, KEY, "cs_wrong", now=time.time()) is not None
    assert json.loads(request.content) == {
        "update": [{"id": 7, "meta_data": [{"key": "syncd_clv_12m", "value": 1}]}]
    }
    assert outcomes == [Outcome.accepted("7")]


def test_a_full_batch_of_100_with_one_unknown_id_fails_only_that_row() -> None:
    assert WooCommerceDestination.max_batch == {"upsert": 100}
    items = [
        Item(key=f"k{n}", payload={"id": n, "meta": {"syncd_clv_12m": n}}) for n in range(1, 101)
    ]

    def store(request: httpx.Request) -> httpx.Response:
        answers = [
            {"id": u["id"], "error": UNKNOWN_ID} if u["id"] == 57 else customer(u["id"])
            for u in json.loads(request.content)["update"]
        ]
        return httpx.Response(200, json={"update": answers})

    with respx.mock(assert_all_called=False) as router:
        route = router.post(f"{HTTPS_STORE}{BATCH_PATH}").mock(side_effect=store)
        outcomes = run(send(make(), items))

    assert route.call_count == 1
    assert [u["id"] for u in json.loads(route.calls[0].request.content)["update"]] == list(
        range(1, 101)
    )
    assert sum(o.ok for o in outcomes) == 99
    assert outcomes[56] == Outcome.rejected("Invalid resource ID. (woocommerce_rest_invalid_id)")
    assert [o.dest_id for i, o in enumerate(outcomes) if i != 56] == [
        str(n) for n in range(1, 101) if n != 57
    ]


def test_more_than_100_is_refused_before_any_request() -> None:
    items = [Item(key=f"k{n}", payload={"id": n}) for n in range(1, 102)]
    with respx.mock(assert_all_called=False) as router:
        route = router.post(f"{HTTPS_STORE}{BATCH_PATH}").mock(side_effect=echo_batch)
        with pytest.raises(ValueError, match="at most 100"):
            run(send(make(), items))
    assert route.call_count == 0


def test_answers_are_matched_by_id_not_position() -> None:
    items = [Item(key="a", payload={"id": 1}), Item(key="b", payload={"id": 2})]
    body = {"update": [{"id": 2, "error": UNKNOWN_ID}, customer(1)]}
    with respx.mock(assert_all_called=False) as router:
        router.post(f"{HTTPS_STORE}{BATCH_PATH}").mock(return_value=httpx.Response(200, json=body))
        outcomes = run(send(make(), items))
    assert outcomes == [
        Outcome.accepted("1"),
        Outcome.rejected("Invalid resource ID. (woocommerce_rest_invalid_id)"),
    ]


def test_a_row_without_an_answer_fails_alone() -> None:
    items = [Item(key="a", payload={"id": 1}), Item(key="b", payload={"id": 2})]
    body = {"update": [customer(1)]}
    with respx.mock(assert_all_called=False) as router:
        router.post(f"{HTTPS_STORE}{BATCH_PATH}").mock(return_value=httpx.Response(200, json=body))
        outcomes = run(send(make(), items))
    assert outcomes[0] == Outcome.accepted("1")
    assert not outcomes[1].ok and "no result for customer 2" in (outcomes[1].error or "")


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (
            413,
            {
                "code": "woocommerce_rest_request_entity_too_large",
                "message": "Unable to accept more than 100 items for this request.",
                "data": {"status": 413},
            },
        ),
        (
            400,
            {
                "code": "rest_invalid_param",
                "message": "Invalid parameter(s): update",
                "data": {"status": 400},
            },
        ),
    ],
)
def test_whole_batch_refusals_become_batch_rejected(status: int, error: dict[str, Any]) -> None:
    items = [Item(key="a", payload={"id": 1})]
    with respx.mock(assert_all_called=False) as router:
        route = router.post(f"{HTTPS_STORE}{BATCH_PATH}").mock(
            return_value=httpx.Response(status, json=error)
        )
        with pytest.raises(BatchRejected) as caught:
            run(send(make(), items))
    assert caught.value.message == error["message"]
    assert route.call_count == 1  # a content refusal is not retried


def test_auth_errors_propagate() -> None:
    error = {
        "code": "woocommerce_rest_authentication_error",
        "message": "Consumer key is invalid.",
        "data": {"status": 401},
    }
    with respx.mock(assert_all_called=False) as router:
        router.post(f"{HTTPS_STORE}{BATCH_PATH}").mock(return_value=httpx.Response(401, json=error))
        with pytest.raises(AuthError, match="Consumer key is invalid"):
            run(send(make(), [Item(key="a", payload={"id": 1})]))


def test_a_wrong_store_url_fails_the_run_instead_of_bisecting() -> None:
    error = fixture("error_examples.json")[0]  # rest_no_route, 404
    with respx.mock(assert_all_called=False) as router:
        router.post(f"{HTTPS_STORE}{BATCH_PATH}").mock(return_value=httpx.Response(404, json=error))
        with pytest.raises(ApiError, match="No route was found") as caught:
            run(send(make(), [Item(key="a", payload={"id": 1})]))
    assert not isinstance(caught.value, BatchRejected)


def test_a_2xx_that_is_not_a_batch_answer_is_an_error() -> None:
    with respx.mock(assert_all_called=False) as router:
        router.post(f"{HTTPS_STORE}{BATCH_PATH}").mock(
            return_value=httpx.Response(200, json=[{"id": 1}])
        )
        with pytest.raises(ApiError, match="expected"):
            run(send(make(), [Item(key="a", payload={"id": 1})]))


@pytest.mark.parametrize("value", [None, 0, -3, "", "abc", "12a", 1.5, True, [1]])
def test_check_refuses_rows_without_a_customer_id(value: Any) -> None:
    dest = make()
    payload = {} if value is None else {"id": value}
    assert dest.check(TARGET, "upsert", payload) == NOT_REGISTERED
    run(dest.aclose())


def test_check_accepts_ids_and_refuses_unwritable_fields() -> None:
    dest = make()
    ok = {"id": 25, "meta": {"syncd_segments": ["vip"]}, "first_name": "J", "billing": {}}
    assert dest.check(TARGET, "upsert", ok) is None
    assert dest.check(TARGET, "upsert", {"id": "25"}) is None
    assert "email" in (dest.check(TARGET, "upsert", {"id": 1, "email": "x@y.z"}) or "")
    assert "underscore" in (
        dest.check(TARGET, "upsert", {"id": 1, "meta": {"_billing_email": "x"}}) or ""
    )
    assert "billing" in (dest.check(TARGET, "upsert", {"id": 1, "billing": "street"}) or "")
    run(dest.aclose())


def test_base_url_is_required_and_gets_the_api_root_once() -> None:
    with pytest.raises(ValueError, match="base_url"):
        WooCommerceDestination.default_base_url(CREDENTIALS)
    with pytest.raises(ValueError, match="base_url"):
        make(None)
    with pytest.raises(ValueError, match="http"):
        make("shop.example.com")
    for given in (f"{HTTPS_STORE}/", f"{HTTPS_STORE}/wp-json/wc/v3"):
        items = [Item(key="a", payload={"id": 1})]
        with respx.mock(assert_all_called=False) as router:
            route = router.post(f"{HTTPS_STORE}{BATCH_PATH}").mock(side_effect=echo_batch)
            assert run(send(make(given), items)) == [Outcome.accepted("1")]
        assert route.call_count == 1
