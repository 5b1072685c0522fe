"""The columns a WooCommerce source contributes to segment syncs (see
``syncd.sources.base.PushColumns``):

``woocommerce_id``
    the person's registered customer id in the store (the lowest, should one person have
    several accounts); null for guests. A sync's ``source = "NAME"`` picks the store
    when several are synced.
``marketing_consent``
    true when the person's registered customer record carries one of the sync's
    ``consent_meta_keys`` in its ``meta_data`` with a true-ish value.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import ColumnElement, Connection, bindparam, func, select, text

from syncd.store.models import CUSTOMER_RECORDS

if TYPE_CHECKING:
    from syncd.mapping import SyncSpec

__all__ = ["WOOCOMMERCE_COLUMNS"]

# The values of an opt-in meta entry that mean yes (compared lower-cased).
_TRUE: Final = ("1", "on", "subscribed", "true", "yes")


def _registered_id(customer_id: ColumnElement[Any], spec: SyncSpec) -> ColumnElement[Any]:
    """The person's registered customer id at the store (the sync's ``source``, else any)."""
    records = CUSTOMER_RECORDS
    of_person = [records.c.customer_id == customer_id, records.c.deleted_at.is_(None)]
    if spec.source is not None:
        of_person.append(records.c.source == spec.source)
    return select(func.min(records.c.source_id)).where(*of_person).scalar_subquery()


def _consenting(conn: Connection, spec: SyncSpec, scope: Collection[int] | None) -> set[int]:
    """The people whose registered record carries an opt-in meta value (one of the sync's
    ``consent_meta_keys`` with a true-ish value). One pass over the registered records,
    in the store's own JSON functions, instead of a subquery per member.

    A customer's ``meta_data`` is a list of ``{"id", "key", "value"}`` objects (WooCommerce
    REST API, customer properties: https://woocommerce.github.io/woocommerce-rest-api-docs/#customer-properties).
    """
    where = "r.deleted_at IS NULL"
    params: dict[str, Any] = {"keys": list(spec.consent_meta_keys) or [None], "truthy": _TRUE}
    if spec.source is not None:
        where += " AND r.source = :source"
        params["source"] = spec.source
    if scope is not None:
        # Integers written out (never empty: NULL matches nothing); a scope can be larger
        # than a driver's limit on bound parameters.
        ids = ", ".join(str(int(c)) for c in sorted(scope)) or "NULL"
        where += f" AND r.customer_id IN ({ids})"
    if conn.dialect.name == "postgresql":
        sql = (
            "SELECT DISTINCT r.customer_id FROM customer_records r CROSS JOIN LATERAL "
            "jsonb_array_elements(CASE WHEN jsonb_typeof(r.raw->'meta_data') = 'array' "
            f"THEN r.raw->'meta_data' ELSE '[]'::jsonb END) m WHERE {where} "
            "AND m->>'key' IN :keys AND lower(m->>'value') IN :truthy"
        )
    else:
        sql = (
            "SELECT DISTINCT r.customer_id FROM customer_records r, "
            f"json_each(r.raw, '$.meta_data') m WHERE {where} "
            "AND json_type(r.raw, '$.meta_data') = 'array' "
            "AND json_extract(m.value, '$.key') IN :keys "
            "AND lower(CAST(json_extract(m.value, '$.value') AS TEXT)) IN :truthy"
        )
    query = text(sql).bindparams(
        bindparam("keys", expanding=True), bindparam("truthy", expanding=True)
    )
    return {cid for (cid,) in conn.execute(query, params)}


@dataclass(frozen=True)
class _Columns:
    expressions: Mapping[str, Callable[[ColumnElement[Any], SyncSpec], ColumnElement[Any]]]
    flags: Mapping[str, Callable[[Connection, SyncSpec, Collection[int] | None], set[int]]]


WOOCOMMERCE_COLUMNS: Final = _Columns(
    expressions={"woocommerce_id": _registered_id},
    flags={"marketing_consent": _consenting},
)
