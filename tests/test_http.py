"""Tests of syncd.http: pacing, retries, errors, counters, redaction.

Request/response details run against respx with an injected clock and sleep, so
backoff waits are asserted exactly and cost no time. A few tests run against a
real HTTP server on 127.0.0.1 to prove that genuine transport failures are
retried and that the concurrency cap and the requests-per-second pacing hold on
a real event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qsl

import httpx
import orjson
import pytest
import respx
import structlog
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr
from structlog.testing import LogCapture

import syncd
import syncd.http as http_module
from syncd.http import (
    ApiError,
    AuthError,
    OAuth2RefreshAuth,
    OAuthError,
    RateLimiter,
    RetryExhausted,
    ServiceClient,
    ServiceLimits,
    ServiceStats,
    parse_retry_after,
    redact_url,
    reset_service_stats,
    service_stats,
    vendor_message,
)

BASE = "http://127.0.0.1:5"
ORDERS = f"{BASE}/wp-json/wc/v3/orders"


@pytest.fixture(autouse=True)
def _fresh_counters() -> Iterator[None]:
    reset_service_stats()
    yield
    reset_service_stats()


class FakeTime:
    """A monotonic clock that only moves when the code under test sleeps."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        # Yield like a real sleep so concurrent tasks interleave.
        await asyncio.sleep(0)


def make_client(
    fake: FakeTime,
    *,
    service: str = "woocommerce",
    rng: random.Random | None = None,
    **limits: Any,
) -> ServiceClient:
    return ServiceClient(
        service,
        BASE,
        limits=ServiceLimits(**limits),
        sleep=fake.sleep,
        clock=fake.clock,
        rng=rng or random.Random(0),
    )


def run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    return asyncio.run(main())


# --- retries ---------------------------------------------------------------------------


def test_503_is_retried_then_the_success_is_returned() -> None:
    fake = FakeTime()

    async def scenario() -> httpx.Response:
        async with make_client(fake, backoff_base=0.5) as client:
            response = await client.request("GET", "/wp-json/wc/v3/orders")
            assert client.stats == ServiceStats(
                requests=2, retries=1, throttles=0, errors=0, by_status={503: 1, 200: 1}
            )
            return response

    with respx.mock:
        route = respx.get(ORDERS).mock(
            side_effect=[httpx.Response(503), httpx.Response(200, json=[{"id": 1}])]
        )
        response = run(scenario())

    assert route.call_count == 2
    assert response.status_code == 200
    assert response.json() == [{"id": 1}]
    # One backoff wait, within the first full-jitter ceiling (backoff_base).
    assert len(fake.sleeps) == 1
    assert 0.0 <= fake.sleeps[0] <= 0.5


def test_429_retry_after_seconds_is_slept_exactly_and_counted_as_throttle() -> None:
    fake = FakeTime()

    async def scenario() -> ServiceStats:
        async with make_client(fake) as client:
            await client.request("GET", ORDERS)
            return client.stats

    with respx.mock:
        respx.get(ORDERS).mock(
            side_effect=[
                httpx.Response(429, headers={"Retry-After": "7"}),
                httpx.Response(200, json=[]),
            ]
        )
        stats = run(scenario())

    # Exactly the server's 7 s: not jittered, and the service-wide hold it also set
    # has expired by then, so the limiter adds no second wait.
    assert fake.sleeps == [7.0]
    assert stats.throttles == 1
    assert stats.retries == 1
    assert stats.by_status == {429: 1, 200: 1}


def test_429_retry_after_http_date_is_converted_to_seconds() -> None:
    fake = FakeTime()
    when = datetime.now(UTC) + timedelta(seconds=30)

    async def scenario() -> None:
        async with make_client(fake) as client:
            await client.request("GET", ORDERS)

    with respx.mock:
        respx.get(ORDERS).mock(
            side_effect=[
                httpx.Response(429, headers={"Retry-After": format_datetime(when, usegmt=True)}),
                httpx.Response(200),
            ]
        )
        run(scenario())

    # HTTP dates have whole-second precision, so the wait is just under 30 s.
    assert len(fake.sleeps) == 1
    assert 28.5 < fake.sleeps[0] <= 30.0


def test_retry_after_longer_than_backoff_max_is_capped() -> None:
    fake = FakeTime()

    async def scenario() -> None:
        async with make_client(fake, backoff_max=20.0) as client:
            await client.request("GET", ORDERS)

    with respx.mock:
        respx.get(ORDERS).mock(
            side_effect=[httpx.Response(503, headers={"Retry-After": "3600"}), httpx.Response(200)]
        )
        run(scenario())

    assert fake.sleeps == [20.0]


def test_429_without_retry_after_uses_jittered_backoff() -> None:
    fake = FakeTime()

    async def scenario() -> None:
        async with make_client(fake, rng=random.Random(7), backoff_base=2.0) as client:
            await client.request("GET", ORDERS)

    with respx.mock:
        respx.get(ORDERS).mock(side_effect=[httpx.Response(429), httpx.Response(200)])
        run(scenario())

    assert fake.sleeps == [random.Random(7).uniform(0.0, 2.0)]


