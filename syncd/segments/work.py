"""Work tables: the temporary tables a recompute builds on its own connection.

Postgres drops them at commit; SQLite keeps them for the connection's life, so the
recompute drops every one it made (``drop_all``) before the connection goes back to
the pool. Each table is dropped first if a cut-off recompute left it behind.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, TextClause, bindparam, text

from syncd.store.types import UTCDateTime

_MADE = "syncd_work_tables"  # key in the DBAPI connection's info: the names made on it


def bound(sql: str, params: Mapping[str, Any]) -> TextClause:
    """``text(sql)`` with its parameters typed from their values: lists expand into
    ``IN (…)``, datetimes go through UTCDateTime (naive UTC text on SQLite, as stored)."""
    binds = [
        bindparam(key, expanding=True)
        if isinstance(value, list)
        else bindparam(key, type_=UTCDateTime())
        for key, value in params.items()
        if isinstance(value, list | datetime)
    ]
    statement = text(sql)
    return statement.bindparams(*binds) if binds else statement


def _fresh(conn: Connection, name: str) -> str:
    conn.execute(text(f"DROP TABLE IF EXISTS {name}"))
    conn.info.setdefault(_MADE, set()).add(name)
    return "" if conn.dialect.name == "sqlite" else " ON COMMIT DROP"


def create(conn: Connection, name: str, columns: str) -> None:
    """CREATE TEMP TABLE name (columns)."""
    suffix = _fresh(conn, name)
    conn.execute(text(f"CREATE TEMP TABLE {name} ({columns}){suffix}"))


def create_as(
    conn: Connection,
    name: str,
    select_sql: str,
    params: Mapping[str, Any] | None = None,
    *,
    key: bool = False,
) -> None:
    """CREATE TEMP TABLE name AS select_sql; ``key``: one row per ``cid``, indexed on SQLite.

    The index matters: SQLite builds no automatic index on a joined CTE or temp table in
    every plan, and a per-customer LEFT JOIN without one scans the table once per customer.
    Postgres hash-joins them, so it gets statistics (ANALYZE) instead.
    """
    params = params or {}
    suffix = _fresh(conn, name)
    conn.execute(bound(f"CREATE TEMP TABLE {name}{suffix} AS {select_sql}", params), params)
    if conn.dialect.name == "postgresql":
        conn.execute(text(f"ANALYZE {name}"))
    elif key:
        conn.execute(text(f"CREATE UNIQUE INDEX {name}_cid ON {name} (cid)"))


def drop_all(conn: Connection) -> None:
    """Drop every work table made on this connection. Postgres has dropped them at commit
    (or rollback) already, so there it only forgets their names."""
    names = sorted(conn.info.pop(_MADE, set()))
    if conn.dialect.name == "sqlite":
        for name in names:
            conn.execute(text(f"DROP TABLE IF EXISTS {name}"))
