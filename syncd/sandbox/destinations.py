"""Destination sandboxes on 127.0.0.1: Klaviyo, Mailchimp and webhook receivers.

One HTTP/1.1 server hosts every vendor under its own prefix, so an adapter is pointed at
it with ``base_url``: Klaviyo at ``{url}/klaviyo``, Mailchimp at ``{url}/mailchimp/3.0``,
webhook receivers at ``{url}/webhook/<name>``. Each vendor checks requests the way the
real service does (authentication, required fields, batch limits, rate limits) and answers
in the vendor's own shapes, including per-row errors; ``FaultConfig`` adds 429s, 5xx
answers, latency and dropped connections. Each vendor keeps a request log and, apart from
it, the state a test or benchmark asserts on (profiles, list members, events, records).

Where a vendor's behaviour is documented, the comment next to the check cites it; where it
is inferred from public reports rather than documentation, the comment says so.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import math
import re
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from itertools import count
from typing import Any, Final, Literal
from urllib.parse import parse_qsl, unquote

import orjson

from syncd.sandbox.httpserver import SandboxHandler, ServedSandbox
from syncd.sandbox.server import FaultConfig, FaultsAndLog

__all__ = [
    "KLAVIYO_RATE_LIMITS",
    "DestRequest",
    "DestinationSandbox",
    "KlaviyoSandbox",
    "MailchimpSandbox",
    "RateLimit",
    "WebhookReceiver",
    "WebhookSandbox",
]

Json = dict[str, Any]
Clock = Callable[[], float]

# A deliverable-looking address, stricter than syncd.identity's "x@y.z" on purpose: the
# vendors refuse addresses identity lets through (consecutive dots, a one-letter TLD), and
# those refusals are what per-row errors are for.
_VENDOR_EMAIL: Final = re.compile(
    r"^(?!\.)(?!.*\.\.)[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+(?<!\.)"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$"
)
# E.164: "+", a country code not starting with 0, at most 15 digits in all.
_E164: Final = re.compile(r"^\+[1-9]\d{1,14}$")
# Klaviyo's revision header: "YYYY-MM-DD[.suffix]" (every operation's `revision` parameter
# in klaviyo/openapi openapi/stable.json).
_REVISION: Final = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(\.[A-Za-z0-9_-]+)?$")
_CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_JSON_API: Final = "application/vnd.api+json"
_JSON: Final = "application/json; charset=utf-8"
_PROBLEM_JSON: Final = "application/problem+json; charset=utf-8"


def _valid_email(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 254 and _VENDOR_EMAIL.match(value) is not None


def _utc_iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- shared parts


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A fixed-window limit: ``burst`` requests per second and ``steady`` per minute."""

    burst: int
    steady: int

    def __post_init__(self) -> None:
        if self.burst < 1 or self.steady < 1:
            raise ValueError("rate limits must allow at least one request per window")


# Per-operation limits from each operation's `x-klaviyo-ratelimit` in klaviyo/openapi
# openapi/stable.json (revision 2026-07-15), Klaviyo's "Rate limits" docs. Klaviyo counts
# them per account in fixed 1-second (burst) and 1-minute (steady) windows
# (developers.klaviyo.com/en/docs/rate_limits_and_error_handling).
KLAVIYO_RATE_LIMITS: Final[Mapping[str, RateLimit]] = {
    "bulk_import_profiles": RateLimit(10, 150),
    "get_bulk_import_profiles_job": RateLimit(10, 150),
    "get_errors_for_bulk_import_profiles_job": RateLimit(10, 150),
    "get_profiles_for_bulk_import_profiles_job": RateLimit(10, 150),
    "add_profiles_to_list": RateLimit(10, 150),
    "remove_profiles_from_list": RateLimit(10, 150),
    "create_event": RateLimit(350, 3500),
    "bulk_create_events": RateLimit(10, 150),
    "request_profile_deletion": RateLimit(3, 60),
}


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

    name: str = ""

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
        )
        self._record(record)
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


# =================================================================================== Klaviyo


@dataclass(slots=True)
class _ImportJob:
    id: str
    created_at: float
    total: int
    profile_ids: list[str]
    errors: list[Json]
    list_ids: list[str]
    polls_left: int
    completed_at: float | None = None


