"""The `sync_runs` bookkeeping every kind of run shares: source syncs, segment recomputes,
destination syncs."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, insert, update

from syncd.store.models import SYNC_RUNS as RUNS

# The kind of a backtest's run (``syncd segments --as-of``): a run of its own, never
# taken for a job's last run (status, alerts, metrics and the daemon look for kind
# "segments"), since it describes a past day and changed nothing.
BACKTEST = "backtest"


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso(value: datetime | None) -> str | None:
    """A time as syncd prints it: ISO 8601 in UTC with a ``Z``; None for None."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value else None


def start_run(engine: Engine, kind: str, name: str) -> int:
    """Record a run as started; a run of the same kind and name still "running" was cut off
    (killed, power loss) and is marked "abandoned": its committed work stands."""
    with engine.begin() as conn:
        conn.execute(
            update(RUNS)
            .where(RUNS.c.kind == kind, RUNS.c.name == name, RUNS.c.status == "running")
            .values(
                status="abandoned",
                finished_at=utc_now(),
                error="the process stopped before the run finished",
            )
        )
        run_id: int = conn.execute(
            insert(RUNS)
            .values(kind=kind, name=name, started_at=utc_now(), status="running", counts={})
            .returning(RUNS.c.id)
        ).scalar_one()
    return run_id


def finish_run(
    engine: Engine, run_id: int, status: str, counts: dict[str, Any], error: str | None
) -> None:
    with engine.begin() as conn:
        conn.execute(
            update(RUNS)
            .where(RUNS.c.id == run_id)
            .values(finished_at=utc_now(), status=status, counts=counts, error=error)
        )
