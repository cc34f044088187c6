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
import logging
import random
import re
import ssl
import time
from dataclasses import dataclass
from typing import Any

import aioimaplib
from imapclient import imap_utf7

from airflow_provider_o365mail import exceptions
from airflow_provider_o365mail.exceptions import MailAuthenticationError, MailServerError
from airflow_provider_o365mail.mail.imap_watch import CheckResult, WatchSpec

log = logging.getLogger(__name__)
# aioimaplib logs the AUTHENTICATE line (a base64 token) at DEBUG: never let that through.
logging.getLogger("aioimaplib.aioimaplib").setLevel(logging.INFO)

MAX_IDLE_SECONDS = 25 * 60
MAX_BACKOFF_SECONDS = 300.0
# Errors a person must fix: reconnecting cannot help.
PERMANENT_ERRORS = (
    exceptions.AuthorizationError,
    exceptions.ConnectionConfigError,
    exceptions.MailAuthenticationError,
    exceptions.TokenStoreError,
)
TOKEN_MARGIN_SECONDS = 120
_UIDNEXT = re.compile(rb"\[UIDNEXT (\d+)\]")
_PUSH = re.compile(rb"^\d+ (EXISTS|RECENT)$|^(\d+ )?FETCH|BYE", re.IGNORECASE)


def quote_folder(folder: str) -> str:
    encoded = imap_utf7.encode(folder).decode("ascii")
    return '"' + encoded.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class IdleTarget:
    host: str
    port: int
    user: str
    folder: str
    timeout: float


class IdleUnsupported(Exception):
    """The server does not offer IDLE: poll instead."""


async def wait_for_new_mail(
    target: IdleTarget,
    access_token: str,
    token_expires_on: float,
    ssl_context: ssl.SSLContext,
    known_uidnext: int | None,
    max_idle: float = MAX_IDLE_SECONDS,
) -> str:
    """Return why the wait ended: ``"push"``, ``"changed"`` (new mail before IDLE began), ``"timeout"``."""
    client = aioimaplib.IMAP4_SSL(host=target.host, port=target.port, ssl_context=ssl_context, timeout=target.timeout)
    try:
        await client.wait_hello_from_server()
        response = await client.xoauth2(target.user, access_token)
        if response.result != "OK":
            raise MailAuthenticationError(
                f"IMAP login to {target.host}:{target.port} as {target.user} for IDLE failed: "
                f"{_lines(response)[-1:] or response.result}"
            )
        if "IDLE" not in client.protocol.capabilities:  # Exchange's greeting lists none
            await asyncio.wait_for(client.protocol.capability(), target.timeout)
        if "IDLE" not in client.protocol.capabilities:
            raise IdleUnsupported(target.host)
        selected = await client.select(quote_folder(target.folder))
        if selected.result != "OK":
            raise MailServerError(f"Cannot open folder {target.folder!r} for IDLE: {_lines(selected)[-1:]}")
        uidnext = _uidnext(selected)
        if known_uidnext is not None and uidnext is not None and uidnext != known_uidnext:
            return "changed"
        budget = min(max_idle, token_expires_on - TOKEN_MARGIN_SECONDS - time.time())
        if budget <= 0:
            return "timeout"
        idle = await client.idle_start(timeout=budget)
        try:
            while True:
                push = await client.wait_server_push(timeout=budget + 5)
                if push == aioimaplib.STOP_WAIT_SERVER_PUSH:
                    return "timeout"
                lines = push if isinstance(push, list) else [push]
                if any(_PUSH.search(line.strip()) for line in lines if isinstance(line, bytes)):
                    if any(b"BYE" in line for line in lines if isinstance(line, bytes)):
                        raise MailServerError(f"IMAP server ended the IDLE session: {lines[-1]!r}")
                    return "push"
        finally:
            client.idle_done()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(idle, timeout=5)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.logout(), timeout=5)


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


def reconnect_delay(failures: int) -> float:
    """Seconds before reconnecting after the n-th consecutive transient failure (2, 4, 8... <= 300, jittered)."""
    return min(MAX_BACKOFF_SECONDS, 2.0**failures) * random.uniform(0.5, 1.0)  # noqa: S311


class MailWaiter:
    """Waits for a change in the watched folders: IDLE per folder, or polling."""

    def __init__(self, hook: Any, spec: WatchSpec, mailbox: str | None, poll_interval: float, max_idle: float):
        self.hook = hook
        self.spec = spec
        self.mailbox = mailbox
        self.poll_interval = poll_interval
        self.max_idle = max_idle
        self.idle_supported: bool | None = None

    async def wait(self, last: CheckResult) -> str:
        if self.idle_supported is False:
            await asyncio.sleep(self.poll_interval)
            return "poll"
        token = await asyncio.to_thread(self.hook.access_token)
        settings = self.hook.settings
        waits = [
            asyncio.ensure_future(
                wait_for_new_mail(
                    IdleTarget(
                        settings.imap_host,
                        settings.imap_port,
                        self.mailbox or settings.mailbox,
                        folder,
                        float(settings.timeout),
                    ),
                    token.token,
                    token.expires_on,
                    self.hook.ssl_context,
                    last.scanned.get(folder, {}).get("uidnext"),
                    self.max_idle,
                )
            )
            for folder in self.spec.folders
        ]
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pending in waits:
                pending.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        outcome = next(iter(done))
        try:
            reason = outcome.result()
        except IdleUnsupported:
            log.info("%s offers no IDLE: polling every %.0f s.", settings.imap_host, self.poll_interval)
            self.idle_supported = False
            return await self.wait(last)
        self.idle_supported = True
        return reason
