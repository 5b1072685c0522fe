"""The scheduler of ``syncd run``: which job runs when, where, and what it sets off.

Jobs
    ``source:<name>``       one per source, on its ``schedule`` with up to
                            ``jitter_seconds`` of random delay;
    ``segments``            the profile and segment recompute: chained after a source sync
                            that stored rows (and after webhooks that changed customers), and
                            once a day so time-based segments ("no order for 90 days") move
                            even when no data does;
    ``destination:<sync>``  one per destination sync: chained after a recompute that
                            changed its segment (a SQL-model sync, which can read anything,
                            after every recompute), and on its own ``schedule`` if it has one;
    ``privacy``             on ``[privacy] schedule``: the due steps of open forget requests,
                            then the raw-payload retention.

No job ever overlaps itself. A chained request for a job that is running is remembered and
runs once more right after it; a scheduled trigger that finds its job running is queued
and runs right after it too. Requests and triggers coalesce: however many arrive during a
run, one run follows (for triggers, the newest slot's). The work of a run happens on its own
thread (with its own event loop for the async engines), so the service's loop, which
serves HTTP and webhooks, never waits on a sync.

Replicas (Postgres)
    Every interval schedule is anchored to a fixed epoch, so all replicas compute the same
    nominal fire times ("slots") whatever their start time; jitter is added on top and
    does not change the slot. Every run holds a session-level advisory lock on its job
    (on a connection of its own; a crashed replica's lock dies with its connection), so
    one job never runs on two replicas at once: a run that finds its job busy elsewhere
    waits for it. Holding the lock, a scheduled run then claims ``(job, slot)`` in
    ``job_leases`` with ``INSERT … ON CONFLICT DO NOTHING`` on the table's primary key:
    the database lets exactly one insert through, so however close together two replicas
    fire (even when one finishes the run before the other fires), each trigger runs once
    and the loser just drops it. A lease row means its slot ran (or is running).
SQLite
    One process only: `Daemon.start` takes an exclusive ``flock`` on ``<database>.lock`` for
    the process's life and refuses to start (`DaemonError`) when another process has it.

Every run ends with one ``run.status`` line (kind, name, status, duration, counts, next
run), the run's metrics, and what the alerts need to know.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import hashlib
import logging
import math
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from apscheduler.schedulers.asyncio import AsyncIOScheduler  # type: ignore[import-untyped]
from apscheduler.schedulers.base import STATE_RUNNING  # type: ignore[import-untyped]
from sqlalchemy import Connection, Engine, create_engine, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.pool import NullPool

from syncd.config import Settings
from syncd.ingest import SourceSync
from syncd.log import get_logger
from syncd.mapping import LoadedMapping, LoadedSync
from syncd.privacy import prune_raw_payloads, retry_pending
from syncd.push import push
from syncd.runs import finish_run, iso, start_run
from syncd.schedule import ANCHOR, SlotTrigger, parse_schedule
from syncd.segments.recompute import recompute
from syncd.store.engine import writer_lock
from syncd.store.models import JOB_LEASES
from syncd.store.models import SYNC_RUNS as RUNS

if TYPE_CHECKING:
    from syncd.alerts import Alerts
    from syncd.metrics import Metrics

__all__ = [
    "ANCHOR",
    "Daemon",
    "DaemonError",
    "JobInfo",
    "claim_slot",
    "job_lock_key",
    "slot_claimed",
]

log = get_logger("syncd.daemon")

# The recompute's own schedule, so time-based segments move even when no data does.
RECOMPUTE_SCHEDULE: Final = "every 1d"
LEASE_RETENTION: Final = timedelta(days=2)
SCOPE_RETRY_SECONDS: Final = 60.0  # a failed scoped run's customers are tried again after
_STATUS_LEVELS: Final = {
    "success": logging.INFO,
    "partial": logging.WARNING,
    "abandoned": logging.WARNING,
}
# At stop, how long a run in flight may take to finish on its own before it is cancelled
# (a run waiting on a store that never answers would otherwise hold the stop for minutes).
FINISH_GRACE: Final = 2.0
ABANDONED: Final = "syncd was stopping: the run was cancelled; what it committed stands"


class DaemonError(Exception):
    """The daemon cannot start (another process holds the SQLite store, say)."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _slot_key(moment: datetime) -> datetime:
    """A slot as stored: UTC, to the millisecond (float arithmetic in the triggers must not
    make two replicas' copies of one slot differ in the last microsecond)."""
    moment = moment.astimezone(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def job_lock_key(job: str) -> int:
    """The Postgres advisory lock key (a signed bigint) of a job."""
    digest = hashlib.blake2b(f"syncd.job:{job}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def slot_claimed(engine: Engine, job: str, slot: datetime) -> bool:
    """Whether trigger ``slot`` of ``job`` was claimed already."""
    with engine.connect() as conn:
        found = conn.execute(
            select(JOB_LEASES.c.owner).where(
                JOB_LEASES.c.job == job, JOB_LEASES.c.slot == _slot_key(slot)
            )
        ).first()
    return found is not None


def claim_slot(engine: Engine, job: str, slot: datetime, owner: str) -> bool:
    """Claim trigger ``slot`` of ``job`` for ``owner``: True for exactly one caller per
    ``(job, slot)``, however many race (the primary key decides, in the database)."""
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    stmt = (
        dialect.insert(JOB_LEASES)
        .values(job=job, slot=_slot_key(slot), owner=owner, claimed_at=_utcnow())
        .on_conflict_do_nothing(index_elements=["job", "slot"])
        # A row comes back only from the insert that went through (rowcount is not
        # dependable across drivers for ON CONFLICT statements).
        .returning(JOB_LEASES.c.owner)
    )
    with engine.begin() as conn:
        return conn.execute(stmt).first() is not None


# ---------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------


@dataclass
class _Outcome:
    status: str
    counts: dict[str, Any]
    error: str | None = None
    stored: bool = False  # a source run wrote rows
    segments_changed: set[str] = field(default_factory=set)  # a recompute's moved segments
    failures_in_a_row: int = 0
    scope: set[int] | None = None  # a scoped recompute's customers: its pushes' scope
    ended_at: datetime | None = None  # when the run let go of the store (all committed)


@dataclass
class _Job:
    id: str  # "source:<name>", "segments", "destination:<sync>", "privacy"
    kind: str  # the sync_runs kind: source | segments | destination | privacy
    name: str  # the sync_runs name
    trigger: SlotTrigger | None
    mapping: LoadedMapping | None = None
    sync: LoadedSync | None = None
    task: asyncio.Task[None] | None = None
    rerun: str | None = None  # why to run once more after the run in flight
    # What the rerun must see: data committed up to then (the latest request's).
    rerun_at: datetime | None = None
    began_at: datetime | None = None  # when the latest run took the store (after its lock)
    # Segments and destination jobs: the customers the run in flight covers (None: all),
    # and what the requests since it started asked for (customers, or everyone).
    scope: set[int] | None = None
    wanted: set[int] = field(default_factory=set)
    wanted_all: bool = False
    pending: datetime | None = None  # the slot that fired during the run in flight
    last_status: str | None = None
    last_finished_at: datetime | None = None
    claimed: int = 0  # scheduled slots this daemon won
    lost: int = 0  # scheduled slots another replica (or an earlier life) had claimed
    coalesced: int = 0  # scheduled slots dropped here for a newer one queued behind them
    # Cancels the run in flight on its own thread's loop (set while an async run is on).
    cancel: Callable[[], None] | None = None


@dataclass(frozen=True)
class JobInfo:
    """What `Daemon.jobs` reports per job."""

    name: str
    kind: str
    schedule: str | None
    next_run_at: str | None
    running: bool
    last_status: str | None
    last_finished_at: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "schedule": self.schedule,
            "next_run_at": self.next_run_at,
            "running": self.running,
            "last_status": self.last_status,
            "last_finished_at": self.last_finished_at,
        }


@dataclass
class _HeldLock:
    conn: Connection
    key: int


class Daemon:
    """Schedules and runs syncd's jobs on the running event loop. See the module docstring.

    Extra keyword arguments (tests and tuning): ``owner`` names this daemon in
    ``job_leases`` (default host:pid:random); ``catch_up`` runs, at start, each interval
    job whose latest slot nobody ran (the first start, a restart after downtime), so a
    15-minute source does not wait 15 minutes for its first sync; ``recompute_every`` (a
    schedule, ``every N`` or cron; None for never) is the recompute's own; ``overdue_after``
    is how late a scheduled run may be before the job counts as overdue; ``watch_every`` is the
    period of the freshness/overdue check that feeds the alerts; ``debounce`` coalesces
    webhook-driven recomputes.
    """

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        mappings: list[LoadedMapping],
        *,
        metrics: Metrics | None = None,
        alerts: Alerts | None = None,
        owner: str | None = None,
        catch_up: bool = True,
        recompute_every: str | None = RECOMPUTE_SCHEDULE,
        overdue_after: float = 60.0,
        watch_every: float = 30.0,
        debounce: float = 0.3,
        lock_poll: float = 0.25,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.mappings = mappings
        self.metrics = metrics
        self.alerts = alerts
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.catch_up = catch_up
        self.overdue_after = overdue_after
        self.watch_every = watch_every
        self.debounce = debounce
        self.lock_poll = lock_poll

        self._jobs: dict[str, _Job] = {}
        for name, source in settings.sources.items():
            trigger = source.poll_schedule.trigger(source.jitter_seconds)
            self._add(_Job(f"source:{name}", "source", name, trigger))
        segments_trigger = parse_schedule(recompute_every).trigger() if recompute_every else None
        self._add(_Job("segments", "segments", "segments", segments_trigger))
        # Open forget requests' due steps, and the raw-payload retention.
        privacy_trigger = parse_schedule(settings.privacy.schedule).trigger()
        self._add(_Job("privacy", "privacy", "privacy", privacy_trigger))
        for mapping in mappings:
            for sync in mapping.syncs:
                schedule = sync.spec.schedule
                pushes = parse_schedule(schedule).trigger() if schedule else None
                self._add(
                    _Job(
                        f"destination:{sync.name}", "destination", sync.name, pushes, mapping, sync
                    )
                )

        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduler: Any = None
        self._started = False
        self._stopping = False
        self._started_at: datetime | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._debounce_task: asyncio.Task[None] | None = None
        self._changed: dict[str, set[int]] = {}
        self._lock_engine: Engine | None = None
        self._lock_fd: int | None = None
        # Job threads still running (abandoned ones included), and whether stop() left the
        # SQLite lock for the last of them to release: the store is in use until they end.
        self._threads = 0
        self._threads_lock = threading.Lock()
        # Postgres runs jobs side by side; SQLite's single writer needs them in turn
        # (webhook applies take the same turns).
        self._store_writer = writer_lock(engine)
        self._release_when_idle = False
        self._last_prune = -math.inf

    def _add(self, job: _Job) -> None:
        self._jobs[job.id] = job

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Take the store (SQLite: exclusively), start the scheduler on the running loop,
        and catch up on missed slots. Raises DaemonError when the store is taken."""
        if self._started:
            raise DaemonError("the daemon was started already")
        self._loop = asyncio.get_running_loop()
        if self.engine.dialect.name == "sqlite":
            self._lock_sqlite()
        else:
            # Lock sessions get their own connections (never the shared pool's): a session
            # holds its advisory lock for a whole run, and closing it is the release.
            self._lock_engine = create_engine(
                self.engine.url, poolclass=NullPool, isolation_level="AUTOCOMMIT"
            )
        self._started = True
        self._started_at = _utcnow()
        scheduler = AsyncIOScheduler(timezone=UTC)
        for job in self._jobs.values():
            if job.trigger is None:
                continue
            scheduler.add_job(
                self._fire,
                trigger=job.trigger,
                args=[job.id],
                id=job.id,
                name=job.id,
                # Our own bookkeeping keeps runs from overlapping (and queues triggers that
                # fire during a run); these make APScheduler agree and never drop a late
                # trigger (a blocked loop, a suspended host): it runs once, coalesced.
                max_instances=1,
                coalesce=True,
                misfire_grace_time=None,
            )
        scheduler.start()
        self._scheduler = scheduler
        self._watch_task = asyncio.create_task(self._watch(), name="syncd-watch")
        if self.catch_up:
            now = _utcnow()
            for job in self._jobs.values():
                slot = job.trigger.previous_slot(now) if job.trigger is not None else None
                if slot is not None:
                    self._launch(job, slot, "catch-up")
        log.info(
            "daemon.started",
            owner=self.owner,
            jobs=[j.as_dict() for j in self.job_infos()],
        )

    async def stop(self, timeout: float = 8.0, finish_within: float = FINISH_GRACE) -> None:
        """Take no new work; let runs in flight finish for up to ``finish_within`` s, then
        cancel them, and give up waiting after ``timeout`` s in all.

        A cancelled source or destination run stops where it waits (an HTTP request, a
        retry's pause), rolls back its uncommitted pages and records itself "abandoned":
        rows and cursors commit together, so its next run resumes from the last commit.
        A run still going at ``timeout`` (a recompute, which cannot be cancelled) is left to
        its thread, to finish or to die with the process; its ``sync_runs`` row stays
        "running" and the job's next run marks it abandoned.
        """
        if not self._started or self._stopping:
            return
        deadline = time.monotonic() + max(0.0, timeout)
        self._stopping = True
        for task in (self._watch_task, self._debounce_task):
            if task is not None:
                task.cancel()
        if self._scheduler is not None and self._scheduler.state == STATE_RUNNING:
            self._scheduler.shutdown(wait=False)
        tasks = {job.task: job for job in self._jobs.values() if job.task is not None}
        abandoned: list[str] = []
        if tasks:
            grace = min(max(0.0, finish_within), max(0.0, deadline - time.monotonic()))
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                cancel = tasks[task].cancel
                if cancel is not None:
                    with contextlib.suppress(RuntimeError):  # its loop just closed
                        cancel()
            if pending:
                _, pending = await asyncio.wait(
                    pending, timeout=max(0.0, deadline - time.monotonic())
                )
            for task in pending:
                abandoned.append(tasks[task].id)
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=0.5)
        if self.alerts is not None:
            # Deliver what is queued (a failure alert of the last run, say), briefly.
            await self.alerts.aclose(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
        with self._threads_lock:
            if self._threads:
                self._release_when_idle = True
            else:
                self._release_store()
        if abandoned:
            log.warning("daemon.stopped", abandoned=abandoned)
        else:
            log.info("daemon.stopped")

    def _release_store(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._lock_engine is not None:
            self._lock_engine.dispose()
            self._lock_engine = None

    def _lock_sqlite(self) -> None:
        database = self.engine.url.database
        if not database or database == ":memory:" or database.startswith("file:"):
            return  # a private in-memory store: nobody else can open it
        path = Path(database + ".lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DaemonError(
                f"another syncd run (pid {holder}) is already using the SQLite store "
                f"{database}: only one process may run against a SQLite store; stop it "
                "first, or move the store to Postgres to run several replicas"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    # -- what the HTTP side reads -----------------------------------------------------------

    def readiness(self, now: datetime | None = None) -> dict[str, Any]:
        """``{"scheduler_running": bool, "overdue_jobs": [job names]}`` for /readyz."""
        running = (
            self._started
            and not self._stopping
            and self._scheduler is not None
            and self._scheduler.state == STATE_RUNNING
        )
        return {"scheduler_running": bool(running), "overdue_jobs": self.overdue_jobs(now)}

    def overdue_jobs(self, now: datetime | None = None) -> list[str]:
        """Scheduled jobs whose next run is more than ``overdue_after`` s in the past: the
        scheduler stalled, or the loop is blocked, and the job silently does not run."""
        if self._scheduler is None or self._stopping:
            return []
        now = now or _utcnow()
        late = timedelta(seconds=self.overdue_after)
        overdue = []
        for job in self._jobs.values():
            if job.trigger is None:
                continue
            scheduled = self._scheduler.get_job(job.id)
            when = scheduled.next_run_time if scheduled is not None else None
            if when is not None and when + late < now:
                overdue.append(job.id)
        return overdue

    def jobs(self) -> list[dict[str, Any]]:
        """Every job: name, kind, schedule, next_run_at, running, last_status, last_finished_at."""
        return [info.as_dict() for info in self.job_infos()]

    def job_infos(self) -> list[JobInfo]:
        return [
            JobInfo(
                name=job.id,
                kind=job.kind,
                schedule=job.trigger.description if job.trigger is not None else None,
                next_run_at=iso(self._next_run_at(job)),
                running=job.task is not None,
                last_status=job.last_status,
                last_finished_at=iso(job.last_finished_at),
            )
            for job in self._jobs.values()
        ]

    def lease_stats(self) -> dict[str, dict[str, int]]:
        """Per scheduled job: slots claimed (and run) here, slots another replica (or an
        earlier life of the store) had claimed, slots merged into a newer one here."""
        return {
            job.id: {"claimed": job.claimed, "lost": job.lost, "coalesced": job.coalesced}
            for job in self._jobs.values()
            if job.trigger is not None
        }

    def _next_run_at(self, job: _Job) -> datetime | None:
        if self._scheduler is None or job.trigger is None or self._stopping:
            return None
        scheduled = self._scheduler.get_job(job.id)
        when: datetime | None = scheduled.next_run_time if scheduled is not None else None
        return when

    # -- triggers ---------------------------------------------------------------------------

    def run_now(self, job_id: str, reason: str = "requested") -> bool:
        """Run a job as soon as it is free (once more after the run in flight, if any).
        False when there is no such job or the daemon is not running. Call on the loop."""
        job = self._jobs.get(job_id)
        if job is None or not self._started or self._stopping:
            return False
        self._launch(job, None, reason)
        return True

    async def customers_changed(self, source: str, customer_ids: set[int]) -> None:
        """Webhooks changed these customers: recompute soon, without waiting for a schedule.

        Calls within ``debounce`` s of the first are coalesced into one recompute; the
        recompute then runs the destination syncs whose segments moved, as always.
        """
        if not customer_ids or not self._started or self._stopping:
            return
        self._changed.setdefault(source, set()).update(customer_ids)
        if self._debounce_task is None:
            self._debounce_task = asyncio.create_task(self._debounced(), name="syncd-debounce")

    async def _debounced(self) -> None:
        try:
            await asyncio.sleep(self.debounce)
        finally:
            self._debounce_task = None
        changed, self._changed = self._changed, {}
        if not self._started or self._stopping:
            return
        people = set().union(*changed.values())
        self._launch(
            self._jobs["segments"],
            None,
            f"webhooks changed {len(people)} customers ({', '.join(sorted(changed))})",
            scope=people,
        )

    async def _fire(self, job_id: str) -> None:
        """APScheduler's job: find the slot due and launch its run (quickly: APScheduler
        counts this coroutine as the running instance, our bookkeeping tracks the run)."""
        job = self._jobs[job_id]
        assert job.trigger is not None
        slot = job.trigger.slot_at(_utcnow())
        if slot is not None:
            self._launch(job, slot, "schedule")

    def _launch(
        self,
        job: _Job,
        slot: datetime | None,
        reason: str,
        scope: set[int] | None = None,
        since: datetime | None = None,
    ) -> None:
        """Start ``job`` (or queue it behind its run in flight). For the segments job and
        destination syncs, ``scope`` asks for a run over those customers only (webhook
        changes); any other request makes the next run a full one. ``since``: the run
        must see what was committed up to then (default: now)."""
        if self._stopping:
            return
        if scope is None:
            job.wanted_all = True
        else:
            job.wanted.update(scope)
        if job.task is not None:
            if slot is None:
                wanted_at = since or _utcnow()
                job.rerun = reason
                job.rerun_at = max(job.rerun_at or wanted_at, wanted_at)
            else:
                if job.pending is not None:
                    job.coalesced += 1
                    log.info("job.coalesced", job=job.id, slot=iso(job.pending), into=iso(slot))
                job.pending = slot
            return
        assert self._loop is not None
        job.task = self._loop.create_task(self._run_job(job, slot, reason), name=job.id)

    async def _run_job(self, job: _Job, slot: datetime | None, reason: str) -> None:
        try:
            while True:
                await self._run_once(job, slot, reason)
                if self._stopping:
                    break
                # A request the run that just finished already covered is not run again:
                # at start, the catch-up recompute and the one chained after the first
                # sync were two full recomputes of the same data. (A scheduled trigger
                # always gets its own run: one run per trigger, as replicas count them.)
                if job.rerun is not None and self._served(job, job.rerun_at):
                    log.info("job.served", job=job.id, request=job.rerun)
                    job.rerun = job.rerun_at = None
                    job.wanted, job.wanted_all = set(), False
                if job.pending is not None:
                    # The queued trigger's run also serves any chained request: it starts
                    # after the request arrived, here or (holding the lock) on a replica.
                    slot, reason, job.pending, job.rerun = job.pending, "schedule", None, None
                    job.rerun_at = None
                elif job.rerun is not None:
                    slot, reason, job.rerun, job.rerun_at = None, job.rerun, None, None
                else:
                    break
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not kill the job for good
            log.exception("job.crashed", job=job.id)
        finally:
            job.task = None
            if self._stopping:
                job.pending = job.rerun = None

    @staticmethod
    def _served(job: _Job, since: datetime | None) -> bool:
        """Whether the run that just finished serves a request of ``since``:
        it covered everyone, did not fail, and took the store after that time, so it
        read everything written before."""
        return (
            since is not None
            and job.began_at is not None
            and job.scope is None
            and job.last_status in ("success", "partial")
            and since <= job.began_at
        )

    async def _run_once(self, job: _Job, slot: datetime | None, reason: str) -> None:
        # The job's lock first, then the slot: a lease row then always means the slot ran
        # (or is running).
        held: _HeldLock | None = None
        if self._lock_engine is not None:
            held = await self._acquire(job, slot)
            if held is None:
                return
        if slot is not None:
            try:
                claimed = await self._claim(job.id, slot)
            except BaseException:
                if held is not None:
                    await asyncio.to_thread(self._release, held)
                raise
            if not claimed:
                job.lost += 1
                log.debug("job.slot_taken", job=job.id, slot=iso(slot))
                if held is not None:
                    await asyncio.to_thread(self._release, held)
                return
            job.claimed += 1
        # What the requests since the last run asked for, taken as the run starts.
        job.scope = None if job.wanted_all or not job.wanted else job.wanted
        job.wanted, job.wanted_all = set(), False
        started = time.monotonic()
        outcome = await self._in_thread(job, held)
        self._finished(job, outcome, time.monotonic() - started, reason)

    # -- cross-replica locks ----------------------------------------------------------------

    async def _acquire(self, job: _Job, slot: datetime | None) -> _HeldLock | None:
        """The job's advisory lock, waiting while another replica holds it. None when the
        wait became pointless: the slot was claimed meanwhile (the holder was running this
        very trigger), a newer slot queued behind this one, or the daemon is stopping."""
        assert self._lock_engine is not None
        key = job_lock_key(job.id)
        conn = await asyncio.to_thread(self._lock_engine.connect)
        try:
            while True:
                got = await asyncio.to_thread(
                    lambda: bool(conn.execute(select(func.pg_try_advisory_lock(key))).scalar())
                )
                if got:
                    return _HeldLock(conn, key)
                if self._stopping:
                    break
                if slot is not None:
                    if await asyncio.to_thread(slot_claimed, self.engine, job.id, slot):
                        job.lost += 1  # routine with replicas: the other one ran it
                        log.debug("job.slot_taken", job=job.id, slot=iso(slot))
                        break
                    if job.pending is not None:
                        job.coalesced += 1
                        break
                await asyncio.sleep(self.lock_poll)
        except BaseException:
            await asyncio.to_thread(conn.close)
            raise
        await asyncio.to_thread(conn.close)
        return None

    @staticmethod
    def _release(held: _HeldLock) -> None:
        try:
            held.conn.execute(select(func.pg_advisory_unlock(held.key)))
        except Exception as exc:  # closing the session releases it anyway
            log.warning("job.unlock_failed", error=str(exc))
        finally:
            with contextlib.suppress(Exception):
                held.conn.close()

    # -- running a job ----------------------------------------------------------------------

    async def _in_thread(self, job: _Job, held: _HeldLock | None) -> _Outcome:
        """Run the job on a daemon thread of its own and await its outcome.

        Not asyncio.to_thread: its pool's threads are joined at interpreter exit, so a run
        abandoned at shutdown would hold the process past its stop budget.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_Outcome] = loop.create_future()

        def deliver(outcome: _Outcome) -> None:
            if not future.done():
                future.set_result(outcome)

        def body() -> None:
            try:
                # The recompute is store work only: it holds the writer lock for the run. A
                # source or push run waits on the network, so it takes the lock for each of
                # its write transactions instead (see SourceSync, _Run): a webhook apply
                # never waits behind a store or a destination that does not answer.
                with self._store_writer if job.kind == "segments" else contextlib.nullcontext():
                    if self._stopping:  # waited for the store while the daemon stopped
                        outcome = _Outcome("abandoned", {}, "syncd stopped before the run began")
                    else:
                        job.began_at = _utcnow()
                        outcome = self._execute(job)
                outcome.ended_at = _utcnow()
            except BaseException as exc:  # SystemExit in a job, say: still the run's failure
                outcome = _Outcome("failed", {}, f"{type(exc).__name__}: {exc}")
            finally:
                if held is not None:
                    self._release(held)
                self._thread_done()
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(deliver, outcome)

        with self._threads_lock:
            self._threads += 1
        try:
            threading.Thread(target=body, name=f"syncd-{job.id}", daemon=True).start()
        except BaseException:
            if held is not None:
                self._release(held)
            self._thread_done()
            raise
        return await future

    def _thread_done(self) -> None:
        with self._threads_lock:
            self._threads -= 1
            idle = self._threads == 0
            if idle and self._release_when_idle:
                self._release_when_idle = False
                self._release_store()
        if idle:
            _return_free_memory()

    def _execute(self, job: _Job) -> _Outcome:
        """One run of ``job``, blocking (on the job's thread)."""
        try:
            if job.kind == "source":
                outcome = asyncio.run(self._cancellable(job, self._source(job.name)))
            elif job.kind == "segments":
                outcome = self._recompute(job.scope)
            elif job.kind == "privacy":
                outcome = asyncio.run(self._cancellable(job, self._privacy()))
            else:
                assert job.mapping is not None and job.sync is not None
                pushing = self._push(job.mapping, job.sync, job.scope)
                outcome = asyncio.run(self._cancellable(job, pushing))
        except asyncio.CancelledError:
            # stop() cancelled it; the run recorded itself "abandoned" on the way out.
            log.warning("job.abandoned", job=job.id)
            outcome = _Outcome("abandoned", {}, ABANDONED)
        except Exception as exc:
            log.exception("job.failed", job=job.id)
            outcome = _Outcome("failed", {}, f"{type(exc).__name__}: {exc}")
        if self.alerts is not None:
            try:
                outcome.failures_in_a_row = self._failures_in_a_row(
                    job, self.alerts.settings.consecutive_failures
                )
            except Exception as exc:
                log.warning("job.history_unreadable", job=job.id, error=str(exc))
                outcome.failures_in_a_row = 1 if outcome.status == "failed" else 0
        return outcome

    async def _cancellable(self, job: _Job, run: Coroutine[Any, Any, _Outcome]) -> _Outcome:
        """Await ``run`` on this (the job thread's) loop, cancellable from the service's loop
        through ``job.cancel``: stop() must not wait for a store that never answers."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def cancel() -> None:
            loop.call_soon_threadsafe(task.cancel)

        job.cancel = cancel
        try:
            if self._stopping:  # stop() may have looked for job.cancel before it was set
                run.close()
                raise asyncio.CancelledError
            return await run
        finally:
            job.cancel = None

    async def _source(self, name: str) -> _Outcome:
        runner = SourceSync(
            self.engine, name, self.settings.sources[name], consent=self.settings.consent
        )
        try:
            result = await runner.run()
        finally:
            await runner.client.aclose()
        counts: dict[str, Any] = {s: c.as_dict() for s, c in result.counts.items()}
        counts["requests"] = result.requests
        stored = any(c.stored or c.deleted for c in result.counts.values())
        return _Outcome(result.status, counts, result.error, stored=stored)

    async def _privacy(self) -> _Outcome:
        """The due steps of open forget requests (each failed one waits its back-off), then
        the raw-payload retention when ``[privacy] raw_payload_days`` is set."""
        async with self._store_writer.held():
            run_id = start_run(self.engine, "privacy", "privacy")
        counts: dict[str, Any] = {}
        try:
            results = await retry_pending(self.engine, self.mappings)
            pending = sum(not r.done for r in results)
            counts.update(requests=len(results), pending=pending)
            days = self.settings.privacy.raw_payload_days
            if days is not None:
                async with self._store_writer.held():
                    with self.engine.begin() as conn:
                        cleared = prune_raw_payloads(conn, days)
                counts["raw_payloads_dropped"] = sum(cleared.values())
        except BaseException as exc:
            status = "abandoned" if isinstance(exc, asyncio.CancelledError) else "failed"
            async with self._store_writer.held():
                finish_run(self.engine, run_id, status, counts, str(exc) or type(exc).__name__)
            raise
        outcome = (
            _Outcome("partial", counts, f"{pending} forget request(s) still pending")
            if pending
            else _Outcome("success", counts)
        )
        async with self._store_writer.held():
            finish_run(self.engine, run_id, outcome.status, counts, outcome.error)
        return outcome

    def _recompute(self, scope: set[int] | None) -> _Outcome:
        try:
            result = recompute(self.engine, self.settings, customers=scope)
        except Exception as exc:
            # recompute() recorded the failure in sync_runs and logged it already.
            return _Outcome("failed", {}, str(exc) or type(exc).__name__)
        scoped = result.scope is not None
        # A scoped recompute reports the segments its customers are in, entered or left:
        # their rows there may have changed even where nobody entered or left.
        moved = {
            name
            for name, change in result.segments.items()
            if scoped or change.entered or change.exited
        }
        return _Outcome(
            result.status,
            result.counts(),
            result.error,
            segments_changed=moved,
            scope=scope if scoped else None,
        )

    async def _push(
        self, mapping: LoadedMapping, sync: LoadedSync, scope: set[int] | None
    ) -> _Outcome:
        (result,) = await push(self.engine, [(mapping, sync)], scope=scope)
        return _Outcome(result.status, result.counts.as_json(), result.error)

    def _failures_in_a_row(self, job: _Job, limit: int) -> int:
        """Failed runs of the job counting back from the newest finished one (at most
        ``limit``), read from sync_runs so replicas and restarts agree."""
        with self.engine.connect() as conn:
            statuses = conn.execute(
                select(RUNS.c.status)
                .where(
                    RUNS.c.kind == job.kind,
                    RUNS.c.name == job.name,
                    RUNS.c.status.in_(("success", "partial", "failed")),
                )
                .order_by(RUNS.c.id.desc())
                .limit(limit)
            ).scalars()
            streak = 0
            for status in statuses:
                if status != "failed":
                    break
                streak += 1
        return streak

    def _finished(self, job: _Job, outcome: _Outcome, duration_s: float, reason: str) -> None:
        """Back on the loop: the status line, metrics, alerts, and what the run sets off."""
        job.last_status = outcome.status
        job.last_finished_at = _utcnow()
        log.log(
            _STATUS_LEVELS.get(outcome.status, logging.ERROR),
            "run.status",
            kind=job.kind,
            name=job.name,
            status=outcome.status,
            duration_s=round(duration_s, 3),
            counts=outcome.counts,
            next_run_at=iso(self._next_run_at(job)),
            trigger=reason,
            error=outcome.error,
        )
        if self.metrics is not None:
            try:
                self.metrics.observe_run(
                    job.kind, job.name, outcome.status, duration_s, outcome.counts
                )
            except Exception:
                log.exception("metrics.observe_failed", job=job.id)
        if self.alerts is not None:
            try:
                self.alerts.run_finished(
                    job.kind,
                    job.name,
                    outcome.status,
                    outcome.counts,
                    failures_in_a_row=outcome.failures_in_a_row,
                )
            except Exception:
                log.exception("alerts.failed", job=job.id)
        if outcome.status == "failed" and job.scope is not None and not self._stopping:
            # The customers of a failed scoped run are not dropped: they join the next run,
            # which comes at the latest after a pause (a webhook or the schedule may
            # start one sooner).
            job.wanted |= job.scope
            assert self._loop is not None
            self._loop.call_later(
                SCOPE_RETRY_SECONDS,
                lambda: self._launch(job, None, "retry of a failed run's customers", set()),
            )
        # Chained runs need what this run committed: a run of theirs that took the store
        # after this one let go of it has seen it already (see _served).
        if job.kind == "source" and outcome.stored:
            self._launch(
                self._jobs["segments"],
                None,
                f"source {job.name} stored rows",
                since=outcome.ended_at,
            )
        elif job.kind == "segments" and outcome.status != "failed":
            for dest in self._destinations_for(outcome.segments_changed):
                segment = dest.sync.spec.segment if dest.sync is not None else None
                why = f"segment {segment} changed" if segment else "recomputed"
                # After a scoped recompute a segment sync pushes those customers only.
                self._launch(
                    dest,
                    None,
                    why,
                    scope=outcome.scope if segment else None,
                    since=outcome.ended_at,
                )

    def _destinations_for(self, moved: set[str]) -> list[_Job]:
        """Destination syncs to run after a recompute: those whose segment moved, and SQL
        models (they may read anything the recompute rewrote)."""
        out = []
        for job in self._jobs.values():
            if job.kind != "destination" or job.sync is None:
                continue
            segment = job.sync.spec.segment
            if segment is None or segment in moved:
                out.append(job)
        return out

    # -- the watch: freshness, overdue jobs, lease pruning ------------------------------------

    async def _watch(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.watch_every)
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("daemon.watch_failed")

    async def check(self, now: datetime | None = None) -> dict[str, Any]:
        """Look for stale sources and overdue jobs now (the watch does this every
        ``watch_every`` s) and tell the alerts; returns what was found."""
        now = now or _utcnow()
        overdue = self.overdue_jobs(now)
        stale = await asyncio.to_thread(self.stale_sources, now)
        if self.alerts is not None:
            self.alerts.jobs_overdue(overdue)
            self.alerts.sources_stale(stale)
        if time.monotonic() - self._last_prune > 3600:
            self._last_prune = time.monotonic()
            async with self._store_writer.held():
                await asyncio.to_thread(self._prune_leases, now)
        return {"overdue_jobs": overdue, "stale_sources": stale}

    def stale_sources(self, now: datetime | None = None) -> dict[str, str]:
        """Configured sources without a successful sync within their freshness: name -> why.
        A source that never succeeded counts once the daemon has run that long."""
        now = now or _utcnow()
        with self.engine.connect() as conn:
            last_ok: Mapping[str, datetime | None] = dict(
                conn.execute(
                    select(RUNS.c.name, func.max(RUNS.c.finished_at))
                    .where(RUNS.c.kind == "source", RUNS.c.status.in_(("success", "partial")))
                    .group_by(RUNS.c.name)
                ).all()
            )
        stale: dict[str, str] = {}
        for name, source in self.settings.sources.items():
            freshness = timedelta(minutes=source.freshness_minutes)
            last = last_ok.get(name)
            if last is None:
                since = self._started_at or now
                if now - since > freshness:
                    stale[name] = (
                        f"source {name} has not synced successfully since syncd started "
                        f"{iso(since)} (freshness {source.freshness_minutes:g} min)"
                    )
            elif now - last > freshness:
                stale[name] = (
                    f"source {name} last synced successfully at {iso(last)}, more than "
                    f"{source.freshness_minutes:g} min ago"
                )
        return stale

    async def _claim(self, job_id: str, slot: datetime) -> bool:
        # In turn with the other writers (see WriterLock): a write committed in the middle
        # of a running job's read-then-write transaction makes SQLite refuse its write.
        # Waited for on the loop: a worker thread blocked on the lock would hold up the
        # loop's shutdown until the job lets go.
        async with self._store_writer.held():
            return await asyncio.to_thread(claim_slot, self.engine, job_id, slot, self.owner)

    def _prune_leases(self, now: datetime) -> None:
        """Drop old lease rows (the caller holds the writer lock)."""
        with self.engine.begin() as conn:
            conn.execute(delete(JOB_LEASES).where(JOB_LEASES.c.claimed_at < now - LEASE_RETENTION))


def _return_free_memory() -> None:
    """Hand the heap that the finished jobs freed back to the OS.

    glibc keeps freed memory in its per-thread arenas, and every job runs on a thread of
    its own: without this an idle service kept 40 MB more after a burst of webhook-driven
    runs than before it. A no-op where the C library has no malloc_trim (musl, macOS).
    """
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
