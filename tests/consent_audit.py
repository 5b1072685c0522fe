"""The consent audit of a test session: no person without the consent a sync needs appears
in any request an ESP sandbox (Klaviyo, Mailchimp) or an ad-platform sandbox (Google)
received, and no ad-platform request carries a plaintext email, phone or name.

Tests say whom their stores gave consent (``ConsentLedger.grant`` / ``withdraw``), in
terms of the fixtures they build, independently of how syncd reads consent. Every
request of every destination sandbox is journaled (``DestinationSandbox.journal``) with
the test it belongs to, its User-Agent (syncd's clients send ``syncd/<version>``; a
test probing the sandbox with a bare client is not syncd sending) and the adapter's
``X-Syncd-Consent`` header: the consent rule of the sync it was sent for. At the end of
the session (``tests/conftest.py``) each address in an ESP request's body must have, in
the same test and before that request, a latest statement granting the header's channel.
Exempt: requests of syncs declared ``consent = "none"`` (the header says so) and
requests that take people out (an unsubscribe, a list removal, a deletion):
withdrawing someone names them.

Ad platforms get identifiers hashed: a hashed email in an ad request that adds people
must be the hash (as that platform normalizes and encodes it) of an address granted
``ads`` consent, and :func:`plaintext_findings` lists every ad request in which an email
address or an E.164 phone appears in clear, or a field that must hold a hash does not.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from syncd.identity import GOOGLE, sha256_hex
from syncd.sandbox.destinations import DestinationSandbox
from syncd.sandbox.destinations.base import DestRequest

ESP_VENDORS = ("klaviyo", "mailchimp")
AD_VENDORS = ("google",)
# Fields of an ad request that hold a hashed identifier (Data Manager UserIdentifier and
# AddressInfo; Google Ads UserIdentifier and OfflineUserAddressInfo).
HASHED_FIELDS = frozenset(
    {
        "emailAddress",
        "phoneNumber",
        "givenName",
        "familyName",
        "hashedEmail",
        "hashedPhoneNumber",
        "hashedFirstName",
        "hashedLastName",
    }
)
_HASH = re.compile(r"^(?:[0-9a-f]{64}|[A-Za-z0-9+/]{43}=)$")
_PHONE = re.compile(r"\+\d{7,15}\b")
_EMAIL = re.compile(r"[^@\s\"'<>]+@[^@\s\"'<>]+\.[A-Za-z]{2,}")
# Requests that remove, unsubscribe or erase: they name people who must not get mail.
_TAKING_OUT = (
    re.compile(r"^/api/profile-subscription-bulk-delete-jobs/?$"),
    re.compile(r"^/api/data-privacy-deletion-jobs/?$"),
    re.compile(r"/actions/delete-permanent/?$"),
)


@dataclass(frozen=True)
class _Said:
    test: str
    position: int  # the journal's length when it was said: requests after it see it
    channel: str
    address: str
    granted: bool


class ConsentLedger:
    """What the tests' stores say about consent, in the order they say it."""

    said: ClassVar[list[_Said]] = []

    @classmethod
    def grant(cls, channel: str, *addresses: str | None) -> None:
        cls._say(channel, addresses, True)

    @classmethod
    def withdraw(cls, channel: str, *addresses: str | None) -> None:
        cls._say(channel, addresses, False)

    @classmethod
    def _say(cls, channel: str, addresses: Sequence[str | None], granted: bool) -> None:
        journal = DestinationSandbox.journal
        position = 0 if journal is None else len(journal)
        for address in addresses:
            if address:
                cls.said.append(
                    _Said(
                        DestinationSandbox.journal_tag,
                        position,
                        channel,
                        address.strip().lower(),
                        granted,
                    )
                )


def _addresses(body: Any) -> Iterator[str]:
    """Every email address a request body names, outside what takes people out."""
    if isinstance(body, str):
        text = body.strip().lower()
        if _EMAIL.fullmatch(text):
            yield text
    elif isinstance(body, list):
        for value in body:
            yield from _addresses(value)
    elif isinstance(body, dict):
        if str(body.get("status", "")).lower() == "unsubscribed":
            return  # a Mailchimp member set unsubscribed
        for key, value in body.items():
            if key != "members_to_remove":  # a Mailchimp tag removal
                yield from _addresses(value)


