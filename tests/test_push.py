"""The sync engine end to end: real adapters against the destination sandbox on 127.0.0.1,
on both stores. Partial failures, the diff, leavers, batch splitting, retries, skips."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, insert, select, update

from syncd.config import Settings
from syncd.mapping import load_mappings
from syncd.push import PushResult, push, select_syncs
from syncd.sandbox.destinations import DestinationSandbox
from syncd.store.models import MEMBERSHIPS, PROFILES, SYNC_RECORDS, SYNC_RUNS
from tests.consent_audit import ConsentLedger

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
LIST = "aud1"
SECRET = "hook-secret"


def email(cid: int) -> str:
    return f"person{cid}@example.com"


def add_people(
    engine: Engine,
    ids: Sequence[int],
    segment: str = "vip",
    emails: dict[int, str | None] | None = None,
    consent: bool = True,
) -> None:
    """Profiles and segment members; ``consent``: each has given email consent (at T0)."""
    emails = emails or {}
    if consent:
        ConsentLedger.grant("email", *(emails.get(cid, email(cid)) for cid in ids))
    with engine.begin() as conn:
        conn.execute(
            insert(PROFILES),
            [
                {
                    "customer_id": cid,
                    "email": emails.get(cid, email(cid)),
                    "first_name": f"First{cid}",
                    "last_name": f"Last{cid}",
                    "country": "DE",
                    "orders_count": cid % 7,
                    "net_revenue_minor": cid * 101,
                    "currency": "EUR",
                    "lifecycle_stage": "active",
                    "consent_email": consent,
                    "consent_email_at": T0 if consent else None,
                    "consent_email_source": "test:granted" if consent else None,
                }
                for cid in ids
            ],
        )
        conn.execute(
            insert(MEMBERSHIPS),
            [{"segment": segment, "customer_id": cid, "entered_at": T0} for cid in ids],
        )


def leave(engine: Engine, ids: Sequence[int], segment: str = "vip") -> None:
    with engine.begin() as conn:
        conn.execute(
            update(MEMBERSHIPS)
            .where(MEMBERSHIPS.c.segment == segment, MEMBERSHIPS.c.customer_id.in_(ids))
            .values(exited_at=T0 + timedelta(days=1))
        )


def rename(engine: Engine, ids: Sequence[int], first_name: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            update(PROFILES).where(PROFILES.c.customer_id.in_(ids)).values(first_name=first_name)
        )


@pytest.fixture
def sandbox() -> Iterator[DestinationSandbox]:
    with DestinationSandbox() as box:
        box.mailchimp.add_list(LIST)
        yield box


def settings_for(tmp_path: Path, mapping: str) -> Settings:
    path = tmp_path / "dest.toml"
    path.write_text(mapping)
    return Settings.model_validate(
        {
            "segments": {"vip": {"rule": "orders_count >= 1"}},
            "destinations": {"mappings": [str(path)]},
        }
    )


def mailchimp_mapping(sandbox: DestinationSandbox, mode: str = "upsert", extra: str = "") -> str:
    tag = '\n[sync.options]\ntag = "vip"' if mode == "mirror" else ""
    return f"""
destination = "mailchimp"
base_url = "{sandbox.mailchimp_url}"
allow_loopback = true
[credentials]
api_key = "{sandbox.mailchimp.api_key}"

