"""Crash safety: ``syncd sync`` killed with SIGKILL at random points, ten times, then let to
finish, leaves exactly the store an uninterrupted sync makes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from syncd.sandbox.server import FaultConfig, SandboxServer
from syncd.sandbox.store import SandboxStore
from syncd.store.engine import open_store
from syncd.store.models import SYNC_RUNS as RUNS
from tests.storedump import diff, dump

pytestmark = pytest.mark.slow


def write_config(path: Path, store_url: str, server: SandboxServer) -> Path:
    path.write_text(
        f"""
[store]
url = "{store_url}"

[sources.wc]
type = "woocommerce"
url = "{server.url}"
consumer_key = "env:WC_KEY"
consumer_secret = "env:WC_SECRET"
requests_per_second = 0
concurrency = 2
"""
    )
    return path


def run_sync(config: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "WC_KEY": "ck_sandbox", "WC_SECRET": "cs_sandbox"}
    return subprocess.Popen(
        [sys.executable, "-m", "syncd", "--config", str(config), "--log-format", "json", "sync"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_for_first_request(server: SandboxServer, proc: subprocess.Popen[bytes]) -> float:
    """When the process has started syncing (its first request reached the store)."""
    seen = len(server.requests)
    deadline = time.monotonic() + 30
    while len(server.requests) == seen:
        assert proc.poll() is None, "syncd exited before it sent a request"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    return time.monotonic()


def test_sigkill_at_random_points_loses_and_duplicates_nothing(
    store_url: str, tmp_path: Path
) -> None:
    store = SandboxStore(seed=31, customers=150, guests=80, orders=2000)
    with SandboxServer(store, faults=FaultConfig(latency_ms=25)) as server:
        reference_cfg = write_config(
            tmp_path / "reference.toml", f"sqlite:///{tmp_path}/ref.db", server
        )
        started = time.monotonic()
        assert run_sync(reference_cfg).wait(timeout=120) == 0
        duration = time.monotonic() - started

        config = write_config(tmp_path / "config.toml", store_url, server)
        rng = random.Random(7)
        killed_mid_run = 0
        for _ in range(10):
            proc = run_sync(config)
            wait_for_first_request(server, proc)
            # Each kill lands somewhere in the next twelfth of a full sync's work, so all ten
            # land mid-run (the runs resume, so together they cover most of the sync).
            time.sleep(rng.uniform(0.0, duration / 12))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                killed_mid_run += 1
            proc.wait(timeout=60)
        assert killed_mid_run == 10, "the kills must land while syncs are running"
        final = run_sync(config)
        assert final.wait(timeout=120) == 0

        engine, reference = open_store(store_url), open_store(f"sqlite:///{tmp_path}/ref.db")
        a, b = dump(engine, "wc"), dump(reference, "wc")
        assert a == b, diff(a, b)
        assert len(a["orders"]) == len(store.orders)
        with engine.connect() as conn:
            statuses = [r.status for r in conn.execute(select(RUNS.c.status).order_by(RUNS.c.id))]
        # the killed runs are recorded as abandoned by the next run, the last one succeeded
        assert statuses[-1] == "success"
        assert "running" not in statuses
        assert statuses.count("abandoned") >= killed_mid_run - 1
        engine.dispose()
        reference.dispose()
