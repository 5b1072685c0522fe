"""The destination sandboxes (Klaviyo, Mailchimp, webhooks) over real HTTP on 127.0.0.1."""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from syncd.sandbox.destinations import DestinationSandbox
from syncd.sandbox.server import FaultConfig

KLAVIYO_KEY = "pk_test"
MAILCHIMP_KEY = "0123456789abcdef0123456789abcdef-us1"
Json = dict[str, Any]


@pytest.fixture
def sandbox() -> Iterator[DestinationSandbox]:
    with DestinationSandbox(klaviyo_key=KLAVIYO_KEY, mailchimp_key=MAILCHIMP_KEY) as running:
        yield running


def test_every_vendor_module_is_served_under_its_prefix(sandbox: DestinationSandbox) -> None:
    # A new destination's sandbox is one module of syncd/sandbox/destinations/: it is found
    # and served without a line elsewhere.
    names = {vendor.name: vendor.prefix for vendor in sandbox.vendors()}
    assert names == {
        "google": "/google",
        "klaviyo": "/klaviyo",
        "mailchimp": "/mailchimp/3.0",
        "meta": "/meta",
        "webhook": "/webhook",
    }
    for vendor in sandbox.vendors():
        answer = httpx.get(sandbox.vendor_url(vendor.name) + "/nothing-here", timeout=10)
        assert answer.status_code != 200
        assert [r.path for r in vendor.requests] == ["/nothing-here"]
    assert httpx.get(sandbox.url + "/elsewhere", timeout=10).status_code == 404
    assert sandbox.klaviyo_url == sandbox.url + "/klaviyo"
    with pytest.raises(TypeError, match="MailchimpSandbox"):
        sandbox.vendor("mailchimp", type(sandbox.klaviyo))


# ================================================================================== Klaviyo

KLAVIYO_HEADERS = {
    "Authorization": f"Klaviyo-API-Key {KLAVIYO_KEY}",
    "revision": "2026-07-15",
    "Content-Type": "application/vnd.api+json",
    "Accept": "application/vnd.api+json",
}


@pytest.fixture
def klaviyo(sandbox: DestinationSandbox) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sandbox.klaviyo_url, headers=KLAVIYO_HEADERS, timeout=10) as client:
        yield client


def _import_body(profiles: list[Json], list_id: str | None = None) -> Json:
    data: Json = {
        "type": "profile-bulk-import-job",
        "attributes": {
            "profiles": {"data": [{"type": "profile", "attributes": p} for p in profiles]}
        },
    }
    if list_id is not None:
        data["relationships"] = {"lists": {"data": [{"type": "list", "id": list_id}]}}
    return {"data": data}


def _event_body(email: str, unique_id: str | None, metric: str = "Segment Entered") -> Json:
    attributes: Json = {
        "properties": {"segment": "vip"},
        "metric": {"data": {"type": "metric", "attributes": {"name": metric}}},
        "profile": {"data": {"type": "profile", "attributes": {"email": email}}},
    }
    if unique_id is not None:
        attributes["unique_id"] = unique_id
    return {"data": {"type": "event", "attributes": attributes}}


def _error(response: httpx.Response) -> Json:
    errors = response.json()["errors"]
    assert len(errors) == 1
    error: Json = errors[0]
    return error


def test_klaviyo_authentication_and_revision(
    sandbox: DestinationSandbox, klaviyo: httpx.Client
) -> None:
    body = _event_body("a@example.com", "u1")
    missing = klaviyo.post("/api/events", json=body, headers={"Authorization": ""})
    assert missing.status_code == 401
    assert _error(missing)["code"] == "not_authenticated"
    wrong = klaviyo.post(
        "/api/events", json=body, headers={"Authorization": "Klaviyo-API-Key pk_wrong"}
    )
    assert wrong.status_code == 401
    assert _error(wrong)["code"] == "authentication_failed"

    no_revision = httpx.post(
        f"{sandbox.klaviyo_url}/api/events",
        json=body,
        headers={"Authorization": f"Klaviyo-API-Key {KLAVIYO_KEY}"},
    )
    assert no_revision.status_code == 400
    assert _error(no_revision)["source"] == {"parameter": "revision"}
    for bad in ("2026-13-40", "latest", "2026-07-15.x y"):
        response = klaviyo.post("/api/events", json=body, headers={"revision": bad})
        assert response.status_code == 400, bad
    assert klaviyo.post("/api/events", json=body, headers={"revision": "2026-07-15.pre"}).is_success

    wrong_type = klaviyo.post(
        "/api/events", content=orjson.dumps(body), headers={"Content-Type": "text/plain"}
    )
    assert wrong_type.status_code == 415
    assert not sandbox.klaviyo.events[1:]  # only the one good request recorded an event


