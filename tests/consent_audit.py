"""The consent audit of a test session: no person without the consent a sync needs appears
in any request an ESP sandbox (Klaviyo, Mailchimp) received.

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

Ad platforms (Meta, Google) are sent people hashed: a request names an address when it
carries the address's SHA-256, and the same consent rule holds. And no ad-platform
request may carry a plaintext email, phone or name (:func:`plaintext_leaks`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from syncd.sandbox.destinations import DestinationSandbox
from syncd.sandbox.destinations.base import DestRequest

ESP_VENDORS = ("klaviyo", "mailchimp")
AD_VENDORS = ("meta", "google")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# A phone number in international form ("+49 30 1234567", E.164): never sent plain. (Bare
# digit strings are account and audience ids too; a Meta PHONE is checked by its key.)
_PHONE = re.compile(r"^\+\d[\d ()./-]{6,20}$")
# Meta's customer-file keys sent unhashed (Custom Audiences guide): EXTERN_ID and MADID.
_META_UNHASHED = frozenset({"EXTERN_ID", "MADID"})
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


def _strings(body: Any) -> Iterator[str]:
    if isinstance(body, str):
        yield body
    elif isinstance(body, list):
        for value in body:
            yield from _strings(value)
    elif isinstance(body, dict):
        for value in body.values():
            yield from _strings(value)


def _hashed_addresses(body: Any, said: Sequence[_Said]) -> set[str]:
    """The addresses of ``said`` whose SHA-256 an ad-platform request body carries."""
    hashes = {text for text in _strings(body) if _SHA256.match(text)}
    return {
        entry.address
        for entry in said
        if hashlib.sha256(entry.address.encode()).hexdigest() in hashes
    }


def plaintext_leaks(journal: Sequence[tuple[str, DestRequest]]) -> list[str]:
    """Each ad-platform request that carried a plaintext email, phone or name, in words:
    an email or phone anywhere in its body, and in a Meta customer file any value of a
    hashed key that is not 64 lower-case hex characters."""
    found: list[str] = []
    for test, request in journal:
        if request.vendor not in AD_VENDORS or request.body is None:
            continue
        where = f"{test}: {request.vendor} {request.method} {request.path}"
        for text in _strings(request.body):
            if _EMAIL.search(text) or _PHONE.match(text):
                found.append(f"{where} carries {text!r} in plaintext")
        payload = request.body.get("payload") if isinstance(request.body, dict) else None
        if request.vendor == "meta" and isinstance(payload, dict):
            schema = payload.get("schema")
            keys = [schema] if isinstance(schema, str) else schema or []
            for row in payload.get("data") or []:
                for key, value in zip(keys, row if isinstance(row, list) else [], strict=False):
                    if key not in _META_UNHASHED and value and not _SHA256.match(str(value)):
                        found.append(f"{where} carries {key} {value!r} unhashed")
    return found


def _takes_out(request: DestRequest) -> bool:
    return request.method == "DELETE" or any(p.search(request.path) for p in _TAKING_OUT)


def violations(journal: Sequence[tuple[str, DestRequest]], said: Sequence[_Said]) -> list[str]:
    """Each ESP request naming someone without the consent its sync needs, in words."""
    latest: dict[tuple[str, str, str], list[_Said]] = {}
    for entry in said:
        latest.setdefault((entry.test, entry.channel, entry.address), []).append(entry)
    found: list[str] = []
    for position, (test, request) in enumerate(journal):
        if request.vendor not in ESP_VENDORS + AD_VENDORS or _takes_out(request):
            continue
        if not (request.user_agent or "").startswith("syncd/"):
            continue  # a test probing the sandbox itself, not syncd sending
        if request.vendor in AD_VENDORS:
            named = _hashed_addresses(request.body, [s for s in said if s.test == test])
        else:
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
