"""FaultProxy with plain sockets: forwarding, counters and every fault, each seen from both ends."""

from __future__ import annotations

import errno
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from airflow_provider_o365mail.testing.fault_proxy import FaultProxy, FaultRule
from airflow_provider_o365mail.testing.tls import ensure_certificates


class Upstream:
    """A TCP server on 127.0.0.1 that records what each connection sent and can answer on demand."""

    def __init__(self, *, echo: bool = True, greeting: bytes = b"", tls: ssl.SSLContext | None = None) -> None:
        self.echo = echo
        self.greeting = greeting
        self.tls = tls
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        self.received: list[bytearray] = []
        self.ended: list[str] = []  # per connection: "eof" or "reset"
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_side=True)
            with self.lock:
                self.connections.append(sock)
                self.received.append(bytearray())
                self.ended.append("")
                index = len(self.connections) - 1
            threading.Thread(target=self._serve, args=(sock, index), daemon=True).start()

    def _serve(self, sock: socket.socket, index: int) -> None:
        if self.greeting:
            sock.sendall(self.greeting)
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                self.ended[index] = "reset"
                return
            except OSError:
                self.ended[index] = "closed"
                return
            if not data:
                self.ended[index] = "eof"
                sock.close()  # like a real server: the client's FIN ends the session
                return
            self.received[index] += data
            if self.echo:
                try:
                    sock.sendall(data)
                except OSError:
                    return

    def wait_received(self, index: int, size: int, timeout: float = 5) -> bytes:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.received) > index and len(self.received[index]) >= size:
                return bytes(self.received[index])
            time.sleep(0.01)
        raise AssertionError(f"upstream got {self.received[index] if len(self.received) > index else None!r}")

    def wait_ended(self, index: int, timeout: float = 5) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.ended) > index and self.ended[index]:
                return self.ended[index]
            time.sleep(0.01)
        raise AssertionError("upstream connection did not end")

    def close(self) -> None:
        self.listener.close()
        for sock in self.connections:
            sock.close()


@pytest.fixture
def upstream():
    server = Upstream()
    yield server
    server.close()


@pytest.fixture
def proxy(upstream):
    with FaultProxy(("127.0.0.1", upstream.port)) as p:
        yield p


def connect(proxy: FaultProxy, timeout: float = 5) -> socket.socket:
    return socket.create_connection(proxy.address, timeout=timeout)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def test_forwards_both_ways_and_counts(proxy, upstream):
    a, b = connect(proxy), connect(proxy)
    a.sendall(b"hello")
    assert recv_exactly(a, 5) == b"hello"
    b.sendall(b"x" * 100_000)
    assert recv_exactly(b, 100_000) == b"x" * 100_000
    stats = proxy.wait_for(lambda s: s.bytes_down == 100_005)
    assert (stats.accepted, stats.active, stats.max_concurrent) == (2, 2, 2)
    assert stats.bytes_up == 100_005
    a.close()
    proxy.wait_for(lambda s: s.active == 1)
    assert upstream.wait_ended(0) == "eof"  # the client's close reached the server as a FIN
    b.close()
    assert proxy.wait_for(lambda s: s.active == 0).max_concurrent == 2


def test_half_close_is_passed_on(proxy, upstream):
    client = connect(proxy)
    client.sendall(b"request")
    client.shutdown(socket.SHUT_WR)
    assert upstream.wait_ended(0) == "eof"
    assert recv_exactly(client, 7) == b"request"  # the other direction still flowed
    assert client.recv(10) == b""
    proxy.wait_for(lambda s: s.active == 0)


def test_drop_closes_both_sides_with_fin(proxy, upstream):
    client = connect(proxy)
    client.sendall(b"ping")
    assert recv_exactly(client, 4) == b"ping"
    assert proxy.drop() == 1
    assert client.recv(10) == b""
    assert upstream.wait_ended(0) == "eof"
    assert proxy.stats().active == 0


