"""Mapping files: one TOML file per destination saying which rows go where, and how.

A mapping names its destination type, credentials by reference (``env:NAME`` or
``file:PATH``, resolved like the config's secrets), an optional ``base_url``, and one or
more ``[[sync]]`` tables. Each sync reads a segment's members (or a SQL model), maps
every row through ``fields`` and sends it in ``mode`` (upsert, mirror, event, delete).

A field is ``"column"``, ``"{{ column }} text {{ other }}"`` (a template), either piped
through transforms: ``"email | trim | lower | sha256"``. Loading checks everything that
can be checked without the store (columns of segment syncs, transform names and
arguments, the adapter's modes, options and credentials) and reports each problem as
``file: key: what was expected``, the same shape as config errors.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from syncd.config import (
    ConfigError,
    SecretReferenceError,
    Settings,
    http_url_parts,
    loopback_host,
    refused_host,
    resolve_secret_reference,
)
from syncd.destinations import DESTINATION_TYPES, destination_class
from syncd.destinations.base import Destination, Mode, SyncTarget
from syncd.http import ServiceLimits
from syncd.identity import e164, hash_hex
from syncd.money import exponent
from syncd.schedule import parse_schedule
from syncd.sources import SOURCE_TYPES, source_class
from syncd.store.models import PROFILES

if TYPE_CHECKING:
    from syncd.sources.base import PushColumns

__all__ = [
    "PII_COLUMNS",
    "ROW_COLUMNS",
    "VIRTUAL_COLUMNS",
    "FieldMap",
    "LoadedMapping",
    "LoadedSync",
    "consent_rule",
    "load_mapping",
    "load_mappings",
    "parse_field",
]

# The columns each source type contributes to segment syncs, by the config's source ``type``.
SOURCE_COLUMNS: Final[Mapping[str, PushColumns]] = {
    name: columns
    for name in SOURCE_TYPES
    if (columns := source_class(name).push_columns) is not None
}
# Columns a segment sync can read: the profile, when the member entered the segment,
# the person's contact details from `customers`, every segment the person is in, and the
# columns of the sources (see syncd.push.rows for how each is read).
PERSON_COLUMNS: Final = ("phone", "city", "postcode")
# Old names of profile columns, still read: `marketing_consent` was the WooCommerce opt-in
# flag of a sync's consent_meta_keys; it is the email consent of the profile now.
LEGACY_COLUMNS: Final[Mapping[str, str]] = {"marketing_consent": "consent_email"}
VIRTUAL_COLUMNS: Final = (
    "entered_at",
    *PERSON_COLUMNS,
    "segments",
    *LEGACY_COLUMNS,
    *dict.fromkeys(
        name
        for columns in SOURCE_COLUMNS.values()
        for name in (*columns.expressions, *columns.flags)
    ),
)
ROW_COLUMNS: Final = frozenset(PROFILES.c.keys()) | frozenset(VIRTUAL_COLUMNS)
# Columns whose values identify a person: masked in --dry-run samples.
PII_COLUMNS: Final = frozenset({"email", "first_name", "last_name", "phone", "city", "postcode"})

_NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_TEMPLATE_RE: Final = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_COLUMN_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DEST_FIELD_RE: Final = re.compile(r"[A-Za-z0-9_$-]+(\.[A-Za-z0-9_$-]+)*")
_DELAY_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DELAY_RE: Final = re.compile(r"(\d+)\s*(s|m|h|d)")
# A refused row's waits before its 2nd, 3rd and 4th try; refused a 4th time, it is given up.
DEFAULT_RETRY_DELAYS: Final = ("1h", "6h", "24h")


# ---------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------


Transform = Callable[[Any, Mapping[str, Any]], Any]


class TransformError(ValueError):
    pass


def _hash(algorithm: str) -> Transform:
    # The value as it is (a mapping normalizes it first with trim | lower): hashing
    # something else than what the mapping says would surprise whoever compares digests.
    def apply(value: Any, row: Mapping[str, Any]) -> Any:
        return None if value is None else hash_hex(algorithm, str(value))

    return apply


def _e164(region: str | None) -> Transform:
    def apply(value: Any, row: Mapping[str, Any]) -> Any:
        hint = region or row.get("country")
        return e164(None if value is None else str(value), hint if isinstance(hint, str) else None)

    return apply


def _date(fmt: str) -> Transform:
    def apply(value: Any, row: Mapping[str, Any]) -> Any:
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = datetime.fromisoformat(value)
            except ValueError:
                return value  # not a date: passed on as it is rather than lost
        if isinstance(value, (date, datetime)):
            return value.strftime(fmt)
        return value

    return apply


def _minor_to_major(currency: str | None) -> Transform:
    def apply(value: Any, row: Mapping[str, Any]) -> Any:
        if value is None:
            return None
        code = currency or row.get("currency")
        exp = exponent(code) if isinstance(code, str) and code else 2
        # Decimal first, so 1999 -> 19.99 exactly; float() of that decimal prints back
        # as the same digits in JSON (shortest round-trip repr).
        major = Decimal(int(value)).scaleb(-exp)
        return int(major) if exp == 0 else float(major)

    return apply


def _default(fallback: str) -> Transform:
    return lambda value, row: fallback if value is None or value == "" else value


def _join(separator: str) -> Transform:
    def apply(value: Any, row: Mapping[str, Any]) -> Any:
        if isinstance(value, (list, tuple)):
            return separator.join(str(v) for v in value)
        return value

    return apply


def _strings(method: Callable[[str], str]) -> Transform:
    return lambda value, row: method(value) if isinstance(value, str) else value


# name -> (factory taking the argument, whether the argument is required)
_TRANSFORMS: Final[dict[str, tuple[Callable[[str | None], Transform], bool | None]]] = {
    "lower": (lambda arg: _strings(str.lower), False),
    "upper": (lambda arg: _strings(str.upper), False),
    "trim": (lambda arg: _strings(str.strip), False),
    "sha256": (lambda arg: _hash("sha256"), False),
    "md5": (lambda arg: _hash("md5"), False),
    "e164": (lambda arg: _e164(arg), None),  # optional region; else the row's country
    "date": (lambda arg: _date(arg or ""), True),
    "minor_to_major": (lambda arg: _minor_to_major(arg), None),  # else the row's currency
    "default": (lambda arg: _default(arg or ""), True),
    "join": (lambda arg: _join(arg if arg is not None else ","), None),
}
TRANSFORM_NAMES: Final = tuple(_TRANSFORMS)


@dataclass(frozen=True)
class FieldMap:
    """One destination field: where its value comes from and what is done to it."""

    target: str
    spec: str
    columns: tuple[str, ...]  # the row columns it reads
    template: str | None  # "{{ a }} {{ b }}", or None for a plain column
    transforms: tuple[Transform, ...]

    def value(self, row: Mapping[str, Any]) -> Any:
        if self.template is not None:
            value: Any = _TEMPLATE_RE.sub(
                lambda m: _template_text(row.get(m.group(1))), self.template
            )
        else:
            value = row.get(self.columns[0])
        for transform in self.transforms:
            value = transform(value, row)
        return value


def _template_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _split_pipes(spec: str) -> list[str]:
    # "|" separates steps; inside {{ }} it cannot occur (column names are identifiers).
    return [part.strip() for part in spec.split("|")]


def parse_field(target: str, spec: str) -> FieldMap:
    """Parse one ``fields`` entry; TransformError says what is wrong."""
    if not _DEST_FIELD_RE.fullmatch(target):
        raise TransformError("expected a destination field name of letters, digits, _ - $ and dots")
    parts = _split_pipes(spec)
    source, steps = parts[0], parts[1:]
    if not source:
        raise TransformError("expected a column name or a {{ column }} template before any '|'")
    template: str | None = None
    if "{{" in source or "}}" in source:
        columns = tuple(dict.fromkeys(_TEMPLATE_RE.findall(source)))
        leftover = _TEMPLATE_RE.sub("", source)
        if not columns or "{{" in leftover or "}}" in leftover:
            raise TransformError(f"expected {{{{ column }}}} placeholders in template {source!r}")
        template = source
    elif _COLUMN_RE.fullmatch(source):
        columns = (source,)
    else:
        raise TransformError(
            f"expected a column name or a {{{{ column }}}} template, got {source!r}"
        )
    transforms = []
    for step in steps:
        name, colon, arg = step.partition(":")
        name = name.strip()
        if name not in _TRANSFORMS:
            raise TransformError(
                f"unknown transform {name!r} (expected one of {', '.join(TRANSFORM_NAMES)})"
            )
        factory, needs_arg = _TRANSFORMS[name]
        argument: str | None = arg if colon else None
        if needs_arg and not argument:
            raise TransformError(f"transform {name} needs an argument: {name}:VALUE")
        if needs_arg is False and colon:
            raise TransformError(f"transform {name} takes no argument")
        if name == "date" and argument is not None:
            try:
                datetime(2024, 1, 2, 3, 4, 5).strftime(argument)
            except ValueError as exc:
                raise TransformError(f"bad date format {argument!r}: {exc}") from None
        if (
            name == "minor_to_major"
            and argument is not None
            and not re.fullmatch(r"[A-Z]{3}", argument)
        ):
            raise TransformError(f"expected a currency code like EUR, got {argument!r}")
        transforms.append(factory(argument))
    # minor_to_major and e164 read the row's currency/country when given no argument.
    extra: list[str] = []
    for step in steps:
        if step.strip() == "minor_to_major":
            extra.append("currency")
        if step.strip() == "e164":
            extra.append("country")
    return FieldMap(
        target=target,
        spec=spec,
        columns=tuple(dict.fromkeys((*columns, *extra))),
        template=template,
        transforms=tuple(transforms),
    )


def nest(flat: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """``[("properties.clv", 1)]`` -> ``{"properties": {"clv": 1}}``."""
    out: dict[str, Any] = {}
    for name, value in flat:
        parts = name.split(".")
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
    return out


# ---------------------------------------------------------------------------
# The file's models
# ---------------------------------------------------------------------------

# allow_inf_nan=False: TOML has inf and nan; a rate of inf would never pace anything.
_MODEL_CONFIG = ConfigDict(extra="forbid", hide_input_in_errors=True, allow_inf_nan=False)


class SyncSpec(BaseModel):
    model_config = _MODEL_CONFIG

    name: str
    segment: str | None = None
    sql: str | None = None
    key: str = "customer_id"  # the SQL model's column that identifies a record
    mode: Mode
    object: str | None = None
    match: Any = None  # removed: a mapping that still sets it is told to delete the line
    fields: dict[str, str] = Field(default_factory=dict)
    schedule: str | None = None
    batch_size: Annotated[int, Field(ge=1)] | None = None
    # Tries of a refused row's content before it is given up; None: one more than the
    # retry delays (4 with the default 1h, 6h, 24h).
    max_attempts: Annotated[int, Field(ge=1, le=100)] | None = None
    # How long a refused row waits before its next try, after its 1st, 2nd, … refusal
    # (the last delay repeats); None: the mapping's, else DEFAULT_RETRY_DELAYS.
    retry_delays: list[str] | None = None
    source: str | None = None  # the WooCommerce source woocommerce_id refers to
    # The old form of consent, kept working: the registered customer meta keys the
    # `marketing_consent` column reads. The config's [consent.email] is the new one.
    consent_meta_keys: list[str] = Field(
        # Mailchimp for WooCommerce keeps a shopper's newsletter opt-in in this user meta.
        default_factory=lambda: ["mailchimp_woocommerce_is_subscribed"]
    )
    # The marketing consent every row needs: "email", "sms", "ads", or "none" (with a
    # consent_reason). Unset: the destination's channel (Klaviyo, Mailchimp: email).
    consent: Literal["email", "sms", "ads", "none"] | None = None
    consent_reason: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.fullmatch(value):
            raise ValueError(
                f"expected a name of lowercase letters, digits, '_' and '-', got {value!r}"
            )
        return value

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        # A ScheduleError is a ValueError: its message becomes the problem's.
        return None if value is None else parse_schedule(value).text

    @field_validator("match")
    @classmethod
    def _match(cls, value: Any) -> None:
        # It was read and checked, never used: each destination matches people by the
        # identity its API defines (Klaviyo: email, phone_number or external_id; Mailchimp:
        # the email address; WooCommerce: the customer id; a webhook: the record key).
        raise ValueError(
            "no longer read: delete this line (each destination matches people by the "
            "identity fields its API defines, see the README)"
        )

    @field_validator("retry_delays")
    @classmethod
    def _retry_delays(cls, value: list[str] | None) -> list[str] | None:
        return _check_delays(value)


def _check_delays(value: list[str] | None) -> list[str] | None:
    for delay in value or ():
        if _DELAY_RE.fullmatch(delay.strip()) is None:
            raise ValueError(f"expected delays like '30m', '6h' or '1d', got {delay!r}")
    return value


def delay_seconds(delays: Sequence[str]) -> tuple[int, ...]:
    """``["1h", "6h"]`` as seconds: ``(3600, 21600)`` (checked by the spec's validator)."""
    out: list[int] = []
    for delay in delays:
        match = _DELAY_RE.fullmatch(delay.strip())
        assert match is not None
        out.append(int(match.group(1)) * _DELAY_SECONDS[match.group(2)])
    return tuple(out)


class LimitsSpec(BaseModel):
    model_config = _MODEL_CONFIG

    requests_per_second: Annotated[float, Field(gt=0)] | None = None
    concurrency: Annotated[int, Field(ge=1, le=64)] | None = None


class MappingSpec(BaseModel):
    model_config = _MODEL_CONFIG

    destination: str
    name: str | None = None
    # Declared before base_url: its validator reads this value.
    allow_loopback: bool = False
    base_url: str | None = None
    credentials: dict[str, str] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)
    limits: LimitsSpec = Field(default_factory=LimitsSpec)
    retry_delays: list[str] | None = None  # every sync's, unless it sets its own
    sync: list[SyncSpec] = Field(min_length=1)

    @field_validator("retry_delays")
    @classmethod
    def _retry_delays(cls, value: list[str] | None) -> list[str] | None:
        return _check_delays(value)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        # Every adapter sends through syncd.http (httpx), which only speaks http(s): a
        # file: URL used to pass here and crash the push with a traceback.
        if value is None:
            return None
        parts = http_url_parts(value.strip())
        if parts is None:
            raise ValueError(f"expected an http:// or https:// URL, got {value[:80]!r}")
        host = parts.hostname or ""
        if reason := refused_host(host):
            raise ValueError(reason)
        # A destination on this machine is a relay or a test server, or a URL that a
        # template or a typo left pointing at localhost: personal data would go to
        # whatever listens there. It takes a line in the file saying it is meant.
        if loopback_host(host) and not info.data.get("allow_loopback"):
            raise ValueError(
                f"expected a host that is not this machine, got {host}; "
                "add allow_loopback = true to the mapping if a relay or test server "
                "on this host is meant"
            )
        return value

    @field_validator("destination")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in DESTINATION_TYPES:
            raise ValueError(
                f"expected a destination type ({', '.join(DESTINATION_TYPES)}), got {value!r}"
            )
        return value


