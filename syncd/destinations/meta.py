"""Meta Custom Audiences: a segment as a customer-list custom audience, hashed.

A mirror sync adds the segment's entrants to the audience and removes its leavers, through
``POST`` / ``DELETE /{audience_id}/users`` (Marketing API reference, "Custom Audience
Users", developers.facebook.com/docs/marketing-api/reference/custom-audience/users): at
most 10,000 rows a request, each row one person as a list of values in the order of the
request's ``schema``. The schema is built from the sync's fields, whose names are Meta's
keys (``EMAIL``, ``PHONE``, ``FN``, ``LN``, ``CT``, ``ST``, ``ZIP``, ``COUNTRY``,
``EXTERN_ID``): several keys per person raise the match rate. Every value but
``EXTERN_ID`` leaves normalized and SHA-256 hashed by :data:`syncd.identity.META`
(Custom Audiences guide, "Hashing and normalization",
developers.facebook.com/docs/marketing-api/audiences/guides/custom-audiences); the
``COUNTRY`` field is also the billing country a national-format phone is read in.

Meta does not say which rows it could not use: it answers ``num_received`` and
``num_invalid_entries`` per request, which go into the run's :class:`MatchReport` with
how many rows carried an email, a phone, a name and postcode.

Errors come as ``{"error": {"message", "type", "code", "error_subcode", "fbtrace_id"}}``,
most of them with HTTP 400 (Graph API "Handling errors",
developers.facebook.com/docs/graph-api/guides/error-handling). The throttling codes (4 app
limit, 17 user limit, 32 page limit, 613 calls within a time window, 80000-80014 the
Business Use Case limits, 80003 the custom-audience one) are transient: retried with
back-off by ``syncd.http`` through :class:`MetaClient`, which also reads
``X-Business-Use-Case-Usage`` and pauses before Meta blocks (Marketing API "Rate
Limiting", developers.facebook.com/docs/marketing-api/overview/rate-limiting). Code 100
("Invalid parameter") refuses the batch's content, except subcode 33 (the audience does
not exist or the token cannot see it) and 1713230 (a flagged audience): those, like 190
(token) and 200/10/294 (permissions), fail the run at once.
"""

from __future__ import annotations

import functools
import re
import secrets
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any, ClassVar, Final

import httpx
import orjson
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from syncd.destinations.base import (
    Destination,
    Handler,
    Item,
    MatchReport,
    Op,
    Outcome,
    Person,
    Receipt,
    ReplaceRestart,
    SyncTarget,
)
from syncd.http import ApiError, ServiceClient, ServiceLimits
from syncd.identity import META, Kind

__all__ = ["MetaClient", "MetaDestination", "MetaOptions", "buc_pause", "meta_rows"]

# The current Graph API version of the Marketing API SDK (facebook-python-business-sdk,
# facebook_business/apiconfig.py): a mapping's `api_version` option picks another.
DEFAULT_API_VERSION: Final = "v25.0"
# "You can add an unlimited number of records for an audience, but only a maximum of
# 10000 at a time" (Custom Audience Users reference).
MAX_ROWS: Final = 10_000

# Meta's customer-file keys syncd can fill, in the order a schema lists them, and the
# identifier kind of syncd.identity that normalizes each (Custom Audiences guide, "Hashing
# and normalization": EXTERN_ID is the one sent unhashed).
KEYS: Final[Mapping[str, Kind]] = {
    "EMAIL": "email",
    "PHONE": "phone",
    "FN": "first_name",
    "LN": "last_name",
    "CT": "city",
    "ST": "region",
    "ZIP": "postcode",
    "COUNTRY": "country",
    "EXTERN_ID": "external_id",
}

