from __future__ import annotations

import pytest

from syncd.identity import (
    GOOGLE,
    META,
    PLAIN,
    PROFILES,
    e164,
    email_key,
    identifier_text,
    normalize_country,
    normalize_email,
    normalize_phone,
    phone_digits,
    sha256_hex,
)


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


# --- identifiers and per-platform profiles ------------------------------------------------
# Every digest below was computed by hand (printf '%s' VALUE | sha256sum), not with syncd.


def test_identifier_text_and_email_key() -> None:
    assert identifier_text("  ext-42 ") == "ext-42"
    assert identifier_text(42) == "42"
    assert identifier_text(True) is None
    assert identifier_text("   ") is None
    assert identifier_text(None) is None
    assert email_key("  Ada@Example.COM ") == "ada@example.com"


def test_e164_needs_a_country_code_or_a_country() -> None:
    assert e164("+1 (650) 555-1234") == "+16505551234"
    assert e164("(650) 555-1234") is None  # national format and no country: can't tell
    assert e164("(650) 555-1234", "US") == "+16505551234"
    assert phone_digits("+1 (650) 555-1234") == "16505551234"
    assert phone_digits("0049 30 1234567", "DE") == "49301234567"  # no leading zeros
    assert phone_digits("n/a", "US") is None


def test_meta_doc_examples_normalize_and_hash_to_the_documented_digests() -> None:
    # Meta Marketing API, Custom Audiences, "Hashing and normalization": the doc's own
    # example digests of an email and of a phone in digits-only form.
    assert META.prepare("email", "  Mary@Example.com ") == (
        "f1904cf1a9d73a55fa5de0ac823c4403ded71afd4c3248d00bdcd0866552bb79"
    )
    assert sha256_hex("15559876543") == (
        "1ef970831d7963307784fa8688e8fce101a15685d62aa765fed23f3a2c576a4e"
    )
    # A real number the same way: digits only, country code, no "+".
    assert META.normalize("phone", "+1 (650) 555-1234") == "16505551234"
    assert META.prepare("phone", "+1 (650) 555-1234") == (
        "6069d14bf122fdfd931dc7beb58e5dfbba395b1faf05bdcd42d12358d63d8599"
    )


def test_meta_names_places_and_codes() -> None:
    assert META.normalize("first_name", " Mary-Ann ") == "maryann"
    assert META.prepare("first_name", "Mary-Ann") == (
        "16b3f07f0ec2f9dd127b71dc2e6c791b7d93116a1c3bc99d057eaa7a8a077e73"
    )
    assert META.normalize("last_name", "José") == "josé"  # UTF-8 letters stay
    assert META.normalize("city", "San Francisco") == "sanfrancisco"
    assert META.prepare("city", "San Francisco") == (
        "1a6bd4d9d79dc0a79b53795c70d3349fa9e38968a3fbefbfe8783efb1d2b6aac"
    )
    assert META.normalize("region", "CA") == "ca"
    assert META.normalize("postcode", "94103-1234", country="us") == "94103"
    assert META.prepare("postcode", "94103-1234", country="US") == (
        "91dc2519ea98c5002cf2091e6a12b772eafdce9dca618e626d7d3b8275361789"
    )
    assert META.normalize("postcode", "SW1A 1AA", country="GB") == "sw1a1aa"
    assert META.prepare("country", " US ") == (
        "79adb2a2fce5c6ba215fe5f27f532d4e7edbac4b6a5e09e1ef3a08084a904621"
    )
    assert META.prepare("external_id", " crm-42 ") == "crm-42"  # never hashed
    assert META.prepare("email", "not-an-email") is None


def test_google_doc_examples() -> None:
    # Google Ads API Customer Match example (add_customer_match_user_list.py): the phone
    # in E.164 with its "+", hashed.
    assert GOOGLE.normalize("phone", "+1 800 5550101") == "+18005550101"
    assert GOOGLE.prepare("phone", "+1 800 5550101") == (
        "61d6c2976b5d92b1ad63073a12fddd26040cd980067d03a93dd1cc50f1a3ac68"
    )
    assert GOOGLE.prepare("email", "Dana@Example.com") == (
        "07e2f1394b0ea80e2adca010ea8318df697001a005ba7452720edda4b0ce57b3"
    )
    # gmail.com / googlemail.com only: dots and a +tag of the local part go.
    assert GOOGLE.normalize("email", " Jane.Doe+news@GMail.com") == "janedoe@gmail.com"
    assert GOOGLE.prepare("email", "jane.doe@gmail.com") == (
        "d6117306485ed0e50afab3ac871e98f81699151f30281527d63ff5f233656c69"
    )
    assert GOOGLE.normalize("email", "jane.doe+news@example.com") == "jane.doe+news@example.com"
    assert GOOGLE.prepare("first_name", " Mary ") == (
        "6915771be1c5aa0c886870b6951b03d7eafc121fea0e80a5ea83beb7c449f4ec"
    )
    # The address's country and postal code go unhashed.
    assert GOOGLE.prepare("country", "us") == "US"
    assert GOOGLE.prepare("postcode", " 94103 ") == "94103"


def test_plain_is_what_klaviyo_and_mailchimp_are_sent() -> None:
    assert PLAIN.prepare("email", " Ada@Example.COM ") == "ada@example.com"
    assert PLAIN.prepare("phone", "+44 20 7946 0958") == "+442079460958"
    assert PLAIN.prepare("first_name", "  Ada ") == "Ada"
    assert PLAIN.prepare("country", "gb") == "GB"
    assert set(PROFILES) == {"plain", "meta", "google"}
