"""Resolving one customer per person, in the store.

A person is a row of ``customers``. Source records point at people through
``customer_identities``: a source's registered customer id, or a normalized
email. A registered customer is one person; a guest order attaches to the
person with the same normalized email; when a guest later registers (or a
customer's email changes to one a guest used), the two people merge into one,
once, keeping every order. What a record says about a person arrives already
normalized, as :class:`syncd.identity.PersonAttrs`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, bindparam, delete, or_, select, update

from syncd.identity import RANK_CUSTOMER_RECORD, RANK_ORDER, PersonAttrs, clean_text
from syncd.store.models import (
    CONSENT_STATEMENTS,
    CUSTOMERS,
    IDENTITIES,
    ORDERS,
)
from syncd.store.models import CUSTOMER_RECORDS as RECORDS
from syncd.store.upsert import upsert

# Run for every page of orders: built once (see syncd.ingest).
_REGISTERED = select(IDENTITIES.c.value, IDENTITIES.c.customer_id).where(
    IDENTITIES.c.source == bindparam("source"),
    IDENTITIES.c.kind == "customer_id",
    IDENTITIES.c.value.in_(bindparam("values", expanding=True)),
)
_PEOPLE_BY_EMAIL = select(CUSTOMERS.c.email, CUSTOMERS.c.id).where(
    CUSTOMERS.c.email.in_(bindparam("emails", expanding=True))
)


_ATTR_COLUMNS = ("first_name", "last_name", "phone", "country", "city", "postcode")


def _newer_or_better(new: Any) -> Any:
    """Guard of an attribute update: a higher rank wins, then the newer record."""
    return or_(
        new.attrs_rank > CUSTOMERS.c.attrs_rank,
        and_(
            new.attrs_rank == CUSTOMERS.c.attrs_rank,
            or_(CUSTOMERS.c.updated_at.is_(None), new.updated_at >= CUSTOMERS.c.updated_at),
        ),
    )


def _earlier(new: Any) -> Any:
    """Guard of ``created_at``: the earliest record seen dates the person."""
    return or_(CUSTOMERS.c.created_at.is_(None), new.created_at < CUSTOMERS.c.created_at)


def apply_attrs(conn: Connection, customer_id: int, attrs: PersonAttrs) -> None:
    """Update a person's attributes when ``attrs`` outranks what the row holds."""
    row = conn.execute(
        select(CUSTOMERS.c.attrs_rank, CUSTOMERS.c.updated_at, CUSTOMERS.c.created_at).where(
            CUSTOMERS.c.id == customer_id
        )
    ).one()
    values: dict[str, Any] = {}
    first_seen = attrs.created_at or attrs.seen_at
    if first_seen is not None and (row.created_at is None or first_seen < row.created_at):
        values["created_at"] = first_seen
    better = attrs.rank > row.attrs_rank or (
        attrs.rank == row.attrs_rank
        and (
            row.updated_at is None
            or (attrs.seen_at is not None and attrs.seen_at >= row.updated_at)
        )
    )
    if better:
        values.update({c: getattr(attrs, c) for c in _ATTR_COLUMNS})
        values["updated_at"] = attrs.seen_at
        values["attrs_rank"] = attrs.rank
    if values:
        conn.execute(update(CUSTOMERS).where(CUSTOMERS.c.id == customer_id).values(**values))


def _person_by_email(conn: Connection, email: str) -> int | None:
    return conn.execute(select(CUSTOMERS.c.id).where(CUSTOMERS.c.email == email)).scalar()


def _person_by_identity(conn: Connection, source: str, kind: str, value: str) -> int | None:
    return conn.execute(
        select(IDENTITIES.c.customer_id).where(
            IDENTITIES.c.source == source, IDENTITIES.c.kind == kind, IDENTITIES.c.value == value
        )
    ).scalar()


def link_identity(conn: Connection, customer_id: int, source: str, kind: str, value: str) -> None:
    upsert(
        conn,
        IDENTITIES,
        [{"customer_id": customer_id, "source": source, "kind": kind, "value": value}],
        keys=("source", "kind", "value"),
        update=("customer_id",),
    )


