"""Mailchimp Marketing API v3 sandbox, served under ``/mailchimp/3.0``."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import threading
import uuid
from dataclasses import dataclass, field
from itertools import count
from typing import TYPE_CHECKING, Final, Literal
from urllib.parse import unquote

import orjson

from syncd.sandbox.destinations.base import (
    _JSON,
    Json,
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

_PROBLEM_JSON: Final = "application/problem+json; charset=utf-8"

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
    prefix = "/mailchimp/3.0"
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