class KlaviyoSandbox(_Vendor):
    """Klaviyo's JSON:API under ``/klaviyo`` (adapter ``base_url = f"{url}/klaviyo"``).

    State to assert on: ``profiles`` (id -> attributes, with ``properties``),
    ``list_members`` (list id -> set of profile ids), ``events`` (accepted events, in order),
    ``duplicate_events`` (events ignored for a repeated ``unique_id``), ``deletions``
    (profile deletion requests) and ``jobs`` (bulk import jobs by id). ``profile_by_email``
    finds a profile id by address. Set ``processing_polls`` to make each new bulk import
    job answer ``processing`` that many times before ``complete``; ``limits`` (operation id
    -> RateLimit) and ``limits_enabled`` control throttling.
    """

    name = "klaviyo"
    # Bulk Import Profiles: "Accepts up to 10,000 profiles per request. The maximum allowed
    # payload size is 5MB. The maximum allowed payload size per-profile is 100KB."
    # (bulk_import_profiles description, klaviyo/openapi openapi/stable.json).
    MAX_IMPORT_PROFILES: Final = 10_000
    MAX_IMPORT_BYTES: Final = 5 * 1024 * 1024
    MAX_PROFILE_BYTES: Final = 100 * 1024
    # add/remove_profiles_to_list: "This endpoint accepts a maximum of 1000 profiles per call."
    MAX_LIST_PROFILES: Final = 1000
    # bulk_create_events: "Accepts up to 1,000 events per request. The maximum allowed
    # payload size is 5MB."
    MAX_BULK_EVENTS: Final = 1000
    MAX_EVENT_BYTES: Final = 5 * 1024 * 1024
    # Paginated job sub-resources: page[size] "Default: 20. Min: 1. Max: 100."
    PAGE_SIZE_DEFAULT: Final = 20
    PAGE_SIZE_MAX: Final = 100

    def __init__(self, sandbox: DestinationSandbox, api_key: str) -> None:
        super().__init__(sandbox)
        self.api_key = api_key
        self.processing_polls = 0
        self.limits: dict[str, RateLimit] = dict(KLAVIYO_RATE_LIMITS)
        self.limits_enabled = True
        self.profiles: dict[str, Json] = {}
        self.list_members: dict[str, set[str]] = {}
        self.list_names: dict[str, str] = {}
        self.events: list[Json] = []
        self.duplicate_events = 0
        self.deletions: list[Json] = []
        self.jobs: dict[str, _ImportJob] = {}
        self._by_email: dict[str, str] = {}
        self._by_phone: dict[str, str] = {}
        self._by_external: dict[str, str] = {}
        self._event_keys: set[tuple[str, str, str]] = set()
        self._windows: dict[str, _FixedWindows] = {}
        self._ids = count(1)
        # Klaviyo ids are 26 upper-case Crockford base32 characters (ULIDs): a time part
        # from the sandbox's start, then a counter in hex, which is Crockford-safe.
        self._id_prefix = _ulid_time(sandbox.clock())

    # -- Python API -------------------------------------------------------------------------

    def add_list(self, list_id: str | None = None, name: str = "") -> str:
        """Create a list (Klaviyo list ids are six characters, e.g. ``Y6nRLr``)."""
        with self.lock:
            list_id = list_id or f"L{next(self._ids):05d}"
            self.list_members.setdefault(list_id, set())
            self.list_names[list_id] = name or list_id
            return list_id

    def set_limit(self, operation: str, burst: int, steady: int) -> None:
        if operation not in KLAVIYO_RATE_LIMITS:
            raise KeyError(f"unknown Klaviyo operation {operation!r}")
        self.limits[operation] = RateLimit(burst, steady)

    def profile_by_email(self, email: str) -> Json | None:
        with self.lock:
            profile_id = self._by_email.get(email.strip().lower())
            return None if profile_id is None else {"id": profile_id, **self.profiles[profile_id]}

    def members_of(self, list_id: str) -> set[str]:
        """Emails of the profiles on a list (profiles without email are left out)."""
        with self.lock:
            ids = self.list_members[list_id]
            return {str(self.profiles[i]["email"]) for i in ids if self.profiles[i].get("email")}

    # -- errors -----------------------------------------------------------------------------

    def _error(
        self,
        status: int,
        code: str,
        title: str,
        detail: str,
        *,
        pointer: str | None = None,
        parameter: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> _Response:
        # JSON:API errors as in every operation's 4XX/5XX response schema.
        source: Json = {}
        if pointer is not None:
            source["pointer"] = pointer
        if parameter is not None:
            source["parameter"] = parameter
        error = {
            "id": str(uuid.uuid4()),
            "status": status,
            "code": code,
            "title": title,
            "detail": detail,
            "source": source,
            "links": {},
            "meta": {},
        }
        body = orjson.dumps({"errors": [error]})
        return _Response(status, body, _JSON_API, dict(headers or {}))

    def _invalid(self, detail: str, pointer: str = "/data") -> _Reply:
        return _Reply(self._error(400, "invalid", "Invalid input.", detail, pointer=pointer))

    def _invalid_parameter(self, detail: str, parameter: str) -> _Reply:
        return _Reply(self._error(400, "invalid", "Invalid input.", detail, parameter=parameter))

    def throttled(self, retry_after: str | None) -> _Response:
        # 429s carry Retry-After (seconds) instead of the RateLimit-* headers
        # (developers.klaviyo.com/en/docs/rate_limits_and_error_handling).
        wait = retry_after or "1"
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        return self._error(
            429,
            "throttled",
            "Request was throttled.",
            f"Request was throttled. Expected available in {wait} second"
            + ("" if wait == "1" else "s")
            + ".",
            headers=headers,
        )

    def server_error(self, status: int) -> _Response:
        if status == 500:
            return self._error(500, "error", "A server error occurred.", "A server error occurred.")
        return super().server_error(status)

    # -- routing ----------------------------------------------------------------------------

    def handle(self, request: _Request) -> _Response:
        self._authenticate(request)
        path = request.path.rstrip("/")
        parts = path.split("/")  # ["", "api", resource, ...]
        if len(parts) < 3 or parts[1] != "api":
            raise _Reply(self._not_found())
        route = self._route(request.method, parts[2:])
        operation, handler = route
        headers = self._throttle(operation)
        if request.method in ("POST", "PATCH", "DELETE") and request.body:
            content_type = request.headers.get_content_type()
            # Klaviyo speaks JSON:API; plain application/json is accepted too (the curl
            # samples in its guides and community threads send it and succeed).
            if content_type not in (_JSON_API, "application/json"):
                raise _Reply(
                    self._error(
                        415,
                        "unsupported_media_type",
                        "Unsupported media type.",
                        f'Unsupported media type "{content_type}" in request.',
                    )
                )
        response = handler(request, parts[2:])
        response.headers.update(headers)
        return response

    def _route(
        self, method: str, parts: list[str]
    ) -> tuple[str, Callable[[_Request, list[str]], _Response]]:
        resource = parts[0]
        routes: dict[tuple[str, int, str], tuple[str, Callable[[_Request, list[str]], _Response]]]
        routes = {
            ("profile-bulk-import-jobs", 1, "POST"): ("bulk_import_profiles", self._import),
            ("profile-bulk-import-jobs", 2, "GET"): ("get_bulk_import_profiles_job", self._job),
            ("event-bulk-create-jobs", 1, "POST"): ("bulk_create_events", self._bulk_events),
            ("events", 1, "POST"): ("create_event", self._event),
            ("data-privacy-deletion-jobs", 1, "POST"): (
                "request_profile_deletion",
                self._deletion,
            ),
        }
        key = (resource, len(parts), method)
        if key in routes:
            return routes[key]
        if resource == "profile-bulk-import-jobs" and len(parts) in (3, 4) and method == "GET":
            tail = "/".join(parts[2:])
            if tail == "import-errors":
                return "get_errors_for_bulk_import_profiles_job", self._job_errors
            if tail in ("profiles", "relationships/profiles"):
                return "get_profiles_for_bulk_import_profiles_job", self._job_profiles
        if resource == "lists" and len(parts) == 4 and parts[2:] == ["relationships", "profiles"]:
            if method == "POST":
                return "add_profiles_to_list", self._list_members
            if method == "DELETE":
                return "remove_profiles_from_list", self._list_members
            raise _Reply(
                self._error(
                    405,
                    "method_not_allowed",
                    "Method not allowed.",
                    f'Method "{method}" not allowed.',
                )
            )
        raise _Reply(self._not_found())

    def _not_found(self, detail: str = "Not found.") -> _Response:
        return self._error(404, "not_found", "Not found.", detail)

    def _authenticate(self, request: _Request) -> None:
        # Private keys go in "Authorization: Klaviyo-API-Key <key>" (Klaviyo API docs,
        # "Authentication").
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme != "Klaviyo-API-Key" or not key.strip():
            raise _Reply(
                self._error(
                    401,
                    "not_authenticated",
                    "Authentication credentials were not provided.",
                    "Missing or invalid private key.",
                    pointer="/data/",
                )
            )
        if not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise _Reply(
                self._error(
                    401,
                    "authentication_failed",
                    "Incorrect authentication credentials.",
                    "Incorrect authentication credentials.",
                    pointer="/data/",
                )
            )
        revision = request.headers.get("revision")
        # Every operation takes a `revision` header, format YYYY-MM-DD[.suffix].
        if revision is None:
            raise self._invalid_parameter("The 'revision' header is required.", "revision")
        match = _REVISION.match(revision.strip())
        valid = match is not None
        if match is not None:
            try:
                datetime(int(match.group(1)), int(match.group(2)), int(match.group(3)))
            except ValueError:
                valid = False
        if not valid:
            raise self._invalid_parameter(
                f"Invalid revision '{revision}'. Expected format YYYY-MM-DD[.suffix].", "revision"
            )

    def _throttle(self, operation: str) -> dict[str, str]:
        limit = self.limits[operation]
        with self.lock:
            windows = self._windows.setdefault(operation, _FixedWindows())
            allowed, wait, remaining = windows.hit(limit, self._sandbox.clock())
        if not self.limits_enabled:
            return {}
        if not allowed:
            response = self.throttled(str(wait))
            response.fault = "throttled"
            raise _Reply(response)
        # Non-429 answers carry the steady window's RateLimit-* headers.
        return {
            "RateLimit-Limit": str(limit.steady),
            "RateLimit-Remaining": str(remaining),
            "RateLimit-Reset": str(wait),
        }

    def _parsed_body(self, request: _Request) -> Any:
        return _json_body(
            request, lambda m: self._error(400, "parse_error", "Malformed request.", m)
        )

    def _body(self, request: _Request, data_type: str, max_bytes: int | None = None) -> Json:
        """The request's ``data`` resource of ``data_type``, checked down to ``attributes``;
        a body over ``max_bytes`` is refused with a 413 first."""
        if max_bytes is not None and len(request.body) > max_bytes:
            raise _Reply(
                self._error(
                    413,
                    "request_entity_too_large",
                    "Request entity too large.",
                    "The payload must not exceed 5MB.",
                )
            )
        document = self._parsed_body(request)
        data = document.get("data") if isinstance(document, dict) else None
        if not isinstance(data, dict):
            raise self._invalid("'data' is a required field.", "/data")
        self._attributes(data, data_type, "/data")
        return data

    def _attributes(
        self, resource: object, data_type: str, pointer: str, attributes_pointer: str | None = None
    ) -> Json:
        """The ``attributes`` of ``resource`` at ``pointer``, a JSON:API resource object of
        ``data_type``; a missing ``attributes`` is reported at ``attributes_pointer``
        (default ``{pointer}/attributes``)."""
        if not isinstance(resource, dict) or resource.get("type") != data_type:
            raise self._invalid(f"'type' must be '{data_type}'.", f"{pointer}/type")
        attributes = resource.get("attributes")
        if not isinstance(attributes, dict):
            raise self._invalid(
                "'attributes' is a required field.",
                f"{pointer}/attributes" if attributes_pointer is None else attributes_pointer,
            )
        return attributes

    def _entries(self, data: Json, name: str, message: str) -> tuple[list[Any], str]:
        """The non-empty ``attributes[name].data`` array of a bulk request, and its pointer."""
        container = data["attributes"].get(name)
        entries = container.get("data") if isinstance(container, dict) else None
        pointer = f"/data/attributes/{name}/data"
        if not isinstance(entries, list) or not entries:
            raise self._invalid(message, pointer)
        return entries, pointer

    # -- profiles ---------------------------------------------------------------------------

    def _new_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):016X}"

    def _upsert(self, attributes: Json) -> str:
        """Create or merge a profile (call with the lock held): matched by email, then
        phone, then external id; given attributes replace, ``null`` clears, ``properties``
        merge key by key (profile-import semantics, Klaviyo API docs)."""
        email = attributes.get("email")
        phone = attributes.get("phone_number")
        external = attributes.get("external_id")
        email_key = email.strip().lower() if isinstance(email, str) else None
        profile_id = (
            (email_key and self._by_email.get(email_key))
            or (phone and self._by_phone.get(phone))
            or (external and self._by_external.get(external))
        )
        if not profile_id:
            profile_id = self._new_id()
            profile = {k: v for k, v in attributes.items() if v is not None}
            profile.setdefault("properties", {})
            self.profiles[profile_id] = profile
        else:
            profile = self.profiles[profile_id]
            for key, value in attributes.items():
                if key == "properties" and isinstance(value, dict):
                    merged = profile.setdefault("properties", {})
                    for name, item in value.items():
                        if item is None:
                            merged.pop(name, None)
                        else:
                            merged[name] = item
                elif value is None:
                    profile.pop(key, None)
                else:
                    profile[key] = value
        if email_key:
            self._by_email[email_key] = profile_id
        if isinstance(phone, str) and phone:
            self._by_phone[phone] = profile_id
        if isinstance(external, str) and external:
            self._by_external[external] = profile_id
        return profile_id

    def _resource(self, profile_id: str) -> Json:
        profile = self.profiles.get(profile_id, {})
        attributes = {
            key: profile.get(key)
            for key in ("email", "phone_number", "external_id", "first_name", "last_name")
        }
        attributes["properties"] = profile.get("properties", {})
        return {
            "type": "profile",
            "id": profile_id,
            "attributes": attributes,
            "links": {"self": f"{self._base()}/api/profiles/{profile_id}/"},
        }

    def _base(self) -> str:
        return f"{self._sandbox.url}/klaviyo"

    # -- bulk import ------------------------------------------------------------------------

    def _import(self, request: _Request, parts: list[str]) -> _Response:
        data = self._body(request, "profile-bulk-import-job", self.MAX_IMPORT_BYTES)
        items, pointer = self._entries(
            data, "profiles", "'profiles' must contain at least one profile."
        )
        if len(items) > self.MAX_IMPORT_PROFILES:
            raise self._invalid(
                f"Too many profiles: {len(items)}. At most "
                f"{self.MAX_IMPORT_PROFILES} profiles can be imported per job.",
                pointer,
            )
        list_ids = self._list_relationship(data)
        check_size = len(request.body) > self.MAX_PROFILE_BYTES
        valid: list[tuple[int, Json]] = []
        errors: list[Json] = []
        for n, item in enumerate(items):
            row = f"{pointer}/{n}"
            attributes = self._attributes(item, "profile", row)
            if not any(attributes.get(k) for k in ("email", "phone_number", "external_id")):
                # A profile needs an identifier for the job to be accepted at all.
                raise self._invalid(
                    "One or more identifiers is required: email, phone_number or external_id.",
                    f"{row}/attributes",
                )
            # Bad values in otherwise well-formed rows fail the row, not the job: they are
            # reported by the job's import-errors (Bulk Profile Import API guide).
            error = None
            email = attributes.get("email")
            phone = attributes.get("phone_number")
            if check_size and len(orjson.dumps(item)) > self.MAX_PROFILE_BYTES:
                error = ("The profile payload must not exceed 100KB.", row)
            elif email is not None and not _valid_email(email):
                error = (f"Invalid email address: {email}", f"{row}/attributes/email")
            elif phone is not None and not (isinstance(phone, str) and _E164.match(phone)):
                error = (
                    f"Invalid phone number: {phone}. Phone numbers must be in E.164 format.",
                    f"{row}/attributes/phone_number",
                )
            if error is not None:
                errors.append(
                    {
                        "type": "import-error",
                        "id": str(uuid.uuid4()),
                        "attributes": {
                            "code": "invalid",
                            "title": "Invalid input.",
                            "detail": error[0],
                            "source": {"pointer": error[1]},
                            "original_payload": item,
                        },
                    }
                )
            else:
                valid.append((n, attributes))
        now = self._sandbox.clock()
        with self.lock:
            ids = [self._upsert(attributes) for _, attributes in valid]
            for list_id in list_ids:
                self.list_members[list_id].update(ids)
            job = _ImportJob(
                id=self._new_id(),
                created_at=now,
                total=len(items),
                profile_ids=list(dict.fromkeys(ids)),
                errors=errors,
                list_ids=list_ids,
                polls_left=self.processing_polls,
            )
            self.jobs[job.id] = job
            body = self._job_document(job, initial=True)
        return _Response(202, orjson.dumps(body), _JSON_API)

    def _list_relationship(self, data: Json) -> list[str]:
        relationships = data.get("relationships")
        if relationships is None:
            return []
        lists = relationships.get("lists") if isinstance(relationships, dict) else None
        entries = lists.get("data") if isinstance(lists, dict) else None
        if not isinstance(entries, list):
            raise self._invalid("'lists' must hold a 'data' array.", "/data/relationships/lists")
        list_ids = []
        for n, entry in enumerate(entries):
            if not isinstance(entry, dict) or entry.get("type") != "list" or not entry.get("id"):
                raise self._invalid(
                    "Each list must have type 'list' and an id.",
                    f"/data/relationships/lists/data/{n}",
                )
            list_id = str(entry["id"])
            if list_id not in self.list_members:
                raise self._invalid(
                    f"List {list_id} does not exist.", f"/data/relationships/lists/data/{n}/id"
                )
            list_ids.append(list_id)
        return list_ids

    def _job_document(self, job: _ImportJob, *, initial: bool = False) -> Json:
        base = f"{self._base()}/api/profile-bulk-import-jobs/{job.id}"
        if initial:
            status, completed, failed = "queued", 0, 0
        elif job.polls_left > 0:
            status, completed, failed = "processing", 0, 0
        else:
            status, completed, failed = "complete", job.total - len(job.errors), len(job.errors)
            if job.completed_at is None:
                job.completed_at = self._sandbox.clock()
        return {
            "data": {
                "type": "profile-bulk-import-job",
                "id": job.id,
                "attributes": {
                    "status": status,
                    "created_at": _utc_iso(job.created_at),
                    "total_count": job.total,
                    "completed_count": completed,
                    "failed_count": failed,
                    "completed_at": (
                        _utc_iso(job.completed_at)
                        if status == "complete" and job.completed_at
                        else None
                    ),
                    "expires_at": _utc_iso(job.created_at + 7 * 86400),
                    "started_at": None if initial else _utc_iso(job.created_at),
                },
                "relationships": {
                    "lists": {
                        "data": [{"type": "list", "id": i} for i in job.list_ids],
                        "links": {
                            "self": f"{base}/relationships/lists/",
                            "related": f"{base}/lists/",
                        },
                    },
                    "profiles": {
                        "links": {
                            "self": f"{base}/relationships/profiles/",
                            "related": f"{base}/profiles/",
                        }
                    },
                    "import-errors": {"links": {"related": f"{base}/import-errors/"}},
                },
                "links": {"self": f"{base}/"},
            },
            "links": {"self": f"{base}/"},
        }

    def _find_job(self, job_id: str) -> _ImportJob:
        job = self.jobs.get(job_id)
        if job is None:
            raise _Reply(
                self._not_found(f"A profile bulk import job with id {job_id} does not exist.")
            )
        return job

    def _job(self, request: _Request, parts: list[str]) -> _Response:
        with self.lock:
            job = self._find_job(parts[1])
            body = self._job_document(job)
            if job.polls_left > 0:
                job.polls_left -= 1
        return _Response(200, orjson.dumps(body), _JSON_API)

    def _page(self, request: _Request, total: int) -> tuple[int, int]:
        raw_size = request.param("page[size]")
        size = self.PAGE_SIZE_DEFAULT
        if raw_size is not None:
            if not raw_size.isdigit() or not 1 <= int(raw_size) <= self.PAGE_SIZE_MAX:
                raise self._invalid_parameter(
                    f"Page size must be an integer between 1 and {self.PAGE_SIZE_MAX}.",
                    "page[size]",
                )
            size = int(raw_size)
        cursor = request.param("page[cursor]")
        start = 0
        if cursor:
            try:
                start = int(base64.urlsafe_b64decode(cursor.encode()).decode().removeprefix("o:"))
            except (ValueError, binascii.Error, UnicodeDecodeError):
                raise self._invalid_parameter("Invalid page cursor.", "page[cursor]") from None
        return max(0, min(start, total)), size

    def _page_links(self, request: _Request, start: int, size: int, total: int) -> Json:
        path = f"{self._base()}{request.path}"

        def link(offset: int) -> str:
            cursor = base64.urlsafe_b64encode(f"o:{offset}".encode()).decode()
            return f"{path}?page%5Bsize%5D={size}&page%5Bcursor%5D={cursor}"

        links: Json = {"self": link(start) if start else path}
        if start + size < total:
            links["next"] = link(start + size)
        if start > 0:
            links["prev"] = link(max(0, start - size))
        return links

    def _job_errors(self, request: _Request, parts: list[str]) -> _Response:
        with self.lock:
            job = self._find_job(parts[1])
            start, size = self._page(request, len(job.errors))
            page = job.errors[start : start + size]
            body = {"data": page, "links": self._page_links(request, start, size, len(job.errors))}
        return _Response(200, orjson.dumps(body), _JSON_API)

    def _job_profiles(self, request: _Request, parts: list[str]) -> _Response:
        ids_only = parts[2] == "relationships"
        with self.lock:
            job = self._find_job(parts[1])
            total = len(job.profile_ids)
            start, size = self._page(request, total)
            window = job.profile_ids[start : start + size]
            data = (
                [{"type": "profile", "id": i} for i in window]
                if ids_only
                else [self._resource(i) for i in window]
            )
            body = {"data": data, "links": self._page_links(request, start, size, total)}
        return _Response(200, orjson.dumps(body), _JSON_API)

    # -- lists ------------------------------------------------------------------------------

    def _list_members(self, request: _Request, parts: list[str]) -> _Response:
        list_id = parts[1]
        document = self._parsed_body(request)
        entries = document.get("data") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise self._invalid("'data' must be an array of profiles.", "/data")
        if len(entries) > self.MAX_LIST_PROFILES:
            raise self._invalid(
                f"A maximum of {self.MAX_LIST_PROFILES} profiles can be sent per call.", "/data"
            )
        ids = []
        for n, entry in enumerate(entries):
            if not isinstance(entry, dict) or entry.get("type") != "profile":
                raise self._invalid("'type' must be 'profile'.", f"/data/{n}/type")
            if not isinstance(entry.get("id"), str) or not entry["id"]:
                raise self._invalid("'id' is a required field.", f"/data/{n}/id")
            ids.append(entry["id"])
        with self.lock:
            members = self.list_members.get(list_id)
            if members is None:
                raise _Reply(self._not_found(f"A list with id {list_id} does not exist."))
            if request.method == "POST":
                unknown = [i for i in ids if i not in self.profiles]
                if unknown:
                    raise self._invalid(f"Invalid profile ids: {', '.join(unknown[:10])}", "/data")
                members.update(ids)
            else:
                members.difference_update(ids)
        return _Response(204)

    # -- events -----------------------------------------------------------------------------

    def _check_event(self, attributes: Json, pointer: str) -> tuple[str, Json]:
        """Validate one event's attributes; returns (metric name, profile data)."""
        # create_event requires properties, metric and profile; metric needs its name
        # ("Must be less than 128 characters"), profile at least one identifier.
        name = self._metric_name(attributes, pointer)
        if not isinstance(name, str) or not name.strip():
            raise self._invalid(
                "'name' is a required field.", f"{pointer}/metric/data/attributes/name"
            )
        if len(name) >= 128:
            raise self._invalid(
                "Metric name must be less than 128 characters.",
                f"{pointer}/metric/data/attributes/name",
            )
        return name, self._check_event_profile(attributes.get("profile"), f"{pointer}/profile")

    def _metric_name(self, attributes: Json, pointer: str) -> object:
        """An event's metric name as given (unchecked), once its properties are checked."""
        if not isinstance(attributes.get("properties"), dict):
            raise self._invalid("'properties' is a required field.", f"{pointer}/properties")
        metric = attributes.get("metric")
        metric_data = metric.get("data") if isinstance(metric, dict) else None
        metric_attrs = metric_data.get("attributes") if isinstance(metric_data, dict) else None
        return metric_attrs.get("name") if isinstance(metric_attrs, dict) else None

    def _check_event_profile(self, profile: object, pointer: str) -> Json:
        data = profile.get("data") if isinstance(profile, dict) else None
        if not isinstance(data, dict) or data.get("type") != "profile":
            raise self._invalid("'profile' is a required field.", f"{pointer}/data")
        attributes = data.get("attributes")
        if not isinstance(attributes, dict):
            attributes = {}
        identifiers = ("email", "phone_number", "external_id", "anonymous_id", "_kx")
        if not data.get("id") and not any(attributes.get(k) for k in identifiers):
            raise self._invalid(
                "One or more identifiers is required.", f"{pointer}/data/attributes"
            )
        email = attributes.get("email")
        if email is not None and not _valid_email(email):
            raise self._invalid(
                f"Invalid email address: {email}", f"{pointer}/data/attributes/email"
            )
        phone = attributes.get("phone_number")
        if phone is not None and not (isinstance(phone, str) and _E164.match(phone)):
            raise self._invalid(
                f"Invalid phone number: {phone}", f"{pointer}/data/attributes/phone_number"
            )
        if data.get("id") and data["id"] not in self.profiles:
            raise self._invalid(f"Profile {data['id']} does not exist.", f"{pointer}/data/id")
        return data

    def _record_event(self, name: str, profile: Json, attributes: Json) -> None:
        """Store one event (lock held). Klaviyo records only the first event with a given
        unique_id "for the same profile and metric"; without one, the time to the second
        is the key (create_event's unique_id description)."""
        if profile.get("id"):
            profile_id = str(profile["id"])
            extra = profile.get("attributes") or {}
            if extra:
                self._merge_into(profile_id, extra)
        else:
            profile_id = self._upsert(profile.get("attributes") or {})
        moment = attributes.get("time") or _utc_iso(self._sandbox.clock())
        unique = attributes.get("unique_id") or str(moment)[:19]
        key = (profile_id, name, str(unique))
        if key in self._event_keys:
            self.duplicate_events += 1
            return
        self._event_keys.add(key)
        self.events.append(
            {
                "id": self._new_id(),
                "metric": name,
                "profile_id": profile_id,
                "unique_id": attributes.get("unique_id"),
                "time": moment,
                "value": attributes.get("value"),
                "properties": attributes.get("properties"),
            }
        )

    def _merge_into(self, profile_id: str, attributes: Json) -> None:
        profile = self.profiles[profile_id]
        for key, value in attributes.items():
            if key == "properties" and isinstance(value, dict):
                profile.setdefault("properties", {}).update(value)
            elif value is not None:
                profile[key] = value
        email = attributes.get("email")
        if isinstance(email, str):
            self._by_email[email.strip().lower()] = profile_id

    def _event(self, request: _Request, parts: list[str]) -> _Response:
        # Event payloads "must not exceed 5 MB" (create_event properties description).
        data = self._body(request, "event", self.MAX_EVENT_BYTES)
        attributes = data["attributes"]
        name, profile = self._check_event(attributes, "/data/attributes")
        with self.lock:
            self._record_event(name, profile, attributes)
        return _Response(202)

    def _bulk_events(self, request: _Request, parts: list[str]) -> _Response:
        data = self._body(request, "event-bulk-create-job", self.MAX_EVENT_BYTES)
        entries, pointer = self._entries(
            data, "events-bulk-create", "'events-bulk-create' must hold at least one entry."
        )
        checked: list[tuple[str, Json, Json]] = []
        for n, entry in enumerate(entries):
            row = f"{pointer}/{n}"
            attrs = self._attributes(entry, "event-bulk-create", row)
            profile = self._check_event_profile(attrs.get("profile"), f"{row}/attributes/profile")
            events = attrs.get("events")
            items = events.get("data") if isinstance(events, dict) else None
            if not isinstance(items, list) or not items:
                raise self._invalid("'events' is a required field.", f"{row}/attributes/events")
            for k, event in enumerate(items):
                where = f"{row}/attributes/events/data/{k}"
                event_attrs = self._attributes(event, "event", where, attributes_pointer=where)
                name = self._metric_name(event_attrs, f"{where}/attributes")
                if not isinstance(name, str) or not name.strip() or len(name) >= 128:
                    raise self._invalid(
                        "'name' is a required field of less than 128 characters.",
                        f"{where}/attributes/metric/data/attributes/name",
                    )
                checked.append((name, profile, event_attrs))
        if len(checked) > self.MAX_BULK_EVENTS:
            raise self._invalid(
                f"Too many events: {len(checked)}. At most {self.MAX_BULK_EVENTS} "
                "events can be created per request.",
                pointer,
            )
        with self.lock:
            for name, profile, event_attrs in checked:
                self._record_event(name, profile, event_attrs)
        return _Response(202)

    # -- privacy deletion -------------------------------------------------------------------

    def _deletion(self, request: _Request, parts: list[str]) -> _Response:
        data = self._body(request, "data-privacy-deletion-job")
        profile = data["attributes"].get("profile")
        pdata = profile.get("data") if isinstance(profile, dict) else None
        pointer = "/data/attributes/profile/data"
        if not isinstance(pdata, dict) or pdata.get("type") != "profile":
            raise self._invalid("'profile' is a required field.", pointer)
        raw = pdata.get("attributes")
        attributes: Json = raw if isinstance(raw, dict) else {}
        given = {
            "id": pdata.get("id"),
            "email": attributes.get("email"),
            "phone_number": attributes.get("phone_number"),
        }
        given = {k: v for k, v in given.items() if v}
        # Exactly one identifier (Klaviyo API, request_profile_deletion).
        if len(given) != 1:
            raise self._invalid(
                "Exactly one of id, email or phone_number must be provided.", pointer
            )
        (kind, value), *_ = given.items()
        if kind == "email" and not _valid_email(value):
            raise self._invalid(f"Invalid email address: {value}", f"{pointer}/attributes/email")
        with self.lock:
            if kind == "id":
                profile_id: str | None = str(value) if value in self.profiles else None
            elif kind == "email":
                profile_id = self._by_email.get(str(value).strip().lower())
            else:
                profile_id = self._by_phone.get(str(value))
            self.deletions.append({kind: value, "profile_id": profile_id})
            if profile_id is not None:
                self._forget(profile_id)
        return _Response(202)

    def _forget(self, profile_id: str) -> None:
        profile = self.profiles.pop(profile_id)
        for index, key in (
            (self._by_email, "email"),
            (self._by_phone, "phone_number"),
            (self._by_external, "external_id"),
        ):
            value = profile.get(key)
            if isinstance(value, str):
                lookup = value.strip().lower() if key == "email" else value
                if index.get(lookup) == profile_id:
                    del index[lookup]
        for members in self.list_members.values():
            members.discard(profile_id)