# ---------------------------------------------------------------------------
# Loaded, checked mappings
# ---------------------------------------------------------------------------


@dataclass
class LoadedSync:
    spec: SyncSpec
    target: SyncTarget
    fields: tuple[FieldMap, ...]
    batch_size: int  # per op: min(asked, vendor maximum) is applied by batch_for()
    fingerprint: str  # changes whenever what a row becomes could change
    # Seconds a refused row waits before its next try, after its 1st, 2nd, … refusal.
    retry_delays: tuple[int, ...] = delay_seconds(DEFAULT_RETRY_DELAYS)
    # The columns of the sources its rows can read: its `source`'s, else every type's.
    source_columns: tuple[PushColumns, ...] = ()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def consent(self) -> str:
        """The consent channel each row needs, or "none"."""
        return self.target.consent

    @property
    def max_attempts(self) -> int:
        """Refusals of one content after which its row is given up."""
        return self.spec.max_attempts or len(self.retry_delays) + 1

    def columns(self) -> tuple[str, ...]:
        """Every row column the fields read, in a fixed order (the content hash uses it)."""
        return tuple(dict.fromkeys(c for f in self.fields for c in f.columns))

    def payload(self, row: Mapping[str, Any]) -> dict[str, Any]:
        return nest((f.target, f.value(row)) for f in self.fields)


