"""The one bulk-upsert helper every writer uses: INSERT … ON CONFLICT … DO UPDATE, batched."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
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


@dataclass(frozen=True)
class _Plan:
    """A compiled upsert run straight on the driver's executemany.

    SQLAlchemy's per-row parameter handling costs more than SQLite's insert itself on the
    ingest hot path, so for plain upserts (no RETURNING) the statement is compiled once and
    each row becomes a tuple (or dict, for psycopg) with the columns' own bind processors
    (UTC datetimes, JSON) applied, and column defaults filled in for keys a row lacks.
    """

    sql: str
    names: tuple[str, ...]
    processors: tuple[Callable[[Any], Any] | None, ...]
    defaults: Mapping[str, Any]
    positional: bool

    def params(self, rows: Sequence[Mapping[str, Any]]) -> list[Any]:
        names, procs, defaults = self.names, self.processors, self.defaults
        if self.positional and not defaults and len(names) > 1:
            # Hot path: every row has every column; pick them in C, then process the few
            # columns that need it (times, JSON).
            pick = itemgetter(*names)
            processed = [(i, p) for i, p in enumerate(procs) if p is not None]
            out = []
            for r in rows:
                values = list(pick(r))
                for i, p in processed:
                    values[i] = p(values[i])
                out.append(tuple(values))
            return out
        pairs = tuple(zip(names, procs, strict=True))
        if self.positional:
            return [
                tuple(
                    (p(r[n] if n in r else defaults[n]) if p else (r[n] if n in r else defaults[n]))
                    for n, p in pairs
                )
                for r in rows
            ]
        return [
            {
                n: (p(r[n] if n in r else defaults[n]) if p else (r[n] if n in r else defaults[n]))
                for n, p in pairs
            }
            for r in rows
        ]


def _plan(conn: Connection, table: Table, stmt: Any, columns: tuple[str, ...]) -> _Plan | None:
    """The driver-level plan of ``stmt``, or None when it binds anything but table columns."""
    dialect = conn.dialect
    compiled = stmt.compile(dialect=dialect, column_keys=list(columns))
    names = tuple(compiled.positiontup) if compiled.positiontup else tuple(compiled.binds)
    defaults: dict[str, Any] = {}
    processors: list[Callable[[Any], Any] | None] = []
    for name in names:
        if name not in table.c:
            return None
        column = table.c[name]
        if name not in columns:
            default = column.default
            if default is None or not getattr(default, "is_scalar", False):
                return None
            defaults[name] = default.arg
        processors.append(column.type.bind_processor(dialect))
    return _Plan(
        sql=compiled.string,
        names=names,
        processors=tuple(processors),
        defaults=defaults,
        positional=compiled.positiontup is not None,
    )


def chunks(rows: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def _statement(
    conn: Connection,
    table: Table,
    columns: tuple[str, ...],
    keys: tuple[str, ...],
    update: tuple[str, ...] | None,
    where: Where | None,
    returning: tuple[str, ...],
) -> tuple[Any, _Plan | None]:
    dialect = conn.dialect.name
    cache_key = (dialect, table, columns, keys, update, where, returning)
    cached: tuple[Any, _Plan | None] | None = _STATEMENTS.get(cache_key)
    if cached is not None:
        return cached
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
    plan = None if returning else _plan(conn, table, stmt, columns)
    if len(_STATEMENTS) >= _MAX_STATEMENTS:
        _STATEMENTS.clear()
    _STATEMENTS[cache_key] = (stmt, plan)
    return stmt, plan


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
    stmt, plan = _statement(
        conn,
        table,
        tuple(rows[0].keys()),
        tuple(keys),
        tuple(update) if update is not None else None,
        where,
        tuple(returning),
    )
    out: list[Row[Any]] = []
    for batch in chunks(rows, batch_size):
        if plan is not None:
            conn.exec_driver_sql(plan.sql, plan.params(batch))
            continue
        result = conn.execute(stmt, list(batch))
        if returning:
            out.extend(result.all())
    return out
