"""What the mail layer needs from the token layer: a token source, nothing more (no I/O here).

``mail/`` never imports ``auth/`` or the hook: it is handed a callable that returns an access token
with its expiry, and a login or client factory built on it. Tests pass fakes with an injected clock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class ExpiringToken(Protocol):
    """An access token and the POSIX time it expires at (:class:`~..auth.tokens.AccessToken` is one)."""

    @property
    def token(self) -> str: ...

    @property
    def expires_on(self) -> float: ...


#: Returns a valid access token; blocking (call it in a thread from async code).
TokenSource = Callable[[], ExpiringToken]