@dataclass
class LoadedMapping:
    path: Path
    name: str
    spec: MappingSpec
    adapter: type[Destination]
    credentials: dict[str, SecretStr]
    options: BaseModel
    limits: ServiceLimits | None
    syncs: list[LoadedSync] = field(default_factory=list)

    def open(self, transport: Any = None) -> Destination:
        """The adapter, connected (its HTTP client made)."""
        return self.adapter(
            self.name,
            self.credentials,
            self.options,
            base_url=self.spec.base_url,
            limits=self.limits,
            transport=transport,
        )

    def batch_for(self, sync: LoadedSync, op: str) -> int:
        return min(sync.batch_size, self.adapter.max_batch.get(op, 1))


def _loc(data: Mapping[str, Any], loc: Sequence[str | int]) -> str:
    parts: list[str] = []
    node: Any = data
    for part in loc:
        if isinstance(part, int):
            name = (
                node[part].get("name")
                if isinstance(node, list) and part < len(node) and isinstance(node[part], dict)
                else None
            )
            parts[-1] = f"{parts[-1]}[{name if isinstance(name, str) else part}]"
        else:
            parts.append(str(part))
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            node = None
    return ".".join(parts)


def _pydantic_problems(
    where: str, data: Mapping[str, Any], exc: ValidationError, prefix: str = ""
) -> list[tuple[str, str, str]]:
    problems = []
    for error in exc.errors():
        key = _loc(data, error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] == "missing":
            message = "required key missing"
        problems.append((where, f"{prefix}{key}" if key else prefix.rstrip("."), message))
    return problems


