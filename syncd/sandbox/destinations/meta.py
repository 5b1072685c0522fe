"""Meta's Graph API, the Custom Audiences part, served under ``/meta/<version>``.

Checked as Meta checks (Marketing API reference "Custom Audience Users" and the Custom
Audiences guide, developers.facebook.com/docs/marketing-api/audiences/guides/custom-audiences):
a bearer token, an existing audience, ``payload.schema`` of known keys and ``payload.data``
rows of the schema's length, at most 10,000 rows a request. A value of a hashed key that is
not 64 lower-case hex characters makes its row invalid: counted in ``num_invalid_entries``
and left out of the audience, the request still answering 200, as the live API does. Such
values are also kept in ``plaintext`` so tests can assert that none was ever sent.

The audience is a set of people, each known by the first of their EMAIL, PHONE and
EXTERN_ID values (then the whole row), so an add and a later remove of one person meet.
``POST /<audience_id>/usersreplace`` takes a ``session`` (``session_id``, ``batch_seq``
from 1, ``last_batch_flag``, ``estimated_num_total``); the session's rows become the
audience when its last batch arrives. Error 2650 with the guide's subcodes: 1870145 while
another session of the audience is open (and for ``/users`` writes meanwhile), 1870147 a
new session not starting at batch 1, 1870158 a session older than 90 minutes, 1870159 a
session already finished. A batch number sent again is taken again (inferred: the guide
does not say; syncd never relies on it, it resumes after the last acknowledged batch).

``throttle_every`` answers every n-th request with error 17 ("User request limit
reached", subcode 2446079), as Meta does: HTTP 400 with the error body. ``stall_at_seq``
holds the replace batch of that number until ``release`` is set, then answers 503 without
taking it: the batch in flight when a client is killed mid-session.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import orjson

from syncd.sandbox.destinations.base import _JSON, Json, _Request, _Response, _Vendor

if TYPE_CHECKING:
    from syncd.sandbox.destinations import DestinationSandbox

# Keys of a customer file and whether Meta wants each hashed (Custom Audiences guide,
# "Hashing and normalization"; EXTERN_ID and MADID go unhashed).
KEYS_HASHED: Final = {
    "EMAIL": True,
    "PHONE": True,
    "FN": True,
    "LN": True,
    "FI": True,
    "CT": True,
    "ST": True,
    "ZIP": True,
    "COUNTRY": True,
    "DOBY": True,
    "DOBM": True,
    "DOBD": True,
    "GEN": True,
    "EXTERN_ID": False,
    "MADID": False,
}
MAX_ROWS: Final = 10_000
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_PATH = re.compile(r"^/(v\d+\.\d+)/(\d+)/(users|usersreplace)/?$")
_CREATE = re.compile(r"^/(v\d+\.\d+)/act_(\d+)/customaudiences/?$")
SESSION_SECONDS: Final = 90 * 60
Row = tuple[tuple[str, str], ...]


@dataclass
class ReplaceSession:
    """One usersreplace session: its rows so far, and whether its last batch came."""

    id: int
    started: float
    staged: dict[str, Row] = field(default_factory=dict)
    batches: set[int] = field(default_factory=set)
    done: bool = False


_IDENTITY_KEYS: Final = ("EMAIL", "PHONE", "EXTERN_ID")


@dataclass
class MetaAudience:
    """One custom audience: its members by identity (see the module), with their rows."""

    id: str
    name: str = ""
    members: dict[str, Row] = field(default_factory=dict)
    received: int = 0
    invalid: int = 0
    sessions: dict[int, ReplaceSession] = field(default_factory=dict)

    def open_session(self, now: float) -> ReplaceSession | None:
        for session in self.sessions.values():
            if not session.done and now - session.started <= SESSION_SECONDS:
                return session
        return None

    def values(self, key: str) -> set[str]:
        """Every member's value of ``key`` (a hash, for hashed keys)."""
        return {dict(row).get(key, "") for row in self.members.values()} - {""}


