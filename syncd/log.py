"""Logging: structlog set-up, the per-run summary line, and redaction of secrets.

As a service syncd writes one JSON object per line (for journald, Docker and log
shippers); on a terminal it writes readable, coloured lines. Both paths run the
same processor chain, and that chain always ends with redaction, so a secret
that reaches a log call (a header, a signed URL, an exception message) is masked
before anything is written.

Records from the standard library's ``logging`` (httpx, alembic, uvicorn) are
routed through the same processors and renderer, but only from WARNING up: their
INFO chatter (one line per HTTP request) would drown syncd's own lines.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, Literal, TextIO, cast
from urllib.parse import quote, quote_plus

import structlog
from pydantic import Secret, SecretBytes, SecretStr
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

__all__ = [
    "REDACTED",
    "configure_logging",
    "get_logger",
    "log_run",
    "redact_processor",
    "register_secret",
]

REDACTED = "***"

LogFormat = Literal["auto", "json", "console"]

_DEFAULT_LOGGER_NAME = "syncd"

_LEVELS: Mapping[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# ---------------------------------------------------------------------------
# What counts as secret
# ---------------------------------------------------------------------------

# Keys whose values are masked wholesale, wherever they appear (event keys,
# nested dicts, header tuples, "key": "value" pairs inside strings). Names are
# compared lower-cased with "-" read as "_", so HTTP header names match too.
_SECRET_KEY_NAMES = frozenset(
    {
        "password",
        "passwd",
        "passphrase",
        "secret",
        "token",
        "api_key",
        "apikey",
        "authorization",
        "proxy_authorization",
        "consumer_key",
        "consumer_secret",
        "signature",
        "cookie",
        "set_cookie",
        "webhook_secret",
        "access_token",
        "refresh_token",
        "private_key",
        "credentials",
        "oauth_nonce",
    }
)
_SECRET_KEY_SUFFIXES = ("_secret", "_token", "_key", "_password", "_signature")
# "_key" also ends names that are identifiers, not credentials; masking these
# would hide exactly what an operator needs to debug a sync.
_NOT_SECRET_KEYS = frozenset({"primary_key", "foreign_key", "idempotency_key", "sort_key"})

# Query-string / form parameters that carry a credential or a signature. WooCommerce
# puts consumer_key/consumer_secret in the query string in "query" auth mode and
# OAuth 1.0a puts oauth_signature/oauth_nonce there over plain HTTP.
SECRET_PARAMS = frozenset(
    {
        "consumer_key",
        "consumer_secret",
        "oauth_consumer_key",
        "oauth_signature",
        "oauth_nonce",
        "oauth_token",
        "api_key",
        "apikey",
        "access_token",
        "refresh_token",
        "client_secret",
        "token",
        "key",
        "signature",
        "sig",
        "password",
        "secret",
    }
)


def _is_secret_key(key: str) -> bool:
    normalized = key.strip().lower().replace("-", "_")
    if normalized in _NOT_SECRET_KEYS:
        return False
    return normalized in _SECRET_KEY_NAMES or normalized.endswith(_SECRET_KEY_SUFFIXES)


def _is_secret_param(name: str) -> bool:
    return name.lower() in SECRET_PARAMS or _is_secret_key(name)


# user:password@ in any scheme://; the user name is kept (it helps debugging).
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)([^\s/@:]*):([^\s/@]*)@")
# A header written out as text, "Authorization: Basic abc" (up to the end of the line).
# The quoted forms ('Authorization': '...', "authorization": "...") are handled by
# _QUOTED_PAIR; \s*+ is possessive so a quoted value cannot sneak in after a space.
_HEADER_LINE = re.compile(
    r"(?i)(?<![\w-])((?:proxy-)?authorization|cookie|set-cookie|x-api-key)(\s*+:\s*+)(?![\"'])[^\r\n]+"
)
# Credentials after an HTTP auth scheme, wherever they appear in a text. "Basic"
# must be capitalised as in a header: lower-case "basic" is an ordinary word
# ("basic auth", "basic plan") and an Authorization header is caught above anyway.
_AUTH_SCHEME = re.compile(
    r"\b((?i:Bearer|Klaviyo-API-Key)|Basic|BASIC)(\s++)(?!\*\*\*)[A-Za-z0-9\-._~+/]+=*"
)
# "key": "value" and 'key': 'value' inside a string: JSON bodies and Python reprs
# of dicts quoted in exception messages.
_QUOTED_PAIR = re.compile(r"""(["'])([A-Za-z_][\w-]*)\1(\s*+:\s*+)(["'])((?:\\.|(?!\4).)*)\4""")
# name=value in query strings, form bodies and "k=v" text; the value may be quoted
# (OAuth 1.0a Authorization header parameters are).
_PARAM = re.compile(r"""(?<![\w-])([A-Za-z_][\w-]*)=("[^"]*"|'[^']*'|[^&#\s"'<>,;)\]}]*)""")


class _SecretRegistry:
    """The actual secret values loaded at start-up, scrubbed from any logged text.

    Patterns catch secrets by their surroundings; this catches them by value, e.g.
    a consumer secret echoed back inside a vendor's error message.
    """

    # Shorter values would match ordinary text ("abc", "123") all over the logs.
    MIN_LENGTH = 4

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._lock = threading.Lock()
        self._pattern: re.Pattern[str] | None = None

    def add(self, value: str) -> None:
        if len(value) < self.MIN_LENGTH:
            return
        # Secrets also travel URL-encoded (query strings, form bodies).
        variants = {value, quote(value, safe=""), quote_plus(value, safe="")}
        with self._lock:
            if variants <= self._values:
                return
            self._values |= variants
            # Longest first, so a secret that contains another is masked whole.
            ordered = sorted(self._values, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(v) for v in ordered))

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
            self._pattern = None

    def scrub(self, text: str) -> str:
        pattern = self._pattern  # read once: add() may swap it concurrently
        return text if pattern is None else pattern.sub(REDACTED, text)


_SECRETS = _SecretRegistry()


def register_secret(value: str) -> None:
    """Scrub ``value`` from every log line from now on (values under 4 characters are ignored)."""
    _SECRETS.add(value)


def _mask_quoted_pair(match: re.Match[str]) -> str:
    quote_char, key, sep, value_quote, value = match.groups()
    if not _is_secret_key(key) or value == REDACTED:
        return match.group(0)
    return f"{quote_char}{key}{quote_char}{sep}{value_quote}{REDACTED}{value_quote}"


def _mask_param(match: re.Match[str]) -> str:
    name, value = match.groups()
    if not value or not _is_secret_param(name):
        return match.group(0)
    if value[0] in "\"'":
        return f"{name}={value[0]}{REDACTED}{value[0]}"
    return f"{name}={REDACTED}"


def _scrub(text: str) -> str:
    text = _SECRETS.scrub(text)
    text = _URL_USERINFO.sub(rf"\1\2:{REDACTED}@", text)
    text = _HEADER_LINE.sub(rf"\1\2{REDACTED}", text)
    text = _AUTH_SCHEME.sub(rf"\1\2{REDACTED}", text)
    text = _QUOTED_PAIR.sub(_mask_quoted_pair, text)
    return _PARAM.sub(_mask_param, text)


# Deeper structures are not something syncd logs on purpose; the cap keeps a
# self-referencing object from recursing forever.
_MAX_DEPTH = 12


def _redact_value(value: object, depth: int = 0) -> object:
    if isinstance(value, str):
        return _scrub(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, SecretStr | SecretBytes | Secret):
        return REDACTED
    if depth >= _MAX_DEPTH:
        return "…"
    if isinstance(value, Mapping):
        return {key: _redact_item(key, item, depth + 1) for key, item in value.items()}
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        # (name, value) pairs: how httpx and the stdlib represent raw headers and params.
        return (value[0], _redact_item(value[0], value[1], depth + 1))
    if isinstance(value, list | tuple | set | frozenset):
        redacted = [_redact_value(item, depth + 1) for item in value]
        return tuple(redacted) if isinstance(value, tuple) else redacted
    if isinstance(value, bytes | bytearray):
        text = bytes(value).decode("utf-8", "replace")
        scrubbed = _scrub(text)
        return value if scrubbed == text else scrubbed
    # Anything else (exceptions, httpx.URL, models) is rendered through repr() by
    # both renderers: check that text, and keep the object when nothing is secret.
    text = repr(value)
    scrubbed = _scrub(text)
    return value if scrubbed == text else scrubbed


def _redact_item(key: object, value: object, depth: int) -> object:
    if isinstance(key, str) and value is not None and _is_secret_key(key):
        return REDACTED
    return _redact_value(value, depth)


def redact_processor(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: mask secrets in every value of the event, at any depth.

    Masks values under secret-looking keys, pydantic secrets, credentials inside
    strings (Authorization headers, Bearer/Basic/Klaviyo-API-Key credentials,
    signed or credentialed query parameters, user:password@ in URLs) and every
    value passed to `register_secret`.
    """
    return {key: _redact_item(key, value, 0) for key, value in event_dict.items()}


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


class _LineWriter:
    """Writes whole lines to one stream under one lock.

    structlog's loggers and the stdlib handler both write through the same
    instance, so lines from threads and from the two paths never interleave.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._lock = threading.Lock()

    def write_line(self, line: str) -> None:
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()


class _WriterLogger:
    """The wrapped logger structlog hands the rendered line to, whatever the level."""

    def __init__(self, writer: _LineWriter, name: str) -> None:
        self._writer = writer
        self.name = name

    def msg(self, message: str) -> None:
        self._writer.write_line(message)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


class _StdlibHandler(logging.Handler):
    """Root handler that renders stdlib records with structlog's processors."""

    def __init__(self, writer: _LineWriter) -> None:
        super().__init__()
        self._writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._writer.write_line(self.format(record))
        except Exception:
            self.handleError(record)


def _add_logger_name(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    # The name given to get_logger() travels on the wrapped logger (see logger_factory).
    event_dict.setdefault("logger", getattr(logger, "name", _DEFAULT_LOGGER_NAME))
    return event_dict


_HEAD_KEYS = ("timestamp", "level", "logger", "event")


def _head_keys_first(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    # A fixed lead makes JSON lines scannable by eye; the bound keys follow.
    head = {key: event_dict.pop(key) for key in _HEAD_KEYS if key in event_dict}
    return {**head, **event_dict}


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        # Closed or file-like objects without a terminal behind them.
        return False


def configure_logging(
    level: str = "info", fmt: LogFormat = "auto", stream: TextIO | None = None
) -> None:
    """Set up structlog and the stdlib root handler; safe to call again to reconfigure.

    ``fmt="auto"`` renders readable (coloured) lines when ``stream`` is a terminal and
    JSON lines otherwise. ``stream`` defaults to stderr, which keeps stdout free for
    command output such as ``syncd status --json``.
    """
    numeric_level = _LEVELS.get(level.lower())
    if numeric_level is None:
        raise ValueError(f"unknown log level {level!r}: expected debug, info, warning or error")
    if fmt not in ("auto", "json", "console"):
        raise ValueError(f"unknown log format {fmt!r}: expected auto, json or console")
    out = stream if stream is not None else sys.stderr
    tty = _isatty(out)
    console = fmt == "console" or (fmt == "auto" and tty)

    renderer: Processor
    if console:
        renderer = structlog.dev.ConsoleRenderer(colors=tty and "NO_COLOR" not in os.environ)
    else:
        renderer = structlog.processors.JSONRenderer()

    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    # Tracebacks are formatted into a string *before* redaction, on both renderers,
    # so a secret inside an exception message is masked there too.
    tail: list[Processor] = [
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        redact_processor,
    ]
    if not console:
        tail.append(_head_keys_first)
    tail.append(renderer)

    writer = _LineWriter(out)

    def logger_factory(*args: Any) -> _WriterLogger:
        # structlog.get_logger(name) passes its positional arguments here.
        name = args[0] if args and isinstance(args[0], str) else _DEFAULT_LOGGER_NAME
        return _WriterLogger(writer, name)

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _add_logger_name,
            timestamper,
            *tail,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=logger_factory,
        # Off so that reconfiguring (tests, `syncd run` after CLI start-up) takes
        # effect for loggers created at import time.
        cache_logger_on_first_use=False,
    )

    handler = _StdlibHandler(writer)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.contextvars.merge_contextvars,
                structlog.processors.add_log_level,
                structlog.stdlib.add_logger_name,
                timestamper,
            ],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
        )
    )
    threshold = max(logging.WARNING, numeric_level)
    handler.setLevel(threshold)
    root = logging.getLogger()
    # Replace (not add to) a previous set-up: calling this twice must not double lines.
    for existing in list(root.handlers):
        if isinstance(existing, _StdlibHandler):
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(threshold)


def get_logger(name: str) -> FilteringBoundLogger:
    """A structlog logger whose lines carry ``logger=name``."""
    # A lazy proxy: it picks up the configuration in force when it is first used,
    # so module-level loggers created before configure_logging() still obey it.
    return cast(FilteringBoundLogger, structlog.get_logger(name))


_RUN_LEVELS: Mapping[str, int] = {
    "success": logging.INFO,
    "partial": logging.WARNING,
    "failed": logging.ERROR,
}
_runs_log = get_logger("syncd.runs")


def log_run(
    kind: str,
    name: str,
    status: str,
    started: float,
    counts: Mapping[str, int],
    error: str | None = None,
    **extra: object,
) -> None:
    """Log the one summary line of a finished run (source sync, segments, destination sync).

    ``started`` is the run's `time.monotonic()` at start. The level follows the
    status: info for "success", warning for "partial", error for "failed" (and
    warning for any status this function does not know, so it is still seen).
    """
    duration_s = round(max(0.0, time.monotonic() - started), 3)
    _runs_log.log(
        _RUN_LEVELS.get(status, logging.WARNING),
        "run finished",
        kind=kind,
        name=name,
        status=status,
        duration_s=duration_s,
        counts=dict(counts),
        error=error,
        **extra,
    )
