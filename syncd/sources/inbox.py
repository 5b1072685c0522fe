"""Where a webhook delivery is made durable before its request is answered.

Group commit: a request hands its row to the inbox and waits; one writer thread takes every
row waiting, writes them in one transaction and answers them all. Under load a commit
carries many deliveries, so the rate the service accepts is not bounded by one commit per
request, and the event loop never blocks on the store.

Two inboxes, by store:

* ``StoreInbox`` (Postgres, or an in-memory SQLite store) writes straight into the store's
  ``events`` table: Postgres takes concurrent writers, so a job writing the store does not
  hold the delivery up, and every replica sees what any of them stored.
* ``JournalInbox`` (a SQLite store file) writes to a journal file beside the store
  (``syncd.db`` -> ``syncd-webhooks.db``). SQLite has one writer per file, and a job holds
  the store's for as long as its transaction lasts (seconds for a large recompute): a
  delivery waiting for it would wait that long for its answer, and WooCommerce disables a
  webhook after a few timeouts. The apply worker moves journal rows into ``events`` (under
  the store's writer lock) before applying them; moved rows keep their keys, without the
  body, for ``JOURNAL_KEEP`` so a delivery sent again is still recognised as a duplicate.
  The store's unique key on ``events`` is the backstop after that.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, TypeVar

import orjson
from sqlalchemy import Connection, Engine, select, update
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, StatementError

from syncd.sources.base import record_key
from syncd.store.models import EVENTS, QUARANTINE
from syncd.store.types import payload_problem, stand_in
from syncd.store.upsert import upsert

MAX_GROUP: Final = 500  # deliveries per commit; a larger backlog takes several
JOURNAL_KEEP: Final = timedelta(days=2)  # duplicate detection window for moved deliveries
PRUNE_EVERY_SECONDS: Final = 3600.0

Key = tuple[str, str, str]  # (source, delivery_id, body_sha256): the events table's unique key
# The stream a delivery's resource belongs to, by source name (the source's webhook spec
# knows it): the quarantine keeps a refused delivery under that stream, as a polled record.
StreamOf = Callable[[str, str], str]
Number = int | None | Exception  # what ``_write`` answers for one row
_Row = TypeVar("_Row")


class Unstorable(Exception):
    """A delivery the store refused on its own (its neighbours were stored): it is to be
    quarantined with this reason, and its request answered 4xx."""


def delivery_key(row: dict[str, Any]) -> Key:
    return (row["source"], row["delivery_id"], row["body_sha256"])


class Inbox(ABC):
    """Durable storage for deliveries on the request path, with group commit.

    ``put`` takes a row for ``events`` (its ``payload`` the parsed body) plus the raw
    ``body``; it answers the new delivery's number (an ``events`` id for a StoreInbox, a
    journal id for a JournalInbox) or None when the delivery is stored already.
    """

    def __init__(self, stream_of: StreamOf | None = None) -> None:
        self.stream_of = stream_of or _resource_is_stream
        # One writer thread: commits are serial anyway, and a dedicated thread is never
        # queued behind the default executor's other work.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="syncd-inbox")
        self._waiting: list[tuple[dict[str, Any], asyncio.Future[int | None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    @property
    def journal(self) -> bool:
        """Whether stored deliveries must be moved into ``events`` (``take``) to be applied."""
        return False

    @property
    def unmoved(self) -> int:
        """Deliveries stored but not yet moved into ``events`` (0 for a StoreInbox)."""
        return 0

    async def put(self, row: dict[str, Any]) -> int | None:
        future: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._waiting.append((row, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="syncd-inbox-flush")
        return await future

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            group, self._waiting = self._waiting[:MAX_GROUP], self._waiting[MAX_GROUP:]
            try:
                numbers = await loop.run_in_executor(
                    self._executor, self._write, [row for row, _ in group]
                )
            except Exception as exc:  # every request of the group gets the error
                for _, future in group:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), number in zip(group, numbers, strict=True):
                if future.done():  # the client may have gone away
                    continue
                if isinstance(number, Exception):
                    future.set_exception(number)
                else:
                    future.set_result(number)

    @abstractmethod
    def _write(self, rows: list[dict[str, Any]]) -> list[Number]:
        """Store ``rows``; each one's number, None for a duplicate, or an Unstorable for
        one the store refused (the others of the group are stored all the same)."""

    def take(self, limit: int) -> tuple[list[int], int]:
        """Move up to ``limit`` journal rows into ``events`` (the caller holds the store's
        writer lock): the ``events`` ids to apply, and how many were duplicates there."""
        return [], 0

    def close(self) -> None:
        self._executor.shutdown(wait=True)


class StoreInbox(Inbox):
    """Deliveries go straight into the store's ``events`` table."""

    def __init__(self, engine: Engine, stream_of: StreamOf | None = None) -> None:
        super().__init__(stream_of)
        self.engine = engine
        # One connection kept by the writer thread, in autocommit: a group is a single
        # INSERT … RETURNING (atomic on its own), so one round trip to the server instead
        # of four (pool ping, BEGIN, INSERT, COMMIT). On 2 cores shared with a busy
        # server, each round trip waits for a CPU: it was most of the answer time.
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._conn: Connection | None = None

    def _write(self, rows: list[dict[str, Any]]) -> list[Number]:
        first = _first_of_each(rows)
        events = [_event_row(rows[i]) for i in first.values()]
        stored, bad = _insert_alone_if_refused(self._insert_reconnecting, events)
        refused = {delivery_key(event): Unstorable(reason) for event, reason in bad}
        ids = {(r.source, r.delivery_id, r.body_sha256): int(r.id) for r in stored}
        return [
            (refused.get(key) or ids.get(key)) if first[key] == i else None
            for i, key in _keyed(rows)
        ]

    def _insert_reconnecting(self, events: list[dict[str, Any]]) -> list[Any]:
        try:
            return self._insert(events)
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                self._rollback()
                raise
            # The server closed the kept connection (a restart, an idle timeout): once
            # more on a new one, so the deliveries waiting now are not refused.
            self._drop_connection()
            return self._insert(events)
        except Exception:
            self._rollback()
            raise

    def _rollback(self) -> None:
        """Leave the kept connection usable after a failed statement."""
        if self._conn is not None:
            with suppress(Exception):
                self._conn.rollback()

    def _insert(self, events: list[dict[str, Any]]) -> list[Any]:
        if self._conn is None:
            self._conn = self._autocommit.connect()
        return _insert_events(self._conn, events, ("id", "source", "delivery_id", "body_sha256"))

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with suppress(Exception):
                conn.close()

    def close(self) -> None:
        super().close()  # the writer thread is done after this
        self._drop_connection()