def test_klaviyo_bulk_import_job_lifecycle(
    sandbox: DestinationSandbox, klaviyo: httpx.Client
) -> None:
    list_id = sandbox.klaviyo.add_list("Y6nRLr")
    sandbox.klaviyo.processing_polls = 2
    profiles = [
        {"email": "ada@example.com", "first_name": "Ada", "properties": {"clv": 10}},
        {"email": "not-an-email"},
        {"email": "bob@example.com", "phone_number": "+14155550123"},
        {"email": "cy@example.com", "phone_number": "415-555-0123"},
        {"external_id": "ext-9"},
    ]
    created = klaviyo.post("/api/profile-bulk-import-jobs", json=_import_body(profiles, list_id))
    assert created.status_code == 202
    assert created.headers["content-type"] == "application/vnd.api+json"
    job = created.json()["data"]
    assert job["type"] == "profile-bulk-import-job"
    assert len(job["id"]) == 26
    assert job["attributes"]["status"] == "queued"
    assert job["attributes"]["total_count"] == 5

    statuses = []
    for _ in range(3):
        polled = klaviyo.get(f"/api/profile-bulk-import-jobs/{job['id']}").json()["data"]
        statuses.append(polled["attributes"]["status"])
    assert statuses == ["processing", "processing", "complete"]
    attributes = polled["attributes"]
    assert (attributes["completed_count"], attributes["failed_count"]) == (3, 2)

    # Import errors page one at a time through links.next.
    errors, url = [], f"/api/profile-bulk-import-jobs/{job['id']}/import-errors?page[size]=1"
    while url:
        page = klaviyo.get(url).json()
        assert len(page["data"]) <= 1
        errors.extend(page["data"])
        url = page["links"].get("next")
    assert [e["attributes"]["source"]["pointer"] for e in errors] == [
        "/data/attributes/profiles/data/1/attributes/email",
        "/data/attributes/profiles/data/3/attributes/phone_number",
    ]
    assert errors[0]["type"] == "import-error"
    assert errors[0]["attributes"]["original_payload"]["attributes"]["email"] == "not-an-email"
    assert {"code", "title", "detail"} <= set(errors[1]["attributes"])

    page = klaviyo.get(f"/api/profile-bulk-import-jobs/{job['id']}/profiles?page[size]=2").json()
    assert len(page["data"]) == 2 and "next" in page["links"]
    rest = klaviyo.get(page["links"]["next"]).json()
    assert "next" not in rest["links"]
    returned = {p["id"]: p["attributes"]["email"] for p in page["data"] + rest["data"]}
    assert sorted(e for e in returned.values() if e) == ["ada@example.com", "bob@example.com"]
    assert sandbox.klaviyo.profile_by_email("ADA@example.com") == {
        "id": next(i for i, e in returned.items() if e == "ada@example.com"),
        "email": "ada@example.com",
        "first_name": "Ada",
        "properties": {"clv": 10},
    }
    assert sandbox.klaviyo.list_members[list_id] == set(returned)
    assert (
        klaviyo.get(
            f"/api/profile-bulk-import-jobs/{job['id']}/profiles?page[size]=101"
        ).status_code
        == 400
    )
    assert klaviyo.get("/api/profile-bulk-import-jobs/01NOPE0000000000000000000").status_code == 404


def test_klaviyo_bulk_import_merges_by_email(
    sandbox: DestinationSandbox, klaviyo: httpx.Client
) -> None:
    first = [{"email": "Ada@Example.com", "first_name": "Ada", "properties": {"a": 1, "b": 2}}]
    second = [{"email": "ada@example.com", "first_name": None, "properties": {"b": 3}}]
    for profiles in (first, second):
        assert klaviyo.post("/api/profile-bulk-import-jobs", json=_import_body(profiles)).is_success
    assert len(sandbox.klaviyo.profiles) == 1
    profile = sandbox.klaviyo.profile_by_email("ada@example.com")
    assert profile is not None
    assert "first_name" not in profile  # null clears
    assert profile["properties"] == {"a": 1, "b": 3}


