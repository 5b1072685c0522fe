"""The push engine (reverse ETL), shared by every destination: diff, send, record.

One pass over a sync's rows (a segment's members, or a SQL model: see
``syncd.push.rows``) compares each row's content hash with ``sync_records``:

* new keys are added, changed ones updated, unchanged ones skipped without mapping;
* rows the destination refused are tried again once their wait is over (by default 1 h,
  6 h, then 24 h after the 1st, 2nd, 3rd refusal); refused on the last try, a row is given
  up: counted in ``given_up`` (and by ``syncd status``, alerts and metrics) until its
  content changes or ``syncd push --retry-failed`` sends it again;
* rows that cannot be sent (no email for an email-keyed list) are skipped with the
  adapter's reason and never sent to fail;
* in mirror mode, records the destination holds whose key left the segment are removed.

Rows to send are mapped and go out in batches of the destination's largest allowed
size, a few batches in flight within the service's concurrency. Each batch's outcomes
are committed as soon as they are known, so a crash loses at most the batches in
flight, which the next run sends again (events keep their idempotency key, so a
destination that deduplicates never triggers twice). A batch the vendor refuses as a
whole is split in halves until the bad rows are alone, unless both halves and a single
row are refused whole for the same reason: that is the batch's content failing as one (a
mapping error), and the sync fails with the reason instead of sending each row alone.
A run where every row sent was refused fails too.

An unchanged row is known unchanged by its content hash without being mapped, which
keeps a no-change run over a million members cheap.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final, NamedTuple, TypeVar, cast

import structlog
from sqlalchemy import Connection, Engine, delete, insert, select

from syncd.destinations.base import (
    BatchRejected,
    Destination,
    Item,
    MatchReport,
    Op,
    Outcome,
    ReplaceRestart,
)
from syncd.mapping import (
    LEGACY_COLUMNS,
    PERSON_COLUMNS,
    PII_COLUMNS,
    LoadedMapping,
    LoadedSync,
    SyncSpec,
    nest,
)
from syncd.privacy import SuppressionList
from syncd.push.rows import (
    READ_CHUNK,
    ModelRows,
    PushError,
    RowSource,
    SegmentRows,
    consent_unread,
    driver_batches,
    quote,
)
from syncd.runs import finish_run, start_run, utc_now
from syncd.store.engine import writer_lock
from syncd.store.models import CUSTOMERS, PROFILES, SYNC_RECORDS, SYNC_STATE
from syncd.store.upsert import upsert

__all__ = [
    "PushCounts",
    "PushResult",
    "masked_payload",
    "preflight",
    "push",
    "push_sync",
    "select_syncs",
]

log = structlog.get_logger("syncd.push")

RECORDS = SYNC_RECORDS
STATE = SYNC_STATE
_T = TypeVar("_T")
_KEY_CHUNK: Final = 500
_SAMPLES: Final = 3
# Why a row of someone who asked to be forgotten is not sent.
FORGOTTEN: Final = "forgotten (a privacy request)"
# Columns written for an accepted record / a refused or skipped one (the latter keeps
# in_destination, dest_id and sent_at as they were: the destination's copy is unchanged).
_ACCEPTED_UPDATE: Final = (
    "content_hash",
    "status",
    "in_destination",
    "dest_id",
    "attempts",
    "error",
    "sent_at",
    "updated_at",
    "retry_after",
)
_REFUSED_UPDATE: Final = (
    "content_hash",
    "status",
    "attempts",
    "error",
    "updated_at",
    "retry_after",
)
# What a row of the sync's rows becomes, by mode (mirror removals are planned apart).
_SEND_OP: Final[dict[str, Op]] = {
    "upsert": "upsert",
    "mirror": "add",
    "event": "event",
    "delete": "delete",
    "replace": "replace",
}


@dataclass
class PushCounts:
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: int = 0  # refused by the destination
    skipped: int = 0  # not sent: invalid for the destination
    retrying: int = 0  # refused before, not sent: their next try is not due yet
    given_up: int = 0  # refused on their last try: held back until --retry-failed
    requests: int = 0
    skipped_reasons: Counter[str] = field(default_factory=Counter)
    failed_reasons: Counter[str] = field(default_factory=Counter)
    # An ad platform's own account of the rows (Destination.reports_match), else None.
    match: MatchReport | None = None

    def as_json(self) -> dict[str, Any]:
        extra = {"match": self.match.as_json()} if self.match is not None else {}
        return {
            **extra,
            "added": self.added,
            "updated": self.updated,
            "removed": self.removed,
            "unchanged": self.unchanged,
            "failed": self.failed,
            "skipped": self.skipped,
            "retrying": self.retrying,
            "given_up": self.given_up,
            "requests": self.requests,
            # The most frequent reasons only: a run with a million bad rows must not
            # write a million-entry JSON into sync_runs.
            "skipped_reasons": dict(self.skipped_reasons.most_common(20)),
            "failed_reasons": dict(self.failed_reasons.most_common(20)),
        }


@dataclass
class PushResult:
    sync: str
    destination: str  # the mapping's name
    mode: str
    status: str  # success | partial | failed | dry-run
    counts: PushCounts
    error: str | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)
    # dry run: what would be sent, by op
    planned: dict[str, int] = field(default_factory=dict)
    duration_s: float = 0.0
    # The pre-flight's warnings (an audience below the platform's minimum), said before
    # anything was sent.
    warnings: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "sync": self.sync,
            "destination": self.destination,
            "mode": self.mode,
            "status": self.status,
            "counts": self.counts.as_json(),
            "error": self.error,
            "planned": self.planned,
            "samples": self.samples,
            "duration_s": round(self.duration_s, 3),
            "warnings": self.warnings,
        }


class _Known(NamedTuple):
    """A sync_records row, as much of it as planning needs."""

    content_hash: int
    status: str
    attempts: int
    in_destination: bool
    error: str | None
    retry_after: datetime | None = None  # a refused record's next try; None: given up


class _Pending(NamedTuple):
    """A row planned for sending, mapped when its batch goes."""

    key: str
    digest: int
    known: _Known | None
    raw: Any


@dataclass
class _Entry:
    """A row on its way out: its item, its hash, and what the store knew of it."""

    item: Item
    content_hash: int
    known: _Known | None


def _mask(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        return (value[:1] + "***") if value else value
    return "***"


def masked_payload(sync: LoadedSync, row: Mapping[str, Any]) -> dict[str, Any]:
    """The payload with every value derived from a personal column masked (--dry-run)."""
    return nest(
        (f.target, _mask(f.value(row)) if PII_COLUMNS & set(f.columns) else f.value(row))
        for f in sync.fields
    )


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def _held(digest: int) -> _Known:
    return _Known(digest, "sent", 0, True, None)


class _SystematicRefusal(Exception):
    """A batch refused whole, then both its halves and one row alone, for one reason."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _same_reason(a: str, b: str) -> bool:
    """Whether two refusals give one reason: vendors put counts and positions in them
    ("259 record(s) refused: …", "row 3: …"), so numbers are ignored."""
    return re.sub(r"\d+", "#", a) == re.sub(r"\d+", "#", b)


