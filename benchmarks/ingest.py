"""Ingest benchmarks for syncd's WooCommerce source sync (issue #2).

Run ``python benchmarks/ingest.py`` (3-4 minutes on a 2-core machine, half of it spent
generating the 100k-order sandbox; ``--quick`` is a smoke run of about half a minute).
It prints figures and never asserts: each target is shown with PASS or FAIL next to
the measurement.

Everything runs against the sandbox store (``python -m syncd.sandbox``) in a separate
process on 127.0.0.1, with temporary SQLite stores that are removed at the end (also on
Ctrl-C or SIGTERM). Requests authenticate with ``auth="query"`` (key and secret in the
query string): OAuth 1.0a signing costs time, but that cost is not what is measured here.

(a) Throughput. ``SourceSync.run(streams=["orders"])`` from a zero-latency sandbox into a
    fresh SQLite store, customers synced first (untimed) so that orders do not fetch
    buyers on the fly: orders/s = orders fetched / wall time. The run is all of a first
    sync's work: paging, parsing, identity resolution, order items, commits (and the id
    scan that reconciles deletes, if syncd runs one then; shown on its own line).
    The floor, measured in the same run on the same data, is the least work any
    implementation must do here: ``json.loads`` of every order page plus an
    ``executemany`` of the very rows syncd stored (every column but ``id``) into an
    empty ``orders`` table made by syncd's migrations, committed per page of 100 rows.
    Targets: >= 20,000 orders/s, and syncd's time <= 2x the floor's time.
    The store's write cap is printed too: the same orders rows alone, inserted in one
    transaction by one raw ``executemany`` (best of 3). SQLite has a single writer, so no
    implementation stores orders faster than that on the machine at hand.
    The last lines split the floor into its two parts and give single-threaded costs of
    parts of syncd's work on the same pages (HTTP fetch on one connection, orjson,
    ``parse_order``): a run much slower than their sum spends its time elsewhere.

(b) Latency hiding. A full orders sync (``full=True``) into a fresh store with 100 ms of
    latency per request, at concurrency 1 and 8 (unpaced). ms/request is the wall time
    per request: about the latency at concurrency 1, far less when requests overlap.
    Target: a speed-up of >= 6x. With 100 ms pages the run at concurrency 8 can only
    be as fast as syncd processes the orders, so (b) is bounded by (a).

(c) Memory. Peak RSS (``ru_maxrss``) of a full orders sync of 10k and of 100k orders,
    each in a fresh child process; baseline is the child's RSS after imports and store
    open. Target: the 100k peak within +25 % of the 10k peak, i.e. the sync streams
    pages instead of holding them. The sandbox's generation time is shown separately.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import re
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, NoReturn

import httpx
import orjson
from _common import (
    BenchmarkError,
    child_process_options,
    die_with_parent,
    heading,
    mib,
    num,
    print_table,
    run_script_child,
    stop_process,
    verdict,
)
from pydantic import SecretStr
from sqlalchemy import Engine

from syncd.config import WooCommerceSourceSettings
from syncd.ingest import SourceSync, SyncResult
from syncd.log import configure_logging
from syncd.sources.base import Stream
from syncd.sources.woocommerce.auth import API_ROOT
from syncd.sources.woocommerce.parse import parse_order
from syncd.store.engine import open_store

HOST = "127.0.0.1"
KEY = "ck_sandbox"
SECRET = "cs_sandbox"
SOURCE = "bench"
PER_PAGE = 100
# The order query syncd's first window sends (modified_before aside, which changes nothing
# on a store whose history lies in the past).
ORDER_QUERY = {
    "status": "any",
    "orderby": "modified",
    "order": "asc",
    "dates_are_gmt": "true",
    "per_page": str(PER_PAGE),
}
SANDBOX_START_TIMEOUT = 600.0  # 100k orders take ~1.5 min to generate on a 2-core machine
CHILD_TIMEOUT = 600.0
TARGET_ORDERS_PER_S = 20_000
TARGET_FLOOR_RATIO = 2.0
TARGET_SPEEDUP = 6.0
TARGET_GROWTH = 0.25
LATENCY_MS = 100.0


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# The sandbox store, in its own process
# ---------------------------------------------------------------------------


class Sandbox:
    """``python -m syncd.sandbox`` on 127.0.0.1 (a free port), stopped on exit."""

    def __init__(self, orders: int, latency_ms: float = 0.0) -> None:
        self.orders = orders
        self.latency_ms = latency_ms
        self.url = ""
        self.startup_s = 0.0
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Sandbox:
        started = time.perf_counter()
        command = [
            sys.executable,
            "-m",
            "syncd.sandbox",
            "--host",
            HOST,
            "--port",
            "0",
            "--orders",
            str(self.orders),
            "--latency-ms",
            str(self.latency_ms),
            "--key",
            KEY,
            "--secret",
            SECRET,
        ]
        self._proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            **child_process_options(),
        )
        try:
            self.url = self._wait_ready(self._proc, started + SANDBOX_START_TIMEOUT)
        except BaseException:
            stop_process(self._proc)
            raise
        self.startup_s = time.perf_counter() - started
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._proc is not None:
            stop_process(self._proc)
            self._proc = None

    @staticmethod
    def _wait_ready(proc: subprocess.Popen[str], deadline: float) -> str:
        lines: queue.Queue[str] = queue.Queue()
        stdout = proc.stdout
        assert stdout is not None

        def drain() -> None:  # also keeps the pipe from filling up later
            for text in stdout:
                lines.put(text)

        threading.Thread(target=drain, daemon=True, name="sandbox-stdout").start()
        url = ""
        while not url:
            if time.perf_counter() > deadline:
                raise BenchmarkError("the sandbox did not start in time")
            if proc.poll() is not None:
                raise BenchmarkError(f"the sandbox exited with status {proc.returncode}")
            try:
                text = lines.get(timeout=0.2)
            except queue.Empty:
                continue
            match = re.search(r"http://127\.0\.0\.1:(\d+)", text)
            if match:
                url = f"http://{HOST}:{match.group(1)}"
        port = int(url.rsplit(":", 1)[1])
        # It says it listens: wait until the port answers an authenticated API request.
        with httpx.Client(trust_env=False, timeout=10) as client:
            while True:
                try:
                    with socket.create_connection((HOST, port), timeout=1):
                        pass
                    response = client.get(
                        url + API_ROOT + "/orders",
                        params={"per_page": "1", "consumer_key": KEY, "consumer_secret": SECRET},
                    )
                    if response.status_code == 200:
                        return url
                except (OSError, httpx.HTTPError):
                    pass
                if time.perf_counter() > deadline or proc.poll() is not None:
                    raise BenchmarkError(f"the sandbox at {url} does not answer")
                time.sleep(0.1)


# ---------------------------------------------------------------------------
# syncd runs
# ---------------------------------------------------------------------------


def source_settings(url: str, concurrency: int = 4) -> WooCommerceSourceSettings:
    return WooCommerceSourceSettings(
        url=url,
        consumer_key=SecretStr(KEY),
        consumer_secret=SecretStr(SECRET),
        auth="query",
        concurrency=concurrency,
        requests_per_second=0,  # unpaced
    )


def store_url(path: Path) -> str:
    return f"sqlite:///{path}"


@contextlib.contextmanager
def store(path: Path) -> Iterator[Engine]:
    engine = open_store(store_url(path))
    try:
        yield engine
    finally:
        engine.dispose()


@dataclass
class SyncRun:
    result: SyncResult
    wall_s: float
    reconcile_s: float | None  # of wall_s: the id scan that finds hard deletes (None: none)
    scan_timed: bool = True  # False: this syncd has no SourceSync._reconcile to time

    def scan(self) -> str:
        if not self.scan_timed:
            return "n/a"
        return "-" if self.reconcile_s is None else f"{self.reconcile_s:.2f}"

    def fetched(self, stream: str) -> int:
        counts = self.result.counts.get(stream)
        return counts.fetched if counts else 0


async def _sync(
    engine: Engine, settings: WooCommerceSourceSettings, streams: list[str], full: bool
) -> SyncRun:
    sync = SourceSync(engine, SOURCE, settings)
    reconcile_s: float | None = None  # stays None when no id scan runs
    reconcile = getattr(sync, "_reconcile", None)
    scan_timed = reconcile is not None and asyncio.iscoroutinefunction(reconcile)
    if reconcile is not None and scan_timed:

        async def timed_reconcile(stream: Stream) -> None:
            # Instrumentation only: the same method, timed on this instance.
            nonlocal reconcile_s
            started = time.perf_counter()
            try:
                await reconcile(stream)
            finally:
                reconcile_s = (reconcile_s or 0.0) + time.perf_counter() - started

        sync._reconcile = timed_reconcile  # type: ignore[method-assign]
    try:
        started = time.perf_counter()
        result = await sync.run(streams=streams, full=full)
        wall_s = time.perf_counter() - started
    finally:
        await sync.client.aclose()
    if result.status != "success":
        raise BenchmarkError(f"sync of {streams} ended {result.status}: {result.error}")
    return SyncRun(result, wall_s, reconcile_s, scan_timed)


def run_sync(
    engine: Engine,
    settings: WooCommerceSourceSettings,
    streams: list[str],
    *,
    full: bool = False,
) -> SyncRun:
    return asyncio.run(_sync(engine, settings, streams, full))


# ---------------------------------------------------------------------------
# (a) throughput and floor
# ---------------------------------------------------------------------------


def fetch_order_pages(url: str) -> tuple[list[bytes], float]:
    """Raw bodies of every order page (one connection, one after another) and the time."""
    params = {**ORDER_QUERY, "consumer_key": KEY, "consumer_secret": SECRET}
    pages: list[bytes] = []
    started = time.perf_counter()
    with httpx.Client(base_url=url + API_ROOT, trust_env=False, timeout=60) as client:
        number, total_pages = 1, 1
        while number <= total_pages:
            response = client.get("/orders", params={**params, "page": str(number)})
            response.raise_for_status()
            total_pages = int(response.headers.get("X-WP-TotalPages", "1"))
            pages.append(response.content)
            number += 1
    return pages, time.perf_counter() - started


def stored_order_rows(path: Path) -> tuple[list[str], list[tuple[Any, ...]]]:
    """The ``orders`` rows syncd stored, every column but ``id``, as SQLite holds them."""
    conn = sqlite3.connect(path)
    try:
        columns = [r[1] for r in conn.execute("PRAGMA table_info(orders)") if r[1] != "id"]
        names = ", ".join(f'"{c}"' for c in columns)
        rows = conn.execute(f"SELECT {names} FROM orders ORDER BY id").fetchall()
    finally:
        conn.close()
    return columns, rows


@dataclass
class Floor:
    total_s: float
    loads_s: float  # json.loads of the pages
    insert_s: float  # executemany + commit


def empty_orders_store(path: Path, columns: list[str]) -> tuple[sqlite3.Connection, str]:
    """A raw connection to a new store with syncd's schema and no rows, and the INSERT of
    ``columns`` into its ``orders``."""
    with store(path):
        pass  # an empty schema made by syncd's migrations
    conn = sqlite3.connect(path)
    # The pragmas syncd's engine sets, but foreign keys: the store has no customers.
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    names = ", ".join(f'"{c}"' for c in columns)
    marks = ", ".join("?" for _ in columns)
    return conn, f"INSERT INTO orders ({names}) VALUES ({marks})"


def floor_time(path: Path, pages: list[bytes], columns: list[str], rows: list[Any]) -> Floor:
    """``json.loads`` of each page plus a bulk insert of its 100 rows, committed per page."""
    conn, sql = empty_orders_store(path, columns)
    try:
        chunks = [rows[i : i + PER_PAGE] for i in range(0, len(rows), PER_PAGE)]
        loads_s = insert_s = 0.0
        started = time.perf_counter()
        for n in range(max(len(pages), len(chunks))):
            mark = time.perf_counter()
            if n < len(pages):
                json.loads(pages[n])
            loaded = time.perf_counter()
            if n < len(chunks):
                conn.executemany(sql, chunks[n])
                conn.commit()
            loads_s += loaded - mark
            insert_s += time.perf_counter() - loaded
        total_s = time.perf_counter() - started
        stored = conn.execute("SELECT count(*) FROM orders").fetchone()[0]
    finally:
        conn.close()
    if stored != len(rows):
        raise BenchmarkError(f"the floor stored {stored} rows, expected {len(rows)}")
    return Floor(total_s, loads_s, insert_s)


def write_cap(tmp: Path, columns: list[str], rows: list[Any], runs: int = 3) -> float:
    """The fastest the store takes the orders rows alone: one raw ``executemany`` into a
    fresh table in one transaction, best of ``runs``, in rows/s. SQLite has one writer, so
    no design (threads, processes) stores orders faster than this; syncd also writes the
    order items and the people."""
    best = float("inf")
    for n in range(runs):
        conn, sql = empty_orders_store(tmp / f"a-cap-{n}.db", columns)
        try:
            started = time.perf_counter()
            conn.executemany(sql, rows)
            conn.commit()
            best = min(best, time.perf_counter() - started)
        finally:
            conn.close()
    return len(rows) / best


def bench_throughput(orders: int, tmp: Path) -> None:
    heading(f"(a) Throughput: {orders:,} orders, zero-latency sandbox -> SQLite")
    with Sandbox(orders) as sandbox:
        settings = source_settings(sandbox.url)
        syncd_db = tmp / "a-syncd.db"
        with store(syncd_db) as engine:
            customers = run_sync(engine, settings, ["customers"])
            timed = run_sync(engine, settings, ["orders"])
        pages, fetch_s = fetch_order_pages(sandbox.url)
    print(
        f"  sandbox: {orders:,} orders generated and serving in {sandbox.startup_s:.1f} s; "
        f"{customers.fetched('customers'):,} customers synced first "
        f"({customers.wall_s:.2f} s, untimed)"
    )
    print(
        f"  settings: auth=query (no OAuth signing; auth cost not measured), "
        f"concurrency={settings.concurrency}, unpaced"
    )
    fetched = timed.fetched("orders")
    columns, rows = stored_order_rows(syncd_db)
    floor = floor_time(tmp / "a-floor.db", pages, columns, rows)
    cap = write_cap(tmp, columns, rows)

    payloads = [orjson.loads(p) for p in pages]  # warm-up, and the input of parse_order
    started = time.perf_counter()
    for page in pages:
        orjson.loads(page)
    orjson_s = time.perf_counter() - started
    items = [item for page in payloads for item in page]
    started = time.perf_counter()
    for item in items:
        parse_order(item, SOURCE)
    parse_s = time.perf_counter() - started

    syncd_rate = fetched / timed.wall_s
    ratio = timed.wall_s / floor.total_s
    print_table(
        ["", "orders", "time (s)", "orders/s", "target", "result"],
        [
            [
                'syncd run(streams=["orders"])',
                num(fetched),
                f"{timed.wall_s:.2f}",
                num(syncd_rate),
                f">= {TARGET_ORDERS_PER_S:,}/s",
                verdict(syncd_rate >= TARGET_ORDERS_PER_S),
            ],
            [
                "floor: json.loads + executemany",
                num(len(rows)),
                f"{floor.total_s:.2f}",
                num(len(rows) / floor.total_s),
                "",
                "",
            ],
            [
                "ratio syncd / floor (time)",
                "",
                f"{ratio:.2f}x",
                "",
                f"<= {TARGET_FLOOR_RATIO:g}x",
                verdict(ratio <= TARGET_FLOOR_RATIO),
            ],
        ],
    )
    scan = {"n/a": "reconciliation id scan not measured", "-": "no reconciliation id scan"}.get(
        timed.scan(), f"reconciliation id scan {timed.scan()} s of it"
    )
    size = sum(len(p) for p in pages)
    print(f"  syncd run: {timed.result.requests:,} requests, {scan}")
    print(
        f"  floor: json.loads {floor.loads_s:.2f} s + executemany/commit {floor.insert_s:.2f} s "
        f"({len(pages)} pages, {size / 2**20:,.1f} MiB of JSON, "
        f"{size / max(len(items), 1) / 1024:.1f} KiB/order)"
    )
    print(
        f"  store write cap: the orders rows alone, one transaction, raw executemany: "
        f"{cap:,.0f} rows/s (best of 3); the {TARGET_ORDERS_PER_S:,}/s target is "
        + ("within it" if cap >= TARGET_ORDERS_PER_S else "above what this machine's SQLite takes")
    )
    print(
        f"  single-threaded costs on the same data: HTTP fetch of the pages (1 connection) "
        f"{fetch_s:.2f} s | orjson.loads {orjson_s:.2f} s | parse_order x{len(items):,} "
        f"{parse_s:.2f} s"
    )


# ---------------------------------------------------------------------------
# (b) latency hiding
# ---------------------------------------------------------------------------


def bench_latency(orders: int, tmp: Path) -> None:
    heading(f"(b) Backfill with {LATENCY_MS:g} ms latency per request: {orders:,} orders")
    runs: dict[int, SyncRun] = {}
    with Sandbox(orders, latency_ms=LATENCY_MS) as sandbox:
        print(f"  sandbox: generated and serving in {sandbox.startup_s:.1f} s")
        for concurrency in (1, 8):
            settings = source_settings(sandbox.url, concurrency=concurrency)
            with store(tmp / f"b-c{concurrency}.db") as engine:
                run_sync(engine, settings, ["customers"])  # untimed, as in (a)
                runs[concurrency] = run_sync(engine, settings, ["orders"], full=True)
    print(
        "  full=True sync of the orders stream into a fresh store (customers synced first, "
        "untimed); auth=query, unpaced"
    )
    rows = []
    for concurrency, run in runs.items():
        rows.append(
            [
                f"concurrency {concurrency}",
                num(run.fetched("orders")),
                num(run.result.requests),
                f"{run.wall_s:.2f}",
                run.scan(),
                f"{run.wall_s / max(run.result.requests, 1) * 1000:.0f}",
            ]
        )
    print_table(
        ["", "orders", "requests", "wall (s)", "of it id scan", "ms/request"],
        rows,
    )
    speedup = runs[1].wall_s / runs[8].wall_s
    print(
        f"  speed-up 8 vs 1: {speedup:.2f}x   target >= {TARGET_SPEEDUP:g}x   "
        f"{verdict(speedup >= TARGET_SPEEDUP)}"
    )


# ---------------------------------------------------------------------------
# (c) memory
# ---------------------------------------------------------------------------


def child_sync(url: str, db: Path) -> int:
    """In a fresh process: baseline RSS, then a full orders sync; one JSON line on stdout."""
    if sys.platform.startswith("linux"):
        die_with_parent()  # the launching shell: stop with it
    configure_logging("warning", stream=sys.stderr)
    settings = source_settings(url)
    with store(db) as engine:
        baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run_sync(engine, settings, ["customers"])
        run = run_sync(engine, settings, ["orders"], full=True)
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = {
        "baseline_kib": baseline_kib,
        "peak_kib": peak_kib,
        "vmhwm_kib": _vmhwm_kib(),
        "orders": run.fetched("orders"),
        "wall_s": run.wall_s,
    }
    print(json.dumps(report), flush=True)
    return 0


def _vmhwm_kib() -> int | None:
    """This process's own RSS high-water mark from /proc (Linux), to check ru_maxrss."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def run_child_sync(url: str, db: Path) -> dict[str, Any]:
    """Run :func:`child_sync` in a new process, launched through ``/bin/sh``.

    Linux carries ``ru_maxrss`` over fork + exec: a child forked straight from this
    process would report this process's high-water mark (100+ MiB after (a) and (b))
    instead of its own. The shell, a small process, forks the child, so the child's
    ``ru_maxrss`` is its own (checked against ``VmHWM`` in /proc).
    """
    args = ["--child-sync", "--url", url, "--db", str(db)]
    out = run_script_child(str(Path(__file__).resolve()), args, CHILD_TIMEOUT, "the child sync")
    report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return report


