"""What WooCommerce's webhook deliveries look like (WooCommerce core
``includes/class-wc-webhook.php``; REST API docs, "Webhooks"):

* a delivery is a POST, ``Content-Type: application/json``, body ``trim(wp_json_encode(payload))``,
  with headers ``X-WC-Webhook-Source`` (home URL), ``-Topic`` (``order.updated``), ``-Resource``,
  ``-Event``, ``-Signature``, ``-ID`` (the webhook's id) and ``-Delivery-ID``;
* ``X-WC-Webhook-Signature`` is ``base64(HMAC-SHA256(raw body, secret))``;
* the payload is the REST resource as ``GET /wc/v3/{resource}s/{id}`` returns it, except for
  ``deleted`` events, which send ``{"id": N}`` (N is the hook's argument: a number, or a
  string of digits for some post hooks); ``order.deleted`` and ``product.deleted`` fire on
  *trash* (a permanent delete sends nothing), ``customer.deleted`` on user deletion;
* ``order.updated`` also fires on ``woocommerce_order_refunded``, with the order's
  ``refunds`` list (``{id, reason, total}``) but not the refunds themselves;
* on creation (and activation) WooCommerce pings the URL with the form body ``webhook_id=N``
  and no X-WC headers; anything but exactly 200 makes the creation report an error;
* each event is delivered once, never redelivered (and a webhook is disabled after more
  than 5 consecutive failures): polling stays the safety net;
* ``X-WC-Webhook-Delivery-ID`` is ``wp_hash(webhook id . current unix second)``: two
  different deliveries of one webhook within a second share it. Deliveries are therefore
  de-duplicated on the delivery id *and* a digest of the body (see ``Event`` in the models).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from typing import Any

from syncd.sources.base import WebhookSpec

# WooCommerce's default topics (WC_Webhook::get_default_topic_hooks) this intake applies, and
# the stream each resource's payloads go through.
RESOURCE_EVENTS: dict[str, frozenset[str]] = {
    "coupon": frozenset({"created", "updated", "deleted", "restored"}),
    "customer": frozenset({"created", "updated", "deleted"}),
    "order": frozenset({"created", "updated", "deleted", "restored"}),
    "product": frozenset({"created", "updated", "deleted", "restored", "published"}),
}
RESOURCE_STREAMS = {
    "coupon": "coupons",
    "customer": "customers",
    "order": "orders",
    "product": "products",
}

_PING = re.compile(rb"webhook_id=\d{1,20}")
_MAX_BIGINT = 2**63 - 1


class WooCommerceWebhooks(WebhookSpec):
    signature_header = "X-WC-Webhook-Signature"
    delivery_id_header = "X-WC-Webhook-Delivery-ID"

    def encode_signature(self, digest: bytes) -> bytes:
        return base64.b64encode(digest)

    def is_ping_request(self, headers: Mapping[str, str]) -> bool:
        # Only the creation ping comes unsigned: no X-WC headers and the form body
        # "webhook_id=N".
        return headers.get("x-wc-webhook-topic") is None

    def is_ping_body(self, body: bytes) -> bool:
        return _PING.fullmatch(body.strip()) is not None

    def topic(self, headers: Mapping[str, str]) -> tuple[str, str] | None:
        """The (resource, event) of a delivery, when WooCommerce's topic headers agree on
        one this intake applies."""
        topic = headers.get("x-wc-webhook-topic")
        resource_header = headers.get("x-wc-webhook-resource")
        event_header = headers.get("x-wc-webhook-event")
        if topic is None:
            if resource_header is None or event_header is None:
                return None
            topic = f"{resource_header}.{event_header}"
        resource, _, event = topic.strip().partition(".")
        if resource not in RESOURCE_EVENTS or event not in RESOURCE_EVENTS[resource]:
            return None
        if resource_header not in (None, resource) or event_header not in (None, event):
            return None
        return resource, event

    def topics(self) -> list[str]:
        return [f"{r}.{e}" for r, es in RESOURCE_EVENTS.items() for e in sorted(es)]

    def stream_of(self, resource: str) -> str | None:
        return RESOURCE_STREAMS.get(resource)

    def is_deletion(self, event: str) -> bool:
        return event == "deleted"

    def record_id(self, payload: Any, *, deleted: bool) -> int | None:
        """The record's id: a positive integer (a deletion's may come as a string of digits)."""
        if not isinstance(payload, dict):
            return None
        value = payload.get("id")
        if deleted and isinstance(value, str) and value.isascii() and value.isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_BIGINT:
            return None
        return value

    def webhook_id(self, headers: Mapping[str, str]) -> int | None:
        value = headers.get("x-wc-webhook-id")
        if value is None or not value.isascii() or not value.isdigit():
            return None
        number = int(value)
        return number if number <= _MAX_BIGINT else None
