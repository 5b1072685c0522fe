"""The ``syncd`` command end to end: real subprocesses against the sandbox store.

Exit codes, stderr wording and the ``syncd status --json`` shape are contracts
(README, "Using it on your store" and "syncd status --json"), so they are checked
on the process as a user or a script sees it: stderr and stdout are pipes, the
config comes from a file plus the environment.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from syncd.config import STREAMS
from syncd.sandbox.server import SandboxServer
from syncd.sandbox.store import SandboxStore
from tests.conftest import POSTGRES_URL, _drop_postgres_database, _fresh_postgres_database

ORDERS = 300
KEY = "ck_sandbox"
SECRET = "cs_sandbox"
SUMMARY_RE = re.compile(
    r"^woocommerce: success: (?P<stored>\d+) rows stored, "
    r"(?P<quarantined>\d+) quarantined, (?P<requests>\d+) requests$"
)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


@dataclass
class Run:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    def stdout_lines(self) -> list[str]:
        return [line for line in self.stdout.splitlines() if line.strip()]

    def json_logs(self) -> list[dict[str, Any]]:
        logs = []
        for line in self.stderr_lines():
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                logs.append(value)
        return logs


def base_env(**extra: str) -> dict[str, str]:
    """The caller's environment without SYNCD_* (which would override the test config)."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SYNCD_")}
    for name in ("WC_KEY", "WC_SECRET", "WC_WEBHOOK_SECRET"):
        env.pop(name, None)
    # A fixed width: rich wraps at the terminal width (120 when piped), and the
    # one-line-per-problem contract must hold however narrow the terminal is.
    env["COLUMNS"] = "80"
    env["WC_KEY"] = KEY
    env["WC_SECRET"] = SECRET
    env.update(extra)
    return env


