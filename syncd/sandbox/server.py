"""An HTTP/1.1 server on 127.0.0.1 that serves a ``SandboxStore`` as ``/wp-json/wc/v3``.

Query arguments, pagination headers, authentication and error bodies follow WooCommerce's
REST controllers; ``FaultConfig`` adds the latency, throttling, 5xx answers and dropped
connections that real stores and their hosts produce.
"""

from __future__ import annotations

import base64
import binascii
import collections
import email.utils
import math
import random
import re
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Generic, TypeVar
from urllib.parse import unquote_to_bytes

import orjson

from syncd.sandbox.httpserver import SandboxHandler, ServedSandbox
from syncd.sandbox.store import ORDER_STATUSES, IndexEntry, SandboxStore
from syncd.sources.woocommerce.auth import (
    OAUTH_TIMESTAMP_WINDOW,
    PhpValue,
    check_oauth1,
    parse_php_query,
)

__all__ = ["FaultConfig", "FaultsAndLog", "RequestRecord", "SandboxServer"]

API_PREFIX: Final = "/wp-json/wc/v3"
_JSON_TYPE: Final = "application/json; charset=UTF-8"
_HTML_TYPE: Final = "text/html; charset=UTF-8"
# Headers WordPress's REST server sends with its JSON answers.
_JSON_HEADERS: Final = (
    ("X-Robots-Tag", "noindex"),
    ("X-Content-Type-Options", "nosniff"),
    ("Access-Control-Expose-Headers", "X-WP-Total, X-WP-TotalPages, Link"),
)
_NO_ROUTE: Final = ("rest_no_route", "No route was found matching the URL and request method")
_OAUTH_PARAMS: Final = frozenset(
    {
        "oauth_consumer_key",
        "oauth_timestamp",
        "oauth_nonce",
        "oauth_signature",
        "oauth_signature_method",
    }
)
_ROLES: Final = (
    "all",
    "administrator",
    "editor",
    "author",
    "contributor",
    "subscriber",
    "customer",
    "shop_manager",
)
_POST_STATUSES: Final = ("any", "future", "trash", "draft", "pending", "private", "publish")
_POST_ORDERBY: Final = ("date", "id", "include", "title", "slug", "modified")
_CUSTOMER_ORDERBY: Final = ("id", "include", "name", "registered_date")
# rest_parse_date(): RFC 3339 with "T", "t" or a space; offset optional.
_DATE_RE: Final = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d+)?(Z|z|[+-]\d{2}(?::?\d{2})?)?$"
)
_OAUTH_HEADER_RE: Final = re.compile(r'(oauth_[a-z_-]*)=(:?"([^"]*)"|([^,]*))')
_MATCH_CACHE_SIZE: Final = 64
# WP_REST_Server::EDITABLE: the methods an update route answers.
_WRITE_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
# WC_REST_Controller::check_batch_limit(): create + update + delete together, filterable
# through woocommerce_rest_batch_items_limit.
BATCH_LIMIT: Final = 100
# is_email()-like: what the customer schema's "format": "email" lets through.
_WC_EMAIL: Final = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_CUSTOMER_TEXT: Final = ("email", "first_name", "last_name")
_INVALID_ID: Final = ("woocommerce_rest_invalid_id", "Invalid resource ID.")
_CRITICAL_ERROR: Final = (
    '<p>There has been a critical error on this website.</p><p><a href="https://wordpress.org/'
    'documentation/article/faq-troubleshooting/">Learn more about troubleshooting WordPress.'
    "</a></p>"
)


