"""Meta Custom Audiences: hashing by Meta's published examples, request bodies with respx,
and mirror syncs end to end against the Meta sandbox on both stores (entries and exits
over three segment changes, throttling with error 17, the match report, erasure).

Meta's examples (Custom Audiences guide, "Hashing and normalization",
developers.facebook.com/docs/marketing-api/audiences/guides/custom-audiences):
sha256("mary@example.com") and sha256("15559876543").
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
import pytest
import respx
import structlog
from hypothesis import given
from hypothesis import settings as examples
from hypothesis import strategies as st
from pydantic import SecretStr
from sqlalchemy import Engine, insert, select, update

from syncd.config import Settings
from syncd.destinations import destination_class
from syncd.destinations.base import BatchRejected, Item, MatchReport, Person, SyncTarget
from syncd.destinations.meta import (
    MAX_ROWS,
    MetaClient,
    MetaDestination,
    MetaOptions,
    buc_pause,
    meta_rows,
)
from syncd.http import ApiError, ServiceLimits
from syncd.identity import META
from syncd.mapping import load_mappings
from syncd.push import PushResult, push, select_syncs
from syncd.sandbox.destinations import DestinationSandbox
from syncd.sandbox.destinations.meta import MetaSandbox, ReplaceSession
from syncd.status import collect_status
from syncd.store.engine import open_store
from syncd.store.models import CUSTOMERS, MEMBERSHIPS, PROFILES, SYNC_RUNS, SYNC_STATE
from tests.consent_audit import ConsentLedger
from tests.test_cli import base_env

T = TypeVar("T")
TOKEN = "EAAB-system-user-token"
AUDIENCE = "23851234567890123"
GRAPH = "https://graph.facebook.com"
FAST = ServiceLimits(concurrency=2, max_attempts=4, backoff_base=0.001, backoff_max=0.01)
MARY = "f1904cf1a9d73a55fa5de0ac823c4403ded71afd4c3248d00bdcd0866552bb79"
PHONE = "1ef970831d7963307784fa8688e8fce101a15685d62aa765fed23f3a2c576a4e"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def make(version: str = "v25.0") -> MetaDestination:
    return MetaDestination(
        "meta",
        {"access_token": SecretStr(TOKEN)},
        MetaOptions(api_version=version),
        limits=FAST,
    )


def target(obj: str = AUDIENCE) -> SyncTarget:
    return SyncTarget(name="ca", mode="mirror", object=obj, options=MetaOptions(), consent="ads")


def answer(received: int, invalid: int = 0) -> httpx.Response:
    return httpx.Response(
        200,
        json={
            "audience_id": AUDIENCE,
            "num_received": received,
            "num_invalid_entries": invalid,
            "invalid_entry_samples": {},
        },
    )


def meta_error(code: int, subcode: int | None = None, status: int = 400) -> httpx.Response:
    error: dict[str, Any] = {"message": f"error {code}", "type": "OAuthException", "code": code}
    if subcode is not None:
        error["error_subcode"] = subcode
    return httpx.Response(status, json={"error": error})


# --- hashing: Meta's own examples and the tricky inputs ------------------------------------


def test_meta_published_hash_examples() -> None:
    assert META.prepare("email", "mary@example.com") == MARY
    assert META.prepare("email", "  Mary@Example.COM ") == MARY
    # The phone example is the number with its country code and no "+": one written in
    # national format is read with the billing country.
    assert sha("15559876543") == PHONE
    assert META.normalize("phone", "+1 (415) 555-0123") == "14155550123"
    assert META.normalize("phone", "(415) 555-0123", country="US") == "14155550123"
    assert META.normalize("phone", "030 1234567", country="DE") == "49301234567"


@pytest.mark.parametrize(
    ("kind", "value", "country", "expected"),
    [
        ("region", "California", "US", "ca"),
        ("region", "New York", "US", "ny"),
        ("region", "CA", "US", "ca"),
        ("region", "Île-de-France", "FR", "îledefrance"),
        ("first_name", "Mary-Jane", None, "maryjane"),
        ("last_name", "O'Brien", None, "obrien"),
        ("first_name", "  José ", None, "josé"),
        ("city", "San Francisco", "US", "sanfrancisco"),
        ("postcode", "94103-1234", "US", "94103"),
        ("postcode", "SW1A 1AA", "GB", "sw1a1aa"),
        ("country", "us", None, "us"),
        ("external_id", 42, None, "42"),
    ],
)
def test_meta_normalization_table(
    kind: Any, value: object, country: str | None, expected: str
) -> None:
    assert META.normalize(kind, value, country=country) == expected


def test_rows_follow_the_schema_built_from_the_fields_and_only_extern_id_is_plain() -> None:
    items = [
        Item("1", {"EMAIL": "Mary@Example.com", "PHONE": "(415) 555-0123", "COUNTRY": "US",
                   "FN": "Mary", "LN": "Smith", "ZIP": "94103-1234", "EXTERN_ID": 1}),
        Item("2", {"EMAIL": None, "PHONE": "+49 30 1234567", "COUNTRY": "DE",
                   "FN": "Jörg", "LN": None, "ZIP": None, "EXTERN_ID": 2}),
    ]  # fmt: skip
    schema, rows, report = meta_rows(items)
    assert schema == ["EMAIL", "PHONE", "FN", "LN", "ZIP", "COUNTRY", "EXTERN_ID"]
    assert rows[0] == [
        MARY,
        sha("14155550123"),
        sha("mary"),
        sha("smith"),
        sha("94103"),
        sha("us"),
        "1",
    ]
    assert rows[1] == ["", sha("49301234567"), sha("jörg"), "", "", sha("de"), "2"]
    assert report.carrying == {"email": 1, "phone": 2, "name_postcode": 1}


# --- the adapter against respx ----------------------------------------------------------------


def test_registry_limits_and_options() -> None:
    assert destination_class("meta") is MetaDestination
    assert MetaDestination.max_batch == {"add": 10_000, "remove": 10_000, "replace": 10_000}
    assert MAX_ROWS == 10_000
    assert MetaDestination.modes == {"mirror", "replace"}
    assert MetaDestination.consent_channel == "ads"
    assert MetaDestination.reports_match and MetaDestination.min_audience == 100
    assert MetaDestination.client_class is MetaClient
    assert MetaOptions().api_version == "v25.0"
    with pytest.raises(ValueError):
        MetaOptions(api_version="25")
    assert MetaDestination.check_credentials({"access_token": SecretStr(" ")}) is not None


@respx.mock
def test_add_posts_hashed_rows_with_the_token_as_a_header_and_reports_the_answer() -> None:
    route = respx.post(f"{GRAPH}/v24.0/{AUDIENCE}/users").mock(return_value=answer(2, 1))
    dest = make("v24.0")
    dest.match_report = MatchReport()
    items = [
        Item("1", {"EMAIL": " Mary@Example.com", "COUNTRY": "US"}),
        Item("2", {"EMAIL": "joe@example.com", "COUNTRY": None}),
    ]
    outcomes = run(dest.send(target(), "add", items))
    assert [o.ok for o in outcomes] == [True, True]
    request = route.calls.last.request
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert "access_token" not in str(request.url)
    assert orjson.loads(request.content) == {
        "payload": {
            "schema": ["EMAIL", "COUNTRY"],
            "data": [[MARY, sha("us")], [sha("joe@example.com"), ""]],
        }
    }
    assert b"@" not in request.content
    assert dest.match_report.as_json() == {
        "received": 2,
        "invalid": 1,
        "carrying": {"email": 2},
    }
    run(dest.aclose())


@respx.mock
def test_remove_is_a_delete_of_the_same_rows() -> None:
    route = respx.delete(f"{GRAPH}/v25.0/{AUDIENCE}/users").mock(return_value=answer(1))
    dest = make()
    run(dest.send(target(), "remove", [Item("1", {"EMAIL": "mary@example.com"})]))
    assert orjson.loads(route.calls.last.request.content) == {
        "payload": {"schema": ["EMAIL"], "data": [[MARY]]}
    }
    run(dest.aclose())


@respx.mock
def test_throttling_codes_are_retried_and_invalid_parameter_is_the_batchs_content() -> None:
    route = respx.post(f"{GRAPH}/v25.0/{AUDIENCE}/users").mock(
        side_effect=[meta_error(17, 2446079), meta_error(80003), meta_error(613), answer(1)]
    )
    dest = make()
    assert run(dest.send(target(), "add", [Item("1", {"EMAIL": "a@example.com"})]))[0].ok
    assert route.call_count == 4
    route.mock(return_value=meta_error(100))
    with pytest.raises(BatchRejected):
        run(dest.send(target(), "add", [Item("1", {"EMAIL": "a@example.com"})]))
    run(dest.aclose())


@pytest.mark.parametrize(
    "response",
    [meta_error(100, 33), meta_error(190), meta_error(200, status=403), meta_error(100, 1713230)],
)
@respx.mock
def test_a_missing_audience_or_bad_token_fails_the_run_after_one_request(
    response: httpx.Response,
) -> None:
    route = respx.post(f"{GRAPH}/v25.0/{AUDIENCE}/users").mock(return_value=response)
    dest = make()
    with pytest.raises(ApiError) as caught:
        run(dest.send(target(), "add", [Item("1", {"EMAIL": "a@example.com"})]))
    assert not isinstance(caught.value, BatchRejected)
    assert route.call_count == 1
    run(dest.aclose())


def test_business_use_case_usage_slows_down_before_the_block() -> None:
    def header(pct: int, regain: int = 0) -> str:
        entry = {
            "type": "custom_audience",
            "call_count": pct,
            "total_cputime": 1,
            "total_time": 1,
            "estimated_time_to_regain_access": regain,
        }
        return json.dumps({"1234567890": [entry]})

    assert buc_pause(header(40)) is None
    assert buc_pause(header(75)) == pytest.approx(3.0)  # at the threshold: a tenth of 30 s
    assert buc_pause(header(90)) == pytest.approx(18.0)
    assert buc_pause(header(100)) == pytest.approx(30.0)
    assert buc_pause(header(100, regain=5)) == pytest.approx(300.0)  # minutes to wait
    assert buc_pause("not json") is None and buc_pause(None) is None


def test_check_skips_rows_without_identifier_and_unknown_keys() -> None:
    dest = make()
    assert dest.check(target(), "add", {"EMAIL": "a@example.com"}) is None
    assert "no identifier" in (dest.check(target(), "add", {"EMAIL": None, "COUNTRY": "US"}) or "")
    assert "EMIAL" in (dest.check(target(), "add", {"EMIAL": "a@example.com"}) or "")
    with pytest.raises(ValueError, match="audience id"):
        run(dest.prepare(target("not-an-id")))
    run(dest.aclose())


@respx.mock
def test_forget_removes_the_person_from_every_audience_of_the_mapping() -> None:
    routes = [
        respx.delete(f"{GRAPH}/v25.0/{aud}/users").mock(return_value=answer(1))
        for aud in ("111", "222")
    ]
    dest = make()
    person = Person(7, "mary@example.com", "+14155550123", {}, {})
    receipt = run(dest.forget(person, [target("111"), target("222"), target("111")], ()))
    assert receipt.status == "done"
    for route in routes:
        assert route.call_count == 1
        assert orjson.loads(route.calls.last.request.content)["payload"] == {
            "schema": ["EMAIL", "PHONE"],
            "data": [[MARY, sha("14155550123")]],
        }
    run(dest.aclose())


# --- end to end against the sandbox, both stores --------------------------------------------

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def email(cid: int) -> str:
    return f"fan{cid}@example.com"


def add_people(engine: Engine, ids: Sequence[int]) -> None:
    """Customers with ads consent, members of segment "vip"."""
    ConsentLedger.grant("ads", *(email(cid) for cid in ids))
    with engine.begin() as conn:
        conn.execute(
            insert(CUSTOMERS),
            [
                {
                    "id": cid,
                    "email": email(cid),
                    "phone": f"+4930{1000000 + cid}" if cid % 2 else None,
                    "country": "DE",
                    "postcode": "10115",
                }
                for cid in ids
            ],
        )
        conn.execute(
            insert(PROFILES),
            [
                {
                    "customer_id": cid,
                    "email": email(cid),
                    "first_name": f"Fan{cid}",
                    "last_name": "Müller",
                    "country": "DE",
                    "orders_count": 1,
                    "consent_ads": True,
                    "consent_ads_at": T0,
                    "consent_ads_source": "test:granted",
                }
                for cid in ids
            ],
        )
    enter(engine, ids)


def enter(engine: Engine, ids: Sequence[int]) -> None:
    with engine.begin() as conn:
        conn.execute(
            insert(MEMBERSHIPS),
            [{"segment": "vip", "customer_id": cid, "entered_at": T0} for cid in ids],
        )


def leave(engine: Engine, ids: Sequence[int]) -> None:
    with engine.begin() as conn:
        conn.execute(
            update(MEMBERSHIPS)
            .where(MEMBERSHIPS.c.segment == "vip", MEMBERSHIPS.c.customer_id.in_(ids))
            .values(exited_at=T0 + timedelta(days=1))
        )


def members(engine: Engine) -> set[int]:
    with engine.connect() as conn:
        return set(
            conn.execute(
                select(MEMBERSHIPS.c.customer_id).where(
                    MEMBERSHIPS.c.segment == "vip", MEMBERSHIPS.c.exited_at.is_(None)
                )
            ).scalars()
        )


@pytest.fixture
def sandbox() -> Iterator[DestinationSandbox]:
    with DestinationSandbox() as box:
        box.vendor("meta", MetaSandbox).add_audience(AUDIENCE, "vip buyers")
        yield box


def settings_for(sandbox: DestinationSandbox, tmp_path: Path, batch: int = 10_000) -> Settings:
    meta = sandbox.vendor("meta", MetaSandbox)
    path = tmp_path / "meta.toml"
    path.write_text(
        f"""
