"""The daemon: chaining, no overlap, leases across replicas, the SQLite single-process rule,
alerts, shutdown. Real HTTP on 127.0.0.1 (the store and destination sandboxes), real
threads and a real scheduler with intervals of a second or less."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import pytest
import structlog
from pydantic import SecretStr
from sqlalchemy import Engine, func, select

from syncd import daemon as daemon_module
from syncd.alerts import Alerts
from syncd.config import AlertSettings, Settings
from syncd.daemon import Daemon, DaemonError, claim_slot
from syncd.ingest import SourceSync
from syncd.mapping import load_mappings
from syncd.sandbox.destinations import DestinationSandbox
from syncd.sandbox.server import FaultConfig, SandboxServer
from syncd.sandbox.store import SandboxStore
from syncd.schedule import ANCHOR, SlotTrigger, every, parse_schedule
from syncd.store.engine import make_engine, open_store, writer_lock
from syncd.store.models import JOB_LEASES, PROFILES
from syncd.store.models import SYNC_RUNS as RUNS

HOOK_SECRET = "hook-secret"


# ---------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------


@pytest.fixture
def shop() -> Iterator[SandboxServer]:
    store = SandboxStore(seed=5, customers=15, guests=5, orders=40, products=3, coupons=2)
    with SandboxServer(store) as server:
        yield server


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    """For behaviour the store's dialect does not change (the `engine` fixture runs both)."""
    eng = open_store(f"sqlite:///{tmp_path}/store.db")
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture
def dest() -> Iterator[DestinationSandbox]:
    with DestinationSandbox() as box:
        box.webhooks.add("everyone", HOOK_SECRET)
        box.webhooks.add("nobody", HOOK_SECRET)
        yield box