[[sync]]
name = "mc-vip"
segment = "vip"
mode = "{mode}"
object = "{LIST}"
{extra}
[sync.fields]
email_address = "email"
"merge_fields.FNAME" = "first_name"
"merge_fields.REVENUE" = "net_revenue_minor | minor_to_major"
{tag}
"""


def run_push(settings: Settings, engine: Engine, **kwargs: Any) -> PushResult:
    mappings = load_mappings(settings)
    (result,) = asyncio.run(push(engine, select_syncs(mappings, None), **kwargs))
    return result


def mc_posts(sandbox: DestinationSandbox, path: str = f"/lists/{LIST}") -> list[Any]:
    return [r.body for r in sandbox.mailchimp.requests if r.method == "POST" and r.path == path]


def records(engine: Engine, sync: str) -> dict[str, Any]:
    with engine.connect() as conn:
        return {
            r.record_key: r
            for r in conn.execute(select(SYNC_RECORDS).where(SYNC_RECORDS.c.sync == sync))
        }


def test_one_refused_address_fails_alone_and_only_it_is_retried(
    engine: Engine, sandbox: DestinationSandbox, tmp_path: Path
) -> None:
    bad = "john..doe@example.com"  # passes syncd's check; Mailchimp refuses the double dot
    add_people(engine, range(1, 501), emails={250: bad})
    settings = settings_for(tmp_path, mailchimp_mapping(sandbox))

    first = run_push(settings, engine)
    assert first.status == "partial"
    c = first.counts
    assert (c.added, c.updated, c.failed, c.skipped, c.requests) == (499, 0, 1, 0, 1)
    members = sandbox.mailchimp.lists[LIST].members
    assert len(members) == 499 and bad not in members
    assert members[email(7)]["merge_fields"] == {"FNAME": "First7", "REVENUE": 7.07}
    held = records(engine, "mc-vip")
    assert held["250"].status == "failed" and held["250"].attempts == 1
    ((reason, n),) = c.failed_reasons.items()
    assert n == 1 and reason == held["250"].error
    assert reason.startswith("Please provide a valid email address.")  # the vendor's words

    sandbox.reset_logs()
    # The refused row waits an hour (the default schedule's first delay) for its next try.
    now = datetime.now(UTC)
    waiting = run_push(settings, engine, clock=lambda: now + timedelta(minutes=59))
    c = waiting.counts
    assert (c.unchanged, c.retrying, c.failed, c.requests) == (499, 1, 0, 0)
    second = run_push(settings, engine, clock=lambda: now + timedelta(minutes=61))
    c = second.counts
    assert (c.added, c.unchanged, c.failed, c.requests) == (0, 499, 1, 1)
    (body,) = mc_posts(sandbox)
    assert [m["email_address"] for m in body["members"]] == [bad]
    assert records(engine, "mc-vip")["250"].attempts == 2
    with engine.connect() as conn:
        runs = conn.execute(
            select(SYNC_RUNS.c.status, SYNC_RUNS.c.counts).where(SYNC_RUNS.c.kind == "destination")
        ).all()
    assert [r.status for r in runs] == ["partial", "success", "partial"]
    assert runs[2].counts["unchanged"] == 499 and runs[2].counts["failed"] == 1


def test_a_failing_row_is_given_up_after_max_attempts(
    engine: Engine, sandbox: DestinationSandbox, tmp_path: Path
) -> None:
    add_people(engine, [1, 2], emails={2: "a..b@example.com"})
    extra = 'max_attempts = 2\nretry_delays = ["30m"]'
    settings = settings_for(tmp_path, mailchimp_mapping(sandbox, extra=extra))
    now = datetime.now(UTC)
    first = run_push(settings, engine, clock=lambda: now)
    assert (first.counts.failed, first.counts.given_up) == (1, 0)
    second = run_push(settings, engine, clock=lambda: now + timedelta(minutes=30))
    assert (second.counts.failed, second.counts.given_up) == (1, 1)
    sandbox.reset_logs()
    third = run_push(settings, engine, clock=lambda: now + timedelta(days=30))
    assert third.counts.requests == 0 and third.counts.failed == 0
    assert (third.counts.given_up, third.counts.skipped) == (1, 0)
    assert records(engine, "mc-vip")["2"].retry_after is None
    # A change of the row's content is a new chance (the person's consent stays).
    ConsentLedger.grant("email", "ab@example.com")
    with engine.begin() as conn:
        conn.execute(
            update(PROFILES).where(PROFILES.c.customer_id == 2).values(email="ab@example.com")
        )
    assert run_push(settings, engine, clock=lambda: now + timedelta(days=30)).counts.added == 1


def test_nothing_changed_sends_nothing_and_one_percent_sends_one_batch(
    engine: Engine, sandbox: DestinationSandbox, tmp_path: Path
) -> None:
    add_people(engine, range(1, 1001))
    settings = settings_for(tmp_path, mailchimp_mapping(sandbox))
    assert run_push(settings, engine).counts.added == 1000
    assert len(mc_posts(sandbox)) == 2  # 1000 members, 500 per request

    sandbox.reset_logs()
    again = run_push(settings, engine)
    assert again.counts.unchanged == 1000 and again.counts.requests == 0
    assert sandbox.requests == []

    changed = list(range(10, 1001, 100))  # 10 of 1000: 1%
    rename(engine, changed, "Renamed")
    third = run_push(settings, engine)
    assert (third.counts.updated, third.counts.unchanged, third.counts.requests) == (10, 990, 1)
    (body,) = mc_posts(sandbox)
    assert sorted(m["email_address"] for m in body["members"]) == sorted(email(c) for c in changed)
    assert sandbox.mailchimp.member(LIST, email(10))["merge_fields"]["FNAME"] == "Renamed"


def test_mirror_tags_entrants_and_untags_leavers(
    engine: Engine, sandbox: DestinationSandbox, tmp_path: Path
) -> None:
    add_people(engine, range(1, 21))
    settings = settings_for(tmp_path, mailchimp_mapping(sandbox, "mirror"))
    assert run_push(settings, engine).counts.added == 20
    assert sandbox.mailchimp.segment_members(LIST, "vip") == {email(c) for c in range(1, 21)}

    leave(engine, [3, 4, 5])
    sandbox.reset_logs()
    result = run_push(settings, engine)
    assert (result.counts.removed, result.counts.unchanged, result.counts.added) == (3, 17, 0)
    assert sandbox.mailchimp.segment_members(LIST, "vip") == {
        email(c) for c in range(1, 21) if c not in (3, 4, 5)
    }
    (body,) = mc_posts(sandbox, "/lists/aud1/segments/" + str(_segment_id(sandbox)))
    assert sorted(body["members_to_remove"]) == sorted(email(c) for c in (3, 4, 5))
    # The leavers stay audience members (only the tag goes) and are forgotten by the sync,
    # so coming back is an entry again.
    assert sandbox.mailchimp.member(LIST, email(3)) is not None
    assert set(records(engine, "mc-vip")) == {str(c) for c in range(1, 21) if c not in (3, 4, 5)}
    with engine.begin() as conn:
        conn.execute(insert(MEMBERSHIPS).values(segment="vip", customer_id=3, entered_at=T0))
    assert run_push(settings, engine).counts.added == 1
    assert email(3) in sandbox.mailchimp.segment_members(LIST, "vip")


def test_a_scoped_push_reads_and_sends_only_its_customers(
    engine: Engine, sandbox: DestinationSandbox, tmp_path: Path
) -> None:
    # After a webhook's scoped recompute: customers 2 (renamed), 3 (left), 21 (entered)
    # changed. Customer 9 was renamed too, but no webhook told about it.
    add_people(engine, range(1, 21))
    settings = settings_for(tmp_path, mailchimp_mapping(sandbox, "mirror"))
    assert run_push(settings, engine).counts.added == 20
    rename(engine, [2, 9], "Renamed")
    leave(engine, [3])
    add_people(engine, [21])
    sandbox.reset_logs()
    result = run_push(settings, engine, scope={2, 3, 21})
    counts = result.counts
    assert (counts.added, counts.updated, counts.removed, counts.unchanged) == (1, 1, 1, 0)
    (upsert,) = mc_posts(sandbox)
    assert sorted(m["email_address"] for m in upsert["members"]) == sorted([email(2), email(21)])
    assert sandbox.mailchimp.member(LIST, email(2))["merge_fields"]["FNAME"] == "Renamed"
    assert sandbox.mailchimp.member(LIST, email(9))["merge_fields"]["FNAME"] == "First9"
    assert email(3) not in sandbox.mailchimp.segment_members(LIST, "vip")
    with engine.connect() as conn:
        run = conn.execute(select(SYNC_RUNS).order_by(SYNC_RUNS.c.id.desc()).limit(1)).one()
    assert run.counts["scope"] == 3
    # The next full push finds customer 9 and nothing else.
    sandbox.reset_logs()
    full = run_push(settings, engine).counts
    assert (full.updated, full.added, full.removed, full.unchanged) == (1, 0, 0, 19)


def _segment_id(sandbox: DestinationSandbox) -> int:
    return sandbox.mailchimp.lists[LIST].segment_names["vip"]


def webhook_mapping(sandbox: DestinationSandbox, mode: str = "upsert", batch: int = 1000) -> str:
    return f"""
