"""A real HTTP CONNECT proxy for tests, and a recorder of every TCP connection this process opens.

:class:`ConnectProxy` opens tunnels the way corporate proxies do (``CONNECT host:port``, ``200``,
then bytes both ways), optionally demands ``Proxy-Authorization: Basic`` (``407``) or refuses
targets (``403``), and records each request and the first bytes the client sent through each
tunnel (to show that TLS, not plaintext, crossed it).

:class:`ConnectionRecorder` sees every ``socket.connect`` of this process through the audit hook
(:func:`sys.addaudithook`), except the proxy's own upstream connections: with a proxy configured,
a test proves that nothing went to the identity provider or a mail server directly.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import quote

#: How many bytes of each direction a tunnel keeps for inspection.
CAPTURE_LIMIT = 256 * 1024
THREAD_PREFIX = "connect-proxy"


@dataclass
class TunnelRecord:
    """One CONNECT request: its target, the answer, and what crossed the tunnel (first bytes)."""

    target: str
    status: int
    authorization: str | None = field(repr=False, default=None)
    client_bytes: bytearray = field(repr=False, default_factory=bytearray)
    server_bytes: bytearray = field(repr=False, default_factory=bytearray)


class ConnectProxy:
    """A threaded CONNECT proxy on 127.0.0.1.

    :param username, password: demand these Basic credentials (``407`` otherwise).
    :param refuse: ``{"host:port" or "*": status}``: answer these targets with the status (e.g. 403).
    """

    def __init__(
        self,
        *,
        username: str | None = None,
        password: str | None = None,
        refuse: dict[str, int] | None = None,
    ) -> None:
        self.username = username
        self.password = password
        self.refuse = dict(refuse or {})
        self.records: list[TunnelRecord] = []
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self._port: int = self._server.getsockname()[1]
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> ConnectProxy:
        thread = threading.Thread(target=self._accept_loop, name=f"{THREAD_PREFIX}-accept", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._server.close()
        for thread in list(self._threads):
            thread.join(timeout=5)

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``, with the credentials when the proxy demands them."""
        return self.url_with(self.username, self.password)

    def url_with(self, username: str | None, password: str | None) -> str:
        if username is None:
            return f"http://127.0.0.1:{self.port}"
        return f"http://{quote(username, safe='')}:{quote(password or '', safe='')}@127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ what it saw
    def tunnels(self, status: int | None = 200) -> list[TunnelRecord]:
        with self._lock:
            return [r for r in self.records if status is None or r.status == status]

    def targets(self, status: int | None = 200) -> list[str]:
        return [r.target for r in self.tunnels(status)]

    def count(self, target: str, status: int | None = 200) -> int:
        return self.targets(status).count(target)

    # ------------------------------------------------------------------ serving
    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), name=f"{THREAD_PREFIX}-client", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _expected_authorization(self) -> str | None:
        if self.username is None:
            return None
        raw = f"{self.username}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        upstream = None
        try:
            head = bytearray()
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk or len(head) > 65536:
                    return
                head += chunk
            text, _, early = bytes(head).partition(b"\r\n\r\n")
            lines = text.decode("latin-1").split("\r\n")
            method, _, rest = lines[0].partition(" ")
            target = rest.partition(" ")[0]
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            record = TunnelRecord(target=target, status=0, authorization=headers.get("proxy-authorization"))
            with self._lock:
                self.records.append(record)
            if method.upper() != "CONNECT":
                record.status = 405
                conn.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            expected = self._expected_authorization()
            if expected is not None and record.authorization != expected:
                record.status = 407
                conn.sendall(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                    b'Proxy-Authenticate: Basic realm="sandbox proxy"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n'
                )
                return
            refused = self.refuse.get(target, self.refuse.get("*"))
            if refused is not None:
                record.status = refused
                conn.sendall(f"HTTP/1.1 {refused} Refused by policy\r\nContent-Length: 0\r\n\r\n".encode())
                return
            host, _, port = target.rpartition(":")
            try:
                upstream = socket.create_connection((host.strip("[]"), int(port)), timeout=10)
            except (OSError, ValueError):
                record.status = 502
                conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                return
            record.status = 200
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if early:
                record.client_bytes += early
                upstream.sendall(early)
            upstream.settimeout(None)
            conn.settimeout(None)
            back = threading.Thread(
                target=self._pipe,
                args=(upstream, conn, record.server_bytes),
                name=f"{THREAD_PREFIX}-pipe",
                daemon=True,
            )
            back.start()
            self._pipe(conn, upstream, record.client_bytes)
            back.join(timeout=5)
        except OSError:
            return
        finally:
            for sock in (conn, upstream):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket, capture: bytearray) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if len(capture) < CAPTURE_LIMIT:
                    capture += data[: CAPTURE_LIMIT - len(capture)]
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)


# ---------------------------------------------------------------------- observing connections
_recorders: list[ConnectionRecorder] = []
_hook_installed = False
_install_lock = threading.Lock()


def _audit(event: str, args: tuple) -> None:
    if event != "socket.connect" or not _recorders:
        return
    thread = threading.current_thread().name
    if thread.startswith(THREAD_PREFIX):
        return  # the proxy's own upstream connections
    address = args[1] if len(args) > 1 else None
    if isinstance(address, tuple) and len(address) >= 2:
        for recorder in list(_recorders):
            recorder.connects.append((str(address[0]), int(address[1]), thread))


@dataclass
class ConnectionRecorder:
    """Every TCP ``connect`` this process makes while active (host, port, thread), the proxy's excepted."""

    connects: list[tuple[str, int, str]] = field(default_factory=list)

    def ports(self) -> set[int]:
        return {port for _, port, _ in self.connects}

    @contextlib.contextmanager
    def active(self) -> Iterator[ConnectionRecorder]:
        global _hook_installed
        with _install_lock:
            if not _hook_installed:  # an audit hook cannot be removed: one for the process, idle when unused
                sys.addaudithook(_audit)
                _hook_installed = True
        _recorders.append(self)
        try:
            yield self
        finally:
            _recorders.remove(self)
