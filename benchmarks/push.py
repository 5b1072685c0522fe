"""Push benchmark: a 1,000,000-member audience through the sync engine to the sandboxes.

Prints, for the embedded store (SQLite; ``--postgres URL`` adds Postgres):

1. the first push of the whole audience (Mailchimp batch upsert, 500 per request);
2. a push with nothing changed: its planning time (target <= 10 s) and requests (0);
3. a push after 1% of the members changed: the requests it took (target: exactly
   ceil(changed / 500));
4. the achieved send rate against a sandbox rate limit (a webhook receiver that answers
   429 past its limit per second): target >= 90% of the limit with zero 429 answers.

    python benchmarks/push.py                       # 1,000,000 members
    python benchmarks/push.py --members 50000       # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing
import random
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import heading, num, print_table, verdict
from syncd.config import Settings
from syncd.mapping import load_mappings
from syncd.push import PushResult, push, select_syncs
from syncd.sandbox.destinations import DestinationSandbox
from syncd.store.engine import open_store

LIST = "bench"
SECRET = "bench-secret"
MAILCHIMP_BATCH = 500  # the documented maximum the adapter uses
PLAN_TARGET_S = 10.0
RATE_SHARE_TARGET = 0.90


def rows(members: int, chunk: int = 20_000) -> Iterator[list[dict[str, Any]]]:
    entered = datetime(2026, 1, 1, tzinfo=UTC).isoformat(sep=" ")
    for start in range(1, members + 1, chunk):
        yield [
            {
                "cid": cid,
                "email": f"member{cid}@example.com",
                "first": f"First{cid}",
                "last": f"Last{cid}",
                "net": cid % 100_000,
                "entered": entered,
            }
            for cid in range(start, min(start + chunk, members + 1))
        ]


def fill(engine: Engine, members: int) -> float:
    started = time.perf_counter()
    with engine.begin() as conn:
        for chunk in rows(members):
            # Every member has email consent: a Mailchimp sync sends only those.
            conn.execute(
                text(
                    "INSERT INTO customer_profiles (customer_id, email, first_name, last_name, "
                    "country, orders_count, gross_revenue_minor, refunded_minor, "
                    "net_revenue_minor, currency, distinct_products, lifecycle_stage, "
                    "has_open_cart, consent_email) VALUES (:cid, :email, :first, :last, 'DE', "
                    "1, :net, 0, :net, 'EUR', 1, 'active', false, true)"
                ),
                chunk,
            )
            conn.execute(
                text(
                    "INSERT INTO segment_memberships (segment, customer_id, entered_at) "
                    "VALUES ('audience', :cid, :entered)"
                ),
                chunk,
            )
    return time.perf_counter() - started


def serve_sandbox(control: Connection, limit: int) -> None:
    """The destinations, in a process of their own like real ones: a sandbox holding a
    million members in the pushing process would make its garbage collector and caches
    part of the measurement. Answers the benchmark's questions over ``control``."""
    with DestinationSandbox(log_bodies=False) as box:
        box.mailchimp.add_list(LIST)
        receiver = box.webhooks.add("limited", SECRET, rate_per_second=limit)
        control.send(
            {
                "mailchimp_url": box.mailchimp_url,
                "mailchimp_key": box.mailchimp.api_key,
                "webhook_url": box.webhook_url("limited"),
            }
        )
        while True:
            command = control.recv()
            if command == "stop":
                return
            if command == "reset":
                box.reset_logs()
                control.send(None)
            elif command == "stats":
                control.send(
                    {
                        "members": len(box.mailchimp.lists[LIST].members),
                        "mailchimp_requests": len(box.mailchimp.requests),
                        "webhook": [(r.status, r.at) for r in box.webhooks.requests],
                        "webhook_records": len(receiver.records),
                    }
                )


class Sandbox:
    """The benchmark's handle on the sandbox process."""

    def __init__(self, limit: int) -> None:
        self.control, child = multiprocessing.Pipe()
        self.process = multiprocessing.Process(
            target=serve_sandbox, args=(child, limit), daemon=True
        )
        self.process.start()
        self.urls: dict[str, str] = self.control.recv()

    def ask(self, command: str) -> Any:
        self.control.send(command)
        return self.control.recv()

    def close(self) -> None:
        self.control.send("stop")
        self.process.join(timeout=30)