destination = "webhook"
base_url = "{sandbox.webhook_url("crm")}"
allow_loopback = true
[credentials]
secret = "{SECRET}"
[limits]
requests_per_second = 200

[[sync]]
name = "hook"
segment = "vip"
mode = "{mode}"
batch_size = {batch}
[sync.fields]
email = "email"
name = "{{{{ first_name }}}} {{{{ last_name }}}}"
"""


def test_a_batch_refused_whole_is_split_until_the_bad_rows_are_alone(
    engine: Engine, sandbox: DestinationSandbox, tmp_path: Path
) -> None:
    bad = {37: "bad37@example.com", 81: "bad81@example.com"}
    add_people(engine, range(1, 101), emails=bad)  # type: ignore[arg-type]
    receiver = sandbox.webhooks.add(
        "crm",
        SECRET,
        reject=lambda record: "bad" in record["data"]["email"] and "no bad addresses",
        reject_mode="batch",
    )
    result = run_push(settings_for(tmp_path, webhook_mapping(sandbox)), engine)
    assert (result.counts.added, result.counts.failed) == (98, 2)
    assert result.counts.failed_reasons == {"1 record(s) refused: no bad addresses": 2}
    accepted = [r["key"] for r in receiver.records]
    assert sorted(accepted, key=int) == [str(c) for c in range(1, 101) if c not in bad]
    assert len(accepted) == len(set(accepted))  # nothing delivered twice
    # Halving 100 rows around two bad ones: each refused batch splits in two.
    refused = [r for r in sandbox.webhooks.requests if r.status == 422]
    assert len(refused) == result.counts.requests - len(receiver.batches)
    held = records(engine, "hook")
    assert (
        held["37"].status == "failed"
        and held["37"].error == "1 record(s) refused: no bad addresses"
    )


def test_rows_that_cannot_be_sent_are_skipped_with_the_reason(
    engine: Engine, sandbox: DestinationSandbox, tmp_path: Path
) -> None:
    add_people(engine, [1, 2, 3], emails={2: None, 3: "not-an-address"})
    settings = settings_for(tmp_path, mailchimp_mapping(sandbox))
    result = run_push(settings, engine)
    assert (result.counts.added, result.counts.skipped) == (1, 2)
    assert result.counts.skipped_reasons == {"no email_address": 1, "invalid email_address": 1}
    (body,) = mc_posts(sandbox)
    assert [m["email_address"] for m in body["members"]] == [email(1)]
    # Unchanged, they stay skipped without being looked at again, and still counted.
    sandbox.reset_logs()
    again = run_push(settings, engine)
    assert (again.counts.skipped, again.counts.requests) == (2, 0)
    assert again.counts.skipped_reasons == {"no email_address": 1, "invalid email_address": 1}


def test_full_resends_everything_and_dry_run_sends_nothing(
    engine: Engine, sandbox: DestinationSandbox, tmp_path: Path
) -> None:
    add_people(engine, range(1, 11))
    receiver = sandbox.webhooks.add("crm", SECRET)
    settings = settings_for(tmp_path, webhook_mapping(sandbox, batch=4))
    assert run_push(settings, engine).counts.added == 10
    dry = run_push(settings, engine, dry_run=True, full=True)
    assert dry.status == "dry-run" and dry.planned == {"upsert": 10}
    assert len(dry.samples) == 3
    assert dry.samples[0]["payload"] == {"email": "p***", "name": "F***"}  # PII masked
    assert len(receiver.batches) == 3  # the dry run sent nothing
    full = run_push(settings, engine, full=True)
    assert (full.counts.updated, full.counts.requests) == (10, 3)
    assert len(receiver.records) == 20


def klaviyo_mapping(sandbox: DestinationSandbox, list_id: str) -> str:
    return f"""
