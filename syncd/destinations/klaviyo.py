"""Klaviyo: profiles, list membership, events and privacy deletion (API revision 2026-07-15).

Every call goes to Klaviyo's JSON:API at ``https://a.klaviyo.com/api`` with a private key
(``Authorization: Klaviyo-API-Key pk_...``) and the ``revision`` header that pins the
request and response shapes this module was written against.

Operations
----------

* ``upsert`` — one bulk profile import job per batch (``POST /api/profile-bulk-import-jobs``),
  split into several jobs only when the body would pass Klaviyo's 5 MB cap. The job is
  polled until ``complete`` and its ``/import-errors`` become per-row failures; every other
  row is accepted.
* ``add`` (mirror) — the same import job with the sync's list in ``relationships.lists``;
  then the job's profiles are read back to learn the profile id each row got, returned as
  ``Outcome.dest_id`` (Klaviyo removes list members by profile id only, never by email).
* ``remove`` (mirror) — ``DELETE /api/lists/{list}/relationships/profiles`` with the
  profile ids returned on ``add``. It takes the profile off the list; it does not touch
  consent or delete the profile.
* ``event`` — ``POST /api/event-bulk-create-jobs``, one event per row, each with
  ``unique_id = Item.event_id``: Klaviyo deduplicates events by it, so a re-sent batch cannot
  trigger a flow twice.
* ``delete`` — ``POST /api/data-privacy-deletion-jobs``, one request per row.
* ``unsubscribe`` (upsert, a person who withdrew the sync's consent) —
  ``POST /api/profile-subscription-bulk-delete-jobs`` (``bulk_unsubscribe_profiles``).

Consent (a sync's ``consent``, email by default)
------------------------------------------------

Only people who consented on the sync's channel are its rows. After their profile import,
rows sent for the first time are subscribed: ``POST /api/profile-subscription-bulk-create-jobs``
(operationId ``bulk_subscribe_profiles``, at most 1,000 profiles a call), with
``subscriptions.email.marketing`` (or ``sms.marketing`` with the ``phone_number``) set to
``SUBSCRIBED`` and, in a mirror, the sync's list. Once, not on every change of the row:
subscribing lifts an unsubscribe made at Klaviyo (the operation's description: it
"will remove any UNSUBSCRIBE, SPAM_REPORT or USER_SUPPRESSED suppressions"), and a
shopper who clicked an unsubscribe link must stay unsubscribed. A person who withdrew is
unsubscribed: ``POST /api/profile-subscription-bulk-delete-jobs`` (``bulk_unsubscribe_profiles``,
at most 100 a call), with the mirror's list (which also takes them off it) or, in an
upsert, without one. A sync with ``consent = "none"`` imports plain profiles and
subscribes nobody.

Erasure (``syncd forget``, :meth:`KlaviyoDestination.forget`) uses the same endpoint
("Request Profile Deletion", operationId ``request_profile_deletion``): one request by
email and one by phone number, else one per Klaviyo profile id syncd was given.

Payload conventions (the mapping's destination field names)
-----------------------------------------------------------

Profiles (``upsert``, ``add``, and the profile part of ``event``) use Klaviyo's own
attribute names:

* identity: ``email``, ``phone_number`` (E.164, ``+14155550123``), ``external_id`` — at
  least one is required; an email must be a valid address and is sent trimmed and
  lower-cased;
* ``first_name``, ``last_name``, ``organization``, ``locale``, ``title``, ``image``;
* ``location.address1``, ``location.address2``, ``location.city``, ``location.country``,
  ``location.region``, ``location.zip``, ``location.timezone``, ``location.ip``,
  ``location.latitude``, ``location.longitude``;
* custom properties: ``properties.<name>`` (any JSON value).

A null custom property is removed from the profile (``meta.patch_properties.unset`` of the
import). A null standard attribute is left out of the request, so Klaviyo keeps what it
has: the bulk import cannot clear one (Klaviyo's "Bulk Import Profiles API" guide). A field name not
in the list above is refused by :meth:`KlaviyoDestination.check` with a reason naming it,
since Klaviyo would otherwise reject the whole job.

Events (``event`` mode) take the profile fields above to identify (and update) the
person, plus:

* ``properties.<name>`` — the event's properties (not the profile's);
* ``value`` (number), ``value_currency`` (ISO 4217), ``time`` (ISO 8601; Klaviyo uses the
  time of receipt when absent).

The metric (event) name is the sync's ``object`` and is required; ``unique_id`` is the
engine's ``Item.event_id``.

Mirror mode: the sync's ``object`` is the Klaviyo list id (required).

Delete mode: the row is identified by ``email``, else ``phone_number``, else ``id`` (a
Klaviyo profile id); Klaviyo accepts exactly one of them per request and deletes every
profile that matches.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from typing import Any, ClassVar, Final

import orjson
import structlog
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from syncd.destinations.base import (
    BatchRejected,
    Destination,
    Handler,
    Item,
    Op,
    Outcome,
    Person,
    Receipt,
    SyncTarget,
    byte_chunks,
    next_link_pages,
)
from syncd.http import ApiError, ServiceClient, ServiceLimits
from syncd.identity import e164, identifier_text, normalize_email

__all__ = ["KlaviyoDestination", "KlaviyoOptions"]

log = structlog.get_logger("syncd.destinations.klaviyo")

# The API revision this adapter speaks; Klaviyo requires the header on every request and
# keeps each revision's shapes stable for two years (developers.klaviyo.com, "API versioning
# and deprecation policy").
REVISION: Final = "2026-07-15"
JSON_API: Final = "application/vnd.api+json"

# Limits from the 2026-07-15 OpenAPI spec (klaviyo/openapi openapi/stable.json, operation
# descriptions):
# bulk_import_profiles: "Accepts up to 10,000 profiles per request. The maximum allowed
# payload size is 5MB. The maximum allowed payload size per-profile is 100KB."
MAX_IMPORT_PROFILES: Final = 10_000
# "MB"/"KB" are read as the smaller decimal units so a body at the edge is never refused.
MAX_IMPORT_BYTES: Final = 5_000_000
MAX_PROFILE_BYTES: Final = 100_000
# add_profiles_to_list / remove_profiles_from_list: "a maximum of 1000 profiles per call".
MAX_LIST_PROFILES: Final = 1_000
# bulk_create_events: "Accepts up to 1,000 events per request. The maximum allowed payload
# size is 5MB."
MAX_BULK_EVENTS: Final = 1_000
MAX_EVENTS_BYTES: Final = 5_000_000
# page[size] of the import-errors and job-profiles collections: default 20, maximum 100.
PAGE_SIZE: Final = 100

# Rate limits, per endpoint, from the spec's x-klaviyo-ratelimit (also in each operation's
# description; tiers explained at developers.klaviyo.com/en/docs/rate_limits_and_error_handling).
# Klaviyo counts each endpoint's burst (per second) and steady (per minute) windows
# separately, so each class below gets its own ServiceClient paced at its steady rate:
# the burst allowance is higher, but a sync that keeps sending would only run into the
# steady window and then sit out its reset.
# Bulk profile import jobs, their polling, import-errors and job profiles: 10/s, 150/m.
IMPORT_LIMITS: Final = ServiceLimits(requests_per_second=150 / 60)
# List relationships (add/remove profiles): 10/s, 150/m.
LIST_LIMITS: Final = ServiceLimits(requests_per_second=150 / 60)
# Bulk event create jobs: 10/s, 150/m (single POST /api/events would be 350/s, 3500/m, but
# at 1 event a request that is 3,500 events a minute against 150,000 in bulk).
EVENT_LIMITS: Final = ServiceLimits(requests_per_second=150 / 60)
# Data privacy deletion jobs: 3/s, 60/m.
DELETION_LIMITS: Final = ServiceLimits(requests_per_second=60 / 60)
# bulk_subscribe_profiles and bulk_unsubscribe_profiles: 75/s, 750/m.
SUBSCRIPTION_LIMITS: Final = ServiceLimits(requests_per_second=750 / 60)
# bulk_subscribe_profiles: "Maximum number of profiles can be submitted for subscription:
# 1000"; bulk_unsubscribe_profiles: "Maximum number of profiles per call: 100".
MAX_SUBSCRIBE_PROFILES: Final = 1_000
MAX_UNSUBSCRIBE_PROFILES: Final = 100
# The channels a Klaviyo subscription exists for, with the identity each needs.
SUBSCRIPTION_IDENTITY: Final = {"email": "email", "sms": "phone_number"}

IDENTITY_FIELDS: Final = ("email", "phone_number", "external_id")
# Profile attributes of the bulk import (ProfileImportJobCreateQuery) and of the event
# bulk create profile; `_kx` and `anonymous_id` are browser-tracking ids, not mapped data.
PROFILE_FIELDS: Final = frozenset(
    {
        *IDENTITY_FIELDS,
        "first_name",
        "last_name",
        "organization",
        "locale",
        "title",
        "image",
        "location",
        "properties",
    }
)
LOCATION_FIELDS: Final = frozenset(
    {
        "address1",
        "address2",
        "city",
        "country",
        "latitude",
        "longitude",
        "region",
        "zip",
        "timezone",
        "ip",
    }
)
# Event attributes next to `properties` (EventsBulkCreateJob ... events.data[].attributes).
EVENT_FIELDS: Final = frozenset({"value", "value_currency", "time"})
DELETE_FIELDS: Final = frozenset({"email", "phone_number", "id"})

# Bulk import job statuses (ProfileImportJobResponseObjectResource.status): queued,
# processing, complete, cancelled. Anything but the last two is still running.
_DONE: Final = frozenset({"complete", "cancelled"})
# Sparse fieldset of a job poll: only what deciding and reporting need.
_JOB_FIELDS: Final = "status,total_count,completed_count,failed_count"

# An import error points at its row: "/data/attributes/profiles/data/<n>/..." in the
# submitted document, or "/data/<n>/..." relative to the profiles list.
_POINTER_INDEX: Final = (
    re.compile(r"/profiles/data/(\d+)(?:/|$)"),
    re.compile(r"^/data/(\d+)(?:/|$)"),
)


class KlaviyoOptions(BaseModel):
    """``[options]`` of a Klaviyo mapping."""

    model_config = ConfigDict(extra="forbid")

    # How long one bulk import job may take before the run gives up on it (seconds of
    # waiting between polls). Jobs normally finish in seconds to a few minutes; a timed-out
    # job fails the run and its batch is sent again next time (imports are upserts).
    job_timeout: float = Field(default=1800.0, gt=0)


class KlaviyoDestination(Destination):
    """A Klaviyo account, reached with a private API key."""

    type: ClassVar[str] = "klaviyo"
    modes: ClassVar[frozenset[str]] = frozenset({"upsert", "mirror", "event", "delete"})
    max_batch: ClassVar[Mapping[str, int]] = {
        "upsert": MAX_IMPORT_PROFILES,
        "add": MAX_IMPORT_PROFILES,
        "remove": MAX_LIST_PROFILES,
        "event": MAX_BULK_EVENTS,
        # One deletion job per profile: the endpoint takes exactly one identifier.
        "delete": 1,
        "unsubscribe": MAX_UNSUBSCRIBE_PROFILES,
    }
    credential_names: ClassVar[tuple[str, ...]] = ("api_key",)
    default_limits: ClassVar[ServiceLimits] = IMPORT_LIMITS
    # (Annotated in the base class: `type` here would name the class attribute above.)
    Options = KlaviyoOptions
    # Mirror mode needs the list id, event mode the metric name.
    object_required: ClassVar[frozenset[str]] = frozenset({"mirror", "event"})
    consent_channel: ClassVar[str] = "email"

    def setup(self) -> None:
        options = self.options
        self.job_timeout = (
            options.job_timeout
            if isinstance(options, KlaviyoOptions)
            else KlaviyoOptions().job_timeout
        )
        # self.client (built with default_limits) serves import jobs; each other endpoint
        # family gets its own documented pace. A mapping's [limits] replaces them all.
        self.lists_client = self.make_client("lists", LIST_LIMITS)
        self.events_client = self.make_client("events", EVENT_LIMITS)
        self.deletion_client = self.make_client("deletion", DELETION_LIMITS)
        self.subscriptions_client = self.make_client("subscriptions", SUBSCRIPTION_LIMITS)

    # -- set-up -----------------------------------------------------------------------------

    @classmethod
    def default_base_url(cls, credentials: Mapping[str, SecretStr]) -> str:
        return "https://a.klaviyo.com"

    @classmethod
    def headers(cls, credentials: Mapping[str, SecretStr]) -> dict[str, str]:
        key = credentials["api_key"].get_secret_value().strip()
        return {
            "Authorization": f"Klaviyo-API-Key {key}",
            "revision": REVISION,
            "Accept": JSON_API,
        }

    @classmethod
    def check_credentials(cls, credentials: Mapping[str, SecretStr]) -> str | None:
        key = credentials["api_key"].get_secret_value().strip()
        # Server-side /api endpoints take only private keys, which "have the prefix pk_"; the
        # 6-character public key (site id) is for client-side tracking and cannot read or
        # write profiles (developers.klaviyo.com/en/docs/retrieve_api_credentials).
        if not key.startswith("pk_"):
            return (
                "api_key must be a Klaviyo private API key (it starts with pk_); "
                "the 6-character public key / site id does not work with the /api endpoints"
            )
        return None

    # -- validation -------------------------------------------------------------------------

    def check(self, target: SyncTarget, op: Op, payload: Mapping[str, Any]) -> str | None:
        if op in ("remove", "unsubscribe"):
            # Removal works from the profile id stored on add; there is no payload.
            return None
        if op == "delete":
            return _delete_reason(payload)
        allowed = PROFILE_FIELDS | EVENT_FIELDS if op == "event" else PROFILE_FIELDS
        unknown = sorted(set(payload) - allowed)
        if unknown:
            hint = "event" if op == "event" else "custom profile"
            return (
                f"unknown Klaviyo field {unknown[0]!r}; {hint} properties go under "
                f"properties.{unknown[0]}"
            )
        for name in ("properties", "location"):
            value = payload.get(name)
            if value is not None and not isinstance(value, dict):
                return f"{name} must be an object of fields, got {type(value).__name__}"
        location = payload.get("location") or {}
        unknown = sorted(set(location) - LOCATION_FIELDS)
        if unknown:
            return f"unknown Klaviyo location field 'location.{unknown[0]}'"
        if op == "event" and "value" in payload:
            value = payload["value"]
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                return f"event value must be a number, got {value!r}"
        if op in ("upsert", "add") and (reason := _subscription_reason(target, payload)):
            return reason
        return _identity_reason(payload)

    # -- sending ----------------------------------------------------------------------------

    def handlers(self) -> Mapping[Op, Handler]:
        return {
            "upsert": self._upsert,
            "add": self._add,
            "remove": self._remove,
            "event": self._events,
            "delete": self._delete_each,
            "unsubscribe": self._unsubscribe,
        }

    def is_content_refusal(self, exc: ApiError) -> bool:
        # A 400 that blames the request's relationships (an unknown list id) is the sync's
        # configuration, the same for every row: splitting the batch cannot help.
        return super().is_content_refusal(exc) and not _points_at_relationships(exc.body)

    async def _upsert(self, target: SyncTarget, items: Sequence[Item]) -> list[Outcome]:
        outcomes = await self._import(target, "upsert", items, list_id=None)
        await self._subscribe(target, items, outcomes, list_id=None)
        return outcomes

    async def _add(self, target: SyncTarget, items: Sequence[Item]) -> list[Outcome]:
        list_id = _require_object(target, "add")
        outcomes = await self._import(target, "add", items, list_id=list_id)
        await self._subscribe(target, items, outcomes, list_id=list_id)
        return outcomes

    # -- consent: subscriptions -------------------------------------------------------------

    async def _subscribe(
        self,
        target: SyncTarget,
        items: Sequence[Item],
        outcomes: list[Outcome],
        *,
        list_id: str | None,
    ) -> None:
        """Subscribe the imported rows sent for the first time on the sync's channel (see
        the module's "Consent"); a refused subscription refuses its row, so it is tried
        again with the row."""
        channel = target.consent
        if channel not in SUBSCRIPTION_IDENTITY:
            return
        rows = [
            (index, _subscription_profile(channel, item.payload, "SUBSCRIBED"))
            for index, item in enumerate(items)
            if outcomes[index].ok and not item.held
        ]
        for start in range(0, len(rows), MAX_SUBSCRIBE_PROFILES):
            chunk = rows[start : start + MAX_SUBSCRIBE_PROFILES]
            body = _subscription_body(
                "profile-subscription-bulk-create-job", [p for _, p in chunk], list_id
            )
            try:
                await self._post(
                    self.subscriptions_client, "/api/profile-subscription-bulk-create-jobs", body
                )
            except BatchRejected as exc:
                for index, _ in chunk:
                    outcomes[index] = Outcome.rejected(f"subscribing failed: {exc.message}")

    async def _unsubscribe(self, target: SyncTarget, items: Sequence[Item]) -> list[Outcome]:
        """Unsubscribe people who withdrew (upsert mode: from the channel, no list)."""
        return await self._unsubscribe_from(target, items, list_id=None)

    async def _unsubscribe_from(
        self, target: SyncTarget, items: Sequence[Item], *, list_id: str | None
    ) -> list[Outcome]:
        channel = target.consent
        if channel not in SUBSCRIPTION_IDENTITY:
            return [Outcome.accepted(dest_id=item.dest_id) for item in items]
        outcomes: list[Outcome] = []
        profiles: list[dict[str, Any]] = []
        for item in items:
            reason = _subscription_reason(target, item.payload)
            if reason:
                outcomes.append(Outcome.rejected(f"cannot unsubscribe: {reason}"))
                continue
            outcomes.append(Outcome.accepted(dest_id=item.dest_id))
            profiles.append(_subscription_profile(channel, item.payload, "UNSUBSCRIBED"))
        for start in range(0, len(profiles), MAX_UNSUBSCRIBE_PROFILES):
            body = _subscription_body(
                "profile-subscription-bulk-delete-job",
                profiles[start : start + MAX_UNSUBSCRIBE_PROFILES],
                list_id,
            )
            await self._post(
                self.subscriptions_client, "/api/profile-subscription-bulk-delete-jobs", body
            )
        return outcomes

    async def _delete_each(self, target: SyncTarget, items: Sequence[Item]) -> list[Outcome]:
        return [await self._delete(target, item) for item in items]

    # -- profiles: bulk import jobs ---------------------------------------------------------

    async def _import(
        self, target: SyncTarget, op: Op, items: Sequence[Item], *, list_id: str | None
    ) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(items)
        rows: list[tuple[int, bytes]] = []  # (index in items, serialized profile resource)
        for index, item in enumerate(items):
            reason = self.check(target, op, item.payload)
            if reason:
                outcomes[index] = Outcome.rejected(reason)
                continue
            raw = orjson.dumps(_profile_resource(item.payload))
            if len(raw) > MAX_PROFILE_BYTES:
                outcomes[index] = Outcome.rejected(
                    f"profile is {len(raw):,} bytes; Klaviyo accepts at most 100 KB per profile"
                )
                continue
            rows.append((index, raw))

        envelope = len(_import_body([], list_id))
        for chunk in byte_chunks(rows, envelope, MAX_IMPORT_BYTES, MAX_IMPORT_PROFILES):
            results = await self._run_import_job(chunk, items, list_id)
            for index, outcome in results.items():
                outcomes[index] = outcome
        return [o if o is not None else Outcome.accepted() for o in outcomes]

    async def _run_import_job(
        self, chunk: list[tuple[int, bytes]], items: Sequence[Item], list_id: str | None
    ) -> dict[int, Outcome]:
        """Submit one import job, wait for it, and say what happened to each of its rows."""
        body = _import_body([raw for _, raw in chunk], list_id)
        document = await self._post(self.client, "/api/profile-bulk-import-jobs", body)
        job = _data(document)
        job_id = str(job["id"])
        attributes = await self._wait_for_job(job_id, job.get("attributes") or {})

        errors: dict[int, list[str]] = {}
        failed = attributes.get("failed_count")
        if failed is None or failed > 0 or attributes.get("status") == "cancelled":
            errors = await self._import_errors(job_id, [items[i].payload for i, _ in chunk])

        results: dict[int, Outcome] = {}
        for position, (index, _) in enumerate(chunk):
            if position in errors:
                results[index] = Outcome.rejected("; ".join(errors[position]))
            elif attributes.get("status") == "cancelled":
                results[index] = Outcome.rejected(f"Klaviyo cancelled bulk import job {job_id}")
        if list_id is None:
            return results

        # Mirror: learn each imported row's profile id; removal needs it.
        pending = [(pos, index) for pos, (index, _) in enumerate(chunk) if index not in results]
        if pending:
            ids = await self._job_profile_ids(job_id, [items[i].payload for _, i in pending])
            for position, (_, index) in enumerate(pending):
                profile_id = ids.get(position)
                results[index] = (
                    Outcome.accepted(dest_id=profile_id)
                    if profile_id
                    else Outcome.rejected(
                        f"bulk import job {job_id} completed but Klaviyo did not list this "
                        "profile among the job's profiles, so its id (needed to take it off "
                        "the list later) is unknown"
                    )
                )
        return results

    async def _wait_for_job(self, job_id: str, attributes: Mapping[str, Any]) -> Mapping[str, Any]:
        """Poll the job until Klaviyo says it is complete or cancelled."""
        path = f"/api/profile-bulk-import-jobs/{job_id}"

        async def fetch() -> Mapping[str, Any]:
            document, _ = await self.client.get_json(
                path, params={"fields[profile-bulk-import-job]": _JOB_FIELDS}
            )
            attributes: Mapping[str, Any] = _data(document).get("attributes") or {}
            return attributes

        return await self.poll_job(
            fetch,
            lambda job: job.get("status") in _DONE,
            first=attributes,
            timeout=self.job_timeout,
            what=f"bulk import job {job_id}",
            state=lambda job: repr(job.get("status")),
            url=path,
            setting="job_timeout",
        )

    async def _import_errors(
        self, job_id: str, payloads: Sequence[Mapping[str, Any]]
    ) -> dict[int, list[str]]:
        """The job's import errors, by position in the submitted profile list."""
        by_identity = _identity_index(payloads)
        errors: dict[int, list[str]] = {}
        unplaced: list[str] = []
        params: Any = {"page[size]": PAGE_SIZE}
        path = f"/api/profile-bulk-import-jobs/{job_id}/import-errors"
        async for entry in self._pages(path, params):
            attrs = entry.get("attributes") or {}
            message = _error_text(attrs)
            position = _pointer_position(attrs.get("source"), len(payloads))
            if position is None:
                position = _match(by_identity, _original_attributes(attrs.get("original_payload")))
            if position is None:
                unplaced.append(message)
            else:
                errors.setdefault(position, []).append(message)
        if unplaced:
            # Not attributable to a row: the rows stay accepted, the operator sees why.
            log.warning(
                "klaviyo.import_errors_unplaced",
                job_id=job_id,
                count=len(unplaced),
                first=unplaced[0],
            )
        return errors

    async def _job_profile_ids(
        self, job_id: str, payloads: Sequence[Mapping[str, Any]]
    ) -> dict[int, str]:
        """Profile id per position in ``payloads``, matched by identity (email first)."""
        by_identity = _identity_index(payloads)
        ids: dict[int, str] = {}
        params: Any = {"fields[profile]": "email,phone_number,external_id", "page[size]": PAGE_SIZE}
        path = f"/api/profile-bulk-import-jobs/{job_id}/profiles"
        async for profile in self._pages(path, params):
            profile_id = profile.get("id")
            if not profile_id:
                continue
            for key in _identity_keys(profile.get("attributes") or {}):
                for position in by_identity.get(key, ()):
                    ids.setdefault(position, str(profile_id))
        return ids

    # -- list membership --------------------------------------------------------------------

    async def _remove(self, target: SyncTarget, items: Sequence[Item]) -> list[Outcome]:
        list_id = _require_object(target, "remove")
        # Who withdrew is unsubscribed with the list, which also takes them off it
        # (bulk_unsubscribe_profiles: "All profiles will be removed from the provided list").
        withdrawn = [i for i, item in enumerate(items) if item.withdrawn]
        by_index: dict[int, Outcome] = {}
        if withdrawn and target.consent in SUBSCRIPTION_IDENTITY:
            done = await self._unsubscribe_from(
                target, [items[i] for i in withdrawn], list_id=list_id
            )
            by_index = dict(zip(withdrawn, done, strict=True))
        outcomes: list[Outcome] = []
        ids: list[str] = []
        for index, item in enumerate(items):
            if index in by_index and by_index[index].ok:
                outcomes.append(by_index[index])
                continue
            if item.dest_id:
                outcomes.append(Outcome.accepted(dest_id=item.dest_id))
                if item.dest_id not in ids:
                    ids.append(item.dest_id)
            else:
                outcomes.append(
                    Outcome.rejected(
                        "no Klaviyo profile id recorded for this record; Klaviyo removes list "
                        "members by profile id only (syncd stores it when it adds the profile)"
                    )
                )
        if ids:
            body = {"data": [{"type": "profile", "id": profile_id} for profile_id in ids]}
            await self._post(
                self.lists_client,
                f"/api/lists/{list_id}/relationships/profiles",
                orjson.dumps(body),
                method="DELETE",
            )
        return outcomes

    # -- events -----------------------------------------------------------------------------

    async def _events(self, target: SyncTarget, items: Sequence[Item]) -> list[Outcome]:
        metric = _require_object(target, "event")
        outcomes: list[Outcome | None] = [None] * len(items)
        rows: list[tuple[int, bytes]] = []
        for index, item in enumerate(items):
            reason = self.check(target, "event", item.payload)
            if reason is None and not item.event_id:
                reason = (
                    "no event id: Klaviyo's unique_id is what keeps a re-send from "
                    "re-triggering flows"
                )
            if reason:
                outcomes[index] = Outcome.rejected(reason)
                continue
            assert item.event_id is not None
            raw = orjson.dumps(_event_entry(item.payload, metric, item.event_id))
            if len(raw) > MAX_EVENTS_BYTES - len(_events_body([])):
                outcomes[index] = Outcome.rejected(
                    f"event is {len(raw):,} bytes; Klaviyo accepts at most 5 MB per request"
                )
                continue
            rows.append((index, raw))
        envelope = len(_events_body([]))
        for chunk in byte_chunks(rows, envelope, MAX_EVENTS_BYTES, MAX_BULK_EVENTS):
            # 202 without a body: Klaviyo validated the whole request and queued every event.
            await self._post(
                self.events_client,
                "/api/event-bulk-create-jobs",
                _events_body([r for _, r in chunk]),
            )
        return [o if o is not None else Outcome.accepted() for o in outcomes]

    # -- deletion ---------------------------------------------------------------------------

    async def _delete(self, target: SyncTarget, item: Item) -> Outcome:
        payload = dict(item.payload)
        if not payload.get("id") and item.dest_id:
            payload["id"] = item.dest_id
        reason = self.check(target, "delete", payload)
        if reason:
            return Outcome.rejected(reason)
        profile: dict[str, Any]
        email = normalize_email(payload.get("email"))
        phone = identifier_text(payload.get("phone_number"))
        if email:
            profile = {"type": "profile", "attributes": {"email": email}}
        elif phone:
            profile = {"type": "profile", "attributes": {"phone_number": phone}}
        else:
            profile = {
                "type": "profile",
                "id": identifier_text(payload.get("id")),
                "attributes": {},
            }
        body = {
            "data": {
                "type": "data-privacy-deletion-job",
                "attributes": {"profile": {"data": profile}},
            }
        }
        await self._post(
            self.deletion_client, "/api/data-privacy-deletion-jobs", orjson.dumps(body)
        )
        return Outcome.accepted()

    async def forget(
        self, person: Person, targets: Sequence[SyncTarget], fields: Collection[str]
    ) -> Receipt:
        # request_profile_deletion takes exactly one of email, phone_number or id and
        # deletes every profile matching it, asynchronously; it answers 202 without a
        # body, so there is no job id to keep (klaviyo/openapi stable.json,
        # operationId request_profile_deletion). Its own pace: 3/s burst, 60/m steady
        # (DELETION_LIMITS, deletion_client). A profile known by phone only (an SMS
        # sign-up) is not matched by the email: both are asked for.
        asked: list[tuple[str, dict[str, Any]]] = []  # (what it is, the profile reference)
        if person.email:
            asked.append(("email", {"attributes": {"email": person.email}}))
        if person.phone:
            asked.append(("phone number", {"attributes": {"phone_number": person.phone}}))
        if not asked:
            asked = [
                (f"profile id {profile_id}", {"id": profile_id, "attributes": {}})
                for profile_id in sorted(set(person.dest_ids.values()))
            ]
        if not asked:
            return Receipt.not_applicable(
                "no email, phone number or Klaviyo profile id known for this person"
            )
        for _, profile in asked:
            body = {
                "data": {
                    "type": "data-privacy-deletion-job",
                    "attributes": {"profile": {"data": {"type": "profile", **profile}}},
                }
            }
            await self._post(
                self.deletion_client, "/api/data-privacy-deletion-jobs", orjson.dumps(body)
            )
        by = [label for label, _ in asked]
        return Receipt.done(
            f"profile deletion requested by {', '.join(by)} (202 Accepted); Klaviyo deletes "
            "every matching profile and lists it under Deleted Profiles"
        )

    # -- HTTP helpers -----------------------------------------------------------------------

    async def _post(
        self, client: ServiceClient, path: str, body: bytes, *, method: str = "POST"
    ) -> Any:
        """Send a JSON:API body; a content refusal of the whole request is BatchRejected."""
        response = await self.call(
            method, path, client=client, content=body, headers={"Content-Type": JSON_API}
        )
        if not response.content:
            return None
        try:
            return orjson.loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise ApiError(
                client.service,
                response.status_code,
                method,
                str(response.request.url),
                f"expected a JSON:API document, got {response.text[:200]!r}",
            ) from exc

    def _pages(self, path: str, params: Any) -> AsyncIterator[dict[str, Any]]:
        """Every resource of a JSON:API collection, following ``links.next``."""
        return next_link_pages(
            self.client,
            path,
            params,
            items=lambda document: [
                r for r in (document or {}).get("data") or [] if isinstance(r, dict)
            ],
            next_link=lambda document: ((document or {}).get("links") or {}).get("next"),
        )


