"""The one bulk-upsert helper every writer uses: INSERT … ON CONFLICT … DO UPDATE, batched."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import ColumnElement, Connection, Row, Table
from sqlalchemy.dialects import postgresql, sqlite

# Rows per statement. executemany binds one row at a time (SQLite's 32,766-variable cap
# never applies); the batch only bounds the memory of one round trip.
DEFAULT_BATCH = 1000

# ``where(new)`` guards an update: ``new`` holds the incoming row's columns (``excluded``),
# the table's own columns stand for the stored row.
Where = Callable[[Any], ColumnElement[bool]]

# Building an ON CONFLICT statement (its ``excluded`` namespace above all) costs more than
# executing it for a page of rows, so statements are built once per shape and reused.
_STATEMENTS: dict[tuple[Any, ...], Any] = {}
_MAX_STATEMENTS = 512


def chunks(rows: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def _statement(
    dialect: str,
    table: Table,
    columns: tuple[str, ...],
    keys: tuple[str, ...],
    update: tuple[str, ...] | None,
    where: Where | None,
    returning: tuple[str, ...],
) -> Any:
    cache_key = (dialect, table, columns, keys, update, where, returning)
    stmt = _STATEMENTS.get(cache_key)
    if stmt is not None:
        return stmt
    insert: Any
    if dialect == "sqlite":
        insert = sqlite.insert
    elif dialect == "postgresql":
        insert = postgresql.insert
    else:  # pragma: no cover - make_engine admits only these two
        raise ValueError(f"bulk upsert is not implemented for {dialect}")
    if update is None:
        update = tuple(c for c in columns if c not in keys)
    stmt = insert(table)
    if update:
        new = stmt.excluded
        stmt = stmt.on_conflict_do_update(
            index_elements=list(keys),
            set_={c: new[c] for c in update},
            where=where(new) if where is not None else None,
        )
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=list(keys))
    if returning:
        stmt = stmt.returning(*(table.c[c] for c in returning))
    if len(_STATEMENTS) >= _MAX_STATEMENTS:
        _STATEMENTS.clear()
    _STATEMENTS[cache_key] = stmt
    return stmt


def upsert(
    conn: Connection,
    table: Table,
    rows: Sequence[Mapping[str, Any]],
    *,
    keys: Sequence[str],
    update: Sequence[str] | None = None,
    where: Where | None = None,
    returning: Sequence[str] = (),
    batch_size: int = DEFAULT_BATCH,
) -> list[Row[Any]]:
    """Insert ``rows`` into ``table``; on a conflict of ``keys`` update the ``update`` columns.

    ``update`` defaults to every column of the rows except the keys; an empty list means
    DO NOTHING. ``where(new)`` guards the update (pass a module-level function: statements
    are cached per function). With ``returning``, the listed columns of every inserted or
    updated row come back (rows skipped by DO NOTHING or a false ``where`` return nothing);
    include the key columns to match them up, since the order is not guaranteed with a
    conflict clause on every dialect. Runs on the caller's connection and transaction.
    """
    if not rows:
        return []
    stmt = _statement(
        conn.dialect.name,
        table,
        tuple(rows[0].keys()),
        tuple(keys),
        tuple(update) if update is not None else None,
        where,
        tuple(returning),
    )
    out: list[Row[Any]] = []
    for batch in chunks(rows, batch_size):
        result = conn.execute(stmt, list(batch))
        if returning:
            out.extend(result.all())
    return out