destination = "klaviyo"
base_url = "{sandbox.klaviyo_url}"
allow_loopback = true
[credentials]
api_key = "{sandbox.klaviyo.api_key}"

[[sync]]
name = "kl-vip"
segment = "vip"
mode = "mirror"
object = "{list_id}"
[sync.fields]
email = "email"
first_name = "first_name"
"properties.net_revenue" = "net_revenue_minor | minor_to_major"

[[sync]]
name = "kl-entered"
segment = "vip"
mode = "event"
object = "Entered VIP"
[sync.fields]
email = "email"
"properties.segment" = "{{{{ country }}}}"
"""


def test_klaviyo_mirror_keeps_profile_ids_to_remove_leavers(
    engine: Engine, sandbox: DestinationSandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    list_id = sandbox.klaviyo.add_list(name="VIP")
    add_people(engine, range(1, 31))
    settings = settings_for(tmp_path, klaviyo_mapping(sandbox, list_id))
    mappings = load_mappings(settings)
    for mapping in mappings:
        # mapping.adapter is the class: set through monkeypatch, so the fast polling
        # ends with this test instead of reaching every later Klaviyo test.
        monkeypatch.setattr(mapping.adapter, "poll_interval", 0.01)
    results = asyncio.run(push(engine, select_syncs(mappings, None)))
    assert [r.counts.added for r in results] == [30, 30]
    ids = {k: r.dest_id for k, r in records(engine, "kl-vip").items()}
    assert len(set(ids.values())) == 30 and all(ids.values())
    assert sandbox.klaviyo.list_members[list_id] == set(ids.values())
    assert sandbox.klaviyo.members_of(list_id) == {email(c) for c in range(1, 31)}
    profile = sandbox.klaviyo.profile_by_email(email(5))
    assert profile is not None and profile["id"] == ids["5"]

    leave(engine, [5, 6])
    results = asyncio.run(push(engine, select_syncs(mappings, None)))
    assert results[0].counts.removed == 2
    assert sandbox.klaviyo.list_members[list_id] == {
        v for k, v in ids.items() if k not in ("5", "6")
    }
    # The event sync sends one event per entry; leaving sends none, re-entering one more.
    assert results[1].counts.requests == 0
    with engine.begin() as conn:
        conn.execute(
            insert(MEMBERSHIPS).values(
                segment="vip", customer_id=5, entered_at=T0 + timedelta(days=2)
            )
        )
    results = asyncio.run(push(engine, select_syncs(mappings, None)))
    assert results[1].counts.added == 1
    events = sandbox.klaviyo.events
    assert len(events) == 31 and len({e["unique_id"] for e in events}) == 31


def test_status_json_reports_each_sync(
    engine: Engine, sandbox: DestinationSandbox, tmp_path: Path
) -> None:
    from syncd.status import collect_status

    add_people(engine, [1, 2], emails={2: "x..y@example.com"})
    settings = settings_for(tmp_path, mailchimp_mapping(sandbox))
    run_push(settings, engine)
    data = collect_status(engine, settings)
    dest = data["destinations"]["mc-vip"]
    assert dest["records"] == {"in_destination": 1, "failed": 1, "given_up": 0, "skipped": 0}
    assert dest["last_run"]["status"] == "partial"
    assert dest["last_run"]["counts"]["added"] == 1
    json.dumps(data)  # the document is plain JSON


def test_woocommerce_write_back_puts_segments_and_counts_on_registered_customers(
    engine: Engine, tmp_path: Path
) -> None:
    from syncd.sandbox.server import SandboxServer
    from syncd.sandbox.store import SandboxStore
    from syncd.segments.recompute import recompute
    from syncd.store.models import CUSTOMER_RECORDS
    from tests.test_ingest_e2e import settings_for as source_settings
    from tests.test_ingest_e2e import sync as source_sync

    shop = SandboxStore(seed=5, customers=40, guests=20, orders=300)
    with SandboxServer(shop) as server:
        assert source_sync(engine, source_settings(server)).error is None
        mapping = tmp_path / "wc.toml"
        mapping.write_text(
            f"""
