"""Mailchimp Marketing API v3: audience members, tags (static segments), erasure.

Modes: ``upsert`` (batch subscribe with ``update_existing``), ``mirror`` (the same
upsert, then the sync's tag added on entry / removed on exit) and ``delete``
(permanent deletion). ``target.object`` is the audience (list) id, for every mode.

Payload conventions (the mapping's destination field names):

* ``email_address`` (required): the member's address. Sent trimmed and lower-cased;
  the lower-cased address is also the member's identity in syncd (``Outcome.dest_id``)
  and, MD5-hashed, in Mailchimp's URLs (the "subscriber hash").
* ``merge_fields.<TAG>``: audience fields by merge tag, e.g. ``merge_fields.FNAME``,
  ``merge_fields.LNAME``, ``merge_fields.ADDRESS`` (an object). A None value is left
  out, so Mailchimp keeps what it has rather than refusing an empty value.
* optional member fields: ``language``, ``vip``, ``email_type``, ``location.*``
  (``latitude``, ``longitude``), ``interests.<interest id>`` (bool), ``ip_signup``,
  ``timestamp_signup``, ``ip_opt``, ``timestamp_opt``.
* the consent field (``SyncOptions.consent_field``, default ``marketing_consent``): a
  boolean the adapter reads and removes before sending; it decides ``status`` (below).

``status`` and ``tags`` are the adapter's: a mapping cannot set them.

Which status a member is sent with
----------------------------------
``update_existing: true`` is documented as "Whether this batch operation will change
existing members' subscription status" (the official spec's text, reproduced by every
generated SDK, e.g. mailchimp/mailchimp-client-lib-codegen, ballerina-platform/
module-ballerinax-mailchimp.marketing docs/spec/openapi.json, schema
MembersToSubscribeUnsubscribeTofromAListInBatch): a ``status`` in the batch *replaces*
an existing member's status. The batch has no ``status_if_new`` (that is PUT
/members/{hash} only; a batch member carrying one is refused, brandonseydel/
MailChimp.Net#567), while ``status`` itself is optional in the batch member schema
(AddListMembers; POST /members requires it), and a member update without ``status``
leaves the status alone (brandonseydel/MailChimp.Net#80). So, per member:

A sync's ``consent`` (email by default) sends only people whose profile's
``consent_email`` is true: each is sent ``"subscribed"`` the first time
(``Item.held`` false) and without a status afterwards, so an unsubscribe made in
Mailchimp stands. A person who withdraws is set ``"unsubscribed"`` on the next run
(mirror: then untagged; upsert: the ``unsubscribe`` operation). The per-row consent
field below decides only in a sync with ``consent = "none"``.

* consent true -> ``"subscribed"``. This cannot re-subscribe someone who unsubscribed:
  Mailchimp refuses to subscribe an address "in a compliance state due to unsubscribe,
  bounce, or compliance review" through the API ("Member In Compliance State",
  ibericode/mailchimp-for-wordpress#798, aelvan/mailchimp-subscribe-craft#115; the
  batch endpoint ignores it, strangerstudios/pmpro-mailchimp#152), and syncd
  unsubscribes only on a withdrawn consent (a mirror exit only removes the tag).
* consent not true, record never accepted here before (``Item.dest_id`` is None):
  ``"transactional"`` (Mailchimp's non-subscribed contact: order mail, no marketing),
  or the row is skipped with ``without_consent = "skip"``.
* consent not true, record accepted before (``Item.dest_id`` set): no ``status`` at
  all. The member exists (we created or updated it), Mailchimp owns its status from
  then on (the person may have subscribed through a Mailchimp form since), and a
  missing WooCommerce opt-in must never demote them to transactional.

This keeps one request per 500 members. The remaining gap: an address already in the
audience before syncd first sends it, without WooCommerce consent, is sent
``transactional`` once. Closing it needs a member lookup per batch (a GET per member,
or a create-only pass with ``update_existing: false`` whose ``ERROR_CONTACT_EXISTS``
members go again without status): two requests per batch instead of one.

Limits (each cited where it is used): 500 members per batch subscribe, 500 emails per
static-segment add/remove, 10 simultaneous connections per account, no rate-limit
headers (429 when over; ``syncd.http`` retries it).
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any, ClassVar, Final, Literal
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from syncd.destinations.base import (
    Destination,
    Handler,
    Item,
    Op,
    Outcome,
    Person,
    Receipt,
    SyncTarget,
    offset_pages,
)
from syncd.http import ApiError, AuthError, ServiceLimits
from syncd.identity import email_key, hash_hex, normalize_email

__all__ = ["MailchimpDestination", "MailchimpSyncOptions", "subscriber_hash"]

# The documented maximum of every batched call this adapter makes:
# * POST /lists/{list_id} "Up to 500 members may be added or updated with each API
#   call" (members[] of the batch subscribe, official spec text);
# * POST /lists/{list_id}/segments/{segment_id} members_to_add / members_to_remove:
#   "A maximum of 500 members can be sent" (same spec).
MAX_MEMBERS: Final = 500
# GET /lists/{list_id}/segments: "count ... Maximum value is 1000" (spec, query param).
_SEGMENT_PAGE: Final = 1000

# Keys of a batch-subscribe member a mapping may set (AddListMembers in the spec).
_MEMBER_FIELDS: Final = frozenset(
    {
        "email_address",
        "email_type",
        "merge_fields",
        "interests",
        "language",
        "vip",
        "location",
        "ip_signup",
        "timestamp_signup",
        "ip_opt",
        "timestamp_opt",
    }
)
_ADAPTER_FIELDS: Final = frozenset({"status", "status_if_new", "tags"})

# Static-segment removal of an address that is not (or no longer) in the audience or the
# segment: the spec says such emails "will be ignored", but when Mailchimp names them in
# errors[] the member is out of the tag all the same, which is what a removal wants.
_NOT_A_MEMBER: Final = re.compile(
    r"not (?:a )?(?:list |audience )?member|not (?:found|present|in|on|part of|subscribed)"
    r"|does(?: not|n't) (?:exist|belong)|no longer",
    re.IGNORECASE,
)


def subscriber_hash(email: str) -> str:
    """Mailchimp's member id in URLs: the MD5 hex digest of the lower-cased address."""
    return hash_hex("md5", email_key(email))