def test_full_jitter_uses_uniform_zero_to_exponential_ceiling() -> None:
    fake = FakeTime()
    limits: dict[str, Any] = {
        "max_attempts": 9,
        "backoff_base": 0.5,
        "backoff_max": 4.0,
        "max_elapsed": 1e6,
    }

    async def scenario() -> None:
        async with make_client(fake, rng=random.Random(1234), **limits) as client:
            with pytest.raises(RetryExhausted):
                await client.request("GET", ORDERS)

    with respx.mock:
        respx.get(ORDERS).mock(return_value=httpx.Response(500))
        run(scenario())

    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0]  # doubling, capped at backoff_max
    reference = random.Random(1234)
    assert fake.sleeps == [reference.uniform(0.0, c) for c in ceilings]
    assert all(0.0 <= wait <= c for wait, c in zip(fake.sleeps, ceilings, strict=True))
    # Full jitter reaches well below half the ceiling ("equal jitter" never would).
    assert any(wait < c / 2 for wait, c in zip(fake.sleeps, ceilings, strict=True))


def test_attempt_ceiling_raises_retry_exhausted_with_last_status() -> None:
    fake = FakeTime()

    async def scenario() -> tuple[RetryExhausted, ServiceStats]:
        async with make_client(fake, max_attempts=3) as client:
            with pytest.raises(RetryExhausted) as caught:
                await client.request("GET", ORDERS)
            return caught.value, client.stats

    with respx.mock:
        route = respx.get(ORDERS).mock(
            return_value=httpx.Response(503, json={"message": "Down for maintenance"})
        )
        error, stats = run(scenario())

    assert route.call_count == 3
    assert len(fake.sleeps) == 2
    assert error.status == 503
    assert error.attempts == 3
    assert "gave up after 3 attempts" in error.message
    assert "attempt limit 3" in error.message
    assert "Down for maintenance" in error.message
    assert error.body == {"message": "Down for maintenance"}
    assert isinstance(error, ApiError)
    assert not isinstance(error, AuthError)
    assert stats == ServiceStats(requests=3, retries=2, throttles=0, errors=1, by_status={503: 3})


def test_elapsed_ceiling_stops_before_a_wait_that_would_pass_it() -> None:
    fake = FakeTime()

    async def scenario() -> RetryExhausted:
        async with make_client(fake, max_attempts=100, max_elapsed=25.0) as client:
            with pytest.raises(RetryExhausted) as caught:
                await client.request("GET", ORDERS)
            return caught.value

    with respx.mock:
        route = respx.get(ORDERS).mock(
            return_value=httpx.Response(503, headers={"Retry-After": "10"})
        )
        error = run(scenario())

    # Attempts at t=0, 10, 20; a third wait would end at 30 > 25: stop there.
    assert route.call_count == 3
    assert fake.sleeps == [10.0, 10.0]
    assert error.attempts == 3
    assert error.elapsed == pytest.approx(20.0)
    assert "next wait of 10.0s would reach the 25s ceiling" in error.message


def test_a_vendor_hold_beyond_the_time_ceiling_stops_retrying() -> None:
    fake = FakeTime()

    async def scenario() -> None:
        async with make_client(fake, max_elapsed=30.0) as client:
            with pytest.raises(RetryExhausted):
                await client.request("GET", ORDERS)

    with respx.mock:
        route = respx.get(ORDERS).mock(
            return_value=httpx.Response(
                429, headers={"RateLimit-Remaining": "0", "RateLimit-Reset": "120"}
            )
        )
        run(scenario())

    # The vendor holds the service for the whole budget (capped at 30 s): a retry
    # could only start when no time is left, so none is scheduled.
    assert route.call_count == 1
    assert fake.sleeps == []


def test_transport_errors_are_retried() -> None:
    fake = FakeTime()

    async def scenario() -> httpx.Response:
        async with make_client(fake) as client:
            return await client.request("GET", ORDERS)

    with respx.mock:
        route = respx.get(ORDERS).mock(
            side_effect=[
                httpx.ConnectError("refused"),
                httpx.ReadTimeout("slow"),
                httpx.RemoteProtocolError("Server disconnected without sending a response."),
                httpx.Response(200),
            ]
        )
        response = run(scenario())

    assert response.status_code == 200
    assert route.call_count == 4
    assert len(fake.sleeps) == 3
    assert service_stats()["woocommerce"].requests == 4


def test_exhausted_transport_errors_keep_the_last_cause() -> None:
    fake = FakeTime()

    async def scenario() -> RetryExhausted:
        async with make_client(fake, max_attempts=2) as client:
            with pytest.raises(RetryExhausted) as caught:
                await client.request("GET", ORDERS)
            return caught.value

    with respx.mock:
        respx.get(ORDERS).mock(side_effect=httpx.ConnectError("connection refused"))
        error = run(scenario())

    assert error.status is None
    assert isinstance(error.__cause__, httpx.ConnectError)
    assert "last cause: ConnectError: connection refused" in error.message
    assert str(error).startswith(f"woocommerce: GET {ORDERS}: gave up after 2 attempts")


def test_a_local_protocol_error_is_not_retried() -> None:
    fake = FakeTime()

    async def scenario() -> ApiError:
        async with make_client(fake) as client:
            with pytest.raises(ApiError) as caught:
                await client.request("GET", ORDERS)
            return caught.value

    with respx.mock:
        route = respx.get(ORDERS).mock(side_effect=httpx.LocalProtocolError("bad header"))
        error = run(scenario())

    assert route.call_count == 1
    assert not isinstance(error, RetryExhausted)
    assert error.status is None
    assert "LocalProtocolError: bad header" in error.message
    assert fake.sleeps == []


# --- errors that are not retried ---------------------------------------------------------


