"""Alerts: an error line and an optional Slack-compatible POST, once per incident.

An *incident* is a named condition that is either open or not: ``failures:<kind>:<name>``
(a job failed ``consecutive_failures`` times in a row), ``rejected:<sync>`` (a destination
sync's refused rows passed ``rejected_share``), ``given_up:<sync>`` (a destination sync
holds rows refused on their last try), ``stale:<source>`` (a source has not
succeeded within its freshness) and ``overdue:<job>`` (a scheduled job's next run is past
due: a job that silently never runs). Opening an incident logs an error and posts
``{"text": ...}`` to ``alerts.slack_webhook_url`` when one is configured; while it stays
open nothing more is sent; when the condition clears, a recovery notice is logged and
posted the same way.

The daemon feeds the facts in (after every run, and from its periodic watch); this module
only decides when an incident opens or closes and delivers the messages. Delivery runs
on a background task in order (an alert is never overtaken by its own recovery) and never
delays or fails the job that reported it: a webhook that is down costs a warning line.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import httpx

from syncd.config import AlertSettings
from syncd.http import ApiError, ServiceClient, ServiceLimits
from syncd.log import get_logger

__all__ = ["ALERT_LIMITS", "Alerts", "Notice", "rejected_share"]

log = get_logger("syncd.alerts")

# A chat webhook is a courtesy channel: a few quick tries, then give up (the error line
# is already in the log). Long retries would pile up messages behind a dead endpoint.
ALERT_LIMITS: Final = ServiceLimits(
    requests_per_second=None,
    concurrency=1,
    max_attempts=3,
    max_elapsed=20.0,
    timeout=10.0,
    backoff_base=0.5,
    backoff_max=5.0,
)


@dataclass(frozen=True)
class Notice:
    """One message: an incident opening (``recovered=False``) or closing."""

    key: str
    text: str
    recovered: bool

    @property
    def message(self) -> str:
        return f"syncd recovered: {self.text}" if self.recovered else f"syncd alert: {self.text}"


def rejected_share(counts: Mapping[str, Any]) -> float | None:
    """failed / (added + updated + removed + failed) of a destination run's counts, or
    None when the run sent nothing (no evidence either way)."""

    def n(key: str) -> int:
        value = counts.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    failed = n("failed")
    total = n("added") + n("updated") + n("removed") + failed
    return failed / total if total else None


def _describe(kind: str, name: str) -> str:
    if kind == "segments":
        return "the segment recompute"
    if kind == "destination":
        return f"destination sync {name}"
    return f"{kind} {name}"


class Alerts:
    """Incident state and delivery. Call the methods from the event loop."""

    def __init__(
        self,
        settings: AlertSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        limits: ServiceLimits = ALERT_LIMITS,
    ) -> None:
        self.settings = settings
        self._transport = transport
        self._limits = limits
        self._open: dict[str, str] = {}
        self._queue: asyncio.Queue[Notice] | None = None
        self._sender: asyncio.Task[None] | None = None
        self.sent: list[Notice] = []  # delivered to the webhook (for status and tests)
        self.undelivered = 0  # POSTs that failed

    # -- state ---------------------------------------------------------------------------

    @property
    def incidents(self) -> dict[str, str]:
        """Open incidents: key -> what the alert said."""
        return dict(self._open)

    def open(self, key: str, text: str) -> bool:
        """Open incident ``key`` unless it is open already; True when it was opened now."""
        if key in self._open:
            return False
        self._open[key] = text
        log.error("alert", incident=key, text=text)
        self._deliver(Notice(key, text, recovered=False))
        return True

    def close(self, key: str, text: str | None = None) -> bool:
        """Close incident ``key`` if open, with a recovery notice; True when it was open."""
        opened = self._open.pop(key, None)
        if opened is None:
            return False
        text = text or f"cleared: {opened}"
        log.warning("alert.recovered", incident=key, text=text)
        self._deliver(Notice(key, text, recovered=True))
        return True

    # -- the facts the daemon reports ---------------------------------------------------------

    def run_finished(
        self,
        kind: str,
        name: str,
        status: str,
        counts: Mapping[str, Any],
        *,
        failures_in_a_row: int,
    ) -> None:
        """A run ended. ``failures_in_a_row`` counts this run (0 when it did not fail);
        the daemon reads it from ``sync_runs``, so replicas and restarts agree on it."""
        threshold = self.settings.consecutive_failures
        key = f"failures:{kind}:{name}"
        what = _describe(kind, name)
        if status == "failed" and failures_in_a_row >= threshold:
            self.open(key, f"{what} failed {failures_in_a_row} times in a row")
        elif status in ("success", "partial"):
            self.close(key, f"{what} succeeded again ({status})")
        if kind == "destination" and status != "failed":
            share = rejected_share(counts)
            limit = self.settings.rejected_share
            key = f"rejected:{name}"
            if share is not None and share > limit:
                failed = counts.get("failed")
                self.open(
                    key,
                    f"destination sync {name}: the destination refused {failed} rows "
                    f"({share:.1%} of those sent, threshold {limit:.1%})",
                )
            else:
                self.close(key, f"destination sync {name}: refused rows back under {limit:.1%}")
        if kind == "destination":
            self._given_up(name, status, counts)

    def _given_up(self, name: str, status: str, counts: Mapping[str, Any]) -> None:
        """Rows given up are sent by nothing but ``push --retry-failed``: never silent."""
        given_up = counts.get("given_up")
        key = f"given_up:{name}"
        if isinstance(given_up, int) and given_up > 0:
            self.open(
                key,
                f"destination sync {name}: {given_up} rows given up after repeated refusals "
                f"(`syncd push --retry-failed {name}` sends them again)",
            )
        elif status != "failed":  # a failed run may have stopped before counting them
            self.close(key, f"destination sync {name}: no rows given up any more")

    def sources_stale(self, stale: Mapping[str, str]) -> None:
        """The stale sources now (source -> why); every other source is fresh."""
        self._sync_set("stale:", stale, "source {name} is syncing again")

    def jobs_overdue(self, overdue: Iterable[str]) -> None:
        """The scheduled jobs whose next run is overdue now; every other job is on time."""
        self._sync_set(
            "overdue:",
            {job: f"job {job} is overdue: its scheduled run did not start" for job in overdue},
            "job {name} runs on schedule again",
        )

    def _sync_set(self, prefix: str, current: Mapping[str, str], recovery: str) -> None:
        for name, text in current.items():
            self.open(prefix + name, text)
        for key in [k for k in self._open if k.startswith(prefix)]:
            name = key[len(prefix) :]
            if name not in current:
                self.close(key, recovery.format(name=name))

    # -- delivery --------------------------------------------------------------------------

    def _deliver(self, notice: Notice) -> None:
        if self.settings.slack_webhook_url is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            log.warning("alert.not_sent", incident=notice.key, reason="no event loop running")
            return
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._sender is None or self._sender.done():
            self._sender = loop.create_task(self._send_loop(self._queue), name="syncd-alerts")
        self._queue.put_nowait(notice)

    async def _send_loop(self, queue: asyncio.Queue[Notice]) -> None:
        url = self.settings.slack_webhook_url
        assert url is not None
        async with ServiceClient("alerts", limits=self._limits, transport=self._transport) as http:
            while True:
                notice = await queue.get()
                try:
                    await http.request(
                        "POST", url.get_secret_value(), json={"text": notice.message}
                    )
                    self.sent.append(notice)
                except ApiError as exc:
                    # The URL is a secret (Slack's carries its token in the path): the
                    # error names the service, never the address.
                    self.undelivered += 1
                    log.warning(
                        "alert.not_sent", incident=notice.key, status=exc.status, error=exc.message
                    )
                finally:
                    queue.task_done()

    async def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every notice so far was delivered or given up on; False on timeout."""
        if self._queue is None or self._sender is None or self._sender.done():
            return True
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except TimeoutError:
            return False
        return True

    async def aclose(self, timeout: float = 2.0) -> None:
        """Deliver what is queued (up to ``timeout``), then stop the sender."""
        await self.flush(timeout)
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
            self._sender = None
