"""The one way out: every outbound HTTP call of syncd goes through this module.

A :class:`ServiceClient` wraps one ``httpx.AsyncClient`` per remote service and
adds what every source and destination adapter needs but none should implement:

* pacing: a requests-per-second limiter and a concurrency cap shared by every
  concurrent caller of the client;
* retries (tenacity) on 429, 5xx, timeouts and connection errors, with
  full-jitter exponential backoff, ``Retry-After`` honoured, and ceilings on
  attempts and on total time;
* vendor rate-limit headers (``RateLimit-Remaining: 0`` + ``RateLimit-Reset``)
  that pause the whole service, through an overridable hook;
* errors that carry the vendor's own message and code, with secrets redacted
  from every URL that reaches a log line or an exception;
* counters per client and per service name for metrics;
* :class:`OAuth2RefreshAuth`: bearer tokens from an OAuth 2.0 refresh token, refreshed
  once on expiry and kept out of every log line and error.

Adapters therefore never sleep, retry or parse error bodies themselves.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import random
import re
import ssl
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, Final, NoReturn, Self
from urllib.parse import unquote_plus, urlencode, urlsplit, urlunsplit

import httpx
import orjson
import structlog
from pydantic import SecretStr
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from syncd import __version__
from syncd.log import SECRET_PARAMS

__all__ = [
    "DEFAULT_LIMITS",
    "USER_AGENT",
    "ApiError",
    "AuthError",
    "OAuth2RefreshAuth",
    "OAuthError",
    "RateLimiter",
    "RetryExhausted",
    "ServiceClient",
    "ServiceLimits",
    "ServiceStats",
    "TlsError",
    "parse_retry_after",
    "redact_url",
    "reset_service_stats",
    "service_stats",
    "vendor_message",
]

log = structlog.get_logger("syncd.http")

USER_AGENT: Final = f"syncd/{__version__}"

# httpx logs every request at INFO with its full URL, query string included, and a
# WooCommerce query string can carry consumer_key/consumer_secret. This module writes
# its own redacted lines, so httpx's logger stays quiet unless an operator set it.
_httpx_logger = logging.getLogger("httpx")
if _httpx_logger.level == logging.NOTSET:
    _httpx_logger.setLevel(logging.WARNING)

Primitive = str | int | float | bool | None
Params = Mapping[str, Primitive | Sequence[Primitive]] | list[tuple[str, Primitive]]

# Query parameter names whose values never reach a log line or an exception: the same
# list the log redaction uses (syncd.log.SECRET_PARAMS), plus the suffixes below.
# Vendor-specific spellings (hapikey_token, x_api_secret, ...) are caught by suffix.
_SECRET_SUFFIXES: Final = ("_secret", "_token", "_password", "_signature")
_REDACTED: Final = "***"

# An attempt started close to the time ceiling still gets this long: cutting it to a
# few milliseconds would turn a healthy but slightly slow answer into a timeout.
_MIN_ATTEMPT_TIMEOUT: Final = 1.0
# Values of RateLimit-Reset above this are Unix timestamps (the WooCommerce Store API
# and GitHub send those), below it seconds from now (the IETF draft, Klaviyo).
_EPOCH_THRESHOLD: Final = 1_000_000_000.0
_MAX_MESSAGE: Final = 500
_MAX_TEXT_BODY: Final = 4000

# Transport errors that mean our request or configuration is wrong, not that the
# network or the server had a bad moment: retrying them cannot help.
_PERMANENT_TRANSPORT_ERRORS: Final = (httpx.UnsupportedProtocol, httpx.LocalProtocolError)

# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH: a trusted
# certificate, issued for another name than the URL's.
_NAME_MISMATCH_CODES: Final = frozenset({62, 64})

# TLS failures that are the same on every attempt: the certificate (expired, unknown CA,
# self-signed, for another host: all ssl.SSLCertVerificationError) or a protocol the two
# sides do not share, by OpenSSL's reason code. A peer closing or resetting the connection
# mid-handshake (SSLEOFError, ConnectionResetError) and a handshake timeout are not here:
# those are network trouble and are retried.
_PERMANENT_TLS_REASONS: Final = frozenset(
    {
        "CERTIFICATE_VERIFY_FAILED",
        "WRONG_VERSION_NUMBER",  # plain HTTP on the other end of an https:// URL
        "HTTP_REQUEST",
        "PACKET_LENGTH_TOO_LONG",
        "RECORD_LAYER_FAILURE",
        "UNSUPPORTED_PROTOCOL",
        "NO_PROTOCOLS_AVAILABLE",
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "TLSV1_ALERT_INAPPROPRIATE_FALLBACK",
        "TLSV1_ALERT_UNKNOWN_CA",
        "TLSV1_ALERT_ACCESS_DENIED",
        "TLSV1_ALERT_CERTIFICATE_REQUIRED",
        "TLSV1_UNRECOGNIZED_NAME",
        "SSLV3_ALERT_HANDSHAKE_FAILURE",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "NO_SHARED_CIPHER",
        "NO_CIPHERS_AVAILABLE",
        "UNSAFE_LEGACY_RENEGOTIATION_DISABLED",
    }
)


@dataclass(frozen=True)
class ServiceLimits:
    """How hard syncd may lean on one remote service, and how long it keeps trying."""

    requests_per_second: float | None = None  # None = unpaced
    concurrency: int = 4  # max requests in flight for this service
    max_attempts: int = 8  # total tries of one request
    max_elapsed: float = 300.0  # ceiling on total time spent on one request incl. waits (s)
    timeout: float = 30.0  # per-attempt timeout (s)
    backoff_base: float = 0.5  # first backoff ceiling (s)
    backoff_max: float = 60.0  # cap of one wait (s)

    def __post_init__(self) -> None:
        # Limits usually come from configuration: reject nonsense at start-up rather
        # than discovering it as a division by zero or a client that never retries.
        if self.requests_per_second is not None and not self.requests_per_second > 0:
            raise ValueError("requests_per_second must be positive or None")
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        for name in ("max_elapsed", "timeout", "backoff_base", "backoff_max"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")


DEFAULT_LIMITS: Final = ServiceLimits()


@dataclass
class ServiceStats:
    """Counters of one client, or of every client of one service name."""

    requests: int = 0  # attempts actually sent
    retries: int = 0  # attempts scheduled after a failed one
    throttles: int = 0  # 429 answers and rate-limit-header pauses
    errors: int = 0  # calls that ended in an ApiError
    by_status: dict[int, int] = field(default_factory=dict)

    def copy(self) -> ServiceStats:
        return replace(self, by_status=dict(self.by_status))


_SERVICE_STATS: dict[str, ServiceStats] = {}
# Clients count on their event loop while a metrics endpoint may read from another
# thread: the lock keeps a snapshot from seeing the registry mid-update.
_SERVICE_STATS_LOCK = threading.Lock()


def service_stats() -> dict[str, ServiceStats]:
    """A snapshot of the process-wide counters, keyed by service name."""
    with _SERVICE_STATS_LOCK:
        return {name: stats.copy() for name, stats in _SERVICE_STATS.items()}


def reset_service_stats() -> None:
    """Forget the process-wide counters (tests; a metrics exporter's fresh start)."""
    with _SERVICE_STATS_LOCK:
        _SERVICE_STATS.clear()


class ApiError(Exception):
    """A non-retryable answer (a 4xx other than 429) or the final failure of a call."""

    def __init__(
        self,
        service: str,
        status: int | None,
        method: str,
        url: str,
        message: str,
        *,
        code: str | None = None,
        body: Any = None,
    ) -> None:
        self.service = service
        self.status = status
        self.method = method
        self.url = redact_url(url)
        self.message = message
        self.code = code
        self.body = body
        super().__init__(self._describe())

    def _describe(self) -> str:
        head = f"{self.service}: "
        if self.status is not None:
            head += f"{self.status} "
        text = f"{head}{self.method} {self.url}: {self.message}"
        return f"{text} ({self.code})" if self.code else text


class AuthError(ApiError):
    """401/403: credentials are wrong or lack a permission; retrying cannot fix that."""


class RetryExhausted(ApiError):
    """The attempt or time ceiling was reached; ``message`` says how far it got and why."""

    def __init__(
        self,
        service: str,
        status: int | None,
        method: str,
        url: str,
        message: str,
        *,
        code: str | None = None,
        body: Any = None,
        attempts: int,
        elapsed: float,
    ) -> None:
        self.attempts = attempts
        self.elapsed = elapsed
        super().__init__(service, status, method, url, message, code=code, body=body)


class TlsError(ApiError):
    """The TLS handshake failed for a reason retrying cannot fix: the certificate is not
    trusted or not for this host, or the two sides share no protocol."""


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (RFC 9110 §10.2.3).

    Accepts delay-seconds (leniently: a decimal point or a sign is tolerated) or an
    HTTP date in any of the three RFC formats. A date in the past or a negative delay
    gives 0; anything unparseable gives None so the caller falls back to backoff.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if re.fullmatch(r"[+-]?\d+(?:\.\d+)?", text):
        seconds = float(text)
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        # HTTP dates are always GMT; asctime and "-0000" forms parse as naive.
        when = when.replace(tzinfo=UTC)
    reference = now if now is not None else datetime.now(UTC)
    if reference.tzinfo is None:
        reference = reference.replace(tzinfo=UTC)
    try:
        delta = (when - reference).total_seconds()
    except OverflowError:
        return None
    return max(0.0, delta)


def _is_secret_param(name: str) -> bool:
    normalized = unquote_plus(name).strip().lower().replace("-", "_")
    return normalized in SECRET_PARAMS or normalized.endswith(_SECRET_SUFFIXES)


def _redact_query(query: str) -> str:
    pieces = []
    for piece in query.split("&"):
        name, sep, _value = piece.partition("=")
        pieces.append(f"{name}={_REDACTED}" if sep and _is_secret_param(name) else piece)
    return "&".join(pieces)


def redact_url(url: str | httpx.URL) -> str:
    """The URL with secret-looking query values and any userinfo password replaced."""
    text = str(url)
    try:
        parts = urlsplit(text)
    except ValueError:
        # Not parseable as a URL (a malformed IPv6 host, say): still never leak a
        # secret, even if the result is only a best effort.
        return re.sub(r"([?&][^=&#]+=)[^&#]*", lambda m: m.group(1) + _REDACTED, text)
    netloc = parts.netloc
    userinfo, at, host = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:{_REDACTED}@{host}"
    query = _redact_query(parts.query) if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _snippet(text: str, limit: int = _MAX_MESSAGE) -> str:
    """A one-line excerpt of a text body; HTML error pages are reduced to their text."""
    if "<" in text and ">" in text:
        text = re.sub(r"<(script|style)\b.*?</\1\s*>", " ", text, flags=re.S | re.I)
        text = re.sub(r"<[^>]+>", " ", text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _first_text(obj: Mapping[str, Any], keys: Sequence[str]) -> str | None:
    for key in keys:
        value = obj.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _first_code(obj: Mapping[str, Any], keys: Sequence[str]) -> str | None:
    for key in keys:
        value = obj.get(key)
        # bool is an int: a `"error": true` flag is not a code.
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value).strip():
            return str(value).strip()
    return None


def vendor_message(body: Any) -> tuple[str, str | None]:
    """The vendor's own error message and code from a decoded error body.

    Understands the common shapes: ``{code, message}`` (WooCommerce, HubSpot),
    ``{error: {message, code}}`` (Google, Meta), ``{errors: [{code, detail}]}``
    (Klaviyo, JSON:API), ``{error, error_description}`` (OAuth), ``{title, detail}``
    (RFC 7807, Mailchimp), ``{errors: {field: [...]}}``. Text bodies give a trimmed
    snippet. Returns ``("", None)`` when nothing useful is there.
    """
    if isinstance(body, list) and body and isinstance(body[0], dict):
        body = body[0]
    if isinstance(body, str):
        return _snippet(body), None
    if not isinstance(body, dict):
        return "", None

    nested = body.get("error")
    if isinstance(nested, dict):
        nested_message, nested_code = vendor_message(nested)
        if nested_message:
            return nested_message, nested_code or _first_code(body, ("code", "error_code"))

    message = _first_text(body, ("message", "error_description", "detail", "error_message"))
    errors = body.get("errors")
    first_error: Any = None
    if isinstance(errors, list) and errors:
        first_error = errors[0]
    elif isinstance(errors, dict) and errors:
        field_name, problems = next(iter(errors.items()))
        if isinstance(problems, list) and problems:
            problems = problems[0]
        first_error = f"{field_name}: {problems}"
    if message is None and isinstance(first_error, dict):
        message = _first_text(first_error, ("detail", "message", "title"))
    if message is None and isinstance(first_error, str) and first_error.strip():
        message = first_error.strip()
    if message is None and isinstance(nested, str) and nested.strip():
        message = nested.strip()
    if message is None:
        message = _first_text(body, ("title",))

    code = _first_code(body, ("code", "error_code", "errorType"))
    if code is None and isinstance(first_error, dict):
        code = _first_code(first_error, ("code",))
    if code is None and isinstance(nested, str) and nested.strip() and nested.strip() != message:
        # OAuth puts the machine-readable reason in "error" and the prose beside it.
        code = nested.strip()
    return (_snippet(message) if message else ""), code


def _decode_body(response: httpx.Response) -> Any:
    """The error body as JSON when it is JSON, else as (bounded) text, else None."""
    raw = response.content
    if not raw:
        return None
    content_type = response.headers.get("content-type", "")
    if "json" in content_type or raw.lstrip()[:1] in (b"{", b"["):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return response.text[:_MAX_TEXT_BODY]


def _as_float(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None


class RateLimiter:
    """Spaces one service's sends at most ``1/rate`` apart and honours service-wide holds.

    Each caller reserves the next free slot before it sleeps, so concurrent callers
    queue up in order instead of waking together and bursting. A hold (from a 429 or
    a rate-limit header) pushes every later slot past its end; callers already asleep
    for an earlier slot notice it when they wake and queue again behind it.
    """

    def __init__(
        self,
        rate: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._interval = 1.0 / rate if rate else 0.0
        self._clock = clock
        self._sleep = sleep
        self._next_slot = -math.inf
        self._held_until = -math.inf

    def hold_until(self, deadline: float) -> None:
        """Let nothing through before ``deadline`` (on this limiter's clock)."""
        self._held_until = max(self._held_until, deadline)

    def hold_remaining(self) -> float:
        return max(0.0, self._held_until - self._clock())

    async def acquire(self) -> float:
        """Wait for this caller's turn; returns the seconds spent waiting."""
        waited = 0.0
        while True:
            now = self._clock()
            slot = max(now, self._next_slot, self._held_until)
            # No await between reading and writing the schedule: on one event loop
            # this reservation is atomic without a lock.
            self._next_slot = slot + self._interval
            if slot > now:
                await self._sleep(slot - now)
                waited += slot - now
            if self._held_until <= slot:
                return waited


@dataclass
class _Call:
    """What one ``request()`` call has been through, across its attempts."""

    method: str
    url: str  # absolute and redacted
    started: float | None = None
    attempts: int = 0
    stop_reason: str = ""
    last_response: httpx.Response | None = None
    last_exception: BaseException | None = None


class _RetryableResponse(Exception):
    """A 429 or 5xx answer, raised inside an attempt so tenacity schedules another."""

    def __init__(self, response: httpx.Response, retry_after: float | None) -> None:
        super().__init__(f"{response.status_code} {response.reason_phrase}")
        self.response = response
        self.retry_after = retry_after


@functools.cache
def _verified_context() -> ssl.SSLContext:
    """One certificate-verifying TLS context for every client of the process.

    httpx builds a new one per client by default, loading the CA bundle each time: tens of
    milliseconds holding the GIL, which the service paid at every push run while it was
    answering webhooks. A context is safe to share between connections and threads.
    """
    return httpx.create_ssl_context()


@functools.cache
def _ca_file_context(ca_file: str) -> ssl.SSLContext:
    """A certificate-verifying context that trusts the CAs of ``ca_file`` (PEM) alone:
    for a store with its own CA or a self-signed certificate."""
    return ssl.create_default_context(cafile=ca_file)


def _tls_context(verify: bool | str | os.PathLike[str]) -> ssl.SSLContext | bool:
    if verify is True:
        return _verified_context()
    if verify is False:
        return False
    return _ca_file_context(os.fspath(verify))


def _permanent_tls_failure(exc: BaseException) -> ssl.SSLError | None:
    """The ssl error behind an httpx transport error, when it will recur on every attempt.

    httpx raises ConnectError from httpcore's, itself raised from the ssl module's error:
    the reason is found by following the chain.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return current
        if isinstance(current, ssl.SSLError) and current.reason in _PERMANENT_TLS_REASONS:
            return current
        current = current.__cause__ or current.__context__
    return None


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, _RetryableResponse):
        return True
    return (
        isinstance(exc, httpx.TransportError)
        and not isinstance(exc, _PERMANENT_TRANSPORT_ERRORS)
        and _permanent_tls_failure(exc) is None
    )


class ServiceClient:
    """The HTTP client of one remote service: paced, retried, counted, redacted.

    Make one per service (per store, per destination account) and share it between
    the tasks that talk to that service: the pacing and the concurrency cap hold
    across all of them only if they use the same client.
    """

    def __init__(
        self,
        service: str,
        base_url: str = "",
        *,
        limits: ServiceLimits = DEFAULT_LIMITS,
        auth: httpx.Auth | None = None,
        headers: Mapping[str, str] | None = None,
        verify: bool | str | os.PathLike[str] = True,
        tls_setting: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.service = service
        self.limits = limits
        self.stats = ServiceStats()
        # The setting a user changes when the certificate is refused (verify: True checks
        # against the system's CAs, a path against that PEM file's, False not at all).
        self.tls_setting = tls_setting
        self._sleep = sleep
        self._clock = clock
        # A private generator: seeded ones make tests deterministic, and production
        # jitter does not depend on (or disturb) the global random state.
        self._rng = rng if rng is not None else random.Random()
        self._limiter = RateLimiter(limits.requests_per_second, clock=clock, sleep=sleep)
        self._in_flight = asyncio.Semaphore(limits.concurrency)
        default_headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        self._client = httpx.AsyncClient(
            base_url=base_url,
            auth=auth,
            headers={**default_headers, **(headers or {})},
            verify=_tls_context(verify),
            timeout=httpx.Timeout(limits.timeout),
            # The semaphore never lets more than `concurrency` requests out, so a pool
            # of that size keeps every connection warm and never makes one wait.
            limits=httpx.Limits(
                max_connections=limits.concurrency,
                max_keepalive_connections=limits.concurrency,
            ),
            transport=transport,
            # A redirect is returned to the caller, not followed: following one can
            # turn a POST into a GET or carry credentials to another host.
            follow_redirects=False,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- the hook a destination adapter may override ---------------------------------

    def rate_limit_pause(self, response: httpx.Response) -> float | None:
        """Seconds the vendor asks us to stop sending, read from rate-limit headers.

        The default reads the generic ``RateLimit-Remaining``/``RateLimit-Reset``
        pair (IETF draft; Klaviyo, the WooCommerce Store API) and its ``X-``
        spelling. Override it for vendors with their own headers (HubSpot's
        ``X-HubSpot-RateLimit-*``, Meta's usage JSON). None or 0 means no pause.
        """
        headers = response.headers
        remaining = _as_float(
            headers.get("RateLimit-Remaining") or headers.get("X-RateLimit-Remaining")
        )
        if remaining is None or remaining > 0:
            return None
        reset = _as_float(headers.get("RateLimit-Reset") or headers.get("X-RateLimit-Reset"))
        if reset is None:
            return None
        if reset > _EPOCH_THRESHOLD:
            reset -= time.time()
        return max(0.0, reset)

    def is_transient(self, response: httpx.Response) -> bool:
        """Whether an answer is a passing refusal, retried with back-off: 429 and 5xx.
        Override it for vendors that answer throttling with another status and say so in
        the body (Meta's error codes 4, 17, 613 and 80000-80014 come as 400)."""
        status = response.status_code
        return status == 429 or status >= 500

    # -- requests ---------------------------------------------------------------------

    async def request(
        self,
        method: str,
        url: str,
        *,
        params: Params | None = None,
        json: Any = None,
        content: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """Send one request, paced and retried; returns only 2xx/3xx responses.

        Raises :class:`AuthError` on 401/403, :class:`ApiError` on any other 4xx but
        429 (and on a request that cannot be sent at all), :class:`RetryExhausted`
        when retryable failures outlast the attempt or time ceiling. The body is
        bytes, text or JSON (serialized with orjson) so every attempt can resend it.
        """
        method = method.upper()
        if json is not None and content is not None:
            raise ValueError("pass either json or content, not both")
        # httpx.Headers is case-insensitive: a caller's "content-type" (JSON:API's
        # application/vnd.api+json, say) replaces our default instead of doubling it.
        request_headers = httpx.Headers(headers)
        body = content
        if json is not None:
            body = orjson.dumps(json)
            request_headers.setdefault("Content-Type", "application/json")
        try:
            absolute = self._client.build_request(method, url, params=params).url
        except httpx.InvalidURL as exc:
            self._record(errors=1)
            raise ApiError(self.service, None, method, url, f"invalid URL: {exc}") from exc
        call = _Call(method=method, url=redact_url(absolute))

        retrying = AsyncRetrying(
            sleep=self._sleep,
            retry=retry_if_exception(_is_retryable),
            wait=self._next_wait,
            stop=lambda state: self._should_stop(call, state),
            before_sleep=lambda state: self._before_retry(call, state),
            retry_error_callback=lambda state: self._give_up(call, state),
        )
        try:
            response: httpx.Response = await retrying(
                self._attempt, call, url, params, body, request_headers
            )
        except ApiError:
            self._record(errors=1)
            raise
        return response

    async def request_json(
        self,
        method: str,
        url: str,
        *,
        params: Params | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[Any, httpx.Response]:
        """Like :meth:`request`, with the body parsed by orjson (None when empty)."""
        response = await self.request(method, url, params=params, json=json, headers=headers)
        return self._parse_json(response), response

    async def get_json(
        self, url: str, *, params: Params | None = None
    ) -> tuple[Any, httpx.Response]:
        """GET and parse the JSON body; the response comes along for its headers."""
        return await self.request_json("GET", url, params=params)

    def _parse_json(self, response: httpx.Response) -> Any:
        if response.is_redirect:
            # A redirect answered to an API call is nearly always a configuration
            # mistake (http:// vs https://, www or not): say where it points.
            location = redact_url(response.headers.get("location", "?"))
            self._fail_after_response(response, f"redirected to {location}; use that URL")
        if not response.content:
            return None
        try:
            return orjson.loads(response.content)
        except orjson.JSONDecodeError:
            self._fail_after_response(
                response, f"expected JSON, got: {_snippet(response.text, 200)!r}"
            )

    def _fail_after_response(self, response: httpx.Response, message: str) -> NoReturn:
        self._record(errors=1)
        raise ApiError(
            self.service,
            response.status_code,
            response.request.method,
            str(response.request.url),
            message,
        )

    # -- one attempt ------------------------------------------------------------------

    async def _attempt(
        self,
        call: _Call,
        url: str,
        params: Params | None,
        content: bytes | str | None,
        headers: httpx.Headers,
    ) -> httpx.Response:
        limits = self.limits
        async with self._in_flight:
            await self._limiter.acquire()
            now = self._clock()
            if call.started is None:
                # Time queued behind other callers before the first send is not
                # charged to this request: a long queue must not fail requests
                # that were never tried.
                call.started = now
            remaining = limits.max_elapsed - (now - call.started)
            timeout = min(limits.timeout, max(remaining, _MIN_ATTEMPT_TIMEOUT))
            # A fresh request per attempt, so auth flows (OAuth 1.0a nonces and
            # timestamps) sign each attempt anew.
            request = self._client.build_request(
                call.method,
                url,
                params=params,
                content=content,
                headers=headers,
                timeout=httpx.Timeout(timeout),
            )
            call.attempts += 1
            self._record(requests=1)
            try:
                # httpx's timeout bounds each phase (connect, each read, ...); this
                # bounds the attempt as a whole, so a server trickling bytes cannot
                # hold it for longer.
                async with asyncio.timeout(timeout):
                    response = await self._client.send(request)
                # The body is read and the stream closed. httpx's response and its stream
                # point at each other, so without this only the cyclic garbage collector
                # frees a response and its body (a 270 KB page of orders), and a sync's
                # memory would grow with the pages read between two full collections.
                response.stream = httpx.ByteStream(b"")
            except TimeoutError as exc:
                timed_out = httpx.TimeoutException(
                    f"no complete response within {timeout:g}s", request=request
                )
                call.last_exception = timed_out
                raise timed_out from exc
            except httpx.HTTPError as exc:
                call.last_exception = exc
                tls_failure = _permanent_tls_failure(exc)
                if tls_failure is not None:
                    raise self._tls_error(call, tls_failure) from exc
                if _is_retryable(exc):
                    raise
                raise ApiError(
                    self.service, None, call.method, call.url, f"{type(exc).__name__}: {exc}"
                ) from exc

        status = response.status_code
        self._record(status=status)
        retryable = self.is_transient(response)
        # Parsed once: an HTTP date read twice would give two slightly different waits.
        retry_after = parse_retry_after(response.headers.get("Retry-After")) if retryable else None
        self._observe_throttling(call, response, retry_after)
        if retryable:
            call.last_response, call.last_exception = response, None
            raise _RetryableResponse(response, retry_after)
        if status >= 400:
            raise self._error_from_response(call, response)
        return response

    def _observe_throttling(
        self, call: _Call, response: httpx.Response, retry_after: float | None
    ) -> None:
        """Turn what the vendor said about its limits into a service-wide hold."""
        status = response.status_code
        hold = 0.0
        throttled = status == 429
        if retry_after:
            # A Retry-After on a 429/503 speaks for the whole service: every other
            # caller waits too, instead of spending its own attempts on refusals.
            hold = min(retry_after, self.limits.backoff_max)
        pause = self.rate_limit_pause(response)
        if pause:
            # Capped: no single request may wait longer than max_elapsed anyway, and
            # a garbled header must not silence a service for days.
            hold = max(hold, min(pause, self.limits.max_elapsed))
            throttled = True
        if throttled:
            self._record(throttles=1)
        if hold > 0:
            self._limiter.hold_until(self._clock() + hold)
            log.info(
                "http.throttled",
                service=self.service,
                method=call.method,
                url=call.url,
                status=status,
                pause=round(hold, 3),
            )

    def _tls_error(self, call: _Call, failure: ssl.SSLError) -> TlsError:
        host = urlsplit(call.url).netloc
        setting = self.tls_setting
        if isinstance(failure, ssl.SSLCertVerificationError):
            what = failure.verify_message or failure.reason or "certificate verify failed"
            message = f"TLS certificate of {host} refused: {what.rstrip('.')}"
            if failure.verify_code in _NAME_MISMATCH_CODES:
                message += "; use the host name the certificate is issued for in the URL"
            elif setting:
                message += (
                    f"; for a server with its own CA or a self-signed certificate, set "
                    f'{setting} = "/path/to/ca.pem" (its CA certificate, PEM); '
                    f"{setting} = false turns the check off (test servers only)"
                )
        else:
            what = (failure.reason or str(failure)).replace("_", " ").lower()
            message = (
                f"TLS handshake with {host} failed: {what}; check that the server speaks "
                f"TLS (https://) on that port"
            )
            if setting:
                message += f", and {setting}"
        # The same on every attempt: the first one says so and nothing is retried.
        return TlsError(self.service, None, call.method, call.url, f"{message} (not retried)")

    def _error_from_response(self, call: _Call, response: httpx.Response) -> ApiError:
        body = _decode_body(response)
        message, code = vendor_message(body)
        status = response.status_code
        error_class = AuthError if status in (401, 403) else ApiError
        return error_class(
            self.service,
            status,
            call.method,
            call.url,
            message or response.reason_phrase or f"HTTP {status}",
            code=code,
            body=body,
        )

    # -- the retry policy, as tenacity callbacks ----------------------------------------

    def _next_wait(self, state: RetryCallState) -> float:
        limits = self.limits
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, _RetryableResponse) and exc.retry_after is not None:
            return min(exc.retry_after, limits.backoff_max)
        # Full jitter: uniform over [0, ceiling], the ceiling doubling per attempt. It
        # spreads a crowd of retrying clients best (AWS Architecture Blog, "Exponential
        # Backoff And Jitter"). The exponent is bounded so 2**n cannot overflow a float.
        exponent = min(state.attempt_number - 1, 64)
        ceiling = min(limits.backoff_max, limits.backoff_base * 2.0**exponent)
        return self._rng.uniform(0.0, ceiling)

    def _should_stop(self, call: _Call, state: RetryCallState) -> bool:
        limits = self.limits
        if call.attempts >= limits.max_attempts:
            call.stop_reason = f"attempt limit {limits.max_attempts} reached"
            return True
        elapsed = self._elapsed(call)
        # The limiter may hold the service longer than our own backoff (a vendor's
        # reset time): the next attempt starts only after both.
        pending = max(state.upcoming_sleep, self._limiter.hold_remaining())
        # An attempt starting right at the ceiling would have no time left to finish,
        # so reaching it counts as passing it.
        if elapsed + pending >= limits.max_elapsed:
            call.stop_reason = (
                f"the next wait of {pending:.1f}s would reach the {limits.max_elapsed:g}s ceiling"
            )
            return True
        return False

    def _before_retry(self, call: _Call, state: RetryCallState) -> None:
        self._record(retries=1)
        exc = state.outcome.exception() if state.outcome is not None else None
        cause: dict[str, Any] = (
            {"status": exc.response.status_code}
            if isinstance(exc, _RetryableResponse)
            else {"error": type(exc).__name__}
        )
        log.warning(
            "http.retry",
            service=self.service,
            method=call.method,
            url=call.url,
            **cause,
            attempt=call.attempts,
            max_attempts=self.limits.max_attempts,
            wait=round(state.upcoming_sleep, 3),
        )

    def _give_up(self, call: _Call, state: RetryCallState) -> NoReturn:
        elapsed = self._elapsed(call)
        response = call.last_response
        status: int | None = None
        code: str | None = None
        body: Any = None
        if call.last_exception is not None:
            exc = call.last_exception
            cause = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        elif response is not None:
            status = response.status_code
            body = _decode_body(response)
            vendor, code = vendor_message(body)
            cause = f"{status} {response.reason_phrase}".strip()
            if vendor:
                cause += f": {vendor}"
        else:  # pragma: no cover - every failed attempt records one or the other
            cause = "unknown"
        plural = "s" if call.attempts != 1 else ""
        message = (
            f"gave up after {call.attempts} attempt{plural} in {elapsed:.1f}s "
            f"({call.stop_reason}); last cause: {cause}"
        )
        raise RetryExhausted(
            self.service,
            status,
            call.method,
            call.url,
            message,
            code=code,
            body=body,
            attempts=call.attempts,
            elapsed=elapsed,
        ) from call.last_exception

    def _elapsed(self, call: _Call) -> float:
        return 0.0 if call.started is None else self._clock() - call.started

    # -- counters -----------------------------------------------------------------------

    def _record(
        self,
        *,
        requests: int = 0,
        retries: int = 0,
        throttles: int = 0,
        errors: int = 0,
        status: int | None = None,
    ) -> None:
        with _SERVICE_STATS_LOCK:
            shared = _SERVICE_STATS.setdefault(self.service, ServiceStats())
            for stats in (self.stats, shared):
                stats.requests += requests
                stats.retries += retries
                stats.throttles += throttles
                stats.errors += errors
                if status is not None:
                    stats.by_status[status] = stats.by_status.get(status, 0) + 1


# -- OAuth 2.0 refresh tokens ------------------------------------------------------------


class OAuthError(AuthError):
    """The token endpoint refused the refresh token (RFC 6749 §5.2: ``invalid_grant``, a
    revoked or expired grant; ``invalid_client``...): only new credentials can fix it."""


# The token endpoint is retried like any service (429/5xx), but not for long: a run
# waiting on it holds the request that needed the token.
_TOKEN_LIMITS: Final = ServiceLimits(max_attempts=4, max_elapsed=60.0, timeout=30.0)
# A token is refreshed this long before its stated expiry, so one that expires while a
# request is on its way is not sent (half its lifetime for very short-lived tokens).
_EXPIRY_MARGIN: Final = 60.0


class OAuth2RefreshAuth(httpx.Auth):
    """Bearer tokens from an OAuth 2.0 refresh token (RFC 6749 §6), for async clients.

    The access token is fetched on first use and again when it expires (``expires_in``
    of the token response, RFC 6749 §5.1) or when the API answers 401 (a token revoked
    early, RFC 6750 §3.1): then the request is sent once more with the new token, and a
    second 401 is the API's answer. Concurrent requests share one refresh: the first
    refreshes under a lock, the others wait for its token. A refresh token the endpoint
    rotates (a new ``refresh_token`` in the answer) replaces the old one.

    The tokens and the client secret are :class:`SecretStr`; they never appear in this
    object's repr, in a log line or in an error (an endpoint echoing one is redacted).
    The client authenticates with ``client_id``/``client_secret`` in the form body
    (RFC 6749 §2.3.1), which Google and HubSpot both accept.

    One instance serves one event loop (as a :class:`ServiceClient` does).
    """

    def __init__(
        self,
        service: str,
        token_url: str,
        *,
        client_id: str,
        client_secret: SecretStr,
        refresh_token: SecretStr,
        scope: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        limits: ServiceLimits = _TOKEN_LIMITS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = f"{service}:oauth"
        self.token_url = token_url
        self._client_id = client_id
        self._client_secret = client_secret
        self._refresh_token = refresh_token
        self._scope = scope
        self._clock = clock
        self._client = ServiceClient(self.service, limits=limits, transport=transport)
        self._lock = asyncio.Lock()
        self._access: SecretStr | None = None
        self._expires_at = -math.inf
        # Bumped at every refresh: a request that got a 401 with token generation n
        # refreshes only if no one else has since.
        self._generation = 0
        self.refreshes = 0

    def __repr__(self) -> str:
        return f"OAuth2RefreshAuth(service={self.service!r}, token_url={self.token_url!r})"

    async def aclose(self) -> None:
        await self._client.aclose()

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        # The refresh goes through a ServiceClient, which is async: so is this auth.
        raise RuntimeError("OAuth2RefreshAuth works with async clients (syncd.http.ServiceClient)")

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        token, generation = await self._valid_token()
        request.headers["Authorization"] = f"Bearer {token.get_secret_value()}"
        response = yield request
        if response.status_code != 401:
            return
        token, _ = await self._refreshed_after(generation)
        request.headers["Authorization"] = f"Bearer {token.get_secret_value()}"
        yield request

    async def _valid_token(self) -> tuple[SecretStr, int]:
        async with self._lock:
            if self._access is None or self._clock() >= self._expires_at:
                await self._refresh()
            assert self._access is not None
            return self._access, self._generation

    async def _refreshed_after(self, generation: int) -> tuple[SecretStr, int]:
        async with self._lock:
            if self._generation == generation:
                await self._refresh()
            assert self._access is not None
            return self._access, self._generation

    async def _refresh(self) -> None:
        form = {
            "grant_type": "refresh_token",
            "refresh_token": self._refresh_token.get_secret_value(),
            "client_id": self._client_id,
            "client_secret": self._client_secret.get_secret_value(),
        }
        if self._scope:
            form["scope"] = self._scope
        try:
            response = await self._client.request(
                "POST",
                self.token_url,
                content=urlencode(form),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            body = self._client._parse_json(response)
        except ApiError as exc:
            if exc.status is not None and 400 <= exc.status < 500 and exc.status != 429:
                reason = f"{exc.code}: {exc.message}" if exc.code else exc.message
                raise self._error(
                    exc.status,
                    f"the token endpoint refused the refresh token ({reason}); authorize "
                    "syncd again and store the new refresh token",
                    code=exc.code,
                ) from None
            raise
        access = body.get("access_token") if isinstance(body, dict) else None
        token_type = body.get("token_type", "Bearer") if isinstance(body, dict) else None
        if not isinstance(access, str) or not access:
            raise self._error(response.status_code, "the token endpoint answered no access_token")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise self._error(
                response.status_code, f"expected a Bearer token, got token_type {token_type!r}"
            )
        self._access = SecretStr(access)
        rotated = body.get("refresh_token")
        if isinstance(rotated, str) and rotated:
            self._refresh_token = SecretStr(rotated)
        expires_in = _as_float(str(body.get("expires_in", "")))
        # Without expires_in the token is used until the API answers 401.
        self._expires_at = (
            self._clock() + expires_in - min(_EXPIRY_MARGIN, expires_in / 2)
            if expires_in is not None and expires_in > 0
            else math.inf
        )
        self._generation += 1
        self.refreshes += 1
        log.info("oauth.refreshed", service=self.service, expires_in=expires_in)

    def _error(self, status: int | None, message: str, *, code: str | None = None) -> OAuthError:
        for secret in (self._refresh_token, self._client_secret, self._access):
            value = secret.get_secret_value() if secret is not None else ""
            if value:
                message = message.replace(value, _REDACTED)
        return OAuthError(self.service, status, "POST", self.token_url, message, code=code)
