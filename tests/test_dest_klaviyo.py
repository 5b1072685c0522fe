"""Tests of the Klaviyo destination adapter against respx mocks of the 2026-07-15 API.

Request bodies are checked field by field against the documented JSON:API shapes
(klaviyo/openapi, revision 2026-07-15). Every ServiceClient of the adapter runs on a fake
clock and sleep, and job polling sleeps are recorded instead of slept, so pacing,
rate-limit pauses and polling are asserted exactly and cost no time.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import random
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest
import respx
from pydantic import SecretStr

import syncd.destinations.base as base_module
import syncd.destinations.klaviyo as klaviyo_module
from syncd.destinations import destination_class
from syncd.destinations.base import BatchRejected, Item, Outcome, PaginationLoop, SyncTarget
from syncd.destinations.klaviyo import KlaviyoDestination, KlaviyoOptions
from syncd.http import ApiError, AuthError, RetryExhausted, ServiceClient, ServiceLimits
from tests.test_http import FakeTime

BASE = "https://a.klaviyo.com"
JOBS = f"{BASE}/api/profile-bulk-import-jobs"
KEY = "pk_0123456789abcdef0123456789abcdef01"
JSON_API = "application/vnd.api+json"


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    """Every ServiceClient the adapter builds runs on this fake time."""
    fake = FakeTime()
    patched = functools.partial(
        ServiceClient, sleep=fake.sleep, clock=fake.clock, rng=random.Random(0)
    )
    monkeypatch.setattr(base_module, "ServiceClient", patched)
    return fake


class Polls:
    """Records the adapter's job-polling sleeps (polling is not the HTTP layer's)."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.sleeps.append(seconds)


@pytest.fixture
def router() -> respx.MockRouter:
    """The mocked Klaviyo, handed to the adapter as its transport (as the contract allows):
    no real transport, so no TLS set-up per client, and nothing can reach the network."""
    return respx.MockRouter(assert_all_called=False, assert_all_mocked=True)


def make(
    fake: FakeTime, router: respx.MockRouter, *, polls: Polls | None = None, **options: Any
) -> tuple[KlaviyoDestination, Polls]:
    dest = KlaviyoDestination(
        "main",
        {"api_key": SecretStr(KEY)},
        KlaviyoOptions(**options),
        transport=httpx.MockTransport(router.handler),
    )
    polls = polls or Polls()
    dest.poll_sleep = polls
    return dest, polls


def run(dest: KlaviyoDestination, coro: Callable[[], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        try:
            return await coro()
        finally:
            await dest.aclose()

    return asyncio.run(main())


def target(mode: str, obj: str | None = None) -> SyncTarget:
    return SyncTarget(name="vip", mode=mode, object=obj, options=KlaviyoOptions())  # type: ignore[arg-type]


def body(request: httpx.Request) -> Any:
    return orjson.loads(request.content)


def job(job_id: str, status: str, *, total: int = 0, failed: int | None = 0) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "status": status,
        "created_at": "2026-11-02T10:00:00+00:00",
        "total_count": total,
        "completed_count": total if status == "complete" else 0,
        "failed_count": failed,
    }
    return {
        "data": {
            "type": "profile-bulk-import-job",
            "id": job_id,
            "attributes": attributes,
            "links": {"self": f"{JOBS}/{job_id}"},
        },
        "links": {"self": f"{JOBS}/{job_id}"},
    }


def import_error(detail: str, *, pointer: str | None, original: Any = None) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "code": "invalid",
        "title": "Invalid input.",
        "detail": detail,
        "source": {"pointer": pointer} if pointer else {},
    }
    if original is not None:
        attributes["original_payload"] = original
    return {"type": "import-error", "id": f"err-{detail[:8]}", "attributes": attributes}


def assert_headers(request: httpx.Request, *, with_body: bool) -> None:
    assert request.headers["Authorization"] == f"Klaviyo-API-Key {KEY}"
    assert request.headers["revision"] == "2026-07-15"
    assert request.headers["Accept"] == JSON_API
    if with_body:
        assert request.headers["Content-Type"] == JSON_API


def person(n: int, **extra: Any) -> Item:
    return Item(key=str(n), payload={"email": f"p{n}@example.com", **extra})


# --- contract ------------------------------------------------------------------------------


def test_registry_and_documented_batch_limits() -> None:
    assert destination_class("klaviyo") is KlaviyoDestination
    assert KlaviyoDestination.type == "klaviyo"
    assert KlaviyoDestination.modes == {"upsert", "mirror", "event", "delete"}
    # bulk_import_profiles: 10,000 per job; list relationships: 1,000 per call;
    # bulk_create_events: 1,000 per request; deletion: one identifier per job.
    assert dict(KlaviyoDestination.max_batch) == {
        "upsert": 10_000,
        "add": 10_000,
        "remove": 1_000,
        "event": 1_000,
        "delete": 1,
        # bulk_unsubscribe_profiles: "Maximum number of profiles per call: 100".
        "unsubscribe": 100,
    }
    assert KlaviyoDestination.consent_channel == "email"
    assert klaviyo_module.MAX_SUBSCRIBE_PROFILES == 1_000
    assert klaviyo_module.SUBSCRIPTION_LIMITS.requests_per_second == pytest.approx(12.5)
    assert KlaviyoDestination.credential_names == ("api_key",)
    assert KlaviyoDestination.object_required == {"mirror", "event"}
    # Steady limits: 150/min for import jobs, lists and bulk events, 60/min for deletion.
    assert KlaviyoDestination.default_limits.requests_per_second == pytest.approx(2.5)
    assert klaviyo_module.LIST_LIMITS.requests_per_second == pytest.approx(2.5)
    assert klaviyo_module.EVENT_LIMITS.requests_per_second == pytest.approx(2.5)
    assert klaviyo_module.DELETION_LIMITS.requests_per_second == pytest.approx(1.0)


