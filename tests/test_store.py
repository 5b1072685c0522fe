from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, func, insert, inspect, select, text
from sqlalchemy.exc import IntegrityError

from syncd.store.bulk import indexes_built_after
from syncd.store.engine import StoreError, make_engine, open_store
from syncd.store.migrate import current_revision, head_revision
from syncd.store.models import ORDERS
from syncd.store.models import SYNC_STATE as STATE
from syncd.store.upsert import upsert
from tests.conftest import POSTGRES_URL, _drop_postgres_database, _fresh_postgres_database

PUBLIC_TABLES = {
    "consent_statements",
    "consent_extracted",
    "customers",
    "customer_identities",
    "customer_records",
    "orders",
    "order_items",
    "refunds",
    "products",
    "coupons",
    "sync_state",
    "sync_runs",
    "quarantine",
    "customer_profiles",
    "segment_memberships",
    "model_fits",
}


def _order(
    source_id: int, total: int, status: str = "processing", source: str = "wc"
) -> dict[str, object]:
    return {
        "source": source,
        "source_id": source_id,
        "status": status,
        "currency": "USD",
        "total_minor": total,
        "created_at": datetime(2024, 1, 1, 12, tzinfo=UTC),
        "raw": {"id": source_id, "total": f"{total / 100:.2f}"},
    }


def test_migrations_create_the_public_tables(engine: Engine) -> None:
    assert set(inspect(engine).get_table_names()) >= PUBLIC_TABLES
    assert current_revision(engine) == head_revision()


def test_migrations_match_the_models(engine: Engine) -> None:
    # The models are what the code writes; the migrations are what a store has.
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlmodel import SQLModel

    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), SQLModel.metadata) == []


def test_migration_0002_reads_attribution_from_stored_payloads(store_url: str) -> None:
    from syncd.store.migrate import upgrade

    engine = make_engine(store_url)
    try:
        upgrade(engine, "0001")
        meta = [
            {"id": 1, "key": "_wc_order_attribution_source_type", "value": "organic"},
            {"id": 2, "key": "_wc_order_attribution_utm_source", "value": "google"},
            {"id": 3, "key": "_other", "value": "x"},
        ]
        with engine.begin() as conn:
            for source_id, raw in ((1, {"meta_data": meta}), (2, {"meta_data": []}), (3, None)):
                conn.execute(
                    insert(ORDERS).values(
                        source="wc",
                        source_id=source_id,
                        status="completed",
                        currency="EUR",
                        total_minor=100,
                        subtotal_minor=0,
                        discount_minor=0,
                        shipping_minor=0,
                        tax_minor=0,
                        refunded_minor=0,
                        raw=raw,
                    )
                )
        upgrade(engine)
        with engine.connect() as conn:
            rows = conn.execute(
                select(
                    ORDERS.c.source_id,
                    ORDERS.c.attribution_source_type,
                    ORDERS.c.attribution_utm_source,
                ).order_by(ORDERS.c.source_id)
            ).all()
        assert [tuple(r) for r in rows] == [
            (1, "organic", "google"),
            (2, None, None),
            (3, None, None),
        ]
    finally:
        engine.dispose()


def test_open_store_twice_is_a_no_op(store_url: str) -> None:
    first = open_store(store_url)
    with first.begin() as conn:
        upsert(conn, ORDERS, [_order(1, 100)], keys=("source", "source_id"))
    first.dispose()
    again = open_store(store_url)
    with again.connect() as conn:
        assert conn.execute(select(func.count()).select_from(ORDERS)).scalar() == 1
    again.dispose()


def test_sqlite_pragmas(tmp_path: object) -> None:
    eng = open_store(f"sqlite:///{tmp_path}/s.db")
    with eng.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 30000
    eng.dispose()


def test_unsupported_url() -> None:
    with pytest.raises(StoreError, match="mysql"):
        make_engine("mysql://x")


def test_upsert_inserts_then_updates_in_batches(engine: Engine) -> None:
    rows = [_order(i, i * 100) for i in range(1, 2501)]
    with engine.begin() as conn:
        upsert(conn, ORDERS, rows, keys=("source", "source_id"), batch_size=700)
    changed = [_order(i, i * 100 + 1, status="completed") for i in range(2001, 3001)]
    with engine.begin() as conn:
        upsert(conn, ORDERS, changed, keys=("source", "source_id"), batch_size=700)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(ORDERS)).scalar() == 3000
        assert (
            conn.execute(select(ORDERS.c.total_minor).where(ORDERS.c.source_id == 2000)).scalar()
            == 200000
        )
        assert (
            conn.execute(select(ORDERS.c.total_minor).where(ORDERS.c.source_id == 2001)).scalar()
            == 200101
        )
        assert (
            conn.execute(select(ORDERS.c.status).where(ORDERS.c.source_id == 2500)).scalar()
            == "completed"
        )
        # JSON survives the round trip on both dialects
        assert conn.execute(select(ORDERS.c.raw).where(ORDERS.c.source_id == 7)).scalar() == {
            "id": 7,
            "total": "7.00",
        }


