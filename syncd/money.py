"""Money as integer minor units: ISO 4217 exponents and exact decimal-string parsing."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from functools import lru_cache

# ISO 4217 (list one, plus codes withdrawn recently enough to appear in a store's order
# history: HRK, SLL, ZWL, CUC, ANG). Minor-unit exponent 2 unless listed below.
# Precious metals, funds units and test codes (XAU, XDR, XTS, XXX, …) are not currencies
# an order is paid in and are rejected.
_TWO_DECIMALS = (
    "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BMD BND BOB BOV BRL BSD BTN BWP "
    "BYN BZD CAD CDF CHE CHF CHW CNY COP COU CRC CUC CUP CVE CZK DKK DOP DZD EGP ERN ETB EUR "
    "FJD FKP GBP GEL GHS GIP GMD GTQ GYD HKD HNL HRK HTG HUF IDR ILS INR IRR JMD KES KGS KHR "
    "KPW KYD KZT LAK LBP LKR LRD LSL MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MXV MYR "
    "MZN NAD NGN NIO NOK NPR NZD PAB PEN PGK PHP PKR PLN QAR RON RSD RUB SAR SBD SCR SDG SEK "
    "SGD SHP SLE SLL SOS SRD SSP STN SVC SYP SZL THB TJS TMT TOP TRY TTD TWD TZS UAH USD USN "
    "UYU UZS VED VES WST XCD XCG YER ZAR ZMW ZWG ZWL"
)
_ZERO_DECIMALS = "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF"
_THREE_DECIMALS = "BHD IQD JOD KWD LYD OMR TND"
_FOUR_DECIMALS = "CLF UYW"

EXPONENTS: dict[str, int] = {
    **dict.fromkeys(_TWO_DECIMALS.split(), 2),
    **dict.fromkeys(_ZERO_DECIMALS.split(), 0),
    **dict.fromkeys(_THREE_DECIMALS.split(), 3),
    **dict.fromkeys(_FOUR_DECIMALS.split(), 4),
}


def _pow10(exp: int) -> int:
    scale: int = 10**exp  # int ** int is typed as Any (it is a float for negative powers)
    return scale


class MoneyError(ValueError):
    """An amount or currency that cannot be represented exactly."""


def exponent(currency: str) -> int:
    """The minor-unit exponent of an ISO 4217 code (``JPY`` → 0, ``KWD`` → 3)."""
    try:
        exp: int = EXPONENTS[currency]
    except KeyError:
        raise MoneyError(f"unknown currency code {currency!r} (not ISO 4217)") from None
    return exp


def to_minor(value: str | int | float | Decimal | None, exp: int) -> int:
    """Parse an amount as WooCommerce sends it (``"29.35"``, ``"-10.00"``, ``3``) into minor units.

    Exact for decimal strings: no float ever touches the value. More decimals than the
    currency has (WooCommerce's ``dp`` can be raised) are rounded half up, as WooCommerce
    rounds. Empty or null means zero; anything else that is not a plain decimal number
    raises :class:`MoneyError`.
    """
    if type(value) is str:
        return _text_to_minor(value, exp)
    if value is None:
        return 0
    if isinstance(value, bool):
        raise MoneyError(f"not an amount: {value!r}")
    if isinstance(value, int):
        return value * _pow10(exp)
    return _decimal_to_minor(value, exp)


# A store's amounts repeat (prices, shipping rates, "0.00"): an order carries seven or
# more of them, and a cache hit costs a sixth of parsing the text again.
@lru_cache(maxsize=65_536)
def _text_to_minor(value: str, exp: int) -> int:
    if value == "":
        return 0
    text = value.strip()
    # Fast path for the common shape "123.45" with no more decimals than the currency.
    neg = text.startswith("-")
    body = text[1:] if neg or text.startswith("+") else text
    whole, _, frac = body.partition(".")
    if whole.isdigit() and (frac == "" or frac.isdigit()) and whole.isascii() and frac.isascii():
        if len(frac) <= exp:
            fast = int(whole) * _pow10(exp) + (int(frac.ljust(exp, "0")) if exp else 0)
            return -fast if neg else fast
    elif not (whole == "" and frac.isdigit() and frac.isascii()):  # ".5" is fine below
        raise MoneyError(f"not an amount: {value!r}")
    return _decimal_to_minor(value, exp)


def _decimal_to_minor(value: str | float | Decimal, exp: int) -> int:
    try:
        dec = Decimal(str(value)) if not isinstance(value, Decimal) else value
    except InvalidOperation:
        raise MoneyError(f"not an amount: {value!r}") from None
    if not dec.is_finite():
        raise MoneyError(f"not an amount: {value!r}")
    minor: int = int((dec * (Decimal(10) ** exp)).quantize(Decimal(1), rounding=ROUND_HALF_UP))
    return minor


def format_minor(amount: int, currency: str) -> str:
    """``2935, "USD"`` → ``"29.35 USD"``: for status output and messages."""
    exp = exponent(currency)
    if exp == 0:
        return f"{amount} {currency}"
    sign = "-" if amount < 0 else ""
    whole, frac = divmod(abs(amount), _pow10(exp))
    return f"{sign}{whole}.{frac:0{exp}d} {currency}"
