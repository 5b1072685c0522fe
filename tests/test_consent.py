"""Consent per channel, end to end on both stores: statements read from WooCommerce payloads
when they are stored (polls and webhook deliveries), the latest one per person on the
profile, and Klaviyo and Mailchimp syncs that send only the consenting, subscribe them,
and unsubscribe (and remove) whoever withdraws on the next run.

The store is built from wc/v3 payloads through the real ingest (as in test_profiles),
then ``recompute`` and pushes against the destination sandbox.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, delete, select, update

from syncd.config import ConsentSettings, Settings
from syncd.ingest import SourceSync
from syncd.mapping import load_mappings
from syncd.push import PushResult, push, select_syncs
from syncd.sandbox.destinations import DestinationSandbox
from syncd.segments.recompute import recompute
from syncd.sources.base import Statement
from syncd.sources.woocommerce.consent import consent_statements, meta_answer
from syncd.store.models import CONSENT_EXTRACTED, CONSENT_STATEMENTS, CUSTOMERS, PROFILES
from tests.consent_audit import ConsentLedger
from tests.test_cli import base_env, syncd
from tests.test_profiles import (
    SOURCE,
    Line,
    Payload,
    Person,
    Shop,
    ShopClient,
    customer_payload,
    order_payload,
    product_payload,
)

A = datetime(2026, 6, 30, 12, 0, tzinfo=UTC)
MUG = 103  # test_profiles' Mug, 12.00
OPT_IN = "_wc_newsletter_optin"  # the checkout plugin's order meta key
ACCOUNT_OPT_IN = "marketing_opt_in"  # the account's user meta key
CONSENT = ConsentSettings.model_validate(
    {"email": {"customer_meta_keys": [ACCOUNT_OPT_IN], "order_meta_keys": [OPT_IN]}}
)

TICKED = Person(0, "ticked.guest@example.com", "Tia", "Tick", "DE")  # ticked the box
UNTICKED = Person(0, "unticked.guest@example.com", "Uma", "Un", "DE")  # left it empty
SILENT = Person(0, "silent.guest@example.com", "Sid", "Silent", "DE")  # no consent meta
WITHDRAWS = Person(0, "withdraws.guest@example.com", "Wes", "With", "AT")  # yes, later no
DAVE = Person(14, "dave@example.com", "Dave", "Dunn", "GB")  # account no, later order yes
ERIN = Person(15, "erin@example.com", "Erin", "Evans", "US")  # order yes, later account no
CONSENTING = (TICKED, WITHDRAWS, DAVE)


def mug_order(oid: int, created: str, who: Person, opt_in: str | None) -> Payload:
    guest = {"guest_email": who.email} if not who.account else {}
    order = order_payload(
        oid, "completed", created, who, "EUR", "12.00", [Line(MUG, 1, "12.00")], **guest
    )
    if opt_in is not None:
        order["meta_data"] = [*order["meta_data"], {"id": 90, "key": OPT_IN, "value": opt_in}]
    return order


def account(p: Person, modified: str, opt_in: str) -> Payload:
    payload = customer_payload(p)
    payload["date_modified_gmt"] = modified
    payload["meta_data"] = [{"id": 7, "key": ACCOUNT_OPT_IN, "value": opt_in}]
    return payload


def build() -> Shop:
    return Shop(
        customers=[
            account(DAVE, "2026-05-01T09:00:00", "no"),
            account(ERIN, "2026-06-12T09:00:00", "no"),
        ],
        orders=[
            mug_order(4001, "2026-06-01T10:00", TICKED, "1"),
            mug_order(4002, "2026-06-01T11:00", UNTICKED, ""),
            mug_order(4003, "2026-06-01T12:00", SILENT, None),
            mug_order(4004, "2026-06-02T10:00", WITHDRAWS, "yes"),
            mug_order(4005, "2026-06-05T10:00", DAVE, "on"),
            mug_order(4006, "2026-06-01T10:00", ERIN, "1"),
        ],
        products=[product_payload(MUG)],
    )


def sync(engine: Engine, shop: Shop) -> None:
    async def go() -> Any:
        runner = SourceSync(engine, "wc", SOURCE, client=ShopClient(shop), consent=CONSENT)
        try:
            return await runner.run()
        finally:
            await runner.client.aclose()

    result = asyncio.run(go())
    assert result.status == "success", result.error


LIST = "aud1"


@pytest.fixture
def sandbox() -> Iterator[DestinationSandbox]:
    with DestinationSandbox() as box:
        box.mailchimp.add_list(LIST)
        yield box


def mappings(sandbox: DestinationSandbox, tmp_path: Path, klaviyo_list: str) -> list[str]:
    klaviyo = tmp_path / "klaviyo.toml"
    klaviyo.write_text(
        f"""