destination = "woocommerce"
base_url = "{server.url}"
allow_loopback = true
[credentials]
consumer_key = "{server.consumer_key}"
consumer_secret = "{server.consumer_secret}"
[limits]
requests_per_second = 100

[[sync]]
name = "wc-meta"
segment = "buyers"
mode = "upsert"
[sync.fields]
id = "woocommerce_id"
"meta.syncd_segments" = "segments | join"
"meta.syncd_orders" = "orders_count"
"""
        )
        settings = Settings.model_validate(
            {
                "segments": {
                    "buyers": {"rule": "orders_count >= 1"},
                    "repeat": {"rule": "orders_count >= 2"},
                },
                "destinations": {"mappings": [str(mapping)]},
            }
        )
        recompute(engine, settings, None)
        with engine.connect() as conn:
            open_rows = conn.execute(
                select(MEMBERSHIPS.c.customer_id, MEMBERSHIPS.c.segment).where(
                    MEMBERSHIPS.c.exited_at.is_(None)
                )
            ).all()
            wc_ids = {
                cid: wc_id
                for cid, wc_id in conn.execute(
                    select(CUSTOMER_RECORDS.c.customer_id, CUSTOMER_RECORDS.c.source_id)
                )
            }
        segments: dict[int, list[str]] = {}
        for cid, name in open_rows:
            segments.setdefault(cid, []).append(name)
        buyers = [cid for cid, names in segments.items() if "buyers" in names]
        registered = [cid for cid in buyers if cid in wc_ids]
        guests = len(buyers) - len(registered)
        assert registered and guests  # the fixture has both kinds

        result = run_push(settings, engine)
        assert result.status == "success", result.error
        assert (result.counts.added, result.counts.skipped) == (len(registered), guests)
        assert result.counts.skipped_reasons == {
            "not a registered customer of the store (no WooCommerce customer id)": guests
        }
        assert result.counts.requests == -(-len(registered) // 100)
        for cid in registered:
            meta = {
                m["key"]: m["value"]
                for m in shop.payload("customers", wc_ids[cid])["meta_data"]
                if m["key"].startswith("syncd_")
            }
            assert meta["syncd_segments"] == ",".join(sorted(segments[cid]))
            with engine.connect() as conn:
                orders = conn.execute(
                    select(PROFILES.c.orders_count).where(PROFILES.c.customer_id == cid)
                ).scalar_one()
            assert meta["syncd_orders"] == orders
        again = run_push(settings, engine)
        assert (again.counts.requests, again.counts.unchanged) == (0, len(registered))


def test_marketing_consent_is_the_profiles_email_consent_and_sets_the_status(
    engine: Engine, sandbox: DestinationSandbox, tmp_path: Path
) -> None:
    """The old column `marketing_consent` reads the profile's consent_email now (where the
    latest statement of the [consent.email] keys lands, see test_consent.py); in a sync of
    consent "none" it still decides each member's status."""
    from syncd.store.models import CUSTOMERS

    # person -> consent_email of the profile (None: never stated)
    given: dict[int, bool | None] = {1: True, 2: False, 3: None, 4: True, 5: None, 6: None}
    add_people(engine, list(given), consent=False)
    with engine.begin() as conn:
        conn.execute(
            insert(CUSTOMERS),
            [
                {"id": cid, "email": email(cid), "phone": "+4930901820" if cid == 1 else None}
                for cid in given
            ],
        )
        for cid, value in given.items():
            if value is not None:
                conn.execute(
                    update(PROFILES)
                    .where(PROFILES.c.customer_id == cid)
                    .values(consent_email=value, consent_email_at=T0)
                )
    mapping = mailchimp_mapping(
        sandbox, extra='consent = "none"\nconsent_reason = "the status follows the column"'
    ).replace(
        '"merge_fields.FNAME" = "first_name"',
        '"merge_fields.FNAME" = "first_name"\nmarketing_consent = "marketing_consent"\n'
        '"merge_fields.PHONE" = "phone"',
    )
    assert run_push(settings_for(tmp_path, mapping), engine).counts.added == 6
    statuses = {cid: sandbox.mailchimp.member(LIST, email(cid))["status"] for cid in given}
    assert statuses == {
        1: "subscribed",
        2: "transactional",
        3: "transactional",
        4: "subscribed",
        5: "transactional",
        6: "transactional",
    }
    # The contact details come from the person's customers row.
    assert sandbox.mailchimp.member(LIST, email(1))["merge_fields"]["PHONE"] == "+4930901820"
    assert "PHONE" not in sandbox.mailchimp.member(LIST, email(2))["merge_fields"]


