"""SIGTERM to a real ``syncd run`` exits 0 within 10 s (Docker's default stop timeout) in
every state: idle, syncing a slow store, pushing to a slow destination, and stuck on a
store that accepts connections and never answers. The run in flight is recorded
``abandoned``, and the next run resumes from what was committed: the store ends with
every order once, the destination with exactly the segment."""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, func, select

from syncd.sandbox.deliveries import delivery, new_order
from syncd.sandbox.destinations import DestinationSandbox
from syncd.sandbox.server import FaultConfig, SandboxServer
from syncd.sandbox.store import SandboxStore
from syncd.store.engine import WriterLock, open_store
from syncd.store.models import MEMBERSHIPS, ORDERS
from syncd.store.models import SYNC_RUNS as RUNS
from tests.conftest import fixture
from tests.test_cli import base_env
from tests.test_service import HOOK_SECRET, WEBHOOK_SECRET, free_port, wait_for, write_config

pytestmark = pytest.mark.slow

STOP_BUDGET = 10.0  # s: Docker's default stop timeout, the tightest of the deployments


class HungStore:
    """A TCP server on 127.0.0.1 that accepts connections and never answers a byte."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._done.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            self.accepted.append(conn)

    def __enter__(self) -> HungStore:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        for conn in self.accepted:
            conn.close()
        self._sock.close()


def _start(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "syncd", "--config", str(config), "--log-format", "json", "run"],
        env=base_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _terminate(proc: subprocess.Popen[str]) -> tuple[int | None, float]:
    """SIGTERM; the exit status (None: still running at the budget) and the seconds taken."""
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code: int | None = proc.wait(timeout=STOP_BUDGET + 5)
    except subprocess.TimeoutExpired:
        code = None
    return code, time.monotonic() - sent


@pytest.fixture
def stopped() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()


def _statuses(engine: Engine, kind: str) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.execute(select(RUNS.c.status).where(RUNS.c.kind == kind).order_by(RUNS.c.id))
            .scalars()
            .all()
        )


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncd", "--config", str(config), *args],
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _orders(engine: Engine) -> tuple[int, int]:
    """(order rows, distinct source ids) in the store."""
    with engine.connect() as conn:
        rows, distinct = conn.execute(
            select(func.count(), func.count(ORDERS.c.source_id.distinct())).where(
                ORDERS.c.deleted_at.is_(None)
            )
        ).one()
    return int(rows), int(distinct)


def _live(shop_store: SandboxStore) -> int:
    return sum(1 for o in shop_store.orders.values() if o["status"] != "trash")


def test_sigterm_when_idle_exits_0_at_once(
    store_url: str, tmp_path: Path, stopped: list[subprocess.Popen[str]]
) -> None:
    shop_store = SandboxStore(seed=5, customers=5, guests=2, orders=10)
    with SandboxServer(shop_store) as shop, DestinationSandbox() as box:
        box.webhooks.add("crm", HOOK_SECRET)
        config = write_config(tmp_path, store_url, shop, box, free_port())
        # Far between polls: once the catch-up runs are done, nothing runs.
        config.write_text(
            config.read_text().replace("sync_every_minutes = 0.05", "sync_every_minutes = 60")
        )
        proc = _start(config)
        stopped.append(proc)
        engine = open_store(store_url)
        try:
            wait_for(
                lambda: (
                    _statuses(engine, "destination") == ["success"]
                    and _statuses(engine, "source") == ["success"]
                ),
                30,
                "the first cycle to finish",
            )
            time.sleep(0.5)
            code, took = _terminate(proc)
            assert code == 0 and took < STOP_BUDGET, (code, took)
            assert _statuses(engine, "source") == ["success"]
        finally:
            engine.dispose()


def test_sigterm_while_syncing_a_slow_store_abandons_and_the_next_run_resumes(
    store_url: str, tmp_path: Path, stopped: list[subprocess.Popen[str]]
) -> None:
    shop_store = SandboxStore(seed=6, customers=40, guests=10, orders=400)
    # Each page takes 0.3 s: the first sync takes far longer than the stop budget.
    faults = FaultConfig(latency_ms=300)
    with SandboxServer(shop_store, faults=faults) as shop, DestinationSandbox() as box:
        box.webhooks.add("crm", HOOK_SECRET)
        config = write_config(tmp_path, store_url, shop, box, free_port())
        proc = _start(config)
        stopped.append(proc)
        engine = open_store(store_url)
        try:
            wait_for(lambda: len(shop.requests) >= 4, 30, "the sync to be under way")
            code, took = _terminate(proc)
            assert code == 0 and took < STOP_BUDGET, (code, took)
            assert _statuses(engine, "source") == ["abandoned"]

            shop.faults = FaultConfig()
            resumed = _cli(config, "sync")
            assert resumed.returncode == 0, resumed.stdout + resumed.stderr
            assert _statuses(engine, "source") == ["abandoned", "success"]
            live = _live(shop_store)
            assert _orders(engine) == (live, live)  # every order, once
        finally:
            engine.dispose()


def test_sigterm_while_pushing_to_a_slow_destination_abandons_and_the_next_push_resumes(
    store_url: str, tmp_path: Path, stopped: list[subprocess.Popen[str]]
) -> None:
    shop_store = SandboxStore(seed=7, customers=60, guests=0, orders=120)
    with SandboxServer(shop_store) as shop, DestinationSandbox() as box:
        receiver = box.webhooks.add("crm", HOOK_SECRET)
        config = write_config(tmp_path, store_url, shop, box, free_port())
        # One buyer per request, 0.4 s each: the push outlasts the stop budget.
        hook = tmp_path / "hook.toml"
        hook.write_text(
            hook.read_text().replace('mode = "mirror"', 'mode = "mirror"\nbatch_size = 1')
        )
        box.set_faults(FaultConfig(latency_ms=400), vendor="webhook")
        proc = _start(config)
        stopped.append(proc)
        engine = open_store(store_url)
        try:
            wait_for(lambda: len(receiver.records) >= 2, 30, "the push to be under way")
            code, took = _terminate(proc)
            assert code == 0 and took < STOP_BUDGET, (code, took)
            assert _statuses(engine, "destination") == ["abandoned"]

            box.set_faults(FaultConfig(), vendor="webhook")
            resumed = _cli(config, "push")
            assert resumed.returncode == 0, resumed.stdout + resumed.stderr
            assert _statuses(engine, "destination") == ["abandoned", "success"]
            with engine.connect() as conn:
                buyers = {
                    str(c)
                    for c in conn.execute(
                        select(MEMBERSHIPS.c.customer_id).where(
                            MEMBERSHIPS.c.segment == "buyers", MEMBERSHIPS.c.exited_at.is_(None)
                        )
                    ).scalars()
                }
            held = {r["key"] for r in receiver.records if r["action"] != "remove"}
            assert buyers and held == buyers
        finally:
            engine.dispose()


def test_sigterm_while_stuck_on_a_store_that_never_answers_exits_0_within_10s(
    store_url: str, tmp_path: Path, stopped: list[subprocess.Popen[str]]
) -> None:
    shop_store = SandboxStore(seed=8, customers=5, guests=2, orders=20)
    with HungStore() as hung, SandboxServer(shop_store) as shop, DestinationSandbox() as box:
        box.webhooks.add("crm", HOOK_SECRET)
        port = free_port()
        config = write_config(tmp_path, store_url, shop, box, port)
        config.write_text(config.read_text().replace(shop.url, hung.url))
        proc = _start(config)
        stopped.append(proc)
        engine = open_store(store_url)
        try:
            wait_for(lambda: hung.accepted, 30, "a request to the hung store")
            # A webhook delivery meanwhile: applying it waits for the stuck run's turn at
            # the SQLite writer, and the process used to wait for that at exit (minutes).
            order = new_order(fixture("order_single.json"), 990001, "stuck.buyer@example.com")
            body, headers = delivery(WEBHOOK_SECRET, order, "order.created", "delivery-990001")
            answer = httpx.post(
                f"http://127.0.0.1:{port}/webhooks/shop", content=body, headers=headers, timeout=5
            )
            assert answer.status_code == 200
            time.sleep(0.5)
            code, took = _terminate(proc)
            assert code == 0 and took < STOP_BUDGET, (code, took)
            assert _statuses(engine, "source") == ["abandoned"]

            # The store answers again: the next run completes.
            config.write_text(config.read_text().replace(hung.url, shop.url))
            resumed = _cli(config, "sync")
            assert resumed.returncode == 0, resumed.stdout + resumed.stderr
            assert _statuses(engine, "source") == ["abandoned", "success"]
            live = _live(shop_store)
            assert _orders(engine) == (live, live)
        finally:
            engine.dispose()


def test_a_cancelled_wait_for_the_writer_lock_neither_holds_up_shutdown_nor_leaks_it() -> None:
    lock = WriterLock(exclusive=True)
    lock.__enter__()  # a job holds the store's writer turn

    async def waiting_apply() -> None:
        waiter = asyncio.create_task(_take_turn(lock))
        await asyncio.sleep(0.3)
        waiter.cancel()

    # The loop of the service: its shutdown waits for its worker threads.
    stopped = threading.Event()
    loop_thread = threading.Thread(
        target=lambda: (asyncio.run(waiting_apply()), stopped.set()), daemon=True
    )
    loop_thread.start()
    loop_thread.join(timeout=3)
    assert stopped.is_set(), "the event loop did not stop while the lock was held"

    lock.__exit__()  # the job lets go: nobody may be left holding the turn
    time.sleep(0.6)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        taken = pool.submit(lambda: lock._lock is not None and lock._lock.acquire(timeout=1))
        assert taken.result(timeout=5), "a cancelled waiter kept the writer lock"


async def _take_turn(lock: WriterLock) -> None:
    async with lock.held():
        pass