def test_400_is_not_retried_and_surfaces_the_vendor_message() -> None:
    fake = FakeTime()
    body = {
        "errors": [
            {
                "id": "e1",
                "status": 400,
                "code": "invalid",
                "title": "Invalid input.",
                "detail": "The phone number provided either does not exist or is ineligible.",
            }
        ]
    }

    async def scenario() -> tuple[ApiError, ServiceStats]:
        async with make_client(fake, service="klaviyo") as client:
            with pytest.raises(ApiError) as caught:
                await client.request("POST", "/api/profile-import", json={"data": {}})
            return caught.value, client.stats

    with respx.mock:
        route = respx.post(f"{BASE}/api/profile-import").mock(
            return_value=httpx.Response(400, json=body)
        )
        error, stats = run(scenario())

    assert route.call_count == 1
    assert fake.sleeps == []
    assert type(error) is ApiError
    assert error.status == 400
    assert error.message == "The phone number provided either does not exist or is ineligible."
    assert error.code == "invalid"
    assert error.body == body
    assert str(error) == (
        f"klaviyo: 400 POST {BASE}/api/profile-import: "
        "The phone number provided either does not exist or is ineligible. (invalid)"
    )
    assert stats == ServiceStats(requests=1, retries=0, throttles=0, errors=1, by_status={400: 1})


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failures_raise_auth_error_with_the_woocommerce_message(status: int) -> None:
    fake = FakeTime()

    async def scenario() -> AuthError:
        async with make_client(fake) as client:
            with pytest.raises(AuthError) as caught:
                await client.get_json("/wp-json/wc/v3/orders")
            return caught.value

    with respx.mock:
        route = respx.get(ORDERS).mock(
            return_value=httpx.Response(
                status,
                json={
                    "code": "woocommerce_rest_authentication_error",
                    "message": "Invalid signature - provided signature does not match.",
                    "data": {"status": status},
                },
            )
        )
        error = run(scenario())

    assert route.call_count == 1
    assert fake.sleeps == []
    assert error.status == status
    assert error.code == "woocommerce_rest_authentication_error"
    assert str(error) == (
        f"woocommerce: {status} GET {ORDERS}: "
        "Invalid signature - provided signature does not match. "
        "(woocommerce_rest_authentication_error)"
    )


def test_secrets_in_the_query_never_reach_the_error() -> None:
    fake = FakeTime()

    async def scenario() -> ApiError:
        async with make_client(fake) as client:
            with pytest.raises(ApiError) as caught:
                await client.request(
                    "GET",
                    "/wp-json/wc/v3/orders",
                    params={"consumer_key": "ck_live1", "consumer_secret": "cs_live2", "page": 3},
                )
            return caught.value

    with respx.mock:
        respx.get(ORDERS).mock(return_value=httpx.Response(404, text="<h1>Not Found</h1>"))
        error = run(scenario())

    assert error.url == f"{ORDERS}?consumer_key=***&consumer_secret=***&page=3"
    assert "ck_live1" not in str(error)
    assert "cs_live2" not in str(error)
    assert error.message == "Not Found"


def test_an_error_without_a_body_falls_back_to_the_reason_phrase() -> None:
    fake = FakeTime()

    async def scenario() -> ApiError:
        async with make_client(fake) as client:
            with pytest.raises(ApiError) as caught:
                await client.request("DELETE", "/x")
            return caught.value

    with respx.mock:
        respx.delete(f"{BASE}/x").mock(return_value=httpx.Response(409))
        error = run(scenario())

    assert error.message == "Conflict"
    assert error.code is None
    assert error.body is None


# --- vendor rate-limit headers -----------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "X-"])
def test_rate_limit_remaining_zero_holds_the_next_request(prefix: str) -> None:
    fake = FakeTime()

    async def scenario() -> ServiceStats:
        async with make_client(fake) as client:
            await client.request("GET", ORDERS)
            assert fake.sleeps == []
            await client.request("GET", ORDERS)
            return client.stats

    with respx.mock:
        respx.get(ORDERS).mock(
            side_effect=[
                httpx.Response(
                    200,
                    headers={f"{prefix}RateLimit-Remaining": "0", f"{prefix}RateLimit-Reset": "12"},
                ),
                httpx.Response(200, headers={f"{prefix}RateLimit-Remaining": "99"}),
            ]
        )
        stats = run(scenario())

    # The second request waited for the reset before it was sent; no retry involved.
    assert fake.sleeps == [12.0]
    assert stats == ServiceStats(requests=2, retries=0, throttles=1, errors=0, by_status={200: 2})


def test_rate_limit_reset_as_a_unix_timestamp_is_understood() -> None:
    fake = FakeTime()
    reset_at = int(time.time()) + 20

    async def scenario() -> None:
        async with make_client(fake) as client:
            await client.request("GET", ORDERS)
            await client.request("GET", ORDERS)

    with respx.mock:
        respx.get(ORDERS).mock(
            side_effect=[
                httpx.Response(
                    200, headers={"RateLimit-Remaining": "0", "RateLimit-Reset": str(reset_at)}
                ),
                httpx.Response(200),
            ]
        )
        run(scenario())

    assert len(fake.sleeps) == 1
    assert 18.5 < fake.sleeps[0] <= 20.0


def test_remaining_above_zero_does_not_pause() -> None:
    fake = FakeTime()

    async def scenario() -> ServiceStats:
        async with make_client(fake) as client:
            for _ in range(3):
                await client.request("GET", ORDERS)
            return client.stats

    with respx.mock:
        respx.get(ORDERS).mock(
            return_value=httpx.Response(
                200, headers={"RateLimit-Remaining": "1", "RateLimit-Reset": "30"}
            )
        )
        stats = run(scenario())

    assert fake.sleeps == []
    assert stats.throttles == 0


