"""SQLite: one text form per instant in every time column

Rows written by SQLAlchemy statements carried ``2024-01-01 01:02:03.000000`` where the bulk
upsert wrote ``2024-01-01 01:02:03``; as text the first sorts after the second, so the same
instant compared unequal. Both paths now write ``datetime.isoformat(" ")``; this rewrites
the older form. Postgres stores ``timestamptz`` and has nothing to do.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_WHOLE_SECOND = "'????-??-?? ??:??:??.000000'"


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    inspector = sa.inspect(bind)
    for table in inspector.get_table_names():
        columns = [
            c["name"] for c in inspector.get_columns(table) if isinstance(c["type"], sa.DateTime)
        ]
        if not columns:
            continue
        # One pass over the table; only rows holding the old form are rewritten.
        sets = ", ".join(
            f'"{c}" = CASE WHEN "{c}" GLOB {_WHOLE_SECOND} THEN substr("{c}", 1, 19) ELSE "{c}" END'
            for c in columns
        )
        where = " OR ".join(f'"{c}" GLOB {_WHOLE_SECOND}' for c in columns)
        op.execute(f'UPDATE "{table}" SET {sets} WHERE {where}')


def downgrade() -> None:
    pass  # the new form is what SQLite's datetime functions write too: nothing to undo