def load_mapping(
    path: Path, settings: Settings, env: Mapping[str, str] | None = None
) -> LoadedMapping:
    """Read and check one mapping file; ConfigError lists every problem found."""
    import os

    where = str(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([(where, "", "mapping file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([(where, "", f"cannot read the mapping file: {exc}")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([(where, "", f"invalid TOML: {exc}")]) from None
    try:
        spec = MappingSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_pydantic_problems(where, data, exc)) from None

    adapter = destination_class(spec.destination)
    problems: list[tuple[str, str, str]] = []
    environ = os.environ if env is None else env
    credentials: dict[str, SecretStr] = {}
    for name in adapter.credential_names:
        if name not in spec.credentials:
            problems.append((where, f"credentials.{name}", f"required by {spec.destination}"))
    for name, ref in spec.credentials.items():
        if name not in adapter.credential_names:
            problems.append(
                (
                    where,
                    f"credentials.{name}",
                    f"unknown credential (expected {', '.join(adapter.credential_names)})",
                )
            )
            continue
        try:
            secret = resolve_secret_reference(ref, env=environ, base_dir=path.absolute().parent)
        except SecretReferenceError as exc:
            problems.append((where, f"credentials.{name}", str(exc)))
            continue
        if not secret:
            problems.append((where, f"credentials.{name}", "expected a non-empty secret"))
            continue
        credentials[name] = SecretStr(secret)
    if not problems and (reason := adapter.check_credentials(credentials)):
        problems.append((where, "credentials", reason))
    if spec.base_url is None and not problems:
        try:
            adapter.default_base_url(credentials)
        except ValueError as exc:  # webhook and WooCommerce have no default API root
            problems.append((where, "base_url", str(exc)))
    try:
        options = adapter.Options.model_validate(spec.options)
    except ValidationError as exc:
        problems += _pydantic_problems(where, spec.options, exc, "options.")
        options = adapter.Options.model_construct()

    # None unless the mapping asks: an adapter with several rate classes (Klaviyo)
    # then paces each at its vendor's own limit.
    limits: ServiceLimits | None = None
    if spec.limits.requests_per_second is not None or spec.limits.concurrency is not None:
        base = adapter.default_limits
        limits = replace(
            base,
            requests_per_second=spec.limits.requests_per_second or base.requests_per_second,
            concurrency=spec.limits.concurrency or base.concurrency,
        )
    name = spec.name or path.stem
    loaded = LoadedMapping(path, name, spec, adapter, credentials, options, limits)
    for sync in spec.sync:
        prefix = f"sync[{sync.name}]."
        result = _load_sync(where, prefix, sync, spec, adapter, settings, problems)
        if result is not None:
            loaded.syncs.append(result)
    if problems:
        raise ConfigError(problems)
    return loaded


def _load_sync(
    where: str,
    prefix: str,
    sync: SyncSpec,
    spec: MappingSpec,
    adapter: type[Destination],
    settings: Settings,
    problems: list[tuple[str, str, str]],
) -> LoadedSync | None:
    before = len(problems)
    if (sync.segment is None) == (sync.sql is None):
        problems.append((where, prefix.rstrip("."), "expected exactly one of segment or sql"))
    if sync.segment is not None and sync.segment not in settings.segments:
        known = ", ".join(settings.segments) or "none configured"
        problems.append(
            (where, f"{prefix}segment", f"unknown segment {sync.segment!r} (configured: {known})")
        )
    if sync.mode not in adapter.modes:
        problems.append(
            (
                where,
                f"{prefix}mode",
                f"{spec.destination} supports {', '.join(sorted(adapter.modes))}, not {sync.mode}",
            )
        )
    if sync.mode in adapter.object_required and not sync.object:
        problems.append(
            (
                where,
                f"{prefix}object",
                f"required by {spec.destination} in {sync.mode} mode"
                + (f" ({adapter.object_help})" if adapter.object_help else ""),
            )
        )
    if not sync.fields and sync.mode != "delete":
        problems.append((where, f"{prefix}fields", "expected at least one field"))
    fields: list[FieldMap] = []
    for dest_field, source in sync.fields.items():
        try:
            fmap = parse_field(dest_field, source)
        except TransformError as exc:
            problems.append((where, f"{prefix}fields.{dest_field}", str(exc)))
            continue
        if sync.sql is None:
            unknown = [c for c in fmap.columns if c not in ROW_COLUMNS]
            if unknown:
                problems.append(
                    (
                        where,
                        f"{prefix}fields.{dest_field}",
                        f"unknown column {unknown[0]!r} (expected a customer_profiles column "
                        f"or one of {', '.join(VIRTUAL_COLUMNS)})",
                    )
                )
                continue
        fields.append(fmap)
    if sync.batch_size is not None and sync.batch_size < 1:
        problems.append((where, f"{prefix}batch_size", "expected at least 1"))
    try:
        sync_options = adapter.SyncOptions.model_validate(sync.options)
    except ValidationError as exc:
        problems += _pydantic_problems(where, sync.options, exc, f"{prefix}options.")
        sync_options = adapter.SyncOptions.model_construct()
    else:
        if problem := adapter.target_problem(sync.mode, sync_options):
            problems.append((where, f"{prefix}options", problem))
    consent = _consent_of(sync, adapter)
    if sync.consent == "none" and not (sync.consent_reason or "").strip():
        problems.append(
            (
                where,
                f"{prefix}consent_reason",
                'consent = "none" sends people who gave no marketing consent: say why '
                '(consent_reason = "order status updates", a transactional use)',
            )
        )
    if len(problems) > before:
        return None
    target = SyncTarget(
        name=sync.name, mode=sync.mode, object=sync.object, options=sync_options, consent=consent
    )
    largest = max(adapter.max_batch.values())
    fingerprint = hashlib.blake2b(
        orjson.dumps(
            {
                "destination": spec.destination,
                "mode": sync.mode,
                "object": sync.object,
                "fields": sync.fields,
                # The removed `match` key, as every mapping without it had it: unchanged
                # fingerprints send nothing again.
                "match": [],
                "options": sync.options,
                "source": sync.source,
                "consent": sync.consent_meta_keys,
                # Only when a channel applies: syncs without one keep their fingerprint,
                # and a sync gaining one re-sends its rows (subscribed this time).
                **({"consent_channel": consent} if consent != "none" else {}),
            },
            option=orjson.OPT_SORT_KEYS,
        ),
        digest_size=16,
    ).hexdigest()
    return LoadedSync(
        spec=sync,
        target=target,
        fields=tuple(fields),
        batch_size=min(sync.batch_size or largest, largest),
        fingerprint=fingerprint,
        source_columns=_source_columns(sync, settings),
        retry_delays=delay_seconds(
            next(
                d
                for d in (sync.retry_delays, spec.retry_delays, DEFAULT_RETRY_DELAYS)
                if d is not None
            )
        ),
    )


def _consent_of(sync: SyncSpec, adapter: type[Destination]) -> str:
    """The channel a sync's rows need: its own ``consent``, else its destination's. A
    delete sync needs none: an erasure goes to everyone it names."""
    if sync.mode == "delete":
        return "none"
    return sync.consent or adapter.consent_channel


def consent_rule(sync: LoadedSync, settings: Settings) -> str:
    """A sync's consent rule in words (``syncd validate``)."""
    if sync.consent == "none":
        if sync.spec.mode == "delete":
            return "no consent needed (delete mode)"
        reason = sync.spec.consent_reason
        return f"consent none ({reason})" if reason else "consent none (not a marketing channel)"
    return f"consent {sync.consent} ({settings.consent.channel(sync.consent).describe()})"


def _source_columns(sync: SyncSpec, settings: Settings) -> tuple[PushColumns, ...]:
    """The source columns a sync's rows can read: those of its `source`'s type when it
    names a configured source, else those of every source type."""
    named = settings.sources.get(sync.source) if sync.source is not None else None
    if named is None:
        return tuple(SOURCE_COLUMNS.values())
    columns = SOURCE_COLUMNS.get(named.type)
    return () if columns is None else (columns,)


def load_mappings(settings: Settings, env: Mapping[str, str] | None = None) -> list[LoadedMapping]:
    """Every mapping file the config lists, checked; sync names must be unique across files
    (``syncd push NAME`` and ``sync_records`` use them)."""
    problems: list[tuple[str, str, str]] = []
    loaded: list[LoadedMapping] = []
    for path in settings.mapping_paths():
        try:
            loaded.append(load_mapping(path, settings, env))
        except ConfigError as exc:
            problems += exc.problems
    seen: dict[str, Path] = {}
    for mapping in loaded:
        for sync in mapping.syncs:
            if sync.name in seen:
                problems.append(
                    (
                        str(mapping.path),
                        f"sync[{sync.name}].name",
                        f"already used in {seen[sync.name]}",
                    )
                )
            seen.setdefault(sync.name, mapping.path)
    if problems:
        raise ConfigError(problems)
    return loaded
