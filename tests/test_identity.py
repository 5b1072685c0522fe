from __future__ import annotations

import pytest

from syncd.identity import normalize_country, normalize_email, normalize_phone


@pytest.mark.parametrize(
    ("raw", "email"),
    [
        ("john.doe@example.com", "john.doe@example.com"),
        ("  John.Doe@Example.COM ", "john.doe@example.com"),
        ("JOAO.SILVA@EXAMPLE.COM\t", "joao.silva@example.com"),
        ("", None),
        ("not-an-email", None),
        ("two@@example.com", None),
        ("a b@example.com", None),
        (None, None),
    ],
)
def test_normalize_email(raw: object, email: str | None) -> None:
    assert normalize_email(raw) == email


@pytest.mark.parametrize(
    ("raw", "country", "e164"),
    [
        ("(415) 555-0132", "US", "+14155550132"),
        ("415.555.0132", "US", "+14155550132"),
        ("+44 20 7946 0958", "GB", "+442079460958"),
        ("+44 20 7946 0958", "US", "+442079460958"),  # an explicit +CC beats the region hint
        ("020 7946 0958", "GB", "+442079460958"),
        ("0049 30 1234567", "DE", "+49301234567"),
        ("030 12345678", "DE", "+493012345678"),
        ("(11) 1111-1111", "BR", None),  # the docs' example: not a real number
        ("(555) 555-5555", "US", None),  # 555 is not an area code
        ("n/a", "US", None),
        ("", "US", None),
        ("415 555 0132", None, None),  # national format and no country: can't tell
    ],
)
def test_normalize_phone(raw: str, country: str | None, e164: str | None) -> None:
    assert normalize_phone(raw, country) == e164


def test_normalize_country() -> None:
    assert normalize_country("us") == "US"
    assert normalize_country(" GB ") == "GB"
    assert normalize_country("ZZ") is None
    assert normalize_country("USA") is None
    assert normalize_country(None) is None
