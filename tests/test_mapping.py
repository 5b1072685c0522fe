"""Mapping files: field transforms and templates, and the errors a wrong file gets."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from syncd.config import ConfigError, Settings
from syncd.mapping import load_mapping, load_mappings, nest, parse_field

ROW: dict[str, Any] = {
    "email": "  Mary@Example.COM ",
    "first_name": "Mary",
    "last_name": None,
    "phone": "030 1234567",
    "country": "DE",
    "net_revenue_minor": 123456,
    "currency": "EUR",
    "last_order_at": datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC),
    "segments": ["champions", "vip"],
}


def value(spec: str, row: dict[str, Any] | None = None) -> Any:
    return parse_field("x", spec).value(ROW if row is None else row)


def test_transforms_give_the_exact_values() -> None:
    assert value("email | trim | lower") == "mary@example.com"
    # Meta's documented check value: sha256("mary@example.com").
    assert (
        value("email | trim | lower | sha256")
        == "f1904cf1a9d73a55fa5de0ac823c4403ded71afd4c3248d00bdcd0866552bb79"
    )
    assert value("email | trim | lower | md5") == hashlib.md5(b"mary@example.com").hexdigest()
    assert value("first_name | upper") == "MARY"
    # The row's country is the region hint: 030 is Berlin.
    assert value("phone | e164") == "+49301234567"
    assert value("phone | e164:US") is None  # not a valid US number
    assert value("net_revenue_minor | minor_to_major") == 1234.56
    assert value("net_revenue_minor | minor_to_major:JPY") == 123456
    assert value("net_revenue_minor | minor_to_major:KWD") == 123.456
    assert value("last_order_at | date:%Y-%m-%d") == "2026-03-04"
    assert value("last_name | default:unknown") == "unknown"
    assert value("first_name | default:unknown") == "Mary"
    assert value("segments | join:;") == "champions;vip"
    assert value("segments | join") == "champions,vip"


def test_templates_fill_columns_and_blank_nulls() -> None:
    assert value("{{ first_name }} {{ last_name }} | trim") == "Mary"
    assert value("{{first_name}}-{{ country }}") == "Mary-DE"
    fmap = parse_field("name", "{{ first_name }} {{ last_name }}")
    assert fmap.columns == ("first_name", "last_name")


def test_transforms_that_read_the_row_declare_the_columns() -> None:
    # The content hash covers every column a field reads: a currency change must be seen.
    assert parse_field("x", "net_revenue_minor | minor_to_major").columns == (
        "net_revenue_minor",
        "currency",
    )
    assert parse_field("x", "phone | e164").columns == ("phone", "country")


def test_nulls_pass_through_transforms() -> None:
    assert value("last_name | trim | lower | sha256") is None
    assert value("last_name | minor_to_major") is None


def test_nest_builds_objects_from_dotted_names() -> None:
    assert nest([("email", "a"), ("properties.clv", 1), ("properties.tier", "x")]) == {
        "email": "a",
        "properties": {"clv": 1, "tier": "x"},
    }


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("email | shout", "unknown transform 'shout'"),
        ("email | date", "transform date needs an argument"),
        ("email | lower:x", "transform lower takes no argument"),
        ("net | minor_to_major:euro", "expected a currency code"),
        ("{{ email ", "expected {{ column }} placeholders"),
        ("1email", "expected a column name"),
        ("", "expected a column name"),
    ],
)
def test_bad_fields_say_what_is_wrong(spec: str, message: str) -> None:
    from syncd.mapping import TransformError

    with pytest.raises(TransformError, match=message.replace("{", r"\{").replace("}", r"\}")):
        parse_field("x", spec)


SETTINGS = Settings.model_validate({"segments": {"vip": {"rule": "orders_count >= 2"}}})

GOOD = """
destination = "webhook"
base_url = "http://127.0.0.1:9/hook"
allow_loopback = true
[credentials]
secret = "env:HOOK_SECRET"