def test_klaviyo_bulk_import_request_limits(
    sandbox: DestinationSandbox, klaviyo: httpx.Client
) -> None:
    too_many = _import_body([{"email": f"p{n}@example.com"} for n in range(10_001)])
    response = klaviyo.post("/api/profile-bulk-import-jobs", json=too_many)
    assert response.status_code == 400
    assert _error(response)["source"]["pointer"] == "/data/attributes/profiles/data"

    big = "x" * 60_000
    huge = _import_body([{"email": f"p{n}@example.com", "title": big} for n in range(90)])
    response = klaviyo.post("/api/profile-bulk-import-jobs", json=huge)
    assert response.status_code == 413

    no_identifier = _import_body([{"email": "ok@example.com"}, {"first_name": "Nobody"}])
    response = klaviyo.post("/api/profile-bulk-import-jobs", json=no_identifier)
    assert response.status_code == 400
    assert _error(response)["source"]["pointer"] == "/data/attributes/profiles/data/1/attributes"

    unknown_list = klaviyo.post(
        "/api/profile-bulk-import-jobs", json=_import_body([{"email": "a@example.com"}], "NOPE")
    )
    assert unknown_list.status_code == 400
    wrong_type = {"data": {"type": "profile", "attributes": {}}}
    assert klaviyo.post("/api/profile-bulk-import-jobs", json=wrong_type).status_code == 400
    assert sandbox.klaviyo.profiles == {} and sandbox.klaviyo.jobs == {}


def test_klaviyo_list_relationships(sandbox: DestinationSandbox, klaviyo: httpx.Client) -> None:
    list_id = sandbox.klaviyo.add_list("Abc123")
    job = klaviyo.post(
        "/api/profile-bulk-import-jobs",
        json=_import_body([{"email": f"m{n}@example.com"} for n in range(3)]),
    ).json()["data"]
    ids = sorted(sandbox.klaviyo.jobs[job["id"]].profile_ids)
    refs = {"data": [{"type": "profile", "id": i} for i in ids]}
    path = f"/api/lists/{list_id}/relationships/profiles"

    added = klaviyo.post(path, json=refs)
    assert added.status_code == 204 and added.content == b""
    assert sandbox.klaviyo.list_members[list_id] == set(ids)
    removed = klaviyo.request("DELETE", path, json={"data": refs["data"][:1]})
    assert removed.status_code == 204
    assert sandbox.klaviyo.list_members[list_id] == set(ids[1:])

    assert klaviyo.post("/api/lists/NOPE/relationships/profiles", json=refs).status_code == 404
    too_many = {"data": [{"type": "profile", "id": ids[0]}] * 1001}
    assert klaviyo.post(path, json=too_many).status_code == 400
    unknown = {"data": [{"type": "profile", "id": "01XXXXXXXXXXXXXXXXXXXXXXXX"}]}
    assert klaviyo.post(path, json=unknown).status_code == 400
    assert klaviyo.get(path).status_code == 405


def test_klaviyo_events_deduplicate_by_unique_id(
    sandbox: DestinationSandbox, klaviyo: httpx.Client
) -> None:
    for unique_id in ("e1", "e2", "e1"):
        response = klaviyo.post("/api/events", json=_event_body("Ev@example.com", unique_id))
        assert response.status_code == 202 and response.content == b""
    # The same unique_id under another metric is another event.
    assert klaviyo.post("/api/events", json=_event_body("ev@example.com", "e1", "Other")).is_success
    state = sandbox.klaviyo
    assert [(e["metric"], e["unique_id"]) for e in state.events] == [
        ("Segment Entered", "e1"),
        ("Segment Entered", "e2"),
        ("Other", "e1"),
    ]
    assert state.duplicate_events == 1
    assert len(state.profiles) == 1  # the event created the profile once

    no_metric = _event_body("ev@example.com", "e9")
    del no_metric["data"]["attributes"]["metric"]["data"]["attributes"]["name"]
    assert klaviyo.post("/api/events", json=no_metric).status_code == 400
    no_properties = _event_body("ev@example.com", "e9")
    del no_properties["data"]["attributes"]["properties"]
    assert klaviyo.post("/api/events", json=no_properties).status_code == 400
    response = klaviyo.post("/api/events", json=_event_body("bad..dots@example.com", "e9"))
    assert response.status_code == 400
    assert _error(response)["source"]["pointer"].endswith("/attributes/email")
    assert len(state.events) == 3