# Graph API error codes that mean "slow down", not "this request is wrong" (Marketing API
# "Rate Limiting" and Graph API "Handling errors"): 4 application limit, 17 user limit
# (subcode 2446079 for the Marketing API), 32 page limit, 613 calls within a time window
# (subcode 1487742), 80000-80014 the Business Use Case family (80003: custom audiences).
THROTTLING_CODES: Final = frozenset({4, 17, 32, 613, *range(80000, 80015)})
# usersreplace: "an update is already in progress on this audience" (error 2650, subcode
# 1870145; Custom Audiences guide, "Replace users"): it passes when the other session ends.
REPLACE_IN_PROGRESS: Final = (2650, 1870145)
# usersreplace answers (error 2650) after which the session takes no more batches: 1870158
# the session's 90 minutes are over, 1870147 a first batch_seq other than 1 (Meta never
# opened the session), 1870159 the session already finished (Custom Audiences guide,
# "Replace users"). A new session starts the replace again.
SESSION_OVER: Final = frozenset({1870158, 1870147, 1870159})
# "A session ... automatically closes 90 minutes after the first batch; batches received
# later are discarded": syncd resumes a cut-off session only well within that.
SESSION_SECONDS: Final = 90 * 60
_RESUME_MARGIN: Final = 10 * 60
# Code 100 subcodes that are not the batch's content: 33 the object does not exist (or
# the token may not see it), 1713230 an audience flagged for integrity review (Custom
# Audience Users reference, "Flagged custom and lookalike audiences").
_NOT_CONTENT: Final = frozenset({33, 1713230})
_VERSION = re.compile(r"^v\d+\.\d+$")
_AUDIENCE_ID = re.compile(r"^\d+$")


def meta_error(body: Any) -> tuple[int | None, int | None]:
    """(code, error_subcode) of a Graph API error body, or Nones."""
    error = body.get("error") if isinstance(body, Mapping) else None
    if not isinstance(error, Mapping):
        return None, None
    code, sub = error.get("code"), error.get("error_subcode")
    return (
        code if isinstance(code, int) else None,
        sub if isinstance(sub, int) else None,
    )


def buc_pause(header: str | None, threshold: float = 75.0, slow: float = 30.0) -> float | None:
    """Seconds to pause from an ``X-Business-Use-Case-Usage`` header.

    The header is JSON: per business id, a list of ``{type, call_count, total_cputime,
    total_time, estimated_time_to_regain_access}``, the first three the percentage of the
    hourly limit used, the last the minutes until a blocked business may call again
    (Marketing API "Rate Limiting"). Blocked: wait that long. Past ``threshold`` percent
    in any measure: wait up to ``slow`` seconds, growing linearly to 100 %, so syncd
    spreads its calls out instead of running into the block.
    """
    if not header:
        return None
    try:
        usage = orjson.loads(header)
    except orjson.JSONDecodeError:
        return None
    pause = 0.0
    entries = (
        [e for v in usage.values() if isinstance(v, list) for e in v]
        if isinstance(usage, dict)
        else []
    )
    for entry in entries:
        if not isinstance(entry, Mapping):
            continue
        regain = entry.get("estimated_time_to_regain_access")
        if isinstance(regain, int | float) and regain > 0:
            pause = max(pause, float(regain) * 60)
        used = [
            float(entry[k])
            for k in ("call_count", "total_cputime", "total_time")
            if isinstance(entry.get(k), int | float)
        ]
        top = max(used, default=0.0)
        if top >= threshold:
            share = min(1.0, (top - threshold) / max(1.0, 100.0 - threshold))
            pause = max(pause, slow * max(share, 0.1))
    return pause or None


class MetaClient(ServiceClient):
    """The Graph API's client: its throttling codes are retried, its usage header read."""

    # Percent of a Business Use Case limit past which syncd slows down, and the pause at
    # 100 % (seconds).
    slow_down_at: ClassVar[float] = 75.0
    slow_down_pause: ClassVar[float] = 30.0

    def is_transient(self, response: httpx.Response) -> bool:
        if super().is_transient(response):
            return True
        if response.status_code not in (400, 403):
            return False
        try:
            code, sub = meta_error(orjson.loads(response.content))
        except orjson.JSONDecodeError:
            return False
        return code in THROTTLING_CODES or (code, sub) == REPLACE_IN_PROGRESS

    def rate_limit_pause(self, response: httpx.Response) -> float | None:
        return buc_pause(
            response.headers.get("X-Business-Use-Case-Usage"),
            self.slow_down_at,
            self.slow_down_pause,
        )


class MetaOptions(BaseModel):
    """The mapping's ``[options]``: the Graph API version, and the ad account audiences
    are made in (``syncd meta create-audience``)."""

    model_config = ConfigDict(extra="forbid")

    api_version: str = Field(default=DEFAULT_API_VERSION, pattern=_VERSION.pattern)
    ad_account_id: str | None = Field(default=None, pattern=r"^(act_)?\d+$")