def _ulid_time(moment: float) -> str:
    """The 10-character time part of a ULID (48-bit milliseconds, Crockford base32)."""
    value = int(moment * 1000) & ((1 << 48) - 1)
    chars = []
    for _ in range(10):
        value, digit = divmod(value, 32)
        chars.append(_CROCKFORD[digit])
    return "".join(reversed(chars))


# ================================================================================= Mailchimp

MemberStatus = Literal["subscribed", "unsubscribed", "cleaned", "pending", "transactional"]
_MEMBER_STATUSES: Final = ("subscribed", "unsubscribed", "cleaned", "pending", "transactional")


@dataclass(slots=True)
class _Segment:
    id: int
    name: str
    members: set[str]
    created_at: str
    updated_at: str


@dataclass(slots=True)
class _McList:
    id: str
    name: str
    members: dict[str, Json] = field(default_factory=dict)  # lower-cased email -> member
    by_hash: dict[str, str] = field(default_factory=dict)  # subscriber hash -> email key
    segments: dict[int, _Segment] = field(default_factory=dict)
    segment_names: dict[str, int] = field(default_factory=dict)
    forgotten: set[str] = field(default_factory=set)


class MailchimpSandbox(_Vendor):
    """Mailchimp Marketing API v3 under ``/mailchimp/3.0``.

    Lists exist only when added from Python (``add_list``). State to assert on:
    ``lists[list_id].members`` (lower-cased email -> member with ``status``,
    ``merge_fields``, ``tags``), ``segment_members(list_id, name)``, and
    ``forgotten(list_id)`` (permanently deleted addresses). ``max_connections`` is the
    concurrency limit (Mailchimp's 10 simultaneous connections).
    """

    name = "mailchimp"
    # "Up to 500 members may be added or updated with each API call" (batch-sub-unsub
    # members description, Mailchimp's OpenAPI spec).
    MAX_BATCH_MEMBERS: Final = 500
    # members_to_add / members_to_remove: "A maximum of 500 members can be sent."
    MAX_SEGMENT_MEMBERS: Final = 500
    # Segment list paging: count default 10, maximum 1000 (Mailchimp's `count` parameter).
    COUNT_DEFAULT: Final = 10
    COUNT_MAX: Final = 1000

    def __init__(self, sandbox: DestinationSandbox, api_key: str) -> None:
        super().__init__(sandbox)
        self.api_key = api_key
        # "Each user account is permitted up to 10 simultaneous connections" and 429 past
        # that (mailchimp.com/developer/marketing/docs/fundamentals).
        self.max_connections = 10
        self.lists: dict[str, _McList] = {}
        self._in_flight = 0
        self._flight_lock = threading.Lock()
        self._segment_ids = count(1001)
        self._contacts = count(1)

    # -- Python API -------------------------------------------------------------------------

    def add_list(self, list_id: str, name: str = "") -> str:
        with self.lock:
            self.lists.setdefault(list_id, _McList(list_id, name or list_id))
            return list_id

    def member(self, list_id: str, email: str) -> Json | None:
        with self.lock:
            return self.lists[list_id].members.get(email.strip().lower())

    def segment_members(self, list_id: str, name: str) -> set[str]:
        """Lower-cased emails in a static segment / tag (empty when there is none)."""
        with self.lock:
            mc_list = self.lists[list_id]
            segment_id = mc_list.segment_names.get(name)
            return set() if segment_id is None else set(mc_list.segments[segment_id].members)

    def forgotten(self, list_id: str) -> set[str]:
        with self.lock:
            return set(self.lists[list_id].forgotten)

    # -- errors -----------------------------------------------------------------------------

    def _problem(
        self,
        status: int,
        title: str,
        detail: str,
        errors: list[Json] | None = None,
        headers: dict[str, str] | None = None,
    ) -> _Response:
        # RFC 7807 problem documents, as every Mailchimp error is.
        body: Json = {
            "type": "https://mailchimp.com/developer/marketing/docs/errors/",
            "title": title,
            "status": status,
            "detail": detail,
            "instance": str(uuid.uuid4()),
        }
        if errors is not None:
            body["errors"] = errors
        return _Response(status, orjson.dumps(body), _PROBLEM_JSON, dict(headers or {}))

    def _invalid(self, errors: list[Json]) -> _Reply:
        return _Reply(
            self._problem(
                400,
                "Invalid Resource",
                "The resource submitted could not be validated. For field-specific details, "
                "see the 'errors' array.",
                errors,
            )
        )

    def _not_found(self) -> _Reply:
        return _Reply(
            self._problem(404, "Resource Not Found", "The requested resource could not be found.")
        )

    def throttled(self, retry_after: str | None) -> _Response:
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        return self._problem(
            429,
            "Too Many Requests",
            f"You have exceeded the limit of {self.max_connections} simultaneous connections.",
            headers=headers,
        )

    def server_error(self, status: int) -> _Response:
        if status == 500:
            return self._problem(
                500,
                "Internal Server Error",
                "An unexpected internal error has occurred. Please contact Support for more "
                "information.",
            )
        return super().server_error(status)

    # -- serving ----------------------------------------------------------------------------

    def _serve(self, request: _Request) -> _Response | None:
        # Concurrency, not request rate, is what Mailchimp limits: count requests in
        # flight (latency included) and refuse the one over the limit.
        with self._flight_lock:
            self._in_flight += 1
            over = self._in_flight > self.max_connections
        try:
            if over:
                response = self.throttled(None)
                response.fault = "throttled"
                return response
            return super()._serve(request)
        finally:
            with self._flight_lock:
                self._in_flight -= 1

    def handle(self, request: _Request) -> _Response:
        self._authenticate(request)
        parts = request.path.strip("/").split("/")
        if len(parts) < 2 or parts[0] != "lists":
            raise self._not_found()
        method = request.method
        with self.lock:
            mc_list = self.lists.get(parts[1])
        if mc_list is None:
            raise self._not_found()
        tail = parts[2:]
        if not tail and method == "POST":
            return self._batch(request, mc_list)
        if len(tail) == 2 and tail[0] == "members" and method in ("PUT", "PATCH"):
            return self._put_member(request, mc_list, unquote(tail[1]), method)
        if len(tail) == 3 and tail[0] == "members" and tail[2] == "tags" and method == "POST":
            return self._member_tags(request, mc_list, unquote(tail[1]))
        if (
            len(tail) == 4
            and tail[0] == "members"
            and tail[2:] == ["actions", "delete-permanent"]
            and method == "POST"
        ):
            return self._delete_permanent(mc_list, unquote(tail[1]))
        if tail == ["segments"] and method == "GET":
            return self._segments(request, mc_list)
        if tail == ["segments"] and method == "POST":
            return self._create_segment(request, mc_list)
        if len(tail) == 2 and tail[0] == "segments" and method == "POST":
            return self._segment_batch(request, mc_list, tail[1])
        if len(tail) == 2 and tail[0] == "members" and method == "GET":
            member = self._find_member(mc_list, unquote(tail[1]))
            if member is None:
                raise self._not_found()
            return self._ok(self._member_json(mc_list, member))
        raise self._not_found()

    def _ok(self, body: Json) -> _Response:
        return _Response(200, orjson.dumps(body), _JSON)

    def _authenticate(self, request: _Request) -> None:
        # HTTP Basic with any username and the API key as password (Mailchimp API
        # fundamentals; the SDK sends ('user', api_key)).
        header = request.headers.get("Authorization", "")
        key = ""
        if header[:6].lower() == "basic ":
            try:
                decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                decoded = ""
            key = decoded.partition(":")[2]
        elif header[:7].lower() == "bearer ":
            key = header[7:].strip()
        if not key or not hmac.compare_digest(key.encode(), self.api_key.encode()):
            raise _Reply(
                self._problem(
                    401,
                    "API Key Invalid",
                    "Your API key may be invalid, or you've attempted to access the wrong "
                    "datacenter.",
                )
            )

    def _document(self, request: _Request) -> Json:
        document = _json_body(
            request,
            lambda m: self._problem(
                400,
                "JSON Parse Exception",
                "We encountered an unspecified JSON parsing error.",
            ),
        )
        if not isinstance(document, dict):
            raise self._invalid([{"field": "", "message": "Schema describes object"}])
        return document

    def _find_member(self, mc_list: _McList, hash_or_email: str) -> Json | None:
        # Member endpoints take the MD5 of the lower-cased email, or the email itself.
        key = hash_or_email.strip().lower()
        with self.lock:
            if "@" in key:
                return mc_list.members.get(key)
            email = mc_list.by_hash.get(key)
            return None if email is None else mc_list.members.get(email)

    def _add_member(self, mc_list: _McList, member: Json) -> None:
        lower = str(member["email_address"]).lower()
        mc_list.members[lower] = member
        mc_list.by_hash[member["id"]] = lower

    def _member_json(self, mc_list: _McList, member: Json) -> Json:
        tags = [
            {"id": sid, "name": mc_list.segments[sid].name}
            for sid in member["tag_ids"]
            if sid in mc_list.segments
        ]
        return {
            "id": member["id"],
            "email_address": member["email_address"],
            "unique_email_id": member["unique_email_id"],
            "contact_id": member["contact_id"],
            "email_type": "html",
            "status": member["status"],
            "merge_fields": member["merge_fields"],
            "tags_count": len(tags),
            "tags": tags,
            "last_changed": member["last_changed"],
            "list_id": mc_list.id,
        }

    def _new_member(self, email: str, status: str, merge_fields: Json, now: str) -> Json:
        lower = email.lower()
        digest = hashlib.md5(lower.encode()).hexdigest()
        return {
            "id": digest,
            "email_address": email,
            "unique_email_id": digest[:10],
            "contact_id": f"{next(self._contacts):032x}",
            "status": status,
            "merge_fields": dict(merge_fields),
            "tag_ids": set(),
            "last_changed": now,
        }

    @staticmethod
    def _compliance_block(member: Json, status: str) -> bool:
        """Whether changing ``member`` to ``status`` is refused for compliance.

        Mailchimp refuses to subscribe an address that unsubscribed, bounced (cleaned) or is
        under compliance review: "<email> is in a compliance state due to unsubscribe,
        bounce, or compliance review and cannot be subscribed." (title "Member In Compliance
        State"), on PUT/PATCH and in batch subscribe alike; re-subscription must go through
        ``pending`` (double opt-in). Seen in public reports: ibericode/mailchimp-for-wordpress
        #798, aelvan/mailchimp-subscribe-craft #115, Automattic/jetpack #21153,
        stackoverflow.com/q/42990336.
        """
        return status == "subscribed" and member["status"] in ("unsubscribed", "cleaned")

    # -- batch subscribe --------------------------------------------------------------------

    def _batch(self, request: _Request, mc_list: _McList) -> _Response:
        document = self._document(request)
        members = document.get("members")
        if not isinstance(members, list):
            raise self._invalid([{"field": "members", "message": "Schema describes array"}])
        if len(members) > self.MAX_BATCH_MEMBERS:
            raise self._invalid(
                [
                    {
                        "field": "members",
                        "message": f"Schema describes array, maximum {self.MAX_BATCH_MEMBERS} "
                        "items allowed.",
                    }
                ]
            )
        update_existing = document.get("update_existing") is True
        # Each member needs email_address; a status, when given, must be from the enum
        # (the batch member schema, AddListMembers, makes status optional): schema
        # violations refuse the whole request, before any member is looked at.
        schema_errors = []
        for n, item in enumerate(members):
            if not isinstance(item, dict):
                schema_errors.append(
                    {"field": f"members.item:{n}", "message": "Schema describes object"}
                )
                continue
            if not isinstance(item.get("email_address"), str):
                schema_errors.append(
                    {
                        "field": f"members.item:{n}.email_address",
                        "message": "This value should not be blank.",
                    }
                )
            if "status" in item and item["status"] not in _MEMBER_STATUSES:
                schema_errors.append(
                    {
                        "field": f"members.item:{n}.status",
                        "message": "Data presented is not one of the accepted values: "
                        + ", ".join(_MEMBER_STATUSES)
                        + ".",
                    }
                )
            merge = item.get("merge_fields")
            if merge is not None and not isinstance(merge, dict):
                schema_errors.append(
                    {
                        "field": f"members.item:{n}.merge_fields",
                        "message": "Schema describes object",
                    }
                )
        if schema_errors:
            raise self._invalid(schema_errors)
        skip_duplicates = (request.param("skip_duplicate_check") or "").lower() == "true"
        new_members: list[Json] = []
        updated: list[Json] = []
        errors: list[Json] = []
        seen: set[str] = set()
        now = _utc_iso(self._sandbox.clock())
        with self.lock:
            for item in members:
                email = item["email_address"].strip()
                problem = self._batch_member(
                    mc_list, item, email, update_existing, skip_duplicates, seen, now
                )
                if problem is None:
                    continue
                if isinstance(problem, tuple):
                    message, code = problem
                    errors.append(
                        {
                            "email_address": email,
                            "error": message,
                            "error_code": code,
                            "field": "",
                            "field_message": "",
                        }
                    )
                elif problem["_created"]:
                    new_members.append(problem["member"])
                else:
                    updated.append(problem["member"])
        body = {
            "new_members": new_members,
            "updated_members": updated,
            "errors": errors,
            "total_created": len(new_members),
            "total_updated": len(updated),
            "error_count": len(errors),
            "_links": [],
        }
        return self._ok(body)

    def _batch_member(
        self,
        mc_list: _McList,
        item: Json,
        email: str,
        update_existing: bool,
        skip_duplicates: bool,
        seen: set[str],
        now: str,
    ) -> tuple[str, str] | Json | None:
        """Apply one batch member (lock held): an (error, error_code) pair, a dict with the
        member JSON and whether it was created, or None for a skipped duplicate."""
        lower = email.lower()
        status: str | None = item.get("status")
        merge_fields = item.get("merge_fields") or {}
        if not _valid_email(email):
            return "Please provide a valid email address.", "ERROR_GENERIC"
        if lower in seen:
            if skip_duplicates:
                return None
            # Without skip_duplicate_check a repeated address is refused rather than
            # silently collapsed (the flag's description; the exact message is not
            # documented).
            return f"{email} is a duplicate in this request.", "ERROR_GENERIC"
        seen.add(lower)
        if lower in mc_list.forgotten:
            return (
                f"{email} was permanently deleted and cannot be re-imported. The contact "
                "must re-subscribe to get back on the list.",
                "ERROR_GENERIC",
            )
        member = mc_list.members.get(lower)
        if member is None:
            if status is None:
                # A new contact needs a status; only updates may leave it out.
                return "Please provide a valid status.", "ERROR_GENERIC"
            member = self._new_member(email, status, merge_fields, now)
            self._add_member(mc_list, member)
            return {"_created": True, "member": self._member_json(mc_list, member)}
        if not update_existing:
            # The batch endpoint's own wording (seen verbatim in many client projects).
            return (
                f"{email} is already a list member, do you want to update? please provide "
                "update_existing:true in the request body",
                "ERROR_CONTACT_EXISTS",
            )
        if status is not None and self._compliance_block(member, status):
            return (
                f"{email} is in a compliance state due to unsubscribe, bounce, or compliance "
                "review and cannot be subscribed.",
                "ERROR_GENERIC",
            )
        member["merge_fields"].update(merge_fields)
        if status is not None:  # without one, an update leaves the status alone
            member["status"] = status
        member["last_changed"] = now
        return {"_created": False, "member": self._member_json(mc_list, member)}

    # -- one member -------------------------------------------------------------------------

    def _put_member(
        self, request: _Request, mc_list: _McList, subscriber_hash: str, method: str
    ) -> _Response:
        document = self._document(request)
        email = document.get("email_address")
        errors = []
        if not isinstance(email, str) or not email.strip():
            errors.append({"field": "email_address", "message": "This value should not be blank."})
        status_if_new = document.get("status_if_new")
        status = document.get("status")
        if method == "PUT" and status_if_new is None:
            # PUT's schema requires status_if_new (Mailchimp spec).
            errors.append({"field": "status_if_new", "message": "This value should not be blank."})
        for name, value in (("status_if_new", status_if_new), ("status", status)):
            if value is not None and value not in _MEMBER_STATUSES:
                errors.append(
                    {
                        "field": name,
                        "message": "Data presented is not one of the accepted values: "
                        + ", ".join(_MEMBER_STATUSES)
                        + ".",
                    }
                )
        merge_fields = document.get("merge_fields") or {}
        if not isinstance(merge_fields, dict):
            errors.append({"field": "merge_fields", "message": "Schema describes object"})
        if errors:
            raise self._invalid(errors)
        assert isinstance(email, str)
        email = email.strip()
        lower = email.lower()
        if not _valid_email(email):
            raise _Reply(
                self._problem(400, "Invalid Resource", "Please provide a valid email address.")
            )
        key = subscriber_hash.strip().lower()
        if key not in (hashlib.md5(lower.encode()).hexdigest(), lower):
            raise _Reply(
                self._problem(
                    400,
                    "Invalid Resource",
                    "The subscriber hash in the URL does not match the email address in the "
                    "request body.",
                )
            )
        with self.lock:
            if lower in mc_list.forgotten:
                raise _Reply(
                    self._problem(
                        400,
                        "Forgotten Email Not Subscribed",
                        f"{email} was permanently deleted and cannot be re-imported. The "
                        "contact must re-subscribe to get back on the list.",
                    )
                )
            member = mc_list.members.get(lower)
            if member is None:
                new_status = status_if_new or status
                if new_status is None:
                    raise self._invalid(
                        [{"field": "status", "message": "This value should not be blank."}]
                    )
                member = self._new_member(
                    email, str(new_status), merge_fields, _utc_iso(self._sandbox.clock())
                )
                self._add_member(mc_list, member)
            else:
                if status is not None and self._compliance_block(member, status):
                    raise _Reply(
                        self._problem(
                            400,
                            "Member In Compliance State",
                            f"{email} is in a compliance state due to unsubscribe, bounce, or "
                            "compliance review and cannot be subscribed.",
                        )
                    )
                if status is not None:
                    member["status"] = status
                member["merge_fields"].update(merge_fields)
                member["last_changed"] = _utc_iso(self._sandbox.clock())
            return self._ok(self._member_json(mc_list, member))

    def _member_tags(self, request: _Request, mc_list: _McList, subscriber_hash: str) -> _Response:
        document = self._document(request)
        tags = document.get("tags")
        if not isinstance(tags, list):
            raise self._invalid([{"field": "tags", "message": "Schema describes array"}])
        for n, tag in enumerate(tags):
            if (
                not isinstance(tag, dict)
                or not isinstance(tag.get("name"), str)
                or not tag["name"].strip()
                or tag.get("status") not in ("active", "inactive")
            ):
                raise self._invalid(
                    [
                        {
                            "field": f"tags.item:{n}",
                            "message": "Each tag needs a name and a status of active or inactive.",
                        }
                    ]
                )
        member = self._find_member(mc_list, subscriber_hash)
        if member is None:
            raise self._not_found()
        with self.lock:
            lower = member["email_address"].lower()
            for tag in tags:
                name = tag["name"].strip()
                segment_id = mc_list.segment_names.get(name)
                if tag["status"] == "active":
                    # "If a tag that does not exist is passed in and set as 'active', a new
                    # tag will be created." (Add or remove member tags, Mailchimp reference)
                    if segment_id is None:
                        segment_id = self._make_segment(mc_list, name).id
                    mc_list.segments[segment_id].members.add(lower)
                    member["tag_ids"].add(segment_id)
                elif segment_id is not None:
                    mc_list.segments[segment_id].members.discard(lower)
                    member["tag_ids"].discard(segment_id)
        return _Response(204)

    def _delete_permanent(self, mc_list: _McList, subscriber_hash: str) -> _Response:
        member = self._find_member(mc_list, subscriber_hash)
        if member is None:
            raise self._not_found()
        with self.lock:
            lower = member["email_address"].lower()
            del mc_list.members[lower]
            mc_list.by_hash.pop(member["id"], None)
            for segment_id in member["tag_ids"]:
                segment = mc_list.segments.get(segment_id)
                if segment is not None:
                    segment.members.discard(lower)
            # A permanently deleted address "cannot be re-imported" (Mailchimp docs).
            mc_list.forgotten.add(lower)
        return _Response(204)

    # -- segments and tags ------------------------------------------------------------------

    def _make_segment(self, mc_list: _McList, name: str) -> _Segment:
        now = _utc_iso(self._sandbox.clock())
        segment = _Segment(next(self._segment_ids), name, set(), now, now)
        mc_list.segments[segment.id] = segment
        mc_list.segment_names[name] = segment.id
        return segment

    def _segment_json(self, mc_list: _McList, segment: _Segment) -> Json:
        return {
            "id": segment.id,
            "name": segment.name,
            "member_count": len(segment.members),
            "type": "static",
            "created_at": segment.created_at,
            "updated_at": segment.updated_at,
            "options": {},
            "list_id": mc_list.id,
        }

    def _int_param(self, request: _Request, name: str, default: int, maximum: int) -> int:
        raw = request.param(name)
        if raw is None:
            return default
        if not raw.isdigit() or int(raw) > maximum:
            raise self._invalid(
                [{"field": name, "message": f"{name} must be an integer up to {maximum}."}]
            )
        return int(raw)

    def _segments(self, request: _Request, mc_list: _McList) -> _Response:
        kind = request.param("type")
        if kind is not None and kind not in ("saved", "static", "fuzzy"):
            raise self._invalid(
                [
                    {
                        "field": "type",
                        "message": "Data presented is not one of the accepted values: saved, "
                        "static, fuzzy.",
                    }
                ]
            )
        page_size = self._int_param(request, "count", self.COUNT_DEFAULT, self.COUNT_MAX)
        offset = self._int_param(request, "offset", 0, 10**9)
        with self.lock:
            # Only static segments (tags) exist in the sandbox.
            segments = [] if kind in ("saved", "fuzzy") else list(mc_list.segments.values())
            page = [self._segment_json(mc_list, s) for s in segments[offset : offset + page_size]]
        return self._ok(
            {"segments": page, "list_id": mc_list.id, "total_items": len(segments), "_links": []}
        )

    def _create_segment(self, request: _Request, mc_list: _McList) -> _Response:
        document = self._document(request)
        name = document.get("name")
        if not isinstance(name, str) or not name.strip():
            raise self._invalid([{"field": "name", "message": "This value should not be blank."}])
        emails = document.get("static_segment", [])
        if "options" in document:
            raise self._invalid(
                [{"field": "options", "message": "The sandbox only supports static segments."}]
            )
        if not isinstance(emails, list) or not all(isinstance(e, str) for e in emails):
            raise self._invalid(
                [{"field": "static_segment", "message": "Schema describes array of strings"}]
            )
        with self.lock:
            if name.strip() in mc_list.segment_names:
                raise _Reply(
                    self._problem(
                        400, "Bad Request", f"A segment or tag named '{name}' already exists."
                    )
                )
            segment = self._make_segment(mc_list, name.strip())
            # "Any emails provided that are not present on the list will be ignored."
            for email in emails:
                member = mc_list.members.get(email.strip().lower())
                if member is not None:
                    segment.members.add(email.strip().lower())
                    member["tag_ids"].add(segment.id)
            return self._ok(self._segment_json(mc_list, segment))

    def _segment_batch(self, request: _Request, mc_list: _McList, raw_id: str) -> _Response:
        document = self._document(request)
        with self.lock:
            segment = mc_list.segments.get(int(raw_id)) if raw_id.isdigit() else None
        if segment is None:
            raise self._not_found()
        lists: dict[str, list[str]] = {}
        for name in ("members_to_add", "members_to_remove"):
            value = document.get(name, [])
            if not isinstance(value, list) or not all(isinstance(e, str) for e in value):
                raise self._invalid([{"field": name, "message": "Schema describes array"}])
            if len(value) > self.MAX_SEGMENT_MEMBERS:
                raise self._invalid(
                    [
                        {
                            "field": name,
                            "message": f"Schema describes array, maximum "
                            f"{self.MAX_SEGMENT_MEMBERS} items allowed.",
                        }
                    ]
                )
            lists[name] = value
        added: list[Json] = []
        removed: list[Json] = []
        not_members: list[str] = []
        with self.lock:
            for email in lists["members_to_add"]:
                member = mc_list.members.get(email.strip().lower())
                if member is None:
                    not_members.append(email)
                    continue
                lower = email.strip().lower()
                if lower not in segment.members:
                    segment.members.add(lower)
                    member["tag_ids"].add(segment.id)
                    added.append(self._member_json(mc_list, member))
            for email in lists["members_to_remove"]:
                lower = email.strip().lower()
                member = mc_list.members.get(lower)
                if member is None:
                    not_members.append(email)
                    continue
                if lower in segment.members:
                    segment.members.discard(lower)
                    member["tag_ids"].discard(segment.id)
                    removed.append(self._member_json(mc_list, member))
            segment.updated_at = _utc_iso(self._sandbox.clock())
        # Errors group the addresses that failed for the same reason (the response's
        # errors[].email_addresses is an array); the exact wording is not documented.
        errors = (
            [{"email_addresses": not_members, "error": "Email addresses do not belong to the list"}]
            if not_members
            else []
        )
        return self._ok(
            {
                "members_added": added,
                "members_removed": removed,
                "errors": errors,
                "total_added": len(added),
                "total_removed": len(removed),
                "error_count": len(not_members),
                "_links": [],
            }
        )


