"""Prometheus metrics for ``syncd run``, served at ``/metrics``.

Every syncd metric lives in the `Metrics` object's own `CollectorRegistry` (not the
client library's global one), so several apps in one process (tests) never collide.
Two kinds of values:

* counted in this process, fed by the daemon (`Metrics.observe_run` after every run)
  and by the webhook intake (`Metrics.webhook_delivery`, `Metrics.webhook_lag`); they
  start at zero when the process starts, as Prometheus counters do;
* read when scraped: the HTTP clients' counters (`syncd.http.service_stats`), and from
  the store: segment sizes, each job's last success, the webhook backlog. Those are the
  same on every replica of one Postgres store.

Metrics (label values in braces):

``syncd_runs_total{kind,name,status}`` (counter)
    Finished runs. ``kind`` is ``source``, ``segments`` or ``destination``; ``name`` the
    source, ``segments``' run name or the destination sync; ``status`` ``success``,
    ``partial`` or ``failed``.
``syncd_run_failures_total{kind,name}`` (counter)
    Runs that ended ``failed`` (a ``partial`` run stored what it could and is not one).
``syncd_run_duration_seconds{kind,name}`` (histogram)
    Wall-clock time of each run.
``syncd_rows_total{kind,name,outcome}`` (counter)
    Rows handled by runs, from the counts each run records in ``sync_runs``. Sources
    (summed over streams): ``fetched``, ``stored``, ``quarantined``, ``deleted``.
    Destination syncs: ``added``, ``updated``, ``removed``, ``unchanged``, ``failed``
    (refused by the destination), ``skipped``. Segment recomputes: ``profiles``.
``syncd_segment_changes_total{segment,direction}`` (counter)
    Customers who ``entered`` or ``exited`` a segment, per recompute.
``syncd_last_success_timestamp_seconds{kind,name}`` (gauge, read from the store)
    Unix time the last ``success`` or ``partial`` run of that job finished; alert on
    ``time() - syncd_last_success_timestamp_seconds`` to catch stale sources. Backtests
    (kind ``backtest``) are no job and are left out.
``syncd_segment_size{segment}`` (gauge, read from the store)
    Current members of each segment (open memberships); configured segments with no
    members report 0.
``syncd_http_requests_total{service}``, ``syncd_http_retries_total{service}``,
``syncd_http_throttles_total{service}``, ``syncd_http_errors_total{service}`` (counters)
    Calls to remote services (a WooCommerce source, Klaviyo, Mailchimp, …): attempts
    sent, retries scheduled, throttling met (429 answers and rate-limit pauses) and
    calls that finally failed.
``syncd_http_responses_total{service,code}`` (counter)
    Answers received, by HTTP status code.
``syncd_webhook_deliveries_total{source,status}`` (counter)
    Webhook deliveries by outcome, as the intake reports them (e.g. ``accepted``,
    ``duplicate``, ``rejected``, ``applied``, ``failed``).
``syncd_webhook_lag_seconds{source}`` (histogram)
    Time from a delivery's receipt to its being applied to the store.
``syncd_webhook_events_pending{source}`` (gauge, read from the store)
    Deliveries stored but not applied yet (the backlog); absent until the ``events``
    table exists.
``syncd_store_up`` (gauge)
    1 when the scrape's store queries succeeded, else 0 (the values read from the store
    are then missing from that scrape).
``syncd_info{version}`` (gauge, always 1)
    The running syncd version.

The standard ``process_*`` metrics (CPU seconds, resident memory, open file
descriptors, start time) of the client library's process collector are included too.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, inspect, select, text
from sqlalchemy.exc import SQLAlchemyError

from syncd import __version__
from syncd.config import Settings
from syncd.http import service_stats
from syncd.log import get_logger
from syncd.runs import BACKTEST
from syncd.store.models import MEMBERSHIPS, SYNC_RECORDS
from syncd.store.models import SYNC_RUNS as RUNS

__all__ = ["RUN_DURATION_BUCKETS", "WEBHOOK_LAG_BUCKETS", "Metrics"]

log = get_logger("syncd.metrics")

# Runs range from sub-second (an incremental sync with nothing new) to an hour (a first
# full sync of a large store); the buckets cover that range at roughly 2-3x steps.
RUN_DURATION_BUCKETS: Final = (
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
)
# The webhook target is receipt -> destination in 2 s at p95, so the resolution sits
# below and around that; the tail buckets show a worker that fell behind.
WEBHOOK_LAG_BUCKETS: Final = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)

# Which per-run counts become syncd_rows_total outcomes, by kind. Anything else in a
# run's counts (requests, passes, reasons) is either covered by another metric or
# would be an unbounded label.
_SOURCE_OUTCOMES: Final = ("fetched", "stored", "quarantined", "deleted")
_DESTINATION_OUTCOMES: Final = ("added", "updated", "removed", "unchanged", "failed", "skipped")
_SEGMENTS_OUTCOMES: Final = ("profiles",)

_SUCCESS_STATUSES: Final = ("success", "partial")


def _count(value: object) -> int:
    """A non-negative integer count, or 0 for anything else (bools, floats, junk)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return 0