class MetaSandbox(_Vendor):
    """Custom audiences of one ad account, at ``/meta/<version>/<audience_id>/users``."""

    name = "meta"
    prefix = "/meta"

    def __init__(
        self, sandbox: DestinationSandbox, access_token: str = "meta-sandbox-token"
    ) -> None:
        super().__init__(sandbox)
        self.access_token = access_token
        self.audiences: dict[str, MetaAudience] = {}
        # Values of hashed keys that were not hashes: a plaintext email or phone sent.
        self.plaintext: list[str] = []
        self.throttle_every: int | None = None
        self.stall_at_seq: int | None = None
        self.created: list[tuple[str, str]] = []  # (ad account, name) of audiences made
        self.stalled = threading.Event()
        self.release = threading.Event()
        self._count = 0

    def add_audience(self, audience_id: str, name: str = "") -> MetaAudience:
        with self.lock:
            audience = self.audiences[audience_id] = MetaAudience(audience_id, name)
        return audience

    # -- answers -----------------------------------------------------------------------------

    def _error(
        self, status: int, code: int, message: str, subcode: int | None = None, **extra: Any
    ) -> _Response:
        error: Json = {"message": message, "type": "OAuthException", "code": code}
        if subcode is not None:
            error["error_subcode"] = subcode
        error["fbtrace_id"] = "AsandboxTrace"
        error.update(extra)
        return _Response(status, orjson.dumps({"error": error}), _JSON)

    def _create(self, account: str, request: _Request) -> _Response:
        # POST /act_{id}/customaudiences: name, subtype CUSTOM, customer_file_source (Custom
        # Audiences guide, "Create a Custom Audience"); answers {"id": ...}.
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError:
            return self._error(400, 100, "Invalid parameter: the body is not JSON")
        if not isinstance(body, dict) or not body.get("name"):
            return self._error(400, 100, "Invalid parameter: name is required")
        if body.get("subtype") != "CUSTOM" or body.get("customer_file_source") not in (
            "USER_PROVIDED_ONLY",
            "PARTNER_PROVIDED_ONLY",
            "BOTH_USER_AND_PARTNER_PROVIDED",
        ):
            return self._error(400, 100, "Invalid parameter: subtype or customer_file_source")
        with self.lock:
            audience_id = str(23850000000000000 + len(self.audiences) + 1)
            self.add_audience(audience_id, str(body["name"]))
            self.created.append((account, str(body["name"])))
        return _Response(200, orjson.dumps({"id": audience_id}), _JSON)

    def _in_progress(self) -> _Response:
        return self._error(
            400,
            2650,
            "Audience update in progress: a replace session of this audience is still open",
            1870145,
        )

    def _replace(
        self,
        audience: MetaAudience,
        session: Any,
        schema: list[str],
        rows: list[list[str]],
        now: float,
    ) -> _Response:
        if not isinstance(session, dict) or not all(
            k in session for k in ("session_id", "batch_seq", "last_batch_flag")
        ):
            return self._error(
                400, 100, "Invalid parameter: session needs session_id, batch_seq, last_batch_flag"
            )
        sid, seq, last = session["session_id"], session["batch_seq"], session["last_batch_flag"]
        if not (isinstance(sid, int) and sid > 0 and isinstance(seq, int) and seq > 0):
            return self._error(
                400, 100, "Invalid parameter: session_id and batch_seq are positive integers"
            )
        if seq == self.stall_at_seq:
            self.stalled.set()
            self.release.wait(timeout=30)
            return self.server_error(503)
        with self.lock:
            current = audience.sessions.get(sid)
            if current is None:
                if seq != 1:
                    return self._error(
                        400, 2650, "The first batch of a session must have batch_seq 1", 1870147
                    )
                if audience.open_session(now) is not None:
                    return self._in_progress()
                current = audience.sessions[sid] = ReplaceSession(sid, now)
            elif current.done:
                return self._error(400, 2650, "This replace session has already finished", 1870159)
            elif now - current.started > SESSION_SECONDS:
                return self._error(
                    400, 2650, "The replace session timed out after 90 minutes", 1870158
                )
            valid, invalid = _rows(schema, rows, self.plaintext)
            current.staged.update(valid)
            current.batches.add(seq)
            audience.received += len(rows)
            audience.invalid += invalid
            if last:
                audience.members = dict(current.staged)
                current.done = True
        answer: Json = {
            "audience_id": audience.id,
            "session_id": str(sid),
            "num_received": len(rows),
            "num_invalid_entries": invalid,
            "invalid_entry_samples": {},
        }
        return _Response(200, orjson.dumps(answer), _JSON)

    def throttled(self, retry_after: str | None) -> _Response:
        # Graph API "Handling errors": code 17, subcode 2446079 for Marketing API calls.
        return self._error(400, 17, "User request limit reached", 2446079, is_transient=True)

    def handle(self, request: _Request) -> _Response:
        auth = request.headers.get("Authorization", "")
        if auth != f"Bearer {self.access_token}":
            return self._error(400, 190, "Invalid OAuth access token - Cannot parse access token")
        created = _CREATE.match(request.path)
        if created is not None and request.method == "POST":
            return self._create(created.group(2), request)
        match = _PATH.match(request.path)
        if match is None:
            return self._error(400, 2500, f"Unknown path components: {request.path}")
        with self.lock:
            self._count += 1
            if self.throttle_every and self._count % self.throttle_every == 0:
                response = self.throttled(None)
                response.fault = "throttled"
                return response
            audience = self.audiences.get(match.group(2))
        if audience is None:
            return self._error(
                400,
                100,
                f"Unsupported post request. Object with ID '{match.group(2)}' does not exist, "
                "cannot be loaded due to missing permissions, or does not support this "
                "operation",
                33,
            )
        replace = match.group(3) == "usersreplace"
        if request.method not in (("POST",) if replace else ("POST", "DELETE")):
            return self._error(400, 100, "Unsupported method")
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError:
            return self._error(400, 100, "Invalid parameter: the body is not JSON")
        payload = body.get("payload") if isinstance(body, dict) else None
        if isinstance(payload, str):  # form-style: the payload as a JSON string
            payload = orjson.loads(payload)
        problem = _payload_problem(payload)
        if problem is not None:
            return self._error(400, 100, f"Invalid parameter: {problem}")
        assert isinstance(payload, dict)
        schema: list[str] = payload["schema"]
        rows: list[list[str]] = payload["data"]
        now = self._sandbox.clock()
        if replace:
            return self._replace(audience, body.get("session"), schema, rows, now)
        with self.lock:
            if audience.open_session(now) is not None:
                return self._in_progress()
        invalid = 0
        with self.lock:
            for row in rows:
                bad = [
                    v
                    for k, v in zip(schema, row, strict=True)
                    if KEYS_HASHED[k] and v and not _SHA256.match(v)
                ]
                if bad:
                    invalid += 1
                    self.plaintext += bad
                    continue
                pairs = tuple(zip(schema, row, strict=True))
                identity = _identity(pairs)
                if identity is None:
                    invalid += 1
                elif request.method == "POST":
                    audience.members[identity] = pairs
                else:
                    audience.members.pop(identity, None)
            if request.method == "POST":
                audience.received += len(rows)
                audience.invalid += invalid
        answer: Json = {
            "audience_id": audience.id,
            "session_id": str(body.get("session", {}).get("session_id", "")) or None,
            "num_received": len(rows),
            "num_invalid_entries": invalid,
            "invalid_entry_samples": {},
        }
        return _Response(200, orjson.dumps(answer), _JSON)


