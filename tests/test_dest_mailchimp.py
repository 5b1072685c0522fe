"""The Mailchimp adapter against respx: request bodies field by field, per-row outcomes.

Responses follow the shapes of Mailchimp Marketing API v3 (batch subscribe:
new_members / updated_members / errors[email_address, error, error_code]; static
segment batch: members_added / members_removed / errors[email_addresses, error];
problem JSON: type, title, status, detail, errors[field, message]).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
import orjson
import pytest
import respx
from pydantic import SecretStr

from syncd.destinations import destination_class
from syncd.destinations.base import BatchRejected, Item, NoOptions, Outcome, SyncTarget
from syncd.destinations.mailchimp import (
    MailchimpDestination,
    MailchimpSyncOptions,
    subscriber_hash,
)
from syncd.http import AuthError, ServiceLimits

T = TypeVar("T")

KEY = "0123456789abcdef0123456789abcdef-us19"
BASE = "https://us19.api.mailchimp.com/3.0"
LIST = "a1b2c3d4e5"
# Retries without real waiting: the 429 test answers Retry-After: 0.
FAST = ServiceLimits(concurrency=5, max_attempts=3, backoff_base=0.001, backoff_max=0.01)


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def make(key: str = KEY) -> MailchimpDestination:
    return MailchimpDestination("mc", {"api_key": SecretStr(key)}, NoOptions(), limits=FAST)


def target(mode: str = "upsert", obj: str | None = LIST, **options: Any) -> SyncTarget:
    return SyncTarget(
        name=f"{mode}-sync",
        mode=mode,  # type: ignore[arg-type]
        object=obj,
        options=MailchimpSyncOptions(**options),
    )


def body_of(request: httpx.Request) -> Any:
    return orjson.loads(request.content)


def batch_answer(
    reject: dict[str, tuple[str, str]] | None = None, updated: set[str] | None = None
) -> Callable[[httpx.Request], httpx.Response]:
    """A batch-subscribe endpoint: every member created or updated, except the addresses
    in ``reject`` (address -> (error, error_code)), answered as Mailchimp does: HTTP 200
    with the refused members in errors[]."""
    reject = reject or {}
    updated = updated or set()

    def answer(request: httpx.Request) -> httpx.Response:
        new, changed, errors = [], [], []
        for member in body_of(request)["members"]:
            address = member["email_address"]
            if address in reject:
                error, code = reject[address]
                errors.append({"email_address": address, "error": error, "error_code": code})
            elif address in updated:
                changed.append({"email_address": address, "status": "subscribed"})
            else:
                new.append({"email_address": address, "status": member.get("status")})
        return httpx.Response(
            200,
            json={
                "new_members": new,
                "updated_members": changed,
                "errors": errors,
                "total_created": len(new),
                "total_updated": len(changed),
                "error_count": len(errors),
            },
        )

    return answer


# --- set-up: datacenter, auth, registry, hashing ------------------------------------------


def test_registry_and_limits() -> None:
    assert destination_class("mailchimp") is MailchimpDestination
    assert MailchimpDestination.credential_names == ("api_key",)
    assert MailchimpDestination.max_batch == {
        "upsert": 500,
        "add": 500,
        "remove": 500,
        "delete": 1,
        "unsubscribe": 500,  # the batch subscribe again, status "unsubscribed"
    }
    assert MailchimpDestination.consent_channel == "email"
    limits = MailchimpDestination.default_limits
    assert limits.concurrency < 10  # Mailchimp: 10 simultaneous connections per account
    assert limits.requests_per_second is None
    assert MailchimpDestination.object_required == {"upsert", "mirror", "delete"}


def test_base_url_is_the_datacenter_of_the_key() -> None:
    creds = {"api_key": SecretStr("abc-def-us7")}
    assert MailchimpDestination.default_base_url(creds) == "https://us7.api.mailchimp.com/3.0"
    assert MailchimpDestination.check_credentials(creds) is None
    assert MailchimpDestination.check_credentials({"api_key": SecretStr(KEY)}) is None


@pytest.mark.parametrize("key", ["0123456789abcdef", "0123456789abcdef-", ""])
def test_a_key_without_datacenter_is_refused_before_any_call(key: str) -> None:
    reason = MailchimpDestination.check_credentials({"api_key": SecretStr(key)})
    assert reason is not None
    assert "datacenter" in reason or "empty" in reason


def test_subscriber_hash_is_md5_of_the_lower_cased_email() -> None:
    # printf 'ada.lovelace@example.com' | md5sum
    expected = "2b9150605ac374d671a306b5fcee60a0"
    assert subscriber_hash("ada.lovelace@example.com") == expected
    assert subscriber_hash("  Ada.Lovelace@Example.COM ") == expected


def test_sync_options_forbid_unknown_keys_and_check_mirror_tag() -> None:
    with pytest.raises(ValueError):
        MailchimpSyncOptions(tags="vip")  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        MailchimpSyncOptions(without_consent="pending")
    assert MailchimpDestination.target_problem("mirror", MailchimpSyncOptions()) is not None
    assert MailchimpDestination.target_problem("mirror", MailchimpSyncOptions(tag="vip")) is None
    assert MailchimpDestination.target_problem("upsert", MailchimpSyncOptions()) is None


# --- check() ----------------------------------------------------------------------------


def test_check_rows() -> None:
    dest = make()
    upsert = target()
    assert dest.check(upsert, "upsert", {"email_address": "a@example.com"}) is None
    assert dest.check(upsert, "upsert", {}) == "no email_address"
    assert dest.check(upsert, "upsert", {"email_address": "not an email"}) == (
        "invalid email_address"
    )
    assert "status" in (
        dest.check(upsert, "upsert", {"email_address": "a@example.com", "status": "x"}) or ""
    )
    assert "FNAME" in (
        dest.check(upsert, "upsert", {"email_address": "a@example.com", "FNAME": "Ada"}) or ""
    )
    skip = target(without_consent="skip")
    assert dest.check(skip, "upsert", {"email_address": "a@example.com"}) == (
        "no marketing consent"
    )
    assert (
        dest.check(skip, "add", {"email_address": "a@example.com", "marketing_consent": False})
        == "no marketing consent"
    )
    assert (
        dest.check(skip, "add", {"email_address": "a@example.com", "marketing_consent": True})
        is None
    )
    # A removal is identified by the dest_id returned on add; its payload is empty.
    assert dest.check(target("mirror", tag="vip"), "remove", {}) is None
    assert dest.check(target("delete"), "delete", {"email_address": "bad"}) is not None
    assert dest.check(target("delete"), "delete", {"email_address": "a@example.com"}) is None


# --- upsert -----------------------------------------------------------------------------


def test_upsert_request_body_field_by_field() -> None:
    items = [
        Item(
            key="1",
            payload={
                "email_address": "  Ada.Lovelace@Example.com ",
                "merge_fields": {"FNAME": "Ada", "LNAME": None},
                "language": "en",
                "vip": True,
                "location": {"latitude": 51.5, "longitude": -0.12},
                "interests": {"9143cf3bd1": True},
                "marketing_consent": True,
            },
        ),
        # No consent, never sent before: a non-subscribed (transactional) contact.
        Item(key="2", payload={"email_address": "bob@example.com", "marketing_consent": False}),
        # No consent flag at all, never sent before: the same.
        Item(key="3", payload={"email_address": "cy@example.com"}),
        # No consent, but accepted before: status left as Mailchimp has it.
        Item(
            key="4",
            payload={"email_address": "dee@example.com", "marketing_consent": None},
            dest_id="dee@example.com",
        ),
        # Consent and accepted before: subscribed (Mailchimp refuses it for someone
        # who unsubscribed).
        Item(
            key="5",
            payload={"email_address": "eve@example.com", "marketing_consent": True},
            dest_id="eve@example.com",
        ),
    ]
    with respx.mock(base_url=BASE, assert_all_called=True) as router:
        route = router.post(f"/lists/{LIST}").mock(side_effect=batch_answer())
        outcomes = run(_send(make(), target(), "upsert", items))

    assert route.call_count == 1
    request = route.calls.last.request
    assert str(request.url) == f"{BASE}/lists/{LIST}"
    expected_auth = "Basic " + base64.b64encode(f"syncd:{KEY}".encode()).decode()
    assert request.headers["Authorization"] == expected_auth
    assert request.headers["Content-Type"] == "application/json"
    body = body_of(request)
    assert body["update_existing"] is True
    assert set(body) == {"members", "update_existing"}
    ada, bob, cy, dee, eve = body["members"]
    assert ada == {
        "email_address": "ada.lovelace@example.com",
        "status": "subscribed",
        "merge_fields": {"FNAME": "Ada"},
        "language": "en",
        "vip": True,
        "location": {"latitude": 51.5, "longitude": -0.12},
        "interests": {"9143cf3bd1": True},
    }
    assert bob == {"email_address": "bob@example.com", "status": "transactional"}
    assert cy == {"email_address": "cy@example.com", "status": "transactional"}
    assert dee == {"email_address": "dee@example.com"}  # no status: never demoted
    assert eve == {"email_address": "eve@example.com", "status": "subscribed"}
    for member in body["members"]:
        assert "marketing_consent" not in member
    assert outcomes == [
        Outcome.accepted("ada.lovelace@example.com"),
        Outcome.accepted("bob@example.com"),
        Outcome.accepted("cy@example.com"),
        Outcome.accepted("dee@example.com"),
        Outcome.accepted("eve@example.com"),
    ]


def test_a_consent_sync_subscribes_when_first_sent_and_then_leaves_the_status() -> None:
    from dataclasses import replace

    sync = replace(target(), consent="email")
    items = [
        Item(key="1", payload={"email_address": "new@example.com"}),
        # Held from an earlier send: no status, so an unsubscribe made in Mailchimp stands.
        Item(
            key="2",
            payload={"email_address": "held@example.com", "marketing_consent": False},
            dest_id="held@example.com",
            held=True,
        ),
    ]
    with respx.mock(base_url=BASE, assert_all_called=True) as router:
        route = router.post(f"/lists/{LIST}").mock(side_effect=batch_answer())
        run(_send(make(), sync, "upsert", items))
    assert body_of(route.calls.last.request)["members"] == [
        {"email_address": "new@example.com", "status": "subscribed"},
        {"email_address": "held@example.com"},
    ]


def test_a_withdrawal_sets_unsubscribed_then_untags() -> None:
    from dataclasses import replace

    sync = replace(target("mirror", tag="VIP"), consent="email")
    items = [
        Item(key="1", payload={}, dest_id="gone@example.com", withdrawn=True),
        Item(key="2", payload={}, dest_id="left@example.com"),
    ]
    with respx.mock(base_url=BASE) as router:
        router.get(f"/lists/{LIST}/segments").respond(
            200, json={"segments": [{"id": 7, "name": "VIP", "type": "static"}], "total_items": 1}
        )
        members = router.post(f"/lists/{LIST}").mock(side_effect=batch_answer())
        untag = router.post(f"/lists/{LIST}/segments/7").respond(
            200, json={"members_removed": [], "errors": []}
        )

        async def go() -> list[Outcome]:
            dest = make()
            try:
                await dest.prepare(sync)
                return await dest.send(sync, "remove", items)
            finally:
                await dest.aclose()

        outcomes = run(go())
    assert outcomes == [Outcome.accepted("gone@example.com"), Outcome.accepted("left@example.com")]
    assert body_of(members.calls.last.request) == {
        "members": [{"email_address": "gone@example.com", "status": "unsubscribed"}],
        "update_existing": True,
    }
    assert body_of(untag.calls.last.request) == {
        "members_to_remove": ["gone@example.com", "left@example.com"]
    }


def test_custom_consent_field_is_read_and_removed() -> None:
    items = [Item(key="1", payload={"email_address": "a@example.com", "optin": True})]
    with respx.mock(base_url=BASE) as router:
        route = router.post(f"/lists/{LIST}").mock(side_effect=batch_answer())
        outcomes = run(_send(make(), target(consent_field="optin"), "upsert", items))
    assert body_of(route.calls.last.request)["members"] == [
        {"email_address": "a@example.com", "status": "subscribed"}
    ]
    assert outcomes == [Outcome.accepted("a@example.com")]


def test_500_members_one_request_and_one_invalid_address_rejected_alone() -> None:
    items = [
        Item(key=str(i), payload={"email_address": f"user{i}@example.com"}) for i in range(500)
    ]
    message = "user137@example.com looks fake or invalid, please enter a real email address."
    answer = batch_answer(
        reject={"user137@example.com": (message, "ERROR_GENERIC")},
        updated={f"user{i}@example.com" for i in range(0, 500, 2)},
    )
    with respx.mock(base_url=BASE) as router:
        route = router.post(f"/lists/{LIST}").mock(side_effect=answer)
        outcomes = run(_send(make(), target(), "upsert", items))

    assert route.call_count == 1
    assert len(body_of(route.calls.last.request)["members"]) == 500
    assert len(outcomes) == 500
    assert sum(o.ok for o in outcomes) == 499
    assert outcomes[137] == Outcome.rejected(f"{message} (ERROR_GENERIC)")
    assert outcomes[136] == Outcome.accepted("user136@example.com")
    assert outcomes[138] == Outcome.accepted("user138@example.com")


def test_more_than_500_members_is_a_programming_error_not_a_request() -> None:
    items = [Item(key=str(i), payload={"email_address": f"u{i}@example.com"}) for i in range(501)]
    with respx.mock(base_url=BASE, assert_all_called=False) as router:
        route = router.post(f"/lists/{LIST}")
        with pytest.raises(ValueError, match="max_batch"):
            run(_send(make(), target(), "upsert", items))
    assert route.call_count == 0


def test_member_errors_match_case_insensitively_and_missing_members_are_rejected() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            json={
                "new_members": [{"email_address": "Ok@Example.com"}],
                "updated_members": [],
                "errors": [
                    {
                        "email_address": "BAD@example.com",
                        "error": "Your merge fields were invalid.",
                        "error_code": "ERROR_GENERIC",
                        "field": "BIRTHDAY",
                        "field_message": "Please enter the date",
                    }
                ],
                "error_count": 1,
            },
        )

    items = [
        Item(key="1", payload={"email_address": "ok@example.com"}),
        Item(key="2", payload={"email_address": "bad@example.com"}),
        Item(key="3", payload={"email_address": "lost@example.com"}),
    ]
    with respx.mock(base_url=BASE) as router:
        router.post(f"/lists/{LIST}").mock(side_effect=answer)
        outcomes = run(_send(make(), target(), "upsert", items))
    assert outcomes[0] == Outcome.accepted("ok@example.com")
    assert outcomes[1] == Outcome.rejected(
        "Your merge fields were invalid. [BIRTHDAY: Please enter the date] (ERROR_GENERIC)"
    )
    assert not outcomes[2].ok
    assert outcomes[2].error is not None and "neither" in outcomes[2].error


def test_duplicate_addresses_in_one_batch_are_sent_once() -> None:
    items = [
        Item(key="1", payload={"email_address": "a@example.com", "language": "fr"}),
        Item(key="2", payload={"email_address": "A@Example.com ", "language": "de"}),
    ]
    with respx.mock(base_url=BASE) as router:
        route = router.post(f"/lists/{LIST}").mock(side_effect=batch_answer())
        outcomes = run(_send(make(), target(), "upsert", items))
    members = body_of(route.calls.last.request)["members"]
    assert members == [
        {"email_address": "a@example.com", "language": "de", "status": "transactional"}
    ]
    assert outcomes == [Outcome.accepted("a@example.com")] * 2


def test_whole_request_400_is_batch_rejected_with_mailchimps_detail() -> None:
    problem = {
        "type": "https://mailchimp.com/developer/marketing/docs/errors/",
        "title": "Invalid Resource",
        "status": 400,
        "detail": "The resource submitted could not be validated. For field-specific "
        "details, see the 'errors' array.",
        "instance": "2b8a0c51-3c5e-4f0b-a1f3-000000000000",
        "errors": [{"field": "members", "message": "Schema describes array, NULL found"}],
    }
    items = [Item(key="1", payload={"email_address": "a@example.com"})]
    with respx.mock(base_url=BASE) as router:
        router.post(f"/lists/{LIST}").mock(
            return_value=httpx.Response(
                400, json=problem, headers={"Content-Type": "application/problem+json"}
            )
        )
        with pytest.raises(BatchRejected) as caught:
            run(_send(make(), target(), "upsert", items))
    message = caught.value.message
    assert message.startswith("Invalid Resource: The resource submitted could not be validated")
    assert "members: Schema describes array, NULL found" in message


def test_auth_error_propagates() -> None:
    problem = {
        "title": "API Key Invalid",
        "status": 401,
        "detail": "Your API key may be invalid, or you've attempted to access the wrong "
        "datacenter.",
    }
    items = [Item(key="1", payload={"email_address": "a@example.com"})]
    with respx.mock(base_url=BASE) as router:
        router.post(f"/lists/{LIST}").mock(return_value=httpx.Response(401, json=problem))
        with pytest.raises(AuthError) as caught:
            run(_send(make(), target(), "upsert", items))
    assert caught.value.status == 401
    assert "API key may be invalid" in caught.value.message


def test_wrong_audience_404_is_not_a_batch_refusal() -> None:
    items = [Item(key="1", payload={"email_address": "a@example.com"})]
    with respx.mock(base_url=BASE) as router:
        router.post(f"/lists/{LIST}").mock(
            return_value=httpx.Response(
                404,
                json={"title": "Resource Not Found", "status": 404, "detail": "not found"},
            )
        )
        with pytest.raises(Exception) as caught:
            run(_send(make(), target(), "upsert", items))
    assert not isinstance(caught.value, BatchRejected)


def test_429_is_retried_by_the_http_layer() -> None:
    items = [Item(key="1", payload={"email_address": "a@example.com"})]
    answer = batch_answer()
    responses = iter(
        [
            lambda request: httpx.Response(
                429,
                headers={"Retry-After": "0"},
                json={"title": "Too Many Requests", "status": 429, "detail": "slow down"},
            ),
            answer,
        ]
    )
    with respx.mock(base_url=BASE) as router:
        route = router.post(f"/lists/{LIST}").mock(
            side_effect=lambda request: next(responses)(request)
        )
        outcomes = run(_send(make(), target(), "upsert", items))
    assert route.call_count == 2
    assert outcomes == [Outcome.accepted("a@example.com")]
    # Both attempts carried the same body.
    first, second = (body_of(call.request) for call in route.calls)
    assert first == second


# --- mirror: tag resolution, add, remove --------------------------------------------------


def test_prepare_finds_the_tag_on_a_later_page() -> None:
    page1 = {
        "segments": [{"id": i, "name": f"other {i}"} for i in range(1000)],
        "total_items": 1002,
    }
    page2 = {
        "segments": [{"id": 5001, "name": "VIP"}, {"id": 5002, "name": "vip"}],
        "total_items": 1002,
    }
    with respx.mock(base_url=BASE, assert_all_called=False) as router:
        route = router.get(f"/lists/{LIST}/segments").mock(
            side_effect=[httpx.Response(200, json=page1), httpx.Response(200, json=page2)]
        )
        create = router.post(f"/lists/{LIST}/segments")
        dest = make()
        run(dest.prepare(target("mirror", tag="vip")))
    assert route.call_count == 2
    first, second = (call.request.url.params for call in route.calls)
    assert (first["type"], first["count"], first["offset"]) == ("static", "1000", "0")
    assert (second["type"], second["count"], second["offset"]) == ("static", "1000", "1000")
    assert create.call_count == 0
    assert dest._segments["mirror-sync"] == 5002  # the exact name beats the case-folded one


def test_prepare_creates_a_missing_tag() -> None:
    with respx.mock(base_url=BASE) as router:
        router.get(f"/lists/{LIST}/segments").mock(
            return_value=httpx.Response(200, json={"segments": [], "total_items": 0})
        )
        create = router.post(f"/lists/{LIST}/segments").mock(
            return_value=httpx.Response(200, json={"id": 777, "name": "vip", "type": "static"})
        )
        dest = make()
        run(dest.prepare(target("mirror", tag="vip")))
    assert body_of(create.calls.last.request) == {"name": "vip", "static_segment": []}
    assert dest._segments["mirror-sync"] == 777


def test_prepare_refuses_mirror_without_tag_and_sync_without_audience() -> None:
    with respx.mock(base_url=BASE, assert_all_called=False) as router:
        listing = router.get(f"/lists/{LIST}/segments")
        with pytest.raises(ValueError, match="tag"):
            run(make().prepare(target("mirror")))
        with pytest.raises(ValueError, match="audience"):
            run(make().prepare(target("upsert", obj=None)))
        run(make().prepare(target("upsert")))  # nothing to resolve: no request
    assert listing.call_count == 0


def _mirror_dest(segment_id: int = 4242) -> MailchimpDestination:
    dest = make()
    dest._segments["mirror-sync"] = segment_id
    return dest


def test_mirror_add_upserts_then_tags_the_accepted_members() -> None:
    items = [
        Item(key="1", payload={"email_address": "a@example.com", "marketing_consent": True}),
        Item(key="2", payload={"email_address": "b@example.com"}),
        Item(key="3", payload={"email_address": "c@example.com"}),
    ]
    upsert_answer = batch_answer(
        reject={"b@example.com": ("b@example.com is already a list member", "ERROR_GENERIC")}
    )
    segment_answer = httpx.Response(
        200,
        json={
            "members_added": [{"email_address": "a@example.com"}],
            "members_removed": [],
            "errors": [{"email_addresses": ["c@example.com"], "error": "Contact is cleaned"}],
            "total_added": 1,
            "total_removed": 0,
            "error_count": 1,
        },
    )
    with respx.mock(base_url=BASE) as router:
        upsert = router.post(f"/lists/{LIST}").mock(side_effect=upsert_answer)
        tag = router.post(f"/lists/{LIST}/segments/4242").mock(return_value=segment_answer)
        outcomes = run(_send(_mirror_dest(), target("mirror", tag="vip"), "add", items))

    assert upsert.call_count == 1 and tag.call_count == 1
    assert body_of(upsert.calls.last.request)["update_existing"] is True
    # Only the members the upsert accepted go to the tag.
    assert body_of(tag.calls.last.request) == {"members_to_add": ["a@example.com", "c@example.com"]}
    assert outcomes[0] == Outcome.accepted("a@example.com")
    assert outcomes[1] == Outcome.rejected("b@example.com is already a list member (ERROR_GENERIC)")
    assert outcomes[2] == Outcome.rejected("tag 'vip': Contact is cleaned")


def test_mirror_remove_takes_dest_ids_out_of_the_tag() -> None:
    items = [
        Item(key="1", payload={}, dest_id="a@example.com"),
        Item(key="2", payload={}, dest_id="Gone@Example.com"),
        Item(key="3", payload={}, dest_id="stuck@example.com"),
        Item(key="4", payload={}),
    ]
    segment_answer = httpx.Response(
        200,
        json={
            "members_added": [],
            "members_removed": [{"email_address": "a@example.com"}],
            "errors": [
                {"email_addresses": ["gone@example.com"], "error": "Email is not a list member"},
                {"email_addresses": ["stuck@example.com"], "error": "Segment is being rebuilt"},
            ],
            "total_removed": 1,
            "error_count": 2,
        },
    )
    with respx.mock(base_url=BASE, assert_all_called=False) as router:
        route = router.post(f"/lists/{LIST}/segments/4242").mock(return_value=segment_answer)
        members = router.post(f"/lists/{LIST}")
        outcomes = run(_send(_mirror_dest(), target("mirror", tag="vip"), "remove", items))
    assert members.call_count == 0  # an exit never touches the member itself
    assert body_of(route.calls.last.request) == {
        "members_to_remove": ["a@example.com", "gone@example.com", "stuck@example.com"]
    }
    assert outcomes[0] == Outcome.accepted("a@example.com")
    assert outcomes[1] == Outcome.accepted("gone@example.com")  # already out: fine
    assert outcomes[2] == Outcome.rejected("Segment is being rebuilt")
    assert not outcomes[3].ok


def test_segment_400_is_batch_rejected() -> None:
    items = [Item(key="1", payload={}, dest_id="a@example.com")]
    with respx.mock(base_url=BASE) as router:
        router.post(f"/lists/{LIST}/segments/4242").mock(
            return_value=httpx.Response(
                400, json={"title": "Invalid Resource", "status": 400, "detail": "too many"}
            )
        )
        with pytest.raises(BatchRejected, match="too many"):
            run(_send(_mirror_dest(), target("mirror", tag="vip"), "remove", items))


def test_send_before_prepare_fails_loudly() -> None:
    items = [Item(key="1", payload={}, dest_id="a@example.com")]
    with respx.mock(base_url=BASE, assert_all_called=False), pytest.raises(RuntimeError):
        run(_send(make(), target("mirror", tag="vip"), "remove", items))


# --- delete -------------------------------------------------------------------------------

ADA_HASH = "2b9150605ac374d671a306b5fcee60a0"  # md5("ada.lovelace@example.com")
DELETE = f"/lists/{LIST}/members/{ADA_HASH}/actions/delete-permanent"


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (httpx.Response(204), Outcome.accepted("ada.lovelace@example.com")),
        # Not in the audience (never added, or already erased): nothing left to erase.
        (
            httpx.Response(404, json={"title": "Resource Not Found", "status": 404}),
            Outcome.accepted("ada.lovelace@example.com"),
        ),
        (
            httpx.Response(
                405,
                json={
                    "title": "Method Not Allowed",
                    "status": 405,
                    "detail": "This list member cannot be removed.  Please contact support.",
                },
            ),
            Outcome.rejected(
                "Method Not Allowed: This list member cannot be removed.  Please contact support."
            ),
        ),
    ],
)
def test_delete_permanent(response: httpx.Response, expected: Outcome) -> None:
    items = [Item(key="1", payload={"email_address": "Ada.Lovelace@Example.com"}, event_id="e1")]
    with respx.mock(base_url=BASE) as router:
        route = router.post(DELETE).mock(return_value=response)
        outcomes = run(_send(make(), target("delete"), "delete", items))
    assert route.call_count == 1
    assert route.calls.last.request.content == b""
    assert outcomes == [expected]


def test_delete_auth_error_propagates() -> None:
    items = [Item(key="1", payload={"email_address": "ada.lovelace@example.com"})]
    with respx.mock(base_url=BASE) as router:
        router.post(DELETE).mock(return_value=httpx.Response(403, json={"title": "Forbidden"}))
        with pytest.raises(AuthError):
            run(_send(make(), target("delete"), "delete", items))


# --- helpers --------------------------------------------------------------------------------


async def _send(
    dest: MailchimpDestination, sync: SyncTarget, op: Any, items: list[Item]
) -> list[Outcome]:
    try:
        return await dest.send(sync, op, items)
    finally:
        await dest.aclose()
