"""Abuse benchmark, issue 19 items 5 and 6: hostile SQL and broken configs through the real
``syncd validate`` / ``segments`` / ``push`` commands, each run as a subprocess.

For each scenario it prints what was tried, what held (exit code, whether a traceback was
printed, whether the store's tables and rows are intact) and what was lost. The targets:
exit 2 with a ``file: key: expected`` line, no traceback, nothing in the store changed.
SQL scenarios run on SQLite (a temporary file) and on Postgres when
SYNCD_TEST_POSTGRES_URL is set (a throwaway database, dropped at the end).

    python benchmarks/abuse_config.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import create_engine, func, insert, inspect, select, text

from benchmarks._common import heading, print_table, verdict
from syncd.store.engine import open_store
from syncd.store.models import PROFILES

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 30.0  # a hole that hangs (an unbounded secret read) counts as lost after this

# Closes the subquery syncd wraps segment SQL in, then stacks statements after it.
STACKED = (
    "SELECT customer_id FROM customer_profiles) AS s LIMIT 0; COMMIT; "
    "DROP TABLE orders CASCADE; SELECT 1 AS customer_id FROM (SELECT 1 AS customer_id"
)
PLAIN_STACKED = "select id as customer_id from customers; commit; drop table orders"
CTE_WRITE = (
    "WITH d AS (DELETE FROM customer_profiles RETURNING customer_id) SELECT customer_id FROM d"
)
MODEL_DELETE = "DELETE FROM customer_profiles RETURNING customer_id, email"
PEOPLE = 3


def _syncd(args: list[str], config: Path, cwd: Path) -> tuple[int | None, str, float]:
    """Exit code (None: timed out), stderr, seconds."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SYNCD_")}
    env["SYNCD_CONFIG"] = str(config)
    env["PYTHONPATH"] = str(ROOT)
    env["COLUMNS"] = "200"
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "syncd", *args],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return None, "", time.monotonic() - started
    return proc.returncode, proc.stderr, time.monotonic() - started


def _last_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@contextmanager
def _stores(work: Path) -> Iterator[list[tuple[str, str]]]:
    """(label, url) of a fresh SQLite store and, when configured, a Postgres one."""
    stores = [("sqlite", f"sqlite:///{work}/store.db")]
    admin_url = os.environ.get("SYNCD_TEST_POSTGRES_URL")
    name = f"syncd_abuse_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT") if admin_url else None
    if admin is not None and admin_url:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        stores.append(("postgres", admin_url.rsplit("/", 1)[0] + "/" + name))
    try:
        yield stores
    finally:
        if admin is not None:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()


def _seed(url: str) -> None:
    """A migrated store with PEOPLE profiles (the rows a writing query would delete)."""
    engine = open_store(url)
    with engine.begin() as conn:
        conn.execute(PROFILES.delete())
        conn.execute(
            insert(PROFILES),
            [
                {"customer_id": cid, "email": f"p{cid}@example.com", "currency": "EUR"}
                for cid in range(1, PEOPLE + 1)
            ],
        )
    engine.dispose()


def _intact(url: str) -> tuple[bool, int]:
    """Whether the orders table exists, and how many profiles are left."""
    engine = create_engine(url)
    try:
        has_orders = "orders" in inspect(engine).get_table_names()
        with engine.connect() as conn:
            profiles = conn.execute(select(func.count()).select_from(PROFILES)).scalar_one()
        return has_orders, int(profiles)
    finally:
        engine.dispose()


def _sql_scenarios(work: Path, label: str, url: str) -> list[dict[str, object]]:
    results: list[dict[str, object]] = []
    config = work / f"sql-{label}.toml"
    cases = [
        ("stacked SQL after a closed subquery", STACKED, ["validate", "segments"]),
        ("stacked SQL as in the issue", PLAIN_STACKED, ["validate"]),
        ("a CTE that deletes", CTE_WRITE, ["validate", "segments"]),
    ]
    for what, sql, commands in cases:
        for command in commands:
            _seed(url)
            config.write_text(f'[store]\nurl = "{url}"\n[segments.sneaky]\nsql = "{sql}"\n')
            code, stderr, seconds = _syncd([command], config, work)
            has_orders, profiles = _intact(url)
            traceback = "Traceback" in stderr
            ok = code == 2 and not traceback and has_orders and profiles == PEOPLE
            results.append(
                {
                    "item": f"5 {what}: syncd {command} ({label})",
                    "tried": f"segment sql = {sql[:60]}…",
                    "survived": (
                        f"exit {code}, traceback {'yes' if traceback else 'no'}, orders table "
                        f"{'intact' if has_orders else 'GONE'}, {profiles}/{PEOPLE} profiles, "
                        f"{seconds:.1f} s: {_last_line(stderr)[-110:]}"
                    ),
                    "lost": (0 if has_orders else 1) + (PEOPLE - profiles),
                    "target": "exit 2, no traceback, store unchanged",
                    "ok": ok,
                }
            )
    # A SQL model in a mapping: `push` runs it (validate wraps it; push ran it bare).
    _seed(url)
    mapping = work / f"model-{label}.toml"
    mapping.write_text(
        'destination = "webhook"\nbase_url = "http://127.0.0.1:9/hook"\n'
        '[credentials]\nsecret = "s"\n'
        f'[[sync]]\nname = "model"\nsql = "{MODEL_DELETE}"\nmode = "upsert"\n'
        '[sync.fields]\nemail = "email"\n'
    )
    config.write_text(f'[store]\nurl = "{url}"\n[destinations]\nmappings = ["{mapping}"]\n')
    code, stderr, seconds = _syncd(["push"], config, work)
    _, profiles = _intact(url)
    traceback = "Traceback" in stderr
    results.append(
        {
            "item": f"5 a SQL model that deletes: syncd push ({label})",
            "tried": f"mapping sql = {MODEL_DELETE}",
            "survived": (
                f"exit {code}, traceback {'yes' if traceback else 'no'}, "
                f"{profiles}/{PEOPLE} profiles, {seconds:.1f} s"
            ),
            "lost": f"{PEOPLE - profiles} profiles",
            "target": "push fails, no traceback, no profile deleted",
            "ok": code not in (0, None) and not traceback and profiles == PEOPLE,
        }
    )
    return results