destination = "klaviyo"
base_url = "{sandbox.klaviyo_url}"
allow_loopback = true
[credentials]
api_key = "{sandbox.klaviyo.api_key}"

[[sync]]
name = "kl-buyers"
segment = "buyers"
mode = "mirror"
object = "{klaviyo_list}"
[sync.fields]
email = "email"
first_name = "first_name"

[[sync]]
name = "kl-profiles"
segment = "buyers"
mode = "upsert"
[sync.fields]
email = "email"
"properties.orders" = "orders_count"
"""
    )
    mailchimp = tmp_path / "mailchimp.toml"
    mailchimp.write_text(
        f"""
destination = "mailchimp"
base_url = "{sandbox.mailchimp_url}"
allow_loopback = true
[credentials]
api_key = "{sandbox.mailchimp.api_key}"

[[sync]]
name = "mc-buyers"
segment = "buyers"
mode = "mirror"
object = "{LIST}"
[sync.fields]
email_address = "email"
"merge_fields.FNAME" = "first_name"
[sync.options]
tag = "buyers"

[[sync]]
name = "mc-profiles"
segment = "buyers"
mode = "upsert"
object = "{LIST}"
[sync.fields]
email_address = "email"
"merge_fields.LNAME" = "last_name"
"""
    )
    return [str(klaviyo), str(mailchimp)]


def settings(paths: list[str]) -> Settings:
    return Settings.model_validate(
        {
            "sources": {"wc": SOURCE},
            "segments": {"buyers": {"rule": "orders_count >= 1"}},
            "destinations": {"mappings": paths},
            "consent": CONSENT.model_dump(),
        }
    )


def synced_shop(
    engine: Engine, sandbox: DestinationSandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Shop, str, Settings]:
    """The shop synced into ``engine``, a Klaviyo list, and the settings of both ESPs'
    syncs (with what the shop says of consent told to the session's audit)."""
    ConsentLedger.grant("email", *(p.email for p in CONSENTING))
    ConsentLedger.withdraw("email", UNTICKED.email, ERIN.email)
    shop = build()
    sync(engine, shop)
    klaviyo_list = sandbox.klaviyo.add_list(name="Buyers")
    config = settings(mappings(sandbox, tmp_path, klaviyo_list))
    for mapping in load_mappings(config):
        monkeypatch.setattr(mapping.adapter, "poll_interval", 0.01)
    return shop, klaviyo_list, config


def run_push(config: Settings, engine: Engine) -> dict[str, PushResult]:
    results = asyncio.run(push(engine, select_syncs(load_mappings(config), None)))
    return {r.sync: r for r in results}


def consent_of(engine: Engine) -> dict[str, tuple[bool, datetime | None, str | None]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                PROFILES.c.email,
                PROFILES.c.consent_email,
                PROFILES.c.consent_email_at,
                PROFILES.c.consent_email_source,
            )
        ).all()
    return {email: (given, at, source) for email, given, at, source in rows}


def sent_text(sandbox: DestinationSandbox) -> str:
    """Every body the ESP sandboxes received, except unsubscribes, as one searchable text."""
    return "\n".join(
        json.dumps(r.body)
        for vendor in (sandbox.klaviyo, sandbox.mailchimp)
        for r in vendor.requests
        if r.body and "subscription-bulk-delete" not in r.path and "unsubscribed" not in str(r.body)
    )


