"""WooCommerce write-back: customer meta (segments, CLV...) on the store's own customers.

Every batch is one ``POST {store}/wp-json/wc/v3/customers/batch`` with
``{"update": [{"id": N, "meta_data": [{"key": k, "value": v}, ...], ...}]}``.

Payload conventions (the mapped record of one customer):

* ``id``: the WooCommerce customer id (a positive integer, or its digits as a string).
  Guests (``customer_id`` 0 on their orders) and people known only from orders have
  none: :meth:`WooCommerceDestination.check` skips them as "not a registered customer".
* ``meta.<key>``: one customer meta value each (mapping field ``meta.syncd_segments``
  arrives nested as ``{"meta": {"syncd_segments": [...]}}``). Strings, numbers and
  booleans are sent as they are; lists and dicts are sent as JSON text
  (``'["vip","at_risk"]'``): WordPress stores array meta PHP-serialized, which SQL
  reports and non-PHP readers cannot parse, while JSON text reads the same everywhere.
  ``None`` sends ``null``, which WordPress stores as an empty value. Keys starting with
  ``_`` are refused: WooCommerce treats them as its internal data (``_billing_email``
  would rewrite the billing email) rather than meta. A key cannot contain a dot (the
  mapping would nest it).
* ``first_name``, ``last_name``, ``billing.*``, ``shipping.*``: passed through as the
  customer's own fields. Nothing else is written (no email, username or password:
  identity changes do not belong in a metrics write-back); other fields are refused
  per row by ``check``.

Outcomes: WooCommerce answers ``{"update": [customer, ... or {"id": N, "error": {code,
message, data}}]}`` in the order sent; each item is matched to its answer by id,
accepted ones get ``dest_id = str(id)``. A 400 or 413 for the whole request becomes
:class:`~syncd.destinations.base.BatchRejected`; any other refusal fails the run.

Erasure (``syncd forget``): the meta keys the mapping writes are removed from each
customer syncd wrote to (a ``null`` value deletes the meta row when WooCommerce saves the
customer: ``WC_Data::save_meta_data``). The account, its orders and addresses are the
store owner's own records, not syncd's: WooCommerce's eraser (Tools > Erase Personal
Data) removes them, and the receipt says so.

Set-up: the mapping's ``base_url`` is required and is the store's site URL
(``https://shop.example.com``, as in the source's ``url``); ``/wp-json/wc/v3`` is
appended here as the source does. Credentials ``consumer_key``/``consumer_secret`` of a
key with write permission; auth is the source's: HTTP Basic over https, OAuth 1.0a
(signed query string) over plain http, both from :mod:`syncd.sources.woocommerce.auth`.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Collection, Generator, Mapping, Sequence
from typing import Any, ClassVar, Final
from urllib.parse import urlsplit

import httpx
import orjson
from pydantic import SecretStr

from syncd.destinations.base import (
    Destination,
    Handler,
    Item,
    Op,
    Outcome,
    Person,
    Receipt,
    SyncTarget,
)
from syncd.http import ApiError, ServiceLimits
from syncd.sources.woocommerce.auth import API_ROOT, make_auth

__all__ = ["MAX_BATCH", "WooCommerceDestination", "meta_value"]

# create + update + delete <= 100 per batch request, else 413
# woocommerce_rest_request_entity_too_large (WC_REST_Controller::check_batch_limit, filter
# woocommerce_rest_batch_items_limit; REST docs: "limited to up to 100 objects").
MAX_BATCH: Final = 100

NOT_REGISTERED: Final = "not a registered customer of the store (no WooCommerce customer id)"

# Top-level customer fields a mapping may write besides `id` and `meta`.
CUSTOMER_FIELDS: Final = ("first_name", "last_name", "billing", "shipping")
_ADDRESS_FIELDS: Final = ("billing", "shipping")


def meta_value(value: Any) -> Any:
    """A mapped value as sent in ``meta_data``: lists and dicts as JSON text, others as is."""
    if isinstance(value, list | dict):
        # Sorted keys: the same value always makes the same text, so an unchanged dict
        # does not read as a change to whoever compares the stored meta.
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    return value


def customer_id(value: Any) -> int | None:
    """The WooCommerce customer id a payload's ``id`` names, or None (guest, missing, junk)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().isdecimal():
        number = int(value.strip())
    else:
        return None
    # 0 is how WooCommerce spells "guest" (orders' customer_id).
    return number if number > 0 else None


