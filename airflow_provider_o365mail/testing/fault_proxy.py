"""A TCP proxy on 127.0.0.1 whose faults can be switched at run time, for IMAP/SMTP client tests.

Put it between a client and a server (the sandbox's Dovecot or Postfix, or any other):

    with FaultProxy(("127.0.0.1", imap_port)) as proxy:
        client = IMAP4_SSL("127.0.0.1", proxy.port, ...)   # TLS passes through untouched
        proxy.reset()                                      # every open connection gets a RST
        with proxy.stalled("down"):                        # server->client bytes stop, sockets stay open
            ...
        proxy.add_rule(FaultRule(direction="down", after_bytes=500, action="drop"))

The proxy never terminates TLS: it forwards bytes. Rules that look at content (``match``) therefore
only see plaintext protocols (plain IMAP/SMTP, or SMTP before STARTTLS); byte counts, stalls,
resets and slowness work the same with TLS inside.

Every socket operation of a connection happens on that connection's own thread (closing a socket
another thread is blocked on does not wake it on Linux, and a RST needs the close to be real), so
the public methods only change shared state under a lock and wake the threads.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import re
import selectors
import socket
import struct
import termios
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

Direction = Literal["up", "down", "both"]
Action = Literal["drop", "reset", "stall"]
UP, DOWN = "up", "down"  # up: client -> server; down: server -> client

_CHUNK = 65536
_MAX_BUFFERED = 4 * _CHUNK  # per direction; beyond it the proxy stops reading (TCP back-pressure)
_REGEX_WINDOW = 8192  # bytes kept per direction so a pattern split across reads still matches


@dataclass
class FaultRule:
    """A one-shot fault: fires on the first connection that meets it, then is removed.

    ``after_bytes``: after this many bytes (counted from when the rule was added, per connection) in
    ``direction``, forward exactly that many, then act. ``match``: when the bytes in ``direction``
    match this regex, forward up to the end of the match, then act. With neither, the rule fires when
    the next bytes arrive in ``direction``, before forwarding any of them. ``connection``: only the connection with this number (1 = the
    first accepted). ``delay``: seconds to wait (still forwarding) between the trigger and the action.
    """

    direction: Literal["up", "down"]
    action: Action = "reset"
    after_bytes: int | None = None
    match: bytes | str | None = None
    connection: int | None = None
    delay: float = 0.0
    fired: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.direction not in (UP, DOWN):
            raise ValueError("a rule watches one direction: 'up' (client->server) or 'down' (server->client)")
        if self.action not in ("drop", "reset", "stall"):
            raise ValueError(f"unknown action {self.action!r}")
        if isinstance(self.match, str):
            self.match = self.match.encode()
        self._pattern = re.compile(self.match) if self.match is not None else None
        self._seen: dict[int, int] = {}  # connection number -> bytes observed since the rule was added

    def _trigger_offset(self, conn_no: int, tail: bytes, chunk: bytes) -> int | None:
        """Where in ``chunk`` the rule triggers (bytes to forward before acting), or None."""
        if self.connection is not None and conn_no != self.connection:
            return None
        if self._pattern is not None:
            window = tail + chunk
            for found in self._pattern.finditer(window):
                if found.end() > len(tail):
                    return found.end() - len(tail)
            return None
        seen = self._seen.get(conn_no, 0)
        limit = self.after_bytes if self.after_bytes is not None else 0
        if seen + len(chunk) >= limit and (len(chunk) > 0):
            return max(limit - seen, 0)
        self._seen[conn_no] = seen + len(chunk)
        return None


@dataclass(frozen=True)
class ProxyStats:
    """Connections accepted, open now, open at most at once; ``refused``: the target was down.

    Bytes are counted as forwarded: ``up`` client->server, ``down`` server->client.
    """

    accepted: int
    active: int
    max_concurrent: int
    refused: int
    bytes_up: int
    bytes_down: int


@dataclass
class _Faults:
    stall: set[str] = field(default_factory=set)
    rate: dict[str, float] = field(default_factory=dict)  # bytes per second per direction
    delay: dict[str, float] = field(default_factory=dict)  # seconds each chunk is held


@dataclass
class _Pending:
    mark: int  # act once this many bytes have been forwarded (no delay)...
    rule: FaultRule
    act_at: float | None  # ...or at this monotonic time (rule with a delay)


class _Pipe:
    """One direction of one connection: what was read from ``src`` and waits to go to ``dst``."""

    def __init__(self, name: str, src: socket.socket, dst: socket.socket) -> None:
        self.name = name
        self.src = src
        self.dst = dst
        self.out: deque[tuple[float, bytes]] = deque()  # (forwardable at monotonic time, data)
        self.buffered = 0
        self.read_eof = False
        self.write_shut = False
        self.forwarded = 0
        self.tail = b""
        self.next_send = 0.0  # rate limit: earliest time of the next send
        self.pending: _Pending | None = None  # a triggered rule waiting for its moment
        self.held: list[bytes] = []  # bytes behind a "stall" rule's trigger point


class _Connection:
    def __init__(self, proxy: FaultProxy, number: int, client: socket.socket, server: socket.socket) -> None:
        self.proxy = proxy
        self.number = number
        self.client = client
        self.server = server
        self.up = _Pipe(UP, client, server)
        self.down = _Pipe(DOWN, server, client)
        self.waker_r, self.waker_w = socket.socketpair()
        self.command: Literal["drop", "reset"] | None = None
        self.stalled_by_rule: set[str] = set()
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"fault-proxy-conn-{number}", daemon=True)

    def wake(self) -> None:
        with contextlib.suppress(OSError):
            self.waker_w.send(b"\0")

    # -------------------------------------------------------------- the connection's thread
    def _run(self) -> None:
        try:
            self._loop()
        except OSError:
            pass  # a peer went away: nothing to forward any more
        finally:
            self._close(reset=False)
            self.proxy._connection_done(self)

    def _loop(self) -> None:
        for sock in (self.client, self.server):
            sock.setblocking(False)
        sel = selectors.DefaultSelector()
        try:
            while True:
                faults, command = self.proxy._snapshot(self)
                if command is not None:
                    self._close(reset=command == "reset")
                    return
                if self.up.write_shut and self.down.write_shut:
                    return
                now = time.monotonic()
                timeout = 0.5
                wanted: dict[socket.socket, int] = {self.waker_r: selectors.EVENT_READ}
                for pipe in (self.up, self.down):
                    stalled = pipe.name in faults.stall or pipe.name in self.stalled_by_rule
                    if not stalled and not pipe.read_eof and pipe.buffered < _MAX_BUFFERED:
                        wanted[pipe.src] = wanted.get(pipe.src, 0) | selectors.EVENT_READ
                    if not stalled and pipe.out:
                        ready_at = max(pipe.out[0][0], pipe.next_send)
                        if ready_at <= now:
                            wanted[pipe.dst] = wanted.get(pipe.dst, 0) | selectors.EVENT_WRITE
                        else:
                            timeout = min(timeout, ready_at - now)
                    pending = pipe.pending
                    if pending is not None and pending.act_at is None and not pipe.out:
                        timeout = 0 if pipe.forwarded >= pending.mark else timeout  # act now
                for sock, events in wanted.items():
                    sel.register(sock, events)
                try:
                    ready = sel.select(max(timeout, 0))
                finally:
                    for sock in wanted:
                        sel.unregister(sock)
                for key, events in ready:
                    sock = key.fileobj
                    if sock is self.waker_r:
                        with contextlib.suppress(BlockingIOError):
                            self.waker_r.recv(4096)
                        continue
                    for pipe in (self.up, self.down):
                        if events & selectors.EVENT_READ and sock is pipe.src:
                            self._read(pipe, faults)
                        if events & selectors.EVENT_WRITE and sock is pipe.dst:
                            self._write(pipe, faults)
                for pipe in (self.up, self.down):
                    if self._act_if_due(pipe):
                        return
                    if pipe.read_eof and not pipe.out and not pipe.write_shut and pipe.pending is None:
                        with contextlib.suppress(OSError):
                            pipe.dst.shutdown(socket.SHUT_WR)  # pass the half-close on
                        pipe.write_shut = True
        finally:
            sel.close()

    def _read(self, pipe: _Pipe, faults: _Faults) -> None:
        faults = self.proxy._snapshot(self)[0]  # a fault switched on while we waited applies to these bytes
        try:
            data = pipe.src.recv(_CHUNK)
        except BlockingIOError:
            return
        if not data:
            pipe.read_eof = True
            return
        if pipe.pending is not None and pipe.pending.act_at is None:
            if pipe.pending.rule.action != "stall":
                return  # a rule triggered: bytes after its trigger point are never forwarded
            pipe.held.append(data)
            return
        held = b""
        if pipe.pending is None:
            cut, rule = self.proxy._check_rules(self.number, pipe, data)
            if rule is not None:
                if rule.delay > 0:
                    # keep forwarding until the action is due
                    pipe.pending = _Pending(0, rule, time.monotonic() + rule.delay)
                    threading.Timer(rule.delay, self.wake).start()
                else:
                    data, held = data[:cut], data[cut:]
                    pipe.pending = _Pending(pipe.forwarded + pipe.buffered + len(data), rule, None)
                    if rule.action == "stall" and held:
                        pipe.held.append(held)
        pipe.tail = (pipe.tail + data)[-_REGEX_WINDOW:]
        if data:
            pipe.out.append((time.monotonic() + faults.delay.get(pipe.name, 0.0), data))
            pipe.buffered += len(data)

    def _write(self, pipe: _Pipe, faults: _Faults) -> None:
        faults = self.proxy._snapshot(self)[0]
        if pipe.name in faults.stall or pipe.name in self.stalled_by_rule or not pipe.out:
            return
        ready_at, data = pipe.out[0]
        rate = faults.rate.get(pipe.name)
        piece = data if rate is None else data[: max(1, int(rate / 20))]  # ~20 sends per second
        try:
            sent = pipe.dst.send(piece)
        except BlockingIOError:
            return
        if sent < len(data):
            pipe.out[0] = (ready_at, data[sent:])
        else:
            pipe.out.popleft()
        pipe.buffered -= sent
        pipe.forwarded += sent
        if rate is not None:
            pipe.next_send = time.monotonic() + sent / rate
        self.proxy._count(pipe.name, sent)

    def _act_if_due(self, pipe: _Pipe) -> bool:
        pending = pipe.pending
        if pending is None:
            return False
        if pending.act_at is not None:
            if time.monotonic() < pending.act_at:
                return False
        elif pipe.forwarded < pending.mark or pipe.out:
            return False
        pending.rule.fired.set()
        if pending.rule.action == "stall":
            self.stalled_by_rule.add(pipe.name)
            pipe.pending = None
            for data in pipe.held:  # forwarded once the direction is resumed
                pipe.out.append((0.0, data))
                pipe.buffered += len(data)
            pipe.held.clear()
            return False
        _wait_sent(pipe.dst)  # the bytes up to the trigger must reach the peer before we cut
        self._close(reset=pending.rule.action == "reset")
        return True

    def _close(self, *, reset: bool) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                if reset:
                    # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
        for sock in (self.waker_r, self.waker_w):
            sock.close()


def _wait_sent(sock: socket.socket, timeout: float = 2.0) -> None:
    """Wait until the kernel's send queue of ``sock`` is empty (the peer has the bytes)."""
    deadline = time.monotonic() + timeout
    buf = bytearray(4)
    while time.monotonic() < deadline:
        try:
            fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf)
        except OSError:
            return
        if struct.unpack("i", buf)[0] == 0:
            return
        time.sleep(0.005)