def prepared(payload: Mapping[str, Any]) -> dict[str, str]:
    """A mapped row's values as Meta takes them (normalized, hashed but EXTERN_ID), by key;
    keys the person has no usable value for are left out. ``COUNTRY`` is also the billing
    country a national-format phone is read in."""
    country = payload.get("COUNTRY")
    hint = country if isinstance(country, str) else None
    out: dict[str, str] = {}
    for key, value in payload.items():
        kind = KEYS.get(key)
        if kind is None or value is None:
            continue
        if key in _REPEATING and isinstance(value, str | int):
            sent = _repeating(kind, value, hint)
        else:
            sent = META.prepare(kind, value, country=hint)
        if sent:
            out[key] = sent
    return out


# Keys whose values repeat across an audience (a country, a postcode, a surname): each
# distinct value is normalized and hashed once.
_REPEATING: Final = frozenset({"LN", "CT", "ST", "ZIP", "COUNTRY"})


@functools.lru_cache(maxsize=65536)
def _repeating(kind: Kind, value: str | int, country: str | None) -> str | None:
    return META.prepare(kind, value, country=country)


def rows_of(people: Sequence[Mapping[str, str]]) -> tuple[list[str], list[list[str]]]:
    """One request's schema (the keys any row carries, in :data:`KEYS` order) and rows
    (``""`` where a person lacks a key: "unknown key → empty string", Custom Audiences
    guide)."""
    present = {k for person in people for k in person}
    schema = [k for k in KEYS if k in present]
    return schema, [[person.get(k, "") for k in schema] for person in people]


def meta_rows(items: Sequence[Item]) -> tuple[list[str], list[list[str]], MatchReport]:
    """The schema and rows of ``items``' payloads, and what the rows carry."""
    people = [prepared(item.payload) for item in items]
    report = MatchReport()
    for person in people:
        for kind, keys in _CARRYING.items():
            if all(person.get(k) for k in keys):
                report.carrying[kind] += 1
    schema, rows = rows_of(people)
    return schema, rows, report


def member_id(person: Mapping[str, str]) -> str:
    """What syncd keeps as the record's ``dest_id``: the keys Meta matches the person on
    (hashed email and phone, the external id; the whole row when none), as JSON. A removal
    sends exactly these, so a person who left is taken out as they were added, even when
    their address has changed since, and no plaintext is kept for it."""
    keys = {k: v for k, v in person.items() if k in _MATCH_KEYS} or dict(person)
    return orjson.dumps(keys).decode()


def _member(item: Item) -> dict[str, str]:
    """The values a removal sends for ``item``: its member id, else its payload's."""
    if item.dest_id:
        try:
            kept = orjson.loads(item.dest_id)
        except orjson.JSONDecodeError:
            kept = None
        if isinstance(kept, dict) and all(k in KEYS for k in kept):
            return {str(k): str(v) for k, v in kept.items()}
    return prepared(item.payload)


_MATCH_KEYS: Final = ("EMAIL", "PHONE", "EXTERN_ID")
# What a match rate is made of (issue: the share of members carrying each identifier).
_CARRYING: Final[Mapping[str, tuple[str, ...]]] = {
    "email": ("EMAIL",),
    "phone": ("PHONE",),
    "name_postcode": ("FN", "LN", "ZIP"),
}


def _audience_target(audience: str) -> SyncTarget:
    """A target naming just an audience (erasure works outside any sync)."""
    return SyncTarget(name="forget", mode="mirror", object=audience, options=MetaOptions())


