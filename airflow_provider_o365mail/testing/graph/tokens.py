"""Bearer tokens as Microsoft Graph checks them: the Entra stand-in's signature, issuer, audience, lifetime.

Graph accepts access tokens whose ``aud`` is Graph (``https://graph.microsoft.com`` or its app ID
``00000003-0000-0000-c000-000000000000``), signed by the tenant's keys (published as JWKS by the
Entra stand-in) and issued by ``https://sts.windows.net/{tenant}/``. A delegated token carries the
consented permissions in ``scp``, an app-only token in ``roles``. An Exchange token (SMTP/IMAP,
``aud`` outlook.office.com) is refused with 401 ``InvalidAuthenticationToken``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt

from airflow_provider_o365mail.testing.graph import errors

GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"
GRAPH_AUDIENCES = frozenset({"https://graph.microsoft.com", "https://graph.microsoft.com/", GRAPH_APP_ID})
#: Clock skew tolerated on ``nbf`` and ``exp`` (Microsoft's token validation default: 5 minutes).
SKEW = 300


@dataclass(frozen=True)
class Caller:
    """Who calls: the app, and for a delegated token the signed-in user; the permissions the token holds."""

    app_id: str
    delegated: bool
    permissions: frozenset[str]
    upn: str | None = None
    oid: str | None = None

    def has(self, *permissions: str) -> bool:
        """True if the token holds any of ``permissions`` (a higher one counts for a lower one)."""
        return any(p in self.permissions for p in permissions)


def bearer(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise errors.token_missing()
    return token.strip()


class TokenVerifier:
    """Verify a Graph access token against the tenant's signing keys.

    :param keys: returns the tenant's keys by ``kid`` (called again when a ``kid`` is unknown).
    :param now: the tenant's clock (the Entra stand-in's ``clock_offset`` applies to Graph too).
    """

    def __init__(self, tenant_id: str, keys: Callable[[], dict[str, Any]], now: Callable[[], float]) -> None:
        self.tenant_id = tenant_id
        self._fetch_keys = keys
        self._keys: dict[str, Any] = {}
        self._now = now

    def _key(self, kid: str) -> Any:
        if kid not in self._keys:
            self._keys = self._fetch_keys()
        if kid not in self._keys:
            raise errors.token_invalid("Invalid signature.")
        return self._keys[kid]

    def verify(self, authorization: str | None) -> Caller:
        token = bearer(authorization)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise errors.token_invalid("Invalid JWT token.") from None
        try:
            claims = jwt.decode(
                token,
                self._key(str(header.get("kid", ""))),
                algorithms=["RS256"],
                options={"verify_aud": False, "verify_exp": False, "verify_nbf": False, "verify_iat": False},
            )
        except jwt.PyJWTError:
            raise errors.token_invalid("Invalid signature.") from None
        if claims.get("iss") != f"https://sts.windows.net/{self.tenant_id}/" or claims.get("tid") != self.tenant_id:
            raise errors.token_invalid("Invalid issuer.")
        if claims.get("aud") not in GRAPH_AUDIENCES:
            raise errors.wrong_audience()
        now = self._now()
        if not isinstance(claims.get("exp"), int | float) or now > claims["exp"] + SKEW:
            raise errors.token_expired()
        if isinstance(claims.get("nbf"), int | float) and claims["nbf"] > now + SKEW:
            raise errors.token_invalid("The token is not yet valid.")
        scp = str(claims.get("scp") or "").split()
        roles = [str(r) for r in claims.get("roles") or []]
        app_id = str(claims.get("appid") or claims.get("azp") or "")
        if scp:
            upn = str(claims.get("upn") or claims.get("preferred_username") or "").lower() or None
            return Caller(app_id, True, frozenset(scp), upn=upn, oid=claims.get("oid"))
        if roles:
            return Caller(app_id, False, frozenset(roles))
        raise errors.no_permission_claims()


def jwks_keys(document: dict) -> dict[str, Any]:
    """``{kid: public key}`` of a JWKS document."""
    return {str(key.get("kid", "")): jwt.PyJWK(key).key for key in document.get("keys", [])}
