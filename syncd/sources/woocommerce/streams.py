"""WooCommerce's streams, declared once: the order a run reads them in is this order.

Customers first (orders link to them), products and coupons before the orders that use
them, refunds after their orders. Customers have no modified-date filter in the REST API,
so they are scanned by id; the others are read by ``modified_after``/``modified_before``
windows. ``status=any`` leaves trashed records out, so the trash is read on its own
(WooCommerce REST API docs, "List all orders": ``status`` options).
"""

from __future__ import annotations

from syncd.sources.base import Stream
from syncd.sources.woocommerce.parse import TRASH

MODIFIED = "date_modified_gmt"  # the cursor field of every stream
_LIVE_AND_TRASH = (("", {"status": "any"}), (":trash", {"status": TRASH}))

STREAMS: dict[str, Stream] = {
    s.name: s
    for s in (
        Stream(
            "customers",
            "customers",
            entity="customers",
            windowed=False,
            cursor_field=MODIFIED,
            variants=(("", {"role": "all"}),),
        ),
        Stream(
            "products",
            "products",
            entity="products",
            windowed=True,
            cursor_field=MODIFIED,
            variants=_LIVE_AND_TRASH,
            deleted_variant=":trash",
            children=("variations",),
        ),
        Stream(
            "coupons",
            "coupons",
            entity="coupons",
            windowed=True,
            cursor_field=MODIFIED,
            variants=_LIVE_AND_TRASH,
            deleted_variant=":trash",
        ),
        Stream(
            "orders",
            "orders",
            entity="orders",
            windowed=True,
            cursor_field=MODIFIED,
            variants=_LIVE_AND_TRASH,
            deleted_variant=":trash",
            children=("refunds",),
        ),
        Stream("refunds", "refunds", entity="refunds", windowed=True, cursor_field=MODIFIED),
    )
}
