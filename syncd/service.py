"""``syncd run``: the scheduler, the webhook intake and the HTTP side in one process.

Everything shares one event loop: uvicorn serves the ASGI app, APScheduler fires the
jobs (whose work runs in threads), and the webhook worker applies deliveries. SIGTERM
or SIGINT stops taking new work, lets the job in flight finish or abandons it within
the shutdown budget, commits, and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import Counter
from collections.abc import Generator, Sequence
from typing import Any, Final

import structlog
import uvicorn
from sqlalchemy import Engine

from syncd.config import Settings
from syncd.mapping import LoadedMapping

log = structlog.get_logger("syncd.service")

# SIGTERM to exit 0 must fit in 10 s (Docker's default stop timeout; the shipped systemd
# unit allows 15): jobs get 5 s (2 to finish, then cancelled: see Daemon.stop), the webhook
# worker and the HTTP side 1 s each, which leaves room for a loaded host.
JOB_GRACE: Final = 5.0
WORKER_GRACE: Final = 1.0


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the service owns SIGTERM/SIGINT, and
    uvicorn would re-raise the signal after shutting down (exit status 143, not 0)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def serve(engine: Engine, settings: Settings, mappings: Sequence[LoadedMapping]) -> int:
    """Run the service until SIGTERM/SIGINT; the exit status (0 after a clean stop)."""
    from syncd.alerts import Alerts
    from syncd.daemon import Daemon, DaemonError
    from syncd.metrics import Metrics
    from syncd.server import create_app, quiet_loop_errors, uvicorn_config
    from syncd.sources.webhooks import WebhookIntake

    metrics = Metrics(engine, settings)
    alerts = Alerts(settings.alerts)
    daemon = Daemon(engine, settings, list(mappings), metrics=metrics, alerts=alerts)
    intake = WebhookIntake(engine, settings, on_applied=daemon.customers_changed)
    app = create_app(
        engine,
        settings,
        metrics,
        readiness=daemon.readiness,
        webhook=intake.endpoint,
        mappings=mappings,
    )
    server = _Server(uvicorn_config(app, settings))

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    quiet_loop_errors(loop)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await daemon.start()
    except DaemonError as exc:
        log.error("service.refused", error=str(exc))
        return 2
    await intake.start()
    feeding = asyncio.create_task(_feed_webhook_metrics(intake, metrics))
    serving = asyncio.create_task(server.serve())
    while not server.started and not serving.done():
        await asyncio.sleep(0.01)
    if serving.done():  # the port was taken, say
        feeding.cancel()
        await daemon.stop(timeout=JOB_GRACE)
        await intake.stop(timeout=WORKER_GRACE)
        intake.close()
        failure = serving.exception()
        log.error("service.http_failed", error=str(failure) if failure else "the server stopped")
        return 1
    log.info(
        "service.started",
        host=settings.server.host,
        port=_bound_port(server) or settings.server.port,
        sources=sorted(settings.sources),
        syncs=[s.name for m in mappings for s in m.syncs],
    )
    stop_wait = asyncio.create_task(stopping.wait())
    await asyncio.wait({serving, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    log.info("service.stopping")
    # No new work first, then let what is in flight finish (or be abandoned), then stop
    # answering: /healthz keeps answering while the batch in flight completes.
    await daemon.stop(timeout=JOB_GRACE)
    await intake.stop(timeout=WORKER_GRACE)
    server.should_exit = True
    with contextlib.suppress(Exception):
        await asyncio.wait_for(serving, timeout=WORKER_GRACE)
    intake.close()
    stop_wait.cancel()
    feeding.cancel()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    log.info("service.stopped")
    return 0


async def _feed_webhook_metrics(intake: Any, metrics: Any, every: float = 2.0) -> None:
    """Carry the intake's counters into the metrics: the intake counts on the event loop
    without knowing about Prometheus; this turns its totals into counter increments."""
    seen: Counter[tuple[str, str]] = Counter()
    while True:
        for (source, outcome), total in list(intake.stats.by_source.items()):
            if total > seen[(source, outcome)]:
                metrics.webhook_delivery(source, outcome, total - seen[(source, outcome)])
                seen[(source, outcome)] = total
        for source, seconds in intake.stats.drain_lag():
            metrics.webhook_lag(source, seconds)
        await asyncio.sleep(every)


def _bound_port(server: uvicorn.Server) -> Any:
    with contextlib.suppress(Exception):
        return server.servers[0].sockets[0].getsockname()[1]
    return None