def test_klaviyo_bulk_event_create_job(sandbox: DestinationSandbox, klaviyo: httpx.Client) -> None:
    def entry(email: str, unique_ids: list[str]) -> Json:
        return {
            "type": "event-bulk-create",
            "attributes": {
                "profile": {"data": {"type": "profile", "attributes": {"email": email}}},
                "events": {
                    "data": [
                        {
                            "type": "event",
                            "attributes": {
                                "properties": {},
                                "metric": {"data": {"type": "metric", "attributes": {"name": "M"}}},
                                "unique_id": u,
                            },
                        }
                        for u in unique_ids
                    ]
                },
            },
        }

    def body(entries: list[Json]) -> Json:
        return {
            "data": {
                "type": "event-bulk-create-job",
                "attributes": {"events-bulk-create": {"data": entries}},
            }
        }

    response = klaviyo.post(
        "/api/event-bulk-create-jobs",
        json=body([entry("a@example.com", ["1", "2", "1"]), entry("b@example.com", ["1"])]),
    )
    assert response.status_code == 202
    assert len(sandbox.klaviyo.events) == 3
    assert sandbox.klaviyo.duplicate_events == 1
    too_many = body([entry(f"p{n}@example.com", [str(n)]) for n in range(1001)])
    assert klaviyo.post("/api/event-bulk-create-jobs", json=too_many).status_code == 400
    assert len(sandbox.klaviyo.events) == 3


def test_klaviyo_privacy_deletion(sandbox: DestinationSandbox, klaviyo: httpx.Client) -> None:
    list_id = sandbox.klaviyo.add_list("Del001")
    klaviyo.post(
        "/api/profile-bulk-import-jobs",
        json=_import_body([{"email": "gone@example.com"}, {"email": "kept@example.com"}], list_id),
    )

    def body(attributes: Json) -> Json:
        profile = {"data": {"type": "profile", "attributes": attributes}}
        return {"data": {"type": "data-privacy-deletion-job", "attributes": {"profile": profile}}}

    both = body({"email": "gone@example.com", "phone_number": "+14155550123"})
    assert klaviyo.post("/api/data-privacy-deletion-jobs", json=both).status_code == 400
    response = klaviyo.post(
        "/api/data-privacy-deletion-jobs", json=body({"email": "gone@example.com"})
    )
    assert response.status_code == 202
    assert sandbox.klaviyo.profile_by_email("gone@example.com") is None
    assert sandbox.klaviyo.members_of(list_id) == {"kept@example.com"}
    assert sandbox.klaviyo.deletions[-1]["email"] == "gone@example.com"


def test_klaviyo_rate_limits(sandbox: DestinationSandbox, klaviyo: httpx.Client) -> None:
    sandbox.klaviyo.set_limit("create_event", burst=2, steady=1000)
    responses = [
        klaviyo.post("/api/events", json=_event_body("r@example.com", f"b{n}")) for n in range(5)
    ]
    throttled = [r for r in responses if r.status_code == 429]
    # Five requests span at most two one-second windows of two.
    assert 1 <= len(throttled) <= 3
    assert throttled[0].headers["Retry-After"] == "1"
    assert _error(throttled[0])["code"] == "throttled"
    assert "RateLimit-Remaining" not in throttled[0].headers
    ok = next(r for r in responses if r.status_code == 202)
    assert ok.headers["RateLimit-Limit"] == "1000"
    assert int(ok.headers["RateLimit-Reset"]) <= 60

    sandbox.klaviyo.set_limit("request_profile_deletion", burst=100, steady=2)
    body = {
        "data": {
            "type": "data-privacy-deletion-job",
            "attributes": {
                "profile": {"data": {"type": "profile", "attributes": {"email": "x@example.com"}}}
            },
        }
    }
    steady = [klaviyo.post("/api/data-privacy-deletion-jobs", json=body) for _ in range(3)]
    assert [r.status_code for r in steady[:2]] == [202, 202]
    assert steady[1].headers["RateLimit-Remaining"] == "0"
    assert steady[2].status_code == 429
    assert 1 <= int(steady[2].headers["Retry-After"]) <= 60
    throttled_log = [r for r in sandbox.klaviyo.requests if r.fault == "throttled"]
    assert len(throttled_log) == len(throttled) + 1

    sandbox.klaviyo.limits_enabled = False
    assert klaviyo.post("/api/data-privacy-deletion-jobs", json=body).status_code == 202


