"""The webhook adapter against respx: the signed wire format, outcomes, refusals, retries;
and through the push engine against the sandbox's receivers, for the refusals that fail a run.

Signatures are recomputed here with hashlib/hmac over the bytes respx received, not
with the adapter's helper, so a helper and an adapter that agree on a wrong body (or
sign one serialization and send another) still fail.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import Awaitable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from pydantic import SecretStr, ValidationError
from sqlalchemy import Engine, insert, select

from syncd.config import Settings
from syncd.destinations import destination_class
from syncd.destinations.base import BatchRejected, Item, NoOptions, Op, Outcome, SyncTarget
from syncd.destinations.webhook import (
    WebhookDestination,
    WebhookOptions,
    signature,
    verify_signature,
)
from syncd.http import ApiError, AuthError, ServiceLimits
from syncd.mapping import load_mappings
from syncd.push import PushResult, push, select_syncs
from syncd.sandbox.destinations import DestinationSandbox
from syncd.store.models import MEMBERSHIPS, PROFILES, SYNC_RECORDS

URL = "https://hooks.example.com/catch/123/abc?source=syncd"
SECRET = "whsec_test_5f2a"
CREDENTIALS = {"secret": SecretStr(SECRET)}
FAST = ServiceLimits(requests_per_second=None, max_attempts=3)
UPSERT = SyncTarget(name="vip-to-zapier", mode="upsert", object=None, options=NoOptions())
ITEMS = [
    Item(key="person:1", payload={"email": "ann@example.com", "properties": {"clv": 12.5}}),
    Item(key="person:2", payload={"email": "bob@example.com", "properties": {"clv": None}}),
]


def run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    return asyncio.run(main())


def make(options: WebhookOptions | None = None, url: str | None = URL) -> WebhookDestination:
    return WebhookDestination(
        "zapier", CREDENTIALS, options or WebhookOptions(), base_url=url, limits=FAST
    )


async def send(
    dest: WebhookDestination,
    items: Sequence[Item] = ITEMS,
    target: SyncTarget = UPSERT,
    op: Op = "upsert",
) -> list[Outcome]:
    try:
        return await dest.send(target, op, items)
    finally:
        await dest.aclose()


def hmac_hex(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def expected_batch_id(sync: str, action: str, records: list[list[object]]) -> str:
    # Computed the long way (json, sorted keys, no spaces) rather than with orjson.
    text = json.dumps([sync, action, records], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def test_registered_with_every_mode_and_1000_per_op() -> None:
    assert destination_class("webhook") is WebhookDestination
    assert WebhookDestination.modes == frozenset({"upsert", "mirror", "event", "delete"})
    assert dict(WebhookDestination.max_batch) == {
        op: 1000 for op in ("upsert", "add", "remove", "event", "delete")
    }
    assert WebhookDestination.credential_names == ("secret",)
    assert WebhookDestination.Options is WebhookOptions


def test_body_headers_and_signature_over_the_received_bytes() -> None:
    options = WebhookOptions(headers={"X-Api-Key": "zap-123"})
    before = datetime.now(UTC)
    with respx.mock(assert_all_called=False) as router:
        route = router.post(URL).mock(return_value=httpx.Response(200))
        outcomes = run(send(make(options)))

    assert outcomes == [Outcome.accepted(), Outcome.accepted()]
    assert route.call_count == 1
    request = route.calls[0].request
    # The URL exactly as configured: no slash added to the path, the query kept.
    assert str(request.url) == URL
    raw = request.content
    assert request.headers["X-Syncd-Signature"] == hmac_hex(raw)
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["X-Api-Key"] == "zap-123"
    body = json.loads(raw)
    assert list(body) == ["sync", "mode", "action", "batch_id", "sent_at", "records"]
    assert body["sync"] == "vip-to-zapier"
    assert body["mode"] == "upsert"
    assert body["action"] == "upsert"
    assert body["batch_id"] == expected_batch_id(
        "vip-to-zapier",
        "upsert",
        [["person:1", None, ITEMS[0].payload], ["person:2", None, ITEMS[1].payload]],
    )
    assert request.headers["Idempotency-Key"] == body["batch_id"]
    assert body["sent_at"].endswith("Z")
    sent_at = datetime.fromisoformat(body["sent_at"].replace("Z", "+00:00"))
    assert before - timedelta(seconds=1) <= sent_at <= datetime.now(UTC) + timedelta(seconds=1)
    assert body["records"] == [
        {"key": "person:1", "id": None, "data": ITEMS[0].payload},
        {"key": "person:2", "id": None, "data": ITEMS[1].payload},
    ]


def test_the_signature_header_name_is_an_option() -> None:
    with respx.mock(assert_all_called=False) as router:
        route = router.post(URL).mock(return_value=httpx.Response(204))
        run(send(make(WebhookOptions(signature_header="X-Hub-Signature-256"))))
    request = route.calls[0].request
    assert request.headers["X-Hub-Signature-256"] == hmac_hex(request.content)
    assert "X-Syncd-Signature" not in request.headers


def test_batch_id_is_stable_for_the_same_batch_and_changes_with_it() -> None:
    event = SyncTarget(name="entered-vip", mode="event", object="Entered VIP", options=NoOptions())
    events = [
        Item(key="person:1", payload={"email": "ann@example.com"}, event_id="e-1"),
        Item(key="person:2", payload={"email": "bob@example.com"}, event_id="e-2"),
    ]
    with respx.mock(assert_all_called=False) as router:
        route = router.post(URL).mock(return_value=httpx.Response(200))
        run(send(make()))
        run(send(make()))
        run(send(make(), ITEMS[:1]))
        run(send(make(), events, event, "event"))
        changed = [Item(key="person:1", payload={"email": "ann@example.com", "tier": "gold"})]
        run(send(make(), changed + ITEMS[1:]))
    bodies = [json.loads(call.request.content) for call in route.calls]
    keys = [call.request.headers["Idempotency-Key"] for call in route.calls]
    assert bodies[0]["batch_id"] == bodies[1]["batch_id"] == keys[0] == keys[1]
    assert bodies[2]["batch_id"] != bodies[0]["batch_id"]
    assert bodies[3]["batch_id"] == expected_batch_id(
        "entered-vip",
        "event",
        [["person:1", "e-1", events[0].payload], ["person:2", "e-2", events[1].payload]],
    )
    # New content for the same keys is a new batch: a receiver must not drop it.
    assert bodies[4]["batch_id"] != bodies[0]["batch_id"]
    # Events carry their idempotency key as the record id.
    assert [r["id"] for r in bodies[3]["records"]] == ["e-1", "e-2"]
    assert bodies[3]["mode"] == "event" and bodies[3]["action"] == "event"


def test_remove_sends_the_dest_id_and_empty_data() -> None:
    mirror = SyncTarget(name="vip-audience", mode="mirror", object=None, options=NoOptions())
    gone = [Item(key="person:9", payload={}, dest_id="crm-77")]
    with respx.mock(assert_all_called=False) as router:
        route = router.post(URL).mock(return_value=httpx.Response(200))
        assert run(send(make(), gone, mirror, "remove")) == [Outcome.accepted()]
    body = json.loads(route.calls[0].request.content)
    assert (body["mode"], body["action"]) == ("mirror", "remove")
    assert body["records"] == [{"key": "person:9", "id": "crm-77", "data": {}}]


def test_errors_in_a_2xx_body_reject_only_the_named_records() -> None:
    answer = {"errors": [{"key": "person:2", "message": "email domain is blocked"}]}
    with respx.mock(assert_all_called=False) as router:
        router.post(URL).mock(return_value=httpx.Response(200, json=answer))
        outcomes = run(send(make()))
    assert outcomes == [Outcome.accepted(), Outcome.rejected("email domain is blocked")]


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, text="OK"),
        httpx.Response(202, json={"status": "queued", "errors": []}),
        httpx.Response(200, json={"errors": [{"message": "names no record"}]}),
    ],
)
def test_any_other_2xx_body_accepts_everything(response: httpx.Response) -> None:
    with respx.mock(assert_all_called=False) as router:
        router.post(URL).mock(return_value=response)
        assert run(send(make())) == [Outcome.accepted(), Outcome.accepted()]


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (httpx.Response(422, json={"message": "records[0].data.email missing"}), None),
        (httpx.Response(400, json={"error": "malformed batch"}), "malformed batch"),
        (httpx.Response(413), "HTTP 413 Request Entity Too Large"),
        (httpx.Response(409, json={"message": "duplicate key"}), "duplicate key"),
    ],
)
def test_a_content_4xx_refuses_the_whole_batch(
    response: httpx.Response, message: str | None
) -> None:
    with respx.mock(assert_all_called=False) as router:
        route = router.post(URL).mock(return_value=response)
        with pytest.raises(BatchRejected) as caught:
            run(send(make()))
    assert caught.value.message == (message or "records[0].data.email missing")
    assert route.call_count == 1


@pytest.mark.parametrize("status", [404, 405, 410])
def test_a_wrong_url_fails_the_run_after_one_request_not_the_batch(status: int) -> None:
    # A 404 is the same for every row: bisecting it would send ~2n requests for nothing.
    with respx.mock(assert_all_called=False) as router:
        route = router.post(URL).mock(
            return_value=httpx.Response(status, json={"message": "no such hook"})
        )
        with pytest.raises(ApiError, match="no such hook") as caught:
            run(send(make()))
    assert not isinstance(caught.value, BatchRejected)
    assert caught.value.status == status
    assert route.call_count == 1


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failures_propagate(status: int) -> None:
    with respx.mock(assert_all_called=False) as router:
        router.post(URL).mock(return_value=httpx.Response(status, json={"message": "bad sig"}))
        with pytest.raises(AuthError):
            run(send(make()))


def test_429_with_retry_after_is_retried_by_the_http_layer_with_the_same_bytes() -> None:
    waits: list[float] = []

    async def no_sleep(seconds: float) -> None:
        waits.append(seconds)

    dest = make()
    # The contract builds the client; tests reach in to make its waits instant.
    dest.client._sleep = no_sleep
    dest.client._limiter._sleep = no_sleep
    with respx.mock(assert_all_called=False) as router:
        route = router.post(URL).mock(
            side_effect=[
                httpx.Response(429, headers={"Retry-After": "7"}),
                httpx.Response(200, json={"errors": []}),
            ]
        )
        outcomes = run(send(dest))
    assert outcomes == [Outcome.accepted(), Outcome.accepted()]
    assert route.call_count == 2
    assert 7.0 in waits
    first, second = (call.request for call in route.calls)
    assert first.content == second.content
    assert second.headers["X-Syncd-Signature"] == hmac_hex(second.content)


def test_429_until_the_ceiling_fails_the_run_not_the_batch() -> None:
    async def no_sleep(seconds: float) -> None:
        return None

    dest = make()
    dest.client._sleep = no_sleep
    dest.client._limiter._sleep = no_sleep
    with respx.mock(assert_all_called=False) as router:
        router.post(URL).mock(return_value=httpx.Response(429, headers={"Retry-After": "1"}))
        with pytest.raises(ApiError) as caught:
            run(send(dest))
    assert not isinstance(caught.value, BatchRejected)


def test_a_redirect_is_not_followed() -> None:
    with respx.mock(assert_all_called=False) as router:
        router.post(URL).mock(
            return_value=httpx.Response(301, headers={"Location": "https://new.example.com/h"})
        )
        with pytest.raises(ApiError, match=r"new\.example\.com"):
            run(send(make()))


def test_verify_helpers_match_an_independent_hmac() -> None:
    body = b'{"sync":"s","records":[]}'
    assert signature(SECRET, body) == hmac_hex(body)
    assert signature(SECRET.encode(), body) == hmac_hex(body)
    assert verify_signature(SECRET, body, hmac_hex(body))
    assert not verify_signature(SECRET, body + b" ", hmac_hex(body))
    assert not verify_signature("other", body, hmac_hex(body))
    assert not verify_signature(SECRET, body, None)


def test_options_and_base_url_are_checked() -> None:
    with pytest.raises(ValidationError):
        WebhookOptions(headers={"Idempotency-Key": "x"})
    with pytest.raises(ValidationError):
        WebhookOptions(headers={"Bad Header": "x"})
    with pytest.raises(ValidationError):
        WebhookOptions(signature_header="Content-Type")
    with pytest.raises(ValidationError):
        WebhookOptions.model_validate({"signature_headr": "X-Sig"})  # typo
    with pytest.raises(ValueError, match="base_url"):
        WebhookDestination.default_base_url(CREDENTIALS)
    with pytest.raises(ValueError, match="base_url"):
        make(url=None)
    with pytest.raises(ValueError, match="http"):
        make(url="hooks.example.com/catch")
    assert WebhookDestination.check_credentials({"secret": SecretStr(" ")}) is not None
    assert WebhookDestination.check_credentials(CREDENTIALS) is None


# --- through the push engine ------------------------------------------------------------------


def _push_to(sandbox: DestinationSandbox, engine: Engine, tmp_path: Path, hook: str) -> PushResult:
    mapping = tmp_path / "hook.toml"
    mapping.write_text(
        f"""
