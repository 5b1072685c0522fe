"""Privacy requests: erasure (``forget``), access (``export``) and the suppression list.

An erasure is recorded before anything is done: the request, one step per destination
mapping and one for the store, in one transaction. Each step then runs and its outcome is
committed on its own, so a run stopped at any point (an error, a SIGKILL) resumes with the
steps not yet confirmed: a destination that confirmed is never asked again. A failed step
stays ``failed`` with its reason and is tried again by the next ``forget`` of the person or
by :func:`retry_pending`.

The store keeps no plaintext about a forgotten person: their customer row stays as an
anonymous row (so orders keep their amounts and totals stay right), everything personal is
removed from every table, and a suppression entry keeps salted hashes of the email and
phone so no later sync re-adds them. Until every step is done, the request keeps what the
pending destination steps need to reach the person (email, phone, vendor ids) in
``privacy_requests.identifiers``; it is emptied when the request is done.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final, Literal

import httpx
import structlog
from sqlalchemy import ColumnElement, Engine, Select, Text, and_, cast, func, or_, select
from sqlalchemy.engine import Connection
from sqlalchemy.sql.schema import Table
from sqlalchemy.types import JSON, String
from sqlmodel import SQLModel

from syncd.destinations.base import Person
from syncd.identity import e164, email_key, normalize_email
from syncd.store.engine import writer_lock
from syncd.store.models import (
    COUPONS,
    CUSTOMER_RECORDS,
    CUSTOMERS,
    EVENTS,
    IDENTITIES,
    MEMBERSHIPS,
    ORDER_ITEMS,
    ORDERS,
    PRIVACY_REQUESTS,
    PRIVACY_SECRET,
    PRIVACY_STEPS,
    PRODUCTS,
    PROFILES,
    QUARANTINE,
    REFUNDS,
    SUPPRESSIONS,
    SYNC_RECORDS,
)
from syncd.store.upsert import upsert

if TYPE_CHECKING:
    from syncd.mapping import LoadedMapping

__all__ = [
    "REQUESTERS",
    "STORE_STEP",
    "ForgetResult",
    "PrivacyError",
    "StepResult",
    "SuppressionList",
    "export",
    "forget",
    "is_suppressed",
    "open_request",
    "pending_steps",
    "prune_raw_payloads",
    "request_for_erased",
    "retry_delay",
    "retry_pending",
    "run_request",
    "scrub_suppressed",
    "suppressed_customer_ids",
]

log = structlog.get_logger("syncd.privacy")

Requester = Literal["cli", "http", "woocommerce-eraser"]
REQUESTERS: Final[tuple[str, ...]] = ("cli", "http", "woocommerce-eraser")
STORE_STEP: Final = "store"
DESTINATION_STEP: Final = "destination:"
# Steps that still have work: never run, or their last try failed.
OPEN: Final = ("pending", "failed")
SETTLED: Final = ("done", "not_applicable")
ERASED: Final = "[erased]"
RETRY_FIRST: Final = timedelta(minutes=5)
RETRY_MAX: Final = timedelta(hours=6)
# Raw values shorter than this are not searched for across the store (a 3-digit phone
# typo would match unrelated rows); the person's own rows are cleared by their ids.
MIN_NEEDLE: Final = 6
# What WordPress puts in place of an erased email: wp_privacy_anonymize_data('email')
# returns "deleted@site.invalid" (WordPress core, wp-includes/functions.php), and
# WooCommerce's eraser uses it for an order's billing email (WC_Privacy_Erasers::
# remove_order_personal_data).
WORDPRESS_ERASED_EMAIL: Final = "deleted@site.invalid"


class PrivacyError(ValueError):
    """A request that cannot be carried out as asked (no such customer, no identifier)."""


def _now() -> datetime:
    return datetime.now(UTC)


# -- the salt and the hashes ----------------------------------------------------------------


def store_salt(conn: Connection) -> bytes:
    """The store's privacy salt, made on first use.

    A random secret of this store, kept only in it: a suppression hash can be checked by
    whoever holds the store, but cannot be reversed with a dictionary of addresses by
    anyone who sees the hash alone (a log line, a copied table). A plain sha256 of an email
    would be: every address list is such a dictionary.
    """
    salt = conn.execute(select(PRIVACY_SECRET.c.salt).where(PRIVACY_SECRET.c.id == 1)).scalar()
    if salt is None:
        # DO NOTHING on a conflict: of two processes making it at once, one salt wins.
        row = {"id": 1, "salt": secrets.token_hex(32), "created_at": _now()}
        upsert(conn, PRIVACY_SECRET, [row], keys=["id"], update=[])
        salt = conn.execute(select(PRIVACY_SECRET.c.salt).where(PRIVACY_SECRET.c.id == 1)).scalar()
    assert salt is not None
    return bytes.fromhex(salt)


def _hash(salt: bytes, kind: str, value: str) -> str:
    return hmac.new(salt, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()


def email_hash(salt: bytes, email: object) -> str | None:
    """The salted hash of an address as normalized by :mod:`syncd.identity`, or None."""
    address = normalize_email(email)
    return _hash(salt, "email", email_key(address)) if address else None


def phone_hash(salt: bytes, phone: object) -> str | None:
    """The salted hash of a phone number in E.164, or None when it is not one."""
    number = e164(phone)
    return _hash(salt, "phone", number) if number else None


# -- suppressions: what the push engine and ingest ask --------------------------------------


@dataclass(frozen=True)
class SuppressionList:
    """Every suppression, loaded once (per push run, per ingest page): ``covers`` answers
    per row without a query."""

    salt: bytes
    email_hashes: frozenset[str]
    phone_hashes: frozenset[str]
    customer_ids: frozenset[int]

    @classmethod
    def load(cls, conn: Connection) -> SuppressionList:
        rows = conn.execute(
            select(SUPPRESSIONS.c.email_hash, SUPPRESSIONS.c.phone_hash, SUPPRESSIONS.c.customer_id)
        ).all()
        if not rows:
            # Nobody to suppress: no salt needed (reading it would make it, a write).
            return cls(b"", frozenset(), frozenset(), frozenset())
        return cls(
            store_salt(conn),
            frozenset(r.email_hash for r in rows if r.email_hash),
            frozenset(r.phone_hash for r in rows if r.phone_hash),
            frozenset(r.customer_id for r in rows if r.customer_id is not None),
        )

    def covers(
        self, *, email: object = None, phone: object = None, customer_id: int | None = None
    ) -> bool:
        """Whether a person with this email, phone or store customer id asked to be
        forgotten."""
        if not (self.email_hashes or self.phone_hashes or self.customer_ids):
            return False
        if customer_id is not None and customer_id in self.customer_ids:
            return True
        hashed = email_hash(self.salt, email)
        if hashed is not None and hashed in self.email_hashes:
            return True
        hashed = phone_hash(self.salt, phone)
        return hashed is not None and hashed in self.phone_hashes


def is_suppressed(conn: Connection, *, email: object = None, phone: object = None) -> bool:
    """Whether this email or phone belongs to someone who asked to be forgotten."""
    salt = store_salt(conn)
    hashes = [(SUPPRESSIONS.c.email_hash, email_hash(salt, email))]
    hashes.append((SUPPRESSIONS.c.phone_hash, phone_hash(salt, phone)))
    tests = [column == value for column, value in hashes if value is not None]
    if not tests:
        return False
    return conn.execute(select(SUPPRESSIONS.c.id).where(or_(*tests)).limit(1)).first() is not None


def suppressed_customer_ids() -> Select[tuple[int | None]]:
    """The store customer ids left in place of forgotten people, as a subquery:
    ``query.where(PROFILES.c.customer_id.not_in(suppressed_customer_ids()))``."""
    return select(SUPPRESSIONS.c.customer_id).where(SUPPRESSIONS.c.customer_id.is_not(None))


# -- opening a request ------------------------------------------------------------------------


def _customers_of(
    conn: Connection,
    email: str | None,
    customer_id: int | None,
    source: str | None,
    store_customer: int | None,
) -> set[int]:
    ids: set[int] = set()
    if store_customer is not None:
        ids.add(store_customer)
    if email is not None:
        ids |= set(conn.execute(select(CUSTOMERS.c.id).where(CUSTOMERS.c.email == email)).scalars())
        ids |= set(
            conn.execute(
                select(IDENTITIES.c.customer_id).where(
                    IDENTITIES.c.kind == "email", IDENTITIES.c.value == email
                )
            ).scalars()
        )
    if customer_id is not None:
        query = select(IDENTITIES.c.source, IDENTITIES.c.customer_id).where(
            IDENTITIES.c.kind == "customer_id", IDENTITIES.c.value == str(customer_id)
        )
        if source is not None:
            query = query.where(IDENTITIES.c.source == source)
        found = conn.execute(query).all()
        sources = sorted({row.source for row in found})
        if len(sources) > 1:
            raise PrivacyError(
                f"customer {customer_id} exists in sources {', '.join(sources)}: name one"
            )
        if not found:
            where = f" of source {source}" if source else ""
            raise PrivacyError(f"no customer {customer_id}{where} in the store")
        ids |= {row.customer_id for row in found}
    return ids


def _keys_of(mappings: Sequence[LoadedMapping]) -> dict[str, str]:
    """Per sync, the column its record keys come from (``customer_id`` for a segment)."""
    return {sync.name: sync.spec.key for mapping in mappings for sync in mapping.syncs}


def _records_of(
    conn: Connection, email: str | None, cids: Collection[int], keys_of: Mapping[str, str]
) -> list[tuple[str, str, str | None]]:
    """(sync, record key, vendor id) of every sync record of the person: syncs keyed on
    the customer id or the email, and any record whose vendor id is their address (a
    Mailchimp member). A sync keyed on another column (an order id) never matches a
    customer id that happens to be the same number."""
    values = {"customer_id": {str(c) for c in cids}, "email": {email} if email else set()}
    # A sync no longer configured is taken as keyed on the customer id, the default.
    syncs = conn.execute(select(SYNC_RECORDS.c.sync).distinct()).scalars().all()
    keys = {sync: keys_of.get(sync, "customer_id") for sync in syncs}
    tests: list[ColumnElement[bool]] = [
        and_(SYNC_RECORDS.c.sync == sync, SYNC_RECORDS.c.record_key.in_(values[key]))
        for sync, key in keys.items()
        if values.get(key)
    ]
    if email:
        tests.append(SYNC_RECORDS.c.dest_id == email)
    if not tests:
        return []
    rows = conn.execute(
        select(SYNC_RECORDS.c.sync, SYNC_RECORDS.c.record_key, SYNC_RECORDS.c.dest_id)
        .where(or_(*tests))
        .order_by(SYNC_RECORDS.c.sync, SYNC_RECORDS.c.record_key)
    ).all()
    return [(r.sync, r.record_key, r.dest_id) for r in rows]


def _identifiers(
    conn: Connection, email: str | None, cids: set[int], keys_of: Mapping[str, str]
) -> dict[str, Any]:
    """What the destination steps need to reach the person, read before the store forgets."""
    people = conn.execute(
        select(CUSTOMERS.c.email, CUSTOMERS.c.phone).where(CUSTOMERS.c.id.in_(cids))
    ).all()
    if email is None:
        email = next((p.email for p in people if p.email), None)
    phone = next((p.phone for p in people if p.phone), None)
    return {
        "email": email,
        "phone": phone,
        "customer_ids": sorted(cids),
        "records": [list(r) for r in _records_of(conn, email, cids, keys_of)],
    }


def open_request(
    conn: Connection,
    mappings: Sequence[LoadedMapping],
    *,
    email: str | None = None,
    customer_id: int | None = None,
    source: str | None = None,
    store_customer: int | None = None,
    requested_by: Requester = "cli",
) -> int:
    """Record a forget request and its steps in ``conn``'s transaction; its id.

    The person is named by ``email``, by the source's ``customer_id`` (WooCommerce's
    user id; ``source`` when several sources have it) or by the store's own
    ``store_customer`` id. An open request for the same person is reused (its missing
    steps added), so asking twice resumes rather than starts over.
    """
    if requested_by not in REQUESTERS:
        raise ValueError(f"requested_by must be one of {', '.join(REQUESTERS)}")
    address = normalize_email(email) if email is not None else None
    if email is not None and address is None:
        raise PrivacyError(f"not an email address: {email!r}")
    if address is None and customer_id is None and store_customer is None:
        raise PrivacyError("name the person by email or customer id")
    cids = _customers_of(conn, address, customer_id, source, store_customer)
    identifiers = _identifiers(conn, address, cids, _keys_of(mappings))
    salt = store_salt(conn)
    subject = email_hash(salt, identifiers["email"]) or _hash(
        salt, "customer", ",".join(map(str, sorted(cids)))
    )
    now = _now()
    request_id = conn.execute(
        select(PRIVACY_REQUESTS.c.id).where(
            PRIVACY_REQUESTS.c.kind == "forget",
            PRIVACY_REQUESTS.c.subject_hash == subject,
            PRIVACY_REQUESTS.c.status == "pending",
        )
    ).scalar()
    if request_id is None:
        request_id = conn.execute(
            PRIVACY_REQUESTS.insert()
            .values(
                kind="forget",
                subject_hash=subject,
                requested_by=requested_by,
                requested_at=now,
                status="pending",
                identifiers=identifiers,
            )
            .returning(PRIVACY_REQUESTS.c.id)
        ).scalar_one()
    _add_missing_steps(conn, request_id, mappings, now)
    log.info("privacy.forget_requested", request=request_id, requested_by=requested_by)
    return int(request_id)


def _add_missing_steps(
    conn: Connection, request_id: int, mappings: Sequence[LoadedMapping], now: datetime
) -> None:
    """A step for the store and for each mapping the request has none for yet. A request
    opened during a sync (WooCommerce's eraser) is opened without the mappings: its
    destination steps are added here when the service first runs it."""
    names = [f"{DESTINATION_STEP}{m.name}" for m in mappings] + [STORE_STEP]
    have = set(
        conn.execute(
            select(PRIVACY_STEPS.c.name).where(PRIVACY_STEPS.c.request_id == request_id)
        ).scalars()
    )
    missing = [name for name in dict.fromkeys(names) if name not in have]
    if missing:
        conn.execute(
            PRIVACY_STEPS.insert(),
            [
                {
                    "request_id": request_id,
                    "name": name,
                    "status": "pending",
                    "attempts": 0,
                    "updated_at": now,
                }
                for name in missing
            ],
        )


# -- running a request -----------------------------------------------------------------------


@dataclass(frozen=True)
class StepResult:
    name: str
    status: str
    attempts: int
    detail: str | None
    receipt: str | None
    last_error: str | None

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "attempts": self.attempts,
            "detail": self.detail,
            "receipt": self.receipt,
            "last_error": self.last_error,
        }


@dataclass(frozen=True)
class ForgetResult:
    request: int
    steps: list[StepResult] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return all(step.status in SETTLED for step in self.steps)

    def as_json(self) -> dict[str, Any]:
        return {
            "request": self.request,
            "done": self.done,
            "steps": [s.as_json() for s in self.steps],
        }


def _steps(conn: Connection, request_id: int) -> list[StepResult]:
    rows = conn.execute(
        select(PRIVACY_STEPS)
        .where(PRIVACY_STEPS.c.request_id == request_id)
        .order_by(PRIVACY_STEPS.c.id)
    ).all()
    return [
        StepResult(r.name, r.status, r.attempts, r.detail, r.receipt, r.last_error) for r in rows
    ]


def _settle_step(
    conn: Connection,
    request_id: int,
    name: str,
    status: str,
    *,
    detail: str | None = None,
    receipt: str | None = None,
    error: str | None = None,
) -> None:
    now = _now()
    values: dict[str, Any] = {
        "status": status,
        "attempts": PRIVACY_STEPS.c.attempts + 1,
        "updated_at": now,
        "last_error": error,
    }
    if status in SETTLED:
        values.update(detail=detail, receipt=receipt, done_at=now)
    conn.execute(
        PRIVACY_STEPS.update()
        .where(PRIVACY_STEPS.c.request_id == request_id, PRIVACY_STEPS.c.name == name)
        .values(**values)
    )


def _person(request_id: int, identifiers: Mapping[str, Any]) -> Person:
    records = identifiers.get("records") or []
    return Person(
        request=request_id,
        email=identifiers.get("email"),
        phone=identifiers.get("phone"),
        dest_ids={sync: dest_id for sync, _, dest_id in records if dest_id},
        record_keys={sync: key for sync, key, _ in records},
    )


async def _run_destination(
    mapping: LoadedMapping, person: Person, transport: httpx.AsyncBaseTransport | None
) -> tuple[str, str, str | None]:
    # Each destination hears only of its own syncs, not where else the person was sent.
    syncs = {sync.name for sync in mapping.syncs}
    person = replace(
        person,
        dest_ids={k: v for k, v in person.dest_ids.items() if k in syncs},
        record_keys={k: v for k, v in person.record_keys.items() if k in syncs},
    )
    destination = mapping.open(transport)
    try:
        receipt = await destination.forget(
            person,
            [sync.target for sync in mapping.syncs],
            {f.target for sync in mapping.syncs for f in sync.fields},
        )
    finally:
        await destination.aclose()
    return receipt.status, receipt.detail, receipt.receipt


def retry_delay(attempts: int) -> timedelta:
    """How long a failed step waits before the service tries it again: 5 minutes after
    the first failure, doubling, at most 6 hours (a destination that is down, or a
    mapping with a revoked key, is not asked every cycle)."""
    return min(RETRY_FIRST * (1 << min(max(attempts - 1, 0), 16)), RETRY_MAX)


def _due_steps(conn: Connection, request_id: int, now: datetime | None) -> list[str]:
    """The open steps of a request; with ``now``, only those whose retry is due."""
    rows = conn.execute(
        select(PRIVACY_STEPS.c.name, PRIVACY_STEPS.c.attempts, PRIVACY_STEPS.c.updated_at)
        .where(PRIVACY_STEPS.c.request_id == request_id, PRIVACY_STEPS.c.status.in_(OPEN))
        .order_by(PRIVACY_STEPS.c.id)
    ).all()
    return [
        r.name
        for r in rows
        if now is None
        or r.attempts == 0
        or r.updated_at is None
        or r.updated_at + retry_delay(r.attempts) <= now
    ]


async def run_request(
    engine: Engine,
    mappings: Sequence[LoadedMapping],
    request_id: int,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    due_at: datetime | None = None,
) -> ForgetResult:
    """Run the open steps of a forget request (with ``due_at``, only failed steps whose
    :func:`retry_delay` has passed by then), each outcome committed as it comes; the
    request is done (and its identifiers dropped) once every step is."""
    writer = writer_lock(engine)
    async with writer.held():
        with engine.begin() as conn:
            row = conn.execute(
                select(PRIVACY_REQUESTS).where(PRIVACY_REQUESTS.c.id == request_id)
            ).one()
            if row.status == "pending":
                _add_missing_steps(conn, request_id, mappings, _now())
            open_steps = _due_steps(conn, request_id, due_at)
    identifiers = dict(row.identifiers or {})
    person = _person(request_id, identifiers)
    by_name = {m.name: m for m in mappings}
    # Destinations first, while the store still holds what they may need; the store
    # step works from the recorded identifiers either way.
    for name in sorted(open_steps, key=lambda n: n == STORE_STEP):
        try:
            if name == STORE_STEP:
                async with writer.held():
                    with engine.begin() as conn:
                        detail = erase_person(conn, identifiers, request_id=request_id)
                        _settle_step(conn, request_id, name, "done", detail=detail)
                continue
            mapping = by_name.get(name.removeprefix(DESTINATION_STEP))
            if mapping is None:
                raise PrivacyError(
                    f"mapping {name.removeprefix(DESTINATION_STEP)!r} is not configured "
                    "any more: add it back, or erase the person there by hand"
                )
            status, detail, receipt = await _run_destination(mapping, person, transport)
        except Exception as exc:  # every failure is the step's: recorded, retried later
            log.warning("privacy.step_failed", request=request_id, step=name, error=str(exc))
            async with writer.held():
                with engine.begin() as conn:
                    _settle_step(conn, request_id, name, "failed", error=str(exc) or repr(exc))
            continue
        async with writer.held():
            with engine.begin() as conn:
                _settle_step(conn, request_id, name, status, detail=detail, receipt=receipt)
    async with writer.held():
        with engine.begin() as conn:
            steps = _steps(conn, request_id)
            if all(s.status in SETTLED for s in steps):
                conn.execute(
                    PRIVACY_REQUESTS.update()
                    .where(PRIVACY_REQUESTS.c.id == request_id)
                    .values(status="done", finished_at=_now(), identifiers=None)
                )
    return ForgetResult(request_id, steps)


async def forget(
    engine: Engine,
    mappings: Sequence[LoadedMapping],
    email: str | None = None,
    customer_id: int | None = None,
    *,
    source: str | None = None,
    requested_by: Requester = "cli",
    transport: httpx.AsyncBaseTransport | None = None,
) -> ForgetResult:
    """Erase a person everywhere: every destination mapping and the store (see the module
    docstring). Safe to call again: an open request for the person is resumed."""
    async with writer_lock(engine).held():
        with engine.begin() as conn:
            request_id = open_request(
                conn,
                mappings,
                email=email,
                customer_id=customer_id,
                source=source,
                requested_by=requested_by,
            )
    return await run_request(engine, mappings, request_id, transport=transport)


async def retry_pending(
    engine: Engine,
    mappings: Sequence[LoadedMapping],
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    now: datetime | None = None,
) -> list[ForgetResult]:
    """Run the due steps of every open forget request (the service, once a cycle): steps
    never tried, and failed ones whose :func:`retry_delay` has passed."""
    with engine.connect() as conn:
        ids = (
            conn.execute(
                select(PRIVACY_REQUESTS.c.id)
                .where(PRIVACY_REQUESTS.c.kind == "forget", PRIVACY_REQUESTS.c.status == "pending")
                .order_by(PRIVACY_REQUESTS.c.id)
            )
            .scalars()
            .all()
        )
    due_at = now or _now()
    return [
        await run_request(engine, mappings, rid, transport=transport, due_at=due_at) for rid in ids
    ]


def pending_steps(conn: Connection) -> list[dict[str, Any]]:
    """Every step of an open forget request that is not done, with its reason."""
    rows = conn.execute(
        select(
            PRIVACY_STEPS.c.request_id,
            PRIVACY_REQUESTS.c.requested_at,
            PRIVACY_REQUESTS.c.requested_by,
            PRIVACY_STEPS.c.name,
            PRIVACY_STEPS.c.status,
            PRIVACY_STEPS.c.attempts,
            PRIVACY_STEPS.c.last_error,
            PRIVACY_STEPS.c.updated_at,
        )
        .join(PRIVACY_REQUESTS, PRIVACY_REQUESTS.c.id == PRIVACY_STEPS.c.request_id)
        .where(PRIVACY_STEPS.c.status.in_(OPEN))
        .order_by(PRIVACY_STEPS.c.request_id, PRIVACY_STEPS.c.id)
    ).all()
    return [
        {
            "request": r.request_id,
            "requested_at": _iso(r.requested_at),
            "requested_by": r.requested_by,
            "step": r.name,
            "status": r.status,
            "attempts": r.attempts,
            "last_error": r.last_error,
            "updated_at": _iso(r.updated_at),
        }
        for r in rows
    ]


# -- the store step ---------------------------------------------------------------------------

# What is kept of an order's raw payload (WooCommerce REST v3 order properties): ids, status,
# dates and amounts, so totals and a re-parse stay right; addresses, names, notes, IP, user
# agent, payment references and meta are dropped.
_ORDER_KEYS: Final = frozenset(
    {
        "id",
        "parent_id",
        "number",
        "created_via",
        "version",
        "status",
        "currency",
        "date_created",
        "date_created_gmt",
        "date_modified",
        "date_modified_gmt",
        "date_paid",
        "date_paid_gmt",
        "date_completed",
        "date_completed_gmt",
        "discount_total",
        "discount_tax",
        "shipping_total",
        "shipping_tax",
        "cart_tax",
        "total",
        "total_tax",
        "prices_include_tax",
        "payment_method",
    }
)
_LINE_KEYS: Final = frozenset(
    {
        "id",
        "name",
        "product_id",
        "variation_id",
        "quantity",
        "tax_class",
        "subtotal",
        "subtotal_tax",
        "total",
        "total_tax",
        "taxes",
        "sku",
        "price",
        "code",
        "discount",
        "discount_tax",
        "method_id",
        "method_title",
        "rate_code",
        "rate_id",
        "label",
        "compound",
        "tax_total",
        "shipping_tax_total",
        "rate_percent",
    }
)
_LINE_LISTS: Final = ("line_items", "tax_lines", "shipping_lines", "fee_lines", "coupon_lines")
# Order attribution kept for reports (the store's orders.attribution_* columns read them):
# a channel, never the person.
_ATTRIBUTION_META: Final = frozenset(
    {"_wc_order_attribution_source_type", "_wc_order_attribution_utm_source"}
)


def _kept_order_raw(raw: Any) -> Any:
    if not isinstance(raw, dict):
        return None
    kept: dict[str, Any] = {k: v for k, v in raw.items() if k in _ORDER_KEYS}
    for name in _LINE_LISTS:
        lines = raw.get(name)
        if isinstance(lines, list):
            kept[name] = [
                {k: v for k, v in line.items() if k in _LINE_KEYS}
                for line in lines
                if isinstance(line, dict)
            ]
    refunds = raw.get("refunds")
    if isinstance(refunds, list):
        kept["refunds"] = [
            {k: r.get(k) for k in ("id", "total")} for r in refunds if isinstance(r, dict)
        ]
    meta = raw.get("meta_data")
    if isinstance(meta, list):
        kept["meta_data"] = [
            {"key": m.get("key"), "value": m.get("value")}
            for m in meta
            if isinstance(m, dict) and m.get("key") in _ATTRIBUTION_META
        ]
    return kept


def _contact_values(raw: Any) -> Iterator[str]:
    """Emails and phones as typed in a payload's billing/shipping addresses."""
    if not isinstance(raw, dict):
        return
    for block in ("billing", "shipping"):
        address = raw.get(block)
        if isinstance(address, dict):
            for key in ("email", "phone"):
                value = address.get(key)
                if isinstance(value, str) and value.strip():
                    yield value.strip()
    value = raw.get("email")
    if isinstance(value, str) and value.strip():
        yield value.strip()


def _text_columns(table: Table) -> list[Any]:
    return [c for c in table.columns if isinstance(c.type, String | Text | JSON)]


def _scrub_json(value: Any, needles: Collection[str]) -> Any:
    if isinstance(value, str):
        return ERASED if any(n in value.lower() for n in needles) else value
    if isinstance(value, list):
        return [_scrub_json(v, needles) for v in value]
    if isinstance(value, dict):
        return {k: _scrub_json(v, needles) for k, v in value.items()}
    return value


def _scrub_text(value: str, needles: Collection[str]) -> str:
    lowered = value.lower()
    for needle in needles:
        start = lowered.find(needle)
        while start >= 0:
            value = value[:start] + ERASED + value[start + len(needle) :]
            lowered = value.lower()
            start = lowered.find(needle, start + len(ERASED))
    return value


def _sweep(conn: Connection, needles: Collection[str]) -> int:
    """Replace the needles wherever they are left in any table of the store.

    The known places are cleared above by id; this catches the rest (a vendor's error
    message naming the address in sync_records.error or sync_runs.error, a stream's
    state, a table added later). Erasure is rare, so scanning every text column is fine.
    """
    changed = 0
    skip = {PRIVACY_REQUESTS.name, PRIVACY_STEPS.name, SUPPRESSIONS.name, PRIVACY_SECRET.name}
    for table in SQLModel.metadata.sorted_tables:
        if table.name in skip:
            continue
        pk = list(table.primary_key.columns)
        for column in _text_columns(table):
            text = func.lower(cast(column, Text))
            match = or_(*(text.contains(n, autoescape=True) for n in needles))
            for row in conn.execute(select(*pk, column).where(match)).all():
                value = row[-1]
                new = (
                    _scrub_text(value, needles)
                    if isinstance(value, str) and not isinstance(column.type, JSON)
                    else _scrub_json(value, needles)
                )
                where = [c == row[i] for i, c in enumerate(pk)]
                conn.execute(table.update().where(*where).values({column.name: new}))
                changed += 1
    return changed


def erase_person(
    conn: Connection, identifiers: Mapping[str, Any], *, request_id: int | None
) -> str:
    """Remove the person's personal data from every table in ``conn``'s transaction and add
    their suppression entry; what was done, as one line.

    The customer row stays, anonymized, and keeps its orders: amounts, totals and
    revenue figures do not change; the next recompute builds an anonymous profile.
    """
    cids = [int(c) for c in identifiers.get("customer_ids") or []]
    email = identifiers.get("email")
    phone = identifiers.get("phone")
    order_match: ColumnElement[bool] = ORDERS.c.customer_id.in_(cids)
    if email:
        order_match = or_(order_match, ORDERS.c.email == email)
    orders = conn.execute(select(ORDERS.c.id, ORDERS.c.raw).where(order_match)).all()
    order_ids = [o.id for o in orders]
    records = conn.execute(
        select(CUSTOMER_RECORDS.c.raw).where(CUSTOMER_RECORDS.c.customer_id.in_(cids))
    ).all()
    # Everything the person could be found by elsewhere: the normalized forms and the
    # forms as typed at checkout.
    needles = {v.lower() for v in (email, phone) if v}
    for raw in [o.raw for o in orders] + [r.raw for r in records]:
        needles |= {v.lower() for v in _contact_values(raw)}
    needles = {n for n in needles if len(n) >= MIN_NEEDLE and n != WORDPRESS_ERASED_EMAIL}

    for order in orders:
        conn.execute(
            ORDERS.update()
            .where(ORDERS.c.id == order.id)
            .values(email=None, customer_source_id=None, raw=_kept_order_raw(order.raw))
        )
    if order_ids:
        conn.execute(
            REFUNDS.update().where(REFUNDS.c.order_id.in_(order_ids)).values(raw=None, reason=None)
        )
    conn.execute(
        CUSTOMER_RECORDS.update()
        .where(CUSTOMER_RECORDS.c.customer_id.in_(cids))
        .values(email=None, raw=None)
    )
    conn.execute(IDENTITIES.delete().where(IDENTITIES.c.customer_id.in_(cids)))
    conn.execute(
        CUSTOMERS.update()
        .where(CUSTOMERS.c.id.in_(cids))
        .values(
            email=None,
            first_name=None,
            last_name=None,
            phone=None,
            country=None,
            city=None,
            postcode=None,
        )
    )
    conn.execute(
        PROFILES.update()
        .where(PROFILES.c.customer_id.in_(cids))
        .values(email=None, first_name=None, last_name=None, country=None)
    )
    forgotten_records = 0
    for sync, key, _ in identifiers.get("records") or []:
        forgotten_records += conn.execute(
            SYNC_RECORDS.delete().where(
                SYNC_RECORDS.c.sync == sync, SYNC_RECORDS.c.record_key == key
            )
        ).rowcount
    events = quarantined = swept = 0
    if needles:
        for table, column in ((EVENTS, EVENTS.c.payload), (QUARANTINE, QUARANTINE.c.payload)):
            text = func.lower(cast(column, Text))
            gone = conn.execute(
                table.delete().where(or_(*(text.contains(n, autoescape=True) for n in needles)))
            ).rowcount
            if table is EVENTS:
                events = gone
            else:
                quarantined = gone
        swept = _sweep(conn, needles)
    salt = store_salt(conn)
    now = _now()
    reason = f"forget request {request_id}" if request_id is not None else "re-synced after erasure"
    conn.execute(
        SUPPRESSIONS.insert(),
        [
            {
                "email_hash": email_hash(salt, email),
                "phone_hash": phone_hash(salt, phone),
                "customer_id": cid,
                "reason": reason,
                "request_id": request_id,
                "created_at": now,
            }
            for cid in ([*cids] if cids else [None])
        ],
    )
    return (
        f"{len(cids)} customer row(s) anonymized, {len(order_ids)} order(s) kept with their "
        f"amounts and no personal data, {forgotten_records} sync record(s), {events} webhook "
        f"event(s) and {quarantined} quarantined payload(s) removed, {swept} other value(s) "
        "erased; suppressed"
    )


def scrub_suppressed(
    conn: Connection,
    customer_ids: Iterable[int] | None = None,
    mappings: Sequence[LoadedMapping] = (),
) -> int:
    """Erase, again, people a source re-synced after they were forgotten (their order or
    account came back with their address): the customers among ``customer_ids`` (None:
    every customer) whose email or phone is suppressed; with ``mappings``, the sync
    records a push made of them meanwhile go too. Returns how many."""
    keys_of = _keys_of(mappings)
    suppressions = SuppressionList.load(conn)
    if not suppressions.email_hashes and not suppressions.phone_hashes:
        return 0
    query = select(CUSTOMERS.c.id, CUSTOMERS.c.email, CUSTOMERS.c.phone).where(
        or_(CUSTOMERS.c.email.is_not(None), CUSTOMERS.c.phone.is_not(None))
    )
    if customer_ids is not None:
        query = query.where(CUSTOMERS.c.id.in_(list(customer_ids)))
    erased = 0
    for row in conn.execute(query).all():
        if suppressions.covers(email=row.email, phone=row.phone):
            identifiers = _identifiers(conn, row.email, {row.id}, keys_of)
            erase_person(conn, identifiers, request_id=None)
            erased += 1
    return erased


def request_for_erased(
    conn: Connection,
    mappings: Sequence[LoadedMapping],
    *,
    source: str,
    order_id: int | None = None,
    customer_id: int | None = None,
) -> int | None:
    """Open a forget request for the person behind an order WooCommerce's eraser
    anonymized (``order_id``) or an account it deleted (``customer_id``), both the
    source's ids, as the store still knows them; the request's id, or None when the store
    knows no one there or already forgot them. Call it before the anonymized payload is
    written: afterwards the order no longer says whose it was."""
    if order_id is not None:
        query = select(ORDERS.c.customer_id).where(
            ORDERS.c.source == source, ORDERS.c.source_id == order_id
        )
    elif customer_id is not None:
        query = select(IDENTITIES.c.customer_id).where(
            IDENTITIES.c.source == source,
            IDENTITIES.c.kind == "customer_id",
            IDENTITIES.c.value == str(customer_id),
        )
    else:
        raise ValueError("name the erased order or account")
    cid = conn.execute(query).scalar()
    if cid is None:
        return None
    known = conn.execute(
        select(CUSTOMERS.c.id).where(
            CUSTOMERS.c.id == cid,
            or_(CUSTOMERS.c.email.is_not(None), CUSTOMERS.c.phone.is_not(None)),
        )
    ).first()
    if known is None:
        return None
    return open_request(conn, mappings, store_customer=cid, requested_by="woocommerce-eraser")


def prune_raw_payloads(
    conn: Connection, days: int, *, now: datetime | None = None
) -> dict[str, int]:
    """Drop raw payloads of source rows last changed more than ``days`` ago, and of
    webhook deliveries applied that long ago; the parsed rows stay. Quarantined payloads
    are kept: they have not been parsed yet. Returns the rows cleared per table."""
    if days < 1:
        raise ValueError("days must be at least 1")
    cutoff = (now or _now()) - timedelta(days=days)
    cleared: dict[str, int] = {}
    for table, when in (
        (CUSTOMER_RECORDS, CUSTOMER_RECORDS.c.modified_at),
        (ORDERS, ORDERS.c.modified_at),
        (REFUNDS, REFUNDS.c.created_at),
        (PRODUCTS, PRODUCTS.c.modified_at),
        (COUPONS, COUPONS.c.modified_at),
    ):
        cleared[table.name] = conn.execute(
            table.update().where(when < cutoff, table.c.raw.is_not(None)).values(raw=None)
        ).rowcount
    cleared[EVENTS.name] = conn.execute(
        EVENTS.update()
        .where(
            EVENTS.c.status == "applied",
            EVENTS.c.received_at < cutoff,
            EVENTS.c.payload.is_not(None),
        )
        .values(payload=None)
    ).rowcount
    return cleared


# -- access -------------------------------------------------------------------------------------


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime | date) else value


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _rows(conn: Connection, query: Any) -> list[dict[str, Any]]:
    return [_jsonable(dict(row._mapping)) for row in conn.execute(query).all()]