def test_klaviyo_faults_and_request_log(sandbox: DestinationSandbox, klaviyo: httpx.Client) -> None:
    body = _event_body("f@example.com", "f1")
    sandbox.klaviyo.faults = FaultConfig(rate_429=1, retry_after="7")
    response = klaviyo.post("/api/events", json=body)
    assert response.status_code == 429 and response.headers["Retry-After"] == "7"
    sandbox.klaviyo.faults = FaultConfig(rate_5xx=1, seed=3)
    assert klaviyo.post("/api/events", json=body).status_code in (500, 502, 503)
    sandbox.klaviyo.faults = FaultConfig(rate_drop=1)
    with pytest.raises(httpx.TransportError):
        klaviyo.post("/api/events", json=body)
    sandbox.klaviyo.faults = FaultConfig()
    assert klaviyo.post("/api/events", json=body).status_code == 202
    assert sandbox.klaviyo.events and len(sandbox.klaviyo.events) == 1

    log = sandbox.klaviyo.requests
    assert [(r.status, r.fault) for r in log] == [
        (429, "rate_limit"),
        (log[1].status, "server_error"),
        (None, "drop"),
        (202, None),
    ]
    assert log[-1].method == "POST" and log[-1].path == "/api/events"
    assert log[-1].body == body and log[-1].size == len(orjson.dumps(body))
    assert sandbox.mailchimp.requests == []
    assert sandbox.requests == log


# ================================================================================ Mailchimp


@pytest.fixture
def mailchimp(sandbox: DestinationSandbox) -> Iterator[httpx.Client]:
    sandbox.mailchimp.add_list("list1")
    with httpx.Client(
        base_url=sandbox.mailchimp_url, auth=("anystring", MAILCHIMP_KEY), timeout=10
    ) as client:
        yield client


def _md5(email: str) -> str:
    return hashlib.md5(email.lower().encode()).hexdigest()


def test_mailchimp_auth_and_unknown_list(
    sandbox: DestinationSandbox, mailchimp: httpx.Client
) -> None:
    body = {"members": [{"email_address": "a@example.com", "status": "subscribed"}]}
    for auth in (("user", "wrong-us1"), None):
        response = httpx.post(f"{sandbox.mailchimp_url}/lists/list1", json=body, auth=auth)
        assert response.status_code == 401
        problem = response.json()
        assert problem["title"] == "API Key Invalid" and problem["status"] == 401
        assert {"type", "detail", "instance"} <= set(problem)
        assert response.headers["content-type"].startswith("application/problem+json")
    missing = mailchimp.post("/lists/nope", json=body)
    assert missing.status_code == 404 and missing.json()["title"] == "Resource Not Found"
    assert sandbox.mailchimp.lists["list1"].members == {}


def test_mailchimp_batch_subscribe(sandbox: DestinationSandbox, mailchimp: httpx.Client) -> None:
    first = {
        "members": [
            {
                "email_address": "Ada@example.com",
                "status": "subscribed",
                "merge_fields": {"FNAME": "Ada"},
            },
            {"email_address": "bob@example.com", "status": "unsubscribed"},
            {"email_address": "not an email", "status": "subscribed"},
            {"email_address": "tx@example.com", "status": "transactional"},
        ]
    }
    result = mailchimp.post("/lists/list1", json=first).json()
    assert result["total_created"] == 3 and result["total_updated"] == 0
    assert result["error_count"] == 1
    assert result["errors"][0]["email_address"] == "not an email"
    assert result["errors"][0]["error_code"] == "ERROR_GENERIC"
    assert [m["email_address"] for m in result["new_members"]] == [
        "Ada@example.com",
        "bob@example.com",
        "tx@example.com",
    ]
    assert result["new_members"][0]["id"] == _md5("ada@example.com")

    again = {
        "members": [
            {
                "email_address": "ada@example.com",
                "status": "subscribed",
                "merge_fields": {"LNAME": "L"},
            }
        ]
    }
    exists = mailchimp.post("/lists/list1", json=again).json()
    assert exists["error_count"] == 1
    assert exists["errors"][0]["error_code"] == "ERROR_CONTACT_EXISTS"
    assert "update_existing" in exists["errors"][0]["error"]

    update = {
        "update_existing": True,
        "members": [
            {
                "email_address": "ada@example.com",
                "status": "unsubscribed",
                "merge_fields": {"LNAME": "L"},
            },
            # An unsubscribed address cannot be re-subscribed, even with update_existing...
            {"email_address": "bob@example.com", "status": "subscribed"},
            # ...but may be sent the double opt-in.
            {"email_address": "tx@example.com", "status": "pending"},
        ],
    }
    updated = mailchimp.post("/lists/list1", json=update).json()
    assert updated["total_updated"] == 2 and updated["error_count"] == 1
    assert "compliance state" in updated["errors"][0]["error"]
    ada = sandbox.mailchimp.member("list1", "ADA@example.com")
    assert ada is not None
    assert ada["status"] == "unsubscribed"
    assert ada["merge_fields"] == {"FNAME": "Ada", "LNAME": "L"}
    bob = sandbox.mailchimp.member("list1", "bob@example.com")
    assert bob is not None and bob["status"] == "unsubscribed"

    duplicates = {
        "members": [
            {"email_address": "dup@example.com", "status": "subscribed"},
            {"email_address": "DUP@example.com", "status": "subscribed"},
        ]
    }
    result = mailchimp.post("/lists/list1", json=duplicates).json()
    assert (result["total_created"], result["error_count"]) == (1, 1)


