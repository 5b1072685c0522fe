"""The HTTP side of ``syncd run`` (syncd.server) and its metrics (syncd.metrics), against a
migrated store on SQLite and Postgres."""

from __future__ import annotations

import asyncio
import hmac
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, create_engine, insert, inspect, text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

import syncd.server as server_module
from syncd import __version__
from syncd.config import SegmentSettings, ServerSettings, Settings, WooCommerceSourceSettings
from syncd.http import ServiceClient, ServiceLimits
from syncd.metrics import Metrics, row_outcomes
from syncd.server import Readiness, create_app
from syncd.status import collect_status
from syncd.store.models import MEMBERSHIPS
from syncd.store.models import SYNC_RUNS as RUNS

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


def source(**values: Any) -> WooCommerceSourceSettings:
    return WooCommerceSourceSettings(
        url="http://127.0.0.1:9/shop",
        consumer_key="ck_test",
        consumer_secret="cs_test",
        **values,
    )


def make_settings(token: str | None = TOKEN, **extra: Any) -> Settings:
    return Settings(
        sources={
            # freshness 3 x 10 = 30 minutes
            "shop": source(sync_every_minutes=10),
            # explicit freshness: 5 minutes
            "eu": source(stale_after_minutes=5),
        },
        segments={
            "vip": SegmentSettings(rule="rfm_segment = 'champions'"),
            "lapsed": SegmentSettings(rule="days_since_last_order > 180"),
        },
        server=ServerSettings(token=token),
        **extra,
    )


