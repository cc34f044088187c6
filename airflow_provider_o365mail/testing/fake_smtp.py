"""A scriptable SMTP server that records every byte it receives, for failure-path tests.

Postfix proves the happy path; this server plays the misbehaving or hostile peer: no STARTTLS,
an untrusted certificate, ``432 4.3.2`` on connect, temporary or permanent RCPT/DATA replies, a
dropped session. ``received`` shows what a client sent, so a test can prove that no AUTH (and
no token) ever left the client before TLS was up.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class SmtpScript:
    """What the server answers. Lists of replies are consumed one per use; then the default applies."""

    offer_starttls: bool = True
    cert_file: Path | None = None
    key_file: Path | None = None
    connect_replies: deque[str] = field(default_factory=deque)  # e.g. "432 4.3.2 Concurrent connections limit"
    rcpt_replies: dict[str, deque[str]] = field(default_factory=dict)
    data_replies: deque[str] = field(default_factory=deque)
    drop_after_messages: deque[int] = field(default_factory=deque)  # per session: close after N messages
    size_limit: int = 0


@dataclass
class SmtpSessionRecord:
    lines_before_tls: list[bytes] = field(default_factory=list)
    lines_after_tls: list[bytes] = field(default_factory=list)
    auth_commands: int = 0
    messages: list[tuple[str, list[str], bytes]] = field(default_factory=list)


class FakeSmtpServer:
    """``with FakeSmtpServer(script) as server: ... server.port ... server.sessions``."""

    def __init__(self, script: SmtpScript | None = None) -> None:
        self.script = script or SmtpScript()
        self.sessions: list[SmtpSessionRecord] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._listener.settimeout(0.2)  # here, not in the thread: a quick __exit__ may close it first
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> FakeSmtpServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(timeout=5)

    @property
    def received(self) -> bytes:
        return b"".join(line for s in self.sessions for line in (*s.lines_before_tls, *s.lines_after_tls))

    @property
    def delivered(self) -> list[tuple[str, list[str], bytes]]:
        return [message for s in self.sessions for message in s.messages]

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            record = SmtpSessionRecord()
            thread = threading.Thread(target=self._session, args=(conn, record), daemon=True)
            with self._lock:
                self.sessions.append(record)
                self._threads.append(thread)
            thread.start()

    def wait_sessions_closed(self, timeout: float = 10.0) -> None:
        """Wait until every session so far has ended (its messages recorded): a dropped client's
        last message is recorded by the server's thread a moment after the client saw the drop."""
        with self._lock:
            threads = list(self._threads)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                raise TimeoutError(f"an SMTP session of the fake server is still open after {timeout} s")

    def _pop(self, queue: deque[str], default: str) -> str:
        with self._lock:
            return queue.popleft() if queue else default

    def _session(self, conn: socket.socket, record: SmtpSessionRecord) -> None:
        script = self.script
        conn.settimeout(10)
        stream = conn.makefile("rwb")
        lines = record.lines_before_tls
        tls = False

        def send(text: str) -> None:
            stream.write(text.encode() + b"\r\n")
            stream.flush()

        try:
            greeting = self._pop(script.connect_replies, "220 fake.smtp.test ESMTP")
            send(greeting)
            if not greeting.startswith("220"):
                return
            with self._lock:
                drop_after = script.drop_after_messages.popleft() if script.drop_after_messages else 0
            mail_from, rcpts, sent = "", [], 0
            while True:
                line = stream.readline(65536)
                if not line:
                    return
                lines.append(line)
                verb = line.split(b" ", 1)[0].split(b":", 1)[0].strip().upper().decode(errors="replace")
                arg = line.strip()[len(verb) :].strip().decode(errors="replace")
                if verb in ("EHLO", "HELO"):
                    features = ["250-fake.smtp.test", "250-PIPELINING", "250-8BITMIME"]
                    if script.size_limit:
                        features.append(f"250-SIZE {script.size_limit}")
                    if script.offer_starttls and not tls:
                        features.append("250-STARTTLS")
                    if tls:
                        features.append("250-AUTH LOGIN XOAUTH2")
                    features.append("250 ENHANCEDSTATUSCODES")
                    for feature in features:
                        send(feature)
                elif verb == "STARTTLS" and script.offer_starttls and not tls:
                    send("220 2.0.0 SMTP server ready")
                    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                    context.load_cert_chain(str(script.cert_file), str(script.key_file))
                    try:
                        conn = context.wrap_socket(conn, server_side=True)
                    except (ssl.SSLError, OSError):
                        return  # the client refused our certificate
                    stream = conn.makefile("rwb")
                    tls, lines = True, record.lines_after_tls
                elif verb == "AUTH":
                    record.auth_commands += 1
                    if not tls:
                        send("530 5.7.57 Client not authenticated to send mail")
                        continue
                    send("334 ")
                    lines.append(stream.readline(65536))
                    send("235 2.7.0 Authentication successful")
                elif verb == "MAIL":
                    mail_from, rcpts = arg.split(":", 1)[1].split()[0].strip("<>"), []
                    send("250 2.1.0 Sender OK")
                elif verb == "RCPT":
                    address = arg.split(":", 1)[1].strip().strip("<>")
                    reply = self._pop(script.rcpt_replies.get(address, deque()), "250 2.1.5 Recipient OK")
                    if reply.startswith("250"):
                        rcpts.append(address)
                    send(reply)
                elif verb == "DATA":
                    send("354 Start mail input; end with <CRLF>.<CRLF>")
                    body = bytearray()
                    while True:
                        chunk = stream.readline(1 << 20)
                        if chunk in (b".\r\n", b""):
                            break
                        body += chunk[1:] if chunk.startswith(b"..") else chunk
                    reply = self._pop(script.data_replies, "250 2.6.0 Queued mail for delivery")
                    if reply.startswith("250"):
                        record.messages.append((mail_from, rcpts, bytes(body)))
                        sent += 1
                    send(reply)
                    if drop_after and sent >= drop_after:
                        return  # drop the connection without a word
                elif verb == "RSET":
                    mail_from, rcpts = "", []
                    send("250 2.0.0 Resetting")
                elif verb == "NOOP":
                    send("250 2.0.0 OK")
                elif verb == "QUIT":
                    send("221 2.0.0 Bye")
                    return
                else:
                    send("502 5.5.2 Command not recognized")
        except (OSError, ValueError):
            return
        finally:
            with contextlib.suppress(OSError):
                conn.close()
