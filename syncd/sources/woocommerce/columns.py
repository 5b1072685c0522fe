"""The columns a WooCommerce source contributes to segment syncs (see
``syncd.sources.base.PushColumns``):

``woocommerce_id``
    the person's registered customer id in the store (the lowest, should one person have
    several accounts); null for guests. A sync's ``source = "NAME"`` picks the store
    when several are synced.

Consent is no longer a column of this source: the source states it at ingest
(``syncd.sources.woocommerce.consent``) and the profile's ``consent_email`` holds it;
``marketing_consent`` is that column's old name (see ``syncd.mapping``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import ColumnElement, Connection, func, select

from syncd.store.models import CUSTOMER_RECORDS

if TYPE_CHECKING:
    from syncd.mapping import SyncSpec

__all__ = ["WOOCOMMERCE_COLUMNS"]


def _registered_id(customer_id: ColumnElement[Any], spec: SyncSpec) -> ColumnElement[Any]:
    """The person's registered customer id at the store (the sync's ``source``, else any)."""
    records = CUSTOMER_RECORDS
    of_person = [records.c.customer_id == customer_id, records.c.deleted_at.is_(None)]
    if spec.source is not None:
        of_person.append(records.c.source == spec.source)
    return select(func.min(records.c.source_id)).where(*of_person).scalar_subquery()


@dataclass(frozen=True)
class _Columns:
    expressions: Mapping[str, Callable[[ColumnElement[Any], SyncSpec], ColumnElement[Any]]]
    flags: Mapping[str, Callable[[Connection, SyncSpec, Collection[int] | None], set[int]]]


WOOCOMMERCE_COLUMNS: Final = _Columns(
    expressions={"woocommerce_id": _registered_id},
    flags={},
)
