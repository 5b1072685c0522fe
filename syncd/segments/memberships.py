"""Segments: who is in each one now (rules or SQL over `customer_profiles`), exclusive groups,
and the entered/exited history in `segment_memberships`, all set-based."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    exists,
    func,
    insert,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError

from syncd.config import SegmentSettings
from syncd.segments import work
from syncd.segments.rules import compile_rule
from syncd.store.bulk import indexes_built_after
from syncd.store.models import MEMBERSHIPS, PROFILES


class SegmentError(ValueError):
    """A segment definition that cannot run: the message starts with its config key."""


# This run's members, on the recompute's connection (a temporary table).
T_MEMBERS = Table(
    "t_members",
    MetaData(),
    Column("segment", String, nullable=False),
    Column("customer_id", Integer, nullable=False),
)


# The customers a scoped recompute covers (see syncd.segments.recompute).
T_SCOPE = Table("t_scope", MetaData(), Column("cid", Integer, primary_key=True))

# The two sides of the diff (see record_changes).
T_EXITS = Table("t_exits", MetaData(), Column("id", Integer), Column("segment", String))
T_ENTERS = Table("t_enters", MetaData(), Column("segment", String), Column("customer_id", Integer))


@dataclass(frozen=True)
class SegmentChange:
    size: int
    entered: int
    exited: int

    def as_dict(self) -> dict[str, int]:
        return {"size": self.size, "entered": self.entered, "exited": self.exited}


def evaluation_order(segments: Mapping[str, SegmentSettings]) -> list[str]:
    """Segments in the order they are filled: within a group, highest priority first (then by
    name), so a customer lands only in the first segment of the group that selects them."""
    return sorted(segments, key=lambda n: (segments[n].group or "", -segments[n].priority, n))


def _user_sql(sql: str) -> str:
    # The user's own query, wrapped as a subquery: a trailing ';' would end the statement,
    # and ':' must be escaped so text() does not take ':name' inside it for a parameter.
    # Wrapped, it can only be one SELECT: SQLite and Postgres refuse a write (even a
    # ``WITH … DELETE``) in a subquery.
    return sql.strip().rstrip(";").strip().replace(":", "\\:")


def _failure(exc: DBAPIError) -> str:
    """The database's own message, first line: what a user needs to fix their query."""
    message = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
    if "multiple commands" in message or "one statement at a time" in message:
        # Postgres ("cannot insert multiple commands into a prepared statement") and
        # Python's sqlite3 ("You can only execute one statement at a time.").
        return f"it must be a single SELECT statement ({message})"
    return message


@contextlib.contextmanager
def read_only(conn: Connection) -> Iterator[None]:
    """Run user SQL on ``conn`` read-only for the duration of the block.

    Postgres: a savepoint in which the transaction is read-only (``SET LOCAL
    transaction_read_only``); releasing or rolling back the savepoint makes it read-write
    again, so the recompute goes on writing afterwards. A read-only transaction refuses
    every write to a store table, also through a function (``nextval``, ``setval``,
    ``lo_unlink``), and still lets the block fill temporary work tables (PostgreSQL manual,
    SET TRANSACTION). SQLite has no such mode that spares its temp tables (``PRAGMA
    query_only`` also refuses them); there the subquery wrapping (see ``_user_sql``) is
    what keeps user SQL to reads: SQLite has no function that writes.
    """
    if conn.dialect.name != "postgresql":
        yield
        return
    with conn.begin_nested():
        conn.execute(text("SET LOCAL transaction_read_only = on"))
        yield


def check_sql_segments(engine: Engine, segments: Mapping[str, SegmentSettings]) -> None:
    """Run every SQL segment with LIMIT 0, read-only and as one statement: a query that
    fails, writes, or has no ``customer_id`` column, is a SegmentError naming the segment."""
    for name, seg in segments.items():
        if seg.sql is None:
            continue
        with engine.connect() as conn:
            try:
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SET TRANSACTION READ ONLY"))
                # A bound parameter makes psycopg use the extended protocol, which takes
                # one statement only: without one, ``…) AS s; COMMIT; DROP TABLE orders; …``
                # ran all three (psycopg 3 docs, "Multiple statements in the same query").
                # sqlite3's execute() runs one statement at most.
                conn.execute(
                    text(f"SELECT s.customer_id FROM ({_user_sql(seg.sql)}) AS s LIMIT :none"),
                    {"none": 0},
                )
            except DBAPIError as exc:
                raise SegmentError(
                    f"segments.{name}.sql: the query failed (it must select customer_id): "
                    f"{_failure(exc)}"
                ) from None


