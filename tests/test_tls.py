"""TLS against real servers on 127.0.0.1: what retrying can fix and what it cannot.

A certificate the client does not trust fails the same way on every attempt, so it must
fail at once, naming the host and the setting to change; a connection reset or a timeout
during the handshake is the network's passing trouble and is retried. Certificates are
made per test session with the openssl command (no extra Python dependency).
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from syncd.config import WooCommerceSourceSettings
from syncd.http import RetryExhausted, ServiceClient, ServiceLimits, TlsError
from syncd.sources.woocommerce.client import WooCommerceClient

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

SETTING = "sources.woocommerce.verify_tls"


@dataclass(frozen=True)
class Certificate:
    cert: Path  # PEM; self-signed, so it is also the CA file that trusts it
    key: Path


def make_certificate(directory: Path, name: str, subject_alt_name: str) -> Certificate:
    """A self-signed certificate that is its own CA, as a store's self-made one is (key
    usage and basic constraints set, so strict X.509 checks accept it as a CA)."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    command = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
    command += ["-nodes", "-days", "2", "-subj", f"/CN={name}"]
    command += ["-addext", f"subjectAltName={subject_alt_name}"]
    command += ["-addext", "basicConstraints=critical,CA:TRUE"]
    command += ["-addext", "keyUsage=critical,digitalSignature,keyCertSign"]
    command += ["-keyout", str(key), "-out", str(cert)]
    subprocess.run(
        command,
        check=True,
        capture_output=True,
        timeout=30,
    )
    return Certificate(cert, key)