@dataclass(frozen=True, slots=True)
class FaultConfig:
    """Faults injected per request, drawn from a RNG seeded with ``seed``.

    Every request first sleeps ``latency_ms``; then one draw decides between dropping the
    connection (``rate_drop``), a 429 with ``Retry-After`` (``rate_429``; no header when
    ``retry_after`` is None), a 500/502/503 (``rate_5xx``), or a normal answer.

    ``unstable_ties``: rows sharing one sort value under ``orderby=modified`` or ``date``
    come back in a new random order on every request, as an HPOS store on MariaDB sorts
    them (observed on WooCommerce 10: its orders query sorts by date with no tie-breaker,
    and page 1 and page 2 ordered the same ties differently). Off, ties go by id.
    """

    latency_ms: float = 0
    rate_429: float = 0
    retry_after: str | None = "1"
    rate_5xx: float = 0
    rate_drop: float = 0
    seed: int = 0
    unstable_ties: bool = False

    def __post_init__(self) -> None:
        rates = (self.rate_429, self.rate_5xx, self.rate_drop)
        if any(not 0 <= rate <= 1 for rate in rates) or sum(rates) > 1 + 1e-9:
            raise ValueError("fault rates must each be in [0, 1] and sum to at most 1")
        if self.latency_ms < 0:
            raise ValueError("latency_ms must be >= 0")


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request as the server saw it.

    ``path`` is relative to ``/wp-json/wc/v3/`` (e.g. ``orders/12/refunds``); ``query`` keeps
    the last value of each decoded parameter name; ``status`` is None for a dropped
    connection; ``fault`` is ``rate_limit``, ``server_error``, ``drop`` or None.
    """

    method: str
    path: str
    query: dict[str, str]
    status: int | None
    fault: str | None


RecordT = TypeVar("RecordT")


class FaultsAndLog(Generic[RecordT]):
    """Fault injection and a request log, as every sandbox (or vendor in one) keeps them.

    ``faults`` may be assigned at any time (the RNG restarts from its seed); ``requests`` is
    a snapshot of the log.
    """

    def __init__(self, faults: FaultConfig | None = None) -> None:
        self._faults = faults or FaultConfig()
        self._fault_rng = random.Random(self._faults.seed)
        self._fault_lock = threading.Lock()
        self._log: list[RecordT] = []
        self._log_lock = threading.Lock()

    @property
    def faults(self) -> FaultConfig:
        return self._faults

    @faults.setter
    def faults(self, config: FaultConfig) -> None:
        with self._fault_lock:
            self._faults = config
            self._fault_rng = random.Random(config.seed)

    @property
    def requests(self) -> list[RecordT]:
        """A snapshot of the request log, oldest first."""
        with self._log_lock:
            return list(self._log)

    def reset_log(self) -> None:
        with self._log_lock:
            self._log.clear()

    def _record(self, record: RecordT) -> None:
        with self._log_lock:
            self._log.append(record)

    def _draw_seed(self) -> int:
        """A seed for a per-request random choice, drawn from the fault RNG."""
        with self._fault_lock:
            return self._fault_rng.getrandbits(64)

    def _draw_fault(self) -> tuple[FaultConfig, str | None, int]:
        """The config in force, the fault for one request (``drop``, ``rate_limit``,
        ``server_error`` or None) and the status a ``server_error`` answers with."""
        with self._fault_lock:
            config = self._faults
            roll = self._fault_rng.random()
            extra = self._fault_rng.random()
        status = (500, 502, 503)[min(int(extra * 3), 2)]
        if roll < config.rate_drop:
            return config, "drop", status
        if roll < config.rate_drop + config.rate_429:
            return config, "rate_limit", status
        if roll < config.rate_drop + config.rate_429 + config.rate_5xx:
            return config, "server_error", status
        return config, None, status


class _Reply(Exception):
    """Raised inside request handling to answer with a WooCommerce error body."""

    def __init__(
        self, status: int, code: str, message: str, data: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {
            "code": code,
            "message": message,
            "data": {"status": status, **(data or {})},
        }


@dataclass(frozen=True, slots=True)
class _Route:
    kind: str
    collection: bool
    record_id: int = 0  # the single record, or the parent of a nested collection


class SandboxServer(ServedSandbox, FaultsAndLog[RequestRecord]):
    """Serves a ``SandboxStore`` the way WooCommerce's wc/v3 REST API would.

    ``start()`` binds (port 0 picks a free one) and serves on a daemon thread; ``url`` is the
    store's site URL and ``url + "/wp-json/wc/v3"`` the API root. Credentials are checked on
    every request: HTTP Basic, ``consumer_key``/``consumer_secret`` in the query, or OAuth 1.0a.
    Assign ``faults`` at any time to change fault injection; ``requests`` is the request log.
    """

    thread_name = "sandbox-woocommerce"

    def __init__(
        self,
        store: SandboxStore,
        consumer_key: str = "ck_sandbox",
        consumer_secret: str = "cs_sandbox",
        faults: FaultConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        clock_skew: timedelta | None = None,
    ) -> None:
        """``clock_skew`` (when given) sets the store's ``clock_skew``: its Date header and
        the stamps of new and changed records follow a clock that far ahead (or behind)."""
        if clock_skew is not None:
            store.clock_skew = clock_skew
        self.store = store
        self.consumer_key = consumer_key
        self.consumer_secret = consumer_secret
        ServedSandbox.__init__(self, _Handler, host, port)
        FaultsAndLog.__init__(self, faults)
        self._nonces: set[tuple[str, str]] = set()
        self._nonce_times: collections.deque[tuple[float, tuple[str, str]]] = collections.deque()
        self._nonce_lock = threading.Lock()
        self._match_cache: collections.OrderedDict[tuple[object, ...], tuple[int, list[int]]] = (
            collections.OrderedDict()
        )
        self._match_lock = threading.Lock()

    # ------------------------------------------------------------------- lifecycle

    @property
    def api_url(self) -> str:
        return self.url + API_PREFIX

    def _bound(self) -> None:
        self.store.set_site_url(self.url)

    # ------------------------------------------------------------------ auth

    def _authenticate(
        self, method: str, raw_path: str, pairs: list[tuple[str, str]], authorization: str
    ) -> bool:
        """True for a valid key, False for none given; raises _Reply for a bad one.

        Mirrors WC_REST_Authentication::authenticate(): the query-string key and secret, then
        the Basic header; an unknown key is not an error by itself (the request continues as
        anonymous), a known key with the wrong secret is. Then OAuth 1.0a.
        """
        params = parse_php_query(pairs)
        key = secret = ""
        query_key, query_secret = params.get("consumer_key"), params.get("consumer_secret")
        if _php_filled(query_key) and _php_filled(query_secret):
            key, secret = str(query_key), str(query_secret)
        elif authorization[:6].lower() == "basic ":
            try:
                decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                decoded = ""
            user, _, password = decoded.partition(":")
            if user and password:
                key, secret = user, password
        if key and key == self.consumer_key:
            if secret != self.consumer_secret:
                raise _Reply(
                    401, "woocommerce_rest_authentication_error", "Consumer secret is invalid."
                )
            return True

        oauth_pairs = list(pairs)
        if authorization.startswith("OAuth "):
            for match in _OAUTH_HEADER_RE.finditer(authorization):
                value = match.group(3) or match.group(4)
                oauth_pairs.append((match.group(1), _php_urldecode(value)))
        names = {name for name, _ in oauth_pairs}
        if not names & _OAUTH_PARAMS:
            return False
        now = time.time()
        with self._nonce_lock:
            self._forget_nonces(now)
            before = len(self._nonces)
            error = check_oauth1(
                method,
                self.url + raw_path,
                oauth_pairs,
                self.consumer_key,
                self.consumer_secret,
                now,
                self._nonces,
            )
            if len(self._nonces) > before:
                nonce = str(parse_php_query(oauth_pairs).get("oauth_nonce"))
                self._nonce_times.append((now, (self.consumer_key, nonce)))
        if error is not None:
            raise _Reply(401, error.code, error.message)
        return True

    def _forget_nonces(self, now: float) -> None:
        # A nonce only has to be remembered while its timestamp can still pass the +-15 min
        # check; WooCommerce prunes its list the same way.
        horizon = now - 2 * OAUTH_TIMESTAMP_WINDOW
        while self._nonce_times and self._nonce_times[0][0] < horizon:
            self._nonces.discard(self._nonce_times.popleft()[1])

    # ------------------------------------------------------------------ routing

    def _route(self, method: str, path: str) -> _Route:
        parts = path.split("/")
        if method != "GET" or not parts or not parts[0]:
            raise _Reply(404, *_NO_ROUTE)
        kind = parts[0].lower()
        if len(parts) == 1 and kind in ("customers", "orders", "refunds", "products", "coupons"):
            return _Route(kind, collection=True)
        if len(parts) >= 2 and parts[1].isdigit() and parts[1].isascii():
            record_id = int(parts[1])
            if len(parts) == 2 and kind in ("customers", "orders", "products", "coupons"):
                return _Route(kind, collection=False, record_id=record_id)
            if len(parts) == 3 and (kind, parts[2].lower()) == ("orders", "refunds"):
                return _Route("order_refunds", collection=True, record_id=record_id)
            if len(parts) == 3 and (kind, parts[2].lower()) == ("products", "variations"):
                return _Route("variations", collection=True, record_id=record_id)
        raise _Reply(404, *_NO_ROUTE)

    def _respond(self, query: _Query, raw_query: str, path: str) -> tuple[bytes, dict[str, str]]:
        route, fields = query.route, query.fields
        store = self.store
        with store.lock:
            if not route.collection:
                return self._single(route, fields), {}
            matched = self._matched(query)
            if self.faults.unstable_ties and query.orderby in ("modified", "date"):
                matched = _shuffle_ties(matched, query.sort_key(), random.Random(self._draw_seed()))
            ids, total = query.window(matched), len(matched)
            kind = query.index_kind
            if fields is None:
                with_parent = route.kind != "order_refunds"
                parts = [store.blob(kind, i, with_parent_id=with_parent) for i in ids]
            else:
                parts = []
                for record_id in ids:
                    data = store.payload(kind, record_id)
                    if route.kind == "order_refunds":
                        data = {k: v for k, v in data.items() if k != "parent_id"}
                    parts.append(orjson.dumps(_filter_fields(data, fields)))
        body = b"[" + b",".join(parts) + b"]"
        pages = math.ceil(total / query.per_page)
        headers = {"X-WP-Total": str(total), "X-WP-TotalPages": str(pages)}
        links = []
        base = f"{self.url}{API_PREFIX}/{path}"
        if query.page > 1:
            links.append(
                f'<{base}?{_with_page(raw_query, min(query.page - 1, pages))}>; rel="prev"'
            )
        if pages > query.page:
            links.append(f'<{base}?{_with_page(raw_query, query.page + 1)}>; rel="next"')
        if links:
            headers["Link"] = ", ".join(links)
        return body, headers

    # ------------------------------------------------------------------ writes

    def _write(
        self, method: str, path: str, body: bytes, content_type: str, authenticated: bool
    ) -> tuple[int, bytes, dict[str, str]]:
        """POST customers, POST customers/batch, and POST/PUT/PATCH customers/{id}."""
        parts = path.split("/")
        if parts[0].lower() != "customers" or len(parts) > 2:
            raise _Reply(404, *_NO_ROUTE)
        if len(parts) == 1 and method != "POST":
            raise _Reply(404, *_NO_ROUTE)
        is_batch = len(parts) == 2 and parts[1].lower() == "batch" and method == "POST"
        is_single = len(parts) == 2 and parts[1].isdigit() and parts[1].isascii()
        if len(parts) == 2 and not (is_batch or is_single):
            raise _Reply(404, *_NO_ROUTE)
        params = _json_params(body, content_type)
        if not authenticated:
            if is_batch:
                raise _Reply(
                    401,
                    "woocommerce_rest_cannot_batch",
                    "Sorry, you are not allowed to batch manipulate this resource.",
                )
            if len(parts) == 1:
                raise _Reply(
                    401,
                    "woocommerce_rest_cannot_create",
                    "Sorry, you are not allowed to create resources.",
                )
            raise _Reply(
                401,
                "woocommerce_rest_cannot_edit",
                "Sorry, you are not allowed to edit this resource.",
            )
        if is_batch:
            return 200, orjson.dumps(self._batch(params)), {}
        if len(parts) == 1:
            return 201, orjson.dumps(self._create_customer(params)), {}
        return 200, orjson.dumps(self._update_customer(int(parts[1]), params)), {}

    def _batch(self, params: dict[str, Any]) -> dict[str, list[Any]]:
        """WC_REST_Controller::batch_items() for customers."""
        groups: dict[str, list[Any]] = {}
        for name in ("create", "update", "delete"):
            items = params.get(name)
            if items:  # array_filter(): empty groups are dropped
                groups[name] = items if isinstance(items, list) else [items]
        total = sum(len(items) for items in groups.values())
        if total > BATCH_LIMIT:
            raise _Reply(
                413,
                "woocommerce_rest_request_entity_too_large",
                f"Unable to accept more than {BATCH_LIMIT} items for this request.",
            )
        response: dict[str, list[Any]] = {}
        for item in groups.get("create", []):
            try:
                entry: Any = self._create_customer(item if isinstance(item, dict) else {})
            except _Reply as reply:
                entry = {"id": 0, "error": reply.body}
            response.setdefault("create", []).append(entry)
        for item in groups.get("update", []):
            item = item if isinstance(item, dict) else {}
            record_id = _php_integer(str(item.get("id", 0))) or 0
            try:
                entry = self._update_customer(record_id, item)
            except _Reply as reply:
                entry = {"id": item.get("id", 0), "error": reply.body}
            response.setdefault("update", []).append(entry)
        for raw in groups.get("delete", []):
            record_id = _php_integer(str(raw)) or 0
            try:
                entry = self._delete_customer(record_id)
            except _Reply as reply:
                entry = {"id": raw, "error": reply.body}
            response.setdefault("delete", []).append(entry)
        return response

    def _customer_changes(self, params: dict[str, Any]) -> dict[str, Any]:
        """Checked update arguments, as the customer schema validates them (400
        rest_invalid_param naming the bad ones)."""
        errors: dict[str, tuple[str, str]] = {}
        changes: dict[str, Any] = {}
        for name in _CUSTOMER_TEXT:
            if name in params:
                value = params[name]
                if not isinstance(value, str):
                    errors[name] = ("rest_invalid_type", f"{name} is not of type string.")
                elif name == "email" and not _WC_EMAIL.match(value.strip()):
                    errors[name] = ("rest_invalid_email", "Invalid email address.")
                else:
                    changes[name] = value.strip() if name == "email" else value
        for name in ("billing", "shipping"):
            if name in params:
                if isinstance(params[name], dict):
                    changes[name] = params[name]
                else:
                    errors[name] = ("rest_invalid_type", f"{name} is not of type object.")
        if "meta_data" in params:
            meta = params["meta_data"]
            if not isinstance(meta, list):
                errors["meta_data"] = ("rest_invalid_type", "meta_data is not of type array.")
            else:
                for n, entry in enumerate(meta):
                    if not isinstance(entry, dict) or not isinstance(entry.get("key", ""), str):
                        errors["meta_data"] = (
                            "rest_invalid_type",
                            f"meta_data[{n}][key] is not of type string.",
                        )
                        break
                else:
                    changes["meta_data"] = [e for e in meta if isinstance(e.get("key"), str)]
        if errors:
            names = list(errors)
            raise _Reply(
                400,
                "rest_invalid_param",
                f"Invalid parameter(s): {', '.join(names)}",
                {
                    "params": {name: message for name, (_, message) in errors.items()},
                    "details": {
                        name: {"code": code, "message": message, "data": None}
                        for name, (code, message) in errors.items()
                    },
                },
            )
        return changes

    def _email_taken(self, email: str, other_than: int | None) -> bool:
        wanted = email.strip().lower()
        return any(
            entry.email == wanted and entry.id != other_than
            for entry in self.store.index("customers").values()
        )

    def _create_customer(self, params: dict[str, Any]) -> dict[str, Any]:
        if params.get("id"):
            raise _Reply(
                400, "woocommerce_rest_customer_exists", "Cannot create existing resource."
            )
        changes = self._customer_changes(params)
        email = changes.pop("email", None)
        if not email:
            raise _Reply(
                400,
                "rest_missing_callback_param",
                "Missing parameter(s): email",
                {"params": ["email"]},
            )
        with self.store.lock:
            if self._email_taken(email, None):
                raise _Reply(
                    400,
                    "registration-error-email-exists",
                    "An account is already registered with your email address. "
                    '<a href="#" class="showlogin">Please log in.</a>',
                )
            payload = self.store.create_customer(email, changes)
            return dict(payload)

    def _update_customer(self, record_id: int, params: dict[str, Any]) -> dict[str, Any]:
        changes = self._customer_changes(params)
        store = self.store
        with store.lock:
            if record_id not in store.customers and record_id not in store.staff:
                # The update controller answers 400 here, where GET answers 404.
                raise _Reply(400, *_INVALID_ID)
            current = str(store.payload("customers", record_id).get("email", "")).lower()
            new_email = changes.get("email")
            # Only a changed address needs the (linear) uniqueness scan.
            if (
                new_email is not None
                and new_email.lower() != current
                and self._email_taken(new_email, record_id)
            ):
                raise _Reply(
                    400, "woocommerce_rest_customer_invalid_email", "Email address is invalid."
                )
            return dict(store.update_customer(record_id, changes))

    def _delete_customer(self, record_id: int) -> dict[str, Any]:
        # Batch deletes run with force=true (customers have no trash).
        store = self.store
        with store.lock:
            if record_id not in store.customers:
                raise _Reply(400, *_INVALID_ID)
            payload = dict(store.customers[record_id])
            store.delete_customer(record_id)
            return payload

    def _matched(self, query: _Query) -> list[int]:
        # A sync pages through one query many times; remember its matches until the store
        # changes, so a page costs a slice instead of a scan.
        key = query.signature()
        version = self.store.version(query.index_kind)
        with self._match_lock:
            cached = self._match_cache.get(key)
            if cached is not None and cached[0] == version:
                self._match_cache.move_to_end(key)
                return cached[1]
        matched = query.matched()
        with self._match_lock:
            self._match_cache[key] = (version, matched)
            while len(self._match_cache) > _MATCH_CACHE_SIZE:
                self._match_cache.popitem(last=False)
        return matched

    def _single(self, route: _Route, fields: list[list[str]] | None) -> bytes:
        store = self.store
        if route.record_id not in store.index(route.kind):
            code, message = {
                "customers": ("woocommerce_rest_invalid_id", "Invalid resource ID."),
                "orders": ("woocommerce_rest_shop_order_invalid_id", "Invalid ID."),
                "products": ("woocommerce_rest_product_invalid_id", "Invalid ID."),
                "coupons": ("woocommerce_rest_shop_coupon_invalid_id", "Invalid ID."),
            }[route.kind]
            raise _Reply(404, code, message)
        if fields is None:
            return store.blob(route.kind, route.record_id)
        return orjson.dumps(_filter_fields(store.payload(route.kind, route.record_id), fields))


class _Query:
    """Validated collection arguments and the matching ids, as the WC controllers compute."""

    def __init__(self, store: SandboxStore, route: _Route, params: dict[str, PhpValue]) -> None:
        self.store = store
        self.route = route
        self.params = params
        self.errors: dict[str, tuple[str, str]] = {}
        self.fields = _field_paths(params.get("_fields"))
        if not route.collection:
            self._finish()
            return
        customers = route.kind == "customers"
        self.page = self._integer("page", 1, minimum=1)
        self.per_page = self._integer("per_page", 10, minimum=1, maximum=100)
        self.offset = abs(self._integer("offset", 0))  # absint()
        self.order = self._enum("order", ("asc", "desc"), "asc" if customers else "desc")
        orderby_enum = _CUSTOMER_ORDERBY if customers else _POST_ORDERBY
        self.orderby = self._enum("orderby", orderby_enum, "name" if customers else "date")
        self.include = _id_list(params.get("include"))
        self.exclude = set(_id_list(params.get("exclude")))
        self.dates: list[tuple[str, str, str]] = []
        self.statuses: set[str] | None = None
        self.role = "customer"
        self.email: str | None = None
        self.customer: int | None = None
        self.parents: set[int] | None = None
        self.parent_exclude: set[int] = set()
        if route.kind in ("orders", "refunds", "order_refunds"):
            self.parent_exclude = set(_id_list(params.get("parent_exclude")))
        if customers:
            self.role = self._enum("role", _ROLES, "customer")
            self._email()
        else:
            self._date_filters()
            self._status()
            if route.kind == "orders":
                self.customer = self._optional_integer("customer")
                parents = _id_list(params.get("parent"))
                self.parents = set(parents) if parents else None
        self._finish()

    def _finish(self) -> None:
        if self.errors:
            names = list(self.errors)
            raise _Reply(
                400,
                "rest_invalid_param",
                f"Invalid parameter(s): {', '.join(names)}",
                {
                    "params": {name: message for name, (_, message) in self.errors.items()},
                    "details": {
                        name: {"code": code, "message": message, "data": None}
                        for name, (code, message) in self.errors.items()
                    },
                },
            )

    # ---------------------------------------------------------- argument checks (WP schema)

    def _integer(
        self, name: str, default: int, *, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        raw = self.params.get(name)
        if raw is None:
            return default
        number = _php_integer(raw)
        if number is None:
            self.errors[name] = ("rest_invalid_type", f"{name} is not of type integer.")
            return default
        if minimum is not None and maximum is not None and not minimum <= number <= maximum:
            self.errors[name] = (
                "rest_out_of_bounds",
                f"{name} must be between {minimum} (inclusive) and {maximum} (inclusive)",
            )
        elif minimum is not None and number < minimum:
            self.errors[name] = (
                "rest_out_of_bounds",
                f"{name} must be greater than or equal to {minimum}",
            )
        return number

    def _optional_integer(self, name: str) -> int | None:
        if name not in self.params:
            return None
        return abs(self._integer(name, 0))

    def _enum(self, name: str, allowed: Sequence[str], default: str) -> str:
        raw = self.params.get(name)
        if raw is None:
            return default
        if isinstance(raw, str) and raw in allowed:
            return raw
        if isinstance(raw, dict):
            self.errors[name] = ("rest_invalid_type", f"{name} is not of type string.")
        else:
            self.errors[name] = ("rest_not_in_enum", f"{name} is not one of {_wp_list(allowed)}.")
        return default

    def _email(self) -> None:
        raw = self.params.get("email")
        if raw is None:
            return
        if not isinstance(raw, str) or not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", raw.strip()):
            self.errors["email"] = ("rest_invalid_email", "Invalid email address.")
            return
        self.email = raw.strip().lower()

    def _date_filters(self) -> None:
        gmt_raw = self.params.get("dates_are_gmt")
        use_gmt = False
        if gmt_raw is not None:
            if isinstance(gmt_raw, str) and gmt_raw.lower() in ("true", "false", "1", "0"):
                use_gmt = gmt_raw.lower() in ("true", "1")
            else:
                self.errors["dates_are_gmt"] = (
                    "rest_invalid_type",
                    "dates_are_gmt is not of type boolean.",
                )
        for name, field, op in (
            ("after", "created", ">"),
            ("before", "created", "<"),
            ("modified_after", "modified", ">"),
            ("modified_before", "modified", "<"),
        ):
            raw = self.params.get(name)
            if raw is None:
                continue
            bound = _mysql_datetime(raw, self.store) if isinstance(raw, str) else None
            if bound is None:
                self.errors[name] = ("rest_invalid_date", "Invalid date.")
                continue
            column = f"{field}_{'gmt' if use_gmt else 'local'}"
            self.dates.append((column, op, bound))

    def _status(self) -> None:
        kind = self.route.kind
        if kind in ("order_refunds", "refunds"):
            return  # the refunds controllers drop the status argument
        allowed: tuple[str, ...] = (
            ("any", "trash", *ORDER_STATUSES) if kind == "orders" else _POST_STATUSES
        )
        raw = self.params.get("status")
        values = ["any"] if raw is None else _php_list(raw)
        for n, value in enumerate(values):
            if value not in allowed:
                self.errors["status"] = (
                    "rest_not_in_enum",
                    f"status[{n}] is not one of {_wp_list(allowed)}.",
                )
                return
        # "any" is WP_Query's: every status except trash (and auto-draft).
        self.statuses = None if "any" in values else set(values)

    # ------------------------------------------------------------------ the query

    @property
    def index_kind(self) -> str:
        return "refunds" if self.route.kind == "order_refunds" else self.route.kind

    def signature(self) -> tuple[object, ...]:
        """Everything but the page window: equal signatures select the same ids."""
        return (
            self.route,
            self.order,
            self.orderby,
            tuple(self.include),
            frozenset(self.exclude),
            tuple(self.dates),
            None if self.statuses is None else frozenset(self.statuses),
            self.role,
            self.email,
            self.customer,
            None if self.parents is None else frozenset(self.parents),
            frozenset(self.parent_exclude),
        )

    def window(self, matched: list[int]) -> list[int]:
        """The page of ``matched`` to return: ``offset`` replaces ``page`` when given."""
        start = self.offset if self.offset else (self.page - 1) * self.per_page
        return matched[start : start + self.per_page]

    def _sort_field(self) -> str:
        return {
            "date": "created_local",
            "modified": "modified_local",
            "id": "id",
            "title": "title",
            "slug": "slug",
            "name": "title",
            "registered_date": "created_gmt",
            "include": "created_local",
        }[self.orderby]

    def sort_key(self) -> Callable[[int], object]:
        """The value an id is sorted by (call with the store locked)."""
        entries, field = self.store.index(self.index_kind), self._sort_field()
        return lambda record_id: getattr(entries[record_id], field)

    def matched(self) -> list[int]:
        """Ids passing every filter, in the requested order (call with the store locked)."""
        store = self.store
        kind = self.index_kind
        entries = store.index(kind)
        if self.orderby == "include" and self.include:
            order = [i for i in dict.fromkeys(self.include) if i in entries]
        else:
            ascending = store.sorted_ids(kind, self._sort_field())
            order = ascending if self.order == "asc" else ascending[::-1]
        tests = self._tests()
        if len(tests) == 1:
            test = tests[0]
            return [i for i in order if test(entries[i])]
        return [i for i in order if all(test(entries[i]) for test in tests)]

    def _tests(self) -> list[Callable[[IndexEntry], bool]]:
        route = self.route
        tests: list[Callable[[IndexEntry], bool]] = []
        if self.include:
            include = set(self.include)
            tests.append(lambda e: e.id in include)
        if self.exclude:
            tests.append(lambda e: e.id not in self.exclude)
        if route.kind in ("order_refunds", "variations"):
            parent = route.record_id
            tests.append(lambda e: e.parent == parent)
        if self.parents is not None:
            parents = self.parents
            tests.append(lambda e: e.parent in parents)
        if self.parent_exclude:
            tests.append(lambda e: e.parent not in self.parent_exclude)
        if route.kind == "customers":
            if self.role != "all":
                tests.append(lambda e: e.role == self.role)
            if self.email is not None:
                tests.append(lambda e: e.email == self.email)
        elif route.kind not in ("order_refunds", "refunds"):
            if self.statuses is None:
                tests.append(lambda e: e.status not in ("trash", "auto-draft"))
            else:
                statuses = self.statuses
                tests.append(lambda e: e.status in statuses)
        if self.customer is not None:
            customer = self.customer
            tests.append(lambda e: e.customer == customer)
        tests.extend(_date_test(column, op, bound) for column, op, bound in self.dates)
        return tests


def _shuffle_ties(ids: list[int], key: Callable[[int], object], rng: random.Random) -> list[int]:
    """``ids`` (sorted by ``key``) with every run of equal keys in a random order."""
    out: list[int] = []
    run: list[int] = []
    previous: object = None
    for record_id in ids:
        value = key(record_id)
        if run and value != previous:
            rng.shuffle(run)
            out.extend(run)
            run = []
        run.append(record_id)
        previous = value
    rng.shuffle(run)
    out.extend(run)
    return out


def _date_test(column: str, op: str, bound: str) -> Callable[[IndexEntry], bool]:
    # WP_Date_Query's after/before are exclusive unless "inclusive" is set, which WC never does.
    if op == ">":
        return lambda entry: str(getattr(entry, column)) > bound
    return lambda entry: str(getattr(entry, column)) < bound


class _Handler(SandboxHandler[SandboxServer]):
    server_version = "nginx"

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The Date header, from the store's clock (which may be skewed)."""
        if timestamp is None:
            timestamp = self.app.store.clock().timestamp()
        return email.utils.formatdate(timestamp, usegmt=True)

    def handle_request(self) -> None:
        app = self.app
        body = self.read_body()
        raw_path, _, raw_query = self.path.partition("?")
        pairs = _decode_pairs(raw_query)
        path = raw_path
        if path.startswith(API_PREFIX + "/") or path == API_PREFIX:
            path = path[len(API_PREFIX) :]
        path = path.strip("/")
        query_log = {name: value for name, value in pairs}

        config, fault, error_status = app._draw_fault()
        if config.latency_ms:
            time.sleep(config.latency_ms / 1000)
        if fault == "drop":
            app._record(RequestRecord(self.command, path, query_log, None, fault))
            self.close_connection = True
            return
        if fault is not None:
            status = self._send_fault(config, fault, error_status)
            app._record(RequestRecord(self.command, path, query_log, status, fault))
            return

        try:
            status, answer, headers = self._dispatch(raw_path, raw_query, pairs, path, body)
        except _Reply as reply:
            status, answer, headers = reply.status, orjson.dumps(reply.body), {}
        except Exception:
            # A bug in the sandbox answers like a broken WordPress does, and leaves a traceback
            # on stderr, rather than cutting the connection.
            traceback.print_exc()
            status, answer, headers = 500, orjson.dumps(_critical_error()), {}
        self._send(status, answer, _JSON_TYPE, headers)
        app._record(RequestRecord(self.command, path, query_log, status, None))

    def _dispatch(
        self,
        raw_path: str,
        raw_query: str,
        pairs: list[tuple[str, str]],
        path: str,
        body: bytes = b"",
    ) -> tuple[int, bytes, dict[str, str]]:
        app = self.app
        if not (raw_path.startswith(API_PREFIX + "/") or raw_path.rstrip("/") == API_PREFIX):
            # Outside the wc/ namespace WooCommerce does not authenticate anything.
            raise _Reply(404, *_NO_ROUTE)
        authenticated = app._authenticate(
            self.command, raw_path, pairs, self.headers.get("Authorization", "")
        )
        if self.command in _WRITE_METHODS:
            content_type = self.headers.get_content_type()
            return app._write(self.command, path, body, content_type, authenticated)
        if self.command == "GET" and path.strip("/") == "data/currencies/current":
            # WooCommerce's data controller: the store's currency, which prices are in.
            if not authenticated:
                raise _Reply(
                    401, "woocommerce_rest_cannot_view", "Sorry, you cannot view this resource."
                )
            code = app.store.currency
            return 200, orjson.dumps({"code": code, "name": code, "symbol": code}), {}
        route = app._route(self.command, path)
        # WordPress validates arguments before the permission callback runs, so a bad
        # per_page is a 400 even without credentials.
        query = _Query(app.store, route, parse_php_query(pairs))
        if not authenticated:
            message = (
                "Sorry, you cannot list resources."
                if route.collection
                else "Sorry, you cannot view this resource."
            )
            raise _Reply(401, "woocommerce_rest_cannot_view", message)
        body, headers = app._respond(query, raw_query, path)
        return 200, body, headers

    def _send_fault(self, config: FaultConfig, fault: str, status: int) -> int:
        if fault == "rate_limit":
            headers = {"Retry-After": config.retry_after} if config.retry_after is not None else {}
            body = _html_error(429, "Too Many Requests")
            self._send(429, body, _HTML_TYPE, headers)
            return 429
        if status == 500:
            self._send(500, orjson.dumps(_critical_error()), _JSON_TYPE, {})
        else:
            reason = "Bad Gateway" if status == 502 else "Service Temporarily Unavailable"
            self._send(status, _html_error(status, reason), _HTML_TYPE, {})
        return status

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str]) -> None:
        extra = _JSON_HEADERS if content_type == _JSON_TYPE else ()
        self.write_response(status, body, content_type, [*extra, *headers.items()])