def row_outcomes(kind: str, counts: Mapping[str, Any]) -> dict[str, int]:
    """The syncd_rows_total increments of one run's ``counts`` (as stored in sync_runs)."""
    out: dict[str, int] = {}
    if kind == "source":
        # {stream: {fetched, stored, ...}, "requests": n}: summed over streams.
        for stream_counts in counts.values():
            if isinstance(stream_counts, Mapping):
                for outcome in _SOURCE_OUTCOMES:
                    n = _count(stream_counts.get(outcome))
                    if n:
                        out[outcome] = out.get(outcome, 0) + n
    else:
        outcomes = _DESTINATION_OUTCOMES if kind == "destination" else _SEGMENTS_OUTCOMES
        for outcome in outcomes:
            n = _count(counts.get(outcome))
            if n:
                out[outcome] = n
    return out


class _HttpStatsCollector(Collector):
    """The HTTP clients' process-wide counters, read at scrape time."""

    def collect(self) -> Iterable[Metric]:
        stats = service_stats()
        families = {
            field: CounterMetricFamily(f"syncd_http_{field}", help_, labels=["service"])
            for field, help_ in (
                ("requests", "HTTP attempts sent to a remote service."),
                ("retries", "Retries scheduled after a failed attempt."),
                ("throttles", "429 answers and rate-limit pauses met."),
                ("errors", "Calls that finally failed (after retries, or not retryable)."),
            )
        }
        responses = CounterMetricFamily(
            "syncd_http_responses",
            "HTTP answers received from a remote service, by status code.",
            labels=["service", "code"],
        )
        for service, s in sorted(stats.items()):
            for field, family in families.items():
                family.add_metric([service], getattr(s, field))
            for code, n in sorted(s.by_status.items()):
                responses.add_metric([service, str(code)], n)
        yield from families.values()
        yield responses


