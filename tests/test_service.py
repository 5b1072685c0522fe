"""``syncd run`` as a real subprocess against the sandboxes: scheduled cycles reach the
expected state, the HTTP endpoints answer, a signed store webhook reaches a destination
without waiting for the schedule, and SIGTERM exits 0 within 10 s."""

from __future__ import annotations

import itertools
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from syncd.sandbox.deliveries import delivery, new_order
from syncd.sandbox.destinations import DestinationSandbox
from syncd.sandbox.server import SandboxServer
from syncd.sandbox.store import SandboxStore
from syncd.store.engine import open_store
from syncd.store.models import JOB_LEASES, MEMBERSHIPS, ORDERS
from syncd.store.models import SYNC_RUNS as RUNS
from tests.conftest import POSTGRES_URL, _drop_postgres_database, _fresh_postgres_database, fixture
from tests.test_cli import base_env

pytestmark = pytest.mark.slow

SYNCD = [sys.executable, "-m", "syncd"]
WEBHOOK_SECRET = "wc-webhook-secret"
HOOK_SECRET = "hook-secret"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def write_config(
    tmp: Path, store_url: str, shop: SandboxServer, box: DestinationSandbox, port: int
) -> Path:
    (tmp / "hook.toml").write_text(
        f"""
destination = "webhook"
base_url = "{box.webhook_url("crm")}"
allow_loopback = true
[credentials]
secret = "{HOOK_SECRET}"
[limits]
requests_per_second = 50

[[sync]]
name = "buyers-hook"
segment = "buyers"
mode = "mirror"
[sync.fields]
email = "email"
orders = "orders_count"
"""
    )
    config = tmp / "config.toml"
    config.write_text(
        f"""
[store]
url = "{store_url}"

[sources.shop]
type = "woocommerce"
url = "{shop.url}"
consumer_key = "{shop.consumer_key}"
consumer_secret = "{shop.consumer_secret}"
webhook_secret = "{WEBHOOK_SECRET}"
requests_per_second = 0
sync_every_minutes = 0.05
jitter_seconds = 0

[server]
port = {port}

[segments.buyers]
rule = "orders_count >= 1"

[destinations]
mappings = ["hook.toml"]
"""
    )
    return config


def test_the_service_runs_serves_reacts_to_webhooks_and_stops_cleanly(tmp_path: Path) -> None:
    store_url = f"sqlite:///{tmp_path}/store.db"
    shop_store = SandboxStore(seed=3, customers=30, guests=20, orders=200)
    with SandboxServer(shop_store) as shop, DestinationSandbox() as box:
        receiver = box.webhooks.add("crm", HOOK_SECRET)
        port = free_port()
        config = write_config(tmp_path, store_url, shop, box, port)
        base = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "syncd", "--config", str(config), "--log-format", "json", "run"],
            env=base_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            client = httpx.Client(timeout=5)
            wait_for(lambda: _ok(client, f"{base}/healthz"), 30, "/healthz to answer")
            assert client.get(f"{base}/healthz").json() == {"status": "ok"}

            # A few scheduled cycles: the store has every live order, and the hook holds
            # exactly the buyers segment.
            engine = open_store(store_url)
            live = sum(1 for o in shop_store.orders.values() if o["status"] != "trash")

            def converged() -> bool:
                with engine.connect() as conn:
                    orders = conn.execute(
                        select(ORDERS.c.id).where(ORDERS.c.deleted_at.is_(None))
                    ).all()
                    buyers = conn.execute(
                        select(MEMBERSHIPS.c.customer_id).where(
                            MEMBERSHIPS.c.segment == "buyers", MEMBERSHIPS.c.exited_at.is_(None)
                        )
                    ).all()
                held: set[str] = set()
                for record in list(receiver.records):  # in arrival order
                    if record["action"] == "remove":
                        held.discard(record["key"])
                    else:
                        held.add(record["key"])
                return (
                    len(orders) == live
                    and len(buyers) > 0
                    and held == {str(b.customer_id) for b in buyers}
                )

            wait_for(converged, 60, "the store and the hook to converge")

            ready = client.get(f"{base}/readyz")
            assert ready.status_code == 200, ready.text
            metrics = client.get(f"{base}/metrics").text
            for name in ("syncd_run_duration_seconds", "syncd_segment_size", "syncd_rows_total"):
                assert name in metrics, name
            status = client.get(f"{base}/status").json()
            # (its last run may be in progress: polls come every 3 s here)
            assert status["sources"]["shop"]["last_success_at"] is not None
            assert status["destinations"]["buyers-hook"]["records"]["in_destination"] > 0

            # A signed webhook for a new buyer reaches the destination without a poll.
            email = "webhook.buyer@example.com"
            order = new_order(fixture("order_single.json"), 990001, email)
            body, headers = delivery(WEBHOOK_SECRET, order, "order.created", "delivery-990001")
            forged = client.post(
                f"{base}/webhooks/shop",
                content=body,
                headers={**headers, "X-WC-Webhook-Signature": "x"},
            )
            assert forged.status_code == 401
            sent = time.monotonic()
            answer = client.post(f"{base}/webhooks/shop", content=body, headers=headers)
            assert answer.status_code == 200
            # Not waiting for a poll: polls come every 3 s here, so 30 s is generous for
            # a loaded CI machine (the latency itself is measured by benchmarks/webhooks.py).
            wait_for(
                lambda: any(r["data"].get("email") == email for r in receiver.records),
                30,
                "the webhook's buyer at the destination",
            )
            assert time.monotonic() - sent < 30

            stop = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
            assert time.monotonic() - stop < 10
            engine.dispose()
        finally:
            if proc.poll() is None:
                proc.kill()
            output = proc.stdout.read() if proc.stdout else ""
            proc.wait()
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert any(line.get("event") == "service.stopped" for line in lines), output[-2000:]


