"""Versioned schema migrations (alembic), run at start-up by every command."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, func, select

MIGRATIONS = Path(__file__).parent / "migrations"
# The advisory lock that serializes migrations across processes. The job locks of
# syncd.daemon use other keys: an 8-byte BLAKE2b of "syncd.job:<name>".
MIGRATION_LOCK_KEY = int.from_bytes(b"syncd.mg", "big")


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the store to ``revision``; a no-op when it is there already."""
    if revision == "head" and current_revision(engine) == head_revision():
        return
    cfg = alembic_config()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Replicas starting together on a new database would otherwise both create
            # the tables, and one would fail. Held until this transaction ends; the
            # waiting one then finds the schema current and does nothing.
            conn.execute(select(func.pg_advisory_xact_lock(MIGRATION_LOCK_KEY)))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
