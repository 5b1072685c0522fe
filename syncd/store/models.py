"""The store's tables: the public contract users write segments and dashboards against.

Every table and column here is documented in the README. Change them only
through a migration (``syncd/store/migrations/versions``).

Conventions: money is integer minor units next to its ISO 4217 currency code;
times are UTC; every source row keeps ``source`` (the configured source name),
``source_id`` (the id at the source) and ``raw`` (the payload it came from),
and ``(source, source_id)`` is unique, so several stores can be synced side by
side. ``deleted_at`` marks rows that disappeared (trashed or deleted) at the
source: they are kept for history but stop counting.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlmodel import Field, SQLModel

from syncd.store.types import JSONType, UTCDateTime


def _utc(nullable: bool = True, index: bool = False) -> Any:
    return Field(default=None, sa_type=UTCDateTime, nullable=nullable, index=index)


def _json() -> Any:
    return Field(default=None, sa_type=JSONType, nullable=True)


class Customer(SQLModel, table=True):
    """One row per person: registered customers and guest buyers merged on normalized email."""

    __tablename__ = "customers"

    id: int | None = Field(default=None, primary_key=True)
    email: str | None = Field(default=None, unique=True)
    first_name: str | None = None
    last_name: str | None = None
    phone: str | None = None  # E.164, or null when the shopper's input is not a valid number
    country: str | None = Field(default=None, max_length=2)  # ISO 3166-1 alpha-2
    city: str | None = None
    postcode: str | None = None
    created_at: datetime | None = _utc()  # registration, or the first order of a guest
    updated_at: datetime | None = _utc()  # source time of the data the attributes came from
    # Which record the attributes came from: 2 = registered customer record, 1 = an order's
    # billing address. A higher rank wins, then the newer record: the result is the same
    # whatever order the records arrive in.
    attrs_rank: int = Field(default=0, sa_column_kwargs={"server_default": "0"})


class CustomerIdentity(SQLModel, table=True):
    """How source records map to people: a source's customer id or a normalized email."""

    __tablename__ = "customer_identities"
    __table_args__ = (UniqueConstraint("source", "kind", "value"),)

    id: int | None = Field(default=None, primary_key=True)
    customer_id: int = Field(
        sa_column=Column(
            Integer, ForeignKey("customers.id", ondelete="CASCADE"), nullable=False, index=True
        )
    )
    source: str
    kind: str  # "customer_id" | "email"
    value: str


class CustomerRecord(SQLModel, table=True):
    """Registered customer accounts as the source has them (raw payload kept)."""

    __tablename__ = "customer_records"
    __table_args__ = (UniqueConstraint("source", "source_id"),)

    id: int | None = Field(default=None, primary_key=True)
    source: str
    source_id: int = Field(sa_type=BigInteger)
    customer_id: int = Field(
        sa_column=Column(
            Integer, ForeignKey("customers.id", ondelete="CASCADE"), nullable=False, index=True
        )
    )
    email: str | None = None
    role: str | None = None
    created_at: datetime | None = _utc()
    modified_at: datetime | None = _utc()
    deleted_at: datetime | None = _utc()
    raw: Any = _json()


