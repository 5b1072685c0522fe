"""Google Customer Match audiences: the Data Manager API, or the Google Ads API job flow.

Mode ``mirror`` only: a segment becomes a Customer Match audience (a Google Ads user
list) that follows it, members added on entry and removed on exit. ``target.object`` is
the user list id. Which API carries the members is the mapping's ``[options] api``:

* ``"data_manager"`` (default): ``POST /v1/audienceMembers:ingest`` and ``:remove``
  (googleapis google/ads/datamanager/v1/ingestion_service.proto, IngestAudienceMembers /
  RemoveAudienceMembers). Google recommends it since the Google Ads API stopped taking
  new Customer Match adopters on 2026-04-01 (developers.google.com/ads/blog/posts/2026/
  03/changes-to-customer-match-support-in).
* ``"google_ads"``: the Google Ads API offline user data job (create the job, add
  operations, run it, poll it), for accounts still allowlisted for Customer Match there
  (googleads/google-ads-python examples/remarketing/add_customer_match_user_list.py).

Payload conventions (the mapping's destination field names): ``email``, ``phone``,
``first_name``, ``last_name``, ``country`` and ``postcode``. Each is normalized and
hashed by :data:`syncd.identity.GOOGLE` and nothing else leaves the machine: email and
phone (E.164 with its ``+``; a national number is read with ``country``, the billing
country) as SHA-256, and the name with country and postcode as an address identifier
(names hashed, country and postcode in clear, as Google's AddressInfo wants them; sent
only when all four are known). A row with none of these is skipped.

A member's hashed identifiers are also its ``dest_id`` (compact JSON, hex hashes), so
its removal names exactly what was added, even after the person's email changed.

Consent: the syncs need ``ads`` consent (the engine sends only people with
``consent_ads``), and ingest requests say so to Google: ``consent`` with ``adUserData``
and ``adPersonalization`` granted (consent.proto; DMA consent). A sync declared
``consent = "none"`` sends no consent fields. ``termsOfService`` states the Customer
Match terms accepted (terms_of_service.proto: required when ingesting UserData).

Per-row errors: the Data Manager API fails a request fast, as a whole, naming the bad
members in ``fieldViolations`` (developers.google.com/data-manager/api/devguides/
concepts/understand-errors): those rows are refused with Google's reason and the rest
is sent again at once. A 400 naming no member blames the request (a user list id, the
terms): it fails the run. The Google Ads job flow reports bad operations as a partial
failure (``enablePartialFailure``), per operation index. 429 RESOURCE_EXHAUSTED is
transient: ``syncd.http`` backs off and logs ``http.retry``.

``validate_only`` (an instance attribute, meant for ``syncd push --dry-run``; the push
engine's dry run sends nothing yet): Data Manager requests go with ``validateOnly`` and
change nothing at Google, and the outcomes say whether Google would take each row; in
the Google Ads flow only the job is validated (user list, consent, access), not members.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any, ClassVar, Final, Literal

import httpx
import orjson
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

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
)
from syncd.http import ApiError, OAuth2RefreshAuth, ServiceLimits
from syncd.identity import GOOGLE

__all__ = [
    "DATA_MANAGER_URL",
    "GOOGLE_ADS_URL",
    "MAX_MEMBERS",
    "GoogleDestination",
    "GoogleOptions",
    "identifiers_of",
]

DATA_MANAGER_URL: Final = "https://datamanager.googleapis.com"
GOOGLE_ADS_URL: Final = "https://googleads.googleapis.com"
# OAuth 2.0 token endpoint for installed and web apps (developers.google.com/identity/
# protocols/oauth2/web-server#offline: "Refreshing an access token (offline access)").
TOKEN_URL: Final = "https://oauth2.googleapis.com/token"

# IngestAudienceMembersRequest.audience_members: "At most 10000 AudienceMember resources
# can be sent in a single request" (ingestion_service.proto); UserData.user_identifiers:
# "At most 10 userIdentifiers can be provided in a single AudienceMember" (audience.proto).
# The Google Ads flow takes up to 100,000 identifiers per AddOfflineUserDataJobOperations
# request, at most 20 per UserData: 10,000 members of at most 3 identifiers fit both.
MAX_MEMBERS: Final = 10_000
MAX_IDENTIFIERS: Final = 10
# Data Manager API limits page (developers.google.com/data-manager/api/reference/limits):
# 300 requests a minute per project; beyond, 429 RESOURCE_EXHAUSTED.
DATA_MANAGER_LIMITS: Final = ServiceLimits(requests_per_second=300 / 60, concurrency=4)
# "Audiences need at least 100 active members before they can be used for targeting"
# (developers.google.com/data-manager/api/devguides/audiences/send-audience-members;
# Google Ads Help, Customer Match "About Customer Match": a list needs 100 active users
# on a network to serve there).
MIN_AUDIENCE: Final = 100

FIELDS: Final = frozenset({"email", "phone", "first_name", "last_name", "country", "postcode"})
# The identifier kinds a match report counts (what a match rate is made of).
KINDS: Final = {"emailAddress": "email", "phoneNumber": "phone", "address": "name_postcode"}

# consent.proto ConsentStatus (Data Manager) and the Google Ads API's ConsentStatusEnum.
_DM_CONSENT: Final = {"adUserData": "CONSENT_GRANTED", "adPersonalization": "CONSENT_GRANTED"}
_ADS_CONSENT: Final = {"adUserData": "GRANTED", "adPersonalization": "GRANTED"}
# A field violation naming a member: "audience_members[3].user_data..." (gRPC names) or
# "audienceMembers[3]..." (JSON names).
_MEMBER_FIELD = re.compile(r"audience_?[mM]embers\[(\d+)\]")
# OfflineUserDataJobStatus (Google Ads API enums): the states a job ends in.
_JOB_DONE: Final = frozenset({"SUCCESS", "FAILED"})

Identifier = dict[str, Any]


class GoogleOptions(BaseModel):
    """``[options]`` of a Google mapping."""

    model_config = ConfigDict(extra="forbid")

    api: Literal["data_manager", "google_ads"] = "data_manager"
    # The Google Ads account holding the user lists (10 digits; dashes allowed).
    operating_account_id: str
    # ProductAccount.AccountType (destination.proto).
    account_type: Literal["GOOGLE_ADS", "DISPLAY_VIDEO_ADVERTISER", "DISPLAY_VIDEO_PARTNER"] = (
        "GOOGLE_ADS"
    )
    # A manager account the OAuth user reaches the operating account through, if any.
    login_account_id: str | None = None
    encoding: Literal["HEX", "BASE64"] = "HEX"
    token_url: str = TOKEN_URL
    # Google Ads API only: its developer token (literal or env:NAME), API version, and
    # how long to wait for a job.
    developer_token: SecretStr | None = None
    ads_api_version: str = Field(default="v22", pattern=r"^v\d+$")
    job_timeout: float = Field(default=1800.0, gt=0)

    @field_validator("operating_account_id", "login_account_id")
    @classmethod
    def _customer_id(cls, value: str | None) -> str | None:
        if value is None:
            return None
        digits = value.replace("-", "").strip()
        if not digits.isdigit():
            raise ValueError("expected a Google Ads customer id, digits (dashes allowed)")
        return digits

    @field_validator("developer_token", mode="before")
    @classmethod
    def _from_environment(cls, value: object) -> object:
        # An option, not a credential: only the Google Ads API wants it. (syncd.config's
        # secret references are out of an adapter's reach: it would import the store.)
        if isinstance(value, str) and value.startswith("env:"):
            name = value.removeprefix("env:").strip()
            if not os.environ.get(name):
                raise ValueError(f"environment variable {name} is not set")
            return os.environ[name]
        return value

    @model_validator(mode="after")
    def _ads_needs_a_developer_token(self) -> GoogleOptions:
        if self.api == "google_ads" and self.developer_token is None:
            raise ValueError(
                'api = "google_ads" needs developer_token (the Google Ads API developer '
                "token, literal or env:NAME)"
            )
        return self


def identifiers_of(payload: Mapping[str, Any]) -> list[Identifier]:
    """A member's user identifiers in Data Manager form (hex SHA-256), from its payload."""
    country = payload.get("country")
    out: list[Identifier] = []
    email = GOOGLE.prepare("email", payload.get("email"))
    if email is not None:
        out.append({"emailAddress": email})
    phone = GOOGLE.prepare("phone", payload.get("phone"), country=country)
    if phone is not None:
        out.append({"phoneNumber": phone})
    given = GOOGLE.prepare("first_name", payload.get("first_name"))
    family = GOOGLE.prepare("last_name", payload.get("last_name"))
    region = GOOGLE.prepare("country", country)
    postal = GOOGLE.prepare("postcode", payload.get("postcode"))
    if given and family and region and postal:
        address = {"givenName": given, "familyName": family, "regionCode": region}
        out.append({"address": {**address, "postalCode": postal}})
    return out