class Receiver:
    """A Slack-compatible incoming webhook on 127.0.0.1: keeps each JSON body."""

    def __init__(self) -> None:
        self.bodies: list[Any] = []
        self.status = 200
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                if owner.status == 200:
                    owner.bodies.append(body)
                self.send_response(owner.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/services/T0/B0/secret"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def texts(self) -> list[str]:
        return [b["text"] for b in self.bodies]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    rec.thread.start()
    try:
        yield rec
    finally:
        rec.server.shutdown()
        rec.server.server_close()


def hook_mapping(tmp_path: Path, dest: DestinationSandbox, receiver: str, segment: str) -> str:
    path = tmp_path / f"{receiver}.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            destination = "webhook"
            base_url = "{dest.webhook_url(receiver)}"
            allow_loopback = true
            [credentials]
            secret = "{HOOK_SECRET}"

            [[sync]]
            name = "to-{receiver}"
            segment = "{segment}"
            mode = "mirror"
            [sync.fields]
            email = "email"
            """
        )
    )
    return str(path)


def make_settings(
    shop: SandboxServer | None,
    *,
    every_s: float = 3600.0,
    mappings: list[str] | None = None,
    alerts: dict[str, Any] | None = None,
    **source: Any,
) -> Settings:
    data: dict[str, Any] = {
        "segments": {
            "everyone": {"rule": "orders_count >= 0"},
            "nobody": {"rule": "orders_count >= 1000000"},
        },
        "destinations": {"mappings": mappings or []},
        "alerts": alerts or {},
    }
    if shop is not None:
        data["sources"] = {
            "wc": {
                "type": "woocommerce",
                "url": shop.url,
                "consumer_key": shop.consumer_key,
                "consumer_secret": shop.consumer_secret,
                "requests_per_second": 0,
                "sync_every_minutes": every_s / 60,
                "jitter_seconds": 0,
                # No re-read window: a sync with nothing new stores nothing, so whether a
                # recompute follows is decided by the data alone.
                "overlap_seconds": 0,
                **source,
            }
        }
    return Settings.model_validate(data)


def runs(engine: Engine, kind: str, name: str | None = None) -> list[Any]:
    with engine.connect() as conn:
        query = select(RUNS).where(RUNS.c.kind == kind)
        if name is not None:
            query = query.where(RUNS.c.name == name)
        return list(conn.execute(query.order_by(RUNS.c.id)))


def idle(daemon: Daemon) -> bool:
    return not any(job["running"] for job in daemon.jobs())


async def wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def settle(daemon: Daemon, timeout: float = 15.0) -> None:
    """Wait until nothing runs and nothing was set off in the meantime."""
    await wait_for(lambda: idle(daemon), timeout)
    await asyncio.sleep(0.15)
    await wait_for(lambda: idle(daemon), timeout)


def run_async(main: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(main())  # type: ignore[arg-type]


def wait_for_job_threads(timeout: float = 20.0) -> None:
    """Abandoned runs keep their thread: let them end before the store is dropped."""
    deadline = time.monotonic() + timeout
    while any(t.name.startswith("syncd-") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "a job thread did not finish"
        time.sleep(0.05)


def presync(engine: Engine, settings: Settings) -> None:
    async def go() -> None:
        runner = SourceSync(engine, "wc", settings.sources["wc"])
        try:
            assert (await runner.run()).status == "success"
        finally:
            await runner.client.aclose()

    asyncio.run(go())


# ---------------------------------------------------------------------------
# Slots and leases
# ---------------------------------------------------------------------------


def test_jittered_fire_times_keep_the_nominal_slots_every_replica_shares() -> None:
    now = datetime(2026, 11, 24, 10, 0, 3, tzinfo=UTC)
    replicas = [every(10.0).trigger(4.0) for _ in range(2)]
    fires: list[list[datetime]] = []
    for trigger in replicas:
        seen, previous = [], None
        for _ in range(5):
            previous = trigger.get_next_fire_time(previous, now)
            assert previous is not None
            seen.append(previous)
        fires.append(seen)
    expected = [
        datetime(2026, 11, 24, 10, 0, 10, tzinfo=UTC) + timedelta(seconds=10 * k) for k in range(5)
    ]
    for trigger, seen in zip(replicas, fires, strict=True):
        # Jitter never accumulates: each fire is its own slot plus at most 4 s.
        assert [trigger.slot_at(f) for f in seen] == expected
        for fire, slot in zip(seen, expected, strict=True):
            assert slot <= fire <= slot + timedelta(seconds=4)
        assert trigger.slot_at(expected[0] - timedelta(seconds=1)) is None
        assert trigger.previous_slot(now) == datetime(2026, 11, 24, 10, 0, 0, tzinfo=UTC)
    assert fires[0] != fires[1]  # the replicas drew different jitter, same slots
    # Jitter is capped at half the interval so a late run never reaches the next slot.
    assert every(2.0).trigger(30.0).jitter == 1.0
    assert (ANCHOR - ANCHOR.replace(year=2000)).total_seconds() == 0


def test_a_cron_schedule_has_slots_but_no_catch_up() -> None:
    trigger = parse_schedule("*/5 * * * *").trigger()
    assert isinstance(trigger, SlotTrigger)
    now = datetime(2026, 11, 24, 10, 2, tzinfo=UTC)
    fire = trigger.get_next_fire_time(None, now)
    assert fire == datetime(2026, 11, 24, 10, 5, tzinfo=UTC)
    assert trigger.slot_at(fire) == fire
    assert trigger.previous_slot(now) is None
    assert parse_schedule("every 15m").trigger().previous_slot(now) == datetime(
        2026, 11, 24, 10, 0, tzinfo=UTC
    )


def _scheduled_sources(**sources: dict[str, Any]) -> Settings:
    base = {
        "type": "woocommerce",
        "url": "http://127.0.0.1:9",
        "consumer_key": "ck",
        "consumer_secret": "cs",
        "jitter_seconds": 0,
    }
    return Settings.model_validate(
        {"sources": {name: {**base, **keys} for name, keys in sources.items()}}
    )


def _fires(trigger: SlotTrigger, now: datetime, n: int = 6) -> list[datetime]:
    """The trigger's next ``n`` fire times from ``now``, asked as APScheduler asks: each
    once the one before it is due."""
    fires: list[datetime] = []
    previous = None
    for _ in range(n):
        previous = trigger.get_next_fire_time(previous, now)
        assert previous is not None
        fires.append(previous)
        now = previous
    return fires


def test_a_source_schedule_and_sync_every_minutes_fire_at_the_same_times(engine: Engine) -> None:
    settings = _scheduled_sources(new={"schedule": "every 10m"}, old={"sync_every_minutes": 10})
    daemon = Daemon(engine, settings, [], recompute_every=None)
    new, old = daemon._jobs["source:new"].trigger, daemon._jobs["source:old"].trigger
    assert new is not None and old is not None
    now = datetime(2026, 11, 24, 10, 7, 30, tzinfo=UTC)
    expected = [
        datetime(2026, 11, 24, 10, 10, tzinfo=UTC) + timedelta(minutes=10 * k) for k in range(6)
    ]
    assert _fires(new, now) == _fires(old, now) == expected
    # Both catch up on the same missed slot at start.
    assert (
        new.previous_slot(now)
        == old.previous_slot(now)
        == datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
    )
    schedules = {job["name"]: job["schedule"] for job in daemon.jobs()}
    assert schedules["source:new"] == "every 10m" and schedules["source:old"] == "every 600s"


def test_a_cron_schedule_on_a_source_drives_its_job(engine: Engine) -> None:
    settings = _scheduled_sources(shop={"schedule": "*/5 * * * *", "jitter_seconds": 600})
    daemon = Daemon(engine, settings, [], recompute_every=None)
    trigger = daemon._jobs["source:shop"].trigger
    assert trigger is not None and trigger.description == "*/5 * * * *"
    # Jitter stays under half a minute: a cron slot never runs past the next one.
    assert trigger.jitter == 30.0
    now = datetime(2026, 11, 24, 10, 2, tzinfo=UTC)
    for fire, k in zip(_fires(trigger, now), range(6), strict=True):
        slot = datetime(2026, 11, 24, 10, 5, tzinfo=UTC) + timedelta(minutes=5 * k)
        assert trigger.slot_at(fire) == slot and slot <= fire <= slot + timedelta(seconds=30)
    assert trigger.previous_slot(now) is None  # no catch-up on a cron schedule, as for pushes

    async def main() -> str | None:
        await daemon.start()
        try:
            (job,) = [j for j in daemon.jobs() if j["name"] == "source:shop"]
            return cast(str | None, job["next_run_at"])
        finally:
            await daemon.stop()

    settings = _scheduled_sources(shop={"schedule": "*/5 * * * *"})
    daemon = Daemon(engine, settings, [], catch_up=False, recompute_every=None)
    before = datetime.now(UTC)
    next_run = asyncio.run(main())
    assert next_run is not None
    when = datetime.fromisoformat(next_run)
    assert when.minute % 5 == 0 and when.second == 0
    assert before < when <= before + timedelta(minutes=5)


def test_racing_claims_of_one_slot_have_exactly_one_winner(engine: Engine) -> None:
    slot = datetime(2026, 11, 24, 10, 0, 0, 123456, tzinfo=UTC)
    barrier = threading.Barrier(8)
    results: dict[str, bool] = {}

    def claim(owner: str) -> None:
        barrier.wait()
        results[owner] = claim_slot(engine, "source:wc", slot, owner)

    threads = [threading.Thread(target=claim, args=(f"replica-{n}",)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [owner for owner, won in results.items() if won]
    assert len(results) == 8 and len(winners) == 1
    with engine.connect() as conn:
        rows = conn.execute(select(JOB_LEASES)).all()
    assert [(r.job, r.owner) for r in rows] == [("source:wc", winners[0])]
    assert rows[0].slot == slot.replace(microsecond=123000)  # stored to the millisecond
    # The next slot, and the same slot of another job, are free.
    assert claim_slot(engine, "source:wc", slot + timedelta(seconds=1), "replica-0")
    assert claim_slot(engine, "segments", slot, "replica-0")
    assert not claim_slot(engine, "source:wc", slot, winners[0])


# ---------------------------------------------------------------------------
# Chaining
# ---------------------------------------------------------------------------


def test_a_sync_that_stored_rows_chains_the_recompute_and_only_the_moved_segments_syncs(
    engine: Engine, shop: SandboxServer, dest: DestinationSandbox, tmp_path: Path
) -> None:
    settings = make_settings(
        shop,
        mappings=[
            hook_mapping(tmp_path, dest, "everyone", "everyone"),
            hook_mapping(tmp_path, dest, "nobody", "nobody"),
        ],
    )
    mappings = load_mappings(settings)

    async def main() -> None:
        # The hour-long interval never fires here: the catch-up at start is the first sync.
        daemon = Daemon(engine, settings, mappings, recompute_every=None)
        await daemon.start()
        try:
            await wait_for(lambda: len(runs(engine, "destination", "to-everyone")) == 1)
            await settle(daemon)
            assert [r.status for r in runs(engine, "source")] == ["success"]
            assert [r.status for r in runs(engine, "segments")] == ["success"]
            assert [r.status for r in runs(engine, "destination")] == ["success"]
            with engine.connect() as conn:
                people = conn.execute(select(func.count()).select_from(PROFILES)).scalar()
            assert people and len(dest.webhooks["everyone"].records) == people
            assert dest.webhooks["nobody"].records == []

            # Nothing new at the store: the sync stores nothing and sets nothing off.
            assert daemon.run_now("source:wc")
            await wait_for(lambda: len(runs(engine, "source")) == 2)
            await settle(daemon)
            assert len(runs(engine, "segments")) == 1
            assert len(runs(engine, "destination")) == 1

            # A new registered customer enters "everyone": recompute, then only its sync.
            shop.store.create_customer("newcomer@example.com")
            await asyncio.sleep(1.05)  # windows end at the run's start, to the second
            assert daemon.run_now("source:wc")
            await wait_for(lambda: len(runs(engine, "destination", "to-everyone")) == 2)
            await settle(daemon)
            assert len(runs(engine, "segments")) == 2
            assert runs(engine, "destination", "to-nobody") == []
            latest = runs(engine, "destination", "to-everyone")[-1]
            assert latest.counts["added"] == 1
            assert dest.webhooks["everyone"].records[-1]["data"] == {
                "email": "newcomer@example.com"
            }
            # The scheduled jobs report their next run; chained-only ones have none.
            jobs = {j["name"]: j for j in daemon.jobs()}
            assert set(jobs) == {
                "source:wc",
                "segments",
                "privacy",
                "destination:to-everyone",
                "destination:to-nobody",
            }
            assert jobs["source:wc"]["next_run_at"] is not None
            assert jobs["segments"]["next_run_at"] is None
            assert jobs["destination:to-everyone"]["last_status"] == "success"
        finally:
            await daemon.stop(timeout=5)

    run_async(main)


def test_webhook_changes_are_debounced_into_one_recompute_and_pushed(
    sqlite_engine: Engine, shop: SandboxServer, dest: DestinationSandbox, tmp_path: Path
) -> None:
    engine = sqlite_engine
    settings = make_settings(
        shop,
        mappings=[
            hook_mapping(tmp_path, dest, "everyone", "everyone"),
            hook_mapping(tmp_path, dest, "nobody", "nobody"),
        ],
    )
    presync(engine, settings)
    mappings = load_mappings(settings)

    async def main() -> None:
        daemon = Daemon(engine, settings, mappings, catch_up=False, recompute_every=None)
        await daemon.start()
        try:
            first = time.monotonic()
            for cid in range(1, 6):
                await daemon.customers_changed("wc", {cid})
                await asyncio.sleep(0.02)
            await daemon.customers_changed("wc", set())  # nothing changed: no trigger
            await wait_for(lambda: len(dest.webhooks["everyone"].records) > 0)
            latency = time.monotonic() - first
            await settle(daemon)
            assert len(runs(engine, "segments")) == 1
            assert len(runs(engine, "destination", "to-everyone")) == 1
            assert runs(engine, "destination", "to-nobody") == []
            assert latency < 5.0
            # The first recompute had nothing to score against, so it ran in full; from
            # then on a webhook's recompute covers the customers it changed.
            assert "scope" not in runs(engine, "segments")[0].counts
            await daemon.customers_changed("wc", {2, 3})
            await daemon.customers_changed("wc", {3, 4})
            await wait_for(lambda: len(runs(engine, "segments")) == 2)
            await settle(daemon)
            assert runs(engine, "segments")[1].counts["scope"] == 3
            # Nobody entered or left, but 3 and 4 are in "everyone", whose sync checks just
            # them (their attributes may have changed); "nobody" holds none of them.
            # Person 2 is the sandbox's shop manager, who never ordered: no customer, so
            # in no segment.
            pushed = runs(engine, "destination", "to-everyone")[1]
            assert (pushed.counts["scope"], pushed.counts["unchanged"]) == (3, 2)
            assert runs(engine, "destination", "to-nobody") == []
            # Any other request is a full recompute; the customers changed meanwhile get
            # their own scoped run once their debounce is over.
            await daemon.customers_changed("wc", {5})
            assert daemon.run_now("segments")
            await asyncio.sleep(daemon.debounce + 0.1)
            await wait_for(lambda: len(runs(engine, "segments")) == 4)
            await settle(daemon)
            third, fourth = runs(engine, "segments")[2:]
            assert "scope" not in third.counts and fourth.counts["scope"] == 1
        finally:
            await daemon.stop(timeout=5)

    run_async(main)


def test_the_customers_of_a_failed_scoped_recompute_are_tried_again(
    sqlite_engine: Engine, shop: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = sqlite_engine
    settings = make_settings(shop)
    presync(engine, settings)
    real = daemon_module.recompute
    failures: list[set[int]] = []

    def flaky(*args: Any, customers: Any = None, **kwargs: Any) -> Any:
        if customers is not None and not failures:
            failures.append(set(customers))
            raise RuntimeError("database is locked")  # what a concurrent writer caused
        return real(*args, customers=customers, **kwargs)

    monkeypatch.setattr(daemon_module, "recompute", flaky)
    monkeypatch.setattr(daemon_module, "SCOPE_RETRY_SECONDS", 0.2)

    async def main() -> None:
        daemon = Daemon(engine, settings, [], catch_up=False, recompute_every=None)
        await daemon.start()
        try:
            assert daemon.run_now("segments")  # a full one first: something to score against
            await wait_for(lambda: len(runs(engine, "segments")) == 1)
            await settle(daemon)
            await daemon.customers_changed("wc", {2, 3})
            await wait_for(lambda: bool(failures))
            # Nobody asks again: the retry comes by itself.
            await wait_for(lambda: len(runs(engine, "segments")) == 2)
            await settle(daemon)
        finally:
            await daemon.stop(timeout=5)

    run_async(main)
    assert failures == [{2, 3}]
    retried = runs(engine, "segments")[1]
    assert retried.status == "success" and retried.counts["scope"] == 2


# ---------------------------------------------------------------------------
# No overlap, coalescing
# ---------------------------------------------------------------------------


def test_a_request_made_before_a_full_run_took_the_store_is_served_by_it(
    sqlite_engine: Engine, shop: SandboxServer
) -> None:
    # At start the catch-up recompute waits for the first sync to free SQLite's writer;
    # the recompute the sync then chains would read the very same data: it is not run.
    engine = sqlite_engine
    settings = make_settings(shop)
    presync(engine, settings)
    writer = writer_lock(engine)

    async def main() -> None:
        daemon = Daemon(engine, settings, [], catch_up=False, recompute_every=None)
        await daemon.start()
        try:
            with writer:  # another job holds the store
                assert daemon.run_now("segments", "catch-up")
                await asyncio.sleep(0.2)
                assert daemon.run_now("segments", "source wc stored rows")
            await settle(daemon)
            assert len(runs(engine, "segments")) == 1
            # Asked once it is running: that one is run again.
            assert daemon.run_now("segments")
            await asyncio.sleep(0.05)
            assert daemon.run_now("segments")
            await settle(daemon)
            assert len(runs(engine, "segments")) == 3
        finally:
            await daemon.stop(timeout=5)

    run_async(main)


def test_no_job_overlaps_itself_and_chained_requests_coalesce(
    sqlite_engine: Engine, shop: SandboxServer
) -> None:
    engine = sqlite_engine
    # ~5 requests of 250 ms each: a run lasts well over the 0.4 s interval.
    shop.faults = FaultConfig(latency_ms=250)
    settings = make_settings(shop, every_s=0.4, streams=["customers", "orders", "refunds"])

    async def main() -> None:
        daemon = Daemon(engine, settings, [], catch_up=False, recompute_every=None)
        await daemon.start()
        try:
            await asyncio.sleep(1.6)
        finally:
            await daemon.stop(timeout=10)
        stats = daemon.lease_stats()["source:wc"]
        # Triggers that fired during a run queued behind it, the older ones merged into
        # the newest: runs follow each other back to back, never overlapping.
        assert stats["coalesced"] > 0
        source_runs = runs(engine, "source", "wc")
        assert 1 <= len(source_runs) == stats["claimed"]
        for before, after in itertools.pairwise(source_runs):
            assert before.finished_at is not None
            assert before.finished_at <= after.started_at

        # Requests while a run is in flight coalesce into one more run after it.
        shop.faults = FaultConfig(latency_ms=60)
        slow = make_settings(shop, streams=["customers", "orders", "refunds"])
        daemon = Daemon(engine, slow, [], catch_up=False, recompute_every=None)
        await daemon.start()
        try:
            before = len(runs(engine, "source"))
            assert daemon.run_now("source:wc")
            await asyncio.sleep(0.1)
            for _ in range(4):
                assert daemon.run_now("source:wc")
            await settle(daemon)
            assert len(runs(engine, "source")) == before + 2
            assert not daemon.run_now("no-such-job")
        finally:
            await daemon.stop(timeout=10)
        later = runs(engine, "source")[before:]
        assert later[0].finished_at <= later[1].started_at

    run_async(main)


# ---------------------------------------------------------------------------
# Replicas and the SQLite rule
# ---------------------------------------------------------------------------


@pytest.mark.postgres
def test_two_replicas_on_postgres_run_each_trigger_exactly_once(
    engine: Engine, shop: SandboxServer
) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("replicas need Postgres")
    interval = 0.5
    settings = make_settings(shop, every_s=interval)
    other = make_engine(engine.url.render_as_string(hide_password=False))

    async def main() -> tuple[Daemon, Daemon]:
        # Jitter 0: both replicas fire every trigger within milliseconds of each other.
        a = Daemon(engine, settings, [], owner="replica-a", recompute_every=None)
        b = Daemon(other, settings, [], owner="replica-b", recompute_every=None)
        await asyncio.gather(a.start(), b.start())
        try:
            await asyncio.sleep(2.8)
        finally:
            await asyncio.gather(a.stop(timeout=5), b.stop(timeout=5))
        return a, b

    try:
        a, b = run_async(main)
    finally:
        other.dispose()
    with engine.connect() as conn:
        leases = conn.execute(
            select(JOB_LEASES).where(JOB_LEASES.c.job == "source:wc").order_by(JOB_LEASES.c.slot)
        ).all()
    slots = [lease.slot for lease in leases]
    assert len(slots) >= 4
    assert {lease.owner for lease in leases} <= {"replica-a", "replica-b"}
    source_runs = runs(engine, "source", "wc")
    stats_a, stats_b = a.lease_stats()["source:wc"], b.lease_stats()["source:wc"]
    # Every trigger in the window was claimed, except where a run outlasted the interval
    # and triggers queued behind it were merged into the newest ...
    missing = sum(
        round((later - earlier).total_seconds() / interval) - 1
        for earlier, later in itertools.pairwise(slots)
    )
    assert missing <= stats_a["coalesced"] + stats_b["coalesced"]
    # ... and each claimed trigger ran exactly once, on one replica. The job's lock is held
    # from the claim to the end of the run, so claims and runs must strictly alternate:
    # claim, its run, the next claim, its run ...
    assert all(r.status == "success" for r in source_runs)
    assert len(source_runs) == len(leases)
    by_claim = sorted(leases, key=lambda lease: lease.claimed_at)
    assert [lease.slot for lease in by_claim] == slots
    for lease, run in zip(by_claim, source_runs, strict=True):
        assert lease.claimed_at <= run.started_at <= run.finished_at
    for run, next_lease in zip(source_runs, by_claim[1:], strict=False):
        assert run.finished_at <= next_lease.claimed_at
    assert stats_a["claimed"] + stats_b["claimed"] == len(slots)
    # Both replicas fired for the triggers: each one not run here was lost or merged.
    for stats in (stats_a, stats_b):
        assert stats["claimed"] + stats["lost"] + stats["coalesced"] >= len(slots) - 1


def test_a_second_process_on_one_sqlite_store_refuses_to_start(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/store.db"
    engine = open_store(url)
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from syncd.config import Settings
        from syncd.daemon import Daemon, DaemonError
        from syncd.store.engine import open_store

        async def main():
            daemon = Daemon(open_store({url!r}), Settings(), [], catch_up=False)
            try:
                await daemon.start()
            except DaemonError as exc:
                print(exc)
                sys.exit(3)

        asyncio.run(main())
        """
    )

    def second() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
        )

    async def main() -> None:
        daemon = Daemon(engine, Settings(), [], catch_up=False)
        await daemon.start()
        try:
            refused = await asyncio.to_thread(second)
            assert refused.returncode == 3, refused.stderr
            assert f"another syncd run (pid {os.getpid()})" in refused.stdout
            assert "only one process may run against a SQLite store" in refused.stdout
            # In this process too: the lock is per open file, not per process.
            with pytest.raises(DaemonError):
                await Daemon(engine, Settings(), [], catch_up=False).start()
        finally:
            await daemon.stop()
        # Once stopped, the store is free again.
        again = Daemon(engine, Settings(), [], catch_up=False)
        await again.start()
        await again.stop()

    try:
        run_async(main)
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------
# Lifecycle and readiness
# ---------------------------------------------------------------------------


