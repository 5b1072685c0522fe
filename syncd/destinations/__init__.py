"""Destination adapters, one module each; ``destination_types()`` is the registry."""

from __future__ import annotations

from importlib import import_module

from syncd.destinations.base import Destination

# type name -> "module:Class", imported on first use so a command that pushes nowhere
# does not import every adapter.
_ADAPTERS = {
    "klaviyo": "syncd.destinations.klaviyo:KlaviyoDestination",
    "mailchimp": "syncd.destinations.mailchimp:MailchimpDestination",
    "meta": "syncd.destinations.meta:MetaDestination",
    "woocommerce": "syncd.destinations.woocommerce:WooCommerceDestination",
    "webhook": "syncd.destinations.webhook:WebhookDestination",
    "google": "syncd.destinations.google:GoogleDestination",
}

DESTINATION_TYPES = tuple(_ADAPTERS)


def destination_class(type_name: str) -> type[Destination]:
    """The adapter class of a destination type; KeyError for an unknown type."""
    module, _, cls = _ADAPTERS[type_name].partition(":")
    adapter: type[Destination] = getattr(import_module(module), cls)
    return adapter
