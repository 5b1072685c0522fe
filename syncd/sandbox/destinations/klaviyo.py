"""Klaviyo's JSON:API sandbox, served under ``/klaviyo``."""

from __future__ import annotations

import base64
import binascii
import hmac
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from itertools import count
from typing import TYPE_CHECKING, Any, Final

import orjson

from syncd.sandbox.destinations.base import (
    Json,
    RateLimit,
    _FixedWindows,
    _json_body,
    _Reply,
    _Request,
    _Response,
    _utc_iso,
    _valid_email,
    _Vendor,
)

if TYPE_CHECKING:
    from syncd.sandbox.destinations import DestinationSandbox

# Klaviyo's revision header: "YYYY-MM-DD[.suffix]" (every operation's `revision` parameter
# in klaviyo/openapi openapi/stable.json).
_REVISION: Final = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(\.[A-Za-z0-9_-]+)?$")
_CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_JSON_API: Final = "application/vnd.api+json"
# E.164: "+", a country code not starting with 0, at most 15 digits in all.
_E164: Final = re.compile(r"^\+[1-9]\d{1,14}$")

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
    "bulk_subscribe_profiles": RateLimit(75, 750),
    "bulk_unsubscribe_profiles": RateLimit(75, 750),
}


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
    (profile deletion requests), ``jobs`` (bulk import jobs by id) and ``consent``
    (profile id -> channel -> "SUBSCRIBED" / "UNSUBSCRIBED", set by the subscription jobs,
    with every job's profiles in ``subscription_jobs``). ``profile_by_email``
    finds a profile id by address. Set ``processing_polls`` to make each new bulk import
    job answer ``processing`` that many times before ``complete``; ``limits`` (operation id
    -> RateLimit) and ``limits_enabled`` control throttling.
    """

    name = "klaviyo"
    prefix = "/klaviyo"
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
    # bulk_subscribe_profiles: "Maximum number of profiles can be submitted for
    # subscription: 1000"; bulk_unsubscribe_profiles: "Maximum number of profiles per call:
    # 100" (klaviyo/openapi, openapi/stable/apis/bulk_(un)subscribe_profiles.json).
    MAX_SUBSCRIBE_PROFILES: Final = 1000
    MAX_UNSUBSCRIBE_PROFILES: Final = 100
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
        self.consent: dict[str, dict[str, str]] = {}
        self.subscription_jobs: list[Json] = []
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
            ("profile-subscription-bulk-create-jobs", 1, "POST"): (
                "bulk_subscribe_profiles",
                self._subscribe,
            ),
            ("profile-subscription-bulk-delete-jobs", 1, "POST"): (
                "bulk_unsubscribe_profiles",
                self._unsubscribe,
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

    # -- subscriptions ----------------------------------------------------------------------

    def consent_of(self, email: str, channel: str = "email") -> str | None:
        """A profile's marketing consent on a channel, by address (None: never stated)."""
        with self.lock:
            profile_id = self._by_email.get(email.strip().lower())
            return None if profile_id is None else self.consent.get(profile_id, {}).get(channel)

    def _subscription_list(self, data: Json) -> str | None:
        """The optional ``relationships.list`` of a subscription job (one list)."""
        relationships = data.get("relationships")
        if relationships is None:
            return None
        listed = relationships.get("list") if isinstance(relationships, dict) else None
        entry = listed.get("data") if isinstance(listed, dict) else None
        pointer = "/data/relationships/list/data"
        if not isinstance(entry, dict) or entry.get("type") != "list" or not entry.get("id"):
            raise self._invalid("'list' must have type 'list' and an id.", pointer)
        list_id = str(entry["id"])
        if list_id not in self.list_members:
            raise self._invalid(f"List {list_id} does not exist.", f"{pointer}/id")
        return list_id

    def _subscription_profiles(
        self, data: Json, consent: str, limit: int
    ) -> list[tuple[str, str, str]]:
        """``(identity field, value, channel)`` of each profile of a (un)subscribe job,
        checked as the spec's ProfileSubscription(Create|Delete)QueryResourceObject: email
        or phone_number, and ``subscriptions.<channel>.marketing.consent`` = ``consent``."""
        entries, pointer = self._entries(data, "profiles", "'profiles' is a required field.")
        if len(entries) > limit:
            raise self._invalid(
                f"A maximum of {limit} profiles can be submitted per request.", pointer
            )
        found: list[tuple[str, str, str]] = []
        for n, entry in enumerate(entries):
            attrs = self._attributes(entry, "profile", f"{pointer}/{n}")
            subscriptions = attrs.get("subscriptions")
            if not isinstance(subscriptions, dict) or not subscriptions:
                raise self._invalid(
                    "'subscriptions' is a required field.", f"{pointer}/{n}/attributes"
                )
            for channel, params in subscriptions.items():
                field = {"email": "email", "sms": "phone_number"}.get(channel)
                marketing = params.get("marketing") if isinstance(params, dict) else None
                given = marketing.get("consent") if isinstance(marketing, dict) else None
                where = f"{pointer}/{n}/attributes/subscriptions/{channel}/marketing/consent"
                if field is None or given != consent:
                    raise self._invalid(f"'consent' must be '{consent}'.", where)
                value = attrs.get(field)
                if not isinstance(value, str) or not value:
                    raise self._invalid(
                        f"'{field}' is required to change {channel} consent.",
                        f"{pointer}/{n}/attributes",
                    )
                if field == "email" and not _valid_email(value):
                    raise self._invalid(
                        f"Invalid email address: {value}", f"{pointer}/{n}/attributes/email"
                    )
                found.append((field, value, channel))
        return found

    def _subscribe(self, request: _Request, parts: list[str]) -> _Response:
        data = self._body(request, "profile-subscription-bulk-create-job")
        list_id = self._subscription_list(data)
        profiles = self._subscription_profiles(data, "SUBSCRIBED", self.MAX_SUBSCRIBE_PROFILES)
        with self.lock:
            for field, value, channel in profiles:
                # "If a profile cannot be found matching the given identifier(s), a new
                # profile will be created and then subscribed."
                profile_id = self._upsert({field: value})
                self.consent.setdefault(profile_id, {})[channel] = "SUBSCRIBED"
                if list_id is not None:
                    self.list_members[list_id].add(profile_id)
            self.subscription_jobs.append(
                {"kind": "subscribe", "list": list_id, "profiles": [v for _, v, _ in profiles]}
            )
        return _Response(202)

    def _unsubscribe(self, request: _Request, parts: list[str]) -> _Response:
        data = self._body(request, "profile-subscription-bulk-delete-job")
        list_id = self._subscription_list(data)
        profiles = self._subscription_profiles(data, "UNSUBSCRIBED", self.MAX_UNSUBSCRIBE_PROFILES)
        with self.lock:
            for field, value, channel in profiles:
                profile_id = self._upsert({field: value})
                self.consent.setdefault(profile_id, {})[channel] = "UNSUBSCRIBED"
                # "All profiles will be removed from the provided list."
                if list_id is not None:
                    self.list_members[list_id].discard(profile_id)
            self.subscription_jobs.append(
                {"kind": "unsubscribe", "list": list_id, "profiles": [v for _, v, _ in profiles]}
            )
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
