"""The stand-in's device authorization grant (Microsoft's v2 device code flow, RFC 8628).

``/devicecode`` hands out a ``device_code`` (the client polls with it) and a short ``user_code``
(a person types it on the verification page and signs in). A poll answers, as Entra does:

- ``authorization_pending`` until someone signed in with the user code;
- ``slow_down`` when it comes sooner than the current interval after the previous poll (the
  interval then grows by 5 s, RFC 8628 3.5), or for the first ``device_code_slow_down`` polls
  of a code when that setting asks for it;
- ``authorization_declined`` after the person cancelled on the page;
- ``expired_token`` once ``expires_in`` has passed (15 minutes at Microsoft);
- ``bad_verification_code`` for a device code it never issued; and the tokens, once, after an
  approval (a second redemption is refused like a redeemed authorization code).
"""

from __future__ import annotations

import secrets
import string
import threading
from dataclasses import dataclass

from airflow_provider_o365mail.testing.entra import errors, scopes
from airflow_provider_o365mail.testing.entra.directory import App, Directory

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
#: ``user_code`` letters: no vowels or look-alikes, like Entra's 9-letter codes.
USER_CODE_ALPHABET = "".join(c for c in string.ascii_uppercase if c not in "AEIOU")
#: Polls this much early still count as on time (the client's sleep and the network jitter).
POLL_SKEW = 0.5


@dataclass
class DeviceAuthorization:
    device_code: str
    user_code: str
    client_id: str
    scope: str
    issued_at: float
    expires_at: float
    interval: int
    last_poll: float = 0.0
    polls: int = 0
    slow_downs: int = 0
    #: pending, approved, declined or redeemed
    status: str = "pending"
    upn: str = ""


class DeviceFlows:
    """Device authorizations of one directory (in memory: a restarted stand-in forgets them, as codes expire)."""

    def __init__(self, directory: Directory) -> None:
        self.directory = directory
        self._by_device: dict[str, DeviceAuthorization] = {}
        self._by_user: dict[str, DeviceAuthorization] = {}
        self._lock = threading.Lock()

    def start(self, client_id: str | None, scope: str | None) -> DeviceAuthorization:
        if not client_id:
            raise errors.missing_parameter("client_id")
        app = self.directory.apps.get(client_id)
        if app is None:
            raise errors.application_not_found(client_id, self.directory.tenant_id)
        if not scope:
            raise errors.missing_parameter("scope")
        scopes.parse(scope)
        settings = self.directory.settings
        now = self.directory.now()
        user_code = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(9))
        record = DeviceAuthorization(
            device_code="DAQABAAEAAA" + secrets.token_urlsafe(96),
            user_code=user_code,
            client_id=app.client_id,
            scope=scope,
            issued_at=now,
            expires_at=now + settings.device_code_lifetime,
            interval=settings.device_code_interval,
        )
        self.directory.record_issued(record.device_code)
        with self._lock:
            self._by_device[record.device_code] = record
            self._by_user[user_code] = record
        self.directory.count("devicecode")
        return record

    def for_user_code(self, user_code: str) -> DeviceAuthorization:
        """The pending authorization a person typed the code of; 70018 for a wrong or used one."""
        with self._lock:
            record = self._by_user.get(user_code.strip().upper().replace("-", ""))
        if record is None or record.status != "pending":
            raise errors.user_code_wrong()
        if self.directory.now() > record.expires_at:
            raise errors.device_code_expired()
        return record

    def decide(self, record: DeviceAuthorization, upn: str | None) -> None:
        """The person signed in as ``upn`` and accepted (consent recorded), or cancelled (``None``)."""
        with self._lock:
            if upn is None:
                record.status = "declined"
                return
            record.status, record.upn = "approved", upn
        app = self.directory.app(record.client_id)
        resource, wanted = self.directory.requested_permissions(app, scopes.parse(record.scope))
        self.directory.grant_consent(upn, app.client_id, resource or scopes.GRAPH, sorted(wanted) if resource else [])

    def poll(self, app: App, form: dict[str, str]) -> dict:
        """One token request with ``grant_type=urn:ietf:params:oauth:grant-type:device_code``."""
        device_code = form.get("device_code") or form.get("code")
        if not device_code:
            raise errors.missing_parameter("device_code")
        now = self.directory.now()
        with self._lock:
            record = self._by_device.get(device_code)
            if record is None or record.client_id != app.client_id:
                raise errors.device_code_unknown()
            if now > record.expires_at:
                raise errors.device_code_expired()
            previous, record.last_poll = record.last_poll, now
            record.polls += 1
            too_soon = previous and now - previous < record.interval - POLL_SKEW
            if too_soon or record.slow_downs < self.directory.settings.device_code_slow_down:
                record.slow_downs += 1
                record.interval += 5
                raise errors.device_slow_down(record.interval)
            if record.status == "pending":
                raise errors.device_authorization_pending()
            if record.status == "declined":
                raise errors.device_authorization_declined()
            if record.status == "redeemed":
                raise errors.code_already_redeemed()
            record.status = "redeemed"
            upn = record.upn
        user = self.directory.user(upn)
        return self.directory.issue_delegated(app, user, scopes.parse(record.scope))

    def stats(self) -> list[dict]:
        """What the admin API shows: per code its polls, slow-downs and state (no codes)."""
        with self._lock:
            return [
                {"polls": r.polls, "slow_downs": r.slow_downs, "interval": r.interval, "status": r.status}
                for r in self._by_device.values()
            ]
