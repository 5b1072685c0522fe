"""The session's consent audit (tests/consent_audit.py) finds what it is there to find."""

from __future__ import annotations

import hashlib
from typing import Any

from syncd.sandbox.destinations.base import DestRequest
from tests.consent_audit import _Said, plaintext_leaks, violations

T = "tests/test_x.py::test_y"


def request(
    body: Any,
    *,
    consent: str | None = "email",
    path: str = "/api/profile-bulk-import-jobs",
    vendor: str = "klaviyo",
    method: str = "POST",
    agent: str = "syncd/1.0",
) -> tuple[str, DestRequest]:
    return T, DestRequest(vendor, method, path, {}, 202, None, 0, body, 0.0, consent, agent)


def said(position: int, address: str, granted: bool, test: str = T) -> _Said:
    return _Said(test, position, "email", address, granted)


BODY = {"data": {"attributes": {"profiles": {"data": [{"attributes": {"email": "A@x.com"}}]}}}}


def test_an_address_without_consent_is_found() -> None:
    assert violations([request(BODY)], []) == [
        f"{T}: klaviyo POST /api/profile-bulk-import-jobs names a@x.com, who has no email consent"
    ]


def test_consent_counts_only_before_the_request_in_the_same_test() -> None:
    assert violations([request(BODY)], [said(0, "a@x.com", True)]) == []
    # Granted after the request was made, or in another test: not consent for it.
    assert len(violations([request(BODY)], [said(1, "a@x.com", True)])) == 1
    assert len(violations([request(BODY)], [said(0, "a@x.com", True, "other")])) == 1
    # Withdrawn before it: the latest statement wins.
    granted_then_withdrawn = [said(0, "a@x.com", True), said(0, "a@x.com", False)]
    assert len(violations([request(BODY)], granted_then_withdrawn)) == 1


def test_transactional_syncs_removals_and_sandbox_probes_are_exempt() -> None:
    assert violations([request(BODY, consent="none")], []) == []
    unsubscribe = "/api/profile-subscription-bulk-delete-jobs"
    assert violations([request(BODY, path=unsubscribe)], []) == []
    mailchimp = {"members": [{"email_address": "a@x.com", "status": "unsubscribed"}]}
    assert violations([request(mailchimp, path="/lists/l1", vendor="mailchimp")], []) == []
    assert violations([request({"members_to_remove": ["a@x.com"]}, vendor="mailchimp")], []) == []
    assert violations([request(BODY, agent="python-httpx/0.28")], []) == []
    # Not an ESP: the webhook receiver is not a marketing channel.
    assert violations([request(BODY, vendor="webhook")], []) == []


def test_a_syncd_request_without_the_consent_header_is_found() -> None:
    (found,) = violations([request(BODY, consent=None)], [said(0, "a@x.com", True)])
    assert "without an X-Syncd-Consent header" in found


def _meta(schema: list[str], row: list[str]) -> tuple[str, DestRequest]:
    body = {"payload": {"schema": schema, "data": [row]}}
    return request(body, consent="ads", vendor="meta", path="/v25.0/1/users")


def test_ad_platforms_are_audited_by_the_hash_of_the_address() -> None:
    hashed = hashlib.sha256(b"a@x.com").hexdigest()
    # A hash is recognised by the addresses the test's stores name; consent withdrawn (or
    # granted on another channel only) is a violation, ads consent is not.
    ads = _Said(T, 0, "ads", "a@x.com", True)
    email_only = _Said(T, 0, "email", "a@x.com", True)
    assert violations([_meta(["EMAIL"], [hashed])], [email_only]) == [
        f"{T}: meta POST /v25.0/1/users names a@x.com, who has no ads consent"
    ]
    assert violations([_meta(["EMAIL"], [hashed])], [_Said(T, 0, "ads", "a@x.com", False)]) == [
        f"{T}: meta POST /v25.0/1/users names a@x.com, who has no ads consent"
    ]
    assert violations([_meta(["EMAIL"], [hashed])], [ads]) == []


def test_plaintext_in_an_ad_platform_request_is_found() -> None:
    hashed = hashlib.sha256(b"a@x.com").hexdigest()
    assert plaintext_leaks([_meta(["EMAIL", "EXTERN_ID"], [hashed, "1234567"])]) == []
    leaks = plaintext_leaks(
        [
            _meta(["EMAIL"], ["a@x.com"]),
            _meta(["PHONE"], ["4930123456"]),
            _meta(["FN", "EXTERN_ID"], ["mary", "7"]),
            request({"members": [{"phone": "+49 30 123456"}]}, vendor="google", consent="ads"),
        ]
    )
    assert len(leaks) == 5  # the email twice (as an email, unhashed), the phone, the name...
    assert any("'a@x.com' in plaintext" in leak for leak in leaks)
    assert any("PHONE '4930123456' unhashed" in leak for leak in leaks)
    assert any("FN 'mary' unhashed" in leak for leak in leaks)
    assert any("'+49 30 123456' in plaintext" in leak for leak in leaks)