class HubSpotLikeClient(ServiceClient):
    """An adapter reading its vendor's own headers through the hook."""

    def rate_limit_pause(self, response: httpx.Response) -> float | None:
        if response.headers.get("X-HubSpot-RateLimit-Remaining") == "0":
            return int(response.headers["X-HubSpot-RateLimit-Interval-Milliseconds"]) / 1000
        return None


def test_the_rate_limit_hook_can_be_overridden() -> None:
    fake = FakeTime()

    async def scenario() -> ServiceStats:
        client = HubSpotLikeClient("hubspot", BASE, sleep=fake.sleep, clock=fake.clock)
        async with client:
            await client.request("POST", "/crm/v3/objects/contacts/batch/upsert", json={})
            await client.request("POST", "/crm/v3/objects/contacts/batch/upsert", json={})
            return client.stats

    with respx.mock:
        respx.post(f"{BASE}/crm/v3/objects/contacts/batch/upsert").mock(
            return_value=httpx.Response(
                200,
                headers={
                    "X-HubSpot-RateLimit-Remaining": "0",
                    "X-HubSpot-RateLimit-Interval-Milliseconds": "10000",
                },
            )
        )
        stats = run(scenario())

    assert fake.sleeps == [10.0]
    assert stats.throttles == 2


# --- pacing with an injected clock -------------------------------------------------------


def test_waiting_for_a_slot_is_not_an_attempt() -> None:
    fake = FakeTime()

    async def scenario() -> ServiceStats:
        # One attempt each and a 2 s budget, yet the fifth waits 4 s in the queue.
        async with make_client(
            fake, requests_per_second=1.0, max_attempts=1, max_elapsed=2.0
        ) as client:
            await asyncio.gather(*(client.request("GET", ORDERS) for _ in range(5)))
            return client.stats

    with respx.mock:
        respx.get(ORDERS).mock(return_value=httpx.Response(200))
        stats = run(scenario())

    assert fake.sleeps == [1.0, 1.0, 1.0, 1.0]
    assert stats == ServiceStats(requests=5, retries=0, throttles=0, errors=0, by_status={200: 5})