def merge_people(conn: Connection, keep: int, drop: int) -> None:
    """Fold person ``drop`` into ``keep``: orders, identities and records move; ``drop`` goes.

    The surviving row keeps the better attributes and the earlier ``created_at``.
    """
    if keep == drop:
        return
    gone = conn.execute(select(CUSTOMERS).where(CUSTOMERS.c.id == drop)).one()
    conn.execute(update(ORDERS).where(ORDERS.c.customer_id == drop).values(customer_id=keep))
    conn.execute(update(RECORDS).where(RECORDS.c.customer_id == drop).values(customer_id=keep))
    conn.execute(
        update(IDENTITIES).where(IDENTITIES.c.customer_id == drop).values(customer_id=keep)
    )
    # Consent said by either record is the merged person's (the latest still wins).
    conn.execute(
        update(CONSENT_STATEMENTS)
        .where(CONSENT_STATEMENTS.c.customer_id == drop)
        .values(customer_id=keep)
    )
    conn.execute(delete(CUSTOMERS).where(CUSTOMERS.c.id == drop))
    attrs = PersonAttrs(
        email=None,
        first_name=gone.first_name,
        last_name=gone.last_name,
        phone=gone.phone,
        country=gone.country,
        city=gone.city,
        postcode=gone.postcode,
        seen_at=gone.updated_at,
        rank=gone.attrs_rank,
        created_at=gone.created_at,
    )
    apply_attrs(conn, keep, attrs)


def resolve_registered(
    conn: Connection, source: str, customer_source_id: int, attrs: PersonAttrs
) -> int:
    """The person of a registered customer record (creating, re-keying or merging people).

    The record's email is the person's email: a guest person with that email is the same
    person and is merged in; an email change moves the person to the new address.
    """
    by_id = _person_by_identity(conn, source, "customer_id", str(customer_source_id))
    old_email = (
        conn.execute(select(CUSTOMERS.c.email).where(CUSTOMERS.c.id == by_id)).scalar()
        if by_id
        else None
    )
    by_email = _person_by_email(conn, attrs.email) if attrs.email else None
    if by_id is None and by_email is None:
        person = _insert_person(conn, attrs)
    elif by_id is None:
        assert by_email is not None
        person = by_email
    elif by_email is None or by_email == by_id:
        person = by_id
    else:
        # The account's email belongs to another person (a guest who has now registered,
        # or the account changed its email to one a guest used): one person from now on.
        merge_people(conn, keep=by_id, drop=by_email)
        person = by_id
    if old_email is not None and old_email != attrs.email:
        conn.execute(update(CUSTOMERS).where(CUSTOMERS.c.id == person).values(email=None))
    if attrs.email is not None:
        conn.execute(update(CUSTOMERS).where(CUSTOMERS.c.id == person).values(email=attrs.email))
        link_identity(conn, person, source, "email", attrs.email)
    link_identity(conn, person, source, "customer_id", str(customer_source_id))
    apply_attrs(conn, person, attrs)
    if old_email is not None and old_email != attrs.email:
        split_old_email(conn, source, person, old_email)
        apply_attrs(conn, person, attrs)
    return person


def _insert_person(conn: Connection, attrs: PersonAttrs) -> int:
    new_id: int = conn.execute(
        CUSTOMERS.insert().values(**attrs.row()).returning(CUSTOMERS.c.id)
    ).scalar_one()
    return new_id


def resolve_guests(conn: Connection, source: str, people: Sequence[PersonAttrs]) -> dict[str, int]:
    """People for guest buyers by normalized email, in bulk: existing ones found, new ones made.

    ``people`` may hold several records per email (several orders); the attributes kept are
    those of the best-ranked, newest record, whatever order they come in.
    """
    best: dict[str, PersonAttrs] = {}
    earliest: dict[str, datetime] = {}
    for p in people:
        if p.email is None:
            continue
        cur = best.get(p.email)
        if cur is None or _outranks(p, cur):
            best[p.email] = p
        first = p.created_at or p.seen_at
        if first is not None and (p.email not in earliest or first < earliest[p.email]):
            earliest[p.email] = first
    if not best:
        return {}
    rows = []
    for email, p in best.items():
        row = p.row()
        row["created_at"] = earliest.get(email)
        rows.append(row)
    # New people are inserted; existing ones take the attributes when these outrank theirs.
    upsert(
        conn,
        CUSTOMERS,
        rows,
        keys=("email",),
        update=(*_ATTR_COLUMNS, "updated_at", "attrs_rank"),
        where=_newer_or_better,
    )
    # created_at: the earliest record seen for the person.
    upsert(
        conn,
        CUSTOMERS,
        rows,
        keys=("email",),
        update=("created_at",),
        where=_earlier,
    )
    ids: dict[str, int] = dict(conn.execute(_PEOPLE_BY_EMAIL, {"emails": list(best)}).all())
    upsert(
        conn,
        IDENTITIES,
        [{"customer_id": ids[e], "source": source, "kind": "email", "value": e} for e in best],
        keys=("source", "kind", "value"),
        update=("customer_id",),
    )
    return ids