@pytest.mark.postgres
def test_two_service_processes_on_postgres_run_each_scheduled_trigger_once(
    tmp_path: Path,
) -> None:
    if not POSTGRES_URL:
        pytest.skip("SYNCD_TEST_POSTGRES_URL is not set")
    name, store_url = _fresh_postgres_database()
    shop_store = SandboxStore(seed=4, customers=20, guests=10, orders=80)
    interval = 1.5
    procs: list[subprocess.Popen[bytes]] = []
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    try:
        with SandboxServer(shop_store) as shop, DestinationSandbox() as box:
            box.webhooks.add("crm", HOOK_SECRET)
            ports = [free_port(), free_port()]
            for n, (port, log) in enumerate(zip(ports, logs, strict=True)):
                folder = tmp_path / f"replica{n}"
                folder.mkdir()
                config = write_config(folder, store_url, shop, box, port)
                text = config.read_text().replace(
                    "sync_every_minutes = 0.05", f"sync_every_minutes = {interval / 60}"
                )
                config.write_text(text + '\n[log]\nlevel = "debug"\n')
                with log.open("wb") as out:
                    procs.append(
                        subprocess.Popen(
                            [*SYNCD, "--config", str(config), "--log-format", "json", "run"],
                            env=base_env(),
                            stdout=out,
                            stderr=subprocess.STDOUT,
                        )
                    )
            client = httpx.Client(timeout=5)
            for port in ports:
                wait_for(lambda p=port: _ok(client, f"http://127.0.0.1:{p}/healthz"), 30, "up")
            time.sleep(6 * interval)
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            assert [proc.wait(timeout=15) for proc in procs] == [0, 0]
        engine = open_store(store_url)
        try:
            with engine.connect() as conn:
                leases = conn.execute(
                    select(JOB_LEASES)
                    .where(JOB_LEASES.c.job == "source:shop")
                    .order_by(JOB_LEASES.c.claimed_at)
                ).all()
                source_runs = conn.execute(
                    select(RUNS)
                    .where(RUNS.c.kind == "source", RUNS.c.name == "shop")
                    .order_by(RUNS.c.started_at)
                ).all()
        finally:
            engine.dispose()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        _drop_postgres_database(name)
    lines = [
        [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        for log in logs
    ]
    # Each trigger of the scheduled source sync was claimed by one process and ran once:
    # one run per claimed trigger, in claim order, never two at a time.
    assert len(leases) >= 4
    assert len({lease.slot for lease in leases}) == len(leases)
    assert len(source_runs) == len(leases)
    assert all(run.status == "success" for run in source_runs)
    for lease, run in zip(leases, source_runs, strict=True):
        assert lease.claimed_at <= run.started_at
    for earlier, later in itertools.pairwise(source_runs):
        assert earlier.finished_at <= later.started_at
    # Both processes competed for the triggers: each either won some or logged finding
    # a trigger taken by the other.
    owners = {lease.owner.split(":")[1] for lease in leases}
    for proc, events in zip(procs, lines, strict=True):
        taken = [e for e in events if e.get("event") == "job.slot_taken"]
        assert str(proc.pid) in owners or taken, f"process {proc.pid} never fired"
    assert {str(proc.pid) for proc in procs} >= owners


def _ok(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(url).status_code == 200
    except httpx.HTTPError:
        return False
