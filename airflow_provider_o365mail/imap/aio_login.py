"""SASL XOAUTH2 for aioimaplib that also finishes a refused login.

After a refused token, Dovecot (like Gmail) sends the error as a ``+`` challenge and waits for the
client's empty response before it answers ``NO`` (RFC 7628 3.2.3); Exchange answers ``NO`` at once.
aioimaplib's own ``xoauth2`` only records such a challenge, so a refused login waited for the
server to give up (Dovecot: 30 s) and ended as a timeout, not as a refusal. Here the challenge is
answered with an empty line, as the synchronous clients' SASL responder does, and the token is
never sent twice. The initial response is built as aioimaplib builds it (the token lifecycle
registered the token and this string for the connection's mailbox with the secrets masker when it
handed the token out).
"""

from __future__ import annotations

import asyncio
from base64 import b64encode
from collections.abc import Callable

import aioimaplib


class _Authenticate(aioimaplib.Command):
    """``AUTHENTICATE XOAUTH2 <initial response>`` that answers each ``+`` challenge with one empty line."""

    def __init__(self, tag: str, initial_response: str, write: Callable[[bytes], None]) -> None:
        super().__init__("AUTHENTICATE", tag, "XOAUTH2", initial_response)
        self._write = write
        self._unanswered = 0

    def append_to_resp(self, line: bytes, result: str = "Pending") -> None:
        if result == "Pending" and line.startswith(b"+"):  # aioimaplib hands challenges to the pending command
            self._unanswered += 1
        super().append_to_resp(line, result)

    def flush(self) -> None:  # called after a challenge, and after every chunk read while the command waits
        while self._unanswered:
            self._unanswered -= 1
            self._write(b"\r\n")


class XOAuth2LoginMixin:
    """For subclasses of :class:`aioimaplib.IMAP4`: ``xoauth2`` returns the server's answer to a refused
    token (``NO``) as soon as the server gives it."""

    protocol: aioimaplib.IMAP4ClientProtocol
    timeout: float

    async def xoauth2(self, user: str, token: str) -> aioimaplib.Response:
        return await asyncio.wait_for(self._xoauth2(user, token), self.timeout)

    async def _xoauth2(self, user: str, token: str) -> aioimaplib.Response:
        protocol = self.protocol
        initial_response = b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode("ascii")).decode("ascii")
        async with protocol.state_condition:
            command = _Authenticate(protocol.new_tag(), initial_response, protocol.transport.write)
            response = await protocol.execute(command, scrub=initial_response)
            if response.result == "OK":
                protocol.state = aioimaplib.AUTH
            protocol.state_condition.notify_all()
            return response
