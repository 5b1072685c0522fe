"""The WooCommerce REST API ``wc/v3`` client: endpoints, paging, query parameters, the clock.

Thin by design: it knows URLs and query parameters. Retries and pacing live in
:mod:`syncd.http`; windows, cursors and commits in :mod:`syncd.ingest`. Facts used here are
from WooCommerce's REST API docs (https://woocommerce.github.io/woocommerce-rest-api-docs/)
and core controllers: ``per_page`` is capped at 100, ``status=any`` leaves out trash, and
customers have no modified-date filter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

from syncd.config import WooCommerceSourceSettings
from syncd.http import ApiError, ServiceClient, ServiceLimits
from syncd.sources.base import Page
from syncd.sources.woocommerce.auth import API_ROOT, make_auth

MAX_PER_PAGE = 100  # WooCommerce's schema maximum: per_page > 100 is a 400 rest_invalid_param


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

    def scan_params(self, variant: Mapping[str, str], fields: Sequence[str]) -> dict[str, str]:
        """Query of an id scan: every record of a variant, by id, only ``fields`` of each."""
        return {**variant, "orderby": "id", "order": "asc", "_fields": ",".join(fields)}

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