def datacenter(api_key: str) -> str | None:
    """The datacenter suffix of an API key (``…-us19`` -> ``us19``), or None."""
    _, dash, dc = api_key.strip().rpartition("-")
    return dc if dash and re.fullmatch(r"[A-Za-z0-9]+", dc) else None


class MailchimpSyncOptions(BaseModel):
    """Per-sync options: ``[sync.options]`` of a Mailchimp mapping."""

    model_config = ConfigDict(extra="forbid")

    # The tag a mirror sync maintains (a static segment in the API). Required for mirror.
    tag: str | None = Field(default=None, min_length=1, max_length=100)
    # The payload key holding the customer's marketing consent (a boolean).
    consent_field: str = Field(default="marketing_consent", min_length=1)
    # New members without consent: added as non-subscribed contacts, or not sent at all.
    without_consent: Literal["transactional", "skip"] = "transactional"


class MailchimpDestination(Destination):
    type: ClassVar[str] = "mailchimp"
    modes: ClassVar[frozenset[str]] = frozenset({"upsert", "mirror", "delete"})
    max_batch: ClassVar[Mapping[str, int]] = {
        "upsert": MAX_MEMBERS,
        # add = one batch subscribe + one segment add, both capped at 500.
        "add": MAX_MEMBERS,
        "remove": MAX_MEMBERS,
        # POST …/members/{hash}/actions/delete-permanent takes one member per call.
        "delete": 1,
        # The same batch subscribe, with status "unsubscribed".
        "unsubscribe": MAX_MEMBERS,
    }
    consent_channel: ClassVar[str] = "email"
    credential_names: ClassVar[tuple[str, ...]] = ("api_key",)
    # "each user account is permitted up to 10 simultaneous connections" and no
    # request-rate limit (Mailchimp Marketing API fundamentals, "Throttling"). 5 leaves
    # room for the account's other integrations (Mailchimp for WooCommerce itself, usually).
    # A 500-member batch subscribe can take tens of seconds, hence the longer per-attempt
    # timeout.
    default_limits: ClassVar[ServiceLimits] = ServiceLimits(
        requests_per_second=None, concurrency=5, timeout=120.0
    )
    SyncOptions: ClassVar[builtins.type[BaseModel]] = MailchimpSyncOptions
    object_required: ClassVar[frozenset[str]] = frozenset({"upsert", "mirror", "delete"})

    def setup(self) -> None:
        # sync name -> the static segment id of its tag, resolved by prepare().
        self._segments: dict[str, int] = {}

    # -- set-up ---------------------------------------------------------------------------

    @classmethod
    def default_base_url(cls, credentials: Mapping[str, SecretStr]) -> str:
        # The API host is the key's datacenter: https://<dc>.api.mailchimp.com/3.0
        # (the SDK does the same: mailchimp-marketing-python api_client.py
        # get_server_from_api_key).
        key = credentials.get("api_key")
        dc = datacenter(key.get_secret_value()) if key is not None else None
        return f"https://{dc or 'invalid-datacenter'}.api.mailchimp.com/3.0"

    @classmethod
    def auth(cls, credentials: Mapping[str, SecretStr]) -> httpx.Auth | None:
        # HTTP Basic with any user name and the key as password; the official SDK sends
        # ("user", api_key) (mailchimp-marketing-python api_client.py, request()).
        key = credentials.get("api_key")
        return httpx.BasicAuth("syncd", key.get_secret_value()) if key is not None else None

    @classmethod
    def check_credentials(cls, credentials: Mapping[str, SecretStr]) -> str | None:
        key = credentials.get("api_key")
        if key is None or not key.get_secret_value().strip():
            return "api_key is empty"
        if datacenter(key.get_secret_value()) is None:
            return (
                "api_key has no datacenter suffix: a Mailchimp key ends in '-<dc>', "
                "e.g. '…-us19', which names the API host"
            )
        return None

    @classmethod
    def target_problem(cls, mode: str, options: BaseModel) -> str | None:
        """A reason a sync's mode and options cannot work together, for validation time
        (mapping load); :meth:`prepare` checks the same before the first batch."""
        if mode == "mirror" and not getattr(options, "tag", None):
            return "a mirror sync needs options.tag: the Mailchimp tag to maintain"
        return None

    def check(self, target: SyncTarget, op: Op, payload: Mapping[str, Any]) -> str | None:
        if op == "remove":
            return None  # identified by the dest_id returned on add; payload is empty
        if normalize_email(payload.get("email_address")) is None:
            value = payload.get("email_address")
            return "no email_address" if value in (None, "") else "invalid email_address"
        if op == "delete":
            return None
        options = self._options(target)
        unknown = sorted(set(payload) - _MEMBER_FIELDS - {options.consent_field})
        if unknown:
            owned = [key for key in unknown if key in _ADAPTER_FIELDS]
            if owned:
                return f"{', '.join(owned)} is set by the adapter, not by a mapping"
            return f"not a Mailchimp member field: {', '.join(unknown)}"
        if (
            target.consent == "none"
            and payload.get(options.consent_field) is not True
            and options.without_consent == "skip"
        ):
            return "no marketing consent"
        return None

    async def prepare(self, target: SyncTarget) -> None:
        list_id = self._list_id(target)
        if target.mode != "mirror":
            return
        problem = self.target_problem(target.mode, target.options)
        if problem:
            raise ValueError(f"sync {target.name}: {problem}")
        tag = self._options(target).tag
        assert tag is not None
        self._segments[target.name] = await self._tag_segment(list_id, tag)

    async def _tag_segment(self, list_id: str, tag: str) -> int:
        """The static segment id of a tag, created when the audience has none.

        A tag is a static segment in the API ("Tags are static segments", Mailchimp
        Marketing API docs, List segments), so the segments listing filtered on
        ``type=static`` sees every tag, paged by count/offset.
        """
        path = f"/lists/{_path(list_id)}/segments"
        folded: int | None = None
        segments = offset_pages(
            self.client,
            path,
            {
                "type": "static",
                "count": _SEGMENT_PAGE,
                "fields": "segments.id,segments.name,total_items",
            },
            items=lambda body: (body.get("segments") or []) if isinstance(body, dict) else [],
            total=lambda body: body.get("total_items", 0) if isinstance(body, dict) else 0,
        )
        async for segment in segments:
            name = segment.get("name")
            if name == tag:
                return int(segment["id"])
            # Mailchimp treats tag names case-insensitively in its UI; an exact match
            # wins, a case-folded one is the fallback.
            if isinstance(name, str) and name.casefold() == tag.casefold():
                folded = folded if folded is not None else int(segment["id"])
        if folded is not None:
            return folded
        created, _ = await self.client.request_json(
            "POST", path, json={"name": tag, "static_segment": []}
        )
        return int(created["id"])

    # -- sending --------------------------------------------------------------------------

    def handlers(self) -> Mapping[Op, Handler]:
        return {
            "upsert": self._upsert,
            "add": self._add,
            "remove": self._untag,
            "delete": self._delete_each,
            "unsubscribe": self._unsubscribe,
        }

    def refusal_message(self, exc: ApiError) -> str:
        return _problem_text(exc)

    async def _add(self, target: SyncTarget, items: Sequence[Item]) -> list[Outcome]:
        outcomes = await self._upsert(target, items)
        return await self._tag(target, self._list_id(target), outcomes)

    async def _delete_each(self, target: SyncTarget, items: Sequence[Item]) -> list[Outcome]:
        list_id = self._list_id(target)
        return [await self._delete(list_id, item) for item in items]

    async def _upsert(self, target: SyncTarget, items: Sequence[Item]) -> list[Outcome]:
        list_id = self._list_id(target)
        options = self._options(target)
        members: dict[str, dict[str, Any]] = {}
        emails: list[str | None] = []
        for item in items:
            email = normalize_email(item.payload.get("email_address"))
            emails.append(email)
            if email is not None:
                # The same address twice in one batch is one member: Mailchimp would
                # refuse the repeat as a duplicate. The later record wins; both rows
                # share the outcome.
                members[email] = self._member(target, item, email, options)
        if not members:
            return [Outcome.rejected("invalid email_address") for _ in items]

        body, _ = await self.call_json(
            "POST",
            f"/lists/{_path(list_id)}",
            json={"members": list(members.values()), "update_existing": True},
        )

        accepted: set[str] = set()
        body = body if isinstance(body, dict) else {}
        for key in ("new_members", "updated_members"):
            for member in body.get(key) or []:
                address = member.get("email_address") if isinstance(member, dict) else None
                if isinstance(address, str):
                    accepted.add(email_key(address))
        errors: dict[str, str] = {}
        for error in body.get("errors") or []:
            if not isinstance(error, dict) or not isinstance(error.get("email_address"), str):
                continue
            errors.setdefault(email_key(error["email_address"]), _member_error(error))

        outcomes: list[Outcome] = []
        for email in emails:
            if email is None:
                outcomes.append(Outcome.rejected("invalid email_address"))
            elif email in errors:
                outcomes.append(Outcome.rejected(errors[email]))
            elif email in accepted:
                outcomes.append(Outcome.accepted(email))
            else:
                outcomes.append(
                    Outcome.rejected(
                        "Mailchimp listed this member neither as created, updated nor failed"
                    )
                )
        return outcomes

    def _member(
        self, target: SyncTarget, item: Item, email: str, options: MailchimpSyncOptions
    ) -> dict[str, Any]:
        payload = dict(item.payload)
        consent = payload.pop(options.consent_field, None)
        member: dict[str, Any] = {"email_address": email}
        for key, value in payload.items():
            if key == "email_address" or value is None:
                continue
            if key == "merge_fields" and isinstance(value, Mapping):
                value = {tag: v for tag, v in value.items() if v is not None}
            member[key] = value
        # See the module docstring: status replaces an existing member's status, so it
        # is sent only when it is safe for a member that already exists.
        if target.consent != "none":
            # A sync that needs consent sends only people who gave it (the engine's
            # filter): subscribed when first sent; afterwards Mailchimp keeps the status
            # (an unsubscribe there stands; a withdrawal here unsubscribes, see _untag).
            if not item.held:
                member["status"] = "subscribed"
        elif consent is True:
            member["status"] = "subscribed"
        elif item.dest_id is None:
            member["status"] = "transactional"
        return member

    async def _tag(
        self, target: SyncTarget, list_id: str, outcomes: list[Outcome]
    ) -> list[Outcome]:
        """Put the members the upsert accepted into the sync's tag.

        One call per 500 members through the tag's static segment. The per-member tags
        endpoint (POST /lists/{id}/members/{hash}/tags, status active/inactive) does the
        same for one member per request: 500 times the calls for the same effect.
        """
        emails = sorted({o.dest_id for o in outcomes if o.ok and o.dest_id})
        if not emails:
            return outcomes
        failed = await self._segment_call(target, list_id, "members_to_add", emails)
        tag = self._options(target).tag
        return [
            Outcome.rejected(f"tag {tag!r}: {failed[o.dest_id]}")
            if o.ok and o.dest_id in failed
            else o
            for o in outcomes
        ]

    async def _unsubscribe(self, target: SyncTarget, items: Sequence[Item]) -> list[Outcome]:
        """Members who withdrew the sync's consent: status "unsubscribed" (the batch
        subscribe with update_existing replaces a member's status, see the module)."""
        list_id = self._list_id(target)
        emails = sorted({email_key(item.dest_id) for item in items if item.dest_id})
        errors: dict[str, str] = {}
        if emails:
            body, _ = await self.call_json(
                "POST",
                f"/lists/{_path(list_id)}",
                json={
                    "members": [{"email_address": e, "status": "unsubscribed"} for e in emails],
                    "update_existing": True,
                },
            )
            for error in (body if isinstance(body, dict) else {}).get("errors") or []:
                if isinstance(error, dict) and isinstance(error.get("email_address"), str):
                    errors.setdefault(email_key(error["email_address"]), _member_error(error))
        outcomes: list[Outcome] = []
        for item in items:
            if not item.dest_id:
                outcomes.append(Outcome.rejected("no Mailchimp member recorded for this record"))
            elif (message := errors.get(email_key(item.dest_id))) is not None:
                outcomes.append(Outcome.rejected(message))
            else:
                outcomes.append(Outcome.accepted(email_key(item.dest_id)))
        return outcomes

    async def _untag(self, target: SyncTarget, items: Sequence[Item]) -> list[Outcome]:
        """Take members out of the tag (the segment's members_to_remove). The member
        stays in the audience with its status: leaving the segment never unsubscribes;
        withdrawing the sync's consent does (``Item.withdrawn``), before the untag."""
        withdrawn = [item for item in items if item.withdrawn and target.consent != "none"]
        if withdrawn:
            refused = {
                item.key: outcome
                for item, outcome in zip(
                    withdrawn, await self._unsubscribe(target, withdrawn), strict=True
                )
                if not outcome.ok
            }
            if refused:
                # Tried again with the record, untagged once the unsubscribe is through.
                kept = [item for item in items if item.key not in refused]
                done = dict(
                    zip([i.key for i in kept], await self._untag_only(target, kept), strict=True)
                )
                return [refused.get(item.key) or done[item.key] for item in items]
        return await self._untag_only(target, items)

    async def _untag_only(self, target: SyncTarget, items: Sequence[Item]) -> list[Outcome]:
        list_id = self._list_id(target)
        emails = sorted({email_key(item.dest_id) for item in items if item.dest_id})
        failed: dict[str, str] = {}
        if emails:
            failed = await self._segment_call(target, list_id, "members_to_remove", emails)
        outcomes: list[Outcome] = []
        for item in items:
            if not item.dest_id:
                outcomes.append(Outcome.rejected("no Mailchimp member recorded for this record"))
                continue
            email = email_key(item.dest_id)
            message = failed.get(email)
            if message is None or _NOT_A_MEMBER.search(message):
                outcomes.append(Outcome.accepted(email))
            else:
                outcomes.append(Outcome.rejected(message))
        return outcomes

    async def _segment_call(
        self, target: SyncTarget, list_id: str, key: str, emails: list[str]
    ) -> dict[str, str]:
        """POST a batch add or remove to the tag's segment; the per-email errors it
        reports (``errors[].email_addresses`` with one ``error`` message each)."""
        segment_id = self._segments.get(target.name)
        if segment_id is None:
            raise RuntimeError(f"sync {target.name}: prepare() was not called")
        body, _ = await self.call_json(
            "POST", f"/lists/{_path(list_id)}/segments/{segment_id}", json={key: emails}
        )
        failed: dict[str, str] = {}
        errors = body.get("errors") if isinstance(body, dict) else None
        for error in errors or []:
            if not isinstance(error, dict):
                continue
            message = str(error.get("error") or "refused by Mailchimp")
            for address in error.get("email_addresses") or []:
                if isinstance(address, str):
                    failed.setdefault(email_key(address), message)
        return failed

    async def _delete(self, list_id: str, item: Item) -> Outcome:
        email = normalize_email(item.payload.get("email_address")) or (
            email_key(item.dest_id) if item.dest_id else None
        )
        if email is None:
            return Outcome.rejected("invalid email_address")
        path = f"/lists/{_path(list_id)}/members/{subscriber_hash(email)}/actions/delete-permanent"
        try:
            await self.client.request("POST", path)
        except ApiError as exc:
            if exc.status == 404:
                # Mailchimp answers 404 for an address the audience does not hold: never
                # added, or already permanently deleted. Either way no personal data of
                # that address is left in the audience, which is what erasure asks.
                return Outcome.accepted(email)
            if (
                exc.status is not None
                and 400 <= exc.status < 500
                and not isinstance(exc, AuthError)
            ):
                # A refusal of this one member (405 "This list member cannot be removed"):
                # erasure is one member per request, so any other 4xx is that member's
                # and becomes the row's failure rather than the run's.
                return Outcome.rejected(_problem_text(exc))
            raise
        return Outcome.accepted(email)

    async def forget(
        self, person: Person, targets: Sequence[SyncTarget], fields: Collection[str]
    ) -> Receipt:
        """Permanently delete the person from every audience the mapping's syncs use.

        ``POST /lists/{list_id}/members/{subscriber_hash}/actions/delete-permanent``
        (Mailchimp Marketing API reference, List members, "Delete list member"; 204 No
        Content): the member and their data go for good, unlike an archive
        (``DELETE /lists/{id}/members/{hash}``). 404 means the audience does not hold the
        address (never added or already deleted): for erasure, that is done too.
        """
        emails = {person.email} if person.email else set()
        # Mailchimp's dest_id is the member's lower-cased address (see _delete).
        emails |= {email_key(v) for v in person.dest_ids.values() if normalize_email(v)}
        lists = sorted({t.object.strip() for t in targets if t.object and t.object.strip()})
        if not emails or not lists:
            return Receipt.not_applicable(
                "no email address known for this person"
                if lists
                else "the mapping names no audience"
            )
        said: list[str] = []
        for list_id in lists:
            for email in sorted(emails):
                path = (
                    f"/lists/{_path(list_id)}/members/{subscriber_hash(email)}"
                    "/actions/delete-permanent"
                )
                try:
                    await self.client.request("POST", path)
                except ApiError as exc:
                    if exc.status != 404:
                        raise
                    said.append(f"audience {list_id}: not a member")
                else:
                    said.append(f"audience {list_id}: permanently deleted")
        return Receipt.done("; ".join(said))

    # -- helpers --------------------------------------------------------------------------

    def _options(self, target: SyncTarget) -> MailchimpSyncOptions:
        options = target.options
        if isinstance(options, MailchimpSyncOptions):
            return options
        return MailchimpSyncOptions.model_validate(options.model_dump())

    @staticmethod
    def _list_id(target: SyncTarget) -> str:
        if not target.object or not target.object.strip():
            raise ValueError(f"sync {target.name}: object must be the Mailchimp audience id")
        return target.object.strip()


def _path(segment: str) -> str:
    return quote(segment, safe="")


def _member_error(error: Mapping[str, Any]) -> str:
    """One batch-subscribe error entry as a row message: ``error`` with the field at
    issue and Mailchimp's ``error_code`` (e.g. ERROR_GENERIC, ERROR_CONTACT_EXISTS)."""
    text = str(error.get("error") or "refused by Mailchimp")
    field, hint = error.get("field"), error.get("field_message")
    if field:
        text += f" [{field}: {hint}]" if hint else f" [{field}]"
    code = error.get("error_code")
    return f"{text} ({code})" if code else text


def _problem_text(exc: ApiError) -> str:
    """Mailchimp's problem JSON (title, detail, errors[field, message]) as one line."""
    body = exc.body if isinstance(exc.body, dict) else {}
    detail = body.get("detail") or exc.message
    title = body.get("title")
    text = f"{title}: {detail}" if title and title not in str(detail) else str(detail)
    problems = [
        f"{e.get('field')}: {e.get('message')}" if e.get("field") else str(e.get("message"))
        for e in body.get("errors") or []
        if isinstance(e, dict) and e.get("message")
    ]
    return f"{text} ({'; '.join(problems)})" if problems else text
