"""Sources are a registry (issue 20, item 1): a source type maps to its class, the settings
union is keyed on the same types, a source declares each stream once, and the generic
parts (the ingest engine, the webhook intake and inbox, the source kit) import no vendor
package. Migrations import no live code (issue 20, item 6)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import syncd
from syncd.config import SOURCE_TYPES, STREAMS, Settings, WooCommerceSourceSettings
from syncd.sources import source_class
from syncd.sources.base import ENTITIES, Source
from syncd.sources.woocommerce import WooCommerceSource
from tests.test_cli import base_env
from tests.test_cli import syncd as run_syncd

PACKAGE = Path(syncd.__file__).parent
# Modules that serve every source: none may import a vendor's package.
GENERIC = (
    "ingest.py",
    "sources/__init__.py",
    "sources/base.py",
    "sources/inbox.py",
    "sources/webhooks.py",
    "status.py",
    "daemon.py",
    "cli.py",
)


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("module", GENERIC)
def test_generic_modules_import_no_vendor_source(module: str) -> None:
    imports = imported_modules(PACKAGE / module)
    vendor = sorted(m for m in imports if m.startswith("syncd.sources.woocommerce"))
    assert vendor == [], f"{module} imports {vendor}"


def test_the_check_sees_a_vendor_import(tmp_path: Path) -> None:
    # The check above would pass on anything if it could not see imports.
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from syncd.sources.woocommerce.parse import parse_order\n")
    assert "syncd.sources.woocommerce.parse" in imported_modules(probe)


@pytest.mark.parametrize("path", sorted((PACKAGE / "store/migrations/versions").glob("*.py")))
def test_migrations_import_no_live_code(path: Path) -> None:
    # Column types are the store's contract; any other syncd import would let a later
    # refactor change what an old revision does to a store.
    ours = {m for m in imported_modules(path) if m.startswith("syncd")}
    assert ours <= {"syncd.store.types"}, f"{path.name} imports {sorted(ours)}"


def test_the_registry_and_the_settings_union_know_the_same_types() -> None:
    assert SOURCE_TYPES == ("woocommerce",)
    for type_name in SOURCE_TYPES:
        cls = source_class(type_name)
        assert issubclass(cls, Source) and cls.type == type_name
    with pytest.raises(KeyError):
        source_class("shopify")


def test_settings_pick_the_source_class_by_type() -> None:
    settings = Settings(
        sources={
            "shop_eu": {
                "type": "woocommerce",
                "url": "https://eu.example.com",
                "consumer_key": "ck",
                "consumer_secret": "cs",
            }
        }
    )
    source = settings.sources["shop_eu"]
    assert isinstance(source, WooCommerceSourceSettings)
    assert source_class(source.type) is WooCommerceSource


def test_woocommerce_declares_each_stream_once() -> None:
    streams = WooCommerceSource.streams
    # The names the settings accept are the streams the source declares, in the order a
    # run reads them: accounts before the orders that link to them, refunds after orders.
    assert tuple(streams) == ("customers", "products", "coupons", "orders", "refunds")
    assert set(streams) == set(STREAMS)
    assert all(name == s.name and s.entity in ENTITIES for name, s in streams.items())
    assert [n for n, s in streams.items() if not s.windowed] == ["customers"]
    trash = {n for n, s in streams.items() if s.deleted_variant}
    assert trash == {"products", "coupons", "orders"}
    for name in trash:
        suffixes = [suffix for suffix, _ in streams[name].variants]
        assert streams[name].deleted_variant in suffixes
    assert streams["products"].children == ("variations",)
    assert streams["orders"].children == ("refunds",)


def test_an_unknown_source_type_fails_validate_naming_the_key_and_the_known_types(
    tmp_path: Path,
) -> None:
    (tmp_path / "config.toml").write_text(
        '[store]\nurl = "sqlite:///store.db"\n\n'
        '[sources.shop]\ntype = "stripe"\nurl = "https://shop.example.com"\n'
        'consumer_key = "ck"\nconsumer_secret = "cs"\n'
    )
    run = run_syncd("--config", "config.toml", "validate", env=base_env(), cwd=tmp_path)
    assert run.returncode == 2, run.output
    assert run.stderr_lines() == [
        "config.toml: sources.shop.type: expected 'woocommerce', got 'stripe'"
    ]
    assert not (tmp_path / "store.db").exists()