_JOURNAL_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,
    delivery_id TEXT NOT NULL,
    body_sha256 TEXT NOT NULL,
    topic TEXT NOT NULL,
    resource TEXT NOT NULL,
    event TEXT NOT NULL,
    webhook_id INTEGER,
    received_at INTEGER NOT NULL,  -- unix microseconds, UTC
    body BLOB,                  -- the signed body; NULL once moved into the store
    UNIQUE (source, delivery_id, body_sha256)
);
CREATE INDEX IF NOT EXISTS deliveries_unmoved ON deliveries (id) WHERE body IS NOT NULL;
"""

_INSERT = (
    "INSERT INTO deliveries (source, delivery_id, body_sha256, topic, resource, event,"
    " webhook_id, received_at, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT DO NOTHING RETURNING id"
)


class JournalInbox(Inbox):
    """Deliveries go to a SQLite journal beside the store; ``take`` moves them in."""

    def __init__(self, engine: Engine, path: Path, stream_of: StreamOf | None = None) -> None:
        super().__init__(stream_of)
        self.engine = engine
        self.path = path
        # Two connections: the writer's (the inbox thread's alone) and the mover's (take,
        # pruning, checkpoints). Neither checkpoints on commit: a checkpoint syncs the
        # file, tens of milliseconds that the request whose commit crossed the threshold
        # would wait for. The mover checkpoints after each move instead, off the requests.
        self._writer = self._connect()
        self._writer.executescript(_JOURNAL_SCHEMA)
        self._mover = self._connect()
        self._mover_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._unmoved = self._mover.execute(
            "SELECT count(*) FROM deliveries WHERE body IS NOT NULL"
        ).fetchone()[0]
        self._pruned = 0.0

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        # As for the store: durable across a crash of the process; only an OS crash can
        # lose the last commits (see syncd.store.engine).
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA wal_autocheckpoint=0")
        return conn

    @property
    def journal(self) -> bool:
        return True

    @property
    def unmoved(self) -> int:
        return int(self._unmoved)

    def _write(self, rows: list[dict[str, Any]]) -> list[Number]:
        numbers: list[Number] = []
        conn = self._writer
        conn.execute("BEGIN IMMEDIATE")
        try:
            for row in rows:
                got = conn.execute(
                    _INSERT,
                    (
                        row["source"],
                        row["delivery_id"],
                        row["body_sha256"],
                        row["topic"],
                        row["resource"],
                        row["event"],
                        row["webhook_id"],
                        _micros(row["received_at"]),
                        row["body"],
                    ),
                ).fetchone()
                numbers.append(None if got is None else int(got[0]))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        with self._count_lock:
            self._unmoved += sum(isinstance(n, int) for n in numbers)
        return numbers

    def take(self, limit: int) -> tuple[list[int], int]:
        with self._mover_lock:
            return self._take(limit)

    def _take(self, limit: int) -> tuple[list[int], int]:
        picked = self._mover.execute(
            "SELECT id, source, delivery_id, body_sha256, topic, resource, event,"
            " webhook_id, received_at, body FROM deliveries WHERE body IS NOT NULL"
            " ORDER BY id LIMIT ?",
            (limit,),
        ).fetchall()
        if not picked:
            self._prune()
            return [], 0
        columns = ("source", "delivery_id", "body_sha256", "topic", "resource", "event")
        rows: list[dict[str, Any]] = []
        refused: list[tuple[dict[str, Any], str]] = []
        for p in picked:
            row = {
                **dict(zip(columns, p[1:7], strict=True)),
                "webhook_id": p[7],
                "received_at": _EPOCH + timedelta(microseconds=p[8]),
                "body": bytes(p[9]),
            }
            # A row an earlier version journaled (it parsed up to 1,024 levels) or a damaged
            # one: checked as the intake checks now, and quarantined rather than moved.
            try:
                row["payload"] = orjson.loads(row["body"])
            except orjson.JSONDecodeError as exc:
                refused.append((row, f"not valid JSON: {exc}"))
                continue
            problem = payload_problem(row["payload"], row["body"])
            if problem is not None:
                refused.append((row, str(problem)))
            else:
                rows.append(row)
        keys = [delivery_key(r) for r in rows]
        with self.engine.begin() as conn:

            def insert(group: list[dict[str, Any]]) -> list[Any]:
                with conn.begin_nested():  # a refused group leaves the transaction usable
                    return _insert_events(conn, [_event_row(r) for r in group], ("id",))

            stored, bad = _insert_alone_if_refused(insert, rows)
            refused += bad
            ids = [int(r.id) for r in stored]
            offered = len(rows) - len(bad)  # rows the store did not refuse
            duplicates = offered - len(ids)
            if duplicates:
                # Already in the store: a delivery sent again after the journal forgot it,
                # or one this journal moved before a crash kept it from noting so. The
                # latter may still be pending and must be applied.
                ids += _pending_ids(conn, keys)
                duplicates = offered - len(set(ids))
            for row, reason in refused:
                quarantine_delivery(conn, row, reason, self.stream_of)
        # Committed in the store first: a crash here moves the rows again, and the unique
        # key of events makes that a no-op. A refused row is moved too (into the
        # quarantine), so it never holds back the rows behind it.
        with self._mover:  # one transaction (the connection is in autocommit otherwise)
            self._mover.execute("BEGIN IMMEDIATE")
            self._mover.executemany(
                "UPDATE deliveries SET body = NULL WHERE id = ?", [(p[0],) for p in picked]
            )
        with self._count_lock:
            self._unmoved -= len(picked)
        self._mover.execute("PRAGMA wal_checkpoint(PASSIVE)")
        return sorted(set(ids)), duplicates

    def _prune(self) -> None:
        now = time.monotonic()
        if now - self._pruned < PRUNE_EVERY_SECONDS:
            return
        self._pruned = now
        cutoff = _micros(datetime.now(UTC) - JOURNAL_KEEP)
        self._mover.execute(
            "DELETE FROM deliveries WHERE body IS NULL AND received_at < ?", (cutoff,)
        )

    def close(self) -> None:
        super().close()  # the writer thread is done after this
        self._writer.close()
        with self._mover_lock:
            self._mover.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._mover.close()


def open_inbox(engine: Engine, stream_of: StreamOf | None = None) -> Inbox:
    """The inbox for this store: a journal beside a SQLite file, else the store itself."""
    database = engine.url.database
    if engine.dialect.name == "sqlite" and database and database != ":memory:":
        store = Path(database)
        return JournalInbox(engine, store.with_name(f"{store.stem}-webhooks.db"), stream_of)
    return StoreInbox(engine, stream_of)


def _resource_is_stream(source: str, resource: str) -> str:
    return resource


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def _micros(moment: datetime) -> int:
    """Whole microseconds since the epoch: exact, unlike a float timestamp."""
    return (moment - _EPOCH) // timedelta(microseconds=1)


def _insert_events(
    conn: Connection, events: list[dict[str, Any]], returning: Sequence[str]
) -> list[Any]:
    """Insert ``events`` rows, leaving out those stored already (by the unique key); the
    ``returning`` columns of the inserted ones, in one statement up to MAX_GROUP rows."""
    return upsert(
        conn,
        EVENTS,
        events,
        keys=("source", "delivery_id", "body_sha256"),
        update=(),
        returning=returning,
        batch_size=MAX_GROUP,
    )


def _event_row(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "source": row["source"],
        "delivery_id": row["delivery_id"],
        "body_sha256": row["body_sha256"],
        "topic": row["topic"],
        "resource": row["resource"],
        "event": row["event"],
        "webhook_id": row["webhook_id"],
        "received_at": row["received_at"],
        "applied_at": None,
        "status": "pending",
        "attempts": 0,
        "error": None,
        "payload": row["payload"],
    }


def _keyed(rows: Sequence[dict[str, Any]]) -> list[tuple[int, Key]]:
    return [(i, delivery_key(row)) for i, row in enumerate(rows)]


def _first_of_each(rows: Sequence[dict[str, Any]]) -> dict[Key, int]:
    """Each key's first row: a delivery sent twice within one group is stored once."""
    first: dict[Key, int] = {}
    for i, key in _keyed(rows):
        first.setdefault(key, i)
    return first