def mappings(folder: Path, box: Sandbox, rate: float) -> Settings:
    (folder / "mailchimp.toml").write_text(
        f"""
destination = "mailchimp"
base_url = "{box.urls["mailchimp_url"]}"
allow_loopback = true
[credentials]
api_key = "{box.urls["mailchimp_key"]}"

[[sync]]
name = "mailchimp-audience"
segment = "audience"
mode = "upsert"
object = "{LIST}"
[sync.fields]
email_address = "email"
"merge_fields.FNAME" = "first_name"
"merge_fields.LNAME" = "last_name"
"merge_fields.REVENUE" = "net_revenue_minor | minor_to_major"
marketing_consent = "marketing_consent"
"""
    )
    (folder / "webhook.toml").write_text(
        f"""
destination = "webhook"
base_url = "{box.urls["webhook_url"]}"
allow_loopback = true
[credentials]
secret = "{SECRET}"
[limits]
# The receiver's documented limit, less a margin for clock-second window edges.
requests_per_second = {rate}
concurrency = 4

[[sync]]
name = "webhook-rate"
segment = "audience"
mode = "upsert"
batch_size = 100
[sync.fields]
email = "email"
"""
    )
    return Settings.model_validate(
        {
            "segments": {"audience": {"rule": "orders_count >= 1"}},
            "destinations": {
                "mappings": [str(folder / "mailchimp.toml"), str(folder / "webhook.toml")]
            },
        }
    )


def run_one(engine: Engine, settings: Settings, name: str, **kwargs: Any) -> PushResult:
    selected = select_syncs(load_mappings(settings, env={}), [name])
    (result,) = asyncio.run(push(engine, selected, **kwargs))
    if result.status == "failed":
        raise SystemExit(f"{name}: push failed: {result.error}")
    return result


def bench_store(label: str, url: str, members: int, limit: int, rate_rows: int) -> None:
    heading(f"{label}: {num(members)} members")
    engine = open_store(url)
    print(f"  filling the store: {fill(engine, members):.1f} s", flush=True)
    box = Sandbox(limit)
    try:
        with tempfile.TemporaryDirectory() as folder:
            settings = mappings(Path(folder), box, limit * 0.95)

            first = run_one(engine, settings, "mailchimp-audience")
            c = first.counts
            print(
                f"  first push: {num(c.added)} added in {first.duration_s:.1f} s "
                f"({num(c.added / first.duration_s)} members/s, {num(c.requests)} requests)",
                flush=True,
            )
            assert box.ask("stats")["members"] == members

            box.ask("reset")
            again = run_one(engine, settings, "mailchimp-audience")
            plan_s, plan_requests = again.duration_s, again.counts.requests
            assert again.counts.unchanged == members
            assert box.ask("stats")["mailchimp_requests"] == 0

            rng = random.Random(7)
            changed = rng.sample(range(1, members + 1), members // 100)
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "UPDATE customer_profiles SET first_name = 'Changed' WHERE customer_id = :c"
                    ),
                    [{"c": cid} for cid in changed],
                )
            box.ask("reset")
            delta = run_one(engine, settings, "mailchimp-audience")
            want = math.ceil(len(changed) / MAILCHIMP_BATCH)
            seen = box.ask("stats")["mailchimp_requests"]
            assert delta.counts.updated == len(changed), delta.counts

            # The rate run: the first `rate_rows` members only.
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "UPDATE segment_memberships SET exited_at = entered_at "
                        "WHERE segment = 'audience' AND customer_id > :n"
                    ),
                    {"n": rate_rows},
                )
            box.ask("reset")
            rated = run_one(engine, settings, "webhook-rate")
            stats = box.ask("stats")
            log = stats["webhook"]
            throttled = sum(1 for status, _ in log if status == 429)
            span = (log[-1][1] - log[0][1]) if len(log) > 1 else rated.duration_s
            achieved = (len(log) - 1) / span if len(log) > 1 else 0.0
            assert stats["webhook_records"] == rate_rows
    finally:
        box.close()

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print()
    print_table(
        ["figure", "measured", "target", "verdict"],
        [
            [
                "no-change push: planning time",
                f"{plan_s:.2f} s ({plan_requests} requests)",
                f"<= {PLAN_TARGET_S:g} s, 0 requests",
                verdict(plan_s <= PLAN_TARGET_S and plan_requests == 0),
            ],
            [
                f"requests after a 1% change ({num(len(changed))} members)",
                f"{delta.counts.requests} (sandbox saw {seen})",
                f"ceil({len(changed)}/{MAILCHIMP_BATCH}) = {want}",
                verdict(delta.counts.requests == want == seen),
            ],
            [
                f"send rate vs a {limit}/s limit ({num(len(log))} requests)",
                f"{achieved:.2f}/s = {achieved / limit:.1%}, {throttled} x 429",
                f">= {RATE_SHARE_TARGET:.0%}, 0 x 429",
                verdict(achieved >= RATE_SHARE_TARGET * limit and throttled == 0),
            ],
            ["peak memory of this process", f"{peak:,.0f} MB", "-", "-"],
        ],
    )
    engine.dispose()


