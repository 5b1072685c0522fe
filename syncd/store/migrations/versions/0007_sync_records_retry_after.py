"""sync_records.retry_after: refused records are retried on a schedule, not every run

A refused record is tried again once ``retry_after`` has passed (by default 1 h, 6 h and
24 h after its first, second and third refusal); a record refused on its last try keeps
``retry_after`` NULL: it is given up, counted in ``syncd status`` and sent again by
``syncd push --retry-failed``.

Records refused before this revision were retried on every run until they reached the
sync's ``max_attempts`` (3 by default): those below it are due at once, those at or above
it stay given up.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 21:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import syncd.store.types

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_UTC = syncd.store.types.UTCDateTime(timezone=True)
_OLD_MAX_ATTEMPTS = 3  # the former default of a sync's max_attempts


def upgrade() -> None:
    op.add_column("sync_records", sa.Column("retry_after", _UTC, nullable=True))
    op.execute(
        "UPDATE sync_records SET retry_after = updated_at "
        f"WHERE status = 'failed' AND attempts < {_OLD_MAX_ATTEMPTS}"
    )


def downgrade() -> None:
    op.drop_column("sync_records", "retry_after")
