"""sync_records: what each destination sync last sent, per record

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 02:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import syncd.store.types

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_UTC = syncd.store.types.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "sync_records",
        sa.Column("sync", sa.String(), nullable=False),
        sa.Column("record_key", sa.String(), nullable=False),
        sa.Column("content_hash", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("in_destination", sa.Boolean(), nullable=False),
        sa.Column("dest_id", sa.String(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("sent_at", _UTC, nullable=True),
        sa.Column("updated_at", _UTC, nullable=True),
        sa.PrimaryKeyConstraint("sync", "record_key"),
        # SQLite: the rows live in primary-key order, so reading one sync's records is
        # one contiguous range instead of an index walk plus a table lookup per record.
        sqlite_with_rowid=False,
    )


def downgrade() -> None:
    op.drop_table("sync_records")