def _json_params(body: bytes, content_type: str) -> dict[str, Any]:
    """The request's JSON body params, as WP_REST_Request::parse_json_params() reads them."""
    if not body.strip() or content_type != "application/json":
        return {}
    try:
        params = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _Reply(
            400,
            "rest_invalid_json",
            "Invalid JSON body passed.",
            {"json_error_code": 4, "json_error_message": str(exc)},
        ) from None
    return params if isinstance(params, dict) else {}


def _critical_error() -> dict[str, Any]:
    """WordPress's answer when PHP dies: wp_die() as JSON for a REST request."""
    return {
        "code": "internal_server_error",
        "message": _CRITICAL_ERROR,
        "data": {"status": 500},
        "additional_errors": [],
    }


def _html_error(status: int, reason: str) -> bytes:
    return (
        f"<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n"
        f"<center><h1>{status} {reason}</h1></center>\r\n<hr><center>nginx</center>\r\n"
        "</body>\r\n</html>\r\n"
    ).encode()


def _decode_pairs(raw_query: str) -> list[tuple[str, str]]:
    """Query pairs decoded as PHP fills $_GET (``+`` is a space, bytes kept as UTF-8)."""
    pairs = []
    for part in raw_query.split("&"):
        if part:
            name, _, value = part.partition("=")
            pairs.append((_php_urldecode(name), _php_urldecode(value)))
    return pairs