@pytest.fixture(scope="module")
def store_cert(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """For 127.0.0.1 and localhost, like the real test store's."""
    return make_certificate(tmp_path_factory.mktemp("tls"), "store", "IP:127.0.0.1,DNS:localhost")


@pytest.fixture(scope="module")
def elsewhere_cert(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """A certificate for another host name only."""
    return make_certificate(tmp_path_factory.mktemp("tls"), "elsewhere", "DNS:elsewhere.example")


OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n[]"


async def answer_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(OK)
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


class Server:
    """An asyncio server on 127.0.0.1 that counts the TCP connections it accepts (with TLS,
    asyncio runs the handshake before the handler, so counting happens on accept)."""

    def __init__(
        self,
        handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
        certificate: Certificate | None = None,
    ) -> None:
        self.handler = handler
        self.certificate = certificate
        self.accepted = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        context = None
        if self.certificate is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.certificate.cert, self.certificate.key)
        loop = asyncio.get_running_loop()

        def protocol() -> asyncio.BaseProtocol:
            self.accepted += 1
            reader = asyncio.StreamReader()
            return asyncio.StreamReaderProtocol(reader, self.handler, loop=loop)

        self._server = await loop.create_server(protocol, "127.0.0.1", 0, ssl=context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def https_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


class Sleeps:
    """Backoff waits recorded, not slept: a test can tell whether a retry was planned."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    return asyncio.run(main())


async def fetch(
    url: str, *, verify: bool | str = True, max_attempts: int = 8
) -> tuple[Any, ServiceClient, list[float]]:
    """GET url with a ServiceClient: the response status or the error, the client, the
    backoff waits it planned."""
    sleeps = Sleeps()
    client = ServiceClient(
        "woocommerce:woocommerce",
        url,
        limits=ServiceLimits(max_attempts=max_attempts, timeout=2.0),
        verify=verify,
        tls_setting=SETTING,
        sleep=sleeps,
    )
    async with client:
        try:
            outcome: Any = (await client.request("GET", "/wp-json/wc/v3/orders")).status_code
        except Exception as exc:
            outcome = exc
    return outcome, client, sleeps.waits


# --- permanent: one attempt, a message that says what to change -------------------------


@pytest.mark.timeout(20)
def test_an_untrusted_self_signed_certificate_fails_at_once(store_cert: Certificate) -> None:
    async def scenario() -> tuple[Any, Any, list[float], int, float]:
        async with Server(answer_ok, store_cert) as server:
            started = time.monotonic()
            outcome, client, waits = await fetch(server.https_url)
            return outcome, client, waits, server.accepted, time.monotonic() - started

    error, client, waits, accepted, seconds = run(scenario())

    assert isinstance(error, TlsError), error
    assert client.stats.requests == 1 and client.stats.retries == 0
    assert waits == [] and accepted == 1
    assert seconds < 2.0
    assert error.status is None
    port = error.url.split(":")[2].split("/")[0]
    assert f"TLS certificate of 127.0.0.1:{port} refused: self-signed certificate" in str(error)
    assert f'{SETTING} = "/path/to/ca.pem"' in str(error)
    assert f"{SETTING} = false" in str(error)
    assert str(error).endswith("(not retried)")


@pytest.mark.timeout(20)
def test_the_certificate_given_as_ca_file_is_trusted(store_cert: Certificate) -> None:
    async def scenario() -> tuple[Any, int]:
        async with Server(answer_ok, store_cert) as server:
            outcome, _, _ = await fetch(server.https_url, verify=str(store_cert.cert))
            return outcome, server.accepted

    assert run(scenario()) == (200, 1)


@pytest.mark.timeout(20)
def test_a_certificate_for_another_host_fails_at_once(elsewhere_cert: Certificate) -> None:
    # Trusted as a CA, but not issued for 127.0.0.1: a hostname mismatch.
    async def scenario() -> tuple[Any, Any, list[float], int]:
        async with Server(answer_ok, elsewhere_cert) as server:
            outcome, client, waits = await fetch(server.https_url, verify=str(elsewhere_cert.cert))
            return outcome, client, waits, server.accepted

    error, client, waits, accepted = run(scenario())

    assert isinstance(error, TlsError), error
    assert (client.stats.requests, waits, accepted) == (1, [], 1)
    port = error.url.split(":")[2].split("/")[0]
    assert (
        f"TLS certificate of 127.0.0.1:{port} refused: IP address mismatch, certificate is "
        "not valid for '127.0.0.1'; use the host name the certificate is issued for in the URL "
        "(not retried)"
    ) in str(error)


@pytest.mark.timeout(20)
def test_plain_http_behind_an_https_url_fails_at_once() -> None:
    async def http_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # What nginx does with a TLS ClientHello on its http port: a 400 in plain text.
        await reader.read(1)
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    async def scenario() -> tuple[Any, Any, list[float], int]:
        async with Server(http_only) as server:
            outcome, client, waits = await fetch(server.https_url)
            return outcome, client, waits, server.accepted

    error, client, waits, accepted = run(scenario())

    assert isinstance(error, TlsError), error
    assert (client.stats.requests, waits, accepted) == (1, [], 1)
    assert "TLS handshake with 127.0.0.1:" in str(error)
    assert "failed: wrong version number" in str(error)
    assert SETTING in str(error)


# --- transient: retried as before -------------------------------------------------------


@pytest.mark.timeout(20)
def test_a_connection_reset_during_the_handshake_is_retried() -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # the ClientHello has arrived
        writer.transport.abort()

    async def scenario() -> tuple[Any, list[float], int]:
        async with Server(reset) as server:
            outcome, _, waits = await fetch(server.https_url, max_attempts=3)
            return outcome, waits, server.accepted

    error, waits, accepted = run(scenario())

    assert isinstance(error, RetryExhausted), error
    assert (error.attempts, len(waits), accepted) == (3, 2, 3)
    assert isinstance(error.__cause__, httpx.ConnectError)


@pytest.mark.timeout(20)
def test_a_handshake_that_times_out_is_retried() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers the ClientHello

    async def scenario() -> tuple[Any, list[float], int]:
        async with Server(silent) as server:
            outcome, _, waits = await fetch(server.https_url, max_attempts=2)
            return outcome, waits, server.accepted

    error, waits, accepted = run(scenario())

    assert isinstance(error, RetryExhausted), error
    assert (error.attempts, len(waits), accepted) == (2, 1, 2)


# --- the WooCommerce source: verify_tls names itself, and takes a CA file ---------------


@pytest.mark.timeout(20)
def test_the_woocommerce_source_names_its_verify_tls_and_trusts_its_ca_file(
    store_cert: Certificate,
) -> None:
    async def page(url: str, verify_tls: bool | str) -> Any:
        settings = WooCommerceSourceSettings.model_validate(
            {
                "url": url,
                "consumer_key": "ck_test",
                "consumer_secret": "cs_test",
                "verify_tls": verify_tls,
            }
        )
        client = WooCommerceClient("shop", settings)
        try:
            return await client.page("/orders", {}, 1)
        except Exception as exc:
            return exc
        finally:
            await client.aclose()

    async def scenario() -> tuple[Any, Any]:
        async with Server(answer_ok, store_cert) as server:
            refused = await page(server.https_url, True)
            trusted = await page(server.https_url, str(store_cert.cert))
            return refused, trusted

    refused, trusted = run(scenario())

    assert isinstance(refused, TlsError), refused
    assert 'set sources.shop.verify_tls = "/path/to/ca.pem"' in str(refused)
    assert trusted.items == [] and trusted.number == 1
