"""The WooCommerce source: endpoints, paging and payload shapes of the REST API ``wc/v3``.

Thin by design: it knows URLs, query parameters and how a payload maps to store rows.
Retries and pacing live in :mod:`syncd.http`; windows, cursors and commits in
:mod:`syncd.ingest`. Facts used here are from WooCommerce's REST API docs and core
controllers: ``per_page`` is capped at 100, money
fields are decimal strings (``line_items[].price`` is a number), ``*_gmt`` dates are
UTC without an offset, guests have ``customer_id`` 0, ``status=any`` leaves out trash,
and customers have no modified-date filter.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import orjson

from syncd.config import WooCommerceSourceSettings
from syncd.http import ApiError, ServiceClient, ServiceLimits
from syncd.identity import (
    RANK_CUSTOMER_RECORD,
    RANK_ORDER,
    PersonAttrs,
    clean_text,
    normalize_email,
)
from syncd.money import MoneyError, exponent, to_minor
from syncd.sources.woocommerce_auth import make_auth
from syncd.store.types import payload_problem, storable_copy

API_ROOT = "/wp-json/wc/v3"
MAX_PER_PAGE = 100  # WooCommerce's schema maximum: per_page > 100 is a 400 rest_invalid_param
TRASH = "trash"


class BadRecord(ValueError):
    """A payload that cannot be stored as it is: it goes to quarantine with this reason."""


# ---------------------------------------------------------------------------------------
# Parsing: payload → store rows
# ---------------------------------------------------------------------------------------


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


def record_key(payload: object) -> str:
    """The quarantine key of a payload: its id, or a digest when it has none."""
    if isinstance(payload, Mapping):
        value = payload.get("id")
        if isinstance(value, int | str) and not isinstance(value, bool) and str(value):
            return str(value)
    try:
        text = orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:  # nested past orjson's limit: keyed by what is kept of it
        text = orjson.dumps(storable_copy(payload), option=orjson.OPT_SORT_KEYS)
    return "sha256:" + hashlib.sha256(text).hexdigest()[:64]


def modified_of(payload: Mapping[str, Any]) -> datetime | None:
    """The record's modification time, for cursors; None when absent or unreadable."""
    try:
        return parse_gmt(payload.get("date_modified_gmt"), "date_modified_gmt")
    except BadRecord:
        return None


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
            billing, billing.get("email"), self.row["created_at"], RANK_ORDER
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
    email = normalize_email(billing.get("email"))
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
    email = normalize_email(payload.get("email")) or normalize_email(billing.get("email"))
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


# ---------------------------------------------------------------------------------------
# Fetching: endpoints and paging
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stream:
    """A stream of one resource: its path and the fixed query it is read with.

    ``windowed`` streams are read by modification-date windows (``modified_after``);
    the others by a scan of ids and modification dates (customers: the API has no
    date filter for them). ``variants`` are separately paged queries sharing the stream,
    each with its own cursor (WooCommerce's ``status=any`` leaves trashed records out,
    so trash is read on its own).
    """

    name: str
    path: str
    windowed: bool
    variants: tuple[tuple[str, Mapping[str, str]], ...] = (("", {}),)


STREAMS: dict[str, Stream] = {
    "customers": Stream(
        "customers", "customers", windowed=False, variants=(("", {"role": "all"}),)
    ),
    "products": Stream(
        "products",
        "products",
        windowed=True,
        variants=(("", {"status": "any"}), (":trash", {"status": TRASH})),
    ),
    "coupons": Stream(
        "coupons",
        "coupons",
        windowed=True,
        variants=(("", {"status": "any"}), (":trash", {"status": TRASH})),
    ),
    "orders": Stream(
        "orders",
        "orders",
        windowed=True,
        variants=(("", {"status": "any"}), (":trash", {"status": TRASH})),
    ),
    "refunds": Stream("refunds", "refunds", windowed=True),
}
# Customers first (orders link to them), products and coupons before the orders that use
# them, refunds after their orders.
STREAM_ORDER = ("customers", "products", "coupons", "orders", "refunds")


@dataclass
class Page:
    items: list[Any]
    total: int | None  # X-WP-Total: rows matching the query when this page was read
    total_pages: int | None  # X-WP-TotalPages
    number: int = 1
    date: datetime | None = None  # the response's Date header: the store's clock, to the second


