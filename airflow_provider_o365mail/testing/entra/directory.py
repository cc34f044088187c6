"""The sandbox tenant: users, app registrations, consent grants and the token rules (no HTTP).

Behaviour follows Microsoft's documentation for the v2 endpoints:

- refresh tokens rotate on every use and the old one is *not* revoked; each one dies after
  ``refresh_token_max_inactive`` (90 days) without use (AADSTS700082);
- removing consent (myapps.microsoft.com) leaves issued access tokens valid until they expire;
  the next refresh fails with AADSTS65001;
- revoking a user's sessions invalidates every refresh token issued before (AADSTS50173);
- access tokens live 60-90 minutes (a fixed, configurable value here).

``strict_rotation`` is not Microsoft's behaviour: reuse of an already rotated refresh token revokes
the whole grant, as some other identity providers do. It makes a lost rotation visible in tests.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import secrets
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
import requests
from cryptography import x509
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from airflow_provider_o365mail.testing.entra import errors, scopes
from airflow_provider_o365mail.testing.entra.errors import AadstsError

log = logging.getLogger(__name__)

EXCHANGE_APP_ID = "00000002-0000-0ff1-ce00-000000000000"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: PyJWT checks only the signature; the claims are checked here, each with Entra's own refusal.
SIGNATURE_ONLY = {
    "verify_aud": False,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_sub": False,
    "verify_jti": False,
}
#: Clock skew allowed on a client assertion's ``nbf`` and ``exp``.
ASSERTION_SKEW = 300
#: Clock skew Exchange allows on an access token's ``nbf``.
ACCESS_TOKEN_SKEW = 300
AUTH_CODE_LIFETIME = 600
DAY = 86400

#: The per-service permission the mail servers require (Dovecot tells which service asks).
SERVICE_DELEGATED_SCOPE = {"imap": "IMAP.AccessAsUser.All", "smtp": "SMTP.Send"}
SERVICE_APP_ROLE = {"imap": "IMAP.AccessAsApp", "smtp": "SMTP.SendAsApp"}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class User:
    upn: str
    display_name: str
    password: str
    oid: str = field(default_factory=lambda: str(uuid.uuid4()))
    #: Single sign-on session exists: authorize redirects at once when consent is present.
    auto_approve: bool = False
    mfa_required: bool = False
    #: When MFA became required; grants whose last interactive sign-in is older must sign in again.
    mfa_required_since: float = 0.0
    blocked_by_conditional_access: bool = False
    #: Conditional Access sign-in frequency (seconds; 0: none): a refresh whose grant's last interactive
    #: sign-in is older is refused with AADSTS70043, whatever the refresh token's own age.
    sign_in_frequency: float = 0.0
    #: With ``mfa_required``: an MFA sign-in older than this (seconds; 0: never) has expired (AADSTS50078).
    mfa_max_age: float = 0.0
    #: The user must register for MFA before any token is issued (AADSTS50079).
    mfa_registration_required: bool = False
    smtp_auth_enabled: bool = True
    imap_enabled: bool = True
    #: Refresh tokens (and, Exchange being CAE-aware, access tokens) issued before this are dead.
    tokens_valid_from: float = 0.0
    #: Refresh tokens issued before this are treated as expired by inactivity.
    refresh_tokens_expired_before: float = 0.0


@dataclass
class Secret:
    secret_id: str
    value: str
    expires_at: float


@dataclass
class KeyCredential:
    """A certificate uploaded to an app registration (its public part only)."""

    key_id: str
    certificate_pem: str
    #: base64url SHA-256 and SHA-1 of the DER certificate: what ``x5t#S256`` / ``x5t`` carry.
    x5t_s256: str
    x5t: str
    expires_at: float


@dataclass
class FederatedCredential:
    """A federated identity credential: tokens of ``issuer`` for ``subject`` with one of ``audiences``."""

    name: str
    issuer: str
    subject: str
    audiences: list[str]


@dataclass
class App:
    client_id: str
    name: str
    redirect_uris: list[str]
    delegated_permissions: dict[str, list[str]]
    secrets: list[Secret]
    #: Application permissions with admin consent, per resource (client credentials).
    app_roles: dict[str, list[str]] = field(default_factory=dict)
    #: Mailboxes the service principal may open (Add-MailboxPermission).
    mailbox_permissions: list[str] = field(default_factory=list)
    certificates: list[KeyCredential] = field(default_factory=list)
    federated_credentials: list[FederatedCredential] = field(default_factory=list)
    #: "Allow public client flows" (Authentication > Advanced settings): token requests without a
    #: credential (device code, and refreshing its grants) are accepted.
    allow_public_client: bool = False


@dataclass
class Grant:
    """Delegated consent of one user to one app, with the permissions consented per resource."""

    upn: str
    client_id: str
    permissions: dict[str, list[str]]
    granted_at: float
    #: Set in strict-rotation mode when a rotated refresh token comes back.
    revoked_at: float = 0.0
    mfa_at: float = 0.0


@dataclass
class Settings:
    access_token_lifetime: int = 3900
    refresh_token_max_inactive: int = 90 * DAY
    strict_rotation: bool = False
    clock_offset: float = 0.0
    #: Entra answers a refresh without ``scope`` with the scopes originally granted; True answers
    #: AADSTS900144 instead (as the v2 docs' "required" reads), to test clients that always send one.
    refresh_requires_scope: bool = False
    #: Refuse a client assertion whose ``jti`` was seen before (until its ``exp``). Microsoft documents
    #: ``jti`` as unique per assertion; note that MSAL reuses one assertion for up to 9 minutes within
    #: one application object, which Entra accepts: turn this off to test such clients.
    reject_replayed_assertions: bool = True
    #: Device code flow: lifetime of a code (Microsoft: 900 s), the polling interval it announces,
    #: and how many of each code's first polls are answered ``slow_down`` (tests of the back-off).
    device_code_lifetime: int = 900
    device_code_interval: int = 5
    device_code_slow_down: int = 0


@dataclass
class Fault:
    """An injected failure for the next ``count`` token requests."""

    status: int = 503
    count: int = 1
    retry_after: int | None = None
    delay: float = 0.0
    #: answer with this AADSTS code (``errors.TRANSIENT_TEXTS``) and OAuth ``error`` instead of 503/429
    aadsts: int | None = None
    error: str = "invalid_grant"


@dataclass
class AuthCode:
    client_id: str
    upn: str
    redirect_uri: str
    scope: str
    code_challenge: str | None
    code_challenge_method: str | None
    nonce: str | None
    issued_at: float
    redeemed: bool = False


#: Loopback hosts whose redirect URIs match on any port (RFC 8252 7.3; Entra's "localhost exceptions").
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1"})


def redirect_uri_registered(app: App, redirect_uri: str) -> bool:
    """Exact match, except that ``http://localhost`` and ``http://127.0.0.1`` URIs ignore the port.

    Native apps (CLIs, email-oauth2-proxy) listen on an ephemeral port, so Entra ignores the port
    of loopback redirect URIs. Scheme, host, path and query must still match: ``localhost`` and
    ``127.0.0.1`` are not interchangeable.
    """
    if redirect_uri in app.redirect_uris:
        return True

    def portless(uri: str) -> tuple[str, str, str, str] | None:
        parts = urlsplit(uri)
        try:
            parts.port  # noqa: B018 - a malformed port ("localhost:x") is no match, not an error page
        except ValueError:
            return None
        if parts.scheme != "http" or parts.hostname not in LOOPBACK_HOSTS:
            return None
        return parts.scheme, parts.hostname, parts.path, parts.query

    wanted = portless(redirect_uri)
    return wanted is not None and any(portless(u) == wanted for u in app.redirect_uris)


class Directory:
    """One sandbox tenant with its signing key and everything the endpoints decide."""

    def __init__(self, state_dir: Path, tenant_id: str, tenant_domain: str) -> None:
        self.state_dir = state_dir
        self.tenant_id = tenant_id
        self.tenant_domain = tenant_domain
        self.users: dict[str, User] = {}
        self.apps: dict[str, App] = {}
        self.grants: dict[str, Grant] = {}
        self.settings = Settings()
        self.faults: list[Fault] = []
        self.counters: Counter[str] = Counter()
        self._codes: dict[str, AuthCode] = {}
        self._redeemed_refresh_tokens: set[str] = set()
        self._seen_assertions: dict[str, float] = {}
        self._issuer_keys: dict[str, dict[str, Any]] = {}
        #: CA bundle for fetching federated issuers' discovery documents (set by the server).
        self.issuer_trust: str | bool = True
        self._lock = threading.RLock()
        self._signing_key, self._seal = self._load_keys()
        self.kid = _b64url(hashlib.sha256(self.public_key_pem()).digest()[:20])
        self._load()

    # ----------------------------------------------------------------- persistence
    def _load_keys(self) -> tuple[rsa.RSAPrivateKey, Fernet]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        key_path = self.state_dir / "signing-key.pem"
        seal_path = self.state_dir / "refresh-token-seal.key"
        if not key_path.exists():
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            key_path.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
            os.chmod(key_path, 0o600)
        if not seal_path.exists():
            seal_path.write_bytes(Fernet.generate_key())
            os.chmod(seal_path, 0o600)
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        return key, Fernet(seal_path.read_bytes())

    @property
    def _state_file(self) -> Path:
        return self.state_dir / "directory.json"

    def _load(self) -> None:
        if not self._state_file.exists():
            return
        data = json.loads(self._state_file.read_text())
        self.users = {k: User(**v) for k, v in data["users"].items()}
        self.apps = {}
        for k, v in data["apps"].items():
            v["secrets"] = [Secret(**s) for s in v["secrets"]]
            v["certificates"] = [KeyCredential(**c) for c in v.get("certificates", [])]
            v["federated_credentials"] = [FederatedCredential(**f) for f in v.get("federated_credentials", [])]
            self.apps[k] = App(**v)
        self.grants = {k: Grant(**v) for k, v in data["grants"].items()}
        self.settings = Settings(**data["settings"])

    def save(self) -> None:
        with self._lock:
            data = {
                "users": {k: asdict(v) for k, v in self.users.items()},
                "apps": {k: asdict(v) for k, v in self.apps.items()},
                "grants": {k: asdict(v) for k, v in self.grants.items()},
                "settings": asdict(self.settings),
            }
            tmp = self._state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1))
            os.chmod(tmp, 0o600)
            tmp.replace(self._state_file)

    # ----------------------------------------------------------------- basics
    def now(self) -> float:
        return time.time() + self.settings.clock_offset

    def public_key_pem(self) -> bytes:
        return self._signing_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def jwks(self) -> dict:
        numbers = self._signing_key.public_key().public_numbers()
        n = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
        e = numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")
        return {
            "keys": [{"kty": "RSA", "use": "sig", "kid": self.kid, "x5t": self.kid, "n": _b64url(n), "e": _b64url(e)}]
        }

    def knows_tenant(self, tenant: str) -> bool:
        return tenant.lower() in {self.tenant_id, self.tenant_domain.lower(), "common", "organizations"}

    def count(self, what: str) -> None:
        with self._lock:
            self.counters[what] += 1

    def take_fault(self) -> Fault | None:
        with self._lock:
            if not self.faults:
                return None
            fault = self.faults[0]
            fault.count -= 1
            if fault.count <= 0:
                self.faults.pop(0)
            return fault

    def _grant_key(self, upn: str, client_id: str) -> str:
        return f"{upn.lower()}|{client_id}"

    def grant_for(self, upn: str, client_id: str) -> Grant | None:
        return self.grants.get(self._grant_key(upn, client_id))

    # ----------------------------------------------------------------- admin
    def add_user(self, upn: str, display_name: str, password: str, **flags: Any) -> User:
        with self._lock:
            user = User(upn=upn.lower(), display_name=display_name, password=password, **flags)
            self.users[user.upn] = user
            self.save()
            return user

    def add_app(self, app: App) -> App:
        with self._lock:
            for secret in app.secrets:
                self.record_issued(secret.value)
            self.apps[app.client_id] = app
            self.save()
            return app

    def user(self, upn: str) -> User:
        try:
            return self.users[upn.lower()]
        except KeyError:
            raise KeyError(f"no sandbox user {upn!r}") from None

    def app(self, client_id: str) -> App:
        try:
            return self.apps[client_id]
        except KeyError:
            raise KeyError(f"no sandbox app {client_id!r}") from None

    def update_user(self, upn: str, **flags: Any) -> User:
        with self._lock:
            user = self.user(upn)
            for name, value in flags.items():
                if not hasattr(user, name) or name in {"upn", "oid"}:
                    raise KeyError(f"unknown user setting {name!r}")
                setattr(user, name, value)
                if name == "mfa_required" and value:
                    user.mfa_required_since = self.now()
            self.save()
            return user

    def revoke_consent(self, upn: str, client_id: str, resource: str | None = None) -> bool:
        """As when the user removes the app at myapps.microsoft.com; with ``resource``, only that API's
        permissions go (as when an admin deletes one delegated permission grant): refreshes for it
        then fail with AADSTS65001 while the other resources keep working."""
        with self._lock:
            key = self._grant_key(upn, client_id)
            if resource is None:
                removed = self.grants.pop(key, None) is not None
            else:
                grant = self.grants.get(key)
                removed = (
                    grant is not None and grant.permissions.pop(scopes.canonical_resource(resource), None) is not None
                )
            self.save()
            return removed

    def set_delegated_permissions(self, client_id: str, resource: str, permissions: list[str]) -> App:
        """The delegated permissions the app registration lists on ``resource`` (what ``/.default`` asks for)."""
        with self._lock:
            app = self.app(client_id)
            app.delegated_permissions[scopes.canonical_resource(resource)] = sorted(set(permissions))
            self.save()
            return app

    def set_app_roles(self, client_id: str, resource: str, roles: list[str]) -> App:
        """Application permissions with admin consent on ``resource`` (client credentials ``roles``)."""
        with self._lock:
            app = self.app(client_id)
            app.app_roles[scopes.canonical_resource(resource)] = sorted(set(roles))
            self.save()
            return app

    def revoke_sessions(self, upn: str) -> None:
        """As ``revokeSignInSessions``: every refresh token issued so far dies (AADSTS50173)."""
        self.update_user(upn, tokens_valid_from=self.now())

    def expire_refresh_tokens(self, upn: str) -> None:
        """Every refresh token issued so far counts as inactive for 90 days (AADSTS700082)."""
        self.update_user(upn, refresh_tokens_expired_before=self.now())

    def add_secret(self, client_id: str, lifetime_days: float = 180) -> Secret:
        with self._lock:
            secret = Secret(
                secret_id=str(uuid.uuid4()),
                value=f"sbx~{secrets.token_urlsafe(30)}",
                expires_at=self.now() + lifetime_days * DAY,
            )
            self.app(client_id).secrets.append(secret)
            self.record_issued(secret.value)
            self.save()
            return secret

    def expire_secrets(self, client_id: str) -> None:
        with self._lock:
            for secret in self.app(client_id).secrets:
                secret.expires_at = min(secret.expires_at, self.now() - 1)
            self.save()

    def add_redirect_uri(self, client_id: str, redirect_uri: str) -> None:
        with self._lock:
            app = self.app(client_id)
            if redirect_uri not in app.redirect_uris:
                app.redirect_uris.append(redirect_uri)
            self.save()

    def remove_secret(self, client_id: str, secret_id: str) -> None:
        with self._lock:
            app = self.app(client_id)
            app.secrets = [s for s in app.secrets if s.secret_id != secret_id]
            self.save()

    def add_certificate(self, client_id: str, certificate_pem: str) -> KeyCredential:
        """Upload a certificate's public part to the app (Certificates & secrets > Certificates)."""
        certificate = x509.load_pem_x509_certificate(certificate_pem.encode())
        der = certificate.public_bytes(serialization.Encoding.DER)
        credential = KeyCredential(
            key_id=str(uuid.uuid4()),
            certificate_pem=certificate.public_bytes(serialization.Encoding.PEM).decode(),
            x5t_s256=_b64url(hashlib.sha256(der).digest()),
            x5t=_b64url(hashlib.sha1(der).digest()),  # noqa: S324 - the x5t header is SHA-1 by definition
            expires_at=certificate.not_valid_after_utc.timestamp(),
        )
        with self._lock:
            self.app(client_id).certificates.append(credential)
            self.save()
        return credential

    def add_federated_credential(self, client_id: str, credential: FederatedCredential) -> FederatedCredential:
        with self._lock:
            self.app(client_id).federated_credentials.append(credential)
            self.save()
        return credential

    def clear_credentials(self, client_id: str, kind: str) -> None:
        """Remove every ``certificates`` or ``federated_credentials`` entry of the app."""
        if kind not in ("certificates", "federated_credentials"):
            raise KeyError(f"no credential kind {kind!r}")
        with self._lock:
            getattr(self.app(client_id), kind).clear()
            self.save()

    def update_settings(self, **values: Any) -> Settings:
        with self._lock:
            for name, value in values.items():
                if not hasattr(self.settings, name):
                    raise KeyError(f"unknown setting {name!r}")
                setattr(self.settings, name, type(getattr(self.settings, name))(value))
            self.save()
            return self.settings

    def grant_consent(self, upn: str, client_id: str, resource: str, permissions: list[str]) -> Grant:
        with self._lock:
            key = self._grant_key(upn, client_id)
            grant = self.grants.get(key)
            resource = scopes.canonical_resource(resource)
            if grant is None:
                grant = Grant(upn=upn.lower(), client_id=client_id, permissions={}, granted_at=self.now())
                self.grants[key] = grant
            current = set(grant.permissions.get(resource, []))
            grant.permissions[resource] = sorted(current | set(permissions))
            grant.mfa_at = self.now()
            self.save()
            return grant

    # ----------------------------------------------------------------- client authentication
    def authenticate_client(
        self,
        client_id: str | None,
        client_secret: str | None,
        form: dict[str, str] | None = None,
        token_endpoints: frozenset[str] = frozenset(),
        *,
        public_grant: bool = False,
    ) -> App:
        """The app whose secret or client assertion (certificate or federated token) the request carries.

        :param token_endpoints: the URLs of the token endpoint the request reached: a client
            assertion's ``aud`` must be one of them.
        :param public_grant: a grant a public client may use (device code, refresh token): without
            any credential it is accepted when the app allows public client flows (else AADSTS7000218).
        """
        if not client_id:
            raise errors.missing_parameter("client_id")
        app = self.apps.get(client_id)
        if app is None:
            raise errors.application_not_found(client_id, self.tenant_id)
        form = form or {}
        if form.get("client_assertion"):
            if form.get("client_assertion_type") != JWT_BEARER:
                raise errors.missing_parameter("client_assertion_type")
            self.verify_client_assertion(app, form["client_assertion"], token_endpoints)
            return app
        if not client_secret:
            if public_grant and app.allow_public_client:
                return app
            raise errors.client_secret_missing()
        now = self.now()
        matching = [s for s in app.secrets if secrets.compare_digest(s.value, client_secret)]
        if not matching:
            raise errors.invalid_client_secret(client_id)
        if all(s.expires_at <= now for s in matching):
            raise errors.client_secret_expired(client_id)
        return app

    def verify_client_assertion(self, app: App, assertion: str, token_endpoints: frozenset[str]) -> None:
        """Check a ``private_key_jwt`` assertion as Entra does: a certificate's, or a federated token.

        A certificate assertion names its certificate by thumbprint (``x5t#S256``, or SHA-1 ``x5t``);
        anything else is taken as a federated token and matched against the app's federated
        credentials on issuer, audience and subject before its signature is checked with the
        issuer's published keys.
        """
        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise errors.invalid_jwt("Token format is not valid.") from None
        if header.get("x5t#S256") or header.get("x5t"):
            self._verify_certificate_assertion(app, assertion, header, claims, token_endpoints)
        else:
            self._verify_federated_token(app, assertion, header, claims)

    def _check_lifetime(self, claims: dict) -> None:
        now = self.now()
        expires = claims.get("exp")
        if not isinstance(expires, int | float):
            raise errors.invalid_jwt("The token has no 'exp' claim.")
        not_before = claims.get("nbf")
        too_early = isinstance(not_before, int | float) and not_before > now + ASSERTION_SKEW
        if too_early or now > expires + ASSERTION_SKEW:
            raise errors.assertion_time_range(now, not_before if isinstance(not_before, int | float) else None, expires)

    def _verify_certificate_assertion(
        self, app: App, assertion: str, header: dict, claims: dict, token_endpoints: frozenset[str]
    ) -> None:
        thumbprint_b64 = header.get("x5t#S256") or header.get("x5t")
        padded = str(thumbprint_b64) + "=" * (-len(str(thumbprint_b64)) % 4)
        try:
            thumbprint = base64.urlsafe_b64decode(padded).hex().upper()
        except ValueError:
            thumbprint = str(thumbprint_b64)
        # MSAL Python sends the base64url thumbprint with its '=' padding; Entra accepts both forms.
        if header.get("x5t#S256"):
            wanted = str(header["x5t#S256"]).rstrip("=")
            registered = next((c for c in app.certificates if c.x5t_s256 == wanted), None)
        else:
            wanted = str(header.get("x5t")).rstrip("=")
            registered = next((c for c in app.certificates if c.x5t == wanted), None)
        if registered is None or registered.expires_at <= self.now():
            raise errors.certificate_not_registered(app.client_id, thumbprint)
        public_key = x509.load_pem_x509_certificate(registered.certificate_pem.encode()).public_key()
        try:
            jwt.decode(
                assertion,
                public_key,  # type: ignore[arg-type]
                algorithms=["PS256", "RS256"],
                options=SIGNATURE_ONLY,
            )
        except jwt.PyJWTError:
            raise errors.assertion_signature_invalid(app.client_id, thumbprint) from None
        if claims.get("aud") not in token_endpoints:
            raise errors.assertion_audience(claims.get("aud"))
        if claims.get("iss") != app.client_id:
            raise errors.invalid_jwt(
                f"Unexpected issuer '{claims.get('iss')}': a client assertion's issuer is the app."
            )
        if claims.get("sub") != claims.get("iss"):
            raise errors.subject_mismatches_issuer()
        self._check_lifetime(claims)
        jti = claims.get("jti")
        if not jti:
            raise errors.invalid_jwt("The client assertion has no 'jti' claim.")
        with self._lock:
            now = self.now()
            self._seen_assertions = {k: v for k, v in self._seen_assertions.items() if v + ASSERTION_SKEW > now}
            if jti in self._seen_assertions and self.settings.reject_replayed_assertions:
                raise errors.assertion_replayed()
            self._seen_assertions[str(jti)] = float(claims["exp"])

    def _verify_federated_token(self, app: App, assertion: str, header: dict, claims: dict) -> None:
        issuer = str(claims.get("iss", ""))
        candidates = [f for f in app.federated_credentials if f.issuer == issuer]
        if not candidates:
            raise errors.no_federated_issuer(issuer)
        audiences = claims.get("aud")
        presented = set(audiences) if isinstance(audiences, list) else {audiences}
        candidates = [f for f in candidates if presented & set(f.audiences)]
        if not candidates:
            raise errors.no_federated_audience(audiences)
        subject = str(claims.get("sub", ""))
        if not any(f.subject == subject for f in candidates):
            raise errors.no_federated_subject(subject)
        key = self._issuer_key(issuer, str(header.get("kid", "")))
        try:
            jwt.decode(
                assertion,
                key,
                algorithms=["RS256", "ES256", "PS256"],
                options=SIGNATURE_ONLY,
            )
        except jwt.PyJWTError:
            raise errors.invalid_jwt(
                f"External ID token from issuer '{issuer}' failed signature verification."
            ) from None
        self._check_lifetime(claims)

    def _issuer_key(self, issuer: str, kid: str) -> Any:
        """The issuer's public key ``kid``, from its OpenID discovery document and JWKS (fetched again when unknown)."""
        keys = self._issuer_keys.get(issuer, {})
        if kid not in keys:
            session = requests.Session()
            session.trust_env = False  # the issuers of the tests are on loopback
            try:
                discovery = session.get(
                    issuer.rstrip("/") + "/.well-known/openid-configuration", timeout=10, verify=self.issuer_trust
                )
                discovery.raise_for_status()
                jwks = session.get(discovery.json()["jwks_uri"], timeout=10, verify=self.issuer_trust)
                jwks.raise_for_status()
                keys = {str(k.get("kid", "")): k for k in jwks.json().get("keys", [])}
            except (requests.RequestException, ValueError, KeyError):
                raise errors.invalid_jwt(f"Unable to retrieve the signing keys of issuer '{issuer}'.") from None
            finally:
                session.close()
            self._issuer_keys[issuer] = keys
        if kid not in keys:
            raise errors.invalid_jwt(f"External ID token from issuer '{issuer}' failed signature verification.")
        return jwt.PyJWK(keys[kid]).key

    # ----------------------------------------------------------------- authorize
    def check_authorize_request(
        self, client_id: str, redirect_uri: str, scope: str
    ) -> tuple[App, list[scopes.ScopeRequest]]:
        """The app and the scope split per resource: ``/authorize`` may ask consent for several APIs."""
        app = self.apps.get(client_id)
        if app is None:
            raise errors.application_not_found(client_id, self.tenant_id)
        if not redirect_uri_registered(app, redirect_uri):
            raise errors.redirect_uri_mismatch(redirect_uri, client_id)
        return app, scopes.parse_per_resource(scope)

    def requested_permissions(self, app: App, request: scopes.ScopeRequest) -> tuple[str | None, set[str]]:
        if request.resource is None:
            return None, set()
        resource = scopes.canonical_resource(request.resource)
        if request.default:
            return resource, set(app.delegated_permissions.get(resource, []))
        return resource, set(request.permissions)

    def needs_consent(self, upn: str, app: App, requests: list[scopes.ScopeRequest]) -> bool:
        grant = self.grant_for(upn, app.client_id)
        if grant is None:
            return True
        for request in requests:
            resource, wanted = self.requested_permissions(app, request)
            if resource is not None and not wanted <= set(grant.permissions.get(resource, [])):
                return True
        return False

    def sign_in(self, upn: str, password: str) -> User:
        user = self.users.get(upn.lower())
        if user is None or not secrets.compare_digest(user.password, password):
            raise errors.invalid_credentials()
        if user.blocked_by_conditional_access:
            raise errors.conditional_access_blocked()
        return user

    def issue_code(
        self,
        app: App,
        user: User,
        redirect_uri: str,
        scope: str,
        code_challenge: str | None,
        code_challenge_method: str | None,
        nonce: str | None,
    ) -> str:
        # Consent for every resource asked (the token endpoint later redeems one resource at a time).
        for request in scopes.parse_per_resource(scope):
            resource, wanted = self.requested_permissions(app, request)
            self.grant_consent(user.upn, app.client_id, resource or scopes.GRAPH, sorted(wanted) if resource else [])
        code = "1.A" + secrets.token_urlsafe(48)
        with self._lock:
            self._codes[code] = AuthCode(
                client_id=app.client_id,
                upn=user.upn,
                redirect_uri=redirect_uri,
                scope=scope,
                code_challenge=code_challenge,
                code_challenge_method=code_challenge_method,
                nonce=nonce,
                issued_at=self.now(),
            )
        return code

    # ----------------------------------------------------------------- token grants
    def redeem_code(self, app: App, form: dict[str, str]) -> dict:
        code = form.get("code")
        if not code:
            raise errors.missing_parameter("code")
        if "redirect_uri" not in form:
            raise errors.missing_parameter("redirect_uri")
        with self._lock:
            record = self._codes.get(code)
            if record is None or record.client_id != app.client_id:
                raise errors.invalid_grant("code")
            if record.redeemed:
                raise errors.code_already_redeemed()
            if self.now() - record.issued_at > AUTH_CODE_LIFETIME:
                raise errors.expired_or_revoked_grant()
            if form["redirect_uri"] != record.redirect_uri:
                raise errors.redirect_uri_mismatch(form["redirect_uri"], app.client_id)
            if record.code_challenge:
                verifier = form.get("code_verifier")
                if not verifier:
                    raise errors.missing_parameter("code_verifier")
                if record.code_challenge_method == "S256":
                    computed = _b64url(hashlib.sha256(verifier.encode()).digest())
                else:
                    computed = verifier
                if not secrets.compare_digest(computed, record.code_challenge):
                    raise errors.pkce_mismatch()
            record.redeemed = True
        user = self.user(record.upn)
        request = scopes.parse(form.get("scope") or record.scope)
        return self._issue_delegated(app, user, request, nonce=record.nonce)

    def redeem_refresh_token(self, app: App, form: dict[str, str]) -> dict:
        token = form.get("refresh_token")
        if not token:
            raise errors.missing_parameter("refresh_token")
        if not form.get("scope") and self.settings.refresh_requires_scope:
            raise errors.missing_parameter("scope")
        payload = self._unseal(token)
        if payload is None or payload.get("c") != app.client_id:
            raise errors.invalid_grant()
        user = self.users.get(payload["u"])
        grant = self.grant_for(payload["u"], app.client_id)
        issued = float(payload["i"])
        now = self.now()
        if user is None:
            raise errors.invalid_grant()
        if issued < user.tokens_valid_from:
            raise errors.grant_revoked()
        if issued < user.refresh_tokens_expired_before or now - issued > self.settings.refresh_token_max_inactive:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S.0000000Z", time.gmtime(issued))
            raise errors.refresh_token_inactive(stamp)
        if user.blocked_by_conditional_access:
            raise errors.conditional_access_blocked()
        if grant is None:
            raise errors.consent_missing(app.client_id, app.name)
        if grant.revoked_at and issued < grant.revoked_at:
            raise errors.expired_or_revoked_grant()
        with self._lock:
            if payload["j"] in self._redeemed_refresh_tokens and self.settings.strict_rotation:
                grant.revoked_at = now
                self.save()
                raise AadstsError(
                    "invalid_grant",
                    70008,
                    "The refresh token was already redeemed. Strict rotation is on in this sandbox: "
                    "the whole grant is revoked.",
                )
            self._redeemed_refresh_tokens.add(payload["j"])
        if user.mfa_registration_required:
            raise errors.mfa_registration_required()
        if user.mfa_required and grant.mfa_at < user.mfa_required_since:
            raise errors.mfa_required()
        if user.mfa_required and user.mfa_max_age and now - grant.mfa_at > user.mfa_max_age:
            raise errors.mfa_expired()
        if user.sign_in_frequency and now - grant.mfa_at > user.sign_in_frequency:
            stamp = time.strftime("%m/%d/%Y %H:%M:%S", time.gmtime(grant.mfa_at))
            raise errors.sign_in_frequency(stamp, int(user.sign_in_frequency))
        # Without scope: the scopes the refresh token was issued for (tokens sealed before that was
        # recorded: the grant's permissions on Exchange).
        scope = form.get("scope") or payload.get("s") or self._granted_scope(grant)
        request = scopes.parse(scope)
        resource, wanted = self.requested_permissions(app, request)
        if resource is not None and not wanted <= set(grant.permissions.get(resource, [])):
            raise errors.consent_missing(app.client_id, app.name)
        # The refresh token itself proves offline_access: Microsoft always answers with a new one.
        return self._issue_delegated(app, user, request, nonce=None, refresh_token=True)

    def client_credentials(self, app: App, form: dict[str, str]) -> dict:
        scope = form.get("scope")
        if not scope:
            raise errors.missing_parameter("scope")
        request = scopes.parse(scope)
        if not request.default or request.permissions or request.resource is None:
            raise errors.client_credentials_scope(scope)
        roles = app.app_roles.get(scopes.canonical_resource(request.resource), [])
        now = int(self.now())
        claims = {
            "aud": request.resource,
            "iss": f"https://sts.windows.net/{self.tenant_id}/",
            "iat": now,
            "nbf": now,
            "exp": now + self.settings.access_token_lifetime,
            "app_displayname": app.name,
            "appid": app.client_id,
            "appidacr": "1",
            "idtyp": "app",
            "oid": str(uuid.uuid5(uuid.NAMESPACE_URL, app.client_id)),
            "roles": roles,
            "sub": str(uuid.uuid5(uuid.NAMESPACE_URL, app.client_id)),
            "tid": self.tenant_id,
            "uti": secrets.token_urlsafe(16),
            "ver": "1.0",
        }
        return {
            "token_type": "Bearer",
            "expires_in": self.settings.access_token_lifetime,
            "ext_expires_in": self.settings.access_token_lifetime,
            "access_token": self.sign(claims),
        }

    def issue_delegated(self, app: App, user: User, request: scopes.ScopeRequest) -> dict:
        """Tokens for ``user`` after an interactive sign-in other than the authorization code (device code)."""
        return self._issue_delegated(app, user, request, nonce=None)

    def set_public_client(self, client_id: str, allowed: bool) -> App:
        with self._lock:
            app = self.app(client_id)
            app.allow_public_client = allowed
            self.save()
            return app

    def _issue_delegated(
        self, app: App, user: User, request: scopes.ScopeRequest, nonce: str | None, refresh_token: bool = False
    ) -> dict:
        if user.blocked_by_conditional_access:
            raise errors.conditional_access_blocked()
        resource, wanted = self.requested_permissions(app, request)
        now = int(self.now())
        lifetime = self.settings.access_token_lifetime
        granted = request.qualified(wanted) if resource else []
        body: dict[str, Any] = {
            "token_type": "Bearer",
            "scope": " ".join(granted),
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
        }
        aud = request.resource or scopes.GRAPH
        claims = {
            "aud": aud if aud != scopes.GRAPH else "00000003-0000-0000-c000-000000000000",
            "iss": f"https://sts.windows.net/{self.tenant_id}/",
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
            "acr": "1",
            "amr": ["pwd"],
            "app_displayname": app.name,
            "appid": app.client_id,
            "appidacr": "1",
            "idtyp": "user",
            "name": user.display_name,
            "oid": user.oid,
            "preferred_username": user.upn,
            "scp": " ".join(sorted(wanted)),
            "sub": _b64url(hashlib.sha256(f"{user.oid}{app.client_id}".encode()).digest()[:32]),
            "tid": self.tenant_id,
            "unique_name": user.upn,
            "upn": user.upn,
            "uti": secrets.token_urlsafe(16),
            "ver": "1.0",
        }
        body["access_token"] = self.sign(claims)
        if refresh_token or request.wants_refresh_token:
            body["refresh_token"] = self._seal_refresh_token(user, app, " ".join(granted + sorted(request.oidc)))
        if "openid" in request.oidc:
            id_claims = {
                "aud": app.client_id,
                "iss": f"{self.issuer_base}/{self.tenant_id}/v2.0",
                "iat": now,
                "nbf": now,
                "exp": now + 3600,
                "name": user.display_name,
                "oid": user.oid,
                "preferred_username": user.upn,
                "sub": claims["sub"],
                "tid": self.tenant_id,
                "ver": "2.0",
            }
            if nonce:
                id_claims["nonce"] = nonce
            body["id_token"] = self.sign(id_claims)
        body["client_info"] = _b64url(json.dumps({"uid": user.oid, "utid": self.tenant_id}).encode())
        return body

    #: Set by the HTTP layer: ``https://127.0.0.1:PORT``.
    issuer_base = "https://127.0.0.1"

    def sign(self, claims: dict) -> str:
        token = jwt.encode(
            claims, self._signing_key, algorithm="RS256", headers={"kid": self.kid, "x5t": self.kid, "typ": "JWT"}
        )
        self.record_issued(token)
        return token

    def record_issued(self, secret: str) -> None:
        """Append an issued secret to ``issued-secrets.txt`` (0600): leak checks scan logs for each."""
        with self._lock:
            fd = os.open(self.state_dir / "issued-secrets.txt", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "a") as fh:
                fh.write(secret + "\n")

    @staticmethod
    def _granted_scope(grant: Grant) -> str:
        permissions = grant.permissions.get(scopes.EXCHANGE, [])
        return " ".join([f"{scopes.EXCHANGE}/{p}" for p in permissions] + ["offline_access"])

    def _seal_refresh_token(self, user: User, app: App, scope: str) -> str:
        # "s": the scopes granted, for a later refresh that sends none.
        payload = {"u": user.upn, "c": app.client_id, "i": self.now(), "j": secrets.token_urlsafe(12), "s": scope}
        token = "1.A" + self._seal.encrypt(json.dumps(payload).encode()).decode()
        self.record_issued(token)
        return token

    def _unseal(self, token: str) -> dict | None:
        if not token.startswith("1.A"):
            return None
        try:
            return json.loads(self._seal.decrypt(token[3:].encode()))
        except (InvalidToken, ValueError):
            return None

    # ----------------------------------------------------------------- Exchange's side
    def auth_policy(self, login: str, protocol: str) -> dict:
        """Exchange's refusal of a protocol disabled for the mailbox, as Dovecot's policy answer: SMTP AUTH
        off is ``535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the
        Mailbox`` at Exchange (the sandbox's Postfix prefixes its own ``535 5.7.8 ... failed:``)."""
        self.count("auth_policy")
        user = self.users.get(login.strip().lower())
        if protocol.lower() == "smtp" and user is not None and not user.smtp_auth_enabled:
            return {
                "status": -1,
                "msg": "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox.",
            }
        return {"status": 0, "msg": ""}

    def introspect(self, token: str, service: str | None) -> dict:
        """What Exchange would decide about an access token presented to IMAP or SMTP.

        Every refusal is logged with its reason (the mail servers only say "authentication failed").
        Time claims are checked against this directory's clock (``clock_offset`` included), never
        against the host's: a token issued while the clock runs ahead is not "from the future".
        """
        self.count("introspect")
        service = (service or "imap").lower()
        try:
            claims = jwt.decode(
                token,
                self._signing_key.public_key(),
                algorithms=["RS256"],
                options=SIGNATURE_ONLY,  # PyJWT would judge iat by the host's clock, not this directory's
            )
        except jwt.PyJWTError as exc:
            return self._refuse(service, None, f"signature ({type(exc).__name__})", "signature")
        upn = str(claims.get("upn", "")).lower() or None
        now = self.now()
        if claims.get("exp", 0) <= now:
            return self._refuse(service, upn, "expired")
        if claims.get("nbf", 0) > now + ACCESS_TOKEN_SKEW:
            return self._refuse(service, upn, "not yet valid")
        if claims.get("aud") not in scopes.EXCHANGE_ALIASES:
            return self._refuse(service, upn, "audience")
        if claims.get("idtyp") == "app":
            app = self.apps.get(claims.get("appid", ""))
            role = SERVICE_APP_ROLE.get(service)
            if app is None or role not in claims.get("roles", []) or not app.mailbox_permissions:
                return self._refuse(service, upn, "app permissions")
            user = self.users.get(app.mailbox_permissions[0])
        else:
            user = self.users.get(upn or "")
            if SERVICE_DELEGATED_SCOPE.get(service) not in str(claims.get("scp", "")).split():
                return self._refuse(service, upn, "scope")
            # iat has whole seconds: a token from the second of the revocation counts as issued after it.
            if user is not None and claims.get("iat", 0) < int(user.tokens_valid_from):
                return self._refuse(service, upn, "sessions revoked")
        if user is None:
            return self._refuse(service, upn, "no mailbox")
        if service == "smtp" and not user.smtp_auth_enabled:
            return self._refuse(service, user.upn, "SmtpClientAuthentication is disabled for the Mailbox")
        if service == "imap" and not user.imap_enabled:
            return self._refuse(service, user.upn, "IMAP disabled for the mailbox")
        return {"active": True, "email": user.upn, "scope": claims.get("scp", ""), "client_id": claims.get("appid")}

    @staticmethod
    def _refuse(service: str, upn: str | None, why: str, reason: str | None = None) -> dict:
        log.warning("Exchange refused an access token for %s (%s): %s", upn or "an unknown mailbox", service, why)
        return {"active": False, "reason": reason or why}

    def mint_access_token(
        self, upn: str, client_id: str, *, lifetime: int = 3600, audience: str = scopes.EXCHANGE, scp: str | None = None
    ) -> str:
        """An access token straight from the directory, for tests of the mail servers' checks."""
        user = self.user(upn)
        now = int(self.now())
        return self.sign(
            {
                "aud": audience,
                "iss": f"https://sts.windows.net/{self.tenant_id}/",
                "iat": now,
                "nbf": now - 60 if lifetime < 0 else now,
                "exp": now + lifetime,
                "appid": client_id,
                "idtyp": "user",
                "scp": scp if scp is not None else "IMAP.AccessAsUser.All SMTP.Send",
                "upn": user.upn,
                "preferred_username": user.upn,
                "tid": self.tenant_id,
                "uti": secrets.token_urlsafe(16),
                "ver": "1.0",
            }
        )