# -- payload building ---------------------------------------------------------------------


def _require_object(target: SyncTarget, op: Op) -> str:
    if not target.object:
        what = "metric (event) name" if op == "event" else "list id"
        raise ValueError(f"klaviyo sync {target.name!r}: object (the {what}) is required")
    return target.object


def _identity_reason(payload: Mapping[str, Any]) -> str | None:
    email, phone, external = (payload.get(name) for name in IDENTITY_FIELDS)
    if identifier_text(email) is not None and normalize_email(email) is None:
        return f"invalid email address {email!r}"
    if identifier_text(phone) is not None and e164(phone) is None:
        return f"phone_number {phone!r} is not a valid E.164 number (+ and country code)"
    if (
        identifier_text(email) is None
        and identifier_text(phone) is None
        and identifier_text(external) is None
    ):
        return "no email, phone_number or external_id to identify the Klaviyo profile"
    return None


def _subscription_reason(target: SyncTarget, payload: Mapping[str, Any]) -> str | None:
    """Why a row of a consent sync cannot be (un)subscribed: its channel's identity."""
    field = SUBSCRIPTION_IDENTITY.get(target.consent)
    if field is None:
        return None
    value = payload.get(field)
    valid = normalize_email(value) if field == "email" else e164(identifier_text(value))
    if not valid:
        return f"no valid {field} to subscribe on the {target.consent} channel"
    return None