def test_mailchimp_batch_request_errors(
    sandbox: DestinationSandbox, mailchimp: httpx.Client
) -> None:
    too_many = {
        "members": [
            {"email_address": f"m{n}@example.com", "status": "subscribed"} for n in range(501)
        ]
    }
    response = mailchimp.post("/lists/list1", json=too_many)
    assert response.status_code == 400 and response.json()["title"] == "Invalid Resource"
    bad_status = {"members": [{"email_address": "a@example.com", "status": "archived"}]}
    response = mailchimp.post("/lists/list1", json=bad_status)
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "members.item:0.status"
    no_email = {"members": [{"status": "subscribed"}]}
    assert mailchimp.post("/lists/list1", json=no_email).status_code == 400
    broken = mailchimp.post(
        "/lists/list1", content=b"{", headers={"Content-Type": "application/json"}
    )
    assert broken.status_code == 400
    assert sandbox.mailchimp.lists["list1"].members == {}


def test_mailchimp_put_member(sandbox: DestinationSandbox, mailchimp: httpx.Client) -> None:
    email = "Put@Example.com"
    path = f"/lists/list1/members/{_md5(email)}"
    missing = mailchimp.put(path, json={"email_address": email})
    assert missing.status_code == 400
    assert missing.json()["errors"][0]["field"] == "status_if_new"
    wrong_hash = mailchimp.put(
        f"/lists/list1/members/{_md5('other@example.com')}",
        json={"email_address": email, "status_if_new": "subscribed"},
    )
    assert wrong_hash.status_code == 400

    created = mailchimp.put(
        path, json={"email_address": email, "status_if_new": "subscribed", "merge_fields": {"A": 1}}
    )
    assert created.status_code == 200 and created.json()["status"] == "subscribed"
    unsub = mailchimp.put(
        path, json={"email_address": email, "status_if_new": "subscribed", "status": "unsubscribed"}
    )
    assert unsub.json()["status"] == "unsubscribed"
    blocked = mailchimp.put(
        path, json={"email_address": email, "status_if_new": "subscribed", "status": "subscribed"}
    )
    assert blocked.status_code == 400 and blocked.json()["title"] == "Member In Compliance State"
    member = sandbox.mailchimp.member("list1", email)
    assert member is not None
    assert member["status"] == "unsubscribed" and member["merge_fields"] == {"A": 1}