class _StoreAuth(httpx.Auth):
    """The source's ``auto`` auth, chosen per request from the URL's scheme.

    ``Destination.auth`` sees only the credentials, not the base URL, so the scheme
    check happens here: HTTP Basic over https, OAuth 1.0a over http (WooCommerce accepts
    Basic only over TLS) — the same rule as ``WooCommerceSourceSettings.effective_auth``.
    """

    # OAuth1Auth signs form bodies and needs them loaded; a JSON body is loaded for
    # nothing, which costs nothing as it is already bytes.
    requires_request_body = True

    def __init__(self, key: str, secret: str) -> None:
        self._basic = make_auth("basic", key, secret)
        self._oauth = make_auth("oauth1", key, secret)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        inner = self._basic if request.url.scheme == "https" else self._oauth
        yield from inner.auth_flow(request)


class WooCommerceDestination(Destination):
    """Writes customer meta and name/address fields back to the store (``upsert`` only)."""

    type: ClassVar[str] = "woocommerce"
    modes: ClassVar[frozenset[str]] = frozenset({"upsert"})
    max_batch: ClassVar[Mapping[str, int]] = {"upsert": MAX_BATCH}
    credential_names: ClassVar[tuple[str, ...]] = ("consumer_key", "consumer_secret")
    # wc/v3 has no built-in rate limit (WooCommerce REST docs); hosts and WAFs
    # answer 429/503 when pushed, which syncd.http honours. A batch of 100 customer
    # updates runs 100 saves and their hooks in one PHP request, far heavier than the
    # source's GETs (10/s, 4 in flight), so writes go gently: 2 in flight, 1 per second,
    # and a per-attempt timeout above PHP's usual 30-60 s max_execution_time.
    default_limits: ClassVar[ServiceLimits] = ServiceLimits(
        requests_per_second=1.0, concurrency=2, timeout=90.0
    )
    # Whole-request refusals for content: 400 (rest_invalid_param, a malformed body) and
    # 413 (woocommerce_rest_request_entity_too_large, over the batch limit), as
    # WC_REST_Controller::check_batch_limit and the REST docs' "Errors" section list them.
    # WooCommerce answers no 409/422 for a batch of customers: any such answer comes from
    # something in front of the store, not from the rows.
    content_statuses: ClassVar[Collection[int]] = frozenset({400, 413})

    @classmethod
    def api_root(cls, base_url: str) -> str:
        return api_root(base_url)

    @classmethod
    def default_base_url(cls, credentials: Mapping[str, SecretStr]) -> str:
        """There is no default: every store has its own URL, so a mapping must give one.

        Raises ValueError, so a mapping without ``base_url`` fails when its destination is
        built (at start-up), not on the first batch.
        """
        raise ValueError(
            "a woocommerce destination needs base_url: the store's site URL, "
            "e.g. https://shop.example.com"
        )

    @classmethod
    def auth(cls, credentials: Mapping[str, SecretStr]) -> httpx.Auth | None:
        return _StoreAuth(
            credentials["consumer_key"].get_secret_value(),
            credentials["consumer_secret"].get_secret_value(),
        )

    @classmethod
    def check_credentials(cls, credentials: Mapping[str, SecretStr]) -> str | None:
        for name in cls.credential_names:
            secret = credentials.get(name)
            if secret is None or not secret.get_secret_value().strip():
                return f"{name} is empty"
        return None

    def check(self, target: SyncTarget, op: Op, payload: Mapping[str, Any]) -> str | None:
        if customer_id(payload.get("id")) is None:
            return NOT_REGISTERED
        unknown = sorted(set(payload) - {"id", "meta", *CUSTOMER_FIELDS})
        if unknown:
            return (
                f"cannot write {', '.join(unknown)} to a WooCommerce customer "
                "(allowed: id, meta.*, first_name, last_name, billing.*, shipping.*)"
            )
        meta = payload.get("meta")
        if meta is not None:
            if not isinstance(meta, Mapping):
                return "meta must be a table of meta keys (map fields as meta.<key>)"
            for key in meta:
                if not isinstance(key, str) or not key.strip():
                    return "meta keys must be non-empty names"
                if key.startswith("_"):
                    return (
                        f"meta key {key!r} starts with an underscore: WooCommerce keeps such "
                        "keys for its own data"
                    )
        for field in _ADDRESS_FIELDS:
            if field in payload and not isinstance(payload[field], Mapping):
                return f"{field} must be a table of address fields (map fields as {field}.<name>)"
        return None

    def handlers(self) -> Mapping[Op, Handler]:
        return {"upsert": self._upsert}

    async def forget(
        self, person: Person, targets: Sequence[SyncTarget], fields: Collection[str]
    ) -> Receipt:
        # The customers syncd wrote to are the ids its syncs got back (dest_id); never a
        # guess from an id of another store.
        syncs = {t.name for t in targets}
        ids = sorted(
            {
                number
                for sync, dest_id in person.dest_ids.items()
                if sync in syncs and (number := customer_id(dest_id)) is not None
            }
        )
        keys = sorted({f.split(".", 1)[1] for f in fields if f.startswith("meta.")})
        owner = (
            "the customer account, its orders and addresses are the store's own records: "
            "erase them with WooCommerce's Tools > Erase Personal Data"
        )
        if not ids or not keys:
            why = (
                "the mapping writes no customer meta"
                if not keys
                else "syncd never wrote to a customer account of this person"
            )
            return Receipt.not_applicable(f"{why}; {owner}")
        updates = [
            {"id": number, "meta_data": [{"key": key, "value": None} for key in keys]}
            for number in ids
        ]
        body, response = await self.call_json("POST", "customers/batch", json={"update": updates})
        failed = [o.error for o in self._outcomes(ids, body, response) if not o.ok]
        if failed:
            raise ApiError(
                self.client.service,
                response.status_code,
                "POST",
                str(response.request.url),
                f"WooCommerce refused the meta removal: {failed[0]}",
            )
        return Receipt.done(
            f"removed syncd's meta ({', '.join(keys)}) from customer "
            f"{', '.join(map(str, ids))}; {owner}"
        )

    async def _upsert(self, target: SyncTarget, items: Sequence[Item]) -> list[Outcome]:
        ids = [customer_id(item.payload.get("id")) for item in items]
        updates = [
            customer_update(number, item.payload)
            for number, item in zip(ids, items, strict=True)
            if number is not None
        ]
        body: Any = None
        response: httpx.Response | None = None
        if updates:
            # A 404 rest_no_route (a wrong store URL, a store without wc/v3) fails the run
            # with WooCommerce's message, as auth errors do.
            body, response = await self.call_json(
                "POST", "customers/batch", json={"update": updates}
            )
        return self._outcomes(ids, body, response)

    def _outcomes(
        self, ids: Sequence[int | None], body: Any, response: httpx.Response | None
    ) -> list[Outcome]:
        answers = body.get("update") if isinstance(body, dict) else None
        if response is not None and not isinstance(answers, list):
            # A 2xx that is not a batch answer (a security plugin's page, a cache) says
            # nothing about the rows: fail the run rather than guess their outcomes.
            raise ApiError(
                self.client.service,
                response.status_code,
                "POST",
                str(response.request.url),
                f'expected {{"update": [...]}} from customers/batch, got {_shape(body)}',
            )
        # Answers come in the order sent; matching by id (first unused answer of that id)
        # stays right even if a plugin reorders them or one id appears twice.
        by_id: defaultdict[int, deque[Mapping[str, Any]]] = defaultdict(deque)
        for answer in answers or []:
            if isinstance(answer, Mapping):
                number = customer_id(answer.get("id"))
                if number is not None:
                    by_id[number].append(answer)
        outcomes: list[Outcome] = []
        for number in ids:
            if number is None:
                # check() skips these; a row that got here anyway fails alone, not the batch.
                outcomes.append(Outcome.rejected(NOT_REGISTERED))
            elif not by_id[number]:
                outcomes.append(
                    Outcome.rejected(f"WooCommerce returned no result for customer {number}")
                )
            else:
                outcomes.append(_outcome(number, by_id[number].popleft()))
        return outcomes


