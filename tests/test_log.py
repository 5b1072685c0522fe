"""Logging: JSON lines and console output, stdlib routing, redaction, the run line."""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import structlog
from pydantic import SecretStr

from syncd import log
from syncd.log import configure_logging, get_logger, log_run, redact_processor, register_secret

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    monkeypatch.setattr(log, "_SECRETS", log._SecretRegistry())
    monkeypatch.delenv("NO_COLOR", raising=False)
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    structlog.reset_defaults()


def json_output(level: str = "info") -> io.StringIO:
    stream = io.StringIO()
    configure_logging(level, "auto", stream)  # StringIO is not a TTY: JSON
    return stream


def records(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


# --- output formats ------------------------------------------------------------


def test_json_lines_when_not_a_tty() -> None:
    stream = json_output()
    logger = get_logger("syncd.sources")
    logger.info("page fetched", stream_name="orders", page=3, rows=100)
    logger.warning("slow response", seconds=4.5)
    first, second = records(stream)
    assert list(first)[:4] == ["timestamp", "level", "logger", "event"]
    assert first["level"] == "info"
    assert first["logger"] == "syncd.sources"
    assert first["event"] == "page fetched"
    assert (first["stream_name"], first["page"], first["rows"]) == ("orders", 3, 100)
    assert ISO_UTC.match(first["timestamp"])
    logged_at = datetime.fromisoformat(first["timestamp"])
    assert logged_at.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - logged_at) < timedelta(minutes=1)
    assert (second["level"], second["event"], second["seconds"]) == (
        "warning",
        "slow response",
        4.5,
    )


def test_console_on_a_tty_and_format_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    tty = FakeTTY()
    configure_logging("info", "auto", tty)
    get_logger("syncd").info("hello there", answer=42)
    output = tty.getvalue()
    assert "hello there" in output
    assert "\x1b[" in output  # coloured
    with pytest.raises(json.JSONDecodeError):
        json.loads(output.splitlines()[0])

    monkeypatch.setenv("NO_COLOR", "1")
    tty = FakeTTY()
    configure_logging("info", "auto", tty)
    get_logger("syncd").info("hello there", answer=42)
    assert "answer=42" in tty.getvalue()
    assert "\x1b[" not in tty.getvalue()

    # json forced on a terminal, console forced on a pipe (then without colours).
    tty = FakeTTY()
    configure_logging("info", "json", tty)
    get_logger("syncd").info("forced")
    assert json.loads(tty.getvalue())["event"] == "forced"
    monkeypatch.delenv("NO_COLOR")
    pipe = io.StringIO()
    configure_logging("info", "console", pipe)
    get_logger("syncd").info("forced", answer=42)
    assert "answer=42" in pipe.getvalue()
    assert "\x1b[" not in pipe.getvalue()


def test_level_filters_syncd_lines() -> None:
    stream = json_output("warning")
    logger = get_logger("syncd")
    logger.debug("no")
    logger.info("no")
    logger.warning("yes")
    logger.error("also")
    assert [r["event"] for r in records(stream)] == ["yes", "also"]

    stream = json_output("debug")
    get_logger("syncd").debug("now shown")
    assert [r["level"] for r in records(stream)] == ["debug"]


def test_stdlib_logging_routed_from_warning_up() -> None:
    stream = json_output("debug")
    httpx_logger = logging.getLogger("httpx")
    httpx_logger.info("HTTP Request: GET https://shop.example.com/ 200")
    httpx_logger.warning("retrying %s after %d s", "https://x.example/?api_key=AIzaSECRET", 3)
    try:
        raise ConnectionError("refused")
    except ConnectionError:
        logging.getLogger("alembic").exception("migration failed")
    warning, error = records(stream)
    assert warning["logger"] == "httpx"
    assert warning["level"] == "warning"
    assert warning["event"] == "retrying https://x.example/?api_key=*** after 3 s"
    assert ISO_UTC.match(warning["timestamp"])
    assert error["logger"] == "alembic"
    assert error["level"] == "error"
    assert "ConnectionError: refused" in error["exception"]


def test_configure_is_idempotent() -> None:
    configure_logging("info", "json", io.StringIO())
    stream = json_output()
    logging.getLogger("httpx").warning("once")
    get_logger("syncd").info("once too")
    assert [r["event"] for r in records(stream)] == ["once", "once too"]
    ours = [h for h in logging.getLogger().handlers if isinstance(h, log._StdlibHandler)]
    assert len(ours) == 1


def test_loggers_created_before_configuration_follow_it() -> None:
    early = get_logger("syncd.early")
    stream = json_output()
    early.info("configured later")
    assert records(stream)[0]["logger"] == "syncd.early"


def test_invalid_level_or_format_is_rejected() -> None:
    with pytest.raises(ValueError, match="verbose"):
        configure_logging("verbose")
    with pytest.raises(ValueError, match="xml"):
        configure_logging("info", "xml", io.StringIO())  # type: ignore[arg-type]


