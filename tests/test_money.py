from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncd.money import EXPONENTS, MoneyError, exponent, format_minor, to_minor


@pytest.mark.parametrize(
    ("value", "exp", "minor"),
    [
        ("29.35", 2, 2935),
        ("-10.00", 2, -1000),
        ("0.9", 2, 90),  # WooCommerce drops trailing zeros in tax lines
        ("10", 2, 1000),
        ("1500", 0, 1500),  # JPY has no minor unit
        ("1.234", 3, 1234),  # KWD has three
        ("0.125", 2, 13),  # more decimals than the currency: half up, as WooCommerce rounds
        ("0.124", 2, 12),
        (3, 2, 300),  # line_items[].price is a JSON number
        (12.5, 2, 1250),
        ("", 2, 0),
        (None, 2, 0),
    ],
)
def test_to_minor_exact(value: object, exp: int, minor: int) -> None:
    assert to_minor(value, exp) == minor  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["12,34abc", "abc", "1e5", "nan", "inf", "1.2.3", "-", "٣", True])
def test_to_minor_rejects(bad: object) -> None:
    with pytest.raises(MoneyError):
        to_minor(bad, 2)  # type: ignore[arg-type]


def test_exponents_of_iso_4217() -> None:
    assert exponent("USD") == 2
    assert exponent("EUR") == 2
    assert exponent("JPY") == 0
    assert exponent("KRW") == 0
    assert exponent("KWD") == 3
    assert exponent("BHD") == 3
    assert exponent("CLF") == 4
    with pytest.raises(MoneyError, match="XYZ"):
        exponent("XYZ")
    with pytest.raises(MoneyError):
        exponent("XAU")  # gold is not what orders are paid in
    assert all(len(c) == 3 and c.isupper() for c in EXPONENTS)


def test_format_minor() -> None:
    assert format_minor(2935, "USD") == "29.35 USD"
    assert format_minor(-1234, "KWD") == "-1.234 KWD"
    assert format_minor(500, "JPY") == "500 JPY"
    assert format_minor(5, "EUR") == "0.05 EUR"


@given(
    st.decimals(
        min_value=-(10**12), max_value=10**12, places=2, allow_nan=False, allow_infinity=False
    )
)
def test_to_minor_matches_decimal_arithmetic(value: Decimal) -> None:
    text = f"{value:.2f}"
    assert to_minor(text, 2) == int(Decimal(text) * 100)
    assert to_minor(text, 3) == int(Decimal(text) * 1000)