def _pending_ids(conn: Any, keys: Sequence[Key]) -> list[int]:
    """The ids of the still-pending events among ``keys``."""
    wanted = set(keys)
    rows = conn.execute(
        select(EVENTS.c.id, EVENTS.c.source, EVENTS.c.delivery_id, EVENTS.c.body_sha256).where(
            EVENTS.c.status == "pending",
            EVENTS.c.delivery_id.in_(sorted({k[1] for k in keys})),
        )
    )
    return [int(r.id) for r in rows if (r.source, r.delivery_id, r.body_sha256) in wanted]


def _insert_alone_if_refused(
    insert: Callable[[list[_Row]], list[Any]], rows: list[_Row]
) -> tuple[list[Any], list[tuple[_Row, str]]]:
    """``insert(rows)``; when the store refuses one row, that fails the statement of the
    group, so each row is inserted on its own then: the one is refused alone (returned with
    the reason) and its neighbours are stored. Errors that are not a row's are raised."""
    try:
        return insert(rows), []
    except Exception as exc:
        if not _refused_row(exc):
            raise
    stored: list[Any] = []
    refused: list[tuple[_Row, str]] = []
    for row in rows:
        try:
            stored += insert([row])
        except Exception as one:
            if not _refused_row(one):
                raise
            refused.append((row, _reason(one)))
    return stored, refused