class Order(SQLModel, table=True):
    __tablename__ = "orders"
    __table_args__ = (
        UniqueConstraint("source", "source_id"),
        Index("ix_orders_customer_created", "customer_id", "created_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    source: str
    source_id: int = Field(sa_type=BigInteger)
    customer_id: int | None = Field(
        default=None,
        sa_column=Column(Integer, ForeignKey("customers.id", ondelete="SET NULL"), nullable=True),
    )
    customer_source_id: int | None = Field(default=None, sa_type=BigInteger)  # 0 = guest
    email: str | None = None  # normalized billing email
    status: str
    currency: str = Field(max_length=3)
    total_minor: int = Field(sa_type=BigInteger)
    subtotal_minor: int = Field(default=0, sa_type=BigInteger)  # line items before discounts
    discount_minor: int = Field(default=0, sa_type=BigInteger)
    shipping_minor: int = Field(default=0, sa_type=BigInteger)
    tax_minor: int = Field(default=0, sa_type=BigInteger)
    refunded_minor: int = Field(default=0, sa_type=BigInteger)
    coupon_codes: Any = _json()  # JSON list of the codes applied
    payment_method: str | None = None
    created_via: str | None = None
    # WooCommerce's order attribution (meta _wc_order_attribution_source_type / _utm_source):
    # "utm", "organic", "referral", "typein", "admin", ... and e.g. "google".
    attribution_source_type: str | None = None
    attribution_utm_source: str | None = None
    created_at: datetime | None = _utc(index=True)
    paid_at: datetime | None = _utc()
    completed_at: datetime | None = _utc()
    modified_at: datetime | None = _utc(index=True)
    deleted_at: datetime | None = _utc()
    raw: Any = _json()


class OrderItem(SQLModel, table=True):
    __tablename__ = "order_items"
    __table_args__ = (UniqueConstraint("order_id", "source_id"),)

    id: int | None = Field(default=None, primary_key=True)
    order_id: int = Field(
        sa_column=Column(Integer, ForeignKey("orders.id", ondelete="CASCADE"), nullable=False)
    )
    source_id: int = Field(sa_type=BigInteger)
    product_source_id: int | None = Field(default=None, sa_type=BigInteger, index=True)
    variation_source_id: int | None = Field(default=None, sa_type=BigInteger)
    sku: str | None = None
    name: str | None = None
    quantity: int = 0
    subtotal_minor: int = Field(default=0, sa_type=BigInteger)  # before discounts
    total_minor: int = Field(default=0, sa_type=BigInteger)  # after discounts, before tax


class Refund(SQLModel, table=True):
    __tablename__ = "refunds"
    __table_args__ = (UniqueConstraint("source", "source_id"),)

    id: int | None = Field(default=None, primary_key=True)
    source: str
    source_id: int = Field(sa_type=BigInteger)
    # Null until the order itself is synced; order_source_id always says which order it is.
    order_id: int | None = Field(
        default=None,
        sa_column=Column(
            Integer, ForeignKey("orders.id", ondelete="SET NULL"), nullable=True, index=True
        ),
    )
    order_source_id: int = Field(sa_type=BigInteger)
    amount_minor: int = Field(sa_type=BigInteger)
    currency: str | None = Field(default=None, max_length=3)
    reason: str | None = Field(default=None, sa_type=Text)
    created_at: datetime | None = _utc()
    deleted_at: datetime | None = _utc()
    raw: Any = _json()


class Product(SQLModel, table=True):
    """Products and their variations (a variation has ``parent_source_id``)."""

    __tablename__ = "products"
    __table_args__ = (UniqueConstraint("source", "source_id"),)

    id: int | None = Field(default=None, primary_key=True)
    source: str
    source_id: int = Field(sa_type=BigInteger)
    parent_source_id: int | None = Field(default=None, sa_type=BigInteger)
    sku: str | None = None
    name: str | None = None
    type: str | None = None
    status: str | None = None
    price_minor: int | None = Field(default=None, sa_type=BigInteger)
    currency: str | None = Field(default=None, max_length=3)
    categories: Any = _json()  # JSON list of category names
    stock_status: str | None = None
    created_at: datetime | None = _utc()
    modified_at: datetime | None = _utc()
    deleted_at: datetime | None = _utc()
    raw: Any = _json()


class Coupon(SQLModel, table=True):
    __tablename__ = "coupons"
    __table_args__ = (UniqueConstraint("source", "source_id"),)

    id: int | None = Field(default=None, primary_key=True)
    source: str
    source_id: int = Field(sa_type=BigInteger)
    code: str
    discount_type: str | None = None  # percent | fixed_cart | fixed_product
    amount_minor: int | None = Field(default=None, sa_type=BigInteger)  # fixed_* types
    percent_bp: int | None = None  # percent type, in basis points (12.5 % = 1250)
    currency: str | None = Field(default=None, max_length=3)
    usage_count: int = 0
    date_expires: datetime | None = _utc()
    created_at: datetime | None = _utc()
    modified_at: datetime | None = _utc()
    deleted_at: datetime | None = _utc()
    raw: Any = _json()


class SyncState(SQLModel, table=True):
    """One cursor per source stream. Written in the same transaction as the rows it covers."""

    __tablename__ = "sync_state"

    source: str = Field(primary_key=True)
    stream: str = Field(primary_key=True)
    cursor: datetime | None = _utc()  # the stream's rows modified before this are in the store
    reconciled_at: datetime | None = _utc()  # last id reconciliation (hard deletes)
    state: Any = _json()  # stream-specific extras
    updated_at: datetime | None = _utc()


class SyncRun(SQLModel, table=True):
    """Every run of anything: source syncs now; segment recomputes and pushes later."""

    __tablename__ = "sync_runs"
    __table_args__ = (Index("ix_sync_runs_kind_name_started", "kind", "name", "started_at"),)

    id: int | None = Field(default=None, primary_key=True)
    kind: str  # "source" | "segments" | "destination" | "backtest" (segments --as-of)
    name: str
    started_at: datetime | None = _utc()
    finished_at: datetime | None = _utc()
    status: str  # running | success | partial | failed
    counts: Any = _json()
    error: str | None = Field(default=None, sa_type=Text)


class Quarantine(SQLModel, table=True):
    """Input that failed validation, with the reason. One row per bad record, refreshed on re-read;
    removed when the record later arrives valid."""

    __tablename__ = "quarantine"
    __table_args__ = (UniqueConstraint("source", "stream", "record_key"),)

    id: int | None = Field(default=None, primary_key=True)
    source: str
    stream: str
    source_id: str | None = None
    record_key: str = Field(
        sa_type=String(80)
    )  # source_id, or a hash of the payload when it has none
    reason: str = Field(sa_type=Text)
    payload: Any = _json()
    first_seen_at: datetime | None = _utc()
    seen_at: datetime | None = _utc()
    times_seen: int = 1


class CustomerProfile(SQLModel, table=True):
    """Derived metrics per customer, rebuilt by every segment recompute (see the README).

    Money is integer minor units of ``currency`` (the reporting currency); durations are
    whole days measured to ``as_of``.
    """

    __tablename__ = "customer_profiles"

    customer_id: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    email: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    country: str | None = Field(default=None, max_length=2)
    orders_count: int = 0
    gross_revenue_minor: int = Field(default=0, sa_type=BigInteger)
    refunded_minor: int = Field(default=0, sa_type=BigInteger)
    net_revenue_minor: int = Field(default=0, sa_type=BigInteger)
    currency: str | None = Field(default=None, max_length=3)
    avg_order_value_minor: int | None = Field(default=None, sa_type=BigInteger)
    first_order_at: datetime | None = _utc()
    last_order_at: datetime | None = _utc()
    days_since_last_order: int | None = None
    avg_days_between_orders: float | None = None
    distinct_products: int = 0
    top_category: str | None = None
    coupon_order_share: float | None = None
    acquisition_source: str | None = None
    r_score: int | None = None
    f_score: int | None = None
    m_score: int | None = None
    rfm_segment: str | None = None
    p_alive: float | None = None
    expected_orders_90d: float | None = None
    expected_order_value_minor: int | None = Field(default=None, sa_type=BigInteger)
    clv_12m_minor: int | None = Field(default=None, sa_type=BigInteger)
    lifecycle_stage: str = "prospect"
    has_open_cart: bool = False
    cart_value_minor: int | None = Field(default=None, sa_type=BigInteger)
    cart_updated_at: datetime | None = _utc()
    as_of: datetime | None = _utc()  # the instant the profile describes (end of --as-of's day)
    computed_at: datetime | None = _utc()  # when the recompute ran
    # Marketing consent per channel ([consent] in the config): true only when the latest
    # statement (or the channel's rule or column) says yes; when and where it was stated.
    consent_email: bool = Field(default=False, sa_column_kwargs={"server_default": text("false")})
    consent_email_at: datetime | None = _utc()
    consent_email_source: str | None = None
    consent_sms: bool = Field(default=False, sa_column_kwargs={"server_default": text("false")})
    consent_sms_at: datetime | None = _utc()
    consent_sms_source: str | None = None
    consent_ads: bool = Field(default=False, sa_column_kwargs={"server_default": text("false")})
    consent_ads_at: datetime | None = _utc()
    consent_ads_source: str | None = None


class ConsentStatement(SQLModel, table=True):
    """What a source record says about a person's marketing consent on one channel,
    extracted when the record is stored (raw payloads may be dropped later). The latest
    ``stated_at`` per person and channel is the person's consent (see customer_profiles).

    ``source`` names the statement's origin, e.g. ``woocommerce:order:123:_wc_newsletter_optin``
    (source name, record kind, id, meta key): a record read again replaces its statement.
    """

    __tablename__ = "consent_statements"
    __table_args__ = (
        UniqueConstraint("channel", "source"),
        Index("ix_consent_statements_customer", "customer_id", "channel", "stated_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    customer_id: int = Field(
        sa_column=Column(Integer, ForeignKey("customers.id", ondelete="CASCADE"), nullable=False)
    )
    channel: str  # email | sms | ads
    granted: bool
    stated_at: datetime = _utc(nullable=False)
    source: str = Field(sa_type=Text)
    recorded_at: datetime | None = _utc()


class ConsentExtracted(SQLModel, table=True):
    """Per source: the ``[consent]`` configuration its stored records' statements were last
    read with. A source sync reads them again from the raw payloads when it differs (the
    upgrade that added consent, a changed meta key)."""

    __tablename__ = "consent_extracted"

    source: str = Field(primary_key=True)
    config: str = Field(sa_type=Text)
    extracted_at: datetime | None = _utc()


class SegmentMembership(SQLModel, table=True):
    """Who is in which segment since when: one open row (exited_at null) per current member.

    A customer who leaves and comes back gets a new row, so the history is complete.
    """

    __tablename__ = "segment_memberships"
    __table_args__ = (
        Index(
            "ux_segment_memberships_open",
            "segment",
            "customer_id",
            unique=True,
            sqlite_where=text("exited_at IS NULL"),
            postgresql_where=text("exited_at IS NULL"),
        ),
        Index("ix_segment_memberships_customer", "customer_id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    segment: str
    customer_id: int
    entered_at: datetime = _utc(nullable=False)
    exited_at: datetime | None = _utc()


class ModelFit(SQLModel, table=True):
    """Fitted model parameters, one row per fit: the CLV models' history."""

    __tablename__ = "model_fits"
    __table_args__ = (Index("ix_model_fits_model_fitted", "model", "fitted_at"),)

    id: int | None = Field(default=None, primary_key=True)
    model: str  # "bgnbd" | "gamma_gamma"
    params: Any = _json()  # e.g. {"r": ..., "alpha": ..., "a": ..., "b": ...}; null when not fitted
    log_likelihood: float | None = None
    customers: int = 0  # customers the model was fitted on
    error: str | None = Field(default=None, sa_type=Text)  # why it was not fitted
    as_of: datetime | None = _utc()
    fitted_at: datetime | None = _utc()


class SyncRecord(SQLModel, table=True):
    """Per destination sync and record: what was last sent, when, and how it went.

    ``content_hash`` identifies the content last processed (sent, refused or skipped), so
    an unchanged row is not sent again; ``in_destination`` says whether the destination
    holds the record (a mirror sync removes only those); ``dest_id`` is the vendor's id
    for it (Klaviyo profile ids: list removal takes ids, not emails).
    """

    __tablename__ = "sync_records"
    __table_args__ = {"sqlite_with_rowid": False}

    sync: str = Field(primary_key=True)
    record_key: str = Field(primary_key=True)
    content_hash: int = Field(sa_type=BigInteger)
    status: str  # sent | failed | skipped
    in_destination: bool = False
    dest_id: str | None = None
    attempts: int = 0  # consecutive failures of the current content
    error: str | None = Field(default=None, sa_type=Text)  # the vendor's reason, or why skipped
    sent_at: datetime | None = _utc()  # last accepted by the destination
    updated_at: datetime | None = _utc()
    # A refused record: when its next try is due; NULL once it is given up (until its
    # content changes or ``syncd push --retry-failed``).
    retry_after: datetime | None = _utc()


class Event(SQLModel, table=True):
    """Store webhook deliveries (and, later, other behavioural events), kept as received.

    A delivery is stored before it is answered and applied afterwards, so one the process
    did not get to (a crash, a restart) is applied when the service starts again.
    WooCommerce's ``X-WC-Webhook-Delivery-ID`` is ``wp_hash(webhook id + unix second)``:
    two different deliveries of one webhook in the same second share it. Uniqueness is
    therefore on the delivery id *and* a digest of the signed body: a delivery sent twice
    (a proxy retry) is stored once, two events that merely share a second are both kept.
    """

    __tablename__ = "events"
    __table_args__ = (
        UniqueConstraint("source", "delivery_id", "body_sha256"),
        # The worker's start-up query: what is still pending.
        Index("ix_events_status", "status"),
    )

    id: int | None = Field(default=None, primary_key=True)
    source: str
    delivery_id: str = Field(sa_type=String(128))  # the header, or sha256:<body> without one
    body_sha256: str = Field(sa_type=String(64))  # hex digest of the raw (signed) body
    topic: str  # e.g. order.updated
    resource: str  # order | customer | product | coupon
    event: str  # created | updated | deleted | restored | published
    webhook_id: int | None = Field(default=None, sa_type=BigInteger)  # X-WC-Webhook-ID
    received_at: datetime = _utc(nullable=False)
    applied_at: datetime | None = _utc()
    status: str  # pending | applied | failed
    attempts: int = 0  # failed attempts to apply (transient errors are retried)
    error: str | None = Field(default=None, sa_type=Text)
    payload: Any = _json()


class JobLease(SQLModel, table=True):
    """Which ``syncd run`` process claimed each scheduled trigger of a job.

    ``slot`` is the trigger's nominal fire time (before jitter, to the millisecond), the same
    on every replica; the primary key lets exactly one replica claim a slot, so each
    scheduled job runs once per trigger however many replicas share the store. Rows older
    than two days are pruned by the daemon.
    """

    __tablename__ = "job_leases"

    job: str = Field(primary_key=True)  # "source:<name>", "segments", "destination:<sync>"
    slot: datetime = Field(primary_key=True, sa_type=UTCDateTime)
    owner: str  # host:pid:random of the claiming process
    claimed_at: datetime = _utc(nullable=False, index=True)


class PrivacySecret(SQLModel, table=True):
    """The store's own random salt for privacy hashes, created once (see syncd.privacy).

    Kept in the store and nowhere else: a suppression's hash of an address can be checked
    by whoever holds the store, but not reversed with a dictionary of addresses by anyone
    who sees only a hash (a log line, a copied table) without this salt.
    """

    __tablename__ = "privacy_secret"

    id: int = Field(default=1, primary_key=True, sa_column_kwargs={"autoincrement": False})
    salt: str = Field(sa_type=String(64))  # hex of 32 random bytes
    created_at: datetime = _utc(nullable=False)


class PrivacyRequest(SQLModel, table=True):
    """An erasure (``forget``) or access (``export``) request and who made it.

    The person appears only as ``subject_hash`` (salted). ``identifiers`` holds what the
    pending steps still need to reach the destinations (the address, the vendor ids): it is
    emptied once no step is pending.
    """

    __tablename__ = "privacy_requests"
    __table_args__ = (Index("ix_privacy_requests_subject", "subject_hash", "kind"),)

    id: int | None = Field(default=None, primary_key=True)
    kind: str  # forget | export
    subject_hash: str = Field(sa_type=String(64))
    requested_by: str  # cli | http | woocommerce-eraser
    requested_at: datetime = _utc(nullable=False)
    status: str  # pending | done
    finished_at: datetime | None = _utc()
    identifiers: Any = _json()


class PrivacyStep(SQLModel, table=True):
    """One step of a forget request: a destination mapping's deletion, or the store's own."""

    __tablename__ = "privacy_steps"
    __table_args__ = (UniqueConstraint("request_id", "name"),)

    id: int | None = Field(default=None, primary_key=True)
    request_id: int = Field(
        sa_column=Column(
            Integer, ForeignKey("privacy_requests.id", ondelete="CASCADE"), nullable=False
        )
    )
    name: str  # "store" or "destination:<mapping name>"
    status: str  # pending | done | failed | not_applicable
    attempts: int = 0
    last_error: str | None = Field(default=None, sa_type=Text)
    detail: str | None = Field(default=None, sa_type=Text)  # what was done, or why not
    receipt: str | None = None  # the vendor's own reference for the deletion, when it gives one
    done_at: datetime | None = _utc()
    updated_at: datetime | None = _utc()


class Suppression(SQLModel, table=True):
    """People who asked to be forgotten: no sync may re-add them anywhere.

    Salted hashes only (``syncd.privacy.subject_hash``): of the normalized email and of
    the E.164 phone when known. ``customer_id`` is the store's anonymized row left in
    place of the person, so order totals stay right.
    """

    __tablename__ = "privacy_suppressions"

    id: int | None = Field(default=None, primary_key=True)
    email_hash: str | None = Field(default=None, sa_type=String(64), index=True)
    phone_hash: str | None = Field(default=None, sa_type=String(64), index=True)
    customer_id: int | None = Field(default=None, index=True)
    reason: str
    request_id: int | None = None
    created_at: datetime = _utc(nullable=False)


def _table(model: type[SQLModel]) -> Table:
    table: Table = model.__table__  # type: ignore[attr-defined]
    return table


# The tables as SQLAlchemy Core objects, for the set-based SQL and bulk upserts.
CUSTOMERS = _table(Customer)
IDENTITIES = _table(CustomerIdentity)
CUSTOMER_RECORDS = _table(CustomerRecord)
ORDERS = _table(Order)
ORDER_ITEMS = _table(OrderItem)
REFUNDS = _table(Refund)
PRODUCTS = _table(Product)
COUPONS = _table(Coupon)
SYNC_STATE = _table(SyncState)
SYNC_RUNS = _table(SyncRun)
QUARANTINE = _table(Quarantine)
PROFILES = _table(CustomerProfile)
MEMBERSHIPS = _table(SegmentMembership)
MODEL_FITS = _table(ModelFit)
SYNC_RECORDS = _table(SyncRecord)
EVENTS = _table(Event)
JOB_LEASES = _table(JobLease)
PRIVACY_SECRET = _table(PrivacySecret)
PRIVACY_REQUESTS = _table(PrivacyRequest)
PRIVACY_STEPS = _table(PrivacyStep)
SUPPRESSIONS = _table(Suppression)
CONSENT_STATEMENTS = _table(ConsentStatement)
CONSENT_EXTRACTED = _table(ConsentExtracted)