def test_exception_traceback_is_redacted() -> None:
    stream = json_output()
    try:
        raise RuntimeError("GET https://shop.example.com/?consumer_secret=cs_in_traceback failed")
    except RuntimeError:
        get_logger("syncd").exception("request failed")
    (record,) = records(stream)
    assert record["level"] == "error"
    assert "cs_in_traceback" not in stream.getvalue()
    assert (
        "RuntimeError: GET https://shop.example.com/?consumer_secret=*** failed"
        in (record["exception"])
    )


# --- redaction -----------------------------------------------------------------

# (keyword arguments to log, text that must disappear, text that must stay)
REDACTION_CASES: list[tuple[str, dict[str, Any], list[str], list[str]]] = [
    (
        "secret-looking keys",
        {
            "password": "pw_value_1",
            "api_key": "ak_value_1",
            "consumer_key": "ck_value_1",
            "consumer_secret": "cs_value_1",
            "webhook_secret": "wh_value_1",
            "access_token": "at_value_1",
            "refresh_token": "rt_value_1",
            "private_key": "pk_value_1",
            "signature": "sig_value_1",
            "cookie": "session=ck_cookie_1",
            "apikey": "ak_value_2",
            "client_secret": "cs_value_2",
            "page_token": "tok_value_2",
            "shop_key": "key_value_2",
            "store": "shop.example.com",
        },
        [
            "pw_value_1",
            "ak_value_1",
            "ck_value_1",
            "cs_value_1",
            "wh_value_1",
            "at_value_1",
            "rt_value_1",
            "pk_value_1",
            "sig_value_1",
            "ck_cookie_1",
            "ak_value_2",
            "cs_value_2",
            "tok_value_2",
            "key_value_2",
        ],
        ['"store": "shop.example.com"', '"password": "***"', '"shop_key": "***"'],
    ),
    (
        "nested dicts, lists and header tuples",
        {
            "request": {
                "headers": {
                    "Authorization": "Basic Y2tfMTpjc18x",
                    "X-WC-Webhook-Signature": "hmac_nested",
                    "Accept": "application/json",
                },
                "params": {"consumer_key": "ck_nested", "page": 2},
                "attempts": [{"token": "tok_in_list", "id": 7}],
                "raw_headers": [("Authorization", "Bearer tok_tuple"), ("User-Agent", "syncd/1")],
            }
        },
        ["Y2tfMTpjc18x", "hmac_nested", "ck_nested", "tok_in_list", "tok_tuple"],
        ["application/json", '"page": 2', '"id": 7', "syncd/1", '"Authorization", "***"'],
    ),
    (
        "authorization headers and schemes inside strings",
        {
            "dump": "Authorization: Basic Y2s6Y3M=\nAccept: application/json",
            "note": "retried with Bearer eyJhbGciOi.payload.sig then gave up",
            "klaviyo": "header Klaviyo-API-Key pk_live_abc123 rejected",
            "basic": "sent Basic dXNlcjpwYXNz to the store",
        },
        ["Y2s6Y3M=", "eyJhbGciOi.payload.sig", "pk_live_abc123", "dXNlcjpwYXNz"],
        [
            "Authorization: ***",
            "Accept: application/json",
            "retried with Bearer *** then gave up",
            "header Klaviyo-API-Key *** rejected",
            "sent Basic *** to the store",
        ],
    ),
    (
        "credentialed query parameters in URLs",
        {
            "url": "https://shop.example.com/wp-json/wc/v3/orders?consumer_key=ck_q1"
            "&consumer_secret=cs_q1&page=3&per_page=100",
            "signed": "http://127.0.0.1:8080/wp-json/wc/v3/customers?oauth_consumer_key=ck_q2"
            "&oauth_nonce=nonce_q2&oauth_signature=sig_q2&oauth_timestamp=1700000000",
            "others": "see https://api.example.com/x?api_key=ak_q3&access_token=at_q3"
            "&token=t_q3&key=k_q3&signature=s_q3&sig=g_q3&password=p_q3&lang=en",
        },
        [
            "ck_q1",
            "cs_q1",
            "ck_q2",
            "nonce_q2",
            "sig_q2",
            "ak_q3",
            "at_q3",
            "t_q3",
            "k_q3",
            "s_q3",
            "g_q3",
            "p_q3",
        ],
        [
            "https://shop.example.com/wp-json/wc/v3/orders?consumer_key=***&consumer_secret=***"
            "&page=3&per_page=100",
            "oauth_timestamp=1700000000",
            "&lang=en",
        ],
    ),
    (
        "user:password@ in URLs",
        {
            "dsn": "postgresql+psycopg://syncd:pg_pass_1@db:5432/syncd",
            "hook": {"target": "https://user:hook_pass_2@hooks.example.com/in"},
        },
        ["pg_pass_1", "hook_pass_2"],
        ["postgresql+psycopg://syncd:***@db:5432/syncd", "https://user:***@hooks.example.com/in"],
    ),
    (
        "pydantic secrets",
        {"creds": SecretStr("secretstr_1"), "nested": {"list": [SecretStr("secretstr_2"), "ok"]}},
        ["secretstr_1", "secretstr_2"],
        ['"creds": "***"', '"list": ["***", "ok"]'],
    ),
    (
        "secret keys inside JSON text and exception objects",
        {
            "body": '{"access_token": "at_json", "expires_in": 3600}',
            "error": ValueError("GET https://api.example.com/?api_key=ak_exc failed: 401"),
        },
        ["at_json", "ak_exc"],
        ['\\"expires_in\\": 3600', "ValueError", "failed: 401"],
    ),
]


