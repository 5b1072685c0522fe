"""Signed WooCommerce webhook deliveries, as a store sends them: for tests, the benchmark
and anyone trying `syncd run` by hand (WooCommerce REST docs, "Webhooks")."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
from datetime import UTC, datetime
from typing import Any

import orjson


def new_order(template: dict[str, Any], order_id: int, email: str) -> dict[str, Any]:
    """A paid guest order made from ``template`` (an order as the REST API returns it),
    with a new id and billing email, created and modified now."""
    order = copy.deepcopy(template)
    now = datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "")
    order.update(
        id=order_id,
        number=str(order_id),
        status="completed",
        customer_id=0,
        date_created=now,
        date_created_gmt=now,
        date_modified=now,
        date_modified_gmt=now,
        date_paid=now,
        date_paid_gmt=now,
        refunds=[],
    )
    order["billing"] = {**order["billing"], "email": email}
    return order


def signature(secret: str, body: bytes) -> str:
    """X-WC-Webhook-Signature: base64 of the HMAC-SHA256 of the raw body."""
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


def delivery(
    secret: str, payload: Any, topic: str, delivery_id: str, webhook_id: str = "1"
) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one delivery of ``payload`` under ``topic`` (order.created)."""
    body = orjson.dumps(payload)
    resource, _, event = topic.partition(".")
    return body, {
        "Content-Type": "application/json",
        "X-WC-Webhook-Topic": topic,
        "X-WC-Webhook-Resource": resource,
        "X-WC-Webhook-Event": event,
        "X-WC-Webhook-ID": webhook_id,
        "X-WC-Webhook-Delivery-ID": delivery_id,
        "X-WC-Webhook-Signature": signature(secret, body),
    }
