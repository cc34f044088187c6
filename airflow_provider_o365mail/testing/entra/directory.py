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
import os
import secrets
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import jwt
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from airflow_provider_o365mail.testing.entra import errors, scopes
from airflow_provider_o365mail.testing.entra.errors import AadstsError

EXCHANGE_APP_ID = "00000002-0000-0ff1-ce00-000000000000"
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


@dataclass
class Fault:
    """An injected failure for the next ``count`` token requests."""

    status: int = 503
    count: int = 1
    retry_after: int | None = None
    delay: float = 0.0


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


def redirect_uri_registered(app: App, redirect_uri: str) -> bool:
    """Exact match, except that ``http://localhost`` URIs match on any port (as in Entra ID)."""
    if redirect_uri in app.redirect_uris:
        return True
    parsed = urlsplit(redirect_uri)
    if parsed.scheme != "http" or parsed.hostname != "localhost":
        return False
    portless = urlunsplit((parsed.scheme, "localhost", parsed.path, parsed.query, ""))
    return any(urlunsplit(urlsplit(u)._replace(netloc="localhost")) == portless for u in app.redirect_uris)


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

    def revoke_consent(self, upn: str, client_id: str) -> bool:
        """As when the user removes the app at myapps.microsoft.com."""
        with self._lock:
            removed = self.grants.pop(self._grant_key(upn, client_id), None) is not None
            self.save()
            return removed

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
    def authenticate_client(self, client_id: str | None, client_secret: str | None) -> App:
        if not client_id:
            raise errors.missing_parameter("client_id")
        app = self.apps.get(client_id)
        if app is None:
            raise errors.application_not_found(client_id, self.tenant_id)
        if not client_secret:
            raise errors.client_secret_missing()
        now = self.now()
        matching = [s for s in app.secrets if secrets.compare_digest(s.value, client_secret)]
        if not matching:
            raise errors.invalid_client_secret(client_id)
        if all(s.expires_at <= now for s in matching):
            raise errors.client_secret_expired(client_id)
        return app

    # ----------------------------------------------------------------- authorize
    def check_authorize_request(self, client_id: str, redirect_uri: str, scope: str) -> tuple[App, scopes.ScopeRequest]:
        app = self.apps.get(client_id)
        if app is None:
            raise errors.application_not_found(client_id, self.tenant_id)
        if not redirect_uri_registered(app, redirect_uri):
            raise errors.redirect_uri_mismatch(redirect_uri, client_id)
        request = scopes.parse(scope)
        return app, request

    def requested_permissions(self, app: App, request: scopes.ScopeRequest) -> tuple[str | None, set[str]]:
        if request.resource is None:
            return None, set()
        resource = scopes.canonical_resource(request.resource)
        if request.default:
            return resource, set(app.delegated_permissions.get(resource, []))
        return resource, set(request.permissions)

    def needs_consent(self, upn: str, app: App, request: scopes.ScopeRequest) -> bool:
        resource, wanted = self.requested_permissions(app, request)
        grant = self.grant_for(upn, app.client_id)
        if grant is None:
            return True
        return resource is not None and not wanted <= set(grant.permissions.get(resource, []))

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
        request = scopes.parse(scope)
        resource, wanted = self.requested_permissions(app, request)
        if resource is not None:
            self.grant_consent(user.upn, app.client_id, resource, sorted(wanted))
        else:
            self.grant_consent(user.upn, app.client_id, scopes.GRAPH, [])
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
        if not form.get("scope"):
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
        if user.mfa_required and grant.mfa_at < user.mfa_required_since:
            raise errors.mfa_required()
        request = scopes.parse(form["scope"])
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
            body["refresh_token"] = self._seal_refresh_token(user, app)
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

    def _seal_refresh_token(self, user: User, app: App) -> str:
        payload = {"u": user.upn, "c": app.client_id, "i": self.now(), "j": secrets.token_urlsafe(12)}
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
    def introspect(self, token: str, service: str | None) -> dict:
        """What Exchange would decide about an access token presented to IMAP or SMTP."""
        self.count("introspect")
        try:
            claims = jwt.decode(
                token,
                self._signing_key.public_key(),
                algorithms=["RS256"],
                options={"verify_aud": False, "verify_exp": False, "verify_nbf": False},
            )
        except jwt.PyJWTError:
            return {"active": False, "reason": "signature"}
        now = self.now()
        if claims.get("exp", 0) <= now or claims.get("nbf", 0) > now + 300:
            return {"active": False, "reason": "expired"}
        if claims.get("aud") not in scopes.EXCHANGE_ALIASES:
            return {"active": False, "reason": "audience"}
        service = (service or "imap").lower()
        if claims.get("idtyp") == "app":
            app = self.apps.get(claims.get("appid", ""))
            role = SERVICE_APP_ROLE.get(service)
            if app is None or role not in claims.get("roles", []) or not app.mailbox_permissions:
                return {"active": False, "reason": "app permissions"}
            user = self.users.get(app.mailbox_permissions[0])
        else:
            user = self.users.get(str(claims.get("upn", "")).lower())
            if SERVICE_DELEGATED_SCOPE.get(service) not in str(claims.get("scp", "")).split():
                return {"active": False, "reason": "scope"}
            if user is not None and claims.get("iat", 0) < user.tokens_valid_from:
                return {"active": False, "reason": "sessions revoked"}
        if user is None:
            return {"active": False, "reason": "no mailbox"}
        if service == "smtp" and not user.smtp_auth_enabled:
            return {"active": False, "reason": "SmtpClientAuthentication is disabled for the Mailbox"}
        if service == "imap" and not user.imap_enabled:
            return {"active": False, "reason": "IMAP disabled for the mailbox"}
        return {"active": True, "email": user.upn, "scope": claims.get("scp", ""), "client_id": claims.get("appid")}

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
