"""``syncd push`` as a real subprocess: crash safety under SIGKILL, --dry-run, validation
errors, and what ``syncd status`` says about destination syncs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from syncd.sandbox.destinations import DestinationSandbox
from syncd.sandbox.server import FaultConfig
from syncd.store.engine import open_store
from syncd.store.models import SYNC_RUNS
from tests.test_cli import base_env, syncd
from tests.test_push import SECRET, add_people, email

MEMBERS = 1500


def write_config(tmp_path: Path, store_url: str, sandbox: DestinationSandbox, batch: int) -> Path:
    mapping = tmp_path / "dest.toml"
    mapping.write_text(
        f"""
destination = "webhook"
name = "crm"
base_url = "{sandbox.webhook_url("crm")}"
allow_loopback = true
[credentials]
secret = "env:HOOK_SECRET"
[limits]
requests_per_second = 1000
concurrency = 2

[[sync]]
name = "hook"
segment = "vip"
mode = "upsert"
batch_size = {batch}
[sync.fields]
email = "email"
"profile.first_name" = "first_name"
"""
    )
    klaviyo = tmp_path / "klaviyo.toml"
    klaviyo.write_text(
        f"""
destination = "klaviyo"
base_url = "{sandbox.klaviyo_url}"
allow_loopback = true
[credentials]
api_key = "env:KLAVIYO_KEY"
[limits]
requests_per_second = 1000
concurrency = 2

[[sync]]
name = "entered-vip"
segment = "vip"
mode = "event"
object = "Entered VIP"
batch_size = {batch}
[sync.fields]
email = "email"
"properties.first_name" = "first_name"
"""
    )
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[store]
url = "{store_url}"

[segments.vip]
rule = "orders_count >= 0"

[destinations]
mappings = ["dest.toml", "klaviyo.toml"]
"""
    )
    return config


@pytest.fixture
def sandbox() -> Iterator[DestinationSandbox]:
    with DestinationSandbox() as box:
        box.webhooks.add("crm", SECRET)
        box.klaviyo.limits_enabled = False
        yield box


def env_for(sandbox: DestinationSandbox) -> dict[str, str]:
    return base_env(HOOK_SECRET=SECRET, KLAVIYO_KEY=sandbox.klaviyo.api_key)


@pytest.mark.slow
def test_push_killed_mid_run_sends_every_row_once_bar_the_batches_in_flight(
    store_url: str, sandbox: DestinationSandbox, tmp_path: Path
) -> None:
    engine = open_store(store_url)
    add_people(engine, range(1, MEMBERS + 1))
    batch = 20
    config = write_config(tmp_path, store_url, sandbox, batch)
    # Slow answers, so the kills land mid-run with batches in flight.
    sandbox.set_faults(FaultConfig(latency_ms=15))
    receiver = sandbox.webhooks["crm"]
    env = env_for(sandbox)
    cmd = [sys.executable, "-m", "syncd", "--config", str(config), "push"]
    kills = 0
    # Three kills in the webhook sync, two in the Klaviyo event sync after it.
    for target in (10, 30, 55):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while len(receiver.batches) < target and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        kills += 1
    for target in (15, 45):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while (
            len(sandbox.klaviyo.events) + sandbox.klaviyo.duplicate_events < target * batch
            and time.monotonic() < deadline
        ):
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        kills += 1
    assert 0 < len(sandbox.klaviyo.events) < MEMBERS, "the event-sync kills must land mid-run"
    final = syncd("--config", str(config), "push", env=env, timeout=120)
    assert final.returncode == 0, final.output

    delivered = Counter(r["key"] for r in receiver.records)
    assert set(delivered) == {str(c) for c in range(1, MEMBERS + 1)}
    twice = [k for k, n in delivered.items() if n > 1]
    assert max(delivered.values()) <= 2
    # At most the batches in flight at each kill (concurrency 2) went out again.
    assert len(twice) <= 3 * 2 * batch
    # Every entry made exactly one event; a re-sent batch carried the same unique ids.
    events = sandbox.klaviyo.events
    assert len(events) == MEMBERS
    assert len({e["unique_id"] for e in events}) == MEMBERS
    assert sandbox.klaviyo.duplicate_events <= 2 * 2 * batch
    with engine.connect() as conn:
        statuses = [
            r.status
            for r in conn.execute(
                select(SYNC_RUNS.c.status)
                .where(SYNC_RUNS.c.kind == "destination")
                .order_by(SYNC_RUNS.c.id)
            )
        ]
    assert "running" not in statuses
    assert statuses[-2:] == ["success", "success"]
    assert statuses.count("abandoned") >= kills - 1
    engine.dispose()


