"""``Destination.forget`` of each adapter against respx: the vendor's deletion request,
field by field, and what counts as done, not applicable or a failure."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable
from typing import Any

import httpx
import orjson
import pytest
import respx
from pydantic import SecretStr

from syncd.destinations.base import NoOptions, Person, SyncTarget
from syncd.destinations.klaviyo import KlaviyoDestination, KlaviyoOptions
from syncd.destinations.mailchimp import MailchimpDestination, MailchimpSyncOptions
from syncd.destinations.webhook import WebhookDestination, WebhookOptions, verify_signature
from syncd.destinations.woocommerce import WooCommerceDestination
from syncd.http import ApiError, ServiceLimits

FAST = ServiceLimits(requests_per_second=None, max_attempts=2, backoff_base=0.001)
EMAIL = "ann@example.com"


def run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    return asyncio.run(main())


def person(**values: Any) -> Person:
    base: dict[str, Any] = {
        "request": 7,
        "email": EMAIL,
        "phone": None,
        "dest_ids": {},
        "record_keys": {},
    }
    return Person(**{**base, **values})


def target(name: str, obj: str | None = None, options: Any = None) -> SyncTarget:
    return SyncTarget(name=name, mode="upsert", object=obj, options=options or NoOptions())


# -- Klaviyo ---------------------------------------------------------------------------------


def klaviyo(router: respx.MockRouter) -> KlaviyoDestination:
    return KlaviyoDestination(
        "main",
        {"api_key": SecretStr("pk_0123456789abcdef")},
        KlaviyoOptions(),
        limits=FAST,
        transport=httpx.MockTransport(router.handler),
    )


def _profiles(router: respx.MockRouter) -> list[dict[str, Any]]:
    return [
        orjson.loads(call.request.content)["data"]["attributes"]["profile"]["data"]
        for call in router.calls
    ]


def test_klaviyo_asks_one_deletion_per_identifier_each_with_exactly_one() -> None:
    router = respx.MockRouter(assert_all_mocked=True)
    route = router.post("https://a.klaviyo.com/api/data-privacy-deletion-jobs").respond(202)
    receipt = run(klaviyo(router).forget(person(phone="+4930901820"), [], ()))
    assert receipt.status == "done" and receipt.receipt is None
    assert route.call_count == 2
    assert _profiles(router) == [
        {"type": "profile", "attributes": {"email": EMAIL}},
        {"type": "profile", "attributes": {"phone_number": "+4930901820"}},
    ]
    request = router.calls[0].request
    assert request.headers["revision"] and request.headers["content-type"].startswith(
        "application/vnd.api+json"
    )


def test_klaviyo_without_email_or_phone_deletes_by_the_profile_ids_it_gave() -> None:
    router = respx.MockRouter(assert_all_mocked=True)
    router.post("https://a.klaviyo.com/api/data-privacy-deletion-jobs").respond(202)
    dest_ids = {"vip": "01PROFILE", "events": "01PROFILE", "other": "01OTHER"}
    receipt = run(klaviyo(router).forget(person(email=None, dest_ids=dest_ids), [], ()))
    assert receipt.status == "done"
    assert [p["id"] for p in _profiles(router)] == ["01OTHER", "01PROFILE"]
    nothing = run(klaviyo(router).forget(person(email=None), [], ()))
    assert nothing.status == "not_applicable"


def test_klaviyo_refusing_the_deletion_fails_the_step() -> None:
    router = respx.MockRouter(assert_all_mocked=True)
    router.post("https://a.klaviyo.com/api/data-privacy-deletion-jobs").respond(
        403, json={"errors": [{"detail": "missing scope data-privacy:write"}]}
    )
    with pytest.raises(ApiError):
        run(klaviyo(router).forget(person(), [], ()))


# -- Mailchimp -------------------------------------------------------------------------------

MC_BASE = "https://us19.api.mailchimp.com/3.0"


def mailchimp() -> MailchimpDestination:
    return MailchimpDestination(
        "mc",
        {"api_key": SecretStr("0123456789abcdef0123456789abcdef-us19")},
        NoOptions(),
        limits=FAST,
    )


def test_mailchimp_deletes_permanently_from_every_audience_404_counts_as_done() -> None:
    digest = hashlib.md5(EMAIL.encode()).hexdigest()
    options = MailchimpSyncOptions()
    targets = [target("a", "list1", options), target("b", "list2", options)]
    with respx.mock(base_url=MC_BASE, assert_all_called=True) as router:
        one = router.post(f"/lists/list1/members/{digest}/actions/delete-permanent").respond(204)
        two = router.post(f"/lists/list2/members/{digest}/actions/delete-permanent").respond(
            404, json={"title": "Resource Not Found", "status": 404}
        )
        receipt = run(mailchimp().forget(person(email="Ann@Example.com"), targets, ()))
    assert one.call_count == two.call_count == 1
    assert receipt.status == "done"
    assert receipt.detail == ("audience list1: permanently deleted; audience list2: not a member")


def test_mailchimp_refusing_the_delete_fails_the_step() -> None:
    digest = hashlib.md5(EMAIL.encode()).hexdigest()
    with respx.mock(base_url=MC_BASE) as router:
        router.post(f"/lists/list1/members/{digest}/actions/delete-permanent").respond(
            405, json={"title": "Method Not Allowed", "detail": "cannot be removed"}
        )
        with pytest.raises(ApiError):
            run(mailchimp().forget(person(), [target("a", "list1")], ()))
    receipt = run(mailchimp().forget(person(email=None), [target("a", "list1")], ()))
    assert receipt.status == "not_applicable"


# -- webhook ---------------------------------------------------------------------------------


def test_webhook_posts_one_signed_erasure_record() -> None:
    url = "https://hooks.example.com/erase"
    dest = WebhookDestination(
        "crm", {"secret": SecretStr("s3cret")}, WebhookOptions(), base_url=url, limits=FAST
    )
    with respx.mock(assert_all_called=True) as router:
        route = router.post(url).respond(200)
        receipt = run(
            dest.forget(person(record_keys={"hook": "42"}, dest_ids={"hook": "x-1"}), [], ())
        )
    request = route.calls[0].request
    assert verify_signature("s3cret", request.content, request.headers["X-Syncd-Signature"])
    body = orjson.loads(request.content)
    assert (body["sync"], body["mode"], body["action"]) == ("crm", "erasure", "erasure")
    assert body["records"] == [
        {
            "key": "privacy-request-7",
            "id": None,
            "data": {
                "email": EMAIL,
                "phone": None,
                "record_keys": {"hook": "42"},
                "dest_ids": {"hook": "x-1"},
            },
        }
    ]
    assert receipt.receipt == request.headers["Idempotency-Key"] == body["batch_id"]


def test_webhook_receiver_naming_the_record_in_errors_fails_the_step() -> None:
    url = "https://hooks.example.com/erase"
    dest = WebhookDestination(
        "crm", {"secret": SecretStr("s3cret")}, WebhookOptions(), base_url=url, limits=FAST
    )
    with respx.mock() as router:
        router.post(url).respond(
            200, json={"errors": [{"key": "privacy-request-7", "message": "locked"}]}
        )
        with pytest.raises(ApiError, match="locked"):
            run(dest.forget(person(), [], ()))


# -- WooCommerce -----------------------------------------------------------------------------

STORE = "https://shop.example.com"
CREDENTIALS = {"consumer_key": SecretStr("ck_1"), "consumer_secret": SecretStr("cs_1")}


def woocommerce() -> WooCommerceDestination:
    return WooCommerceDestination("shop", CREDENTIALS, NoOptions(), base_url=STORE, limits=FAST)


def test_woocommerce_removes_syncd_meta_from_the_customers_it_wrote_to() -> None:
    fields = {"id", "meta.syncd_segments", "meta.syncd_clv", "first_name"}
    someone = person(dest_ids={"writeback": "17", "elsewhere": "99"})
    with respx.mock(base_url=STORE, assert_all_called=True) as router:
        route = router.post("/wp-json/wc/v3/customers/batch").respond(
            200, json={"update": [{"id": 17, "meta_data": []}]}
        )
        receipt = run(woocommerce().forget(someone, [target("writeback")], fields))
    assert orjson.loads(route.calls[0].request.content) == {
        "update": [
            {
                "id": 17,
                "meta_data": [
                    {"key": "syncd_clv", "value": None},
                    {"key": "syncd_segments", "value": None},
                ],
            }
        ]
    }
    assert receipt.status == "done" and "Erase Personal Data" in receipt.detail


def test_woocommerce_is_not_applicable_without_a_customer_or_meta() -> None:
    never = run(woocommerce().forget(person(), [target("writeback")], {"meta.syncd_segments"}))
    assert never.status == "not_applicable" and "never wrote" in never.detail
    no_meta = run(
        woocommerce().forget(person(dest_ids={"writeback": "17"}), [target("writeback")], {"id"})
    )
    assert no_meta.status == "not_applicable" and "no customer meta" in no_meta.detail


def test_woocommerce_refusing_the_update_fails_the_step() -> None:
    with respx.mock(base_url=STORE) as router:
        router.post("/wp-json/wc/v3/customers/batch").respond(
            200,
            json={"update": [{"id": 17, "error": {"code": "x", "message": "Invalid ID."}}]},
        )
        with pytest.raises(ApiError, match="Invalid ID"):
            run(
                woocommerce().forget(
                    person(dest_ids={"writeback": "17"}),
                    [target("writeback")],
                    {"meta.syncd_segments"},
                )
            )