def syncd(*args: str, env: Mapping[str, str], cwd: Path | None = None, timeout: float = 60) -> Run:
    cmd = [sys.executable, "-m", "syncd", *args]
    started = time.monotonic()
    proc = subprocess.run(
        cmd,
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return Run(list(args), proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)


def write_config(directory: Path, store_url: str, source_url: str, extra: str = "") -> Path:
    path = directory / "config.toml"
    path.write_text(
        f"""\
[store]
url = "{store_url}"

[sources.woocommerce]
url = "{source_url}"
consumer_key = "env:WC_KEY"
consumer_secret = "env:WC_SECRET"
requests_per_second = 0
{extra}
""",
        encoding="utf-8",
    )
    return path


def parse_iso(value: str) -> datetime:
    assert value.endswith("Z"), value
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def sqlite_orders(db: Path) -> tuple[int, int, int]:
    """(all rows, live rows, rows with status 'trash') in a SQLite store's orders table."""
    with sqlite3.connect(db) as conn:
        row = conn.execute(
            "SELECT count(*), sum(deleted_at IS NULL), sum(status = 'trash') FROM orders"
        ).fetchone()
    return int(row[0]), int(row[1] or 0), int(row[2] or 0)


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(SandboxStore(orders=ORDERS)) as server:
        yield server


@pytest.fixture(scope="module")
def expected(sandbox: SandboxServer) -> dict[str, int]:
    store = sandbox.store
    with store.lock:
        trashed = sum(1 for o in store.orders.values() if o["status"] == "trash")
        return {
            "orders": len(store.orders),
            "live_orders": len(store.orders) - trashed,
            "trashed_orders": trashed,
            "refunds": len(store.refunds),
            "coupons": len(store.coupons),
            "products": len(store.products) + sum(len(v) for v in store.variations.values()),
            "customers": len(store.customers),
            "accounts": len(store.customers) + len(store.staff),
        }


@dataclass
class Synced:
    dialect: str
    store_url: str
    config: Path
    sync: Run
    sandbox_requests: int
    status_json: Run
    status_console: Run


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def synced(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    sandbox: SandboxServer,
) -> Iterator[Synced]:
    """One `syncd sync`, then `syncd status --json` and `syncd status`, per dialect."""
    directory = tmp_path_factory.mktemp(f"synced_{request.param}")
    pg_name = None
    if request.param == "sqlite":
        store_url = f"sqlite:///{directory}/store.db"
    else:
        if not POSTGRES_URL:
            pytest.skip("SYNCD_TEST_POSTGRES_URL is not set")
        pg_name, store_url = _fresh_postgres_database()
    try:
        config = write_config(directory, store_url, sandbox.url)
        env = base_env(SYNCD_CONFIG=str(config))
        before = len(sandbox.requests)
        sync = syncd("sync", env=env, cwd=directory)
        sandbox_requests = len(sandbox.requests) - before
        status_json = syncd("status", "--json", env=env, cwd=directory)
        status_console = syncd("status", env=base_env(SYNCD_CONFIG=str(config), COLUMNS="160"))
        yield Synced(
            request.param, store_url, config, sync, sandbox_requests, status_json, status_console
        )
    finally:
        if pg_name is not None:
            _drop_postgres_database(pg_name)


# ---------------------------------------------------------------------------
# syncd validate
# ---------------------------------------------------------------------------


def test_validate_good_config(tmp_path: Path, sandbox: SandboxServer) -> None:
    write_config(tmp_path, "sqlite:///store.db", sandbox.url)
    run = syncd("--config", "config.toml", "validate", env=base_env(), cwd=tmp_path)
    assert run.returncode == 0, run.output
    assert run.stdout_lines() == ["config.toml: ok (sources: woocommerce; destination syncs: none)"]
    assert KEY not in run.output and SECRET not in run.output
    # validate reads the config only: no store is created, the source is not called.
    assert not (tmp_path / "store.db").exists()


def test_validate_ok_line_is_one_line_however_long(tmp_path: Path, sandbox: SandboxServer) -> None:
    config = write_config(tmp_path, "sqlite:///store.db", sandbox.url)
    run = syncd("validate", env=base_env(SYNCD_CONFIG=str(config)), cwd=tmp_path)
    assert run.returncode == 0, run.output
    assert run.stdout_lines() == [f"{config}: ok (sources: woocommerce; destination syncs: none)"]


def test_validate_unknown_key_relative_config(tmp_path: Path, sandbox: SandboxServer) -> None:
    write_config(tmp_path, "sqlite:///store.db", sandbox.url, extra="per_pag = 5")
    run = syncd("--config", "config.toml", "validate", env=base_env(), cwd=tmp_path)
    assert run.returncode == 2, run.output
    assert run.stderr_lines() == [
        "config.toml: sources.woocommerce.per_pag: unknown key (did you mean 'per_page'?)"
    ]
    assert run.stdout == ""


def test_validate_unknown_key_long_path_is_one_line(tmp_path: Path, sandbox: SandboxServer) -> None:
    # An absolute path makes the line longer than the terminal: it must not be wrapped,
    # or `file: key: expected` is no longer one line a script can read.
    directory = tmp_path / ("a_long_folder_name_" * 4)
    directory.mkdir()
    config = write_config(directory, "sqlite:///store.db", sandbox.url, extra="per_pag = 5")
    run = syncd("validate", env=base_env(SYNCD_CONFIG=str(config)), cwd=tmp_path)
    assert run.returncode == 2, run.output
    assert run.stderr_lines() == [
        f"{config}: sources.woocommerce.per_pag: unknown key (did you mean 'per_page'?)"
    ]


def test_validate_misspelled_secret_key_never_echoes_the_value(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    literal = "cs_literal_value_4f9a1c"
    config = write_config(
        tmp_path,
        "sqlite:///store.db",
        sandbox.url,
        extra=f'webhook_secrett = "{literal}"',
    )
    run = syncd("validate", env=base_env(SYNCD_CONFIG=str(config)), cwd=tmp_path)
    assert run.returncode == 2, run.output
    assert run.stderr_lines() == [
        f"{config}: sources.woocommerce.webhook_secrett: unknown key "
        "(did you mean 'webhook_secret'?)"
    ]
    assert literal not in run.output


def test_validate_missing_secret_env_var(tmp_path: Path, sandbox: SandboxServer) -> None:
    key_value = "ck_present_value_7d1e0b"
    config = write_config(tmp_path, "sqlite:///store.db", sandbox.url)
    env = base_env(SYNCD_CONFIG=str(config), WC_KEY=key_value)
    del env["WC_SECRET"]
    run = syncd("validate", env=env, cwd=tmp_path)
    assert run.returncode == 2, run.output
    assert run.stderr_lines() == [
        f"{config}: sources.woocommerce.consumer_secret: environment variable WC_SECRET is not set"
    ]
    assert key_value not in run.output
    assert run.stdout == ""


@pytest.mark.parametrize("how", ["--config", "SYNCD_CONFIG", "default"])
def test_validate_missing_config_file(tmp_path: Path, how: str) -> None:
    missing = tmp_path / "nowhere" / "config.toml"
    env = base_env()
    args = ["validate"]
    if how == "--config":
        args = ["--config", str(missing), "validate"]
    elif how == "SYNCD_CONFIG":
        env["SYNCD_CONFIG"] = str(missing)
    run = syncd(*args, env=env, cwd=tmp_path)  # the default is ./config.toml: not there
    assert run.returncode == 2, run.output
    lines = run.stderr_lines()
    assert len(lines) == 1, lines
    named = "config.toml" if how == "default" else str(missing)
    assert lines[0].startswith(f"{named}: "), lines
    assert "not found" in lines[0]
    assert "Traceback" not in run.output


EXAMPLE_CONFIG = Path(__file__).resolve().parent.parent / "config.example.toml"
# Every variable the shipped example and the shipped mappings/ files read.
EXAMPLE_SECRETS = {
    "WC_KEY": "ck_example",
    "WC_SECRET": "cs_example",
    "WC_WEBHOOK_SECRET": "whsec_example",
    "KLAVIYO_API_KEY": "pk_example",
    "MAILCHIMP_API_KEY": "0123456789abcdef-us19",
    "SYNCD_WEBHOOK_SECRET": "hook_example",
}


def example_env(**secrets: str) -> dict[str, str]:
    env = base_env()
    for name in EXAMPLE_SECRETS:
        env.pop(name, None)
    env.update(secrets)
    return env


# What validate says about the example's email consent (its [consent.email]).
EMAIL_RULE = (
    "consent email (customer meta mailchimp_woocommerce_is_subscribed; "
    "order meta _wc_newsletter_optin)"
)


def test_validate_the_shipped_example_config(tmp_path: Path) -> None:
    # A user copying config.example.toml with its one listed mapping, secrets set.
    env = example_env(**EXAMPLE_SECRETS)
    run = syncd("--config", str(EXAMPLE_CONFIG), "validate", env=env, cwd=tmp_path)
    assert run.returncode == 0, run.output
    assert run.stdout_lines() == [
        f"{EXAMPLE_CONFIG}: ok (sources: woocommerce; destination syncs: klaviyo-customers, "
        "klaviyo-win-back-list, klaviyo-cart-abandoned)",
        f"klaviyo-customers: {EMAIL_RULE}",
        f"klaviyo-win-back-list: {EMAIL_RULE}",
        f"klaviyo-cart-abandoned: {EMAIL_RULE}",
    ]
    assert "pk_example" not in run.output


def test_validate_the_shipped_example_with_every_shipped_mapping(tmp_path: Path) -> None:
    # The example's segments cover every segment the mappings/ files push.
    env = example_env(**EXAMPLE_SECRETS)
    names = ("klaviyo", "mailchimp", "woocommerce", "webhook")
    env["SYNCD_DESTINATIONS__MAPPINGS"] = json.dumps([f"mappings/{n}.toml" for n in names])
    run = syncd("--config", str(EXAMPLE_CONFIG), "validate", env=env, cwd=tmp_path)
    assert run.returncode == 0, run.output
    assert run.stdout_lines() == [
        f"{EXAMPLE_CONFIG}: ok (sources: woocommerce; destination syncs: klaviyo-customers, "
        "klaviyo-win-back-list, klaviyo-cart-abandoned, mailchimp-customers, mailchimp-vip-tag, "
        "woocommerce-meta, webhook-win-back)",
        f"klaviyo-customers: {EMAIL_RULE}",
        f"klaviyo-win-back-list: {EMAIL_RULE}",
        f"klaviyo-cart-abandoned: {EMAIL_RULE}",
        f"mailchimp-customers: {EMAIL_RULE}",
        f"mailchimp-vip-tag: {EMAIL_RULE}",
        "woocommerce-meta: consent none (not a marketing channel)",
        "webhook-win-back: consent none (not a marketing channel)",
    ]


def test_validate_the_shipped_example_without_secrets_names_only_them(tmp_path: Path) -> None:
    # Before the user has exported anything, the only complaints are their own secrets,
    # one line each: the config's first, then (the config being good) the mapping's.
    run = syncd("--config", str(EXAMPLE_CONFIG), "validate", env=example_env(), cwd=tmp_path)
    assert run.returncode == 2, run.output
    assert run.stderr_lines() == [
        f"{EXAMPLE_CONFIG}: sources.woocommerce.consumer_key: environment variable WC_KEY "
        "is not set",
        f"{EXAMPLE_CONFIG}: sources.woocommerce.consumer_secret: environment variable "
        "WC_SECRET is not set",
        f"{EXAMPLE_CONFIG}: sources.woocommerce.webhook_secret: environment variable "
        "WC_WEBHOOK_SECRET is not set",
    ]
    assert run.stdout == ""

    store_secrets = {k: EXAMPLE_SECRETS[k] for k in ("WC_KEY", "WC_SECRET", "WC_WEBHOOK_SECRET")}
    run = syncd(
        "--config", str(EXAMPLE_CONFIG), "validate", env=example_env(**store_secrets), cwd=tmp_path
    )
    assert run.returncode == 2, run.output
    klaviyo = EXAMPLE_CONFIG.parent / "mappings" / "klaviyo.toml"
    assert run.stderr_lines() == [
        f"{klaviyo}: credentials.api_key: environment variable KLAVIYO_API_KEY is not set"
    ]
    assert run.stdout == ""


# ---------------------------------------------------------------------------
# syncd sync / syncd status
# ---------------------------------------------------------------------------


def test_sync_succeeds_and_reports_rows_stored(synced: Synced) -> None:
    run = synced.sync
    assert run.returncode == 0, run.output
    lines = run.stdout_lines()
    assert len(lines) == 1, lines
    match = SUMMARY_RE.match(lines[0])
    assert match, lines[0]
    assert int(match["quarantined"]) == 0
    assert int(match["stored"]) >= ORDERS
    # The request count is what the store actually saw.
    assert int(match["requests"]) == synced.sandbox_requests > 0
    assert KEY not in run.output and SECRET not in run.output


def test_sync_logs_json_lines_with_run_finished(synced: Synced) -> None:
    run = synced.sync
    assert run.returncode == 0, run.output
    lines = run.stderr_lines()
    assert lines, "no log lines on stderr"
    # Not a terminal: every stderr line is a JSON object (no console rendering mixed in).
    for line in lines:
        assert isinstance(json.loads(line), dict), line
    finished = [log for log in run.json_logs() if log.get("event") == "run finished"]
    assert len(finished) == 1, finished
    log = finished[0]
    assert log["kind"] == "source"
    assert log["name"] == "woocommerce"
    assert log["status"] == "success"
    assert log["error"] is None
    assert isinstance(log["duration_s"], int | float) and 0 <= log["duration_s"] < 60
    assert isinstance(log["counts"], dict) and log["counts"]
    assert log["counts"]["orders.stored"] == ORDERS
    assert log["counts"]["requests"] == synced.sandbox_requests


def test_status_json_has_documented_shape_and_counts(
    synced: Synced, expected: dict[str, int]
) -> None:
    assert synced.sync.returncode == 0, synced.sync.output
    run = synced.status_json
    assert run.returncode == 0, run.output
    data = json.loads(run.stdout)

    assert set(data) >= {"version", "generated_at", "store", "sources", "totals"}
    assert data["version"] == 1
    parse_iso(data["generated_at"])
    assert set(data["store"]) >= {"url", "dialect", "schema_revision"}
    assert data["store"]["dialect"] == ("sqlite" if synced.dialect == "sqlite" else "postgresql")
    assert data["store"]["url"] == synced.store_url
    assert data["store"]["schema_revision"]

    assert set(data["sources"]) == {"woocommerce"}
    src = data["sources"]["woocommerce"]
    assert set(src) >= {"configured", "last_run", "last_success_at", "streams"}
    assert src["configured"] is True

    last = src["last_run"]
    assert set(last) >= {
        "id",
        "status",
        "started_at",
        "finished_at",
        "duration_s",
        "counts",
        "error",
    }
    assert last["status"] == "success"
    assert last["error"] is None
    assert isinstance(last["id"], int)
    started, finished = parse_iso(last["started_at"]), parse_iso(last["finished_at"])
    assert started <= finished
    assert isinstance(last["duration_s"], int | float) and 0 <= last["duration_s"] < 60
    assert src["last_success_at"] == last["finished_at"]

    counts = last["counts"]
    assert counts["orders"]["fetched"] == expected["orders"]
    assert counts["orders"]["stored"] == expected["orders"]
    summary = SUMMARY_RE.match(synced.sync.stdout_lines()[0])
    assert summary
    assert counts["requests"] == int(summary["requests"])
    stored = sum(c.get("stored", 0) for name, c in counts.items() if name != "requests")
    assert stored == int(summary["stored"])

    streams = src["streams"]
    assert set(streams) == set(STREAMS)
    for name, stream in streams.items():
        assert set(stream) >= {
            "cursor",
            "cursors",
            "rows",
            "deleted",
            "quarantined",
            "reconciled_at",
        }, name
        assert stream["quarantined"] == 0, name
        assert isinstance(stream["cursors"], dict), name

    orders = streams["orders"]
    assert orders["rows"] == expected["live_orders"]
    assert orders["deleted"] == expected["trashed_orders"]
    assert set(orders["cursors"]) >= {"orders", "orders:trash"}
    assert orders["cursor"] == orders["cursors"]["orders"]
    assert parse_iso(orders["cursor"]) <= finished
    assert streams["refunds"]["rows"] == expected["refunds"]
    assert streams["coupons"]["rows"] == expected["coupons"]
    assert streams["products"]["rows"] == expected["products"]
    assert expected["customers"] <= streams["customers"]["rows"] <= expected["accounts"]

    totals = data["totals"]
    assert set(totals) >= {"customers", "orders", "quarantined"}
    assert totals["orders"] == expected["live_orders"]
    assert totals["quarantined"] == 0
    # People: every account plus the guests.
    assert totals["customers"] > streams["customers"]["rows"]


def test_status_console_table(synced: Synced, expected: dict[str, int]) -> None:
    assert synced.sync.returncode == 0, synced.sync.output
    run = synced.status_console
    assert run.returncode == 0, run.output
    table_rows = [line for line in run.stdout_lines() if "woocommerce" in line]
    for stream in STREAMS:
        assert any(re.search(rf"\b{stream}\b", line) for line in table_rows), (stream, run.stdout)
    orders_row = next(line for line in table_rows if re.search(r"\borders\b", line))
    assert re.search(rf"\b{expected['live_orders']}\b", orders_row), orders_row
    assert "woocommerce: last run success" in run.stdout
    assert f"live orders: {expected['live_orders']}" in run.stdout


def test_sync_wrong_secret_fails_fast_without_leaking(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    wrong = "cs_wrong_0b5e77a1c2d3"
    config = write_config(tmp_path, f"sqlite:///{tmp_path}/store.db", sandbox.url)
    env = base_env(SYNCD_CONFIG=str(config), WC_SECRET=wrong)
    before = len(sandbox.requests)
    run = syncd("--log-level", "debug", "sync", env=env, cwd=tmp_path, timeout=30)
    seen = sandbox.requests[before:]
    assert run.returncode == 1, run.output
    assert run.seconds < 10, run.seconds
    # A 401 is not retried.
    assert 1 <= len(seen) <= 2, seen
    assert all(r.status == 401 for r in seen), seen

    assert run.stdout == ""
    human = [line for line in run.stderr_lines() if line.startswith("woocommerce: failed: ")]
    assert len(human) == 1, run.stderr
    assert "authentication failed" in human[0]
    assert "401" in human[0]
    # WooCommerce's own message, as the store gave it.
    assert "Invalid signature - provided signature does not match." in human[0]

    finished = [log for log in run.json_logs() if log.get("event") == "run finished"]
    assert len(finished) == 1, run.stderr
    assert finished[0]["status"] == "failed"
    assert "authentication" in finished[0]["error"]

    status = syncd("status", "--json", env=env, cwd=tmp_path)
    assert status.returncode == 0, status.output
    last = json.loads(status.stdout)["sources"]["woocommerce"]["last_run"]
    assert last["status"] == "failed"
    assert "authentication" in last["error"]

    for text in (run.stdout, run.stderr, status.stdout, status.stderr):
        assert wrong not in text
        assert KEY not in text
        assert "oauth_signature" not in text


def test_sync_unknown_source_is_a_usage_error(tmp_path: Path, sandbox: SandboxServer) -> None:
    config = write_config(tmp_path, f"sqlite:///{tmp_path}/store.db", sandbox.url)
    before = len(sandbox.requests)
    run = syncd("sync", "unknown_source", env=base_env(SYNCD_CONFIG=str(config)), cwd=tmp_path)
    assert run.returncode == 2, run.output
    assert run.stderr_lines() == [
        f"{config}: sources: unknown source 'unknown_source' (configured: woocommerce)"
    ]
    assert run.stdout == ""
    assert len(sandbox.requests) == before
    assert not (tmp_path / "store.db").exists()


def test_environment_store_url_wins_over_file(
    tmp_path: Path, sandbox: SandboxServer, expected: dict[str, int]
) -> None:
    file_db = tmp_path / "from_file.db"
    env_db = tmp_path / "from_env.db"
    config = write_config(tmp_path, f"sqlite:///{file_db}", sandbox.url)
    env = base_env(SYNCD_CONFIG=str(config), SYNCD_STORE__URL=f"sqlite:///{env_db}")
    run = syncd("sync", env=env, cwd=tmp_path)
    assert run.returncode == 0, run.output
    assert env_db.exists()
    assert not file_db.exists()
    total, live, trashed = sqlite_orders(env_db)
    assert (total, live, trashed) == (
        expected["orders"],
        expected["live_orders"],
        expected["trashed_orders"],
    )


# ---------------------------------------------------------------------------
# syncd demo
# ---------------------------------------------------------------------------


def test_demo_builds_the_store(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    db.write_bytes(b"not a database: the demo starts afresh")
    work = tmp_path / "work"  # no config.toml here: the demo needs none
    work.mkdir()
    run = syncd(
        "demo", "--orders", str(ORDERS), "--store-url", f"sqlite:///{db}", env=base_env(), cwd=work
    )
    assert run.returncode == 0, run.output
    assert f"sqlite:///{db}" in run.stdout
    for stream in STREAMS:
        assert re.search(rf"\b{stream}\b", run.stdout), stream
    total, live, trashed = sqlite_orders(db)
    demo_store = SandboxStore(seed=7, orders=ORDERS)
    want_trashed = sum(1 for o in demo_store.orders.values() if o["status"] == "trash")
    assert want_trashed >= 1
    assert total == ORDERS  # trashed orders are rows too
    assert trashed == want_trashed
    assert live == ORDERS - want_trashed
    assert f"live orders: {live}" in run.stdout
    assert not (work / "state").exists()
    # The push half: each destination holds exactly its segment (sizes from the status line).
    sizes = dict(
        (name, int(n))
        for name, n in re.findall(
            r"(\w+): (\d+)",
            next(line for line in run.stdout_lines() if line.startswith("segments: big_spenders")),
        )
    )
    lines = run.stdout_lines()
    assert any(
        line.startswith("Klaviyo: ")
        and f", {sizes['champions']} on the Champions list, "
        f"{sizes['open_carts']} 'Cart Abandoned' events"
        in line
        for line in lines
    ), run.stdout
    assert any(
        line.startswith(f"Mailchimp: {sizes['big_spenders']} audience members")
        and line.endswith(f"{sizes['big_spenders']} tagged 'big spender'")
        for line in lines
    ), run.stdout
    assert f"Webhook: {sizes['win_back']} records in 1 signed batches" in lines
    skipped = re.search(r"woocommerce-big-spenders: (\d+) skipped: not a registered", run.stdout)
    tagged = sizes["big_spenders"] - (int(skipped.group(1)) if skipped else 0)
    assert f"WooCommerce: {tagged} registered customers carry syncd_segments meta" in lines


def test_sync_with_bad_records_exits_0_and_reports_the_quarantine(tmp_path: Path) -> None:
    store = SandboxStore(seed=8, customers=20, guests=10, orders=80)
    store.add_malformed()  # three bad orders and a customer without an id
    time.sleep(1.05)  # windows end at the run's start, to the second
    with SandboxServer(store) as server:
        write_config(tmp_path, "sqlite:///store.db", server.url)
        run = syncd("sync", env=base_env(WC_KEY=KEY, WC_SECRET=SECRET), cwd=tmp_path)
    assert run.returncode == 0, run.output
    (line,) = run.stdout_lines()
    assert line.startswith("woocommerce: partial: "), line
    assert " 4 quarantined, " in line
    with sqlite3.connect(tmp_path / "store.db") as conn:
        reasons = sorted(r for (r,) in conn.execute("SELECT reason FROM quarantine"))
    assert len(reasons) == 4
    assert any("12,34abc" in r for r in reasons) and any("XYZ" in r for r in reasons)


# ---------------------------------------------------------------------------
# syncd segments
# ---------------------------------------------------------------------------

SEGMENTS_TOML = """
[segments.everyone]
rule = "orders_count >= 1"

[segments.carts]
rule = "has_open_cart"

[segments.by_sql]
sql = "SELECT customer_id FROM customer_profiles WHERE orders_count >= 2"
"""


def test_segments_json_then_status_shows_sizes(synced: Synced, tmp_path: Path) -> None:
    assert synced.sync.returncode == 0, synced.sync.output
    config = tmp_path / "config.toml"
    config.write_text(synced.config.read_text() + SEGMENTS_TOML)
    env = base_env(SYNCD_CONFIG=str(config))

    first = syncd("segments", "--json", env=env)
    assert first.returncode == 0, first.output
    data = json.loads(first.stdout)
    assert set(data["segments"]) == {"everyone", "carts", "by_sql"}
    for change in data["segments"].values():
        assert set(change) == {"size", "entered", "exited"}
        assert change["entered"] == change["size"] and change["exited"] == 0
    assert data["segments"]["everyone"]["size"] == data["buyers"] > 0
    bg = data["models"]["bgnbd"]
    assert set(bg) >= {"r", "alpha", "a", "b", "log_likelihood", "time_unit"}
    assert bg["time_unit"] == "day"
    assert all(isinstance(bg[k], float) and bg[k] > 0 for k in ("r", "alpha", "a", "b"))
    assert set(data["models"]["gamma_gamma"]) >= {"p", "q", "v"}

    # The second run: nothing changed, so nobody entered or left.
    second = syncd("segments", "--json", env=env)
    assert second.returncode == 0, second.output
    again = json.loads(second.stdout)
    assert {n: (c["entered"], c["exited"]) for n, c in again["segments"].items()} == {
        "everyone": (0, 0),
        "carts": (0, 0),
        "by_sql": (0, 0),
    }

    status = syncd("status", "--json", env=env)
    sizes = json.loads(status.stdout)["segments"]["sizes"]
    assert {n: v["size"] for n, v in sizes.items()} == {
        n: c["size"] for n, c in data["segments"].items()
    }

    console = syncd("segments", env=base_env(SYNCD_CONFIG=str(config), COLUMNS="160"))
    assert console.returncode == 0, console.output
    assert re.search(r"everyone\s*│\s*\d+\s*│\s*\+0\s*│\s*-0", console.stdout), console.stdout
    assert "BG/NBD (days): r=" in console.stdout


def test_segments_bad_as_of_and_currency_errors_exit_2(synced: Synced, tmp_path: Path) -> None:
    env = base_env(SYNCD_CONFIG=str(synced.config))
    bad_day = syncd("segments", "--as-of", "2026-13-01", env=env)
    assert bad_day.returncode == 2
    assert bad_day.stderr_lines() == ["--as-of: expected a date YYYY-MM-DD, got '2026-13-01'"]

    # Reporting in EUR without a rate for the sandbox's USD: refused, naming the key.
    config = tmp_path / "config.toml"
    config.write_text(synced.config.read_text() + '\n[profiles]\nreporting_currency = "EUR"\n')
    no_rate = syncd("segments", env=base_env(SYNCD_CONFIG=str(config)))
    assert no_rate.returncode == 2, no_rate.output
    assert no_rate.stderr_lines()[-1].startswith(f"{config}: profiles.rates: orders are in USD")


def test_validate_runs_sql_segments_against_the_store(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[store]\nurl = "sqlite:///{tmp_path}/store.db"\n'
        '[segments.ok]\nsql = "SELECT customer_id FROM customer_profiles"\n'
        '[segments.typo]\nsql = "SELECT customer_id FROM customer_profile"\n'
    )
    run = syncd("validate", env=base_env(SYNCD_CONFIG=str(config)))
    assert run.returncode == 2, run.output
    assert run.stderr_lines() == [
        f"{config}: segments.typo.sql: the query failed (it must select customer_id): "
        "no such table: customer_profile"
    ]


# ---------------------------------------------------------------------------
# Hostile or broken configs (issue 19, items 5 and 6): exit 2, `file: key: expected`
# ---------------------------------------------------------------------------

# Closes the subquery validate wraps the segment in, then stacks statements after it: run
# as one simple-protocol query on Postgres, the COMMIT ended the transaction and the DROP
# TABLE ran (validate exited 0 with the table gone).
STACKED_SQL = (
    "SELECT customer_id FROM customer_profiles) AS s LIMIT 0; COMMIT; DROP TABLE orders CASCADE; "
    "SELECT 1 AS customer_id FROM (SELECT 1 AS customer_id"
)


def store_tables(store_url: str) -> set[str]:
    from sqlalchemy import create_engine, inspect

    engine = create_engine(store_url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


@pytest.mark.parametrize("command", ["validate", "segments"])
def test_stacked_sql_in_a_segment_is_refused_and_the_table_survives(
    tmp_path: Path, store_url: str, command: str
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[store]\nurl = "{store_url}"\n[segments.sneaky]\nsql = "{STACKED_SQL}"\n')
    run = syncd(command, env=base_env(SYNCD_CONFIG=str(config)))
    assert run.returncode == 2, run.output
    assert "Traceback" not in run.stderr
    line = run.stderr_lines()[-1]  # `segments` logs its run before it
    assert line.startswith(
        f"{config}: segments.sneaky.sql: the query failed (it must select customer_id): "
        "it must be a single SELECT statement ("
    ), line
    assert "orders" in store_tables(store_url)


def _hole_config(directory: Path, case: str) -> tuple[Path, str]:
    """A config with one of item 6's holes, and the one stderr line validate must print."""
    source = 'url = "http://127.0.0.1:1"\nconsumer_key = "k"\nconsumer_secret = "s"\n'
    config = directory / "config.toml"
    mapping = directory / "hook.toml"
    sources = f'[sources.shop]\ntype = "woocommerce"\n{source}'
    hook = (
        'destination = "webhook"\nbase_url = "https://hooks.example.com/in"\n'
        '[credentials]\nsecret = "s"\n'
        '[[sync]]\nname = "hook"\nsegment = "vip"\nmode = "upsert"\n'
        '[sync.fields]\nemail = "email"\n'
    )
    with_mapping = (
        f'{sources}[segments.vip]\nrule = "orders_count >= 1"\n'
        f'[destinations]\nmappings = ["{mapping}"]\n'
    )
    body, expected = {
        "empty": (
            "",
            f"{config}: sources: expected at least one of [sources.NAME], [segments.NAME] or "
            "destinations.mappings (the config has nothing to do)",
        ),
        "source_rate_inf": (
            f"{sources}requests_per_second = inf\n",
            f"{config}: sources.shop.requests_per_second: expected a finite number, got inf",
        ),
        "secret_dev_zero": (
            sources.replace('consumer_key = "k"', 'consumer_key = "file:/dev/zero"'),
            f"{config}: sources.shop.consumer_key: expected a regular file: /dev/zero is not one",
        ),
        "secret_too_big": (
            sources.replace('consumer_key = "k"', 'consumer_key = "file:big.txt"'),
            f"{config}: sources.shop.consumer_key: expected a secret file of at most 64 KiB: "
            f"{directory / 'big.txt'} is larger",
        ),
        "source_link_local": (
            sources.replace("127.0.0.1:1", "169.254.169.254"),
            f"{config}: sources.shop.url: expected a host that is not link-local "
            "(cloud metadata), got 169.254.169.254",
        ),
        "file_base_url": (
            with_mapping,
            f"{mapping}: base_url: expected an http:// or https:// URL, got 'file:///etc/passwd'",
        ),
        "destination_link_local": (
            with_mapping,
            f"{mapping}: base_url: expected a host that is not link-local (cloud metadata), "
            "got fe80::1",
        ),
        "destination_loopback": (
            with_mapping,
            f"{mapping}: base_url: expected a host that is not this machine, got localhost; "
            "add allow_loopback = true to the mapping if a relay or test server on this host "
            "is meant",
        ),
        "every_0_s": (
            with_mapping,
            f"{mapping}: sync[hook].schedule: expected an interval of at least 10 s, "
            "got 'every 0 s'",
        ),
        "destination_rate_inf": (
            with_mapping,
            f"{mapping}: limits.requests_per_second: Input should be a finite number",
        ),
    }[case]
    (directory / "big.txt").write_text("k" * (64 * 1024 + 1))
    hook = {
        "file_base_url": hook.replace("https://hooks.example.com/in", "file:///etc/passwd"),
        "destination_link_local": hook.replace("hooks.example.com", "[fe80::1]"),
        "destination_loopback": hook.replace("hooks.example.com", "localhost:8080"),
        "every_0_s": hook.replace('mode = "upsert"', 'mode = "upsert"\nschedule = "every 0 s"'),
        "destination_rate_inf": hook + "[limits]\nrequests_per_second = inf\n",
    }.get(case, hook)
    mapping.write_text(hook)
    config.write_text(body)
    return config, expected


@pytest.mark.parametrize(
    "case",
    [
        "empty",
        "source_rate_inf",
        "secret_dev_zero",
        "secret_too_big",
        "source_link_local",
        "file_base_url",
        "destination_link_local",
        "destination_loopback",
        "every_0_s",
        "destination_rate_inf",
    ],
)
def test_validate_refuses_each_config_hole_with_exit_2(tmp_path: Path, case: str) -> None:
    config, expected = _hole_config(tmp_path, case)
    run = syncd("validate", env=base_env(SYNCD_CONFIG=str(config)))
    assert run.returncode == 2, run.output
    assert "Traceback" not in run.stderr
    assert run.stderr_lines() == [expected]


def test_push_with_a_file_base_url_exits_2_without_a_traceback(tmp_path: Path) -> None:
    config, expected = _hole_config(tmp_path, "file_base_url")
    run = syncd("push", env=base_env(SYNCD_CONFIG=str(config)))
    assert run.returncode == 2, run.output
    assert "Traceback" not in run.stderr
    assert run.stderr_lines() == [expected]


def test_an_allowed_loopback_destination_and_a_10_s_schedule_stay_valid(tmp_path: Path) -> None:
    config, _ = _hole_config(tmp_path, "every_0_s")
    mapping = tmp_path / "hook.toml"
    mapping.write_text(
        mapping.read_text()
        .replace("https://hooks.example.com/in", "http://127.0.0.1:9/in")
        .replace('/in"\n', '/in"\nallow_loopback = true\n')
        .replace("every 0 s", "every 10 s")
    )
    run = syncd("validate", env=base_env(SYNCD_CONFIG=str(config)))
    assert run.returncode == 0, run.output
