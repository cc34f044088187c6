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
from airflow_provider_o365mail.imap.aio_login import XOAuth2LoginMixin
from airflow_provider_o365mail.imap.errors import refusal_class
from airflow_provider_o365mail.imap.liveness import PROBE_ANSWER_SECONDS, PROBE_SECONDS, answer_deadline, keep_alive
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
# How often IDLE is probed, how long an answer may take, the keepalive timings: .liveness.
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


class _IMAP4(XOAuth2LoginMixin, aioimaplib.IMAP4):
    pass


class _ProxiedIMAP4(XOAuth2LoginMixin, ProxiedAioIMAP4):
    pass


def aioimaplib_client(endpoint: ImapEndpoint, on_lost: Callable[[Exception | None], None]) -> aioimaplib.IMAP4:
    # IMAP4 with an SSL context is IMAPS; IMAP4_SSL would drop the connection-lost callback.
    cls: Callable[..., aioimaplib.IMAP4] = _IMAP4
    if endpoint.proxy is not None:
        cls = functools.partial(_ProxiedIMAP4, proxy=endpoint.proxy)
    return cls(
        host=endpoint.host,
        port=endpoint.port,
        timeout=endpoint.timeout,
        conn_lost_cb=on_lost,
        ssl_context=endpoint.ssl_context,
    )


def enable_keepalive(client: Any) -> None:
    """TCP keepalive and TCP_USER_TIMEOUT on the IDLE socket: a silent drop is noticed within 14 s (:mod:`.liveness`)."""
    transport = getattr(client.protocol, "transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        keep_alive(sock)


def _close(client: Any, *, gracefully: bool) -> None:
    """Close the client's connection: ``gracefully`` sends what is buffered first; otherwise drop it at once
    (and cancel the client's commands that wait for answers that will never come)."""
    protocol = getattr(client, "protocol", None)
    transport = getattr(protocol, "transport", None)
    if transport is not None:
        with contextlib.suppress(Exception):
            if gracefully:
                transport.close()
            else:
                transport.abort()
    if not gracefully:
        for task in [*getattr(client, "tasks", ()), *getattr(protocol, "tasks", ())]:
            task.cancel()


async def wait_for_new_mail(
    endpoint: ImapEndpoint,
    folder: str,
    token: ExpiringToken,
    known_uidnext: int | None,
    max_idle: float = MAX_IDLE_SECONDS,
    *,
    probe_interval: float = PROBE_SECONDS,
    probe_answer: float = PROBE_ANSWER_SECONDS,
    client_factory: IdleClientFactory = aioimaplib_client,
    clock: Callable[[], float] = time.time,
    on_selected: Callable[[int | None], None] | None = None,
) -> str:
    """Return why the wait ended: ``"push"``, ``"changed"`` (new mail before IDLE began), ``"timeout"``.

    ``on_selected(uidnext)`` is told the folder's UIDNEXT once it is selected, before IDLE begins: a
    shared watcher (:mod:`.hub`) compares it with what each waiter's last check saw.

    A dead connection raises :class:`MailServerUnavailable` (see :mod:`.liveness` for the bounds): a
    reset or close at once (the connection-lost callback), a silent drop after 14 s of silence (TCP
    keepalive and TCP_USER_TIMEOUT; 24 s if a probe went into it), and a server or proxy that stopped answering within ``probe_interval`` +
    ``probe_answer`` seconds: every ``probe_interval`` seconds the IDLE is ended, and DONE and the
    next IDLE must each be answered within ``probe_answer`` seconds (at most the endpoint's timeout).
    A dead connection is dropped without LOGOUT (nobody would answer it).
    """
    lost = asyncio.Event()
    client = client_factory(endpoint, lambda _exc: lost.set())
    try:
        reason = await _watch(
            client,
            endpoint,
            folder,
            token,
            known_uidnext,
            max_idle,
            probe_interval,
            probe_answer,
            clock,
            lost,
            on_selected,
        )
    except asyncio.CancelledError:  # the caller stopped waiting: the session is fine, say goodbye
        await _logout(client, lost)
        raise
    except BaseException:  # dead, refused, or in an unknown state: drop the connection
        _close(client, gracefully=False)
        raise
    await _logout(client, lost)
    return reason


async def _logout(client: Any, lost: asyncio.Event) -> None:
    if not lost.is_set():  # a lost connection has nobody to say LOGOUT to
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.logout(), timeout=5)
    _close(client, gracefully=True)


async def _watch(
    client: Any,
    endpoint: ImapEndpoint,
    folder: str,
    token: ExpiringToken,
    known_uidnext: int | None,
    max_idle: float,
    probe_interval: float,
    probe_answer: float,
    clock: Callable[[], float],
    lost: asyncio.Event,
    on_selected: Callable[[int | None], None] | None,
) -> str:
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
    answer = answer_deadline(endpoint.timeout, probe_answer)
    # The token's expiry is wall-clock time (``clock``); the wait itself runs on the loop's clock.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + min(max_idle, token.expires_on - TOKEN_MARGIN_SECONDS - clock())
    while True:
        slice_ = min(probe_interval, deadline - loop.time())
        if slice_ <= 0:
            return "timeout"
        if await _idle_once(client, endpoint, lost, slice_, answer) == "push":
            return "push"


async def _answered(awaitable: Awaitable[Any], lost: asyncio.Event, seconds: float, what: str, where: str) -> Any:
    """The result of ``awaitable`` (a command waiting for the server's answer), unless the connection is lost
    or ``seconds`` pass first: then :class:`MailServerUnavailable` (the peer is dead)."""
    answer = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(lost.wait())
    try:
        done, _ = await asyncio.wait({answer, gone}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if answer in done:
        return answer.result()
    answer.cancel()
    await asyncio.wait({answer})
    if gone in done:
        raise MailServerUnavailable(f"The IDLE connection to {where} was lost; reconnecting.")
    raise MailServerUnavailable(
        f"IMAP server {where} did not answer {what} within {seconds:g} s: the connection is dead (a hung "
        "server or proxy); reconnecting."
    )


async def _idle_once(client: Any, endpoint: ImapEndpoint, lost: asyncio.Event, seconds: float, answer: float) -> str:
    """One IDLE of at most ``seconds``: ``"push"``, or ``"quiet"`` after the server answered DONE.

    IDLE must be accepted (``+ idling``) and DONE answered within ``answer`` seconds each: the probe
    that tells a live server from a hung one.
    """
    where = f"{endpoint.host}:{endpoint.port}"
    idle = await _answered(client.idle_start(timeout=seconds), lost, answer, "IDLE", where)
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
    if reason == "push":  # the caller checks the folder now: a late answer to DONE only delays the LOGOUT
        with contextlib.suppress(Exception):
            await asyncio.wait_for(idle, timeout=answer)
        return reason
    await _answered(idle, lost, answer, "DONE", where)  # the probe: a live server answers at once
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