def _strings(body: Any, key: str = "") -> Iterator[tuple[str, str]]:
    """Every string of a request body with the key it sits under."""
    if isinstance(body, str):
        yield key, body
    elif isinstance(body, list):
        for value in body:
            yield from _strings(value, key)
    elif isinstance(body, dict):
        for name, value in body.items():
            yield from _strings(value, str(name))


def plaintext_findings(journal: Sequence[tuple[str, DestRequest]]) -> list[str]:
    """Each ad-platform request with a plaintext email or phone, or a value that is no
    hash where a hash is required, in words (never quoting the value)."""
    found: list[str] = []
    for test, request in journal:
        if request.vendor not in AD_VENDORS or request.body is None:
            continue
        for key, text in _strings(request.body):
            if key in HASHED_FIELDS and not _HASH.match(text):
                found.append(f"{test}: {request.vendor} {request.path}: {key} is not a hash")
            elif _EMAIL.search(text) or _PHONE.search(text):
                found.append(f"{test}: {request.vendor} {request.path}: plaintext in {key}")
    return found


def _google_hashes(address: str) -> set[str]:
    """An address as the Google sandbox sees it: hex or base64 SHA-256 of Google's form."""
    normalized = GOOGLE.normalize("email", address)
    if normalized is None:
        return set()
    digest = sha256_hex(normalized)
    return {digest, base64.b64encode(bytes.fromhex(digest)).decode()}


def _ad_hashed_emails(request: DestRequest) -> set[str]:
    """The hashed emails of an ad request that adds people (nothing for a removal)."""
    if request.vendor != "google" or request.path.endswith(":remove"):
        return set()
    body = request.body if isinstance(request.body, dict) else {}
    if request.path.endswith(":addOperations"):
        adding = [op["create"] for op in body.get("operations") or [] if "create" in op]
        return {t for k, t in _strings(adding) if k == "hashedEmail"}
    return {t for k, t in _strings(body.get("audienceMembers")) if k == "emailAddress"}


def _takes_out(request: DestRequest) -> bool:
    return request.method == "DELETE" or any(p.search(request.path) for p in _TAKING_OUT)


def violations(journal: Sequence[tuple[str, DestRequest]], said: Sequence[_Said]) -> list[str]:
    """Each ESP request naming someone without the consent its sync needs, in words."""
    latest: dict[tuple[str, str, str], list[_Said]] = {}
    for entry in said:
        latest.setdefault((entry.test, entry.channel, entry.address), []).append(entry)
    found: list[str] = []
    for position, (test, request) in enumerate(journal):
        if request.vendor not in (*ESP_VENDORS, *AD_VENDORS) or _takes_out(request):
            continue
        if not (request.user_agent or "").startswith("syncd/"):
            continue  # a test probing the sandbox itself, not syncd sending
        if request.vendor in AD_VENDORS:
            found += _ad_violations(test, position, request, latest)
            continue
        named = set(_addresses(request.body))
        if not named or request.consent == "none":
            continue
        channel = request.consent
        for address in sorted(named):
            if channel is None:
                found.append(
                    f"{test}: {request.vendor} {request.method} {request.path} names "
                    f"{address} without an X-Syncd-Consent header"
                )
                continue
            before = [s for s in latest.get((test, channel, address), []) if s.position <= position]
            if not before or not before[-1].granted:
                found.append(
                    f"{test}: {request.vendor} {request.method} {request.path} names "
                    f"{address}, who has no {channel} consent"
                )
    return found


def _ad_violations(
    test: str,
    position: int,
    request: DestRequest,
    latest: dict[tuple[str, str, str], list[_Said]],
) -> list[str]:
    """An ad request adding a hashed email that no address granted ads consent hashes to."""
    hashed = _ad_hashed_emails(request)
    if not hashed or request.consent == "none":
        return []
    granted: set[str] = set()
    for (said_test, channel, address), entries in latest.items():
        before = [s for s in entries if s.position <= position]
        if said_test == test and channel == "ads" and before and before[-1].granted:
            granted |= _google_hashes(address)
    strangers = len(hashed - granted)
    if not strangers:
        return []
    return [
        f"{test}: {request.vendor} {request.method} {request.path} adds {strangers} hashed "
        "email(s) of no one with ads consent"
    ]
