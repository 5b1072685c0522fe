"""Settings: TOML + SYNCD_* environment, secret references, and error reporting."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterator, Mapping
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import BaseModel

from syncd import log
from syncd.config import (
    STREAMS,
    ConfigError,
    SegmentSettings,
    Settings,
    StoreSettings,
    WooCommerceSourceSettings,
    load_settings,
    resolve_config_path,
    sqlite_path,
)

REPO = Path(__file__).resolve().parent.parent

MINIMAL_SOURCE = """
[sources.woocommerce]
url = "https://shop.example.com"
consumer_key = "ck_literal_key"
consumer_secret = "cs_literal_secret"
"""


@pytest.fixture(autouse=True)
def _isolated_secret_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    # load_settings registers secrets with the log module; keep that per test.
    monkeypatch.setattr(log, "_SECRETS", log._SecretRegistry())


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Run in tmp_path, so a config at Path("config.toml") prints as "config.toml"."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load_error(path: Path | None, env: Mapping[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env if env is not None else {})
    return caught.value


# --- sources and precedence -------------------------------------------------


def test_defaults_without_file_or_environment() -> None:
    settings = load_settings(None, {})
    assert settings.store.url == "sqlite:///state/syncd.db"
    assert settings.store.batch_size == 1000
    assert settings.sources == {}
    assert settings.server.host == "127.0.0.1"
    assert settings.server.port == 8787
    assert settings.log.level == "info"
    assert settings.log.format == "auto"
    assert settings.config_path is None


def test_file_values_and_source_defaults(in_tmp: Path) -> None:
    path = write(
        in_tmp / "config.toml",
        MINIMAL_SOURCE
        + """
        per_page = 50
        [store]
        batch_size = 500
        """,
    )
    settings = load_settings(path, {})
    source = settings.sources["woocommerce"]
    assert settings.store.batch_size == 500
    assert source.per_page == 50
    assert source.type == "woocommerce"
    assert source.streams == list(STREAMS)
    assert source.concurrency == 4
    assert source.requests_per_second == 10.0
    assert source.overlap_seconds == 600
    assert source.webhook_secret is None
    assert settings.config_path == path


def test_environment_beats_file_and_keeps_other_file_keys(in_tmp: Path) -> None:
    path = write(
        in_tmp / "config.toml",
        MINIMAL_SOURCE
        + """
        per_page = 50
        concurrency = 2
        [store]
        batch_size = 500
        """,
    )
    env = {
        "SYNCD_STORE__BATCH_SIZE": "200",
        "SYNCD_SOURCES__WOOCOMMERCE__PER_PAGE": "25",
        "SYNCD_SOURCES__WOOCOMMERCE__STREAMS": '["orders", "refunds"]',
        "syncd_server__port": "9000",  # variable names are case-insensitive
    }
    settings = load_settings(path, env)
    source = settings.sources["woocommerce"]
    assert settings.store.batch_size == 200
    assert source.per_page == 25
    assert source.streams == ["orders", "refunds"]
    assert settings.server.port == 9000
    # Merged key by key, not table by table: the file's other keys survive.
    assert source.concurrency == 2
    assert source.url == "https://shop.example.com"


def test_given_env_mapping_replaces_os_environ(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(
        in_tmp / "config.toml",
        """
        [sources.woocommerce]
        url = "https://shop.example.com"
        consumer_key = "env:WC_KEY"
        consumer_secret = "env:WC_SECRET"
        """,
    )
    monkeypatch.setenv("SYNCD_STORE__BATCH_SIZE", "7")
    monkeypatch.setenv("WC_KEY", "from_os_environ")
    monkeypatch.setenv("WC_SECRET", "from_os_environ")
    settings = load_settings(path, {"WC_KEY": "ck_mapping", "WC_SECRET": "cs_mapping"})
    assert settings.store.batch_size == 1000
    assert settings.sources["woocommerce"].consumer_key.get_secret_value() == "ck_mapping"
    # And with no mapping, os.environ is the environment.
    settings = load_settings(path)
    assert settings.store.batch_size == 7
    assert settings.sources["woocommerce"].consumer_key.get_secret_value() == "from_os_environ"


def test_source_defined_only_in_environment() -> None:
    env = {
        "SYNCD_SOURCES__WOOCOMMERCE__URL": "https://shop.example.com/",
        "SYNCD_SOURCES__WOOCOMMERCE__CONSUMER_KEY": "ck_env",
        "SYNCD_SOURCES__WOOCOMMERCE__CONSUMER_SECRET": "cs_env",
    }
    source = load_settings(None, env).sources["woocommerce"]
    assert source.url == "https://shop.example.com"
    assert source.consumer_secret.get_secret_value() == "cs_env"


def test_unrelated_syncd_variables_are_ignored() -> None:
    # SYNCD_CONFIG picks the file; other single-level SYNCD_* names are not settings.
    settings = load_settings(None, {"SYNCD_CONFIG": "x.toml", "SYNCD_TEST_POSTGRES_URL": "x"})
    assert settings.store.batch_size == 1000


def test_resolve_config_path_precedence() -> None:
    env = {"SYNCD_CONFIG": "/etc/syncd/config.toml"}
    assert resolve_config_path("given.toml", env) == Path("given.toml")
    assert resolve_config_path(None, env) == Path("/etc/syncd/config.toml")
    assert resolve_config_path(None, {}) == Path("config.toml")
    assert resolve_config_path(None, {"SYNCD_CONFIG": ""}) == Path("config.toml")


# --- secrets -----------------------------------------------------------------


def test_env_and_file_secret_references(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_dir = tmp_path / "etc"
    write(config_dir / "secrets" / "wc_secret", "cs  with inner spaces\n")
    absolute = write(tmp_path / "elsewhere" / "hook", "whsec_abs\r\n")
    path = write(
        config_dir / "config.toml",
        f"""
        [sources.woocommerce]
        url = "https://shop.example.com"
        consumer_key = "env:WC_KEY"
        consumer_secret = "file:secrets/wc_secret"
        webhook_secret = "file:{absolute}"
        """,
    )
    # Relative secret paths follow the config file, not the working directory.
    monkeypatch.chdir(tmp_path / "elsewhere")
    source = load_settings(path, {"WC_KEY": "ck_from_env"}).sources["woocommerce"]
    assert source.consumer_key.get_secret_value() == "ck_from_env"
    assert source.consumer_secret.get_secret_value() == "cs  with inner spaces"
    assert source.webhook_secret is not None
    assert source.webhook_secret.get_secret_value() == "whsec_abs"


def test_secret_reference_given_through_the_environment(in_tmp: Path) -> None:
    path = write(in_tmp / "config.toml", MINIMAL_SOURCE)
    env = {
        "SYNCD_SOURCES__WOOCOMMERCE__CONSUMER_SECRET": "env:ROTATED",
        "ROTATED": "cs_rotated",
    }
    source = load_settings(path, env).sources["woocommerce"]
    assert source.consumer_secret.get_secret_value() == "cs_rotated"


def test_missing_env_variable_names_the_key(in_tmp: Path) -> None:
    write(
        in_tmp / "config.toml",
        """
        [sources.woocommerce]
        url = "https://shop.example.com"
        consumer_key = "env:WC_KEY"
        consumer_secret = "env:WC_SECRET"
        """,
    )
    error = load_error(Path("config.toml"), {"WC_KEY": "ck_set"})
    assert error.problems == [
        (
            "config.toml",
            "sources.woocommerce.consumer_secret",
            "environment variable WC_SECRET is not set",
        )
    ]


def test_missing_secret_file_and_empty_secret(in_tmp: Path) -> None:
    write(in_tmp / "empty", "\n")
    write(
        in_tmp / "config.toml",
        """
        [sources.woocommerce]
        url = "https://shop.example.com"
        consumer_key = "file:empty"
        consumer_secret = "file:no/such/file"
        """,
    )
    problems = {key: expected for _, key, expected in load_error(Path("config.toml")).problems}
    assert problems["sources.woocommerce.consumer_key"] == "expected a non-empty secret"
    missing = problems["sources.woocommerce.consumer_secret"]
    assert missing.startswith("secret file ") and missing.endswith(" not found")
    assert str(in_tmp / "no" / "such" / "file") in missing


def test_secrets_absent_from_repr_str_and_dump(in_tmp: Path) -> None:
    write(in_tmp / "wh", "whsec_file_value\n")
    path = write(
        in_tmp / "config.toml",
        """
        [store]
        url = "postgresql://syncd:pg_password_value@db:5432/syncd"
        [sources.woocommerce]
        url = "https://shop.example.com"
        consumer_key = "ck_literal_value"
        consumer_secret = "env:WC_SECRET"
        webhook_secret = "file:wh"
        """,
    )
    settings = load_settings(path, {"WC_SECRET": "cs_env_value"})
    rendered = [repr(settings), str(settings), repr(settings.store), str(settings.sources)]
    rendered.append(settings.model_dump_json())
    for text in rendered:
        for secret in ("ck_literal_value", "cs_env_value", "whsec_file_value", "pg_password_value"):
            assert secret not in text
    assert "shop.example.com" in repr(settings)
    # The URL keeps working for the store layer; only its display is masked.
    assert settings.store.url == "postgresql+psycopg://syncd:pg_password_value@db:5432/syncd"
    assert "postgresql+psycopg://syncd:***@db:5432/syncd" in repr(settings.store)


def test_loaded_secrets_are_registered_for_log_redaction(in_tmp: Path) -> None:
    path = write(
        in_tmp / "config.toml",
        """
        [store]
        url = "postgresql://syncd:pg_password_value@db/syncd"
        [sources.woocommerce]
        url = "https://shop.example.com"
        consumer_key = "ck_registered"
        consumer_secret = "env:WC_SECRET"
        webhook_secret = "abc"
        """,
    )
    load_settings(path, {"WC_SECRET": "cs_registered"})
    event = {
        "event": "vendor said: bad key ck_registered / cs_registered / pg_password_value / abc"
    }
    redacted = log.redact_processor(None, "info", event)["event"]
    assert "ck_registered" not in redacted
    assert "cs_registered" not in redacted
    assert "pg_password_value" not in redacted
    # Values under 4 characters are not registered: they would mangle ordinary text.
    assert redacted == "vendor said: bad key *** / *** / *** / abc"


def test_secret_values_never_appear_in_error_messages(in_tmp: Path) -> None:
    write(
        in_tmp / "config.toml",
        """
        [sources.woocommerce]
        url = "https://shop.example.com"
        consumer_key = 12345678
        consumer_secret = "cs_real_secret_value"
        consumer_secrt = "cs_typo_secret_value"
        """,
    )
    env = {"SYNCD_SOURCES__WOOCOMMERCE__WEBHOOK_SECRET": "whsec_value", "SYNCD_STORE__URL": "x"}
    message = str(load_error(Path("config.toml"), env))
    assert "12345678" not in message
    assert "cs_typo_secret_value" not in message
    assert "cs_real_secret_value" not in message
    assert (
        "config.toml: sources.woocommerce.consumer_key: expected a string" in message.splitlines()
    )
    assert (
        "config.toml: sources.woocommerce.consumer_secrt: unknown key "
        "(did you mean 'consumer_secret'?)" in message.splitlines()
    )


# --- error reporting -----------------------------------------------------------


def test_error_lines_have_file_key_expected_format(in_tmp: Path) -> None:
    write(
        in_tmp / "config.toml",
        """
        [store]
        url = "mysql://x"
        [sources.woocommerce]
        url = "https://shop.example.com"
        consumer_key = "ck"
        per_pag = 10
        """,
    )
    error = load_error(Path("config.toml"))
    assert str(error).splitlines() == [
        "config.toml: store.url: expected sqlite:///… or postgresql+psycopg://…, got 'mysql://x'",
        "config.toml: sources.woocommerce.consumer_secret: field required",
        "config.toml: sources.woocommerce.per_pag: unknown key (did you mean 'per_page'?)",
    ]
    assert error.problems[1] == (
        "config.toml",
        "sources.woocommerce.consumer_secret",
        "field required",
    )


def test_values_from_the_environment_name_the_variable(in_tmp: Path) -> None:
    write(in_tmp / "config.toml", MINIMAL_SOURCE + "per_page = 500\n")
    env = {"SYNCD_SOURCES__WOOCOMMERCE__CONCURRENCY": "99", "SYNCD_SERVER__PORT": "http"}
    assert str(load_error(Path("config.toml"), env)).splitlines() == [
        "config.toml: sources.woocommerce.per_page: expected at most 100, got 500",
        "SYNCD_SOURCES__WOOCOMMERCE__CONCURRENCY: sources.woocommerce.concurrency: "
        "expected at most 32, got '99'",
        "SYNCD_SERVER__PORT: server.port: expected an integer, got 'http'",
    ]


def test_unknown_keys_everywhere_with_did_you_mean(in_tmp: Path) -> None:
    write(
        in_tmp / "config.toml",
        MINIMAL_SOURCE
        + """
        [sever]
        port = 1
        [log]
        levle = "debug"
        zzzz = 1
        """,
    )
    env = {"SYNCD_STOR__URL": "sqlite:///x.db", "SYNCD_SOURCES__WOOCOMMERCE__TIMEOUT": "5"}
    lines = set(str(load_error(Path("config.toml"), env)).splitlines())
    assert lines == {
        "SYNCD_STOR__URL: stor.url: unknown key (did you mean 'store'?)",
        "SYNCD_SOURCES__WOOCOMMERCE__TIMEOUT: sources.woocommerce.timeout: "
        "unknown key (did you mean 'timeout_seconds'?)",
        "config.toml: sever: unknown key (did you mean 'server'?)",
        "config.toml: log.levle: unknown key (did you mean 'level'?)",
        "config.toml: log.zzzz: unknown key",
    }


def test_config_path_is_not_a_file_key(in_tmp: Path) -> None:
    write(in_tmp / "config.toml", 'config_path = "/elsewhere.toml"\n')
    assert load_error(Path("config.toml")).problems == [
        ("config.toml", "config_path", "unknown key")
    ]


def test_missing_file_is_a_config_error(in_tmp: Path) -> None:
    error = load_error(Path("missing.toml"))
    assert len(error.problems) == 1
    where, key, expected = error.problems[0]
    assert (where, key) == ("missing.toml", "")
    assert expected.startswith("config file not found")
    assert str(error).startswith("missing.toml: config file not found")


def test_toml_syntax_error_reports_line_and_column(in_tmp: Path) -> None:
    (in_tmp / "config.toml").write_text('[store]\nbatch_size = 10\nurl = "sqlite:///x.db\n')
    error = load_error(Path("config.toml"))
    assert len(error.problems) == 1
    where, key, expected = error.problems[0]
    assert where == "config.toml"
    assert key == "line 3, column 22"
    assert expected.startswith("invalid TOML: ")
    assert str(error).startswith("config.toml: line 3, column 22: invalid TOML: ")


def test_all_problems_are_reported_together(in_tmp: Path) -> None:
    write(
        in_tmp / "config.toml",
        """
        [store]
        batch_size = 0
        [server]
        port = 70000
        [log]
        level = "verbose"
        [segments.both]
        rule = "has_open_cart"
        sql = "select 1"
        [segments.neither]
        group = "g"
        """,
    )
    assert str(load_error(Path("config.toml"))).splitlines() == [
        "config.toml: store.batch_size: expected at least 1, got 0",
        "config.toml: server.port: expected at most 65535, got 70000",
        "config.toml: log.level: expected one of 'debug', 'info', 'warning' or 'error', "
        "got 'verbose'",
        "config.toml: segments.both: expected exactly one of rule or sql, got both",
        "config.toml: segments.neither: expected exactly one of rule or sql, got neither",
    ]


def test_missing_keys_of_an_environment_only_source_point_at_the_variable() -> None:
    env = {"SYNCD_SOURCES__SHOP_US__URL": "https://us.example.com"}
    assert str(load_error(None, env)).splitlines() == [
        "SYNCD_SOURCES__SHOP_US__TYPE: sources.shop_us.type: field required "
        '(the source\'s name is not a source type; add type = "woocommerce")',
        "SYNCD_SOURCES__SHOP_US__CONSUMER_KEY: sources.shop_us.consumer_key: field required",
        "SYNCD_SOURCES__SHOP_US__CONSUMER_SECRET: sources.shop_us.consumer_secret: field required",
    ]


def test_invalid_json_for_a_list_from_the_environment(in_tmp: Path) -> None:
    write(in_tmp / "config.toml", MINIMAL_SOURCE)
    env = {"SYNCD_SOURCES__WOOCOMMERCE__STREAMS": "orders,customers"}
    assert load_error(Path("config.toml"), env).problems == [
        (
            "SYNCD_SOURCES__WOOCOMMERCE__STREAMS",
            "sources.woocommerce.streams",
            "expected a list, got 'orders,customers'",
        )
    ]


def test_list_item_errors_use_an_index(in_tmp: Path) -> None:
    write(in_tmp / "config.toml", MINIMAL_SOURCE + 'streams = ["orders", "order"]\n')
    ((where, key, expected),) = load_error(Path("config.toml")).problems
    assert (where, key) == ("config.toml", "sources.woocommerce.streams[1]")
    assert expected.startswith("expected one of 'customers', 'orders'")
    assert expected.endswith("got 'order'")


# --- source types and names ----------------------------------------------------------


def test_type_is_optional_only_when_the_name_is_the_type(in_tmp: Path) -> None:
    write(
        in_tmp / "config.toml",
        MINIMAL_SOURCE
        + """
        [sources.shop_eu]
        url = "https://eu.example.com"
        consumer_key = "ck_eu"
        consumer_secret = "cs_eu"
        """,
    )
    assert load_error(Path("config.toml")).problems == [
        (
            "config.toml",
            "sources.shop_eu.type",
            'field required (the source\'s name is not a source type; add type = "woocommerce")',
        )
    ]
    with (in_tmp / "config.toml").open("a") as file:
        file.write('type = "woocommerce"\n')
    settings = load_settings(Path("config.toml"), {})
    assert sorted(settings.sources) == ["shop_eu", "woocommerce"]
    assert settings.sources["shop_eu"].type == "woocommerce"


def test_unknown_source_type(in_tmp: Path) -> None:
    write(in_tmp / "config.toml", MINIMAL_SOURCE + 'type = "shopify"\n')
    assert load_error(Path("config.toml")).problems == [
        ("config.toml", "sources.woocommerce.type", "expected 'woocommerce', got 'shopify'")
    ]


def test_source_names_must_be_usable_in_variables(in_tmp: Path) -> None:
    write(
        in_tmp / "config.toml",
        """
        [sources."Shop EU"]
        type = "woocommerce"
        url = "https://eu.example.com"
        consumer_key = "ck_eu"
        consumer_secret = "cs_eu"
        """,
    )
    ((where, key, expected),) = load_error(Path("config.toml")).problems
    assert (where, key) == ("config.toml", "sources.Shop EU")
    assert expected.startswith("expected a name of lowercase letters")


# --- normalization -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("sqlite:///state/syncd.db", "sqlite:///state/syncd.db"),
        ("sqlite:////var/lib/syncd/syncd.db", "sqlite:////var/lib/syncd/syncd.db"),
        ("postgresql+psycopg://syncd@db/syncd", "postgresql+psycopg://syncd@db/syncd"),
        ("postgresql://syncd@db:5432/syncd", "postgresql+psycopg://syncd@db:5432/syncd"),
        ("postgres://syncd@db/syncd", "postgresql+psycopg://syncd@db/syncd"),
        ("  sqlite:///x.db  ", "sqlite:///x.db"),
    ],
)
def test_store_url_normalization(given: str, stored: str) -> None:
    assert StoreSettings(url=given).url == stored


@pytest.mark.parametrize(
    "given", ["mysql://x", "sqlite://", "postgresql+psycopg2://db/x", "state/syncd.db"]
)
def test_store_url_rejected(given: str) -> None:
    error = load_error(None, {"SYNCD_STORE__URL": given})
    assert error.problems == [
        (
            "SYNCD_STORE__URL",
            "store.url",
            f"expected sqlite:///… or postgresql+psycopg://…, got {given!r}",
        )
    ]


def test_rejected_store_url_does_not_echo_a_password() -> None:
    error = load_error(None, {"SYNCD_STORE__URL": "mysql://root:hunter22@db/x"})
    assert "hunter22" not in str(error)
    assert "got 'mysql://root:***@db/x'" in str(error)


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("https://shop.example.com/", "https://shop.example.com"),
        ("https://Shop.Example.com//", "https://shop.example.com"),
        ("http://127.0.0.1:8080/wp/", "http://127.0.0.1:8080/wp"),
        ("HTTPS://shop.example.com/Store", "https://shop.example.com/Store"),
    ],
)
def test_source_url_normalization(given: str, stored: str) -> None:
    source = WooCommerceSourceSettings(url=given, consumer_key="ck_x", consumer_secret="cs_x")
    assert source.url == stored


@pytest.mark.parametrize(
    ("given", "expected_start"),
    [
        ("ftp://shop.example.com", "expected the store's http:// or https:// URL"),
        ("shop.example.com", "expected the store's http:// or https:// URL"),
        ("https://", "expected the store's http:// or https:// URL"),
        ("https://shop.example.com/?x=1", "expected the store's base URL without ?query"),
        ("https://ck:cs@shop.example.com", "expected a URL without user:password@"),
    ],
)
def test_source_url_rejected(given: str, expected_start: str) -> None:
    env = {
        "SYNCD_SOURCES__WOOCOMMERCE__URL": given,
        "SYNCD_SOURCES__WOOCOMMERCE__CONSUMER_KEY": "ck_x",
        "SYNCD_SOURCES__WOOCOMMERCE__CONSUMER_SECRET": "cs_x",
    }
    ((where, key, expected),) = load_error(None, env).problems
    assert (where, key) == ("SYNCD_SOURCES__WOOCOMMERCE__URL", "sources.woocommerce.url")
    assert expected.startswith(expected_start)


def test_effective_auth_and_unlimited_rate() -> None:
    def source(url: str, **extra: object) -> WooCommerceSourceSettings:
        return WooCommerceSourceSettings.model_validate(
            {"url": url, "consumer_key": "ck_x", "consumer_secret": "cs_x", **extra}
        )

    assert source("https://shop.example.com").effective_auth == "basic"
    assert source("http://127.0.0.1:8080").effective_auth == "oauth1"
    assert source("https://shop.example.com", auth="query").effective_auth == "query"
    assert source("https://s.example.com", requests_per_second=0).requests_per_second is None
    assert source("https://s.example.com", streams=["orders", "orders"]).streams == ["orders"]


def test_segments_need_exactly_one_definition() -> None:
    assert SegmentSettings(rule="rfm_segment = 'champions'").priority == 0
    assert SegmentSettings(sql="select 1", group="g", priority=3).group == "g"
    with pytest.raises(ValueError, match="exactly one of rule or sql"):
        SegmentSettings()


def test_sqlite_path() -> None:
    assert sqlite_path("sqlite:///state/syncd.db") == Path("state/syncd.db")
    assert sqlite_path("sqlite:////var/lib/syncd.db?mode=rwc") == Path("/var/lib/syncd.db")
    assert sqlite_path("sqlite:///my%20store.db") == Path("my store.db")
    assert sqlite_path("sqlite:///:memory:") is None
    assert sqlite_path("postgresql+psycopg://db/syncd") is None


def test_mapping_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    path = write(
        tmp_path / "etc" / "config.toml",
        """
        [destinations]
        mappings = ["mappings/klaviyo.toml", "/abs/meta.toml"]
        """,
    )
    settings = load_settings(path, {})
    assert settings.mapping_paths() == [
        tmp_path / "etc" / "mappings" / "klaviyo.toml",
        Path("/abs/meta.toml"),
    ]


def test_settings_built_in_code_read_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNCD_LOG__LEVEL", "debug")
    assert Settings().log.level == "debug"
    assert Settings(log={"level": "error"}).log.level == "error"  # code beats environment


# --- the shipped example ------------------------------------------------------------

EXAMPLE_ENV = {
    "WC_KEY": "ck_example_key",
    "WC_SECRET": "cs_example_secret",
    "WC_WEBHOOK_SECRET": "whsec_example",
}


def test_example_config_loads() -> None:
    settings = load_settings(REPO / "config.example.toml", EXAMPLE_ENV)
    source = settings.sources["woocommerce"]
    assert source.url == "https://shop.example.com"
    assert source.consumer_key.get_secret_value() == "ck_example_key"
    assert source.consumer_secret.get_secret_value() == "cs_example_secret"
    assert source.webhook_secret is not None
    assert source.webhook_secret.get_secret_value() == "whsec_example"
    assert settings.store.url == "sqlite:///state/syncd.db"
    assert settings.server.port == 8787
    assert settings.segments["champions"].rule == "rfm_segment = 'champions'"
    assert settings.destinations.mappings == ["mappings/klaviyo.toml"]
    # The file documents every default: loading it equals the defaults.
    defaults = WooCommerceSourceSettings(
        url="https://shop.example.com",
        consumer_key="ck_example_key",
        consumer_secret="cs_example_secret",
        webhook_secret="whsec_example",
    )
    assert source == defaults


def test_example_config_documents_every_key() -> None:
    text = (REPO / "config.example.toml").read_text()
    models: list[type[BaseModel]] = [StoreSettings, WooCommerceSourceSettings, SegmentSettings]
    for model in models:
        for name in model.model_fields:
            assert f"\n{name} = " in text or f"\n# {name} = " in text, name
    for name in ("host", "port", "level", "format", "mappings"):
        assert f"\n{name} = " in text, name
    assert '\n# [sources.shop_eu]\n# type = "woocommerce"\n' in text


def test_example_config_without_its_variables_names_each_key() -> None:
    error = load_error(REPO / "config.example.toml", {})
    assert [(key, expected) for _, key, expected in error.problems] == [
        ("sources.woocommerce.consumer_key", "environment variable WC_KEY is not set"),
        ("sources.woocommerce.consumer_secret", "environment variable WC_SECRET is not set"),
        (
            "sources.woocommerce.webhook_secret",
            "environment variable WC_WEBHOOK_SECRET is not set",
        ),
    ]


# --- profiles -----------------------------------------------------------------


def test_profile_settings_are_validated(in_tmp: Path) -> None:
    write(
        in_tmp / "config.toml",
        """
        [profiles]
        reporting_currency = "EURO"
        paid_statuses = []
        [profiles.rates]
        USD = "-1"
        GBP = "0.123456789"
        XXY = "1"
        [profiles.lifecycle]
        lapsed_ratio = 10
        [segments.bad]
        rule = "orders_count >"
        """,
    )
    assert str(load_error(Path("config.toml"))).splitlines() == [
        "config.toml: profiles.paid_statuses: expected a non-empty value",
        "config.toml: profiles.reporting_currency: expected an ISO 4217 currency code, got 'EURO'",
        "config.toml: profiles.rates.USD: expected a positive exchange rate",
        "config.toml: profiles.rates.GBP: expected at most 8 decimal places",
        "config.toml: profiles.rates.XXY: expected an ISO 4217 currency code, got 'XXY'",
        "config.toml: profiles.lifecycle: expected at_risk_ratio <= lapsed_ratio <= churned_ratio",
        "config.toml: segments.bad.rule: expected a value after '>' at position 14",
    ]


def test_profile_rates_are_exact_decimals(in_tmp: Path) -> None:
    write(
        in_tmp / "config.toml",
        """
        [profiles]
        reporting_currency = "EUR"
        rates = { USD = "0.92", JPY = 0.0061 }
        """,
    )
    rates = load_settings(Path("config.toml"), {}).profiles.rates
    assert rates == {"USD": Decimal("0.92"), "JPY": Decimal("0.0061")}


# --- verify_tls: true, false or a CA file --------------------------------------------


def test_verify_tls_takes_a_ca_file_relative_to_the_config(in_tmp: Path) -> None:
    from tests.test_tls import make_certificate

    (in_tmp / "conf" / "tls").mkdir(parents=True)
    make_certificate(in_tmp / "conf" / "tls", "store", "IP:127.0.0.1")
    path = write(in_tmp / "conf" / "config.toml", MINIMAL_SOURCE + 'verify_tls = "tls/store.pem"\n')
    source = load_settings(path, {}).sources["woocommerce"]
    assert source.verify_tls == in_tmp / "conf" / "tls" / "store.pem"


@pytest.mark.parametrize(("value", "expected"), [("false", False), ("true", True), ("0", False)])
def test_verify_tls_from_the_environment_is_a_boolean(
    in_tmp: Path, value: str, expected: bool
) -> None:
    path = write(in_tmp / "config.toml", MINIMAL_SOURCE)
    env = {"SYNCD_SOURCES__WOOCOMMERCE__VERIFY_TLS": value}
    assert load_settings(path, env).sources["woocommerce"].verify_tls is expected


def test_verify_tls_file_missing_or_not_a_certificate(in_tmp: Path) -> None:
    write(in_tmp / "notes.txt", "not a certificate\n")
    write(in_tmp / "config.toml", MINIMAL_SOURCE + 'verify_tls = "no/ca.pem"\n')
    assert load_error(Path("config.toml")).problems == [
        (
            "config.toml",
            "sources.woocommerce.verify_tls",
            f"expected true, false or a CA file: {in_tmp / 'no' / 'ca.pem'} not found",
        )
    ]
    write(in_tmp / "config.toml", MINIMAL_SOURCE + 'verify_tls = "notes.txt"\n')
    ((_, key, expected),) = load_error(Path("config.toml")).problems
    assert key == "sources.woocommerce.verify_tls"
    assert expected.startswith(f"expected a PEM file of CA certificates: {in_tmp / 'notes.txt'}: ")


# --- hostile or broken values (issue 19, item 6) ------------------------------


@pytest.mark.parametrize(
    ("host", "refused"),
    [
        ("169.254.169.254", True),  # AWS, GCP and Azure metadata
        ("169.254.0.1", True),
        ("[fe80::1]", True),
        ("[::ffff:169.254.169.254]", True),  # the same address, IPv4-mapped
        ("0.0.0.0", True),
        ("[::]", True),
        ("127.0.0.1", False),  # a store or test server on the same host
        ("[::1]", False),
        ("10.0.0.5", False),  # a store in the same private network
        ("shop.example.com", False),  # names are not resolved
    ],
)
def test_source_urls_at_link_local_or_unspecified_addresses_are_refused(
    tmp_path: Path, host: str, refused: bool
) -> None:
    path = write(tmp_path / "config.toml", MINIMAL_SOURCE.replace("shop.example.com", host))
    if not refused:
        assert load_settings(path, {}).sources["woocommerce"].url == f"https://{host}"
        return
    (problem,) = load_error(path).problems
    assert problem[:2] == (str(path), "sources.woocommerce.url")
    assert problem[2].startswith("expected a host")


def test_a_fifo_secret_file_is_refused_without_blocking(tmp_path: Path) -> None:
    # Opening a FIFO for reading blocks until a writer comes: it is refused before that.
    fifo = tmp_path / "secret"
    os.mkfifo(fifo)
    config = MINIMAL_SOURCE.replace('"cs_literal_secret"', f'"file:{fifo}"')
    (problem,) = load_error(write(tmp_path / "config.toml", config)).problems
    assert problem[1:] == (
        "sources.woocommerce.consumer_secret",
        f"expected a regular file: {fifo} is not one",
    )


def test_a_secret_file_of_exactly_64_kib_is_read_whole(tmp_path: Path) -> None:
    config = MINIMAL_SOURCE.replace('"cs_literal_secret"', '"file:secret"')
    path = write(tmp_path / "config.toml", config)
    (tmp_path / "secret").write_text("s" * 65535 + "\n")  # 65,536 bytes; the newline is dropped
    secret = load_settings(path, {}).sources["woocommerce"].consumer_secret
    assert secret.get_secret_value() == "s" * 65535
    (tmp_path / "secret").write_text("s" * 65536 + "\n")  # one byte more
    (problem,) = load_error(path).problems
    assert problem[2].startswith("expected a secret file of at most 64 KiB")


# --- source schedules -----------------------------------------------------------


def test_a_source_schedule_and_the_old_sync_every_minutes_are_read_alike(in_tmp: Path) -> None:
    new = load_settings(write(in_tmp / "new.toml", MINIMAL_SOURCE + 'schedule = "every 10m"\n'), {})
    old = load_settings(
        write(in_tmp / "old.toml", MINIMAL_SOURCE + "sync_every_minutes = 10\n"), {}
    )
    (a,), (b,) = new.sources.values(), old.sources.values()
    assert a.poll_schedule.seconds == b.poll_schedule.seconds == 600
    assert a.freshness_minutes == b.freshness_minutes == 30
    # Neither key: every 15 minutes, as before.
    (default,) = load_settings(write(in_tmp / "c.toml", MINIMAL_SOURCE), {}).sources.values()
    assert default.poll_schedule.seconds == 900 and default.freshness_minutes == 45


def test_a_cron_schedule_on_a_source_is_fresh_for_three_of_its_longest_gaps(in_tmp: Path) -> None:
    path = write(in_tmp / "config.toml", MINIMAL_SOURCE + 'schedule = "0 9 * * 1-5"\n')
    (source,) = load_settings(path, {}).sources.values()
    assert source.poll_schedule.seconds is None
    # Friday 09:00 to Monday 09:00 is the longest wait: 72 h, three of them.
    assert source.freshness_minutes == 3 * 72 * 60


def test_both_schedule_keys_on_a_source_are_an_error(in_tmp: Path) -> None:
    path = write(
        in_tmp / "config.toml",
        MINIMAL_SOURCE + 'schedule = "every 10m"\nsync_every_minutes = 10\n',
    )
    assert load_error(path).problems == [
        (
            str(path),
            "sources.woocommerce.schedule",
            "expected schedule or its old form sync_every_minutes, not both "
            "(delete sync_every_minutes)",
        )
    ]


def test_both_schedule_keys_exit_2_with_the_message(tmp_path: Path) -> None:
    from tests.test_cli import base_env, syncd

    config = write(
        tmp_path / "config.toml",
        MINIMAL_SOURCE + 'schedule = "*/5 * * * *"\nsync_every_minutes = 10\n',
    )
    run = syncd("validate", env=base_env(SYNCD_CONFIG=str(config)))
    assert run.returncode == 2, run.output
    assert run.stderr_lines() == [
        f"{config}: sources.woocommerce.schedule: expected schedule or its old form "
        "sync_every_minutes, not both (delete sync_every_minutes)"
    ]


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("every 5s", "expected an interval of at least 10 s, got 'every 5s'"),
        ("hourly", "expected 'every N s|m|h|d' or a 5-field cron expression, got 'hourly' ("),
        ("61 * * * *", "expected 'every N s|m|h|d' or a 5-field cron expression, got '61 * "),
    ],
)
def test_a_bad_source_schedule_says_what_was_expected(
    in_tmp: Path, schedule: str, expected: str
) -> None:
    path = write(in_tmp / "config.toml", MINIMAL_SOURCE + f'schedule = "{schedule}"\n')
    ((where, key, message),) = load_error(path).problems
    assert (where, key) == (str(path), "sources.woocommerce.schedule")
    assert message.startswith(expected), message
