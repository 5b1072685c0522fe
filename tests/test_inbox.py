"""The webhook inbox: group commit, and on SQLite a journal the store's writer never blocks."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import Engine, func, select, update

from syncd.sources import inbox as inbox_module
from syncd.sources.inbox import Inbox, JournalInbox, StoreInbox, open_inbox
from syncd.sources.woocommerce.webhooks import WooCommerceWebhooks
from syncd.store.models import EVENTS, QUARANTINE

RECEIVED = datetime(2026, 11, 23, 9, 30, 15, 123457, tzinfo=UTC)


def row(
    n: int, *, delivery_id: str | None = None, received_at: datetime = RECEIVED
) -> dict[str, Any]:
    payload = {"id": n, "status": "processing"}
    body = orjson.dumps(payload)
    return {
        "source": "shop",
        "delivery_id": delivery_id or f"d{n}",
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "topic": "order.updated",
        "resource": "order",
        "event": "updated",
        "webhook_id": 17,
        "received_at": received_at,
        "payload": payload,
        "body": body,
    }


def events(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return conn.execute(select(EVENTS).order_by(EVENTS.c.id)).all()


def put_all(inbox: Inbox, rows: list[dict[str, Any]]) -> list[int | None]:
    async def go() -> list[int | None]:
        return list(await asyncio.gather(*(inbox.put(r) for r in rows)))

    return asyncio.run(go())


def test_the_store_picks_its_inbox(engine: Engine) -> None:
    inbox = open_inbox(engine)
    try:
        if engine.dialect.name == "sqlite":
            # Beside the store file: state/store.db -> state/store-webhooks.db
            assert isinstance(inbox, JournalInbox)
            assert inbox.path == Path(str(engine.url.database)).with_name("store-webhooks.db")
        else:
            assert isinstance(inbox, StoreInbox)
    finally:
        inbox.close()


def test_concurrent_deliveries_share_commits_and_a_resend_is_a_duplicate(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox = open_inbox(engine)
    writes: list[int] = []
    real_write = inbox._write

    def counting_write(rows: list[dict[str, Any]]) -> list[int | None]:
        writes.append(len(rows))
        return real_write(rows)

    monkeypatch.setattr(inbox, "_write", counting_write)
    rows = [row(n) for n in range(1, 121)]
    # The 121st is the 7th sent again within the same burst (a proxy retrying at once).
    try:
        numbers = put_all(inbox, [*rows, row(7)])
        assert all(isinstance(n, int) for n in numbers[:120])
        assert len(set(numbers[:120])) == 120
        assert numbers[120] is None
        # 121 requests, far fewer commits: each commit took every request then waiting.
        assert sum(writes) == 121 and len(writes) < 121 // 4
        assert put_all(inbox, [row(7), row(121)])[0] is None  # again, later
        if inbox.journal:
            assert inbox.unmoved == 121
            ids, duplicates = inbox.take(1000)
            assert (len(ids), duplicates, inbox.unmoved) == (121, 0, 0)
        stored = events(engine)
        assert [e.payload["id"] for e in stored] == list(range(1, 122))  # arrival order
        assert {e.status for e in stored} == {"pending"}
        assert stored[0].received_at == RECEIVED
        assert stored[0].delivery_id == "d1" and stored[0].webhook_id == 17
    finally:
        inbox.close()


@pytest.fixture
def sqlite_engine(engine: Engine) -> Engine:
    if engine.dialect.name != "sqlite":
        pytest.skip("the journal is for SQLite stores; Postgres takes deliveries directly")
    return engine


def test_a_long_store_transaction_does_not_delay_the_answer(sqlite_engine: Engine) -> None:
    # A job in the middle of a write transaction on the store, as a large recompute is for
    # seconds: the store's single writer is taken, yet deliveries are stored and answered.
    blocker = sqlite3.connect(str(sqlite_engine.url.database), isolation_level=None)
    blocker.execute("PRAGMA busy_timeout=0")
    blocker.execute("BEGIN IMMEDIATE")
    inbox = open_inbox(sqlite_engine)
    try:
        numbers = put_all(inbox, [row(1), row(2)])
        assert None not in numbers and inbox.unmoved == 2
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    try:
        ids, _ = inbox.take(10)
        assert len(ids) == 2
    finally:
        inbox.close()


def test_a_crash_after_moving_leaves_the_events_to_apply_once(sqlite_engine: Engine) -> None:
    inbox = open_inbox(sqlite_engine)
    assert isinstance(inbox, JournalInbox)
    try:
        put_all(inbox, [row(1), row(2)])
        first, _ = inbox.take(10)
        # The process died after the store's commit and before the journal noted the move.
        with sqlite3.connect(inbox.path) as journal:
            for r in (row(1), row(2)):
                journal.execute(
                    "UPDATE deliveries SET body = ? WHERE delivery_id = ?",
                    (r["body"], r["delivery_id"]),
                )
    finally:
        inbox.close()
    inbox = open_inbox(sqlite_engine)
    assert isinstance(inbox, JournalInbox)
    try:
        assert inbox.unmoved == 2
        # Still pending in the store: handed out again, stored once, not counted duplicate.
        again, duplicates = inbox.take(10)
        assert (again, duplicates) == (first, 0)
        assert len(events(sqlite_engine)) == 2
        # Once applied, the same leftover is only a duplicate.
        with sqlite_engine.begin() as conn:
            conn.execute(update(EVENTS).values(status="applied"))
        with sqlite3.connect(inbox.path) as journal:
            journal.execute("UPDATE deliveries SET body = X'7B7D' WHERE delivery_id = 'd1'")
        assert inbox.take(10) == ([], 1)
    finally:
        inbox.close()


def test_moved_deliveries_are_forgotten_after_the_keep_window(
    sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox = open_inbox(sqlite_engine)
    assert isinstance(inbox, JournalInbox)
    monkeypatch.setattr(inbox_module, "PRUNE_EVERY_SECONDS", 0.0)
    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    try:
        put_all(inbox, [row(1, received_at=hour_ago)])
        inbox.take(10)
        inbox.take(10)  # nothing left to move: prunes what is past the window (nothing yet)
        with sqlite3.connect(inbox.path) as journal:
            assert journal.execute("SELECT count(*) FROM deliveries").fetchone() == (1,)
        assert put_all(inbox, [row(1, received_at=hour_ago)]) == [None]  # still known
        monkeypatch.setattr(inbox_module, "JOURNAL_KEEP", timedelta(minutes=30))
        inbox.take(10)
        with sqlite3.connect(inbox.path) as journal:
            assert journal.execute("SELECT count(*) FROM deliveries").fetchone() == (0,)
        # Sent again after that (and after it was applied): the journal takes it, the
        # store's unique key stops it.
        with sqlite_engine.begin() as conn:
            conn.execute(update(EVENTS).values(status="applied"))
        assert put_all(inbox, [row(1, received_at=hour_ago)]) != [None]
        assert inbox.take(10) == ([], 1)
        with sqlite_engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(EVENTS)).scalar_one() == 1
    finally:
        inbox.close()


def test_the_store_inbox_survives_the_server_dropping_its_connection(engine: Engine) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("the store inbox keeps a server connection on Postgres")
    inbox = open_inbox(engine)
    assert isinstance(inbox, StoreInbox)
    try:
        assert put_all(inbox, [row(1)]) != [None]
        assert inbox._conn is not None
        pid = inbox._conn.connection.dbapi_connection.info.backend_pid  # type: ignore[union-attr]
        with engine.connect() as admin:
            admin.execute(select(func.pg_terminate_backend(pid)))
        # A Postgres restart or an idle timeout: the next group goes through on a new one.
        fresh, again = put_all(inbox, [row(2), row(1)])
        assert fresh is not None and again is None
        assert [e.payload["id"] for e in events(engine)] == [1, 2]
    finally:
        inbox.close()


def deep_row(n: int, depth: int = 300) -> dict[str, Any]:
    """A delivery nested ``depth`` deep, as the intake of d390aa6 stored it (it parsed up to
    1,024 levels; the store's JSON writer fails past 254)."""
    body = b'{"id":%d,"meta_data":' % n + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"
    return {
        **row(n),
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "payload": orjson.loads(body),
        "body": body,
    }


def woocommerce_stream(source: str, resource: str) -> str:
    """The quarantine's stream of a delivery, as the webhook intake gives it for these rows."""
    return WooCommerceWebhooks().stream_of(resource) or resource


def quarantined(engine: Engine) -> list[tuple[str, str, str]]:
    with engine.connect() as conn:
        return [
            (q.stream, q.record_key, q.reason)
            for q in conn.execute(select(QUARANTINE).order_by(QUARANTINE.c.record_key))
        ]


def test_a_row_the_store_refuses_is_refused_alone_and_its_neighbours_stored(
    engine: Engine,
) -> None:
    # The intake checks the limits first; the group write must hold on its own all the
    # same: one row the store refuses does not fail the 30 written with it.
    inbox = StoreInbox(engine)
    try:

        async def go() -> list[Any]:
            rows = [row(n) for n in range(1, 31)]
            rows.insert(15, deep_row(99))
            return list(await asyncio.gather(*(inbox.put(r) for r in rows), return_exceptions=True))

        numbers = asyncio.run(go())
        refused = numbers.pop(15)
        assert type(refused).__name__ == "Unstorable"
        assert "too deep: JSON nested over 64 levels" in str(refused)
        assert all(isinstance(n, int) for n in numbers) and len(set(numbers)) == 30
        assert [e.payload["id"] for e in events(engine)] == list(range(1, 31))
        assert put_all(inbox, [row(31)])[0] is not None  # later ones go through
    finally:
        inbox.close()


def test_a_journal_row_that_cannot_be_moved_is_quarantined_and_does_not_block(
    sqlite_engine: Engine,
) -> None:
    inbox = open_inbox(sqlite_engine)
    assert isinstance(inbox, JournalInbox)
    path = inbox.path
    try:
        put_all(inbox, [row(1)])
    finally:
        inbox.close()
    # Rows as an older version could have journaled them: nested 300 deep, and not JSON.
    journal = sqlite3.connect(path, isolation_level=None)
    for bad in (deep_row(2), {**row(3), "body": b'{"id":3,', "body_sha256": "0" * 64}):
        journal.execute(
            inbox_module._INSERT,
            (
                *[bad[k] for k in ("source", "delivery_id", "body_sha256", "topic")],
                bad["resource"],
                bad["event"],
                17,
                0,
                bad["body"],
            ),
        )
    journal.close()
    # A restart: the new inbox moves past them, one batch after another.
    inbox = open_inbox(sqlite_engine, woocommerce_stream)
    try:
        put_all(inbox, [row(4)])
        assert inbox.unmoved == 4
        moved: list[int] = []
        for _ in range(4):
            ids, duplicates = inbox.take(1)
            moved += ids
            assert duplicates == 0
        assert inbox.unmoved == 0 and inbox.take(10) == ([], 0)
        assert [e.payload["id"] for e in events(sqlite_engine)] == [1, 4]
        assert sorted(moved) == [e.id for e in events(sqlite_engine)]
        kept = quarantined(sqlite_engine)
        assert [(s, k) for s, k, _ in kept] == [("orders", "2"), ("orders", "sha256:" + "0" * 64)]
        assert "too deep: JSON nested over 64 levels" in kept[0][2]
        assert "not valid JSON" in kept[1][2] and "delivery d3" in kept[1][2]
    finally:
        inbox.close()


def test_a_journal_batch_with_a_row_the_store_refuses_moves_the_rest(
    sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A row that passes the move's checks yet fails the store's write (here: the checks
    # switched off, so the store's JSON writer refuses it): moved alone, into the quarantine.
    monkeypatch.setattr(inbox_module, "payload_problem", lambda *_: None, raising=False)
    inbox = open_inbox(sqlite_engine, woocommerce_stream)
    try:
        rows = [row(n) for n in range(1, 31)]
        rows.insert(15, deep_row(99))
        put_all(inbox, rows)
        ids, duplicates = inbox.take(100)
        assert (len(ids), duplicates, inbox.unmoved) == (30, 0, 0)
        assert [e.payload["id"] for e in events(sqlite_engine)] == list(range(1, 31))
        kept = quarantined(sqlite_engine)
        assert [(s, k) for s, k, _ in kept] == [("orders", "99")]
        assert "the store refused it" in kept[0][2] and "too deep" in kept[0][2]
    finally:
        inbox.close()