def bench_memory(sizes: Sequence[int], tmp: Path) -> None:
    heading(f"(c) Peak memory of a full orders sync: {' and '.join(f'{n:,}' for n in sizes)}")
    rows = []
    peaks: list[int] = []
    for orders in sizes:
        with Sandbox(orders) as sandbox:
            report = run_child_sync(sandbox.url, tmp / f"c-{orders}.db")
        peaks.append(report["peak_kib"])
        vmhwm = report.get("vmhwm_kib")
        if vmhwm and abs(vmhwm - report["peak_kib"]) > 0.1 * vmhwm:
            print(
                f"  note: ru_maxrss {mib(report['peak_kib'])} MiB but VmHWM {mib(vmhwm)} MiB "
                f"at {orders:,}: ru_maxrss may not be the child's own"
            )
        rows.append(
            [
                f"{orders:,} orders",
                f"{sandbox.startup_s:.1f}",
                f"{report['wall_s']:.2f}",
                num(report["orders"]),
                mib(report["baseline_kib"]),
                mib(report["peak_kib"]),
                mib(report["peak_kib"] - report["baseline_kib"]),
            ]
        )
    print(
        "  each sync in a fresh child process (customers first, then orders full=True); "
        "RSS is the child's ru_maxrss"
    )
    print_table(
        [
            "",
            "sandbox gen (s)",
            "sync (s)",
            "fetched",
            "baseline MiB",
            "peak MiB",
            "peak-baseline",
        ],
        rows,
    )
    growth = peaks[-1] / peaks[0] - 1
    print(
        f"  peak growth {sizes[-1]:,} vs {sizes[0]:,}: {growth:+.1%}   "
        f"target <= +{TARGET_GROWTH:.0%}   {verdict(growth <= TARGET_GROWTH)}"
    )


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Measure syncd's WooCommerce ingest: throughput, latency hiding, memory."
    )
    parser.add_argument(
        "--orders", type=int, default=None, help="orders for (a) (default 20000; 2000 if --quick)"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--only", choices=("a", "b", "c"), help="run one part only")
    parser.add_argument("--child-sync", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    return parser


def _on_sigterm(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def _local_only() -> None:
    """Every request goes to 127.0.0.1 directly, never through a configured proxy."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        os.environ.pop(name, None)
        os.environ.pop(name.lower(), None)
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _local_only()
    signal.signal(signal.SIGTERM, _on_sigterm)
    if args.child_sync:
        if not args.url or not args.db:
            raise SystemExit("--child-sync needs --url and --db")
        return child_sync(args.url, args.db)

    configure_logging("warning", stream=sys.stderr)
    orders_a = args.orders or (2_000 if args.quick else 20_000)
    orders_b = 1_000 if args.quick else 5_000
    sizes_c = (1_000, 10_000) if args.quick else (10_000, 100_000)
    started = time.perf_counter()
    print(f"syncd ingest benchmark: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    try:
        with tempfile.TemporaryDirectory(prefix="syncd-bench-") as tmp:
            if args.only in (None, "a"):
                bench_throughput(orders_a, Path(tmp))
            if args.only in (None, "b"):
                bench_latency(orders_b, Path(tmp))
            if args.only in (None, "c"):
                bench_memory(sizes_c, Path(tmp))
    except KeyboardInterrupt:
        print("\ninterrupted; sandbox and temporary files cleaned up", file=sys.stderr)
        return 130
    except BenchmarkError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    print(f"\ntotal runtime: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
