"""Schedules: ``every N s|m|h|d`` or a 5-field cron expression (UTC), for source syncs, the
segment recompute and destination pushes; and the APScheduler triggers they become.

Interval schedules count from a fixed `ANCHOR`, so every replica (and every restart)
agrees on the nominal fire times ("slots"): a 15-minute schedule fires at :00, :15, :30
and :45 UTC. Jitter is added on top of a slot and never changes it.
"""

from __future__ import annotations

import functools
import math
import random
import re
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from apscheduler.triggers.base import BaseTrigger  # type: ignore[import-untyped]
from apscheduler.triggers.cron import CronTrigger  # type: ignore[import-untyped]
from apscheduler.triggers.interval import IntervalTrigger  # type: ignore[import-untyped]

__all__ = [
    "ANCHOR",
    "MIN_INTERVAL_SECONDS",
    "Schedule",
    "ScheduleError",
    "SlotTrigger",
    "every",
    "parse_schedule",
]

ANCHOR: Final = datetime(2000, 1, 1, tzinfo=UTC)

# The shortest ``every N`` schedule. Each push reads its whole segment or model and diffs
# it against what was sent, each source run asks the store for every stream: every second
# (what "every 0 s" did) a large job would run back to back and load the store and the
# other side for nothing. A cron expression fires once a minute at most.
MIN_INTERVAL_SECONDS: Final = 10

_INTERVAL_RE: Final = re.compile(r"every\s+(\d+)\s*(s|m|h|d)")
_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# A cron schedule's longest wait between two runs is looked for over this many fire times
# (or this long): enough for weekday-only and monthly expressions.
_CRON_SAMPLES: Final = 400
_CRON_HORIZON: Final = timedelta(days=400)


class ScheduleError(ValueError):
    """A schedule that cannot be read; the message says what was expected."""


@dataclass(frozen=True)
class Schedule:
    """A parsed schedule: ``text`` as written (shown in logs and ``/status``), and the
    interval in seconds, or None for a cron expression."""

    text: str
    seconds: float | None

    def trigger(self, jitter: float = 0.0) -> SlotTrigger:
        """An APScheduler trigger firing on this schedule, each run up to ``jitter`` s late
        (never more than half an interval: one slot's run must not pass the next slot)."""
        if self.seconds is None:
            # A cron expression fires once a minute at most: half of that.
            cron = CronTrigger.from_crontab(self.text, timezone=UTC)
            return SlotTrigger(cron, min(jitter, 30.0), self.text)
        inner = IntervalTrigger(seconds=self.seconds, start_date=ANCHOR, timezone=UTC)
        return SlotTrigger(inner, min(jitter, self.seconds / 2), self.text)

    def longest_wait(self) -> float:
        """The longest time in seconds between two runs (a cron expression's longest gap),
        what a freshness check allows between successes."""
        return self.seconds if self.seconds is not None else _longest_cron_gap(self.text)


@functools.cache
def _longest_cron_gap(expression: str) -> float:
    cron = CronTrigger.from_crontab(expression, timezone=UTC)
    previous: datetime | None = None
    longest = 0.0
    moment = ANCHOR
    for _ in range(_CRON_SAMPLES):
        fire: datetime | None = cron.get_next_fire_time(previous, moment)
        if fire is None or fire - ANCHOR > _CRON_HORIZON:
            break
        if previous is not None:
            longest = max(longest, (fire - previous).total_seconds())
        previous, moment = fire, fire + timedelta(seconds=1)
    return longest


def parse_schedule(text: str) -> Schedule:
    """``every N s|m|h|d`` (at least `MIN_INTERVAL_SECONDS`) or a 5-field cron expression
    in UTC; ScheduleError saying what was expected otherwise."""
    stripped = text.strip()
    match = _INTERVAL_RE.fullmatch(stripped)
    if match:
        seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        if seconds < MIN_INTERVAL_SECONDS:
            raise ScheduleError(
                f"expected an interval of at least {MIN_INTERVAL_SECONDS} s, got {text!r}"
            )
        return Schedule(stripped, float(seconds))
    try:
        CronTrigger.from_crontab(stripped, timezone="UTC")
    except ValueError as exc:
        raise ScheduleError(
            f"expected 'every N s|m|h|d' or a 5-field cron expression, got {text!r} ({exc})"
        ) from None
    return Schedule(stripped, None)


def every(seconds: float) -> Schedule:
    """An interval of ``seconds`` as the older keys give it (a source's
    ``sync_every_minutes``): any positive length, described as ``every {seconds}s``."""
    return Schedule(f"every {seconds:g}s", seconds)


class SlotTrigger(BaseTrigger):  # type: ignore[misc]
    """A trigger without jitter (``inner``) plus our own jitter, remembering which nominal
    fire time (the slot) each jittered fire time stands for.

    APScheduler hands a job neither its scheduled time nor its trigger's; the job asks
    `slot_at` for the slot of the latest fire time due. APScheduler computes the next
    fire time from the previous *jittered* one; mapping it back to its nominal time keeps
    jitter from accumulating (and keeps every replica's slots the same).
    """

    def __init__(self, inner: Any, jitter: float, description: str) -> None:
        self.inner = inner
        self.jitter = max(0.0, jitter)
        self.description = description
        self._fires: deque[tuple[datetime, datetime]] = deque(maxlen=64)
        self._rng = random.Random()

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        # An unknown previous time (fell out of the history) restarts from ``now``: the
        # inner trigger then lands on the shared grid again rather than drift by jitter.
        previous = None
        if previous_fire_time is not None:
            previous = next(
                (nominal for fire, nominal in self._fires if fire == previous_fire_time), None
            )
        nominal: datetime | None = self.inner.get_next_fire_time(previous, now)
        if nominal is None:
            return None
        fire = (
            nominal + timedelta(seconds=self._rng.uniform(0, self.jitter))
            if self.jitter
            else nominal
        )
        self._fires.append((fire, nominal))
        return fire

    def slot_at(self, moment: datetime) -> datetime | None:
        """The nominal time of the latest fire time at or before ``moment``."""
        due = [(fire, nominal) for fire, nominal in self._fires if fire <= moment]
        return max(due)[1] if due else None

    def previous_slot(self, now: datetime) -> datetime | None:
        """The latest nominal fire time at or before ``now`` (interval schedules only)."""
        if not isinstance(self.inner, IntervalTrigger):
            return None
        start = self.inner.start_date.timestamp()
        length: float = self.inner.interval_length
        if now.timestamp() < start:
            return None
        n = math.floor((now.timestamp() - start) / length)
        return datetime.fromtimestamp(start + n * length, tz=UTC)

    def __str__(self) -> str:
        return self.description
