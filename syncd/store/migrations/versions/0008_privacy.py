"""privacy: erasure and access requests, their steps, suppressions and the store's salt

A forget request records one step per destination mapping and one for the store; each step
keeps its outcome, attempts and the vendor's receipt, so an interrupted erasure resumes with
the steps not yet confirmed. Suppressions keep salted hashes of a forgotten person's email
and phone (never the address) so no later sync re-adds them. The salt is the store's own
random secret, made once by syncd.privacy on first use.

Table shapes are written out here rather than imported: a migration must keep producing the
same schema whatever the models become later.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 23:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy import Text
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The store's instants: timestamptz on Postgres, DATETIME (UTC text) on SQLite.
_UTC = sa.DateTime(timezone=True)
_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), "postgresql")


def upgrade() -> None:
    op.create_table(
        "privacy_secret",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("salt", sa.String(length=64), nullable=False),
        sa.Column("created_at", _UTC, nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "privacy_requests",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("subject_hash", sa.String(length=64), nullable=False),
        sa.Column("requested_by", sa.String(), nullable=False),
        sa.Column("requested_at", _UTC, nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("finished_at", _UTC, nullable=True),
        sa.Column("identifiers", _JSON, nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_privacy_requests_subject", "privacy_requests", ["subject_hash", "kind"], unique=False
    )
    op.create_table(
        "privacy_steps",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("receipt", sa.String(), nullable=True),
        sa.Column("done_at", _UTC, nullable=True),
        sa.Column("updated_at", _UTC, nullable=True),
        sa.ForeignKeyConstraint(["request_id"], ["privacy_requests.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("request_id", "name"),
    )
    op.create_table(
        "privacy_suppressions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("email_hash", sa.String(length=64), nullable=True),
        sa.Column("phone_hash", sa.String(length=64), nullable=True),
        sa.Column("customer_id", sa.Integer(), nullable=True),
        sa.Column("reason", sa.String(), nullable=False),
        sa.Column("request_id", sa.Integer(), nullable=True),
        sa.Column("created_at", _UTC, nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    for column in ("email_hash", "phone_hash", "customer_id"):
        op.create_index(
            f"ix_privacy_suppressions_{column}", "privacy_suppressions", [column], unique=False
        )


def downgrade() -> None:
    for column in ("email_hash", "phone_hash", "customer_id"):
        op.drop_index(f"ix_privacy_suppressions_{column}", table_name="privacy_suppressions")
    op.drop_table("privacy_suppressions")
    op.drop_table("privacy_steps")
    op.drop_index("ix_privacy_requests_subject", table_name="privacy_requests")
    op.drop_table("privacy_requests")
    op.drop_table("privacy_secret")