def _php_urldecode(text: str) -> str:
    raw = text.replace("+", " ").encode("utf-8", "surrogateescape")
    return unquote_to_bytes(raw).decode("utf-8", "surrogateescape")


def _php_filled(value: PhpValue | None) -> bool:
    return value not in (None, "", "0", {})


def _php_integer(value: PhpValue) -> int | None:
    # rest_is_integer(): numeric and whole, so "10" and "10.0" pass, "10.5" and "ten" do not.
    if not isinstance(value, str):
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    if not math.isfinite(number) or number != int(number):
        return None
    return int(number)


def _php_list(value: PhpValue) -> list[str]:
    """wp_parse_list(): an array as is, a string split on commas and whitespace."""
    if isinstance(value, dict):
        return [v for v in value.values() if isinstance(v, str)]
    return [part for part in re.split(r"[\s,]+", value) if part]


def _id_list(value: PhpValue | None) -> list[int]:
    """wp_parse_id_list(): absint() of every entry, duplicates removed."""
    if value is None:
        return []
    ids = [abs(_php_integer(part) or 0) for part in _php_list(value)]
    return list(dict.fromkeys(ids))


def _wp_list(items: Iterable[str]) -> str:
    """wp_sprintf('%l'): "a and b", "a, b, and c"."""
    values = list(items)
    if len(values) == 2:
        return f"{values[0]} and {values[1]}"
    return ", ".join(values[:-1]) + f", and {values[-1]}" if len(values) > 2 else "".join(values)


