"""Work tables: the temporary tables a recompute builds on its own connection.

Postgres drops them at commit; SQLite keeps them for the connection's life, so the
recompute ends with ``drop_all`` before the connection goes back to the pool. Each
table is dropped first if a cut-off recompute left it behind.
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


def create(conn: Connection, name: str, columns: str, *, key: str | None = None) -> None:
    """CREATE TEMP TABLE name (columns). ``key``: a column whose values are unique, the
    table's key on SQLite (an INTEGER one is the rowid; see create_as). Postgres gets no
    key: it hash-joins, and keeping a key up row by row cost more than the joins gained
    (1.6 s of a 2 s copy of a million rows); ``analyze`` the table once it is filled."""
    suffix = _fresh(conn, name)
    if key is not None and conn.dialect.name == "sqlite":
        columns = f"{columns}, PRIMARY KEY ({key})"
    conn.execute(text(f"CREATE TEMP TABLE {name} ({columns}){suffix}"))


def shadow(conn: Connection, table: str) -> None:
    """An empty temporary ``table`` on ``conn``, with the columns of the store's table of
    that name, which it hides from ``conn`` alone: an unqualified name finds a temporary
    table first (SQLite searches its temp schema before main, Postgres its pg_temp schema
    before the search_path), so every statement of ``conn`` that reads or writes
    ``table`` uses the copy while every other connection keeps seeing the store's table.
    A backtest writes its profiles there. The store's table is never locked, never
    written: on SQLite the temp schema is a database of its own, so writing there does
    not take the store's write lock."""
    conn.info.setdefault(_MADE, set()).add(table)
    if conn.dialect.name == "sqlite":
        conn.execute(text(f"DROP TABLE IF EXISTS temp.{table}"))
        ddl = conn.execute(
            text("SELECT sql FROM main.sqlite_master WHERE type = 'table' AND name = :t"),
            {"t": table},
        ).scalar_one()
        # The stored statement starts "CREATE TABLE" (SQLite normalises it).
        conn.exec_driver_sql(ddl.replace("CREATE TABLE", "CREATE TEMP TABLE", 1))
    else:
        # LIKE reads the store's table: the copy does not exist yet. Without its key or
        # indexes: nothing looks a backtest's profile up by key.
        conn.execute(text(f"DROP TABLE IF EXISTS pg_temp.{table}"))
        conn.execute(
            text(f"CREATE TEMP TABLE {table} (LIKE {table} INCLUDING DEFAULTS) ON COMMIT DROP")
        )


def analyze(conn: Connection, name: str) -> None:
    """Statistics for the planner on a filled work table (Postgres; SQLite plans by keys)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text(f"ANALYZE {name}"))


def create_as(
    conn: Connection,
    name: str,
    select_sql: str,
    params: Mapping[str, Any] | None = None,
    *,
    key: str | tuple[str, ...] | None = None,
) -> None:
    """CREATE TEMP TABLE name AS select_sql, whose rows are unique on ``key``.

    On SQLite the table is stored in ``key`` order: a single (integer) key column is the
    rowid, a composite one makes a WITHOUT ROWID table. Joins on the key are then b-tree
    lookups (SQLite builds no automatic index on a temp table in every plan, and a
    per-customer LEFT JOIN without one scans the table once per customer), and a GROUP BY
    on a prefix of the key reads the rows in order instead of sorting them. Rows coming
    from a GROUP BY on the key are inserted in order, so the table is built by appending.
    Postgres hash-joins and sorts as its planner sees fit, so it gets statistics
    (``analyze``) instead.
    """
    params = params or {}
    suffix = _fresh(conn, name)
    if conn.dialect.name == "postgresql" or key is None:
        conn.execute(bound(f"CREATE TEMP TABLE {name}{suffix} AS {select_sql}", params), params)
        analyze(conn, name)
        return
    # The column names, from preparing the query (LIMIT 0 reads no row). The columns are
    # left untyped: each value keeps the storage class its expression gave it.
    probe = bound(f"SELECT * FROM ({select_sql}) LIMIT 0", params)
    columns = list(conn.execute(probe, params).keys())
    if isinstance(key, str):
        definition = ", ".join(f"{c} INTEGER PRIMARY KEY" if c == key else c for c in columns)
    else:
        definition = f"{', '.join(columns)}, PRIMARY KEY ({', '.join(key)})"
    rowid = "" if isinstance(key, str) else " WITHOUT ROWID"
    conn.execute(text(f"CREATE TEMP TABLE {name} ({definition}){rowid}"))
    conn.execute(bound(f"INSERT INTO {name} ({', '.join(columns)}) {select_sql}", params), params)


def sqlite_file(conn: Connection) -> str | None:
    """The file of a SQLite store; None for Postgres or an in-memory SQLite store."""
    if conn.dialect.name != "sqlite":
        return None
    database = conn.engine.url.database or ""
    if database in ("", ":memory:") or "mode=memory" in str(conn.engine.url):
        return None
    return database


def drop_all(conn: Connection) -> None:
    """Drop every work table made on this connection, after its transaction. Postgres has
    dropped them at commit (or rollback) already, so there it only forgets their names.

    A SQLite file store's connection is closed instead, which deletes its temporary
    database file with every table in it at once: dropping them one by one took 3 s at
    a million customers. The pool opens a new connection for the next user. An
    in-memory store would lose its data with its connection, so its tables are dropped.
    """
    names = sorted(conn.info.pop(_MADE, set()))
    if conn.dialect.name != "sqlite":
        return
    if sqlite_file(conn) is not None:
        conn.invalidate()
        return
    for name in names:
        # "temp.": a shadow (see ``shadow``) has the name of a store table.
        conn.execute(text(f"DROP TABLE IF EXISTS temp.{name}"))
    conn.commit()
