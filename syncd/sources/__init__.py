"""Sources, one package each; ``source_class()`` is the registry (as for destinations).

A source is a ``syncd.sources.base.Source``: its streams, its client, how its payloads
become store rows and what its webhooks look like. The ingest engine, the daemon, the CLI,
the webhook intake and status reach a source only through this registry.
"""

from __future__ import annotations

from importlib import import_module

from syncd.sources.base import Source

# type name -> "module:Class", imported on first use. A new source is one line here (and
# its settings model in the `sources` union of syncd.config).
_SOURCES = {
    "woocommerce": "syncd.sources.woocommerce:WooCommerceSource",
}

SOURCE_TYPES = tuple(_SOURCES)


def source_class(type_name: str) -> type[Source]:
    """The class of a source type; KeyError for an unknown type."""
    module, _, cls = _SOURCES[type_name].partition(":")
    source: type[Source] = getattr(import_module(module), cls)
    return source
