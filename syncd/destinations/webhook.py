"""Signed JSON batches to any URL: Zapier, Make, n8n, an in-house service.

Wire format (the sandbox's receivers and users' own receivers rely on it)::

    POST <base_url>                       the mapping's base_url is the full target URL
    Content-Type: application/json
    X-Syncd-Signature: sha256=<hex HMAC-SHA256(secret, raw body)>   (option signature_header)
    Idempotency-Key: <batch_id>

    {"sync": <sync name>, "mode": <mode>, "action": <op>,
     "batch_id": <hex sha256 of action + "\\n".join(keys + event ids)>,
     "sent_at": "<UTC ISO 8601 with Z>",
     "records": [{"key": <record key>, "id": <event_id or dest_id or null>, "data": <payload>}]}

``action`` is the engine's operation: ``upsert``, ``add``/``remove`` (mirror), ``event``
or ``delete``. ``data`` is the mapped record as is (``{}`` for ``remove``). ``batch_id``
depends only on the action, keys and event ids, so a batch re-sent after a crash or a
retry carries the same ``Idempotency-Key``.

An erasure request (``syncd forget``) arrives in the same envelope with ``mode`` and
``action`` ``"erasure"``, ``sync`` the mapping's name and one record: ``key``
``"privacy-request-<id>"`` and ``data`` ``{"email", "phone", "record_keys": {sync: key},
"dest_ids": {sync: id}}`` (unknown values null or empty): the receiver deletes what it
holds about that person and answers 2xx.

A receiver verifies the signature over the raw body bytes, before parsing them, with
:func:`verify_signature` (or the same HMAC in any language), and answers:

* 2xx: every record accepted, except those named in an optional JSON body
  ``{"errors": [{"key": "...", "message": "..."}]}``, which are rejected with that message;
* 400/409/413/422: the whole batch is refused for its content; syncd splits it to find
  the bad records. The refusal's text comes from the body's ``message``/``error``, else
  the status line;
* any other 4xx (401/403: a wrong secret; 404/405/410: a wrong URL): the run fails at
  once with the receiver's message, after that one request; 429/5xx: retried by
  ``syncd.http`` (``Retry-After`` honoured).

Options (``[options]`` of the mapping): ``signature_header`` (default
``X-Syncd-Signature``) and ``headers``, a table of extra static headers (an API key
header the receiver wants, say). Credential: ``secret``. ``base_url`` is required.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import ClassVar, Final
from urllib.parse import urlsplit

import httpx
import orjson
import structlog
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from syncd.destinations.base import (
    ALL_OPS,
    Destination,
    Handler,
    Item,
    Op,
    Outcome,
    Person,
    Receipt,
    SyncTarget,
)
from syncd.http import ApiError, ServiceLimits, redact_url, vendor_message

__all__ = [
    "DEFAULT_SIGNATURE_HEADER",
    "MAX_BATCH",
    "WebhookDestination",
    "WebhookOptions",
    "batch_id",
    "signature",
    "verify_signature",
]

log = structlog.get_logger("syncd.destinations.webhook")

DEFAULT_SIGNATURE_HEADER: Final = "X-Syncd-Signature"
SIGNATURE_PREFIX: Final = "sha256="
# No vendor limit: a receiver is whatever the user points at. 1000 records keeps a
# request around a megabyte for typical payloads (Zapier and Make accept several MB);
# a mapping's batch_size lowers it for receivers that want less.
MAX_BATCH: Final = 1000

# RFC 9110 token characters: what a header name may be made of.
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# Headers the adapter owns: a static header may not replace them, or the receiver
# could no longer parse, verify or deduplicate what it gets.
_RESERVED_HEADERS: Final = frozenset({"content-type", "content-length", "idempotency-key", "host"})


def signature(secret: str | bytes, body: bytes) -> str:
    """The signature header value: ``sha256=`` + hex HMAC-SHA256 of ``body`` keyed by ``secret``."""
    key = secret.encode() if isinstance(secret, str) else secret
    return SIGNATURE_PREFIX + hmac.new(key, body, hashlib.sha256).hexdigest()


def verify_signature(secret: str | bytes, body: bytes, header_value: str | None) -> bool:
    """Whether ``header_value`` signs exactly ``body``; compared in constant time.

    ``body`` must be the raw request bytes as received: re-serializing parsed JSON
    changes spacing or key order and breaks the comparison.
    """
    if not header_value:
        return False
    return hmac.compare_digest(signature(secret, body).encode(), header_value.strip().encode())


def batch_id(sync: str, action: str, items: Sequence[Item]) -> str:
    """The batch's idempotency key: hex sha256 of the sync, the action and each record's
    key, id and data. The same batch re-sent (a retry, a re-run after a crash) gets the
    same key; new content for the same keys gets a new one, so a receiver deduplicating
    on it never drops a real update."""
    document = [sync, action, [[i.key, i.event_id or i.dest_id, i.payload] for i in items]]
    body = orjson.dumps(document, option=orjson.OPT_SORT_KEYS, default=str)
    return hashlib.sha256(body).hexdigest()


def utc_now() -> str:
    """``sent_at``: the current UTC time, ISO 8601 with a ``Z``, to the millisecond."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class WebhookOptions(BaseModel):
    """``[options]`` of a webhook mapping."""

    model_config = ConfigDict(extra="forbid")

    signature_header: str = DEFAULT_SIGNATURE_HEADER
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("signature_header")
    @classmethod
    def _header_name(cls, value: str) -> str:
        name = value.strip()
        if not _HEADER_NAME.match(name):
            raise ValueError(f"expected an HTTP header name, got {value!r}")
        if name.lower() in _RESERVED_HEADERS:
            raise ValueError(f"{name} is set by syncd itself")
        return name

    @field_validator("headers")
    @classmethod
    def _header_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _HEADER_NAME.match(name):
                raise ValueError(f"expected HTTP header names, got {name!r}")
            if name.lower() in _RESERVED_HEADERS:
                raise ValueError(f"{name} is set by syncd itself")
            if "\r" in text or "\n" in text:
                raise ValueError(f"the value of {name} must be on one line")
        return value


