"""Reading a push's rows: a segment's members (with the columns their source contributes)
or a SQL model's rows, each with its content hash.

A row source yields ``(key, content hash, raw row)`` for every row and maps a raw row to
column values only for the rows that are sent: on a large audience, reading and hashing
is the whole cost of a push where nothing changed.

The content hash covers the sync's mapping (its fingerprint) and the row's input
columns, not the mapped payload: the mapping is deterministic, so an unchanged row
is known unchanged without being mapped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterator
from datetime import datetime
from typing import Any, Final, Protocol, cast

import orjson
from sqlalchemy import ColumnElement, Connection, Engine, func, select, text
from sqlalchemy.exc import DBAPIError

from syncd.mapping import LEGACY_COLUMNS, PERSON_COLUMNS, LoadedSync
from syncd.runs import iso
from syncd.sources.base import PushColumns
from syncd.store.models import (
    CONSENT_EXTRACTED,
    CUSTOMER_RECORDS,
    CUSTOMERS,
    MEMBERSHIPS,
    ORDERS,
    PROFILES,
    SYNC_RUNS,
)

__all__ = [
    "READ_CHUNK",
    "ModelRows",
    "PushColumns",
    "PushError",
    "RowSource",
    "SegmentRows",
    "check_model",
    "consent_unread",
    "digest",
    "driver_batches",
    "quote",
]

READ_CHUNK: Final = 2000


class PushError(Exception):
    """A sync that cannot run (its SQL model fails, a key column is missing)."""


def quote(value: str) -> str:
    """``value`` as an SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def driver_batches(conn: Connection, sql: str, args: Any) -> Iterator[list[tuple[Any, ...]]]:
    """Batches of driver rows; Postgres streams them from a server-side cursor."""
    raw = conn.connection.driver_connection
    assert raw is not None
    if conn.dialect.name == "postgresql":
        cursor = raw.cursor(name=f"syncd_push_{id(conn):x}")
        cursor.itersize = READ_CHUNK
    else:
        cursor = raw.cursor()
    try:
        cursor.execute(sql, args)
        while batch := cursor.fetchmany(READ_CHUNK):
            yield batch
    finally:
        cursor.close()


def digest(fingerprint: bytes, values: Any) -> int:
    """A row's content hash: the mapping's fingerprint and the row's input values, as a
    signed 64-bit integer (a BIGINT in the store: cheaper to read back a million of than
    text; a false "unchanged" needs a 1 in 2**64 collision on the same record)."""
    body = orjson.dumps(values, default=str)
    hashed = hashlib.blake2b(fingerprint + body, digest_size=8).digest()
    return int.from_bytes(hashed, "big", signed=True)


class RowSource(Protocol):
    """Where a sync's rows come from: ``plan`` yields ``(key, content hash, raw row)`` for
    every row (the key as the engine's record lookup returns it: an int customer id or a
    str), ``row`` turns a raw row into column values for mapping."""

    def plan(self, fingerprint: bytes) -> Iterator[tuple[Any, int, Any]]: ...

    def row(self, raw: Any) -> dict[str, Any]: ...


