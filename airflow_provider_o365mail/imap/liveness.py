"""How a dead IMAP peer is noticed, on every long-lived connection (IDLE and pooled sessions).

Three kinds of death, three mechanisms, each with a bound (the integration tests in
``tests/integration/test_imap_idle_faults.py`` measure each one through a TCP fault proxy):

- **Reset or close** (RST/FIN): the socket reports it at once.
- **Silent drop** (packets vanish, no FIN/RST: a NAT entry or a firewall state expired, a cable
  pulled): the kernel gives up on the connection after ``USER_TIMEOUT_SECONDS``. TCP keepalive
  probes an idle connection after ``KEEPALIVE_IDLE_SECONDS`` of silence, every
  ``KEEPALIVE_INTERVAL_SECONDS``; ``TCP_USER_TIMEOUT`` ends it when nothing was heard for
  ``USER_TIMEOUT_SECONDS`` (keepalive probes unanswered, or sent data unacknowledged). An IDLE
  probe that happens to be sent into the dead path is bounded by ``PROBE_ANSWER_SECONDS`` instead:
  either way within ``USER_TIMEOUT_SECONDS + PROBE_ANSWER_SECONDS`` (24 s <= 30 s).
- **Hung peer** (TCP stays up, the kernel acknowledges, nobody answers: a hung front end, a stuck
  proxy): only the protocol can tell. An IDLE is ended (``DONE``) every ``PROBE_SECONDS`` and must
  be answered within ``PROBE_ANSWER_SECONDS``, as must the next ``IDLE``: noticed within
  ``PROBE_SECONDS + PROBE_ANSWER_SECONDS`` (40 s <= 60 s). A pooled session is probed with ``NOOP``
  (same answer deadline) before use when it sat idle, and every command it runs is bounded by the
  connection's timeout.

The cost per IDLE connection: one ``DONE``/``OK`` and one ``IDLE``/``+ idling`` exchange every 30 s
(four TLS records, 174 bytes measured against Dovecot; about 0.6 KB on the wire with TCP/IP
headers and ACKs) plus two keepalive probes (empty segments and their ACKs, about 0.25 KB): about
1.7 KB a minute, 2.5 MB a day per watched folder, and two IMAP commands per 30 s.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

#: An IDLE is ended and renewed this often; DONE (and the next IDLE) must then be answered.
PROBE_SECONDS = 30.0
#: How long a probe (DONE, IDLE, a pooled session's NOOP) may wait for its answer (at most the
#: connection's timeout).
PROBE_ANSWER_SECONDS = 10.0
#: TCP keepalive: the first probe after this much silence ...
KEEPALIVE_IDLE_SECONDS = 10
#: ... then one every this many seconds ...
KEEPALIVE_INTERVAL_SECONDS = 2
#: ... and this many unanswered ones end the connection (where TCP_USER_TIMEOUT is missing).
KEEPALIVE_PROBES = 2
#: TCP_USER_TIMEOUT: nothing heard for this long while keepalive probes or data are unacknowledged
#: ends the connection (Linux). Equal to keepalive's own end, so both agree.
USER_TIMEOUT_SECONDS = KEEPALIVE_IDLE_SECONDS + KEEPALIVE_INTERVAL_SECONDS * KEEPALIVE_PROBES

_OPTIONS = (
    (socket.SOL_SOCKET, "SO_KEEPALIVE", 1),
    (socket.IPPROTO_TCP, "TCP_KEEPIDLE", KEEPALIVE_IDLE_SECONDS),
    (socket.IPPROTO_TCP, "TCP_KEEPINTVL", KEEPALIVE_INTERVAL_SECONDS),
    (socket.IPPROTO_TCP, "TCP_KEEPCNT", KEEPALIVE_PROBES),
    (socket.IPPROTO_TCP, "TCP_USER_TIMEOUT", USER_TIMEOUT_SECONDS * 1000),  # milliseconds
)


def keep_alive(sock: Any) -> None:
    """Keepalive and TCP_USER_TIMEOUT on ``sock`` (a socket, an SSL socket or asyncio's TransportSocket).

    Each option the platform lacks is skipped (macOS has no TCP_USER_TIMEOUT); errors are ignored: a
    socket that cannot take them still works, it just notices a silent drop later.
    """
    for level, name, value in _OPTIONS:
        option = getattr(socket, name, None)
        if option is None:
            continue
        with contextlib.suppress(OSError, AttributeError, ValueError):
            sock.setsockopt(level, option, value)


def answer_deadline(timeout: float, limit: float = PROBE_ANSWER_SECONDS) -> float:
    """How long a probe waits for its answer: ``limit``, or the connection's ``timeout`` if shorter."""
    return min(timeout, limit) if timeout and timeout > 0 else limit
