"""The HTTP plumbing the sandboxes share: a threaded HTTP/1.1 server on a daemon thread.

``ServedSandbox`` is the start/stop/context-manager lifecycle of a sandbox served by a
``SandboxHTTPServer``; the server tracks open connections so that ``stop()`` can close
keep-alive sockets. ``SandboxHandler`` is the request handler's common part: quiet logs,
every method routed to ``handle()``, and helpers to read the body and write a response.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, ClassVar, Generic, Self, TypeVar, cast

__all__ = ["SandboxHTTPServer", "SandboxHandler", "ServedSandbox"]

AppT = TypeVar("AppT")


class SandboxHTTPServer(ThreadingHTTPServer):
    """A ``ThreadingHTTPServer`` for ``app`` that knows its open connections."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[SandboxHandler[Any]],
        app: object,
        *,
        request_queue_size: int = 5,
    ) -> None:
        self.app = app
        # Read by server_activate() when the socket starts listening, inside __init__.
        self.request_queue_size = request_queue_size
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def close_connections(self) -> None:
        # Keep-alive connections have their own threads; close them so clients see the server
        # go away instead of talking to a stopped sandbox.
        with self.connections_lock:
            for conn in list(self.connections):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            self.connections.clear()


class SandboxHandler(BaseHTTPRequestHandler, Generic[AppT]):
    """The request handler's shared part; subclasses implement ``handle_request()``."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; without this, Nagle + delayed ACK stall
    # keep-alive clients for ~40 ms per response.
    disable_nagle_algorithm = True
    timeout = 120

    @property
    def http_server(self) -> SandboxHTTPServer:
        server = self.server
        assert isinstance(server, SandboxHTTPServer)
        return server

    @property
    def app(self) -> AppT:
        return cast(AppT, self.http_server.app)

    def setup(self) -> None:
        super().setup()
        server = self.http_server
        with server.connections_lock:
            server.connections.add(self.connection)

    def finish(self) -> None:
        server = self.http_server
        with server.connections_lock:
            server.connections.discard(self.connection)
        super().finish()

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: tests read the sandboxes' request logs instead."""

    def do_GET(self) -> None:
        self.handle_request()

    def do_POST(self) -> None:
        self.handle_request()

    def do_PUT(self) -> None:
        self.handle_request()

    def do_PATCH(self) -> None:
        self.handle_request()

    def do_DELETE(self) -> None:
        self.handle_request()

    def handle_request(self) -> None:
        """Serve one request: each sandbox's handler subclass implements it."""
        raise NotImplementedError

    def read_body(self) -> bytes:
        """The request body as ``Content-Length`` gives it (empty when absent or bad)."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        return self.rfile.read(length) if length > 0 else b""

    def write_response(
        self,
        status: int,
        body: bytes,
        content_type: str | None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Status line, ``Content-Type`` (unless None), ``Content-Length``, ``headers``, body."""
        self.send_response(status)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(body)


class ServedSandbox:
    """Start/stop for a sandbox whose requests ``handler`` answers, on a daemon thread.

    ``start()`` binds (port 0 picks a free one) and serves; ``stop()`` shuts the server down
    and closes open connections; as a context manager it does both.
    """

    thread_name: ClassVar[str]  # the serving thread is "<thread_name>-<url>"
    description: ClassVar[str] = "the server"
    request_queue_size: ClassVar[int] = 5

    def __init__(self, handler: type[SandboxHandler[Any]], host: str, port: int) -> None:
        self._handler = handler
        self.host = host
        self.port = port
        self._httpd: SandboxHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` once started."""
        if self._httpd is None:
            raise RuntimeError(f"{self.description} is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._httpd.server_address[1]}"

    def start(self) -> Self:
        if self._httpd is not None:
            return self
        httpd = SandboxHTTPServer(
            (self.host, self.port),
            self._handler,
            self,
            request_queue_size=self.request_queue_size,
        )
        self._httpd = httpd
        self._bound()
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            daemon=True,
            name=f"{self.thread_name}-{self.url}",
        )
        self._thread.start()
        return self

    def _bound(self) -> None:
        """Runs once the socket is bound (``url`` is known), before serving starts."""

    def stop(self) -> None:
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        httpd.close_connections()
        if thread is not None:
            thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