def api_root(site: str) -> str:
    """The store's ``wc/v3`` root from its site URL (kept if the URL already is the root)."""
    url = site.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"base_url must be the store's http:// or https:// URL, got {site!r}")
    if url.endswith(API_ROOT):
        return url
    return url + API_ROOT


def customer_update(number: int, payload: Mapping[str, Any]) -> dict[str, Any]:
    """One ``update`` entry of ``customers/batch`` from a mapped record."""
    update: dict[str, Any] = {"id": number}
    for field in CUSTOMER_FIELDS:
        if field in payload:
            update[field] = payload[field]
    meta = payload.get("meta")
    if isinstance(meta, Mapping) and meta:
        update["meta_data"] = [{"key": key, "value": meta_value(v)} for key, v in meta.items()]
    return update


def _outcome(number: int, answer: Mapping[str, Any]) -> Outcome:
    error = answer.get("error")
    if error is None:
        return Outcome.accepted(str(number))
    if isinstance(error, Mapping):
        message = str(error.get("message") or "").strip() or "refused"
        code = error.get("code")
        return Outcome.rejected(f"{message} ({code})" if code else message)
    return Outcome.rejected(str(error))


def _shape(body: Any) -> str:
    if isinstance(body, dict):
        return "an object with keys " + ", ".join(sorted(map(str, body))) if body else "{}"
    return type(body).__name__
