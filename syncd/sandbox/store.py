"""A deterministic fake WooCommerce store with wc/v3-shaped payloads.

Customers, guest buyers, orders, refunds, products, variations and coupons generated from a
seed, plus the edits a live store goes through (``mutate``) and records a sync must quarantine
(``add_malformed``). ``SandboxServer`` serves it over HTTP.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random
import threading
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from datetime import time as dt_time
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal
from typing import Any, Final
from zoneinfo import ZoneInfo

import orjson

__all__ = [
    "KINDS",
    "ORDER_STATUSES",
    "IndexEntry",
    "SandboxStore",
]

Payload = dict[str, Any]

KINDS: Final = ("customers", "orders", "refunds", "products", "variations", "coupons")
ORDER_STATUSES: Final = (
    "pending",
    "processing",
    "on-hold",
    "completed",
    "cancelled",
    "refunded",
    "failed",
    "checkout-draft",
)
# Statuses in which WooCommerce has taken the money (wc_get_is_paid_statuses() plus refunded,
# which was paid before it was refunded): these count towards total_sales and coupon usage.
_PAID_STATUSES: Final = frozenset({"processing", "completed", "refunded"})
_USAGE_STATUSES: Final = frozenset({"processing", "on-hold", "completed", "refunded"})
_ZERO_DECIMAL_CURRENCIES: Final = frozenset({"JPY", "KRW", "VND", "CLP", "ISK"})
# Rough size of one "dollar" in other currencies, so a JPY store has yen-sized prices.
_CURRENCY_SCALE: Final = {"JPY": 150, "KRW": 1300, "VND": 25000, "CLP": 900, "ISK": 140}
_CURRENCY_SYMBOL: Final = {
    "USD": "&#36;",
    "EUR": "&euro;",
    "GBP": "&pound;",
    "JPY": "&yen;",
    "CAD": "&#36;",
    "AUD": "&#36;",
}
_WC_VERSION: Final = "9.4.2"


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """What the server filters and sorts one record by (kept apart from the payload, so a
    malformed payload still sorts and filters like the record it was)."""

    id: int
    created_gmt: str
    created_local: str
    modified_gmt: str
    modified_local: str
    title: str
    slug: str
    status: str
    parent: int
    customer: int
    email: str
    role: str


@dataclass(frozen=True, slots=True)
class _Country:
    code: str
    weight: float
    places: tuple[tuple[str, str, str], ...]  # city, state code, postcode
    streets: tuple[str, ...]
    first_names: tuple[str, ...]
    last_names: tuple[str, ...]
    phones: tuple[str, ...]  # "#" is a random digit
    tax: tuple[str, Decimal, bool] | None  # label, rate percent, shipping taxable
    state_tax: Mapping[str, Decimal]


_US_FIRST = ("James", "Mary", "Robert", "Patricia", "Michael", "Jennifer", "David", "Linda")
_US_LAST = ("Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "O'Brien")
_COUNTRIES: Final = (
    _Country(
        "US",
        0.45,
        (
            ("San Francisco", "CA", "94103"),
            ("New York", "NY", "10001"),
            ("Austin", "TX", "73301"),
            ("Seattle", "WA", "98101"),
            ("Portland", "OR", "97201"),
        ),
        ("969 Market St", "350 Fifth Ave", "1600 Congress Ave", "400 Broad St", "1 Main St"),
        (*_US_FIRST, "José", "Zoë"),
        _US_LAST,
        ("(212) 555-01##", "212-555-01##", "+1 415 555 01##", "415.555.01##", "(555) 555-5555"),
        None,
        {
            "CA": Decimal("7.25"),
            "NY": Decimal("8.875"),
            "TX": Decimal("6.25"),
            "WA": Decimal("6.5"),
        },
    ),
    _Country(
        "GB",
        0.15,
        (("London", "", "SW1A 1AA"), ("Manchester", "", "M1 1AE"), ("Leeds", "", "LS1 4AP")),
        ("10 Downing Street", "221B Baker Street", "1 Deansgate"),
        ("Oliver", "Amelia", "Harry", "Isla", "Siobhán"),
        ("Taylor", "Davies", "Evans", "Wilson", "Thompson"),
        ("+44 20 7946 0###", "020 7946 0###", "07911 123###", "+44 7911 123###"),
        ("VAT", Decimal("20"), True),
        {},
    ),
    _Country(
        "DE",
        0.10,
        (("Berlin", "", "10115"), ("München", "", "80331"), ("Hamburg", "", "20095")),
        ("Unter den Linden 1", "Marienplatz 8", "Jungfernstieg 12"),
        ("Lukas", "Mia", "Jürgen", "Lea", "Matthias"),
        ("Müller", "Schmidt", "Schneider", "Fischer", "Weiß"),
        ("0049 30 12345##", "+49 30 12345##", "030 12345##", "+49 (0)30 12345##"),
        ("MwSt.", Decimal("19"), True),
        {},
    ),
    _Country(
        "CA",
        0.08,
        (("Toronto", "ON", "M5H 2N2"), ("Ottawa", "ON", "K1P 1J1")),
        ("100 Queen St W", "111 Wellington St"),
        ("Liam", "Chloé", "Noah", "Emma"),
        ("Tremblay", "Roy", "Gagnon", "MacDonald"),
        ("(416) 555-01##", "416-555-01##", "+1 613 555 01##"),
        ("HST", Decimal("13"), True),
        {},
    ),
    _Country(
        "FR",
        0.07,
        (("Paris", "", "75001"), ("Lyon", "", "69001")),
        ("1 Rue de Rivoli", "12 Place Bellecour"),
        ("Camille", "Léa", "Hugo", "Étienne"),
        ("Martin", "Bernard", "Dubois", "Lefèvre"),
        ("+33 1 23 45 ## ##", "01 23 45 ## ##", "06 12 34 ## ##"),
        ("TVA", Decimal("20"), True),
        {},
    ),
    _Country(
        "AU",
        0.07,
        (("Sydney", "NSW", "2000"), ("Melbourne", "VIC", "3000")),
        ("1 George St", "200 Collins St"),
        ("Jack", "Charlotte", "William", "Ruby"),
        ("Nguyen", "Kelly", "Ryan", "Walker"),
        ("+61 2 5550 ####", "(02) 5550 ####", "0491 570 1##"),
        ("GST", Decimal("10"), True),
        {},
    ),
    _Country(
        "NL",
        0.04,
        (("Amsterdam", "", "1012 JS"), ("Utrecht", "", "3511 AA")),
        ("Dam 1", "Oudegracht 100"),
        ("Daan", "Sanne", "Bram", "Fleur"),
        ("de Jong", "Jansen", "van den Berg", "Bakker"),
        ("+31 20 123 ####", "020-123 ####", "06-12345###"),
        ("BTW", Decimal("21"), True),
        {},
    ),
    _Country(
        "JP",
        0.04,
        (("Shibuya-ku", "JP13", "150-0002"), ("Osaka-shi", "JP27", "530-0001")),
        ("1-2-3 Shibuya", "4-5-6 Umeda"),
        ("Haruto", "Yui", "Sota", "Hina"),
        ("Sato", "Suzuki", "Takahashi", "Tanaka"),
        ("03-1234-####", "+81 3 1234 ####", "090-1234-####"),
        ("JCT", Decimal("10"), True),
        {},
    ),
)
_JUNK_PHONES: Final = ("n/a", "N/A", "-", "0000000000", "123", "none", "")
_EMAIL_DOMAINS: Final = (
    "example.com",
    "example.org",
    "example.net",
    "mail.example",
    "inbox.example",
    "shop.test",
)
_PAYMENT_METHODS: Final = (
    ("stripe", "Credit Card (Stripe)", 45),
    ("ppcp-gateway", "PayPal", 25),
    ("bacs", "Direct bank transfer", 12),
    ("cod", "Cash on delivery", 10),
    ("cheque", "Check payments", 8),
)
_USER_AGENTS: Final = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like "
    "Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.5 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:127.0) Gecko/20100101 Firefox/127.0",
)
_ATTRIBUTION_SOURCES: Final = {
    "utm": ("google", "facebook", "newsletter", "instagram", "klaviyo"),
    "organic": ("google", "bing", "duckduckgo"),
    "referral": ("instagram.com", "reddit.com", "blog.example"),
    "typein": ("(direct)",),
}
_CATEGORIES: Final = (
    (9, "Clothing", "clothing"),
    (14, "T-shirts", "t-shirts"),
    (15, "Accessories", "accessories"),
    (16, "Home", "home"),
    (17, "Kitchen", "kitchen"),
    (18, "Stationery", "stationery"),
    (19, "Food & Drink", "food-drink"),
)
_PRODUCT_NOUNS: Final = (
    ("T-Shirt", (9, 14)),
    ("Hoodie", (9,)),
    ("Beanie", (9, 15)),
    ("Socks", (9,)),
    ("Tote Bag", (15,)),
    ("Backpack", (15,)),
    ("Phone Case", (15,)),
    ("Mug", (16, 17)),
    ("Candle", (16,)),
    ("Water Bottle", (17,)),
    ("Notebook", (18,)),
    ("Poster", (16,)),
    ("Coffee Beans", (19,)),
    ("Tea Sampler", (19,)),
)
_PRODUCT_ADJECTIVES: Final = (
    "Classic",
    "Organic",
    "Vintage",
    "Premium",
    "Everyday",
    "Deluxe",
    "Mini",
    "Eco",
)
_VARIATION_ATTRIBUTES: Final = (
    (1, "Size", ("S", "M", "L", "XL")),
    (2, "Color", ("Black", "White", "Green", "Red")),
)
_REFUND_REASONS: Final = ("", "Damaged in transit", "Customer changed mind", "Wrong size", "")
# (code, discount type, amount in dollars or percent); "freeship" only grants free shipping.
_COUPONS: Final = (
    ("welcome10", "percent", 10),
    ("spring15", "percent", 15),
    ("vip20", "percent", 20),
    ("summer25", "percent", 25),
    ("save5", "fixed_cart", 5),
    ("take10off", "fixed_cart", 10),
    ("bfcm30", "percent", 30),
    ("loyal15", "percent", 15),
    ("freeship", "fixed_cart", 0),
    ("newsletter10", "percent", 10),
)


class SandboxStore:
    """A fake WooCommerce store, reproducible from its seed.

    The public dicts hold the wc/v3 payloads as the REST API returns them: ``customers``
    (role ``customer``), ``staff`` (other WordPress roles, listed by ``/customers?role=all``),
    ``orders`` (trashed ones included, with status ``trash``), ``refunds`` (by refund id, with
    ``parent_id``), ``products``, ``variations`` (product id -> variation id -> payload) and
    ``coupons``; ``deleted`` holds force-deleted ids per kind. Edit payloads through
    ``mutate``/``add_malformed``, or call ``touch`` after changing one in place, so the
    server's caches see the change. Hold ``lock`` to read while another thread mutates.
    """

    def __init__(
        self,
        seed: int = 1,
        customers: int = 300,
        guests: int = 150,
        orders: int = 2000,
        products: int = 40,
        coupons: int = 10,
        refund_rate: float = 0.08,
        currency: str = "USD",
        timezone: str = "America/New_York",
        now: datetime | None = None,
        clock_skew: timedelta = timedelta(0),
    ) -> None:
        if min(customers, guests, orders, coupons) < 0 or products < 1:
            raise ValueError("counts must be >= 0 (and products >= 1)")
        if not 0 <= refund_rate <= 1:
            raise ValueError("refund_rate must be between 0 and 1")
        if len(currency) != 3 or not currency.isalpha():
            raise ValueError(f"currency must be an ISO 4217 code, not {currency!r}")
        # The store's clock runs clock_skew ahead of the real one (behind when negative): it
        # stamps new and changed records and answers the Date header (see clock()).
        self.clock_skew = clock_skew
        store_now = datetime.now(UTC) + clock_skew
        if now is None:
            # Midnight UTC today (store time): two stores built the same day with the same
            # seed are equal, and all history lies before the store's clock.
            anchor = store_now.replace(hour=0, minute=0, second=0, microsecond=0)
        else:
            anchor = now if now.tzinfo else now.replace(tzinfo=UTC)
            anchor = anchor.astimezone(UTC).replace(microsecond=0)
            if anchor > store_now:
                raise ValueError(
                    "now must not be in the future: history must predate the store's clock"
                )

        self.lock = threading.RLock()
        self.seed = seed
        self.currency = currency.upper()
        self.timezone = ZoneInfo(timezone)
        self.now = anchor
        self.site_url = "https://example.com"
        self.decimals = 0 if self.currency in _ZERO_DECIMAL_CURRENCIES else 2
        self._quantum = Decimal(1).scaleb(-self.decimals)
        self._scale = Decimal(_CURRENCY_SCALE.get(self.currency, 1))

        self.customers: dict[int, Payload] = {}
        self.staff: dict[int, Payload] = {}
        self.orders: dict[int, Payload] = {}
        self.refunds: dict[int, Payload] = {}
        self.products: dict[int, Payload] = {}
        self.variations: dict[int, dict[int, Payload]] = {}
        self.coupons: dict[int, Payload] = {}
        self.deleted: dict[str, set[int]] = {kind: set() for kind in KINDS}
        self.malformed: dict[str, int] = {}

        self._index: dict[str, dict[int, IndexEntry]] = {kind: {} for kind in KINDS}
        self._blobs: dict[tuple[str, int], bytes] = {}
        self._sorted: dict[tuple[str, str], tuple[int, list[int]]] = {}
        self._version: dict[str, int] = dict.fromkeys(KINDS, 0)
        self._variation_parent: dict[int, int] = {}

        rng = random.Random(seed)
        self._mutation_rng = random.Random(rng.getrandbits(64))
        self._next_user_id = 1
        self._next_post_id = 10
        self._next_item_id = 1
        self._next_meta_id = 1000
        self._guest_emails: list[str] = []
        _Generator(self, rng, refund_rate).run(customers, guests, orders, products, coupons)

    def clock(self) -> datetime:
        """Now on the store's clock: the real time plus ``clock_skew``. A WooCommerce store
        stamps ``date_modified`` and its HTTP ``Date`` header with its server's clock, which
        need not agree with the syncing machine's."""
        return datetime.now(UTC) + self.clock_skew

    # ----------------------------------------------------------------- reads (for the server)

    def index(self, kind: str) -> Mapping[int, IndexEntry]:
        """Filter/sort keys of every record of ``kind`` (``customers`` includes ``staff``)."""
        return self._index[kind]

    def version(self, kind: str) -> int:
        """A counter bumped on every change to ``kind``; caches keyed on it stay valid."""
        return self._version[kind]

    def payload(self, kind: str, record_id: int) -> Payload:
        """The payload of one record (``KeyError`` when there is none)."""
        if kind == "customers":
            return (
                self.customers[record_id] if record_id in self.customers else self.staff[record_id]
            )
        if kind == "variations":
            return self.variations[self._variation_parent[record_id]][record_id]
        table: dict[int, Payload] = getattr(self, kind)
        return table[record_id]

    def blob(self, kind: str, record_id: int, *, with_parent_id: bool = True) -> bytes:
        """The record serialized as JSON, cached until the record changes.

        ``with_parent_id=False`` gives a refund as ``/orders/{id}/refunds`` shows it; the global
        ``/refunds`` list adds ``parent_id`` after ``id``.
        """
        key = (kind if with_parent_id else "order_refunds", record_id)
        cached = self._blobs.get(key)
        if cached is None:
            data = self.payload(kind, record_id)
            if not with_parent_id:
                data = {k: v for k, v in data.items() if k != "parent_id"}
            cached = orjson.dumps(data)
            self._blobs[key] = cached
        return cached

    def sorted_ids(self, kind: str, field: str) -> list[int]:
        """Ids of ``kind`` ascending by (``field`` of ``IndexEntry``, id); do not modify."""
        version = self._version[kind]
        cached = self._sorted.get((kind, field))
        if cached is not None and cached[0] == version:
            return cached[1]
        entries = self._index[kind]
        ids = sorted(entries, key=lambda i: (getattr(entries[i], field), i))
        self._sorted[(kind, field)] = (version, ids)
        return ids

    # ---------------------------------------------------------------------------- writes

    def set_site_url(self, url: str) -> None:
        """Point ``_links``, permalinks and image URLs at ``url`` (the server's address)."""
        with self.lock:
            self.site_url = url.rstrip("/")
            for kind in KINDS:
                for record_id in list(self._index[kind]):
                    payload = self.payload(kind, record_id)
                    if "id" in payload:
                        self._apply_links(kind, payload)
                    else:
                        payload["_links"] = {
                            "collection": [{"href": f"{self.site_url}/wp-json/wc/v3/{kind}"}]
                        }
                    self._invalidate(kind, record_id)

    def touch(self, kind: str, record_id: int) -> None:
        """Re-index a record after its payload was edited in place (dates are not changed)."""
        with self.lock:
            self._reindex(kind, record_id)

    def delete_customer(self, customer_id: int) -> None:
        """Delete a customer account as WordPress does: no trash, no trace in the API (their
        orders keep the customer id)."""
        with self.lock:
            del self.customers[customer_id]
            self._remove("customers", customer_id)

    def create_customer(self, email: str, changes: Mapping[str, Any] | None = None) -> Payload:
        """Register a customer as ``POST /customers`` does (``wc_create_new_customer``): the
        username from the email's local part, made unique; then ``changes`` as an update.
        The caller checks the email is valid and not taken."""
        with self.lock:
            stamp = _Stamp(self.clock(), self.timezone)
            user_id = self._take_user_id()
            taken = {str(p.get("username", "")).lower() for p in self._users()}
            base = email.split("@")[0] or "customer"
            username = base
            for n in itertools.count(1):
                if username.lower() not in taken:
                    break
                username = f"{base}-{n}"
            empty = dict.fromkeys(
                ("first_name", "last_name", "company", "address_1", "address_2", "city"), ""
            )
            empty.update(postcode="", country="", state="")
            payload = _new_user(
                user_id,
                stamp,
                email,
                ("", ""),
                "customer",
                username,
                {**empty, "email": "", "phone": ""},
                {**empty, "phone": ""},
            )
            self.customers[user_id] = payload
            self._apply_links("customers", payload)
            self._reindex("customers", user_id, created_gmt=stamp.gmt)
            if changes:
                self.update_customer(user_id, changes)
            return payload

    def update_customer(self, customer_id: int, changes: Mapping[str, Any]) -> Payload:
        """Apply a wc/v3 customer update (``KeyError`` for an unknown id) and stamp
        ``date_modified`` with the store's clock (``clock()``), as saving a WC_Customer does.

        ``email``, ``first_name``, ``last_name`` and the known ``billing``/``shipping`` keys
        are set; ``meta_data`` entries go through ``WC_Data::update_meta_data``: with an
        ``id`` that row gets the key and value, without one the key's first row gets the
        value and its other rows go, an unknown key (or id) adds a row, and a ``null``
        value deletes the row when saved. The caller validates types.
        """
        with self.lock:
            payload = self.payload("customers", customer_id)
            for name in ("email", "first_name", "last_name"):
                if name in changes:
                    payload[name] = changes[name]
            for name in ("billing", "shipping"):
                given = changes.get(name)
                if isinstance(given, Mapping):
                    address = payload[name]
                    for key, value in given.items():
                        if key in address:
                            address[key] = value
            if "meta_data" in changes:
                self._update_meta(payload, changes["meta_data"])
            _Stamp(self.clock(), self.timezone).apply(payload, "date_modified")
            self._reindex("customers", customer_id)
            return payload

    def refund_order(self, order_id: int, amount: Decimal | None = None) -> Payload:
        """Refund an order as ``POST orders/{id}/refunds`` with ``api_refund=false`` does:
        ``amount`` (None: what is left, and the order becomes ``refunded``; a partial refund
        keeps its status), listed first in the order's ``refunds``, the order's
        ``date_modified`` stamped now. Returns the refund as ``GET refunds`` lists it.
        ``KeyError`` for an unknown order, ``ValueError`` when nothing is left to refund."""
        with self.lock:
            order = self.orders[order_id]
            stamp = _Stamp(self.clock(), self.timezone)
            refund = _add_refund(self, self._mutation_rng, order, stamp, amount)
            if refund is None:
                raise ValueError(f"order {order_id} has nothing left to refund")
            self._apply_links("refunds", refund)
            self._reindex("refunds", refund["id"])
            self._reindex("orders", order_id)
            return refund

    def delete_refund(self, refund_id: int) -> None:
        """Delete a refund as ``DELETE orders/{id}/refunds/{refund_id}?force=true`` does: for
        good (refunds have no trash), so the order's ``refunds`` list, read from its refund
        posts, no longer shows it. The order's dates are left alone."""
        with self.lock:
            refund = self.refunds.pop(refund_id)
            self._remove("refunds", refund_id)
            order = self.orders[refund["parent_id"]]
            order["refunds"] = [r for r in order["refunds"] if r["id"] != refund_id]
            self._reindex("orders", order["id"])

    def trash_order(self, order_id: int) -> Payload:
        """``DELETE orders/{id}`` without ``force``: the order goes to the trash and is still
        served, with ``status: "trash"`` and ``date_modified`` stamped now."""
        with self.lock:
            order = self.orders[order_id]
            _trash(self, order, _Stamp(self.clock(), self.timezone))
            self._reindex("orders", order_id)
            return order

    def delete_order(self, order_id: int) -> None:
        """``DELETE orders/{id}?force=true``: the order is gone (GET gives 404, no webhook),
        its refunds with it (``WC_Order_Data_Store_CPT::delete``)."""
        with self.lock:
            order = self.orders.pop(order_id)
            self._remove("orders", order_id)
            for entry in order["refunds"]:
                if self.refunds.pop(entry["id"], None) is not None:
                    self._remove("refunds", entry["id"])

    def set_order_status(self, order_id: int, status: str) -> Payload:
        """``PUT orders/{id}`` with ``{"status": ...}``: on a trashed order this brings it
        back (WooCommerce 10.0.2 queues no webhook for it at all, neither
        ``order.restored`` nor ``order.updated``: only a poll sees it); ``date_modified``
        is stamped now."""
        with self.lock:
            order = self.orders[order_id]
            order["status"] = status
            _Stamp(self.clock(), self.timezone).apply(order, "date_modified")
            self._reindex("orders", order_id)
            return order

    def _update_meta(self, payload: Payload, entries: Iterable[Mapping[str, Any]]) -> None:
        meta: list[Payload] = payload.setdefault("meta_data", [])
        for entry in entries:
            key, value, meta_id = entry.get("key"), entry.get("value"), entry.get("id")
            target: Payload | None = None
            if meta_id:
                target = next((m for m in meta if m.get("id") == meta_id), None)
            else:
                matches = [m for m in meta if m.get("key") == key]
                if matches:
                    target = matches[0]
                    extra = {id(m) for m in matches[1:]}
                    meta[:] = [m for m in meta if id(m) not in extra]
            if target is not None:
                target["key"] = key
                target["value"] = value
            else:
                # add_meta_data($key, $value, unique=true): other rows with the key go first.
                meta[:] = [m for m in meta if m.get("key") != key]
                meta.append({"id": self._take_meta_id(), "key": key, "value": value})
        meta[:] = [m for m in meta if m.get("value") is not None]

    def _users(self) -> Iterable[Payload]:
        return itertools.chain(self.customers.values(), self.staff.values())

    def mutate(self, fraction: float = 0.01, seed: int | None = None) -> dict[str, list[int]]:
        """Change about ``fraction`` of the records the way a live store changes.

        New orders (guest, registered, and from brand-new customers), status changes with
        their paid/completed dates, refunds, trashed and force-deleted orders, price and stock
        changes, coupon edits and usage, customer edits. Every change stamps
        ``date_modified(_gmt)`` with the store's clock (``clock()``). Returns the ids changed per
        kind, plus ``deleted_orders`` and ``deleted_refunds``.
        """
        if not 0 <= fraction <= 1:
            raise ValueError("fraction must be between 0 and 1")
        with self.lock:
            rng = random.Random(seed) if seed is not None else self._mutation_rng
            return _Mutation(self, rng).run(fraction)

    def add_malformed(self) -> dict[str, int]:
        """Inject one of each record a sync must quarantine, stamped as modified now.

        An order whose ``total`` is ``"12,34abc"``, an order in currency ``"XYZ"``, an order
        whose ``date_created_gmt`` is ``"not-a-date"``, and a customer without an ``id``
        (returned under the store's internal key for it). Also kept in ``malformed``.
        """
        with self.lock:
            stamp = _Stamp(self.clock(), self.timezone)
            template_id = next(
                (i for i, o in self.orders.items() if o["status"] == "completed"),
                next(iter(self.orders), None),
            )
            if template_id is None:
                raise RuntimeError("the store has no order to copy")
            created: dict[str, int] = {}
            defects: tuple[tuple[str, str, str], ...] = (
                ("order_bad_total", "total", "12,34abc"),
                ("order_bad_currency", "currency", "XYZ"),
                ("order_bad_date", "date_created_gmt", "not-a-date"),
            )
            for name, field, value in defects:
                order = orjson.loads(orjson.dumps(self.orders[template_id]))
                order_id = self._take_post_id()
                for field_name in ("line_items", "tax_lines", "shipping_lines", "coupon_lines"):
                    for item in order[field_name]:
                        item["id"] = self._take_item_id()
                order.update(
                    id=order_id,
                    number=str(order_id),
                    refunds=[],
                    status="processing",
                    date_completed=None,
                    date_completed_gmt=None,
                )
                stamp.apply(order, "date_created", "date_modified", "date_paid")
                order[field] = value
                self.orders[order_id] = order
                self._apply_links("orders", order)
                self._reindex("orders", order_id, created_gmt=stamp.gmt)
                created[name] = order_id

            template = next(iter(self.customers.values()), None) or self.staff[1]
            customer = orjson.loads(orjson.dumps(template))
            customer["role"] = "customer"
            key = self._take_user_id()
            del customer["id"]
            customer["email"] = customer["billing"]["email"] = f"no-id-{key}@example.com"
            customer["username"] = f"no-id-{key}"
            stamp.apply(customer, "date_created", "date_modified")
            customer["_links"] = {
                "collection": [{"href": f"{self.site_url}/wp-json/wc/v3/customers"}]
            }
            self.customers[key] = customer
            self._reindex("customers", key)
            created["customer_without_id"] = key
            self.malformed.update(created)
            return created

    # ------------------------------------------------------------------------- internals

    def _take_post_id(self) -> int:
        post_id = self._next_post_id
        self._next_post_id += 1
        return post_id

    def _take_user_id(self) -> int:
        user_id = self._next_user_id
        self._next_user_id += 1
        return user_id

    def _take_item_id(self) -> int:
        item_id = self._next_item_id
        self._next_item_id += 1
        return item_id

    def _take_meta_id(self) -> int:
        meta_id = self._next_meta_id
        self._next_meta_id += 1
        return meta_id

    def _money(self, value: Decimal) -> str:
        return f"{value.quantize(self._quantum, ROUND_HALF_UP):.{self.decimals}f}"

    def _round(self, value: Decimal) -> Decimal:
        return value.quantize(self._quantum, ROUND_HALF_UP)

    def _invalidate(self, kind: str, record_id: int) -> None:
        self._blobs.pop((kind, record_id), None)
        if kind == "refunds":
            self._blobs.pop(("order_refunds", record_id), None)
        self._version[kind] += 1

    def _remove(self, kind: str, record_id: int) -> None:
        self._index[kind].pop(record_id, None)
        self._invalidate(kind, record_id)
        self.deleted[kind].add(record_id)

    def _reindex(self, kind: str, record_id: int, *, created_gmt: str | None = None) -> None:
        payload = self.payload(kind, record_id)
        previous = self._index[kind].get(record_id)
        created = created_gmt or (previous.created_gmt if previous else None)
        created = created or str(payload["date_created_gmt"])
        modified = str(payload.get("date_modified_gmt") or created)
        parent = 0
        customer = 0
        email = ""
        role = ""
        status = str(payload.get("status", ""))
        title = slug = ""
        if kind == "customers":
            email = str(payload["email"]).strip().lower()
            role = str(payload["role"])
            title = str(payload["username"]).lower()
        elif kind == "orders":
            customer = int(payload["customer_id"])
            parent = int(payload["parent_id"])
            local = _parse(created).replace(tzinfo=UTC).astimezone(self.timezone)
            title = f"order &ndash; {local:%B %d, %Y @ %I:%M %p}".lower()
            slug = f"order-{local:%b-%d-%Y-%I%M-%p}".lower()
        elif kind == "refunds":
            parent = int(payload["parent_id"])
            title = f"refund &ndash; {created}".lower()
        elif kind in ("products", "variations"):
            parent = int(payload.get("parent_id", 0)) or self._variation_parent.get(record_id, 0)
            title = str(payload.get("name", "")).lower()
            slug = str(payload.get("slug", ""))
        elif kind == "coupons":
            title = slug = str(payload["code"]).lower()
            status = status or "publish"
        self._index[kind][record_id] = IndexEntry(
            id=record_id,
            created_gmt=created,
            created_local=_to_local(created, self.timezone),
            modified_gmt=modified,
            modified_local=_to_local(modified, self.timezone),
            title=title,
            slug=slug,
            status=status,
            parent=parent,
            customer=customer,
            email=email,
            role=role,
        )
        self._invalidate(kind, record_id)

    def _apply_links(self, kind: str, payload: Payload) -> None:
        api = f"{self.site_url}/wp-json/wc/v3"
        record_id = payload.get("id")
        if kind == "customers":
            payload["_links"] = {
                "self": [{"href": f"{api}/customers/{record_id}"}],
                "collection": [{"href": f"{api}/customers"}],
            }
        elif kind == "orders":
            links: Payload = {
                "self": [{"href": f"{api}/orders/{record_id}"}],
                "collection": [{"href": f"{api}/orders"}],
            }
            if payload.get("customer_id"):
                links["customer"] = [{"href": f"{api}/customers/{payload['customer_id']}"}]
            payload["_links"] = links
        elif kind == "refunds":
            base = f"{api}/orders/{payload['parent_id']}"
            payload["_links"] = {
                "self": [{"href": f"{base}/refunds/{record_id}"}],
                "collection": [{"href": f"{base}/refunds"}],
                "up": [{"href": base}],
            }
        elif kind == "products":
            payload["permalink"] = f"{self.site_url}/product/{payload['slug']}/"
            for image in payload["images"]:
                image["src"] = f"{self.site_url}/wp-content/uploads/{image['name']}.jpg"
            payload["_links"] = {
                "self": [{"href": f"{api}/products/{record_id}"}],
                "collection": [{"href": f"{api}/products"}],
            }
        elif kind == "variations":
            product_id = self._variation_parent[int(payload["id"])]
            product = self.products[product_id]
            query = "&".join(
                f"attribute_{a['name'].lower()}={a['option'].lower()}"
                for a in payload["attributes"]
            )
            payload["permalink"] = f"{self.site_url}/product/{product['slug']}/?{query}"
            if payload["image"]:
                name = payload["image"]["name"]
                payload["image"]["src"] = f"{self.site_url}/wp-content/uploads/{name}.jpg"
            base = f"{api}/products/{product_id}"
            payload["_links"] = {
                "self": [{"href": f"{base}/variations/{record_id}"}],
                "collection": [{"href": f"{base}/variations"}],
                "up": [{"href": base}],
            }
        elif kind == "coupons":
            payload["_links"] = {
                "self": [{"href": f"{api}/coupons/{record_id}"}],
                "collection": [{"href": f"{api}/coupons"}],
            }


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _format(moment: datetime) -> str:
    """WooCommerce's date format: ISO 8601 to the second, without an offset."""
    return moment.replace(tzinfo=None).isoformat(timespec="seconds")


