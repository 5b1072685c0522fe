"""Column types that behave the same on SQLite and Postgres."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

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


def json_dumps(value: Any) -> str:
    """The engine's JSON serializer: orjson, several times faster than json on raw payloads."""
    return orjson.dumps(value).decode()


def json_loads(value: str | bytes) -> Any:
    return orjson.loads(value)