def test_a_sql_model_is_pushed_by_its_key_column_and_diffed(
    engine: Engine, sandbox: DestinationSandbox, tmp_path: Path
) -> None:
    add_people(engine, range(1, 6))
    receiver = sandbox.webhooks.add("crm", SECRET)
    query = (
        "SELECT customer_id * 10 AS ref, email, first_name, last_name "
        "FROM customer_profiles WHERE net_revenue_minor >= 303"
    )
    model = webhook_mapping(sandbox).replace('segment = "vip"', f'sql = "{query}"\nkey = "ref"')
    settings = settings_for(tmp_path, model)
    assert run_push(settings, engine).counts.added == 3  # 303, 404, 505
    assert sorted(r["key"] for r in receiver.records) == ["30", "40", "50"]
    assert receiver.records[0]["data"] == {"email": email(3), "name": "First3 Last3"}
    rename(engine, [4], "Fourth")
    again = run_push(settings, engine)
    assert (again.counts.updated, again.counts.unchanged) == (1, 2)
    assert receiver.records[-1]["data"]["name"] == "Fourth Last4"


def _refusing_receiver(sandbox: DestinationSandbox) -> tuple[Any, dict[str, bool]]:
    """A receiver that refuses every record, one by one, while ``state["down"]``."""
    state = {"down": True}
    receiver = sandbox.webhooks.add(
        "crm", SECRET, reject=lambda record: state["down"] and "account suspended"
    )
    return receiver, state