def _to_local(gmt: str, tz: ZoneInfo) -> str:
    return _format(_parse(gmt).replace(tzinfo=UTC).astimezone(tz))


class _Stamp:
    """One instant as WooCommerce writes it: a site-local and a GMT string, no offset."""

    def __init__(self, moment: datetime, tz: ZoneInfo) -> None:
        moment = moment.astimezone(UTC).replace(microsecond=0)
        self.moment = moment
        self.gmt = _format(moment)
        self.local = _format(moment.astimezone(tz))

    def apply(self, payload: Payload, *fields: str) -> None:
        for field in fields:
            payload[field] = self.local
            payload[f"{field}_gmt"] = self.gmt


def _new_user(
    user_id: int,
    stamp: _Stamp,
    email: str,
    names: tuple[str, str],
    role: str,
    username: str,
    billing: Payload,
    shipping: Payload,
) -> Payload:
    """A wc/v3 customer as first saved: created and modified at ``stamp``."""
    first, last = names
    return {
        "id": user_id,
        "date_created": stamp.local,
        "date_created_gmt": stamp.gmt,
        "date_modified": stamp.local,
        "date_modified_gmt": stamp.gmt,
        "email": email,
        "first_name": first,
        "last_name": last,
        "role": role,
        "username": username,
        "billing": billing,
        "shipping": shipping,
        "is_paying_customer": False,
        "avatar_url": "https://secure.gravatar.com/avatar/"
        f"{hashlib.md5(email.strip().lower().encode()).hexdigest()}?s=96&d=mm&r=g",
        "meta_data": [],
    }