def _refused_row(exc: BaseException) -> bool:
    """Whether ``exc`` is the store refusing a row for what it holds (which the same row
    would meet again), not the store being unavailable."""
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return False
        # Postgres: data exception, integrity violation, program limit exceeded (a value
        # past jsonb's limits) are the row's; psycopg files the last as OperationalError.
        sqlstate = getattr(exc.orig, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate[:2] in ("22", "23", "54"):
            return True
        return not isinstance(exc, OperationalError | InterfaceError)
    # A value its column's bind processor refused (the JSON writer's limits: PayloadRejected).
    return isinstance(exc, StatementError | ValueError | TypeError)


def _reason(exc: BaseException) -> str:
    cause = exc.orig if isinstance(exc, StatementError) and exc.orig is not None else exc
    text = str(cause).strip().splitlines()
    return f"the store refused it: {type(cause).__name__}: {text[0] if text else ''}"[:2000]


def quarantine_delivery(
    conn: Connection, row: dict[str, Any], reason: str, stream_of: StreamOf
) -> None:
    """Keep a webhook delivery the store cannot take in the quarantine, with the reason:
    keyed like a polled record (its id), so a valid copy arriving later releases it."""
    # The value itself may be what the store cannot keep: a stand-in always (id, reason,
    # the start of the body).
    payload = row.get("payload")
    kept = stand_in(payload, reason, row["body"])
    key = f"sha256:{row['body_sha256']}" if payload is None else record_key(payload)
    now = datetime.now(UTC)
    stream = stream_of(row["source"], row["resource"])
    log_reason = f"webhook {row['topic']} delivery {row['delivery_id']}: {reason}"[:2000]
    upsert(
        conn,
        QUARANTINE,
        [
            {
                "source": row["source"],
                "stream": stream,
                "source_id": None if key.startswith("sha256:") else key,
                "record_key": key,
                "reason": log_reason,
                "payload": kept,
                "first_seen_at": now,
                "seen_at": now,
                "times_seen": 1,
            }
        ],
        keys=("source", "stream", "record_key"),
        update=("reason", "payload", "seen_at"),
    )
    conn.execute(  # seen again (as SourceSync._quarantine counts a record read again)
        update(QUARANTINE)
        .where(
            QUARANTINE.c.source == row["source"],
            QUARANTINE.c.stream == stream,
            QUARANTINE.c.record_key == key,
            QUARANTINE.c.first_seen_at != now,
        )
        .values(times_seen=QUARANTINE.c.times_seen + 1)
    )
