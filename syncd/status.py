"""What the store holds and how fresh it is: the data behind ``syncd status`` (and ``/status``).

The JSON shape is a documented contract (README, "syncd status --json"): keys are only
ever added.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, func, select

from syncd.config import Settings, mask_url_password
from syncd.ingest import TABLE_OF_ENTITY
from syncd.privacy import pending_steps
from syncd.runs import iso
from syncd.sources import SOURCE_TYPES, source_class
from syncd.sources.base import Stream
from syncd.store.migrate import current_revision
from syncd.store.models import (
    CUSTOMERS,
    MEMBERSHIPS,
    ORDERS,
    PROFILES,
    QUARANTINE,
    SYNC_RECORDS,
)
from syncd.store.models import SYNC_RUNS as RUNS
from syncd.store.models import SYNC_STATE as STATE

STATUS_VERSION = 1


def _run_json(row: Any) -> dict[str, Any] | None:
    if row is None:
        return None
    duration = (
        (row.finished_at - row.started_at).total_seconds()
        if row.finished_at and row.started_at
        else None
    )
    return {
        "id": row.id,
        "status": row.status,
        "started_at": iso(row.started_at),
        "finished_at": iso(row.finished_at),
        "duration_s": round(duration, 3) if duration is not None else None,
        "counts": row.counts or {},
        "error": row.error,
    }


def _last_run(conn: Any, *where: Any) -> Any:
    """The newest run matching ``where``, or None."""
    return conn.execute(
        select(RUNS).where(*where).order_by(RUNS.c.started_at.desc(), RUNS.c.id.desc()).limit(1)
    ).first()


def _streams_of(settings: Settings, name: str) -> dict[str, Stream]:
    """A source's declared streams; for one no longer configured (its rows are still in the
    store), every registered type's."""
    configured = settings.sources.get(name)
    types = [configured.type] if configured is not None else list(SOURCE_TYPES)
    return {k: v for t in reversed(types) for k, v in source_class(t).streams.items()}


def collect_status(
    engine: Engine, settings: Settings, now: datetime | None = None
) -> dict[str, Any]:
    now = now or datetime.now(UTC)
    out: dict[str, Any] = {
        "version": STATUS_VERSION,
        "generated_at": iso(now),
        "store": {
            "url": mask_url_password(settings.store.url),
            "dialect": engine.dialect.name,
            "schema_revision": current_revision(engine),
        },
        "sources": {},
        "totals": {},
    }
    with engine.connect() as conn:
        names = sorted(
            set(settings.sources)
            | {r[0] for r in conn.execute(select(STATE.c.source).distinct())}
            | {
                r[0]
                for r in conn.execute(select(RUNS.c.name).where(RUNS.c.kind == "source").distinct())
            }
        )
        for name in names:
            last = _last_run(conn, RUNS.c.kind == "source", RUNS.c.name == name)
            last_ok = conn.execute(
                select(func.max(RUNS.c.finished_at)).where(
                    RUNS.c.kind == "source",
                    RUNS.c.name == name,
                    RUNS.c.status.in_(("success", "partial")),
                )
            ).scalar()
            states = {
                r.stream: r for r in conn.execute(select(STATE).where(STATE.c.source == name))
            }
            quarantined: dict[str, int] = dict(
                conn.execute(
                    select(QUARANTINE.c.stream, func.count())
                    .where(QUARANTINE.c.source == name)
                    .group_by(QUARANTINE.c.stream)
                ).all()
            )
            streams: dict[str, Any] = {}
            for stream, declared in _streams_of(settings, name).items():
                table = TABLE_OF_ENTITY[declared.entity]
                rows = conn.execute(
                    select(func.count()).where(table.c.source == name, table.c.deleted_at.is_(None))
                ).scalar()
                deleted = conn.execute(
                    select(func.count()).where(
                        table.c.source == name, table.c.deleted_at.is_not(None)
                    )
                ).scalar()
                main = states.get(stream)
                streams[stream] = {
                    "cursor": iso(main.cursor) if main else None,
                    "cursors": {
                        k: iso(v.cursor)
                        for k, v in sorted(states.items())
                        if k.split(":")[0] == stream and v.cursor
                    },
                    "rows": rows,
                    "deleted": deleted,
                    "quarantined": quarantined.get(stream, 0),
                    "reconciled_at": iso(main.reconciled_at) if main else None,
                }
            out["sources"][name] = {
                "configured": name in settings.sources,
                "last_run": _run_json(last),
                "last_success_at": iso(last_ok),
                "streams": streams,
            }
        out["segments"] = _segments(conn, settings)
        out["destinations"] = _destinations(conn)
        # Erasure steps not yet done, with their reason: each is tried again by the next
        # `syncd forget` of the person or the service's retry.
        out["privacy"] = {"pending_steps": pending_steps(conn)}
        out["totals"] = {
            "customers": conn.execute(select(func.count()).select_from(CUSTOMERS)).scalar(),
            "orders": conn.execute(
                select(func.count()).where(ORDERS.c.deleted_at.is_(None))
            ).scalar(),
            "quarantined": conn.execute(select(func.count()).select_from(QUARANTINE)).scalar(),
            "profiles": conn.execute(select(func.count()).select_from(PROFILES)).scalar(),
        }
    return out


def _segments(conn: Any, settings: Settings) -> dict[str, Any]:
    """The last recompute and every segment's current size (open memberships)."""
    last = _last_run(conn, RUNS.c.kind == "segments")
    sizes: dict[str, int] = dict(
        conn.execute(
            select(MEMBERSHIPS.c.segment, func.count())
            .where(MEMBERSHIPS.c.exited_at.is_(None))
            .group_by(MEMBERSHIPS.c.segment)
        ).all()
    )
    return {
        "last_run": _run_json(last),
        "sizes": {
            name: {"size": sizes.get(name, 0), "configured": name in settings.segments}
            for name in sorted(set(settings.segments) | set(sizes))
        },
    }


def _destinations(conn: Any) -> dict[str, Any]:
    """Every destination sync that has run or holds records: its last run (with the run's
    counts) and what its records say now."""
    runs = {
        r[0]
        for r in conn.execute(select(RUNS.c.name).where(RUNS.c.kind == "destination").distinct())
    }
    held: dict[str, dict[str, int]] = {}
    # A refused record with no next try is given up (until --retry-failed).
    waiting = SYNC_RECORDS.c.retry_after.is_not(None)
    for name, status, in_dest, will_retry, n in conn.execute(
        select(
            SYNC_RECORDS.c.sync,
            SYNC_RECORDS.c.status,
            SYNC_RECORDS.c.in_destination,
            waiting,
            func.count(),
        ).group_by(
            SYNC_RECORDS.c.sync, SYNC_RECORDS.c.status, SYNC_RECORDS.c.in_destination, waiting
        )
    ):
        counts = held.setdefault(name, _no_records())
        if in_dest:
            counts["in_destination"] += n
        if status in ("failed", "skipped"):
            counts[status] += n
        if status == "failed" and not will_retry:
            counts["given_up"] += n
    return {
        name: {
            "last_run": _run_json(
                _last_run(conn, RUNS.c.kind == "destination", RUNS.c.name == name)
            ),
            "records": held.get(name, _no_records()),
        }
        for name in sorted(runs | set(held))
    }


def _no_records() -> dict[str, int]:
    # given_up: of the failed, those refused on their last try (never sent again alone).
    return {"in_destination": 0, "failed": 0, "given_up": 0, "skipped": 0}