def test_check_credentials_wants_a_private_key() -> None:
    assert KlaviyoDestination.check_credentials({"api_key": SecretStr(KEY)}) is None
    reason = KlaviyoDestination.check_credentials({"api_key": SecretStr("AbC123")})
    assert reason is not None and "pk_" in reason


def test_options_reject_typos() -> None:
    with pytest.raises(ValueError):
        KlaviyoOptions(job_timout=5)  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        KlaviyoOptions(job_timeout=0)


def test_check_reasons(fake: FakeTime, router: respx.MockRouter) -> None:
    dest, _ = make(fake, router)
    up = target("upsert")
    assert dest.check(up, "upsert", {"email": "a@example.com"}) is None
    assert dest.check(up, "upsert", {"external_id": "42"}) is None
    assert dest.check(up, "upsert", {"phone_number": "+14155550123"}) is None
    assert "no email" in (dest.check(up, "upsert", {"first_name": "Ann"}) or "")
    assert "no email" in (dest.check(up, "upsert", {"email": None, "external_id": " "}) or "")
    assert "invalid email" in (
        dest.check(up, "upsert", {"email": "not-an-address", "external_id": "1"}) or ""
    )
    assert "E.164" in (dest.check(up, "upsert", {"phone_number": "0415 555"}) or "")
    reason = dest.check(up, "upsert", {"email": "a@example.com", "clv": 3})
    assert reason is not None and "properties.clv" in reason
    reason = dest.check(up, "upsert", {"email": "a@example.com", "location": {"street": "x"}})
    assert reason is not None and "location.street" in reason
    assert dest.check(up, "upsert", {"email": "a@example.com", "properties": 3}) is not None
    # Events take value/time/value_currency besides the profile fields.
    ev = target("event", "Entered VIP")
    assert dest.check(ev, "event", {"email": "a@example.com", "value": 12.5}) is None
    assert dest.check(ev, "event", {"email": "a@example.com", "value": "12"}) is not None
    assert dest.check(up, "upsert", {"email": "a@example.com", "value": 1}) is not None
    # Remove has no payload to check; delete needs email, phone or a profile id.
    assert dest.check(target("mirror", "L1"), "remove", {}) is None
    assert dest.check(target("delete"), "delete", {"id": "01ABC"}) is None
    assert dest.check(target("delete"), "delete", {"external_id": "7"}) is not None
    asyncio.run(dest.aclose())


# --- upsert: bulk import jobs ----------------------------------------------------------------


def test_upsert_sends_one_import_job_polls_it_and_accepts_every_row(
    fake: FakeTime, router: respx.MockRouter
) -> None:
    dest, polls = make(fake, router)
    items = [
        Item(
            key="1",
            payload={
                "email": "  Ann@Example.COM ",
                "first_name": "Ann",
                "last_name": None,  # the bulk import cannot clear: left out
                "location": {"city": "Lyon", "country": "FR", "zip": None},
                "properties": {"clv": 812.5, "vip": True, "tags": ["a", "b"], "gone": None},
            },
        ),
        Item(key="2", payload={"external_id": 77, "phone_number": "+14155550123"}),
        Item(key="3", payload={"email": "c@example.com", "location": {"zip": None}}),
    ]
    with router as mock:
        create = mock.post(JOBS).respond(202, json=job("J1", "queued", total=3))
        poll = mock.get(f"{JOBS}/J1").mock(
            side_effect=[
                httpx.Response(200, json=job("J1", "processing", total=3)),
                httpx.Response(200, json=job("J1", "processing", total=3)),
                httpx.Response(200, json=job("J1", "complete", total=3)),
            ]
        )
        errors = mock.get(f"{JOBS}/J1/import-errors")
        outcomes = run(dest, lambda: dest.send(target("upsert"), "upsert", items))

    assert outcomes == [Outcome.accepted()] * 3
    assert create.call_count == 1
    request = create.calls.last.request
    assert_headers(request, with_body=True)
    assert request.url.path == "/api/profile-bulk-import-jobs"
    sent = body(request)
    assert set(sent) == {"data"}
    assert sent["data"]["type"] == "profile-bulk-import-job"
    assert "relationships" not in sent["data"]  # upsert puts nobody on a list
    assert set(sent["data"]["attributes"]) == {"profiles"}
    profiles = sent["data"]["attributes"]["profiles"]["data"]
    assert profiles == [
        {
            "type": "profile",
            "attributes": {
                "email": "ann@example.com",
                "first_name": "Ann",
                "location": {"city": "Lyon", "country": "FR"},
                "properties": {"clv": 812.5, "vip": True, "tags": ["a", "b"]},
            },
            # A null custom property is removed from the profile.
            "meta": {"patch_properties": {"unset": ["gone"]}},
        },
        {"type": "profile", "attributes": {"external_id": "77", "phone_number": "+14155550123"}},
        {"type": "profile", "attributes": {"email": "c@example.com"}},
    ]
    # Polled until complete, with growing waits; no errors to read when failed_count is 0.
    assert poll.call_count == 3
    assert polls.sleeps == [1.0, 2.0, 4.0]
    assert_headers(poll.calls.last.request, with_body=False)
    assert "status" in poll.calls.last.request.url.params["fields[profile-bulk-import-job]"]
    assert errors.call_count == 0