def test_stop_finishes_a_short_run_and_abandons_a_long_one_within_the_timeout(
    engine: Engine, shop: SandboxServer
) -> None:
    settings = make_settings(shop, streams=["customers", "orders", "refunds"])

    async def main() -> None:
        shop.faults = FaultConfig(latency_ms=50)  # a run of about half a second
        daemon = Daemon(engine, settings, [], recompute_every=None)
        await daemon.start()
        await wait_for(lambda: len(runs(engine, "source")) == 1)
        assert daemon.readiness()["scheduler_running"]
        t0 = time.monotonic()
        await daemon.stop(timeout=8)
        assert time.monotonic() - t0 < 8
        assert [r.status for r in runs(engine, "source")] == ["success"]  # finished
        assert daemon.readiness() == {"scheduler_running": False, "overdue_jobs": []}
        assert not daemon.run_now("source:wc")  # no new work after stop

        # A run of several round trips in a row (customers, then each stream): 2 s or more.
        shop.faults = FaultConfig(latency_ms=600)
        daemon = Daemon(engine, settings, [], recompute_every=None)
        await daemon.start()
        assert daemon.run_now("source:wc")
        await wait_for(lambda: len(runs(engine, "source")) == 2)
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        await daemon.stop(timeout=0.5)
        assert time.monotonic() - t0 < 1.5
        # Cancelled where it waited: the run records itself abandoned as its thread ends
        # (before issue 19 its row stayed "running" until the job's next run; asserting
        # that raced with the cancelled run's own record).
        await asyncio.to_thread(wait_for_job_threads)
        assert runs(engine, "source")[-1].status == "abandoned"

    try:
        run_async(main)
    finally:
        shop.faults = FaultConfig()
        wait_for_job_threads()