def test_dry_run_prints_the_plan_and_masked_samples_and_sends_nothing(
    sandbox: DestinationSandbox, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{tmp_path}/store.db"
    engine = open_store(store_url)
    add_people(engine, range(1, 6))
    engine.dispose()
    config = write_config(tmp_path, store_url, sandbox, 100)
    run = syncd("--config", str(config), "push", "hook", "--dry-run", env=env_for(sandbox))
    assert run.returncode == 0, run.output
    assert "hook: would send: upsert 5" in run.stdout_lines()
    samples = [line for line in run.stdout_lines() if line.startswith("hook: sample upsert ")]
    assert len(samples) == 3
    payload = json.loads(samples[0].removeprefix("hook: sample upsert "))
    assert payload == {"email": "p***", "profile": {"first_name": "F***"}}
    assert email(1) not in run.output and "First1" not in run.output
    assert sandbox.requests == []

    real = syncd("--config", str(config), "push", "hook", "--json", env=env_for(sandbox))
    assert real.returncode == 0, real.output
    (result,) = json.loads(real.stdout)
    assert result["status"] == "success" and result["counts"]["added"] == 5
    status = syncd("--config", str(config), "status", env=env_for(sandbox))
    assert any(
        line.startswith("push hook: 5 in destination, 0 failed, 0 skipped; last run success")
        and "[added=5 updated=0 removed=0 unchanged=0 failed=0 skipped=0]" in line
        for line in status.stdout_lines()
    ), status.stdout


def test_unknown_sync_and_bad_mappings_exit_2_naming_file_and_key(
    sandbox: DestinationSandbox, tmp_path: Path
) -> None:
    config = write_config(tmp_path, f"sqlite:///{tmp_path}/s.db", sandbox, 100)
    env = env_for(sandbox)
    run = syncd("--config", str(config), "push", "nope", env=env)
    assert run.returncode == 2
    assert run.stderr_lines() == [
        f"{config}: destinations: unknown sync 'nope' (configured: hook, entered-vip)"
    ]
    mapping = tmp_path / "dest.toml"
    mapping.write_text(mapping.read_text().replace('mode = "upsert"', 'mode = "sideways"'))
    run = syncd("--config", str(config), "validate", env=env)
    assert run.returncode == 2
    assert run.stderr_lines() == [
        f"{mapping}: sync[hook].mode: Input should be 'upsert', 'mirror', 'event', 'delete' "
        "or 'replace'"
    ]
    run = syncd("--config", str(config), "push", env={**env, "HOOK_SECRET": ""})
    assert run.returncode == 2
    assert f"{mapping}: sync[hook].mode" in run.stderr


def test_validate_reports_a_sql_model_that_cannot_run(
    sandbox: DestinationSandbox, tmp_path: Path
) -> None:
    config = write_config(tmp_path, f"sqlite:///{tmp_path}/s.db", sandbox, 100)
    mapping = tmp_path / "dest.toml"
    mapping.write_text(
        mapping.read_text().replace(
            'segment = "vip"', 'sql = "SELECT customer_id, email FROM customer_profiles"'
        )
    )
    run = syncd("--config", str(config), "validate", env=env_for(sandbox))
    assert run.returncode == 2
    assert run.stderr_lines() == [
        f"{mapping}: sync[hook].sql: the query has no column 'first_name' "
        "(it returns customer_id, email)"
    ]


def test_a_push_whose_every_row_is_refused_exits_1_and_retry_failed_sends_the_given_up(
    sandbox: DestinationSandbox, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{tmp_path}/store.db"
    engine = open_store(store_url)
    add_people(engine, range(1, 6))
    engine.dispose()
    config = write_config(tmp_path, store_url, sandbox, 100)
    mapping = tmp_path / "dest.toml"
    # One try: a refused row is given up at once (what a fourth refusal does by default).
    mapping.write_text(
        mapping.read_text().replace("batch_size = 100", "batch_size = 100\nmax_attempts = 1", 1)
    )
    receiver = sandbox.webhooks["crm"]
    receiver.reject = lambda record: "account suspended"
    env = env_for(sandbox)

    refused = syncd("--config", str(config), "push", "hook", "--json", env=env)
    assert refused.returncode == 1, refused.output
    (result,) = json.loads(refused.stdout)
    assert result["status"] == "failed"
    assert result["error"] == "the destination refused every row sent (5): account suspended"
    assert (result["counts"]["failed"], result["counts"]["given_up"]) == (5, 5)
    status = syncd("--config", str(config), "status", env=env)
    assert any(
        line.startswith(
            "push hook: 0 in destination, 5 failed, 0 skipped, 5 given up "
            "(syncd push --retry-failed hook)"
        )
        for line in status.stdout_lines()
    ), status.stdout

    receiver.reject = None  # the destination recovers
    again = syncd("--config", str(config), "push", "hook", "--json", env=env)
    assert again.returncode == 0, again.output
    (result,) = json.loads(again.stdout)
    assert (result["counts"]["given_up"], result["counts"]["requests"]) == (5, 0)
    assert receiver.records == []
    retried = syncd("--config", str(config), "push", "hook", "--retry-failed", env=env)
    assert retried.returncode == 0, retried.output
    assert sorted(int(r["key"]) for r in receiver.records) == [1, 2, 3, 4, 5]
