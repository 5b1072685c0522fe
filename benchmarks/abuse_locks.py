"""Issue 19, item 3 (no lock held across network waits): webhook deliveries applied while a
job waits on a neighbour that never answers, on SQLite and Postgres.

Scenarios: a source job stuck on a store (a TCP server on 127.0.0.1 that accepts and never
answers), and a push stuck on such a destination. Meanwhile signed customer.updated
deliveries are posted one after another to the webhook intake (in process, over ASGI);
each delivery's latency is the time from its POST to its record in the store. Target:
every delivery applied within 2 s while the job is still stuck. On SQLite the jobs and the
applies share one writer lock (SQLite has a single writer): before issue 19 a job held it
for its whole run, and the first delivery waited until the job gave up.

    python benchmarks/abuse_locks.py [--quick]

Postgres runs when SYNCD_TEST_POSTGRES_URL is set (a throwaway database is made and
dropped); only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr
from sqlalchemy import Engine, select
from starlette.applications import Starlette
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import heading, print_table
from benchmarks.abuse_shutdown import HungStore, drop_postgres, fresh_postgres, store_urls
from syncd.config import Settings, WooCommerceSourceSettings
from syncd.daemon import Daemon
from syncd.ingest import SourceSync
from syncd.mapping import load_mappings
from syncd.sandbox.deliveries import delivery
from syncd.sandbox.server import SandboxServer
from syncd.sandbox.store import SandboxStore
from syncd.segments.recompute import recompute
from syncd.sources.webhooks import WebhookIntake
from syncd.store.engine import open_store
from syncd.store.models import CUSTOMER_RECORDS as RECORDS
from syncd.store.models import SYNC_RUNS as RUNS

TARGET = "every delivery applied within 2 s while the job is stuck"
WITHIN = 2.0
SECRET = "bench-webhook-secret"
HOOK_SECRET = "bench-hook-secret"
CUSTOMER = (
    Path(__file__).resolve().parent.parent / "tests/fixtures/woocommerce/customer_single.json"
)


def _source(url: str, key: str, secret: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "woocommerce",
        "url": url,
        "consumer_key": key,
        "consumer_secret": secret,
        "requests_per_second": 0,
        "sync_every_minutes": 60,
        "jitter_seconds": 0,
        **extra,
    }


def _settings(sources: dict[str, Any], mappings: list[str] | None = None) -> Settings:
    return Settings.model_validate(
        {
            "segments": {"everyone": {"rule": "orders_count >= 0"}},
            "sources": sources,
            "destinations": {"mappings": mappings or []},
        }
    )


def _running(engine: Engine, kind: str) -> bool:
    with engine.connect() as conn:
        row = conn.execute(
            select(RUNS.c.id).where(RUNS.c.kind == kind, RUNS.c.status == "running")
        ).first()
    return row is not None


def _has(engine: Engine, source_id: int) -> bool:
    with engine.connect() as conn:
        row = conn.execute(
            select(RECORDS.c.id).where(RECORDS.c.source == "shop", RECORDS.c.source_id == source_id)
        ).first()
    return row is not None


async def _until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def _deliver(engine: Engine, shop: SandboxServer, count: int) -> list[float | None]:
    """Post ``count`` customer deliveries one by one; each one's seconds to the store (None:
    not applied within the target and 3 s more)."""
    settings = _settings(
        {"shop": _source(shop.url, shop.consumer_key, shop.consumer_secret, webhook_secret=SECRET)}
    )
    intake = WebhookIntake(engine, settings)
    app = Starlette(routes=[Route("/webhooks/{source}", intake.endpoint, methods=["POST"])])
    template = json.loads(CUSTOMER.read_text())
    took: list[float | None] = []
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://syncd.bench") as client:
        await intake.start()
        try:
            for n in range(count):
                customer = copy.deepcopy(template)
                customer.update(id=90_000 + n, email=f"bench-locks-{n}@example.com")
                body, headers = delivery(SECRET, customer, "customer.updated", uuid.uuid4().hex)
                sent = time.monotonic()
                answer = await client.post("/webhooks/shop", content=body, headers=headers)
                answer.raise_for_status()
                cid = customer["id"]
                ok = await _until(lambda cid=cid: _has(engine, cid), WITHIN + 3)
                took.append(time.monotonic() - sent if ok else None)
        finally:
            await intake.stop(timeout=5)
            intake.close()
    return took


def _row(item: str, tried: str, took: list[float | None], stuck: bool) -> dict[str, object]:
    applied = [t for t in took if t is not None]
    worst = max(applied) if applied else float("nan")
    lost = len(took) - len(applied)
    return {
        "item": item,
        "tried": tried,
        "survived": (
            f"{len(applied)}/{len(took)} applied, worst {worst:.2f} s, "
            f"median {sorted(applied)[len(applied) // 2] if applied else float('nan'):.2f} s; "
            f"job still stuck: {'yes' if stuck else 'no'}"
        ),
        # A delivery not applied in time is not lost (it is stored and waits for its
        # turn), but the target is its apply.
        "lost": f"0 ({lost} stored, not applied within {WITHIN + 3:g} s)" if lost else "0",
        "target": TARGET,
        "ok": lost == 0 and stuck and worst < WITHIN,
    }


def source_stuck(label: str, url: str, shop: SandboxServer, count: int) -> dict[str, object]:
    engine = open_store(url)
    try:
        with HungStore() as hung:
            settings = _settings({"wc": _source(hung.url, "ck_x", "cs_x")})

            async def main() -> tuple[list[float | None], bool]:
                daemon = Daemon(engine, settings, [], catch_up=True, recompute_every=None)
                await daemon.start()
                try:
                    await _until(lambda: bool(hung.accepted) and _running(engine, "source"), 10)
                    took = await _deliver(engine, shop, count)
                    return took, _running(engine, "source")
                finally:
                    await daemon.stop(timeout=5)

            took, stuck = asyncio.run(main())
        return _row(
            f"3 lock: source stuck ({label})",
            f"{count} deliveries while a source sync waits on a store that never answers",
            took,
            stuck,
        )
    finally:
        engine.dispose()


def push_stuck(
    label: str, url: str, shop: SandboxServer, count: int, tmp: Path
) -> dict[str, object]:
    engine = open_store(url)
    try:
        with HungStore() as hung:
            mapping = tmp / f"hung-{label}.toml"
            mapping.write_text(
                f'destination = "webhook"\nbase_url = "{hung.url}/hooks/everyone"\n'
                "allow_loopback = true\n"
                f'[credentials]\nsecret = "{HOOK_SECRET}"\n\n[[sync]]\nname = "to-hung"\n'
                'segment = "everyone"\nmode = "mirror"\n[sync.fields]\nemail = "email"\n'
            )
            source = _source(shop.url, shop.consumer_key, shop.consumer_secret)
            settings = _settings({"wc": source}, [str(mapping)])
            presync = SourceSync(
                engine,
                "wc",
                WooCommerceSourceSettings(
                    url=shop.url,
                    consumer_key=SecretStr(shop.consumer_key),
                    consumer_secret=SecretStr(shop.consumer_secret),
                    requests_per_second=None,
                ),
            )

            async def fill() -> None:
                try:
                    await presync.run()
                finally:
                    await presync.client.aclose()

            asyncio.run(fill())
            recompute(engine, settings)

            async def main() -> tuple[list[float | None], bool]:
                daemon = Daemon(
                    engine, settings, load_mappings(settings), catch_up=False, recompute_every=None
                )
                await daemon.start()
                try:
                    daemon.run_now("destination:to-hung")
                    await _until(lambda: bool(hung.accepted), 10)
                    await asyncio.sleep(0.3)  # the batch is sent and waits for its answer
                    took = await _deliver(engine, shop, count)
                    return took, _running(engine, "destination")
                finally:
                    await daemon.stop(timeout=5)

            took, stuck = asyncio.run(main())
        return _row(
            f"3 lock: push stuck ({label})",
            f"{count} deliveries while a push waits on a destination that never answers",
            took,
            stuck,
        )
    finally:
        engine.dispose()


def run(quick: bool = False) -> list[dict[str, object]]:
    count = 5 if quick else 20
    results: list[dict[str, object]] = []
    store = SandboxStore(seed=7, customers=20, guests=5, orders=60, products=3, coupons=2)
    with (
        SandboxServer(store) as shop,
        tempfile.TemporaryDirectory(prefix="syncd-abuse-locks-") as tmp_name,
    ):
        tmp = Path(tmp_name)
        for label, pattern in store_urls(tmp):
            for name in ("source", "push"):
                made = None
                if label == "postgres":
                    made = fresh_postgres(pattern.format(state=f"locks_{name}"))
                    url = pattern.rsplit("/", 1)[0] + "/" + made
                else:
                    url = pattern.format(state=f"locks-{name}")
                try:
                    if name == "source":
                        results.append(source_stuck(label, url, shop, count))
                    else:
                        results.append(push_stuck(label, url, shop, count, tmp))
                except Exception as exc:
                    results.append(
                        {
                            "item": f"3 lock: {name} stuck ({label})",
                            "tried": f"deliveries while a {name} job is stuck",
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer deliveries")
    args = parser.parse_args()
    heading("abuse: locks (no writer lock across network waits)")
    rows = run(quick=args.quick)
    print_table(
        ("item", "tried", "survived", "lost", "target", "ok"),
        [
            tuple(str(r[k]) for k in ("item", "tried", "survived", "lost", "target", "ok"))
            for r in rows
        ],
    )
