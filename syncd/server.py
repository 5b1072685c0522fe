"""The HTTP side of ``syncd run``: one small Starlette app, served by uvicorn.

Endpoints:

``GET /healthz``
    200 ``{"status": "ok"}`` whenever the process answers (liveness; no token needed).
``GET /readyz``
    200 when every check passes, else 503; the body lists every check with its detail::

        {"status": "ready" | "not ready",
         "checks": {"store":     {"ok": true, "detail": "SELECT 1 answered in 0.4 ms"},
                    "scheduler": {"ok": true, "detail": "running"},
                    "jobs":      {"ok": true, "detail": "no overdue jobs", "overdue": []},
                    "source:<name>": {"ok": true, "detail": "...",
                                      "last_success_at": "2024-…Z", "age_s": 61.2,
                                      "freshness_minutes": 45.0}}}

    ``store``: the store answers ``SELECT 1`` (within a few seconds). ``scheduler`` and
    ``jobs`` come from the daemon (present when the app is given a ``readiness``
    callable): its scheduler is running, no job's next run is overdue. One
    ``source:<name>`` check per configured source: its last successful (or partial)
    sync finished within its ``freshness_minutes``. A source that has never succeeded
    is given that same window from the server's start before it counts as stale, so a
    fresh deployment becomes ready with its first sync instead of failing at once.
``GET /metrics``
    Prometheus text format (OpenMetrics when the scraper asks); see `syncd.metrics`.
``GET /status``
    The JSON of ``syncd status --json`` (`syncd.status.collect_status`), from a copy at
    most ``[server] status_cache_seconds`` old: a client polling it cannot load the store.
``POST /webhooks/{source}``
    The WooCommerce webhook intake. No token: deliveries are signed and the intake
    checks the signature.

``POST /privacy/forget``
    An erasure request (``syncd forget``) by JSON ``{"email": "..."}`` or
    ``{"customer_id": 17, "source": "shop"}`` (``source`` only when several sources have
    the id). Always needs the token: without ``[server] token`` configured it is refused
    with 403, as personal data must not be erasable by whoever reaches the port. Answers
    202 ``{"request": id, "status": "pending"}`` once the request and its steps are
    recorded; the steps run after the answer (``syncd status`` shows those pending).

When ``[server] token`` is set, every endpoint but ``/healthz`` and the webhooks needs
``Authorization: Bearer <token>``; a missing or wrong token gets 401 with a
``WWW-Authenticate: Bearer`` header.

`uvicorn_config` serves the app so that slow or hostile clients cannot stop it: a
client has ``header_timeout_seconds`` for a request's headers and ``body_timeout_seconds``
for its body, and at most ``max_connections`` connections are open (below the open-files
limit, so accepting never fails with EMFILE); at the cap a new connection pushes out the
one that has waited longest on its client, so /healthz and the store's deliveries, which
send their request at once, are served while idle or dribbling connections are dropped.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import resource
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.to_thread
import uvicorn
from sqlalchemy import Engine, func, select, text
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from syncd.config import Settings
from syncd.log import get_logger, redact_processor
from syncd.metrics import Metrics
from syncd.runs import iso
from syncd.status import collect_status
from syncd.store.engine import writer_lock
from syncd.store.models import SYNC_RUNS as RUNS

if TYPE_CHECKING:
    from syncd.mapping import LoadedMapping

__all__ = [
    "STORE_CHECK_TIMEOUT",
    "Readiness",
    "create_app",
    "quiet_loop_errors",
    "uvicorn_config",
]

log = get_logger("syncd.server")

# A readiness probe must answer before the prober's own timeout (Kubernetes: 1 s by
# default, Docker and load balancers a few): a store that takes longer than this is
# not "reachable" for serving purposes. The query's thread is left to finish.
STORE_CHECK_TIMEOUT: Final = 3.0

_SUCCESS_STATUSES: Final = ("success", "partial")


# The daemon's part of /readyz (`syncd.daemon.Daemon.readiness`):
# {"scheduler_running": bool, "overdue_jobs": [job names]}. A Mapping, so a plain dict
# or any TypedDict the daemon declares fits.
Readiness = Mapping[str, Any]

Clock = Callable[[], datetime]
Endpoint = Callable[[Request], Awaitable[Response]]


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """A short, single-line description of an error for a JSON detail."""
    message = str(exc).strip().splitlines()
    line = message[0] if message else ""
    text_ = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    if len(text_) > limit:
        text_ = text_[: limit - 1] + "…"
    # Driver errors can quote connection strings: the same redaction as the logs.
    return str(redact_processor(None, "", {"detail": text_})["detail"])


def _unauthorized(error: str, description: str) -> JSONResponse:
    # RFC 6750: a request without credentials gets the bare challenge; one with a bad
    # token is told invalid_token.
    challenge = 'Bearer realm="syncd"'
    if error:
        challenge += f', error="{error}"'
    return JSONResponse(
        {"error": "unauthorized", "detail": description},
        status_code=401,
        headers={"WWW-Authenticate": challenge},
    )


def _bearer_guard(settings: Settings) -> Callable[[Request], Response | None]:
    """A check that returns a 401 response for an unauthorized request, else None."""
    secret = settings.server.token
    if secret is None:
        return lambda request: None
    expected = secret.get_secret_value().encode("utf-8")

    def guard(request: Request) -> Response | None:
        header = request.headers.get("authorization")
        if header is None:
            return _unauthorized("", "an Authorization: Bearer <token> header is required")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _unauthorized("invalid_request", "expected Authorization: Bearer <token>")
        # compare_digest takes time independent of where the strings differ, so the
        # token cannot be guessed byte by byte from response times.
        if not hmac.compare_digest(token.strip().encode("utf-8"), expected):
            return _unauthorized("invalid_token", "the token is not valid")
        return None

    return guard


def _protected(guard: Callable[[Request], Response | None], endpoint: Endpoint) -> Endpoint:
    async def wrapped(request: Request) -> Response:
        denied = guard(request)
        if denied is not None:
            return denied
        return await endpoint(request)

    return wrapped


def _probe_store(engine: Engine, sources: list[str]) -> tuple[float, dict[str, datetime | None]]:
    """SELECT 1's latency in seconds and each source's last successful sync (blocking)."""
    with engine.connect() as conn:
        started = time.perf_counter()
        conn.execute(text("SELECT 1")).scalar_one()
        latency = time.perf_counter() - started
        last: dict[str, datetime | None] = dict.fromkeys(sources)
        if sources:
            for name, finished in conn.execute(
                select(RUNS.c.name, func.max(RUNS.c.finished_at))
                .where(
                    RUNS.c.kind == "source",
                    RUNS.c.name.in_(sources),
                    RUNS.c.status.in_(_SUCCESS_STATUSES),
                )
                .group_by(RUNS.c.name)
            ):
                last[name] = finished
    return latency, last


def _source_check(
    freshness_minutes: float,
    last_success: datetime | None,
    now: datetime,
    started_at: datetime,
) -> dict[str, Any]:
    window = freshness_minutes * 60.0
    check: dict[str, Any] = {
        "freshness_minutes": freshness_minutes,
        "last_success_at": iso(last_success),
    }
    if last_success is None:
        up_for = max(0.0, (now - started_at).total_seconds())
        check["ok"] = up_for <= window
        check["detail"] = (
            f"no successful sync yet; the server started {up_for:.0f} s ago "
            f"and the source is stale after {window:.0f} s"
        )
        return check
    age = max(0.0, (now - last_success).total_seconds())
    check["age_s"] = round(age, 3)
    check["ok"] = age <= window
    check["detail"] = (
        f"last success {age:.0f} s ago (within {window:.0f} s)"
        if check["ok"]
        else f"stale: last success {age:.0f} s ago, more than {window:.0f} s"
    )
    return check


class _TimedCache:
    """One value, computed at most once per ``ttl`` seconds; callers arriving while it is
    being computed wait for that computation instead of starting their own. Failures are
    not kept: the next call tries again."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._value: Any = None
        self._at = float("-inf")
        self._lock: asyncio.Lock | None = None

    async def get(self, compute: Callable[[], Awaitable[Any]]) -> Any:
        if self.ttl <= 0:
            return await compute()
        if self._lock is None:  # made on the serving loop, not at import or in a test's
            self._lock = asyncio.Lock()
        async with self._lock:
            if time.monotonic() - self._at >= self.ttl:
                self._value = await compute()
                self._at = time.monotonic()
            return self._value


