"""What every destination adapter is, and the kit adapters are built from.

An adapter knows its vendor's endpoints, batch limits, request shapes and how to read
per-row results from a response. It does not retry, sleep, diff, schedule or write
state: ``syncd.http`` retries and paces, the push engine plans, splits rejected batches
and records outcomes.

The kit, so each adapter writes only what is its vendor's:

* :meth:`Destination.call` / :meth:`Destination.call_json`: one request, its refusal
  classified once for every adapter (see :data:`CONTENT_STATUSES`);
* :meth:`Destination.handlers`: the operation -> handler table :meth:`Destination.send`
  dispatches on;
* :func:`cursor_pages`, :func:`next_link_pages`, :func:`offset_pages`: paginators that
  stop with :class:`PaginationLoop` when a server hands the same page token twice;
* :meth:`Destination.poll_job`: "start a job, poll until done" with a deadline;
* :func:`byte_chunks`: rows cut into requests under a byte cap and a count cap;
* :attr:`Destination.client_class`: the adapter's own :class:`ServiceClient` subclass,
  e.g. one that reads its vendor's rate-limit headers (``rate_limit_pause``).

Operations the engine asks for, by sync mode:

* ``upsert`` mode: ``upsert`` (create or update a record's attributes);
* ``mirror`` mode: ``add`` (create or update, and put in the audience/list/tag) and
  ``remove`` (take out of the audience; never delete the person);
* ``event`` mode: ``event`` (one event per segment entry, idempotent by ``Item.event_id``);
* ``delete`` mode: ``delete`` (privacy erasure);
* ``replace`` mode: ``replace`` (the whole audience, batch after batch, in one vendor
  session opened by :meth:`Destination.begin_replace`).

Apart from syncs, :meth:`Destination.forget` carries out one erasure request
(``syncd forget``) for the whole destination account; the default says it does not apply.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Hashable,
    Iterator,
    Mapping,
    Sequence,
)
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Literal, TypeVar
from urllib.parse import parse_qsl, urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, SecretStr

from syncd.http import (
    ApiError,
    AuthError,
    OAuth2RefreshAuth,
    Params,
    RetryExhausted,
    ServiceClient,
    ServiceLimits,
)

__all__ = [
    "ALL_OPS",
    "CONSENT_HEADER",
    "CONTENT_STATUSES",
    "OPS_OF_MODE",
    "BatchRejected",
    "Destination",
    "Handler",
    "Item",
    "JobTimeout",
    "MatchReport",
    "Mode",
    "NoOptions",
    "Op",
    "Outcome",
    "PaginationLoop",
    "Person",
    "Receipt",
    "ReplaceRestart",
    "SyncTarget",
    "byte_chunks",
    "cursor_pages",
    "next_link_pages",
    "offset_pages",
]

Mode = Literal["upsert", "mirror", "event", "delete", "replace"]
# "unsubscribe": a person who withdrew the sync's consent, in upsert mode (see Item).
Op = Literal["upsert", "add", "remove", "event", "delete", "unsubscribe", "replace"]
ALL_OPS: Final[tuple[Op, ...]] = ("upsert", "add", "remove", "event", "delete")

OPS_OF_MODE: Mapping[str, tuple[Op, ...]] = {
    "upsert": ("upsert",),
    "mirror": ("add", "remove"),
    "event": ("event",),
    "delete": ("delete",),
    # The whole audience sent again in one vendor session, which replaces its members;
    # "remove" takes out what a session cut off by a crash left behind.
    "replace": ("replace", "remove"),
}


class NoOptions(BaseModel):
    """An adapter without options of its own: any key is a typo."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True, slots=True)
