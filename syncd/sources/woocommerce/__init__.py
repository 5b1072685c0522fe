"""The WooCommerce source (REST API ``wc/v3``): client and auth, streams, parsing, webhooks."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from syncd.config import ConsentSettings, WooCommerceSourceSettings
from syncd.sources.base import Source, SourceClient, Statement
from syncd.sources.woocommerce import parse
from syncd.sources.woocommerce.client import WooCommerceClient, variations_path
from syncd.sources.woocommerce.columns import WOOCOMMERCE_COLUMNS
from syncd.sources.woocommerce.consent import consent_statements
from syncd.sources.woocommerce.streams import STREAMS
from syncd.sources.woocommerce.webhooks import WooCommerceWebhooks

__all__ = ["WooCommerceSource"]


class WooCommerceSource(Source):
    type = "woocommerce"
    streams = STREAMS
    webhooks = WooCommerceWebhooks()
    push_columns = WOOCOMMERCE_COLUMNS

    settings: WooCommerceSourceSettings
    client: WooCommerceClient

    @staticmethod
    def make_client(name: str, settings: Any) -> SourceClient:
        return WooCommerceClient(name, settings)

    def modified_of(self, payload: Mapping[str, Any]) -> datetime | None:
        return parse.modified_of(payload)

    def parse_customer(self, payload: Mapping[str, Any]) -> parse.CustomerRow:
        return parse.parse_customer(payload, self.name)

    def parse_order(self, payload: Mapping[str, Any]) -> parse.OrderRow:
        return parse.parse_order(payload, self.name)

    def parse_refund(
        self, payload: Mapping[str, Any], order_currency: str | None
    ) -> dict[str, Any]:
        return parse.parse_refund(payload, self.name, order_currency)

    def parse_product(
        self, payload: Mapping[str, Any], currency: str, parent_source_id: int | None = None
    ) -> dict[str, Any]:
        return parse.parse_product(payload, self.name, currency, parent_source_id=parent_source_id)

    def parse_coupon(self, payload: Mapping[str, Any], currency: str) -> dict[str, Any]:
        return parse.parse_coupon(payload, self.name, currency)

    def erased(self, payload: Mapping[str, Any]) -> bool:
        return parse.erased_by_eraser(payload)

    def consent_statements(
        self, entity: str, payload: Mapping[str, Any], settings: ConsentSettings
    ) -> list[Statement]:
        return consent_statements(entity, payload, settings)

    def account_of(self, order: Any) -> int | None:
        # Guests have customer_id 0.
        if isinstance(order, Mapping):
            cid = order.get("customer_id")
            if isinstance(cid, int) and cid > 0:
                return cid
        return None

    def refund_order_of(self, refund: Mapping[str, Any]) -> Any:
        return refund.get("parent_id")

    def listed_refunds(self, order_raw: Mapping[str, Any]) -> set[int] | None:
        # An order carries its refunds as [{id, reason|refund, total}].
        entries = order_raw.get("refunds")
        if not isinstance(entries, list):
            return None
        return {e["id"] for e in entries if isinstance(e, Mapping) and _positive_int(e.get("id"))}

    def variation_parent(self, product: Any) -> int | None:
        if (
            isinstance(product, Mapping)
            and product.get("type") == "variation"
            and _positive_int(product.get("parent_id"))
        ):
            return int(product["parent_id"])
        return None

    def has_variations(self, product: Mapping[str, Any]) -> bool:
        return isinstance(product.get("id"), int) and parse.is_variable(product)

    async def variations(self, product_id: int) -> list[Any]:
        path = variations_path(product_id)
        first = await self.client.page(path, {}, 1)
        found = list(first.items)
        for n in range(2, (first.total_pages or 1) + 1):
            found += (await self.client.page(path, {}, n)).items
        return found

    async def order_refunds(self, order_id: int) -> list[Any]:
        return await self.client.order_refunds(order_id)

    async def store_currency(self) -> str:
        code = await self.client.store_currency()
        if code:
            return code
        # Older stores: the currency of the newest order is the store's.
        page = await self.client.page("orders", {"orderby": "date", "order": "desc"}, 1)
        for item in page.items:
            if isinstance(item, Mapping) and isinstance(item.get("currency"), str):
                return str(item["currency"])
        return "USD"


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
