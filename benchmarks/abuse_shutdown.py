"""Issue 19, item 3: SIGTERM to ``syncd run`` in four states, on SQLite and Postgres.

States: idle (the first cycle done), syncing (a store answering every request after
0.3 s), pushing (a webhook destination answering every record after 0.4 s), stuck (a
store on 127.0.0.1 that accepts connections and never answers, with a webhook delivery
waiting to be applied). For each: the seconds from SIGTERM to exit, the exit status,
the status the run in flight was recorded with, and whether the following run (``syncd
sync`` or ``syncd push``) completed with nothing lost and nothing twice. Target: exit 0
within 10 s (Docker's default stop timeout) in every state, on both stores.

    python benchmarks/abuse_shutdown.py [--quick]

Postgres runs when SYNCD_TEST_POSTGRES_URL is set (a throwaway database is made and
dropped); only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine, create_engine, func, select, text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import child_process_options, heading, print_table, stop_process
from syncd.sandbox.deliveries import delivery, new_order
from syncd.sandbox.destinations import DestinationSandbox
from syncd.sandbox.server import FaultConfig, SandboxServer
from syncd.sandbox.store import SandboxStore
from syncd.store.engine import open_store
from syncd.store.models import MEMBERSHIPS, ORDERS
from syncd.store.models import SYNC_RUNS as RUNS

TARGET = "SIGTERM -> exit 0 within 10 s; run recorded abandoned; next run complete"
BUDGET = 10.0
WEBHOOK_SECRET = "bench-webhook-secret"
HOOK_SECRET = "bench-hook-secret"
FIXTURE = Path(__file__).resolve().parent.parent / "tests/fixtures/woocommerce/order_single.json"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class HungStore:
    """Accepts connections on 127.0.0.1 and never answers a byte."""

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


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SYNCD_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def write_config(
    tmp: Path, store_url: str, shop_url: str, shop: SandboxServer, box: DestinationSandbox,
    port: int, batch_size: int | None = None,
) -> Path:  # fmt: skip
    batch = f"batch_size = {batch_size}\n" if batch_size else ""
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
{batch}[sync.fields]
email = "email"
"""
    )
    config = tmp / "config.toml"
    config.write_text(
        f"""
[store]
url = "{store_url}"

[sources.shop]
type = "woocommerce"
url = "{shop_url}"
consumer_key = "{shop.consumer_key}"
consumer_secret = "{shop.consumer_secret}"
webhook_secret = "{WEBHOOK_SECRET}"
requests_per_second = 0
sync_every_minutes = 60
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


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")


def statuses(engine: Engine, kind: str) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.execute(select(RUNS.c.status).where(RUNS.c.kind == kind).order_by(RUNS.c.id))
            .scalars()
            .all()
        )


def cli(config: Path, *args: str) -> int:
    done = subprocess.run(
        [sys.executable, "-m", "syncd", "--config", str(config), *args],
        env=child_env(),
        cwd=ROOT,
        capture_output=True,
        timeout=300,
    )
    return done.returncode


def order_loss(engine: Engine, shop_store: SandboxStore) -> tuple[int, int]:
    """(orders missing from the store, order rows stored more than once)."""
    live = {o["id"] for o in shop_store.orders.values() if o["status"] != "trash"}
    with engine.connect() as conn:
        rows = conn.execute(
            select(ORDERS.c.source_id, func.count())
            .where(ORDERS.c.deleted_at.is_(None))
            .group_by(ORDERS.c.source_id)
        ).all()
    stored = {int(r[0]) for r in rows}
    return len(live - stored), sum(int(r[1]) - 1 for r in rows)


def push_loss(engine: Engine, receiver: Any) -> tuple[int, int]:
    """(buyers missing at the destination, keys held there that are not buyers)."""
    with engine.connect() as conn:
        buyers = {
            str(c)
            for c in conn.execute(
                select(MEMBERSHIPS.c.customer_id).where(
                    MEMBERSHIPS.c.segment == "buyers", MEMBERSHIPS.c.exited_at.is_(None)
                )
            ).scalars()
        }
    held: set[str] = set()
    for record in list(receiver.records):
        if record["action"] == "remove":
            held.discard(record["key"])
        else:
            held.add(record["key"])
    return len(buyers - held), len(held - buyers)


def store_urls(tmp: Path) -> list[tuple[str, str]]:
    """(label, url pattern) per store: SQLite always, Postgres (a throwaway database per
    scenario) when SYNCD_TEST_POSTGRES_URL is set."""
    urls = [("sqlite", f"sqlite:///{tmp}/store-{{state}}.db")]
    admin_url = os.environ.get("SYNCD_TEST_POSTGRES_URL")
    if admin_url:
        urls.append(("postgres", admin_url.rsplit("/", 1)[0] + "/syncd_bench_shutdown_{state}"))
    return urls


def fresh_postgres(url: str) -> str:
    admin_url = os.environ["SYNCD_TEST_POSTGRES_URL"]
    name = url.rsplit("/", 1)[1] + "_" + uuid.uuid4().hex[:8]
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return name


def drop_postgres(name: str) -> None:
    admin = create_engine(os.environ["SYNCD_TEST_POSTGRES_URL"], isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def scenario(state: str, label: str, store_url: str, tmp: Path, quick: bool) -> dict[str, Any]:
    scale = 1 if quick else 3
    customers, orders = 40 * scale, 200 * scale
    shop_store = SandboxStore(seed=11, customers=customers, guests=10, orders=orders)
    shop_faults = FaultConfig(latency_ms=300) if state == "syncing" else None
    with (
        SandboxServer(shop_store, faults=shop_faults) as shop,
        DestinationSandbox() as box,
        HungStore() as hung,
    ):
        receiver = box.webhooks.add("crm", HOOK_SECRET)
        port = free_port()
        shop_url = hung.url if state == "stuck" else shop.url
        batch = 1 if state == "pushing" else None
        config = write_config(tmp, store_url, shop_url, shop, box, port, batch)
        if state == "pushing":
            box.set_faults(FaultConfig(latency_ms=400), vendor="webhook")
        proc = subprocess.Popen(
            [sys.executable, "-m", "syncd", "--config", str(config), "run"],
            env=child_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            **child_process_options(),
        )  # fmt: skip
        engine = open_store(store_url)
        tried = f"SIGTERM while {state}"
        try:
            if state == "idle":
                wait_for(
                    lambda: statuses(engine, "destination") == ["success"], 120, "the first cycle"
                )
                time.sleep(0.5)
            elif state == "syncing":
                wait_for(lambda: len(shop.requests) >= 4, 60, "the sync to be under way")
                tried += f" ({orders} orders, 0.3 s per request, {len(shop.requests)} answered)"
            elif state == "pushing":
                wait_for(lambda: len(receiver.records) >= 2, 120, "the push to be under way")
                tried += f" (1 buyer per request, 0.4 s each, {len(receiver.records)} sent)"
            else:
                wait_for(lambda: hung.accepted, 60, "a request to the hung store")
                body, headers = delivery(
                    WEBHOOK_SECRET,
                    new_order(json.loads(FIXTURE.read_text()), 990001, "b@example.com"),
                    "order.created",
                    "delivery-990001",
                )
                httpx.post(
                    f"http://127.0.0.1:{port}/webhooks/shop",
                    content=body,
                    headers=headers,
                    timeout=5,
                )
                time.sleep(0.5)
                tried += " (store accepts and never answers; 1 webhook delivery pending)"
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                code: int | None = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                code = None
            took = time.monotonic() - sent
            kind = "destination" if state == "pushing" else "source"
            recorded = statuses(engine, kind)
            in_flight = recorded[-1] if recorded else "none"

            # The next run, with the store and the destination answering again.
            shop.faults = FaultConfig()
            box.set_faults(FaultConfig(), vendor="webhook")
            if state == "stuck":
                config.write_text(config.read_text().replace(hung.url, shop.url))
            if state == "pushing":
                resumed = cli(config, "push") == 0 and statuses(engine, kind)[-1] == "success"
                missing, extra = push_loss(engine, receiver)
                lost = f"{missing} buyers missing, {extra} extra at the destination"
            else:
                resumed = cli(config, "sync") == 0 and statuses(engine, kind)[-1] == "success"
                missing, extra = order_loss(engine, shop_store)
                lost = f"{missing} orders missing, {extra} stored twice"
        finally:
            stop_process(proc, group=True)
            engine.dispose()
    expected = "success" if state == "idle" else "abandoned"
    ok = (
        code == 0
        and took <= BUDGET
        and in_flight == expected
        and resumed
        and missing == 0
        and extra == 0
    )
    exit_text = "still running at 60 s" if code is None else f"exit {code}"
    return {
        "item": f"3 SIGTERM {state} ({label})",
        "tried": tried,
        "survived": (
            f"{exit_text} after {took:.2f} s; run recorded {in_flight}; "
            f"next run {'completed' if resumed else 'did NOT complete'}"
        ),
        "lost": lost,
        "target": TARGET,
        "ok": ok,
        "seconds": round(took, 2),
        "exit": code,
        "status": in_flight,
    }


def run(quick: bool = False) -> list[dict[str, object]]:
    results: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="syncd-abuse-shutdown-") as tmp_name:
        tmp = Path(tmp_name)
        for label, pattern in store_urls(tmp):
            for state in ("idle", "syncing", "pushing", "stuck"):
                where = tmp / f"{label}-{state}"
                where.mkdir()
                made = None
                if label == "postgres":
                    made = fresh_postgres(pattern.format(state=state))
                    url = pattern.rsplit("/", 1)[0] + "/" + made
                else:
                    url = pattern.format(state=state)
                try:
                    results.append(scenario(state, label, url, where, quick))
                except Exception as exc:
                    results.append(
                        {
                            "item": f"3 SIGTERM {state} ({label})",
                            "tried": f"SIGTERM while {state}",
                            "survived": f"the scenario could not run: {exc}",
                            "lost": "unknown",
                            "target": TARGET,
                            "ok": False,
                        }
                    )
                finally:
                    if made is not None:
                        drop_postgres(made)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller stores")
    args = parser.parse_args()
    heading("SIGTERM in every state (issue 19, item 3)")
    results = run(quick=args.quick)
    print_table(
        ["scenario", "seconds", "exit", "run status", "lost", "ok"],
        [
            [
                str(r["item"]),
                str(r.get("seconds", "-")),
                str(r.get("exit", "-")),
                str(r.get("status", "-")),
                str(r["lost"]),
                "PASS" if r["ok"] else "FAIL",
            ]
            for r in results
        ],
    )
    for r in results:
        print(f"- {r['item']}: tried {r['tried']}; {r['survived']}; lost: {r['lost']}")


if __name__ == "__main__":
    main()