def test_reset_sends_rst_both_ways(proxy, upstream):
    client = connect(proxy)
    client.sendall(b"ping")
    assert recv_exactly(client, 4) == b"ping"
    assert proxy.reset() == 1
    assert proxy.stats().active == 0  # reset() returns once the connection is gone
    with pytest.raises(ConnectionResetError):
        client.recv(10)
    assert upstream.wait_ended(0) == "reset"


def test_stall_down_keeps_sockets_open_and_resume_delivers(proxy, upstream):
    client = connect(proxy, timeout=0.5)
    proxy.stall("down")
    client.sendall(b"question")
    assert upstream.wait_received(0, 8) == b"question"  # up still flows
    with pytest.raises(TimeoutError):
        client.recv(10)
    assert proxy.stats().active == 1
    proxy.resume("down")
    client.settimeout(5)
    assert recv_exactly(client, 8) == b"question"


def test_stall_up_context_manager(proxy, upstream):
    client = connect(proxy)
    with proxy.stalled("up"):
        client.sendall(b"held")
        time.sleep(0.3)
        assert not upstream.received or upstream.received[0] == b""
    assert upstream.wait_received(0, 4) == b"held"
    assert recv_exactly(client, 4) == b"held"


def test_slow_rate_limits_bytes_per_second(proxy):
    client = connect(proxy, timeout=10)
    with proxy.slowed(bytes_per_second=40_000, direction="down"):
        started = time.monotonic()
        client.sendall(b"y" * 20_000)
        assert recv_exactly(client, 20_000) == b"y" * 20_000
        elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 3, elapsed
    started = time.monotonic()
    client.sendall(b"z" * 20_000)
    assert recv_exactly(client, 20_000) == b"z" * 20_000
    assert time.monotonic() - started < 0.3  # back to full speed


def test_slow_delay_holds_each_chunk(proxy):
    client = connect(proxy)
    proxy.slow(delay=0.3, direction="up")
    started = time.monotonic()
    client.sendall(b"late")
    assert recv_exactly(client, 4) == b"late"
    assert time.monotonic() - started >= 0.3
    proxy.unslow()


def test_rule_resets_after_n_bytes_from_server(upstream):
    with FaultProxy(("127.0.0.1", upstream.port)) as proxy:
        rule = proxy.add_rule(FaultRule(direction="down", after_bytes=100, action="reset"))
        client = connect(proxy)
        client.sendall(b"a" * 1000)
        got = b""
        with pytest.raises(ConnectionResetError):
            while True:
                chunk = client.recv(65536)
                if not chunk:
                    break
                got += chunk
        assert got == b"a" * 100
        assert rule.fired.is_set()
        # one-shot: the next connection is not affected
        second = connect(proxy)
        second.sendall(b"b" * 1000)
        assert recv_exactly(second, 1000) == b"b" * 1000


def test_rule_on_client_match_drops_after_forwarding_it():
    server = Upstream(echo=False)
    try:
        with FaultProxy(("127.0.0.1", server.port)) as proxy:
            proxy.add_rule(FaultRule(direction="up", match=rb"\r\n\.\r\n", action="drop"))
            client = connect(proxy)
            client.sendall(b"DATA\r\nSubject: x\r\n\r\nbody\r\n")
            time.sleep(0.1)
            client.sendall(b".\r\nQUIT\r\n")  # the pattern spans two sends
            assert server.wait_received(0, 29) == b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n"
            assert server.wait_ended(0) == "eof"
            assert client.recv(10) == b""  # the server's answer would have been lost
            assert bytes(server.received[0]).endswith(b".\r\n")  # QUIT never reached the server
    finally:
        server.close()


