"""Source sync: fetch by windows, normalize, resolve identity, upsert; cursors and run records.

Invariants (see DESIGN.md, "Incremental sync"):

* A stream's cursor is written in the same transaction as the rows it covers, so a crash
  at any moment resumes without loss; upserts are idempotent, so re-read rows change nothing.
* A window is bounded above by the store's own clock (its responses' ``Date`` header: it
  stamps the rows) when the stream's read begins, and starts ``overlap_seconds`` before the
  cursor (equal timestamps, exclusive date bounds, slow transactions).
* Pages are fetched concurrently (a bounded look-ahead) but committed in page order, and
  the cursor advances to the last committed row only while every page so far reported the
  window's initial total (``Page.total``), every page so far was full and no id came twice. A
  smaller total means a row left the window mid-read (it was modified), shifting later rows
  one place back across a page boundary: that pass is read again from the last safe
  checkpoint. An id read twice means rows sharing one modification second came back in a
  different order on different pages (a sort without a tie-breaker), and as many places as
  rows means another row was skipped: the window is read on from the last safe
  checkpoint by id, an order without ties. So no row is skipped.
* Counters count distinct rows: a row read twice (a re-read pass) is fetched and stored once.
* Records that fail validation go to ``quarantine`` with the reason; the run goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import ColumnElement, Connection, Engine, bindparam, delete, select, update

from syncd.config import ConsentSettings, SourceSettings
from syncd.http import ApiError, AuthError
from syncd.log import get_logger, log_run
from syncd.people import (
    link_identity,
    refresh_people,
    registered_people,
    resolve_guests,
    resolve_registered,
)
from syncd.privacy import request_for_erased, scrub_suppressed
from syncd.runs import finish_run, start_run
from syncd.sources import source_class
from syncd.sources.base import (
    ENTITIES,
    BadRecord,
    Page,
    ParsedOrder,
    Source,
    SourceClient,
    Statement,
    Stream,
    record_key,
)
from syncd.store.engine import writer_lock
from syncd.store.models import (
    CONSENT_EXTRACTED,
    CONSENT_STATEMENTS,
    COUPONS,
    IDENTITIES,
    ORDERS,
    PRODUCTS,
    QUARANTINE,
    REFUNDS,
)
from syncd.store.models import CUSTOMER_RECORDS as RECORDS
from syncd.store.models import ORDER_ITEMS as ITEMS
from syncd.store.models import SYNC_STATE as STATE
from syncd.store.types import storable_copy
from syncd.store.upsert import upsert

log = get_logger("syncd.ingest")


MAX_PASSES = 5  # re-reads of a window whose rows moved while it was read
# How a pass over a window ended: every row read; a row left the window mid-read (the total
# changed); rows came back in another order on another page (an id twice with the total
# unchanged, or a short page before the last): ties in the sort.
PassOutcome = Literal["complete", "moved", "reordered"]
# Stores whose responses carry no usable Date header, already told about (once per process).
_NO_STORE_CLOCK: set[str] = set()
FLUSH_ROWS = 2000  # rows per transaction while pages keep arriving (a commit costs ~5 ms)
FLUSH_SECONDS = 2.0  # ... or this long, so progress is durable during slow reads
# The table each store entity lands in (customers: the accounts as the source has them).
TABLE_OF_ENTITY = {
    "customers": RECORDS,
    "orders": ORDERS,
    "products": PRODUCTS,
    "coupons": COUPONS,
    "refunds": REFUNDS,
}
assert tuple(TABLE_OF_ENTITY) == ENTITIES


def utcnow() -> datetime:
    """Now, to the second: source date filters have second precision."""
    return datetime.now(UTC).replace(microsecond=0)


# Parsed pages are tens of thousands of short-lived containers per second. At CPython's
# default gen0 threshold (700) they trigger a full collection every ~2,000 orders, each a
# walk of the whole heap: measured at 1.1-1.4 s of a 5 s, 20,000-order sync. Runs raise
# the threshold (cycles are still collected, only less often; payloads hold none) and put
# it back when the last concurrent run ends.
GC_GEN0_DURING_SYNC = 25_000
_gc_lock = threading.Lock()
_gc_runs = 0
_gc_saved: tuple[int, int, int] | None = None


@contextlib.contextmanager
def fewer_collections() -> Iterator[None]:
    global _gc_runs, _gc_saved
    with _gc_lock:
        if _gc_runs == 0:
            _gc_saved = gc.get_threshold()
            if _gc_saved[0] < GC_GEN0_DURING_SYNC:
                gc.set_threshold(GC_GEN0_DURING_SYNC, *_gc_saved[1:])
        _gc_runs += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_runs -= 1
            if _gc_runs == 0 and _gc_saved is not None:
                gc.set_threshold(*_gc_saved)
                _gc_saved = None


@dataclass
class StreamCounts:
    fetched: int = 0  # distinct records read from the source
    stored: int = 0  # distinct rows written (inserted or updated)
    quarantined: int = 0
    deleted: int = 0  # rows marked deleted by reconciliation
    passes: int = 0  # window passes (more than one per variant: rows moved mid-read)
    # The ids behind fetched/stored: a row read again (an overlapping or repeated pass, a
    # page that repeats a row) counts once. Records without a usable id count one each.
    _fetched_ids: set[int] = field(default_factory=set, repr=False, compare=False)
    _fetched_loose: int = field(default=0, repr=False, compare=False)
    _stored_ids: set[int] = field(default_factory=set, repr=False, compare=False)

    def saw(self, items: Sequence[Any]) -> None:
        """Records read from the source."""
        for item in items:
            pid = _id_of(item)
            if _positive_int(pid):
                self._fetched_ids.add(pid)
            else:
                self._fetched_loose += 1
        self.fetched = len(self._fetched_ids) + self._fetched_loose

    def wrote(self, ids: Iterable[int]) -> None:
        """Rows written, by source id."""
        self._stored_ids.update(ids)
        self.stored = len(self._stored_ids)

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if v and not k.startswith("_")}


@dataclass
class SyncResult:
    source: str
    status: str  # success | partial | failed
    counts: dict[str, StreamCounts] = field(default_factory=dict)
    error: str | None = None
    run_id: int | None = None
    requests: int = 0

    def flat_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for stream, c in self.counts.items():
            for k, v in c.as_dict().items():
                out[f"{stream}.{k}"] = v
        out["requests"] = self.requests
        return out


# Statements run for every page of orders, built once: building and keying a statement
# costs more than SQLite takes to run it on a page.
_ORDER_IDS = select(ORDERS.c.source_id, ORDERS.c.id).where(
    ORDERS.c.source == bindparam("source"), ORDERS.c.source_id.in_(bindparam("ids", expanding=True))
)
_DELETE_ITEMS = delete(ITEMS).where(ITEMS.c.order_id.in_(bindparam("ids", expanding=True)))


@dataclass
class AppliedBatch:
    """What ``SourceSync.apply_payloads``/``apply_deletions`` did with records that arrived
    outside a poll."""

    stream: str
    counts: StreamCounts
    # The store's people (``customers.id``) whose records changed: their profiles and
    # memberships need a recompute.
    people: set[int] = field(default_factory=set)
    stale: int = 0  # payloads older than the stored row, left out


@dataclass
class _OrderBatch:
    """A page of orders parsed off the store thread, with the accounts they need first."""

    customers: list[Any]
    orders: list[ParsedOrder] = field(default_factory=list)
    bad: list[tuple[Any, str]] = field(default_factory=list)  # payload, quarantine reason


# What a handler does with one page: an async step that may fetch more (variations, unknown
# customers), then a synchronous commit on a connection, in a transaction shared with the cursor.
Prepare = Callable[[list[Any]], Awaitable[Any]]
Commit = Callable[[Connection, Any], None]


class SourceSync:
    """One run of one source into the store; the source is found by its settings' ``type``
    in the registry (:mod:`syncd.sources`)."""

    def __init__(
        self,
        engine: Engine,
        name: str,
        settings: SourceSettings,
        client: SourceClient | None = None,
        *,
        progress: Callable[[str, int, int | None], None] | None = None,
        clock: Callable[[], datetime] = utcnow,
        consent: ConsentSettings | None = None,
    ) -> None:
        self.engine = engine
        self.name = name
        self.settings = settings
        # Where consent statements are read ([consent] of the config).
        self.consent = consent if consent is not None else ConsentSettings()
        self.source: Source = source_class(settings.type)(name, settings, client)
        self.client = self.source.client
        self.streams = self.source.streams
        self.progress = progress
        self.clock = clock
        self.overlap = timedelta(seconds=settings.overlap_seconds)
        self.lookahead = max(2, 2 * settings.concurrency)
        self.currency: str | None = None
        self.full = False
        self.run_start = clock()
        self.counts: dict[str, StreamCounts] = {}
        # Skip per-page bookkeeping that has nothing to do (the common case): streams with
        # quarantined records, and refunds still waiting for their order.
        self._quarantined: set[str] = set()
        self._unlinked_refunds = True
        self._known: set[int] | None = None
        self._db: ThreadPoolExecutor | None = None
        # On SQLite the run's write transactions take turns with the other writers (see
        # WriterLock) one transaction at a time, never across a wait on the network: a
        # webhook apply then waits for a write, not for a store that does not answer.
        self._writer = writer_lock(engine)
        # Commits the page transaction open in _read_window (None outside one): awaited
        # before a prepare step waits on the network.
        self._settle: Callable[[], Awaitable[None]] | None = None

    # -- the run ----------------------------------------------------------------------

    async def run(self, *, full: bool = False, streams: Sequence[str] | None = None) -> SyncResult:
        with fewer_collections():
            return await self._run(full, streams)

    async def _run(self, full: bool, streams: Sequence[str] | None) -> SyncResult:
        self.full = full
        self.run_start = self.clock()
        self.counts = {}  # this run's: each result keeps its own
        started = time.monotonic()
        wanted = [s for s in self.streams if s in (streams or self.settings.streams)]
        with self._writer:
            run_id = start_run(self.engine, "source", self.name)
        self._load_bookkeeping()
        await asyncio.to_thread(self.extract_stored_consent)
        self._known = None
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"syncd-store-{self.name}")
        result = SyncResult(source=self.name, status="success", run_id=run_id)
        requests_before = self.client.http.stats.requests
        try:
            for name in wanted:
                self.counts[self.streams[name].entity] = StreamCounts()
                await self._sync_stream(self.streams[name])
            if any(c.quarantined for c in self.counts.values()):
                result.status = "partial"
        except asyncio.CancelledError:
            # The service is stopping (SIGTERM): the page in flight is rolled back (see
            # _PageWriter) and the cursor stays at the last committed page, where the
            # next run resumes.
            result.status, result.error = "abandoned", "syncd stopped during the run"
            raise
        except AuthError as exc:
            result.status, result.error = "failed", f"authentication failed: {exc}"
        except ApiError as exc:
            result.status, result.error = "failed", str(exc)
        except Exception as exc:  # a bug or the store failing: the run is recorded as failed
            log.exception("source sync crashed", source=self.name)
            result.status, result.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            result.counts = self.counts
            result.requests = self.client.http.stats.requests - requests_before
            self._finish_run(run_id, result)
            log_run(
                "source",
                self.name,
                result.status,
                started,
                result.flat_counts(),
                error=result.error,
            )
            self._db.shutdown(wait=True)
            self._db = None
        return result

    def _load_bookkeeping(self) -> None:
        with self.engine.connect() as conn:
            self._quarantined = set(
                conn.execute(
                    select(QUARANTINE.c.stream).where(QUARANTINE.c.source == self.name).distinct()
                ).scalars()
            )
            self._unlinked_refunds = (
                conn.execute(
                    select(REFUNDS.c.id)
                    .where(REFUNDS.c.source == self.name, REFUNDS.c.order_id.is_(None))
                    .limit(1)
                ).first()
                is not None
            )

    def _finish_run(self, run_id: int, result: SyncResult) -> None:
        counts: dict[str, Any] = {s: c.as_dict() for s, c in result.counts.items()}
        counts["requests"] = result.requests
        with self._writer:
            finish_run(self.engine, run_id, result.status, counts, result.error)

    async def _sync_stream(self, stream: Stream) -> None:
        if not stream.windowed:
            await self._scanned(stream)
            return
        if stream.entity in ("products", "coupons") and self.currency is None:
            self.currency = await self._store_currency()
        prepare, commit = self._handlers(stream.entity)
        had_rows = self._has_rows(stream.entity)
        # The windows end at the store's now: it stamps date_modified_gmt with its own clock.
        self.run_start = await self._store_clock(stream.path)
        # Each variant's first window starts where its own cursor says, so every variant's
        # first page is asked for now: a later variant (the trash) then costs no round trip
        # of its own after the first one's pages.
        windows = []
        for suffix, variant in stream.variants:
            key = stream.name + suffix
            cursor = None if self.full else self._cursor(key)
            start = cursor - self.overlap if cursor is not None else None
            params = self.client.window_params(variant, start, self.run_start)
            first = asyncio.create_task(self.client.page(stream.path, params, 1))
            windows.append((key, variant, start, first))
        try:
            for key, variant, start, first in windows:
                await self._windowed(stream, key, variant, start, first, prepare, commit)
        finally:
            for *_, first in windows:
                if first.done() and not first.cancelled():
                    first.exception()  # retrieved: a variant not read is not an error of its own
                first.cancel()
        if self._reconcile_due(stream.name):
            if had_rows:
                await self._reconcile(stream)
            else:  # a first sync read everything there is: nothing can be missing yet
                self._stamp_reconciled(stream.name, self.clock())

    def _handlers(self, entity: str) -> tuple[Prepare, Commit]:
        """How a page of an entity's payloads is prepared and committed."""
        handlers: dict[str, tuple[Prepare, Commit]] = {
            "orders": (self._prepare_orders, self._commit_orders),
            "products": (self._prepare_products, self._commit_products),
            "coupons": (_no_prepare, self._commit_coupons),
            "refunds": (_no_prepare, self._commit_refunds),
        }
        return handlers[entity]

    # -- windows ----------------------------------------------------------------------

    async def _store_clock(self, path: str) -> datetime:
        """Now on the store's clock (see the client's ``store_now``), asked with one
        small request when no response told it yet; syncd's clock when the store sends no
        usable ``Date`` header (said once)."""
        now = self.client.store_now()
        if now is None:
            await self.client.probe_clock(path)
            now = self.client.store_now()
        if now is not None:
            return now
        if self.name not in _NO_STORE_CLOCK:
            _NO_STORE_CLOCK.add(self.name)
            log.warning(
                "the store sends no usable Date header: windows end at syncd's clock, so a "
                "store clock more than overlap_seconds behind it can lose rows",
                source=self.name,
            )
        return self.clock()

    async def _windowed(
        self,
        stream: Stream,
        key: str,
        variant: Mapping[str, str],
        start: datetime | None,
        first: asyncio.Task[Page] | None,
        prepare: Prepare,
        commit: Commit,
    ) -> None:
        """Read ``key``'s window from ``start`` to the store's now at the stream's start;
        ``first`` is the first pass's first page, already asked for."""
        upper = self.run_start
        by_id = False
        for _ in range(MAX_PASSES):
            self.counts[stream.entity].passes += 1
            params = self.client.window_params(variant, start, upper, by_id=by_id)
            outcome, checkpoint = await self._read_window(
                stream, key, params, upper, prepare, commit, first, by_id=by_id
            )
            first = None  # later passes start elsewhere: their first page is asked for then
            if outcome == "complete":
                return
            # Read on from the last safe checkpoint (an id-ordered pass has none).
            if checkpoint is not None:
                start = checkpoint - self.overlap
            if outcome == "reordered" and not by_id:
                # Ties in orderby=modified came back in another order on another page: the
                # rest of the window is read by id, which has no ties.
                by_id = True
                log.info(
                    "rows sharing a modification second came back in another order on "
                    "another page; reading the window by id",
                    source=self.name,
                    stream=key,
                )
            else:
                log.info("window moved while read; reading it again", source=self.name, stream=key)
        log.warning(
            "window kept moving; the cursor stays at its last safe checkpoint",
            source=self.name,
            stream=key,
            passes=MAX_PASSES,
        )

    async def _read_window(
        self,
        stream: Stream,
        key: str,
        params: Mapping[str, str],
        upper: datetime,
        prepare: Prepare,
        commit: Commit,
        asked: asyncio.Task[Page] | None = None,
        *,
        by_id: bool = False,
    ) -> tuple[PassOutcome, datetime | None]:
        """One pass over a window; returns how it ended and the last safe checkpoint.

        A checkpoint (the newest modification time on a page) is safe after pages 1..p when
        they all reported the first page's total, were full and held no id twice: a
        tie group wholly before that point has a fixed number of places in those pages,
        all filled by distinct rows, so every row modified before the checkpoint was read
        (rows at the checkpoint's own second may continue on the next page). An id-ordered
        pass has no checkpoint: its pages are not in modification order."""
        first = await (asked or self.client.page(stream.path, params, 1))
        initial_total = first.total
        total_pages = first.total_pages
        if total_pages is None:  # a host that strips the paging headers: read on to a short page
            return await self._read_sequential(
                stream, key, params, upper, first, prepare, commit, by_id=by_id
            )
        total_pages = max(total_pages, 1)
        outcome: PassOutcome = "complete"
        seen: set[int] = set()
        checkpoint: datetime | None = None
        pending: dict[int, asyncio.Task[Page]] = {}
        next_fetch = 2
        writer = _PageWriter(self.engine)
        writing: asyncio.Future[None] | None = None  # the page in the store thread

        async def settle() -> None:
            """Commit the pages written so far (and let go of the writer lock): the next
            wait is on the network, which may never answer."""
            nonlocal writing
            if writing is not None:
                await writing
                writing = None
            await self._in_db_thread(writer.flush)

        self._settle = settle
        try:
            for number in range(1, total_pages + 1):
                while next_fetch <= total_pages and next_fetch <= number + self.lookahead:
                    pending[next_fetch] = asyncio.create_task(
                        self.client.page(stream.path, params, next_fetch)
                    )
                    next_fetch += 1
                if number == 1:
                    page = first
                else:
                    fetch = pending.pop(number)
                    if not fetch.done():
                        # Pages that arrive faster than they are written share a
                        # transaction; a page still on its way does not hold one open.
                        await settle()
                    page = await fetch
                if page.total != initial_total and outcome == "complete":
                    outcome = "moved"
                repeated = _take_ids(page.items, seen)
                last = number == total_pages
                if outcome == "complete":
                    if repeated:
                        # With an unchanged total, an id read twice means the sort put rows
                        # in another order on another page (ties): one was skipped. By id
                        # there are no ties, so there it can only be a row that moved.
                        outcome = "moved" if by_id else "reordered"
                    elif not by_id and not last and len(page.items) < self.client.per_page:
                        # A short page before the last breaks the count of places the
                        # checkpoints rely on (a total the host got wrong): read by id.
                        outcome = "reordered"
                new_cursor: datetime | None = None
                if outcome == "complete":
                    if last:
                        new_cursor = upper
                    elif not by_id:
                        new_cursor = self._max_modified(page.items)
                        checkpoint = new_cursor or checkpoint
                writing = await self._apply(
                    writer, stream.entity, key, page.items, new_cursor, prepare, commit, writing
                )
                # Commit every FLUSH_ROWS rows or FLUSH_SECONDS, and at the window's end: a
                # crash loses only uncommitted pages, which the next run reads again.
                if last or writer.due():
                    await writing
                    writing = None
                    await self._in_db_thread(writer.flush)
                if self.progress:
                    self.progress(key, number, total_pages)
                if outcome == "reordered":
                    break  # the rest is read by id: these pages would be read for nothing
            await settle()
        finally:
            self._settle = None
            if writing is not None:
                # Something else failed: that error is the one raised, this write is undone.
                with contextlib.suppress(Exception):
                    await writing
            await self._in_db_thread(writer.abort)
            for task in pending.values():
                task.cancel()
        return outcome, checkpoint

    async def _read_sequential(
        self,
        stream: Stream,
        key: str,
        params: Mapping[str, str],
        upper: datetime,
        first: Page,
        prepare: Prepare,
        commit: Commit,
        *,
        by_id: bool = False,
    ) -> tuple[PassOutcome, datetime | None]:
        """A pass without a total (a host stripped the paging headers): pages until a short
        one. An id read twice still shows ties in another order; a row leaving cannot be
        seen here."""
        page = first
        seen: set[int] = set()
        repeated = False
        checkpoint: datetime | None = None
        writer = _PageWriter(self.engine)
        try:
            while True:
                repeated = _take_ids(page.items, seen) or repeated
                last = len(page.items) < self.client.per_page
                cursor: datetime | None = None
                if not repeated:
                    cursor = upper if last else None if by_id else self._max_modified(page.items)
                await (
                    await self._apply(
                        writer, stream.entity, key, page.items, cursor, prepare, commit
                    )
                )
                await self._in_db_thread(writer.flush)
                if repeated and not by_id:
                    return "reordered", checkpoint
                checkpoint = cursor or checkpoint
                if last:
                    return ("moved" if repeated else "complete"), checkpoint
                page = await self.client.page(stream.path, params, page.number + 1)
        finally:
            await self._in_db_thread(writer.abort)

    async def _apply(
        self,
        writer: _PageWriter,
        stream: str,
        key: str,
        items: list[Any],
        cursor: datetime | None,
        prepare: Prepare,
        commit: Commit,
        previous: asyncio.Future[None] | None = None,
    ) -> asyncio.Future[None]:
        """Start writing one page's rows and, in the same transaction, the cursor that covers
        them; returns the write, running in the store thread. The page is prepared while
        ``previous`` (the page before) is still being written, then waits for it: pages are
        written in order, and a failed write stops the window before the next one starts."""
        prepared = await prepare(items)
        self.counts[stream].saw(items)
        if previous is not None:
            await previous

        def work() -> None:
            conn = writer.connection()
            commit(conn, prepared)
            if cursor is not None:
                self._save_cursor(conn, key, cursor)

        writer.rows += len(items)
        return self._db_job(work)

    async def _before_network(self) -> None:
        """Commit an open page transaction before a prepare step waits on the network."""
        if self._settle is not None:
            await self._settle()

    def _db_job(self, fn: Callable[..., None], *args: Any) -> asyncio.Future[None]:
        """Store work off the event loop, so responses keep arriving while pages are written;
        one thread, so a transaction stays on the connection's own thread and jobs run in
        the order they were started."""
        assert self._db is not None, "store work happens inside a run"
        return asyncio.get_running_loop().run_in_executor(self._db, fn, *args)

    async def _in_db_thread(self, fn: Callable[..., None], *args: Any) -> None:
        await self._db_job(fn, *args)

    # -- cursors ----------------------------------------------------------------------

    def _cursor(self, key: str) -> datetime | None:
        with self.engine.connect() as conn:
            value: datetime | None = conn.execute(
                select(STATE.c.cursor).where(STATE.c.source == self.name, STATE.c.stream == key)
            ).scalar()
        return value

    def _save_cursor(self, conn: Connection, key: str, cursor: datetime) -> None:
        upsert(
            conn,
            STATE,
            [{"source": self.name, "stream": key, "cursor": cursor, "updated_at": utcnow()}],
            keys=("source", "stream"),
            update=("cursor", "updated_at"),
        )

    # -- quarantine -------------------------------------------------------------------

    def _quarantine(self, conn: Connection, stream: str, payload: Any, reason: str) -> None:
        self.counts[stream].quarantined += 1
        self._quarantined.add(stream)
        key = record_key(payload)
        source_id = key if not key.startswith("sha256:") else None
        now = utcnow()
        log.warning(
            "record quarantined",
            source=self.name,
            stream=stream,
            source_id=source_id,
            reason=reason,
        )
        row = {
            "source": self.name,
            "stream": stream,
            "source_id": source_id,
            "record_key": key,
            "reason": reason,
            "payload": storable_copy(payload),  # a stand-in when the store cannot keep it
            "first_seen_at": now,
            "seen_at": now,
            "times_seen": 1,
        }
        upsert(
            conn,
            QUARANTINE,
            [row],
            keys=("source", "stream", "record_key"),
            update=("reason", "payload", "seen_at"),
        )
        conn.execute(
            update(QUARANTINE)
            .where(
                QUARANTINE.c.source == self.name,
                QUARANTINE.c.stream == stream,
                QUARANTINE.c.record_key == key,
                QUARANTINE.c.first_seen_at != now,
            )
            .values(times_seen=QUARANTINE.c.times_seen + 1)
        )

    def _quarantine_all(self, conn: Connection, batch: tuple[str, list[Any]]) -> None:
        stream, items = batch
        for item in items:
            self._quarantine(
                conn, stream, item, f"id: expected a positive integer id, got {_id_of(item)!r}"
            )

    def _release(self, conn: Connection, stream: str, source_ids: Sequence[int]) -> None:
        """Records that now arrived valid leave the quarantine."""
        if source_ids and stream in self._quarantined:
            conn.execute(
                delete(QUARANTINE).where(
                    QUARANTINE.c.source == self.name,
                    QUARANTINE.c.stream == stream,
                    QUARANTINE.c.record_key.in_([str(i) for i in source_ids]),
                )
            )

    # -- scanned streams: an id scan (a collection without a date filter) ----------------

    async def _scanned(self, stream: Stream) -> None:
        """Read a stream that has no date filter: scan every id and modification time, fetch
        the new and changed records in full, mark the missing ones deleted. Customers (the
        accounts) are the entity read this way."""
        if stream.entity != "customers":
            raise NotImplementedError(f"{stream.name}: only customers can be read by a scan")
        counts = self.counts["customers"]
        ((_suffix, variant),) = stream.variants
        params = self.client.scan_params(variant, ("id", stream.cursor_field))
        scanned, bad, stable, began = await self._scan(stream.path, params)
        if bad:
            # A record without an id cannot be fetched or stored: it is kept with the reason.
            await self._in_db_thread(self._commit_in_tx, self._quarantine_all, ("customers", bad))
        with self.engine.connect() as conn:
            stored = {
                r.source_id: (r.modified_at, r.deleted_at)
                for r in conn.execute(
                    select(RECORDS.c.source_id, RECORDS.c.modified_at, RECORDS.c.deleted_at).where(
                        RECORDS.c.source == self.name
                    )
                )
            }
        changed = sorted(
            cid
            for cid, modified in scanned.items()
            if self.full
            or cid not in stored
            or stored[cid][1] is not None
            or modified is None
            or stored[cid][0] != modified
        )
        for start in range(0, len(changed), self.client.per_page):
            chunk = changed[start : start + self.client.per_page]
            payloads = await self.client.by_ids(stream.path, chunk, variant)
            counts.saw(payloads)
            await self._in_db_thread(self._commit_in_tx, self._commit_customers, payloads)
            if self.progress:
                self.progress(stream.name, start + len(chunk), len(changed))
        if stable:
            gone = [
                cid
                for cid, (_, deleted) in stored.items()
                if deleted is None and cid not in scanned
            ]
            if gone:
                await self._in_db_thread(self._mark_customers_deleted, gone)
        # The customers "cursor" says how fresh the accounts are: every change the store
        # had when this scan began (on its clock) is now in.
        fresh_as_of = began or self.clock()
        await self._in_db_thread(
            self._commit_in_tx,
            lambda conn, when: self._save_cursor(conn, stream.name, when),
            fresh_as_of,
        )

    async def _scan(
        self, path: str, params: Mapping[str, str]
    ) -> tuple[dict[int, datetime | None], list[Any], bool, datetime | None]:
        """Every id (and modification time) of a collection, the items that have no usable id,
        ``stable``: no page saw the total change (only then may absent ids be taken as
        deleted), and the store's clock when the scan began (its first answer's Date)."""
        out: dict[int, datetime | None] = {}
        bad: list[Any] = []
        totals: set[int | None] = set()

        def take(page: Page) -> None:
            # Only the ids are kept, not the pages: memory stays at one int per record.
            totals.add(page.total)
            for item in page.items:
                if isinstance(item, Mapping) and isinstance(item.get("id"), int) and item["id"] > 0:
                    out[item["id"]] = self.source.modified_of(item)
                else:
                    bad.append(item)

        first = await self.client.page(path, params, 1)
        take(first)
        if first.total_pages is None:
            page = first
            while len(page.items) >= self.client.per_page:
                page = await self.client.page(path, params, page.number + 1)
                take(page)
        else:
            numbers = iter(range(2, first.total_pages + 1))

            async def worker() -> None:
                for n in numbers:
                    take(await self.client.page(path, params, n))

            await asyncio.gather(*(worker() for _ in range(self.settings.concurrency)))
        stable = totals == {first.total} and (
            first.total is None or first.total == len(out) + len(bad)
        )
        return out, bad, stable, first.date

    def _commit_in_tx(self, commit: Commit, prepared: Any) -> None:
        with self._writer, self.engine.begin() as conn:
            commit(conn, prepared)

    def _commit_customers(self, conn: Connection, payloads: list[Any]) -> None:
        counts = self.counts["customers"]
        ok: list[int] = []
        people: set[int] = set()
        stated: list[tuple[int, Statement]] = []
        for payload in payloads:
            try:
                if not isinstance(payload, Mapping):
                    raise BadRecord("expected a JSON object")
                row = self.source.parse_customer(payload)
            except BadRecord as exc:
                self._quarantine(conn, "customers", payload, str(exc))
                continue
            if self.source.erased(payload):
                # Before the anonymized record replaces the one that says whose it was.
                request_for_erased(conn, (), source=self.name, customer_id=row.source_id)
            person = resolve_registered(conn, self.name, row.source_id, row.person)
            if self._known is not None:
                self._known.add(row.source_id)
            upsert(
                conn, RECORDS, [{**row.record, "customer_id": person}], keys=("source", "source_id")
            )
            stated += self._statements(person, "customers", payload)
            ok.append(row.source_id)
            people.add(person)
        self._store_statements(conn, stated)
        counts.wrote(ok)
        self._release(conn, "customers", ok)
        # Someone forgotten whose account the source still has is erased again at once.
        scrub_suppressed(conn, people)

    # -- consent ----------------------------------------------------------------------

    def _statements(self, person: int, entity: str, payload: Any) -> list[tuple[int, Statement]]:
        if not isinstance(payload, Mapping):
            return []
        return [
            (person, st) for st in self.source.consent_statements(entity, payload, self.consent)
        ]

    def _store_statements(self, conn: Connection, stated: Sequence[tuple[int, Statement]]) -> None:
        """Store consent statements in the rows' transaction: a record read again replaces
        its statement (one per channel and origin)."""
        if not stated:
            return
        now = utcnow()
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for person, st in stated:
            origin = f"{self.name}:{st.origin}"
            rows[(st.channel, origin)] = {
                "customer_id": person,
                "channel": st.channel,
                "granted": st.granted,
                "stated_at": st.stated_at,
                "source": origin,
                "recorded_at": now,
            }
        upsert(conn, CONSENT_STATEMENTS, list(rows.values()), keys=("channel", "source"))

    def _consent_digest(self) -> str:
        return self.consent.model_dump_json()

    def extract_stored_consent(self) -> int:
        """Read the consent statements of the records already stored (their raw payloads),
        once per consent configuration: after the upgrade that added consent, and after
        ``[consent]`` changes. Records whose raw payload is gone are covered by their next
        re-read. Returns the statements stored."""
        digest = self._consent_digest()
        with self.engine.connect() as conn:
            done = conn.execute(
                select(CONSENT_EXTRACTED.c.config).where(CONSENT_EXTRACTED.c.source == self.name)
            ).scalar()
        if done == digest:
            return 0
        stored = 0
        for table, entity in ((RECORDS, "customers"), (ORDERS, "orders")):
            last = 0
            while True:
                with self.engine.connect() as conn:
                    batch = conn.execute(
                        select(table.c.id, table.c.customer_id, table.c.raw)
                        .where(
                            table.c.source == self.name,
                            table.c.id > last,
                            table.c.customer_id.is_not(None),
                        )
                        .order_by(table.c.id)
                        .limit(FLUSH_ROWS)
                    ).all()
                if not batch:
                    break
                last = batch[-1].id
                stated = [
                    pair for r in batch for pair in self._statements(r.customer_id, entity, r.raw)
                ]
                if stated:
                    with self._writer, self.engine.begin() as conn:
                        self._store_statements(conn, stated)
                stored += len(stated)
        with self._writer, self.engine.begin() as conn:
            upsert(
                conn,
                CONSENT_EXTRACTED,
                [{"source": self.name, "config": digest, "extracted_at": utcnow()}],
                keys=("source",),
            )
        return stored

    def _mark_customers_deleted(self, ids: list[int]) -> None:
        with self._writer, self.engine.begin() as conn:
            # A deleted account is erased here too (WordPress deletes an account that asked
            # to be forgotten): the same flow as `syncd forget`, run by the service.
            for source_id in ids:
                request_for_erased(conn, (), source=self.name, customer_id=source_id)
            conn.execute(
                update(RECORDS)
                .where(RECORDS.c.source == self.name, RECORDS.c.source_id.in_(ids))
                .values(deleted_at=utcnow())
            )
            people = [
                r.customer_id
                for r in conn.execute(
                    select(RECORDS.c.customer_id).where(
                        RECORDS.c.source == self.name, RECORDS.c.source_id.in_(ids)
                    )
                )
            ]
            refresh_people(conn, people)
        self.counts["customers"].deleted += len(ids)

    # -- orders -----------------------------------------------------------------------

    async def _prepare_orders(self, items: list[Any]) -> _OrderBatch:
        """Registered buyers the store does not know yet are fetched first, so an order always
        links to its account (not to a person guessed from the billing email). The orders are
        parsed here, on the event loop, while the store thread writes the page before."""
        cids = {cid for cid in map(self.source.account_of, items) if cid is not None}
        customers: list[Any] = []
        known = self._known_customers()
        unknown = sorted(cids - known)
        if unknown:
            await self._before_network()
            accounts = self._stream_of("customers")
            customers = await self.client.by_ids(accounts.path, unknown, accounts.variants[0][1])
            # Asked once per run: an id the store does not serve goes by email (see commit).
            known.update(unknown)
        return self._parse_orders(items, customers)

    def _parse_orders(self, items: list[Any], customers: list[Any]) -> _OrderBatch:
        batch = _OrderBatch(customers=customers)
        by_id: dict[int, ParsedOrder] = {}
        for payload in items:
            try:
                if not isinstance(payload, Mapping):
                    raise BadRecord("expected a JSON object")
                order = self.source.parse_order(payload)
            except BadRecord as exc:
                batch.bad.append((payload, str(exc)))
                continue
            # One order per id in a page (a page can't repeat one, but be safe for upserts).
            by_id[order.row["source_id"]] = order
        batch.orders = list(by_id.values())
        return batch

    def _known_customers(self) -> set[int]:
        """Account ids the store already links to people (loaded once per run)."""
        if self._known is None:
            with self.engine.connect() as conn:
                self._known = {
                    int(v)
                    for v in conn.execute(
                        select(IDENTITIES.c.value).where(
                            IDENTITIES.c.source == self.name, IDENTITIES.c.kind == "customer_id"
                        )
                    ).scalars()
                }
        return self._known

    def _commit_orders(self, conn: Connection, batch: _OrderBatch) -> None:
        if batch.customers:
            self.counts.setdefault("customers", StreamCounts())
            self._commit_customers(conn, batch.customers)
        counts = self.counts["orders"]
        for payload, reason in batch.bad:
            self._quarantine(conn, "orders", payload, reason)
        parsed = batch.orders
        if not parsed:
            return
        # An order the source's eraser anonymized no longer says whose it was: the request
        # is opened from the stored order, and the order stays with that (soon anonymous)
        # person so totals do not move.
        erased = [o.row["source_id"] for o in parsed if self.source.erased(o.row["raw"])]
        for source_id in erased:
            request_for_erased(conn, (), source=self.name, order_id=source_id)
        kept = (
            dict(
                conn.execute(
                    select(ORDERS.c.source_id, ORDERS.c.customer_id).where(
                        ORDERS.c.source == self.name, ORDERS.c.source_id.in_(erased)
                    )
                ).all()
            )
            if erased
            else {}
        )
        registered = registered_people(
            conn, self.name, [o.customer_source_id for o in parsed if o.customer_source_id]
        )
        # Guests go by email. So do orders of an account the source no longer has (a deleted
        # user): the account id is then linked to that person, so the two stay one.
        by_email = resolve_guests(
            conn,
            self.name,
            [o.person() for o in parsed if o.customer_source_id not in registered],
        )
        rows = []
        for o in parsed:
            cid = o.customer_source_id
            person: int | None
            if o.row["source_id"] in kept:
                person = kept[o.row["source_id"]]
            elif cid and cid in registered:
                person = registered[cid]
            else:
                person = by_email.get(o.row["email"] or "")
                if cid and person is not None:
                    registered[cid] = person
                    link_identity(conn, person, self.name, "customer_id", str(cid))
            rows.append({**o.row, "customer_id": person})
        upsert(conn, ORDERS, rows, keys=("source", "source_id"))
        self._store_statements(
            conn,
            [
                pair
                for row in rows
                if row["customer_id"] is not None
                for pair in self._statements(row["customer_id"], "orders", row.get("raw"))
            ],
        )
        order_ids: dict[int, int] = dict(
            conn.execute(
                _ORDER_IDS, {"source": self.name, "ids": [o.row["source_id"] for o in parsed]}
            ).all()
        )
        # Items are replaced: an edited order can lose lines.
        conn.execute(_DELETE_ITEMS, {"ids": list(order_ids.values())})
        item_rows = [
            {**item, "order_id": order_ids[o.row["source_id"]]} for o in parsed for item in o.items
        ]
        upsert(conn, ITEMS, item_rows, keys=("order_id", "source_id"))
        self._link_refunds(conn, list(order_ids))
        self._release(conn, "orders", list(order_ids))
        counts.wrote(r["source_id"] for r in rows)
        # Someone forgotten whose orders the source still has is erased again at once.
        scrub_suppressed(conn, {r["customer_id"] for r in rows if r["customer_id"] is not None})

    def _link_refunds(self, conn: Connection, order_source_ids: list[int]) -> None:
        """Refunds read before their order get its id and currency (amounts re-read if needed)."""
        if not self._unlinked_refunds:
            return
        rows = conn.execute(
            select(
                REFUNDS.c.id,
                REFUNDS.c.raw,
                REFUNDS.c.currency,
                ORDERS.c.id.label("oid"),
                ORDERS.c.currency.label("oc"),
            )
            .join(
                ORDERS,
                (ORDERS.c.source == REFUNDS.c.source)
                & (ORDERS.c.source_id == REFUNDS.c.order_source_id),
            )
            .where(
                REFUNDS.c.source == self.name,
                REFUNDS.c.order_source_id.in_(order_source_ids),
                (REFUNDS.c.order_id.is_(None))
                | (REFUNDS.c.currency.is_(None))
                | (REFUNDS.c.currency != ORDERS.c.currency),
            )
        ).all()
        for r in rows:
            values: dict[str, Any] = {"order_id": r.oid}
            if r.currency != r.oc:
                fixed = self.source.parse_refund(r.raw, r.oc)
                values.update(currency=r.oc, amount_minor=fixed["amount_minor"])
            conn.execute(update(REFUNDS).where(REFUNDS.c.id == r.id).values(**values))

    # -- refunds, products, coupons ---------------------------------------------------

    def _commit_refunds(self, conn: Connection, items: list[Any]) -> None:
        counts = self.counts["refunds"]
        parents = {self.source.refund_order_of(i) for i in items if isinstance(i, Mapping)}
        currencies = {
            r.source_id: (r.id, r.currency)
            for r in conn.execute(
                select(ORDERS.c.source_id, ORDERS.c.id, ORDERS.c.currency).where(
                    ORDERS.c.source == self.name,
                    ORDERS.c.source_id.in_([p for p in parents if isinstance(p, int)]),
                )
            )
        }
        rows = []
        for payload in items:
            try:
                if not isinstance(payload, Mapping):
                    raise BadRecord("expected a JSON object")
                order = currencies.get(self.source.refund_order_of(payload))
                row = self.source.parse_refund(payload, order[1] if order else self.currency)
                row["order_id"] = order[0] if order else None
                self._unlinked_refunds |= order is None
                rows.append(row)
            except BadRecord as exc:
                self._quarantine(conn, "refunds", payload, str(exc))
        upsert(conn, REFUNDS, rows, keys=("source", "source_id"))
        self._release(conn, "refunds", [r["source_id"] for r in rows])
        counts.wrote(r["source_id"] for r in rows)

    async def _prepare_products(self, items: list[Any]) -> tuple[list[Any], dict[int, list[Any]]]:
        """Variations are read with their variable product (they are rows of ``products`` too)."""
        variations: dict[int, list[Any]] = {}
        for item in items:
            if isinstance(item, Mapping) and self.source.has_variations(item):
                await self._before_network()
                variations[item["id"]] = await self.source.variations(item["id"])
        return items, variations

    def _commit_products(
        self, conn: Connection, prepared: tuple[list[Any], dict[int, list[Any]]]
    ) -> None:
        items, variations = prepared
        counts = self.counts["products"]
        currency = self.currency or "USD"
        rows = []
        for payload in items:
            try:
                if not isinstance(payload, Mapping):
                    raise BadRecord("expected a JSON object")
                rows.append(self.source.parse_product(payload, currency))
                for variation in variations.get(payload["id"], ()):
                    rows.append(
                        self.source.parse_product(
                            variation, currency, parent_source_id=payload["id"]
                        )
                    )
            except BadRecord as exc:
                self._quarantine(conn, "products", payload, str(exc))
        upsert(conn, PRODUCTS, rows, keys=("source", "source_id"))
        self._release(conn, "products", [r["source_id"] for r in rows])
        counts.wrote(r["source_id"] for r in rows)

    def _commit_coupons(self, conn: Connection, items: list[Any]) -> None:
        counts = self.counts["coupons"]
        rows = []
        for payload in items:
            try:
                if not isinstance(payload, Mapping):
                    raise BadRecord("expected a JSON object")
                rows.append(self.source.parse_coupon(payload, self.currency or "USD"))
            except BadRecord as exc:
                self._quarantine(conn, "coupons", payload, str(exc))
        upsert(conn, COUPONS, rows, keys=("source", "source_id"))
        self._release(conn, "coupons", [r["source_id"] for r in rows])
        counts.wrote(r["source_id"] for r in rows)

    async def _store_currency(self) -> str:
        return await self.source.store_currency()

    # -- reconciliation of hard deletes ----------------------------------------------

    def _has_rows(self, entity: str) -> bool:
        table = TABLE_OF_ENTITY[entity]
        with self.engine.connect() as conn:
            return (
                conn.execute(select(table.c.id).where(table.c.source == self.name).limit(1)).first()
                is not None
            )

    def _stamp_reconciled(
        self, stream: str, when: datetime, conn: Connection | None = None
    ) -> None:
        row = {"source": self.name, "stream": stream, "reconciled_at": when, "updated_at": utcnow()}

        def write(c: Connection) -> None:
            upsert(
                c, STATE, [row], keys=("source", "stream"), update=("reconciled_at", "updated_at")
            )

        if conn is not None:
            write(conn)
            return
        with self._writer, self.engine.begin() as own:
            write(own)

    def _reconcile_due(self, stream: str) -> bool:
        if self.full:
            return True
        every = self.settings.reconcile_every_hours
        with self.engine.connect() as conn:
            last = conn.execute(
                select(STATE.c.reconciled_at).where(
                    STATE.c.source == self.name, STATE.c.stream == stream
                )
            ).scalar()
        return last is None or every <= 0 or self.clock() - last >= timedelta(hours=every)

    async def _reconcile(self, stream: Stream) -> None:
        """Rows the source no longer has (force-deleted: invisible to date windows) are marked
        deleted. Only a scan that saw every page with the same total may conclude absence."""
        table = TABLE_OF_ENTITY[stream.entity]
        seen: set[int] = set()
        for _suffix, variant in stream.variants:
            ids, _bad, stable, _began = await self._scan(
                stream.path, self.client.scan_params(variant, ("id",))
            )
            if not stable:
                log.info(
                    "reconciliation skipped: the collection changed while scanned",
                    source=self.name,
                    stream=stream.name,
                )
                return
            seen |= set(ids)
        now = utcnow()

        def work() -> None:
            with self._writer, self.engine.begin() as conn:
                live = conn.execute(
                    select(table.c.source_id).where(
                        table.c.source == self.name, table.c.deleted_at.is_(None)
                    )
                )
                gone = [r.source_id for r in live if r.source_id not in seen]
                if stream.entity == "products":
                    # Variations are not in the products collection: they go with their parent.
                    parents = conn.execute(
                        select(PRODUCTS.c.source_id, PRODUCTS.c.parent_source_id).where(
                            PRODUCTS.c.source == self.name, PRODUCTS.c.parent_source_id.is_not(None)
                        )
                    ).all()
                    gone = [
                        g
                        for g in gone
                        if g not in {p.source_id for p in parents if p.parent_source_id in seen}
                    ]
                if gone:
                    marked, _people = self._mark_deleted(conn, stream.entity, gone, now)
                    self.counts[stream.entity].deleted += marked
                self._stamp_reconciled(stream.name, now, conn)

        await self._in_db_thread(work)

    # -- records that arrive outside a poll (webhook deliveries) -------------------------

    async def apply_payloads(self, stream: str, payloads: Sequence[Any]) -> AppliedBatch:
        """Store full records that arrived outside a poll (webhook deliveries) through the
        handlers a polled page goes through: the same normalization, identity resolution,
        quarantine and upsert, in one transaction.

        Deliveries are not ordered: of several payloads of one record the newest (by
        ``date_modified_gmt``, then arrival) is kept, and one older than the stored row is
        left out (``stale``), so a late delivery never rolls a record back. No cursor moves:
        one record says nothing about the rows around it. A variation's payload refreshes
        its parent product with all its variations, the way a poll reads them. May call
        the store's API, as a poll would: a registered buyer the store has not seen yet,
        a variable product's variations, the store currency before any product is stored.
        """
        stream = self._applied(stream).entity  # counts, handlers and tables go by entity
        self.counts = {stream: StreamCounts()}
        await asyncio.to_thread(self._load_bookkeeping)
        items, stale = await asyncio.to_thread(self._newest_payloads, stream, list(payloads))
        newest = list(items)
        batch = AppliedBatch(stream=stream, counts=self.counts[stream], stale=stale)
        if not items:
            return batch
        prepare: Prepare
        commit: Commit
        if stream == "customers":
            prepare, commit = _no_prepare, self._commit_customers
        else:
            prepare, commit = self._handlers(stream)
        if stream == "orders":
            # Only this batch's buyers matter; a cached set would go stale while polls add
            # accounts in another SourceSync.
            self._known = await asyncio.to_thread(self._known_among, items)
        if stream == "products":
            items = await self._with_variation_parents(items)
        if stream in ("products", "coupons"):
            # Looked up per batch: a poll keeps the stored products in the store's currency.
            self.currency = await self._apply_currency()
        self.counts[stream].saw(items)
        prepared = await prepare(items)
        ids = [i for i in (_id_of(item) for item in items) if _positive_int(i)]
        refunds: list[Any] = []
        refunds_gone: list[int] = []
        if isinstance(prepared, _OrderBatch):
            refunds, refunds_gone = await self._changed_order_refunds(prepared)
        now = utcnow()

        def work() -> set[int]:
            # Read again in turn: the fetches above hold no lock, so a poll may have stored
            # a newer version meanwhile. Then this batch is applied again later, where that
            # payload counts as stale (never a roll-back).
            if self._newest_payloads(stream, newest)[1]:
                raise StaleMeanwhile("a newer version was stored while the delivery was read")
            with self.engine.begin() as conn:
                commit(conn, prepared)
                if refunds or refunds_gone:
                    self._store_order_refunds(conn, refunds, refunds_gone, now)
                return self._people_of(conn, stream, ids)

        # In turn with the other writers (see WriterLock), for the write alone: what a
        # delivery needs from the store's API is fetched before, without the lock.
        async with self._writer.held():
            batch.people = await asyncio.to_thread(work)
        return batch

    async def _changed_order_refunds(self, batch: _OrderBatch) -> tuple[list[Any], list[int]]:
        """For the orders in ``batch`` whose ``refunds`` list names other refunds than the
        store has for them: their refunds as the source has them now, and the ids of the
        stored ones it no longer has.

        A poll reads refunds in a stream of their own; a webhook may have only the order (a
        source whose order update also fires for a refund: see the source's webhooks module).
        Profiles count an order's refund rows, so they are brought in line before the
        delivery counts as applied. Only for a source that syncs refunds at all."""
        if not any(
            s.entity == "refunds" and s.name in self.settings.streams for s in self.streams.values()
        ):
            return [], []
        listed: dict[int, set[int]] = {}
        for order in batch.orders:
            ids = self.source.listed_refunds(order.row["raw"])
            if ids is not None:
                listed[order.row["source_id"]] = ids
        if not listed:
            return [], []

        def stored() -> dict[int, set[int]]:
            found: dict[int, set[int]] = {oid: set() for oid in listed}
            with self.engine.connect() as conn:
                for r in conn.execute(
                    select(REFUNDS.c.order_source_id, REFUNDS.c.source_id).where(
                        REFUNDS.c.source == self.name,
                        REFUNDS.c.order_source_id.in_(list(listed)),
                        REFUNDS.c.deleted_at.is_(None),
                    )
                ):
                    found[r.order_source_id].add(r.source_id)
            return found

        have = await asyncio.to_thread(stored)
        changed = sorted(oid for oid, ids in listed.items() if ids != have[oid])
        fetched = await asyncio.gather(*(self.source.order_refunds(oid) for oid in changed))
        refunds = [r for found in fetched for r in found]
        kept = {_id_of(r) for r in refunds}
        # Only refunds stored before the fetch can be known gone: one a poll stores
        # meanwhile is newer than what was fetched.
        gone = sorted({rid for oid in changed for rid in have[oid]} - kept)
        return refunds, gone

    def _store_order_refunds(
        self, conn: Connection, refunds: list[Any], gone: list[int], now: datetime
    ) -> None:
        """Store refunds fetched for their orders through the polled refunds' commit, and
        mark the ones the source no longer has deleted, as reconciliation marks them."""
        self.counts.setdefault("refunds", StreamCounts())
        if refunds:
            self._commit_refunds(conn, refunds)
        if gone:
            marked, _people = self._mark_deleted(conn, "refunds", gone, now)
            self.counts["refunds"].deleted += marked

    async def apply_deletions(self, stream: str, ids: Sequence[int]) -> AppliedBatch:
        """Apply records the source reports deleted (a webhook's ``{"id": N}``).

        A stream with a ``deleted_variant`` (a trash): a source may report a record deleted
        when it is trashed, and still serve it there (WooCommerce's ``*.deleted`` webhooks fire
        on trash). So each is read back the way a poll reads it, in that variant
        first, then among the live records (restored since: a PUT of a status restores an
        order with no webhook of its own), and stored through ``apply_payloads``: the row a
        poll of the trash gives (status ``trash``, ``deleted_at`` at the trashing). Records
        the source no longer has at all (deleted for good since; customers, whose webhook
        fires on the account's deletion) are marked the way id reconciliation marks the ones
        it finds missing: kept for history with ``deleted_at`` set (a row already marked keeps
        its first), the people they belonged to refreshed, a product's variations along.
        """
        source = self._applied(stream)
        wanted = sorted({i for i in ids if _positive_int(i)})
        found: list[Any] = []
        if wanted and source.deleted_variant is not None:  # a stream with a trash of its own
            missing = list(wanted)
            trash_first = sorted(source.variants, key=lambda v: v[0] != source.deleted_variant)
            for _suffix, variant in trash_first:
                if missing:
                    got = await self.client.by_ids(source.path, missing, variant)
                    found += got
                    missing = sorted(set(missing) - {_id_of(r) for r in got})
        stream = source.entity
        batch = (
            await self.apply_payloads(source.name, found)
            if found
            else AppliedBatch(stream=stream, counts=StreamCounts())
        )
        gone = sorted(set(wanted) - {_id_of(r) for r in found})
        if not gone:
            return batch
        now = utcnow()

        def work() -> tuple[int, set[int]]:
            with self.engine.begin() as conn:
                return self._mark_deleted(conn, stream, gone, now)

        async with self._writer.held():  # for the write alone (see apply_payloads)
            marked, people = await asyncio.to_thread(work)
        batch.counts.deleted += marked
        batch.people |= people
        return batch

    def _stream_of(self, entity: str) -> Stream:
        """The stream whose rows land in ``entity`` (accounts, for an order's buyer)."""
        return next(s for s in self.streams.values() if s.entity == entity)

    def _applied(self, stream: str) -> Stream:
        """The declaration of a stream whose records arrive outside a poll."""
        if stream not in self.streams:
            raise ValueError(f"unknown stream {stream!r}: expected one of {tuple(self.streams)}")
        return self.streams[stream]

    def _mark_deleted(
        self, conn: Connection, stream: str, ids: Sequence[int], now: datetime
    ) -> tuple[int, set[int]]:
        """Mark this source's rows with these ids deleted: kept for history with
        ``deleted_at`` set (a row already marked keeps its first), a product's variations
        along with it, and the people they belonged to refreshed. Returns how many rows
        were marked, and those people."""
        table = TABLE_OF_ENTITY[stream]
        match: ColumnElement[bool] = table.c.source_id.in_(ids)
        if stream == "products":
            match = match | PRODUCTS.c.parent_source_id.in_(ids)
        people: set[int] = set()
        if "customer_id" in table.c:
            people = {
                int(p)
                for p in conn.execute(
                    select(table.c.customer_id).where(
                        table.c.source == self.name, match, table.c.customer_id.is_not(None)
                    )
                ).scalars()
            }
        result = conn.execute(
            update(table)
            .where(table.c.source == self.name, match, table.c.deleted_at.is_(None))
            .values(deleted_at=now)
        )
        if people:
            refresh_people(conn, people)
        return max(result.rowcount, 0), people

    def _newest_payloads(self, stream: str, payloads: list[Any]) -> tuple[list[Any], int]:
        """The newest payload per record, minus those older than the stored row; payloads
        without a usable id pass through (the commit handler quarantines them)."""
        keyed: dict[int, Any] = {}
        loose: list[Any] = []
        for payload in payloads:
            pid = _id_of(payload)
            if not _positive_int(pid):
                loose.append(payload)
                continue
            previous = keyed.get(pid)
            if previous is None or not self._older(payload, previous):
                keyed[pid] = payload
        table = TABLE_OF_ENTITY[stream]
        stale = len(payloads) - len(loose) - len(keyed)
        if not keyed or "modified_at" not in table.c:
            return [*keyed.values(), *loose], stale
        with self.engine.connect() as conn:
            stored: dict[int, datetime | None] = {
                r.source_id: r.modified_at
                for r in conn.execute(
                    select(table.c.source_id, table.c.modified_at).where(
                        table.c.source == self.name, table.c.source_id.in_(list(keyed))
                    )
                )
            }
        fresh = []
        for pid, payload in keyed.items():
            modified, current = self.source.modified_of(payload), stored.get(pid)
            if modified is not None and current is not None and modified < current:
                stale += 1
                continue
            fresh.append(payload)
        return [*fresh, *loose], stale

    def _known_among(self, orders: list[Any]) -> set[int]:
        """Which of these orders' account ids the store already links to people."""
        wanted = {str(cid) for cid in map(self.source.account_of, orders) if _positive_int(cid)}
        if not wanted:
            return set()
        with self.engine.connect() as conn:
            return {
                int(v)
                for v in conn.execute(
                    select(IDENTITIES.c.value).where(
                        IDENTITIES.c.source == self.name,
                        IDENTITIES.c.kind == "customer_id",
                        IDENTITIES.c.value.in_(sorted(wanted)),
                    )
                ).scalars()
            }

    async def _with_variation_parents(self, items: list[Any]) -> list[Any]:
        """Variations are stored with their parent (``parent_source_id``), which a poll reads
        together: a variation's payload is replaced by its parent product, whose variations
        ``_prepare_products`` then reads."""
        present = {_id_of(i) for i in items}
        of = {id(i): self.source.variation_parent(i) for i in items}
        parents = sorted({p for p in of.values() if p is not None} - present)
        kept = [i for i in items if of[id(i)] is None]
        if parents:
            # A parent in the trash is not listed: polling sees its variations go with it.
            kept += await self.client.by_ids(self._stream_of("products").path, parents)
        return kept

    async def _apply_currency(self) -> str:
        """The store currency for product and coupon amounts: the stored products' (a poll
        writes them in it), else asked from the store as a poll would."""

        def stored() -> str | None:
            with self.engine.connect() as conn:
                code: str | None = conn.execute(
                    select(PRODUCTS.c.currency)
                    .where(PRODUCTS.c.source == self.name, PRODUCTS.c.currency.is_not(None))
                    .order_by(PRODUCTS.c.id.desc())
                    .limit(1)
                ).scalar()
            return code

        return await asyncio.to_thread(stored) or await self._store_currency()

    def _max_modified(self, items: Sequence[Any]) -> datetime | None:
        modified = self.source.modified_of
        stamps = [
            m for m in (modified(i) for i in items if isinstance(i, Mapping)) if m is not None
        ]
        return max(stamps) if stamps else None

    def _older(self, a: Any, b: Any) -> bool:
        """``a`` was modified before ``b`` (both payloads of one record); unknown is not older."""
        ma = self.source.modified_of(a) if isinstance(a, Mapping) else None
        mb = self.source.modified_of(b) if isinstance(b, Mapping) else None
        return ma is not None and mb is not None and ma < mb

    def _people_of(self, conn: Connection, stream: str, ids: list[int]) -> set[int]:
        if not ids or stream not in ("orders", "customers"):
            return set()
        table = ORDERS if stream == "orders" else RECORDS
        return {
            int(p)
            for p in conn.execute(
                select(table.c.customer_id).where(
                    table.c.source == self.name,
                    table.c.source_id.in_(ids),
                    table.c.customer_id.is_not(None),
                )
            ).scalars()
        }