def test_poll_interval_is_capped(fake: FakeTime, router: respx.MockRouter) -> None:
    dest, polls = make(fake, router)
    dest.poll_interval_max = 5.0
    with router as mock:
        mock.post(JOBS).respond(202, json=job("J1", "queued"))
        mock.get(f"{JOBS}/J1").mock(
            side_effect=[httpx.Response(200, json=job("J1", "processing"))] * 5
            + [httpx.Response(200, json=job("J1", "complete"))]
        )
        run(dest, lambda: dest.send(target("upsert"), "upsert", [person(1)]))
    assert polls.sleeps == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_a_job_already_complete_is_not_polled(fake: FakeTime, router: respx.MockRouter) -> None:
    dest, polls = make(fake, router)
    with router as mock:
        mock.post(JOBS).respond(202, json=job("J1", "complete", total=1))
        poll = mock.get(f"{JOBS}/J1")
        outcomes = run(dest, lambda: dest.send(target("upsert"), "upsert", [person(1)]))
    assert outcomes == [Outcome.accepted()]
    assert poll.call_count == 0 and polls.sleeps == []


def test_import_errors_become_per_row_outcomes_across_pages(
    fake: FakeTime, router: respx.MockRouter
) -> None:
    dest, _ = make(fake, router)
    items = [person(n) for n in range(500)]
    items[137] = Item(key="137", payload={"email": "p137@example.invalid"})
    page_1 = {
        "data": [
            import_error(
                "The email address p137@example.invalid is not deliverable.",
                pointer="/data/attributes/profiles/data/137/attributes/email",
            )
        ],
        "links": {
            "self": f"{JOBS}/J9/import-errors",
            # Klaviyo's links are absolute; only the cursor is taken from them.
            "next": f"{JOBS}/J9/import-errors?page%5Bcursor%5D=bmV4dA&page%5Bsize%5D=100",
        },
    }
    page_2 = {
        "data": [
            # No usable pointer: placed by the identity in its original payload.
            import_error(
                "Invalid location.",
                pointer=None,
                original={"email": "P400@example.com", "location": {"zip": "?"}},
            )
        ],
        "links": {"self": f"{JOBS}/J9/import-errors?page%5Bcursor%5D=bmV4dA", "next": None},
    }
    with router as mock:
        mock.post(JOBS).respond(202, json=job("J9", "queued", total=500))
        mock.get(f"{JOBS}/J9").respond(200, json=job("J9", "complete", total=500, failed=2))
        errors = mock.get(f"{JOBS}/J9/import-errors").mock(
            side_effect=[httpx.Response(200, json=page_1), httpx.Response(200, json=page_2)]
        )
        outcomes = run(dest, lambda: dest.send(target("upsert"), "upsert", items))

    assert len(outcomes) == 500
    rejected = {i: o.error for i, o in enumerate(outcomes) if not o.ok}
    assert rejected == {
        137: "The email address p137@example.invalid is not deliverable.",
        400: "Invalid location.",
    }
    assert sum(o.ok for o in outcomes) == 498
    first, second = (call.request for call in errors.calls)
    assert first.url.params["page[size]"] == "100"
    assert "page[cursor]" not in first.url.params
    assert second.url.params["page[cursor]"] == "bmV4dA"
    assert second.url.host == "a.klaviyo.com"


def test_an_import_errors_cursor_handed_twice_stops_instead_of_looping(
    fake: FakeTime, router: respx.MockRouter
) -> None:
    dest, _ = make(fake, router)
    looping = {
        "data": [import_error("Invalid email.", pointer="/data/attributes/profiles/data/0")],
        "links": {"next": f"{JOBS}/J9/import-errors?page%5Bcursor%5D=c2FtZQ"},
    }
    with router as mock:
        mock.post(JOBS).respond(202, json=job("J9", "complete", total=1, failed=1))
        errors = mock.get(f"{JOBS}/J9/import-errors").respond(200, json=looping)
        with pytest.raises(PaginationLoop, match="same page token twice"):
            run(dest, lambda: dest.send(target("upsert"), "upsert", [person(0)]))
    assert errors.call_count == 2


def test_one_invalid_address_in_500_rejects_only_that_row(
    fake: FakeTime, router: respx.MockRouter
) -> None:
    dest, _ = make(fake, router)
    items = [person(n, location={"address1": f"{n} Main St", "country": "US"}) for n in range(500)]
    errors = {
        "data": [
            import_error(
                "Invalid country code 'ZZ'.",
                pointer="/data/attributes/profiles/data/42/attributes/location/country",
            )
        ],
        "links": {"self": f"{JOBS}/J2/import-errors"},
    }
    with router as mock:
        mock.post(JOBS).respond(202, json=job("J2", "processing", total=500))
        mock.get(f"{JOBS}/J2").respond(200, json=job("J2", "complete", total=500, failed=1))
        mock.get(f"{JOBS}/J2/import-errors").respond(200, json=errors)
        outcomes = run(dest, lambda: dest.send(target("upsert"), "upsert", items))
    assert sum(o.ok for o in outcomes) == 499
    assert outcomes[42] == Outcome.rejected("Invalid country code 'ZZ'.")


