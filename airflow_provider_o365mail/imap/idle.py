"""Wait for new mail without blocking the event loop: asyncio IMAP IDLE (aioimaplib), or polling.

The triggerer runs many triggers on one event loop, so the long wait must be asynchronous. A
wait ends when the server pushes EXISTS/RECENT for the folder, when IDLE has run for
``max_idle`` (RFC 2177 wants a re-issue within 29 minutes; we use 25), or shortly before the
access token it logged in with expires (Exchange ends such sessions with
``BYE ... AccessTokenExpired``). The caller then checks the folder with the synchronous machinery.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aioimaplib
from imapclient import imap_utf7

from airflow_provider_o365mail import exceptions
from airflow_provider_o365mail.core.credentials import ExpiringToken
from airflow_provider_o365mail.exceptions import MailServerError, MailServerUnavailable
from airflow_provider_o365mail.imap.errors import refusal_class
from airflow_provider_o365mail.imap.proxied import ProxiedAioIMAP4
from airflow_provider_o365mail.retry import Backoff
from airflow_provider_o365mail.tls import HttpProxy

log = logging.getLogger(__name__)


async def first_completed(waits: Sequence[Awaitable[str]]) -> asyncio.Future[str]:
    """Run ``waits`` together until the first ends; the others are cancelled and awaited. Returns the
    finished one (its ``result()`` raises what it raised)."""
    futures = [asyncio.ensure_future(w) for w in waits]
    try:
        done, _ = await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in futures:
            pending.cancel()
        await asyncio.gather(*futures, return_exceptions=True)
    return next(iter(done))


# aioimaplib logs the AUTHENTICATE line (a base64 token) at DEBUG: never let that through.
logging.getLogger("aioimaplib.aioimaplib").setLevel(logging.INFO)

MAX_IDLE_SECONDS = 25 * 60
#: IDLE is ended and renewed this often, and DONE must be answered: a server that stopped talking is
#: noticed, and middleboxes with a 4-5 min idle cut-off (Azure's load balancers) see traffic.
PROBE_SECONDS = 240.0
KEEPALIVE_IDLE_SECONDS = 10
KEEPALIVE_INTERVAL_SECONDS = 5
KEEPALIVE_PROBES = 3
#: Reconnecting after transient failures: 2, 4, 8 ... s, at most 5 min, jittered; never gives up.
RECONNECT = Backoff(first=2.0, maximum=300.0, jitter=(0.5, 1.0))
# Errors a person must fix: reconnecting cannot help.
PERMANENT_ERRORS = (
    exceptions.AuthorizationError,
    exceptions.ConnectionConfigError,
    exceptions.MailAuthenticationError,
    exceptions.TokenStoreError,
    exceptions.ProxyRefused,
)
TOKEN_MARGIN_SECONDS = 120
_UIDNEXT = re.compile(rb"\[UIDNEXT (\d+)\]")
_PUSH = re.compile(rb"^\d+ (EXISTS|RECENT)$|^(\d+ )?FETCH|BYE", re.IGNORECASE)


def quote_folder(folder: str) -> str:
    encoded = imap_utf7.encode(folder).decode("ascii")
    return '"' + encoded.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class ImapEndpoint:
    """Where and as whom to log in over IMAPS (no secret here: the token comes from a token source)."""

    host: str
    port: int
    user: str
    timeout: float
    ssl_context: ssl.SSLContext
    #: an HTTP CONNECT proxy to tunnel through (TLS still to ``host``), or None for a direct connection
    proxy: HttpProxy | None = None


class IdleUnsupported(Exception):
    """The server does not offer IDLE: poll instead."""


#: ``factory(endpoint, on_lost)`` builds an (unconnected) aioimaplib client that calls ``on_lost(exc)``
#: when its connection drops; tests pass a fake.
IdleClientFactory = Callable[[ImapEndpoint, Callable[[Exception | None], None]], Any]


def aioimaplib_client(endpoint: ImapEndpoint, on_lost: Callable[[Exception | None], None]) -> aioimaplib.IMAP4:
    # IMAP4 with an SSL context is IMAPS; IMAP4_SSL would drop the connection-lost callback.
    cls: Callable[..., aioimaplib.IMAP4] = aioimaplib.IMAP4
    if endpoint.proxy is not None:
        cls = functools.partial(ProxiedAioIMAP4, proxy=endpoint.proxy)
    return cls(
        host=endpoint.host,
        port=endpoint.port,
        timeout=endpoint.timeout,
        conn_lost_cb=on_lost,
        ssl_context=endpoint.ssl_context,
    )


def enable_keepalive(client: Any) -> None:
    """TCP keepalive on the IDLE socket: a silently dropped connection is noticed in about 25 s."""
    transport = getattr(client.protocol, "transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_SECONDS)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_SECONDS)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)


async def wait_for_new_mail(
    endpoint: ImapEndpoint,
    folder: str,
    token: ExpiringToken,
    known_uidnext: int | None,
    max_idle: float = MAX_IDLE_SECONDS,
    *,
    probe_interval: float = PROBE_SECONDS,
    client_factory: IdleClientFactory = aioimaplib_client,
    clock: Callable[[], float] = time.time,
    on_selected: Callable[[int | None], None] | None = None,
) -> str:
    """Return why the wait ended: ``"push"``, ``"changed"`` (new mail before IDLE began), ``"timeout"``.

    ``on_selected(uidnext)`` is told the folder's UIDNEXT once it is selected, before IDLE begins: a
    shared watcher (:mod:`.imap_hub`) compares it with what each waiter's last check saw.

    A dead connection raises :class:`MailServerUnavailable` within seconds: the connection-lost
    callback (resets, closes), TCP keepalive (silent drops), and every ``probe_interval`` seconds the
    IDLE is ended and must be answered within the endpoint's timeout (a server that stopped talking).
    """
    lost = asyncio.Event()
    client = client_factory(endpoint, lambda _exc: lost.set())
    try:
        await client.wait_hello_from_server()
        enable_keepalive(client)
        response = await client.xoauth2(endpoint.user, token.token)
        if response.result != "OK":
            text = " ".join(_lines(response)[-1:]) or response.result
            cls = refusal_class(text, during_login=True)
            raise cls(f"IMAP login to {endpoint.host}:{endpoint.port} as {endpoint.user} for IDLE failed: {text}")
        if "IDLE" not in client.protocol.capabilities:  # Exchange's greeting lists none
            await asyncio.wait_for(client.protocol.capability(), endpoint.timeout)
        if "IDLE" not in client.protocol.capabilities:
            raise IdleUnsupported(endpoint.host)
        selected = await client.select(quote_folder(folder))
        if selected.result != "OK":
            raise MailServerError(f"Cannot open folder {folder!r} for IDLE: {_lines(selected)[-1:]}")
        uidnext = _uidnext(selected)
        if on_selected is not None:
            on_selected(uidnext)
        if known_uidnext is not None and uidnext is not None and uidnext != known_uidnext:
            return "changed"
        # The token's expiry is wall-clock time (``clock``); the wait itself runs on the loop's clock.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max_idle, token.expires_on - TOKEN_MARGIN_SECONDS - clock())
        while True:
            slice_ = min(probe_interval, deadline - loop.time())
            if slice_ <= 0:
                return "timeout"
            if await _idle_once(client, endpoint, lost, slice_) == "push":
                return "push"
    finally:
        if not lost.is_set():  # a lost connection has nobody to say LOGOUT to
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.logout(), timeout=5)


async def _idle_once(client: Any, endpoint: ImapEndpoint, lost: asyncio.Event, seconds: float) -> str:
    """One IDLE of at most ``seconds``: ``"push"``, or ``"quiet"`` after the server answered DONE."""
    where = f"{endpoint.host}:{endpoint.port}"
    try:
        idle = await asyncio.wait_for(client.idle_start(timeout=seconds), endpoint.timeout)
    except TimeoutError:
        raise MailServerUnavailable(
            f"IMAP server {where} did not accept IDLE within {endpoint.timeout:.0f} s."
        ) from None
    reason = "quiet"
    gone = asyncio.ensure_future(lost.wait())
    try:
        while True:
            push = asyncio.ensure_future(client.wait_server_push(timeout=seconds + 5))
            done, _ = await asyncio.wait({push, gone}, return_when=asyncio.FIRST_COMPLETED)
            if gone in done:
                push.cancel()
                raise MailServerUnavailable(f"The IDLE connection to {where} was lost; reconnecting.")
            try:
                lines = push.result()
            except TimeoutError:
                lines = aioimaplib.STOP_WAIT_SERVER_PUSH
            if lines == aioimaplib.STOP_WAIT_SERVER_PUSH:
                break
            lines = lines if isinstance(lines, list) else [lines]
            if any(_PUSH.search(line.strip()) for line in lines if isinstance(line, bytes)):
                if any(b"BYE" in line for line in lines if isinstance(line, bytes)):
                    raise MailServerUnavailable(f"IMAP server ended the IDLE session: {lines[-1]!r}")
                reason = "push"
                break
    finally:
        gone.cancel()
        client.idle_done()
    if reason == "push":
        with contextlib.suppress(Exception):
            await asyncio.wait_for(idle, timeout=5)
        return reason
    try:  # the probe: a live server answers DONE at once
        await asyncio.wait_for(idle, endpoint.timeout)
    except TimeoutError:
        raise MailServerUnavailable(
            f"IMAP server {where} did not answer DONE within {endpoint.timeout:.0f} s: the connection is dead."
        ) from None
    if lost.is_set():
        raise MailServerUnavailable(f"The IDLE connection to {where} was lost; reconnecting.")
    return reason


def _lines(response: object) -> list[str]:
    return [
        line.decode("utf-8", "replace") if isinstance(line, bytes) else str(line)
        for line in getattr(response, "lines", [])
    ]


def _uidnext(response: object) -> int | None:
    for line in getattr(response, "lines", []):
        if isinstance(line, bytes):
            match = _UIDNEXT.search(line)
            if match:
                return int(match.group(1))
    return None