def test_mailchimp_segments_and_tags(sandbox: DestinationSandbox, mailchimp: httpx.Client) -> None:
    members = [{"email_address": f"s{n}@example.com", "status": "subscribed"} for n in range(4)]
    mailchimp.post("/lists/list1", json={"members": members})
    for n in range(3):
        created = mailchimp.post(
            "/lists/list1/segments", json={"name": f"tag{n}", "static_segment": []}
        )
        assert created.status_code == 200 and created.json()["type"] == "static"
    assert mailchimp.post("/lists/list1/segments", json={"name": "tag0"}).status_code == 400

    first = mailchimp.get("/lists/list1/segments", params={"type": "static", "count": 2}).json()
    assert first["total_items"] == 3 and [s["name"] for s in first["segments"]] == ["tag0", "tag1"]
    second = mailchimp.get("/lists/list1/segments", params={"count": 2, "offset": 2}).json()
    assert [s["name"] for s in second["segments"]] == ["tag2"]
    assert mailchimp.get("/lists/list1/segments", params={"count": 1001}).status_code == 400
    segment_id = first["segments"][0]["id"]

    batch = mailchimp.post(
        f"/lists/list1/segments/{segment_id}",
        json={"members_to_add": ["s0@example.com", "S1@example.com", "stranger@example.com"]},
    ).json()
    assert (batch["total_added"], batch["total_removed"], batch["error_count"]) == (2, 0, 1)
    assert batch["errors"][0]["email_addresses"] == ["stranger@example.com"]
    removed = mailchimp.post(
        f"/lists/list1/segments/{segment_id}", json={"members_to_remove": ["s0@example.com"]}
    ).json()
    assert removed["total_removed"] == 1
    assert sandbox.mailchimp.segment_members("list1", "tag0") == {"s1@example.com"}
    too_many = {"members_to_add": [f"x{n}@example.com" for n in range(501)]}
    assert mailchimp.post(f"/lists/list1/segments/{segment_id}", json=too_many).status_code == 400
    assert mailchimp.post("/lists/list1/segments/999999", json={}).status_code == 404

    tags = {"tags": [{"name": "vip", "status": "active"}, {"name": "tag0", "status": "inactive"}]}
    response = mailchimp.post(f"/lists/list1/members/{_md5('s1@example.com')}/tags", json=tags)
    assert response.status_code == 204
    assert sandbox.mailchimp.segment_members("list1", "vip") == {"s1@example.com"}
    assert sandbox.mailchimp.segment_members("list1", "tag0") == set()
    unknown = mailchimp.post(f"/lists/list1/members/{_md5('nobody@example.com')}/tags", json=tags)
    assert unknown.status_code == 404
    bad = {"tags": [{"name": "vip", "status": "on"}]}
    assert (
        mailchimp.post(f"/lists/list1/members/{_md5('s1@example.com')}/tags", json=bad).status_code
        == 400
    )


def test_mailchimp_delete_permanent(sandbox: DestinationSandbox, mailchimp: httpx.Client) -> None:
    mailchimp.post(
        "/lists/list1",
        json={"members": [{"email_address": "gdpr@example.com", "status": "subscribed"}]},
    )
    mailchimp.post(
        f"/lists/list1/members/{_md5('gdpr@example.com')}/tags",
        json={"tags": [{"name": "t", "status": "active"}]},
    )
    path = f"/lists/list1/members/{_md5('gdpr@example.com')}/actions/delete-permanent"
    assert mailchimp.post(path).status_code == 204
    assert mailchimp.post(path).status_code == 404
    assert sandbox.mailchimp.member("list1", "gdpr@example.com") is None
    assert sandbox.mailchimp.segment_members("list1", "t") == set()
    assert sandbox.mailchimp.forgotten("list1") == {"gdpr@example.com"}
    again = mailchimp.post(
        "/lists/list1",
        json={"members": [{"email_address": "gdpr@example.com", "status": "subscribed"}]},
    ).json()
    assert again["error_count"] == 1 and "permanently deleted" in again["errors"][0]["error"]