def export(
    engine: Engine,
    email: str,
    *,
    mappings: Sequence[LoadedMapping] = (),
    requested_by: Requester = "cli",
) -> dict[str, Any]:
    """Everything the store holds about the person with ``email``, JSON-able, plus where it
    was sent (``sent_to``: one entry per destination sync that holds a record of them).
    Amounts are integer minor units of the row's currency, as stored."""
    address = normalize_email(email)
    if address is None:
        raise PrivacyError(f"not an email address: {email!r}")
    with engine.connect() as conn:
        cids = sorted(_customers_of(conn, address, None, None, None))
        order_match = ORDERS.c.customer_id.in_(cids) | (ORDERS.c.email == address)
        orders = _rows(conn, select(ORDERS).where(order_match).order_by(ORDERS.c.created_at))
        order_ids = [o["id"] for o in orders]
        items = _rows(
            conn,
            select(ORDER_ITEMS)
            .where(ORDER_ITEMS.c.order_id.in_(order_ids))
            .order_by(ORDER_ITEMS.c.id),
        )
        for order in orders:
            order["items"] = [i for i in items if i["order_id"] == order["id"]]
        records = [
            row
            for sync, key, _ in _records_of(conn, address, cids, _keys_of(mappings))
            for row in _rows(
                conn,
                select(SYNC_RECORDS).where(
                    SYNC_RECORDS.c.sync == sync, SYNC_RECORDS.c.record_key == key
                ),
            )
        ]
        suppressed = is_suppressed(conn, email=address)
        document = {
            "subject": {"email": address},
            "exported_at": _now().isoformat(),
            "suppressed": suppressed,
            "customers": _rows(conn, select(CUSTOMERS).where(CUSTOMERS.c.id.in_(cids))),
            "identities": _rows(
                conn,
                select(IDENTITIES.c.source, IDENTITIES.c.kind, IDENTITIES.c.value).where(
                    IDENTITIES.c.customer_id.in_(cids)
                ),
            ),
            "customer_records": _rows(
                conn, select(CUSTOMER_RECORDS).where(CUSTOMER_RECORDS.c.customer_id.in_(cids))
            ),
            "orders": orders,
            "refunds": _rows(
                conn,
                select(REFUNDS).where(REFUNDS.c.order_id.in_(order_ids)).order_by(REFUNDS.c.id),
            ),
            "profiles": _rows(conn, select(PROFILES).where(PROFILES.c.customer_id.in_(cids))),
            "segment_memberships": _rows(
                conn,
                select(MEMBERSHIPS)
                .where(MEMBERSHIPS.c.customer_id.in_(cids))
                .order_by(MEMBERSHIPS.c.entered_at),
            ),
            "sent_to": _sent_to(records, mappings),
        }
    _record_done(engine, "export", address, requested_by)
    return document


def _sent_to(
    records: list[dict[str, Any]], mappings: Sequence[LoadedMapping]
) -> list[dict[str, Any]]:
    where = {s.name: m for m in mappings for s in m.syncs}
    out = []
    for record in records:
        mapping = where.get(record["sync"])
        out.append(
            {
                "sync": record["sync"],
                "mapping": mapping.name if mapping else None,
                "destination": mapping.spec.destination if mapping else None,
                "record_key": record["record_key"],
                "status": record["status"],
                "in_destination": record["in_destination"],
                "destination_id": record["dest_id"],
                # The last time the destination accepted the record; syncd keeps no
                # history of earlier sends.
                "last_sent_at": record["sent_at"],
                "updated_at": record["updated_at"],
            }
        )
    return out


def _record_done(engine: Engine, kind: str, email: str, requested_by: str) -> None:
    """Record a request that is done at once (an export): who asked, when, about whom (the
    salted hash)."""
    with writer_lock(engine), engine.begin() as conn:
        now = _now()
        conn.execute(
            PRIVACY_REQUESTS.insert().values(
                kind=kind,
                subject_hash=email_hash(store_salt(conn), email),
                requested_by=requested_by,
                requested_at=now,
                status="done",
                finished_at=now,
            )
        )