class SegmentRows:
    """A segment's current members with the columns the mapping reads, as the driver
    returns them: SQLAlchemy's Row objects and type processing cost more than the rest of
    planning on a large audience, so they are spent only on the rows that are sent."""

    def __init__(
        self, conn: Connection, sync: LoadedSync, scope: Collection[int] | None = None
    ) -> None:
        self.conn = conn
        spec = sync.spec
        self.event = spec.mode == "event"
        # Only these customers' memberships (a push after a scoped recompute).
        in_scope = [MEMBERSHIPS.c.customer_id.in_(sorted(scope))] if scope is not None else []
        wanted = set(sync.columns()) | {"customer_id"}
        if self.event:
            wanted.add("entered_at")
        profile_cols = [c for c in PROFILES.c.keys() if c in wanted]  # noqa: SIM118
        columns: list[Any] = [PROFILES.c[c] for c in profile_cols]
        if "entered_at" in wanted:
            columns.append(MEMBERSHIPS.c.entered_at)
        for name in PERSON_COLUMNS:
            if name in wanted:
                columns.append(
                    select(CUSTOMERS.c[name])
                    .where(CUSTOMERS.c.id == PROFILES.c.customer_id)
                    .scalar_subquery()
                    .label(name)
                )
        for legacy, column in LEGACY_COLUMNS.items():
            if legacy in wanted:
                columns.append(PROFILES.c[column].label(legacy))
        for contributed in sync.source_columns:
            for name, build in contributed.expressions.items():
                if name in wanted:
                    columns.append(build(PROFILES.c.customer_id, spec).label(name))
        # Only members with the sync's consent are its rows: one who withdrew is not a
        # member for this sync, so a mirror removes them and an upsert unsubscribes them.
        consenting = consent_condition(sync)
        self.stmt = (
            select(*columns)
            .select_from(
                MEMBERSHIPS.join(PROFILES, PROFILES.c.customer_id == MEMBERSHIPS.c.customer_id)
            )
            .where(
                MEMBERSHIPS.c.segment == spec.segment,
                MEMBERSHIPS.c.exited_at.is_(None),
                *in_scope,
                *consenting,
            )
            # The open-membership index is in this order: no sort of a million rows.
            .order_by(MEMBERSHIPS.c.customer_id)
        )
        dialect = conn.dialect
        self.names = [str(c.key) for c in self.stmt.selected_columns]
        self.processors = [
            c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns
        ]
        # Values computed once for the whole audience and appended to each row.
        self.segments: dict[int, tuple[str, ...]] | None = None
        if "segments" in wanted:
            # Sorted, so the same memberships always make the same value and hash.
            found: dict[int, list[str]] = {}
            for cid, name in conn.execute(
                select(MEMBERSHIPS.c.customer_id, MEMBERSHIPS.c.segment)
                .where(MEMBERSHIPS.c.exited_at.is_(None), *in_scope)
                .order_by(MEMBERSHIPS.c.customer_id, MEMBERSHIPS.c.segment)
            ):
                found.setdefault(cid, []).append(name)
            self.segments = {cid: tuple(names) for cid, names in found.items()}
            self.names.append("segments")
            self.processors.append(None)
        self.flagged: list[set[int]] = []
        for contributed in sync.source_columns:
            for name, query in contributed.flags.items():
                if name in wanted:
                    self.flagged.append(query(conn, spec, scope))
                    self.names.append(name)
                    self.processors.append(None)

    def plan(self, fingerprint: bytes) -> Iterator[tuple[Any, int, Any]]:
        conn = self.conn
        compiled = self.stmt.compile(
            dialect=conn.dialect, compile_kwargs={"render_postcompile": True}
        )
        params = compiled.construct_params()
        args: Any = (
            tuple(params[name] for name in compiled.positiontup)
            if compiled.positiontup is not None
            else params
        )
        cid_at = self.names.index("customer_id")
        entered_at = self.names.index("entered_at") if self.event else -1
        to_time = self.processors[entered_at] if self.event else None
        segments, flagged = self.segments, self.flagged
        # The loop runs once per member: locals, and the digest spelled out (= digest).
        blake2b, dumps, from_bytes = hashlib.blake2b, orjson.dumps, int.from_bytes
        for batch in driver_batches(conn, str(compiled), args):
            for raw in batch:
                cid = raw[cid_at]
                if segments is not None or flagged:
                    extra: tuple[Any, ...] = ()
                    if segments is not None:
                        extra += (segments.get(cid, ()),)
                    for members in flagged:
                        extra += (cid in members,)
                    raw = (*raw, *extra)
                body = dumps(raw, default=str)
                hashed = from_bytes(
                    blake2b(fingerprint + body, digest_size=8).digest(), "big", signed=True
                )
                if self.event:
                    when = raw[entered_at]
                    yield f"{cid}@{_iso(to_time(when) if to_time else when)}", hashed, raw
                else:
                    yield cid, hashed, raw

    def row(self, raw: Any) -> dict[str, Any]:
        return {
            name: proc(value) if proc is not None and value is not None else value
            for name, proc, value in zip(self.names, self.processors, raw, strict=True)
        }


def consent_unread(conn: Connection) -> str | None:
    """Why the profiles' consent columns cannot be trusted yet, or None.

    They are right once every source with rows has read its stored consent statements
    (``consent_extracted``: the first sync after the upgrade that added consent) and a
    recompute ran after that. Before, nobody consents: a push would send nobody and take
    everyone out of mirrored lists.
    """
    with_rows = set(conn.execute(select(ORDERS.c.source).distinct()).scalars())
    with_rows |= set(conn.execute(select(CUSTOMER_RECORDS.c.source).distinct()).scalars())
    read = dict(
        conn.execute(select(CONSENT_EXTRACTED.c.source, CONSENT_EXTRACTED.c.extracted_at)).all()
    )
    unread = sorted(with_rows - set(read))
    if unread:
        return (
            f"the consent statements of source {', '.join(unread)} are not read yet (the "
            "store predates consent): run `syncd sync`, then `syncd segments`, before pushing"
        )
    latest = max((at for at in read.values() if at is not None), default=None)
    if latest is None:
        return None
    recomputed = conn.execute(
        select(func.max(SYNC_RUNS.c.started_at)).where(
            SYNC_RUNS.c.kind == "segments", SYNC_RUNS.c.status.in_(("success", "partial"))
        )
    ).scalar()
    if recomputed is None or recomputed < latest:
        return (
            "the profiles' consent is older than the consent statements read at "
            f"{iso(latest)}: run `syncd segments` before pushing"
        )
    return None


