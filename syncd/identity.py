"""Identifiers, normalized and hashed: the one place that knows how.

Every identifier kind a destination matches people on (email, phone, first and last
name, city, state/region, postcode, country, external id) is normalized here, and
hashed here when a platform wants it hashed. A :class:`Profile` holds one platform's
rules: :data:`PLAIN` (what syncd stores and Klaviyo/Mailchimp are sent), :data:`META`
and :data:`GOOGLE` (the ad platforms' customer-list rules, each cited below). For an ad
platform a normalization slip is silent (it shows only as a lower match rate), so the
rules live in one module with tests pinned to the platforms' own examples.

Nothing here touches the store: resolving people in it is :mod:`syncd.people`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, Final, Literal, get_args

import phonenumbers

# Attribute precedence (customers.attrs_rank): a registered customer's own record beats
# the billing address of an order.
RANK_CUSTOMER_RECORD = 2
RANK_ORDER = 1

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
COUNTRIES = frozenset(phonenumbers.SUPPORTED_REGIONS) | {"XK"}


def normalize_email(value: object) -> str | None:
    """Trimmed and lower-cased; None when empty or not an address."""
    if not isinstance(value, str):
        return None
    email = value.strip().lower()
    return email if _EMAIL.match(email) else None


def normalize_country(value: object) -> str | None:
    """ISO 3166-1 alpha-2, upper case; None when not a known code."""
    if not isinstance(value, str):
        return None
    code = value.strip().upper()
    return code if code in COUNTRIES else None


# A number already in E.164 ("+", then at most 15 digits, the country code first; ITU-T
# E.164 §6): what the store keeps. Read by _e164_number, without libphonenumber's free-text
# parser (two thirds of the cost of normalizing a phone for an ad platform's upload).
_CANONICAL_E164 = re.compile(r"^\+[1-9]\d{1,14}$")


def _e164_number(text: str) -> phonenumbers.PhoneNumber | None:
    """The number of a canonical E.164 string, as ``phonenumbers.parse`` reads it when it is
    valid: country calling codes are prefix-free (E.164 §6.2), so the first 1-3 digits that
    are one are it; a national number with leading zeros (Italy) keeps them."""
    digits = text[1:]
    for size in (1, 2, 3):
        code = int(digits[:size])
        if code not in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
            continue
        national = digits[size:]
        if not national:
            return None
        number = phonenumbers.PhoneNumber(country_code=code, national_number=int(national))
        if len(national) > 1 and national[0] == "0":
            number.italian_leading_zero = True
            zeros = min(len(national) - len(national.lstrip("0")), len(national) - 1)
            if zeros > 1:
                number.number_of_leading_zeros = zeros
        return number
    return None


@lru_cache(maxsize=65536)
def normalize_phone(value: str | None, country: str | None) -> str | None:
    """E.164 (``+14155550123``) using the billing country as the region hint; None when invalid."""
    if not value or not value.strip():
        return None
    if _CANONICAL_E164.match(value):
        # Valid as it stands: the same answer as the parser's, faster. Anything else (a
        # trunk prefix after the country code, an invalid number) goes the long way.
        fast = _e164_number(value)
        if fast is not None and phonenumbers.is_valid_number(fast):
            formatted: str = phonenumbers.format_number(fast, phonenumbers.PhoneNumberFormat.E164)
            return formatted
    try:
        number = phonenumbers.parse(value, country or None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    e164: str = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return e164


def clean_text(value: object) -> str | None:
    """Trimmed text, or None for empty / non-text values."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    return text or None