def _rows(
    schema: list[str], rows: list[list[str]], plaintext: list[str]
) -> tuple[dict[str, Row], int]:
    """The valid rows by identity, and how many were invalid (bad values to ``plaintext``)."""
    valid: dict[str, Row] = {}
    invalid = 0
    for row in rows:
        bad = [
            v
            for k, v in zip(schema, row, strict=True)
            if KEYS_HASHED[k] and v and not _SHA256.match(v)
        ]
        pairs = tuple(zip(schema, row, strict=True))
        identity = _identity(pairs)
        if bad or identity is None:
            invalid += 1
            plaintext += bad
            continue
        valid[identity] = pairs
    return valid, invalid


def _identity(pairs: tuple[tuple[str, str], ...]) -> str | None:
    values = dict(pairs)
    for key in _IDENTITY_KEYS:
        if values.get(key):
            return f"{key}:{values[key]}"
    rest = [f"{k}:{v}" for k, v in pairs if v]
    return "|".join(rest) if rest else None


def _payload_problem(payload: Any) -> str | None:
    if not isinstance(payload, dict):
        return "payload must be an object with schema and data"
    schema, data = payload.get("schema"), payload.get("data")
    if isinstance(schema, str):
        schema = payload["schema"] = [schema]
    if not isinstance(schema, list) or not schema:
        return "payload.schema must name at least one key"
    unknown = [k for k in schema if k not in KEYS_HASHED]
    if unknown:
        return f"unknown schema key(s) {unknown}"
    if len(set(schema)) != len(schema):
        return "payload.schema names a key twice"
    if not isinstance(data, list) or not data:
        return "payload.data must be a non-empty list of rows"
    if len(data) > MAX_ROWS:
        return f"at most {MAX_ROWS} rows per request, got {len(data)}"
    for row in data:
        if not isinstance(row, list) or len(row) != len(schema):
            return "every row of payload.data must have one value per schema key"
        if not all(isinstance(v, str) for v in row):
            return "row values must be strings"
    return None