destination = "webhook"
base_url = "{sandbox.webhook_url(hook)}"
allow_loopback = true
[credentials]
secret = "{SECRET}"

[[sync]]
name = "hook"
segment = "vip"
mode = "upsert"
[sync.fields]
email = "email"
"""
    )
    settings = Settings.model_validate(
        {
            "segments": {"vip": {"rule": "orders_count >= 1"}},
            "destinations": {"mappings": [str(mapping)]},
        }
    )
    with engine.begin() as conn:
        conn.execute(
            insert(PROFILES),
            [
                {"customer_id": cid, "email": f"p{cid}@example.com", "orders_count": 1}
                for cid in range(1, 41)
            ],
        )
        conn.execute(
            insert(MEMBERSHIPS),
            [
                {
                    "segment": "vip",
                    "customer_id": cid,
                    "entered_at": datetime(2026, 11, 1, tzinfo=UTC),
                }
                for cid in range(1, 41)
            ],
        )
    (result,) = asyncio.run(push(engine, select_syncs(load_mappings(settings), None)))
    return result


@pytest.mark.parametrize(
    ("receiver_secret", "message"),
    [
        (None, "no receiver named 'crm'"),  # 404: a mistyped URL
        ("another-secret", "invalid or missing signature"),  # 401: a wrong secret
    ],
)
def test_a_receiver_answering_404_or_401_fails_the_run_after_one_request(
    engine: Engine, tmp_path: Path, receiver_secret: str | None, message: str
) -> None:
    with DestinationSandbox() as sandbox:
        if receiver_secret is not None:
            sandbox.webhooks.add("crm", receiver_secret)
        result = _push_to(sandbox, engine, tmp_path, "crm")
        sent = list(sandbox.webhooks.requests)
    assert result.status == "failed"
    assert result.error is not None and message in result.error
    assert len(sent) == 1 and result.counts.requests == 1
    # The rows are not the receiver's refusals: none is recorded as failed, all go next run.
    with engine.connect() as conn:
        statuses = conn.execute(
            select(SYNC_RECORDS.c.status).where(SYNC_RECORDS.c.sync == "hook")
        ).scalars()
        assert "failed" not in set(statuses)