def select_members(
    conn: Connection,
    segments: Mapping[str, SegmentSettings],
    now: datetime,
    *,
    scoped: bool = False,
) -> dict[str, int]:
    """Fill ``t_members`` with each segment's members (``scoped``: only the customers in
    ``t_scope``); returns the sizes of what it found."""
    work.create(conn, "t_members", "segment VARCHAR NOT NULL, customer_id INTEGER NOT NULL")
    order = evaluation_order(segments)
    for index, name in enumerate(order):
        seg = segments[name]
        # Members of the group's higher-priority segments are not candidates here.
        higher = [
            other
            for other in order[:index]
            if seg.group is not None and segments[other].group == seg.group
        ]
        taken = exists().where(
            T_MEMBERS.c.segment.in_(higher), T_MEMBERS.c.customer_id == PROFILES.c.customer_id
        )
        if seg.rule is not None:
            query = select(literal(name), PROFILES.c.customer_id).where(
                compile_rule(seg.rule, PROFILES, now=now)
            )
            if scoped:
                query = query.where(PROFILES.c.customer_id.in_(select(T_SCOPE.c.cid)))
            if higher:
                query = query.where(~taken)
            conn.execute(insert(T_MEMBERS).from_select(["segment", "customer_id"], query))
        else:
            assert seg.sql is not None
            # Members are customers (a row in customer_profiles), whatever table the
            # user's query reads: a staff account or the guest of a trashed order is in
            # ``customers`` but in no segment.
            exclude = " AND s.customer_id IN (SELECT customer_id FROM customer_profiles)"
            if scoped:
                exclude += " AND s.customer_id IN (SELECT cid FROM t_scope)"
            if higher:
                exclude += (
                    " AND NOT EXISTS (SELECT 1 FROM t_members t WHERE t.customer_id = s.customer_id"
                    " AND t.segment IN :higher)"
                )
            statement = text(
                "INSERT INTO t_members (segment, customer_id) "
                f"SELECT DISTINCT :segment, s.customer_id FROM ({_user_sql(seg.sql)}) AS s "
                f"WHERE s.customer_id IS NOT NULL{exclude}"
            )
            params: dict[str, object] = {"segment": name}
            if higher:
                statement = statement.bindparams(bindparam("higher", expanding=True))
                params["higher"] = higher
            try:
                # One statement (it has bound parameters) and read-only, but for t_members.
                with read_only(conn):
                    conn.execute(statement, params)
            except DBAPIError as exc:
                raise SegmentError(
                    f"segments.{name}.sql: the query failed: {_failure(exc)}"
                ) from None
    if conn.dialect.name == "sqlite":
        # The diff's anti-joins look members up here: SQLite joins by index lookups only.
        conn.execute(text("CREATE INDEX t_members_key ON t_members (segment, customer_id)"))
    # Postgres hash-joins the diff: with statistics and no index, 3 s less at a million
    # customers (the index took 3 s to build and sped no step up).
    work.analyze(conn, "t_members")
    counted: dict[str, int] = dict(
        conn.execute(select(T_MEMBERS.c.segment, func.count()).group_by(T_MEMBERS.c.segment)).all()
    )
    return {name: int(counted.get(name, 0)) for name in order}


# From this many rows on, a first fill of an empty memberships table builds its indexes
# after the insert rather than row by row (see syncd.store.bulk).
FIRST_FILL_ROWS = 50_000