def _load_known(
    conn: Connection, sync: str, int_keys: bool, keys: Collection[str] | None = None
) -> dict[Any, int | _Known]:
    """The sync's records by key (only ``keys``, when given). A record the destination
    holds as last sent (nearly all of them) is just its hash, loaded by dict.update from
    the driver's row batches: a million small objects built in Python would cost seconds.
    With ``int_keys`` (keys that are customer ids) the keys come back as integers, as the
    planner yields them."""
    known: dict[Any, int | _Known] = {}
    postgres = conn.dialect.name == "postgresql"
    param = "%(sync)s" if postgres else ":sync"
    args = {"sync": sync}
    key = f"CAST(record_key AS {'BIGINT' if postgres else 'INTEGER'})" if int_keys else "record_key"
    ordered = sorted(keys) if keys is not None else None
    chunks = [None] if ordered is None else _chunks(ordered, _KEY_CHUNK)
    for chunk in chunks:
        where = f"sync = {param}"
        if chunk is not None:
            where += f" AND record_key IN ({', '.join(map(quote, chunk))})"
        held = (
            f"SELECT {key}, content_hash FROM sync_records "
            f"WHERE {where} AND status = 'sent' AND in_destination"
        )
        for batch in driver_batches(conn, held, args):
            known.update(batch)
        others = (
            f"SELECT {key}, content_hash, status, attempts, in_destination, error, retry_after "
            f"FROM sync_records WHERE {where} AND NOT (status = 'sent' AND in_destination)"
        )
        # SQLite returns the instant as text: UTCDateTime reads it as the store wrote it.
        to_instant = RECORDS.c.retry_after.type.result_processor(conn.dialect, None)
        for batch in driver_batches(conn, others, args):
            for key_, digest, status, attempts, in_dest, error, retry in batch:
                if retry is not None and to_instant is not None:
                    retry = to_instant(retry)
                known[key_] = _Known(digest, status, attempts, bool(in_dest), error, retry)
    return known


