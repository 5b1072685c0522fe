"""Issue 19, item 1: one poisoned webhook delivery among good ones, over real HTTP.

A signed delivery nested 300 levels deep (valid JSON: the intake's parser takes 1,024
levels, the store's JSON writer fails past 254) is sent at the same moment as 30 good
signed deliveries, to the webhook intake served by uvicorn on 127.0.0.1, on SQLite (a
temporary file) and on Postgres (a throwaway database, when SYNCD_TEST_POSTGRES_URL is
set). Then more good deliveries, then a restart (a new intake on the same store) and the
poison and good ones again. WooCommerce never redelivers, so a good delivery not applied
is lost.

Target: the poison delivery quarantined alone and its 30 neighbours applied, on both stores.

    python benchmarks/abuse_poison.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import uvicorn
from pydantic import SecretStr
from sqlalchemy import Engine, create_engine, func, select, text
from starlette.applications import Starlette
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import heading, print_table, verdict
from syncd.config import Settings, WooCommerceSourceSettings
from syncd.sandbox.deliveries import delivery, new_order, signature
from syncd.sandbox.server import SandboxServer
from syncd.sandbox.store import SandboxStore
from syncd.sources.webhooks import WebhookIntake
from syncd.store.engine import open_store
from syncd.store.models import EVENTS, ORDERS, QUARANTINE

SECRET = "abuse-poison-secret"
FIXTURE = Path(__file__).resolve().parent.parent / "tests/fixtures/woocommerce/order_single.json"
TARGET = "the poison delivery quarantined alone and its 30 neighbours applied, on both stores"
NEIGHBOURS = 30
DEPTH = 300
SETTLE_SECONDS = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def good(template: dict[str, Any], order_id: int) -> tuple[bytes, dict[str, str]]:
    payload = new_order(template, order_id, f"buyer{order_id}@example.com")
    return delivery(SECRET, payload, "order.created", uuid.uuid4().hex)


def poison(template: dict[str, Any], order_id: int) -> tuple[bytes, dict[str, str]]:
    """A signed order.created whose metadata value makes the body ``DEPTH`` levels deep."""
    payload = {**new_order(template, order_id, "poison@example.com"), "meta_data": ["@"]}
    body, headers = delivery(SECRET, payload, "order.created", uuid.uuid4().hex)
    # body, meta_data's list: 2 levels; the value's lists make the rest.
    body = body.replace(b'"@"', b"[" * (DEPTH - 2) + b"]" * (DEPTH - 2))
    return body, {**headers, "X-WC-Webhook-Signature": signature(SECRET, body)}


def settings(shop_url: str) -> Settings:
    return Settings(
        sources={
            "shop": WooCommerceSourceSettings(
                url=shop_url,
                consumer_key=SecretStr("ck_sandbox"),
                consumer_secret=SecretStr("cs_sandbox"),
                webhook_secret=SecretStr(SECRET),
                requests_per_second=0,
            )
        }
    )


def stored_orders(engine: Engine, ids: list[int]) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count()).select_from(ORDERS).where(ORDERS.c.source_id.in_(ids))
            ).scalar_one()
        )


def pending(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count()).select_from(EVENTS).where(EVENTS.c.status == "pending")
            ).scalar_one()
        )


async def serve_and_send(
    engine: Engine, shop_url: str, batches: list[list[tuple[bytes, dict[str, str]]]]
) -> list[list[int]]:
    """One service life: an intake behind uvicorn on 127.0.0.1; each batch sent at once,
    then applied (bounded wait). The HTTP status of every delivery."""
    intake = WebhookIntake(engine, settings(shop_url))
    app = Starlette(routes=[Route("/webhooks/{source}", intake.endpoint, methods=["POST"])])
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="off")
    )
    serving = asyncio.create_task(server.serve())
    codes: list[list[int]] = []
    try:
        while not server.started:
            if serving.done():
                raise RuntimeError("uvicorn did not start")
            await asyncio.sleep(0.02)
        await intake.start()
        url = f"http://127.0.0.1:{port}/webhooks/shop"
        async with httpx.AsyncClient(timeout=30) as client:
            for batch in batches:
                answers = await asyncio.gather(
                    *(client.post(url, content=b, headers=h) for b, h in batch),
                    return_exceptions=True,
                )
                codes.append(
                    [a.status_code if isinstance(a, httpx.Response) else 0 for a in answers]
                )
                deadline = time.monotonic() + SETTLE_SECONDS
                while time.monotonic() < deadline and (intake.backlog or pending(engine)):
                    await asyncio.sleep(0.05)
    finally:
        await intake.stop(timeout=5)
        server.should_exit = True
        await serving
        intake.close()
    return codes


def scenario(store: str, url: str, quick: bool) -> dict[str, object]:
    template = orjson.loads(FIXTURE.read_bytes())
    engine = open_store(url)
    shop = SandboxServer(SandboxStore(seed=7, customers=2, guests=1, orders=2, products=2))
    next_id = iter(range(900_001, 999_999))
    rounds = 1 if quick else 3
    first = [[good(template, next(next_id)) for _ in range(NEIGHBOURS)] for _ in range(rounds)]
    poisons = [poison(template, 800_001 + r) for r in range(rounds)]
    later = [good(template, next(next_id)) for _ in range(5)]
    after_restart = [good(template, next(next_id)) for _ in range(5)]
    good_ids = [
        int(orjson.loads(b)["id"]) for batch in [*first, later, after_restart] for b, _ in batch
    ]
    for batch, bad in zip(first, poisons, strict=True):
        batch.insert(NEIGHBOURS // 2, bad)
    after_restart.insert(2, poisons[0])  # the same poison delivered again
    began = time.monotonic()
    try:
        with shop:
            codes = asyncio.run(serve_and_send(engine, shop.url, [*first, later]))
            codes += asyncio.run(serve_and_send(engine, shop.url, [after_restart]))
        seconds = time.monotonic() - began
        applied = stored_orders(engine, good_ids)
        with engine.connect() as conn:
            kept = conn.execute(select(QUARANTINE.c.record_key, QUARANTINE.c.reason)).all()
        poison_codes = [codes[r][NEIGHBOURS // 2] for r in range(rounds)] + [codes[-1][2]]
        good_codes = [
            c
            for r, batch in enumerate(codes)
            for i, c in enumerate(batch)
            if not ((r < rounds and i == NEIGHBOURS // 2) or (r == len(codes) - 1 and i == 2))
        ]
        quarantined = sorted(k for k, r in kept if "too deep" in r)
        lost = len(good_ids) - applied
        left = pending(engine)
    finally:
        engine.dispose()
    ok = (
        lost == 0
        and left == 0
        and all(400 <= c < 500 for c in poison_codes)
        and all(c == 200 for c in good_codes)
        and quarantined == sorted(str(800_001 + r) for r in range(rounds))
        and len(kept) == rounds
    )
    return {
        "item": f"1 poison delivery ({store})",
        "tried": (
            f"{rounds} x (1 signed delivery nested {DEPTH} deep + {NEIGHBOURS} good, sent at once),"
            f" then 5 good, then a restart and 5 good + the poison again: {len(good_ids)} good"
        ),
        "survived": (
            f"{applied}/{len(good_ids)} good applied (answers {sorted(set(good_codes))}),"
            f" poison answered {sorted(set(poison_codes))} and quarantined as"
            f" {len(quarantined)} row(s) ({len(kept)} quarantine rows in all), {left} pending,"
            f" {seconds:.1f} s"
        ),
        "lost": lost,
        "target": TARGET,
        "ok": ok,
    }


def run(quick: bool = False) -> list[dict[str, object]]:
    results = []
    with tempfile.TemporaryDirectory(prefix="syncd-abuse-poison-") as folder:
        results.append(scenario("sqlite", f"sqlite:///{folder}/store.db", quick))
    admin_url = os.environ.get("SYNCD_TEST_POSTGRES_URL")
    if admin_url:
        name = f"syncd_abuse_{uuid.uuid4().hex[:12]}"
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            url = admin_url.rsplit("/", 1)[0] + "/" + name
            results.append(scenario("postgres", url, quick))
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round instead of three")
    args = parser.parse_args()
    heading("Issue 19, item 1: a poisoned webhook delivery among good ones")
    results = run(quick=args.quick)
    print_table(
        ["item", "lost", "verdict"],
        [[str(r["item"]), str(r["lost"]), verdict(bool(r["ok"]))] for r in results],
    )
    for r in results:
        print(f"\n{r['item']}\n  tried:    {r['tried']}\n  survived: {r['survived']}")
        print(f"  lost:     {r['lost']}\n  target:   {r['target']}")


if __name__ == "__main__":
    main()