def test_mailchimp_concurrent_connection_limit(
    sandbox: DestinationSandbox, mailchimp: httpx.Client
) -> None:
    sandbox.mailchimp.faults = FaultConfig(latency_ms=400)
    statuses: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(14)

    def call() -> None:
        with httpx.Client(auth=("u", MAILCHIMP_KEY), timeout=10) as client:
            start.wait()
            response = client.get(f"{sandbox.mailchimp_url}/lists/list1/segments")
        with lock:
            statuses.append(response.status_code)

    threads = [threading.Thread(target=call) for _ in range(14)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses.count(200) <= 10
    assert statuses.count(429) >= 4
    throttled = [r for r in sandbox.mailchimp.requests if r.status == 429]
    assert all(r.fault == "throttled" for r in throttled)
    sandbox.mailchimp.faults = FaultConfig()
    assert mailchimp.get("/lists/list1/segments").status_code == 200


# ================================================================================= webhooks

SECRET = "s3cret"


def _batch(records: list[Json], action: str = "upsert", mode: str = "upsert") -> bytes:
    keys = "\n".join(r["key"] for r in records)
    body = {
        "sync": "vip",
        "mode": mode,
        "action": action,
        "batch_id": hashlib.sha256(f"{action}{keys}".encode()).hexdigest(),
        "sent_at": "2026-11-23T00:00:00Z",
        "records": records,
    }
    return orjson.dumps(body)


def _post(
    sandbox: DestinationSandbox, name: str, raw: bytes, secret: str | None = SECRET
) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        digest = hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
        headers["X-Syncd-Signature"] = f"sha256={digest}"
    headers["Idempotency-Key"] = orjson.loads(raw)["batch_id"]
    return httpx.post(sandbox.webhook_url(name), content=raw, headers=headers, timeout=10)


def _records(*emails: str) -> list[Json]:
    return [{"key": f"k{n}", "id": None, "data": {"email": e}} for n, e in enumerate(emails)]


def test_webhook_signature_and_recording(sandbox: DestinationSandbox) -> None:
    receiver = sandbox.webhooks.add("crm", SECRET)
    raw = _batch(_records("a@example.com", "b@example.com"))
    assert _post(sandbox, "crm", raw, secret=None).status_code == 401
    assert _post(sandbox, "crm", raw, secret="wrong").status_code == 401
    assert receiver.records == []
    response = _post(sandbox, "crm", raw)
    assert response.status_code == 200 and response.json() == {}
    assert [r["data"]["email"] for r in receiver.records] == ["a@example.com", "b@example.com"]
    assert receiver.batches[0]["action"] == "upsert" and receiver.redeliveries == 0
    assert _post(sandbox, "crm", raw).status_code == 200
    assert receiver.redeliveries == 1
    assert _post(sandbox, "nobody", raw).status_code == 404

    custom = sandbox.webhooks.add("custom", SECRET, signature_header="X-Sig")
    digest = hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
    response = httpx.post(
        sandbox.webhook_url("custom"),
        content=raw,
        headers={"Content-Type": "application/json", "X-Sig": f"sha256={digest}"},
    )
    assert response.status_code == 200 and len(custom.records) == 2


def test_webhook_shape_checks(sandbox: DestinationSandbox) -> None:
    receiver = sandbox.webhooks.add("strict", SECRET)
    records = _records("a@example.com")
    assert _post(sandbox, "strict", _batch(records, action="add", mode="upsert")).status_code == 400
    assert _post(sandbox, "strict", _batch([{"key": "k", "data": {}}])).status_code == 400
    body = orjson.loads(_batch(records))
    body["batch_id"] = "not-hex"
    raw = orjson.dumps(body)
    digest = hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
    response = httpx.post(
        sandbox.webhook_url("strict"),
        content=raw,
        headers={"Content-Type": "application/json", "X-Syncd-Signature": f"sha256={digest}"},
    )
    assert response.status_code == 400 and "batch_id" in response.json()["message"]
    assert receiver.records == []


def test_webhook_rejections(sandbox: DestinationSandbox) -> None:
    def reject(record: Json) -> str | None:
        return "bad address" if "bad" in record["data"]["email"] else None

    per_row = sandbox.webhooks.add("rows", SECRET, reject=reject)
    whole = sandbox.webhooks.add("whole", SECRET, reject=reject, reject_mode="batch")
    raw = _batch(_records("ok@example.com", "bad@example.com"))

    response = _post(sandbox, "rows", raw)
    assert response.status_code == 200
    assert response.json() == {"errors": [{"key": "k1", "message": "bad address"}]}
    assert [r["key"] for r in per_row.records] == ["k0"]

    response = _post(sandbox, "whole", raw)
    assert response.status_code == 422 and "bad address" in response.json()["message"]
    assert whole.records == [] and whole.batches == []


def test_webhook_rate_limit_and_faults(sandbox: DestinationSandbox) -> None:
    receiver = sandbox.webhooks.add("slow", SECRET, rate_per_second=2)
    raw = _batch(_records("a@example.com"))
    statuses = [_post(sandbox, "slow", raw) for _ in range(5)]
    throttled = [r for r in statuses if r.status_code == 429]
    assert 1 <= len(throttled) <= 3
    assert throttled[0].headers["Retry-After"] == "1"
    assert len(receiver.batches) == 5 - len(throttled)

    sandbox.set_faults(FaultConfig(rate_5xx=1), vendor="webhook")
    assert _post(sandbox, "slow", raw).status_code in (500, 502, 503)
    assert sandbox.klaviyo.faults == FaultConfig()
    assert sandbox.webhooks.requests[-1].fault == "server_error"