def _subscription_profile(channel: str, payload: Mapping[str, Any], consent: str) -> dict[str, Any]:
    """One profile of a (un)subscribe job: its channel's identity and ``marketing`` consent
    (SubscriptionChannels / UnsubscriptionChannels of the spec)."""
    field = SUBSCRIPTION_IDENTITY[channel]
    value = payload.get(field)
    identity = normalize_email(value) if field == "email" else identifier_text(value)
    return {
        "type": "profile",
        "attributes": {
            field: identity,
            "subscriptions": {channel: {"marketing": {"consent": consent}}},
        },
    }


def _subscription_body(kind: str, profiles: Sequence[dict[str, Any]], list_id: str | None) -> bytes:
    data: dict[str, Any] = {"type": kind, "attributes": {"profiles": {"data": list(profiles)}}}
    if kind.endswith("create-job"):
        # Shown on the consent record in Klaviyo: where the subscription came from.
        data["attributes"]["custom_source"] = "syncd (WooCommerce consent)"
    if list_id is not None:
        data["relationships"] = {"list": {"data": {"type": "list", "id": list_id}}}
    return orjson.dumps({"data": data})


def _delete_reason(payload: Mapping[str, Any]) -> str | None:
    email, phone = payload.get("email"), payload.get("phone_number")
    if identifier_text(email) is not None:
        return None if normalize_email(email) else f"invalid email address {email!r}"
    if identifier_text(phone) is not None:
        return None if e164(phone) else f"phone_number {phone!r} is not a valid E.164 number"
    if identifier_text(payload.get("id")) is not None:
        return None
    return "no email, phone_number or Klaviyo profile id to delete by"