class Item:
    """One record to send.

    ``payload`` is the mapped record: destination field names (dotted names already
    nested, ``{"properties": {"clv": 12.5}}``) to values. ``dest_id`` is the vendor's id
    for the record from an earlier send (Klaviyo profile ids for list removal), or
    None. ``event_id`` is a stable idempotency key for ``event`` and ``delete``: the
    same entry always gets the same id, so a re-sent batch cannot trigger twice.
    """

    key: str
    payload: dict[str, Any]
    dest_id: str | None = None
    event_id: str | None = None
    # A removal (or "unsubscribe") because the person withdrew the sync's consent, not
    # because they left the segment: an adapter with subscriptions unsubscribes them.
    withdrawn: bool = False
    # Whether the destination holds the record from an earlier send: an adapter subscribes
    # a person once, when first sent, so an unsubscribe made at the vendor (a link in an
    # email) is not undone by the next change of their row.
    held: bool = False


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the vendor said about one item: accepted (with its id, when it has one) or
    refused with the vendor's own message."""

    ok: bool
    error: str | None = None
    dest_id: str | None = None

    @classmethod
    def accepted(cls, dest_id: str | None = None) -> Outcome:
        return cls(ok=True, dest_id=dest_id)

    @classmethod
    def rejected(cls, error: str) -> Outcome:
        return cls(ok=False, error=error)


# Every request an adapter makes through call/call_json names the consent rule of the
# sync it is made for: an audit trail in a proxy's logs, and how a test sandbox tells
# a transactional sync's requests (consent "none") from a marketing one's.
CONSENT_HEADER: Final = "X-Syncd-Consent"
_SENDING_FOR: ContextVar[str] = ContextVar("syncd_sending_for", default="none")

# Answers that blame the request's content, so splitting the batch can isolate the rows at
# fault: 400 Bad Request, 409 Conflict, 413 Content Too Large, 422 Unprocessable Content
# (RFC 9110 §15.5). Every other 4xx (401, 403, 404, 405, 410...) blames the configuration
# (a key, a permission, a URL, a list id): it is the same for every row, so the run fails
# at once with the vendor's message instead of bisecting into ~2n requests. 429 and 5xx
# never get here: syncd.http retries them. An adapter whose vendor documents otherwise
# sets its own ``content_statuses`` and cites the doc.
CONTENT_STATUSES: Final = frozenset({400, 409, 413, 422})


