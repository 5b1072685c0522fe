"""consent per channel: consent_statements, consent_extracted, profile consent columns

``consent_statements`` keeps what each source record says about a person's marketing
consent on a channel (email, sms, ads), extracted when the record is stored; the latest
statement wins. ``customer_profiles`` gets ``consent_<channel>`` (boolean), ``_at`` and
``_source`` per channel, filled by the next segment recompute.

Statements of records stored before this revision are not read here: which meta keys
hold consent is the config's ``[consent]``, which a migration does not see. The next
source sync reads them from the stored raw payloads (``consent_extracted`` remembers the
configuration it last read them with, so a changed ``[consent]`` is read again too).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 23:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import syncd.store.types

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_UTC = syncd.store.types.UTCDateTime(timezone=True)
_CHANNELS = ("email", "sms", "ads")


def upgrade() -> None:
    op.create_table(
        "consent_statements",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("customer_id", sa.Integer(), nullable=False),
        sa.Column("channel", sa.String(), nullable=False),
        sa.Column("granted", sa.Boolean(), nullable=False),
        sa.Column("stated_at", _UTC, nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("recorded_at", _UTC, nullable=True),
        sa.ForeignKeyConstraint(["customer_id"], ["customers.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("channel", "source"),
    )
    op.create_index(
        "ix_consent_statements_customer",
        "consent_statements",
        ["customer_id", "channel", "stated_at"],
    )
    op.create_table(
        "consent_extracted",
        sa.Column("source", sa.String(), nullable=False),
        sa.Column("config", sa.Text(), nullable=False),
        sa.Column("extracted_at", _UTC, nullable=True),
        sa.PrimaryKeyConstraint("source"),
    )
    with op.batch_alter_table("customer_profiles") as batch:
        for channel in _CHANNELS:
            batch.add_column(
                sa.Column(
                    f"consent_{channel}", sa.Boolean(), server_default=sa.false(), nullable=False
                )
            )
            batch.add_column(sa.Column(f"consent_{channel}_at", _UTC, nullable=True))
            batch.add_column(sa.Column(f"consent_{channel}_source", sa.String(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("customer_profiles") as batch:
        for channel in reversed(_CHANNELS):
            batch.drop_column(f"consent_{channel}_source")
            batch.drop_column(f"consent_{channel}_at")
            batch.drop_column(f"consent_{channel}")
    op.drop_table("consent_extracted")
    op.drop_index("ix_consent_statements_customer", table_name="consent_statements")
    op.drop_table("consent_statements")
