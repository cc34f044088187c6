"""What the transports need from the token layer: a token source, and the one login-with-refresh rule.

``smtp/`` and ``imap/`` never import ``auth/`` or the hook: they are handed a callable that returns
an access token with its expiry, and a login or client factory built on it. Tests pass fakes with an
injected clock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol, TypeVar

from airflow_provider_o365mail.exceptions import MailAuthenticationError

log = logging.getLogger(__name__)

T = TypeVar("T")


class ExpiringToken(Protocol):
    """An access token and the POSIX time it expires at (:class:`~..auth.tokens.AccessToken` is one)."""

    @property
    def token(self) -> str: ...

    @property
    def expires_on(self) -> float: ...


class TokenSource(Protocol):
    """Returns a valid access token; blocking (call it in a thread from async code). ``force_refresh``:
    a new one from the identity provider (the server refused the last one)."""

    def __call__(self, *, force_refresh: bool = False) -> ExpiringToken: ...


def login_with_fresh_token(login: Callable[[bool], T], *, what: str, user: str, force_refresh: bool = False) -> T:
    """``login(force_refresh)``; when the server refuses the token, once more with a refreshed one.

    A token can be refused before its expiry (revoked sessions, a changed password, a token minted
    for a mailbox that lost its license meanwhile): one refresh tells a stale token from a refusal
    that a person must fix, which the second :class:`MailAuthenticationError` then says. Also after a
    forced refresh: that one may have answered with a token another process had just stored.
    """
    try:
        return login(force_refresh)
    except MailAuthenticationError:
        log.info("%s refused the access token for %s; retrying once with a refreshed token.", what, user)
        return login(True)