class _StoreCollector(Collector):
    """Values read from the store at scrape time: the same on every replica."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self._engine = engine
        self._settings = settings
        self._events_table = False  # found once, then assumed to stay (migrations add only)
        self._was_up = True
        self._lock = threading.Lock()

    def _has_events_table(self) -> bool:
        if not self._events_table:
            self._events_table = inspect(self._engine).has_table("events")
        return self._events_table

    def collect(self) -> Iterator[Metric]:
        try:
            families = self._read()
        except SQLAlchemyError as exc:
            # /metrics must keep answering when the store is down: that is exactly when
            # the operator looks at it. syncd_store_up says why values are missing.
            with self._lock:
                if self._was_up:
                    log.warning("metrics.store_unreachable", error=str(exc).splitlines()[0])
                self._was_up = False
            yield GaugeMetricFamily(
                "syncd_store_up", "1 when the store answered the scrape's queries.", value=0
            )
            return
        with self._lock:
            self._was_up = True
        yield GaugeMetricFamily(
            "syncd_store_up", "1 when the store answered the scrape's queries.", value=1
        )
        yield from families

    def _read(self) -> list[Metric]:
        last_success = GaugeMetricFamily(
            "syncd_last_success_timestamp_seconds",
            "Unix time the job's last successful (or partial) run finished.",
            labels=["kind", "name"],
        )
        sizes = GaugeMetricFamily(
            "syncd_segment_size",
            "Current members of the segment (open memberships).",
            labels=["segment"],
        )
        families: list[Metric] = [last_success, sizes]
        with self._engine.connect() as conn:
            for kind, name, finished in conn.execute(
                select(RUNS.c.kind, RUNS.c.name, func.max(RUNS.c.finished_at))
                # A backtest is no job: its age says nothing about the service.
                .where(RUNS.c.status.in_(_SUCCESS_STATUSES), RUNS.c.kind != BACKTEST)
                .group_by(RUNS.c.kind, RUNS.c.name)
                .order_by(RUNS.c.kind, RUNS.c.name)
            ):
                if finished is not None:
                    last_success.add_metric([kind, name], finished.timestamp())
            counted: dict[str, int] = dict(
                conn.execute(
                    select(MEMBERSHIPS.c.segment, func.count())
                    .where(MEMBERSHIPS.c.exited_at.is_(None))
                    .group_by(MEMBERSHIPS.c.segment)
                ).all()
            )
            for segment in sorted(set(self._settings.segments) | set(counted)):
                sizes.add_metric([segment], counted.get(segment, 0))
            given_up = GaugeMetricFamily(
                "syncd_destination_given_up_rows",
                "Rows the destination refused on their last try: sent again only by "
                "syncd push --retry-failed (or when their content changes).",
                labels=["sync"],
            )
            for sync, n in conn.execute(
                select(SYNC_RECORDS.c.sync, func.count())
                .where(SYNC_RECORDS.c.status == "failed", SYNC_RECORDS.c.retry_after.is_(None))
                .group_by(SYNC_RECORDS.c.sync)
                .order_by(SYNC_RECORDS.c.sync)
            ):
                given_up.add_metric([sync], n)
            families.append(given_up)
            if self._has_events_table():
                pending = GaugeMetricFamily(
                    "syncd_webhook_events_pending",
                    "Webhook deliveries stored but not applied yet.",
                    labels=["source"],
                )
                backlog: dict[str, int] = dict(
                    conn.execute(
                        text(
                            "SELECT source, count(*) FROM events "
                            "WHERE status = 'pending' GROUP BY source"
                        )
                    ).all()
                )
                for source in sorted(set(self._settings.sources) | set(backlog)):
                    pending.add_metric([source], backlog.get(source, 0))
                families.append(pending)
        return families


class Metrics:
    """The service's metrics: what the daemon and the webhook intake report, plus
    values read from the store and the HTTP clients at scrape time.

    Thread-safe: runs report from worker threads while the HTTP side scrapes.
    """

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.registry = CollectorRegistry()
        self.runs = Counter(
            "syncd_runs_total",
            "Finished runs by kind, name and status.",
            ["kind", "name", "status"],
            registry=self.registry,
        )
        self.run_failures = Counter(
            "syncd_run_failures_total",
            "Runs that ended failed.",
            ["kind", "name"],
            registry=self.registry,
        )
        self.run_duration = Histogram(
            "syncd_run_duration_seconds",
            "Wall-clock duration of runs.",
            ["kind", "name"],
            buckets=RUN_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.rows = Counter(
            "syncd_rows_total",
            "Rows handled by runs, by outcome.",
            ["kind", "name", "outcome"],
            registry=self.registry,
        )
        self.segment_changes = Counter(
            "syncd_segment_changes_total",
            "Customers who entered or exited a segment.",
            ["segment", "direction"],
            registry=self.registry,
        )
        self.webhook_deliveries = Counter(
            "syncd_webhook_deliveries_total",
            "Webhook deliveries by outcome.",
            ["source", "status"],
            registry=self.registry,
        )
        self.webhook_lag_seconds = Histogram(
            "syncd_webhook_lag_seconds",
            "Seconds from a webhook delivery's receipt to its being applied.",
            ["source"],
            buckets=WEBHOOK_LAG_BUCKETS,
            registry=self.registry,
        )
        info = Gauge(
            "syncd_info", "The running syncd version.", ["version"], registry=self.registry
        )
        info.labels(__version__).set(1)
        # Configured sources show up at 0 before their first run, so a dashboard or an
        # alert on increase() has a series from the start.
        for source in settings.sources:
            self.run_failures.labels("source", source)
            self.run_duration.labels("source", source)
        self.registry.register(_HttpStatsCollector())
        self.registry.register(_StoreCollector(engine, settings))
        ProcessCollector(registry=self.registry)

    def observe_run(
        self,
        kind: str,
        name: str,
        status: str,
        duration_s: float,
        counts: Mapping[str, Any],
    ) -> None:
        """Record one finished run: ``counts`` as recorded in its ``sync_runs`` row."""
        self.runs.labels(kind, name, status).inc()
        if status == "failed":
            self.run_failures.labels(kind, name).inc()
        self.run_duration.labels(kind, name).observe(max(0.0, duration_s))
        for outcome, n in row_outcomes(kind, counts).items():
            self.rows.labels(kind, name, outcome).inc(n)
        if kind == "segments":
            changes = counts.get("segments")
            if isinstance(changes, Mapping):
                for segment, change in changes.items():
                    if not isinstance(change, Mapping):
                        continue
                    for direction in ("entered", "exited"):
                        n = _count(change.get(direction))
                        if n:
                            self.segment_changes.labels(segment, direction).inc(n)

    def webhook_delivery(self, source: str, status: str, count: int = 1) -> None:
        """Count webhook deliveries with their outcome (accepted, duplicate, rejected, …)."""
        self.webhook_deliveries.labels(source, status).inc(count)

    def webhook_lag(self, source: str, seconds: float) -> None:
        """Observe one delivery's receipt-to-applied time."""
        self.webhook_lag_seconds.labels(source).observe(max(0.0, seconds))

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition (body, content type) for a scrape with this Accept header:
        the Prometheus text format, or OpenMetrics when the scraper asks for it.

        Blocking (it queries the store): call it off the event loop.
        """
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