def test_latest_statement_wins_across_customer_and_order_meta_with_time_and_source(
    engine: Engine,
) -> None:
    sync(engine, build())
    recompute(engine, settings([]), now=A)
    got = consent_of(engine)
    assert got[TICKED.email] == (
        True,
        datetime(2026, 6, 1, 10, tzinfo=UTC),
        "wc:order:4001:" + OPT_IN,
    )
    # An empty checkbox value is a no, stated at the checkout.
    assert got[UNTICKED.email] == (
        False,
        datetime(2026, 6, 1, 11, tzinfo=UTC),
        "wc:order:4002:" + OPT_IN,
    )
    assert got[SILENT.email] == (False, None, None)  # never stated: no consent
    # The account said no on 1 May; the order of 5 June says yes: the order wins.
    assert got[DAVE.email] == (
        True,
        datetime(2026, 6, 5, 10, tzinfo=UTC),
        "wc:order:4005:" + OPT_IN,
    )
    # The order of 1 June said yes; the account, changed on 12 June, says no: it wins.
    assert got[ERIN.email] == (
        False,
        datetime(2026, 6, 12, 9, tzinfo=UTC),
        "wc:customer:15:" + ACCOUNT_OPT_IN,
    )
    # Every statement is kept, the losing ones too.
    with engine.connect() as conn:
        kept = set(conn.execute(select(CONSENT_STATEMENTS.c.source, CONSENT_STATEMENTS.c.granted)))
    assert kept == {
        ("wc:order:4001:" + OPT_IN, True),
        ("wc:order:4002:" + OPT_IN, False),
        ("wc:order:4004:" + OPT_IN, True),
        ("wc:order:4005:" + OPT_IN, True),
        ("wc:order:4006:" + OPT_IN, True),
        ("wc:customer:14:" + ACCOUNT_OPT_IN, False),
        ("wc:customer:15:" + ACCOUNT_OPT_IN, False),
    }
    # A backtest as of before Dave's order sees his account's no.
    recompute(engine, settings([]), now=datetime(2026, 6, 4, tzinfo=UTC))
    assert consent_of(engine)[DAVE.email][:2] == (False, datetime(2026, 5, 1, 9, tzinfo=UTC))