def create_app(
    engine: Engine,
    settings: Settings,
    metrics: Metrics,
    *,
    readiness: Callable[[], Readiness] | None = None,
    webhook: Endpoint | None = None,
    mappings: Sequence[LoadedMapping] = (),
    clock: Clock = _utcnow,
) -> Starlette:
    """The service's ASGI app.

    ``readiness`` is the daemon's state for /readyz (without it, /readyz checks only
    the store and the sources); ``webhook`` answers ``POST /webhooks/{source}`` (without
    it the route does not exist); ``mappings`` are the destinations an erasure request
    reaches. ``clock`` is injectable for tests.
    """
    guard = _bearer_guard(settings)
    started_at = clock()
    sources = sorted(settings.sources)

    async def healthz(request: Request) -> Response:
        # Liveness only: the event loop answers. Nothing here may touch the store, or a
        # database outage would get a healthy process restarted in a loop.
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        checks: dict[str, dict[str, Any]] = {}
        last: dict[str, datetime | None] | None = None
        try:
            # abandon_on_cancel: on timeout answer now and let the thread finish on its own
            # (a plain thread call would wait for a hung connect before answering).
            with anyio.fail_after(STORE_CHECK_TIMEOUT):
                latency, last = await anyio.to_thread.run_sync(
                    _probe_store, engine, sources, abandon_on_cancel=True
                )
            checks["store"] = {"ok": True, "detail": f"SELECT 1 answered in {latency * 1e3:.1f} ms"}
        except TimeoutError:
            checks["store"] = {
                "ok": False,
                "detail": f"no answer within {STORE_CHECK_TIMEOUT:g} s",
            }
        except Exception as exc:  # any driver or pool error means "not reachable"
            checks["store"] = {"ok": False, "detail": _first_line(exc)}

        if readiness is not None:
            try:
                state = readiness()
                running = bool(state["scheduler_running"])
                overdue = sorted(str(job) for job in state["overdue_jobs"])
            except Exception as exc:  # a broken daemon must show as not ready, not a 500
                log.warning("readyz.readiness_failed", error=_first_line(exc))
                checks["scheduler"] = {"ok": False, "detail": _first_line(exc)}
            else:
                checks["scheduler"] = {
                    "ok": running,
                    "detail": "running" if running else "not running",
                }
                checks["jobs"] = {
                    "ok": not overdue,
                    "detail": (
                        "no overdue jobs"
                        if not overdue
                        else "next run overdue: " + ", ".join(overdue)
                    ),
                    "overdue": overdue,
                }

        now = clock()
        for name in sources:
            freshness = settings.sources[name].freshness_minutes
            if last is None:
                checks[f"source:{name}"] = {
                    "ok": False,
                    "detail": "unknown: the store is not reachable",
                    "freshness_minutes": freshness,
                    "last_success_at": None,
                }
            else:
                checks[f"source:{name}"] = _source_check(freshness, last[name], now, started_at)

        ready = all(check["ok"] for check in checks.values())
        return JSONResponse(
            {"status": "ready" if ready else "not ready", "checks": checks},
            status_code=200 if ready else 503,
        )

    async def metrics_endpoint(request: Request) -> Response:
        # The scrape reads the store: off the event loop, so webhooks keep answering.
        body, content_type = await run_in_threadpool(metrics.render, request.headers.get("accept"))
        return Response(body, media_type=content_type)

    status_cache = _TimedCache(settings.server.status_cache_seconds)

    async def status(request: Request) -> Response:
        try:
            data = await status_cache.get(
                lambda: run_in_threadpool(collect_status, engine, settings)
            )
        except Exception as exc:
            log.warning("status.failed", error=_first_line(exc))
            return JSONResponse(
                {"error": "store unavailable", "detail": _first_line(exc)}, status_code=503
            )
        return JSONResponse(data)

    async def privacy_forget(request: Request) -> Response:
        from syncd.privacy import PrivacyError, open_request, run_request

        if settings.server.token is None:
            return JSONResponse(
                {
                    "error": "forbidden",
                    "detail": "privacy requests need [server] token to be set",
                },
                status_code=403,
            )
        try:
            body = await request.json()
        except ValueError:
            body = None
        email = body.get("email") if isinstance(body, dict) else None
        customer_id = body.get("customer_id") if isinstance(body, dict) else None
        source = body.get("source") if isinstance(body, dict) else None
        if (
            (email is None) == (customer_id is None)
            or (email is not None and not isinstance(email, str))
            or (customer_id is not None and (type(customer_id) is not int or customer_id < 1))
            or (source is not None and not isinstance(source, str))
        ):
            return JSONResponse(
                {
                    "error": "bad request",
                    "detail": 'expected {"email": "..."} or {"customer_id": <id>, '
                    '"source": "<name>" (optional)}',
                },
                status_code=400,
            )

        def record() -> int:
            with writer_lock(engine), engine.begin() as conn:
                return open_request(
                    conn,
                    mappings,
                    email=email,
                    customer_id=customer_id,
                    source=source,
                    requested_by="http",
                )

        try:
            request_id = await run_in_threadpool(record)
        except PrivacyError as exc:
            return JSONResponse({"error": "bad request", "detail": str(exc)}, status_code=400)
        # The steps run after the answer; one that fails stays pending with its reason and
        # is tried again (syncd forget, or the service's retry).
        return JSONResponse(
            {"request": request_id, "status": "pending"},
            status_code=202,
            background=BackgroundTask(run_request, engine, list(mappings), request_id),
        )

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/privacy/forget", _protected(guard, privacy_forget), methods=["POST"]),
        Route("/readyz", _protected(guard, readyz), methods=["GET"]),
        Route("/metrics", _protected(guard, metrics_endpoint), methods=["GET"]),
        Route("/status", _protected(guard, status), methods=["GET"]),
    ]
    if webhook is not None:
        routes.append(Route("/webhooks/{source}", webhook, methods=["POST"]))
    return Starlette(routes=routes)