def test_readiness_reports_the_scheduler_and_overdue_jobs(
    sqlite_engine: Engine, shop: SandboxServer
) -> None:
    engine = sqlite_engine
    settings = make_settings(shop)

    async def main() -> None:
        daemon = Daemon(engine, settings, [], catch_up=False, overdue_after=60)
        await daemon.start()
        try:
            assert daemon.readiness() == {"scheduler_running": True, "overdue_jobs": []}
            # Two hours on, the hourly source and the daily recompute should have run long
            # ago: a scheduler that stopped firing shows up as overdue jobs.
            later = datetime.now(UTC) + timedelta(hours=2)
            assert "source:wc" in daemon.readiness(later)["overdue_jobs"]
            found = await daemon.check(later + timedelta(days=1))
            assert found["overdue_jobs"] == ["source:wc", "segments", "privacy"]
            assert "wc" in found["stale_sources"]  # never synced, freshness 3 h
            assert (await daemon.check())["stale_sources"] == {}
        finally:
            await daemon.stop()

    run_async(main)


# ---------------------------------------------------------------------------
# Alerts
# ---------------------------------------------------------------------------


def test_alerts_fire_once_per_incident_and_send_a_recovery(receiver: Receiver) -> None:
    settings = AlertSettings(
        slack_webhook_url=SecretStr(receiver.url), consecutive_failures=2, rejected_share=0.1
    )

    async def main() -> Alerts:
        alerts = Alerts(settings)
        with structlog.testing.capture_logs() as logs:
            for streak in (1, 2, 3):
                alerts.run_finished("source", "wc", "failed", {}, failures_in_a_row=streak)
            alerts.run_finished("source", "wc", "success", {}, failures_in_a_row=0)
            alerts.run_finished("source", "wc", "success", {}, failures_in_a_row=0)

            refused = {"added": 8, "updated": 0, "removed": 0, "failed": 2}
            alerts.run_finished("destination", "mc", "partial", refused, failures_in_a_row=0)
            alerts.run_finished("destination", "mc", "partial", refused, failures_in_a_row=0)
            fine = {"added": 19, "updated": 0, "removed": 0, "failed": 1}  # 5 %: under 10 %
            alerts.run_finished("destination", "mc", "partial", fine, failures_in_a_row=0)

            alerts.sources_stale({"wc": "source wc is stale"})
            alerts.sources_stale({"wc": "source wc is stale"})
            alerts.sources_stale({})
            alerts.jobs_overdue(["source:wc"])
            alerts.jobs_overdue(["source:wc"])
            assert alerts.incidents == {
                "overdue:source:wc": "job source:wc is overdue: its scheduled run did not start"
            }
            alerts.jobs_overdue([])
        assert await alerts.flush(5)
        await alerts.aclose()
        errors = [e for e in logs if e["event"] == "alert"]
        assert [e["log_level"] for e in errors] == ["error"] * 4
        assert len([e for e in logs if e["event"] == "alert.recovered"]) == 4
        return alerts

    alerts = run_async(main)
    assert receiver.texts == [
        "syncd alert: source wc failed 2 times in a row",
        "syncd recovered: source wc succeeded again (success)",
        "syncd alert: destination sync mc: the destination refused 2 rows "
        "(20.0% of those sent, threshold 10.0%)",
        "syncd recovered: destination sync mc: refused rows back under 10.0%",
        "syncd alert: source wc is stale",
        "syncd recovered: source wc is syncing again",
        "syncd alert: job source:wc is overdue: its scheduled run did not start",
        "syncd recovered: job source:wc runs on schedule again",
    ]
    assert alerts.incidents == {}