def _prune(value: Any) -> Any:
    """The value without null members (the bulk import cannot clear a field anyway)."""
    if isinstance(value, dict):
        pruned = {k: _prune(v) for k, v in value.items() if v is not None}
        # A group left empty ("location": {}) says nothing either.
        return {k: v for k, v in pruned.items() if v != {}}
    return value


def _profile_attributes(payload: Mapping[str, Any]) -> dict[str, Any]:
    attributes: dict[str, Any] = _prune({k: v for k, v in payload.items() if k in PROFILE_FIELDS})
    email = normalize_email(attributes.get("email"))
    if email:
        # Klaviyo matches emails case-insensitively; one spelling keeps the id mapping simple.
        attributes["email"] = email
    for name in ("phone_number", "external_id"):
        if name in attributes:
            text = identifier_text(attributes[name])
            if text is None:
                del attributes[name]
            else:
                attributes[name] = text
    return attributes


def _profile_resource(payload: Mapping[str, Any]) -> dict[str, Any]:
    """One profile of a bulk import job; null custom properties are unset."""
    resource: dict[str, Any] = {"type": "profile", "attributes": _profile_attributes(payload)}
    properties = payload.get("properties") or {}
    unset = sorted(name for name, value in properties.items() if value is None)
    if unset:
        resource["meta"] = {"patch_properties": {"unset": unset}}
    return resource


