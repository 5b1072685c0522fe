"""Tests of the Google Customer Match destination (Data Manager API and the Google Ads API
job flow): exact request bodies with respx, and end-to-end pushes against the sandbox on
both stores.

Expected hashes are Google's own published examples (googleads/data-manager-python,
tests/formatter_test.py) or computed by hand from the normalization rules.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import random
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import phonenumbers
import pytest
import respx
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError
from sqlalchemy import Engine, delete, insert, update

import syncd.destinations.base as base_module
from syncd.config import Settings
from syncd.destinations import destination_class
from syncd.destinations.base import Item, MatchReport, Outcome, Person, SyncTarget
from syncd.destinations.google import GoogleDestination, GoogleOptions, identifiers_of
from syncd.http import ApiError, AuthError, ServiceClient
from syncd.identity import GOOGLE, normalize_phone
from syncd.mapping import load_mappings
from syncd.push import push, select_syncs
from syncd.sandbox.destinations import DestinationSandbox
from syncd.sandbox.destinations.base import DestRequest
from syncd.sandbox.destinations.google import GoogleSandbox
from syncd.store.models import CUSTOMERS, MEMBERSHIPS, PROFILES
from tests.consent_audit import ConsentLedger, _Said, plaintext_leaks, violations
from tests.test_http import FakeTime

API = "https://datamanager.googleapis.com"
ADS = "https://googleads.googleapis.com"
TOKEN = "https://oauth2.googleapis.com/token"
LIST = "9876543210"
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
CREDENTIALS = {
    "client_id": SecretStr("sandbox-client.apps.googleusercontent.com"),
    "client_secret": SecretStr("sandbox-client-secret"),
    "refresh_token": SecretStr("1//sandbox-refresh-token"),
}


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    """Every ServiceClient the adapter builds runs on this fake time: back-off costs none."""
    fake = FakeTime()
    patched = functools.partial(
        ServiceClient, sleep=fake.sleep, clock=fake.clock, rng=random.Random(0)
    )
    monkeypatch.setattr(base_module, "ServiceClient", patched)
    return fake


@pytest.fixture
def sandbox() -> Iterator[DestinationSandbox]:
    with DestinationSandbox() as box:
        box.vendor("google", GoogleSandbox).add_user_list(LIST)
        yield box


def google_of(sandbox: DestinationSandbox) -> GoogleSandbox:
    return sandbox.vendor("google", GoogleSandbox)


def make(
    *,
    router: respx.MockRouter | None = None,
    base_url: str | None = None,
    **options: Any,
) -> GoogleDestination:
    opts = GoogleOptions(operating_account_id="123-456-7890", **options)
    transport = httpx.MockTransport(router.handler) if router is not None else None
    dest = GoogleDestination("main", CREDENTIALS, opts, base_url=base_url, transport=transport)

    async def no_wait(seconds: float) -> None:
        return None

    dest.poll_sleep = no_wait
    return dest


def on_sandbox(sandbox: DestinationSandbox, **options: Any) -> GoogleDestination:
    url = sandbox.vendor_url("google")
    if options.get("api") == "google_ads":
        options.setdefault("developer_token", google_of(sandbox).developer_token)
    return make(base_url=url, token_url=f"{url}/token", **options)


def run(dest: GoogleDestination, coro: Callable[[], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        try:
            return await coro()
        finally:
            await dest.aclose()

    return asyncio.run(main())


def target(consent: str = "ads") -> SyncTarget:
    return SyncTarget("g-vip", "mirror", LIST, GoogleOptions.model_construct(), consent=consent)


def mocked() -> respx.MockRouter:
    router = respx.MockRouter(assert_all_called=False, assert_all_mocked=True)
    router.post(TOKEN).respond(
        200, json={"access_token": "ya29.a", "expires_in": 3599, "token_type": "Bearer"}
    )
    return router


def body(request: httpx.Request) -> Any:
    return orjson.loads(request.content)


MARY = {
    "email": " Mary.Major+ads@GMAIL.com ",
    "phone": "030 901820",
    "first_name": "  Mary ",
    "last_name": "MAJOR",
    "country": "DE",
    "postcode": "10115",
}
MARY_IDS = [
    {"emailAddress": sha("marymajor@gmail.com")},
    {"phoneNumber": sha("+4930901820")},
    {
        "address": {
            "givenName": sha("mary"),
            "familyName": sha("major"),
            "regionCode": "DE",
            "postalCode": "10115",
        }
    },
]


# --- the class and its options --------------------------------------------------------


def test_registry_limits_consent_channel_and_match_report_attributes() -> None:
    assert destination_class("google") is GoogleDestination
    assert GoogleDestination.max_batch == {"add": 10_000, "remove": 10_000}
    assert GoogleDestination.modes == frozenset({"mirror"})
    assert GoogleDestination.consent_channel == "ads"
    assert GoogleDestination.reports_match is True
    assert GoogleDestination.min_audience == 100
    assert GoogleDestination.default_limits.requests_per_second == 5.0


def test_options_check_ids_and_want_a_developer_token_for_the_ads_api(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GADS_DEVELOPER_TOKEN", "dev-123")
    ads = GoogleOptions(
        operating_account_id="1", api="google_ads", developer_token="env:GADS_DEVELOPER_TOKEN"
    )
    assert ads.developer_token is not None and ads.developer_token.get_secret_value() == "dev-123"
    assert "dev-123" not in repr(ads)
    with pytest.raises(ValidationError, match="GADS_UNSET is not set"):
        GoogleOptions(operating_account_id="1", api="google_ads", developer_token="env:GADS_UNSET")
    assert GoogleOptions(operating_account_id="123-456-7890").operating_account_id == "1234567890"
    with pytest.raises(ValidationError, match="customer id"):
        GoogleOptions(operating_account_id="acct-1")
    with pytest.raises(ValidationError, match="developer_token"):
        GoogleOptions(operating_account_id="1", api="google_ads")
    with pytest.raises(ValidationError, match="extra"):
        GoogleOptions(operating_account_id="1", audience="x")  # type: ignore[call-arg]


# --- identifiers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "normalized"),
    [
        # googleads/data-manager-python tests/formatter_test.py, format_email_address
        ("QuinnY@example.com", "quinny@example.com"),
        ("QuinnY@EXAMPLE.com", "quinny@example.com"),
        ("Jefferson.Loves.hiking@gmail.com", "jeffersonloveshiking@gmail.com"),
        ("Jefferson.LOVES.Hiking@googlemail.com", "jeffersonloveshiking@googlemail.com"),
        ("Cloudy.SanFrancisco+shopping@googlemail.com", "cloudysanfrancisco@googlemail.com"),
        ("Cloudy.SanFrancisco+shopping@gmail.com", "cloudysanfrancisco@gmail.com"),
        ("user.name+NYC@Example.com", "user.name+nyc@example.com"),
    ],
)
def test_googles_published_email_examples(given: str, normalized: str) -> None:
    assert GOOGLE.normalize("email", given) == normalized
    assert identifiers_of({"email": given}) == [{"emailAddress": sha(normalized)}]


@pytest.mark.parametrize(
    ("given", "country", "e164"),
    [
        # format_phone_number's examples; a number without "+" is read with the billing
        # country, as a national number would be.
        ("1 800 555 0100", "US", "+18005550100"),
        ("18005550100", "US", "+18005550100"),
        ("+1 800-555-0100", None, "+18005550100"),
        ("441134960987", "GB", "+441134960987"),
        ("+441134960987", None, "+441134960987"),
        ("+44-113-496-0987", None, "+441134960987"),
        ("0113 496 0987", "GB", "+441134960987"),
    ],
)
def test_googles_published_phone_examples_in_e164_with_the_plus(
    given: str, country: str | None, e164: str
) -> None:
    assert GOOGLE.normalize("phone", given, country=country) == e164
    assert identifiers_of({"phone": given, "country": country}) == [{"phoneNumber": sha(e164)}]


def test_googles_published_hashes_in_hex_and_base64() -> None:
    # formatter_test.py: hash_string / process_* in HEX and BASE64.
    email = GOOGLE.prepare("email", "  ALEXZ@example.com   ")
    phone = GOOGLE.prepare("phone", "   +1-800-555-0100")
    given = GOOGLE.prepare("first_name", "  GivenName  ")
    family = GOOGLE.prepare("last_name", "  FamilyName ")
    assert email == "509e933019bb285a134a9334b8bb679dff79d0ce023d529af4bd744d47b4fd8a"
    assert phone == "fb4f73a6ec5fdb7077d564cdd22c3554b43ce49168550c3b12c547b78c517b30"
    assert given == "128a07bfe2df877c52076e60d7774cf5baaa046c5a6c48daf30ff43ecca2f814"
    assert family == "77762c287e61ce065bee5c15464012c6fbe088398b8057627d5577249430d574"
    b64 = {
        k: base64.b64encode(bytes.fromhex(v)).decode() for k, v in {"e": email, "p": phone}.items()
    }
    assert b64 == {
        "e": "UJ6TMBm7KFoTSpM0uLtnnf950M4CPVKa9L10TUe0/Yo=",
        "p": "+09zpuxf23B31WTN0iw1VLQ85JFoVQw7EsVHt4xRezA=",
    }


def test_an_address_goes_only_with_name_country_and_postcode() -> None:
    assert identifiers_of(MARY) == MARY_IDS
    partial = {k: v for k, v in MARY.items() if k not in ("email", "phone", "postcode")}
    assert identifiers_of(partial) == []


def test_check_refuses_unknown_fields_and_rows_with_nothing_to_match_on() -> None:
    dest = make(router=mocked())
    try:
        assert dest.check(target(), "add", {"email": "a@b.co", "clv": 1}) == (
            "unknown field clv (a Google audience member has country, email, first_name, "
            "last_name, phone, postcode)"
        )
        assert dest.check(target(), "add", {"email": "not an address", "country": "DE"}) == (
            "no email, phone, or name with country and postcode to match on"
        )
        assert dest.check(target(), "add", {"phone": "+4930901820"}) is None
    finally:
        asyncio.run(dest.aclose())


# --- Data Manager requests, exactly ------------------------------------------------------


def test_ingest_sends_hashed_members_consent_terms_and_encoding() -> None:
    router = mocked()
    route = router.post(f"{API}/v1/audienceMembers:ingest").respond(200, json={"requestId": "r1"})
    dest = make(router=router, login_account_id="111-222-3333")
    dest.match_report = MatchReport()
    items = [Item("1", MARY), Item("2", {"email": "b@example.com"})]
    outcomes = run(dest, lambda: dest.send(target(), "add", items))
    (request,) = route.calls
    assert request.request.headers["Authorization"] == "Bearer ya29.a"
    assert body(request.request) == {
        "destinations": [
            {
                "operatingAccount": {"accountType": "GOOGLE_ADS", "accountId": "1234567890"},
                "productDestinationId": LIST,
                "loginAccount": {"accountType": "GOOGLE_ADS", "accountId": "1112223333"},
            }
        ],
        "audienceMembers": [
            {"userData": {"userIdentifiers": MARY_IDS}},
            {"userData": {"userIdentifiers": [{"emailAddress": sha("b@example.com")}]}},
        ],
        "encoding": "HEX",
        "termsOfService": {"customerMatchTermsOfServiceStatus": "ACCEPTED"},
        "consent": {"adUserData": "CONSENT_GRANTED", "adPersonalization": "CONSENT_GRANTED"},
    }
    # The dest_id is what was added, to remove exactly that later.
    assert [orjson.loads(o.dest_id) for o in outcomes] == [
        MARY_IDS,
        [{"emailAddress": sha("b@example.com")}],
    ]
    assert dest.match_report.as_json() == {
        "received": 2,
        "invalid": 0,
        "carrying": {"email": 2, "phone": 1, "name_postcode": 1},
    }


def test_base64_encoding_and_a_sync_without_consent_sends_no_consent_fields() -> None:
    router = mocked()
    route = router.post(f"{API}/v1/audienceMembers:ingest").respond(200, json={"requestId": "r"})
    dest = make(router=router, encoding="BASE64")
    run(dest, lambda: dest.send(target("none"), "add", [Item("1", {"email": "alexz@example.com"})]))
    sent = body(route.calls[0].request)
    assert "consent" not in sent and sent["encoding"] == "BASE64"
    assert sent["audienceMembers"] == [
        {
            "userData": {
                "userIdentifiers": [
                    {"emailAddress": "UJ6TMBm7KFoTSpM0uLtnnf950M4CPVKa9L10TUe0/Yo="}
                ]
            }
        }
    ]


def test_remove_names_what_was_added_and_carries_no_consent_or_terms() -> None:
    router = mocked()
    route = router.post(f"{API}/v1/audienceMembers:remove").respond(200, json={"requestId": "r"})
    dest = make(router=router)
    added = orjson.dumps(MARY_IDS).decode()
    items = [Item("1", {}, added), Item("2", {}, None)]
    outcomes = run(dest, lambda: dest.send(target(), "remove", items))
    assert outcomes == [
        Outcome.accepted(added),
        Outcome.rejected("no identifiers recorded for this member"),
    ]
    assert body(route.calls[0].request) == {
        "destinations": [
            {
                "operatingAccount": {"accountType": "GOOGLE_ADS", "accountId": "1234567890"},
                "productDestinationId": LIST,
            }
        ],
        "audienceMembers": [{"userData": {"userIdentifiers": MARY_IDS}}],
        "encoding": "HEX",
    }


def test_validate_only_for_dry_run_changes_nothing(sandbox: DestinationSandbox) -> None:
    ConsentLedger.grant("ads", MARY["email"])
    dest = on_sandbox(sandbox)
    dest.validate_only = True
    dest.match_report = MatchReport()
    outcomes = run(dest, lambda: dest.send(target(), "add", [Item("1", MARY)]))
    assert outcomes[0].ok
    (request,) = [r for r in google_of(sandbox).requests if r.path.startswith("/v1/")]
    assert request.body["validateOnly"] is True
    assert google_of(sandbox).members(LIST) == []
    assert dest.match_report == MatchReport()


def test_members_google_names_are_refused_and_the_rest_sent_again() -> None:
    router = mocked()
    refusal = {
        "error": {
            "code": 400,
            "message": "Request contains an invalid argument.",
            "status": "INVALID_ARGUMENT",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.BadRequest",
                    "fieldViolations": [
                        {
                            "field": "audience_members[1].user_data.user_identifiers[0]",
                            "description": "The SHA256 encoded value is malformed.",
                            "reason": "INVALID_SHA256_FORMAT",
                        },
                        {
                            "field": "audienceMembers[3].userData",
                            "reason": "INVALID_AUDIENCE_MEMBER",
                        },
                    ],
                }
            ],
        }
    }
    route = router.post(f"{API}/v1/audienceMembers:ingest").mock(
        side_effect=[
            httpx.Response(400, json=refusal),
            httpx.Response(200, json={"requestId": "r"}),
        ]
    )
    dest = make(router=router)
    dest.match_report = MatchReport()
    items = [Item(str(n), {"email": f"p{n}@example.com"}) for n in range(5)]
    outcomes = run(dest, lambda: dest.send(target(), "add", items))
    assert [o.ok for o in outcomes] == [True, False, True, False, True]
    assert outcomes[1].error == "INVALID_SHA256_FORMAT: The SHA256 encoded value is malformed."
    assert outcomes[3].error == "INVALID_AUDIENCE_MEMBER"
    again = body(route.calls[1].request)["audienceMembers"]
    assert [m["userData"]["userIdentifiers"][0]["emailAddress"] for m in again] == [
        sha(f"p{n}@example.com") for n in (0, 2, 4)
    ]
    assert (dest.match_report.received, dest.match_report.invalid) == (5, 2)


def test_a_refusal_naming_no_member_fails_the_run_after_one_request(
    sandbox: DestinationSandbox,
) -> None:
    ConsentLedger.grant("ads", MARY["email"])
    dest = on_sandbox(sandbox)
    other = SyncTarget("g", "mirror", "404404", GoogleOptions.model_construct(), consent="ads")
    with pytest.raises(ApiError, match="INVALID_USER_LIST_ID"):
        run(dest, lambda: dest.send(other, "add", [Item("1", MARY)]))
    assert len([r for r in google_of(sandbox).requests if r.path.startswith("/v1/")]) == 1


def test_a_refused_refresh_token_fails_the_run_with_no_api_request(
    sandbox: DestinationSandbox,
) -> None:
    google_of(sandbox).refresh_token = "1//revoked"
    dest = on_sandbox(sandbox)
    with pytest.raises(AuthError, match="authorize syncd again"):
        run(dest, lambda: dest.send(target(), "add", [Item("1", MARY)]))
    assert [r.path for r in google_of(sandbox).requests] == ["/token"]


def test_oauth_refreshes_once_when_the_token_expires(
    sandbox: DestinationSandbox, fake: FakeTime
) -> None:
    google = google_of(sandbox)
    dest = on_sandbox(sandbox)
    items = [[Item(str(n), {"email": f"p{n}@example.com"})] for n in range(6)]
    ConsentLedger.grant("ads", *(f"p{n}@example.com" for n in range(6)))

    async def scenario() -> None:
        await dest.send(target(), "add", items[0])
        google.expire_tokens()
        # Concurrent batches all meet the expired token: one refresh serves them all.
        await asyncio.gather(*(dest.send(target(), "add", batch) for batch in items[1:]))

    run(dest, scenario)
    assert google.token_requests == 2
    assert len(google.hashed_emails(LIST)) == 6
    statuses = [r.status for r in google.requests if r.path.startswith("/v1/")]
    assert statuses.count(200) == 6 and set(statuses) <= {200, 401}


# --- the Google Ads API job flow -----------------------------------------------------------


def test_ads_job_flow_creates_adds_runs_and_polls(
    sandbox: DestinationSandbox, fake: FakeTime
) -> None:
    google = google_of(sandbox)
    google.job_polls = 2
    ConsentLedger.grant("ads", MARY["email"], "b@example.com")
    dest = on_sandbox(sandbox, api="google_ads")
    dest.match_report = MatchReport()
    added = run(
        dest,
        lambda: dest.send(
            target(), "add", [Item("1", MARY), Item("2", {"email": "b@example.com"})]
        ),
    )
    assert all(o.ok for o in added)
    assert google.hashed_emails(LIST) == {sha("marymajor@gmail.com"), sha("b@example.com")}
    paths = [r.path for r in google.requests if r.path != "/token"]
    assert paths == [
        "/v22/customers/1234567890/offlineUserDataJobs:create",
        "/v22/customers/1234567890/offlineUserDataJobs/1:addOperations",
        "/v22/customers/1234567890/offlineUserDataJobs/1:run",
        *["/v22/customers/1234567890/googleAds:search"] * 3,
    ]
    create, operations = (r.body for r in google.requests[1:3])
    assert create["job"]["customerMatchUserListMetadata"] == {
        "userList": f"customers/1234567890/userLists/{LIST}",
        "consent": {"adUserData": "GRANTED", "adPersonalization": "GRANTED"},
    }
    assert operations["enablePartialFailure"] is True
    assert operations["operations"][0] == {
        "create": {
            "userIdentifiers": [
                {"hashedEmail": sha("marymajor@gmail.com")},
                {"hashedPhoneNumber": sha("+4930901820")},
                {
                    "addressInfo": {
                        "hashedFirstName": sha("mary"),
                        "hashedLastName": sha("major"),
                        "countryCode": "DE",
                        "postalCode": "10115",
                    }
                },
            ]
        }
    }
    assert dest.match_report.received == 2

    dest = on_sandbox(sandbox, api="google_ads")
    removed = run(dest, lambda: dest.send(target(), "remove", [Item("2", {}, added[1].dest_id)]))
    assert removed[0].ok and google.hashed_emails(LIST) == {sha("marymajor@gmail.com")}


def test_ads_partial_failures_refuse_their_rows_only() -> None:
    router = mocked()
    job = "customers/1234567890/offlineUserDataJobs/7"
    router.post(f"{ADS}/v22/customers/1234567890/offlineUserDataJobs:create").respond(
        200, json={"resourceName": job}
    )
    router.post(f"{ADS}/v22/{job}:addOperations").respond(
        200,
        json={
            "partialFailureError": {
                "code": 3,
                "message": "1 operation failed",
                "details": [
                    {
                        "errors": [
                            {
                                "message": "The SHA256 hash is not valid.",
                                "location": {
                                    "fieldPathElements": [
                                        {"fieldName": "operations", "index": 1},
                                        {"fieldName": "create"},
                                    ]
                                },
                            }
                        ]
                    }
                ],
            }
        },
    )
    router.post(f"{ADS}/v22/{job}:run").respond(200, json={"name": "op"})
    search = router.post(f"{ADS}/v22/customers/1234567890/googleAds:search").respond(
        200, json={"results": [{"offlineUserDataJob": {"resourceName": job, "status": "SUCCESS"}}]}
    )
    dest = make(router=router, api="google_ads", developer_token="dev-token")
    items = [Item(str(n), {"email": f"p{n}@example.com"}) for n in range(3)]
    outcomes = run(dest, lambda: dest.send(target(), "add", items))
    assert [o.ok for o in outcomes] == [True, False, True]
    assert outcomes[1].error == "The SHA256 hash is not valid."
    assert search.calls[0].request.headers["developer-token"] == "dev-token"


def test_ads_account_not_allowlisted_fails_the_run(sandbox: DestinationSandbox) -> None:
    google_of(sandbox).allowlisted = False
    dest = on_sandbox(sandbox, api="google_ads")
    with pytest.raises(AuthError, match="CUSTOMER_NOT_ALLOWLISTED_FOR_THIS_FEATURE"):
        run(dest, lambda: dest.send(target(), "add", [Item("1", MARY)]))


# --- erasure -----------------------------------------------------------------------------


def test_forget_removes_the_person_by_recorded_and_current_identifiers(
    sandbox: DestinationSandbox,
) -> None:
    google = google_of(sandbox)
    ConsentLedger.grant("ads", MARY["email"], "b@example.com")
    dest = on_sandbox(sandbox)
    added = run(
        dest,
        lambda: dest.send(
            target(), "add", [Item("1", MARY), Item("2", {"email": "b@example.com"})]
        ),
    )
    person = Person(
        request=7,
        email="new-address@example.com",
        phone=None,
        dest_ids={"g-vip": added[0].dest_id or ""},
        record_keys={"g-vip": "1"},
    )
    dest = on_sandbox(sandbox)
    receipt = run(dest, lambda: dest.forget(person, [target()], ["email"]))
    assert receipt.status == "done" and LIST in receipt.detail
    assert google.hashed_emails(LIST) == {sha("b@example.com")}
    removal = [r.body for r in google.requests if r.path == "/v1/audienceMembers:remove"][-1]
    assert removal["audienceMembers"][0]["userData"]["userIdentifiers"] == [
        *MARY_IDS,
        {"emailAddress": sha("new-address@example.com")},
    ]
    nobody = Person(request=8, email=None, phone=None, dest_ids={}, record_keys={})
    dest = on_sandbox(sandbox)
    assert run(dest, lambda: dest.forget(nobody, [target()], [])).status == "not_applicable"


# --- end to end through the push engine, on both stores ------------------------------------


def add_people(engine: Engine, ids: Sequence[int], *, consent: bool = True) -> None:
    ConsentLedger.grant("ads", *(f"person{c}@example.com" for c in ids if consent))
    with engine.begin() as conn:
        conn.execute(
            insert(CUSTOMERS),
            [
                {
                    "id": c,
                    "email": f"person{c}@example.com",
                    "phone": f"+4930{900000 + c}",
                    "country": "DE",
                    "postcode": f"{10000 + c}",
                }
                for c in ids
            ],
        )
        conn.execute(
            insert(PROFILES),
            [
                {
                    "customer_id": c,
                    "email": f"person{c}@example.com",
                    "first_name": f"Frída{c}",
                    "last_name": "O'Brien",
                    "country": "DE",
                    "orders_count": 1,
                    "net_revenue_minor": 100,
                    "currency": "EUR",
                    "lifecycle_stage": "active",
                    "consent_ads": consent,
                    "consent_ads_at": T0,
                    "consent_ads_source": "test:granted",
                }
                for c in ids
            ],
        )
        conn.execute(
            insert(MEMBERSHIPS),
            [{"segment": "vip", "customer_id": c, "entered_at": T0} for c in ids],
        )


def leave(engine: Engine, ids: Sequence[int]) -> None:
    with engine.begin() as conn:
        conn.execute(
            update(MEMBERSHIPS)
            .where(MEMBERSHIPS.c.customer_id.in_(ids), MEMBERSHIPS.c.exited_at.is_(None))
            .values(exited_at=T0 + timedelta(days=1))
        )


def enter(engine: Engine, ids: Sequence[int], day: int) -> None:
    with engine.begin() as conn:
        conn.execute(
            insert(MEMBERSHIPS),
            [
                {"segment": "vip", "customer_id": c, "entered_at": T0 + timedelta(days=day)}
                for c in ids
            ],
        )


def settings_for(
    tmp_path: Path, sandbox: DestinationSandbox, api: str = "data_manager"
) -> Settings:
    url = sandbox.vendor_url("google")
    token = (
        f'developer_token = "{google_of(sandbox).developer_token}"' if api == "google_ads" else ""
    )
    path = tmp_path / "google.toml"
    path.write_text(
        f"""
