"""The push half of ``syncd demo``: one mapping per destination, pointed at the sandboxes."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from syncd.config import Settings
from syncd.mapping import load_mappings
from syncd.push import PushResult, push, select_syncs
from syncd.sandbox.destinations import DestinationSandbox
from syncd.sandbox.server import SandboxServer

DEMO_LIST = "demo-audience"

# The shipped examples in mappings/, with the sandbox's URLs and keys filled in. No
# [limits]: the demo goes at each vendor's own documented pace.
_MAPPINGS = {
    "klaviyo.toml": """
destination = "klaviyo"
base_url = "{klaviyo_url}"
allow_loopback = true
[credentials]
api_key = "{klaviyo_key}"

[[sync]]
name = "klaviyo-champions"
segment = "champions"
mode = "mirror"
object = "{klaviyo_list}"
consent = "none"
consent_reason = "demo data: generated shoppers, sandboxed vendors"
[sync.fields]
email = "email"
first_name = "first_name"
last_name = "last_name"
"location.country" = "country"
"properties.net_revenue" = "net_revenue_minor | minor_to_major"
"properties.rfm_segment" = "rfm_segment"

[[sync]]
name = "klaviyo-open-carts"
segment = "open_carts"
mode = "event"
object = "Cart Abandoned"
# The demo's shoppers are generated, and none of them ticked a consent box: a real store
# leaves consent at its default (email) and sends only those who did.
consent = "none"
consent_reason = "demo data: generated shoppers, sandboxed vendors"
[sync.fields]
email = "email"
value = "cart_value_minor | minor_to_major"
value_currency = "currency"
time = "entered_at | date:%Y-%m-%dT%H:%M:%S+00:00"
""",
    "mailchimp.toml": """
destination = "mailchimp"
base_url = "{mailchimp_url}"
allow_loopback = true
[credentials]
api_key = "{mailchimp_key}"

[[sync]]
name = "mailchimp-big-spenders"
segment = "big_spenders"
mode = "mirror"
object = "{mailchimp_list}"
consent = "none"
consent_reason = "demo data: generated shoppers, sandboxed vendors"
[sync.options]
tag = "big spender"
[sync.fields]
email_address = "email"
"merge_fields.FNAME" = "first_name | default:there"
"merge_fields.LNAME" = "last_name"
marketing_consent = "marketing_consent"
""",
    "woocommerce.toml": """
destination = "woocommerce"
base_url = "{shop_url}"
allow_loopback = true
[credentials]
consumer_key = "{shop_key}"
consumer_secret = "{shop_secret}"
[limits]
requests_per_second = 20

[[sync]]
name = "woocommerce-big-spenders"
segment = "big_spenders"
mode = "upsert"
[sync.fields]
id = "woocommerce_id"
"meta.syncd_segments" = "segments | join"
"meta.syncd_clv_12m" = "clv_12m_minor | minor_to_major"
"meta.syncd_lifecycle" = "lifecycle_stage"
""",
    "webhook.toml": """
destination = "webhook"
base_url = "{webhook_url}"
allow_loopback = true
[credentials]
secret = "demo-webhook-secret"

[[sync]]
name = "webhook-win-back"
segment = "win_back"
mode = "mirror"
[sync.fields]
email = "email"
name = "{{{{ first_name }}}} {{{{ last_name }}}} | trim"
last_order = "last_order_at | date:%Y-%m-%d"
""",
}


def demo_push(
    engine: Engine, segments: dict[str, Any], shop: SandboxServer
) -> tuple[list[PushResult], list[str]]:
    """Push the demo's segments to sandboxed Klaviyo, Mailchimp, the shop and a webhook;
    returns the results and a line per destination saying what it now holds."""
    with DestinationSandbox() as box, tempfile.TemporaryDirectory() as folder:
        klaviyo_list = box.klaviyo.add_list(name="Champions")
        box.mailchimp.add_list(DEMO_LIST, "Demo audience")
        receiver = box.webhooks.add("win-back", "demo-webhook-secret")
        values = {
            "klaviyo_url": box.klaviyo_url,
            "klaviyo_key": box.klaviyo.api_key,
            "klaviyo_list": klaviyo_list,
            "mailchimp_url": box.mailchimp_url,
            "mailchimp_key": box.mailchimp.api_key,
            "mailchimp_list": DEMO_LIST,
            "shop_url": shop.url,
            "shop_key": shop.consumer_key,
            "shop_secret": shop.consumer_secret,
            "webhook_url": box.webhook_url("win-back"),
        }
        paths = []
        for name, text in _MAPPINGS.items():
            path = Path(folder) / name
            path.write_text(text.format(**values))
            paths.append(str(path))
        settings = Settings.model_validate(
            {"segments": segments, "destinations": {"mappings": paths}}
        )
        mappings = load_mappings(settings, env={})
        results = asyncio.run(push(engine, select_syncs(mappings, None)))

        members = box.mailchimp.lists[DEMO_LIST].members.values()
        statuses = sorted({m["status"] for m in members})
        by_status = ", ".join(
            f"{sum(1 for m in members if m['status'] == s)} {s}" for s in statuses
        )
        with shop.store.lock:
            tagged = sum(
                1
                for cid in shop.store.index("customers")
                if any(
                    m.get("key") == "syncd_segments"
                    for m in shop.store.payload("customers", cid).get("meta_data", [])
                )
            )
        lines = [
            f"Klaviyo: {len(box.klaviyo.profiles)} profiles, "
            f"{len(box.klaviyo.list_members[klaviyo_list])} on the Champions list, "
            f"{len(box.klaviyo.events)} 'Cart Abandoned' events",
            f"Mailchimp: {len(members)} audience members ({by_status or 'none'}), "
            f"{len(box.mailchimp.segment_members(DEMO_LIST, 'big spender'))} tagged 'big spender'",
            f"WooCommerce: {tagged} registered customers carry syncd_segments meta",
            f"Webhook: {len(receiver.records)} records in {len(receiver.batches)} signed batches",
        ]
    return results, lines
