"""Column types that behave the same on SQLite and Postgres."""

from __future__ import annotations

from contextlib import suppress
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple

import orjson
from sqlalchemy import JSON, DateTime, Dialect, TypeDecorator
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.sqlite import DATETIME as SQLITE_DATETIME
from sqlalchemy.types import TypeEngine


class _SQLiteInstantText(SQLITE_DATETIME):
    """SQLite's DATETIME in DDL, without SQLAlchemy's own text conversion: UTCDateTime makes
    the text, so statements and the bulk upsert (which binds through the driver) write the
    same text. SQLAlchemy's conversion always appended ``.000000``, and ``…:03`` sorts
    before ``…:03.000000``, so one instant written by the two paths compared unequal."""

    def bind_processor(self, dialect: Dialect) -> None:
        return None

    def result_processor(self, dialect: Dialect, coltype: object) -> None:
        return None


class UTCDateTime(TypeDecorator[datetime]):
    """Always UTC, always timezone-aware in Python.

    Postgres stores ``timestamptz``. SQLite has no time type: values are stored
    as naive UTC text (``YYYY-MM-DD HH:MM:SS[.ffffff]``, what ``datetime.isoformat(" ")``
    writes), which sorts and compares correctly as text, so users' SQL on either store
    sees the same instants.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return _SQLiteInstantText()  # type: ignore[no-untyped-call]
        return super().load_dialect_impl(dialect)

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | str | None:
        if value is None:
            return None
        if value.tzinfo is not UTC:
            if value.tzinfo is None:
                raise ValueError(f"naive datetime {value!r}: syncd stores UTC instants only")
            value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.isoformat(" ")[:-6]  # without "+00:00": cheaper than replace()
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # SQLite's text
            value = datetime.fromisoformat(value)
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime from the store, got {type(value).__name__}")
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# JSONB on Postgres (indexable, compact); JSON text on SQLite.
JSONType = JSON().with_variant(JSONB(), "postgresql")


# What the store keeps of any one JSON value (a raw payload, a webhook delivery), checked
# by ``payload_problem`` before anything is written: at the webhook intake, when a journal
# row is moved, and by the engine's serializer below, so every store write holds to them.
# WooCommerce's REST resources nest 7 levels at most (an order's line item's meta_data
# value in a batch response); 64 leaves room for plugins' metadata. Without a limit of our
# own the intake parses 1,024 levels (orjson.loads) while orjson.dumps, the store's writer,
# fails past 254, so a delivery could be accepted that can never be stored.
MAX_JSON_DEPTH: Final = 64
# As the webhook intake's body cap: an order with hundreds of lines is a few hundred KB.
MAX_JSON_BYTES: Final = 8 * 1024 * 1024


class Problem(NamedTuple):
    """Why the store will not keep a JSON value: ``kind`` is too_deep, too_large or nul."""

    kind: str
    reason: str

    def __str__(self) -> str:
        return self.reason


class PayloadRejected(ValueError):
    """A JSON value the store does not keep (see ``payload_problem``)."""


def payload_problem(value: Any, encoded: bytes | None = None) -> Problem | None:
    """Why the store will not keep ``value`` (over the depth or size limit, or holding NUL,
    which Postgres rejects in text and jsonb), or None when it will. ``encoded`` is its JSON
    text, when at hand (else it is encoded here): scans of the text skip walking the value in
    the common case, so the check costs a few microseconds for an order."""
    if encoded is None:
        with suppress(orjson.JSONEncodeError):  # past orjson's depth limit: walked below
            encoded = orjson.dumps(value)
    if encoded is not None and len(encoded) > MAX_JSON_BYTES:
        return Problem(
            "too_large", f"too large: {len(encoded)} bytes of JSON, over {MAX_JSON_BYTES}"
        )
    brackets = MAX_JSON_DEPTH + 1 if encoded is None else encoded.count(b"{") + encoded.count(b"[")
    if brackets > MAX_JSON_DEPTH:  # fewer containers than the limit cannot nest deeper
        problem = _depth_problem(value)
        if problem is not None:
            return problem
    if (encoded is None or b"\\u0000" in encoded) and _has_nul(value):
        return Problem("nul", "holds a NUL character, which Postgres cannot store")
    return None


def _depth_problem(value: Any) -> Problem | None:
    if not _too_deep(value):
        return None
    return Problem("too_deep", f"too deep: JSON nested over {MAX_JSON_DEPTH} levels")


def _too_deep(value: Any) -> bool:
    """Whether ``value`` nests past MAX_JSON_DEPTH (level by level, without recursion: a
    parsed payload may nest up to 1,024 deep)."""
    level = [value]
    for _ in range(MAX_JSON_DEPTH):
        inner: list[Any] = []
        for item in level:
            if isinstance(item, dict):
                inner.extend(v for v in item.values() if isinstance(v, dict | list))
            elif isinstance(item, list):
                inner.extend(v for v in item if isinstance(v, dict | list))
        if not inner:
            return False
        level = inner
    return True


QUARANTINE_EXCERPT: Final = 4096  # characters of an unstorable value's JSON text kept


def storable_copy(value: Any, encoded: bytes | None = None) -> Any:
    """``value`` itself when the store keeps it, else what a quarantine row keeps in its
    place (``stand_in``)."""
    problem = payload_problem(value, encoded)
    return value if problem is None else stand_in(value, str(problem), encoded)


def stand_in(value: Any, reason: str, encoded: bytes | None = None) -> dict[str, Any]:
    """What a quarantine row keeps of a value the store cannot keep: the record's id, why it
    was not stored and the start of its JSON text (``encoded``, or encoded here)."""
    if encoded is None:
        with suppress(orjson.JSONEncodeError):
            encoded = orjson.dumps(value)
    record_id = value.get("id") if isinstance(value, dict) else None
    if isinstance(record_id, str):
        record_id = record_id.replace("\x00", "\ufffd")
    elif isinstance(record_id, bool) or not isinstance(record_id, int):
        record_id = None
    excerpt = (encoded or b"")[:QUARANTINE_EXCERPT].decode("utf-8", "replace")
    return {"id": record_id, "not_stored": reason, "json_start": excerpt.replace("\x00", "\ufffd")}


def _has_nul(value: Any) -> bool:
    """Whether any key or string holds NUL (iterative, as ``_too_deep``)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def json_dumps(value: Any) -> str:
    """The engine's JSON serializer: orjson, several times faster than json on raw payloads.
    Raises PayloadRejected for a value over the store's limits (``payload_problem``)."""
    try:
        encoded = orjson.dumps(value)
    except orjson.JSONEncodeError as exc:  # past orjson's own depth limit (254), among others
        raise PayloadRejected(str(_depth_problem(value) or exc)) from exc
    problem = payload_problem(value, encoded)
    if problem is not None:
        raise PayloadRejected(str(problem))
    return encoded.decode()


def json_loads(value: str | bytes) -> Any:
    return orjson.loads(value)