def _first_fill(conn: Connection, rows: int) -> bool:
    """Postgres, ``rows`` to open and not one membership stored yet (a first recompute):
    the table is then locked for the rest of the transaction. Readers of an empty table
    lose nothing by waiting for the commit."""
    if conn.dialect.name != "postgresql" or rows < FIRST_FILL_ROWS:
        return False
    if conn.execute(select(MEMBERSHIPS.c.id).limit(1)).first() is not None:
        return False
    conn.execute(text(f"LOCK TABLE {MEMBERSHIPS.name} IN ACCESS EXCLUSIVE MODE"))
    # Checked again under the lock: a row committed meanwhile keeps the indexes in place.
    return conn.execute(select(MEMBERSHIPS.c.id).limit(1)).first() is None


def record_changes(
    conn: Connection,
    sizes: Mapping[str, int],
    at: datetime,
    *,
    write: bool,
    scoped: bool = False,
) -> dict[str, SegmentChange]:
    """Diff ``t_members`` against the open memberships: count who entered and who left each
    segment and, when ``write``, close the rows of those who left and open rows for those
    who entered (a returning customer gets a new row). Open rows of segments no longer
    configured are closed too. ``scoped``: only the memberships of the customers in
    ``t_scope`` are compared, and only the segments they are in, entered or left are
    reported (their sizes counted from the memberships afterwards).

    Each side of the diff is computed once, into a temporary table, and both the counts
    and the writes read it: the anti-joins are the costly part on a large base.
    """
    m = MEMBERSHIPS
    t = T_MEMBERS
    work.create(conn, "t_exits", "id INTEGER, segment VARCHAR")
    work.create(conn, "t_enters", "segment VARCHAR, customer_id INTEGER")
    member_now = exists().where(t.c.segment == m.c.segment, t.c.customer_id == m.c.customer_id)
    already = exists().where(
        m.c.segment == t.c.segment, m.c.customer_id == t.c.customer_id, m.c.exited_at.is_(None)
    )
    conn.execute(
        insert(T_EXITS).from_select(
            ["id", "segment"],
            select(m.c.id, m.c.segment).where(
                m.c.exited_at.is_(None),
                ~member_now,
                *([m.c.customer_id.in_(select(T_SCOPE.c.cid))] if scoped else []),
            ),
        )
    )
    conn.execute(
        insert(T_ENTERS).from_select(
            ["segment", "customer_id"], select(t.c.segment, t.c.customer_id).where(~already)
        )
    )
    entered: dict[str, int] = dict(
        conn.execute(select(T_ENTERS.c.segment, func.count()).group_by(T_ENTERS.c.segment)).all()
    )
    exited: dict[str, int] = dict(
        conn.execute(select(T_EXITS.c.segment, func.count()).group_by(T_EXITS.c.segment)).all()
    )
    if write:
        conn.execute(update(m).where(m.c.id.in_(select(T_EXITS.c.id))).values(exited_at=at))
        opening = insert(m).from_select(
            ["segment", "customer_id", "entered_at"],
            select(T_ENTERS.c.segment, T_ENTERS.c.customer_id, literal(at, m.c.entered_at.type)),
        )
        first_fill = not scoped and _first_fill(conn, sum(entered.values()))
        with indexes_built_after(conn, m.name) if first_fill else contextlib.nullcontext():
            conn.execute(opening)
    if scoped and write:
        # Only the segments these customers are in, entered or left: the others did not
        # change. Their sizes are counted from the open rows (everyone else's included).
        involved = (
            set(entered)
            | set(exited)
            | set(
                conn.execute(
                    select(m.c.segment)
                    .where(m.c.exited_at.is_(None), m.c.customer_id.in_(select(T_SCOPE.c.cid)))
                    .distinct()
                ).scalars()
            )
        )
        counted: dict[str, int] = dict(
            conn.execute(
                select(m.c.segment, func.count())
                .where(m.c.exited_at.is_(None), m.c.segment.in_(sorted(involved)))
                .group_by(m.c.segment)
            ).all()
        )
        sizes = {name: int(counted.get(name, 0)) for name in sizes if name in involved}
    return {
        name: SegmentChange(size, int(entered.get(name, 0)), int(exited.get(name, 0)))
        for name, size in sizes.items()
    }
