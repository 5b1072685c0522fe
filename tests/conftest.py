"""Shared fixtures: a fresh store on SQLite and on Postgres for every store test."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text

from syncd.store.engine import open_store

FIXTURES = Path(__file__).parent / "fixtures" / "woocommerce"
POSTGRES_URL = os.environ.get("SYNCD_TEST_POSTGRES_URL")


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def _fresh_postgres_database() -> tuple[str, str]:
    assert POSTGRES_URL
    name = f"syncd_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return name, POSTGRES_URL.rsplit("/", 1)[0] + "/" + name


def _drop_postgres_database(name: str) -> None:
    assert POSTGRES_URL
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty store URL, once per dialect."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/store.db"
        return
    if not POSTGRES_URL:
        pytest.skip("SYNCD_TEST_POSTGRES_URL is not set")
    name, url = _fresh_postgres_database()
    try:
        yield url
    finally:
        _drop_postgres_database(name)


@pytest.fixture
def engine(store_url: str) -> Iterator[Engine]:
    """A migrated store, once per dialect."""
    eng = open_store(store_url)
    try:
        yield eng
    finally:
        eng.dispose()