def _ascii(text: str) -> str:
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return "".join(ch for ch in folded.lower() if ch.isalnum())


def _digits(rng: random.Random, template: str) -> str:
    return "".join(str(rng.randrange(10)) if ch == "#" else ch for ch in template)


def _raw_decimal(value: Decimal) -> str:
    # Per-rate tax amounts in line items are unpadded in WooCommerce ("0.9", not "0.90").
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "") else text


def _price_number(total: Decimal, quantity: int) -> int | float:
    # line_items[].price is PHP's float total / quantity; integral values print as integers
    # in the documented examples.
    value = float(total) / quantity
    return int(value) if value.is_integer() else value


@dataclass(slots=True)
class _Buyer:
    email: str
    first_name: str
    last_name: str
    country: _Country
    billing: Payload
    shipping: Payload
    customer_id: int = 0
    registered: datetime | None = None
    active_until: datetime | None = None  # guests who register later buy as guests until then


@dataclass(slots=True)
class _Line:
    product_id: int
    variation_id: int
    name: str
    sku: str
    unit: Decimal
    quantity: int
    attributes: list[tuple[str, str]]


class _Generator:
    """Builds the initial history of a store in one deterministic pass."""

    def __init__(self, store: SandboxStore, rng: random.Random, refund_rate: float) -> None:
        self.store = store
        self.rng = rng
        self.refund_rate = refund_rate
        self.tz = store.timezone
        self.now = store.now
        self.start = store.now - timedelta(days=730)
        self.emails: set[str] = set()
        self.buyers: list[_Buyer] = []
        self.catalog: list[tuple[int, int]] = []  # (product id, variation id or 0), purchasable
        self.coupon_windows: list[tuple[int, datetime, datetime | None]] = []

    def run(self, customers: int, guests: int, orders: int, products: int, coupons: int) -> None:
        store = self.store
        self._make_staff()
        registered = self._make_customers(customers)
        self._make_guests(guests, registered)
        # The catalog and coupons exist before the first order; post ids then follow time.
        catalog_end = self.start + timedelta(days=20)
        self._make_products(products, catalog_end)
        self._make_coupons(coupons, catalog_end)
        self._make_orders(orders, catalog_end)
        self._finish_counters()
        for kind in KINDS:
            for record_id in self._ids(kind):
                store._apply_links(kind, store.payload(kind, record_id))
                store._reindex(kind, record_id)

    def _ids(self, kind: str) -> Iterable[int]:
        store = self.store
        if kind == "customers":
            return [*store.staff, *store.customers]
        if kind == "variations":
            return [v for table in store.variations.values() for v in table]
        table: dict[int, Payload] = getattr(store, kind)
        return list(table)

    # ----------------------------------------------------------------------- people

    def _stamp(self, moment: datetime) -> _Stamp:
        return _Stamp(moment, self.tz)

    def _when(self, low: datetime, high: datetime) -> datetime:
        """A random second in [low, high] (``low`` itself when the window is empty)."""
        span = max((high - low).total_seconds(), 0.0)
        return low + timedelta(seconds=int(self.rng.random() * span))

    def _person(self) -> tuple[_Country, str, str]:
        rng = self.rng
        country = rng.choices(_COUNTRIES, weights=[c.weight for c in _COUNTRIES])[0]
        return country, rng.choice(country.first_names), rng.choice(country.last_names)

    def _unique_email(self, first: str, last: str) -> str:
        rng = self.rng
        local_first, local_last = _ascii(first) or "shopper", _ascii(last) or "buyer"
        patterns = (
            f"{local_first}.{local_last}",
            f"{local_first}{local_last}{rng.randrange(10, 99)}",
            f"{local_first[0]}.{local_last}",
            f"{local_first}_{local_last}{rng.randrange(1, 9)}",
        )
        base = f"{rng.choice(patterns)}@{rng.choice(_EMAIL_DOMAINS)}"
        email = base
        for n in itertools.count(2):
            if email not in self.emails:
                break
            local, domain = base.split("@")
            email = f"{local}{n}@{domain}"
        self.emails.add(email)
        return email

    def _phone(self, country: _Country) -> str:
        if self.rng.random() < 0.06:
            return self.rng.choice(_JUNK_PHONES)
        return _digits(self.rng, self.rng.choice(country.phones))

    def _addresses(
        self, country: _Country, first: str, last: str, email: str
    ) -> tuple[Payload, Payload]:
        rng = self.rng
        city, state, postcode = rng.choice(country.places)
        company = rng.choice(("", "", "", "", "Acme Ltd", "Example GmbH"))
        address_2 = rng.choice(("", "", "", f"Apt {rng.randrange(1, 40)}"))
        street = rng.choice(country.streets)
        billing = {
            "first_name": first,
            "last_name": last,
            "company": company,
            "address_1": street,
            "address_2": address_2,
            "city": city,
            "state": state,
            "postcode": postcode,
            "country": country.code,
            "email": email,
            "phone": self._phone(country),
        }
        shipping = {k: v for k, v in billing.items() if k not in ("email", "phone")}
        shipping["phone"] = ""
        return billing, shipping

    def _user_payload(
        self,
        user_id: int,
        role: str,
        country: _Country,
        names: tuple[str, str],
        email: str,
        created: datetime,
    ) -> Payload:
        first, last = names
        billing, shipping = self._addresses(country, first, last, email)
        stamp = self._stamp(created)
        username = email.split("@")[0]
        return _new_user(user_id, stamp, email, names, role, username, billing, shipping)

    def _make_staff(self) -> None:
        store = self.store
        for role, first, last in (
            ("administrator", "Site", "Admin"),
            ("shop_manager", "Shop", "Manager"),
        ):
            user_id = store._take_user_id()
            email = f"{role.replace('_', '.')}@example.com"
            self.emails.add(email)
            created = self.start + timedelta(minutes=user_id)
            payload = self._user_payload(
                user_id, role, _COUNTRIES[0], (first, last), email, created
            )
            payload["username"] = role.replace("_", "")
            store.staff[user_id] = payload

    def _make_customers(self, count: int) -> list[_Buyer]:
        store = self.store
        moments = sorted(
            self._when(self.start, self.now - timedelta(hours=2)) for _ in range(count)
        )
        buyers: list[_Buyer] = []
        for moment in moments:
            country, first, last = self._person()
            email = self._unique_email(first, last)
            if self.rng.random() < 0.1:
                # WordPress keeps the case a shopper typed at registration.
                local, domain = email.split("@")
                email = f"{local.title()}@{domain}"
            user_id = store._take_user_id()
            payload = self._user_payload(user_id, "customer", country, (first, last), email, moment)
            store.customers[user_id] = payload
            billing, shipping = payload["billing"], payload["shipping"]
            buyer = _Buyer(email, first, last, country, billing, shipping, user_id, moment)
            buyers.append(buyer)
        self.buyers.extend(buyers)
        return buyers

    def _make_guests(self, count: int, registered: list[_Buyer]) -> None:
        rng = self.rng
        for n in range(count):
            match = registered[rng.randrange(len(registered))] if registered else None
            if match is not None and n % 5 == 0:
                # The guest who registers later: same person, email typed differently.
                variant = rng.choice(
                    (
                        match.email.upper(),
                        f"  {match.email} ",
                        match.email.title(),
                        f" {match.email.lower()}",
                    )
                )
                billing = {**match.billing, "email": variant, "phone": self._phone(match.country)}
                guest = _Buyer(
                    variant,
                    match.first_name,
                    match.last_name,
                    match.country,
                    billing,
                    dict(match.shipping),
                    active_until=match.registered,
                )
            else:
                country, first, last = self._person()
                email = self._unique_email(first, last)
                billing, shipping = self._addresses(country, first, last, email)
                guest = _Buyer(email, first, last, country, billing, shipping)
            self.store._guest_emails.append(guest.email)
            self.buyers.append(guest)

    # --------------------------------------------------------------------- catalog

    def _make_products(self, count: int, catalog_end: datetime) -> None:
        store, rng = self.store, self.rng
        moments = sorted(self._when(self.start, catalog_end) for _ in range(count))
        names: set[str] = set()
        for n, moment in enumerate(moments, start=1):
            noun, category_ids = rng.choice(_PRODUCT_NOUNS)
            name = f"{rng.choice(_PRODUCT_ADJECTIVES)} {noun}"
            if name in names:
                name = f"{name} {n}"
            names.add(name)
            image_id = store._take_post_id()  # the product image is an attachment post first
            product_id = store._take_post_id()
            variable = rng.random() < 0.25
            stamp = self._stamp(moment)
            payload = _product_payload(product_id, name, n, stamp, category_ids, image_id)
            # The first product is always published, so there is something to order.
            if n > 1 and rng.random() < 0.08:
                payload["status"] = rng.choice(("draft", "private"))
            store.products[product_id] = payload
            store.variations[product_id] = {}
            if variable:
                self._make_variations(payload, stamp)
            else:
                regular = self._price()
                self._set_prices(payload, regular, self._maybe_sale(regular))
                self._set_stock(payload)
            if payload["status"] == "publish":
                if variable:
                    self.catalog.extend((product_id, v) for v in payload["variations"])
                else:
                    self.catalog.append((product_id, 0))

    def _price(self) -> Decimal:
        dollars = Decimal(self.rng.choice((8, 12, 15, 19, 24, 29, 35, 49, 59, 79)))
        cents = Decimal(self.rng.choice(("0.00", "0.99", "0.50", "0.95")))
        return self.store._round((dollars + cents) * self.store._scale)

    def _maybe_sale(self, regular: Decimal) -> Decimal | None:
        if self.rng.random() < 0.2:
            return self.store._round(regular * Decimal("0.8"))
        return None

    def _set_prices(self, payload: Payload, regular: Decimal, sale: Decimal | None) -> None:
        store = self.store
        price = sale if sale is not None else regular
        payload["regular_price"] = store._money(regular)
        payload["sale_price"] = store._money(sale) if sale is not None else ""
        payload["price"] = store._money(price)
        payload["on_sale"] = sale is not None
        if "price_html" in payload:
            payload["price_html"] = _price_html(store, price, regular if sale else None)

    def _set_stock(self, payload: Payload) -> None:
        rng = self.rng
        if rng.random() < 0.5:
            quantity = rng.choice((0, 3, 12, 40, 150))
            payload["manage_stock"] = True
            payload["stock_quantity"] = quantity
            payload["stock_status"] = "instock" if quantity else "outofstock"
        else:
            payload["manage_stock"] = False
            payload["stock_quantity"] = None
            payload["stock_status"] = rng.choices(
                ("instock", "outofstock", "onbackorder"), weights=(85, 10, 5)
            )[0]

    def _make_variations(self, product: Payload, stamp: _Stamp) -> None:
        store, rng = self.store, self.rng
        attr_id, attr_name, options = rng.choice(_VARIATION_ATTRIBUTES)
        chosen = options[: rng.randint(2, len(options))]
        product["type"] = "variable"
        product["attributes"] = [
            {
                "id": attr_id,
                "name": attr_name,
                "position": 0,
                "visible": True,
                "variation": True,
                "options": list(chosen),
            }
        ]
        regular = self._price()
        for option in chosen:
            variation_id = store._take_post_id()
            bump = store._round(regular * Decimal(rng.choice(("0", "0", "0.1", "0.2"))))
            variation = _variation_payload(variation_id, product, stamp, attr_id, attr_name, option)
            sale = self._maybe_sale(regular + bump)
            self._set_prices(variation, regular + bump, sale)
            self._set_stock(variation)
            store.variations[product["id"]][variation_id] = variation
            store._variation_parent[variation_id] = product["id"]
            product["variations"].append(variation_id)
        _sync_variable_price(store, product)

    def _make_coupons(self, count: int, catalog_end: datetime) -> None:
        store, rng = self.store, self.rng
        specs = [
            _COUPONS[n] if n < len(_COUPONS) else (f"promo{n}", "percent", rng.choice((5, 10, 12)))
            for n in range(count)
        ]
        latest = max(catalog_end, self.now - timedelta(days=60))
        moments = sorted(self._when(self.start, latest) for _ in range(count))
        for (code, discount_type, value), moment in zip(specs, moments, strict=True):
            coupon_id = store._take_post_id()
            percent = discount_type == "percent"
            amount = Decimal(value) if percent else Decimal(value) * store._scale
            expires_stamp: _Stamp | None = None
            if rng.random() < 0.35:
                expires_stamp = _expiry(moment + timedelta(days=rng.randint(30, 400)), self.tz)
            stamp = self._stamp(moment)
            store.coupons[coupon_id] = {
                "id": coupon_id,
                "code": code,
                # Coupon amounts always have two decimals: they may be a percentage.
                "amount": f"{amount:.2f}",
                "date_created": stamp.local,
                "date_created_gmt": stamp.gmt,
                "date_modified": stamp.local,
                "date_modified_gmt": stamp.gmt,
                "discount_type": discount_type,
                "description": "",
                "date_expires": expires_stamp.local if expires_stamp else None,
                "date_expires_gmt": expires_stamp.gmt if expires_stamp else None,
                "usage_count": 0,
                "individual_use": rng.random() < 0.5,
                "product_ids": [],
                "excluded_product_ids": [],
                "usage_limit": None,
                "usage_limit_per_user": None,
                "limit_usage_to_x_items": None,
                "free_shipping": code == "freeship",
                "product_categories": [],
                "excluded_product_categories": [],
                "exclude_sale_items": rng.random() < 0.3,
                "minimum_amount": "0.00",
                "maximum_amount": "0.00",
                "email_restrictions": [],
                "used_by": [],
                "meta_data": [],
            }
            expires = expires_stamp.moment if expires_stamp else None
            self.coupon_windows.append((coupon_id, moment, expires))

    # ---------------------------------------------------------------------- orders

    def _make_orders(self, count: int, catalog_end: datetime) -> None:
        store, rng = self.store, self.rng
        if count == 0 or not self.buyers:
            return
        first_order = catalog_end + timedelta(days=1)
        last_order = self.now - timedelta(hours=1)
        # A few loyal buyers place most orders: Pareto weights per buyer, and every guest
        # email appears at least once (most several times).
        weights = [rng.paretovariate(1.6) for _ in self.buyers]
        assigned = [b for b in self.buyers if b.customer_id == 0][:count]
        cumulative = list(itertools.accumulate(weights))
        assigned += rng.choices(self.buyers, cum_weights=cumulative, k=count - len(assigned))
        planned: list[tuple[datetime, _Buyer]] = []
        for buyer in assigned:
            low, high = first_order, last_order
            if buyer.registered is not None:
                low = max(low, buyer.registered + timedelta(minutes=5))
            if buyer.active_until is not None and buyer.active_until > first_order:
                high = buyer.active_until - timedelta(minutes=5)
            if low >= high:
                low, high = first_order, last_order
            # Stores grow: later dates are more likely (density rising with time).
            span = (high - low).total_seconds()
            planned.append((low + timedelta(seconds=int(span * rng.random() ** 0.7)), buyer))
        planned.sort(key=lambda item: item[0])

        statuses = [self._status_for(moment) for moment, _ in planned]
        self._ensure_every_status(statuses)
        # A heap of (when, sequence, order id, amount): refunds come due in date order, ties
        # in the order they were planned (the sequence), whatever the store's size.
        refund_plans: list[tuple[datetime, int, int, Decimal | None]] = []
        sequence = 0
        for n, ((moment, buyer), status) in enumerate(zip(planned, statuses, strict=True)):
            order = self._build_order(moment, buyer, status)
            store.orders[order["id"]] = order
            for when, order_id, amount in self._plan_refunds(n, order, moment):
                heapq.heappush(refund_plans, (when, sequence, order_id, amount))
                sequence += 1
            # Refund posts are created when refunded, so their ids interleave with later
            # orders; flush refunds dated before the next order before taking its id.
            next_moment = planned[n + 1][0] if n + 1 < len(planned) else None
            self._flush_refunds(refund_plans, next_moment)
        self._flush_refunds(refund_plans, None)
        self._trash_some()

    def _status_for(self, moment: datetime) -> str:
        rng = self.rng
        age = self.now - moment
        if age < timedelta(days=3):
            return rng.choices(
                ("pending", "processing", "on-hold", "completed", "checkout-draft", "failed"),
                weights=(15, 40, 10, 20, 8, 7),
            )[0]
        if age < timedelta(days=14):
            return rng.choices(
                ("processing", "completed", "on-hold", "cancelled", "failed", "refunded"),
                weights=(20, 60, 5, 6, 5, 4),
            )[0]
        refunded_weight = max(1, round(self.refund_rate * 50))
        return rng.choices(
            ("completed", "cancelled", "failed", "refunded", "pending"),
            weights=(100, 6, 4, refunded_weight, 1),
        )[0]

    def _ensure_every_status(self, statuses: list[str]) -> None:
        if len(statuses) < len(ORDER_STATUSES) * 2:
            return
        counts = Counter(statuses)
        newest = len(statuses) - 1
        for status in ORDER_STATUSES:
            if counts[status]:
                continue
            # Drafts and unpaid orders only make sense recently: take one of the newest
            # orders whose status occurs more than once.
            while newest >= 0 and counts[statuses[newest]] < 2:
                newest -= 1
            if newest < 0:
                return
            counts[statuses[newest]] -= 1
            statuses[newest] = status
            counts[status] += 1
            newest -= 1

    def _pick_lines(self) -> list[_Line]:
        store, rng = self.store, self.rng
        lines: list[_Line] = []
        seen: set[tuple[int, int]] = set()
        for _ in range(rng.choices((1, 2, 3, 4), weights=(50, 30, 15, 5))[0]):
            product_id, variation_id = rng.choice(self.catalog)
            if (product_id, variation_id) in seen:
                continue
            seen.add((product_id, variation_id))
            product = store.products[product_id]
            source = store.variations[product_id][variation_id] if variation_id else product
            attributes = [(a["name"], a["option"]) for a in source.get("attributes", [])]
            if variation_id:
                name = f"{product['name']} - {', '.join(o for _, o in attributes)}"
            else:
                name = product["name"]
                attributes = []
            lines.append(
                _Line(
                    product_id,
                    variation_id,
                    name,
                    str(source["sku"]),
                    Decimal(source["price"]),
                    rng.choices((1, 2, 3), weights=(75, 20, 5))[0],
                    attributes,
                )
            )
        return lines

    def _pick_coupon(self, moment: datetime) -> Payload | None:
        if self.rng.random() >= 0.18:
            return None
        valid = [
            cid
            for cid, created, expires in self.coupon_windows
            if created < moment and (expires is None or moment < expires)
        ]
        return self.store.coupons[self.rng.choice(valid)] if valid else None

    def _build_order(self, moment: datetime, buyer: _Buyer, status: str) -> Payload:
        store = self.store
        order_id = store._take_post_id()
        lines = self._pick_lines()
        coupon = self._pick_coupon(moment)
        ceiling = self.now - timedelta(seconds=1)
        order = _OrderBuilder(store, self.rng, ceiling).build(
            order_id, moment, buyer, status, lines, coupon
        )
        if status in _USAGE_STATUSES:
            self._count_usage(order, coupon)
        return order

    def _count_usage(self, order: Payload, coupon: Payload | None) -> None:
        store = self.store
        for line in order["line_items"]:
            if order["status"] in _PAID_STATUSES:
                product = store.products[line["product_id"]]
                product["total_sales"] += line["quantity"]
        if coupon is not None:
            coupon["usage_count"] += 1
            used_by = (
                str(order["customer_id"]) if order["customer_id"] else order["billing"]["email"]
            )
            coupon["used_by"].append(used_by)
        if order["customer_id"] and order["status"] in _PAID_STATUSES:
            customer = store.customers[order["customer_id"]]
            customer["is_paying_customer"] = True

    def _plan_refunds(
        self, n: int, order: Payload, moment: datetime
    ) -> list[tuple[datetime, int, Decimal | None]]:
        rng = self.rng
        status = order["status"]
        if not order["date_paid"]:
            return []
        paid_at = _parse(order["date_paid_gmt"]).replace(tzinfo=UTC)
        window_end = self.now - timedelta(seconds=1)
        plans: list[tuple[datetime, int, Decimal | None]] = []
        if status == "refunded":
            if rng.random() < 0.3:
                total = Decimal(order["total"])
                partial = self.store._round(total * Decimal(rng.choice(("0.2", "0.5"))))
                if partial > 0:
                    plans.append((self._when(paid_at, window_end), order["id"], partial))
            plans.append((self._when(paid_at, window_end), order["id"], None))
        elif status in ("processing", "completed") and rng.random() < self.refund_rate / 2:
            plans.append((self._when(paid_at, window_end), order["id"], Decimal(-1)))
        plans.sort(key=lambda plan: plan[0])
        return plans

    def _flush_refunds(
        self, plans: list[tuple[datetime, int, int, Decimal | None]], before: datetime | None
    ) -> None:
        """Create the planned refunds dated before ``before`` (all when None), oldest first."""
        while plans and (before is None or plans[0][0] < before):
            moment, _sequence, order_id, amount = heapq.heappop(plans)
            order = self.store.orders[order_id]
            _add_refund(self.store, self.rng, order, self._stamp(moment), amount)

    def _trash_some(self) -> None:
        store, rng = self.store, self.rng
        candidates = [
            o for o in store.orders.values() if o["status"] in ("cancelled", "failed", "pending")
        ]
        count = min(len(candidates), max(1, len(store.orders) // 200))
        for order in rng.sample(candidates, count):
            modified = _parse(order["date_modified_gmt"]).replace(tzinfo=UTC)
            moment = self._when(modified + timedelta(seconds=1), self.now - timedelta(seconds=1))
            _trash(store, order, self._stamp(min(moment, self.now - timedelta(seconds=1))))

    def _finish_counters(self) -> None:
        store, rng = self.store, self.rng
        for coupon in store.coupons.values():
            if coupon["usage_count"] and rng.random() < 0.3:
                coupon["usage_limit"] = coupon["usage_count"] + rng.randint(0, 25)
        last_order: dict[int, str] = {}
        for order in store.orders.values():
            customer_id = order["customer_id"]
            if customer_id and order["date_created_gmt"] > last_order.get(customer_id, ""):
                last_order[customer_id] = order["date_created_gmt"]
        ceiling = self.now - timedelta(seconds=1)
        for customer_id, last in last_order.items():
            # Checkout saves the customer, so a customer is modified by their last order.
            customer = store.customers[customer_id]
            moment = min(_parse(last).replace(tzinfo=UTC) + timedelta(seconds=2), ceiling)
            if _format(moment) > customer["date_modified_gmt"]:
                self._stamp(moment).apply(customer, "date_modified")


def _product_payload(
    product_id: int,
    name: str,
    n: int,
    stamp: _Stamp,
    category_ids: tuple[int, ...],
    image_id: int,
) -> Payload:
    slug = "-".join(part for part in _slugify(name).split("-") if part)
    categories = [
        {"id": c, "name": cn, "slug": cs} for c, cn, cs in _CATEGORIES if c in category_ids
    ]
    return {
        "id": product_id,
        "name": name,
        "slug": slug,
        "permalink": "",
        "date_created": stamp.local,
        "date_created_gmt": stamp.gmt,
        "date_modified": stamp.local,
        "date_modified_gmt": stamp.gmt,
        "type": "simple",
        "status": "publish",
        "featured": n % 11 == 0,
        "catalog_visibility": "visible",
        "description": f"<p>{name}: made to last, shipped fast.</p>\n",
        "short_description": f"<p>{name}.</p>\n",
        "sku": f"SKU-{n:04d}",
        "price": "",
        "regular_price": "",
        "sale_price": "",
        "date_on_sale_from": None,
        "date_on_sale_from_gmt": None,
        "date_on_sale_to": None,
        "date_on_sale_to_gmt": None,
        "price_html": "",
        "on_sale": False,
        "purchasable": True,
        "total_sales": 0,
        "virtual": False,
        "downloadable": False,
        "downloads": [],
        "download_limit": -1,
        "download_expiry": -1,
        "external_url": "",
        "button_text": "",
        "tax_status": "taxable",
        "tax_class": "",
        "manage_stock": False,
        "stock_quantity": None,
        "stock_status": "instock",
        "backorders": "no",
        "backorders_allowed": False,
        "backordered": False,
        "sold_individually": False,
        "weight": "",
        "dimensions": {"length": "", "width": "", "height": ""},
        "shipping_required": True,
        "shipping_taxable": True,
        "shipping_class": "",
        "shipping_class_id": 0,
        "reviews_allowed": True,
        "average_rating": "0.00",
        "rating_count": 0,
        "related_ids": [],
        "upsell_ids": [],
        "cross_sell_ids": [],
        "parent_id": 0,
        "purchase_note": "",
        "categories": categories,
        "tags": [],
        "images": [
            {
                "id": image_id,
                "date_created": stamp.local,
                "date_created_gmt": stamp.gmt,
                "date_modified": stamp.local,
                "date_modified_gmt": stamp.gmt,
                "src": "",
                "name": slug,
                "alt": "",
            }
        ],
        "attributes": [],
        "default_attributes": [],
        "variations": [],
        "grouped_products": [],
        "menu_order": 0,
        "meta_data": [],
    }


def _variation_payload(
    variation_id: int,
    product: Payload,
    stamp: _Stamp,
    attr_id: int,
    attr_name: str,
    option: str,
) -> Payload:
    return {
        "id": variation_id,
        "date_created": stamp.local,
        "date_created_gmt": stamp.gmt,
        "date_modified": stamp.local,
        "date_modified_gmt": stamp.gmt,
        "description": "",
        "permalink": "",
        "sku": f"{product['sku']}-{_slugify(option).upper()}",
        "price": "",
        "regular_price": "",
        "sale_price": "",
        "date_on_sale_from": None,
        "date_on_sale_from_gmt": None,
        "date_on_sale_to": None,
        "date_on_sale_to_gmt": None,
        "on_sale": False,
        "status": "publish",
        "purchasable": True,
        "virtual": False,
        "downloadable": False,
        "downloads": [],
        "download_limit": -1,
        "download_expiry": -1,
        "tax_status": "taxable",
        "tax_class": "",
        "manage_stock": False,
        "stock_quantity": None,
        "stock_status": "instock",
        "backorders": "no",
        "backorders_allowed": False,
        "backordered": False,
        "weight": "",
        "dimensions": {"length": "", "width": "", "height": ""},
        "shipping_class": "",
        "shipping_class_id": 0,
        "image": dict(product["images"][0]),
        "attributes": [{"id": attr_id, "name": attr_name, "option": option}],
        "menu_order": 0,
        "meta_data": [],
    }


def _slugify(text: str) -> str:
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return "".join(ch if ch.isalnum() else "-" for ch in folded.lower()).strip("-")


def _price_html(store: SandboxStore, price: Decimal, regular: Decimal | None) -> str:
    symbol = _CURRENCY_SYMBOL.get(store.currency, store.currency)

    def amount(value: Decimal) -> str:
        return (
            '<span class="woocommerce-Price-amount amount"><bdi><span '
            f'class="woocommerce-Price-currencySymbol">{symbol}</span>'
            f"{store._money(value)}</bdi></span>"
        )

    if regular is None:
        return amount(price)
    return f"<del>{amount(regular)}</del> <ins>{amount(price)}</ins>"


def _sync_variable_price(store: SandboxStore, product: Payload) -> None:
    """A variable product's price is its cheapest variation's, as WC_Product_Variable::sync."""
    variations = store.variations[product["id"]].values()
    prices = [Decimal(v["price"]) for v in variations if v["price"] != ""]
    if not prices:
        return
    low, high = min(prices), max(prices)
    product["price"] = store._money(low)
    product["regular_price"] = ""
    product["sale_price"] = ""
    product["on_sale"] = any(v["on_sale"] for v in variations)
    html = _price_html(store, low, None)
    product["price_html"] = (
        html if low == high else f"{html} &ndash; {_price_html(store, high, None)}"
    )
    statuses = {v["stock_status"] for v in variations}
    product["stock_status"] = "instock" if "instock" in statuses else min(statuses)


class _OrderBuilder:
    """Order payloads whose money adds up exactly the way WooCommerce's totals do.

    Payment, completion and modification happen after creation but never after ``ceiling``.
    """

    def __init__(self, store: SandboxStore, rng: random.Random, ceiling: datetime) -> None:
        self.store = store
        self.rng = rng
        self.ceiling = ceiling

    def build(
        self,
        order_id: int,
        moment: datetime,
        buyer: _Buyer,
        status: str,
        lines: list[_Line],
        coupon: Payload | None,
    ) -> Payload:
        store, rng = self.store, self.rng
        tz = store.timezone
        created = _Stamp(moment, tz)
        method, title, _ = rng.choices(_PAYMENT_METHODS, weights=[w for *_, w in _PAYMENT_METHODS])[
            0
        ]
        created_via = (
            "store-api"
            if status == "checkout-draft"
            else rng.choices(
                ("checkout", "store-api", "admin", "rest-api"), weights=(70, 20, 7, 3)
            )[0]
        )
        if status == "on-hold":
            method, title = "bacs", "Direct bank transfer"

        rate_label, rate, shipping_taxable, rate_code = self._tax(buyer)
        discounts = self._discounts(lines, coupon)
        line_items: list[Payload] = []
        subtotal_sum = Decimal(0)
        for line, discount in zip(lines, discounts, strict=True):
            subtotal = line.unit * line.quantity
            total = subtotal - discount
            subtotal_tax = store._round(subtotal * rate / 100)
            total_tax = store._round(total * rate / 100)
            subtotal_sum += subtotal
            item_id = store._take_item_id()
            line_items.append(
                {
                    "id": item_id,
                    "name": line.name,
                    "product_id": line.product_id,
                    "variation_id": line.variation_id,
                    "quantity": line.quantity,
                    "tax_class": "",
                    "subtotal": store._money(subtotal),
                    "subtotal_tax": store._money(subtotal_tax),
                    "total": store._money(total),
                    "total_tax": store._money(total_tax),
                    "taxes": (
                        [
                            {
                                "id": 1,
                                "total": _raw_decimal(total_tax),
                                "subtotal": _raw_decimal(subtotal_tax),
                            }
                        ]
                        if rate
                        else []
                    ),
                    "meta_data": [
                        {"id": store._take_meta_id(), "key": f"pa_{name.lower()}", "value": value}
                        for name, value in line.attributes
                    ],
                    "sku": line.sku,
                    "price": _price_number(total, line.quantity),
                }
            )

        free_threshold = store._round(Decimal(75) * store._scale)
        free_shipping = bool(coupon and coupon["free_shipping"]) or subtotal_sum >= free_threshold
        shipping_total = (
            Decimal(0)
            if free_shipping
            else store._round(Decimal(rng.choice(("4.99", "7.50", "10.00"))) * store._scale)
        )
        shipping_tax = store._round(shipping_total * rate / 100) if shipping_taxable else Decimal(0)
        shipping_lines = [
            {
                "id": store._take_item_id(),
                "method_title": "Free shipping" if free_shipping else "Flat rate",
                "method_id": "free_shipping" if free_shipping else "flat_rate",
                "total": store._money(shipping_total),
                "total_tax": store._money(shipping_tax),
                "taxes": (
                    [{"id": 1, "total": _raw_decimal(shipping_tax), "subtotal": ""}]
                    if shipping_tax
                    else []
                ),
                "meta_data": [],
            }
        ]
        cart_tax = sum((Decimal(i["total_tax"]) for i in line_items), Decimal(0))
        discount_total = sum(discounts, Decimal(0))
        discount_tax = sum(
            (Decimal(i["subtotal_tax"]) - Decimal(i["total_tax"]) for i in line_items), Decimal(0)
        )
        lines_total = sum((Decimal(i["total"]) for i in line_items), Decimal(0))
        total_tax = cart_tax + shipping_tax
        total = lines_total + shipping_total + total_tax
        tax_lines = (
            [
                {
                    "id": store._take_item_id(),
                    "rate_code": rate_code,
                    "rate_id": 1,
                    "label": rate_label,
                    "compound": False,
                    "tax_total": store._money(cart_tax),
                    "shipping_tax_total": store._money(shipping_tax),
                    "meta_data": [],
                }
            ]
            if rate
            else []
        )
        coupon_lines = (
            [
                {
                    "id": store._take_item_id(),
                    "code": coupon["code"],
                    "discount": store._money(discount_total),
                    "discount_tax": store._money(discount_tax),
                    "meta_data": [],
                }
            ]
            if coupon is not None
            else []
        )

        paid = completed = None
        if status in _PAID_STATUSES:
            delay = timedelta(seconds=rng.randint(5, 90))
            if method in ("bacs", "cheque", "cod"):
                delay = timedelta(hours=rng.randint(2, 72))
            paid = self._before_now(moment + delay)
            if status == "completed" or (status == "refunded" and rng.random() < 0.7):
                completed = self._before_now(paid + timedelta(hours=rng.randint(4, 120)))
        latest = max(d for d in (moment, paid, completed) if d is not None)
        modified = self._before_now(latest + timedelta(seconds=rng.randint(1, 30)))
        paid_stamp = _Stamp(paid, tz) if paid else None
        completed_stamp = _Stamp(completed, tz) if completed else None
        modified_stamp = _Stamp(modified, tz)
        billing = dict(buyer.billing)
        meta = self._meta(created_via)
        checkout = created_via in ("checkout", "store-api")
        return {
            "id": order_id,
            "parent_id": 0,
            "number": str(order_id),
            "order_key": "wc_order_"
            + "".join(
                rng.choices("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", k=13)
            ),
            "created_via": created_via,
            "version": _WC_VERSION,
            "status": status,
            "currency": store.currency,
            "date_created": created.local,
            "date_created_gmt": created.gmt,
            "date_modified": modified_stamp.local,
            "date_modified_gmt": modified_stamp.gmt,
            "discount_total": store._money(discount_total),
            "discount_tax": store._money(discount_tax),
            "shipping_total": store._money(shipping_total),
            "shipping_tax": store._money(shipping_tax),
            "cart_tax": store._money(cart_tax),
            "total": store._money(total),
            "total_tax": store._money(total_tax),
            "prices_include_tax": False,
            "customer_id": buyer.customer_id,
            "customer_ip_address": self._ip() if checkout else "",
            "customer_user_agent": rng.choice(_USER_AGENTS) if checkout else "",
            "customer_note": rng.choice(("", "", "", "", "Please leave at the door.")),
            "billing": billing,
            "shipping": dict(buyer.shipping),
            "payment_method": method,
            "payment_method_title": title,
            "transaction_id": self._transaction_id(method) if paid else "",
            "date_paid": paid_stamp.local if paid_stamp else None,
            "date_paid_gmt": paid_stamp.gmt if paid_stamp else None,
            "date_completed": completed_stamp.local if completed_stamp else None,
            "date_completed_gmt": completed_stamp.gmt if completed_stamp else None,
            "cart_hash": hashlib.md5(f"{order_id}".encode()).hexdigest() if checkout else "",
            "meta_data": meta,
            "line_items": line_items,
            "tax_lines": tax_lines,
            "shipping_lines": shipping_lines,
            "fee_lines": [],
            "coupon_lines": coupon_lines,
            "refunds": [],
        }

    def _before_now(self, moment: datetime) -> datetime:
        return min(moment, self.ceiling)

    def _tax(self, buyer: _Buyer) -> tuple[str, Decimal, bool, str]:
        country = buyer.country
        if country.tax is not None:
            label, rate, shipping_taxable = country.tax
            return label, rate, shipping_taxable, f"{country.code}-{label.upper()}-1"
        state = str(buyer.billing["state"])
        rate = country.state_tax.get(state, Decimal(0))
        return "State Tax", rate, False, f"{country.code}-{state}-STATE TAX-1"

    def _discounts(self, lines: list[_Line], coupon: Payload | None) -> list[Decimal]:
        store = self.store
        subtotals = [line.unit * line.quantity for line in lines]
        if coupon is None:
            return [Decimal(0)] * len(lines)
        amount = Decimal(coupon["amount"])
        if coupon["discount_type"] == "percent":
            return [store._round(s * amount / 100) for s in subtotals]
        # fixed_cart: split across lines in proportion to their subtotals, rounding down, then
        # hand out the leftover smallest units from the first line on (as WC_Discounts does).
        cart = sum(subtotals, Decimal(0))
        amount = min(amount, cart)
        shares = [
            (amount * s / cart).quantize(store._quantum, ROUND_DOWN) if cart else Decimal(0)
            for s in subtotals
        ]
        leftover = amount - sum(shares, Decimal(0))
        for n in range(len(shares)):
            if leftover <= 0:
                break
            room = min(leftover, subtotals[n] - shares[n])
            shares[n] += room
            leftover -= room
        return shares

    def _meta(self, created_via: str) -> list[Payload]:
        store, rng = self.store, self.rng
        meta: list[Payload] = []
        if created_via in ("checkout", "store-api"):
            meta.append({"id": store._take_meta_id(), "key": "is_vat_exempt", "value": "no"})
            if rng.random() < 0.7:
                source_type = rng.choices(tuple(_ATTRIBUTION_SOURCES), weights=(30, 25, 15, 30))[0]
                source = rng.choice(_ATTRIBUTION_SOURCES[source_type])
                attribution = [
                    ("_wc_order_attribution_source_type", source_type),
                    ("_wc_order_attribution_utm_source", source),
                    ("_wc_order_attribution_device_type", rng.choice(("Desktop", "Mobile"))),
                    ("_wc_order_attribution_session_pages", str(rng.randint(1, 12))),
                ]
                if source_type == "utm":
                    medium = rng.choice(("cpc", "email", "social"))
                    attribution.append(("_wc_order_attribution_utm_medium", medium))
                meta.extend(
                    {"id": store._take_meta_id(), "key": key, "value": value}
                    for key, value in attribution
                )
        return meta

    def _ip(self) -> str:
        rng = self.rng
        if rng.random() < 0.15:
            return f"2001:db8::{rng.randrange(1, 0xFFFF):x}"
        net = rng.choice(("192.0.2", "198.51.100", "203.0.113"))
        return f"{net}.{rng.randrange(1, 255)}"

    def _transaction_id(self, method: str) -> str:
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
        if method == "stripe":
            return "pi_" + "".join(self.rng.choices(alphabet + alphabet.lower(), k=24))
        if method == "ppcp-gateway":
            return "".join(self.rng.choices(alphabet, k=17))
        return ""


def _add_refund(
    store: SandboxStore,
    rng: random.Random,
    order: Payload,
    stamp: _Stamp,
    amount: Decimal | None,
) -> Payload | None:
    """Refund part of an order: ``amount`` None refunds the rest (the order becomes
    ``refunded``), a negative ``amount`` picks a partial refund (one line or a sum)."""
    total = Decimal(order["total"])
    already = sum((-Decimal(r["total"]) for r in order["refunds"]), Decimal(0))
    remaining = total - already
    if remaining <= 0:
        return None
    line_items: list[Payload] = []
    if amount is None:
        amount = remaining
    elif amount < 0:
        candidates = [
            item
            for item in order["line_items"]
            if Decimal(item["total"]) + Decimal(item["total_tax"]) < remaining
        ]
        if candidates and rng.random() < 0.5:
            item = rng.choice(candidates)
            amount = Decimal(item["total"]) + Decimal(item["total_tax"])
            line_items.append(_refund_line(store, item))
        else:
            amount = store._round(remaining * Decimal(rng.choice(("0.1", "0.25", "0.5"))))
    amount = min(amount, remaining)
    if amount <= 0:
        return None
    refund_id = store._take_post_id()
    reason = rng.choice(_REFUND_REASONS)
    refund: Payload = {
        "id": refund_id,
        "parent_id": order["id"],
        "date_created": stamp.local,
        "date_created_gmt": stamp.gmt,
        "amount": store._money(amount),
        "reason": reason,
        "refunded_by": 1,
        "refunded_payment": order["payment_method"] in ("stripe", "ppcp-gateway"),
        "meta_data": [],
        "line_items": line_items,
    }
    store.refunds[refund_id] = refund
    # Newest refund first, as WC_Order::get_refunds() returns them.
    order["refunds"].insert(0, {"id": refund_id, "reason": reason, "total": store._money(-amount)})
    if amount == remaining:
        order["status"] = "refunded"
    if stamp.gmt > order["date_modified_gmt"]:
        stamp.apply(order, "date_modified")
    return refund


def _refund_line(store: SandboxStore, item: Payload) -> Payload:
    quantity = int(item["quantity"])
    total = Decimal(item["total"])
    return {
        "id": store._take_item_id(),
        "name": item["name"],
        "product_id": item["product_id"],
        "variation_id": item["variation_id"],
        "quantity": -quantity,
        "tax_class": "",
        "subtotal": store._money(-total),
        "subtotal_tax": store._money(-Decimal(item["total_tax"])),
        "total": store._money(-total),
        "total_tax": store._money(-Decimal(item["total_tax"])),
        "taxes": [
            {"id": t["id"], "total": _raw_decimal(-Decimal(t["total"])), "subtotal": ""}
            for t in item["taxes"]
        ],
        "meta_data": [
            {"id": store._take_meta_id(), "key": "_refunded_item_id", "value": str(item["id"])}
        ],
        "sku": item["sku"],
        "price": _price_number(-total, quantity),
    }


def _expiry(moment: datetime, tz: ZoneInfo) -> _Stamp:
    # WooCommerce keeps a coupon's expiry as a date: local midnight of that day.
    local_day = moment.astimezone(tz).date()
    return _Stamp(datetime.combine(local_day, dt_time(0), tzinfo=tz), tz)


def _trash(store: SandboxStore, order: Payload, stamp: _Stamp) -> None:
    # wp_trash_post() remembers the previous status so the order can be restored.
    order["meta_data"].extend(
        [
            {
                "id": store._take_meta_id(),
                "key": "_wp_trash_meta_status",
                "value": f"wc-{order['status']}",
            },
            {
                "id": store._take_meta_id(),
                "key": "_wp_trash_meta_time",
                "value": str(int(stamp.moment.timestamp())),
            },
        ]
    )
    order["status"] = "trash"
    stamp.apply(order, "date_modified")


class _Mutation:
    """One round of live-store activity (``SandboxStore.mutate``)."""

    _OPERATIONS: Final = (
        ("new_order", 30),
        ("advance_status", 20),
        ("customer_edit", 18),
        ("product_change", 12),
        ("refund", 8),
        ("coupon_edit", 5),
        ("trash", 4),
        ("force_delete", 3),
    )

    def __init__(self, store: SandboxStore, rng: random.Random) -> None:
        self.store = store
        self.rng = rng
        self.stamp = _Stamp(store.clock(), store.timezone)
        # Records from add_malformed() stay as they are: they exist to be quarantined.
        bad = set(store.malformed.values())
        self.orders = [o for i, o in store.orders.items() if i not in bad]
        self.customers = [c for i, c in store.customers.items() if i not in bad]
        self.changed: dict[str, set[int]] = {kind: set() for kind in KINDS}
        self.deleted: dict[str, set[int]] = {"orders": set(), "refunds": set()}

    def run(self, fraction: float) -> dict[str, list[int]]:
        store = self.store
        population = len(store.orders) + len(store.customers) + len(store.products)
        population += len(store.coupons)
        count = max(1, round(fraction * population)) if fraction > 0 else 0
        names = [name for name, _ in self._OPERATIONS]
        weights = [weight for _, weight in self._OPERATIONS]
        for _ in range(count):
            for name in self.rng.choices(names, weights=weights, k=4):
                if getattr(self, f"_{name}")():
                    break
        result = {kind: sorted(ids) for kind, ids in self.changed.items()}
        result["deleted_orders"] = sorted(self.deleted["orders"])
        result["deleted_refunds"] = sorted(self.deleted["refunds"])
        return result

    def _touch(self, kind: str, record_id: int, *, dates: bool = True) -> None:
        store = self.store
        if dates:
            self.stamp.apply(store.payload(kind, record_id), "date_modified")
        store._apply_links(kind, store.payload(kind, record_id))
        store._reindex(kind, record_id)
        self.changed[kind].add(record_id)

    def _new_order(self) -> bool:
        store, rng = self.store, self.rng
        generator = _Generator(store, rng, 0.0)
        generator.catalog = [
            (pid, vid)
            for pid, product in store.products.items()
            if product["status"] == "publish"
            for vid in (product["variations"] or [0])
        ]
        if not generator.catalog:
            return False
        generator.emails = {c["email"].lower() for c in store.customers.values()}
        roll = rng.random()
        buyer: _Buyer
        if roll < 0.15 or not self.customers:
            buyer = self._new_customer(generator)
        elif roll < 0.6:
            buyer = _buyer_from_customer(rng.choice(self.customers))
        else:
            country, first, last = generator._person()
            if store._guest_emails and rng.random() < 0.5:
                email = rng.choice(store._guest_emails)
            else:
                email = generator._unique_email(first, last)
                store._guest_emails.append(email)
            billing, shipping = generator._addresses(country, first, last, email)
            buyer = _Buyer(email, first, last, country, billing, shipping)
        status = rng.choice(("pending", "processing", "processing", "on-hold"))
        coupon: Payload | None = None
        if rng.random() < 0.2:
            valid = [
                c
                for c in store.coupons.values()
                if c["date_expires_gmt"] is None or c["date_expires_gmt"] > self.stamp.gmt
            ]
            coupon = rng.choice(valid) if valid else None
        order_id = store._take_post_id()
        # A live order is paid (if at all) within the same second it is placed.
        order = _OrderBuilder(store, rng, self.stamp.moment).build(
            order_id, self.stamp.moment, buyer, status, generator._pick_lines(), coupon
        )
        store.orders[order_id] = order
        self.orders.append(order)
        self._touch("orders", order_id)
        if status in _USAGE_STATUSES:
            self._count(order, coupon)
        return True

    def _new_customer(self, generator: _Generator) -> _Buyer:
        store = self.store
        country, first, last = generator._person()
        email = generator._unique_email(first, last)
        user_id = store._take_user_id()
        payload = generator._user_payload(
            user_id, "customer", country, (first, last), email, self.stamp.moment
        )
        billing, shipping = payload["billing"], payload["shipping"]
        store.customers[user_id] = payload
        self.customers.append(payload)
        self._touch("customers", user_id)
        return _Buyer(email, first, last, country, billing, shipping, user_id, self.stamp.moment)

    def _count(self, order: Payload, coupon: Payload | None) -> None:
        store = self.store
        paid = order["status"] in _PAID_STATUSES
        if paid:
            for line in order["line_items"]:
                store.products[line["product_id"]]["total_sales"] += line["quantity"]
                self._touch("products", line["product_id"])
        if coupon is not None:
            coupon["usage_count"] += 1
            coupon["used_by"].append(
                str(order["customer_id"]) if order["customer_id"] else order["billing"]["email"]
            )
            self._touch("coupons", coupon["id"])
        customer = store.customers.get(order["customer_id"])
        if paid and customer is not None and not customer["is_paying_customer"]:
            customer["is_paying_customer"] = True
            self._touch("customers", order["customer_id"])

    def _advance_status(self) -> bool:
        store, rng = self.store, self.rng
        movable = [o for o in self.orders if o["status"] in ("pending", "processing", "on-hold")]
        if not movable:
            return False
        order = rng.choice(movable)
        previous = order["status"]
        if previous == "pending":
            order["status"] = rng.choices(
                ("processing", "cancelled", "failed"), weights=(80, 12, 8)
            )[0]
        elif previous == "on-hold":
            order["status"] = "processing"
        else:
            order["status"] = "completed"
            self.stamp.apply(order, "date_completed")
        if order["status"] == "processing" and not order["date_paid"]:
            # WC_Order::maybe_set_date_paid() on entering a paid status.
            self.stamp.apply(order, "date_paid")
            if not order["transaction_id"]:
                builder = _OrderBuilder(store, rng, self.stamp.moment)
                order["transaction_id"] = builder._transaction_id(order["payment_method"])
        self._touch("orders", order["id"])
        coupon = next(
            (
                c
                for c in store.coupons.values()
                for line in order["coupon_lines"]
                if c["code"] == line["code"]
            ),
            None,
        )
        if previous not in _PAID_STATUSES and order["status"] in _PAID_STATUSES:
            already_counted = previous in _USAGE_STATUSES
            self._count(order, None if already_counted else coupon)
        return True

    def _refund(self) -> bool:
        store, rng = self.store, self.rng
        refundable = [o for o in self.orders if o["status"] in ("processing", "completed")]
        if not refundable:
            return False
        order = rng.choice(refundable)
        full = rng.random() < 0.4
        refund = _add_refund(store, rng, order, self.stamp, None if full else Decimal(-1))
        if refund is None:
            return False
        store._apply_links("refunds", refund)
        store._reindex("refunds", refund["id"])
        self.changed["refunds"].add(refund["id"])
        self._touch("orders", order["id"])
        return True

    def _trash(self) -> bool:
        store, rng = self.store, self.rng
        live = [o for o in self.orders if o["status"] != "trash"]
        if not live:
            return False
        order = rng.choice(live)
        _trash(store, order, self.stamp)
        self._touch("orders", order["id"])
        return True

    def _force_delete(self) -> bool:
        store, rng = self.store, self.rng
        if not self.orders:
            return False
        order = self.orders.pop(rng.randrange(len(self.orders)))
        order_id = order["id"]
        del store.orders[order_id]
        store._remove("orders", order_id)
        self.changed["orders"].discard(order_id)
        self.deleted["orders"].add(order_id)
        # Deleting an order deletes its refunds with it (WC_Order_Data_Store_CPT::delete).
        for entry in order["refunds"]:
            store.refunds.pop(entry["id"], None)
            store._remove("refunds", entry["id"])
            self.changed["refunds"].discard(entry["id"])
            self.deleted["refunds"].add(entry["id"])
        return True

    def _product_change(self) -> bool:
        store, rng = self.store, self.rng
        if not store.products:
            return False
        product = store.products[rng.choice(list(store.products))]
        generator = _Generator(store, rng, 0.0)
        target = product
        if product["variations"]:
            variation_id = rng.choice(product["variations"])
            target = store.variations[product["id"]][variation_id]
        if rng.random() < 0.6:
            regular = store._round(
                Decimal(target["regular_price"]) * Decimal(rng.choice(("0.9", "1.1", "1.25")))
            )
            generator._set_prices(target, regular, generator._maybe_sale(regular))
        else:
            generator._set_stock(target)
        if target is not product:
            self._touch("variations", target["id"])
            _sync_variable_price(store, product)
        self._touch("products", product["id"])
        return True

    def _coupon_edit(self) -> bool:
        store, rng = self.store, self.rng
        if not store.coupons:
            return False
        coupon = store.coupons[rng.choice(list(store.coupons))]
        if rng.random() < 0.5:
            expires = _expiry(
                self.stamp.moment + timedelta(days=rng.randint(7, 90)), store.timezone
            )
            coupon["date_expires"] = expires.local
            coupon["date_expires_gmt"] = expires.gmt
        else:
            coupon["usage_limit"] = coupon["usage_count"] + rng.randint(10, 100)
        self._touch("coupons", coupon["id"])
        return True

    def _customer_edit(self) -> bool:
        store, rng = self.store, self.rng
        if not self.customers:
            return False
        customer = rng.choice(self.customers)
        generator = _Generator(store, rng, 0.0)
        country = next(
            (c for c in _COUNTRIES if c.code == customer["billing"]["country"]), _COUNTRIES[0]
        )
        change = rng.choices(("name", "phone", "email"), weights=(40, 45, 15))[0]
        if change == "name":
            last = rng.choice(country.last_names)
            customer["last_name"] = customer["billing"]["last_name"] = last
            customer["shipping"]["last_name"] = last
        elif change == "phone":
            customer["billing"]["phone"] = generator._phone(country)
        else:
            generator.emails = {c["email"].lower() for c in store.customers.values()}
            email = generator._unique_email(customer["first_name"], customer["last_name"])
            customer["email"] = customer["billing"]["email"] = email
        self._touch("customers", customer["id"])
        return True


def _buyer_from_customer(customer: Payload) -> _Buyer:
    country = next(
        (c for c in _COUNTRIES if c.code == customer["billing"]["country"]), _COUNTRIES[0]
    )
    return _Buyer(
        customer["email"],
        customer["first_name"],
        customer["last_name"],
        country,
        dict(customer["billing"]),
        dict(customer["shipping"]),
        customer["id"],
    )
