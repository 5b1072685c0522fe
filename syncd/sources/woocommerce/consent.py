"""Consent statements in WooCommerce records: the meta entries the config names.

A customer's and an order's ``meta_data`` is a list of ``{"id", "key", "value"}`` objects
(WooCommerce REST API, customer properties and order properties:
https://woocommerce.github.io/woocommerce-rest-api-docs/#customer-properties and
https://woocommerce.github.io/woocommerce-rest-api-docs/#order-properties). Newsletter and
checkout consent plugins keep their opt-in there: on the user for registered accounts,
on the order for any buyer, guests included.

A statement is timed by the record: a customer's by its ``date_modified_gmt`` (the last
change of the account, where an opt-in or opt-out is saved), an order's by its
``date_created_gmt`` (the checkout where the box was ticked or left empty; a later edit
of the order by staff is not the shopper speaking). Both are UTC without an offset.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from syncd.sources.base import BadRecord, Statement
from syncd.sources.woocommerce.parse import parse_gmt

if TYPE_CHECKING:
    from syncd.config import ConsentSettings

__all__ = ["GRANTED", "WITHDRAWN", "consent_statements", "meta_answer"]

# Values of a consent meta entry, compared trimmed and lower-cased. Checkout plugins write
# "1"/"yes"/"on" for a ticked box and "0"/"no"/"" (or nothing) for an empty one; newsletter
# plugins write "subscribed"/"unsubscribed". JSON true/false and 1/0 count the same. Any
# other value states nothing (it is not read as a refusal it may not be).
GRANTED: Final = frozenset(
    {"1", "true", "yes", "on", "subscribed", "granted", "opt-in", "opted_in"}
)
WITHDRAWN: Final = frozenset(
    {"0", "false", "no", "off", "", "unsubscribed", "denied", "opt-out", "opted_out"}
)


def meta_answer(value: Any) -> bool | None:
    """True for a yes, False for a no, None for a value that says neither."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return {1: True, 0: False}.get(value)
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    if text in GRANTED:
        return True
    if text in WITHDRAWN:
        return False
    return None


def _record_time(payload: Mapping[str, Any], fields: Sequence[str]) -> datetime | None:
    for name in fields:
        try:
            when = parse_gmt(payload.get(name), name)
        except BadRecord:
            when = None
        if when is not None:
            return when
    return None


def consent_statements(
    entity: str, payload: Mapping[str, Any], settings: ConsentSettings
) -> list[Statement]:
    """The statements of one customer or order payload, for every channel whose meta keys
    it carries (one per channel and key; the last entry of a key repeated wins)."""
    fields: tuple[str, ...]
    if entity == "customers":
        kind, fields = "customer", ("date_modified_gmt", "date_created_gmt")
    elif entity == "orders":
        kind, fields = "order", ("date_created_gmt",)
    else:
        return []
    meta = payload.get("meta_data")
    record_id = payload.get("id")
    if not isinstance(meta, list) or not meta or record_id is None:
        return []
    wanted: dict[str, list[str]] = {}
    for channel in ("email", "sms", "ads"):
        rules = settings.channel(channel)
        for key in rules.customer_meta_keys if kind == "customer" else rules.order_meta_keys:
            wanted.setdefault(key, []).append(channel)
    if not wanted:
        return []
    answers: dict[str, bool] = {}
    for entry in meta:
        if not isinstance(entry, Mapping):
            continue
        name = entry.get("key")
        if isinstance(name, str) and name in wanted:
            answer = meta_answer(entry.get("value"))
            if answer is not None:
                answers[name] = answer
    if not answers:
        return []
    when = _record_time(payload, fields)
    if when is None:  # no time, no order among statements: nothing to say
        return []
    return [
        Statement(channel, granted, when, f"{kind}:{record_id}:{key}")
        for key, granted in answers.items()
        for channel in wanted[key]
    ]