class MetaDestination(Destination):
    """A Meta ad account's customer-list custom audiences (``object``: the audience id)."""

    type = "meta"
    modes = frozenset({"mirror", "replace"})
    max_batch: ClassVar[Mapping[str, int]] = {
        "add": MAX_ROWS,
        "remove": MAX_ROWS,
        "replace": MAX_ROWS,
    }
    consent_channel = "ads"
    credential_names = ("access_token",)
    # The custom_audience Business Use Case allows about 190,000 calls an hour per ad
    # account with standard access, 5,000 in development (Marketing API "Rate Limiting"):
    # a few requests of 10,000 rows at a time stay far below either; MetaClient reads the
    # usage header for the rest.
    default_limits = ServiceLimits(concurrency=2, requests_per_second=2.0)
    Options = MetaOptions
    object_required = frozenset({"mirror", "replace"})
    object_help = (
        "the custom audience id; `syncd meta create-audience NAME` makes one and prints it"
    )
    client_class = MetaClient
    reports_match = True
    # Meta delivers ads to a custom audience only once about 100 of its people are
    # matched (Custom Audiences guide; Ads Manager's audience size rule): the pre-flight
    # warns below it.
    min_audience = 100

    @classmethod
    def default_base_url(cls, credentials: Mapping[str, SecretStr]) -> str:
        return "https://graph.facebook.com"

    @classmethod
    def headers(cls, credentials: Mapping[str, SecretStr]) -> dict[str, str]:
        # The token as an OAuth 2.0 bearer header (RFC 6750 §2.1) rather than the
        # `access_token` parameter the Business SDK sends (facebook_business/api.py): it
        # never reaches a URL, and so no log line. The Graph API takes either; that it
        # reads the header is from its behaviour, not a reference page.
        return {"Authorization": f"Bearer {credentials['access_token'].get_secret_value()}"}

    @classmethod
    def check_credentials(cls, credentials: Mapping[str, SecretStr]) -> str | None:
        token = credentials["access_token"].get_secret_value().strip()
        if not token:
            return "access_token is empty: a system user's token (Business Settings)"
        return None

    def setup(self) -> None:
        self._session: dict[str, Any] | None = None

    def handlers(self) -> Mapping[Op, Handler]:
        return {"add": self._add, "remove": self._remove, "replace": self._replace}

    @property
    def version(self) -> str:
        options = self.options
        return options.api_version if isinstance(options, MetaOptions) else DEFAULT_API_VERSION

    def check(self, target: SyncTarget, op: Op, payload: Mapping[str, Any]) -> str | None:
        unknown = sorted(k for k in payload if k not in KEYS)
        if unknown:
            return f"Meta has no customer-file key {', '.join(unknown)} (use {', '.join(KEYS)})"
        country = payload.get("COUNTRY")
        hint = country if isinstance(country, str) else None
        if not any(
            META.normalize(KEYS[k], v, country=hint) for k, v in payload.items() if k != "COUNTRY"
        ):
            return "no identifier Meta can match on (email, phone, name, external id...)"
        return None

    async def prepare(self, target: SyncTarget) -> None:
        if not target.object or not _AUDIENCE_ID.match(target.object):
            raise ValueError(
                f"{target.name}: object must be the custom audience id (digits), got "
                f"{target.object!r}; `syncd meta create-audience` makes one"
            )

    # -- sending ---------------------------------------------------------------------------

    async def _add(self, target: SyncTarget, items: Sequence[Item]) -> list[Outcome]:
        schema, rows, carried = meta_rows(items)
        body = await self._users("POST", target, schema, rows)
        self._report(body, carried)
        # Meta does not say which rows it could not use (only how many): every row is
        # accepted, the invalid count goes into the match report.
        return [
            Outcome.accepted(member_id({k: v for k, v in zip(schema, row, strict=True) if v}))
            for row in rows
        ]

    async def _remove(self, target: SyncTarget, items: Sequence[Item]) -> list[Outcome]:
        people = [_member(item) for item in items]
        known = [person for person in people if person]
        if known:
            schema, rows = rows_of(known)
            await self._users("DELETE", target, schema, rows)
        return [
            Outcome.accepted()
            if person
            else Outcome.rejected("no identifier kept to remove this person by")
            for person in people
        ]

    async def _users(
        self, method: str, target: SyncTarget, schema: list[str], rows: list[list[str]]
    ) -> Any:
        assert target.object is not None  # prepare checked it
        body, _ = await self.call_json(
            method,
            f"/{self.version}/{target.object}/users",
            json={"payload": {"schema": schema, "data": rows}},
        )
        return body

    # -- audiences ---------------------------------------------------------------------------

    async def create_audience(self, name: str, description: str | None = None) -> str:
        """Make a customer-list custom audience in ``[options] ad_account_id`` and return
        its id: ``POST /act_{id}/customaudiences`` with ``subtype=CUSTOM`` and
        ``customer_file_source`` (Custom Audiences guide, "Create a Custom Audience";
        the customer data is the advertiser's own: USER_PROVIDED_ONLY)."""
        account = self.options.ad_account_id if isinstance(self.options, MetaOptions) else None
        if not account:
            raise ValueError("[options] ad_account_id is needed to create an audience")
        account = account if account.startswith("act_") else f"act_{account}"
        body, _ = await self.call_json(
            "POST",
            f"/{self.version}/{account}/customaudiences",
            json={
                "name": name,
                "subtype": "CUSTOM",
                "description": description or f"Created by syncd: {name}",
                "customer_file_source": "USER_PROVIDED_ONLY",
            },
        )
        audience = body.get("id") if isinstance(body, Mapping) else None
        if not isinstance(audience, str) or not _AUDIENCE_ID.match(audience):
            raise ApiError(self.client.service, 200, "POST", account, f"no audience id in {body!r}")
        return audience

    # -- replace: usersreplace sessions ---------------------------------------------------------

    def begin_replace(
        self, target: SyncTarget, total: int, resume: Mapping[str, Any] | None
    ) -> None:
        # A session: session_id an advertiser-chosen positive 64-bit integer unique in
        # the ad account, batch_seq from 1, last_batch_flag on the last batch,
        # estimated_num_total the rows the session will carry (Custom Audiences guide,
        # "Replace users"; usersreplace reference).
        started = resume.get("started") if resume else None
        if (
            resume
            and isinstance(started, int | float)
            and time.time() - started < SESSION_SECONDS - _RESUME_MARGIN
        ):
            self._session = {
                "session_id": int(resume["session_id"]),
                "next_seq": int(resume["next_seq"]),
                "started": float(started),
                "rows": int(resume.get("rows", 0)),
            }
        else:
            self._session = {
                "session_id": secrets.randbits(62) + 1,
                "next_seq": 1,
                "started": time.time(),
                "rows": 0,
            }
        self._session["total"] = self._session["rows"] + total

    def replace_state(self) -> dict[str, Any]:
        if self._session is None:
            raise RuntimeError("no replace session: begin_replace first")
        return {k: v for k, v in self._session.items() if k != "total"}

    async def _replace(self, target: SyncTarget, items: Sequence[Item]) -> list[Outcome]:
        session = self._session
        if session is None:
            raise RuntimeError("meta: a replace batch outside a session (begin_replace first)")
        schema, rows, carried = meta_rows(items)
        seq = session["next_seq"]
        last = session["rows"] + len(rows) >= session["total"]
        try:
            body, _ = await self.call_json(
                "POST",
                f"/{self.version}/{target.object}/usersreplace",
                json={
                    "payload": {"schema": schema, "data": rows},
                    "session": {
                        "session_id": session["session_id"],
                        "batch_seq": seq,
                        "last_batch_flag": last,
                        "estimated_num_total": session["total"],
                    },
                },
            )
        except ApiError as exc:
            code, sub = meta_error(exc.body)
            if code == 2650 and sub in SESSION_OVER:
                raise ReplaceRestart(exc.message) from exc
            raise
        session["next_seq"] = seq + 1
        session["rows"] += len(rows)
        self._report(body, carried)
        return [
            Outcome.accepted(member_id({k: v for k, v in zip(schema, row, strict=True) if v}))
            for row in rows
        ]

    def _report(self, body: Any, carried: MatchReport) -> None:
        report = self.match_report
        if report is None:
            return
        answer = body if isinstance(body, Mapping) else {}
        received, invalid = answer.get("num_received"), answer.get("num_invalid_entries")
        report.received += received if isinstance(received, int) else 0
        report.invalid += invalid if isinstance(invalid, int) else 0
        report.carrying.update(carried.carrying)

    # -- refusals --------------------------------------------------------------------------

    def is_content_refusal(self, exc: ApiError) -> bool:
        # Meta answers 400 for nearly everything; only "Invalid parameter" about the rows
        # is the batch's content. A missing audience, a bad token or a missing permission
        # is the same for every row: the run fails at once.
        if not super().is_content_refusal(exc):
            return False
        code, sub = meta_error(exc.body)
        return code == 100 and sub not in _NOT_CONTENT

    # -- erasure -----------------------------------------------------------------------------

    async def forget(
        self, person: Person, targets: Sequence[SyncTarget], fields: Collection[str]
    ) -> Receipt:
        # Meta keeps no profile syncd could delete: erasure takes the person out of every
        # audience the mapping writes, by their hashed email and phone.
        audiences = sorted({t.object for t in targets if t.object})
        payload = {k: v for k, v in (("EMAIL", person.email), ("PHONE", person.phone)) if v}
        if not payload or not audiences:
            return Receipt.not_applicable("no email or phone known, or no audience in the mapping")
        schema, rows = rows_of([prepared(payload)])
        for audience in audiences:
            await self._users("DELETE", _audience_target(audience), schema, rows)
        return Receipt.done(
            f"removed by hashed {' and '.join(k.lower() for k in schema)} from custom "
            f"audience(s) {', '.join(audiences)}"
        )