def _import_body(profiles: Sequence[bytes], list_id: str | None) -> bytes:
    data: dict[str, Any] = {
        "type": "profile-bulk-import-job",
        "attributes": {"profiles": {"data": [orjson.Fragment(raw) for raw in profiles]}},
    }
    if list_id is not None:
        data["relationships"] = {"lists": {"data": [{"type": "list", "id": list_id}]}}
    return orjson.dumps({"data": data})


def _event_entry(payload: Mapping[str, Any], metric: str, event_id: str) -> dict[str, Any]:
    profile = {k: v for k, v in payload.items() if k in PROFILE_FIELDS and k != "properties"}
    event: dict[str, Any] = {
        # properties is required by the schema, even when empty.
        "properties": _prune(payload.get("properties") or {}),
        "metric": {"data": {"type": "metric", "attributes": {"name": metric}}},
        "unique_id": event_id,
    }
    for name in ("time", "value", "value_currency"):
        if payload.get(name) is not None:
            event[name] = payload[name]
    return {
        "type": "event-bulk-create",
        "attributes": {
            "profile": {"data": {"type": "profile", "attributes": _profile_attributes(profile)}},
            "events": {"data": [{"type": "event", "attributes": event}]},
        },
    }


def _events_body(entries: Sequence[bytes]) -> bytes:
    return orjson.dumps(
        {
            "data": {
                "type": "event-bulk-create-job",
                "attributes": {
                    "events-bulk-create": {"data": [orjson.Fragment(raw) for raw in entries]}
                },
            }
        }
    )