class CountingTransport(httpx.AsyncBaseTransport):
    """A transport without a connection pool, so only the client's own cap limits it."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.peak = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        await asyncio.sleep(0.002)
        self.in_flight -= 1
        return httpx.Response(200)


def test_concurrency_cap_holds_whatever_the_transport() -> None:
    transport = CountingTransport()

    async def scenario() -> None:
        client = ServiceClient(
            "sandbox", BASE, limits=ServiceLimits(concurrency=2), transport=transport
        )
        async with client:
            await asyncio.gather(*(client.request("GET", "/") for _ in range(10)))

    run(scenario())

    assert transport.peak == 2


def test_limiter_requeues_callers_when_a_hold_arrives_while_they_wait() -> None:
    fake = FakeTime(start=0.0)

    async def scenario() -> float:
        limiter = RateLimiter(10.0, clock=fake.clock, sleep=fake.sleep)
        assert await limiter.acquire() == 0.0
        waiting = asyncio.create_task(limiter.acquire())
        await asyncio.sleep(0)  # it reserved the 0.1 s slot and is asleep
        limiter.hold_until(fake.now + 3.0)
        return await waiting

    waited = run(scenario())

    # It woke at 0.1 s, saw the hold until 3.1 s, and queued again behind it.
    assert fake.sleeps == pytest.approx([0.1, 3.0])
    assert waited == pytest.approx(3.1)
    assert fake.now == pytest.approx(3.1)


# --- counters ------------------------------------------------------------------------------


def test_counters_are_per_client_and_add_up_per_service() -> None:
    fake = FakeTime()

    async def scenario() -> tuple[ServiceStats, ServiceStats]:
        async with (
            make_client(fake, service="woocommerce") as first,
            make_client(fake, service="woocommerce") as second,
            make_client(fake, service="klaviyo") as other,
        ):
            await first.request("GET", ORDERS)
            await second.request("GET", ORDERS)
            with pytest.raises(ApiError):
                await other.request("GET", f"{BASE}/missing")
            return first.stats, second.stats

    with respx.mock:
        respx.get(ORDERS).mock(side_effect=[httpx.Response(502), httpx.Response(200)] * 2)
        respx.get(f"{BASE}/missing").mock(return_value=httpx.Response(404))
        first, second = run(scenario())

    expected_one = ServiceStats(
        requests=2, retries=1, throttles=0, errors=0, by_status={502: 1, 200: 1}
    )
    assert first == expected_one
    assert second == expected_one
    totals = service_stats()
    assert totals["woocommerce"] == ServiceStats(
        requests=4, retries=2, throttles=0, errors=0, by_status={502: 2, 200: 2}
    )
    assert totals["klaviyo"] == ServiceStats(
        requests=1, retries=0, throttles=0, errors=1, by_status={404: 1}
    )
    # A snapshot: editing it does not touch the live counters.
    totals["woocommerce"].by_status[200] = 999
    assert service_stats()["woocommerce"].by_status[200] == 2


# --- the request itself --------------------------------------------------------------------


def test_requests_carry_user_agent_headers_and_an_orjson_body() -> None:
    fake = FakeTime()

    async def scenario() -> tuple[Any, httpx.Response]:
        client = ServiceClient(
            "woocommerce",
            BASE,
            headers={"X-Store": "s1"},
            auth=httpx.BasicAuth("ck_a", "cs_b"),
            sleep=fake.sleep,
            clock=fake.clock,
        )
        async with client:
            return await client.request_json(
                "post",
                "/wp-json/wc/v3/customers/7",
                params={"force": "true"},
                json={"when": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), "n": 1},
            )

    with respx.mock:
        route = respx.post(f"{BASE}/wp-json/wc/v3/customers/7", params={"force": "true"}).mock(
            return_value=httpx.Response(201, json={"id": 7})
        )
        data, response = run(scenario())

    sent = route.calls.last.request
    assert sent.headers["User-Agent"] == f"syncd/{syncd.__version__}"
    assert sent.headers["X-Store"] == "s1"
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.headers["Authorization"].startswith("Basic ")
    assert orjson.loads(sent.content) == {"when": "2024-01-02T03:04:05+00:00", "n": 1}
    assert data == {"id": 7}
    assert response.status_code == 201


def test_a_callers_content_type_replaces_the_json_default() -> None:
    fake = FakeTime()

    async def scenario() -> None:
        async with make_client(fake, service="klaviyo") as client:
            await client.request(
                "POST",
                "/api/events",
                json={"data": {"type": "event"}},
                headers={"content-type": "application/vnd.api+json"},
            )

    with respx.mock:
        route = respx.post(f"{BASE}/api/events").mock(return_value=httpx.Response(202))
        run(scenario())

    sent = route.calls.last.request
    assert sent.headers.get_list("Content-Type") == ["application/vnd.api+json"]


def test_get_json_parses_and_reports_non_json_and_redirects() -> None:
    fake = FakeTime()

    async def scenario() -> list[Any]:
        results: list[Any] = []
        async with make_client(fake) as client:
            results.append((await client.get_json("/ok"))[0])
            results.append((await client.get_json("/empty"))[0])
            for path in ("/html", "/moved"):
                with pytest.raises(ApiError) as caught:
                    await client.get_json(path, params={"consumer_secret": "cs_x"})
                results.append(caught.value)
            results.append(client.stats.errors)
        return results

    with respx.mock:
        respx.get(f"{BASE}/ok").mock(return_value=httpx.Response(200, json={"a": [1, 2]}))
        respx.get(f"{BASE}/empty").mock(return_value=httpx.Response(204))
        respx.get(f"{BASE}/html").mock(
            return_value=httpx.Response(200, text="<html><body>Maintenance</body></html>")
        )
        respx.get(f"{BASE}/moved").mock(
            return_value=httpx.Response(
                301, headers={"Location": "https://shop.example/moved?consumer_secret=cs_x"}
            )
        )
        ok, empty, not_json, moved, errors = run(scenario())

    assert ok == {"a": [1, 2]}
    assert empty is None
    assert "expected JSON" in not_json.message and "Maintenance" in not_json.message
    assert moved.status == 301
    assert moved.message == (
        "redirected to https://shop.example/moved?consumer_secret=***; use that URL"
    )
    assert "cs_x" not in str(not_json) + str(moved)
    assert errors == 2


def test_retry_log_lines_are_redacted_and_carry_the_details(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    capture = LogCapture()
    monkeypatch.setattr(
        http_module, "log", structlog.wrap_logger(structlog.PrintLogger(), processors=[capture])
    )
    fake = FakeTime()

    async def scenario() -> None:
        client = ServiceClient(
            "woocommerce",
            BASE,
            headers={"Authorization": "Bearer sekrit-token"},
            sleep=fake.sleep,
            clock=fake.clock,
            rng=random.Random(3),
        )
        async with client:
            await client.request(
                "GET", "/wp-json/wc/v3/orders", params={"oauth_signature": "sig123", "page": 2}
            )

    with respx.mock:
        respx.get(ORDERS).mock(
            side_effect=[httpx.Response(503), httpx.ConnectError("x"), httpx.Response(200)]
        )
        run(scenario())

    retries = [e for e in capture.entries if e["event"] == "http.retry"]
    assert [e.get("status") for e in retries] == [503, None]
    assert [e.get("error") for e in retries] == [None, "ConnectError"]
    assert [e["attempt"] for e in retries] == [1, 2]
    assert [e["wait"] for e in retries] == [round(w, 3) for w in fake.sleeps]
    assert all(e["url"] == f"{ORDERS}?oauth_signature=***&page=2" for e in retries)
    assert all(e["service"] == "woocommerce" and e["method"] == "GET" for e in retries)
    logged = repr(capture.entries)
    assert "sig123" not in logged
    assert "sekrit" not in logged


def test_invalid_limits_are_rejected() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        ServiceLimits(concurrency=0)
    with pytest.raises(ValueError, match="requests_per_second"):
        ServiceLimits(requests_per_second=0)
    with pytest.raises(ValueError, match="max_attempts"):
        ServiceLimits(max_attempts=0)


# --- pure helpers ----------------------------------------------------------------------------

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        ("  5 ", 5.0),
        ("1.5", 1.5),
        ("0", 0.0),
        ("-3", 0.0),
        ("Wed, 01 May 2024 12:00:30 GMT", 30.0),  # IMF-fixdate
        ("Wednesday, 01-May-24 12:01:00 GMT", 60.0),  # RFC 850
        ("Wed May  1 12:00:10 2024", 10.0),  # asctime
        ("Wed, 01 May 2024 11:00:00 GMT", 0.0),  # in the past
        (None, None),
        ("", None),
        ("soon", None),
        ("nan", None),
        ("inf", None),
        ("1e3", None),
        ("Wed, 99 May 2024 12:00:30 GMT", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == expected


@given(st.text())
def test_parse_retry_after_never_raises(value: str) -> None:
    result = parse_retry_after(value)
    assert result is None or (math.isfinite(result) and result >= 0.0)


@given(
    st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1)),
    st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1)),
)
def test_parse_retry_after_reads_any_http_date(when: datetime, now: datetime) -> None:
    when = when.replace(microsecond=0, tzinfo=UTC)
    now = now.replace(tzinfo=UTC)
    header = format_datetime(when, usegmt=True)
    assert parse_retry_after(header, now=now) == max(0.0, (when - now).total_seconds())


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "https://shop.example/wp-json/wc/v3/orders?consumer_key=ck_1&consumer_secret=cs_2&page=2",
            "https://shop.example/wp-json/wc/v3/orders?consumer_key=***&consumer_secret=***&page=2",
        ),
        (
            "http://h/x?oauth_consumer_key=a&oauth_signature=b%3D&oauth_nonce=n",
            "http://h/x?oauth_consumer_key=***&oauth_signature=***&oauth_nonce=***",
        ),
        (
            "http://h/x?API_KEY=a&access_token=b&Token=c&key=d&secret=e&password=f&signature=g",
            "http://h/x?API_KEY=***&access_token=***&Token=***&key=***&secret=***"
            "&password=***&signature=***",
        ),
        ("http://h/x?hapikey_token=a&sort=key", "http://h/x?hapikey_token=***&sort=key"),
        ("https://user:pw@h/x?a=1", "https://user:***@h/x?a=1"),
        ("http://h/plain", "http://h/plain"),
        ("http://[::1/x?token=abc", "http://[::1/x?token=***"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {"code": "rest_no_route", "message": "No route was found", "data": {"status": 404}},
            ("No route was found", "rest_no_route"),
        ),
        (
            {"error": {"code": 400, "message": "Bad list id", "status": "INVALID_ARGUMENT"}},
            ("Bad list id", "400"),
        ),
        (
            {"error": {"message": "Invalid OAuth access token.", "type": "OAuthException"}},
            ("Invalid OAuth access token.", None),
        ),
        (
            {"error": "invalid_grant", "error_description": "Token has expired"},
            ("Token has expired", "invalid_grant"),
        ),
        ({"error": "Not allowed"}, ("Not allowed", None)),
        (
            {"title": "Member Exists", "status": 400, "detail": "a@b.c is already a member."},
            ("a@b.c is already a member.", None),
        ),
        (
            {
                "status": "error",
                "message": "You have reached your secondly limit.",
                "errorType": "RATE_LIMIT",
            },
            ("You have reached your secondly limit.", "RATE_LIMIT"),
        ),
        ({"errors": {"email": ["is invalid"]}}, ("email: is invalid", None)),
        ([{"message": "first of a list"}], ("first of a list", None)),
        ("<html><head><title>502 Bad Gateway</title></head></html>", ("502 Bad Gateway", None)),
        ("x" * 2000, ("x" * 499 + "…", None)),
        (None, ("", None)),
        ({"unrelated": 1}, ("", None)),
    ],
)
def test_vendor_message_shapes(body: Any, expected: tuple[str, str | None]) -> None:
    assert vendor_message(body) == expected


# --- against a real socket on 127.0.0.1 ------------------------------------------------------

Handler = Callable[[int], Awaitable["Reply | None"]]


@dataclass
class Reply:
    status: int = 200
    body: bytes = b"{}"
    headers: dict[str, str] = field(default_factory=dict)


class LocalServer:
    """A tiny HTTP/1.1 server with keep-alive; a handler returning None drops the
    connection without answering, the way a crashing upstream or a proxy does."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests = 0
        self.connections = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> LocalServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.decode("latin-1").split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                if length:
                    await reader.readexactly(length)
                index = self.requests
                self.requests += 1
                reply = await self.handler(index)
                if reply is None:
                    writer.transport.abort()
                    return
                headers = {"Content-Length": str(len(reply.body)), **reply.headers}
                lines = [f"HTTP/1.1 {reply.status} X"] + [f"{k}: {v}" for k, v in headers.items()]
                writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + reply.body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()