@pytest.mark.parametrize(
    ("kwargs", "gone", "kept"),
    [case[1:] for case in REDACTION_CASES],
    ids=[case[0] for case in REDACTION_CASES],
)
def test_redaction(kwargs: dict[str, Any], gone: list[str], kept: list[str]) -> None:
    stream = json_output()
    get_logger("syncd").info("event", **kwargs)
    output = stream.getvalue()
    assert len(records(stream)) == 1
    for text in gone:
        assert text not in output
    for text in kept:
        assert text in output


def test_redaction_on_the_console_too() -> None:
    tty = FakeTTY()
    configure_logging("info", "console", tty)
    get_logger("syncd").info("call", url="https://x.example/?consumer_secret=cs_console")
    assert "cs_console" not in tty.getvalue()
    assert "consumer_secret=***" in tty.getvalue()


def test_redact_processor_is_pure_and_idempotent() -> None:
    event = {
        "event": "GET https://x.example/?token=abc123",
        "headers": {"Authorization": "Bearer abc123"},
        "webhook_secret": None,  # nothing to hide: "not set" stays visible
        "primary_key": 42,  # an identifier, not a credential
        "count": 3,
    }
    once = redact_processor(None, "info", event)
    assert once == {
        "event": "GET https://x.example/?token=***",
        "headers": {"Authorization": "***"},
        "webhook_secret": None,
        "primary_key": 42,
        "count": 3,
    }
    assert redact_processor(None, "info", dict(once)) == once
    assert event["headers"] == {"Authorization": "Bearer abc123"}  # input left alone


def test_non_secret_text_is_left_alone() -> None:
    event = {
        "event": "synced 120 orders from https://shop.example.com/wp-json/wc/v3/orders?page=2",
        "sort": "by date_modified=asc on the basic plan",
        "url": "https://shop.example.com/path",
    }
    assert redact_processor(None, "info", dict(event)) == event


def test_registered_secret_is_scrubbed_everywhere() -> None:
    register_secret("s3cr3t-v@lue!")
    register_secret("abc")  # too short to register: would mangle ordinary text
    stream = json_output()
    get_logger("syncd").error(
        "vendor echoed s3cr3t-v@lue! back",
        detail={"body": ["x s3cr3t-v@lue! y"]},
        encoded="https://x.example/cb?state=s3cr3t-v%40lue%21",
        plain="abc is fine",
    )
    output = stream.getvalue()
    (record,) = records(stream)
    assert "s3cr3t" not in output
    assert record["event"] == "vendor echoed *** back"
    assert record["detail"] == {"body": ["x *** y"]}
    assert record["encoded"] == "https://x.example/cb?state=***"
    assert record["plain"] == "abc is fine"


def test_longer_registered_secret_is_masked_whole() -> None:
    register_secret("abcd")
    register_secret("abcdefgh")
    assert redact_processor(None, "info", {"event": "x abcdefgh y abcd"}) == {
        "event": "x *** y ***"
    }


# --- the run line --------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "level"),
    [("success", "info"), ("partial", "warning"), ("failed", "error"), ("cancelled", "warning")],
)
def test_log_run_line(status: str, level: str) -> None:
    stream = json_output()
    started = time.monotonic() - 2.5
    log_run(
        "source",
        "woocommerce",
        status,
        started,
        {"fetched": 120, "upserted": 118, "quarantined": 2},
        error=None if status == "success" else "2 rows failed validation",
        stream_names=["orders", "customers"],
    )
    (record,) = records(stream)
    assert record["event"] == "run finished"
    assert record["level"] == level
    assert record["logger"] == "syncd.runs"
    assert (record["kind"], record["name"], record["status"]) == ("source", "woocommerce", status)
    assert record["counts"] == {"fetched": 120, "upserted": 118, "quarantined": 2}
    assert record["error"] == (None if status == "success" else "2 rows failed validation")
    assert record["stream_names"] == ["orders", "customers"]
    duration = record["duration_s"]
    assert 2.5 <= duration < 3.5
    assert round(duration, 3) == duration


def test_log_run_respects_level_and_redacts_errors() -> None:
    stream = json_output("error")
    started = time.monotonic()
    log_run("destination", "klaviyo", "success", started, {"sent": 1})
    log_run(
        "destination",
        "klaviyo",
        "failed",
        started,
        {"sent": 0},
        error="401 for Authorization: Klaviyo-API-Key pk_run_secret",
    )
    (record,) = records(stream)
    assert record["status"] == "failed"
    assert record["error"] == "401 for Authorization: ***"
    assert "pk_run_secret" not in stream.getvalue()
