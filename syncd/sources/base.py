"""The source kit: what a source declares and what the ingest engine asks of it.

A source is one class (``Source``) registered by its ``type`` in :mod:`syncd.sources`. It
declares each of its streams once (``Stream``: name, path, cursor field, windowed or scanned,
variants, child endpoints) and knows its API's query parameters and payload shapes: it
parses payloads into the store's rows and reads child endpoints. It never writes state,
retries or sleeps: :mod:`syncd.ingest` windows, pages, commits and keeps cursors;
:mod:`syncd.http` retries and paces.
"""

from __future__ import annotations

import hashlib
import hmac
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import orjson
from sqlalchemy import ColumnElement, Connection

from syncd.http import ServiceClient
from syncd.identity import PersonAttrs
from syncd.store.types import storable_copy

if TYPE_CHECKING:
    from syncd.config import ConsentSettings
    from syncd.mapping import SyncSpec

# The store entities a stream's rows can land in (the engine knows how to commit each).
ENTITIES = ("customers", "orders", "products", "coupons", "refunds")


# A column for one member, as SQL: given the member's ``customer_profiles.customer_id``
# column (to correlate a subquery with) and the sync's settings.
ColumnBuilder = Callable[[ColumnElement[Any], "SyncSpec"], ColumnElement[Any]]
# The members for whom a true/false column is true, read once per push: given a
# connection, the sync's settings and the customers in scope (None: everyone).
FlagQuery = Callable[[Connection, "SyncSpec", Collection[int] | None], set[int]]


class PushColumns(Protocol):
    """The row columns a source contributes to segment syncs, beyond the profile's: how
    the source knows a person (an id there) and what it holds about them (an opt-in).

    ``expressions`` are read per member in the members' query; ``flags`` are true for
    the members in a set read once per push (one pass over the source's records is
    cheaper than a subquery per member). Their order is the order of the row's values,
    which the content hash covers: a new column goes last."""

    @property
    def expressions(self) -> Mapping[str, ColumnBuilder]: ...

    @property
    def flags(self) -> Mapping[str, FlagQuery]: ...


@dataclass(frozen=True)
class Statement:
    """What one record says about its person's marketing consent on one channel.

    ``origin`` names where, within the source: ``order:123:_wc_newsletter_optin`` (the
    engine prefixes the source's name). A record read again restates it: the store keeps
    one statement per channel and origin, the newest reading."""

    channel: str  # email | sms | ads
    granted: bool
    stated_at: datetime  # UTC: when the record says it was given or withdrawn
    origin: str


class BadRecord(ValueError):
    """A payload that cannot be stored as it is: it goes to quarantine with this reason."""


@dataclass
class Page:
    items: list[Any]
    total: int | None  # rows matching the query when this page was read (e.g. X-WP-Total)
    total_pages: int | None  # pages of that query (e.g. X-WP-TotalPages)
    number: int = 1
    date: datetime | None = None  # the response's Date header: the source's clock, to the second


@dataclass(frozen=True)
class Stream:
    """One stream of a source, declared once.

    ``entity`` is the store entity its rows land in (one of ``ENTITIES``). ``windowed``
    streams are read by modification-date windows on ``cursor_field``; the others by a scan
    of ids and modification dates (a collection without a date filter). ``variants`` are
    separately paged queries sharing the stream, each with its own cursor (``suffix``
    appended to the stream's name); ``deleted_variant`` names the suffix of the variant
    that serves records the source reports deleted but still has (a trash).
    ``children`` names the child endpoints read with a row (a product's variations, an
    order's refunds).
    """

    name: str
    path: str
    entity: str
    windowed: bool
    cursor_field: str
    variants: tuple[tuple[str, Mapping[str, str]], ...] = (("", {}),)
    deleted_variant: str | None = None
    children: tuple[str, ...] = ()


def record_key(payload: object) -> str:
    """The quarantine key of a payload: its id, or a digest when it has none."""
    if isinstance(payload, Mapping):
        value = payload.get("id")
        if isinstance(value, int | str) and not isinstance(value, bool) and str(value):
            return str(value)
    try:
        text = orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:  # nested past orjson's limit: keyed by what is kept of it
        text = orjson.dumps(storable_copy(payload), option=orjson.OPT_SORT_KEYS)
    return "sha256:" + hashlib.sha256(text).hexdigest()[:64]


class SourceClient(Protocol):
    """The paged reads the engine makes through a source's client."""

    per_page: int
    http: ServiceClient

    async def page(self, path: str, params: Mapping[str, str], number: int) -> Page: ...

    async def by_ids(
        self, path: str, ids: Sequence[int], extra: Mapping[str, str] | None = None
    ) -> list[Any]: ...

    def window_params(
        self,
        variant: Mapping[str, str],
        after: datetime | None,
        before: datetime,
        *,
        by_id: bool = False,
    ) -> dict[str, str]: ...

    def scan_params(self, variant: Mapping[str, str], fields: Sequence[str]) -> dict[str, str]: ...

    def store_now(self) -> datetime | None: ...

    async def probe_clock(self, path: str) -> None: ...

    async def aclose(self) -> None: ...


class ParsedOrder(Protocol):
    """An order as a source parses it: its ``orders`` row, its ``order_items`` rows."""

    row: dict[str, Any]
    items: list[dict[str, Any]]
    customer_source_id: int  # 0 for guests

    def person(self) -> PersonAttrs: ...


class ParsedCustomer(Protocol):
    source_id: int
    record: dict[str, Any]
    person: PersonAttrs