async def no_wait(_seconds: float) -> None:
    """Backoff waits skipped: these tests are about the transport, not the timing."""


@pytest.mark.timeout(10)
def test_real_dropped_connections_and_503s_are_retried() -> None:
    async def handler(index: int) -> Reply | None:
        if index < 2:
            return None  # connection closed without a response
        if index < 4:
            return Reply(503, b"busy", {"Connection": "close"})
        return Reply(200, b'{"ok": true}', {"Content-Type": "application/json"})

    async def scenario() -> tuple[Any, ServiceStats, int]:
        async with LocalServer(handler) as server:
            client = ServiceClient("sandbox", server.url, sleep=no_wait)
            async with client:
                data, _ = await client.get_json("/wp-json/wc/v3/orders")
            return data, client.stats, server.requests

    data, stats, served = run(scenario())

    assert data == {"ok": True}
    assert served == 5
    assert stats == ServiceStats(
        requests=5, retries=4, throttles=0, errors=0, by_status={503: 2, 200: 1}
    )


@pytest.mark.timeout(10)
def test_real_read_timeout_is_retried() -> None:
    release = asyncio.Event()

    async def handler(index: int) -> Reply | None:
        if index == 0:
            await release.wait()  # never answers in time
        return Reply(200, b"[]")

    async def scenario() -> tuple[int, int]:
        async with LocalServer(handler) as server:
            client = ServiceClient(
                "sandbox", server.url, limits=ServiceLimits(timeout=0.2), sleep=no_wait
            )
            async with client:
                response = await client.request("GET", "/slow")
            release.set()
            return response.status_code, server.requests

    status, served = run(scenario())

    assert status == 200
    assert served == 2