[[sync]]
name = "vip-hook"
segment = "vip"
mode = "mirror"
batch_size = 50000
schedule = "every 15m"
[sync.fields]
email = "email | lower"
"profile.clv" = "clv_12m_minor | minor_to_major"
"""


def write(tmp_path: Path, text: str, name: str = "hook.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_good_mapping_loads_with_its_batch_capped(tmp_path: Path) -> None:
    mapping = load_mapping(write(tmp_path, GOOD), SETTINGS, env={"HOOK_SECRET": "s3cret"})
    assert mapping.name == "hook"
    assert mapping.credentials["secret"].get_secret_value() == "s3cret"
    (sync,) = mapping.syncs
    assert sync.batch_size == 1000  # the webhook adapter's maximum, not 50000
    assert sync.payload({"email": "A@B.CO", "clv_12m_minor": 1999, "currency": "USD"}) == {
        "email": "a@b.co",
        "profile": {"clv": 19.99},
    }


def problems(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_mapping(write(tmp_path, text), SETTINGS, env=env or {})
    return [f"{key}: {expected}" for _, key, expected in info.value.problems]


def test_errors_name_file_sync_and_key(tmp_path: Path) -> None:
    bad = (
        GOOD.replace('segment = "vip"', 'segment = "whales"')
        .replace('mode = "mirror"', 'mode = "mirror"\ncolour = "red"')
        .replace('"email | lower"', '"email | shout"')
        .replace("every 15m", "every fortnight")
    )
    path = write(tmp_path, bad)
    with pytest.raises(ConfigError) as info:
        load_mapping(path, SETTINGS, env={})
    assert f"{path}: sync[vip-hook].colour: unknown key" in str(info.value).splitlines()
    found = problems(tmp_path, bad)
    assert "sync[vip-hook].colour: unknown key" in found
    assert any(p.startswith("sync[vip-hook].schedule: expected 'every N") for p in found)
    # Semantic checks run once the shape is valid.
    shape_ok = GOOD.replace('segment = "vip"', 'segment = "whales"').replace(
        '"email | lower"', '"email | shout"'
    )
    found = problems(tmp_path, shape_ok)
    assert "credentials.secret: environment variable HOOK_SECRET is not set" in found
    assert "sync[vip-hook].segment: unknown segment 'whales' (configured: vip)" in found
    assert any(
        p.startswith("sync[vip-hook].fields.email: unknown transform 'shout'") for p in found
    )


def test_unknown_columns_and_modes_are_refused(tmp_path: Path) -> None:
    text = GOOD.replace('"clv_12m_minor', '"lifetime_value').replace(
        'destination = "webhook"', 'destination = "webhook"\nname = "hook"'
    )
    found = problems(tmp_path, text, env={"HOOK_SECRET": "x"})
    assert any(
        p.startswith("sync[vip-hook].fields.profile.clv: unknown column 'lifetime_value'")
        for p in found
    )


def test_unknown_destination_type(tmp_path: Path) -> None:
    found = problems(tmp_path, GOOD.replace('"webhook"', '"fax"', 1))
    assert found == [
        "destination: expected a destination type (klaviyo, mailchimp, meta, woocommerce, "
        "webhook, google), got 'fax'"
    ]


def test_sync_names_are_unique_across_files(tmp_path: Path) -> None:
    write(tmp_path, GOOD, "a.toml")
    write(tmp_path, GOOD, "b.toml")
    settings = Settings.model_validate(
        {
            "segments": {"vip": {"rule": "orders_count >= 2"}},
            "destinations": {"mappings": [str(tmp_path / "a.toml"), str(tmp_path / "b.toml")]},
        }
    )
    with pytest.raises(ConfigError) as info:
        load_mappings(settings, env={"HOOK_SECRET": "x"})
    ((where, key, expected),) = info.value.problems
    assert where.endswith("b.toml") and key == "sync[vip-hook].name"
    assert expected.startswith("already used in") and expected.endswith("a.toml")


def test_fingerprint_follows_the_mapping(tmp_path: Path) -> None:
    env = {"HOOK_SECRET": "x"}
    one = load_mapping(write(tmp_path, GOOD), SETTINGS, env=env).syncs[0]
    same = load_mapping(write(tmp_path, GOOD, "c.toml"), SETTINGS, env=env).syncs[0]
    other = load_mapping(
        write(tmp_path, GOOD.replace('"email | lower"', '"email"'), "d.toml"), SETTINGS, env=env
    ).syncs[0]
    assert one.fingerprint == same.fingerprint != other.fingerprint


def test_the_fingerprint_is_the_one_made_before_match_was_removed(tmp_path: Path) -> None:
    # Made by the release that still read `match`, for GOOD (which has no `match`): the
    # same fingerprint means the same content hashes, so upgrading sends nothing again.
    sync = load_mapping(write(tmp_path, GOOD), SETTINGS, env={"HOOK_SECRET": "x"}).syncs[0]
    assert sync.fingerprint == "1fa38487d9090882583a3ee2c6583681"


def test_match_is_refused_with_the_line_to_delete(tmp_path: Path) -> None:
    text = GOOD.replace('mode = "mirror"', 'mode = "mirror"\nmatch = ["email"]')
    assert problems(tmp_path, text, {"HOOK_SECRET": "x"}) == [
        "sync[vip-hook].match: no longer read: delete this line (each destination matches "
        "people by the identity fields its API defines, see the README)"
    ]


def test_a_sync_reads_the_columns_of_its_sources_type(tmp_path: Path) -> None:
    from syncd.mapping import SOURCE_COLUMNS

    source = {"url": "https://shop.example.com", "consumer_key": "k", "consumer_secret": "s"}
    settings = Settings.model_validate(
        {"segments": SETTINGS.segments, "sources": {"shop": {"type": "woocommerce", **source}}}
    )
    env = {"HOOK_SECRET": "x"}
    named = GOOD.replace('mode = "mirror"', 'mode = "mirror"\nsource = "shop"')
    (sync,) = load_mapping(write(tmp_path, named), settings, env=env).syncs
    assert sync.source_columns == (SOURCE_COLUMNS["woocommerce"],)
    # No source named (or one not configured): every source type's columns.
    (sync,) = load_mapping(write(tmp_path, GOOD, "b.toml"), settings, env=env).syncs
    assert sync.source_columns == tuple(SOURCE_COLUMNS.values())


EXAMPLE_SEGMENTS = {
    name: {"rule": "orders_count >= 1"}
    for name in ("champions", "win_back", "open_carts", "big_spenders")
}
EXAMPLE_ENV = {
    "KLAVIYO_API_KEY": "pk_example",
    "MAILCHIMP_API_KEY": "0123456789abcdef-us19",
    "WC_KEY": "ck_x",
    "WC_SECRET": "cs_x",
    "SYNCD_WEBHOOK_SECRET": "s",
}


@pytest.mark.parametrize("name", ["klaviyo", "mailchimp", "woocommerce", "webhook"])
def test_the_shipped_example_mappings_load(name: str) -> None:
    path = Path(__file__).parent.parent / "mappings" / f"{name}.toml"
    mapping = load_mapping(
        path, Settings.model_validate({"segments": EXAMPLE_SEGMENTS}), EXAMPLE_ENV
    )
    assert mapping.spec.destination == name
    assert mapping.syncs and all(s.fields for s in mapping.syncs)
    # Shipped examples never inline a secret.
    assert all(ref.startswith("env:") for ref in mapping.spec.credentials.values())


@pytest.mark.parametrize(
    ("host", "allowed", "refused"),
    [
        ("127.0.0.1:9", False, "not this machine"),
        ("127.3.4.5", False, "not this machine"),  # all of 127.0.0.0/8 is loopback
        ("[::1]:9", False, "not this machine"),
        ("[::ffff:127.0.0.1]", False, "not this machine"),
        ("localhost:9", False, "not this machine"),
        ("api.localhost", False, "not this machine"),  # RFC 6761
        ("127.0.0.1:9", True, None),
        ("localhost:9", True, None),
        ("169.254.169.254", True, "link-local"),  # never, allowed or not
        ("10.0.0.5", False, None),  # a relay in the same private network
        ("hooks.example.com", False, None),
    ],
)
def test_loopback_destinations_need_allow_loopback(
    tmp_path: Path, host: str, allowed: bool, refused: str | None
) -> None:
    text = GOOD.replace("allow_loopback = true\n", "" if not allowed else "allow_loopback = true\n")
    text = text.replace("127.0.0.1:9", host)
    if refused is None:
        mapping = load_mapping(write(tmp_path, text), SETTINGS, env={"HOOK_SECRET": "s"})
        assert mapping.name == "hook"
        return
    (found,) = problems(tmp_path, text, env={"HOOK_SECRET": "s"})
    assert found.startswith("base_url: expected a host that is not ")
    assert refused in found
