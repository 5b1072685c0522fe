"""Destination sandboxes on 127.0.0.1: Klaviyo, Mailchimp and webhook receivers.

One HTTP/1.1 server hosts every vendor under its own prefix, so an adapter is pointed at
it with ``base_url``: Klaviyo at ``{url}/klaviyo``, Mailchimp at ``{url}/mailchimp/3.0``,
webhook receivers at ``{url}/webhook/<name>``. Each vendor checks requests the way the
real service does (authentication, required fields, batch limits, rate limits) and answers
in the vendor's own shapes, including per-row errors; ``FaultConfig`` adds 429s, 5xx
answers, latency and dropped connections. Each vendor keeps a request log and, apart from
it, the state a test or benchmark asserts on (profiles, list members, events, records).

Where a vendor's behaviour is documented, the comment next to the check cites it; where it
is inferred from public reports rather than documentation, the comment says so.
"""

from __future__ import annotations

import pkgutil
import time
from collections.abc import Iterable, Mapping
from importlib import import_module
from typing import Any, ClassVar, TypeVar
from urllib.parse import parse_qsl

from syncd.sandbox.destinations.base import (
    _JSON,
    Clock,
    DestRequest,
    RateLimit,
    _Request,
    _Response,
    _Vendor,
)
from syncd.sandbox.destinations.klaviyo import KLAVIYO_RATE_LIMITS, KlaviyoSandbox
from syncd.sandbox.destinations.mailchimp import MailchimpSandbox
from syncd.sandbox.destinations.webhook import WebhookReceiver, WebhookSandbox
from syncd.sandbox.httpserver import SandboxHandler, ServedSandbox
from syncd.sandbox.server import FaultConfig

_V = TypeVar("_V", bound=_Vendor)

__all__ = [
    "KLAVIYO_RATE_LIMITS",
    "DestRequest",
    "DestinationSandbox",
    "KlaviyoSandbox",
    "MailchimpSandbox",
    "RateLimit",
    "WebhookReceiver",
    "WebhookSandbox",
]


class DestinationSandbox(ServedSandbox):
    """Klaviyo, Mailchimp and webhook receivers on one local HTTP server.

    ``start()`` binds (port 0 picks a free port) and serves on a daemon thread; use it as a
    context manager to stop it again. ``klaviyo``, ``mailchimp`` and ``webhooks`` are the
    vendors: each has ``faults`` (a ``FaultConfig``), ``requests`` (its log) and its state.
    ``log_bodies=False`` keeps request sizes but not parsed bodies (for benchmarks);
    ``clock`` is the time source for rate-limit windows and timestamps.
    """

    # Every request of every destination sandbox, when a test session keeps it (None: not
    # kept): (journal_tag at the time, request). A test suite's end-of-session audit reads
    # it (tests/conftest.py: no ESP request names a person without the consent needed).
    journal: ClassVar[list[tuple[str, DestRequest]] | None] = None
    journal_tag: ClassVar[str] = ""

    thread_name = "sandbox-destinations"
    description = "the destination sandbox"
    # Benchmarks open many keep-alive connections at once; the default backlog of 5 would
    # make connects wait on SYN retries.
    request_queue_size = 128

    def __init__(
        self,
        *,
        klaviyo_key: str = "pk_sandbox",
        mailchimp_key: str = "0123456789abcdef0123456789abcdef-us1",
        host: str = "127.0.0.1",
        port: int = 0,
        log_bodies: bool = True,
        clock: Clock = time.time,
        vendor_options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__(_Handler, host, port)
        self.log_bodies = log_bodies
        self.clock = clock
        options: dict[str, Mapping[str, Any]] = {
            "klaviyo": {"api_key": klaviyo_key},
            "mailchimp": {"api_key": mailchimp_key},
            **(vendor_options or {}),
        }
        # Every vendor module of this package is served: a new destination's sandbox is its
        # own module, with no line to add here.
        self._vendors = {
            cls.name: cls(self, **options.get(cls.name, {})) for cls in _vendor_classes()
        }
        self.klaviyo = self.vendor("klaviyo", KlaviyoSandbox)
        self.mailchimp = self.vendor("mailchimp", MailchimpSandbox)
        self.webhooks = self.vendor("webhook", WebhookSandbox)

    def journal_request(self, record: DestRequest) -> None:
        journal = DestinationSandbox.journal
        if journal is not None:
            journal.append((DestinationSandbox.journal_tag, record))

    # -- addresses --------------------------------------------------------------------------

    def vendor(self, name: str, kind: type[_V]) -> _V:
        """The sandbox of destination type ``name``, checked to be a ``kind``."""
        vendor = self._vendors[name]
        if not isinstance(vendor, kind):
            raise TypeError(f"the {name} sandbox is a {type(vendor).__name__}, not a {kind}")
        return vendor

    def vendor_url(self, name: str) -> str:
        """The ``base_url`` that points destination type ``name``'s adapter here."""
        return self.url + self._vendors[name].prefix

    @property
    def klaviyo_url(self) -> str:
        return self.vendor_url("klaviyo")

    @property
    def mailchimp_url(self) -> str:
        return self.vendor_url("mailchimp")

    def webhook_url(self, name: str) -> str:
        return f"{self.vendor_url('webhook')}/{name}"

    # -- conveniences -----------------------------------------------------------------------

    def vendors(self) -> Iterable[_Vendor]:
        return self._vendors.values()

    def set_faults(self, config: FaultConfig, vendor: str | None = None) -> None:
        """Apply ``config`` to one vendor (``klaviyo``, ``mailchimp``, ``webhook``) or all."""
        for each in self.vendors():
            if vendor is None or each.name == vendor:
                each.faults = config

    @property
    def requests(self) -> list[DestRequest]:
        """Every vendor's log merged, oldest first."""
        merged = [r for vendor in self.vendors() for r in vendor.requests]
        return sorted(merged, key=lambda r: r.at)

    def reset_logs(self) -> None:
        for vendor in self.vendors():
            vendor.reset_log()

    def _vendor_for(self, raw_path: str) -> tuple[_Vendor | None, str]:
        for vendor in self._vendors.values():
            prefix = vendor.prefix
            if raw_path == prefix or raw_path.startswith(prefix + "/"):
                return vendor, raw_path[len(prefix) :] or "/"
        return None, raw_path


def _vendor_classes() -> list[type[_Vendor]]:
    """The vendor sandboxes: each module of this package but ``base`` defines one."""
    found: list[type[_Vendor]] = []
    for module in pkgutil.iter_modules(__path__):
        if module.name == "base":
            continue
        loaded = import_module(f"{__name__}.{module.name}")
        found += [
            cls
            for cls in vars(loaded).values()
            if isinstance(cls, type)
            and issubclass(cls, _Vendor)
            and cls.__module__ == loaded.__name__
            and cls.name
        ]
    return found


class _Handler(SandboxHandler[DestinationSandbox]):
    server_version = "sandbox"

    def handle_request(self) -> None:
        body = self.read_body()
        raw_path, _, raw_query = self.path.partition("?")
        vendor, rest = self.app._vendor_for(raw_path)
        if vendor is None:
            self._send(_Response(404, b'{"message":"not found"}', _JSON))
            return
        request = _Request(
            self.command,
            rest,
            parse_qsl(raw_query, keep_blank_values=True),
            self.headers,
            body,
        )
        response = vendor.serve(request)
        if response is None:
            self.close_connection = True
            return
        self._send(response)

    def _send(self, response: _Response) -> None:
        content_type = None if response.status == 204 else response.content_type
        self.write_response(response.status, response.body, content_type, response.headers.items())