def _hole_files(work: Path, case: str) -> Path:
    """A config with one of item 6's holes (and its mapping file)."""
    directory = work / f"hole{HOLES.index(case)}"
    directory.mkdir()
    source = (
        '[sources.shop]\ntype = "woocommerce"\nurl = "http://127.0.0.1:9"\n'
        'consumer_key = "k"\nconsumer_secret = "s"\n'
    )
    mapping = directory / "hook.toml"
    hook = (
        'destination = "webhook"\nbase_url = "https://hooks.example.com/in"\n'
        '[credentials]\nsecret = "s"\n'
        '[[sync]]\nname = "hook"\nsegment = "vip"\nmode = "upsert"\n'
        '[sync.fields]\nemail = "email"\n'
    )
    with_mapping = (
        f'[store]\nurl = "sqlite:///{directory}/store.db"\n{source}'
        f'[segments.vip]\nrule = "orders_count >= 1"\n'
        f'[destinations]\nmappings = ["{mapping}"]\n'
    )
    (directory / "big.txt").write_text("k" * (1024 * 1024))
    body = {
        "empty config": "",
        "requests_per_second = inf (source)": f"{source}requests_per_second = inf\n",
        "file: secret = /dev/zero": source.replace('"k"', '"file:/dev/zero"'),
        "file: secret of 1 MiB": source.replace('"k"', '"file:big.txt"'),
        "source at 169.254.169.254": source.replace("127.0.0.1:9", "169.254.169.254"),
    }.get(case, with_mapping)
    hook = {
        "file: base_url": hook.replace("https://hooks.example.com/in", "file:///etc/passwd"),
        "file: base_url (push)": hook.replace("https://hooks.example.com/in", "file:///etc/passwd"),
        "destination at 169.254.169.254": hook.replace("hooks.example.com", "169.254.169.254"),
        "destination at [fe80::1]": hook.replace("hooks.example.com", "[fe80::1]"),
        'schedule = "every 0 s"': hook.replace(
            'mode = "upsert"', 'mode = "upsert"\nschedule = "every 0 s"'
        ),
        "requests_per_second = inf (destination)": hook + "[limits]\nrequests_per_second = inf\n",
    }.get(case, hook)
    mapping.write_text(hook)
    config = directory / "config.toml"
    config.write_text(body)
    return config


HOLES = [
    "empty config",
    "requests_per_second = inf (source)",
    "file: secret = /dev/zero",
    "file: secret of 1 MiB",
    "source at 169.254.169.254",
    "file: base_url",
    "file: base_url (push)",
    "destination at 169.254.169.254",
    "destination at [fe80::1]",
    'schedule = "every 0 s"',
    "requests_per_second = inf (destination)",
]


def _config_scenarios(work: Path) -> list[dict[str, object]]:
    results: list[dict[str, object]] = []
    for case in HOLES:
        config = _hole_files(work, case)
        command = "push" if case.endswith("(push)") else "validate"
        code, stderr, seconds = _syncd([command], config, config.parent)
        traceback = "Traceback" in stderr
        line = _last_line(stderr)
        # `file: key: expected`: the file, then the key, then what was expected.
        named = line.startswith(str(config.parent)) and (": expected" in line or "should" in line)
        ok = code == 2 and not traceback and named
        results.append(
            {
                "item": f"6 {case}: syncd {command}",
                "tried": case,
                "survived": (
                    f"exit {'timeout' if code is None else code}, traceback "
                    f"{'yes' if traceback else 'no'}, {seconds:.1f} s: "
                    f"{line.removeprefix(str(config.parent) + '/')[:110]}"
                ),
                "lost": "nothing" if ok else "the hole is open",
                "target": "exit 2, file: key: expected, no traceback",
                "ok": ok,
            }
        )
    return results


def run(quick: bool = False) -> list[dict[str, object]]:
    """Every scenario once (``quick`` changes nothing: each is one short subprocess)."""
    results: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="syncd-abuse-config-") as tmp:
        work = Path(tmp)
        with _stores(work) as stores:
            for label, url in stores:
                results += _sql_scenarios(work, label, url)
        results += _config_scenarios(work)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    heading("Abuse: user SQL and config holes (issue 19 items 5, 6)")
    results = run(args.quick)
    print_table(
        ["item", "survived", "lost", "verdict"],
        [
            [str(r["item"]), str(r["survived"]), str(r["lost"]), verdict(bool(r["ok"]))]
            for r in results
        ],
    )
    failed = [r for r in results if not r["ok"]]
    print(f"\n{len(results) - len(failed)}/{len(results)} scenarios met their target")


if __name__ == "__main__":
    main()
