"""Refusals that are not about the token are temporary (issue: [LIMIT] was reported as a bad token)."""

from __future__ import annotations

import asyncio

import pytest
from imap_fakes import FakeIdleClient
from test_imap_idle import ENDPOINT, Token

from airflow_provider_o365mail.exceptions import MailAuthenticationError, MailServerError, MailServerUnavailable
from airflow_provider_o365mail.imap import idle as imap_idle
from airflow_provider_o365mail.imap.errors import refusal_class


@pytest.mark.parametrize(
    "text",
    [
        "[LIMIT] Maximum number of connections from user+IP exceeded (mail_max_userip_connections=20)",
        "Maximum number of connections from user+IP exceeded",
        "User is authenticated but not connected.",
        "* BYE Session invalidated - AccessTokenExpired",
        "[UNAVAILABLE] Server unavailable. 15",
        "Server Unavailable. 21",
    ],
)
def test_temporary_refusals_are_transient_even_during_login(text):
    assert refusal_class(text, during_login=True) is MailServerUnavailable
    assert refusal_class(text, during_login=False) is MailServerUnavailable


@pytest.mark.parametrize("text", ["AUTHENTICATE failed.", "[AUTHENTICATIONFAILED] Authentication failed.", ""])
def test_a_refused_login_is_a_token_problem(text):
    assert refusal_class(text, during_login=True) is MailAuthenticationError


def test_other_refusals_after_login_are_plain_server_errors():
    assert refusal_class("[NONEXISTENT] Unknown Mailbox: Rechnungen", during_login=False) is MailServerError


def test_idle_login_over_the_connection_limit_is_transient():
    class Limited(FakeIdleClient):
        async def xoauth2(self, user, token):
            from imap_fakes import Response

            return Response("NO", [b"[LIMIT] Maximum number of connections exceeded"])

    with pytest.raises(MailServerUnavailable, match=r"\[LIMIT\]"):
        asyncio.run(
            imap_idle.wait_for_new_mail(ENDPOINT, "INBOX", Token(), None, client_factory=lambda _e, _lost: Limited())
        )
    assert not isinstance(MailServerUnavailable("x"), imap_idle.PERMANENT_ERRORS)