def _outranks(a: PersonAttrs, b: PersonAttrs) -> bool:
    if a.rank != b.rank:
        return a.rank > b.rank
    if a.seen_at is None:
        return False
    return b.seen_at is None or a.seen_at >= b.seen_at


def registered_people(
    conn: Connection, source: str, customer_source_ids: Iterable[int]
) -> dict[int, int]:
    """Known people of registered customer ids (source id → customers.id)."""
    values = sorted({str(i) for i in customer_source_ids})
    if not values:
        return {}
    rows = conn.execute(_REGISTERED, {"source": source, "values": values})
    return {int(value): person for value, person in rows}


def split_old_email(conn: Connection, source: str, person: int, old_email: str) -> None:
    """An account left ``old_email``: the guest orders bought under it belong to whoever has
    that email now (a guest person, made if needed), exactly as a fresh sync would see it."""
    guest_orders = conn.execute(
        select(ORDERS.c.id, ORDERS.c.source_id, ORDERS.c.raw, ORDERS.c.created_at).where(
            ORDERS.c.customer_id == person,
            ORDERS.c.email == old_email,
            ORDERS.c.customer_source_id == 0,
        )
    ).all()
    conn.execute(
        delete(IDENTITIES).where(
            IDENTITIES.c.source == source,
            IDENTITIES.c.kind == "email",
            IDENTITIES.c.value == old_email,
            IDENTITIES.c.customer_id == person,
        )
    )
    if not guest_orders:
        return
    attrs = [
        PersonAttrs.from_address((o.raw or {}).get("billing"), old_email, o.created_at, RANK_ORDER)
        for o in guest_orders
    ]
    ids = resolve_guests(conn, source, attrs)
    conn.execute(
        update(ORDERS)
        .where(ORDERS.c.id.in_([o.id for o in guest_orders]))
        .values(customer_id=ids[old_email])
    )
    # What those orders said about consent goes with them (origins "<source>:order:<id>:…").
    for order in guest_orders:
        conn.execute(
            update(CONSENT_STATEMENTS)
            .where(
                CONSENT_STATEMENTS.c.customer_id == person,
                CONSENT_STATEMENTS.c.source.startswith(
                    f"{source}:order:{order.source_id}:", autoescape=True
                ),
            )
            .values(customer_id=ids[old_email])
        )
    refresh_people(conn, [person])


def refresh_people(conn: Connection, people: Iterable[int]) -> None:
    """Recompute people's attributes and ``created_at`` from the live rows that point at them.

    Used where incremental guards cannot know the answer (a split, a deleted order): the
    account record if there is one, else the newest live order's billing address.
    """
    for person in sorted(set(people)):
        record = conn.execute(
            select(RECORDS.c.raw, RECORDS.c.email, RECORDS.c.created_at, RECORDS.c.modified_at)
            .where(RECORDS.c.customer_id == person, RECORDS.c.deleted_at.is_(None))
            .order_by(RECORDS.c.modified_at.desc(), RECORDS.c.source_id.desc())
            .limit(1)
        ).first()
        orders = conn.execute(
            select(ORDERS.c.raw, ORDERS.c.created_at)
            .where(ORDERS.c.customer_id == person, ORDERS.c.deleted_at.is_(None))
            .order_by(ORDERS.c.created_at.desc(), ORDERS.c.source_id.desc())
        ).all()
        firsts = [o.created_at for o in orders if o.created_at is not None]
        if record is not None and record.created_at is not None:
            firsts.append(record.created_at)
        attrs: PersonAttrs | None = None
        if record is not None:
            raw = record.raw or {}
            address = dict(raw.get("billing") or {})
            for key in ("first_name", "last_name"):
                if clean_text(raw.get(key)):
                    address[key] = raw[key]
            attrs = PersonAttrs.from_address(
                address, record.email, record.modified_at, RANK_CUSTOMER_RECORD
            )
        elif orders:
            raw = orders[0].raw or {}
            attrs = PersonAttrs.from_address(
                raw.get("billing"), None, orders[0].created_at, RANK_ORDER
            )
        values: dict[str, Any] = {"created_at": min(firsts) if firsts else None}
        if attrs is not None:
            values.update({c: getattr(attrs, c) for c in _ATTR_COLUMNS})
            values["updated_at"] = attrs.seen_at
            values["attrs_rank"] = attrs.rank
        conn.execute(update(CUSTOMERS).where(CUSTOMERS.c.id == person).values(**values))