def test_a_full_batch_of_10000_goes_in_one_job(fake: FakeTime, router: respx.MockRouter) -> None:
    dest, _ = make(fake, router)
    items = [person(n) for n in range(10_000)]
    with router as mock:
        create = mock.post(JOBS).respond(202, json=job("J1", "complete", total=10_000))
        outcomes = run(dest, lambda: dest.send(target("upsert"), "upsert", items))
    assert create.call_count == 1
    assert len(body(create.calls.last.request)["data"]["attributes"]["profiles"]["data"]) == 10_000
    assert all(o.ok for o in outcomes)


def test_a_body_over_5_mb_is_split_into_jobs_and_oversized_profiles_are_refused(
    fake: FakeTime,
    router: respx.MockRouter,
) -> None:
    dest, _ = make(fake, router)
    big = "x" * 90_000  # ~90 KB a profile: 60 of them pass the 5 MB cap
    items = [person(n, properties={"notes": big}) for n in range(60)]
    items[10] = person(10, properties={"notes": "y" * 150_000})  # over 100 KB alone
    job_ids = iter(["J1", "J2"])

    def created(request: httpx.Request) -> httpx.Response:
        return httpx.Response(202, json=job(next(job_ids), "complete"))

    with router as mock:
        create = mock.post(JOBS).mock(side_effect=created)
        outcomes = run(dest, lambda: dest.send(target("upsert"), "upsert", items))

    assert create.call_count == 2
    sent_emails = []
    for call in create.calls:
        assert len(call.request.content) <= 5_000_000
        sent_emails += [
            p["attributes"]["email"]
            for p in body(call.request)["data"]["attributes"]["profiles"]["data"]
        ]
    assert sent_emails == [f"p{n}@example.com" for n in range(60) if n != 10]
    assert not outcomes[10].ok and "100 KB" in (outcomes[10].error or "")
    assert all(o.ok for i, o in enumerate(outcomes) if i != 10)


def test_rows_failing_check_are_refused_without_being_sent(
    fake: FakeTime, router: respx.MockRouter
) -> None:
    dest, _ = make(fake, router)
    items = [person(1), Item(key="2", payload={"email": "nope"}), person(3)]
    with router as mock:
        create = mock.post(JOBS).respond(202, json=job("J1", "complete"))
        outcomes = run(dest, lambda: dest.send(target("upsert"), "upsert", items))
    profiles = body(create.calls.last.request)["data"]["attributes"]["profiles"]["data"]
    assert [p["attributes"]["email"] for p in profiles] == ["p1@example.com", "p3@example.com"]
    assert outcomes[0].ok and outcomes[2].ok
    assert not outcomes[1].ok and "invalid email" in (outcomes[1].error or "")


def test_a_cancelled_job_rejects_its_rows(fake: FakeTime, router: respx.MockRouter) -> None:
    dest, _ = make(fake, router)
    with router as mock:
        mock.post(JOBS).respond(202, json=job("J1", "queued"))
        mock.get(f"{JOBS}/J1").respond(200, json=job("J1", "cancelled", failed=0))
        mock.get(f"{JOBS}/J1/import-errors").respond(200, json={"data": [], "links": {}})
        outcomes = run(dest, lambda: dest.send(target("upsert"), "upsert", [person(1), person(2)]))
    assert [o.ok for o in outcomes] == [False, False]
    assert "cancelled" in (outcomes[0].error or "")


def test_a_job_that_never_finishes_fails_the_run_after_job_timeout(
    fake: FakeTime, router: respx.MockRouter
) -> None:
    dest, polls = make(fake, router, job_timeout=10)
    with router as mock:
        mock.post(JOBS).respond(202, json=job("J1", "queued"))
        mock.get(f"{JOBS}/J1").respond(200, json=job("J1", "processing"))
        with pytest.raises(
            RetryExhausted, match=r"J1 still 'processing' after 15s of polling \(job_timeout 10s\)"
        ):
            run(dest, lambda: dest.send(target("upsert"), "upsert", [person(1)]))
    assert polls.sleeps == [1.0, 2.0, 4.0, 8.0]  # 15 s waited >= 10 s


def test_a_malformed_job_is_a_batch_rejection_with_klaviyo_s_message(
    fake: FakeTime, router: respx.MockRouter
) -> None:
    dest, _ = make(fake, router)
    refusal = {
        "errors": [
            {
                "id": "e1",
                "status": 400,
                "code": "invalid",
                "title": "Invalid input.",
                "detail": "'profiles' is a required property",
                "source": {"pointer": "/data/attributes/profiles"},
            }
        ]
    }
    with router as mock:
        mock.post(JOBS).respond(400, json=refusal)
        with pytest.raises(BatchRejected) as caught:
            run(dest, lambda: dest.send(target("upsert"), "upsert", [person(1)]))
    assert caught.value.message == "'profiles' is a required property"


def test_auth_errors_propagate(fake: FakeTime, router: respx.MockRouter) -> None:
    dest, _ = make(fake, router)
    refusal = {
        "errors": [
            {
                "id": "e",
                "status": 401,
                "code": "not_authenticated",
                "title": "Authentication credentials were not provided.",
                "detail": "Missing or invalid private key.",
            }
        ]
    }
    with router as mock:
        mock.post(JOBS).respond(401, json=refusal)
        with pytest.raises(AuthError, match="Missing or invalid private key"):
            run(dest, lambda: dest.send(target("upsert"), "upsert", [person(1)]))