def test_rule_only_for_given_connection_and_with_delay(proxy, upstream):
    first, second = connect(proxy), connect(proxy)
    rule = proxy.add_rule(FaultRule(direction="up", match=b"IDLE", action="reset", connection=2, delay=0.3))
    first.sendall(b"IDLE")
    assert recv_exactly(first, 4) == b"IDLE"
    second.sendall(b"A1 IDLE\r\n")
    assert recv_exactly(second, 9) == b"A1 IDLE\r\n"  # still forwarding during the delay
    assert not rule.fired.is_set()
    assert rule.fired.wait(3)
    with pytest.raises(ConnectionResetError):
        second.recv(10)
    first.sendall(b"ok")
    assert recv_exactly(first, 2) == b"ok"


def test_rule_stall_holds_bytes_until_resume(proxy):
    client = connect(proxy, timeout=0.5)
    proxy.add_rule(FaultRule(direction="down", after_bytes=3, action="stall"))
    client.sendall(b"abcdef")
    assert recv_exactly(client, 3) == b"abc"
    with pytest.raises(TimeoutError):
        client.recv(10)
    proxy.resume()
    client.settimeout(5)
    assert recv_exactly(client, 3) == b"def"


def test_refuse_and_accept_again_on_the_same_port(proxy):
    port = proxy.port
    with proxy.refusing(), pytest.raises(ConnectionRefusedError):
        connect(proxy)
    assert proxy.port == port
    client = connect(proxy)
    client.sendall(b"back")
    assert recv_exactly(client, 4) == b"back"


def test_open_connections_survive_refuse(proxy):
    client = connect(proxy)
    proxy.wait_for(lambda s: s.active == 1)  # not yet accepted would be reset with the listener
    proxy.refuse()
    client.sendall(b"still")
    assert recv_exactly(client, 5) == b"still"
    proxy.clear()
    connect(proxy).close()


def test_dead_target_resets_the_client():
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]
    with FaultProxy(("127.0.0.1", port)) as proxy:
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            connect(proxy).recv(10)  # the RST may even beat the end of connect()
        assert proxy.wait_for(lambda s: s.refused == 1).accepted == 0


def test_rules_validate_their_arguments():
    with pytest.raises(ValueError):
        FaultRule(direction="both", action="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        FaultRule(direction="up", action="explode")  # type: ignore[arg-type]


def test_tls_passes_through_untouched(tmp_path: Path):
    certs = ensure_certificates(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(certs.cert_file, certs.key_file)
    server = Upstream(tls=server_ctx)
    try:
        with FaultProxy(("127.0.0.1", server.port)) as proxy:
            client_ctx = ssl.create_default_context(cafile=str(certs.ca_file))
            raw = connect(proxy)
            client = client_ctx.wrap_socket(raw, server_hostname="127.0.0.1", suppress_ragged_eofs=False)
            # the certificate the client verified is the upstream's: the proxy did not terminate TLS
            assert client.getpeercert()["subjectAltName"]
            client.sendall(b"secret-ish")
            assert recv_exactly(client, 10) == b"secret-ish"
            assert server.wait_received(0, 10) == b"secret-ish"
            stats = proxy.stats()
            assert stats.bytes_up > 10 and stats.bytes_down > 10  # handshake bytes were forwarded too
            assert proxy.reset() == 1
            # (the server's ssl module may report the RST as a ragged EOF: only the client side is checked)
            server.wait_ended(0)
            error = client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error == 0:  # already consumed by the TLS layer: then reading must fail
                with pytest.raises((ConnectionResetError, ssl.SSLError)):
                    client.recv(10)
            else:
                assert error == errno.ECONNRESET
    finally:
        server.close()


def test_stall_is_thread_safe_under_traffic(proxy):
    client = connect(proxy, timeout=10)
    stop = threading.Event()

    def toggle() -> None:
        while not stop.is_set():
            proxy.stall("both")
            proxy.resume("both")

    togglers = [threading.Thread(target=toggle) for _ in range(3)]
    for t in togglers:
        t.start()
    try:
        payload = bytes(range(256)) * 400
        client.sendall(payload)
        assert recv_exactly(client, len(payload)) == payload
    finally:
        stop.set()
        for t in togglers:
            t.join()
