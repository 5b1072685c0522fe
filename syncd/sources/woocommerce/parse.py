"""WooCommerce payloads (REST API ``wc/v3``) as store rows.

Facts used here are from WooCommerce's REST API docs (https://woocommerce.github.io/woocommerce-rest-api-docs/)
and core controllers: money fields are decimal strings (``line_items[].price`` is a number),
``*_gmt`` dates are UTC without an offset, guests have ``customer_id`` 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from syncd.identity import (
    RANK_CUSTOMER_RECORD,
    RANK_ORDER,
    PersonAttrs,
    clean_text,
    normalize_email,
)
from syncd.money import MoneyError, exponent, to_minor
from syncd.sources.base import BadRecord
from syncd.store.types import payload_problem

TRASH = "trash"


def parse_gmt(value: object, name: str) -> datetime | None:
    """A ``*_gmt`` field (``2017-03-22T19:28:02``, UTC, no offset) as an aware datetime."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadRecord(f"{name}: expected an ISO 8601 date, got {value!r}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise BadRecord(f"{name}: expected an ISO 8601 date, got {value!r}") from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def trashed_at(status: str | None, modified: datetime | None) -> datetime | None:
    """Trashed records are kept for history but stop counting from their trash time (the
    modification that trashed them)."""
    if status != TRASH:
        return None
    return modified or datetime.now(UTC)


def _check_storable(payload: Mapping[str, Any]) -> None:
    """A record the store cannot keep as its raw payload (nested too deep, too large, with
    NUL) is quarantined with the reason, the same limits as a webhook delivery's."""
    problem = payload_problem(payload)
    if problem is not None:
        raise BadRecord(str(problem))


def _id(payload: Mapping[str, Any], key: str = "id") -> int:
    value = payload.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise BadRecord(f"{key}: expected a positive integer id, got {value!r}")
    return value