# ================================================================================= webhooks

RejectRule = Callable[[Json], "str | bool | None"]


@dataclass(slots=True)
class WebhookReceiver:
    """One receiver at ``/webhook/<name>``.

    ``reject`` is called with each record (``{"key", "id", "data"}``); a str or True refuses
    it (the str is the message). With ``reject_mode="errors"`` refused records are listed in
    a 200 ``{"errors": [...]}`` and the rest accepted; with ``"batch"`` any refusal makes the
    whole batch a 422 and nothing is accepted. ``rate_per_second`` (None: unlimited) answers
    429 with ``Retry-After`` past that many requests in a clock second.
    """

    name: str
    secret: str
    signature_header: str = "X-Syncd-Signature"
    reject: RejectRule | None = None
    reject_mode: Literal["errors", "batch"] = "errors"
    rate_per_second: int | None = None
    batches: list[Json] = field(default_factory=list)
    records: list[Json] = field(default_factory=list)
    redeliveries: int = 0
    idempotency_keys: set[str] = field(default_factory=set)
    _window: _FixedWindows = field(default_factory=_FixedWindows)


# The context's wire format (syncd issue 4): modes and the ops each mode sends.
_WEBHOOK_ACTIONS: Final = {
    "upsert": ("upsert",),
    "mirror": ("add", "remove"),
    "event": ("event",),
    "delete": ("delete",),
}