class BatchRejected(Exception):
    """The vendor refused the whole batch for its content (see :data:`CONTENT_STATUSES`).

    The engine answers by splitting the batch in halves until the bad rows are alone,
    so the good rows still go out; a batch of one that is refused becomes that row's
    failure with ``message``.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ReplaceRestart(Exception):
    """The vendor no longer takes batches of the replace session (it timed out, finished,
    or never started): the engine starts the replace again with a new session."""


class PaginationLoop(ApiError):
    """A server handed the same page token (cursor, next link) twice: reading on would
    fetch the same pages forever, so the run fails instead."""


class JobTimeout(RetryExhausted):
    """An asynchronous vendor job was still running at its deadline. The run fails and the
    batch goes out next time (the adapter's job must be safe to submit again)."""


@dataclass(frozen=True, slots=True)
class SyncTarget:
    """The parts of one ``[[sync]]`` an adapter needs: where and how to send."""

    name: str
    mode: Mode
    object: str | None  # list / audience / tag / event name; meaning is the adapter's
    options: BaseModel  # the adapter's SyncOptions, validated
    # The consent channel every row of the sync has ("email", "sms", "ads"), or "none"
    # (a transactional sync, which may send people without marketing consent).
    consent: str = "none"


@dataclass(frozen=True, slots=True)
class Person:
    """Whom an erasure request is about, as each destination may know them.

    ``email`` is normalized, ``phone`` E.164 (either may be None); ``dest_ids`` and
    ``record_keys`` are, per sync name, the vendor's id for the person returned by an
    earlier send and the record key the person was sent under. ``request`` is the
    privacy request's id: a stable reference the receiver may echo.
    """

    request: int
    email: str | None
    phone: str | None
    dest_ids: Mapping[str, str]
    record_keys: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Receipt:
    """What a destination did about an erasure: ``done`` (``detail`` says what, ``receipt``
    is the vendor's own reference when it gives one) or ``not_applicable`` (``detail``
    says why). A deletion that failed raises instead, and is tried again later."""

    status: Literal["done", "not_applicable"]
    detail: str
    receipt: str | None = None

    @classmethod
    def done(cls, detail: str, receipt: str | None = None) -> Receipt:
        return cls("done", detail, receipt)

    @classmethod
    def not_applicable(cls, detail: str) -> Receipt:
        return cls("not_applicable", detail)


Handler = Callable[[SyncTarget, Sequence[Item]], Awaitable[list[Outcome]]]


def _tagged(headers: Mapping[str, str] | None) -> dict[str, str]:
    """``headers`` with the consent header of the batch being sent (see CONSENT_HEADER)."""
    return {CONSENT_HEADER: _SENDING_FOR.get(), **(headers or {})}


T = TypeVar("T")


@dataclass
class MatchReport:
    """What an ad platform said of one sync's rows in a run: rows it received, rows it
    reported invalid, and how many rows carried each identifier kind (what a match rate
    is made of)."""

    received: int = 0
    invalid: int = 0
    carrying: Counter[str] = field(default_factory=Counter)

    def as_json(self) -> dict[str, Any]:
        return {"received": self.received, "invalid": self.invalid, "carrying": dict(self.carrying)}


class Destination(ABC):
    """One destination account, as named by a mapping file.

    Subclasses set the class attributes and implement :meth:`handlers` (or override
    :meth:`send`). The constructor builds the :class:`ServiceClient` the adapter talks
    through; ``transport`` lets tests hand in respx or an in-process app.
    """

    type: ClassVar[str]
    # The modes this destination supports.
    modes: ClassVar[frozenset[str]]
    # The vendor's documented maximum items per request, per operation.
    max_batch: ClassVar[Mapping[str, int]]
    # Credential names the mapping's [credentials] table must give.
    credential_names: ClassVar[tuple[str, ...]]
    # Pacing from the vendor's documented limits; a mapping's [limits] may lower or raise it.
    default_limits: ClassVar[ServiceLimits]
    # The mapping's destination-wide [options] and per-sync [sync.options].
    # (builtins.type: the class attribute `type` above shadows the builtin in this body.)
    Options: ClassVar[builtins.type[BaseModel]] = NoOptions
    SyncOptions: ClassVar[builtins.type[BaseModel]] = NoOptions
    # Whether a sync must name an `object`, per mode (a list id, an event name...).
    object_required: ClassVar[frozenset[str]] = frozenset()
    # What the object is and how to get one, said when a sync lacks it.
    object_help: ClassVar[str | None] = None
    # The marketing consent a sync needs by default ("email", "sms", "ads"; "none" for a
    # destination that is not a marketing channel): only people whose profile's
    # consent_<channel> is true are sent, unless the sync says consent = "none" and why.
    consent_channel: ClassVar[str] = "none"
    # Statuses that refuse a batch for its content (bisected); see CONTENT_STATUSES.
    content_statuses: ClassVar[Collection[int]] = CONTENT_STATUSES
    # The client class: a ServiceClient subclass overriding rate_limit_pause reads the
    # vendor's own rate-limit headers (HubSpot's X-HubSpot-RateLimit-*, Meta's usage
    # JSON). None: the plain ServiceClient.
    client_class: ClassVar[builtins.type[ServiceClient] | None] = None
    # Polling an asynchronous job: the first wait, its growth factor and its cap (seconds).
    # Polling is the vendor's protocol, not a retry, so it lives here and not in
    # syncd.http. Instance attributes (with poll_sleep) so tests can make it instant.
    poll_interval: float = 1.0
    poll_backoff: float = 2.0
    poll_interval_max: float = 30.0
    # Ad platforms: the push engine gives the adapter a fresh MatchReport per sync run
    # (``self.match_report``) and records it in the run's counts; ``min_audience`` is the
    # platform's minimum matched audience before it serves ads (the pre-flight warns below it).
    reports_match: ClassVar[bool] = False
    min_audience: ClassVar[int | None] = None
    match_report: MatchReport | None = None

    def __init__(
        self,
        name: str,
        credentials: Mapping[str, SecretStr],
        options: BaseModel,
        *,
        base_url: str | None = None,
        limits: ServiceLimits | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = name
        self.credentials = credentials
        self.options = options
        self.base_url = self.api_root(base_url or self.default_base_url(credentials))
        # None unless the mapping set [limits]: adapters with several rate classes keep
        # each at its vendor's own pace then (see make_client).
        self.limits_override = limits
        self._transport = transport
        self.poll_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        # One auth for every client of the account: an OAuth token is refreshed once for
        # all of them, not once per rate class.
        self._auth = self.auth(credentials)
        self._clients: list[ServiceClient] = []
        self.client = self.make_client("", self.default_limits)
        self.setup()
        self._handlers = self.handlers()

    def make_client(self, kind: str, default: ServiceLimits) -> ServiceClient:
        """A client of this destination (``kind`` names an extra rate class, e.g. Klaviyo's
        events); a mapping's [limits] replaces ``default``."""
        client_class = self.client_class or ServiceClient
        client = client_class(
            f"{self.type}:{self.name}" + (f":{kind}" if kind else ""),
            self.base_url,
            limits=self.limits_override or default,
            headers=self.headers(self.credentials),
            auth=self._auth,
            transport=self._transport,
        )
        self._clients.append(client)
        return client

    # -- set-up, overridable ------------------------------------------------------------

    def setup(self) -> None:
        """Adapter state made once the client exists (caches, extra clients)."""
        return None

    @classmethod
    def api_root(cls, base_url: str) -> str:
        """The API root requests are relative to, from the mapping's base_url (checked:
        ValueError for one that cannot work)."""
        return base_url

    @classmethod
    @abstractmethod
    def default_base_url(cls, credentials: Mapping[str, SecretStr]) -> str:
        """The vendor's API root (may depend on the credentials: Mailchimp's datacenter)."""

    @classmethod
    def headers(cls, credentials: Mapping[str, SecretStr]) -> dict[str, str]:
        """Headers sent with every request (auth headers, API revision...)."""
        return {}

    @classmethod
    def auth(cls, credentials: Mapping[str, SecretStr]) -> httpx.Auth | None:
        return None

    @classmethod
    def check_credentials(cls, credentials: Mapping[str, SecretStr]) -> str | None:
        """A reason the credentials cannot work (a malformed key), found before any call."""
        return None

    @classmethod
    def target_problem(cls, mode: str, options: BaseModel) -> str | None:
        """A reason a sync's mode and options cannot work together (a Mailchimp mirror
        without a tag), found when the mapping loads."""
        return None

    def check(self, target: SyncTarget, op: Op, payload: Mapping[str, Any]) -> str | None:
        """Why this mapped record cannot be sent (no email for an email-keyed list...),
        or None. Rows failing here are skipped with the reason, never sent to fail."""
        return None

    async def prepare(self, target: SyncTarget) -> None:
        """Resolve what a sync needs before its first batch (a tag's id...). Called once
        per run and sync, before any :meth:`send`."""
        return None

    def supports(self, op: Op) -> bool:
        """Whether this adapter has a handler for ``op``."""
        return op in self._handlers

    def request_count(self) -> int:
        """Requests sent so far by every client (attempts, retries included): the run's
        ``requests`` count."""
        return sum(client.stats.requests for client in self._clients)

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()
        if isinstance(self._auth, OAuth2RefreshAuth):
            await self._auth.aclose()

    # -- sending ------------------------------------------------------------------------

    @abstractmethod
    def handlers(self) -> Mapping[Op, Handler]:
        """The handler of each operation this adapter supports (called once, after
        :meth:`setup`)."""

    async def send(self, target: SyncTarget, op: Op, items: Sequence[Item]) -> list[Outcome]:
        """Send one batch (at most ``max_batch[op]`` items) and return one outcome per item,
        in order. Raise :class:`BatchRejected` when the vendor refuses the batch as a
        whole for its content; let ``syncd.http`` errors (auth, configuration, exhausted
        retries) propagate: they fail the run and the batch goes out next time."""
        handler = self._handlers.get(op)
        if handler is None:
            raise ValueError(f"{self.type} destination does not support {op!r}")
        if not items:
            return []
        limit = self.max_batch.get(op)
        if limit is not None and len(items) > limit:
            # The engine splits by max_batch; more would be refused as a whole.
            raise ValueError(
                f"{self.type}: at most {limit} items per {op} batch (max_batch), got {len(items)}"
            )
        token = _SENDING_FOR.set(target.consent)
        try:
            return await handler(target, items)
        finally:
            _SENDING_FOR.reset(token)

    # -- replace mode -----------------------------------------------------------------------

    def begin_replace(
        self, target: SyncTarget, total: int, resume: Mapping[str, Any] | None
    ) -> None:
        """Open a session replacing ``target``'s audience with the ``total`` rows the
        following ``replace`` batches carry (in order, one at a time); ``resume`` is the
        :meth:`replace_state` of a session a cut-off run left open, to carry on with when
        the vendor still takes it. Adapters with a ``replace`` handler implement it."""
        raise NotImplementedError(f"{self.type} has no replace sessions")

    def replace_state(self) -> dict[str, Any]:
        """The open replace session as JSON, kept by the engine after every batch so a run
        cut off mid-session can be resumed (see :meth:`begin_replace`)."""
        raise NotImplementedError(f"{self.type} has no replace sessions")

    # -- erasure --------------------------------------------------------------------------

    async def forget(
        self, person: Person, targets: Sequence[SyncTarget], fields: Collection[str]
    ) -> Receipt:
        """Erase ``person`` from this destination account; ``targets`` are the mapping's
        syncs, ``fields`` every destination field they write (dotted names). Must be safe
        to call again: a request interrupted before its outcome was recorded is repeated.
        The default: this destination has no deletion to ask for."""
        return Receipt.not_applicable(f"{self.type} has no deletion syncd can ask for")

    # -- the call helper ----------------------------------------------------------------

    async def call(
        self,
        method: str,
        url: str,
        *,
        client: ServiceClient | None = None,
        params: Params | None = None,
        json: Any = None,
        content: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """One request through ``client`` (default :attr:`client`), its refusal classified:
        :class:`BatchRejected` for the batch's content (:meth:`is_content_refusal`), the
        ``syncd.http`` error as is for anything else (it fails the run)."""
        with self._refusals():
            return await (client or self.client).request(
                method, url, params=params, json=json, content=content, headers=_tagged(headers)
            )

    async def call_json(
        self,
        method: str,
        url: str,
        *,
        client: ServiceClient | None = None,
        params: Params | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[Any, httpx.Response]:
        """:meth:`call` with the body parsed as JSON (None when empty); the response comes
        along for its headers."""
        with self._refusals():
            return await (client or self.client).request_json(
                method, url, params=params, json=json, headers=_tagged(headers)
            )

    @contextlib.contextmanager
    def _refusals(self) -> Iterator[None]:
        try:
            yield
        except ApiError as exc:
            if self.is_content_refusal(exc):
                raise BatchRejected(self.refusal_message(exc)) from exc
            raise

    def is_content_refusal(self, exc: ApiError) -> bool:
        """Whether a failed call refused the batch for its content. Auth errors, exhausted
        retries and requests that could not be sent never are."""
        if isinstance(exc, AuthError | RetryExhausted) or exc.status is None:
            return False
        return exc.status in self.content_statuses

    def refusal_message(self, exc: ApiError) -> str:
        """The row's failure message when a refused batch is down to one row."""
        return exc.message

    # -- asynchronous jobs --------------------------------------------------------------

    async def poll_job(
        self,
        fetch: Callable[[], Awaitable[T]],
        done: Callable[[T], bool],
        *,
        first: T,
        timeout: float,
        what: str,
        state: Callable[[T], str],
        url: str,
        setting: str = "timeout",
        client: ServiceClient | None = None,
    ) -> T:
        """Poll ``fetch`` until ``done`` (``first`` is the job as submitted), waiting
        :attr:`poll_interval` growing by :attr:`poll_backoff` up to
        :attr:`poll_interval_max`; :class:`JobTimeout` once ``timeout`` seconds of waiting
        have passed, naming ``what``, its last ``state`` and the ``setting`` that sets
        the timeout."""
        current, interval, waited = first, self.poll_interval, 0.0
        while not done(current):
            if waited >= timeout:
                raise JobTimeout(
                    (client or self.client).service,
                    None,
                    "GET",
                    url,
                    f"{what} still {state(current)} after {waited:.0f}s of polling "
                    f"({setting} {timeout:g}s)",
                    attempts=0,
                    elapsed=waited,
                )
            await self.poll_sleep(interval)
            waited += interval
            interval = min(interval * self.poll_backoff, self.poll_interval_max)
            current = await fetch()
        return current


# -- paginators -------------------------------------------------------------------------


async def _pages(
    client: ServiceClient,
    url: str,
    fetch: Callable[[Any], Awaitable[tuple[Sequence[Any], Hashable | None]]],
) -> AsyncIterator[Any]:
    """Items of every page; ``fetch(token)`` reads one page and says the next token (None:
    the last page). A token seen before means the server is going round in circles."""
    seen: set[Hashable] = set()
    token: Any = None
    while True:
        items, next_token = await fetch(token)
        for item in items:
            yield item
        if next_token is None:
            return
        if next_token in seen:
            raise PaginationLoop(
                client.service,
                None,
                "GET",
                url,
                f"the server handed the same page token twice ({str(next_token)[:100]}); "
                "stopped instead of reading the same pages again",
            )
        seen.add(next_token)
        token = next_token


async def cursor_pages(
    client: ServiceClient,
    url: str,
    params: Mapping[str, Any],
    *,
    items: Callable[[Any], Sequence[Any]],
    next_cursor: Callable[[Any], str | None],
    cursor_param: str,
) -> AsyncIterator[Any]:
    """Every item of a cursor-paginated collection: ``next_cursor(body)`` is sent back as
    ``cursor_param`` (HubSpot's ``after``, Meta's ``after`` cursor)."""

    async def fetch(cursor: Any) -> tuple[Sequence[Any], Hashable | None]:
        query = dict(params) if cursor is None else {**params, cursor_param: cursor}
        body, _ = await client.get_json(url, params=query)
        return items(body), next_cursor(body) or None

    async for item in _pages(client, url, fetch):
        yield item


async def next_link_pages(
    client: ServiceClient,
    url: str,
    params: Params,
    *,
    items: Callable[[Any], Sequence[Any]],
    next_link: Callable[[Any], str | None],
) -> AsyncIterator[Any]:
    """Every item of a collection paginated by a next link (JSON:API ``links.next``).

    The link's query (its page cursor) is re-applied to ``url`` rather than fetching the
    link as given: the credentials never go to a host the link names.
    """

    async def fetch(query: Any) -> tuple[Sequence[Any], Hashable | None]:
        body, _ = await client.get_json(url, params=params if query is None else list(query))
        link = next_link(body)
        following = tuple(parse_qsl(urlsplit(str(link)).query, keep_blank_values=True))
        return items(body), (following or None) if link else None

    async for item in _pages(client, url, fetch):
        yield item


async def offset_pages(
    client: ServiceClient,
    url: str,
    params: Mapping[str, Any],
    *,
    items: Callable[[Any], Sequence[Any]],
    total: Callable[[Any], int],
    offset_param: str = "offset",
) -> AsyncIterator[Any]:
    """Every item of an offset-paginated collection (Mailchimp's ``count``/``offset``),
    until a page comes back empty or the offset reaches ``total(body)``."""

    async def fetch(offset: Any) -> tuple[Sequence[Any], Hashable | None]:
        start = offset or 0
        body, _ = await client.get_json(url, params={**params, offset_param: start})
        page = items(body)
        after = start + len(page)
        return page, after if page and after < total(body) else None

    async for item in _pages(client, url, fetch):
        yield item


# -- chunking ---------------------------------------------------------------------------


def byte_chunks(
    rows: Sequence[tuple[T, bytes]], envelope: int, max_bytes: int, max_rows: int
) -> Iterator[list[tuple[T, bytes]]]:
    """Consecutive runs of serialized rows whose request stays within both caps: the
    ``envelope`` (the body around an empty array) plus the rows and the commas between
    them under ``max_bytes``, at most ``max_rows`` rows. A row too big on its own still
    gets a chunk of its own: the caller refuses such rows before chunking."""
    chunk: list[tuple[T, bytes]] = []
    size = envelope
    for row in rows:
        extra = len(row[1]) + (1 if chunk else 0)  # the comma between array members
        if chunk and (size + extra > max_bytes or len(chunk) >= max_rows):
            yield chunk
            chunk, size, extra = [], envelope, len(row[1])
        chunk.append(row)
        size += extra
    if chunk:
        yield chunk