class WebhookSpec(ABC):
    """How one source's webhook deliveries look: signature, topics, payload → stream.

    The generic intake (:mod:`syncd.sources.webhooks`) stores and applies deliveries;
    this says which requests are deliveries and what they are about.
    """

    signature_header: ClassVar[str]
    delivery_id_header: ClassVar[str]  # the header naming one delivery (not always unique)
    digest: ClassVar[str] = "sha256"  # the HMAC's hash, fed the raw body as it streams in

    def signature_matches(self, mac: hmac.HMAC, header: str) -> bool:
        """Whether the signature header carries this body's HMAC (compared in constant time)."""
        expected = self.encode_signature(mac.digest())
        # Starlette decodes header values as latin-1: encoding back gives the bytes sent.
        return hmac.compare_digest(expected, header.strip().encode("latin-1"))

    @abstractmethod
    def encode_signature(self, digest: bytes) -> bytes: ...

    @abstractmethod
    def is_ping_request(self, headers: Mapping[str, str]) -> bool:
        """An unsigned request that may be the source's "is this URL alive" ping."""

    @abstractmethod
    def is_ping_body(self, body: bytes) -> bool: ...

    @abstractmethod
    def topic(self, headers: Mapping[str, str]) -> tuple[str, str] | None:
        """The (resource, event) a delivery is about, when it is one this intake applies."""

    @abstractmethod
    def topics(self) -> list[str]:
        """Every ``resource.event`` applied, for the message of a rejected topic."""

    @abstractmethod
    def stream_of(self, resource: str) -> str | None:
        """The stream a resource's payloads go through."""

    @abstractmethod
    def is_deletion(self, event: str) -> bool: ...

    @abstractmethod
    def record_id(self, payload: Any, *, deleted: bool) -> int | None:
        """The record's id in a delivery's payload; None when it has no usable one."""

    def delivery_id(self, headers: Mapping[str, str]) -> str | None:
        return headers.get(self.delivery_id_header)

    @abstractmethod
    def webhook_id(self, headers: Mapping[str, str]) -> int | None: ...


class Source(ABC):
    """One configured source: its client, its streams and how its payloads become rows.

    The parse methods raise ``BadRecord`` for a payload that cannot be stored (it goes
    to quarantine with that reason)."""

    type: ClassVar[str]
    # Every stream, in the order a run reads them (a stream's rows may need an earlier one's).
    streams: ClassVar[Mapping[str, Stream]]
    webhooks: ClassVar[WebhookSpec | None] = None
    # The columns it adds to a segment sync's rows (syncd.push reads them).
    push_columns: ClassVar[PushColumns | None] = None

    def __init__(self, name: str, settings: Any, client: SourceClient | None = None) -> None:
        self.name = name
        self.settings = settings
        self.client = client or self.make_client(name, settings)

    @classmethod
    def stream_names(cls) -> tuple[str, ...]:
        return tuple(cls.streams)

    def erased(self, payload: Mapping[str, Any]) -> bool:
        """Whether an order or customer payload is one the source's own privacy eraser
        anonymized: the engine then opens a forget request for the person it was."""
        return False

    @staticmethod
    @abstractmethod
    def make_client(name: str, settings: Any) -> SourceClient: ...

    @abstractmethod
    def modified_of(self, payload: Mapping[str, Any]) -> datetime | None:
        """A payload's modification time (the cursor field), None when absent or unreadable."""

    # -- parsing: payload -> store rows ------------------------------------------------

    @abstractmethod
    def parse_customer(self, payload: Mapping[str, Any]) -> ParsedCustomer: ...

    @abstractmethod
    def parse_order(self, payload: Mapping[str, Any]) -> ParsedOrder: ...

    @abstractmethod
    def parse_refund(
        self, payload: Mapping[str, Any], order_currency: str | None
    ) -> dict[str, Any]: ...

    @abstractmethod
    def parse_product(
        self, payload: Mapping[str, Any], currency: str, parent_source_id: int | None = None
    ) -> dict[str, Any]: ...

    @abstractmethod
    def parse_coupon(self, payload: Mapping[str, Any], currency: str) -> dict[str, Any]: ...

    # -- consent --------------------------------------------------------------------------

    def consent_statements(
        self, entity: str, payload: Mapping[str, Any], settings: ConsentSettings
    ) -> list[Statement]:
        """The consent statements of one stored record (``entity``: ``customers`` or
        ``orders``), read where ``settings`` says. Called when the record is stored, in its
        transaction, for polled pages and webhook deliveries alike. A source that records
        no consent keeps this default."""
        return []

    # -- what a payload says about other records -----------------------------------------

    @abstractmethod
    def account_of(self, order: Any) -> int | None:
        """The registered buyer's account id of an order payload; None for a guest."""

    @abstractmethod
    def refund_order_of(self, refund: Mapping[str, Any]) -> Any:
        """The order id a refund payload names (as given: parsing checks it)."""

    @abstractmethod
    def listed_refunds(self, order_raw: Mapping[str, Any]) -> set[int] | None:
        """The refund ids an order payload lists, None when it lists none at all."""

    @abstractmethod
    def variation_parent(self, product: Any) -> int | None:
        """The parent product id of a variation's payload; None for anything else."""

    # -- child endpoints and store facts -----------------------------------------------

    @abstractmethod
    def has_variations(self, product: Mapping[str, Any]) -> bool:
        """Whether a product payload has variations (read with it: rows of ``products``)."""

    @abstractmethod
    async def variations(self, product_id: int) -> list[Any]:
        """Every variation of a variable product."""

    @abstractmethod
    async def order_refunds(self, order_id: int) -> list[Any]:
        """Every refund of one order, shaped as the refunds stream serves them."""

    @abstractmethod
    async def store_currency(self) -> str:
        """The currency product and coupon prices are in."""
