"""Webhooks from sources: verify, store and answer at once; apply off the request.

Which requests are deliveries, how they are signed and which stream a payload goes through
is the source's (``Source.webhooks``, e.g. :mod:`syncd.sources.woocommerce.webhooks`); this
module is the intake every source shares. Deliveries are de-duplicated on the delivery id
*and* a digest of the body (see ``Event`` in the models): a source's delivery id need not
be unique on its own (WooCommerce's is not).

The request path only verifies, validates and stores (through ``syncd.sources.inbox``: group
commit, and on SQLite a journal beside the store, so a job holding the store's writer never
delays an answer) before answering 200, so the store sees an answer in milliseconds; a
worker task applies stored deliveries through
``SourceSync.apply_payloads``/``apply_deletions`` (the polling code path) and then reports
the people whose records changed to ``on_applied`` (the daemon's recompute trigger).
Applying may read the store's API as a poll would (an order's refunds when its ``refunds``
list changed; a trashed record, which ``*.deleted`` only names): when that fails, the
delivery stays pending and is retried. Deliveries still pending when the process stops
are applied on the next ``start()``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import sqlite3
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Engine, select, update
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from syncd.config import Settings, SourceSettings
from syncd.ingest import AppliedBatch, SourceSync
from syncd.log import get_logger
from syncd.sources import source_class
from syncd.sources.base import WebhookSpec
from syncd.sources.inbox import Unstorable, open_inbox, quarantine_delivery
from syncd.store.engine import writer_lock
from syncd.store.models import EVENTS
from syncd.store.types import payload_problem

log = get_logger("syncd.webhooks")

MAX_BODY_BYTES = 8 * 1024 * 1024  # an order with hundreds of lines is a few hundred KB
# Bytes of webhook bodies held at once across all requests in flight: a body is kept until
# its signature is known (at its end), so this bounds what unsigned senders can make the
# process hold. A request that would go over it gets 503 and the store's poll covers it.
MAX_BUFFERED_BYTES = 64 * 1024 * 1024
PING_MAX_BYTES = 64  # a ping's body is short (WooCommerce's is "webhook_id=N")
REJECT_LOG_EVERY = 10.0  # seconds between two log lines of one kind of rejection
MAX_DELIVERY_ID = 128  # the longest delivery id kept (WooCommerce's is 32 hex characters)
BATCH_EVENTS = 200  # deliveries applied per transaction when they arrive faster than applied
MAX_ATTEMPTS = 8  # a delivery failing this often is marked failed (polling still covers it)
RETRY_BASE_SECONDS = 2.0
RETRY_MAX_SECONDS = 300.0
LAG_SAMPLES = 4096
# The webhook's own store client fails fast: the worker retries a delivery later by itself,
# and must not sit in the HTTP layer's long backoff while other deliveries wait.
APPLY_MAX_ATTEMPTS = 3
APPLY_MAX_RETRY_SECONDS = 15.0

_ARRIVED = 0  # queued for a journal inbox: move what it holds (events ids are positive)
# A delivery past the store's limits (syncd.store.types.payload_problem): the rejection
# reason and status. 422, not 400: the body is signed, valid JSON, just past what the store
# keeps; 413 for one too large, as for a body over the cap.
_REFUSALS = {
    "too_deep": ("too_deep", 422),
    "too_large": ("too_large", 413),
    "nul": ("malformed", 400),
}

OnApplied = Callable[[str, set[int]], Awaitable[None]]


@dataclass
class WebhookStats:
    """Counters for metrics and tests (updated on the event loop only)."""

    received: int = 0  # signed, valid deliveries stored
    duplicates: int = 0  # the same delivery again: answered 200, not stored again
    pings: int = 0
    rejected: Counter[str] = field(default_factory=Counter)  # by reason (see _reject calls)
    applied: int = 0  # deliveries applied to the store
    stale: int = 0  # applied deliveries whose payload was older than the stored row
    failed: int = 0  # deliveries given up after MAX_ATTEMPTS
    quarantined: int = 0  # signed deliveries the store cannot keep: refused, quarantined
    retries: int = 0  # failed attempts scheduled again
    # (source, outcome) -> count; outcome: received | duplicate | ping | rejected | applied |
    # failed. Only configured sources appear: an unknown path segment is not a label.
    by_source: Counter[tuple[str, str]] = field(default_factory=Counter)
    # (source, seconds from receipt to applied), newest last; drain with drain_lag().
    lag: deque[tuple[str, float]] = field(default_factory=lambda: deque(maxlen=LAG_SAMPLES))

    def drain_lag(self) -> list[tuple[str, float]]:
        """The lag samples since the last drain (each is observed once by the metrics)."""
        samples = list(self.lag)
        self.lag.clear()
        return samples


@dataclass(frozen=True)
class _Pending:
    id: int
    source: str
    resource: str
    event: str
    payload: Any
    received_at: datetime
    attempts: int
    stream: str
    deleted: bool


class _TooLarge(Exception):
    pass


class _Busy(Exception):
    """The bytes buffered across requests would exceed MAX_BUFFERED_BYTES."""


class _Budget:
    """Bytes of request bodies held across requests (event loop only)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.peak = 0  # the most ever held at once: for tests and the benchmark
        self.total = 0  # every byte ever taken (read from a client)

    def take(self, size: int) -> bool:
        if self.held + size > self.limit:
            return False
        self.held += size
        self.total += size
        self.peak = max(self.peak, self.held)
        return True

    def give(self, size: int) -> None:
        self.held -= size


