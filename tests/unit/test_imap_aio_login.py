"""XOAUTH2 over aioimaplib against a scripted IMAP server on 127.0.0.1: a refused token comes back as the
server's ``NO`` at once, whether the server sends an error challenge first (Dovecot, Gmail) or not (Exchange).

Before: aioimaplib's own ``xoauth2`` left the error challenge unanswered and the IDLE login hung until
Dovecot gave up after 30 s, so a revoked consent surfaced as a timeout (and no fix was named) in time."""

from __future__ import annotations

import asyncio
import base64

import pytest

from airflow_provider_o365mail.imap.idle import ImapEndpoint, aioimaplib_client

ERROR = base64.b64encode(b'{"status":"401","schemes":"bearer","scope":"https://outlook.office.com/"}')


async def _serve(challenge_first: bool, accept: bool, seen: list[bytes]) -> asyncio.Server:
    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"* OK IMAP ready\r\n")
        await writer.drain()
        while line := await reader.readline():
            tag, _, command = line.rstrip(b"\r\n").partition(b" ")
            if command == b"CAPABILITY":  # aioimaplib asks right after the greeting
                writer.write(b"* CAPABILITY IMAP4rev1 AUTH=XOAUTH2 SASL-IR IDLE\r\n" + tag + b" OK done\r\n")
            elif command == b"LOGOUT":
                writer.write(b"* BYE bye\r\n" + tag + b" OK done\r\n")
            elif command.startswith(b"AUTHENTICATE"):
                seen.append(line)
                if accept:
                    writer.write(tag + b" OK Logged in\r\n")
                else:
                    if challenge_first:
                        writer.write(b"+ " + ERROR + b"\r\n")
                        await writer.drain()
                        seen.append(await reader.readline())  # the client's empty response
                    writer.write(tag + b" NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
            else:  # an empty line too: the client answered a challenge twice
                seen.append(line)
                writer.write(tag + b" BAD unexpected\r\n")
            await writer.drain()
        writer.close()

    return await asyncio.start_server(session, "127.0.0.1", 0)


def _login(challenge_first: bool, accept: bool) -> tuple[str, str, list[bytes]]:
    seen: list[bytes] = []

    async def run() -> tuple[str, str]:
        server = await _serve(challenge_first, accept, seen)
        port = server.sockets[0].getsockname()[1]
        # The scripted server speaks plain TCP: no TLS context (the provider always passes one).
        endpoint = ImapEndpoint("127.0.0.1", port, "me@contoso.test", 5.0, None)  # type: ignore[arg-type]
        client = aioimaplib_client(endpoint, lambda err: None)
        async with server:
            await client.wait_hello_from_server()
            response = await asyncio.wait_for(client.xoauth2("me@contoso.test", "tok.en"), 3)
            state = client.protocol.state
            await client.logout()  # answered after everything sent before it was read: ``seen`` is complete
            return response.result, state

    result, state = asyncio.run(run())
    return result, state, seen


@pytest.mark.parametrize("challenge_first", [True, False], ids=["error challenge (Dovecot)", "direct NO (Exchange)"])
def test_a_refused_token_is_answered_no_at_once(challenge_first):
    result, state, seen = _login(challenge_first, accept=False)
    assert result == "NO"
    assert state == "NONAUTH"
    first = seen[0].split()
    assert first[1:3] == [b"AUTHENTICATE", b"XOAUTH2"]
    sent = base64.b64decode(first[3])
    assert sent == b"user=me@contoso.test\x01auth=Bearer tok.en\x01\x01"
    answers = [b"\r\n"] if challenge_first else []
    assert seen[1:] == answers, "the error challenge is answered with one empty line, never the token again"


def test_an_accepted_token_logs_in():
    result, state, _ = _login(challenge_first=False, accept=True)
    assert (result, state) == ("OK", "AUTH")