@pytest.mark.parametrize(
    ("status", "pointer"),
    [(404, None), (400, "/data/relationships/lists/data/0/id")],
)
def test_a_missing_list_is_not_a_content_rejection(
    fake: FakeTime, router: respx.MockRouter, status: int, pointer: str | None
) -> None:
    # A wrong list id is the sync's configuration: the same answer for every row, so
    # splitting the batch (BatchRejected) would only multiply the requests.
    dest, _ = make(fake, router)
    error: dict[str, Any] = {
        "id": "e",
        "code": "invalid",
        "title": "Invalid input.",
        "detail": "List NOPE does not exist.",
    }
    if pointer:
        error["source"] = {"pointer": pointer}
    with router as mock:
        mock.post(JOBS).respond(status, json={"errors": [error]})
        with pytest.raises(ApiError, match="List NOPE does not exist") as caught:
            run(dest, lambda: dest.send(target("mirror", "NOPE"), "add", [person(1)]))
    assert caught.value.status == status


# --- mirror ----------------------------------------------------------------------------------


def test_mirror_add_imports_into_the_list_and_returns_profile_ids(
    fake: FakeTime, router: respx.MockRouter
) -> None:
    dest, _ = make(fake, router)
    items = [
        Item(key="1", payload={"email": "Ann@Example.com", "properties": {"clv": 10}}),
        Item(key="2", payload={"phone_number": "+14155550123"}),
        Item(key="3", payload={"external_id": "ext-3"}),
        Item(key="4", payload={"email": "dora@example.com"}),  # Klaviyo does not list it
        Item(key="5", payload={"email": "bad@example.invalid"}),  # an import error
    ]
    profiles_1 = {
        "data": [
            {"type": "profile", "id": "01P-ANN", "attributes": {"email": "ann@example.com"}},
            {
                "type": "profile",
                "id": "01P-PHONE",
                "attributes": {"email": None, "phone_number": "+14155550123"},
            },
        ],
        "links": {
            "self": f"{JOBS}/J5/profiles",
            "next": f"{JOBS}/J5/profiles?page%5Bcursor%5D=cDI&page%5Bsize%5D=100",
        },
    }
    profiles_2 = {
        "data": [
            {"type": "profile", "id": "01P-EXT", "attributes": {"external_id": "ext-3"}},
        ],
        "links": {"self": f"{JOBS}/J5/profiles?page%5Bcursor%5D=cDI", "next": None},
    }
    errors = {
        "data": [
            import_error(
                "Invalid email.", pointer="/data/attributes/profiles/data/4/attributes/email"
            )
        ],
        "links": {},
    }
    with router as mock:
        create = mock.post(JOBS).respond(202, json=job("J5", "queued", total=5))
        mock.get(f"{JOBS}/J5").respond(200, json=job("J5", "complete", total=5, failed=1))
        mock.get(f"{JOBS}/J5/import-errors").respond(200, json=errors)
        listed = mock.get(f"{JOBS}/J5/profiles").mock(
            side_effect=[httpx.Response(200, json=profiles_1), httpx.Response(200, json=profiles_2)]
        )
        outcomes = run(dest, lambda: dest.send(target("mirror", "LIST1"), "add", items))

    sent = body(create.calls.last.request)
    assert sent["data"]["relationships"] == {"lists": {"data": [{"type": "list", "id": "LIST1"}]}}
    assert len(sent["data"]["attributes"]["profiles"]["data"]) == 5
    assert outcomes[0] == Outcome.accepted(dest_id="01P-ANN")
    assert outcomes[1] == Outcome.accepted(dest_id="01P-PHONE")
    assert outcomes[2] == Outcome.accepted(dest_id="01P-EXT")
    assert not outcomes[3].ok and "id" in (outcomes[3].error or "")
    assert outcomes[4] == Outcome.rejected("Invalid email.")
    first, second = (call.request for call in listed.calls)
    assert set(first.url.params["fields[profile]"].split(",")) == {
        "email",
        "phone_number",
        "external_id",
    }
    assert first.url.params["page[size]"] == "100"
    assert second.url.params["page[cursor]"] == "cDI"
    assert_headers(first, with_body=False)


def test_mirror_remove_deletes_relationships_by_profile_id(
    fake: FakeTime, router: respx.MockRouter
) -> None:
    dest, _ = make(fake, router)
    items = [
        Item(key="1", payload={}, dest_id="01P-A"),
        Item(key="2", payload={}, dest_id=None),
        Item(key="3", payload={}, dest_id="01P-C"),
    ]
    url = f"{BASE}/api/lists/LIST1/relationships/profiles"
    with router as mock:
        route = mock.delete(url).respond(204)
        outcomes = run(dest, lambda: dest.send(target("mirror", "LIST1"), "remove", items))
    assert route.call_count == 1
    request = route.calls.last.request
    assert_headers(request, with_body=True)
    assert body(request) == {
        "data": [{"type": "profile", "id": "01P-A"}, {"type": "profile", "id": "01P-C"}]
    }
    assert outcomes[0].ok and outcomes[2].ok
    assert not outcomes[1].ok and "profile id" in (outcomes[1].error or "")


def test_mirror_remove_of_a_full_batch_is_one_call(
    fake: FakeTime, router: respx.MockRouter
) -> None:
    dest, _ = make(fake, router)
    items = [Item(key=str(n), payload={}, dest_id=f"01P{n:05d}") for n in range(1_000)]
    with router as mock:
        route = mock.delete(f"{BASE}/api/lists/L/relationships/profiles").respond(204)
        outcomes = run(dest, lambda: dest.send(target("mirror", "L"), "remove", items))
    assert route.call_count == 1
    assert len(body(route.calls.last.request)["data"]) == 1_000
    assert all(o.ok for o in outcomes)


