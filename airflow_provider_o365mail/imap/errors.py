"""Which IMAP refusals are about the token and which are temporary (pure functions, no I/O).

Exchange and Dovecot answer a refused token with ``NO AUTHENTICATE failed`` (or
``[AUTHENTICATIONFAILED]``): a person must fix the app's permissions or the consent. Everything else
a server says while refusing or dropping a session is temporary: too many connections for the
mailbox (``[LIMIT]``, "Maximum number of connections"), Exchange's "User is authenticated but not
connected", ``BYE`` (server shutting down, ``AccessTokenExpired``), timeouts and resets.
"""

from __future__ import annotations

import re

from airflow_provider_o365mail.exceptions import MailAuthenticationError, MailServerError, MailServerUnavailable

_TEMPORARY = re.compile(
    r"\[(LIMIT|UNAVAILABLE|INUSE|SERVERBUG)\]|maximum number of connections|too many connections|"
    r"connection limit|authenticated but not connected|\bBYE\b|AccessTokenExpired|server unavailable|"
    r"try again|temporar",
    re.IGNORECASE,
)


def refusal_class(text: str, *, during_login: bool) -> type[MailServerError]:
    """The exception class for a server's refusal ``text``.

    A refusal while logging in with no sign of a temporary cause is a refused token (permanent);
    a recognisably temporary answer never is, whenever it comes. Dropped connections (``abort``,
    socket errors) are temporary by their type; callers map those without asking.
    """
    if _TEMPORARY.search(text):
        return MailServerUnavailable
    return MailAuthenticationError if during_login else MailServerError