class WebhookSandbox(_Vendor):
    """Receivers for syncd's signed webhook batches, at ``/webhook/<name>``."""

    name = "webhook"

    def __init__(self, sandbox: DestinationSandbox) -> None:
        super().__init__(sandbox)
        self.receivers: dict[str, WebhookReceiver] = {}

    def add(
        self,
        name: str,
        secret: str,
        *,
        signature_header: str = "X-Syncd-Signature",
        reject: RejectRule | None = None,
        reject_mode: Literal["errors", "batch"] = "errors",
        rate_per_second: int | None = None,
    ) -> WebhookReceiver:
        if not name or "/" in name:
            raise ValueError("a receiver name is one path segment")
        receiver = WebhookReceiver(
            name, secret, signature_header, reject, reject_mode, rate_per_second
        )
        with self.lock:
            self.receivers[name] = receiver
        return receiver

    def __getitem__(self, name: str) -> WebhookReceiver:
        return self.receivers[name]

    def _message(
        self, status: int, message: str, headers: dict[str, str] | None = None
    ) -> _Response:
        return _Response(status, orjson.dumps({"message": message}), _JSON, dict(headers or {}))

    def throttled(self, retry_after: str | None) -> _Response:
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        return self._message(429, "Too many requests", headers)

    def handle(self, request: _Request) -> _Response:
        name = request.path.strip("/")
        with self.lock:
            receiver = self.receivers.get(name)
        if receiver is None:
            return self._message(404, f"no receiver named {name!r}")
        if request.method != "POST":
            return self._message(405, "POST only")
        if receiver.rate_per_second is not None:
            with self.lock:
                allowed, wait, _ = receiver._window.hit(
                    RateLimit(receiver.rate_per_second, 10**9), self._sandbox.clock()
                )
            if not allowed:
                response = self.throttled(str(wait))
                response.fault = "throttled"
                return response
        signature = request.headers.get(receiver.signature_header, "")
        expected = (
            "sha256=" + hmac.new(receiver.secret.encode(), request.body, hashlib.sha256).hexdigest()
        )
        if not hmac.compare_digest(signature.strip().encode(), expected.encode()):
            return self._message(401, "invalid or missing signature")
        if request.headers.get_content_type() != "application/json":
            return self._message(415, "Content-Type must be application/json")
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError:
            return self._message(400, "body is not JSON")
        problem = _webhook_shape(body)
        if problem is not None:
            return self._message(400, problem)
        records: list[Json] = body["records"]
        rejected: list[Json] = []
        accepted: list[Json] = []
        for record in records:
            verdict = receiver.reject(record) if receiver.reject is not None else None
            if verdict:
                message = verdict if isinstance(verdict, str) else "rejected"
                rejected.append({"key": record["key"], "message": message})
            else:
                accepted.append(record)
        if rejected and receiver.reject_mode == "batch":
            return self._message(
                422, f"{len(rejected)} record(s) refused: {rejected[0]['message']}"
            )
        key = request.headers.get("Idempotency-Key") or body["batch_id"]
        with self.lock:
            if key in receiver.idempotency_keys:
                receiver.redeliveries += 1
            receiver.idempotency_keys.add(key)
            receiver.batches.append(
                {
                    "batch_id": body["batch_id"],
                    "idempotency_key": key,
                    "sync": body["sync"],
                    "mode": body["mode"],
                    "action": body["action"],
                    "sent_at": body["sent_at"],
                    "records": len(records),
                    "accepted": len(accepted),
                    "rejected": rejected,
                }
            )
            for record in accepted:
                receiver.records.append({"action": body["action"], "sync": body["sync"], **record})
        return _Response(200, orjson.dumps({"errors": rejected} if rejected else {}), _JSON)


