"""In-memory stand-ins for IMAPClient and aioimaplib, for the mail layer's unit tests (no sockets)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections import namedtuple
from dataclasses import dataclass, field
from typing import Any

import aioimaplib

Envelope = namedtuple("Envelope", "date subject from_ sender reply_to to cc bcc in_reply_to message_id")
Address = namedtuple("Address", "name route mailbox host")


def fetch_data(message_id: str, subject: str = "s", when: dt.datetime | None = None) -> dict[bytes, Any]:
    sender = (Address(b"Sender", None, b"from", b"example.com"),)
    envelope = Envelope(when, subject.encode(), sender, sender, sender, None, None, None, None, message_id.encode())
    body = (b"text", b"plain", (b"charset", b"utf-8"), None, None, b"7bit", 10, 1, None, None, None, None)
    return {
        b"ENVELOPE": envelope,
        b"BODYSTRUCTURE": body,
        b"RFC822.SIZE": 100,
        b"FLAGS": (),
        b"INTERNALDATE": when,
        b"BODY[HEADER]": f"Message-ID: {message_id}\r\nSubject: {subject}\r\n\r\n".encode(),
    }


@dataclass
class FakeFolder:
    uidvalidity: int = 1
    uidnext: int = 1
    messages: dict[int, dict[bytes, Any]] = field(default_factory=dict)

    def deliver(self, message_id: str, **fields: Any) -> int:
        uid = self.uidnext
        self.messages[uid] = fetch_data(message_id, **fields)
        self.uidnext += 1
        return uid


class FakeImapClient:
    """The IMAPClient calls the scan makes, on one in-memory folder; every command is recorded."""

    def __init__(self, folders: dict[str, FakeFolder]) -> None:
        self.folders = folders
        self.commands: list[tuple[str, Any]] = []
        self.selected: str | None = None

    def folder_status(self, folder: str, items: list[bytes]) -> dict[bytes, int]:
        self.commands.append(("STATUS", folder))
        f = self.folders[folder]
        return {b"UIDNEXT": f.uidnext, b"UIDVALIDITY": f.uidvalidity}

    def select_folder(self, folder: str, readonly: bool = False) -> dict[bytes, Any]:
        self.commands.append(("SELECT", folder))
        if folder not in self.folders:
            raise RuntimeError("NO [NONEXISTENT] Unknown Mailbox")
        self.selected = folder
        f = self.folders[folder]
        return {b"UIDVALIDITY": f.uidvalidity, b"UIDNEXT": f.uidnext, b"EXISTS": len(f.messages)}

    def search(self, keys: list[Any], charset: str | None = None) -> list[int]:
        self.commands.append(("SEARCH", list(keys)))
        uids = sorted(self.folders[self.selected].messages)
        if keys[:1] == [b"UID"]:
            low = int(keys[1].decode().split(":")[0])
            uids = [u for u in uids if u >= low] or ([max(self.folders[self.selected].messages)] if uids else [])
        return uids

    def fetch(self, uids: list[int], items: list[str]) -> dict[int, dict[bytes, Any]]:
        self.commands.append(("FETCH", list(uids)))
        messages = self.folders[self.selected].messages
        return {uid: messages[uid] for uid in uids if uid in messages}

    @contextlib.contextmanager
    def session(self):
        yield self


@dataclass
class Response:
    result: str
    lines: list[bytes] = field(default_factory=list)


class FakeTransport:
    """Records how the connection was closed: ``close`` (after LOGOUT) or ``abort`` (dropped)."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def get_extra_info(self, name: str) -> Any:
        return None

    def close(self) -> None:
        self.calls.append("close")

    def abort(self) -> None:
        self.calls.append("abort")


class FakeProtocol:
    def __init__(self, capabilities: set[str], transport: FakeTransport | None = None) -> None:
        self.capabilities = set(capabilities)
        self.transport = transport

    async def capability(self) -> None:
        return None


class FakeIdleClient:
    """aioimaplib.IMAP4_SSL's calls used by ``wait_for_new_mail``; ``pushes`` are what the server sends in IDLE."""

    def __init__(
        self,
        *,
        login_ok: bool = True,
        capabilities: frozenset[str] = frozenset({"IDLE"}),
        uidnext: int = 5,
        pushes: list[Any] | None = None,
        answers_done: bool = True,
        answers_idles: int | None = None,
    ) -> None:
        self.login_ok = login_ok
        self.answers_done = answers_done
        self.answers_idles = answers_idles  # IDLEs accepted ("+ idling") before the server hangs; None: all
        self.on_lost: Any = None
        self.idles = 0
        self.calls: list[str] = []
        self.protocol = FakeProtocol(set(capabilities), FakeTransport(self.calls))
        self.uidnext = uidnext
        self.pushes: asyncio.Queue = asyncio.Queue()
        for push in pushes or []:
            self.pushes.put_nowait(push)
        self.idle_timeout: float | None = None

    def bind(self, on_lost: Any) -> FakeIdleClient:
        """The client factory's second argument: the connection-lost callback."""
        self.on_lost = on_lost
        return self

    def drop(self) -> None:
        """The server side reset the connection."""
        self.on_lost(ConnectionResetError("reset by peer"))

    async def wait_hello_from_server(self) -> None:
        self.calls.append("hello")

    async def xoauth2(self, user: str, token: str) -> Response:
        self.calls.append("xoauth2")
        return Response("OK" if self.login_ok else "NO", [b"AUTHENTICATE failed."])

    async def select(self, folder: str) -> Response:
        self.calls.append(f"select {folder}")
        return Response("OK", [f"OK [UIDNEXT {self.uidnext}] Predicted next UID".encode()])

    async def idle_start(self, timeout: float) -> asyncio.Future:
        self.calls.append("idle")
        self.idles += 1
        if self.answers_idles is not None and self.idles > self.answers_idles:
            await asyncio.get_running_loop().create_future()  # a hung server: "+ idling" never comes
        self.idle_timeout = timeout
        self._timer = asyncio.get_running_loop().call_later(
            timeout, self.pushes.put_nowait, aioimaplib.STOP_WAIT_SERVER_PUSH
        )
        self._done = asyncio.get_running_loop().create_future()
        return self._done

    async def wait_server_push(self, timeout: float) -> Any:
        return await asyncio.wait_for(self.pushes.get(), timeout=timeout)

    def idle_done(self) -> None:
        self.calls.append("done")
        self._timer.cancel()
        if self.answers_done and not self._done.done():
            self._done.set_result(None)

    async def logout(self) -> None:
        self.calls.append("logout")