def test_only_consenting_people_reach_the_esps_and_a_withdrawal_unsubscribes_next_run(
    engine: Engine, sandbox: DestinationSandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shop, klaviyo_list, config = synced_shop(engine, sandbox, tmp_path, monkeypatch)
    recompute(engine, config, now=A)

    first = run_push(config, engine)
    assert {name: r.status for name, r in first.items()} == dict.fromkeys(first, "success")
    consenting = {p.email for p in CONSENTING}
    assert sandbox.klaviyo.members_of(klaviyo_list) == consenting
    assert {p.email: sandbox.klaviyo.consent_of(p.email) for p in CONSENTING} == dict.fromkeys(
        consenting, "SUBSCRIBED"
    )
    assert sandbox.mailchimp.segment_members(LIST, "buyers") == consenting
    assert {p.email: sandbox.mailchimp.member(LIST, p.email)["status"] for p in CONSENTING} == (
        dict.fromkeys(consenting, "subscribed")
    )
    # The guests who did not tick the box, and Erin who withdrew before the first run,
    # are in no request at all.
    bodies = sent_text(sandbox)
    assert json.dumps(TICKED.email) in bodies  # the search finds an address that was sent
    for person in (UNTICKED, SILENT, ERIN):
        assert json.dumps(person.email) not in bodies, person
        assert sandbox.klaviyo.profile_by_email(person.email) is None
        assert sandbox.mailchimp.member(LIST, person.email) is None
    subscribed_once = len(sandbox.klaviyo.subscription_jobs)

    # The guest orders again and leaves the box empty this time: a withdrawal.
    ConsentLedger.withdraw("email", WITHDRAWS.email)
    shop.orders.append(mug_order(4010, "2026-06-20T10:00", WITHDRAWS, "0"))
    sync(engine, shop)
    recompute(engine, config, now=A)
    assert consent_of(engine)[WITHDRAWS.email] == (
        False,
        datetime(2026, 6, 20, 10, tzinfo=UTC),
        "wc:order:4010:" + OPT_IN,
    )
    second = run_push(config, engine)
    assert second["kl-buyers"].counts.removed == 1
    assert second["kl-profiles"].counts.removed == 1  # unsubscribed
    assert second["mc-buyers"].counts.removed == 1
    assert second["mc-profiles"].counts.removed == 1  # unsubscribed
    assert sandbox.klaviyo.members_of(klaviyo_list) == {TICKED.email, DAVE.email}
    assert sandbox.klaviyo.consent_of(WITHDRAWS.email) == "UNSUBSCRIBED"
    assert sandbox.mailchimp.segment_members(LIST, "buyers") == {TICKED.email, DAVE.email}
    assert sandbox.mailchimp.member(LIST, WITHDRAWS.email)["status"] == "unsubscribed"
    jobs = sandbox.klaviyo.subscription_jobs[subscribed_once:]
    # The mirror unsubscribes from its list (which also takes them off it); the upsert
    # unsubscribes from the channel. Nobody is subscribed again.
    # (The syncs run in file order: the mirror first.)
    assert [(j["kind"], j["list"], j["profiles"]) for j in jobs] == [
        ("unsubscribe", klaviyo_list, [WITHDRAWS.email]),
        ("unsubscribe", None, [WITHDRAWS.email]),
    ]
    # Nothing left to do: a third run changes nothing (Mailchimp's mirror still looks up
    # its tag's id once a run).
    third = run_push(config, engine)
    assert {
        n: (c.added, c.updated, c.removed, c.failed, c.unchanged)
        for n, c in ((n, r.counts) for n, r in third.items())
    } == dict.fromkeys(third, (0, 0, 0, 0, 2))
    unsubscribes = [
        r.body["members"]
        for r in sandbox.mailchimp.requests
        if r.body and "unsubscribed" in json.dumps(r.body)
    ]
    # The mirror's removal and the upsert's unsubscribe: one member each, by address.
    assert unsubscribes == [[{"email_address": WITHDRAWS.email, "status": "unsubscribed"}]] * 2


def test_a_rule_or_a_column_is_a_channels_consent(engine: Engine) -> None:
    sync(engine, build())
    consent = ConsentSettings.model_validate(
        {
            **CONSENT.model_dump(),
            "sms": {"rule": "country = 'DE'"},
            "ads": {"column": "has_open_cart"},
        }
    )
    result = recompute(engine, settings([]).model_copy(update={"consent": consent}), now=A)
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                PROFILES.c.email,
                PROFILES.c.consent_sms,
                PROFILES.c.consent_sms_at,
                PROFILES.c.consent_sms_source,
                PROFILES.c.consent_ads,
                PROFILES.c.consent_ads_source,
            )
        ).all()
    german = {p.email for p in (TICKED, UNTICKED, SILENT)}  # the DE billing countries
    # The rule over the profile, stated at the recompute's as-of; nobody has an open cart.
    assert {tuple(r) for r in rows} == {
        (
            r.email,
            r.email in german,
            result.as_of,
            "rule country = 'DE'",
            False,
            "column has_open_cart",
        )
        for r in rows
    }
    assert len(rows) == 6