def _webhook_shape(body: object) -> str | None:
    """Why ``body`` is not a syncd webhook batch, or None."""
    if not isinstance(body, dict):
        return "body must be a JSON object"
    for name in ("sync", "mode", "action", "batch_id", "sent_at"):
        if not isinstance(body.get(name), str) or not body[name]:
            return f"'{name}' must be a non-empty string"
    actions = _WEBHOOK_ACTIONS.get(body["mode"])
    if actions is None:
        return f"unknown mode {body['mode']!r}"
    if body["action"] not in actions:
        return f"action {body['action']!r} does not belong to mode {body['mode']!r}"
    if not re.fullmatch(r"[0-9a-f]{64}", body["batch_id"]):
        return "'batch_id' must be a hex SHA-256"
    records = body.get("records")
    if not isinstance(records, list) or not records:
        return "'records' must be a non-empty array"
    for n, record in enumerate(records):
        if not isinstance(record, dict) or set(record) != {"key", "id", "data"}:
            return f"records[{n}] must have exactly key, id and data"
        if not isinstance(record["key"], str) or not record["key"]:
            return f"records[{n}].key must be a non-empty string"
        if record["id"] is not None and not isinstance(record["id"], str):
            return f"records[{n}].id must be a string or null"
        if not isinstance(record["data"], dict):
            return f"records[{n}].data must be an object"
    return None