def run_google(members: int = 100_000) -> None:
    """Google (Data Manager API): hashing time per 100k members, and the ingest requests
    a 100k-member audience takes against the minimum its batch limit allows."""
    from pydantic import SecretStr

    from syncd.destinations.base import Item, SyncTarget
    from syncd.destinations.google import MAX_MEMBERS, GoogleDestination, GoogleOptions
    from syncd.destinations.google import identifiers_of as google_identifiers
    from syncd.http import ServiceLimits
    from syncd.sandbox.destinations.google import GoogleSandbox

    heading(f"Google audiences: {num(members)} members")
    payloads = [
        {
            "email": f"Member.{cid}@Example.com ",
            "phone": f"+4930{1_000_000 + cid}",
            "first_name": f"First{cid}",
            "last_name": f"Last{cid}",
            "country": "DE",
            "postcode": f"{10_000 + cid % 90_000}",
        }
        for cid in range(1, members + 1)
    ]
    started = time.perf_counter()
    for payload in payloads:
        google_identifiers(payload)
    hashing = (time.perf_counter() - started) * 100_000 / members
    started = time.perf_counter()
    for payload in payloads:
        google_identifiers({k: v for k, v in payload.items() if k != "phone"})
    hashing_no_phone = (time.perf_counter() - started) * 100_000 / members

    with DestinationSandbox(log_bodies=False) as box:
        sandbox = box.vendor("google", GoogleSandbox)
        sandbox.add_user_list(LIST)
        url = box.vendor_url("google")
        credentials = {
            "client_id": SecretStr(sandbox.client_id),
            "client_secret": SecretStr(sandbox.client_secret),
            "refresh_token": SecretStr(sandbox.refresh_token),
        }
        options = GoogleOptions(operating_account_id="1234567890", token_url=f"{url}/token")
        dest = GoogleDestination(
            "bench", credentials, options, base_url=url, limits=ServiceLimits(concurrency=4)
        )
        target = SyncTarget("google-bench", "mirror", LIST, options, consent="ads")
        items = [Item(str(n), p) for n, p in enumerate(payloads)]

        async def send_all() -> None:
            try:
                for start in range(0, members, MAX_MEMBERS):
                    await dest.send(target, "add", items[start : start + MAX_MEMBERS])
            finally:
                await dest.aclose()

        started = time.perf_counter()
        asyncio.run(send_all())
        elapsed = time.perf_counter() - started
        ingests = sum(1 for r in sandbox.requests if r.path == "/v1/audienceMembers:ingest")
        assert len(sandbox.members(LIST)) == members
    want = math.ceil(members / MAX_MEMBERS)
    per_100k = ingests * 100_000 / members
    print_table(
        ["figure", "measured", "target", "verdict"],
        [
            [
                "ingest requests",
                f"{ingests} ({per_100k:g} per 100k) in {elapsed:.1f} s",
                f"ceil({num(members)}/{num(MAX_MEMBERS)}) = {want}",
                verdict(ingests == want),
            ],
            [
                "hashing per 100k members (email, phone, address)",
                f"{hashing:.2f} s ({hashing_no_phone:.2f} s without phone)",
                "<= 1 s",
                verdict(hashing <= 1.0),
            ],
        ],
    )


