"""What every destination sandbox shares: the request log and faults, request and
response records, fixed rate windows, the vendors' common error answers."""

from __future__ import annotations

import contextlib
import math
import re
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from typing import TYPE_CHECKING, Any, Final

import orjson

from syncd.sandbox.server import FaultsAndLog

if TYPE_CHECKING:
    from syncd.sandbox.destinations import DestinationSandbox

Json = dict[str, Any]
Clock = Callable[[], float]

# A deliverable-looking address, stricter than syncd.identity's "x@y.z" on purpose: the
# vendors refuse addresses identity lets through (consecutive dots, a one-letter TLD), and
# those refusals are what per-row errors are for.
_VENDOR_EMAIL: Final = re.compile(
    r"^(?!\.)(?!.*\.\.)[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+(?<!\.)"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$"
)
_JSON: Final = "application/json; charset=utf-8"


def _valid_email(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 254 and _VENDOR_EMAIL.match(value) is not None


def _utc_iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds")


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A fixed-window limit: ``burst`` requests per second and ``steady`` per minute."""

    burst: int
    steady: int

    def __post_init__(self) -> None:
        if self.burst < 1 or self.steady < 1:
            raise ValueError("rate limits must allow at least one request per window")


@dataclass(frozen=True, slots=True)
class DestRequest:
    """One request as a destination sandbox saw it.

    ``path`` is relative to the vendor's prefix (``/api/events``, ``/lists/abc``, the
    receiver name for webhooks); ``status`` is None for a dropped connection; ``fault`` is
    ``rate_limit``, ``server_error``, ``drop``, ``throttled`` (a vendor rate or concurrency
    limit, not an injected fault) or None. ``body`` is the parsed JSON body (None when the
    body was empty, not JSON, or body logging is off); ``size`` its length in bytes.
    """

    vendor: str
    method: str
    path: str
    query: dict[str, str]
    status: int | None
    fault: str | None
    size: int
    body: Any
    at: float
    # The adapter's X-Syncd-Consent header: the consent rule of the sync it was sent for.
    consent: str | None = None
    user_agent: str | None = None  # syncd's clients say "syncd/<version>"


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: Message
    body: bytes

    def param(self, name: str) -> str | None:
        value = None
        for key, item in self.query:
            if key == name:
                value = item
        return value


@dataclass(slots=True)
class _Response:
    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    fault: str | None = None


class _Reply(Exception):
    """Raised inside request handling to answer at once with ``response``."""

    def __init__(self, response: _Response) -> None:
        super().__init__(response.status)
        self.response = response


class _FixedWindows:
    """Fixed 1 s and 60 s windows aligned to the clock, as Klaviyo counts them."""

    __slots__ = ("_minute", "_minute_count", "_second", "_second_count")

    def __init__(self) -> None:
        self._second = -1
        self._second_count = 0
        self._minute = -1
        self._minute_count = 0

    def hit(self, limit: RateLimit, now: float) -> tuple[bool, int, int]:
        """(allowed, seconds to wait or to the steady reset, steady requests remaining)."""
        second, minute = int(now), int(now // 60)
        if second != self._second:
            self._second, self._second_count = second, 0
        if minute != self._minute:
            self._minute, self._minute_count = minute, 0
        steady_reset = max(1, math.ceil((minute + 1) * 60 - now))
        if self._minute_count >= limit.steady:
            return False, steady_reset, 0
        if self._second_count >= limit.burst:
            return False, max(1, math.ceil(second + 1 - now)), limit.steady - self._minute_count
        self._second_count += 1
        self._minute_count += 1
        return True, steady_reset, limit.steady - self._minute_count


class _Vendor(FaultsAndLog[DestRequest]):
    """What every destination sandbox shares: faults, the request log, error handling."""

    name: str = ""  # the destination type it stands in for
    prefix: str = ""  # where it is served: an adapter's base_url is the server's URL + this

    def __init__(self, sandbox: DestinationSandbox) -> None:
        super().__init__()
        self._sandbox = sandbox
        self.lock = threading.RLock()

    def serve(self, request: _Request) -> _Response | None:
        """Answer one request (None: drop the connection) and log it before it is sent, so
        a client that has its answer also finds it in the log."""
        response = self._serve(request)
        body: Any = None
        if self._sandbox.log_bodies and request.body:
            with contextlib.suppress(orjson.JSONDecodeError):
                body = orjson.loads(request.body)
        record = DestRequest(
            vendor=self.name,
            method=request.method,
            path=request.path,
            query=dict(request.query),
            status=None if response is None else response.status,
            fault="drop" if response is None else response.fault,
            size=len(request.body),
            body=body,
            at=self._sandbox.clock(),
            consent=request.headers.get("X-Syncd-Consent"),
            user_agent=request.headers.get("User-Agent"),
        )
        self._record(record)
        self._sandbox.journal_request(record)
        return response

    def _serve(self, request: _Request) -> _Response | None:
        config, fault, error_status = self._draw_fault()
        if config.latency_ms:
            time.sleep(config.latency_ms / 1000)
        if fault == "drop":
            return None
        if fault is not None:
            response = (
                self.throttled(config.retry_after)
                if fault == "rate_limit"
                else self.server_error(error_status)
            )
            response.fault = fault
            return response
        try:
            return self.handle(request)
        except _Reply as reply:
            return reply.response
        except Exception:
            # A sandbox bug answers 500 (and leaves a traceback on stderr) rather than
            # cutting the connection, so the client sees a vendor outage, not a hang.
            traceback.print_exc()
            return self.server_error(500)

    # -- per vendor -----------------------------------------------------------------------

    def handle(self, request: _Request) -> _Response:
        """Answer one request as the vendor would: each vendor subclass implements it."""
        raise NotImplementedError

    def throttled(self, retry_after: str | None) -> _Response:
        """The vendor's own 429 answer: each vendor subclass implements it."""
        raise NotImplementedError

    def server_error(self, status: int) -> _Response:
        reason = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}
        text = reason.get(status, "Error")
        html = (
            f"<html><head><title>{status} {text}</title></head><body><h1>{text}</h1></body></html>"
        )
        return _Response(status, html.encode(), "text/html; charset=utf-8")


def _json_body(request: _Request, bad: Callable[[str], _Response]) -> Any:
    try:
        return orjson.loads(request.body)
    except orjson.JSONDecodeError:
        raise _Reply(bad("The request body is not valid JSON.")) from None
