"""Settings: one TOML file plus ``SYNCD_*`` environment overrides (pydantic-settings).

Precedence, highest first: keyword arguments to `Settings`, the environment
(``SYNCD_<SECTION>__<KEY>``, e.g. ``SYNCD_SOURCES__WOOCOMMERCE__CONSUMER_SECRET``),
the TOML file, the defaults below. `load_settings` is the entry point: it reads
the file and a given environment mapping and turns every problem into one
`ConfigError` line of the form ``<file or variable>: <dotted.key>: <expected>``.

Secrets are `pydantic.SecretStr` and may be written literally or as references:
``env:NAME`` (read from the environment) or ``file:/path`` (the file's contents,
trailing newline stripped; a relative path is relative to the config file's
folder). Resolved secrets are registered with `syncd.log` so they are scrubbed
from log lines even where no pattern would recognise them.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import ssl
import stat
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Final, Literal, Union, get_args, get_origin
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    SecretStr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)
from pydantic_settings.sources.utils import parse_env_vars

from syncd.log import register_secret
from syncd.schedule import Schedule, ScheduleError, every, parse_schedule

__all__ = [
    "SOURCE_TYPES",
    "STREAMS",
    "ConfigError",
    "DestinationsSettings",
    "LogSettings",
    "PrivacySettings",
    "SecretRef",
    "SecretReferenceError",
    "SegmentSettings",
    "ServerSettings",
    "Settings",
    "SourceSettings",
    "StoreSettings",
    "WooCommerceSourceSettings",
    "http_url_parts",
    "load_settings",
    "loopback_host",
    "nothing_to_do",
    "refused_host",
    "resolve_config_path",
    "resolve_secret_reference",
    "sqlite_path",
]

ENV_PREFIX = "SYNCD_"
ENV_DELIMITER = "__"
DEFAULT_CONFIG_FILE = "config.toml"

StreamName = Literal["customers", "orders", "refunds", "products", "coupons"]
STREAMS: tuple[StreamName, ...] = get_args(StreamName)
# A WordPress role's slug as the `role` field of WooCommerce's customer JSON gives it:
# "customer", "subscriber", "shop_manager", a plugin's "wholesale_customer". Compared
# exactly, as WordPress compares roles.
RoleName = Annotated[str, Field(pattern=r"^\S+$")]
# The roles whose accounts are customers without an order, in a source that does not say.
DEFAULT_CUSTOMER_ROLES: tuple[str, ...] = ("customer",)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class ConfigError(Exception):
    """One or more configuration problems.

    ``problems`` holds ``(where, key, expected)`` triples: ``where`` is the config
    file (as given) or the environment variable the value came from, ``key`` the
    dotted key (empty for problems with the file as a whole). ``str()`` is one
    ``where: key: expected`` line per problem, ready for the command line.
    """

    def __init__(self, problems: Sequence[tuple[str, str, str]]) -> None:
        self.problems: list[tuple[str, str, str]] = list(problems)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(
            f"{where}: {key}: {expected}" if key else f"{where}: {expected}"
            for where, key, expected in self.problems
        )


class SecretReferenceError(ValueError):
    """An ``env:`` or ``file:`` secret reference that cannot be resolved."""


# ---------------------------------------------------------------------------
# Load context: which environment and folder validators resolve against
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _LoadContext:
    env: Mapping[str, str]
    base_dir: Path
    toml_data: Mapping[str, Any]


# Validators and settings_customise_sources are class-level hooks with no way to
# receive arguments; a context variable carries load_settings' arguments to them
# without touching os.environ, and stays correct across threads and tasks.
_LOAD_CONTEXT: ContextVar[_LoadContext | None] = ContextVar("syncd_config_load", default=None)


def _context_env() -> Mapping[str, str]:
    ctx = _LOAD_CONTEXT.get()
    return os.environ if ctx is None else ctx.env


def _context_base_dir() -> Path:
    ctx = _LOAD_CONTEXT.get()
    return Path.cwd() if ctx is None else ctx.base_dir


# ---------------------------------------------------------------------------
# Secrets
# ---------------------------------------------------------------------------


# A secret (an API key, a PEM private key) is a few KiB at most; reading more is a mistake.
MAX_SECRET_FILE_BYTES = 64 * 1024


def resolve_secret_reference(value: str, *, env: Mapping[str, str], base_dir: Path) -> str:
    """The secret ``value`` stands for: ``env:NAME``, ``file:PATH``, or ``value`` itself.

    Raises `SecretReferenceError` naming the variable or file (never a secret).
    Mapping files use this too, so credentials are referenced the same way everywhere.
    """
    if value.startswith("env:"):
        name = value[len("env:") :].strip()
        if not name:
            raise SecretReferenceError("expected env:NAME with a variable name")
        if name not in env:
            raise SecretReferenceError(f"environment variable {name} is not set")
        return env[name]
    if value.startswith("file:"):
        raw = value[len("file:") :].strip()
        if not raw:
            raise SecretReferenceError("expected file:PATH with a path")
        path = Path(raw).expanduser()
        if not path.is_absolute():
            path = base_dir / path
        try:
            # A regular file only, checked before opening it: /dev/zero or /dev/urandom
            # would be read without end, and opening a FIFO blocks until a writer comes.
            if not stat.S_ISREG(path.stat().st_mode):
                raise SecretReferenceError(f"expected a regular file: {path} is not one")
            with path.open("rb") as handle:
                data = handle.read(MAX_SECRET_FILE_BYTES + 1)
            if len(data) > MAX_SECRET_FILE_BYTES:
                raise SecretReferenceError(
                    f"expected a secret file of at most {MAX_SECRET_FILE_BYTES // 1024} KiB: "
                    f"{path} is larger"
                )
            text = data.decode("utf-8")
        except FileNotFoundError:
            raise SecretReferenceError(f"secret file {path} not found") from None
        except UnicodeDecodeError:
            raise SecretReferenceError(f"secret file {path} is not UTF-8 text") from None
        except OSError as exc:
            raise SecretReferenceError(
                f"cannot read secret file {path}: {exc.strerror or exc}"
            ) from None
        # `echo secret > file` and most editors add a final newline; it is never
        # part of the secret (Docker and Kubernetes secrets usually have none).
        return text.rstrip("\r\n")
    return value


def _resolve_secret_field(value: object) -> object:
    if not isinstance(value, str):
        # SecretStr passed in code is taken as is; other types fail SecretStr's check.
        return value
    try:
        resolved = resolve_secret_reference(value, env=_context_env(), base_dir=_context_base_dir())
    except SecretReferenceError as exc:
        raise PydanticCustomError("secret_reference", "{reason}", {"reason": str(exc)}) from None
    if not resolved:
        # An empty secret is always a mistake, and an empty webhook secret would
        # make every signature check trivially forgeable.
        raise PydanticCustomError("secret_empty", "expected a non-empty secret")
    return resolved


SecretRef = Annotated[SecretStr, BeforeValidator(_resolve_secret_field)]
"""A secret given literally, as ``env:NAME`` or as ``file:PATH``."""


def mask_url_password(url: str) -> str:
    """``user:secret@host`` → ``user:***@host``; any other URL unchanged."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if not password:
        return url
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _shown(value: str, limit: int = 80) -> str:
    return repr(value if len(value) <= limit else value[: limit - 1] + "…")


