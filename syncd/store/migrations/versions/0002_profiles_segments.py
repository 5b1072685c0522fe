"""customer profiles, segment memberships, model fits; order attribution columns

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 23:40:00
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy import Text
from sqlalchemy.dialects import postgresql

import syncd.store.types

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_UTC = syncd.store.types.UTCDateTime(timezone=True)
_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), "postgresql")


# A frozen copy of how the WooCommerce parser read order attribution when this revision
# was written (WooCommerce >= 8.5 keeps it in order meta, e.g.
# _wc_order_attribution_source_type = "organic"). A migration imports no live code: a
# later change to the parser must never change what this revision does to a store.
_ATTRIBUTION_META = "_wc_order_attribution_"
_ATTRIBUTION_FIELDS = ("source_type", "utm_source")


def _attribution(meta: object) -> dict[str, str]:
    """The order-attribution fields present in an order's ``meta_data`` (others ignored)."""
    found: dict[str, str] = {}
    if not isinstance(meta, list):
        return found
    for entry in meta:
        if not isinstance(entry, dict):
            continue
        key = entry.get("key")
        if not isinstance(key, str) or not key.startswith(_ATTRIBUTION_META):
            continue
        field = key[len(_ATTRIBUTION_META) :]
        value = entry.get("value")
        text = value.strip() if isinstance(value, str) else None
        if field in _ATTRIBUTION_FIELDS and text:
            found[field] = text[:100]
    return found


def _backfill_attribution() -> None:
    # Orders synced before this revision keep their payload in `raw`: read the
    # attribution from it, as the parser did for new orders then.
    conn = op.get_bind()
    orders = sa.table(
        "orders",
        sa.column("id", sa.Integer),
        sa.column("raw", _JSON),
        sa.column("attribution_source_type", sa.String),
        sa.column("attribution_utm_source", sa.String),
    )
    last = 0
    while True:
        rows = conn.execute(
            sa.select(orders.c.id, orders.c.raw)
            .where(orders.c.id > last)
            .order_by(orders.c.id)
            .limit(2000)
        ).all()
        if not rows:
            return
        last = rows[-1].id
        updates: list[dict[str, Any]] = []
        for row in rows:
            meta = row.raw.get("meta_data") if isinstance(row.raw, dict) else None
            found = _attribution(meta)
            if found:
                updates.append(
                    {
                        "oid": row.id,
                        "st": found.get("source_type"),
                        "us": found.get("utm_source"),
                    }
                )
        if updates:
            conn.execute(
                orders.update()
                .where(orders.c.id == sa.bindparam("oid"))
                .values(
                    attribution_source_type=sa.bindparam("st"),
                    attribution_utm_source=sa.bindparam("us"),
                ),
                updates,
            )


def upgrade() -> None:
    with op.batch_alter_table("orders") as batch:
        batch.add_column(sa.Column("attribution_source_type", sa.String(), nullable=True))
        batch.add_column(sa.Column("attribution_utm_source", sa.String(), nullable=True))
    _backfill_attribution()

    op.create_table(
        "customer_profiles",
        sa.Column("customer_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("email", sa.String(), nullable=True),
        sa.Column("first_name", sa.String(), nullable=True),
        sa.Column("last_name", sa.String(), nullable=True),
        sa.Column("country", sa.String(length=2), nullable=True),
        sa.Column("orders_count", sa.Integer(), nullable=False),
        sa.Column("gross_revenue_minor", sa.BigInteger(), nullable=False),
        sa.Column("refunded_minor", sa.BigInteger(), nullable=False),
        sa.Column("net_revenue_minor", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=True),
        sa.Column("avg_order_value_minor", sa.BigInteger(), nullable=True),
        sa.Column("first_order_at", _UTC, nullable=True),
        sa.Column("last_order_at", _UTC, nullable=True),
        sa.Column("days_since_last_order", sa.Integer(), nullable=True),
        sa.Column("avg_days_between_orders", sa.Float(), nullable=True),
        sa.Column("distinct_products", sa.Integer(), nullable=False),
        sa.Column("top_category", sa.String(), nullable=True),
        sa.Column("coupon_order_share", sa.Float(), nullable=True),
        sa.Column("acquisition_source", sa.String(), nullable=True),
        sa.Column("r_score", sa.Integer(), nullable=True),
        sa.Column("f_score", sa.Integer(), nullable=True),
        sa.Column("m_score", sa.Integer(), nullable=True),
        sa.Column("rfm_segment", sa.String(), nullable=True),
        sa.Column("p_alive", sa.Float(), nullable=True),
        sa.Column("expected_orders_90d", sa.Float(), nullable=True),
        sa.Column("expected_order_value_minor", sa.BigInteger(), nullable=True),
        sa.Column("clv_12m_minor", sa.BigInteger(), nullable=True),
        sa.Column("lifecycle_stage", sa.String(), nullable=False),
        sa.Column("has_open_cart", sa.Boolean(), nullable=False),
        sa.Column("cart_value_minor", sa.BigInteger(), nullable=True),
        sa.Column("cart_updated_at", _UTC, nullable=True),
        sa.Column("as_of", _UTC, nullable=True),
        sa.Column("computed_at", _UTC, nullable=True),
        sa.PrimaryKeyConstraint("customer_id"),
    )
    op.create_table(
        "segment_memberships",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("segment", sa.String(), nullable=False),
        sa.Column("customer_id", sa.Integer(), nullable=False),
        sa.Column("entered_at", _UTC, nullable=False),
        sa.Column("exited_at", _UTC, nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ux_segment_memberships_open",
        "segment_memberships",
        ["segment", "customer_id"],
        unique=True,
        sqlite_where=sa.text("exited_at IS NULL"),
        postgresql_where=sa.text("exited_at IS NULL"),
    )
    op.create_index(
        "ix_segment_memberships_customer", "segment_memberships", ["customer_id"], unique=False
    )
    op.create_table(
        "model_fits",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(), nullable=False),
        sa.Column("params", _JSON, nullable=True),
        sa.Column("log_likelihood", sa.Float(), nullable=True),
        sa.Column("customers", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("as_of", _UTC, nullable=True),
        sa.Column("fitted_at", _UTC, nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_model_fits_model_fitted", "model_fits", ["model", "fitted_at"])


def downgrade() -> None:
    op.drop_index("ix_model_fits_model_fitted", table_name="model_fits")
    op.drop_table("model_fits")
    op.drop_index("ix_segment_memberships_customer", table_name="segment_memberships")
    op.drop_index("ux_segment_memberships_open", table_name="segment_memberships")
    op.drop_table("segment_memberships")
    op.drop_table("customer_profiles")
    with op.batch_alter_table("orders") as batch:
        batch.drop_column("attribution_utm_source")
        batch.drop_column("attribution_source_type")