class WebhookDestination(Destination):
    """POSTs each batch, signed, to the mapping's ``base_url``."""

    type: ClassVar[str] = "webhook"
    modes: ClassVar[frozenset[str]] = frozenset({"upsert", "mirror", "event", "delete"})
    max_batch: ClassVar[Mapping[str, int]] = dict.fromkeys(ALL_OPS, MAX_BATCH)
    credential_names: ClassVar[tuple[str, ...]] = ("secret",)
    # No vendor, so no documented limit. Automation platforms throttle per hook (Zapier
    # answers 429 when a hook is flooded) and in-house receivers are often small: a
    # couple of batches in flight, a few per second, and a mapping's [limits] can raise
    # it. 429/5xx and Retry-After are handled by syncd.http.
    default_limits: ClassVar[ServiceLimits] = ServiceLimits(requests_per_second=5.0, concurrency=2)
    Options = WebhookOptions

    @classmethod
    def api_root(cls, base_url: str) -> str:
        url = base_url.strip()
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"a webhook destination's base_url must be an http(s) URL, got {redact_url(url)}"
            )
        return url

    def setup(self) -> None:
        # Requests go to this absolute URL exactly as written: httpx would add a slash
        # to a base URL's path, and some receivers route "/hook" and "/hook/" apart.
        self.url = self.base_url
        self._secret = self.credentials["secret"].get_secret_value().encode()

    @classmethod
    def default_base_url(cls, credentials: Mapping[str, SecretStr]) -> str:
        """There is no default: the target URL is the mapping's ``base_url``.

        Raises ValueError, so a mapping without one fails when its destination is built
        (at start-up), not on the first batch.
        """
        raise ValueError("a webhook destination needs base_url: the full URL to POST batches to")

    @classmethod
    def check_credentials(cls, credentials: Mapping[str, SecretStr]) -> str | None:
        secret = credentials.get("secret")
        if secret is None or not secret.get_secret_value().strip():
            return "secret is empty"
        return None

    def handlers(self) -> Mapping[Op, Handler]:
        # One wire format for every operation: the action names it.
        return {op: functools.partial(self._post, op) for op in ALL_OPS}

    def refusal_message(self, exc: ApiError) -> str:
        """The receiver's reason for refusing a batch: its message, else the status line."""
        if vendor_message(exc.body)[0]:
            return exc.message
        return f"HTTP {exc.status} {exc.message}".strip()

    async def forget(
        self, person: Person, targets: Sequence[SyncTarget], fields: Collection[str]
    ) -> Receipt:
        data = {
            "email": person.email,
            "phone": person.phone,
            "record_keys": dict(person.record_keys),
            "dest_ids": dict(person.dest_ids),
        }
        record = Item(f"privacy-request-{person.request}", data)
        outcomes = await self._deliver(self.name, "erasure", "erasure", [record])
        if not outcomes[0].ok:
            raise ApiError(
                self.client.service,
                None,
                "POST",
                redact_url(self.url),
                f"the receiver refused the erasure record: {outcomes[0].error}",
            )
        # The batch id is the Idempotency-Key the receiver saw: its reference for it.
        return Receipt.done(
            "signed erasure record delivered", batch_id(self.name, "erasure", [record])
        )

    async def _post(self, op: Op, target: SyncTarget, items: Sequence[Item]) -> list[Outcome]:
        return await self._deliver(target.name, target.mode, op, items)

    async def _deliver(
        self, sync: str, mode: str, action: str, items: Sequence[Item]
    ) -> list[Outcome]:
        options = self.options
        assert isinstance(options, WebhookOptions)
        bid = batch_id(sync, action, items)
        document = {
            "sync": sync,
            "mode": mode,
            "action": action,
            "batch_id": bid,
            "sent_at": utc_now(),
            "records": [
                {"key": item.key, "id": item.event_id or item.dest_id, "data": item.payload}
                for item in items
            ],
        }
        # Serialized once: the signature covers exactly these bytes, and syncd.http
        # resends the same bytes on every retry.
        body = orjson.dumps(document)
        headers = {
            **options.headers,
            "Content-Type": "application/json",
            "Idempotency-Key": bid,
            options.signature_header: signature(self._secret, body),
        }
        response = await self.call("POST", self.url, content=body, headers=headers)
        if response.is_redirect:
            # Not followed (a redirected POST can become a GET or leak the signature to
            # another host): the mapping should name the final URL.
            location = redact_url(response.headers.get("location", "?"))
            raise ApiError(
                self.client.service,
                response.status_code,
                "POST",
                self.url,
                f"redirected to {location}; use that URL as base_url",
            )
        return _outcomes(items, response)


def _outcomes(items: Sequence[Item], response: httpx.Response) -> list[Outcome]:
    rejected = _rejected_keys(response)
    return [
        Outcome.rejected(rejected[item.key]) if item.key in rejected else Outcome.accepted()
        for item in items
    ]


def _rejected_keys(response: httpx.Response) -> dict[str, str]:
    """Key -> message from a 2xx body's ``errors``; empty for any other body.

    Receivers answer with anything from nothing to an HTML "OK" page; only a JSON object
    with an ``errors`` list names rejected records, everything else means all accepted.
    """
    raw = response.content.strip()
    if not raw.startswith(b"{"):
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    errors = body.get("errors") if isinstance(body, dict) else None
    if not isinstance(errors, list):
        return {}
    rejected: dict[str, str] = {}
    for entry in errors:
        key = entry.get("key") if isinstance(entry, dict) else None
        if key is None or isinstance(key, dict | list):
            # An error that names no record cannot be pinned on one; say so rather than
            # fail records the receiver may well have stored.
            log.warning("webhook.error_without_key", entry=str(entry)[:200])
            continue
        message = entry.get("message")
        text = message.strip() if isinstance(message, str) and message.strip() else None
        rejected.setdefault(str(key), text or "rejected by the receiver")
    return rejected
