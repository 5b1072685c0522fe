"""Receivers of syncd's signed webhook batches, served under ``/webhook/<name>``."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal

import orjson

from syncd.sandbox.destinations.base import (
    _JSON,
    Json,
    RateLimit,
    _FixedWindows,
    _Request,
    _Response,
    _Vendor,
)

if TYPE_CHECKING:
    from syncd.sandbox.destinations import DestinationSandbox


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
    # An erasure request for one person (syncd forget), outside any sync.
    "erasure": ("erasure",),
}
_ERASURE_DATA: Final = frozenset({"email", "phone", "record_keys", "dest_ids"})


class WebhookSandbox(_Vendor):
    """Receivers for syncd's signed webhook batches, at ``/webhook/<name>``."""

    name = "webhook"
    prefix = "/webhook"

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
        if body["mode"] == "erasure" and set(record["data"]) != _ERASURE_DATA:
            return f"records[{n}].data of an erasure must have exactly " + ", ".join(
                sorted(_ERASURE_DATA)
            )
    return None