def test_a_sql_model_with_a_channel_keeps_to_consenting_people_and_needs_customer_id(
    engine: Engine, sandbox: DestinationSandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ConsentLedger.grant("email", *(p.email for p in CONSENTING))
    sync(engine, build())
    path = tmp_path / "mailchimp.toml"
    path.write_text(
        f"""
destination = "mailchimp"
base_url = "{sandbox.mailchimp_url}"
allow_loopback = true
[credentials]
api_key = "{sandbox.mailchimp.api_key}"

[[sync]]
name = "mc-model"
sql = "SELECT customer_id, email FROM customer_profiles"
mode = "upsert"
object = "{LIST}"
[sync.fields]
email_address = "email"

[[sync]]
name = "mc-model-no-person"
sql = "SELECT email AS address FROM customer_profiles"
key = "address"
mode = "upsert"
object = "{LIST}"
[sync.fields]
email_address = "address"
"""
    )
    config = settings([str(path)])
    recompute(engine, config, now=A)
    results = run_push(config, engine)
    assert results["mc-model"].counts.added == len(CONSENTING)
    everyone = (TICKED, UNTICKED, SILENT, WITHDRAWS, DAVE, ERIN)
    held = {p.email for p in everyone if sandbox.mailchimp.member(LIST, p.email) is not None}
    assert held == {p.email for p in CONSENTING}
    assert results["mc-model-no-person"].status == "failed"
    assert "needs a customer_id column" in (results["mc-model-no-person"].error or "")


def test_a_webhook_delivery_states_consent_through_the_same_parse_path(engine: Engine) -> None:
    shop = Shop(products=[product_payload(MUG)])
    sync(engine, shop)

    async def deliver() -> Any:
        runner = SourceSync(engine, "wc", SOURCE, client=ShopClient(shop), consent=CONSENT)
        try:
            return await runner.apply_payloads(
                "orders", [mug_order(4020, "2026-06-03T08:00", TICKED, "yes")]
            )
        finally:
            await runner.client.aclose()

    asyncio.run(deliver())
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                CUSTOMERS.c.email,
                CONSENT_STATEMENTS.c.channel,
                CONSENT_STATEMENTS.c.granted,
                CONSENT_STATEMENTS.c.stated_at,
                CONSENT_STATEMENTS.c.source,
            ).join(CUSTOMERS, CUSTOMERS.c.id == CONSENT_STATEMENTS.c.customer_id)
        ).all()
    assert [tuple(r) for r in rows] == [
        (
            TICKED.email,
            "email",
            True,
            datetime(2026, 6, 3, 8, tzinfo=UTC),
            "wc:order:4020:" + OPT_IN,
        )
    ]


def test_stored_payloads_are_read_again_when_the_consent_keys_change(engine: Engine) -> None:
    """An upgraded store (or a new key) needs no re-read of the shop: the next sync reads
    the statements from the raw payloads it holds, once per configuration."""

    async def run(consent: ConsentSettings, shop: Shop) -> None:
        runner = SourceSync(engine, "wc", SOURCE, client=ShopClient(shop), consent=consent)
        try:
            await runner.run()
        finally:
            await runner.client.aclose()

    shop = build()
    asyncio.run(run(ConsentSettings(email={}), shop))  # type: ignore[arg-type]
    with engine.connect() as conn:
        assert conn.execute(select(CONSENT_STATEMENTS)).first() is None
    # The shop serves nothing now: the statements can only come from the stored payloads.
    asyncio.run(run(CONSENT, Shop()))
    with engine.connect() as conn:
        assert len(conn.execute(select(CONSENT_STATEMENTS)).all()) == 7


def test_migration_0009_gives_existing_profiles_no_consent(store_url: str) -> None:
    from sqlalchemy import text

    from syncd.store.engine import make_engine
    from syncd.store.migrate import upgrade

    engine = make_engine(store_url)
    try:
        upgrade(engine, "0007")
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO customer_profiles (customer_id, orders_count, "
                    "gross_revenue_minor, refunded_minor, net_revenue_minor, distinct_products, "
                    "lifecycle_stage, has_open_cart) VALUES (1, 0, 0, 0, 0, 0, 'prospect', false)"
                )
            )
        upgrade(engine)
        got = consent_of(engine)
        assert got == {None: (False, None, None)}
        with engine.connect() as conn:
            assert conn.execute(select(CONSENT_STATEMENTS)).all() == []
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("value", "answer"),
    [
        ("1", True),
        (" Yes ", True),
        ("subscribed", True),
        (True, True),
        (1, True),
        ("0", False),
        ("", False),
        ("no", False),
        ("unsubscribed", False),
        (False, False),
        (0, False),
        ("maybe", None),
        (None, None),
        (2, None),
        ({"a": 1}, None),
    ],
)
def test_meta_values_that_mean_yes_and_no(value: object, answer: bool | None) -> None:
    assert meta_answer(value) is answer