@pytest.mark.timeout(10)
def test_real_unreachable_port_exhausts_with_a_connect_error() -> None:
    async def scenario() -> RetryExhausted:
        # Bind, learn the port, close: nothing listens there any more.
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        client = ServiceClient(
            "sandbox",
            f"http://127.0.0.1:{port}",
            limits=ServiceLimits(max_attempts=3),
            sleep=no_wait,
        )
        async with client:
            with pytest.raises(RetryExhausted) as caught:
                await client.request("GET", "/")
        return caught.value

    error = run(scenario())

    assert error.attempts == 3
    assert isinstance(error.__cause__, httpx.ConnectError)


@pytest.mark.timeout(10)
def test_real_concurrency_cap_holds() -> None:
    in_flight = 0
    peak = 0

    async def handler(index: int) -> Reply | None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.03)
        in_flight -= 1
        return Reply()

    async def scenario() -> tuple[int, int]:
        async with LocalServer(handler) as server:
            client = ServiceClient("sandbox", server.url, limits=ServiceLimits(concurrency=3))
            async with client:
                await asyncio.gather(*(client.request("GET", "/") for _ in range(15)))
            return server.requests, server.connections

    served, connections = run(scenario())

    assert served == 15
    # Never above the cap, and the cap is actually used (requests ran in parallel).
    assert peak == 3
    # Keep-alive: the pool reuses its connections instead of opening one per request.
    assert connections <= 3


