"""job_leases: which replica claimed each scheduled trigger of a daemon job

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import syncd.store.types

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_UTC = syncd.store.types.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "job_leases",
        sa.Column("job", sa.String(), nullable=False),
        sa.Column("slot", _UTC, nullable=False),
        sa.Column("owner", sa.String(), nullable=False),
        sa.Column("claimed_at", _UTC, nullable=False),
        # The primary key is the guarantee: one claim per (job, slot), decided by the database.
        sa.PrimaryKeyConstraint("job", "slot"),
    )
    with op.batch_alter_table("job_leases", schema=None) as batch_op:
        batch_op.create_index("ix_job_leases_claimed_at", ["claimed_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("job_leases", schema=None) as batch_op:
        batch_op.drop_index("ix_job_leases_claimed_at")
    op.drop_table("job_leases")