def identifier_text(value: object) -> str | None:
    """An identifier as trimmed text: a number as its digits (an external id of 42), None
    for empty text, booleans and anything else."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        value = str(value)
    return clean_text(value)


def email_key(address: str) -> str:
    """The form two spellings of one address are compared in (and Mailchimp's subscriber
    hash is taken of): trimmed and lower-cased, not checked."""
    return address.strip().lower()


def e164(value: object, country: str | None = None) -> str | None:
    """A phone number in E.164 (``+14155550123``); ``country`` (ISO alpha-2) reads a
    national number. Without it, only a number with its ``+`` country code is valid."""
    text = identifier_text(value)
    return normalize_phone(text, country) if text is not None else None


def phone_digits(value: object, country: str | None = None) -> str | None:
    """E.164 without the ``+``: country code and number, digits only (``14155550123``)."""
    number = e164(value, country)
    return number[1:] if number is not None else None


def hash_hex(algorithm: str, text: str) -> str:
    """The lower-case hex digest of ``text`` (UTF-8) by ``algorithm`` (sha256, md5)."""
    return hashlib.new(algorithm, text.encode(), usedforsecurity=False).hexdigest()


def sha256_hex(text: str) -> str:
    # hashlib.sha256 rather than hashlib.new("sha256"): the named constructor skips a
    # lookup that costs a third of hashing a large audience.
    return hashlib.sha256(text.encode()).hexdigest()


# -- per-platform profiles ---------------------------------------------------------------

Kind = Literal[
    "email",
    "phone",
    "first_name",
    "last_name",
    "city",
    "region",
    "postcode",
    "country",
    "external_id",
]
KINDS: Final[tuple[Kind, ...]] = get_args(Kind)
# One rule: (value, the person's country as ISO alpha-2 or None) -> normalized or None.
Rule = Callable[[object, "str | None"], "str | None"]


@dataclass(frozen=True)
class Profile:
    """One platform's normalization per identifier kind, and the kinds it wants hashed."""

    name: str
    rules: Mapping[Kind, Rule]
    hashed: frozenset[Kind]

    def normalize(self, kind: Kind, value: object, *, country: str | None = None) -> str | None:
        """``value`` as this platform wants it before any hashing; None when unusable."""
        return self.rules[kind](value, normalize_country(country))

    def prepare(self, kind: Kind, value: object, *, country: str | None = None) -> str | None:
        """``value`` as sent: normalized, then SHA-256 hex when this platform hashes it."""
        text = self.normalize(kind, value, country=country)
        if text is None or kind not in self.hashed:
            return text
        return sha256_hex(text)


def _text_rule(value: object, country: str | None) -> str | None:
    return clean_text(value)


def _lower_rule(value: object, country: str | None) -> str | None:
    text = clean_text(value)
    return text.lower() if text is not None else None


def _letters_rule(value: object, country: str | None) -> str | None:
    # Letters only, lower-cased: no spaces, digits or punctuation. str.isalpha keeps
    # accented and non-Latin letters, which the platform takes as UTF-8.
    text = clean_text(value)
    letters = "".join(c for c in text.lower() if c.isalpha()) if text is not None else ""
    return letters or None


def _meta_postcode(value: object, country: str | None) -> str | None:
    text = identifier_text(value)
    if text is None:
        return None
    if country == "US":
        # US ZIP codes: the first five digits (a ZIP+4 "94103-1234" matches as "94103").
        digits = "".join(c for c in text if c.isdigit())[:5]
        return digits or None
    return "".join(text.lower().split()) or None


# US states, the District of Columbia and the territories by name, to their 2-letter
# ANSI/USPS codes (ANSI INCITS 38): Meta's ST key wants the code ("California" -> "ca").
_US_STATES: Final[Mapping[str, str]] = {
    "alabama": "al", "alaska": "ak", "arizona": "az", "arkansas": "ar", "california": "ca",
    "colorado": "co", "connecticut": "ct", "delaware": "de", "districtofcolumbia": "dc",
    "florida": "fl", "georgia": "ga", "hawaii": "hi", "idaho": "id", "illinois": "il",
    "indiana": "in", "iowa": "ia", "kansas": "ks", "kentucky": "ky", "louisiana": "la",
    "maine": "me", "maryland": "md", "massachusetts": "ma", "michigan": "mi",
    "minnesota": "mn", "mississippi": "ms", "missouri": "mo", "montana": "mt",
    "nebraska": "ne", "nevada": "nv", "newhampshire": "nh", "newjersey": "nj",
    "newmexico": "nm", "newyork": "ny", "northcarolina": "nc", "northdakota": "nd",
    "ohio": "oh", "oklahoma": "ok", "oregon": "or", "pennsylvania": "pa",
    "rhodeisland": "ri", "southcarolina": "sc", "southdakota": "sd", "tennessee": "tn",
    "texas": "tx", "utah": "ut", "vermont": "vt", "virginia": "va", "washington": "wa",
    "westvirginia": "wv", "wisconsin": "wi", "wyoming": "wy", "puertorico": "pr",
    "guam": "gu", "americansamoa": "as", "northernmarianaislands": "mp",
    "usvirginislands": "vi", "virginislands": "vi",
}  # fmt: skip


def _meta_region(value: object, country: str | None) -> str | None:
    # Meta's ST: "the 2-character ANSI abbreviation code in lowercase"; outside the US,
    # lower case without punctuation, special characters or spaces (Custom Audiences,
    # "Hashing and normalization"). A US state spelled out becomes its code.
    letters = _letters_rule(value, country)
    if letters is None or country not in (None, "US"):
        return letters
    return _US_STATES.get(letters, letters)


_E164: Final = re.compile(r"^\+[1-9]\d{6,14}$")