def gmt_param(value: datetime) -> str:
    """A UTC instant as WooCommerce's date parameters take it (with ``dates_are_gmt=true``)."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")


def http_date(value: str | None) -> datetime | None:
    """An HTTP ``Date`` header (RFC 9110 section 6.6.1: whole seconds, GMT) as an aware
    datetime; None when absent or unreadable."""
    if not value:
        return None
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed is None:
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _int_header(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


class WooCommerceClient:
    """Reads one store's ``wc/v3`` API through the shared HTTP layer."""

    def __init__(
        self, name: str, settings: WooCommerceSourceSettings, client: ServiceClient | None = None
    ) -> None:
        self.name = name
        self.settings = settings
        self.per_page = min(settings.per_page, MAX_PER_PAGE)
        if client is None:
            client = ServiceClient(
                f"woocommerce:{name}",
                settings.url.rstrip("/") + API_ROOT,
                limits=ServiceLimits(
                    requests_per_second=settings.requests_per_second or None,  # 0: unpaced
                    concurrency=settings.concurrency,
                    max_attempts=settings.max_attempts,
                    max_elapsed=settings.max_retry_seconds,
                    timeout=settings.timeout_seconds,
                ),
                auth=make_auth(
                    settings.effective_auth,
                    settings.consumer_key.get_secret_value(),
                    settings.consumer_secret.get_secret_value(),
                    settings.oauth_signature_method,
                ),
                verify=settings.verify_tls,
                tls_setting=f"sources.{name}.verify_tls",
            )
        self.http = client
        # The store's clock minus ours, as the latest response's Date header shows it (a lower
        # bound: see store_now); None until a response with a usable Date arrived.
        self._clock_offset: timedelta | None = None

    def store_now(self) -> datetime | None:
        """Now on the store's clock, to the second, never later than the store's real now;
        None when no response so far carried a usable ``Date`` header.

        WooCommerce stamps ``date_modified_gmt`` with its server's clock, so windows are
        bounded by that clock, not ours. A ``Date`` header is the server's second, truncated,
        taken before the answer reached us: ``Date - (our time on receipt)`` can only
        underestimate the store's lead, so the bound errs early (rows of the last second
        are read by the next run) and never late (a bound past the store's now would close
        a second whose rows are still being written).
        """
        if self._clock_offset is None:
            return None
        return (datetime.now(UTC) + self._clock_offset).replace(microsecond=0)

    def observe_clock(self, date_header: str | None) -> datetime | None:
        """Take the store's clock from a response's ``Date`` header (the last offset is kept
        when it is unusable); returns the header's time."""
        received = datetime.now(UTC)
        stamp = http_date(date_header)
        if stamp is not None:
            self._clock_offset = stamp - received
        return stamp

    async def probe_clock(self, path: str) -> None:
        """One small request (ids only), for its ``Date`` header, when none came yet. Through
        ``page`` like every read, so a client that serves pages its own way serves it too."""
        await self.page(path, {"_fields": "id"}, 1)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def page(self, path: str, params: Mapping[str, str], number: int) -> Page:
        query = {**params, "page": str(number), "per_page": str(self.per_page)}
        body, response = await self.http.get_json(path, params=query)
        date = self.observe_clock(response.headers.get("Date"))
        if not isinstance(body, list):
            raise ApiError(
                service=self.http.service,
                status=response.status_code,
                method="GET",
                url=str(response.request.url),
                message=f"expected a JSON list from {path}, got {type(body).__name__}",
            )
        return Page(
            items=body,
            total=_int_header(response.headers.get("X-WP-Total")),
            total_pages=_int_header(response.headers.get("X-WP-TotalPages")),
            number=number,
            date=date,
        )

    def window_params(
        self,
        variant: Mapping[str, str],
        after: datetime | None,
        before: datetime,
        *,
        by_id: bool = False,
    ) -> dict[str, str]:
        """Query of one modification window: oldest first, or by id.

        ``orderby=modified`` has no tie-breaker on HPOS stores (observed on WooCommerce 10
        with MariaDB: rows sharing one modification second came back in a different order
        on page 1 and page 2, so one was read twice and another never), so offset paging
        over it can skip a row. ``orderby=id`` has no ties; the orders, refunds, products
        and coupons controllers all accept it (WooCommerce REST API, ``orderby`` enum
        ``date, id, include, title, slug, modified``)."""
        params = {
            **variant,
            "orderby": "id" if by_id else "modified",
            "order": "asc",
            "dates_are_gmt": "true",
            "modified_before": gmt_param(before),
        }
        if after is not None:
            params["modified_after"] = gmt_param(after)
        return params

    async def by_ids(
        self, path: str, ids: Sequence[int], extra: Mapping[str, str] | None = None
    ) -> list[Any]:
        """Full records for the given ids (``include=``, at most one page of ids per request)."""
        out: list[Any] = []
        for start in range(0, len(ids), self.per_page):
            chunk = ids[start : start + self.per_page]
            params = {**(extra or {}), "include": ",".join(map(str, chunk)), "orderby": "include"}
            out.extend((await self.page(path, params, 1)).items)
        return out

    async def order_refunds(self, order_id: int) -> list[Any]:
        """Every refund of one order (``GET orders/{id}/refunds``, WooCommerce REST docs, "List
        all refunds"), each given its order as ``parent_id``: the field ``GET refunds`` adds
        (WooCommerce >= 9.0, refunds controller), so it is stored as a polled refund is."""
        path = order_refunds_path(order_id)
        page = await self.page(path, {}, 1)
        found = list(page.items)
        # Without the paging headers (a proxy stripping them): read on to a short page.
        while (
            page.number < page.total_pages
            if page.total_pages is not None
            else len(page.items) >= self.per_page
        ):
            page = await self.page(path, {}, page.number + 1)
            found += page.items
        return [_with_parent(r, order_id) for r in found]

    async def store_currency(self) -> str | None:
        """The store's currency (``GET data/currencies/current``), for product and coupon prices."""
        try:
            body, response = await self.http.get_json("data/currencies/current")
            self.observe_clock(response.headers.get("Date"))
        except ApiError as exc:
            if exc.status in (401, 403) or exc.status is None:
                raise
            body = None
        if isinstance(body, Mapping) and isinstance(body.get("code"), str):
            return str(body["code"])
        return None


def _with_parent(refund: Any, order_id: int) -> Any:
    """A refund of ``orders/{id}/refunds`` as ``GET refunds`` lists it: ``parent_id`` after
    ``id``. Anything but an object is left for the commit to quarantine."""
    if not isinstance(refund, Mapping):
        return refund
    rest = {k: v for k, v in refund.items() if k not in ("id", "parent_id")}
    return {"id": refund.get("id"), "parent_id": order_id, **rest}


def order_refunds_path(order_id: int) -> str:
    return f"orders/{order_id}/refunds"


def variations_path(product_id: int) -> str:
    return f"products/{product_id}/variations"


def is_variable(payload: Mapping[str, Any]) -> bool:
    return payload.get("type") == "variable" or bool(payload.get("variations"))