def test_same_source_id_in_two_sources_is_two_rows(engine: Engine) -> None:
    with engine.begin() as conn:
        upsert(
            conn,
            ORDERS,
            [_order(1, 100, source="shop_us"), _order(1, 200, source="shop_eu")],
            keys=("source", "source_id"),
        )
    with engine.connect() as conn:
        totals = dict(conn.execute(select(ORDERS.c.source, ORDERS.c.total_minor)).all())
    assert totals == {"shop_us": 100, "shop_eu": 200}


def test_upsert_returning_gives_ids_of_inserted_and_updated_rows(engine: Engine) -> None:
    with engine.begin() as conn:
        upsert(conn, ORDERS, [_order(5, 1), _order(3, 1)], keys=("source", "source_id"))
        back = upsert(
            conn,
            ORDERS,
            [_order(9, 1), _order(3, 2), _order(5, 2)],
            keys=("source", "source_id"),
            returning=("id", "source_id"),
        )
    with engine.connect() as conn:
        stored = dict(conn.execute(select(ORDERS.c.source_id, ORDERS.c.id)).all())
    assert {r.source_id: r.id for r in back} == {9: stored[9], 3: stored[3], 5: stored[5]}
    assert len(stored) == 3


def _moves_forward(new: Any) -> Any:
    return new.cursor > STATE.c.cursor


def test_upsert_guarded_update_and_do_nothing(engine: Engine) -> None:
    old = datetime(2024, 1, 1, tzinfo=UTC)
    new = old + timedelta(hours=1)
    with engine.begin() as conn:
        upsert(
            conn,
            STATE,
            [{"source": "wc", "stream": "orders", "cursor": new}],
            keys=("source", "stream"),
        )
        # only move forward: the stored cursor is newer, so nothing changes
        upsert(
            conn,
            STATE,
            [{"source": "wc", "stream": "orders", "cursor": old}],
            keys=("source", "stream"),
            where=_moves_forward,
        )
        upsert(
            conn,
            STATE,
            [{"source": "wc", "stream": "orders", "cursor": old}],
            keys=("source", "stream"),
            update=[],
        )
    with engine.connect() as conn:
        assert conn.execute(select(STATE.c.cursor)).scalar() == new


def test_times_are_utc_and_aware(engine: Engine) -> None:
    plus2 = timezone(timedelta(hours=2))
    with engine.begin() as conn:
        row = _order(1, 1)
        row["created_at"] = datetime(2024, 6, 1, 14, 0, tzinfo=plus2)
        upsert(conn, ORDERS, [row], keys=("source", "source_id"))
    with engine.connect() as conn:
        got = conn.execute(select(ORDERS.c.created_at)).scalar()
    assert got == datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
    assert got.tzinfo is not None and got.utcoffset() == timedelta(0)


def test_naive_datetimes_are_refused(engine: Engine) -> None:
    row = _order(1, 1)
    row["created_at"] = datetime(2024, 6, 1, 14, 0)
    with pytest.raises(Exception, match="naive"), engine.begin() as conn:
        upsert(conn, ORDERS, [row], keys=("source", "source_id"))


def test_one_instant_compares_equal_whichever_path_wrote_it(engine: Engine) -> None:
    # The bulk upsert binds through the driver, Core statements through SQLAlchemy: on
    # SQLite both must write the same text, or `>=` misses the row at exactly that instant.
    when = datetime(2024, 3, 1, 9, 30, 0, tzinfo=UTC)
    later = datetime(2024, 3, 1, 9, 30, 0, 250_000, tzinfo=UTC)
    with engine.begin() as conn:
        upsert(
            conn,
            STATE,
            [{"source": "a", "stream": "orders", "cursor": when, "updated_at": later}],
            keys=("source", "stream"),
        )
        conn.execute(
            insert(STATE).values(source="b", stream="orders", cursor=when, updated_at=later)
        )
    with engine.connect() as conn:
        at_or_after = conn.execute(
            select(STATE.c.source).where(STATE.c.cursor >= when).order_by(STATE.c.source)
        ).scalars()
        assert list(at_or_after) == ["a", "b"]
        assert (
            conn.execute(
                select(func.count()).select_from(STATE).where(STATE.c.cursor == when)
            ).scalar()
            == 2
        )
        if engine.dialect.name == "sqlite":
            stored = conn.execute(text("SELECT cursor, updated_at FROM sync_state")).all()
            assert {tuple(r) for r in stored} == {
                ("2024-03-01 09:30:00", "2024-03-01 09:30:00.250000")
            }