def test_rows_refused_three_runs_then_accepted_are_all_delivered_on_the_schedule(
    engine: Engine, sandbox: DestinationSandbox, tmp_path: Path
) -> None:
    add_people(engine, range(1, 41))
    receiver, state = _refusing_receiver(sandbox)
    settings = settings_for(tmp_path, webhook_mapping(sandbox))
    t0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    hour = timedelta(hours=1)

    def at(when: datetime) -> PushResult:
        return run_push(settings, engine, clock=lambda: when)

    # Default schedule: the 2nd try 1 h after the 1st refusal, the 3rd 6 h after the 2nd,
    # the 4th 24 h after the 3rd; before each is due, nothing is sent.
    tries = [t0, t0 + hour, t0 + 7 * hour, t0 + 31 * hour]
    for n, when in enumerate(tries[:3], start=1):
        refused = at(when)
        assert refused.status == "failed"  # every row sent was refused
        assert (refused.counts.failed, refused.counts.given_up) == (40, 0)
        assert {r.attempts for r in records(engine, "hook").values()} == {n}
        early = at(tries[n] - timedelta(seconds=1))
        assert (early.counts.retrying, early.counts.requests) == (40, 0)
    assert receiver.records == []
    state["down"] = False
    recovered = at(tries[3])
    assert recovered.status == "success"
    assert (recovered.counts.added, recovered.counts.failed) == (40, 0)
    assert sorted((r["key"] for r in receiver.records), key=int) == [str(c) for c in range(1, 41)]
    held = records(engine, "hook")
    assert {(r.status, r.attempts, r.retry_after) for r in held.values()} == {("sent", 0, None)}


def test_given_up_rows_are_counted_alerted_and_sent_again_by_retry_failed(
    engine: Engine, sandbox: DestinationSandbox, tmp_path: Path
) -> None:
    from syncd.alerts import Alerts
    from syncd.config import AlertSettings
    from syncd.metrics import Metrics
    from syncd.status import collect_status

    add_people(engine, range(1, 11))
    receiver, state = _refusing_receiver(sandbox)
    # The mapping's schedule, for all its syncs: one retry, 2 h after the first refusal.
    mapping = webhook_mapping(sandbox).replace(
        "[credentials]", 'retry_delays = ["2h"]\n[credentials]'
    )
    settings = settings_for(tmp_path, mapping)
    t0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    run_push(settings, engine, clock=lambda: t0)
    last = run_push(settings, engine, clock=lambda: t0 + timedelta(hours=2))
    assert (last.status, last.counts.failed, last.counts.given_up) == ("failed", 10, 10)
    alerts = Alerts(AlertSettings())
    alerts.run_finished(
        "destination", "hook", last.status, last.counts.as_json(), failures_in_a_row=1
    )
    assert "10 rows given up" in alerts.incidents["given_up:hook"]
    records_now = collect_status(engine, settings)["destinations"]["hook"]["records"]
    assert records_now == {"in_destination": 0, "failed": 10, "given_up": 10, "skipped": 0}
    metric = 'syncd_destination_given_up_rows{sync="hook"} 10.0'
    assert metric in Metrics(engine, settings).render()[0].decode()

    state["down"] = False
    sandbox.reset_logs()
    later = run_push(settings, engine, clock=lambda: t0 + timedelta(days=60))
    assert (later.counts.given_up, later.counts.requests) == (10, 0)  # never again alone
    retried = run_push(settings, engine, retry_failed=True, clock=lambda: t0 + timedelta(days=60))
    assert (retried.status, retried.counts.added, retried.counts.given_up) == ("success", 10, 0)
    assert len(receiver.records) == 10
    records_now = collect_status(engine, settings)["destinations"]["hook"]["records"]
    assert records_now == {"in_destination": 10, "failed": 0, "given_up": 0, "skipped": 0}
    assert "syncd_destination_given_up_rows{" not in Metrics(engine, settings).render()[0].decode()
    alerts.run_finished(
        "destination", "hook", retried.status, retried.counts.as_json(), failures_in_a_row=0
    )
    assert "given_up:hook" not in alerts.incidents