# -- serving -------------------------------------------------------------------------

# Files the process keeps for itself beside its connections: the store, its journal and
# pool, logs, the outgoing HTTP clients.
_RESERVED_FILES: Final = 128
# Connections waiting in the kernel to be accepted: a quarter of the open-files limit,
# within these bounds. A full queue drops new connections' SYNs, which clients resend only
# after 1 s; but asyncio also accepts up to this many in one go, each a file, before any
# is counted against the cap, so the cap leaves room for one such burst (else an accept
# fails with EMFILE and accepting pauses for 1 s).
_BACKLOG_MIN: Final = 128
_BACKLOG_MAX: Final = 2048
# How often one kind of event-loop error (an accept failing, say) is logged at most.
_LOOP_ERROR_EVERY: Final = 10.0


def _backlog(soft: int) -> int:
    return max(_BACKLOG_MIN, min(_BACKLOG_MAX, soft // 4))


def connection_limits(wanted: int) -> tuple[int, int]:
    """(connection cap, listen backlog): ``wanted`` lowered to fit under the process's
    open-files limit (ulimit -n) with room for the process's own files and one accept
    burst. The soft limit is raised towards the hard one first when that makes room (as
    servers usually do)."""
    needed = wanted + _RESERVED_FILES + _BACKLOG_MAX
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if (
        soft != resource.RLIM_INFINITY
        and soft < needed
        and (hard == resource.RLIM_INFINITY or hard > soft)
    ):
        raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted, _BACKLOG_MAX
    backlog = _backlog(soft)
    return max(1, min(wanted, soft - _RESERVED_FILES - backlog)), backlog


class _GuardedHttp(HttpToolsProtocol):
    """uvicorn's HTTP protocol with a deadline on the client and a cap on connections.

    uvicorn times out idle keep-alive connections only: a client that opens a connection
    and sends nothing, or a byte every few seconds, holds it (and a file) forever. Here
    the client has ``header_timeout`` seconds for a request's headers and ``body_timeout``
    for its body, else the connection is closed. A connection over ``max_connections``
    pushes out the one that has waited longest on its client (not one whose request is
    being answered); when there is none, the new one is closed at once."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 1000
    counters: dict[str, int]  # timed_out, evicted, refused: for tests and the benchmark
    # Connections waiting on their client (for a request, its headers or its body), the
    # longest-waiting first: those a new connection may push out.
    waiting: dict[_GuardedHttp, None]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        if len(self.connections) > self.max_connections and not self._evict_one():
            self.counters["refused"] += 1
            transport.close()
            return
        self._wait_for_client()
        self._arm(self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.waiting.pop(self, None)
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # the first byte of a keep-alive connection's next request
            self._arm(self.header_timeout)

    def on_headers_complete(self) -> None:
        self._arm(self.body_timeout)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        # The request is in: what follows is the app's time, not the client's.
        self._disarm()
        self.waiting.pop(self, None)
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._wait_for_client()  # idle keep-alive: the client's turn

    def _wait_for_client(self) -> None:
        # Insertion order is waiting order: the first is the one waiting longest.
        self.waiting.pop(self, None)
        self.waiting[self] = None

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        self.waiting.pop(self, None)
        if not self.transport.is_closing():
            self.counters["timed_out"] += 1
            self.transport.close()

    def _evict_one(self) -> bool:
        oldest = next(iter(self.waiting), None)
        if oldest is None:
            return False
        del self.waiting[oldest]
        self.counters["evicted"] += 1
        oldest._disarm()
        oldest.transport.close()
        return True


def guarded_protocol(settings: Settings, max_connections: int) -> type[_GuardedHttp]:
    """The protocol class `uvicorn_config` serves with: ``settings``' timeouts, and
    ``max_connections`` as `connection_limits` fits it under the open-files limit."""
    server = settings.server
    return type(
        "GuardedHttp",
        (_GuardedHttp,),
        {
            "header_timeout": server.header_timeout_seconds,
            "body_timeout": server.body_timeout_seconds,
            "max_connections": max_connections,
            "counters": {"timed_out": 0, "evicted": 0, "refused": 0},
            "waiting": {},
        },
    )


def uvicorn_config(app: Starlette, settings: Settings) -> uvicorn.Config:
    """How ``syncd run`` serves ``app``: every uvicorn setting is chosen here."""
    # Once: it may raise the process's open-files limit.
    max_connections, backlog = connection_limits(settings.server.max_connections)
    protocol = guarded_protocol(settings, max_connections)
    if settings.server.token is None and settings.server.host not in (
        "127.0.0.1",
        "::1",
        "localhost",
    ):
        log.warning(
            "server.no_token",
            detail="/status and /metrics are open to anyone who reaches the port: "
            "set [server] token",
        )
    return uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        http=protocol,
        backlog=backlog,
        log_config=None,  # structlog owns logging
        access_log=False,
        lifespan="off",
    )


def quiet_loop_errors(loop: asyncio.AbstractEventLoop, every: float = _LOOP_ERROR_EVERY) -> None:
    """Log each kind of event-loop error (an accept failing with EMFILE, a connection reset
    mid-write) at most once per ``every`` seconds, with how many were left out: a flood of
    broken connections must not turn into a flood of log lines."""
    last: dict[str, float] = {}
    skipped: dict[str, int] = {}

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        kind = f"{context.get('message', '')}|{type(exc).__name__ if exc else ''}"
        now = time.monotonic()
        if now - last.get(kind, float("-inf")) < every:
            skipped[kind] = skipped.get(kind, 0) + 1
            return
        last[kind] = now
        left_out = skipped.pop(kind, 0)
        logging.getLogger("asyncio").error(
            "%s%s (%s)",
            context.get("message", "event loop error"),
            f"; {left_out} more like it in the last {every:g} s" if left_out else "",
            f"{type(exc).__name__}: {exc}" if exc else "no exception",
        )

    loop.set_exception_handler(handle)