def test_statements_of_one_payload_per_channel_and_key() -> None:
    consent = ConsentSettings.model_validate(
        {
            "email": {"order_meta_keys": [OPT_IN]},
            "sms": {"order_meta_keys": ["_sms_optin", OPT_IN]},
        }
    )
    order = mug_order(4030, "2026-06-07T10:00", TICKED, "1")
    order["meta_data"].append({"id": 91, "key": "_sms_optin", "value": "no"})
    order["meta_data"].append({"id": 92, "key": "unrelated", "value": "1"})
    when = datetime(2026, 6, 7, 10, tzinfo=UTC)
    assert sorted(consent_statements("orders", order, consent), key=repr) == sorted(
        [
            Statement("email", True, when, f"order:4030:{OPT_IN}"),
            Statement("sms", True, when, f"order:4030:{OPT_IN}"),
            Statement("sms", False, when, "order:4030:_sms_optin"),
        ],
        key=repr,
    )
    # A customer key on an order, or an order without a creation time, says nothing.
    assert consent_statements("orders", {**order, "date_created_gmt": None}, consent) == []
    assert consent_statements("products", order, consent) == []


# ---------------------------------------------------------------------------------------
# validate
# ---------------------------------------------------------------------------------------


def _validate(tmp_path: Path, sync_extra: str) -> Any:
    (tmp_path / "klaviyo.toml").write_text(
        f"""
destination = "klaviyo"
[credentials]
api_key = "pk_test"

[[sync]]
name = "klaviyo-champions"
segment = "champions"
mode = "upsert"
{sync_extra}
[sync.fields]
email = "email"
"""
    )
    (tmp_path / "config.toml").write_text(
        """
[store]
url = "sqlite:///store.db"

[sources.woocommerce]
url = "https://shop.example.com"
consumer_key = "env:WC_KEY"
consumer_secret = "env:WC_SECRET"

[consent.email]
customer_meta_keys = ["marketing_opt_in"]
order_meta_keys = ["_wc_newsletter_optin"]

[consent.sms]
rule = "country = 'US'"

[segments.champions]
rule = "rfm_segment = 'champions'"

[destinations]
mappings = ["klaviyo.toml"]
"""
    )
    return syncd("--config", str(tmp_path / "config.toml"), "validate", env=base_env())


def test_validate_shows_each_syncs_consent_rule(tmp_path: Path) -> None:
    run = _validate(tmp_path, "")
    assert run.returncode == 0, run.output
    assert run.stdout_lines()[1:] == [
        "klaviyo-champions: consent email "
        "(customer meta marketing_opt_in; order meta _wc_newsletter_optin)"
    ]
    run = _validate(tmp_path, 'consent = "sms"')
    assert run.stdout_lines()[1:] == ["klaviyo-champions: consent sms (rule country = 'US')"]
    run = _validate(tmp_path, 'consent = "none"\nconsent_reason = "order status mail"')
    assert run.stdout_lines()[1:] == ["klaviyo-champions: consent none (order status mail)"]


def test_consent_none_without_a_reason_exits_2(tmp_path: Path) -> None:
    run = _validate(tmp_path, 'consent = "none"')
    assert run.returncode == 2, run.output
    assert "sync[klaviyo-champions].consent_reason" in run.stderr
    assert 'consent = "none" sends people who gave no marketing consent' in run.stderr
    assert run.stdout == ""