class WebhookIntake:
    """``POST /webhooks/{source}``: the webhook receiver and its apply worker."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        on_applied: OnApplied | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.on_applied = on_applied
        self.stats = WebhookStats()
        # Only sources with a webhook secret take webhooks: an unsigned delivery is never
        # accepted, so a source without one has no endpoint.
        self._secrets: dict[str, bytes] = {
            name: src.webhook_secret.get_secret_value().encode()
            for name, src in settings.sources.items()
            if src.webhook_secret is not None and src.webhook_secret.get_secret_value()
        }
        # What each source's deliveries look like (a source type without webhooks takes none).
        self._specs: dict[str, WebhookSpec] = {}
        for name, src in settings.sources.items():
            spec = source_class(src.type).webhooks
            if spec is not None:
                self._specs[name] = spec
            else:
                self._secrets.pop(name, None)
        self.inbox = open_inbox(engine, self._stream_of)
        self._syncs: dict[str, SourceSync] = {}
        self._queue: asyncio.Queue[int | None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._retries: dict[int, asyncio.TimerHandle] = {}  # event id -> its retry timer
        self._accepting = False  # the worker runs: new deliveries are queued at once
        self._stopping = False
        self.buffered = _Budget(MAX_BUFFERED_BYTES)
        self.max_requests = settings.server.max_webhook_requests
        self.in_flight = 0  # signed requests being read or answered
        self._reject_logged: dict[tuple[str | None, str], float] = {}
        self._reject_skipped: Counter[tuple[str | None, str]] = Counter()

    def _stream_of(self, source: str, resource: str) -> str:
        spec = self._specs.get(source)
        stream = spec.stream_of(resource) if spec is not None else None
        return stream or resource

    @property
    def backlog(self) -> int:
        """Deliveries stored but not applied yet, as far as this process knows (a gauge)."""
        queued = self._queue.qsize() if self._queue is not None else 0
        return self.inbox.unmoved if self.inbox.journal else queued

    # -- the request --------------------------------------------------------------------

    async def endpoint(self, request: Request) -> Response:
        received_at = datetime.now(UTC)
        source = str(request.path_params.get("source", ""))
        secret = self._secrets.get(source)
        if secret is None:
            return self._reject(
                None, "unknown_source", 404, "no source with this name takes webhooks"
            )
        headers = request.headers
        spec = self._specs[source]
        signature = headers.get(spec.signature_header)
        if signature is None:
            # Only the source's ping comes unsigned; anything else is refused before its
            # body is read.
            if spec.is_ping_request(headers):
                try:
                    ping = await _read_body(request, PING_MAX_BYTES, mac=None, budget=self.buffered)
                except (_TooLarge, ClientDisconnect):
                    ping = b""
                self.buffered.give(len(ping))
                if spec.is_ping_body(ping):
                    # The source needs exactly 200 here (WooCommerce does). Nothing is stored.
                    self.stats.pings += 1
                    self.stats.by_source[(source, "ping")] += 1
                    log.info("webhook ping", source=source, webhook=ping.strip().decode())
                    return JSONResponse({"status": "ok"}, status_code=200)
            return self._reject(
                source, "unsigned", 401, f"{spec.signature_header} is missing", spec=spec
            )
        if self.in_flight >= self.max_requests:
            return self._reject(
                source, "busy", 503, f"{self.max_requests} deliveries are being read already"
            )
        self.in_flight += 1
        body = b""
        try:
            # The signature is checked as the body streams in (it covers the raw body).
            mac = hmac.new(secret, digestmod=spec.digest)
            try:
                body = await _read_body(request, MAX_BODY_BYTES, mac=mac, budget=self.buffered)
            except _TooLarge:
                return self._reject(source, "too_large", 413, f"body over {MAX_BODY_BYTES} bytes")
            except _Busy:
                return self._reject(source, "busy", 503, "too many bodies are being read")
            except ClientDisconnect:
                return self._reject(source, "disconnected", 400, "the client went away")
            if not spec.signature_matches(mac, signature):
                return self._reject(
                    source, "bad_signature", 401, "the signature does not match", spec=spec
                )
            return await self._signed(request, source, spec, body, received_at)
        finally:
            self.buffered.give(len(body))
            self.in_flight -= 1

    async def _signed(
        self, request: Request, source: str, spec: WebhookSpec, body: bytes, received_at: datetime
    ) -> Response:
        """A delivery whose signature matched: validate it, store it, answer."""
        headers = request.headers
        # Signed by the store from here on; headers are not signed, so they are checked too.
        topic = spec.topic(headers)
        if topic is None:
            return self._reject(
                source, "unknown_topic", 400, "expected a topic among " + ", ".join(spec.topics())
            )
        resource, event = topic
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            return self._reject(source, "malformed", 400, "the body is not valid JSON")
        if spec.record_id(payload, deleted=spec.is_deletion(event)) is None:
            return self._reject(
                source, "malformed", 400, 'expected a JSON object with a positive integer "id"'
            )
        digest = hashlib.sha256(body).hexdigest()
        delivery_id = spec.delivery_id(headers) or f"sha256:{digest[:48]}"
        if len(delivery_id) > MAX_DELIVERY_ID:
            return self._reject(source, "malformed", 400, f"{spec.delivery_id_header} is too long")
        row = {
            "source": source,
            "delivery_id": delivery_id,
            "body_sha256": digest,
            "topic": f"{resource}.{event}",
            "resource": resource,
            "event": event,
            "webhook_id": spec.webhook_id(headers),
            "received_at": received_at,
            "payload": payload,
            "body": body,
        }
        # The store's limits (depth, size, NUL), checked once before anything is written: a
        # delivery past them would fail the shared write of its neighbours, or stop the
        # journal's moves. It is quarantined alone and refused.
        problem = payload_problem(payload, body)
        if problem is not None:
            reason, status = _REFUSALS[problem.kind]
            return await self._refuse(row, reason, status, str(problem))
        try:
            number = await self.inbox.put(row)
        except Unstorable as exc:  # the store refused this one; its neighbours are stored
            return await self._refuse(row, "unstorable", 422, str(exc))
        except (SQLAlchemyError, sqlite3.Error):
            log.exception("webhook delivery could not be stored", source=source)
            return self._reject(source, "store_unavailable", 503, "the store is unavailable")
        if number is None:
            self.stats.duplicates += 1
            self.stats.by_source[(source, "duplicate")] += 1
            return JSONResponse({"status": "duplicate"}, status_code=200)
        self.stats.received += 1
        self.stats.by_source[(source, "received")] += 1
        if self._accepting and self._queue is not None:
            # A journal's number is not an events id: the worker moves the journal first.
            self._queue.put_nowait(_ARRIVED if self.inbox.journal else number)
        return JSONResponse({"status": "accepted"}, status_code=200)

    async def _refuse(
        self, row: dict[str, Any], reason: str, status: int, message: str
    ) -> Response:
        """Refuse a signed delivery the store cannot keep, once it is in the quarantine
        with the reason (WooCommerce never sends it again: the quarantine is its record)."""
        try:
            await asyncio.to_thread(self._quarantine, row, message)
        except (SQLAlchemyError, sqlite3.Error):
            log.exception("webhook delivery could not be quarantined", source=row["source"])
            return self._reject(row["source"], "store_unavailable", 503, "the store is unavailable")
        self.stats.quarantined += 1
        return self._reject(row["source"], reason, status, f"not stored: {message}")

    def _quarantine(self, row: dict[str, Any], reason: str) -> None:
        # In turn with the jobs (see WriterLock), as _mark.
        with writer_lock(self.engine), self.engine.begin() as conn:
            quarantine_delivery(conn, row, reason, self._stream_of)

    def _reject(
        self,
        source: str | None,
        reason: str,
        status: int,
        message: str,
        *,
        spec: WebhookSpec | None = None,
    ) -> Response:
        self.stats.rejected[reason] += 1
        if source is not None:
            self.stats.by_source[(source, "rejected")] += 1
        # One line per (source, reason) per REJECT_LOG_EVERY seconds, with how many were
        # left out: a flood of forged requests must not become a flood of log lines.
        now = time.monotonic()
        key = (source, reason)
        if now - self._reject_logged.get(key, float("-inf")) >= REJECT_LOG_EVERY:
            self._reject_logged[key] = now
            log.warning(
                "webhook delivery rejected",
                source=source,
                reason=reason,
                status=status,
                not_logged=self._reject_skipped.pop(key, 0),
            )
        else:
            self._reject_skipped[key] += 1
        # Close the connection: the rest of an unread body is not worth reading.
        headers = {"Connection": "close"}
        if status == 401 and spec is not None:
            headers["WWW-Authenticate"] = (
                f'HMAC-{spec.digest.upper()} header="{spec.signature_header}"'
            )
        if status == 503:
            headers["Retry-After"] = "5"
        return JSONResponse(
            {"error": reason, "message": message}, status_code=status, headers=headers
        )

    # -- the worker ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start applying: first whatever an earlier process left pending, then new ones."""
        if self._task is not None:
            return
        self._queue = asyncio.Queue()
        self._stopping = False
        # Accept before reading the backlog, so a delivery stored in between is not missed
        # (one queued twice is applied once: the worker only takes pending rows).
        self._accepting = True
        for event_id in await asyncio.to_thread(self._pending_ids):
            self._queue.put_nowait(event_id)
        if self.inbox.journal:
            self._queue.put_nowait(_ARRIVED)  # what the journal holds from before
        self._task = asyncio.create_task(self._work(), name="syncd-webhooks")

    async def stop(self, timeout: float) -> None:
        """Stop taking work; let the batch in flight finish within ``timeout`` seconds, else
        abandon it. Whatever is not applied stays pending in the store for the next start."""
        self._accepting = False
        self._stopping = True
        for handle in self._retries.values():
            handle.cancel()
        self._retries.clear()
        task, self._task = self._task, None
        if task is not None and self._queue is not None:
            self._queue.put_nowait(None)  # wakes the worker if it waits for work
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout)
            except TimeoutError:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
        syncs, self._syncs = self._syncs, {}
        for sync in syncs.values():
            await sync.client.aclose()

    def close(self) -> None:
        """Release the inbox, once nothing is received any more (after the HTTP side)."""
        self.inbox.close()

    def _pending_ids(self) -> list[int]:
        with self.engine.connect() as conn:
            return [
                int(i)
                for i in conn.execute(
                    select(EVENTS.c.id)
                    .where(EVENTS.c.status == "pending", EVENTS.c.source.in_(list(self._secrets)))
                    .order_by(EVENTS.c.id)
                ).scalars()
            ]

    async def _work(self) -> None:
        assert self._queue is not None
        queue = self._queue
        while not self._stopping:
            items = [await queue.get()]
            while len(items) < BATCH_EVENTS and not queue.empty():
                items.append(queue.get_nowait())
            ids = [i for i in items if i]  # None wakes the worker to stop
            try:
                if _ARRIVED in items:
                    ids += await self._take()
                if ids:
                    await self._apply_ids(ids)
            except Exception:  # the worker must outlive any one batch
                log.exception("applying webhook deliveries failed")

    async def _take(self) -> list[int]:
        """Move a batch from the journal into events; ask for another if more are left."""
        async with writer_lock(self.engine).held():
            ids, duplicates = await asyncio.to_thread(self.inbox.take, BATCH_EVENTS)
        if duplicates:
            self.stats.duplicates += duplicates
        if self.inbox.unmoved and self._queue is not None:
            self._queue.put_nowait(_ARRIVED)
        return ids

    async def _apply_ids(self, ids: Sequence[int]) -> None:
        rows = await asyncio.to_thread(self._load, sorted(set(ids)))
        # Runs of one source and stream keep the arrival order between kinds (an update,
        # then a deletion, then a restore of one order) and batch the common case.
        for _key, group in itertools.groupby(rows, key=lambda r: (r.source, r.stream, r.deleted)):
            if self._stopping:
                return
            await self._apply_group(list(group))

    def _load(self, ids: list[int]) -> list[_Pending]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    EVENTS.c.id,
                    EVENTS.c.source,
                    EVENTS.c.resource,
                    EVENTS.c.event,
                    EVENTS.c.payload,
                    EVENTS.c.received_at,
                    EVENTS.c.attempts,
                )
                .where(EVENTS.c.id.in_(ids), EVENTS.c.status == "pending")
                .order_by(EVENTS.c.id)
            ).all()
        pending = []
        for r in rows:
            spec = self._specs.get(r.source)
            stream = spec.stream_of(r.resource) if spec is not None else None
            if spec is None or stream is None:
                continue  # not a source or resource this intake applies: left pending
            deleted = spec.is_deletion(r.event)
            pending.append(
                _Pending(
                    r.id,
                    r.source,
                    r.resource,
                    r.event,
                    r.payload,
                    r.received_at,
                    r.attempts,
                    stream,
                    deleted,
                )
            )
        return pending

    async def _apply_group(self, group: list[_Pending]) -> None:
        head = group[0]
        source, stream = head.source, head.stream
        settings = self.settings.sources.get(source)
        if settings is None:
            return  # the source left the config: its deliveries stay pending
        if stream not in settings.streams:
            # The source does not sync this stream: nothing to store, nothing to retry.
            await asyncio.to_thread(
                self._mark, [p.id for p in group], "applied", f"skipped: {source} syncs no {stream}"
            )
            return
        try:
            sync = self._sync_for(source, settings)
            result: AppliedBatch
            # SourceSync takes its turn with the jobs on SQLite (one writer: see WriterLock)
            # for each write, not while it asks the store's API.
            if head.deleted:
                spec = self._specs[source]
                ids = [spec.record_id(p.payload, deleted=True) for p in group]
                result = await sync.apply_deletions(stream, [i for i in ids if i is not None])
            else:
                result = await sync.apply_payloads(stream, [p.payload for p in group])
            applied_at = datetime.now(UTC)
            await asyncio.to_thread(self._mark, [p.id for p in group], "applied", None, applied_at)
        except Exception as exc:
            if len(group) > 1:
                # One at a time: a delivery that cannot be applied must not hold back the rest.
                for one in group:
                    await self._apply_group([one])
                return
            await self._failed(head, exc)
            return
        self.stats.applied += len(group)
        self.stats.stale += result.stale
        self.stats.by_source[(source, "applied")] += len(group)
        for p in group:
            self.stats.lag.append((source, max(0.0, (applied_at - p.received_at).total_seconds())))
        if result.people and self.on_applied is not None:
            try:
                await self.on_applied(source, set(result.people))
            except Exception:
                log.exception("the webhook change notification failed", source=source)

    def _sync_for(self, source: str, settings: SourceSettings) -> SourceSync:
        sync = self._syncs.get(source)
        if sync is None:
            fast = settings.model_copy(
                update={
                    "max_attempts": min(settings.max_attempts, APPLY_MAX_ATTEMPTS),
                    "max_retry_seconds": min(settings.max_retry_seconds, APPLY_MAX_RETRY_SECONDS),
                }
            )
            sync = self._syncs[source] = SourceSync(
                self.engine, source, fast, consent=self.settings.consent
            )
        return sync

    async def _failed(self, pending: _Pending, exc: Exception) -> None:
        attempts = pending.attempts + 1
        error = f"{type(exc).__name__}: {exc}"[:2000]
        final = attempts >= MAX_ATTEMPTS
        log.warning(
            "webhook delivery not applied",
            source=pending.source,
            event_id=pending.id,
            attempts=attempts,
            final=final,
            error=error,
        )
        try:
            await asyncio.to_thread(
                self._mark, [pending.id], "failed" if final else "pending", error, None, attempts
            )
        except SQLAlchemyError:
            log.exception("cannot record the failed webhook delivery", event_id=pending.id)
        if final:
            self.stats.failed += 1
            self.stats.by_source[(pending.source, "failed")] += 1
            return
        self.stats.retries += 1
        delay = min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** (attempts - 1))
        loop = asyncio.get_running_loop()
        self._retries[pending.id] = loop.call_later(delay, self._requeue, pending.id)

    def _requeue(self, event_id: int) -> None:
        self._retries.pop(event_id, None)
        if self._accepting and self._queue is not None:
            self._queue.put_nowait(event_id)

    def _mark(
        self,
        ids: list[int],
        status: str,
        error: str | None,
        applied_at: datetime | None = None,
        attempts: int | None = None,
    ) -> None:
        values: dict[str, Any] = {"status": status, "error": error}
        if status == "applied":
            values["applied_at"] = applied_at or datetime.now(UTC)
        if attempts is not None:
            values["attempts"] = attempts
        # In turn with the jobs (see WriterLock): never inside a held writer lock.
        with writer_lock(self.engine), self.engine.begin() as conn:
            conn.execute(update(EVENTS).where(EVENTS.c.id.in_(ids)).values(**values))


# -- request helpers ------------------------------------------------------------------


async def _read_body(request: Request, limit: int, *, mac: Any, budget: _Budget) -> bytes:
    """At most ``limit`` bytes of body, each chunk fed to ``mac`` (when given) and counted
    against ``budget``; on success the caller gives ``len(body)`` back to the budget."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLarge  # refused before a byte of it is read
    chunks: list[bytes] = []
    held = 0
    try:
        async for chunk in request.stream():
            if held + len(chunk) > limit:
                raise _TooLarge
            if not budget.take(len(chunk)):
                raise _Busy
            held += len(chunk)
            if mac is not None:
                mac.update(chunk)
            chunks.append(chunk)
        body = b"".join(chunks)
    except BaseException:
        budget.give(held)
        raise
    return body