class TestClient:
    """Requests to the ASGI app in process, through httpx's ASGI transport (no socket).

    Each request runs on its own event loop, as the app keeps no per-loop state."""

    __test__ = False  # not a test class, despite the name

    def __init__(self, app: Starlette) -> None:
        self.app = app

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async def send() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://syncd") as client:
                return await client.request(method, path, **kwargs)

        return asyncio.run(send())

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def head(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("HEAD", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)

    def __enter__(self) -> TestClient:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class Clock:
    """A settable clock for create_app."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class Daemon:
    """What the real daemon's readiness() reports, settable per test."""

    def __init__(self) -> None:
        self.running = True
        self.overdue: list[str] = []
        self.error: Exception | None = None

    def readiness(self) -> Readiness:
        if self.error is not None:
            raise self.error
        return {"scheduler_running": self.running, "overdue_jobs": list(self.overdue)}


def add_run(
    engine: Engine,
    kind: str,
    name: str,
    status: str,
    finished_at: datetime,
    counts: dict[str, Any] | None = None,
) -> None:
    with engine.begin() as conn:
        conn.execute(
            insert(RUNS).values(
                kind=kind,
                name=name,
                started_at=finished_at - timedelta(seconds=5),
                finished_at=finished_at,
                status=status,
                counts=counts or {},
            )
        )


def add_members(engine: Engine, segment: str, n: int, exited: int = 0) -> None:
    with engine.begin() as conn:
        for i in range(n + exited):
            conn.execute(
                insert(MEMBERSHIPS).values(
                    segment=segment,
                    customer_id=1000 + i,
                    entered_at=T0 - timedelta(days=3),
                    exited_at=T0 - timedelta(days=1) if i >= n else None,
                )
            )


def parse_metrics(body: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample as {(name, labels): value}."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def sample(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], metric: str, **labels: str
) -> float:
    return samples[(metric, frozenset(labels.items()))]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def daemon() -> Daemon:
    return Daemon()


@pytest.fixture
def settings() -> Settings:
    return make_settings()


@pytest.fixture
def client(
    engine: Engine, settings: Settings, clock: Clock, daemon: Daemon
) -> Iterator[TestClient]:
    app = create_app(
        engine, settings, Metrics(engine, settings), readiness=daemon.readiness, clock=clock
    )
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def unreachable_engine(tmp_path: Path) -> Iterator[Engine]:
    """An engine whose database cannot be opened (its folder does not exist)."""
    eng = create_engine(f"sqlite:///{tmp_path}/missing/dir/store.db")
    try:
        yield eng
    finally:
        eng.dispose()


# ---------------------------------------------------------------------------
# /healthz and authentication
# ---------------------------------------------------------------------------


def test_healthz_needs_no_token_and_no_store(unreachable_engine: Engine) -> None:
    settings = make_settings()
    app = create_app(unreachable_engine, settings, Metrics(unreachable_engine, settings))
    with TestClient(app) as client:
        for headers in ({}, AUTH, {"Authorization": "Bearer wrong"}):
            response = client.get("/healthz", headers=headers)
            assert response.status_code == 200
            assert response.json() == {"status": "ok"}
        assert client.head("/healthz").status_code == 200
        assert client.post("/healthz").status_code == 405


@pytest.mark.parametrize("path", ["/readyz", "/metrics", "/status"])
def test_token_required_everywhere_but_healthz(client: TestClient, path: str) -> None:
    missing = client.get(path)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == 'Bearer realm="syncd"'
    assert missing.json()["error"] == "unauthorized"

    for header in (f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer wrong"):
        wrong = client.get(path, headers={"Authorization": header})
        assert wrong.status_code == 401
        assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
    for header in (f"Basic {TOKEN}", TOKEN, "Bearer ", "Bearer"):
        malformed = client.get(path, headers={"Authorization": header})
        assert malformed.status_code == 401
        assert 'error="invalid_request"' in malformed.headers["www-authenticate"]
    # The token never comes back in an answer.
    assert TOKEN not in missing.text

    ok = client.get(path, headers=AUTH)
    assert ok.status_code in (200, 503)  # readiness depends on the sources' runs
    # The scheme is case-insensitive (RFC 7235).
    assert client.get(path, headers={"Authorization": f"bearer {TOKEN}"}).status_code == (
        ok.status_code
    )


def test_no_token_configured_means_open(engine: Engine) -> None:
    settings = make_settings(token=None)
    app = create_app(engine, settings, Metrics(engine, settings))
    with TestClient(app) as client:
        assert client.get("/status").status_code == 200
        assert client.get("/metrics").status_code == 200
        assert client.get("/readyz").status_code in (200, 503)
        assert client.get("/readyz").status_code != 401


def test_token_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch, engine: Engine) -> None:
    """The guard goes through hmac.compare_digest with the configured token's bytes."""
    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return bool(real(a, b))

    # syncd.server calls hmac.compare_digest through the module, so patching it there
    # sees the server's comparisons.
    monkeypatch.setattr(hmac, "compare_digest", spy)
    settings = make_settings()
    app = create_app(engine, settings, Metrics(engine, settings))
    with TestClient(app) as client:
        assert client.get("/status", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert client.get("/status", headers=AUTH).status_code == 200
    assert seen == [(b"nope", TOKEN.encode()), (TOKEN.encode(), TOKEN.encode())]


# ---------------------------------------------------------------------------
# Webhooks route
# ---------------------------------------------------------------------------


def test_webhook_route_is_not_behind_the_token(engine: Engine) -> None:
    calls: list[tuple[str, bytes]] = []

    async def webhook(request: Request) -> Response:
        calls.append((request.path_params["source"], await request.body()))
        return JSONResponse({"stored": True})

    settings = make_settings()
    app = create_app(engine, settings, Metrics(engine, settings), webhook=webhook)
    with TestClient(app) as client:
        response = client.post("/webhooks/shop", content=b'{"id": 7}')
        assert response.status_code == 200
        assert response.json() == {"stored": True}
        assert client.get("/webhooks/shop").status_code == 405
    assert calls == [("shop", b'{"id": 7}')]


def test_no_webhook_handler_no_route(engine: Engine) -> None:
    settings = make_settings()
    app = create_app(engine, settings, Metrics(engine, settings))
    with TestClient(app) as client:
        assert client.post("/webhooks/shop", content=b"{}").status_code == 404


# ---------------------------------------------------------------------------
# /status
# ---------------------------------------------------------------------------


def test_status_is_the_cli_json(client: TestClient, engine: Engine, settings: Settings) -> None:
    add_run(engine, "source", "shop", "success", T0, {"orders": {"fetched": 3, "stored": 3}})
    add_members(engine, "vip", 2)
    response = client.get("/status", headers=AUTH)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    expected = collect_status(engine, settings)
    body.pop("generated_at")
    expected.pop("generated_at")
    assert body == expected
    assert body["sources"]["shop"]["last_success_at"] == "2024-06-01T12:00:00Z"
    assert body["segments"]["sizes"]["vip"] == {"size": 2, "configured": True}


def test_status_store_unreachable_is_503(unreachable_engine: Engine) -> None:
    settings = make_settings()
    app = create_app(unreachable_engine, settings, Metrics(unreachable_engine, settings))
    with TestClient(app) as client:
        response = client.get("/status", headers=AUTH)
    assert response.status_code == 503
    assert response.json()["error"] == "store unavailable"
    assert "OperationalError" in response.json()["detail"]


# ---------------------------------------------------------------------------
# /readyz
# ---------------------------------------------------------------------------


def fresh_runs(engine: Engine, now: datetime = T0) -> None:
    add_run(engine, "source", "shop", "success", now - timedelta(minutes=29))
    add_run(engine, "source", "eu", "partial", now - timedelta(minutes=4))


def test_readyz_ready(client: TestClient, engine: Engine) -> None:
    fresh_runs(engine)
    response = client.get("/readyz", headers=AUTH)
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["status"] == "ready"
    checks = body["checks"]
    assert set(checks) == {"store", "scheduler", "jobs", "source:shop", "source:eu"}
    assert all(check["ok"] is True for check in checks.values())
    assert checks["store"]["detail"].startswith("SELECT 1 answered in ")
    assert checks["scheduler"]["detail"] == "running"
    assert checks["jobs"] == {"ok": True, "detail": "no overdue jobs", "overdue": []}
    shop = checks["source:shop"]
    assert shop["freshness_minutes"] == 30.0
    assert shop["last_success_at"] == "2024-06-01T11:31:00Z"
    assert shop["age_s"] == 29 * 60
    assert checks["source:eu"]["freshness_minutes"] == 5.0


def test_readyz_stale_source(client: TestClient, engine: Engine, clock: Clock) -> None:
    fresh_runs(engine)
    # A later failed run does not count as a success.
    add_run(engine, "source", "eu", "failed", T0 - timedelta(seconds=10))
    clock.now = T0 + timedelta(minutes=2)  # eu: 6 minutes > 5; shop: 31 minutes > 30
    response = client.get("/readyz", headers=AUTH)
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not ready"
    checks = body["checks"]
    assert checks["store"]["ok"] and checks["scheduler"]["ok"] and checks["jobs"]["ok"]
    assert checks["source:eu"]["ok"] is False
    assert checks["source:eu"]["detail"] == "stale: last success 360 s ago, more than 300 s"
    assert checks["source:shop"]["ok"] is False
    assert checks["source:shop"]["last_success_at"] == "2024-06-01T11:31:00Z"

    # A new success makes it ready again.
    add_run(engine, "source", "eu", "success", clock.now - timedelta(seconds=1))
    add_run(engine, "source", "shop", "success", clock.now - timedelta(seconds=1))
    assert client.get("/readyz", headers=AUTH).status_code == 200


def test_readyz_never_synced_source_gets_its_window_from_start(
    client: TestClient, clock: Clock, engine: Engine
) -> None:
    # The app started at T0; no source has ever succeeded.
    clock.now = T0 + timedelta(minutes=4)
    first = client.get("/readyz", headers=AUTH)
    assert first.status_code == 200, first.json()
    eu = first.json()["checks"]["source:eu"]
    assert eu["ok"] is True and eu["last_success_at"] is None
    assert eu["detail"].startswith("no successful sync yet; the server started 240 s ago")

    clock.now = T0 + timedelta(minutes=6)  # past eu's 5 minutes, within shop's 30
    later = client.get("/readyz", headers=AUTH)
    assert later.status_code == 503
    checks = later.json()["checks"]
    assert checks["source:eu"]["ok"] is False
    assert checks["source:shop"]["ok"] is True
    # Runs of sources no longer configured are not checked.
    add_run(engine, "source", "gone", "failed", T0)
    assert "source:gone" not in client.get("/readyz", headers=AUTH).json()["checks"]


def test_readyz_scheduler_not_running(client: TestClient, engine: Engine, daemon: Daemon) -> None:
    fresh_runs(engine)
    daemon.running = False
    response = client.get("/readyz", headers=AUTH)
    assert response.status_code == 503
    assert response.json()["checks"]["scheduler"] == {"ok": False, "detail": "not running"}


def test_readyz_overdue_job(client: TestClient, engine: Engine, daemon: Daemon) -> None:
    fresh_runs(engine)
    daemon.overdue = ["source:shop", "destination:klaviyo-vip"]
    response = client.get("/readyz", headers=AUTH)
    assert response.status_code == 503
    jobs = response.json()["checks"]["jobs"]
    assert jobs["ok"] is False
    assert jobs["overdue"] == ["destination:klaviyo-vip", "source:shop"]
    assert jobs["detail"] == "next run overdue: destination:klaviyo-vip, source:shop"
    daemon.overdue = []
    assert client.get("/readyz", headers=AUTH).status_code == 200


def test_readyz_broken_daemon_is_not_ready(
    client: TestClient, engine: Engine, daemon: Daemon
) -> None:
    fresh_runs(engine)
    daemon.error = RuntimeError("scheduler state lost")
    response = client.get("/readyz", headers=AUTH)
    assert response.status_code == 503
    assert response.json()["checks"]["scheduler"] == {
        "ok": False,
        "detail": "RuntimeError: scheduler state lost",
    }


def test_readyz_without_daemon_checks_store_and_sources(engine: Engine, clock: Clock) -> None:
    fresh_runs(engine)
    settings = make_settings()
    app = create_app(engine, settings, Metrics(engine, settings), clock=clock)
    with TestClient(app) as client:
        response = client.get("/readyz", headers=AUTH)
    assert response.status_code == 200
    assert set(response.json()["checks"]) == {"store", "source:shop", "source:eu"}


def test_readyz_store_unreachable(unreachable_engine: Engine, daemon: Daemon) -> None:
    settings = make_settings()
    app = create_app(
        unreachable_engine,
        settings,
        Metrics(unreachable_engine, settings),
        readiness=daemon.readiness,
    )
    with TestClient(app) as client:
        response = client.get("/readyz", headers=AUTH)
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["store"]["ok"] is False
    assert "unable to open database file" in checks["store"]["detail"]
    assert checks["scheduler"]["ok"] is True
    assert checks["source:shop"] == {
        "ok": False,
        "detail": "unknown: the store is not reachable",
        "freshness_minutes": 30.0,
        "last_success_at": None,
    }


def test_readyz_answers_before_a_hung_store(
    monkeypatch: pytest.MonkeyPatch, engine: Engine, daemon: Daemon
) -> None:
    def hung(*args: Any) -> Any:
        time.sleep(1.5)
        raise AssertionError("the probe should have been abandoned")

    monkeypatch.setattr(server_module, "_probe_store", hung)
    monkeypatch.setattr(server_module, "STORE_CHECK_TIMEOUT", 0.2)
    settings = make_settings()
    app = create_app(engine, settings, Metrics(engine, settings), readiness=daemon.readiness)
    with TestClient(app) as client:
        started = time.monotonic()
        response = client.get("/readyz", headers=AUTH)
        elapsed = time.monotonic() - started
    assert response.status_code == 503
    assert response.json()["checks"]["store"] == {
        "ok": False,
        "detail": "no answer within 0.2 s",
    }
    assert elapsed < 1.0


def test_readyz_detail_does_not_leak_secrets(engine: Engine, daemon: Daemon) -> None:
    # A driver error quoting a connection string with its password: redacted like the logs.
    settings = make_settings()
    daemon.error = RuntimeError("cannot reach postgresql://syncd:hunter2-pw@db:5432/syncd")
    app = create_app(engine, settings, Metrics(engine, settings), readiness=daemon.readiness)
    with TestClient(app) as client:
        detail = client.get("/readyz", headers=AUTH).json()["checks"]["scheduler"]["detail"]
    assert "hunter2-pw" not in detail
    assert "postgresql://syncd:" in detail


# ---------------------------------------------------------------------------
# /metrics
# ---------------------------------------------------------------------------


def test_metrics_exposition(engine: Engine, settings: Settings) -> None:
    metrics = Metrics(engine, settings)
    service = f"svc-{uuid.uuid4().hex[:8]}"
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        # First a throttle, then success: one retry, two attempts.
        if calls["n"] == 1:
            return httpx.Response(429, headers={"Retry-After": "0"})
        return httpx.Response(200, json={"ok": True})

    async def no_wait(seconds: float) -> None:
        return None

    async def call_service() -> None:
        async with ServiceClient(
            service,
            "http://127.0.0.1:9",
            limits=ServiceLimits(requests_per_second=None),
            transport=httpx.MockTransport(handler),
            sleep=no_wait,
        ) as svc:
            await svc.get_json("/thing")

    asyncio.run(call_service())

    metrics.observe_run(
        "source",
        "shop",
        "success",
        12.5,
        {
            "customers": {"fetched": 4, "stored": 4},
            "orders": {"fetched": 10, "stored": 9, "quarantined": 1, "passes": 1},
            "products": {"fetched": 2, "stored": 2, "deleted": 3},
            "requests": 7,
        },
    )
    metrics.observe_run("source", "eu", "failed", 0.3, {"requests": 1})
    metrics.observe_run(
        "destination",
        "klaviyo-vip",
        "partial",
        3.0,
        {
            "added": 5,
            "updated": 2,
            "removed": 1,
            "unchanged": 40,
            "failed": 2,
            "skipped": 0,
            "requests": 3,
            "failed_reasons": {"bad email": 2},
            "skipped_reasons": {},
        },
    )
    metrics.observe_run(
        "segments",
        "segments",
        "success",
        0.8,
        {
            "profiles": 120,
            "buyers": 80,
            "segments": {
                "vip": {"size": 2, "entered": 2, "exited": 0},
                "lapsed": {"size": 0, "entered": 0, "exited": 4},
            },
        },
    )
    metrics.webhook_delivery("shop", "accepted")
    metrics.webhook_delivery("shop", "accepted")
    metrics.webhook_delivery("shop", "duplicate")
    metrics.webhook_delivery("shop", "rejected")
    metrics.webhook_lag("shop", 0.04)
    metrics.webhook_lag("shop", 1.5)

    add_run(engine, "source", "shop", "success", T0)
    add_run(engine, "source", "shop", "failed", T0 + timedelta(minutes=5))
    add_run(engine, "destination", "klaviyo-vip", "partial", T0 + timedelta(minutes=1))
    add_members(engine, "vip", 2, exited=3)
    add_members(engine, "unconfigured", 1)

    app = create_app(engine, settings, metrics)
    with TestClient(app) as client:
        response = client.get("/metrics", headers=AUTH)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    body = response.text
    s = parse_metrics(body)

    # Every documented syncd_ family is in the exposition, with HELP and TYPE.
    for name in (
        "syncd_runs_total",
        "syncd_run_failures_total",
        "syncd_run_duration_seconds",
        "syncd_rows_total",
        "syncd_segment_changes_total",
        "syncd_last_success_timestamp_seconds",
        "syncd_segment_size",
        "syncd_http_requests_total",
        "syncd_http_retries_total",
        "syncd_http_throttles_total",
        "syncd_http_errors_total",
        "syncd_http_responses_total",
        "syncd_webhook_deliveries_total",
        "syncd_webhook_lag_seconds",
        "syncd_store_up",
        "syncd_info",
    ):
        base = name.removesuffix("_total")
        assert f"# TYPE {base}" in body, name

    # Runs
    assert sample(s, "syncd_runs_total", kind="source", name="shop", status="success") == 1
    assert sample(s, "syncd_runs_total", kind="source", name="eu", status="failed") == 1
    assert sample(s, "syncd_run_failures_total", kind="source", name="eu") == 1
    assert sample(s, "syncd_run_failures_total", kind="source", name="shop") == 0
    # partial is not a failure
    failures = frozenset({"kind": "destination", "name": "klaviyo-vip"}.items())
    assert ("syncd_run_failures_total", failures) not in s
    assert sample(s, "syncd_run_duration_seconds_count", kind="source", name="shop") == 1
    assert sample(s, "syncd_run_duration_seconds_sum", kind="source", name="shop") == 12.5
    assert (
        sample(s, "syncd_run_duration_seconds_bucket", kind="source", name="shop", le="10.0") == 0
    )
    assert (
        sample(s, "syncd_run_duration_seconds_bucket", kind="source", name="shop", le="30.0") == 1
    )

    # Rows per source (summed over streams) and per destination
    rows = {
        (labels["kind"], labels["name"], labels["outcome"]): value
        for (name, frozen), value in s.items()
        if name == "syncd_rows_total"
        for labels in [dict(frozen)]
    }
    assert rows == {
        ("source", "shop", "fetched"): 16,
        ("source", "shop", "stored"): 15,
        ("source", "shop", "quarantined"): 1,
        ("source", "shop", "deleted"): 3,
        ("destination", "klaviyo-vip", "added"): 5,
        ("destination", "klaviyo-vip", "updated"): 2,
        ("destination", "klaviyo-vip", "removed"): 1,
        ("destination", "klaviyo-vip", "unchanged"): 40,
        ("destination", "klaviyo-vip", "failed"): 2,
        ("segments", "segments", "profiles"): 120,
    }
    assert sample(s, "syncd_segment_changes_total", segment="vip", direction="entered") == 2
    assert sample(s, "syncd_segment_changes_total", segment="lapsed", direction="exited") == 4

    # Read from the store at scrape time
    assert sample(s, "syncd_store_up") == 1
    assert (
        sample(s, "syncd_last_success_timestamp_seconds", kind="source", name="shop")
        == T0.timestamp()
    )
    assert (
        sample(s, "syncd_last_success_timestamp_seconds", kind="destination", name="klaviyo-vip")
        == (T0 + timedelta(minutes=1)).timestamp()
    )
    assert sample(s, "syncd_segment_size", segment="vip") == 2  # exited members do not count
    assert sample(s, "syncd_segment_size", segment="lapsed") == 0  # configured, empty
    assert sample(s, "syncd_segment_size", segment="unconfigured") == 1

    # HTTP clients, per service
    assert sample(s, "syncd_http_requests_total", service=service) == 2
    assert sample(s, "syncd_http_retries_total", service=service) == 1
    assert sample(s, "syncd_http_throttles_total", service=service) == 1
    assert sample(s, "syncd_http_errors_total", service=service) == 0
    assert sample(s, "syncd_http_responses_total", service=service, code="429") == 1
    assert sample(s, "syncd_http_responses_total", service=service, code="200") == 1

    # Webhooks
    assert sample(s, "syncd_webhook_deliveries_total", source="shop", status="accepted") == 2
    assert sample(s, "syncd_webhook_deliveries_total", source="shop", status="duplicate") == 1
    assert sample(s, "syncd_webhook_deliveries_total", source="shop", status="rejected") == 1
    assert sample(s, "syncd_webhook_lag_seconds_count", source="shop") == 2
    assert sample(s, "syncd_webhook_lag_seconds_bucket", source="shop", le="0.05") == 1
    assert sample(s, "syncd_webhook_lag_seconds_bucket", source="shop", le="2.0") == 2

    assert sample(s, "syncd_info", version=__version__) == 1
    assert (
        "process_resident_memory_bytes" in {name for name, _ in s}
        or not Path("/proc/self/stat").exists()
    )


def test_metrics_openmetrics_on_request(client: TestClient) -> None:
    response = client.get(
        "/metrics", headers={**AUTH, "Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")
    assert "syncd_store_up 1" in response.text


def test_configured_sources_have_series_before_any_run(client: TestClient) -> None:
    s = parse_metrics(client.get("/metrics", headers=AUTH).text)
    for name in ("shop", "eu"):
        assert sample(s, "syncd_run_failures_total", kind="source", name=name) == 0
        assert sample(s, "syncd_run_duration_seconds_count", kind="source", name=name) == 0


def test_metrics_store_down_still_answers(unreachable_engine: Engine) -> None:
    settings = make_settings()
    metrics = Metrics(unreachable_engine, settings)
    metrics.observe_run("source", "shop", "success", 1.0, {"orders": {"stored": 2}})
    app = create_app(unreachable_engine, settings, metrics)
    with TestClient(app) as client:
        response = client.get("/metrics", headers=AUTH)
    assert response.status_code == 200
    s = parse_metrics(response.text)
    assert sample(s, "syncd_store_up") == 0
    assert not any(name == "syncd_segment_size" for name, _ in s)
    # In-process values are still there.
    assert sample(s, "syncd_rows_total", kind="source", name="shop", outcome="stored") == 2


def test_two_metrics_objects_do_not_collide(engine: Engine, settings: Settings) -> None:
    first, second = Metrics(engine, settings), Metrics(engine, settings)
    first.webhook_delivery("shop", "accepted")
    assert (
        b'syncd_webhook_deliveries_total{source="shop",status="accepted"} 1.0'
        in (first.render()[0])
    )
    assert b"syncd_webhook_deliveries_total{" not in second.render()[0]


def test_row_outcomes_ignores_junk() -> None:
    assert row_outcomes("source", {"orders": {"stored": True, "fetched": -1}, "requests": 3}) == {}
    assert row_outcomes("destination", {"added": "5", "updated": 2.0, "removed": 1}) == {
        "removed": 1
    }
    assert row_outcomes("segments", {"profiles": 0, "buyers": 9}) == {}


def test_metrics_negative_values_clamped(engine: Engine, settings: Settings) -> None:
    # A clock step backwards must not break the histogram (negative observations).
    metrics = Metrics(engine, settings)
    metrics.observe_run("destination", "d", "success", -0.5, {})
    metrics.webhook_lag("shop", -1.0)
    s = parse_metrics(metrics.render()[0].decode())
    assert sample(s, "syncd_run_duration_seconds_sum", kind="destination", name="d") == 0
    assert sample(s, "syncd_webhook_lag_seconds_bucket", source="shop", le="0.01") == 1


def test_webhook_backlog_gauge(engine: Engine, settings: Settings) -> None:
    metrics = Metrics(engine, settings)
    if not inspect(engine).has_table("events"):
        # Before the events migration: the gauge is absent, then appears with the table.
        assert b"syncd_webhook_events_pending" not in metrics.render()[0]
        with engine.begin() as conn:
            conn.execute(
                text("CREATE TABLE events (id INTEGER PRIMARY KEY, source TEXT, status TEXT)")
            )
            conn.execute(
                text(
                    "INSERT INTO events (id, source, status) VALUES "
                    "(1, 'shop', 'pending'), (2, 'shop', 'pending'), (3, 'shop', 'applied'), "
                    "(4, 'other', 'pending')"
                )
            )
        s = parse_metrics(metrics.render()[0].decode())
        assert sample(s, "syncd_webhook_events_pending", source="shop") == 2
        assert sample(s, "syncd_webhook_events_pending", source="other") == 1
        assert sample(s, "syncd_webhook_events_pending", source="eu") == 0
    else:
        # The real events table (migration 0004), still empty: every configured source at 0.
        s = parse_metrics(metrics.render()[0].decode())
        assert sample(s, "syncd_webhook_events_pending", source="shop") == 0
        assert sample(s, "syncd_webhook_events_pending", source="eu") == 0


# -- hostile clients: timeouts, caps, the /status cache (issue 19) ----------------------


class LiveServer:
    """The app served by uvicorn as ``syncd run`` serves it (`uvicorn_config`), on a
    thread, on 127.0.0.1 and a free port."""

    def __init__(self, app: Starlette, settings: Settings) -> None:
        import threading

        import uvicorn

        self.config = server_module.uvicorn_config(app, settings)
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    @property
    def counters(self) -> dict[str, int]:
        return self.config.http.counters  # type: ignore[no-any-return, union-attr]

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        return sock

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.port}{path}", timeout=5)


def closed_by_server(sock: socket.socket, within: float) -> bytes | None:
    """What the server sent before closing the connection, or None if it stayed open."""
    sock.settimeout(within)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return received


def live_settings(**server: Any) -> Settings:
    return Settings(
        sources={"shop": source(webhook_secret="hook-secret")},
        server=ServerSettings(**server),
    )


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    from syncd.store.engine import open_store

    eng = open_store(f"sqlite:///{tmp_path}/store.db")
    yield eng
    eng.dispose()


def signed_headers(body: bytes, length: int | None = None) -> bytes:
    import base64
    import hashlib

    signature = base64.b64encode(hmac.new(b"hook-secret", body, hashlib.sha256).digest())
    return (
        b"POST /webhooks/shop HTTP/1.1\r\nHost: syncd\r\nContent-Type: application/json\r\n"
        b"X-WC-Webhook-Topic: order.updated\r\nX-WC-Webhook-Signature: " + signature + b"\r\n"
        b"Content-Length: " + str(len(body) if length is None else length).encode() + b"\r\n\r\n"
    )


def live_app(engine: Engine, settings: Settings) -> tuple[Starlette, Any]:
    from syncd.sources.webhooks import WebhookIntake

    intake = WebhookIntake(engine, settings)
    app = create_app(engine, settings, Metrics(engine, settings), webhook=intake.endpoint)
    return app, intake


def test_a_client_slow_to_send_its_headers_is_disconnected(sqlite_engine: Engine) -> None:
    settings = live_settings(header_timeout_seconds=0.3)
    app, _ = live_app(sqlite_engine, settings)
    with LiveServer(app, settings) as live:
        idle = live.connect()  # sends nothing at all
        dribbling = live.connect()
        dribbling.sendall(b"GET /healthz HTTP/1.1\r\nHost: syncd\r\n")  # never ends its headers
        assert closed_by_server(idle, within=3) == b""
        assert closed_by_server(dribbling, within=3) == b""
        assert live.counters["timed_out"] == 2
        assert live.get("/healthz").status_code == 200


def test_a_client_slow_to_send_its_body_is_disconnected(sqlite_engine: Engine) -> None:
    settings = live_settings(body_timeout_seconds=0.3)
    app, intake = live_app(sqlite_engine, settings)
    with LiveServer(app, settings) as live:
        sock = live.connect()
        body = b'{"id": 1}' * 100
        sock.sendall(signed_headers(body) + body[:10])  # the rest never comes
        received = closed_by_server(sock, within=3)
        assert received is not None, "the connection was left open"
        assert b"200 OK" not in received
        assert live.counters["timed_out"] == 1
    assert intake.stats.received == 0


def test_an_over_cap_body_is_refused_and_its_connection_closed(sqlite_engine: Engine) -> None:
    settings = live_settings()
    app, intake = live_app(sqlite_engine, settings)
    with LiveServer(app, settings) as live:
        sock = live.connect()
        sock.sendall(signed_headers(b"{}", length=100 * 1024 * 1024) + b"{" * 65536)
        received = closed_by_server(sock, within=3)
        # Refused from its declared length, and the connection closed rather than the
        # remaining 100 MB read and thrown away.
        assert received is not None, "the connection was kept open for the rest of the body"
        assert received.startswith(b"HTTP/1.1 413 ")
    assert intake.stats.rejected["too_large"] == 1


def test_healthz_answers_while_the_webhook_cap_is_reached(sqlite_engine: Engine) -> None:
    settings = live_settings(max_webhook_requests=2)
    app, intake = live_app(sqlite_engine, settings)
    with LiveServer(app, settings) as live:
        body = b'{"id": 1}' * 1000
        stuck = [live.connect() for _ in range(2)]
        for sock in stuck:
            sock.sendall(signed_headers(body) + body[:100])  # reading: in the cap
        deadline = time.monotonic() + 3
        while intake.in_flight < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert live.get("/healthz").status_code == 200
        third = live.connect()
        third.sendall(signed_headers(body) + body)
        received = closed_by_server(third, within=3)
        assert received is not None and received.startswith(b"HTTP/1.1 503 "), received
        assert b"retry-after: 5" in received.lower()
        for sock in stuck:
            sock.close()


def test_at_the_connection_cap_the_longest_waiting_connection_makes_room(
    sqlite_engine: Engine,
) -> None:
    settings = live_settings(max_connections=5)
    app, _ = live_app(sqlite_engine, settings)
    with LiveServer(app, settings) as live:
        idle = [live.connect() for _ in range(5)]
        time.sleep(0.2)  # all five accepted, waiting on their clients
        # The sixth (a prober) is served; the oldest idle one is closed to make room.
        assert live.get("/healthz").status_code == 200
        assert closed_by_server(idle[0], within=3) == b""
        assert live.counters["evicted"] >= 1
        for sock in idle:
            sock.close()


def test_the_connection_cap_stays_under_the_open_files_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    limits = [1024, 1024]
    monkeypatch.setattr(server_module.resource, "getrlimit", lambda what: tuple(limits))
    monkeypatch.setattr(
        server_module.resource, "setrlimit", lambda what, new: limits.__setitem__(0, new[0])
    )
    # Room for the process's own files (128) and one accept burst (the backlog: 1024 / 4).
    assert server_module.connection_limits(5000) == (1024 - 128 - 256, 256)
    assert server_module.connection_limits(100) == (100, 256)
    limits[1] = 8192  # the hard limit leaves room: the soft one is raised to fit
    assert server_module.connection_limits(1000) == (1000, (1000 + 128 + 2048) // 4)
    assert limits == [1000 + 128 + 2048, 8192]


def test_status_is_computed_once_per_cache_window(
    monkeypatch: pytest.MonkeyPatch, engine: Engine
) -> None:
    calls: list[int] = []

    def counted(*args: Any) -> dict[str, Any]:
        calls.append(1)
        return {"calls": len(calls)}

    monkeypatch.setattr(server_module, "collect_status", counted)

    async def burst(app: Starlette, n: int) -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://syncd") as client:
            return await asyncio.gather(*(client.get("/status", headers=AUTH) for _ in range(n)))

    settings = make_settings()  # the default window: 5 s
    app = create_app(engine, settings, Metrics(engine, settings))
    first = asyncio.run(burst(app, 5)) + asyncio.run(burst(app, 1))
    assert [r.json() for r in first] == [{"calls": 1}] * 6
    assert len(calls) == 1
    # Without a token the answer is 401 and the store is not read.
    assert TestClient(app).request("GET", "/status").status_code == 401
    assert len(calls) == 1

    short = make_settings()
    short.server.status_cache_seconds = 0.3
    app = create_app(engine, short, Metrics(engine, short))
    assert asyncio.run(burst(app, 2))[1].json() == {"calls": 2}
    time.sleep(0.4)  # the copy is too old: computed again
    assert asyncio.run(burst(app, 1))[0].json() == {"calls": 3}


def test_the_deployment_files_recommend_a_token() -> None:
    root = Path(__file__).resolve().parent.parent
    for name in ("Dockerfile", "deploy/syncd.service"):
        assert "SYNCD_SERVER__TOKEN" in (root / name).read_text(), name


def test_repeated_event_loop_errors_are_logged_once_per_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.new_event_loop()
    try:
        server_module.quiet_loop_errors(loop, every=60)
        error = OSError(24, "Too many open files")
        with caplog.at_level("ERROR", logger="asyncio"):
            for _ in range(500):
                loop.call_exception_handler(
                    {"message": "socket.accept() out of system resource", "exception": error}
                )
            loop.call_exception_handler({"message": "something else"})
    finally:
        loop.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert len(lines) == 2
    assert lines[0].startswith("socket.accept() out of system resource")