def test_mirror_needs_a_list_id(fake: FakeTime, router: respx.MockRouter) -> None:
    dest, _ = make(fake, router)
    with pytest.raises(ValueError, match="list id"):
        run(dest, lambda: dest.send(target("mirror", None), "add", [person(1)]))


# --- events ----------------------------------------------------------------------------------


def test_events_go_in_one_bulk_job_each_with_its_unique_id(
    fake: FakeTime, router: respx.MockRouter
) -> None:
    dest, _ = make(fake, router)
    items = [
        Item(
            key="1",
            payload={
                "email": "Ann@Example.com",
                "first_name": "Ann",
                "properties": {"segment": "vip", "clv": 812.5, "note": None},
                "value": 812.5,
                "value_currency": "EUR",
                "time": "2026-11-02T10:00:00Z",
            },
            event_id="evt-1",
        ),
        Item(key="2", payload={"external_id": "77"}, event_id="evt-2"),
        Item(key="3", payload={"email": "c@example.com"}, event_id=None),
    ]
    with router as mock:
        route = mock.post(f"{BASE}/api/event-bulk-create-jobs").respond(202)
        outcomes = run(dest, lambda: dest.send(target("event", "Entered VIP"), "event", items))

    assert route.call_count == 1
    request = route.calls.last.request
    assert_headers(request, with_body=True)
    sent = body(request)
    assert sent["data"]["type"] == "event-bulk-create-job"
    entries = sent["data"]["attributes"]["events-bulk-create"]["data"]
    assert entries == [
        {
            "type": "event-bulk-create",
            "attributes": {
                "profile": {
                    "data": {
                        "type": "profile",
                        "attributes": {"email": "ann@example.com", "first_name": "Ann"},
                    }
                },
                "events": {
                    "data": [
                        {
                            "type": "event",
                            "attributes": {
                                "properties": {"segment": "vip", "clv": 812.5},
                                "metric": {
                                    "data": {
                                        "type": "metric",
                                        "attributes": {"name": "Entered VIP"},
                                    }
                                },
                                "unique_id": "evt-1",
                                "time": "2026-11-02T10:00:00Z",
                                "value": 812.5,
                                "value_currency": "EUR",
                            },
                        }
                    ]
                },
            },
        },
        {
            "type": "event-bulk-create",
            "attributes": {
                "profile": {"data": {"type": "profile", "attributes": {"external_id": "77"}}},
                "events": {
                    "data": [
                        {
                            "type": "event",
                            "attributes": {
                                "properties": {},
                                "metric": {
                                    "data": {
                                        "type": "metric",
                                        "attributes": {"name": "Entered VIP"},
                                    }
                                },
                                "unique_id": "evt-2",
                            },
                        }
                    ]
                },
            },
        },
    ]
    assert outcomes[0].ok and outcomes[1].ok
    assert not outcomes[2].ok and "event id" in (outcomes[2].error or "")


def test_a_full_event_batch_is_one_request_and_a_refusal_is_a_batch_rejection(
    fake: FakeTime,
    router: respx.MockRouter,
) -> None:
    dest, _ = make(fake, router)
    items = [person(n) for n in range(1_000)]
    items = [Item(key=i.key, payload=i.payload, event_id=f"e{i.key}") for i in items]
    with router as mock:
        route = mock.post(f"{BASE}/api/event-bulk-create-jobs").mock(
            side_effect=[
                httpx.Response(202),
                httpx.Response(
                    400,
                    json={
                        "errors": [
                            {
                                "id": "x",
                                "code": "invalid",
                                "title": "Invalid input.",
                                "detail": "time is not ISO 8601",
                            }
                        ]
                    },
                ),
            ]
        )
        outcomes = run(dest, lambda: dest.send(target("event", "M"), "event", items))
        assert route.call_count == 1
        assert (
            len(body(route.calls.last.request)["data"]["attributes"]["events-bulk-create"]["data"])
            == 1_000
        )
        assert all(o.ok for o in outcomes)

        dest2, _ = make(fake, router)
        with pytest.raises(BatchRejected, match="ISO 8601"):
            run(dest2, lambda: dest2.send(target("event", "M"), "event", items[:2]))


def test_event_mode_needs_a_metric_name(fake: FakeTime, router: respx.MockRouter) -> None:
    dest, _ = make(fake, router)
    item = Item(key="1", payload={"email": "a@example.com"}, event_id="e1")
    with pytest.raises(ValueError, match="metric"):
        run(dest, lambda: dest.send(target("event", None), "event", [item]))


# --- delete ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "dest_id", "profile"),
    [
        (
            {"email": "Ann@Example.com", "phone_number": "+14155550123"},
            None,
            {"type": "profile", "attributes": {"email": "ann@example.com"}},
        ),
        (
            {"phone_number": "+14155550123"},
            None,
            {"type": "profile", "attributes": {"phone_number": "+14155550123"}},
        ),
        ({}, "01P-X", {"type": "profile", "id": "01P-X", "attributes": {}}),
    ],
)
def test_delete_requests_one_privacy_deletion_job_per_row(
    fake: FakeTime,
    router: respx.MockRouter,
    payload: dict[str, Any],
    dest_id: str | None,
    profile: dict[str, Any],
) -> None:
    dest, _ = make(fake, router)
    item = Item(key="1", payload=payload, dest_id=dest_id, event_id="del-1")
    with router as mock:
        route = mock.post(f"{BASE}/api/data-privacy-deletion-jobs").respond(202)
        outcomes = run(dest, lambda: dest.send(target("delete"), "delete", [item]))
    assert outcomes == [Outcome.accepted()]
    request = route.calls.last.request
    assert_headers(request, with_body=True)
    assert body(request) == {
        "data": {
            "type": "data-privacy-deletion-job",
            "attributes": {"profile": {"data": profile}},
        }
    }