def _meta_phone(value: object, country: str | None) -> str | None:
    # Phones syncd stores are E.164 already, checked when stored (PersonAttrs): parsing
    # them again costs ~30 µs each, most of hashing a large audience. Anything else
    # (national format, spaces) is read with the person's country.
    if isinstance(value, str) and _E164.match(value):
        return value[1:]
    return phone_digits(value, country)


def _google_email(value: object, country: str | None) -> str | None:
    email = normalize_email(value)
    if email is None:
        return None
    local, _, domain = email.partition("@")
    if domain in ("gmail.com", "googlemail.com"):
        # Google's formatter drops dots and a +tag from the local part of these domains
        # only (Data Manager API formatting guide, developers.google.com/data-manager/api).
        local = local.partition("+")[0].replace(".", "")
    return f"{local}@{domain}"


PLAIN: Final = Profile(
    name="plain",
    rules={
        "email": lambda v, c: normalize_email(v),
        "phone": lambda v, c: e164(v, c),
        "first_name": _text_rule,
        "last_name": _text_rule,
        "city": _text_rule,
        "region": _text_rule,
        "postcode": lambda v, c: identifier_text(v),
        "country": lambda v, c: normalize_country(v),
        "external_id": lambda v, c: identifier_text(v),
    },
    hashed=frozenset(),
)

# Meta Marketing API, Custom Audiences, "Hashing and normalization" (developers.facebook.com
# /docs/marketing-api/audiences/guides/custom-audiences): every key but EXTERN_ID is
# normalized then SHA-256 hashed; EMAIL trimmed and lower case; PHONE digits only with the
# country code and no "+"; FN/LN and CT lower-case letters, no punctuation or spaces; ST the
# 2-letter code in lower case; ZIP lower case without spaces, US ZIPs the first 5 digits;
# COUNTRY the ISO 3166-1 alpha-2 code in lower case.
META: Final = Profile(
    name="meta",
    rules={
        "email": lambda v, c: normalize_email(v),
        "phone": _meta_phone,
        "first_name": _letters_rule,
        "last_name": _letters_rule,
        "city": _letters_rule,
        "region": _meta_region,
        "postcode": _meta_postcode,
        "country": lambda v, c: (normalize_country(v) or "").lower() or None,
        "external_id": lambda v, c: identifier_text(v),
    },
    hashed=frozenset(k for k in KINDS if k != "external_id"),
)

# Google Customer Match (Google Ads API "Customer Match" and the Data Manager API
# formatting guide, developers.google.com/data-manager/api): email, phone, first and last
# name are trimmed, lower-cased and SHA-256 hashed, the phone in E.164 with its "+"; the
# address's country code and postal code go unhashed.
GOOGLE: Final = Profile(
    name="google",
    rules={
        "email": _google_email,
        "phone": lambda v, c: e164(v, c),
        "first_name": _lower_rule,
        "last_name": _lower_rule,
        "city": _lower_rule,
        "region": _lower_rule,
        "postcode": lambda v, c: identifier_text(v),
        "country": lambda v, c: normalize_country(v),
        "external_id": lambda v, c: identifier_text(v),
    },
    hashed=frozenset({"email", "phone", "first_name", "last_name"}),
)

PROFILES: Final[Mapping[str, Profile]] = {p.name: p for p in (PLAIN, META, GOOGLE)}


@dataclass(frozen=True)
class PersonAttrs:
    """What a source record says about a person, already normalized."""

    email: str | None
    first_name: str | None
    last_name: str | None
    phone: str | None
    country: str | None
    city: str | None
    postcode: str | None
    seen_at: datetime | None  # source time of the record (its modification or creation)
    rank: int
    created_at: datetime | None = None  # when the person first appears (defaults to seen_at)

    @staticmethod
    def from_address(
        address: Mapping[str, Any] | None,
        email: object,
        seen_at: datetime | None,
        rank: int,
        created_at: datetime | None = None,
    ) -> PersonAttrs:
        address = address or {}
        country = normalize_country(address.get("country"))
        phone = address.get("phone")
        return PersonAttrs(
            email=normalize_email(email),
            first_name=clean_text(address.get("first_name")),
            last_name=clean_text(address.get("last_name")),
            phone=normalize_phone(phone.strip(), country) if isinstance(phone, str) else None,
            country=country,
            city=clean_text(address.get("city")),
            postcode=clean_text(address.get("postcode")),
            seen_at=seen_at,
            rank=rank,
            created_at=created_at or seen_at,
        )

    def row(self) -> dict[str, Any]:
        return {
            "email": self.email,
            "first_name": self.first_name,
            "last_name": self.last_name,
            "phone": self.phone,
            "country": self.country,
            "city": self.city,
            "postcode": self.postcode,
            "created_at": self.created_at or self.seen_at,
            "updated_at": self.seen_at,
            "attrs_rank": self.rank,
        }
