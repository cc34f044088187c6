"""Which credentials of a connection die soon, or died: for the credential watch, the page and ``doctor``.

- **Client secret**: Entra ID does not tell a delegated app when its secret expires (reading it needs
  Graph application permissions on the app registration), so the admin copies the date into the
  connection's ``credential_expires_on`` extra. A recorded AADSTS7000222 says it expired.
- **Certificate**: the ``notAfter`` of the certificate the connection holds.
- **Refresh token**: 90 days after its last use (:mod:`.token_status`), or revoked: the last permanent
  token error that asks for a new consent, recorded after the store was last written.

Nothing here holds a secret: a warning names the connection, the credential, its date and the fix.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import asdict, dataclass
from typing import Any

from airflow_provider_o365mail import exceptions as exc
from airflow_provider_o365mail import hints
from airflow_provider_o365mail.auth.credential import certificate_info
from airflow_provider_o365mail.auth.store import StoredCache
from airflow_provider_o365mail.auth.token_status import DAY, keepalive_fix, refresh_token_health
from airflow_provider_o365mail.connection import O365MailSettings
from airflow_provider_o365mail.connection_defaults import CREDENTIAL_CERTIFICATE, CREDENTIAL_SECRET

#: ``[o365mail] credential_warning_days``: report a credential this many days before it expires.
DEFAULT_WARNING_DAYS = 14

CLIENT_SECRET, CERTIFICATE, REFRESH_TOKEN = "client secret", "certificate", "refresh token"
EXPIRING, EXPIRED, REVOKED = "expiring", "expired", "revoked"


def configured_warning_days() -> int:
    from airflow_provider_o365mail.version_compat import conf

    return conf.getint("o365mail", "credential_warning_days", fallback=DEFAULT_WARNING_DAYS)


@dataclass(frozen=True)
class CredentialWarning:
    """One credential of one connection that expires within the warning window, expired, or was revoked."""

    conn_id: str
    credential: str
    state: str
    #: the expiry date (ISO), or for a revoked grant the day the refusal was recorded
    expires_on: str
    days_left: int | None
    detail: str
    fix: str

    @property
    def key(self) -> str:
        """What "the same warning" means for the once-a-day rule: credential, state and date."""
        return f"{self.credential}|{self.state}|{self.expires_on}"

    @property
    def subject(self) -> str:
        what = {
            EXPIRING: f"expires on {self.expires_on}",
            EXPIRED: f"expired on {self.expires_on}",
            REVOKED: f"revoked ({self.expires_on})",
        }[self.state]
        return f"Microsoft 365 mail connection {self.conn_id!r}: {self.credential} {what}"

    @property
    def message(self) -> str:
        return (
            f"Airflow connection {self.conn_id!r} (Microsoft 365 mail): the {self.credential} {self.detail}. "
            f"Fix: {self.fix}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "subject": self.subject, "message": self.message}


def _days(expires: dt.date, today: dt.date) -> int:
    return (expires - today).days


def _dated(
    settings: O365MailSettings, credential: str, expires: dt.date, today: dt.date, warning_days: int, fix: str
) -> CredentialWarning | None:
    left = _days(expires, today)
    if left > warning_days:
        return None
    if left < 0:
        return CredentialWarning(
            settings.conn_id, credential, EXPIRED, expires.isoformat(), left, f"expired on {expires}", fix
        )
    return CredentialWarning(
        settings.conn_id,
        credential,
        EXPIRING,
        expires.isoformat(),
        left,
        f"expires on {expires} (in {left} day{'s' if left != 1 else ''})",
        fix,
    )


def _current_error(last_error: dict | None, stored: StoredCache | None) -> dict | None:
    """The recorded permanent error, if no token response was stored after it."""
    if not last_error:
        return None
    at = float(last_error.get("at") or 0)
    return last_error if stored is None or at >= stored.written_at else None


def _is_reauthorization(name: str | None) -> bool:
    cls = getattr(exc, name or "", None)
    return isinstance(cls, type) and issubclass(cls, exc.ReauthorizationRequired)


def credential_warnings(
    settings: O365MailSettings,
    stored: StoredCache | None,
    last_error: dict | None,
    *,
    warning_days: int = DEFAULT_WARNING_DAYS,
    now: float | None = None,
    keepalive_after_days: float | None = None,
) -> list[CredentialWarning]:
    """The connection's credentials that need a person within ``warning_days`` (or now).

    :param stored: the token store's content (None: empty); :param last_error: ``last_error_record``.
    :param keepalive_after_days: the credential watch redeems refresh tokens unused this long (None: off);
        only changes what the fix says.
    """
    now = time.time() if now is None else now
    today = dt.datetime.fromtimestamp(now, dt.UTC).date()
    conn_id = settings.conn_id
    found: list[CredentialWarning] = []
    error = _current_error(last_error, stored)

    if settings.credential_type == CREDENTIAL_SECRET:
        fix = hints.NEW_CLIENT_SECRET + " " + hints.SECRET_EXPIRY_FIELD
        if error and error.get("error") == "ClientCredentialError" and "AADSTS7000222" in str(error.get("message")):
            day = dt.datetime.fromtimestamp(float(error.get("at") or now), dt.UTC).date()
            found.append(
                CredentialWarning(
                    conn_id,
                    CLIENT_SECRET,
                    EXPIRED,
                    day.isoformat(),
                    None,
                    "was refused as expired (AADSTS7000222)",
                    fix,
                )
            )
        elif settings.credential_expires_on is not None:
            warning = _dated(settings, CLIENT_SECRET, settings.credential_expires_on, today, warning_days, fix)
            if warning is not None:
                found.append(warning)
    elif settings.credential_type == CREDENTIAL_CERTIFICATE:
        try:
            info = certificate_info(settings)
        except exc.ConnectionConfigError:
            info = None  # unreadable: doctor and every token request say why
        if info is not None:
            warning = _dated(settings, CERTIFICATE, info.not_after.date(), today, warning_days, hints.NEW_CERTIFICATE)
            if warning is not None:
                detail = f"{warning.detail}; subject {info.subject}, thumbprint {info.thumbprint_sha1}"
                found.append(
                    CredentialWarning(
                        conn_id, CERTIFICATE, warning.state, warning.expires_on, warning.days_left, detail, warning.fix
                    )
                )

    if settings.delegated:
        reauthorize = hints.for_public_client(hints.REAUTHORIZE) if settings.public_client else hints.REAUTHORIZE
        if error and _is_reauthorization(str(error.get("error"))):
            day = dt.datetime.fromtimestamp(float(error.get("at") or now), dt.UTC).date()
            cause = str(error.get("message") or "").split(": ", 1)[-1].split(". ", 1)[0]
            found.append(
                CredentialWarning(
                    conn_id,
                    REFRESH_TOKEN,
                    REVOKED,
                    day.isoformat(),
                    None,
                    f"was refused on {day} ({cause})",
                    reauthorize.format(conn_id=conn_id),
                )
            )
        else:
            health = refresh_token_health(stored)
            if health.expires_at is not None:
                expires = dt.datetime.fromtimestamp(health.expires_at, dt.UTC).date()
                left = (health.expires_at - now) / DAY
                fix = (reauthorize if left <= 0 else keepalive_fix(keepalive_after_days)).format(conn_id=conn_id)
                warning = _dated(settings, REFRESH_TOKEN, expires, today, warning_days, fix)
                if warning is not None:
                    detail = (
                        f"was last used {dt.datetime.fromtimestamp(health.last_used or 0, dt.UTC):%Y-%m-%d} and "
                        f"{warning.detail} unless it is used (Microsoft: 90 days without use)"
                    )
                    found.append(
                        CredentialWarning(
                            conn_id, REFRESH_TOKEN, warning.state, warning.expires_on, warning.days_left, detail, fix
                        )
                    )
    return found
