"""``syncd run`` as a real subprocess against the sandboxes: scheduled cycles reach the
expected state, the HTTP endpoints answer, a signed store webhook reaches a destination
without waiting for the schedule, and SIGTERM exits 0 within 10 s."""

from __future__ import annotations

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
from syncd.store.models import MEMBERSHIPS, ORDERS
from tests.conftest import fixture
from tests.test_cli import base_env

pytestmark = pytest.mark.slow

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


def _ok(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(url).status_code == 200
    except httpx.HTTPError:
        return False