def test_alerts_without_a_webhook_only_log_and_a_dead_webhook_is_survived(
    receiver: Receiver,
) -> None:
    async def main() -> None:
        quiet = Alerts(AlertSettings(consecutive_failures=1))
        with structlog.testing.capture_logs() as logs:
            quiet.run_finished("segments", "segments", "failed", {}, failures_in_a_row=1)
        assert quiet.incidents and [e["event"] for e in logs] == ["alert"]
        assert await quiet.flush(1)

        receiver.status = 500
        from syncd.http import ServiceLimits

        loud = Alerts(
            AlertSettings(slack_webhook_url=SecretStr(receiver.url), consecutive_failures=1),
            limits=ServiceLimits(max_attempts=2, backoff_base=0.01, backoff_max=0.01),
        )
        loud.run_finished("segments", "segments", "failed", {}, failures_in_a_row=1)
        loud.run_finished("segments", "segments", "success", {}, failures_in_a_row=0)
        assert await loud.flush(5)
        assert loud.undelivered == 2 and loud.sent == []
        await loud.aclose()

    run_async(main)
    assert receiver.bodies == []


def test_the_daemon_alerts_after_consecutive_failures_and_on_recovery(
    sqlite_engine: Engine, shop: SandboxServer, receiver: Receiver
) -> None:
    engine = sqlite_engine
    settings = make_settings(
        shop,
        every_s=0.3,
        streams=["customers"],
        max_attempts=1,  # a 5xx fails the run at once
        alerts={"slack_webhook_url": receiver.url, "consecutive_failures": 2},
    )

    async def main() -> None:
        shop.faults = FaultConfig(rate_5xx=1.0)
        alerts = Alerts(settings.alerts)
        daemon = Daemon(
            engine, settings, [], alerts=alerts, recompute_every=None, overdue_after=3600
        )
        await daemon.start()
        try:
            await wait_for(lambda: len(runs(engine, "source")) >= 4)
            assert {r.status for r in runs(engine, "source")} <= {"failed", "running"}
            await alerts.flush(5)
            assert receiver.texts == ["syncd alert: source wc failed 2 times in a row"]

            shop.faults = FaultConfig()
            await wait_for(lambda: runs(engine, "source")[-1].status == "success")
            await wait_for(lambda: len(receiver.bodies) == 2, timeout=5)
            assert receiver.texts[1] == "syncd recovered: source wc succeeded again (success)"

            # The watch: stale once the last success is older than the freshness.
            later = datetime.now(UTC) + timedelta(minutes=5)
            await daemon.check(later)
            await daemon.check(later)
            await daemon.check()
            await alerts.flush(5)
            assert receiver.texts[2].startswith("syncd alert: source wc last synced successfully")
            assert receiver.texts[3:] == ["syncd recovered: source wc is syncing again"]
        finally:
            await daemon.stop(timeout=5)
            shop.faults = FaultConfig()

    run_async(main)