def consent_condition(sync: LoadedSync) -> list[ColumnElement[bool]]:
    """The profile condition a sync's rows meet: consent on its channel (none for "none")."""
    if sync.consent == "none":
        return []
    return [PROFILES.c[f"consent_{sync.consent}"].is_(True)]


def _consenting_rows(sync: LoadedSync, query: str) -> str:
    """A SQL model's query keeping only the rows of consenting people: the model names them
    by a ``customer_id`` column (its rows are people, or carry the person they go to)."""
    if sync.consent == "none":
        return query
    return (
        f"SELECT c.* FROM ({query}) AS c WHERE c.customer_id IN (SELECT customer_id FROM "
        f"customer_profiles WHERE consent_{sync.consent})"
    )


def _run_model(conn: Connection, sync: LoadedSync, sql: str) -> Any:
    """Execute a SQL model (or a wrapper of it); PushError naming the sync when the query
    fails or lacks a column the mapping reads."""
    spec = sync.spec
    if sync.consent != "none":
        # The consent filter needs the person: a model without customer_id cannot say
        # whom a row goes to, so its rows could reach people without consent.
        try:
            probe = conn.execute(text(f"SELECT * FROM ({sql}) AS p LIMIT 0"))
        except DBAPIError as exc:
            raise PushError(f"sync[{spec.name}].sql: the query failed: {exc.orig}") from None
        names = list(probe.keys())
        probe.close()
        if "customer_id" not in names:
            raise PushError(
                f"sync[{spec.name}].sql: a sync that needs {sync.consent} consent needs a "
                f"customer_id column to know whom each row goes to (it returns "
                f'{", ".join(names)}); or set consent = "none" with a consent_reason'
            )
        sql = _consenting_rows(sync, sql)
    try:
        result = conn.execution_options(yield_per=READ_CHUNK).execute(text(sql))
    except DBAPIError as exc:
        raise PushError(f"sync[{spec.name}].sql: the query failed: {exc.orig}") from None
    columns = list(result.keys())
    missing = [c for c in (spec.key, *sync.columns()) if c not in columns]
    if missing:
        result.close()
        raise PushError(
            f"sync[{spec.name}].sql: the query has no column {missing[0]!r} "
            f"(it returns {', '.join(columns)})"
        )
    return result


def _model_query(sql: str) -> str:
    """The user's SQL model as a subquery: it can then only be one SELECT (SQLite and
    Postgres refuse a write, even a ``WITH … DELETE``, in a subquery; run bare on SQLite,
    ``delete from orders returning id as customer_id`` deleted the orders)."""
    return f"SELECT * FROM ({sql.strip().rstrip(';').strip()}) AS m"


def _read_only(conn: Connection) -> None:
    """Make ``conn``'s transaction read-only (Postgres; the first statement it runs): a
    function that writes (``setval``, ``lo_unlink``) is refused too. The model is read
    through a server-side cursor, which psycopg declares with the extended protocol, so
    ``…; COMMIT; DROP TABLE …`` cannot ride along (it takes one statement only)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SET TRANSACTION READ ONLY"))


class ModelRows:
    """A SQL model's rows (user SQL: read through SQLAlchemy, keyed by its ``key``)."""

    def __init__(self, conn: Connection, sync: LoadedSync) -> None:
        self.conn = conn
        self.sync = sync
        self.columns: list[str] = []
        # The push reads on this connection only (it writes on connections of its own).
        _read_only(conn)

    def plan(self, fingerprint: bytes) -> Iterator[tuple[Any, int, Any]]:
        spec = self.sync.spec
        assert spec.sql is not None
        result = _run_model(self.conn, self.sync, _model_query(spec.sql))
        self.columns = list(result.keys())
        at = self.columns.index(spec.key)
        for row in result:
            raw = tuple(row)
            yield str(raw[at]), digest(fingerprint, raw), raw

    def row(self, raw: Any) -> dict[str, Any]:
        return dict(zip(self.columns, raw, strict=True))


def check_model(engine: Engine, sync: LoadedSync) -> None:
    """Run a SQL model with LIMIT 0 (``syncd validate``): PushError when it cannot work."""
    if sync.spec.sql is None:
        return
    with engine.connect() as conn:
        _read_only(conn)
        _run_model(conn, sync, f"{_model_query(sync.spec.sql)} LIMIT 0").close()


def _iso(value: Any) -> str:
    # runs.iso gives None only for None, never for a datetime.
    return cast(str, iso(value)) if isinstance(value, datetime) else str(value)
