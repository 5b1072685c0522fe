"""What every destination adapter is: the contract between the sync engine and a vendor.

An adapter knows its vendor's endpoints, batch limits, request shapes and how to read
per-row results from a response. It does not retry, sleep, diff, schedule or write
state: ``syncd.http`` retries and paces, ``syncd.sync`` plans, splits rejected batches
and records outcomes.

Operations the engine asks for, by sync mode:

* ``upsert`` mode: ``upsert`` (create or update a record's attributes);
* ``mirror`` mode: ``add`` (create or update, and put in the audience/list/tag) and
  ``remove`` (take out of the audience; never delete the person);
* ``event`` mode: ``event`` (one event per segment entry, idempotent by ``Item.event_id``);
* ``delete`` mode: ``delete`` (privacy erasure).
"""

from __future__ import annotations

import builtins
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import httpx
from pydantic import BaseModel, ConfigDict, SecretStr

from syncd.http import ServiceClient, ServiceLimits

__all__ = [
    "OPS_OF_MODE",
    "BatchRejected",
    "Destination",
    "Item",
    "Mode",
    "NoOptions",
    "Op",
    "Outcome",
    "SyncTarget",
]

Mode = Literal["upsert", "mirror", "event", "delete"]
Op = Literal["upsert", "add", "remove", "event", "delete"]

OPS_OF_MODE: Mapping[str, tuple[Op, ...]] = {
    "upsert": ("upsert",),
    "mirror": ("add", "remove"),
    "event": ("event",),
    "delete": ("delete",),
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


class BatchRejected(Exception):
    """The vendor refused the whole batch for its content (a 4xx other than 429/401/403).

    The engine answers by splitting the batch in halves until the bad rows are alone,
    so the good rows still go out; a batch of one that is refused becomes that row's
    failure with ``message``.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class SyncTarget:
    """The parts of one ``[[sync]]`` an adapter needs: where and how to send."""

    name: str
    mode: Mode
    object: str | None  # list / audience / tag / event name; meaning is the adapter's
    options: BaseModel  # the adapter's SyncOptions, validated


class Destination(ABC):
    """One destination account, as named by a mapping file.

    Subclasses set the class attributes and implement :meth:`send`. The constructor
    builds the one :class:`ServiceClient` the adapter talks through; ``transport``
    lets tests hand in respx or an in-process app.
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
        self.client = self.make_client("", self.default_limits)
        self.setup()

    def make_client(self, kind: str, default: ServiceLimits) -> ServiceClient:
        """A client of this destination (``kind`` names an extra rate class, e.g. Klaviyo's
        events); a mapping's [limits] replaces ``default``."""
        return ServiceClient(
            f"{self.type}:{self.name}" + (f":{kind}" if kind else ""),
            self.base_url,
            limits=self.limits_override or default,
            headers=self.headers(self.credentials),
            auth=self.auth(self.credentials),
            transport=self._transport,
        )

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

    def request_count(self) -> int:
        """Requests sent so far (attempts, retries included): the run's ``requests`` count."""
        return self.client.stats.requests

    async def aclose(self) -> None:
        await self.client.aclose()

    # -- sending ------------------------------------------------------------------------

    @abstractmethod
    async def send(self, target: SyncTarget, op: Op, items: Sequence[Item]) -> list[Outcome]:
        """Send one batch (at most ``max_batch[op]`` items) and return one outcome per item,
        in order. Raise :class:`BatchRejected` when the vendor refuses the batch as a
        whole for its content; let ``syncd.http`` errors (auth, exhausted retries)
        propagate: they fail the run and the batch goes out next time."""
