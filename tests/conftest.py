"""Shared fixtures: a fresh store on SQLite and on Postgres for every store test."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text

from syncd.sandbox.destinations import DestinationSandbox
from syncd.store.engine import open_store
from tests.consent_audit import ConsentLedger, plaintext_leaks, violations

FIXTURES = Path(__file__).parent / "fixtures" / "woocommerce"
POSTGRES_URL = os.environ.get("SYNCD_TEST_POSTGRES_URL")


@pytest.fixture(scope="session", autouse=True)
def consent_audit() -> Iterator[None]:
    """The session's consent audit (tests/consent_audit.py): every destination sandbox
    request is journaled, and at the end no ESP request may name a person without the
    consent its sync needs, and no ad-platform request carries a plaintext email, phone
    or name."""
    DestinationSandbox.journal = []
    ConsentLedger.said = []
    try:
        yield
        found = violations(DestinationSandbox.journal, ConsentLedger.said)
        assert not found, "ESP requests without consent:\n" + "\n".join(found[:50])
        leaks = plaintext_leaks(DestinationSandbox.journal)
        assert not leaks, "ad-platform requests with plaintext:\n" + "\n".join(leaks[:50])
    finally:
        DestinationSandbox.journal = None


@pytest.fixture(autouse=True)
def _journal_tag(request: pytest.FixtureRequest) -> Iterator[None]:
    """Journal each sandbox request under the test that made it."""
    DestinationSandbox.journal_tag = request.node.nodeid
    yield
    DestinationSandbox.journal_tag = ""


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def _fresh_postgres_database(template: str | None = None) -> tuple[str, str]:
    assert POSTGRES_URL
    name = f"syncd_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        like = f' TEMPLATE "{template}"' if template else ""
        conn.execute(text(f'CREATE DATABASE "{name}"{like}'))
    admin.dispose()
    return name, POSTGRES_URL.rsplit("/", 1)[0] + "/" + name


_MIGRATED: list[str] = []  # a migrated Postgres database, made once per session


def _migrated_template() -> str:
    """A database migrated to head, copied for each test that wants a migrated store:
    copying is a third of the cost of running the migrations again."""
    if not _MIGRATED:
        name, url = _fresh_postgres_database()
        open_store(url).dispose()  # no connection may stay open on a template
        _MIGRATED.append(name)
    return _MIGRATED[0]


@pytest.fixture(scope="session", autouse=True)
def _drop_migrated_template() -> Iterator[None]:
    yield
    for name in _MIGRATED:
        _drop_postgres_database(name)


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
    # A test that asks for `engine` gets a migrated store anyway: copy one.
    template = _migrated_template() if "engine" in request.fixturenames else None
    name, url = _fresh_postgres_database(template)
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


# -- a real WooCommerce store (../shared/realwoo beside the project root) -------------------


def _find_realwoo() -> Path:
    """``shared/realwoo`` beside the project root (CI puts a copy of shared/ there), or beside
    a folder further up (a git worktree under the main checkout's parent)."""
    root = Path(__file__).resolve().parents[1]
    for parent in root.parents:
        if (parent / "shared" / "realwoo" / "up").is_file():
            return parent / "shared" / "realwoo"
    return root.parent / "shared" / "realwoo"


REALWOO = _find_realwoo()


def _realwoo_run(*args: str, timeout: float) -> str:
    """One of the kit's commands; stdout is its JSON, stderr (progress) goes to ours."""
    return subprocess.run(
        [str(REALWOO / args[0]), *args[1:]],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        timeout=timeout,
        check=True,
    ).stdout


def _realwoo_usable() -> str | None:
    """Why the real store cannot run here, or None."""
    if not (REALWOO / "up").is_file():
        return "../shared/realwoo is absent: no real WooCommerce store to test against"
    if os.geteuid() != 0:
        return "the real WooCommerce store runs its MariaDB, php-fpm and nginx as root"
    return None


def _realwoo_up(folder: Path) -> dict[str, Any]:
    started = time.monotonic()
    # A fresh machine installs Debian packages first: generous timeout.
    store: dict[str, Any] = json.loads(_realwoo_run("up", str(folder), timeout=900))
    print(f"realwoo: up {time.monotonic() - started:.1f} s")
    return store


def _realwoo_seed(up: Future[dict[str, Any]]) -> dict[str, Any]:
    store = up.result()
    started = time.monotonic()
    out = _realwoo_run("seed", store["dir"], "--orders", "100", "--seed", "7", timeout=600)
    print(f"realwoo: seed {time.monotonic() - started:.1f} s")
    seeded: dict[str, Any] = json.loads(out)
    return seeded


# The store's set-up (about 50 s, mostly php-fpm) runs on a thread from the moment the
# session knows it has realwoo tests, while the other tests run: "folder", "up", "seed".
_REALWOO_SETUP: dict[str, Any] = {}


def _start_realwoo() -> dict[str, Any]:
    if not _REALWOO_SETUP:
        folder = Path(tempfile.mkdtemp(prefix="syncd-realwoo-"))
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="realwoo")
        up = pool.submit(_realwoo_up, folder)
        _REALWOO_SETUP.update(folder=folder, up=up, seed=pool.submit(_realwoo_seed, up))
        pool.shutdown(wait=False)
    return _REALWOO_SETUP


def pytest_collection_finish(session: pytest.Session) -> None:
    if _realwoo_usable() is None and any(i.get_closest_marker("realwoo") for i in session.items):
        _start_realwoo()


@pytest.fixture(scope="session")
def realwoo() -> Iterator[dict[str, Any]]:
    """A real WooCommerce 10 store (WordPress, MariaDB, php-fpm, nginx) on 127.0.0.1 for the
    session: the JSON `up` prints (URLs, keys, CA file, database). Stopped and removed after."""
    if (why := _realwoo_usable()) is not None:
        pytest.skip(why)
    setup = _start_realwoo()
    try:
        yield setup["up"].result()
    finally:
        with contextlib.suppress(Exception):  # its failure is reported where it is used
            setup["seed"].result()
        subprocess.run(
            [str(REALWOO / "down"), str(setup["folder"])], stdin=subprocess.DEVNULL, timeout=300
        )
        shutil.rmtree(setup["folder"], ignore_errors=True)  # ~340 MB a store


@pytest.fixture(scope="session")
def realwoo_seeded(realwoo: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The store with products, customers, 100 orders (guests, every status), full and
    partial refunds, trashed and deleted orders; and the ids `seed` reports."""
    seeded: dict[str, Any] = _start_realwoo()["seed"].result()
    return realwoo, seeded