# ---------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


def _check_name(name: str) -> str:
    # Names become environment variable parts (SYNCD_SOURCES__<NAME>__…, which the
    # environment source lower-cases), CLI arguments and keys in the store.
    if not _NAME_RE.fullmatch(name):
        raise PydanticCustomError(
            "config_name",
            "expected a name of lowercase letters, digits, '_' and '-' (at most 64), got {name}",
            {"name": _shown(name)},
        )
    return name


Name = Annotated[str, AfterValidator(_check_name)]


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------

# Every model rejects unknown keys (a typo must not silently fall back to a default)
# and keeps inputs out of pydantic's own error text, which could otherwise print a
# secret if a ValidationError escaped somewhere.
# allow_inf_nan=False: TOML has inf and nan, and no rate, interval or timeout is either.
_MODEL_CONFIG = ConfigDict(extra="forbid", hide_input_in_errors=True, allow_inf_nan=False)


def http_url_parts(url: str) -> SplitResult | None:
    """``url`` split, when it is an http:// or https:// URL with a host and a valid port (the
    only kind syncd.http, httpx underneath, sends to); else None."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return None
    return parts


def refused_host(host: str) -> str | None:
    """Why syncd refuses to send requests to ``host`` (a URL's hostname), or None.

    Link-local addresses (169.254.0.0/16, fe80::/10) hold cloud metadata services
    (169.254.169.254 on AWS, GCP and Azure), which hand out the machine's credentials to
    any request: no store or destination API lives there. Also 0.0.0.0 and ::, which
    reach the local host. Loopback (127.0.0.0/8, ::1) stays allowed: a store, relay or
    test server on the same host is a normal setup. Only literal addresses are checked;
    a name is resolved when a request is made.
    """
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_link_local:
        return f"expected a host that is not link-local (cloud metadata), got {host}"
    if address.is_unspecified:
        return f"expected a host address, got {host} (any address)"
    return None


def loopback_host(host: str) -> bool:
    """Whether ``host`` names this machine: 127.0.0.0/8, ::1, ``localhost`` or a name
    under ``.localhost`` (RFC 6761 reserves it for loopback)."""
    name = host.strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


class StoreSettings(BaseModel):
    """Where syncd keeps its tables."""

    model_config = _MODEL_CONFIG

    url: str = "sqlite:///state/syncd.db"
    batch_size: Annotated[int, Field(ge=1, le=10_000)] = 1000

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # A Postgres URL may carry a password; repr() must not.
        for name, value in super().__repr_args__():
            yield name, mask_url_password(value) if name == "url" else value

    @field_serializer("url", when_used="json")
    def _serialize_url(self, url: str) -> str:
        # JSON dumps (status output, diagnostics) mask the password like SecretStr
        # masks secrets; Python-mode dumps keep the working URL.
        return mask_url_password(url)

    @field_validator("url")
    @classmethod
    def _normalise_url(cls, value: str) -> str:
        url = value.strip()
        lowered = url.lower()
        for alias in ("postgresql://", "postgres://"):
            if lowered.startswith(alias):
                # We ship psycopg 3; SQLAlchemy's bare postgresql:// means psycopg2.
                return "postgresql+psycopg://" + url[len(alias) :]
        if lowered.startswith(("sqlite:///", "postgresql+psycopg://")):
            return url
        raise PydanticCustomError(
            "store_url",
            "expected sqlite:///… or postgresql+psycopg://…, got {url}",
            {"url": _shown(mask_url_password(url))},
        )


_TRUE_WORDS: tuple[str, ...] = ("true", "yes", "on", "1")
_FALSE_WORDS: tuple[str, ...] = ("false", "no", "off", "0")


def _verify_tls_value(value: object) -> object:
    """``verify_tls``: true, false, or the path of a PEM file of the CAs to trust.

    A relative path is relative to the config file's folder, like ``file:`` secrets.
    The file is loaded here, so a wrong path or a file that holds no certificate is a
    configuration error at ``syncd validate`` rather than a failure at the first sync.
    """
    if not isinstance(value, str | Path):
        return value
    text = str(value).strip()
    if text.lower() in _TRUE_WORDS:  # an environment override is always a string
        return True
    if text.lower() in _FALSE_WORDS:
        return False
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = _context_base_dir() / path
    try:
        ssl.create_default_context(cafile=str(path))
    except FileNotFoundError:
        raise PydanticCustomError(
            "verify_tls", "expected true, false or a CA file: {path} not found", {"path": str(path)}
        ) from None
    except OSError as exc:  # ssl.SSLError among them
        if isinstance(exc, ssl.SSLError):  # NO_CERTIFICATE_OR_CRL_FOUND
            reason = (exc.reason or str(exc)).replace("_", " ").lower()
        else:
            reason = (exc.strerror or str(exc)).lower()
        raise PydanticCustomError(
            "verify_tls",
            "expected a PEM file of CA certificates: {path}: {reason}",
            {"path": str(path), "reason": reason},
        ) from None
    return path


# How often a source is polled when it does not say.
DEFAULT_SOURCE_SCHEDULE: Final = "every 15m"


class ScheduledSourceSettings(BaseModel):
    """When the daemon polls a source, and how late its last success may be: the keys
    every source type shares."""

    model_config = _MODEL_CONFIG

    # The older key for the polling interval, still read (any positive number of
    # minutes); ``schedule`` replaces it and both at once is an error.
    sync_every_minutes: Annotated[float, Field(gt=0)] | None = None
    # ``every N s|m|h|d`` (at least every 10 s) or a 5-field cron expression in UTC.
    schedule: str = DEFAULT_SOURCE_SCHEDULE
    # Each scheduled run starts up to this many seconds late, at random, so several
    # sources (or replicas) do not hit the store in lockstep.
    jitter_seconds: Annotated[float, Field(ge=0)] = 30.0
    # /readyz and the alerts call the source stale when its last successful sync is
    # older than this. Default: 0 = three polling intervals (a cron schedule's longest).
    stale_after_minutes: Annotated[float, Field(ge=0)] = 0.0

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("sync_every_minutes") is not None:
            raise PydanticCustomError(
                "schedule_twice",
                "expected schedule or its old form sync_every_minutes, not both "
                "(delete sync_every_minutes)",
            )
        try:
            return parse_schedule(value).text
        except ScheduleError as exc:
            raise PydanticCustomError("schedule", "{message}", {"message": str(exc)}) from None

    @property
    def poll_schedule(self) -> Schedule:
        """The schedule the daemon polls this source on."""
        if self.sync_every_minutes is not None:
            return every(self.sync_every_minutes * 60)
        return parse_schedule(self.schedule)

    @property
    def freshness_minutes(self) -> float:
        return self.stale_after_minutes or 3 * self.poll_schedule.longest_wait() / 60


class _TypeRequired:
    """Marks a source that has no ``type`` and is not named after one."""

    def __repr__(self) -> str:
        return "<type required>"


_TYPE_REQUIRED = _TypeRequired()


class WooCommerceSourceSettings(ScheduledSourceSettings):
    """One WooCommerce store, read through its REST API (v3)."""

    model_config = _MODEL_CONFIG

    type: Literal["woocommerce"] = "woocommerce"
    url: str
    consumer_key: SecretRef
    consumer_secret: SecretRef
    webhook_secret: SecretRef | None = None
    auth: Literal["auto", "basic", "oauth1", "query"] = "auto"
    oauth_signature_method: Literal["HMAC-SHA256", "HMAC-SHA1"] = "HMAC-SHA256"
    streams: list[StreamName] = Field(default_factory=lambda: list(STREAMS))
    # WooCommerce caps per_page at 100.
    per_page: Annotated[int, Field(ge=1, le=100)] = 100
    # The HTTP layer's limits for this store (pages in flight, requests per second;
    # None, or 0 in the file, for no rate limit) and its retry policy.
    concurrency: Annotated[int, Field(ge=1, le=32)] = 4
    requests_per_second: Annotated[float, Field(gt=0)] | None = 10.0
    timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 8
    max_retry_seconds: Annotated[float, Field(ge=0)] = 300.0
    # How far each incremental window re-reads before the cursor: covers clock skew
    # between store and syncd, and rows sharing the cursor's timestamp.
    overlap_seconds: Annotated[int, Field(ge=0)] = 600
    # Id reconciliation finds hard deletes (which no modified-since query returns);
    # 0 = on every run.
    reconcile_every_hours: Annotated[float, Field(ge=0)] = 24.0
    # True: the system's CAs; a path: the CAs of that PEM file alone (a store's own CA
    # or self-signed certificate); False: no check.
    verify_tls: Annotated[bool | Path, BeforeValidator(_verify_tls_value)] = True
    # The WordPress roles whose accounts are customers even before they buy (prospects).
    # /customers?role=all lists every user (WooCommerce 10.0 REST, customers controller),
    # administrators and shop managers included: they are customers only once they have
    # an order that is not trashed or deleted.
    customer_roles: list[RoleName] = Field(default_factory=lambda: list(DEFAULT_CUSTOMER_ROLES))

    @field_validator("type", mode="before")
    @classmethod
    def _type_given(cls, value: object) -> object:
        if value is _TYPE_REQUIRED:
            raise PydanticCustomError(
                "source_type_required",
                "field required (the source's name is not a source type; add type = {example})",
                {"example": '"woocommerce"'},
            )
        return value

    @field_validator("url")
    @classmethod
    def _normalise_url(cls, value: str) -> str:
        url = value.strip()
        parts = http_url_parts(url)
        if parts is None:
            raise PydanticCustomError(
                "source_url",
                "expected the store's http:// or https:// URL, got {url}",
                {"url": _shown(mask_url_password(url))},
            )
        if parts.username is not None or parts.password is not None:
            raise PydanticCustomError(
                "source_url",
                "expected a URL without user:password@ (credentials go in consumer_key "
                "and consumer_secret)",
            )
        if parts.query or parts.fragment:
            raise PydanticCustomError(
                "source_url",
                "expected the store's base URL without ?query or #fragment, got {url}",
                {"url": _shown(url)},
            )
        if reason := refused_host(parts.hostname or ""):
            raise PydanticCustomError("source_url", "{reason}", {"reason": reason})
        # Endpoint paths are appended to this URL, so no trailing slash is kept.
        return urlunsplit(
            (parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/"), "", "")
        )

    @field_validator("requests_per_second", mode="before")
    @classmethod
    def _zero_is_unlimited(cls, value: object) -> object:
        # TOML has no null: 0 is how a file says "no request rate limit".
        if isinstance(value, int | float) and not isinstance(value, bool) and value == 0:
            return None
        if isinstance(value, str) and value.strip() in ("0", "0.0"):
            return None
        return value

    @field_validator("customer_roles")
    @classmethod
    def _unique_roles(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    @field_validator("streams")
    @classmethod
    def _unique_streams(cls, value: list[StreamName]) -> list[StreamName]:
        return list(dict.fromkeys(value))

    @property
    def effective_auth(self) -> Literal["basic", "oauth1", "query"]:
        """The authentication to use: ``auto`` is HTTP Basic over https, OAuth 1.0a over http.

        WooCommerce only accepts Basic auth over TLS; over plain HTTP it requires
        OAuth 1.0a signatures.
        """
        if self.auth != "auto":
            return self.auth
        return "basic" if self.url.startswith("https://") else "oauth1"


# One settings model per source type, told apart by `type` (the registry in syncd.sources
# maps the same names to the source classes). A new source is one more member here.
def _source_tag(value: Any) -> str | None:
    """The settings model a source is validated with: the one its ``type`` names. A table
    without a usable type goes to the first model, whose ``type`` check says what is wrong,
    so its other keys are checked all the same."""
    if isinstance(value, Mapping):
        tag = value.get("type")
        return tag if isinstance(tag, str) else SOURCE_TYPES[0]
    return getattr(value, "type", None)


# A second source type is one more `| Annotated[ItsSettings, Tag("its_type")]`.
SourceSettings = Annotated[
    Annotated[WooCommerceSourceSettings, Tag("woocommerce")],
    Discriminator(_source_tag),
]


def _tags(annotation: Any) -> tuple[str, ...]:
    """The ``Tag``s of a (union of) tagged settings model(s), in order."""
    first, *meta = get_args(annotation)
    if get_origin(first) in (Union, UnionType):
        return tuple(tag for member in get_args(first) for tag in _tags(member))
    return tuple(m.tag for m in meta if isinstance(m, Tag))


SOURCE_TYPES: tuple[str, ...] = _tags(SourceSettings)


class ServerSettings(BaseModel):
    """The service's HTTP side (health, metrics, status, webhooks)."""

    model_config = _MODEL_CONFIG

    host: Annotated[str, Field(min_length=1)] = "127.0.0.1"
    # 0 asks the OS for a free port (tests, the sandbox).
    port: Annotated[int, Field(ge=0, le=65535)] = 8787
    # When set, every endpoint but /healthz and the store webhooks (which carry their own
    # signature) requires "Authorization: Bearer <token>". Recommended whenever the port is
    # reachable by anything but the local prober: /status and /metrics read the store.
    token: SecretRef | None = None
    # Open connections served at once (kept below the process's open-files limit). At the
    # cap a new connection pushes out the one that has waited longest on its client.
    max_connections: Annotated[int, Field(ge=1)] = 1000
    # Webhook requests being read or answered at once; beyond it a delivery gets 503.
    max_webhook_requests: Annotated[int, Field(ge=1)] = 64
    # A client must send a request's headers, then its body, within these many seconds.
    header_timeout_seconds: Annotated[float, Field(gt=0)] = 10.0
    body_timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    # /status answers from a copy at most this old (0: query the store every time).
    status_cache_seconds: Annotated[float, Field(ge=0)] = 5.0


class AlertSettings(BaseModel):
    """When the service raises an alert (an error log line, and a POST to a Slack-compatible
    webhook when one is configured), once per incident, with a recovery notice."""

    model_config = _MODEL_CONFIG

    # A Slack (or compatible: Mattermost, Rocket.Chat, Teams workflows) incoming webhook.
    slack_webhook_url: SecretRef | None = None
    # A job that failed this many times in a row.
    consecutive_failures: Annotated[int, Field(ge=1)] = 3
    # A destination sync whose refused rows exceed this share of the rows it sent.
    rejected_share: Annotated[float, Field(gt=0, le=1)] = 0.05


class PrivacySettings(BaseModel):
    """Privacy requests and retention (README, "Privacy requests")."""

    model_config = _MODEL_CONFIG

    # Raw payloads of source rows and webhook deliveries older than this many days are
    # dropped once parsed (the parsed rows stay). Unset: raw payloads are kept.
    raw_payload_days: Annotated[int, Field(ge=1)] | None = None
    # How often `syncd run` runs the due steps of open forget requests (each failed step
    # also waits its own back-off) and applies the retention.
    schedule: str = "every 5m"

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        try:
            return parse_schedule(value).text
        except ScheduleError as exc:
            raise PydanticCustomError("schedule", "{message}", {"message": str(exc)}) from None


class LogSettings(BaseModel):
    model_config = _MODEL_CONFIG

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class SegmentSettings(BaseModel):
    """A segment: a rule in syncd's rule language or a SQL query over the store."""

    model_config = _MODEL_CONFIG

    rule: str | None = None
    sql: str | None = None
    group: str | None = None
    priority: int = 0

    @field_validator("rule")
    @classmethod
    def _rule_compiles(cls, rule: str | None) -> str | None:
        # Checked against customer_profiles' columns and types without a database, so
        # `syncd validate` catches a typo in a rule before any recompute runs.
        if rule is None:
            return None
        from syncd.segments.rules import RuleError, check_rule
        from syncd.store.models import PROFILES

        try:
            check_rule(rule, PROFILES)
        except RuleError as exc:
            raise PydanticCustomError("segment_rule", "{message}", {"message": str(exc)}) from None
        return rule

    @model_validator(mode="after")
    def _exactly_one_definition(self) -> SegmentSettings:
        if (self.rule is None) == (self.sql is None):
            got = "both" if self.rule is not None else "neither"
            raise PydanticCustomError(
                "segment_definition", "expected exactly one of rule or sql, got {got}", {"got": got}
            )
        return self


class LifecycleSettings(BaseModel):
    """Thresholds of the lifecycle stages (see the README's "Lifecycle stages")."""

    model_config = _MODEL_CONFIG

    # A one-order customer is "new" for this many days after the order.
    new_days: Annotated[int, Field(ge=0)] = 30
    # The purchase rhythm assumed for one-order customers (repeat buyers have their own:
    # the average days between their orders).
    default_rhythm_days: Annotated[int, Field(ge=1)] = 60
    # Rhythms shorter than this are raised to it (a burst of same-week orders is not a rhythm).
    min_rhythm_days: Annotated[int, Field(ge=1)] = 7
    # days since the last order, as a multiple of the rhythm, past which a customer is ...
    at_risk_ratio: Annotated[float, Field(gt=0)] = 1.5
    lapsed_ratio: Annotated[float, Field(gt=0)] = 3.0
    churned_ratio: Annotated[float, Field(gt=0)] = 6.0
    # ... or P(alive) below which (when the BG/NBD model is fitted) a customer is ...
    at_risk_p_alive: Annotated[float, Field(ge=0, le=1)] = 0.5
    lapsed_p_alive: Annotated[float, Field(ge=0, le=1)] = 0.3
    churned_p_alive: Annotated[float, Field(ge=0, le=1)] = 0.1

    @model_validator(mode="after")
    def _ordered(self) -> LifecycleSettings:
        if not self.at_risk_ratio <= self.lapsed_ratio <= self.churned_ratio:
            raise PydanticCustomError(
                "lifecycle_order", "expected at_risk_ratio <= lapsed_ratio <= churned_ratio"
            )
        if not self.at_risk_p_alive >= self.lapsed_p_alive >= self.churned_p_alive:
            raise PydanticCustomError(
                "lifecycle_order",
                "expected at_risk_p_alive >= lapsed_p_alive >= churned_p_alive",
            )
        return self


class ClvSettings(BaseModel):
    """The predictive CLV models (BG/NBD and Gamma-Gamma)."""

    model_config = _MODEL_CONFIG

    # Monthly discount rate of the 12-month CLV (0.01 = 1 % a month).
    discount_rate_monthly: Annotated[float, Field(ge=0, lt=1)] = 0.01
    # Below these many customers (repeat buyers for Gamma-Gamma) a model is not fitted.
    min_customers: Annotated[int, Field(ge=10)] = 50
    min_repeat_buyers: Annotated[int, Field(ge=10)] = 30


def _check_currency(code: str) -> str:
    from syncd.money import MoneyError, exponent

    try:
        exponent(code)
    except MoneyError:
        raise PydanticCustomError(
            "currency", "expected an ISO 4217 currency code, got {code}", {"code": _shown(code)}
        ) from None
    return code


Currency = Annotated[str, AfterValidator(_check_currency)]


def _check_rate(rate: Decimal) -> Decimal:
    if not rate.is_finite() or rate <= 0:
        raise PydanticCustomError("rate", "expected a positive exchange rate")
    if -int(rate.as_tuple().exponent) > 8:
        raise PydanticCustomError("rate", "expected at most 8 decimal places")
    return rate


Rate = Annotated[Decimal, AfterValidator(_check_rate)]


class ProfileSettings(BaseModel):
    """How customer profiles are computed (see the README's "customer_profiles")."""

    model_config = _MODEL_CONFIG

    # Order statuses that count as a purchase.
    paid_statuses: Annotated[list[str], Field(min_length=1)] = ["processing", "completed"]
    # Order statuses that are an open cart when newer than the customer's last purchase.
    cart_statuses: list[str] = ["checkout-draft", "pending"]
    # Amounts are reported in this currency. Unset: the one currency the orders are in.
    reporting_currency: Currency | None = None
    # Units of the reporting currency per unit of another: { USD = "0.92" }. Every currency
    # orders are in needs one; the reporting currency itself is 1.
    rates: dict[Currency, Rate] = Field(default_factory=dict)
    lifecycle: LifecycleSettings = Field(default_factory=LifecycleSettings)
    clv: ClvSettings = Field(default_factory=ClvSettings)


class ConsentChannelSettings(BaseModel):
    """Where one channel's consent is read (``[consent.email]``, ``.sms``, ``.ads``).

    Either statements in the source's records (``customer_meta_keys``: a registered
    customer's meta entries; ``order_meta_keys``: an order's, which is where checkout
    consent plugins write, so guests count), the latest of which wins; or a ``rule`` over
    ``customer_profiles`` (the segment rule language); or a boolean profile ``column``.
    """

    model_config = _MODEL_CONFIG

    customer_meta_keys: list[str] = Field(default_factory=list)
    order_meta_keys: list[str] = Field(default_factory=list)
    rule: str | None = None
    column: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> ConsentChannelSettings:
        kinds = [
            bool(self.customer_meta_keys or self.order_meta_keys),
            self.rule is not None,
            self.column is not None,
        ]
        if sum(kinds) > 1:
            raise PydanticCustomError(
                "consent_kind",
                "expected meta keys, a rule or a column, not several (the latest statement "
                "of the meta keys is the consent; a rule or a column replaces it)",
            )
        if self.rule is not None:
            from syncd.segments.rules import RuleError, check_rule
            from syncd.store.models import PROFILES

            if re.search(r"\bconsent_", self.rule):
                raise PydanticCustomError(
                    "consent_rule", "a consent rule cannot read the consent columns it sets"
                )
            try:
                check_rule(self.rule, PROFILES)
            except RuleError as exc:
                raise PydanticCustomError(
                    "consent_rule", "{message}", {"message": str(exc)}
                ) from None
        if self.column is not None:
            from syncd.store.models import PROFILES

            column = PROFILES.c.get(self.column)
            boolean = column is not None and column.type.python_type is bool
            if not boolean or self.column.startswith("consent_"):
                raise PydanticCustomError(
                    "consent_column",
                    "expected a boolean customer_profiles column other than the consent "
                    "columns, got {column!r}",
                    {"column": self.column},
                )
        return self

    def describe(self) -> str:
        """The channel's rule in words, for ``syncd validate``."""
        if self.rule is not None:
            return f"rule {self.rule}"
        if self.column is not None:
            return f"column {self.column}"
        parts = []
        if self.customer_meta_keys:
            parts.append("customer meta " + ", ".join(self.customer_meta_keys))
        if self.order_meta_keys:
            parts.append("order meta " + ", ".join(self.order_meta_keys))
        return "; ".join(parts) or "nothing configured: nobody consents"


# The channels a consent is given for; a sync's `consent` names one (or "none").
CONSENT_CHANNELS: Final = ("email", "sms", "ads")
# Mailchimp for WooCommerce keeps a shopper's newsletter opt-in in this user meta: the
# email channel's keys when the config says nothing (what syncd read before [consent]).
LEGACY_EMAIL_META_KEY: Final = "mailchimp_woocommerce_is_subscribed"


class ConsentSettings(BaseModel):
    """``[consent]``: one table per channel."""

    model_config = _MODEL_CONFIG

    email: ConsentChannelSettings = Field(
        default_factory=lambda: ConsentChannelSettings(customer_meta_keys=[LEGACY_EMAIL_META_KEY])
    )
    sms: ConsentChannelSettings = Field(default_factory=ConsentChannelSettings)
    ads: ConsentChannelSettings = Field(default_factory=ConsentChannelSettings)

    def channel(self, name: str) -> ConsentChannelSettings:
        value: ConsentChannelSettings = getattr(self, name)
        return value


class DestinationsSettings(BaseModel):
    model_config = _MODEL_CONFIG

    mappings: list[str] = Field(default_factory=list)


# ---------------------------------------------------------------------------
# Settings sources
# ---------------------------------------------------------------------------


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source, reading a given mapping instead of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        self._env_mapping = env  # read by _load_env_vars during super().__init__
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(
            self._env_mapping, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str
        )

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        # A table or list given as invalid JSON is passed on as the string it is, so
        # validation reports it against the variable ("expected a list") instead of
        # pydantic-settings raising an error that names neither key nor variable.
        try:
            return super().decode_complex_value(field_name, field, value)
        except ValueError:
            return value


class _TomlSource(InitSettingsSource):
    """The parsed config file, merged below the environment.

    load_settings parses the file itself (to report syntax errors with their
    position and to attribute later errors to the file), so this source serves
    that parsed data rather than reading the file a second time.
    """

    def __init__(self, settings_cls: type[BaseSettings], data: Mapping[str, Any]) -> None:
        super().__init__(settings_cls, dict(data))

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(keys={sorted(self.init_kwargs)})"


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------


class Settings(BaseSettings):
    """All of syncd's settings. Build with `load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        case_sensitive=False,
        extra="forbid",
        hide_input_in_errors=True,
    )

    store: StoreSettings = Field(default_factory=StoreSettings)
    sources: dict[Name, SourceSettings] = Field(default_factory=dict)
    server: ServerSettings = Field(default_factory=ServerSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    profiles: ProfileSettings = Field(default_factory=ProfileSettings)
    segments: dict[Name, SegmentSettings] = Field(default_factory=dict)
    destinations: DestinationsSettings = Field(default_factory=DestinationsSettings)
    alerts: AlertSettings = Field(default_factory=AlertSettings)
    privacy: PrivacySettings = Field(default_factory=PrivacySettings)
    consent: ConsentSettings = Field(default_factory=ConsentSettings)

    # Not a settings key: where these settings were loaded from (None when built in code).
    _config_path: Path | None = PrivateAttr(default=None)

    @property
    def config_path(self) -> Path | None:
        """The config file these settings were loaded from, or None."""
        return self._config_path

    @property
    def config_dir(self) -> Path:
        """The folder relative paths in the config are read against (cwd without a file)."""
        if self._config_path is None:
            return Path.cwd()
        return self._config_path.absolute().parent

    def mapping_paths(self) -> list[Path]:
        """``destinations.mappings`` as paths, relative ones taken from the config's folder."""
        paths = [Path(entry).expanduser() for entry in self.destinations.mappings]
        return [path if path.is_absolute() else self.config_dir / path for path in paths]

    @field_validator("sources", mode="before")
    @classmethod
    def _source_types(cls, value: object) -> object:
        # `type` may be left out only when the source is named after its type
        # ([sources.woocommerce]); [sources.shop_eu] must say what it is.
        if not isinstance(value, Mapping):
            return value
        typed: dict[object, object] = {}
        for name, body in value.items():
            if isinstance(body, Mapping) and "type" not in body:
                body = {**body, "type": name if name in SOURCE_TYPES else _TYPE_REQUIRED}
            typed[name] = body
        return typed

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest first: code, environment, the TOML file. No .env or secrets-dir
        # sources: secrets come through env:/file: references instead.
        ctx = _LOAD_CONTEXT.get()
        env = os.environ if ctx is None else ctx.env
        toml_data: Mapping[str, Any] = {} if ctx is None else ctx.toml_data
        return (
            init_settings,
            _MappingEnvSource(settings_cls, env),
            _TomlSource(settings_cls, toml_data),
        )


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def resolve_config_path(cli_path: str | None, env: Mapping[str, str] = os.environ) -> Path:
    """The config file to use: ``--config``, else ``$SYNCD_CONFIG``, else ``./config.toml``."""
    if cli_path:
        return Path(cli_path).expanduser()
    from_env = env.get("SYNCD_CONFIG", "").strip()
    if from_env:
        return Path(from_env).expanduser()
    return Path(DEFAULT_CONFIG_FILE)


_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


def _read_toml(path: Path) -> dict[str, Any]:
    where = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            [(where, "", "config file not found (give --config FILE or set SYNCD_CONFIG)")]
        ) from None
    except IsADirectoryError:
        raise ConfigError([(where, "", "expected a TOML file, got a directory")]) from None
    except OSError as exc:
        raise ConfigError([(where, "", f"cannot read: {exc.strerror or exc}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([(where, "", f"expected UTF-8 text: {exc.reason}")]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # Python 3.11's TOMLDecodeError has no lineno/colno attributes: the position
        # is only in the message, "... (at line 3, column 9)".
        message = str(exc)
        position = _TOML_POSITION.search(message)
        key = ""
        if position:
            key = f"line {position.group(1)}, column {position.group(2)}"
            message = message[: position.start()]
        raise ConfigError([(where, key, f"invalid TOML: {message}")]) from None


def _env_paths(
    env: Mapping[str, str],
) -> tuple[dict[tuple[str, ...], str], list[tuple[str, str, str]]]:
    """Map each ``SYNCD_<SECTION>[__<KEY>…]`` variable to its key path; flag unknown sections.

    Only names with the nested ``__`` delimiter can be meant as settings, so other
    SYNCD_* variables (SYNCD_CONFIG, test switches) are left alone.
    """
    paths: dict[tuple[str, ...], str] = {}
    problems: list[tuple[str, str, str]] = []
    sections = list(Settings.model_fields)
    for name in env:
        if not name.upper().startswith(ENV_PREFIX):
            continue
        parts = tuple(name[len(ENV_PREFIX) :].lower().split(ENV_DELIMITER))
        if parts[0] in Settings.model_fields:
            paths[parts] = name
        elif len(parts) > 1:
            problems.append((name, ".".join(parts), _unknown_key(parts[0], sections)))
    return paths, problems


def _unknown_key(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"unknown key (did you mean {close[0]!r}?)" if close else "unknown key"


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated and Optional from a field annotation."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
            continue
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        if origin is not None and type(None) in get_args(annotation) and len(args) == 1:
            annotation = args[0]
            continue
        return annotation


def _walk(loc: Sequence[str | int]) -> tuple[type[BaseModel] | None, FieldInfo | None]:
    """The model holding the last key of ``loc`` and that key's field, where known."""
    model: type[BaseModel] | None = Settings
    current: Any = Settings
    field: FieldInfo | None = None
    for index, part in enumerate(loc):
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            model = current
            field = current.model_fields.get(str(part))
            if field is None:
                return (model, None) if index == len(loc) - 1 else (None, None)
            current = field.annotation
        elif get_origin(current) is dict:
            current = get_args(current)[1]
            model, field = None, None
        elif get_origin(current) is list:
            current = get_args(current)[0]
            model, field = None, None
        else:
            return None, None
    return model, field


def _is_secret_field(field: FieldInfo | None) -> bool:
    if field is None:
        return False
    annotation = field.annotation

    def mentions_secret(tp: Any) -> bool:
        return tp is SecretStr or any(mentions_secret(arg) for arg in get_args(tp))

    return mentions_secret(annotation)


def _dotted(loc: Sequence[str | int]) -> str:
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key


_PLAIN_EXPECTATIONS = {
    "missing": "field required",
    "int_parsing": "expected an integer",
    "int_type": "expected an integer",
    "int_from_float": "expected a whole number",
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "bool_parsing": "expected true or false",
    "bool_type": "expected true or false",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "dict_type": "expected a table",
    "model_type": "expected a table",
    "model_attributes_type": "expected a table",
}


def _expectation(error: Mapping[str, Any], secret: bool) -> str:
    kind = str(error["type"])
    ctx: Mapping[str, Any] = error.get("ctx") or {}
    if kind == "extra_forbidden":
        # The value is never echoed: a misspelled secret key still holds a secret.
        loc = _source_loc([part for part in error["loc"] if part != "[key]"])
        model, _ = _walk(loc)
        known = list(model.model_fields) if model is not None else []
        return _unknown_key(str(loc[-1]), known)
    if kind in _PLAIN_EXPECTATIONS:
        text = _PLAIN_EXPECTATIONS[kind]
    elif kind == "literal_error":
        expected = str(ctx.get("expected", ""))
        text = f"expected one of {expected}" if " or " in expected else f"expected {expected}"
    elif kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        bound = {
            "greater_than_equal": ("at least", "ge"),
            "less_than_equal": ("at most", "le"),
            "greater_than": ("more than", "gt"),
            "less_than": ("less than", "lt"),
        }[kind]
        text = f"expected {bound[0]} {ctx.get(bound[1])}"
    elif kind == "too_short" or kind == "string_too_short":
        text = "expected a non-empty value"
    elif "Input should be" in str(error["msg"]):
        text = str(error["msg"]).replace("Input should be", "expected", 1)
    else:
        # Our own PydanticCustomErrors already say what was expected (and never
        # include a secret); pydantic's other messages are shown as they are.
        return str(error["msg"])
    value = error.get("input")
    if kind != "missing" and not secret and isinstance(value, str | int | float | bool):
        shown = _shown(value) if isinstance(value, str) else repr(value)
        text += f", got {shown}"
    return text


def _where(
    loc: Sequence[str | int],
    env_paths: Mapping[tuple[str, ...], str],
    toml_data: Mapping[str, Any],
    file_label: str | None,
) -> str:
    """The variable a value came from, else the config file (or the variable to set)."""
    parts = tuple(str(part) for part in loc)
    for end in range(len(parts), 0, -1):
        if parts[:end] in env_paths:
            return env_paths[parts[:end]]
    # Nothing set this key: a missing field or a cross-field check. Point at the
    # file when the surrounding table is in the file, else at the variable to set.
    depth_in_file = 0
    node: Any = toml_data
    for part in parts:
        if not isinstance(node, Mapping) or part not in node:
            break
        node = node[part]
        depth_in_file += 1
    depth_in_env = max(
        (
            end
            for path in env_paths
            for end in range(len(parts), 0, -1)
            if path[:end] == parts[:end]
        ),
        default=0,
    )
    if file_label is not None and depth_in_file >= depth_in_env:
        return file_label
    return ENV_PREFIX + ENV_DELIMITER.join(parts).upper()


def _source_loc(loc: list[str | int]) -> list[str | int]:
    """An error's place without the source type pydantic puts after a source's name
    (``sources.shop.woocommerce.url`` -> ``sources.shop.url``)."""
    if len(loc) >= 3 and loc[0] == "sources" and loc[2] in SOURCE_TYPES:
        return [*loc[:2], *loc[3:]]
    return loc


def _source_type_problem(error: Mapping[str, Any]) -> str | None:
    """What a source's ``type`` was expected to be, for an error about it."""
    if error["type"] == "union_tag_invalid":
        known = " or ".join(repr(t) for t in SOURCE_TYPES)
        expected = f"one of {known}" if len(SOURCE_TYPES) > 1 else known
        tag = (error.get("ctx") or {}).get("tag")
        return f"expected {expected}, got {_shown(str(tag))}"
    return None


def _problems(
    exc: ValidationError,
    env_paths: Mapping[tuple[str, ...], str],
    toml_data: Mapping[str, Any],
    file_label: str | None,
) -> list[tuple[str, str, str]]:
    problems: list[tuple[str, str, str]] = []
    for error in exc.errors():
        loc = _source_loc([part for part in error["loc"] if part != "[key]"])
        _, field = _walk(loc)
        expectation = _source_type_problem(error)
        if expectation is not None:
            loc = [*loc, "type"]
        else:
            expectation = _expectation(error, secret=_is_secret_field(field))
        problem = (
            _where(loc, env_paths, toml_data, file_label),
            _dotted(loc),
            expectation,
        )
        if problem not in problems:
            problems.append(problem)
    return problems


def _secret_values(value: object) -> Iterator[str]:
    if isinstance(value, SecretStr):
        yield value.get_secret_value()
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _secret_values(getattr(value, name))
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _secret_values(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _secret_values(item)


def load_settings(path: Path | None, env: Mapping[str, str] | None = None) -> Settings:
    """Load settings from the TOML file at ``path`` and the environment ``env``.

    ``env`` defaults to os.environ; when given, os.environ is not read at all (for
    overrides nor for ``env:`` references). ``path=None`` means no file: defaults
    and the environment only. Raises `ConfigError` listing every problem found.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    file_label = None if path is None else str(path)
    toml_data: dict[str, Any] = {} if path is None else _read_toml(path)
    base_dir = Path.cwd() if path is None else path.absolute().parent

    env_paths, problems = _env_paths(environ)
    token = _LOAD_CONTEXT.set(_LoadContext(env=environ, base_dir=base_dir, toml_data=toml_data))
    try:
        settings = Settings()
    except ValidationError as exc:
        problems += _problems(exc, env_paths, toml_data, file_label)
        # `from None`: the chained ValidationError would print input values
        # (secrets included) in a traceback; every fact is in the problems.
        raise ConfigError(problems) from None
    except SettingsError as exc:
        problems.append(("environment", "", str(exc)))
        raise ConfigError(problems) from None
    finally:
        _LOAD_CONTEXT.reset(token)
    if problems:
        raise ConfigError(problems)

    settings._config_path = path
    if "consent" not in settings.model_fields_set:
        _legacy_consent_keys(settings)
    for secret in _secret_values(settings):
        register_secret(secret)
    try:
        db_password = urlsplit(settings.store.url).password
    except ValueError:
        db_password = None
    if db_password:
        register_secret(unquote(db_password))
    return settings


def _legacy_consent_keys(settings: Settings) -> None:
    """Without a ``[consent]`` table, the email channel reads the customer meta keys the
    mappings name in the old form (``consent_meta_keys`` of a sync, default
    ``mailchimp_woocommerce_is_subscribed``), so a store upgraded as it is keeps the
    consent it had. Read here, not by the mapping loader, so every command (``syncd sync``
    loads no mapping) extracts the same statements. A mapping that cannot be read is
    skipped here: loading the mappings reports it."""
    keys = list(settings.consent.email.customer_meta_keys)
    for mapping in settings.mapping_paths():
        try:
            data = tomllib.loads(mapping.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            continue
        syncs = data.get("sync")
        for sync in syncs if isinstance(syncs, list) else ():
            named = sync.get("consent_meta_keys") if isinstance(sync, dict) else None
            if isinstance(named, list):
                keys += [k for k in named if isinstance(k, str) and k not in keys]
    settings.consent.email.customer_meta_keys = keys


def nothing_to_do(settings: Settings) -> tuple[str, str] | None:
    """``(key, expected)`` when the settings name no source, segment or mapping file: an
    empty or mistyped config (its sections under the wrong names) that would run idle."""
    if settings.sources or settings.segments or settings.destinations.mappings:
        return None
    return (
        "sources",
        "expected at least one of [sources.NAME], [segments.NAME] or destinations.mappings "
        "(the config has nothing to do)",
    )


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL (relative to the cwd), or None.

    None for other databases and for in-memory SQLite.
    """
    prefix = "sqlite:///"
    if not url.lower().startswith(prefix):
        return None
    database = unquote(url[len(prefix) :].split("?", 1)[0])
    if database in ("", ":memory:"):
        return None
    return Path(database)