destination = "google"
base_url = "{url}"
allow_loopback = true
[credentials]
client_id = "{CREDENTIALS["client_id"].get_secret_value()}"
client_secret = "{CREDENTIALS["client_secret"].get_secret_value()}"
refresh_token = "{CREDENTIALS["refresh_token"].get_secret_value()}"
[options]
api = "{api}"
operating_account_id = "123-456-7890"
token_url = "{url}/token"
{token}

[[sync]]
name = "g-vip"
segment = "vip"
mode = "mirror"
object = "{LIST}"
batch_size = 40
[sync.fields]
email = "email"
phone = "phone"
first_name = "first_name"
last_name = "last_name"
country = "country"
postcode = "postcode"
"""
    )
    return Settings.model_validate(
        {
            "segments": {"vip": {"rule": "orders_count >= 1"}},
            "destinations": {"mappings": [str(path)]},
        }
    )


def members_now(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        rows = conn.execute(
            MEMBERSHIPS.select().where(MEMBERSHIPS.c.exited_at.is_(None))
        ).mappings()
        return {sha(f"person{r['customer_id']}@example.com") for r in rows}


def assert_no_plaintext(sandbox: DestinationSandbox, engine: Engine) -> None:
    """No email, phone, first or last name of anyone in the store in any Google request."""
    with engine.connect() as conn:
        people = list(conn.execute(CUSTOMERS.select()).mappings())
        profiles = list(conn.execute(PROFILES.select()).mappings())
    plain = {p["email"] for p in people} | {p["phone"] for p in people}
    plain |= {p["phone"].lstrip("+") for p in people}
    plain |= {n for p in profiles for n in (p["first_name"], p["last_name"])}
    plain |= {n.lower() for n in plain}
    for request in google_of(sandbox).requests:
        text = orjson.dumps(request.body).decode() if request.body is not None else ""
        assert not [p for p in plain if p and p in text], request.path


@pytest.mark.parametrize("api", ["data_manager", "google_ads"])
def test_mirror_follows_the_segment_across_three_recomputes(
    engine: Engine, sandbox: DestinationSandbox, tmp_path: Path, fake: FakeTime, api: str
) -> None:
    google = google_of(sandbox)
    google.job_polls = 0
    add_people(engine, range(1, 61))
    add_people(engine, [61, 62], consent=False)  # in the segment, no ads consent: never sent
    mappings = load_mappings(settings_for(tmp_path, sandbox, api))
    for mapping in mappings:
        mapping.adapter.poll_interval = 0.0  # type: ignore[misc]

    def push_once() -> Any:
        (result,) = asyncio.run(push(engine, select_syncs(mappings, None)))
        return result

    def consenting() -> set[str]:
        return members_now(engine) - {sha("person61@example.com"), sha("person62@example.com")}

    first = push_once()
    assert first.counts.added == 60
    assert google.hashed_emails(LIST) == consenting()
    leave(engine, range(1, 11))
    second = push_once()
    assert second.counts.removed == 10
    assert google.hashed_emails(LIST) == consenting()
    enter(engine, [3, 4], day=2)
    leave(engine, [50])
    third = push_once()
    assert (third.counts.added, third.counts.removed) == (2, 1)
    assert google.hashed_emails(LIST) == consenting() and len(consenting()) == 51
    assert_no_plaintext(sandbox, engine)


def test_resource_exhausted_at_intervals_delivers_every_row_once_and_logs_the_back_off(
    engine: Engine, sandbox: DestinationSandbox, tmp_path: Path, fake: FakeTime
) -> None:
    google = google_of(sandbox)
    google.exhaust_every = 3
    add_people(engine, range(1, 201))
    mappings = load_mappings(settings_for(tmp_path, sandbox))
    with structlog.testing.capture_logs() as logs:
        (result,) = asyncio.run(push(engine, select_syncs(mappings, None)))
    assert result.counts.added == 200 and result.counts.failed == 0
    assert google.exhausted >= 2
    ingests = [
        r for r in google.requests if r.path == "/v1/audienceMembers:ingest" and r.status == 200
    ]
    sent = [
        m["userData"]["userIdentifiers"][0]["emailAddress"]
        for r in ingests
        for m in r.body["audienceMembers"]
    ]
    assert len(sent) == 200 and set(sent) == members_now(engine)  # each row once
    retries = [e for e in logs if e["event"] == "http.retry" and e.get("status") == 429]
    assert len(retries) == google.exhausted
    assert {e["service"] for e in retries} == {"google:google"}
    assert all(e["wait"] >= 0 and e["url"].endswith("audienceMembers:ingest") for e in retries)
    assert_no_plaintext(sandbox, engine)


def test_a_withdrawn_ads_consent_and_an_exit_take_people_out(
    engine: Engine, sandbox: DestinationSandbox, tmp_path: Path, fake: FakeTime
) -> None:
    """A removed consent is an exit: the person leaves the audience on the next run."""
    add_people(engine, range(1, 6))
    mappings = load_mappings(settings_for(tmp_path, sandbox))
    asyncio.run(push(engine, select_syncs(mappings, None)))
    with engine.begin() as conn:
        conn.execute(update(PROFILES).where(PROFILES.c.customer_id == 2).values(consent_ads=False))
        conn.execute(delete(MEMBERSHIPS).where(MEMBERSHIPS.c.customer_id == 5))
    ConsentLedger.withdraw("ads", "person2@example.com")
    asyncio.run(push(engine, select_syncs(mappings, None)))
    assert google_of(sandbox).hashed_emails(LIST) == {
        sha(f"person{c}@example.com") for c in (1, 3, 4)
    }


# --- the session's audit sees Google requests -----------------------------------------------


def journal(body: Any, path: str = "/v1/audienceMembers:ingest") -> list[tuple[str, DestRequest]]:
    record = DestRequest("google", "POST", path, {}, 200, None, 0, body, 0.0, "ads", "syncd/1")
    return [("t", record)]


def test_the_audit_finds_plaintext_and_unhashed_identifiers_in_google_requests() -> None:
    hashed = {"audienceMembers": [{"userData": {"userIdentifiers": MARY_IDS}}]}
    assert plaintext_leaks(journal(hashed)) == []
    where = "t: google POST /v1/audienceMembers:ingest"
    clear = {"audienceMembers": [{"userData": {"userIdentifiers": [{"emailAddress": "a@b.co"}]}}]}
    assert plaintext_leaks(journal(clear)) == [
        f"{where} carries 'a@b.co' in plaintext",
        f"{where} carries emailAddress 'a@b.co' unhashed",
    ]
    name = {"addressInfo": {"hashedFirstName": "mary", "hashedLastName": sha("major")}}
    ops = journal({"operations": [{"create": name}]}, "/x:addOperations")
    assert plaintext_leaks(ops) == [
        "t: google POST /x:addOperations carries hashedFirstName 'mary' unhashed"
    ]
    assert plaintext_leaks(journal({"phoneNumber": "+4930901820"})) == [
        f"{where} carries '+4930901820' in plaintext",
        f"{where} carries phoneNumber '+4930901820' unhashed",
    ]


def test_the_audit_wants_ads_consent_for_googles_form_of_an_address() -> None:
    # Google hashes gmail addresses without dots and +tag: the audit still knows them.
    body = {"audienceMembers": [{"userData": {"userIdentifiers": MARY_IDS}}]}
    address = MARY["email"].strip().lower()
    assert violations(journal(body), [_Said("t", 0, "ads", address, True)]) == []
    assert violations(journal(body), [_Said("t", 0, "ads", address, False)]) == [
        f"t: google POST /v1/audienceMembers:ingest names {address}, who has no ads consent"
    ]
    encoded = {
        "audienceMembers": [
            {
                "userData": {
                    "userIdentifiers": [
                        {
                            "emailAddress": base64.b64encode(
                                bytes.fromhex(sha("marymajor@gmail.com"))
                            ).decode()
                        }
                    ]
                }
            }
        ]
    }
    assert len(violations(journal(encoded), [_Said("t", 0, "ads", address, False)])) == 1
    # Removals name people on the way out: exempt, in both APIs.
    assert (
        violations(
            journal(body, "/v1/audienceMembers:remove"), [_Said("t", 0, "ads", address, False)]
        )
        == []
    )
    removal = {
        "operations": [
            {"remove": {"userIdentifiers": [{"hashedEmail": sha("marymajor@gmail.com")}]}}
        ]
    }
    assert (
        violations(journal(removal, "/v22/x:addOperations"), [_Said("t", 0, "ads", address, False)])
        == []
    )


# --- the shipped example ---------------------------------------------------------------------


def test_the_shipped_example_mapping_loads_and_a_missing_developer_token_is_named(
    tmp_path: Path,
) -> None:
    from syncd.mapping import ConfigError, load_mapping

    env = {"GOOGLE_CLIENT_ID": "c", "GOOGLE_CLIENT_SECRET": "s", "GOOGLE_REFRESH_TOKEN": "r"}
    settings = Settings.model_validate({"segments": {"lapsed_vip": {"rule": "orders_count >= 1"}}})
    example = Path(__file__).parent.parent / "mappings" / "google.toml"
    mapping = load_mapping(example, settings, env)
    assert mapping.spec.destination == "google" and mapping.adapter is GoogleDestination
    (sync,) = mapping.syncs
    assert sync.consent == "ads" and sync.spec.mode == "mirror"
    assert all(ref.startswith("env:") for ref in mapping.spec.credentials.values())

    ads = tmp_path / "ads.toml"
    ads.write_text(example.read_text().replace('# api = "data_manager"', 'api = "google_ads"'))
    with pytest.raises(ConfigError, match="developer_token"):
        load_mapping(ads, settings, env)


# --- phones in E.164 are read without the free-text parser ---------------------------------


def _parsed(text: str) -> str | None:
    """What libphonenumber's parser makes of ``text``: the reference the fast path meets."""
    try:
        number = phonenumbers.parse(text, None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _examples() -> list[str]:
    found = []
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        for kind in (phonenumbers.PhoneNumberType.FIXED_LINE, phonenumbers.PhoneNumberType.MOBILE):
            number = phonenumbers.example_number_for_type(region, kind)
            if number is not None:
                text = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
                # As stored; one digit short; with a trunk "0" after the country code.
                found += [text, text[:-1], text[:3] + "0" + text[3:]]
    return found


def test_the_e164_fast_path_agrees_with_libphonenumber_for_every_region() -> None:
    normalize = normalize_phone.__wrapped__
    examples = _examples()
    assert len(examples) > 1000
    assert [normalize(t, None) for t in examples] == [_parsed(t) for t in examples]
    assert normalize("+390612345678", None) == "+390612345678"  # Italy keeps its 0


@settings(max_examples=300, deadline=None)
@given(st.from_regex(r"\+[1-9][0-9]{5,14}", fullmatch=True))
def test_the_e164_fast_path_agrees_with_libphonenumber_on_any_digits(text: str) -> None:
    assert normalize_phone.__wrapped__(text, None) == _parsed(text)