def _mysql_datetime(raw: str, store: SandboxStore) -> str | None:
    """The bound a WP date_query compares with, or None when rest_parse_date() refuses it.

    WP_Date_Query::build_mysql_datetime() takes "Y-m-d H:i:s" literally; anything else goes
    through date_create() in the site timezone and is converted to site time. So a naive
    value is used as is whichever column is compared, but a value with an offset becomes
    site-local time even when ``dates_are_gmt`` compares it with the GMT column.
    """
    match = _DATE_RE.match(raw)
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    try:
        moment = datetime(year, month, day, hour, minute, second)
    except ValueError:
        return None
    offset = match.group(8)
    if offset:
        if offset in ("Z", "z"):
            aware = moment.replace(tzinfo=UTC)
        else:
            aware = datetime.fromisoformat(f"{moment.isoformat()}{_normal_offset(offset)}")
        moment = aware.astimezone(store.timezone).replace(tzinfo=None)
    return moment.isoformat(timespec="seconds")


def _normal_offset(offset: str) -> str:
    digits = offset[1:].replace(":", "")
    return f"{offset[0]}{digits[:2]}:{digits[2:4] or '00'}"


def _field_paths(value: PhpValue | None) -> list[list[str]] | None:
    if value is None:
        return None
    paths = [part.split(".") for part in _php_list(value)]
    return paths or None


def _filter_fields(data: dict[str, Any], paths: list[list[str]]) -> dict[str, Any]:
    """rest_filter_response_fields(): keep requested top-level and dotted nested fields."""
    result: dict[str, Any] = {}
    for key, value in data.items():
        wanted = [path[1:] for path in paths if path[0] == key]
        if not wanted:
            continue
        if any(not rest for rest in wanted) or not isinstance(value, dict):
            result[key] = value
        else:
            result[key] = _filter_fields(value, wanted)
    return result


def _with_page(raw_query: str, page: int) -> str:
    """The request's own query with ``page`` set, as add_query_arg('page', ...) builds it."""
    parts = [part for part in raw_query.split("&") if part]
    replaced = False
    for n, part in enumerate(parts):
        if _php_urldecode(part.partition("=")[0]) == "page":
            parts[n] = f"page={page}"
            replaced = True
    if not replaced:
        parts.append(f"page={page}")
    return "&".join(parts)