class _Run:
    """One sync's push: the state shared by the planner loop and the batch tasks."""

    def __init__(
        self,
        engine: Engine,
        mapping: LoadedMapping,
        sync: LoadedSync,
        adapter: Destination,
        *,
        dry_run: bool,
        full: bool,
        scope: Collection[int] | None = None,
        retry_failed: bool = False,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.engine = engine
        # On SQLite each write transaction takes its turn with the other writers (see
        # WriterLock), never a batch's wait on the destination: a webhook apply does not
        # wait behind a destination that does not answer.
        self._writer = writer_lock(engine)
        self.retry_failed = retry_failed  # refused rows go now, waiting or given up
        self.clock = clock
        self.now = clock()  # planning compares every refused row's retry_after with it
        self.mapping = mapping
        self.sync = sync
        self.adapter = adapter
        self.dry_run = dry_run
        self.full = full
        # Only these customers' rows and records (a segment sync after a scoped recompute).
        # A replace sends the whole audience whatever changed.
        self.scope = scope if sync.spec.sql is None and sync.spec.mode != "replace" else None
        self.counts = PushCounts()
        self.samples: list[dict[str, Any]] = []
        self.planned: Counter[str] = Counter()
        self.fatal: BaseException | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(max(1, adapter.client.limits.concurrency))
        self._skipped: list[dict[str, Any]] = []

    # -- planning -----------------------------------------------------------------------

    def _send_op(self) -> Op:
        return _SEND_OP[self.sync.spec.mode]

    def _classify(self, known: _Known | None, digest: int) -> str:
        """send | unchanged | skipped (for a stored reason) | waiting | gave_up."""
        if known is None or self.full:
            return "send"
        spec = self.sync.spec
        # An event or an erasure is sent once per record; a changed profile does not
        # make a second one.
        same = spec.mode in ("event", "delete") or known.content_hash == digest
        if not same:
            return "send"
        if known.status == "sent":
            return "unchanged"
        if known.status == "skipped":
            return "skipped"
        return self._refused_verdict(known)

    def _refused_verdict(self, known: _Known) -> str:
        """send | waiting | gave_up for a record of refused content."""
        if self.retry_failed:
            return "send"
        if known.retry_after is None:
            return "gave_up"
        return "waiting" if known.retry_after > self.now else "send"

    async def run(self) -> None:
        sync, spec = self.sync, self.sync.spec
        # Before any mode: a replace on unread consent would empty the audience.
        if sync.consent != "none":
            with self.engine.connect() as conn:
                if (unread := consent_unread(conn)) is not None:
                    raise PushError(f"sync[{spec.name}]: {unread}")
        if spec.mode == "replace":
            await self._replace()
            return
        op = self._send_op()
        batch_size = self.mapping.batch_for(sync, op)
        fingerprint = sync.fingerprint.encode()
        once = spec.mode in ("event", "delete")
        if not self.dry_run:
            await self.adapter.prepare(sync.target)
        with self.engine.connect() as conn:
            self.suppressed = SuppressionList.load(conn)
            # A segment sync outside event mode keys its records by customer id: integers
            # on both sides make the million-row comparison cheaper.
            int_keys = spec.sql is None and spec.mode != "event"
            source: RowSource = (
                SegmentRows(conn, sync, self.scope) if spec.sql is None else ModelRows(conn, sync)
            )
            planned: Iterable[tuple[Any, int, Any]]
            if self.scope is None:
                known = _load_known(conn, spec.name, int_keys)
                planned = source.plan(fingerprint)
            else:
                # A few rows: plan them first, then read the records of just those keys
                # (and of the scope's customers, for the ones who left the segment).
                planned = list(source.plan(fingerprint))
                keys = {str(key) for key, _, _ in planned}
                if int_keys:
                    keys |= {str(cid) for cid in self.scope}
                known = _load_known(conn, spec.name, int_keys, keys)
            pending: list[_Pending] = []
            for key, digest, row in planned:
                if self.fatal is not None:
                    break
                held = known.pop(key, None)
                if type(held) is int:
                    # The common case, kept short: the destination has this content.
                    if not self.full and (held == digest or once):
                        self.counts.unchanged += 1
                        continue
                    held = _held(held)
                previous = cast(_Known | None, held)
                verdict = self._classify(previous, digest)
                if verdict == "unchanged":
                    self.counts.unchanged += 1
                elif verdict == "skipped":
                    self._count_skip(previous.error if previous else None)
                elif verdict == "gave_up":
                    self.counts.given_up += 1
                elif verdict == "waiting":
                    self.counts.retrying += 1
                else:
                    pending.append(_Pending(str(key), digest, previous, row))
                    if len(pending) >= batch_size:
                        await self._send_pending(op, source, pending)
                        pending = []
            if pending and self.fatal is None:
                await self._send_pending(op, source, pending)
        self._flush_skipped()
        await self._drain()
        if self.fatal is None:
            await self._leavers(known)

    async def _send_pending(self, op: Op, source: RowSource, pending: list[_Pending]) -> None:
        """Map the rows planned for sending, skip those the destination cannot take, and
        dispatch the rest as one batch."""
        batch = self._entries(op, source, pending)
        if batch:
            await self._dispatch(op, batch)

    def _entries(self, op: Op, source: RowSource, pending: list[_Pending]) -> list[_Entry]:
        """The rows planned for sending, mapped, less those the destination cannot take
        (skipped with the reason) and those of people who asked to be forgotten."""
        sync, spec = self.sync, self.sync.spec
        batch: list[_Entry] = []
        for p in pending:
            row = source.row(p.raw)
            if self.suppressed.covers(
                email=row.get("email"), phone=row.get("phone"), customer_id=_customer_of(spec, p)
            ):
                # Someone who asked to be forgotten is sent nowhere again. No record either:
                # its key may be their address.
                self._count_skip(FORGOTTEN)
                continue
            payload = sync.payload(row)
            reason = self.adapter.check(sync.target, op, payload)
            if reason is not None:
                self._count_skip(reason)
                self._skipped.append(self._record(p.key, p.digest, "skipped", error=reason))
                continue
            self.planned[op] += 1
            if self.dry_run:
                if len(self.samples) < _SAMPLES:
                    self.samples.append(
                        {"op": op, "key": p.key, "payload": masked_payload(sync, row)}
                    )
                continue
            event_id = f"syncd:{spec.name}:{p.key}" if spec.mode in ("event", "delete") else None
            held = p.known is not None and p.known.in_destination
            item = Item(p.key, payload, None, event_id, held=held)
            batch.append(_Entry(item, p.digest, p.known))
        if len(self._skipped) >= READ_CHUNK:
            self._flush_skipped()
        return batch

    def _count_skip(self, reason: str | None) -> None:
        self.counts.skipped += 1
        self.counts.skipped_reasons[reason or "not sendable"] += 1

    # -- replace -------------------------------------------------------------------------

    async def _replace(self) -> None:
        """Replace mode: every row goes out again, batch after batch in one session of the
        destination's, which makes the audience exactly those rows. The open session is
        kept in ``sync_state`` after each batch, so a run cut off mid-session (a crash, a
        kill) is resumed by the next one; what the cut-off run sent of people who have
        left since is then removed."""
        sync, spec = self.sync, self.sync.spec
        if not self.dry_run:
            await self.adapter.prepare(sync.target)
        with self.engine.connect() as conn:
            self.suppressed = SuppressionList.load(conn)
            int_keys = spec.sql is None
            source: RowSource = (
                SegmentRows(conn, sync, None) if spec.sql is None else ModelRows(conn, sync)
            )
            known = _load_known(conn, spec.name, int_keys)
            pending: list[_Pending] = []
            for key, digest, row in source.plan(sync.fingerprint.encode()):
                record = known.pop(key, None)
                previous = _held(record) if type(record) is int else cast(_Known | None, record)
                pending.append(_Pending(str(key), digest, previous, row))
            entries = self._entries("replace", source, pending)
        self._flush_skipped()
        held = {str(k): _held(v) if type(v) is int else cast(_Known, v) for k, v in known.items()}
        gone = sorted(k for k, v in held.items() if v.in_destination)
        if self.dry_run:
            self.planned["remove"] += len(gone) if not entries else 0
            return
        if not entries:
            # Nothing to replace the audience with (a session needs rows): whoever is in it
            # is removed instead.
            await self._remove_keys(gone)
            self._forget_records([k for k in held if k not in gone])
            return
        saved = self._session_state()
        for attempt in (1, 2):
            self.adapter.begin_replace(sync.target, len(entries), saved)
            state = self.adapter.replace_state()
            self._keep_session(state)
            try:
                for chunk in _chunks(entries, self.mapping.batch_for(sync, "replace")):
                    try:
                        outcomes = await self._send("replace", [e.item for e in chunk])
                    except BatchRejected as exc:
                        # A session's batches cannot be bisected: its numbering is one series.
                        raise PushError(f"a replace batch was refused: {exc.message}") from None
                    self._commit("replace", chunk, outcomes)
                    self._keep_session(self.adapter.replace_state())
            except ReplaceRestart as exc:
                if attempt == 2:
                    raise PushError(f"the replace session was refused twice: {exc}") from None
                log.warning("push.replace_restarted", sync=spec.name, reason=str(exc))
                saved = None
                continue
            break
        self._keep_session(None)
        # The audience is now this run's rows and, when a cut-off session was resumed, what
        # the cut-off run sent in it: those no longer in the rows are removed one by one.
        sent = {e.item.key for e in entries}
        stale = [k for k in gone if k not in sent]
        since = datetime.fromtimestamp(float(state["started"]), UTC) if saved else None
        in_session = set(self._sent_since(stale, since)) if since is not None else set()
        await self._remove_keys(sorted(in_session))
        replaced = [k for k in stale if k not in in_session]
        self.counts.removed += len(replaced)
        self._forget_records(replaced + [k for k in held if k not in gone])

    def _session_state(self) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            state = conn.execute(
                select(STATE.c.state).where(
                    STATE.c.source == f"push:{self.sync.spec.name}", STATE.c.stream == "replace"
                )
            ).scalar_one_or_none()
        return state if isinstance(state, dict) else None

    def _keep_session(self, state: Mapping[str, Any] | None) -> None:
        """Keep (None: forget) the open replace session, in ``sync_state`` under
        ``push:<sync>`` / ``replace``."""
        row = {"source": f"push:{self.sync.spec.name}", "stream": "replace"}
        with self._writer, self.engine.begin() as conn:
            conn.execute(
                delete(STATE).where(STATE.c.source == row["source"], STATE.c.stream == "replace")
            )
            if state is not None:
                conn.execute(insert(STATE).values(**row, state=dict(state), updated_at=utc_now()))

    def _sent_since(self, keys: Sequence[str], since: datetime) -> list[str]:
        found: list[str] = []
        with self.engine.connect() as conn:
            for chunk in _chunks(keys, _KEY_CHUNK):
                found += conn.execute(
                    select(RECORDS.c.record_key).where(
                        RECORDS.c.sync == self.sync.spec.name,
                        RECORDS.c.record_key.in_(chunk),
                        RECORDS.c.sent_at >= since,
                    )
                ).scalars()
        return found

    async def _remove_keys(self, keys: Sequence[str]) -> None:
        """Remove held records by their dest_id (a replace's leftovers)."""
        for chunk in _chunks(keys, self.mapping.batch_for(self.sync, "remove")):
            with self.engine.connect() as conn:
                rows = conn.execute(
                    select(RECORDS.c.record_key, RECORDS.c.dest_id, RECORDS.c.content_hash).where(
                        RECORDS.c.sync == self.sync.spec.name, RECORDS.c.record_key.in_(chunk)
                    )
                ).all()
            entries = [
                _Entry(Item(key, {}, dest_id, None, held=True), digest, _held(digest))
                for key, dest_id, digest in rows
            ]
            if entries:
                await self._dispatch("remove", entries)
        await self._drain()
        if self.fatal is not None:
            raise self.fatal

    def _forget_records(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        with self._writer, self.engine.begin() as conn:
            for chunk in _chunks(list(keys), _KEY_CHUNK):
                conn.execute(
                    delete(RECORDS).where(
                        RECORDS.c.sync == self.sync.spec.name, RECORDS.c.record_key.in_(chunk)
                    )
                )

    # -- leavers -------------------------------------------------------------------------

    async def _leavers(self, held: dict[Any, int | _Known]) -> None:
        spec = self.sync.spec
        known = {str(k): _held(v) if type(v) is int else cast(_Known, v) for k, v in held.items()}
        if spec.mode not in ("mirror", "upsert"):
            return
        # Records of rows gone from the segment that the destination never got (skipped
        # or refused): nothing to undo there, so they are forgotten here.
        never_sent = [k for k, v in known.items() if not v.in_destination]
        if never_sent and not self.dry_run:
            with self._writer, self.engine.begin() as conn:
                for chunk in _chunks(never_sent, _KEY_CHUNK):
                    conn.execute(
                        delete(RECORDS).where(
                            RECORDS.c.sync == spec.name, RECORDS.c.record_key.in_(chunk)
                        )
                    )
        op: Op = "remove"
        held_keys = [k for k, v in known.items() if v.in_destination]
        withdrawn = self._withdrawn(held_keys)
        if spec.mode == "upsert":
            # An upsert leaves whoever left the segment where they are; one who withdrew
            # the sync's consent is unsubscribed, where the adapter can.
            if not withdrawn or not self.adapter.supports("unsubscribe"):
                return
            op = "unsubscribe"
            held_keys = [k for k in held_keys if k in withdrawn]
        leaving = []
        for key in held_keys:
            record = known[key]
            verdict = self._refused_verdict(record) if record.status == "failed" else "send"
            if verdict == "gave_up":
                self.counts.given_up += 1
            elif verdict == "waiting":
                self.counts.retrying += 1
            else:
                leaving.append(key)
        self.planned[op] += len(leaving) if self.dry_run else 0
        if self.dry_run or not leaving:
            return
        size = self.mapping.batch_for(self.sync, op)
        for chunk in _chunks(leaving, size):
            if self.fatal is not None:
                break
            with self.engine.connect() as conn:
                ids = dict(
                    conn.execute(
                        select(RECORDS.c.record_key, RECORDS.c.dest_id).where(
                            RECORDS.c.sync == spec.name, RECORDS.c.record_key.in_(chunk)
                        )
                    ).all()
                )
            # One who withdrew is unsubscribed by address: the adapter gets their payload.
            payloads = self._payloads([k for k in chunk if k in withdrawn])
            entries = [
                _Entry(
                    Item(
                        k,
                        payloads.get(k, {}),
                        ids.get(k),
                        None,
                        withdrawn=k in withdrawn,
                        held=True,
                    ),
                    known[k].content_hash,
                    known[k],
                )
                for k in chunk
            ]
            await self._dispatch(op, entries)
        await self._drain()

    def _payloads(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The mapped payloads of people who are no longer rows of the sync (they withdrew),
        from their profile and contact details: enough for the identity fields an
        unsubscribe needs. Columns beyond those read as null."""
        if not keys:
            return {}
        ids = [int(k) for k in keys]
        person = [CUSTOMERS.c[name] for name in PERSON_COLUMNS]
        out: dict[str, dict[str, Any]] = {}
        with self.engine.connect() as conn:
            for chunk in _chunks(ids, _KEY_CHUNK):
                rows = conn.execute(
                    select(PROFILES, *person)
                    .join(CUSTOMERS, CUSTOMERS.c.id == PROFILES.c.customer_id)
                    .where(PROFILES.c.customer_id.in_(chunk))
                ).mappings()
                for row in rows:
                    values = dict(row)
                    for legacy, column in LEGACY_COLUMNS.items():
                        values[legacy] = values.get(column)
                    out[str(row["customer_id"])] = self.sync.payload(values)
        return out

    def _withdrawn(self, keys: Sequence[str]) -> set[str]:
        """The keys among ``keys`` of people whose profile says no on the sync's consent
        channel, stated (a withdrawal, or a rule that no longer holds): their removal
        unsubscribes them. Someone with no statement at all is only removed: syncd has
        nothing to say about a consent they may have given the vendor directly. Keys are
        customer ids in a segment sync, and in a SQL model keyed by customer_id."""
        sync = self.sync
        if sync.consent == "none" or not keys:
            return set()
        if sync.spec.sql is not None and sync.spec.key != "customer_id":
            return set()
        ids = sorted({int(k) for k in keys if k.lstrip("-").isdigit()})
        column = PROFILES.c[f"consent_{sync.consent}"]
        stated = PROFILES.c[f"consent_{sync.consent}_at"]
        found: set[str] = set()
        with self.engine.connect() as conn:
            for chunk in _chunks(ids, _KEY_CHUNK):
                found.update(
                    str(cid)
                    for cid in conn.execute(
                        select(PROFILES.c.customer_id).where(
                            PROFILES.c.customer_id.in_(chunk),
                            column.is_not(True),
                            stated.is_not(None),
                        )
                    ).scalars()
                )
        return found

    # -- sending -------------------------------------------------------------------------

    async def _dispatch(self, op: Op, entries: list[_Entry]) -> None:
        """Start a batch once a slot is free: at most `concurrency` batches in flight."""
        await self._slots.acquire()
        if self.fatal is not None:
            self._slots.release()
            return
        task = asyncio.create_task(self._batch(op, entries))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _attach_dest_ids(self, entries: list[_Entry]) -> None:
        """Give records the destination already holds their vendor id: an adapter may
        treat a known member differently (leave its subscription status alone, say)."""
        held = [e.item.key for e in entries if e.known is not None and e.known.in_destination]
        if not held:
            return
        ids: dict[str, str | None] = {}
        with self.engine.connect() as conn:
            for chunk in _chunks(held, _KEY_CHUNK):
                rows = conn.execute(
                    select(RECORDS.c.record_key, RECORDS.c.dest_id).where(
                        RECORDS.c.sync == self.sync.spec.name, RECORDS.c.record_key.in_(chunk)
                    )
                )
                ids.update((key, dest_id) for key, dest_id in rows)
        for entry in entries:
            dest_id = ids.get(entry.item.key)
            if dest_id is not None and entry.item.dest_id is None:
                entry.item = replace(entry.item, dest_id=dest_id)

    async def _batch(self, op: Op, entries: list[_Entry]) -> None:
        try:
            if op not in ("remove", "unsubscribe"):
                self._attach_dest_ids(entries)
            try:
                outcomes = await self._send_split(op, [e.item for e in entries])
            except _SystematicRefusal as exc:
                # Every row of the batch was refused for it: recorded as refused (tried
                # again on the schedule), and the sync stops: the next batches would fail
                # the same way.
                self._commit(op, entries, [Outcome.rejected(exc.message)] * len(entries))
                raise PushError(
                    f"the destination refused a batch of {len(entries)} rows, both its "
                    f"halves and a row alone, for one reason: {exc.message}"
                ) from None
            self._commit(op, entries, outcomes)
        except Exception as exc:  # the run fails; the batch goes out next time
            if self.fatal is None:
                self.fatal = exc
        finally:
            self._slots.release()

    async def _send(self, op: Op, items: Sequence[Item]) -> list[Outcome]:
        outcomes = await self.adapter.send(self.sync.target, op, items)
        if len(outcomes) != len(items):
            raise RuntimeError(
                f"{self.adapter.type}: {len(outcomes)} outcomes for {len(items)} items"
            )
        return outcomes

    async def _send_split(
        self, op: Op, items: Sequence[Item], *, first: bool = True
    ) -> list[Outcome]:
        try:
            return await self._send(op, items)
        except BatchRejected as exc:
            return await self._refused(op, items, exc.message, first=first)

    async def _refused(
        self, op: Op, items: Sequence[Item], message: str, *, first: bool = False
    ) -> list[Outcome]:
        """Outcomes of rows the destination refused as a whole with ``message``: one bad
        row must not hold back the rest, so the rows are halved until the bad ones are
        alone. ``first``: the batch as dispatched, where a systematic refusal is told
        apart (both halves refused for one reason, and one row alone too: each row would
        be refused alone, so bisecting would only multiply the requests)."""
        if len(items) == 1:
            return [Outcome.rejected(message)]
        middle = len(items) // 2
        halves = (items[:middle], items[middle:])
        sent: list[list[Outcome] | BatchRejected] = []
        for half in halves:
            try:
                sent.append(await self._send(op, half))
            except BatchRejected as exc:
                sent.append(exc)
        head, tail = sent
        if (
            first
            and len(halves[0]) > 1
            and isinstance(head, BatchRejected)
            and isinstance(tail, BatchRejected)
            and _same_reason(head.message, tail.message)
        ):
            # Bad rows on both sides look the same so far: one row alone tells them apart.
            rest = halves[0][1:]
            try:
                alone = await self._send(op, halves[0][:1])
            except BatchRejected as exc:
                if _same_reason(exc.message, head.message):
                    raise _SystematicRefusal(exc.message) from None
                # That row was bad in its own way: the rest of the half is not known bad.
                alone = [Outcome.rejected(exc.message)]
                after = await self._send_split(op, rest, first=False)
            else:
                after = await self._refused(op, rest, head.message)  # holds the bad rows
            return alone + after + await self._refused(op, halves[1], tail.message)
        outcomes: list[Outcome] = []
        for half, result in zip(halves, sent, strict=True):
            if isinstance(result, BatchRejected):
                outcomes += await self._refused(op, half, result.message)
            else:
                outcomes += result
        return outcomes

    # -- recording -----------------------------------------------------------------------

    def _record(
        self,
        key: str,
        digest: int,
        status: str,
        *,
        error: str | None = None,
        attempts: int = 0,
        dest_id: str | None = None,
        in_destination: bool = False,
        retry_after: datetime | None = None,
    ) -> dict[str, Any]:
        now = self.clock()
        return {
            "sync": self.sync.spec.name,
            "record_key": key,
            "content_hash": digest,
            "status": status,
            "in_destination": in_destination,
            "dest_id": dest_id,
            "attempts": attempts,
            "error": error,
            "sent_at": now if status == "sent" else None,
            "updated_at": now,
            "retry_after": retry_after,
        }

    def _flush_skipped(self) -> None:
        if not self._skipped or self.dry_run:
            self._skipped = []
            return
        with self._writer, self.engine.begin() as conn:
            upsert(
                conn,
                RECORDS,
                self._skipped,
                keys=("sync", "record_key"),
                update=_REFUSED_UPDATE,
            )
        self._skipped = []

    def _commit(self, op: Op, entries: Sequence[_Entry], outcomes: Sequence[Outcome]) -> None:
        name = self.sync.spec.name
        accepted: list[dict[str, Any]] = []
        refused: list[dict[str, Any]] = []
        removed: list[str] = []
        counts = self.counts
        for entry, outcome in zip(entries, outcomes, strict=True):
            key, known = entry.item.key, entry.known
            if outcome.ok:
                if op in ("remove", "unsubscribe"):
                    removed.append(key)
                    counts.removed += 1
                    continue
                if known is not None and known.in_destination:
                    counts.updated += 1
                else:
                    counts.added += 1
                accepted.append(
                    self._record(
                        key,
                        entry.content_hash,
                        "sent",
                        dest_id=outcome.dest_id or entry.item.dest_id,
                        in_destination=op != "delete",
                    )
                )
            else:
                message = outcome.error or "refused by the destination"
                counts.failed += 1
                counts.failed_reasons[message[:200]] += 1
                # Attempts count failures of this content: changed content starts again.
                same = known is not None and known.content_hash == entry.content_hash
                attempts = (
                    known.attempts if same and known is not None and not self.full else 0
                ) + 1
                retry_after = self._next_try(attempts)
                if retry_after is None:
                    counts.given_up += 1
                refused.append(
                    self._record(
                        key,
                        entry.content_hash,
                        "failed",
                        error=message,
                        attempts=attempts,
                        retry_after=retry_after,
                    )
                )
        with self._writer, self.engine.begin() as conn:
            if accepted:
                upsert(
                    conn, RECORDS, accepted, keys=("sync", "record_key"), update=_ACCEPTED_UPDATE
                )
            if refused:
                upsert(conn, RECORDS, refused, keys=("sync", "record_key"), update=_REFUSED_UPDATE)
            for chunk in _chunks(removed, _KEY_CHUNK):
                conn.execute(
                    delete(RECORDS).where(RECORDS.c.sync == name, RECORDS.c.record_key.in_(chunk))
                )

    def _next_try(self, attempts: int) -> datetime | None:
        """When content refused ``attempts`` times is tried again; None: given up."""
        if attempts >= self.sync.max_attempts:
            return None
        delays = self.sync.retry_delays
        wait = delays[min(attempts, len(delays)) - 1] if delays else 0
        return self.clock() + timedelta(seconds=wait)


def preflight(engine: Engine, sync: LoadedSync, adapter: type[Destination]) -> str | None:
    """The policy pre-flight of an ad-platform sync: a warning when the audience the sync
    would leave holds fewer people than the platform's minimum before it serves ads
    (``Destination.min_audience``), saying whether this run's removals are what takes it
    there. None when the adapter has no minimum or the audience is large enough. The
    count is of the rows the sync would send: the platform matches at most that many."""
    minimum = adapter.min_audience
    if minimum is None:
        return None
    spec = sync.spec
    with engine.connect() as conn:
        source: RowSource = (
            SegmentRows(conn, sync, None) if spec.sql is None else ModelRows(conn, sync)
        )
        keys = {str(key) for key, _, _ in source.plan(sync.fingerprint.encode())}
        held = set(
            conn.execute(
                select(RECORDS.c.record_key).where(
                    RECORDS.c.sync == spec.name, RECORDS.c.in_destination.is_(True)
                )
            ).scalars()
        )
    size = len(keys)  # after the run, mirror or replace, the audience is these rows
    if size >= minimum:
        return None
    message = (
        f"{spec.name}: the audience would hold {size} people, below {adapter.type}'s "
        f"minimum of about {minimum} matched people before it serves ads"
    )
    leaving = len(held - keys)
    if len(held) >= minimum and leaving:
        message += f" (removing {leaving} would shrink it from {len(held)})"
    return message


def _customer_of(spec: SyncSpec, pending: _Pending) -> int | None:
    """The store customer a planned row is about, when the sync says: a segment sync's keys
    are customer ids (``<id>@<time>`` for events)."""
    if spec.sql is not None:
        return None
    head = pending.key.partition("@")[0]
    return int(head) if head.isdigit() else None


def _chunks(keys: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    for start in range(0, len(keys), size):
        yield keys[start : start + size]


async def push_sync(
    engine: Engine,
    mapping: LoadedMapping,
    sync: LoadedSync,
    adapter: Destination,
    *,
    dry_run: bool = False,
    full: bool = False,
    scope: Collection[int] | None = None,
    retry_failed: bool = False,
    clock: Callable[[], datetime] = utc_now,
) -> PushResult:
    """Run one destination sync once; the run is recorded in ``sync_runs`` (not a dry run).

    ``scope`` limits a segment sync to those customers: their rows are compared and sent,
    and those of them who left a mirrored segment are removed; nobody else is read (the
    push after a scoped recompute). SQL-model syncs always run in full.
    ``retry_failed`` sends refused rows now, given up or waiting for their next try.
    ``clock`` is now (a test's or benchmark's simulated time: refused rows' waits)."""
    name = sync.spec.name
    started = utc_now()
    writer = writer_lock(engine)  # the run records take their turn too (see _Run)
    run_id: int | None = None
    if not dry_run:
        with writer:
            run_id = start_run(engine, "destination", name)
    before = adapter.request_count()
    state = _Run(
        engine,
        mapping,
        sync,
        adapter,
        dry_run=dry_run,
        full=full,
        scope=scope,
        retry_failed=retry_failed,
        clock=clock,
    )
    error: str | None = None
    warnings: list[str] = []
    if adapter.min_audience is not None:
        warning = preflight(engine, sync, type(adapter))
        if warning is not None:
            warnings.append(warning)
            log.warning("push.preflight", sync=name, warning=warning)
    if adapter.reports_match:
        # What the platform says of this run's rows: the adapter adds to it per request.
        adapter.match_report = state.counts.match = MatchReport()
    try:
        await state.run()
    except asyncio.CancelledError:
        # The service is stopping: batches not acknowledged stay unsent in sync_records
        # and go out on the next run.
        if run_id is not None:
            recorded = state.counts.as_json()
            recorded["requests"] = adapter.request_count() - before
            with writer:
                finish_run(engine, run_id, "abandoned", recorded, "syncd stopped during the run")
        raise
    except PushError as exc:
        error = str(exc)
    except Exception as exc:  # recorded and reported; the service keeps running
        error = f"{type(exc).__name__}: {exc}"
        log.exception("push.failed", sync=name)
    if error is None and state.fatal is not None:
        fatal = state.fatal
        error = str(fatal) or type(fatal).__name__
    counts = state.counts
    counts.requests = adapter.request_count() - before
    if dry_run:
        status = "dry-run" if error is None else "failed"
    elif error is not None:
        status = "failed"
    elif counts.failed and not (
        counts.added or counts.updated or counts.removed or counts.unchanged
    ):
        # No row of the sync is in the destination as it should be, and every one sent was
        # refused: a wrong list, a field the vendor rejects, a vendor answering 4xx to
        # all. That is the sync failing, not some of its rows.
        status = "failed"
        reason = counts.failed_reasons.most_common(1)[0][0]
        error = f"the destination refused every row sent ({counts.failed}): {reason}"
    else:
        status = "partial" if counts.failed else "success"
    if run_id is not None:
        recorded = counts.as_json()
        if state.scope is not None:
            recorded["scope"] = len(state.scope)
        with writer:
            finish_run(engine, run_id, status, recorded, error)
    result = PushResult(
        sync=name,
        destination=mapping.name,
        mode=sync.spec.mode,
        status=status,
        counts=counts,
        error=error,
        samples=state.samples,
        planned=dict(state.planned),
        duration_s=(utc_now() - started).total_seconds(),
        warnings=warnings,
    )
    log.info(
        "push.finished",
        sync=name,
        destination=mapping.name,
        status=status,
        duration_s=round(result.duration_s, 3),
        **{k: v for k, v in counts.as_json().items() if not k.endswith("_reasons")},
    )
    adapter.match_report = None
    return result


def select_syncs(
    mappings: Sequence[LoadedMapping], names: Sequence[str] | None
) -> list[tuple[LoadedMapping, LoadedSync]]:
    """The syncs to run, in file order; KeyError naming the first unknown name."""
    every = [(m, s) for m in mappings for s in m.syncs]
    if not names:
        return every
    known = {s.name for _, s in every}
    for name in names:
        if name not in known:
            raise KeyError(name)
    wanted = set(names)
    return [(m, s) for m, s in every if s.name in wanted]


async def push(
    engine: Engine,
    selected: Sequence[tuple[LoadedMapping, LoadedSync]],
    *,
    dry_run: bool = False,
    full: bool = False,
    transport: Any = None,
    scope: Collection[int] | None = None,
    retry_failed: bool = False,
    clock: Callable[[], datetime] = utc_now,
) -> list[PushResult]:
    """Run the selected syncs once, one adapter (one HTTP client) per mapping (``scope``,
    ``retry_failed``, ``clock``: see push_sync)."""
    results: list[PushResult] = []
    adapters: dict[int, Destination] = {}
    try:
        for mapping, sync in selected:
            adapter = adapters.get(id(mapping))
            if adapter is None:
                adapter = adapters[id(mapping)] = mapping.open(transport)
            results.append(
                await push_sync(
                    engine,
                    mapping,
                    sync,
                    adapter,
                    dry_run=dry_run,
                    full=full,
                    scope=scope,
                    retry_failed=retry_failed,
                    clock=clock,
                )
            )
    finally:
        for adapter in adapters.values():
            await adapter.aclose()
    return results