class StaleMeanwhile(Exception):
    """A webhook batch read while a poll stored a newer version of one of its records."""


class _PageWriter:
    """Pages written in one transaction until flushed: rows and their cursor commit together,
    so a crash loses only uncommitted pages, which the next run reads again."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.rows = 0
        self._writer = writer_lock(engine)
        self._conn: Connection | None = None
        self._trans: Any = None
        self._opened = 0.0

    def connection(self) -> Connection:
        """The open transaction, begun in turn with the other writers (see WriterLock): the
        lock is held until flush() or abort(), so the caller commits before it waits on the
        network."""
        if self._conn is None:
            self._writer.__enter__()
            try:
                self._conn = self.engine.connect()
                self._trans = self._conn.begin()
            except BaseException:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
                self._writer.__exit__()
                raise
            self._opened = time.monotonic()
        return self._conn

    def due(self) -> bool:
        """Time to commit: enough rows, or the transaction has been open long enough."""
        return self._conn is not None and (
            self.rows >= FLUSH_ROWS or time.monotonic() - self._opened >= FLUSH_SECONDS
        )

    def flush(self) -> None:
        self._end(commit=True)

    def abort(self) -> None:
        """Roll back what was not flushed (a failure mid-window); a no-op after flush()."""
        self._end(commit=False)

    def _end(self, commit: bool) -> None:
        if self._conn is not None:
            try:
                if commit:
                    self._trans.commit()
                else:
                    self._trans.rollback()
            finally:
                self._conn.close()
                self._conn = self._trans = None
                self._writer.__exit__()
        self.rows = 0


async def _no_prepare(items: list[Any]) -> list[Any]:
    return items


def _id_of(item: Any) -> Any:
    return item.get("id") if isinstance(item, Mapping) else None


def _take_ids(items: Sequence[Any], seen: set[int]) -> bool:
    """Add a page's ids to ``seen``; whether one was there already (records without a
    usable id cannot repeat: they are quarantined by content)."""
    repeated = False
    for item in items:
        pid = _id_of(item)
        if _positive_int(pid):
            repeated = repeated or pid in seen
            seen.add(pid)
    return repeated


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