def _opt_id(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _money(payload: Mapping[str, Any], key: str, exp: int) -> int:
    try:
        return to_minor(payload.get(key), exp)
    except MoneyError as exc:
        raise BadRecord(f"{key}: {exc}") from None


def _currency(payload: Mapping[str, Any]) -> tuple[str, int]:
    code = payload.get("currency")
    if not isinstance(code, str):
        raise BadRecord(f"currency: expected an ISO 4217 code, got {code!r}")
    try:
        return code, exponent(code)
    except MoneyError as exc:
        raise BadRecord(f"currency: {exc}") from None


def modified_of(payload: Mapping[str, Any]) -> datetime | None:
    """The record's modification time, for cursors; None when absent or unreadable."""
    try:
        return parse_gmt(payload.get("date_modified_gmt"), "date_modified_gmt")
    except BadRecord:
        return None


# What WordPress puts in place of an erased email: wp_privacy_anonymize_data('email')
# returns "deleted@site.invalid" (WordPress core, wp-includes/functions.php), and
# WooCommerce's personal data eraser writes it into an order's billing email
# (WC_Privacy_Erasers::remove_order_personal_data).
ERASED_EMAIL = "deleted@site.invalid"


def erased_by_eraser(payload: Mapping[str, Any]) -> bool:
    """Whether an order or customer payload is one WooCommerce's eraser anonymized."""
    billing = payload.get("billing")
    emails = [payload.get("email")]
    if isinstance(billing, Mapping):
        emails.append(billing.get("email"))
    return any(isinstance(e, str) and e.strip().lower() == ERASED_EMAIL for e in emails)


def _email(value: object) -> str | None:
    """An address as the store keeps it; None for the eraser's placeholder, which would
    otherwise make every erased order one person's."""
    email = normalize_email(value)
    return None if email == ERASED_EMAIL else email


@dataclass
class OrderRow:
    row: dict[str, Any]
    items: list[dict[str, Any]]
    customer_source_id: int  # 0 for guests

    def person(self) -> PersonAttrs:
        """What the billing address says about the buyer (computed on demand: phone
        normalization is the costly part, and only guest orders need it)."""
        raw = self.row["raw"]
        billing = raw.get("billing") or {}
        return PersonAttrs.from_address(
            billing, _email(billing.get("email")), self.row["created_at"], RANK_ORDER
        )


# WooCommerce's order attribution (WC >= 8.5) keeps where the buyer came from in order meta,
# e.g. _wc_order_attribution_source_type = "organic", _wc_order_attribution_utm_source = "google".
ATTRIBUTION_META = "_wc_order_attribution_"
ATTRIBUTION_FIELDS = ("source_type", "utm_source")


def _attribution(meta: object) -> dict[str, str]:
    """The order-attribution fields present in an order's ``meta_data`` (others ignored)."""
    found: dict[str, str] = {}
    if not isinstance(meta, list):
        return found
    for entry in meta:
        if not isinstance(entry, Mapping):
            continue
        key = entry.get("key")
        if not isinstance(key, str) or not key.startswith(ATTRIBUTION_META):
            continue
        field = key[len(ATTRIBUTION_META) :]
        value = clean_text(entry.get("value"))
        if field in ATTRIBUTION_FIELDS and value:
            found[field] = value[:100]
    return found


def parse_order(payload: Mapping[str, Any], source: str) -> OrderRow:
    _check_storable(payload)
    source_id = _id(payload)
    currency, exp = _currency(payload)
    status = payload.get("status")
    if not isinstance(status, str) or not status:
        raise BadRecord(f"status: expected a status name, got {status!r}")
    created = parse_gmt(payload.get("date_created_gmt"), "date_created_gmt")
    modified = parse_gmt(payload.get("date_modified_gmt"), "date_modified_gmt")
    customer = payload.get("customer_id", 0)
    if isinstance(customer, bool) or not isinstance(customer, int) or customer < 0:
        raise BadRecord(f"customer_id: expected 0 (guest) or a customer id, got {customer!r}")
    billing = payload.get("billing") or {}
    if not isinstance(billing, Mapping):
        raise BadRecord("billing: expected an object")

    items: list[dict[str, Any]] = []
    subtotal = 0
    for line in payload.get("line_items") or ():
        if not isinstance(line, Mapping):
            raise BadRecord("line_items: expected objects")
        qty = line.get("quantity", 0)
        if isinstance(qty, bool) or not isinstance(qty, int):
            raise BadRecord(f"line_items.quantity: expected an integer, got {qty!r}")
        line_subtotal = _money(line, "subtotal", exp)
        subtotal += line_subtotal
        items.append(
            {
                "source_id": _id(line),
                "product_source_id": _opt_id(line.get("product_id")),
                "variation_source_id": _opt_id(line.get("variation_id")),
                "sku": clean_text(line.get("sku")),
                "name": clean_text(line.get("name")),
                "quantity": qty,
                "subtotal_minor": line_subtotal,
                "total_minor": _money(line, "total", exp),
            }
        )
    # The order carries its refunds as [{id, reason|refund, total: "-10.00"}]: negative totals.
    refunded = 0
    for refund in payload.get("refunds") or ():
        if not isinstance(refund, Mapping):
            raise BadRecord("refunds: expected objects")
        refunded += -_money(refund, "total", exp)
    coupons = [
        c.get("code")
        for c in payload.get("coupon_lines") or ()
        if isinstance(c, Mapping) and c.get("code")
    ]
    email = _email(billing.get("email"))
    attribution = _attribution(payload.get("meta_data"))
    row = {
        "source": source,
        "source_id": source_id,
        "customer_source_id": customer,
        "email": email,
        "status": status,
        "currency": currency,
        "total_minor": _money(payload, "total", exp),
        "subtotal_minor": subtotal,
        "discount_minor": _money(payload, "discount_total", exp),
        "shipping_minor": _money(payload, "shipping_total", exp),
        "tax_minor": _money(payload, "total_tax", exp),
        "refunded_minor": refunded,
        "coupon_codes": coupons,
        "payment_method": clean_text(payload.get("payment_method")),
        "created_via": clean_text(payload.get("created_via")),
        "attribution_source_type": attribution.get("source_type"),
        "attribution_utm_source": attribution.get("utm_source"),
        "created_at": created,
        "paid_at": parse_gmt(payload.get("date_paid_gmt"), "date_paid_gmt"),
        "completed_at": parse_gmt(payload.get("date_completed_gmt"), "date_completed_gmt"),
        "modified_at": modified,
        "deleted_at": trashed_at(status, modified),
        "raw": payload,
    }
    return OrderRow(row=row, items=items, customer_source_id=customer)


@dataclass
class CustomerRow:
    source_id: int
    record: dict[str, Any]
    person: PersonAttrs


def parse_customer(payload: Mapping[str, Any], source: str) -> CustomerRow:
    _check_storable(payload)
    source_id = _id(payload)
    billing = payload.get("billing") or {}
    if not isinstance(billing, Mapping):
        raise BadRecord("billing: expected an object")
    created = parse_gmt(payload.get("date_created_gmt"), "date_created_gmt")
    modified = parse_gmt(payload.get("date_modified_gmt"), "date_modified_gmt") or created
    email = _email(payload.get("email")) or _email(billing.get("email"))
    # The account's own names win over the billing address's.
    address = dict(billing)
    for key in ("first_name", "last_name"):
        if clean_text(payload.get(key)):
            address[key] = payload[key]
    person = PersonAttrs.from_address(
        address, email, modified, RANK_CUSTOMER_RECORD, created_at=created
    )
    record = {
        "source": source,
        "source_id": source_id,
        "email": email,
        "role": clean_text(payload.get("role")),
        "created_at": created,
        "modified_at": modified,
        "deleted_at": None,
        "raw": payload,
    }
    return CustomerRow(source_id=source_id, record=record, person=person)


def parse_refund(
    payload: Mapping[str, Any],
    source: str,
    order_currency: str | None,
    order_source_id: int | None = None,
) -> dict[str, Any]:
    """A refund from ``GET refunds`` (has ``parent_id``) or from ``GET orders/{id}/refunds``
    (no ``parent_id``: pass the order's id)."""
    _check_storable(payload)
    source_id = _id(payload)
    if order_source_id is None:
        order_source_id = _id(payload, "parent_id")
    # A refund has no currency of its own: it is in its order's. Before the order is
    # known, the store currency is the best we have; the order link fixes it (see ingest).
    exp = exponent(order_currency) if order_currency else 2
    amount = _money(payload, "amount", exp)
    reason = clean_text(payload.get("reason")) or clean_text(payload.get("refund"))
    return {
        "source": source,
        "source_id": source_id,
        "order_source_id": order_source_id,
        "amount_minor": amount,
        "currency": order_currency,
        "reason": reason,
        "created_at": parse_gmt(payload.get("date_created_gmt"), "date_created_gmt"),
        "deleted_at": None,
        "raw": payload,
    }


def parse_product(
    payload: Mapping[str, Any], source: str, currency: str, parent_source_id: int | None = None
) -> dict[str, Any]:
    _check_storable(payload)
    source_id = _id(payload)
    status = clean_text(payload.get("status"))
    modified = parse_gmt(payload.get("date_modified_gmt"), "date_modified_gmt")
    categories = [
        c.get("name")
        for c in payload.get("categories") or ()
        if isinstance(c, Mapping) and c.get("name")
    ]
    price = payload.get("price")
    return {
        "source": source,
        "source_id": source_id,
        "parent_source_id": parent_source_id,
        "sku": clean_text(payload.get("sku")),
        "name": clean_text(payload.get("name")) or clean_text(payload.get("description")),
        "type": clean_text(payload.get("type")) or ("variation" if parent_source_id else None),
        "status": status,
        "price_minor": _money(payload, "price", exponent(currency))
        if price not in (None, "")
        else None,
        "currency": currency,
        "categories": categories,
        "stock_status": clean_text(payload.get("stock_status")),
        "created_at": parse_gmt(payload.get("date_created_gmt"), "date_created_gmt"),
        "modified_at": modified,
        "deleted_at": trashed_at(status, modified),
        "raw": payload,
    }


def parse_coupon(payload: Mapping[str, Any], source: str, currency: str) -> dict[str, Any]:
    _check_storable(payload)
    source_id = _id(payload)
    code = clean_text(payload.get("code"))
    if code is None:
        raise BadRecord("code: a coupon needs a code")
    kind = clean_text(payload.get("discount_type"))
    amount_minor: int | None = None
    percent_bp: int | None = None
    if kind == "percent":
        percent_bp = _money(payload, "amount", 2)  # 12.50 % → 1250 basis points
    else:
        amount_minor = _money(payload, "amount", exponent(currency))
    usage = payload.get("usage_count") or 0
    if isinstance(usage, bool) or not isinstance(usage, int):
        raise BadRecord(f"usage_count: expected an integer, got {usage!r}")
    modified = parse_gmt(payload.get("date_modified_gmt"), "date_modified_gmt")
    status = clean_text(payload.get("status"))
    return {
        "source": source,
        "source_id": source_id,
        "code": code,
        "discount_type": kind,
        "amount_minor": amount_minor,
        "percent_bp": percent_bp,
        "currency": currency,
        "usage_count": usage,
        "date_expires": parse_gmt(payload.get("date_expires_gmt"), "date_expires_gmt"),
        "created_at": parse_gmt(payload.get("date_created_gmt"), "date_created_gmt"),
        "modified_at": modified,
        "deleted_at": trashed_at(status, modified),
        "raw": payload,
    }


def is_variable(payload: Mapping[str, Any]) -> bool:
    return payload.get("type") == "variable" or bool(payload.get("variations"))