def test_a_batch_refused_whole_for_one_reason_fails_the_sync_without_bisecting(
    engine: Engine, sandbox: DestinationSandbox, tmp_path: Path
) -> None:
    add_people(engine, range(1, 519))
    sandbox.webhooks.add(
        "crm",
        SECRET,
        reject=lambda record: "field 'name' is not in the schema",  # a mapping error
        reject_mode="batch",
    )
    result = run_push(settings_for(tmp_path, webhook_mapping(sandbox)), engine)
    assert result.status == "failed"
    assert result.error is not None and "field 'name' is not in the schema" in result.error
    # The batch, its two halves and one row alone: not 1,035 requests for 518 rows.
    assert result.counts.requests == 4
    assert (result.counts.added, result.counts.failed) == (0, 518)
    held = records(engine, "hook")
    assert len(held) == 518 and {r.status for r in held.values()} == {"failed"}
    assert {r.error for r in held.values()} == {
        "1 record(s) refused: field 'name' is not in the schema"
    }


def test_a_retry_delay_that_is_no_duration_is_refused_naming_the_key(
    sandbox: DestinationSandbox, tmp_path: Path
) -> None:
    from syncd.config import ConfigError

    mapping = webhook_mapping(sandbox).replace(
        "batch_size", 'retry_delays = ["1h", "soon"]\nbatch_size'
    )
    with pytest.raises(ConfigError, match=r"sync\[hook\]\.retry_delays.*'soon'"):
        load_mappings(settings_for(tmp_path, mapping))


def test_a_probe_row_refused_for_its_own_reason_leaves_the_rest_of_its_half_to_be_sent(
    engine: Engine, tmp_path: Path
) -> None:
    """Rows 1 and 4 bad; the receiver names no row when a batch holds several
    ("batch contains invalid records"), only when one is sent alone. The batch and both
    halves are refused alike, so row 1 goes alone: refused for its own reason, which
    is not the batch's, so row 2 is sent, not recorded refused unsent."""
    import respx

    url = "https://hooks.example.com/catch"
    add_people(engine, [1, 2, 3, 4])
    mapping = f"""
destination = "webhook"
base_url = "{url}"
allow_loopback = true
[credentials]
secret = "{SECRET}"

[[sync]]
name = "hook"
segment = "vip"
mode = "upsert"
[sync.fields]
email = "email"
"""
    bad = {"1": "invalid phone", "4": "invalid email"}
    sent: list[list[str]] = []

    def answer(request: Any) -> Any:
        import httpx

        keys = [r["key"] for r in json.loads(request.content)["records"]]
        sent.append(keys)
        refused = [k for k in keys if k in bad]
        if not refused:
            return httpx.Response(200, json={})
        message = bad[keys[0]] if len(keys) == 1 else "batch contains invalid records"
        return httpx.Response(422, json={"message": message})

    with respx.mock(assert_all_called=False) as mock:
        mock.post(url).mock(side_effect=answer)
        result = run_push(settings_for(tmp_path, mapping), engine)
    assert sent == [["1", "2", "3", "4"], ["1", "2"], ["3", "4"], ["1"], ["2"], ["3"], ["4"]]
    assert (result.status, result.counts.added, result.counts.failed) == ("partial", 2, 2)
    held = records(engine, "hook")
    assert {k: (r.status, r.error) for k, r in held.items()} == {
        "1": ("failed", "invalid phone"),
        "2": ("sent", None),
        "3": ("sent", None),
        "4": ("failed", "invalid email"),
    }


def test_a_sql_model_that_writes_is_refused_and_writes_nothing(
    engine: Engine, sandbox: DestinationSandbox, tmp_path: Path
) -> None:
    # Run bare, SQLite executed this DELETE and pushed the rows it deleted as records
    # (the read connection's rollback then put them back).
    add_people(engine, range(1, 4))
    receiver = sandbox.webhooks.add("crm", SECRET)
    query = "DELETE FROM customer_profiles RETURNING customer_id, email, first_name, last_name"
    model = webhook_mapping(sandbox).replace('segment = "vip"', f'sql = "{query}"')
    result = run_push(settings_for(tmp_path, model), engine)
    assert result.error is not None and result.error.startswith("sync[hook].sql: the query failed")
    assert receiver.records == []
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(PROFILES)).scalar() == 3


def test_the_push_engine_names_no_source() -> None:
    # Source columns (an id at the store, an opt-in read from its records) come from the
    # source through PushColumns; the engine reads and diffs rows of any source.
    import syncd.push

    package = Path(syncd.push.__file__).parent
    modules = sorted(package.glob("*.py"))
    assert {m.name for m in modules} >= {"__init__.py", "engine.py", "rows.py"}
    for module in modules:
        text = module.read_text().lower()
        for word in ("woocommerce", "meta_data"):
            assert word not in text, f"{module.name} names {word}"