def test_the_old_consent_meta_keys_of_a_mapping_are_read_into_the_email_channel(
    tmp_path: Path,
) -> None:
    from syncd.config import load_settings

    (tmp_path / "mailchimp.toml").write_text(
        """
destination = "mailchimp"
[[sync]]
name = "mc"
segment = "champions"
mode = "upsert"
consent_meta_keys = ["newsletter", "mailchimp_woocommerce_is_subscribed"]
"""
    )
    config = tmp_path / "config.toml"
    config.write_text('[destinations]\nmappings = ["mailchimp.toml"]\n')
    settings = load_settings(config, env={})
    assert settings.consent.email.customer_meta_keys == [
        "mailchimp_woocommerce_is_subscribed",
        "newsletter",
    ]
    assert settings.consent.email.order_meta_keys == []
    # A [consent] table is the whole answer: the mappings' old keys are not added.
    config.write_text(
        '[consent.email]\norder_meta_keys = ["_optin"]\n'
        '[destinations]\nmappings = ["mailchimp.toml"]\n'
    )
    settings = load_settings(config, env={})
    assert settings.consent.email.customer_meta_keys == []
    assert settings.consent.email.order_meta_keys == ["_optin"]


def test_a_consent_channel_is_one_kind_of_rule() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="not several"):
        ConsentSettings.model_validate({"email": {"order_meta_keys": ["a"], "rule": "x > 1"}})
    with pytest.raises(ValidationError, match="cannot read the consent columns"):
        ConsentSettings.model_validate({"sms": {"rule": "consent_email"}})
    with pytest.raises(ValidationError, match="unknown column"):
        ConsentSettings.model_validate({"sms": {"rule": "no_such_column = 1"}})
    with pytest.raises(ValidationError, match="expected a boolean customer_profiles column"):
        ConsentSettings.model_validate({"ads": {"column": "email"}})


def test_statements_follow_people_when_they_merge(engine: Engine) -> None:
    """A guest who later registers with the same address is one person: what either
    record said about consent is theirs (people.py links the account to the guest)."""
    shop = build()
    sync(engine, shop)
    # Tia ticked the box as a guest, then registers; her account says no, later.
    registered = Person(16, TICKED.email, "Tia", "Tick", "DE")
    shop.customers.append(account(registered, "2026-06-15T09:00:00", "0"))
    sync(engine, shop)
    recompute(engine, settings([]), now=A)
    with engine.connect() as conn:
        people = conn.execute(select(CUSTOMERS.c.id).where(CUSTOMERS.c.email == TICKED.email)).all()
        owners = set(
            conn.execute(
                select(CONSENT_STATEMENTS.c.customer_id).where(
                    CONSENT_STATEMENTS.c.source.in_(
                        ["wc:order:4001:" + OPT_IN, "wc:customer:16:" + ACCOUNT_OPT_IN]
                    )
                )
            ).scalars()
        )
    assert len(people) == 1 and owners == {people[0].id}
    assert consent_of(engine)[TICKED.email] == (
        False,
        datetime(2026, 6, 15, 9, tzinfo=UTC),
        "wc:customer:16:" + ACCOUNT_OPT_IN,
    )


def test_a_push_waits_until_a_store_from_before_consent_has_read_its_statements(
    engine: Engine, sandbox: DestinationSandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shop, _, config = synced_shop(engine, sandbox, tmp_path, monkeypatch)
    # A store upgraded to consent: rows, but no statements read and no profile consent.
    with engine.begin() as conn:
        conn.execute(delete(CONSENT_STATEMENTS))
        conn.execute(delete(CONSENT_EXTRACTED))
        conn.execute(update(PROFILES).values(consent_email=False, consent_email_at=None))

    refused = run_push(config, engine)
    assert {r.status for r in refused.values()} == {"failed"}
    assert "are not read yet" in (refused["kl-buyers"].error or "")
    assert "syncd sync`, then `syncd segments`" in (refused["kl-buyers"].error or "")
    assert sandbox.klaviyo.requests == [] and sandbox.mailchimp.requests == []

    sync(engine, shop)  # the first sync after the upgrade reads the stored statements
    refused = run_push(config, engine)
    assert "run `syncd segments` before pushing" in (refused["mc-buyers"].error or "")
    assert sandbox.mailchimp.requests == []

    recompute(engine, config)
    pushed = run_push(config, engine)
    assert {r.status for r in pushed.values()} == {"success"}
    assert sandbox.mailchimp.segment_members(LIST, "buyers") == {p.email for p in CONSENTING}