def _stored(identifiers: Sequence[Identifier]) -> str:
    return orjson.dumps(identifiers).decode()


def _recorded(dest_id: str | None) -> list[Identifier]:
    if not dest_id:
        return []
    try:
        value = orjson.loads(dest_id)
    except orjson.JSONDecodeError:
        return []
    return [i for i in value if isinstance(i, dict)] if isinstance(value, list) else []


def _b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


class GoogleDestination(Destination):
    type = "google"
    modes: ClassVar[frozenset[str]] = frozenset({"mirror"})
    max_batch: ClassVar[Mapping[str, int]] = {"add": MAX_MEMBERS, "remove": MAX_MEMBERS}
    consent_channel: ClassVar[str] = "ads"
    credential_names: ClassVar[tuple[str, ...]] = ("client_id", "client_secret", "refresh_token")
    default_limits: ClassVar[ServiceLimits] = DATA_MANAGER_LIMITS
    Options = GoogleOptions
    object_required: ClassVar[frozenset[str]] = frozenset({"mirror"})
    reports_match: ClassVar[bool] = True
    min_audience: ClassVar[int | None] = MIN_AUDIENCE

    options: GoogleOptions

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
        assert isinstance(options, GoogleOptions)
        # The two APIs live on two hosts; a mapping's base_url replaces either.
        if base_url is None and options.api == "google_ads":
            base_url = GOOGLE_ADS_URL
        self._token_url = options.token_url
        # True: every request says validateOnly (a dry run; see the module's docstring).
        self.validate_only = False
        super().__init__(
            name, credentials, options, base_url=base_url, limits=limits, transport=transport
        )

    @classmethod
    def default_base_url(cls, credentials: Mapping[str, SecretStr]) -> str:
        return DATA_MANAGER_URL

    def auth(self, credentials: Mapping[str, SecretStr]) -> httpx.Auth | None:  # type: ignore[override]
        # An instance method: the token endpoint is an option (a sandbox's, in tests).
        return OAuth2RefreshAuth(
            f"{self.type}:{self.name}",
            self._token_url,
            client_id=credentials["client_id"].get_secret_value(),
            client_secret=credentials["client_secret"],
            refresh_token=credentials["refresh_token"],
            transport=self._transport,
        )

    def check(self, target: SyncTarget, op: Op, payload: Mapping[str, Any]) -> str | None:
        unknown = sorted(set(payload) - FIELDS)
        if unknown:
            return (
                f"unknown field {', '.join(unknown)} (a Google audience member has "
                f"{', '.join(sorted(FIELDS))})"
            )
        if not identifiers_of(payload):
            return "no email, phone, or name with country and postcode to match on"
        return None

    def handlers(self) -> Mapping[Op, Handler]:
        if self.options.api == "google_ads":
            return {"add": self._ads_add, "remove": self._ads_remove}
        return {"add": self._dm_add, "remove": self._dm_remove}

    # -- the Data Manager API ---------------------------------------------------------------

    def _destination(self, target: SyncTarget) -> dict[str, Any]:
        options = self.options
        destination: dict[str, Any] = {
            "operatingAccount": {
                "accountType": options.account_type,
                "accountId": options.operating_account_id,
            },
            "productDestinationId": target.object,
        }
        if options.login_account_id:
            destination["loginAccount"] = {
                "accountType": "GOOGLE_ADS",
                "accountId": options.login_account_id,
            }
        return destination

    def _encoded(self, identifier: Identifier) -> Identifier:
        """``identifier`` with its hashes in the mapping's ``encoding``."""
        if self.options.encoding == "HEX":
            return identifier
        if "address" in identifier:
            address = dict(identifier["address"])
            address["givenName"] = _b64(address["givenName"])
            address["familyName"] = _b64(address["familyName"])
            return {"address": address}
        ((kind, value),) = identifier.items()
        return {kind: _b64(value)}

    def _member(self, identifiers: Sequence[Identifier]) -> dict[str, Any]:
        return {"userData": {"userIdentifiers": [self._encoded(i) for i in identifiers]}}

    async def _dm_add(self, target: SyncTarget, items: Sequence[Item]) -> list[Outcome]:
        members = [identifiers_of(item.payload) for item in items]
        extra: dict[str, Any] = {
            "termsOfService": {"customerMatchTermsOfServiceStatus": "ACCEPTED"},
        }
        if target.consent == "ads":
            # Only people with ads consent are sent (the engine's consent rule): the
            # request-level consent applies to every member (ingestion_service.proto).
            extra["consent"] = dict(_DM_CONSENT)
        outcomes = await self._dm_send("/v1/audienceMembers:ingest", target, members, extra)
        self._report(members, outcomes)
        return outcomes

    async def _dm_remove(self, target: SyncTarget, items: Sequence[Item]) -> list[Outcome]:
        members = [self._removal_identifiers(item) for item in items]
        return await self._dm_send("/v1/audienceMembers:remove", target, members, {})

    def _removal_identifiers(self, item: Item) -> list[Identifier]:
        """What was added for the member (its dest_id), and what its payload gives (a
        withdrawn person's current details), without repeats."""
        out: list[Identifier] = []
        for identifier in (*_recorded(item.dest_id), *identifiers_of(item.payload)):
            if identifier not in out:
                out.append(identifier)
        return out[:MAX_IDENTIFIERS]

    async def _dm_send(
        self,
        path: str,
        target: SyncTarget,
        members: Sequence[list[Identifier]],
        extra: Mapping[str, Any],
    ) -> list[Outcome]:
        """Send ``members`` (fast-fail: the members Google names are refused and the rest
        sent again); one outcome per member, in order."""
        outcomes: dict[int, Outcome] = {
            n: Outcome.rejected("no identifiers recorded for this member")
            for n, identifiers in enumerate(members)
            if not identifiers
        }
        pending = [n for n in range(len(members)) if n not in outcomes]
        while pending:
            body = {
                "destinations": [self._destination(target)],
                "audienceMembers": [self._member(members[n]) for n in pending],
                "encoding": self.options.encoding,
                **extra,
            }
            if self.validate_only:
                body["validateOnly"] = True
            try:
                # The answer is a requestId: Google processes the members asynchronously.
                await self.call("POST", path, json=body)
            except BatchRejected as refused:
                named = {
                    i: r for i, r in _violations(refused.__cause__).items() if i < len(pending)
                }
                if not named:
                    # Google names no member: the request as a whole is wrong (a user list
                    # id, the terms), the same for every row, so the run fails with it.
                    raise (refused.__cause__ or refused) from None
                for index, reason in named.items():
                    outcomes[pending[index]] = Outcome.rejected(reason)
                pending = [n for i, n in enumerate(pending) if i not in named]
                continue
            for n in pending:
                outcomes[n] = Outcome.accepted(_stored(members[n]))
            pending = []
        return [outcomes[n] for n in range(len(members))]

    def _report(self, members: Sequence[list[Identifier]], outcomes: Sequence[Outcome]) -> None:
        """Add one batch of an add to the run's match report (when the engine keeps one)."""
        report = self.match_report
        if report is None or self.validate_only:
            return
        for identifiers, outcome in zip(members, outcomes, strict=True):
            if not identifiers:
                continue
            report.received += 1
            report.invalid += 0 if outcome.ok else 1
            for kind in {KINDS[next(iter(i))] for i in identifiers}:
                report.carrying[kind] += 1

    # -- the Google Ads API job flow ----------------------------------------------------------

    def _ads_headers(self) -> dict[str, str]:
        token = self.options.developer_token
        assert token is not None  # GoogleOptions refuses google_ads without one
        headers = {"developer-token": token.get_secret_value()}
        if self.options.login_account_id:
            headers["login-customer-id"] = self.options.login_account_id
        return headers

    def _ads_path(self, resource: str) -> str:
        return f"/{self.options.ads_api_version}/{resource}"

    async def _ads_add(self, target: SyncTarget, items: Sequence[Item]) -> list[Outcome]:
        members = [identifiers_of(item.payload) for item in items]
        outcomes = await self._ads_job(target, "create", members)
        self._report(members, outcomes)
        return outcomes

    async def _ads_remove(self, target: SyncTarget, items: Sequence[Item]) -> list[Outcome]:
        members = [self._removal_identifiers(item) for item in items]
        return await self._ads_job(target, "remove", members)

    async def _ads_job(
        self,
        target: SyncTarget,
        verb: Literal["create", "remove"],
        members: Sequence[list[Identifier]],
    ) -> list[Outcome]:
        """One offline user data job for the batch: create, add operations, run, poll
        (OfflineUserDataJobService; add_customer_match_user_list.py)."""
        customer = self.options.operating_account_id
        headers = self._ads_headers()
        metadata: dict[str, Any] = {"userList": f"customers/{customer}/userLists/{target.object}"}
        if target.consent == "ads":
            metadata["consent"] = dict(_ADS_CONSENT)
        created, _ = await self.call_json(
            "POST",
            self._ads_path(f"customers/{customer}/offlineUserDataJobs:create"),
            json={
                "job": {
                    "type": "CUSTOMER_MATCH_USER_LIST",
                    "customerMatchUserListMetadata": metadata,
                },
                **({"validateOnly": True} if self.validate_only else {}),
            },
            headers=headers,
        )
        if self.validate_only:
            return [Outcome.accepted() for _ in members]
        job = created.get("resourceName") if isinstance(created, dict) else None
        if not isinstance(job, str) or not job:
            raise BatchRejected(f"Google Ads created no job: {str(created)[:200]}")
        sent = [n for n, identifiers in enumerate(members) if identifiers]
        outcomes: dict[int, Outcome] = {
            n: Outcome.rejected("no identifiers recorded for this member")
            for n in range(len(members))
            if n not in sent
        }
        answer, _ = await self.call_json(
            "POST",
            self._ads_path(f"{job}:addOperations"),
            json={
                "enablePartialFailure": True,
                "operations": [{verb: {"userIdentifiers": _ads_ids(members[n])}} for n in sent],
            },
            headers=headers,
        )
        for index, reason in _partial_failures(answer).items():
            if index < len(sent):
                outcomes[sent[index]] = Outcome.rejected(reason)
        await self.call_json("POST", self._ads_path(f"{job}:run"), json={}, headers=headers)
        search = self._ads_path(f"customers/{customer}/googleAds:search")
        query = (
            "SELECT offline_user_data_job.resource_name, offline_user_data_job.status, "
            "offline_user_data_job.failure_reason FROM offline_user_data_job "
            f"WHERE offline_user_data_job.resource_name = '{job}'"
        )

        async def fetch() -> dict[str, Any]:
            found, _ = await self.call_json("POST", search, json={"query": query}, headers=headers)
            results = found.get("results") if isinstance(found, dict) else None
            if not results:
                return {"status": "UNKNOWN"}
            row = results[0].get("offlineUserDataJob", {})
            return row if isinstance(row, dict) else {"status": "UNKNOWN"}

        final = await self.poll_job(
            fetch,
            lambda j: j.get("status") in _JOB_DONE,
            first={"status": "PENDING"},
            timeout=self.options.job_timeout,
            what=f"offline user data job {job}",
            state=lambda j: str(j.get("status")),
            url=search,
            setting="[options] job_timeout",
        )
        failed = final.get("status") == "FAILED"
        reason = f"the Google Ads job failed: {final.get('failureReason', 'UNKNOWN')}"
        for n in sent:
            if n not in outcomes:
                outcomes[n] = (
                    Outcome.rejected(reason)
                    if failed
                    else Outcome.accepted(_stored(members[n]) if verb == "create" else None)
                )
        return [outcomes[n] for n in range(len(members))]

    # -- erasure ------------------------------------------------------------------------

    async def forget(
        self, person: Person, targets: Sequence[SyncTarget], fields: Collection[str]
    ) -> Receipt:
        """Remove the person from every audience the mapping's syncs fill, by what was added
        for them (their recorded identifiers) and by their current email and phone."""
        done: list[str] = []
        for target in targets:
            item = Item(
                key=f"privacy-request-{person.request}",
                payload={"email": person.email, "phone": person.phone},
                dest_id=person.dest_ids.get(target.name),
            )
            if not self._removal_identifiers(item):
                continue
            (outcome,) = await self.send(target, "remove", [item])
            if not outcome.ok:
                raise ApiError(
                    f"{self.type}:{self.name}",
                    None,
                    "POST",
                    self.base_url,
                    f"removal from user list {target.object} refused: {outcome.error}",
                )
            done.append(str(target.object))
        if not done:
            return Receipt.not_applicable("no email, phone or recorded member to remove")
        return Receipt.done(f"removed from Customer Match user list(s) {', '.join(done)}")