@pytest.mark.timeout(10)
def test_real_requests_per_second_pacing_holds() -> None:
    rate = 25.0
    count = 8
    arrivals: list[float] = []

    async def handler(index: int) -> Reply | None:
        arrivals.append(time.monotonic())
        return Reply()

    async def scenario() -> float:
        async with LocalServer(handler) as server:
            client = ServiceClient(
                "sandbox",
                server.url,
                limits=ServiceLimits(requests_per_second=rate, concurrency=count),
            )
            async with client:
                started = time.monotonic()
                await asyncio.gather(*(client.request("GET", "/") for _ in range(count)))
                return time.monotonic() - started

    elapsed = run(scenario())

    assert len(arrivals) == count
    # N requests at R/s cannot finish before (N-1)/R, however many run concurrently.
    assert elapsed >= (count - 1) / rate - 0.002
    # The spacing is even, not one burst after a long wait (the median shrugs off a
    # single scheduling hiccup of a busy machine).
    gaps = sorted(b - a for a, b in itertools.pairwise(arrivals))
    assert gaps[len(gaps) // 2] >= 0.5 / rate
    # And pacing does not serialize further than asked.
    assert elapsed < (count - 1) / rate + 1.0


def test_a_response_and_its_body_are_freed_without_the_cycle_collector() -> None:
    # httpx links a response and its stream both ways; unbroken, every page of a sync
    # (body included) lives until a full collection, and memory grows with the pages read.
    import gc
    import weakref

    fake = FakeTime()

    async def scenario() -> weakref.ref[httpx.Response]:
        async with make_client(fake) as client:
            body, response = await client.request_json("GET", "/wp-json/wc/v3/orders")
            assert body == [{"id": 1}]
            return weakref.ref(response)

    gc.collect()
    gc.disable()
    try:
        with respx.mock:
            respx.get(ORDERS).mock(return_value=httpx.Response(200, json=[{"id": 1}]))
            ref = run(scenario())
        assert ref() is None
    finally:
        gc.enable()


# --- OAuth 2.0 refresh tokens ------------------------------------------------------------

TOKEN_URL = "https://oauth.example.com/token"
API = "https://api.example.com"
REFRESH = "rt-1//0gSECRETrefresh"
CLIENT_SECRET = "cs-GOCSPX-secret"


def oauth_client(fake: FakeTime, **kwargs: Any) -> tuple[ServiceClient, OAuth2RefreshAuth]:
    auth = OAuth2RefreshAuth(
        "ads",
        TOKEN_URL,
        client_id="client-1",
        client_secret=SecretStr(CLIENT_SECRET),
        refresh_token=SecretStr(REFRESH),
        clock=fake.clock,
        **kwargs,
    )
    client = ServiceClient(
        "ads",
        API,
        limits=ServiceLimits(max_attempts=2),
        auth=auth,
        sleep=fake.sleep,
        clock=fake.clock,
        rng=random.Random(0),
    )
    return client, auth


def token_answer(access: str, expires_in: int | None = 3600) -> httpx.Response:
    body: dict[str, Any] = {"access_token": access, "token_type": "Bearer"}
    if expires_in is not None:
        body["expires_in"] = expires_in
    return httpx.Response(200, json=body)


def bearer(request: httpx.Request) -> str:
    return request.headers["Authorization"]


def test_oauth_refresh_form_follows_rfc_6749_section_6() -> None:
    fake = FakeTime()
    client, _auth = oauth_client(fake, scope="https://www.googleapis.com/auth/adwords")
    with respx.mock(assert_all_called=False) as router:
        token = router.post(TOKEN_URL).mock(return_value=token_answer("at-1"))
        api = router.get(f"{API}/lists").mock(return_value=httpx.Response(200, json={}))
        run(client.request("GET", "/lists"))
    form = dict(parse_qsl(token.calls.last.request.content.decode()))
    assert form == {
        "grant_type": "refresh_token",
        "refresh_token": REFRESH,
        "client_id": "client-1",
        "client_secret": CLIENT_SECRET,
        "scope": "https://www.googleapis.com/auth/adwords",
    }
    assert token.calls.last.request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert bearer(api.calls.last.request) == "Bearer at-1"


def test_oauth_a_401_refreshes_once_and_retries_the_request_once() -> None:
    fake = FakeTime()
    client, _auth = oauth_client(fake)

    async def scenario() -> None:
        await client.request("GET", "/lists")  # fetches at-1
        await client.request("GET", "/lists")  # at-1 was revoked: 401, refresh, at-2

    with respx.mock(assert_all_called=False) as router:
        token = router.post(TOKEN_URL).mock(
            side_effect=[token_answer("at-1"), token_answer("at-2")]
        )
        seen: list[str] = []

        def answer(request: httpx.Request) -> httpx.Response:
            seen.append(bearer(request))
            revoked = bearer(request) == "Bearer at-1" and len(seen) > 1
            return httpx.Response(401 if revoked else 200, json={})

        api = router.get(f"{API}/lists").mock(side_effect=answer)
        run(scenario())
    assert token.call_count == 2  # the first token, then exactly one refresh
    assert [bearer(c.request) for c in api.calls] == [
        "Bearer at-1",
        "Bearer at-1",
        "Bearer at-2",
    ]


def test_oauth_a_second_401_is_the_apis_answer_not_another_refresh() -> None:
    fake = FakeTime()
    client, _ = oauth_client(fake)
    with respx.mock(assert_all_called=False) as router:
        token = router.post(TOKEN_URL).mock(
            side_effect=[token_answer("at-1"), token_answer("at-2"), token_answer("at-3")]
        )
        api = router.get(f"{API}/lists").mock(
            return_value=httpx.Response(401, json={"message": "no access to this account"})
        )
        with pytest.raises(AuthError, match="no access to this account"):
            run(client.request("GET", "/lists"))
    assert token.call_count == 2
    assert api.call_count == 2


def test_oauth_an_expired_token_is_refreshed_before_the_request() -> None:
    fake = FakeTime()
    client, _auth = oauth_client(fake)

    async def scenario() -> None:
        await client.request("GET", "/lists")
        fake.now += 3600  # past expires_in: the next request must not carry at-1
        await client.request("GET", "/lists")

    with respx.mock(assert_all_called=False) as router:
        token = router.post(TOKEN_URL).mock(
            side_effect=[token_answer("at-1"), token_answer("at-2")]
        )
        api = router.get(f"{API}/lists").mock(return_value=httpx.Response(200, json={}))
        run(scenario())
    assert token.call_count == 2
    assert [bearer(c.request) for c in api.calls] == ["Bearer at-1", "Bearer at-2"]


def test_oauth_concurrent_requests_share_one_refresh() -> None:
    fake = FakeTime()
    client, auth = oauth_client(fake)

    issued: list[str] = []

    async def slow_token(request: httpx.Request) -> httpx.Response:
        issued.append(f"at-{len(issued) + 1}")
        await asyncio.sleep(0.01)  # the others arrive while this refresh is in flight
        return token_answer(issued[-1])

    async def scenario() -> None:
        await asyncio.gather(*(client.request("GET", "/lists") for _ in range(4)))
        # Every one of them now holds a revoked token: one refresh serves them all.
        revoked.add("Bearer at-1")
        await asyncio.gather(*(client.request("GET", "/lists") for _ in range(4)))

    revoked: set[str] = set()
    with respx.mock(assert_all_called=False) as router:
        token = router.post(TOKEN_URL).mock(side_effect=slow_token)
        api = router.get(f"{API}/lists").mock(
            side_effect=lambda request: httpx.Response(
                401 if bearer(request) in revoked else 200, json={}
            )
        )
        run(scenario())
    assert token.call_count == 2
    assert auth.refreshes == 2
    assert [bearer(c.request) for c in api.calls].count("Bearer at-2") == 4


def test_oauth_invalid_grant_is_a_clear_configuration_error_and_no_token_leaks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeTime()
    client, auth = oauth_client(fake)
    caplog.set_level("DEBUG")
    refusal = {
        "error": "invalid_grant",
        # An endpoint that echoes the token it refused must not make it leak.
        "error_description": f"Token has been expired or revoked: {REFRESH}",
    }
    with structlog.testing.capture_logs() as logs, respx.mock(assert_all_called=False) as router:
        token = router.post(TOKEN_URL).mock(return_value=httpx.Response(400, json=refusal))
        api = router.get(f"{API}/lists")
        with pytest.raises(OAuthError) as caught:
            run(client.request("GET", "/lists"))
    error = caught.value
    assert isinstance(error, AuthError)  # fails the run, never retried or bisected
    assert error.status == 400 and error.code == "invalid_grant"
    assert "authorize syncd again" in str(error)
    assert token.call_count == 1 and api.call_count == 0
    seen = " ".join([str(error), repr(error), repr(auth), str(logs), caplog.text])
    assert REFRESH not in seen and CLIENT_SECRET not in seen


def test_oauth_access_token_never_reaches_logs_or_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeTime()
    client, auth = oauth_client(fake)
    caplog.set_level("DEBUG")
    with structlog.testing.capture_logs() as logs, respx.mock(assert_all_called=False) as router:
        router.post(TOKEN_URL).mock(return_value=token_answer("at-SECRET-ACCESS"))
        router.get(f"{API}/lists").mock(
            return_value=httpx.Response(403, json={"message": "permission denied"})
        )
        with pytest.raises(AuthError) as caught:
            run(client.request("GET", "/lists"))
    assert any(entry["event"] == "oauth.refreshed" for entry in logs)
    seen = " ".join([str(caught.value), repr(caught.value), repr(auth), str(logs), caplog.text])
    assert "at-SECRET-ACCESS" not in seen and REFRESH not in seen