def test_delete_without_identity_is_refused_unsent(
    fake: FakeTime, router: respx.MockRouter
) -> None:
    dest, _ = make(fake, router)
    with router as mock:
        route = mock.post(f"{BASE}/api/data-privacy-deletion-jobs")
        outcomes = run(
            dest,
            lambda: dest.send(
                target("delete"), "delete", [Item(key="1", payload={"external_id": "9"})]
            ),
        )
    assert route.call_count == 0
    assert not outcomes[0].ok


# --- rate limits -----------------------------------------------------------------------------


def test_rate_limit_headers_pause_the_next_request(
    fake: FakeTime, router: respx.MockRouter
) -> None:
    dest, _ = make(fake, router)
    item = Item(key="1", payload={"email": "a@example.com"}, event_id="e1")
    exhausted = {"RateLimit-Limit": "150", "RateLimit-Remaining": "0", "RateLimit-Reset": "37"}
    with router as mock:
        route = mock.post(f"{BASE}/api/event-bulk-create-jobs").mock(
            side_effect=[httpx.Response(202, headers=exhausted), httpx.Response(202)]
        )

        async def twice() -> None:
            await dest.send(target("event", "M"), "event", [item])
            before = fake.now
            await dest.send(target("event", "M"), "event", [item])
            # The second request waited out the steady window's reset.
            assert fake.now - before == pytest.approx(37.0)

        run(dest, twice)
    assert route.call_count == 2
    assert 37.0 in [round(s, 6) for s in fake.sleeps]


def test_429_retry_after_is_honoured(fake: FakeTime, router: respx.MockRouter) -> None:
    dest, _ = make(fake, router)
    throttled = httpx.Response(
        429,
        headers={"Retry-After": "12"},
        json={
            "errors": [
                {
                    "id": "t",
                    "code": "throttled",
                    "title": "Request was throttled.",
                    "detail": "Expected available in 12 seconds.",
                }
            ]
        },
    )
    with router as mock:
        route = mock.post(f"{BASE}/api/data-privacy-deletion-jobs").mock(
            side_effect=[throttled, httpx.Response(202)]
        )
        outcomes = run(
            dest,
            lambda: dest.send(
                target("delete"), "delete", [Item(key="1", payload={"email": "a@example.com"})]
            ),
        )
    assert outcomes == [Outcome.accepted()]
    assert route.call_count == 2
    assert sum(fake.sleeps) >= 12.0
    assert dest.deletion_client.stats.throttles == 1


def test_each_endpoint_class_has_its_own_pace(fake: FakeTime, router: respx.MockRouter) -> None:
    dest, _ = make(fake, router)
    assert dest.client.limits.requests_per_second == pytest.approx(2.5)
    assert dest.lists_client.limits.requests_per_second == pytest.approx(2.5)
    assert dest.events_client.limits.requests_per_second == pytest.approx(2.5)
    assert dest.deletion_client.limits.requests_per_second == pytest.approx(1.0)
    asyncio.run(dest.aclose())
    # A mapping's [limits] applies to every class.
    limits = ServiceLimits(requests_per_second=0.5)
    custom = KlaviyoDestination(
        "m",
        {"api_key": SecretStr(KEY)},
        KlaviyoOptions(),
        limits=limits,
        transport=httpx.MockTransport(router.handler),
    )
    assert {
        c.limits
        for c in (custom.client, custom.lists_client, custom.events_client, custom.deletion_client)
    } == {limits}
    asyncio.run(custom.aclose())


def test_deletions_are_paced_at_one_a_second(fake: FakeTime, router: respx.MockRouter) -> None:
    dest, _ = make(fake, router)
    items = [Item(key=str(n), payload={"email": f"p{n}@example.com"}) for n in range(3)]

    async def three() -> list[float]:
        times = []
        for item in items:
            await dest.send(target("delete"), "delete", [item])
            times.append(fake.now)
        return times

    with router as mock:
        mock.post(f"{BASE}/api/data-privacy-deletion-jobs").respond(202)
        times = run(dest, three)
    assert [b - a for a, b in itertools.pairwise(times)] == [
        pytest.approx(1.0),
        pytest.approx(1.0),
    ]


def test_aclose_closes_every_client(fake: FakeTime, router: respx.MockRouter) -> None:
    dest, _ = make(fake, router)
    asyncio.run(dest.aclose())
    for client in (dest.client, dest.lists_client, dest.events_client, dest.deletion_client):
        assert client._client.is_closed


# --- consent: subscriptions ------------------------------------------------------------------

SUBSCRIBE = f"{BASE}/api/profile-subscription-bulk-create-jobs"
UNSUBSCRIBE = f"{BASE}/api/profile-subscription-bulk-delete-jobs"


def consent_target(mode: str, obj: str | None = None, consent: str = "email") -> SyncTarget:
    return SyncTarget(
        name="vip",
        mode=mode,  # type: ignore[arg-type]
        object=obj,
        options=KlaviyoOptions(),
        consent=consent,
    )