def _ads_ids(identifiers: Sequence[Identifier]) -> list[dict[str, Any]]:
    """Data Manager identifiers as Google Ads UserIdentifiers (common/offline_user_data.proto:
    hashed_email, hashed_phone_number, address_info)."""
    out: list[dict[str, Any]] = []
    for identifier in identifiers:
        if "emailAddress" in identifier:
            out.append({"hashedEmail": identifier["emailAddress"]})
        elif "phoneNumber" in identifier:
            out.append({"hashedPhoneNumber": identifier["phoneNumber"]})
        elif "address" in identifier:
            address = identifier["address"]
            info = {
                "hashedFirstName": address["givenName"],
                "hashedLastName": address["familyName"],
                "countryCode": address["regionCode"],
                "postalCode": address["postalCode"],
            }
            out.append({"addressInfo": info})
    return out


def _violations(error: BaseException | None) -> dict[int, str]:
    """Member index -> Google's reason, from a refusal's BadRequest field violations."""
    if not isinstance(error, ApiError) or not isinstance(error.body, dict):
        return {}
    status = error.body.get("error")
    details = status.get("details") if isinstance(status, dict) else None
    named: dict[int, str] = {}
    for detail in details if isinstance(details, list) else []:
        if not isinstance(detail, dict):
            continue
        for violation in detail.get("fieldViolations") or []:
            if not isinstance(violation, dict):
                continue
            match = _MEMBER_FIELD.search(str(violation.get("field", "")))
            if match is None:
                continue
            reason = violation.get("reason") or "INVALID_ARGUMENT"
            text = violation.get("description") or ""
            named.setdefault(int(match.group(1)), f"{reason}: {text}".rstrip(": "))
    return named


def _partial_failures(answer: Any) -> dict[int, str]:
    """Operation index -> message, from AddOfflineUserDataJobOperationsResponse's
    partialFailureError (a google.rpc.Status whose details hold GoogleAdsFailure errors
    located by fieldPathElements: operations[index])."""
    status = answer.get("partialFailureError") if isinstance(answer, dict) else None
    details = status.get("details") if isinstance(status, dict) else None
    failed: dict[int, str] = {}
    for detail in details if isinstance(details, list) else []:
        for error in detail.get("errors") or [] if isinstance(detail, dict) else []:
            location = error.get("location") or {}
            for element in location.get("fieldPathElements") or []:
                if element.get("fieldName") == "operations" and "index" in element:
                    failed.setdefault(int(element["index"]), str(error.get("message", "")))
                    break
    return failed
