"""Google Customer Match on 127.0.0.1, served under ``/google``: the OAuth 2.0 token
endpoint, the Data Manager API's ``audienceMembers:ingest`` / ``:remove`` and the Google
Ads API offline user data job flow.

Checked as Google does (googleapis google/ads/datamanager/v1/*.proto; ErrorReason of the
Data Manager API reference): a Bearer token from the token endpoint, at most 10,000
members a request and 10 identifiers a member, exactly one identifier kind per
UserIdentifier, hashes of the declared ``encoding`` (64 lower-case hex or base64 of 32
bytes: never a plaintext email or phone), an address with hashed names, a 2-letter
region code and a postcode, the Customer Match terms accepted on ingest. A bad member
fails the whole request (the fast-fail model), naming it in ``fieldViolations``; nothing
of that request is applied. ``exhaust_every`` answers every n-th API request with 429
RESOURCE_EXHAUSTED, as Google does past 300 requests a minute.

An audience is a list of members, each the set of its identifiers: an ingest adds a
member (merged into one that shares an identifier), a removal takes out every member
sharing an identifier with it. ``hashed_emails(list_id)`` is what tests compare with
the segment.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl

import orjson

from syncd.sandbox.destinations.base import _JSON, Json, _Reply, _Request, _Response, _Vendor

if TYPE_CHECKING:
    from syncd.sandbox.destinations import DestinationSandbox

MAX_MEMBERS: Final = 10_000
MAX_IDENTIFIERS: Final = 10
MAX_DESTINATIONS: Final = 10
_HEX64: Final = re.compile(r"^[0-9a-f]{64}$")
_ACCOUNT_TYPES: Final = frozenset(
    {"GOOGLE_ADS", "DISPLAY_VIDEO_PARTNER", "DISPLAY_VIDEO_ADVERTISER", "DATA_PARTNER"}
)
_JOB_PATH: Final = re.compile(
    r"^/(v\d+)/customers/(\d+)/offlineUserDataJobs/(\d+):(addOperations|run)$"
)
_ADS_PATH: Final = re.compile(
    r"^/(v\d+)/customers/(\d+)/(offlineUserDataJobs:create|googleAds:search)$"
)

_ADS_FAILURE: Final = "type.googleapis.com/google.ads.googleads.v22.errors.GoogleAdsFailure"

Member = frozenset[str]


@dataclass(slots=True)
class _Audience:
    """Members by number, and which member holds each identifier (a removal or a merge
    finds its members without scanning the audience)."""

    members: dict[int, Member] = field(default_factory=dict)
    holder: dict[str, int] = field(default_factory=dict)
    next_id: int = 0

    def apply(self, member: Member, *, add: bool) -> None:
        touching = {self.holder[i] for i in member if i in self.holder}
        merged = set(member)
        for number in touching:
            old = self.members.pop(number)
            merged |= old
            for identifier in old:
                del self.holder[identifier]
        if add:
            self.next_id += 1
            self.members[self.next_id] = frozenset(merged)
            for identifier in merged:
                self.holder[identifier] = self.next_id


@dataclass(slots=True)
class _Job:
    customer: str
    user_list: str
    status: str = "PENDING"
    operations: list[tuple[str, Member]] = field(default_factory=list)
    polls_left: int = 0


class GoogleSandbox(_Vendor):
    name = "google"
    prefix = "/google"

    def __init__(
        self,
        sandbox: DestinationSandbox,
        client_id: str = "sandbox-client.apps.googleusercontent.com",
        client_secret: str = "sandbox-client-secret",
        refresh_token: str = "1//sandbox-refresh-token",
        developer_token: str = "sandbox-developer-token",
        token_ttl: int = 3599,
    ) -> None:
        super().__init__(sandbox)
        self.client_id = client_id
        self.client_secret = client_secret
        self.refresh_token = refresh_token
        self.developer_token = developer_token
        self.token_ttl = token_ttl
        self.tokens: dict[str, float] = {}  # access token -> expiry (sandbox clock)
        self.token_requests = 0
        self.audiences: dict[str, _Audience] = {}
        self.exhaust_every = 0  # every n-th API request answers 429 (0: never)
        self.exhausted = 0
        self.allowlisted = True  # the Google Ads API Customer Match allowlist
        self.job_polls = 1  # searches a run job answers RUNNING before SUCCESS
        self.jobs: dict[str, _Job] = {}
        self._api_requests = 0
        self._ids = itertools.count(1)
        self._job_ids = itertools.count(1)

    # -- set-up and inspection ------------------------------------------------------------

    def add_user_list(self, list_id: str) -> str:
        with self.lock:
            self.audiences.setdefault(list_id, _Audience())
        return list_id

    def hashed_emails(self, list_id: str) -> set[str]:
        """The hex email hashes of the members of ``list_id``."""
        with self.lock:
            audience = self.audiences.get(list_id, _Audience())
            return {i.partition(":")[2] for i in audience.holder if i.startswith("email:")}

    def members(self, list_id: str) -> list[Member]:
        with self.lock:
            return list(self.audiences.get(list_id, _Audience()).members.values())

    def expire_tokens(self) -> None:
        """Every access token handed out expires now (the next call answers 401)."""
        with self.lock:
            self.tokens.clear()

    # -- answers ----------------------------------------------------------------------------

    @staticmethod
    def _status(
        code: int, status: str, message: str, details: list[Json] | None = None
    ) -> _Response:
        # google.rpc.Status in the REST error envelope (cloud.google.com/apis/design/errors).
        error: Json = {"code": code, "message": message, "status": status}
        if details:
            error["details"] = details
        return _Response(code, orjson.dumps({"error": error}), _JSON)

    def throttled(self, retry_after: str | None) -> _Response:
        response = self._status(
            429,
            "RESOURCE_EXHAUSTED",
            "Quota exceeded for quota metric 'Requests' and limit 'Requests per minute'.",
            [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "RATE_LIMIT_EXCEEDED",
                    "domain": "googleapis.com",
                }
            ],
        )
        if retry_after:
            response.headers["Retry-After"] = retry_after
        return response

    def _bad(self, message: str, violations: list[Json] | None = None) -> _Reply:
        details = (
            [{"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": violations}]
            if violations
            else None
        )
        return _Reply(self._status(400, "INVALID_ARGUMENT", message, details))

    def _ok(self, body: Json) -> _Response:
        return _Response(200, orjson.dumps(body), _JSON)

    # -- requests ----------------------------------------------------------------------------

    def handle(self, request: _Request) -> _Response:
        if request.method == "POST" and request.path == "/token":
            return self._token(request)
        self._authenticate(request)
        with self.lock:
            self._api_requests += 1
            if self.exhaust_every and self._api_requests % self.exhaust_every == 0:
                self.exhausted += 1
                response = self.throttled(None)
                response.fault = "throttled"
                return response
        if request.method != "POST":
            raise _Reply(self._status(404, "NOT_FOUND", "Not found."))
        body = self._json(request)
        if request.path == "/v1/audienceMembers:ingest":
            return self._members(body, ingest=True)
        if request.path == "/v1/audienceMembers:remove":
            return self._members(body, ingest=False)
        if (match := _ADS_PATH.match(request.path)) is not None:
            self._developer_token(request)
            if match.group(3) == "googleAds:search":
                return self._search(match.group(2), body)
            return self._create_job(match.group(2), body)
        if (match := _JOB_PATH.match(request.path)) is not None:
            self._developer_token(request)
            return self._job_call(match.group(2), match.group(3), match.group(4), body)
        raise _Reply(self._status(404, "NOT_FOUND", f"Not found: {request.path}"))

    def _token(self, request: _Request) -> _Response:
        # RFC 6749 §6 refresh, client credentials in the body (§2.3.1), as Google's
        # https://oauth2.googleapis.com/token takes them.
        form = dict(parse_qsl(request.body.decode(), keep_blank_values=True))
        with self.lock:
            self.token_requests += 1
            if form.get("grant_type") != "refresh_token":
                return _Response(400, b'{"error":"unsupported_grant_type"}', _JSON)
            if (form.get("client_id"), form.get("client_secret")) != (
                self.client_id,
                self.client_secret,
            ):
                return _Response(
                    401, b'{"error":"invalid_client","error_description":"Unauthorized"}', _JSON
                )
            if form.get("refresh_token") != self.refresh_token:
                return _Response(
                    400,
                    orjson.dumps(
                        {
                            "error": "invalid_grant",
                            "error_description": "Token has been expired or revoked.",
                        }
                    ),
                    _JSON,
                )
            token = f"ya29.sandbox-{next(self._ids)}"
            self.tokens[token] = self._sandbox.clock() + self.token_ttl
        body = {"access_token": token, "expires_in": self.token_ttl, "token_type": "Bearer"}
        return self._ok({**body, "scope": "https://www.googleapis.com/auth/datamanager"})

    def _authenticate(self, request: _Request) -> None:
        header = request.headers.get("Authorization") or ""
        token = header.removeprefix("Bearer ")
        with self.lock:
            expiry = self.tokens.get(token)
        if not header.startswith("Bearer ") or expiry is None or expiry <= self._sandbox.clock():
            raise _Reply(
                self._status(
                    401,
                    "UNAUTHENTICATED",
                    "Request had invalid authentication credentials. Expected OAuth 2 access "
                    "token, login cookie or other valid authentication credential.",
                )
            )

    def _developer_token(self, request: _Request) -> None:
        if request.headers.get("developer-token") != self.developer_token:
            raise _Reply(self._status(401, "UNAUTHENTICATED", "The developer token is not valid."))

    def _json(self, request: _Request) -> Json:
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError:
            raise self._bad("Invalid JSON payload received.") from None
        if not isinstance(body, dict):
            raise self._bad("Invalid JSON payload received. Expected an object.")
        return body

    # -- the Data Manager API -----------------------------------------------------------------

    def _members(self, body: Json, *, ingest: bool) -> _Response:
        destinations = body.get("destinations")
        if not isinstance(destinations, list) or not destinations:
            raise self._bad("destinations is required.")
        if len(destinations) > MAX_DESTINATIONS:
            raise self._bad("TOO_MANY_DESTINATIONS")
        lists = [self._destination(d) for d in destinations]
        members = body.get("audienceMembers")
        if not isinstance(members, list) or not members:
            raise self._bad("audienceMembers is required.")
        if len(members) > MAX_MEMBERS:
            raise self._bad(
                "TOO_MANY_AUDIENCE_MEMBERS: Maximum number of audience members allowed per "
                "request is 10,000."
            )
        encoding = body.get("encoding")
        if encoding not in ("HEX", "BASE64"):
            raise self._bad("encoding is required for UserData uploads (HEX or BASE64).")
        if ingest:
            terms = body.get("termsOfService") or {}
            if terms.get("customerMatchTermsOfServiceStatus") != "ACCEPTED":
                raise self._bad("TERMS_AND_CONDITIONS_NOT_SIGNED")
            self._consent(body.get("consent"), "consent")
        parsed: list[Member] = []
        violations: list[Json] = []
        for n, member in enumerate(members):
            identifiers, problems = self._member(n, member, encoding)
            parsed.append(identifiers)
            violations += problems
        if violations:
            raise self._bad("Request contains an invalid argument.", violations)
        if body.get("validateOnly") is True:
            return self._ok({"requestId": f"validate-{next(self._ids)}"})
        with self.lock:
            for list_id in lists:
                for member in parsed:
                    self._apply(list_id, member, add=ingest)
        return self._ok({"requestId": f"req-{next(self._ids)}"})

    def _destination(self, destination: Any) -> str:
        account = destination.get("operatingAccount") if isinstance(destination, dict) else None
        if not isinstance(account, dict) or not str(account.get("accountId", "")).isdigit():
            raise self._bad("INVALID_DESTINATION: operatingAccount.accountId is required.")
        if account.get("accountType") not in _ACCOUNT_TYPES:
            raise self._bad("INVALID_DESTINATION: operatingAccount.accountType is required.")
        list_id = str(destination.get("productDestinationId", ""))
        with self.lock:
            if list_id not in self.audiences:
                raise self._bad("INVALID_USER_LIST_ID: User list is not valid.")
        return list_id

    def _consent(self, consent: Any, where: str) -> None:
        if consent is None:
            return
        allowed = {"CONSENT_STATUS_UNSPECIFIED", "CONSENT_GRANTED", "CONSENT_DENIED"}
        if not isinstance(consent, dict) or any(
            key not in ("adUserData", "adPersonalization") or value not in allowed
            for key, value in consent.items()
        ):
            raise self._bad(f"INVALID_ENUM_VALUE: {where}")

    def _member(self, n: int, member: Any, encoding: str) -> tuple[Member, list[Json]]:
        where = f"audience_members[{n}]"
        data = member.get("userData") if isinstance(member, dict) else None
        ids = data.get("userIdentifiers") if isinstance(data, dict) else None
        if not isinstance(ids, list) or not ids:
            return frozenset(), [_violation(f"{where}.user_data", "REQUIRED_FIELD_MISSING")]
        if len(ids) > MAX_IDENTIFIERS:
            return frozenset(), [_violation(f"{where}.user_data", "TOO_MANY_USER_IDENTIFIERS")]
        self._consent(member.get("consent"), f"{where}.consent")
        found: set[str] = set()
        problems: list[Json] = []
        for j, identifier in enumerate(ids):
            at = f"{where}.user_data.user_identifiers[{j}]"
            if not isinstance(identifier, dict) or len(identifier) != 1:
                problems.append(_violation(at, "INVALID_FORMAT", "exactly one identifier"))
                continue
            ((kind, value),) = identifier.items()
            if kind in ("emailAddress", "phoneNumber"):
                digest = _digest(value, encoding)
                if digest is None:
                    problems.append(_violation(f"{at}.{_snake(kind)}", _hash_reason(encoding)))
                else:
                    found.add(f"{'email' if kind == 'emailAddress' else 'phone'}:{digest}")
            elif kind == "address" and isinstance(value, dict):
                parts = []
                for name in ("givenName", "familyName"):
                    digest = _digest(value.get(name), encoding)
                    if digest is None:
                        problems.append(
                            _violation(f"{at}.address.{_snake(name)}", _hash_reason(encoding))
                        )
                    parts.append(digest or "")
                region = value.get("regionCode")
                if not (isinstance(region, str) and re.fullmatch(r"[A-Z]{2}", region)):
                    problems.append(_violation(f"{at}.address.region_code", "INVALID_FORMAT"))
                postal = value.get("postalCode")
                if not (isinstance(postal, str) and postal.strip()):
                    problems.append(_violation(f"{at}.address.postal_code", "INVALID_POSTAL_CODE"))
                found.add(f"address:{'|'.join(parts)}|{region}|{postal}")
            else:
                problems.append(_violation(at, "INVALID_FORMAT", f"unknown identifier {kind}"))
        return frozenset(found), problems

    def _apply(self, list_id: str, member: Member, *, add: bool) -> None:
        self.audiences[list_id].apply(member, add=add)

    # -- the Google Ads API job flow -------------------------------------------------------

    def _create_job(self, customer: str, body: Json) -> _Response:
        if not self.allowlisted:
            raise _Reply(
                self._status(
                    403,
                    "PERMISSION_DENIED",
                    "CUSTOMER_NOT_ALLOWLISTED_FOR_THIS_FEATURE: Customer Match is not "
                    "available through the Google Ads API for this account.",
                )
            )
        job = body.get("job") or {}
        metadata = job.get("customerMatchUserListMetadata") or {}
        user_list = str(metadata.get("userList", ""))
        prefix = f"customers/{customer}/userLists/"
        list_id = user_list.removeprefix(prefix)
        with self.lock:
            if job.get("type") != "CUSTOMER_MATCH_USER_LIST" or list_id not in self.audiences:
                raise self._bad("The user list is not a Customer Match list of this customer.")
            if body.get("validateOnly") is True:
                return self._ok({})
            job_id = str(next(self._job_ids))
            self.jobs[job_id] = _Job(customer, list_id)
        return self._ok({"resourceName": f"customers/{customer}/offlineUserDataJobs/{job_id}"})

    def _job_call(self, customer: str, job_id: str, verb: str, body: Json) -> _Response:
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None or job.customer != customer:
                raise _Reply(self._status(404, "NOT_FOUND", "The job was not found."))
            if verb == "run":
                if job.status != "PENDING":
                    raise self._bad("OFFLINE_USER_DATA_JOB_ERROR: the job is not pending.")
                job.status, job.polls_left = "RUNNING", self.job_polls
                return self._ok({"name": f"customers/{customer}/operations/{job_id}"})
            if job.status != "PENDING":
                raise self._bad("OFFLINE_USER_DATA_JOB_ERROR: operations go to a pending job.")
        errors: list[Json] = []
        accepted: list[tuple[str, Member]] = []
        for n, operation in enumerate(body.get("operations") or []):
            ((verb_name, data),) = operation.items()
            identifiers, message = _ads_member(data)
            if message:
                errors.append(
                    {
                        "errorCode": {"offlineUserDataJobError": "INVALID_SHA256_FORMAT"},
                        "message": message,
                        "location": {
                            "fieldPathElements": [{"fieldName": "operations", "index": n}]
                        },
                    }
                )
            else:
                accepted.append((verb_name, identifiers))
        if errors and body.get("enablePartialFailure") is not True:
            raise self._bad("Request contains an invalid argument.")
        with self.lock:
            job.operations += accepted
        answer: Json = {}
        if errors:
            answer["partialFailureError"] = {
                "code": 3,
                "message": f"{len(errors)} operation(s) failed",
                "details": [
                    {
                        "@type": _ADS_FAILURE,
                        "errors": errors,
                    }
                ],
            }
        return self._ok(answer)

    def _search(self, customer: str, body: Json) -> _Response:
        match = re.search(r"resource_name = '([^']+)'", str(body.get("query", "")))
        job_id = match.group(1).rpartition("/")[2] if match else ""
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None:
                return self._ok({"results": []})
            if job.status == "RUNNING":
                if job.polls_left > 0:
                    job.polls_left -= 1
                else:
                    for verb_name, member in job.operations:
                        self._apply(job.user_list, member, add=verb_name == "create")
                    job.status = "SUCCESS"
            row = {
                "resourceName": f"customers/{customer}/offlineUserDataJobs/{job_id}",
                "status": job.status,
            }
        return self._ok({"results": [{"offlineUserDataJob": row}]})


def _violation(at: str, reason: str, description: str = "") -> Json:
    return {"field": at, "description": description or reason, "reason": reason}


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


def _hash_reason(encoding: str) -> str:
    return "INVALID_HEX_ENCODING" if encoding == "HEX" else "INVALID_BASE64_ENCODING"


def _digest(value: Any, encoding: str) -> str | None:
    """The lower-case hex SHA-256 digest ``value`` encodes, or None when it is no hash."""
    if not isinstance(value, str):
        return None
    if encoding == "HEX":
        return value if _HEX64.match(value) else None
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 32 else None


def _ads_member(data: Any) -> tuple[Member, str | None]:
    ids = data.get("userIdentifiers") if isinstance(data, dict) else None
    if not isinstance(ids, list) or not ids or len(ids) > 20:
        return frozenset(), "TOO_MANY_USER_IDENTIFIERS or none"
    found: set[str] = set()
    for identifier in ids:
        ((kind, value),) = identifier.items()
        if kind in ("hashedEmail", "hashedPhoneNumber"):
            if not (isinstance(value, str) and _HEX64.match(value)):
                return frozenset(), f"{kind} is not a SHA-256 hex digest"
            found.add(f"{'email' if kind == 'hashedEmail' else 'phone'}:{value}")
        elif kind == "addressInfo":
            first, last = value.get("hashedFirstName"), value.get("hashedLastName")
            if not all(isinstance(v, str) and _HEX64.match(v) for v in (first, last)):
                return frozenset(), "address names must be SHA-256 hex digests"
            found.add(
                f"address:{first}|{last}|{value.get('countryCode')}|{value.get('postalCode')}"
            )
        else:
            return frozenset(), f"unknown identifier {kind}"
    return frozenset(found), None