def test_a_consenting_row_is_subscribed_once_when_first_sent(
    fake: FakeTime, router: respx.MockRouter
) -> None:
    router.post(JOBS).respond(202, json=job("J1", "complete", total=2))
    subscribe = router.post(SUBSCRIBE).respond(202)
    dest, _ = make(fake, router)
    items = [person(1), Item(key="2", payload={"email": "P2@Example.com "}, held=True)]
    outcomes = run(dest, lambda: dest.send(consent_target("upsert"), "upsert", items))
    assert outcomes == [Outcome.accepted(), Outcome.accepted()]
    (call,) = subscribe.calls
    assert_headers(call.request, with_body=True)
    assert call.request.headers["X-Syncd-Consent"] == "email"
    # SubscriptionCreateJobCreateQuery (bulk_subscribe_profiles), by hand: the row sent
    # for the first time only; no list in an upsert (the account's opt-in setting).
    assert body(call.request) == {
        "data": {
            "type": "profile-subscription-bulk-create-job",
            "attributes": {
                "profiles": {
                    "data": [
                        {
                            "type": "profile",
                            "attributes": {
                                "email": "p1@example.com",
                                "subscriptions": {
                                    "email": {"marketing": {"consent": "SUBSCRIBED"}}
                                },
                            },
                        }
                    ]
                },
                "custom_source": "syncd (WooCommerce consent)",
            },
        }
    }


def test_a_transactional_sync_subscribes_nobody(fake: FakeTime, router: respx.MockRouter) -> None:
    router.post(JOBS).respond(202, json=job("J1", "complete", total=1))
    subscribe = router.post(SUBSCRIBE).respond(202)
    dest, _ = make(fake, router)
    outcomes = run(dest, lambda: dest.send(target("upsert"), "upsert", [person(1)]))
    assert outcomes == [Outcome.accepted()]
    assert not subscribe.called


def test_a_refused_subscription_refuses_its_rows(fake: FakeTime, router: respx.MockRouter) -> None:
    router.post(JOBS).respond(202, json=job("J1", "complete", total=1))
    error = {"errors": [{"id": "e", "code": "invalid", "title": "Invalid input.", "detail": "no"}]}
    router.post(SUBSCRIBE).respond(400, json=error)
    dest, _ = make(fake, router)
    (outcome,) = run(dest, lambda: dest.send(consent_target("upsert"), "upsert", [person(1)]))
    assert not outcome.ok and (outcome.error or "").startswith("subscribing failed: ")


def test_a_withdrawal_unsubscribes_with_the_mirrors_list_and_removes_nobody_else_by_id(
    fake: FakeTime, router: respx.MockRouter
) -> None:
    unsubscribe = router.post(UNSUBSCRIBE).respond(202)
    remove = router.delete(f"{BASE}/api/lists/L1/relationships/profiles").respond(204)
    dest, _ = make(fake, router)
    items = [
        Item(key="1", payload={"email": "p1@example.com"}, dest_id="ID1", withdrawn=True),
        Item(key="2", payload={}, dest_id="ID2"),  # left the segment: removed by id
    ]
    outcomes = run(dest, lambda: dest.send(consent_target("mirror", "L1"), "remove", items))
    assert outcomes == [Outcome.accepted("ID1"), Outcome.accepted("ID2")]
    # SubscriptionDeleteJobCreateQuery (bulk_unsubscribe_profiles), by hand.
    assert body(unsubscribe.calls[0].request) == {
        "data": {
            "type": "profile-subscription-bulk-delete-job",
            "attributes": {
                "profiles": {
                    "data": [
                        {
                            "type": "profile",
                            "attributes": {
                                "email": "p1@example.com",
                                "subscriptions": {
                                    "email": {"marketing": {"consent": "UNSUBSCRIBED"}}
                                },
                            },
                        }
                    ]
                }
            },
            "relationships": {"list": {"data": {"type": "list", "id": "L1"}}},
        }
    }
    assert body(remove.calls[0].request) == {"data": [{"type": "profile", "id": "ID2"}]}


def test_an_upsert_withdrawal_unsubscribes_from_the_channel_in_batches_of_100(
    fake: FakeTime, router: respx.MockRouter
) -> None:
    unsubscribe = router.post(UNSUBSCRIBE).respond(202)
    dest, _ = make(fake, router)
    items = [Item(key=str(n), payload={"email": f"p{n}@example.com"}) for n in range(100)]
    outcomes = run(dest, lambda: dest.send(consent_target("upsert"), "unsubscribe", items))
    assert all(o.ok for o in outcomes)
    (call,) = unsubscribe.calls
    sent = body(call.request)["data"]
    assert "relationships" not in sent  # no list: the channel itself
    assert len(sent["attributes"]["profiles"]["data"]) == 100
    # An SMS sync unsubscribes by phone number; a row without one cannot be.
    items = [
        Item(key="1", payload={"phone_number": "+14155550123"}),
        Item(key="2", payload={"email": "p2@example.com"}),
    ]
    dest, _ = make(fake, router)
    outcomes = run(
        dest, lambda: dest.send(consent_target("upsert", consent="sms"), "unsubscribe", items)
    )
    assert outcomes[0].ok and not outcomes[1].ok
    assert body(unsubscribe.calls[1].request)["data"]["attributes"]["profiles"]["data"] == [
        {
            "type": "profile",
            "attributes": {
                "phone_number": "+14155550123",
                "subscriptions": {"sms": {"marketing": {"consent": "UNSUBSCRIBED"}}},
            },
        }
    ]
