"""A canonical picture of what a store holds, to compare two stores (ids and sync times left out).

Rows deleted at the source are left out: an incremental store keeps force-deleted rows
(marked ``deleted_at``) that a fresh sync never sees. Trashed rows are live in both.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, or_, select

from syncd.store.models import (
    COUPONS,
    CUSTOMERS,
    ORDERS,
    PRODUCTS,
    REFUNDS,
)
from syncd.store.models import CUSTOMER_RECORDS as RECORDS
from syncd.store.models import ORDER_ITEMS as ITEMS


def _live(table: Any) -> Any:
    return (
        or_(table.c.deleted_at.is_(None), table.c.status == "trash")
        if "status" in table.c
        else table.c.deleted_at.is_(None)
    )


def dump(engine: Engine, source: str) -> dict[str, set[tuple[Any, ...]]]:
    out: dict[str, set[tuple[Any, ...]]] = {}
    with engine.connect() as conn:
        out["orders"] = set(
            conn.execute(
                select(
                    ORDERS.c.source_id,
                    ORDERS.c.status,
                    ORDERS.c.currency,
                    ORDERS.c.total_minor,
                    ORDERS.c.subtotal_minor,
                    ORDERS.c.discount_minor,
                    ORDERS.c.shipping_minor,
                    ORDERS.c.tax_minor,
                    ORDERS.c.refunded_minor,
                    ORDERS.c.customer_source_id,
                    ORDERS.c.email,
                    ORDERS.c.created_at,
                    ORDERS.c.paid_at,
                    ORDERS.c.completed_at,
                    ORDERS.c.modified_at,
                    CUSTOMERS.c.email.label("person"),
                )
                .join(CUSTOMERS, CUSTOMERS.c.id == ORDERS.c.customer_id, isouter=True)
                .where(ORDERS.c.source == source, _live(ORDERS))
            ).all()
        )
        out["order_items"] = set(
            conn.execute(
                select(
                    ORDERS.c.source_id,
                    ITEMS.c.source_id,
                    ITEMS.c.product_source_id,
                    ITEMS.c.variation_source_id,
                    ITEMS.c.sku,
                    ITEMS.c.quantity,
                    ITEMS.c.subtotal_minor,
                    ITEMS.c.total_minor,
                )
                .join(ORDERS, ORDERS.c.id == ITEMS.c.order_id)
                .where(ORDERS.c.source == source, _live(ORDERS))
            ).all()
        )
        out["refunds"] = set(
            conn.execute(
                select(
                    REFUNDS.c.source_id,
                    REFUNDS.c.order_source_id,
                    REFUNDS.c.order_id.is_not(None),
                    REFUNDS.c.amount_minor,
                    REFUNDS.c.currency,
                    REFUNDS.c.reason,
                    REFUNDS.c.created_at,
                ).where(REFUNDS.c.source == source, _live(REFUNDS))
            ).all()
        )
        out["products"] = set(
            conn.execute(
                select(
                    PRODUCTS.c.source_id,
                    PRODUCTS.c.parent_source_id,
                    PRODUCTS.c.sku,
                    PRODUCTS.c.type,
                    PRODUCTS.c.status,
                    PRODUCTS.c.price_minor,
                    PRODUCTS.c.currency,
                    PRODUCTS.c.stock_status,
                    PRODUCTS.c.modified_at,
                ).where(PRODUCTS.c.source == source, _live(PRODUCTS))
            ).all()
        )
        out["coupons"] = set(
            conn.execute(
                select(
                    COUPONS.c.source_id,
                    COUPONS.c.code,
                    COUPONS.c.discount_type,
                    COUPONS.c.amount_minor,
                    COUPONS.c.percent_bp,
                    COUPONS.c.usage_count,
                    COUPONS.c.date_expires,
                    COUPONS.c.modified_at,
                ).where(COUPONS.c.source == source, _live(COUPONS))
            ).all()
        )
        out["customer_records"] = set(
            conn.execute(
                select(
                    RECORDS.c.source_id,
                    RECORDS.c.email,
                    RECORDS.c.role,
                    RECORDS.c.modified_at,
                    CUSTOMERS.c.email,
                )
                .join(CUSTOMERS, CUSTOMERS.c.id == RECORDS.c.customer_id)
                .where(RECORDS.c.source == source, RECORDS.c.deleted_at.is_(None))
            ).all()
        )
        # People who still have something live: their attributes.
        live_people = (
            select(ORDERS.c.customer_id)
            .where(_live(ORDERS))
            .union(select(RECORDS.c.customer_id).where(RECORDS.c.deleted_at.is_(None)))
        )
        out["customers"] = set(
            conn.execute(
                select(
                    CUSTOMERS.c.email,
                    CUSTOMERS.c.first_name,
                    CUSTOMERS.c.last_name,
                    CUSTOMERS.c.phone,
                    CUSTOMERS.c.country,
                    CUSTOMERS.c.city,
                    CUSTOMERS.c.postcode,
                    CUSTOMERS.c.created_at,
                ).where(CUSTOMERS.c.id.in_(live_people))
            ).all()
        )
    return out


def diff(a: dict[str, set[tuple[Any, ...]]], b: dict[str, set[tuple[Any, ...]]]) -> dict[str, Any]:
    """What differs, table by table (a few rows each), for readable assertion failures."""
    out: dict[str, Any] = {}
    for table in sorted(set(a) | set(b)):
        only_a = sorted(a.get(table, set()) - b.get(table, set()), key=repr)[:3]
        only_b = sorted(b.get(table, set()) - a.get(table, set()), key=repr)[:3]
        if only_a or only_b:
            out[table] = {"only_first": only_a, "only_second": only_b}
    return out