class FaultProxy:
    """A TCP proxy from ``127.0.0.1:<port>`` to ``target`` with faults switchable at run time."""

    def __init__(self, target: tuple[str, int], *, listen_host: str = "127.0.0.1", connect_timeout: float = 10) -> None:
        self.target = target
        self.listen_host = listen_host
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._faults = _Faults()
        self._rules: list[FaultRule] = []
        self._connections: dict[int, _Connection] = {}
        self._numbers = itertools.count(1)
        self._accepted = self._max_concurrent = self._refused = 0
        self._bytes = {UP: 0, DOWN: 0}
        self._refusing = False
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._listener_changed = threading.Event()
        self.port = 0
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------- lifecycle
    def start(self) -> FaultProxy:
        self._listener = self._listen(0)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name="fault-proxy-accept", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            connections = list(self._connections.values())
            for conn in connections:
                conn.command = "drop"
        for conn in connections:
            conn.wake()
            conn.thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def address(self) -> tuple[str, int]:
        return (self.listen_host, self.port)

    def _listen(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.listen_host, port))
        sock.listen(128)
        sock.setblocking(False)
        return sock

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            listener = self._listener
            if listener is None:
                self._listener_changed.wait(0.05)
                self._listener_changed.clear()
                continue
            try:
                with selectors.DefaultSelector() as sel:
                    sel.register(listener, selectors.EVENT_READ)
                    if not sel.select(0.05):
                        continue
                client, _ = listener.accept()
            except (OSError, ValueError):
                continue  # refuse() closed the listener under us
            self._open(client)

    def _open(self, client: socket.socket) -> None:
        client.setblocking(True)
        try:
            server = socket.create_connection(self.target, timeout=self.connect_timeout)
        except OSError:
            # The target is down: the client sees its connection reset, as a dead server would do.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            with self._lock:
                self._refused += 1
            return
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            number = next(self._numbers)
            conn = _Connection(self, number, client, server)
            self._connections[number] = conn
            self._accepted += 1
            self._max_concurrent = max(self._max_concurrent, len(self._connections))
        conn.thread.start()

    # -------------------------------------------------------------- called by connection threads
    def _snapshot(self, conn: _Connection) -> tuple[_Faults, Literal["drop", "reset"] | None]:
        with self._lock:
            faults = _Faults(set(self._faults.stall), dict(self._faults.rate), dict(self._faults.delay))
            return faults, conn.command

    def _check_rules(self, number: int, pipe: _Pipe, data: bytes) -> tuple[int, FaultRule | None]:
        with self._lock:
            for rule in list(self._rules):
                if rule.direction != pipe.name:
                    continue
                offset = rule._trigger_offset(number, pipe.tail, data)
                if offset is not None:
                    self._rules.remove(rule)
                    return offset, rule
        return len(data), None

    def _count(self, direction: str, sent: int) -> None:
        with self._lock:
            self._bytes[direction] += sent

    def _connection_done(self, conn: _Connection) -> None:
        with self._lock:
            self._connections.pop(conn.number, None)

    # -------------------------------------------------------------- faults (thread-safe)
    def _wake_all(self) -> None:
        with self._lock:
            connections = list(self._connections.values())
        for conn in connections:
            conn.wake()

    def _command_all(self, command: Literal["drop", "reset"]) -> int:
        with self._lock:
            connections = list(self._connections.values())
            for conn in connections:
                conn.command = command
        for conn in connections:
            conn.wake()
        for conn in connections:
            conn.thread.join(5)  # on return the sockets are closed and stats() no longer counts them
        return len(connections)

    def drop(self) -> int:
        """Close both sides of every open connection with a FIN; returns how many were open."""
        return self._command_all("drop")

    def reset(self) -> int:
        """Abort every open connection with a RST on both sides; returns how many were open."""
        return self._command_all("reset")

    def stall(self, direction: Direction = "both") -> None:
        """Stop forwarding ``direction`` on every connection, current and new; sockets stay open."""
        with self._lock:
            self._faults.stall |= _directions(direction)
        self._wake_all()

    def resume(self, direction: Direction = "both") -> None:
        """Undo :meth:`stall` (and stalls set by rules) for ``direction``."""
        names = _directions(direction)
        with self._lock:
            self._faults.stall -= names
            for conn in self._connections.values():
                conn.stalled_by_rule -= names
        self._wake_all()

    def slow(
        self, *, bytes_per_second: float | None = None, delay: float | None = None, direction: Direction = "both"
    ) -> None:
        """Limit ``direction`` to ``bytes_per_second`` and/or hold every chunk ``delay`` seconds."""
        with self._lock:
            for name in _directions(direction):
                if bytes_per_second is not None:
                    if bytes_per_second <= 0:
                        raise ValueError("bytes_per_second must be positive (use stall() to stop a direction)")
                    self._faults.rate[name] = float(bytes_per_second)
                if delay is not None:
                    self._faults.delay[name] = float(delay)
        self._wake_all()

    def unslow(self, direction: Direction = "both") -> None:
        with self._lock:
            for name in _directions(direction):
                self._faults.rate.pop(name, None)
                self._faults.delay.pop(name, None)
        self._wake_all()

    def refuse(self) -> None:
        """Refuse new connections (the port stops listening: clients get ECONNREFUSED).

        Open connections go on; connections the kernel queued but the proxy had not accepted yet
        are reset, as they would be by a server closing its listening socket.
        """
        with self._lock:
            self._refusing = True
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()

    def accept(self) -> None:
        """Listen again on the same port after :meth:`refuse`."""
        with self._lock:
            if self._listener is not None:
                return
            self._listener = self._listen(self.port)
            self._refusing = False
        self._listener_changed.set()

    def add_rule(self, rule: FaultRule) -> FaultRule:
        """Arm a one-shot rule; ``rule.fired`` is an Event set when it fires."""
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        """Remove every fault: stalls, slowness, pending rules; listen again if refusing."""
        with self._lock:
            self._faults = _Faults()
            self._rules.clear()
            for conn in self._connections.values():
                conn.stalled_by_rule.clear()
        self.accept()
        self._wake_all()

    # -------------------------------------------------------------- context managers
    @contextlib.contextmanager
    def stalled(self, direction: Direction = "both") -> Iterator[FaultProxy]:
        self.stall(direction)
        try:
            yield self
        finally:
            self.resume(direction)

    @contextlib.contextmanager
    def slowed(
        self, *, bytes_per_second: float | None = None, delay: float | None = None, direction: Direction = "both"
    ) -> Iterator[FaultProxy]:
        self.slow(bytes_per_second=bytes_per_second, delay=delay, direction=direction)
        try:
            yield self
        finally:
            self.unslow(direction)

    @contextlib.contextmanager
    def refusing(self) -> Iterator[FaultProxy]:
        self.refuse()
        try:
            yield self
        finally:
            self.accept()

    # -------------------------------------------------------------- observation
    def stats(self) -> ProxyStats:
        with self._lock:
            return ProxyStats(
                accepted=self._accepted,
                active=len(self._connections),
                max_concurrent=self._max_concurrent,
                refused=self._refused,
                bytes_up=self._bytes[UP],
                bytes_down=self._bytes[DOWN],
            )

    def reset_peak(self) -> None:
        """Start counting ``max_concurrent`` again from the connections open now."""
        with self._lock:
            self._max_concurrent = len(self._connections)

    def wait_for(self, condition: Callable[[ProxyStats], bool], timeout: float = 10.0) -> ProxyStats:
        """Poll :meth:`stats` until ``condition`` holds; raise TimeoutError with the last stats."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if condition(stats):
                return stats
            if time.monotonic() > deadline:
                raise TimeoutError(f"proxy condition not met within {timeout} s: {stats}")
            time.sleep(0.01)


def _directions(direction: Direction) -> set[str]:
    if direction == "both":
        return {UP, DOWN}
    if direction in (UP, DOWN):
        return {direction}
    raise ValueError(f"direction must be 'up', 'down' or 'both', not {direction!r}")