# -- reading results ----------------------------------------------------------------------


def _data(document: Any) -> dict[str, Any]:
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, dict):
        raise ValueError(f"klaviyo: expected a JSON:API resource document, got {document!r:.200}")
    return data


def _identity_keys(attributes: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The identities a profile can be recognised by, strongest first."""
    keys: list[tuple[str, str]] = []
    email = normalize_email(attributes.get("email"))
    if email:
        keys.append(("email", email))
    external = identifier_text(attributes.get("external_id"))
    if external:
        keys.append(("external_id", external))
    phone = identifier_text(attributes.get("phone_number"))
    if phone:
        keys.append(("phone_number", e164(phone) or phone))
    return keys


def _identity_index(payloads: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], list[int]]:
    index: dict[tuple[str, str], list[int]] = {}
    for position, payload in enumerate(payloads):
        for key in _identity_keys(payload):
            index.setdefault(key, []).append(position)
    return index


def _match(index: Mapping[tuple[str, str], list[int]], attributes: Mapping[str, Any]) -> int | None:
    for key in _identity_keys(attributes):
        positions = index.get(key)
        if positions:
            return positions[0]
    return None


def _original_attributes(original: Any) -> Mapping[str, Any]:
    """The profile attributes of an import error's ``original_payload`` (either shape)."""
    if not isinstance(original, dict):
        return {}
    attributes = original.get("attributes")
    return attributes if isinstance(attributes, dict) else original


def _pointer_position(source: Any, count: int) -> int | None:
    pointer = source.get("pointer") if isinstance(source, dict) else None
    if not isinstance(pointer, str):
        return None
    for pattern in _POINTER_INDEX:
        found = pattern.search(pointer)
        if found and int(found.group(1)) < count:
            return int(found.group(1))
    return None


def _points_at_relationships(body: Any) -> bool:
    """Whether a 400 blames the request's relationships (an unknown list id): that is the
    sync's configuration, the same for every row, so splitting the batch cannot help."""
    errors = body.get("errors") if isinstance(body, dict) else None
    if not isinstance(errors, list) or not errors:
        return False
    pointers = [
        ((e.get("source") or {}).get("pointer") or "") if isinstance(e, dict) else ""
        for e in errors
    ]
    return all(str(p).startswith("/data/relationships") for p in pointers)


def _error_text(attributes: Mapping[str, Any]) -> str:
    for name in ("detail", "title", "code"):
        value = attributes.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return "rejected by Klaviyo (no detail given)"