destination = "meta"
base_url = "{sandbox.vendor_url("meta")}"
allow_loopback = true
[credentials]
access_token = "{meta.access_token}"
[limits]
requests_per_second = 100

[[sync]]
name = "meta-vip"
segment = "vip"
mode = "mirror"
object = "{AUDIENCE}"
batch_size = {batch}
[sync.fields]
EMAIL = "email"
PHONE = "phone"
FN = "first_name"
LN = "last_name"
ZIP = "postcode"
COUNTRY = "country"
EXTERN_ID = "customer_id"
"""
    )
    return Settings.model_validate(
        {
            "segments": {"vip": {"rule": "orders_count >= 1"}},
            "destinations": {"mappings": [str(path)]},
        }
    )


def run_push(settings: Settings, engine: Engine) -> PushResult:
    (result,) = asyncio.run(push(engine, select_syncs(load_mappings(settings), None)))
    return result


def audience_emails(sandbox: DestinationSandbox) -> set[str]:
    return sandbox.vendor("meta", MetaSandbox).audiences[AUDIENCE].values("EMAIL")


def hashed(ids: set[int]) -> set[str]:
    return {sha(email(cid)) for cid in ids}


def test_mirror_follows_the_segment_across_three_changes_and_reports_the_match(
    engine: Engine, sandbox: DestinationSandbox, tmp_path: Path
) -> None:
    settings = settings_for(sandbox, tmp_path, batch=7)
    add_people(engine, range(1, 21))
    first = run_push(settings, engine)
    assert first.status == "success", first.error
    assert audience_emails(sandbox) == hashed(members(engine))
    assert first.counts.added == 20 and first.counts.requests == 3  # batches of 7
    assert first.warnings == [
        "meta-vip: the audience would hold 20 people, below meta's minimum of about 100 "
        "matched people before it serves ads"
    ]
    assert first.counts.match is not None
    assert first.counts.match.as_json() == {
        "received": 20,
        "invalid": 0,
        "carrying": {"email": 20, "phone": 10, "name_postcode": 20},
    }
    # Three changes of the segment, each with entries and exits.
    for leaving, entering in (([1, 2, 3], [21, 22]), ([21, 4], [1, 23]), ([5, 6, 7, 8], [2])):
        leave(engine, leaving)
        new = [cid for cid in entering if cid > 20]
        if new:
            add_people(engine, new)
        old = [cid for cid in entering if cid <= 20]
        if old:
            enter(engine, old)
        result = run_push(settings, engine)
        assert result.status == "success", result.error
        assert result.counts.removed == len(leaving)
        assert audience_emails(sandbox) == hashed(members(engine))
    # The match report reaches sync_runs and syncd status (--json and text use it).
    with engine.connect() as conn:
        counts = conn.execute(
            select(SYNC_RUNS.c.counts)
            .where(SYNC_RUNS.c.name == "meta-vip")
            .order_by(SYNC_RUNS.c.id.desc())
        ).first()
    assert counts is not None and counts[0]["match"]["received"] == 1
    status = collect_status(engine, settings)
    assert status["destinations"]["meta-vip"]["last_run"]["counts"]["match"] == {
        "received": 1,
        "invalid": 0,
        "carrying": {"email": 1, "name_postcode": 1},
    }
    meta = sandbox.vendor("meta", MetaSandbox)
    assert meta.plaintext == []
    for request in meta.requests:
        assert request.consent == "ads"
        assert not re.search(r"@|\+49|Müller|fan\d", orjson.dumps(request.body).decode())


def test_error_17_at_intervals_delivers_every_row_once_and_logs_the_back_off(
    engine: Engine, sandbox: DestinationSandbox, tmp_path: Path
) -> None:
    meta = sandbox.vendor("meta", MetaSandbox)
    meta.throttle_every = 3  # every third request: "User request limit reached"
    settings = settings_for(sandbox, tmp_path, batch=5)
    add_people(engine, range(1, 31))
    with structlog.testing.capture_logs() as logs:
        result = run_push(settings, engine)
    assert result.status == "success", result.error
    assert audience_emails(sandbox) == hashed(set(range(1, 31)))
    accepted = [r for r in meta.requests if r.status == 200]
    throttled = [r for r in meta.requests if r.fault == "throttled"]
    assert len(accepted) == 6 and len(throttled) >= 2
    # Every row reached the audience exactly once: six accepted requests of five rows.
    assert sorted(len(r.body["payload"]["data"]) for r in accepted) == [5] * 6
    assert meta.audiences[AUDIENCE].received == 30
    retries = [e for e in logs if e["event"] == "http.retry"]
    assert len(retries) == len(throttled) and all(e["wait"] >= 0 for e in retries)
    assert result.counts.match is not None and result.counts.match.received == 30


# --- replace: usersreplace sessions ------------------------------------------------------------


def replace_target() -> SyncTarget:
    return SyncTarget(
        name="ca", mode="replace", object=AUDIENCE, options=MetaOptions(), consent="ads"
    )


@respx.mock
def test_replace_batches_carry_one_session_numbered_from_1_with_the_last_flagged() -> None:
    route = respx.post(f"{GRAPH}/v25.0/{AUDIENCE}/usersreplace").mock(
        side_effect=[answer(2), meta_error(2650, 1870145), answer(1)]
    )
    dest = make()
    dest.begin_replace(replace_target(), 3, None)
    first = [Item("1", {"EMAIL": "mary@example.com"}), Item("2", {"EMAIL": "b@example.com"})]
    assert all(o.ok for o in run(dest.send(replace_target(), "replace", first)))
    # Replace in progress elsewhere (subcode 1870145) passes: retried like throttling.
    run(dest.send(replace_target(), "replace", [Item("3", {"EMAIL": "c@example.com"})]))
    sessions = [orjson.loads(c.request.content)["session"] for c in route.calls]
    sid = sessions[0]["session_id"]
    assert 0 < sid < 2**63
    assert sessions == [
        {"session_id": sid, "batch_seq": 1, "last_batch_flag": False, "estimated_num_total": 3},
        {"session_id": sid, "batch_seq": 2, "last_batch_flag": True, "estimated_num_total": 3},
        {"session_id": sid, "batch_seq": 2, "last_batch_flag": True, "estimated_num_total": 3},
    ]
    assert orjson.loads(route.calls[0].request.content)["payload"]["data"][0] == [MARY]
    state = dest.replace_state()
    assert state["session_id"] == sid and state["next_seq"] == 3 and state["rows"] == 3
    # A session left open is resumed after its last acknowledged batch.
    other = make()
    other.begin_replace(replace_target(), 5, state)
    assert other.replace_state() == state
    run(dest.aclose())
    run(other.aclose())


@respx.mock
def test_a_session_meta_no_longer_takes_restarts_the_replace() -> None:
    from syncd.destinations.base import ReplaceRestart

    respx.post(f"{GRAPH}/v25.0/{AUDIENCE}/usersreplace").mock(
        return_value=meta_error(2650, 1870158)
    )
    dest = make()
    dest.begin_replace(replace_target(), 1, None)
    with pytest.raises(ReplaceRestart):
        run(dest.send(replace_target(), "replace", [Item("1", {"EMAIL": "a@example.com"})]))
    run(dest.aclose())


def replace_settings(sandbox: DestinationSandbox, tmp_path: Path, batch: int = 5) -> Settings:
    settings = settings_for(sandbox, tmp_path, batch=batch)
    path = tmp_path / "meta.toml"
    path.write_text(path.read_text().replace('mode = "mirror"', 'mode = "replace"'))
    return settings


def open_sessions(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(select(SYNC_STATE.c.state).where(SYNC_STATE.c.stream == "replace"))
        )


def test_replace_across_three_changes_equals_the_segment(
    engine: Engine, sandbox: DestinationSandbox, tmp_path: Path
) -> None:
    settings = replace_settings(sandbox, tmp_path)
    meta = sandbox.vendor("meta", MetaSandbox)
    add_people(engine, range(1, 13))
    first = run_push(settings, engine)
    assert first.status == "success", first.error
    assert audience_emails(sandbox) == hashed(set(range(1, 13)))
    assert first.counts.added == 12 and first.counts.requests == 3
    for leaving, entering in (([1, 2], [13]), ([13, 3], [1, 14, 15]), (list(range(4, 12)), [])):
        leave(engine, leaving)
        new = [cid for cid in entering if cid > 12]
        if new:
            add_people(engine, new)
        if old := [cid for cid in entering if cid <= 12]:
            enter(engine, old)
        result = run_push(settings, engine)
        assert result.status == "success", result.error
        assert result.counts.removed == len(leaving)
        assert audience_emails(sandbox) == hashed(members(engine))
    sessions = meta.audiences[AUDIENCE].sessions
    assert len(sessions) == 4 and all(s.done for s in sessions.values())
    assert [sorted(s.batches) for s in sessions.values()] == [[1, 2, 3], [1, 2, 3], [1, 2, 3], [1]]
    assert open_sessions(engine) == []
    assert meta.plaintext == []


def test_a_timed_out_session_is_started_again(
    engine: Engine, sandbox: DestinationSandbox, tmp_path: Path
) -> None:
    settings = replace_settings(sandbox, tmp_path)
    meta = sandbox.vendor("meta", MetaSandbox)
    add_people(engine, range(1, 9))
    with engine.begin() as conn:  # a run cut off mid-session left its session open...
        conn.execute(
            insert(SYNC_STATE).values(
                source="push:meta-vip",
                stream="replace",
                state={"session_id": 77, "next_seq": 2, "started": time.time(), "rows": 5},
            )
        )
    # ...two hours ago: Meta answers 1870158 and syncd starts a new session.
    old = meta.audiences[AUDIENCE].sessions[77] = ReplaceSession(77, time.time() - 2 * 3600)
    with structlog.testing.capture_logs() as logs:
        result = run_push(settings, engine)
    assert result.status == "success", result.error
    assert [e["event"] for e in logs].count("push.replace_restarted") == 1
    assert audience_emails(sandbox) == hashed(set(range(1, 9)))
    assert not old.done and open_sessions(engine) == []


def test_replace_killed_mid_session_then_run_again_ends_with_the_segment(
    store_url: str, sandbox: DestinationSandbox, tmp_path: Path
) -> None:
    engine = open_store(store_url)
    meta = sandbox.vendor("meta", MetaSandbox)
    settings = replace_settings(sandbox, tmp_path)
    add_people(engine, range(1, 21))
    assert run_push(settings, engine).status == "success"
    leave(engine, [20])
    config = tmp_path / "config.toml"
    config.write_text(
        f'[store]\nurl = "{store_url}"\n[segments.vip]\nrule = "orders_count >= 1"\n'
        '[destinations]\nmappings = ["meta.toml"]\n'
    )
    meta.stall_at_seq = 3  # batches 1 and 2 of four go in, the third hangs: kill
    proc = subprocess.Popen(
        [sys.executable, "-m", "syncd", "--config", str(config), "push"],
        env=base_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert meta.stalled.wait(timeout=60), "the killed run never reached its third batch"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        meta.release.set()
    (left,) = [s for s in meta.audiences[AUDIENCE].sessions.values() if not s.done]
    assert left.batches == {1, 2}
    (state,) = open_sessions(engine)
    assert state[0]["session_id"] == left.id and state[0]["next_seq"] == 3
    # Between the kill and the rerun, someone the cut-off session sent leaves.
    leave(engine, [1])
    meta.stall_at_seq = None
    result = run_push(settings, engine)
    assert result.status == "success", result.error
    assert left.done and left.batches == {1, 2, 3, 4, 5, 6}  # resumed, not a second session
    assert audience_emails(sandbox) == hashed(members(engine)) == hashed(set(range(2, 20)))
    assert open_sessions(engine) == []
    engine.dispose()


# --- the shipped mapping, validate, create-audience ---------------------------------------------


def test_the_shipped_meta_mapping_loads_with_a_mirror_and_a_replace() -> None:
    from syncd.mapping import load_mapping
    from tests.test_mapping import EXAMPLE_SEGMENTS

    path = Path(__file__).parent.parent / "mappings" / "meta.toml"
    mapping = load_mapping(
        path,
        Settings.model_validate({"segments": EXAMPLE_SEGMENTS}),
        {"META_ACCESS_TOKEN": "EAAB-example"},
    )
    assert mapping.spec.destination == "meta"
    assert [s.spec.mode for s in mapping.syncs] == ["mirror", "replace"]
    assert all(s.consent == "ads" for s in mapping.syncs)
    assert all(ref.startswith("env:") for ref in mapping.spec.credentials.values())


def test_validate_says_a_sync_without_audience_id_needs_one_and_how(
    sandbox: DestinationSandbox, tmp_path: Path
) -> None:
    from tests.test_cli import syncd

    settings_for(sandbox, tmp_path)
    path = tmp_path / "meta.toml"
    path.write_text(path.read_text().replace(f'object = "{AUDIENCE}"\n', ""))
    config = tmp_path / "config.toml"
    config.write_text(
        f'[store]\nurl = "sqlite:///{tmp_path}/s.db"\n[segments.vip]\n'
        'rule = "orders_count >= 1"\n[destinations]\nmappings = ["meta.toml"]\n'
    )
    result = syncd("--config", str(config), "validate", env=base_env(), cwd=tmp_path)
    assert result.returncode == 2
    assert (
        "sync[meta-vip].object: required by meta in mirror mode (the custom audience id; "
        "`syncd meta create-audience NAME` makes one and prints it)" in result.output
    )


def test_create_audience_makes_a_customer_list_audience_and_prints_its_id(
    sandbox: DestinationSandbox, tmp_path: Path
) -> None:
    from tests.test_cli import syncd

    settings_for(sandbox, tmp_path)
    path = tmp_path / "meta.toml"
    path.write_text(
        path.read_text().replace("[limits]", '[options]\nad_account_id = "act_42"\n[limits]')
    )
    config = tmp_path / "config.toml"
    config.write_text(
        f'[store]\nurl = "sqlite:///{tmp_path}/s.db"\n[segments.vip]\n'
        'rule = "orders_count >= 1"\n[destinations]\nmappings = ["meta.toml"]\n'
    )
    result = syncd(
        "--config", str(config), "meta", "create-audience", "Lapsed VIPs", env=base_env()
    )
    assert result.returncode == 0, result.output
    meta = sandbox.vendor("meta", MetaSandbox)
    (audience,) = result.stdout.split()
    assert meta.created == [("42", "Lapsed VIPs")]
    assert meta.audiences[audience].name == "Lapsed VIPs"
    (request,) = [r for r in meta.requests if r.path.endswith("/customaudiences")]
    assert request.path == "/v25.0/act_42/customaudiences"
    assert request.body == {
        "name": "Lapsed VIPs",
        "subtype": "CUSTOM",
        "description": "Created by syncd: Lapsed VIPs",
        "customer_file_source": "USER_PROVIDED_ONLY",
    }


# --- policy pre-flight (issue 22 item 4) ---------------------------------------------------


def test_preflight_warns_below_the_minimum_before_sending_in_dry_run_and_run(
    engine: Engine, sandbox: DestinationSandbox, tmp_path: Path
) -> None:
    settings = settings_for(sandbox, tmp_path)
    meta = sandbox.vendor("meta", MetaSandbox)
    add_people(engine, range(1, 102))
    mappings = load_mappings(settings)
    (dry,) = asyncio.run(push(engine, select_syncs(mappings, None), dry_run=True))
    assert dry.status == "dry-run" and dry.warnings == [] and meta.requests == []
    assert run_push(settings, engine).warnings == []
    leave(engine, [1, 2, 3])
    expected = (
        "meta-vip: the audience would hold 98 people, below meta's minimum of about 100 "
        "matched people before it serves ads (removing 3 would shrink it from 101)"
    )
    (dry,) = asyncio.run(push(engine, select_syncs(mappings, None), dry_run=True))
    assert dry.warnings == [expected] and dry.planned == {"remove": 3}
    sent_before = len(meta.requests)
    with structlog.testing.capture_logs() as logs:
        result = run_push(settings, engine)
    assert result.warnings == [expected] and result.as_json()["warnings"] == [expected]
    # Said before anything was sent: the warning is the run's first log line.
    assert logs[0]["event"] == "push.preflight" and logs[0]["warning"] == expected
    assert len(meta.requests) == sent_before + 1


def test_validate_reports_an_audience_below_the_minimum(
    sandbox: DestinationSandbox, tmp_path: Path
) -> None:
    from tests.test_cli import syncd

    url = f"sqlite:///{tmp_path}/s.db"
    store = open_store(url)
    add_people(store, range(1, 6))
    store.dispose()
    settings_for(sandbox, tmp_path)
    config = tmp_path / "config.toml"
    config.write_text(
        f'[store]\nurl = "{url}"\n[segments.vip]\n'
        'rule = "orders_count >= 1"\n[destinations]\nmappings = ["meta.toml"]\n'
    )
    result = syncd("--config", str(config), "validate", env=base_env(), cwd=tmp_path)
    assert result.returncode == 0, result.output
    assert (
        "warning: meta-vip: the audience would hold 5 people, below meta's minimum of "
        "about 100 matched people before it serves ads"
    ) in result.stdout_lines()


# --- normalizers: idempotent, never plaintext (hypothesis) -----------------------------------

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TEXT_KINDS = ("first_name", "last_name", "city", "region", "postcode", "country")


@given(
    kind=st.sampled_from(_TEXT_KINDS),
    value=st.text(max_size=30),
    country=st.sampled_from([None, "US", "GB", "DE", "FR"]),
)
@examples(max_examples=300, deadline=None)
def test_meta_normalizers_are_idempotent_and_hash_what_they_normalize(
    kind: Any, value: str, country: str | None
) -> None:
    once = META.normalize(kind, value, country=country)
    if once is None:
        return
    assert META.normalize(kind, once, country=country) == once
    assert _HEX64.match(META.prepare(kind, value, country=country) or "")


@given(email_address=st.emails(), pad=st.sampled_from(["", " ", "\t"]), upper=st.booleans())
@examples(max_examples=200, deadline=None)
def test_meta_email_is_idempotent_and_never_sent_plain(
    email_address: str, pad: str, upper: bool
) -> None:
    value = pad + (email_address.upper() if upper else email_address) + pad
    once = META.normalize("email", value)
    if once is None:
        return
    assert META.normalize("email", once) == once
    sent = META.prepare("email", value)
    assert sent is not None and _HEX64.match(sent) and "@" not in sent


@given(national=st.integers(min_value=2_000_000, max_value=9_999_999))
@examples(max_examples=200, deadline=None)
def test_meta_phone_digits_are_stable_and_never_sent_plain(national: int) -> None:
    value = f"030 {national}"  # a Berlin number in national format
    digits = META.normalize("phone", value, country="DE")
    assert digits == f"4930{national}"
    assert META.normalize("phone", "+" + digits) == digits  # its E.164 form reads the same
    sent = META.prepare("phone", value, country="DE")
    assert sent == sha(digits) and digits not in (sent or "")


def test_the_match_line_says_received_invalid_and_shares() -> None:
    from syncd.cli import match_line

    line = match_line(
        {"received": 200, "invalid": 3, "carrying": {"email": 200, "phone": 50, "name_postcode": 1}}
    )
    assert line == (
        "match: 200 rows received, 3 invalid; carrying email 100%, name + postcode 0%, phone 25%"
    )
    assert match_line({"received": 0, "invalid": 0, "carrying": {}}) == (
        "match: 0 rows received, 0 invalid"
    )