def test_migration_0006_rewrites_the_old_sqlite_text_of_whole_seconds(tmp_path: Any) -> None:
    from syncd.store.migrate import upgrade

    engine = make_engine(f"sqlite:///{tmp_path}/old.db")
    try:
        upgrade(engine, "0005")
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO sync_state (source, stream, cursor, reconciled_at, updated_at) "
                    "VALUES ('a', 'orders', '2024-03-01 09:30:00.000000', NULL, "
                    "'2024-03-01 09:30:00.250000')"
                )
            )
        upgrade(engine)
        with engine.connect() as conn:
            row = conn.execute(
                text("SELECT cursor, reconciled_at, updated_at FROM sync_state")
            ).one()
        # Whole seconds lose the zeros; a fraction and NULL stay as they were.
        assert tuple(row) == ("2024-03-01 09:30:00", None, "2024-03-01 09:30:00.250000")
    finally:
        engine.dispose()


@pytest.mark.skipif(not POSTGRES_URL, reason="SYNCD_TEST_POSTGRES_URL is not set")
def test_indexes_built_after_a_load_come_back_as_they_were_or_not_at_all() -> None:
    name, url = _fresh_postgres_database()
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE parent (id INTEGER PRIMARY KEY, k INTEGER)")
            conn.exec_driver_sql("CREATE TABLE child (id INTEGER REFERENCES parent (id))")
            conn.exec_driver_sql(
                "CREATE TABLE bulk (id INTEGER PRIMARY KEY, a INTEGER, b TEXT, "
                "CONSTRAINT bulk_b UNIQUE (b))"
            )
            conn.exec_driver_sql("CREATE INDEX bulk_a ON bulk (a) WHERE b LIKE 'x%%'")
            conn.exec_driver_sql("CREATE INDEX parent_k ON parent (k)")

        def definitions(conn: Connection) -> set[tuple[str, str, int]]:
            return set(  # type: ignore[arg-type]
                conn.execute(
                    text(
                        "SELECT i.tablename, i.indexdef, c.oid::int FROM pg_indexes i "
                        "JOIN pg_class c ON c.relname = i.indexname "
                        "WHERE i.tablename IN ('bulk', 'parent')"
                    )
                ).all()
            )

        with engine.connect() as conn:
            before = definitions(conn)
        parent_key = {oid for table, sql, oid in before if "parent_pkey" in sql}

        with engine.begin() as conn:
            conn.exec_driver_sql("TRUNCATE bulk, parent CASCADE")
            with indexes_built_after(conn, "bulk"), indexes_built_after(conn, "parent"):
                inside = {sql for _, sql, _ in definitions(conn)}
                conn.exec_driver_sql(
                    "INSERT INTO bulk SELECT g, mod(g, 7), 'b' || g FROM generate_series(1, 1000) g"
                )
                conn.exec_driver_sql("INSERT INTO parent SELECT g, g FROM generate_series(1, 9) g")
        # Inside: all gone but the key a foreign key points at.
        assert inside == {sql for _, sql, oid in before if oid in parent_key}
        with engine.connect() as conn:
            after = definitions(conn)
        assert {(t, sql) for t, sql, _ in after} == {(t, sql) for t, sql, _ in before}
        assert {oid for _, sql, oid in after if "parent_pkey" in sql} == parent_key

        # A load that breaks a unique key fails when the key is built: nothing of it stays.
        with (
            pytest.raises(IntegrityError),
            engine.begin() as conn,
            indexes_built_after(conn, "bulk"),
        ):
            conn.exec_driver_sql("INSERT INTO bulk VALUES (5000, 1, 'b1')")
        with engine.connect() as conn:
            assert {(t, sql) for t, sql, _ in definitions(conn)} == {
                (t, sql) for t, sql, _ in before
            }
            assert conn.exec_driver_sql("SELECT count(*) FROM bulk").scalar_one() == 1000
    finally:
        engine.dispose()
        _drop_postgres_database(name)


def test_indexes_built_after_does_nothing_on_sqlite(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 's.db'}")
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE bulk (id INTEGER PRIMARY KEY, b TEXT UNIQUE)")
            conn.exec_driver_sql("CREATE INDEX bulk_b2 ON bulk (b)")
            with indexes_built_after(conn, "bulk"):
                names = conn.exec_driver_sql(
                    "SELECT name FROM sqlite_master WHERE tbl_name = 'bulk' AND type = 'index'"
                ).scalars()
                assert "bulk_b2" in set(names)
    finally:
        engine.dispose()
