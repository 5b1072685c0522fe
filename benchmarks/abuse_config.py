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

from benchmarks._common import heading, verdict
from syncd.store.engine import open_store
from syncd.store.models import PROFILES, SYNC_RECORDS

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
MODEL_STACKED = (
    "SELECT customer_id, email FROM customer_profiles) AS m LIMIT 0; COMMIT; "
    "DROP TABLE orders CASCADE; SELECT * FROM (SELECT 1 AS customer_id, 'x' AS email"
)
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
    """The error line: the last one naming a key (a database error may add LINE/caret lines)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    named = [line for line in lines if "sql" in line or "expected" in line]
    return (named or lines or [""])[-1]


@contextmanager
def _fresh_store(work: Path, label: str) -> Iterator[str]:
    """The URL of a new, empty store: a SQLite file, or a throwaway Postgres database."""
    name = f"syncd_abuse_{uuid.uuid4().hex[:12]}"
    if label == "sqlite":
        yield f"sqlite:///{work}/{name}.db"
        return
    admin_url = os.environ["SYNCD_TEST_POSTGRES_URL"]
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
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


def _intact(url: str) -> tuple[bool, int, int]:
    """Whether the orders table exists, how many profiles are left, and how many records
    a push planned (a model that ran: rows sent or tried)."""
    engine = create_engine(url)
    try:
        has_orders = "orders" in inspect(engine).get_table_names()
        with engine.connect() as conn:
            profiles = conn.execute(select(func.count()).select_from(PROFILES)).scalar_one()
            records = conn.execute(select(func.count()).select_from(SYNC_RECORDS)).scalar_one()
        return has_orders, int(profiles), int(records)
    finally:
        engine.dispose()


def _sql_scenarios(work: Path, label: str) -> list[dict[str, object]]:
    results: list[dict[str, object]] = []
    config = work / f"sql-{label}.toml"
    cases = [
        ("stacked SQL after a closed subquery", STACKED, ["validate", "segments"]),
        ("stacked SQL as in the issue", PLAIN_STACKED, ["validate"]),
        ("a CTE that deletes", CTE_WRITE, ["validate", "segments"]),
    ]
    for what, sql, commands in cases:
        for command in commands:
            with _fresh_store(work, label) as url:
                _seed(url)
                config.write_text(f'[store]\nurl = "{url}"\n[segments.sneaky]\nsql = "{sql}"\n')
                code, stderr, seconds = _syncd([command], config, work)
                has_orders, profiles, _ = _intact(url)
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
    # A SQL model in a mapping: `validate` runs it wrapped, `push` ran it bare.
    for what, sql in (("deletes", MODEL_DELETE), ("stacks statements", MODEL_STACKED)):
        for command in ("validate", "push"):
            with _fresh_store(work, label) as url:
                _seed(url)
                mapping = work / f"model-{label}.toml"
                mapping.write_text(
                    'destination = "webhook"\nbase_url = "http://127.0.0.1:9/hook"\n'
                    "allow_loopback = true\n"
                    '[credentials]\nsecret = "s"\n'
                    f'[[sync]]\nname = "model"\nsql = "{sql}"\nmode = "upsert"\n'
                    '[sync.fields]\nemail = "email"\n'
                )
                config.write_text(
                    f'[store]\nurl = "{url}"\n[destinations]\nmappings = ["{mapping}"]\n'
                )
                code, stderr, seconds = _syncd([command], config, work)
                has_orders, profiles, records = _intact(url)
            traceback = "Traceback" in stderr
            results.append(
                {
                    "item": f"5 a SQL model that {what}: syncd {command} ({label})",
                    "tried": f"mapping sql = {sql[:60]}",
                    "survived": (
                        f"exit {'timeout' if code is None else code}, traceback "
                        f"{'yes' if traceback else 'no'}, orders table "
                        f"{'intact' if has_orders else 'GONE'}, {profiles}/{PEOPLE} profiles, "
                        f"{records} rows of the query pushed or tried, {seconds:.1f} s: "
                        f"{_last_line(stderr)[-80:]}"
                    ),
                    "lost": (0 if has_orders else 1) + (PEOPLE - profiles),
                    "target": "refused (exit 2 validate, 1 push), no traceback, store unchanged, "
                    "nothing pushed",
                    "ok": code == (2 if command == "validate" else 1)
                    and not traceback
                    and has_orders
                    and profiles == PEOPLE
                    and records == 0,
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
        "destination at 127.0.0.1 (no allow_loopback)": hook.replace(
            "hooks.example.com", "127.0.0.1:8080"
        ),
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
    "destination at 127.0.0.1 (no allow_loopback)",
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
        for label in ("sqlite", "postgres"):
            if label == "sqlite" or os.environ.get("SYNCD_TEST_POSTGRES_URL"):
                results += _sql_scenarios(work, label)
        results += _config_scenarios(work)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    heading("Abuse: user SQL and config holes (issue 19 items 5, 6)")
    results = run(args.quick)
    for r in results:
        print(f"{verdict(bool(r['ok']))}  {r['item']}")
        for key in ("tried", "survived", "lost", "target"):
            print(f"      {key}: {r[key]}")
    failed = [r for r in results if not r["ok"]]
    print(f"\n{len(results) - len(failed)}/{len(results)} scenarios met their target")


if __name__ == "__main__":
    main()
