"""The session's consent audit (tests/consent_audit.py) finds what it is there to find."""

from __future__ import annotations

from typing import Any

from syncd.sandbox.destinations.base import DestRequest
from tests.consent_audit import _Said, violations

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