def run_meta(members: int = 100_000) -> None:
    """Meta Custom Audiences: requests per ``members`` (mirror, then replace) against the
    minimum the 10,000-row limit allows (target: equal), and hashing time per 100,000
    members (target: <= 1 s), phones in E.164 as the store keeps them."""
    from syncd.destinations.base import Item
    from syncd.destinations.meta import MAX_ROWS, meta_rows
    from syncd.sandbox.destinations.meta import MetaSandbox

    heading(f"Meta Custom Audiences, {num(members)} members")
    items = [
        Item(str(cid), {"EMAIL": f" Member{cid}@Example.com", "PHONE": f"+4930{1000000 + cid}",
                        "FN": f"First{cid}", "LN": "Müller", "ZIP": "10115", "COUNTRY": "DE"})
        for cid in range(100_000)
    ]  # fmt: skip
    started = time.perf_counter()
    meta_rows(items)
    hashing = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp, DestinationSandbox(log_bodies=False) as box:
        engine = open_store(f"sqlite:///{tmp}/meta.db")
        with engine.begin() as conn:
            for chunk in rows(members):
                conn.execute(
                    text(
                        "INSERT INTO customer_profiles (customer_id, email, first_name, "
                        "last_name, country, orders_count, gross_revenue_minor, "
                        "refunded_minor, net_revenue_minor, currency, distinct_products, "
                        "lifecycle_stage, has_open_cart, consent_ads) VALUES (:cid, :email, "
                        ":first, :last, 'DE', 1, :net, 0, :net, 'EUR', 1, 'active', false, true)"
                    ),
                    chunk,
                )
                conn.execute(
                    text(
                        "INSERT INTO segment_memberships (segment, customer_id, entered_at) "
                        "VALUES ('audience', :cid, :entered)"
                    ),
                    chunk,
                )
        meta = box.vendor("meta", MetaSandbox)
        meta.add_audience("123")
        results = []
        for mode in ("mirror", "replace"):
            path = Path(tmp) / f"meta-{mode}.toml"
            path.write_text(
                f'destination = "meta"\nbase_url = "{box.vendor_url("meta")}"\n'
                f'allow_loopback = true\n[credentials]\naccess_token = "{meta.access_token}"\n'
                f'[limits]\nrequests_per_second = 1000\n[[sync]]\nname = "meta-{mode}"\n'
                f'segment = "audience"\nmode = "{mode}"\nobject = "123"\n[sync.fields]\n'
                'EMAIL = "email"\nFN = "first_name"\nLN = "last_name"\nCOUNTRY = "country"\n'
            )
            settings = Settings.model_validate(
                {
                    "segments": {"audience": {"rule": "orders_count >= 1"}},
                    "destinations": {"mappings": [str(path)]},
                }
            )
            timed = time.perf_counter()
            result = run_one(engine, settings, f"meta-{mode}")
            results.append((mode, result, time.perf_counter() - timed))
        engine.dispose()
    least = math.ceil(members / MAX_ROWS)
    print_table(
        ("run", "requests", "minimum", "time"),
        [(mode, num(r.counts.requests), num(least), f"{t:.1f} s") for mode, r, t in results],
    )
    for mode, r, _ in results:
        print(f"{mode}: requests = minimum: {verdict(r.counts.requests == least)}")
    print(
        f"hashing 100,000 members (6 keys each): {hashing:.2f} s "
        f"(target <= 1 s): {verdict(hashing <= 1.0)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=1_000_000)
    parser.add_argument("--limit", type=int, default=20, help="the receiver's requests/s")
    parser.add_argument(
        "--rate-rows", type=int, default=30_000, help="rows sent in the rate run (100/request)"
    )
    parser.add_argument("--postgres", metavar="URL", help="also run on this Postgres database")
    args = parser.parse_args()
    run_google(min(args.members, 100_000))
    with tempfile.TemporaryDirectory() as tmp:
        bench_store("SQLite", f"sqlite:///{tmp}/push.db", args.members, args.limit, args.rate_rows)
    if args.postgres:
        from sqlalchemy import create_engine

        admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text("DROP DATABASE IF EXISTS syncd_bench_push WITH (FORCE)"))
            conn.execute(text("CREATE DATABASE syncd_bench_push"))
        url = args.postgres.rsplit("/", 1)[0] + "/syncd_bench_push"
        try:
            bench_store("Postgres", url, args.members, args.limit, args.rate_rows)
        finally:
            with admin.connect() as conn:
                conn.execute(text("DROP DATABASE IF EXISTS syncd_bench_push WITH (FORCE)"))
            admin.dispose()
    run_meta(min(args.members, 100_000))


if __name__ == "__main__":
    main()
