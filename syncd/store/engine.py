"""Engines for the embedded SQLite store and Postgres, migrated to the current schema on open."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event

from syncd.config import mask_url_password
from syncd.store.types import json_dumps, json_loads


class StoreError(Exception):
    """The store cannot be opened or migrated."""


def _sqlite_file(url: str) -> Path | None:
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        return None
    rest = url[len(prefix) :].split("?", 1)[0]
    if rest in ("", ":memory:"):
        return None
    return Path(rest)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``sqlite:///path`` or ``postgresql+psycopg://…``, not yet migrated."""
    if url.startswith("sqlite:"):
        path = _sqlite_file(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            json_serializer=json_dumps,
            json_deserializer=json_loads,
            connect_args={"timeout": 30},
            **kwargs,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cur = dbapi_connection.cursor()
            # WAL: readers (status, the HTTP side) never block the writer.
            cur.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable across application crashes in WAL mode (only an OS crash can
            # lose the last transactions) and several times faster than FULL for bulk upserts.
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    if url.startswith("postgresql+psycopg://"):
        return create_engine(
            url,
            json_serializer=json_dumps,
            json_deserializer=json_loads,
            pool_pre_ping=True,
            **kwargs,
        )
    raise StoreError(
        f"unsupported store url {url!r}: expected sqlite:///… or postgresql+psycopg://…"
    )


class WriterLock:
    """Turns for the writers of one process on a SQLite store.

    SQLite has a single writer, and in WAL mode a transaction that read before another
    connection committed cannot start writing: it fails at once with "database is locked"
    rather than waiting. Jobs and webhook applies that write the store therefore take
    turns; on Postgres this lock is a no-op and they run side by side.
    """

    def __init__(self, exclusive: bool) -> None:
        self._lock = threading.Lock() if exclusive else None

    def __enter__(self) -> None:
        if self._lock is not None:
            self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        if self._lock is not None:
            self._lock.release()

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """The lock, waited for off the event loop."""
        if self._lock is None:
            yield
            return
        lock = self._lock
        # In short tries: a worker thread blocked on the lock cannot be cancelled, and the
        # event loop's shutdown waits for its worker threads (a stop behind a long job).
        # A try cancelled after it took the lock hands it back.
        while True:
            attempt = asyncio.ensure_future(asyncio.to_thread(lock.acquire, True, 0.25))
            try:
                if await asyncio.shield(attempt):
                    break
            except asyncio.CancelledError:
                attempt.add_done_callback(_release_if_taken(lock))
                raise
        try:
            yield
        finally:
            self._lock.release()


def _release_if_taken(lock: threading.Lock) -> Callable[[asyncio.Future[bool]], None]:
    def release(attempt: asyncio.Future[bool]) -> None:
        if not attempt.cancelled() and attempt.exception() is None and attempt.result():
            lock.release()

    return release


_WRITERS: weakref.WeakKeyDictionary[Engine, WriterLock] = weakref.WeakKeyDictionary()
_WRITERS_GUARD = threading.Lock()


def writer_lock(engine: Engine) -> WriterLock:
    """The process's writer lock for ``engine`` (see WriterLock)."""
    with _WRITERS_GUARD:
        lock = _WRITERS.get(engine)
        if lock is None:
            lock = _WRITERS[engine] = WriterLock(engine.dialect.name == "sqlite")
        return lock


def open_store(url: str, **kwargs: Any) -> Engine:
    """Open the store and bring its schema to the current version (migrations at start-up)."""
    from syncd.store.migrate import upgrade

    engine = make_engine(url, **kwargs)
    try:
        upgrade(engine)
    except Exception as exc:
        engine.dispose()
        raise StoreError(f"cannot open the store at {mask_url_password(url)}: {exc}") from exc
    return engine
