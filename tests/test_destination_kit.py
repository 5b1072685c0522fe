"""The destination kit (syncd.destinations.base): how a refusal is classified, the
operation table, paginators and their repeated-token guard, job polling, byte-capped
chunking and the per-adapter client class. Runs a minimal adapter against respx."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, ClassVar

import httpx
import pytest
import respx
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr

from syncd.destinations.base import (
    BatchRejected,
    Destination,
    Handler,
    Item,
    JobTimeout,
    NoOptions,
    Op,
    Outcome,
    PaginationLoop,
    SyncTarget,
    byte_chunks,
    cursor_pages,
    next_link_pages,
    offset_pages,
)
from syncd.http import ApiError, AuthError, OAuth2RefreshAuth, ServiceClient, ServiceLimits

API = "https://api.example.com"
FAST = ServiceLimits(requests_per_second=None, max_attempts=2, backoff_base=0.001)
TARGET = SyncTarget(name="s", mode="upsert", object=None, options=NoOptions())
ITEMS = [Item(key="1", payload={"email": "a@example.com"})]


class PausingClient(ServiceClient):
    """A vendor whose rate-limit header is its own: ``X-Vendor-Wait: <seconds>``."""

    def rate_limit_pause(self, response: httpx.Response) -> float | None:
        wait = response.headers.get("X-Vendor-Wait")
        return float(wait) if wait else None


class Tiny(Destination):
    """A minimal adapter: upsert posts the payloads; nothing else is supported."""

    type: ClassVar[str] = "tiny"
    modes: ClassVar[frozenset[str]] = frozenset({"upsert"})
    max_batch: ClassVar[Mapping[str, int]] = {"upsert": 3}
    credential_names: ClassVar[tuple[str, ...]] = ()
    default_limits: ClassVar[ServiceLimits] = FAST

    @classmethod
    def default_base_url(cls, credentials: Mapping[str, SecretStr]) -> str:
        return API

    def handlers(self) -> Mapping[Op, Handler]:
        return {"upsert": self._upsert}

    async def _upsert(self, target: SyncTarget, items: Sequence[Item]) -> list[Outcome]:
        await self.call("POST", "/records", json=[item.payload for item in items])
        return [Outcome.accepted() for _ in items]


class Strict(Tiny):
    # A vendor documenting 400 alone as a content refusal.
    content_statuses: ClassVar[frozenset[int]] = frozenset({400})


class Pacing(Tiny):
    client_class = PausingClient


class TwoClasses(Tiny):
    """An OAuth account with a second rate class, as Google Ads and HubSpot will be."""

    @classmethod
    def auth(cls, credentials: Mapping[str, SecretStr]) -> httpx.Auth | None:
        return OAuth2RefreshAuth(
            "two",
            f"{API}/token",
            client_id="c",
            client_secret=SecretStr("cs"),
            refresh_token=SecretStr("rt"),
        )

    def setup(self) -> None:
        self.events_client = self.make_client("events", FAST)


def run(dest: Destination, coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        try:
            return await coro
        finally:
            await dest.aclose()

    return asyncio.run(main())


def tiny(cls: type[Tiny] = Tiny) -> Tiny:
    return cls("t", {}, NoOptions())


# --- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 409, 413, 422])
def test_a_content_status_is_a_batch_refusal_with_the_vendors_message(status: int) -> None:
    dest = tiny()
    with respx.mock(base_url=API) as router:
        route = router.post("/records").respond(status, json={"message": "email is invalid"})
        with pytest.raises(BatchRejected) as caught:
            run(dest, dest.send(TARGET, "upsert", ITEMS))
    assert caught.value.message == "email is invalid"
    assert route.call_count == 1


@pytest.mark.parametrize("status", [404, 405, 410])
def test_a_configuration_status_fails_the_run_after_one_request(status: int) -> None:
    dest = tiny()
    with respx.mock(base_url=API) as router:
        route = router.post("/records").respond(status, json={"message": "no such list"})
        with pytest.raises(ApiError, match="no such list") as caught:
            run(dest, dest.send(TARGET, "upsert", ITEMS))
    assert not isinstance(caught.value, BatchRejected)
    assert caught.value.status == status
    assert route.call_count == 1


@pytest.mark.parametrize("status", [401, 403])
def test_auth_errors_fail_the_run(status: int) -> None:
    dest = tiny()
    with respx.mock(base_url=API) as router:
        router.post("/records").respond(status, json={"message": "bad key"})
        with pytest.raises(AuthError, match="bad key"):
            run(dest, dest.send(TARGET, "upsert", ITEMS))


def test_exhausted_retries_are_never_a_batch_refusal() -> None:
    dest = tiny()
    with respx.mock(base_url=API) as router:
        route = router.post("/records").respond(503)
        with pytest.raises(ApiError) as caught:
            run(dest, dest.send(TARGET, "upsert", ITEMS))
    assert not isinstance(caught.value, BatchRejected)
    assert route.call_count == FAST.max_attempts


def test_an_adapter_narrows_the_content_statuses() -> None:
    dest = tiny(Strict)
    with respx.mock(base_url=API) as router:
        router.post("/records").respond(422, json={"message": "a proxy's 422"})
        with pytest.raises(ApiError) as caught:
            run(dest, dest.send(TARGET, "upsert", ITEMS))
    assert not isinstance(caught.value, BatchRejected)


# --- the operation table -------------------------------------------------------------------


def test_an_unsupported_operation_and_an_oversized_batch_send_nothing() -> None:
    dest = tiny()
    with respx.mock(base_url=API, assert_all_called=False) as router:
        route = router.post("/records").respond(200)
        with pytest.raises(ValueError, match="does not support 'delete'"):
            run(dest, dest.send(TARGET, "delete", ITEMS))
        dest = tiny()
        with pytest.raises(ValueError, match="at most 3"):
            run(dest, dest.send(TARGET, "upsert", ITEMS * 4))
        dest = tiny()
        assert run(dest, dest.send(TARGET, "upsert", [])) == []
    assert route.call_count == 0


# --- the adapter's own client class --------------------------------------------------------


def test_the_client_class_reads_the_vendors_rate_limit_header() -> None:
    dest = tiny(Pacing)
    assert type(dest.client) is PausingClient
    assert type(dest.make_client("events", FAST)) is PausingClient

    async def scenario() -> float:
        await dest.send(TARGET, "upsert", ITEMS)
        return dest.client._limiter.hold_remaining()

    with respx.mock(base_url=API) as router:
        router.post("/records").respond(200, headers={"X-Vendor-Wait": "30"})
        held = run(dest, scenario())
    assert 29 < held <= 30


def test_every_client_of_an_account_shares_one_auth_and_is_counted_and_closed() -> None:
    dest = tiny(TwoClasses)

    async def scenario() -> int:
        await asyncio.gather(
            dest.client.request("GET", "/a"), dest.events_client.request("GET", "/b")
        )
        return dest.request_count()

    with respx.mock(base_url=API) as router:
        token = router.post("/token").respond(
            200, json={"access_token": "at", "token_type": "bearer", "expires_in": 3600}
        )
        router.get("/a").respond(200)
        router.get("/b").respond(200)
        assert run(dest, scenario()) == 2
    assert token.call_count == 1  # one refresh for both rate classes
    assert dest.client._client.is_closed and dest.events_client._client.is_closed


# --- paginators ----------------------------------------------------------------------------


async def _collect(pages: Any) -> list[Any]:
    return [item async for item in pages]


def _pages_run(coro_factory: Any) -> Any:
    async def main() -> Any:
        async with ServiceClient("v", API, limits=FAST) as client:
            return await coro_factory(client)

    return asyncio.run(main())


def test_next_link_pages_follow_the_links_query_on_our_own_path() -> None:
    with respx.mock(base_url=API) as router:
        route = router.get("/items").mock(
            side_effect=[
                httpx.Response(
                    200, json={"data": [1, 2], "links": {"next": "https://evil.example/x?c=2"}}
                ),
                httpx.Response(200, json={"data": [3], "links": {"next": None}}),
            ]
        )
        items = _pages_run(
            lambda client: _collect(
                next_link_pages(
                    client,
                    "/items",
                    {"size": 2},
                    items=lambda body: body["data"],
                    next_link=lambda body: body["links"]["next"],
                )
            )
        )
    assert items == [1, 2, 3]
    assert [str(c.request.url) for c in route.calls] == [f"{API}/items?size=2", f"{API}/items?c=2"]


def test_a_next_link_handed_twice_stops_the_paginator() -> None:
    page = {"data": [1], "links": {"next": f"{API}/items?page%5Bcursor%5D=abc"}}
    with respx.mock(base_url=API) as router:
        route = router.get("/items").respond(200, json=page)  # the same link forever
        with pytest.raises(PaginationLoop, match="same page token twice"):
            _pages_run(
                lambda client: _collect(
                    next_link_pages(
                        client,
                        "/items",
                        {},
                        items=lambda body: body["data"],
                        next_link=lambda body: body["links"]["next"],
                    )
                )
            )
    assert route.call_count == 2


def test_a_cursor_handed_twice_stops_the_paginator() -> None:
    cursors = iter(["c1", "c2", "c1"])  # goes round: c1 -> c2 -> c1
    with respx.mock(base_url=API) as router:
        route = router.get("/items").mock(
            side_effect=lambda request: httpx.Response(
                200, json={"results": [request.url.params.get("after")], "next": next(cursors)}
            )
        )
        with pytest.raises(PaginationLoop):
            _pages_run(
                lambda client: _collect(
                    cursor_pages(
                        client,
                        "/items",
                        {"limit": 100},
                        items=lambda body: body["results"],
                        next_cursor=lambda body: body["next"],
                        cursor_param="after",
                    )
                )
            )
    assert route.call_count == 3


def test_cursor_pages_stop_at_the_last_page() -> None:
    with respx.mock(base_url=API) as router:
        router.get("/items").mock(
            side_effect=[
                httpx.Response(200, json={"results": ["a"], "next": "c1"}),
                httpx.Response(200, json={"results": ["b"], "next": ""}),
            ]
        )
        items = _pages_run(
            lambda client: _collect(
                cursor_pages(
                    client,
                    "/items",
                    {},
                    items=lambda body: body["results"],
                    next_cursor=lambda body: body["next"],
                    cursor_param="after",
                )
            )
        )
    assert items == ["a", "b"]


def test_offset_pages_stop_at_the_total_or_an_empty_page() -> None:
    pages = {0: [1, 2], 2: [3, 4], 4: [5]}
    with respx.mock(base_url=API) as router:
        route = router.get("/segments").mock(
            side_effect=lambda request: httpx.Response(
                200,
                json={"segments": pages[int(request.url.params["offset"])], "total_items": 5},
            )
        )
        items = _pages_run(
            lambda client: _collect(
                offset_pages(
                    client,
                    "/segments",
                    {"count": 2},
                    items=lambda body: body["segments"],
                    total=lambda body: body["total_items"],
                )
            )
        )
    assert items == [1, 2, 3, 4, 5]
    assert route.call_count == 3


# --- job polling ---------------------------------------------------------------------------


def _polling(dest: Destination, states: list[str], timeout: float) -> tuple[Any, list[float]]:
    sleeps: list[float] = []

    async def no_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    dest.poll_sleep = no_sleep
    answers = iter(states)

    async def fetch() -> str:
        return next(answers)

    async def scenario() -> str:
        return await dest.poll_job(
            fetch,
            lambda state: state == "done",
            first="queued",
            timeout=timeout,
            what="job J1",
            state=repr,
            url="/jobs/J1",
        )

    return run(dest, scenario()), sleeps


def test_poll_job_backs_off_to_its_cap_until_done() -> None:
    dest = tiny()
    dest.poll_interval_max = 5.0
    result, sleeps = _polling(dest, ["running"] * 4 + ["done"], timeout=100)
    assert result == "done"
    assert sleeps == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_poll_job_gives_up_at_its_deadline() -> None:
    dest = tiny()
    with pytest.raises(JobTimeout, match="job J1 still 'running' after 7s") as caught:
        _polling(dest, ["running"] * 10, timeout=7)
    assert caught.value.elapsed == 7.0


# --- byte-capped chunking ------------------------------------------------------------------


def test_byte_chunks_respect_the_byte_cap_with_envelope_and_commas() -> None:
    rows = [(n, b"x" * 10) for n in range(5)]
    # envelope 5 + 10 + 1 + 10 = 26 fits 26; a third row would need 37.
    chunks = list(byte_chunks(rows, envelope=5, max_bytes=26, max_rows=100))
    assert [[n for n, _ in chunk] for chunk in chunks] == [[0, 1], [2, 3], [4]]
    chunks = list(byte_chunks(rows, envelope=5, max_bytes=25, max_rows=100))
    assert [len(chunk) for chunk in chunks] == [1, 1, 1, 1, 1]


@given(
    sizes=st.lists(st.integers(min_value=0, max_value=50), max_size=40),
    envelope=st.integers(min_value=0, max_value=20),
    max_bytes=st.integers(min_value=1, max_value=200),
    max_rows=st.integers(min_value=1, max_value=10),
)
def test_byte_chunks_keep_order_and_both_caps(
    sizes: list[int], envelope: int, max_bytes: int, max_rows: int
) -> None:
    rows = [(n, b"x" * size) for n, size in enumerate(sizes)]
    chunks = list(byte_chunks(rows, envelope, max_bytes, max_rows))
    assert [n for chunk in chunks for n, _ in chunk] == list(range(len(rows)))
    for chunk in chunks:
        assert 1 <= len(chunk) <= max_rows
        body = envelope + sum(len(raw) for _, raw in chunk) + len(chunk) - 1
        # Only a row too big on its own may pass the byte cap, alone.
        assert body <= max_bytes or len(chunk) == 1
    for first, second in itertools.pairwise(chunks):
        # A chunk is cut only when the next row would not fit.
        joined = envelope + sum(len(raw) for _, raw in first) + len(first) + len(second[0][1])
        assert joined > max_bytes or len(first) == max_rows


def test_byte_chunks_respect_the_count_cap() -> None:
    rows = [(n, b"x") for n in range(7)]
    chunks = list(byte_chunks(rows, envelope=2, max_bytes=10_000, max_rows=3))
    assert [len(chunk) for chunk in chunks] == [3, 3, 1]
    assert [n for chunk in chunks for n, _ in chunk] == list(range(7))