# =================================================================================== server


class DestinationSandbox(ServedSandbox):
    """Klaviyo, Mailchimp and webhook receivers on one local HTTP server.

    ``start()`` binds (port 0 picks a free port) and serves on a daemon thread; use it as a
    context manager to stop it again. ``klaviyo``, ``mailchimp`` and ``webhooks`` are the
    vendors: each has ``faults`` (a ``FaultConfig``), ``requests`` (its log) and its state.
    ``log_bodies=False`` keeps request sizes but not parsed bodies (for benchmarks);
    ``clock`` is the time source for rate-limit windows and timestamps.
    """

    thread_name = "sandbox-destinations"
    description = "the destination sandbox"
    # Benchmarks open many keep-alive connections at once; the default backlog of 5 would
    # make connects wait on SYN retries.
    request_queue_size = 128

    def __init__(
        self,
        *,
        klaviyo_key: str = "pk_sandbox",
        mailchimp_key: str = "0123456789abcdef0123456789abcdef-us1",
        host: str = "127.0.0.1",
        port: int = 0,
        log_bodies: bool = True,
        clock: Clock = time.time,
    ) -> None:
        super().__init__(_Handler, host, port)
        self.log_bodies = log_bodies
        self.clock = clock
        self.klaviyo = KlaviyoSandbox(self, klaviyo_key)
        self.mailchimp = MailchimpSandbox(self, mailchimp_key)
        self.webhooks = WebhookSandbox(self)

    # -- addresses --------------------------------------------------------------------------

    @property
    def klaviyo_url(self) -> str:
        return f"{self.url}/klaviyo"

    @property
    def mailchimp_url(self) -> str:
        return f"{self.url}/mailchimp/3.0"

    def webhook_url(self, name: str) -> str:
        return f"{self.url}/webhook/{name}"

    # -- conveniences -----------------------------------------------------------------------

    def vendors(self) -> Iterable[_Vendor]:
        return (self.klaviyo, self.mailchimp, self.webhooks)

    def set_faults(self, config: FaultConfig, vendor: str | None = None) -> None:
        """Apply ``config`` to one vendor (``klaviyo``, ``mailchimp``, ``webhook``) or all."""
        for each in self.vendors():
            if vendor is None or each.name == vendor:
                each.faults = config

    @property
    def requests(self) -> list[DestRequest]:
        """Every vendor's log merged, oldest first."""
        merged = [r for vendor in self.vendors() for r in vendor.requests]
        return sorted(merged, key=lambda r: r.at)

    def reset_logs(self) -> None:
        for vendor in self.vendors():
            vendor.reset_log()

    def _vendor_for(self, raw_path: str) -> tuple[_Vendor | None, str]:
        for prefix, vendor in (
            ("/klaviyo", self.klaviyo),
            ("/mailchimp/3.0", self.mailchimp),
            ("/webhook", self.webhooks),
        ):
            if raw_path == prefix or raw_path.startswith(prefix + "/"):
                return vendor, raw_path[len(prefix) :] or "/"
        return None, raw_path


class _Handler(SandboxHandler[DestinationSandbox]):
    server_version = "sandbox"

    def handle_request(self) -> None:
        body = self.read_body()
        raw_path, _, raw_query = self.path.partition("?")
        vendor, rest = self.app._vendor_for(raw_path)
        if vendor is None:
            self._send(_Response(404, b'{"message":"not found"}', _JSON))
            return
        request = _Request(
            self.command,
            rest,
            parse_qsl(raw_query, keep_blank_values=True),
            self.headers,
            body,
        )
        response = vendor.serve(request)
        if response is None:
            self.close_connection = True
            return
        self._send(response)

    def _send(self, response: _Response) -> None:
        content_type = None if response.status == 204 else response.content_type
        self.write_response(response.status, response.body, content_type, response.headers.items())
