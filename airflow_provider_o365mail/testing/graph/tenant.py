"""Who exists in the sandbox tenant as Graph sees it: users, their mailboxes and the rights on them.

Users (UPN, object ID, display name) and the tenant clock come from the Entra stand-in's
``directory.json``; mailboxes are the Dovecot mailboxes the sandbox created. Exchange's side lives
here: per mailbox whether it is REST-enabled, its ``MaxSendSize`` and who holds Send As, Send on
Behalf and Full Access on it; per app an optional application access policy (the mailboxes an
app-only token may use).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from airflow_provider_o365mail.testing.graph import errors

MiB = 1024 * 1024
#: Exchange Online's default MaxSendSize, and the most an admin can set (attachment-createuploadsession.md).
DEFAULT_MAX_SEND_SIZE = 35 * MiB
MAX_SEND_SIZE_CEILING = 150 * MiB


@dataclass
class MailboxSettings:
    rest_enabled: bool = True
    max_send_size: int = DEFAULT_MAX_SEND_SIZE
    send_as: list[str] = field(default_factory=list)
    send_on_behalf: list[str] = field(default_factory=list)
    full_access: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Mailbox:
    address: str
    oid: str
    display_name: str
    settings: MailboxSettings


def _lower(values: Any) -> list[str]:
    if not isinstance(values, list | tuple):
        raise ValueError("expected a list of addresses")
    return sorted({str(v).lower() for v in values})


class Tenant:
    """The users of ``directory_file`` and the mailboxes in ``seed`` (address -> its initial rights)."""

    def __init__(self, directory_file: Path, domain: str, seed: dict[str, MailboxSettings]) -> None:
        self.directory_file = directory_file
        self.domain = domain.lower()
        self._seed = {address.lower(): settings for address, settings in seed.items()}
        self._lock = threading.Lock()
        self._cache: tuple[float, dict[str, Any]] = (-1.0, {})
        self.mailboxes: dict[str, MailboxSettings] = {}
        #: app ID -> mailboxes its app-only tokens may use (New-ApplicationAccessPolicy); absent: all.
        self.access_policies: dict[str, list[str]] = {}
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.mailboxes = {
                address: MailboxSettings(**json.loads(json.dumps(asdict(settings))))
                for address, settings in self._seed.items()
            }
            self.access_policies = {}

    # ------------------------------------------------------------------ the Entra side
    def _directory(self) -> dict[str, Any]:
        try:
            mtime = self.directory_file.stat().st_mtime
        except OSError:
            return {"users": {}, "settings": {}}
        with self._lock:
            if mtime != self._cache[0]:
                self._cache = (mtime, json.loads(self.directory_file.read_text()))
            return self._cache[1]

    def now(self) -> float:
        """The tenant's clock: the Entra stand-in's ``clock_offset`` moves Graph's too."""
        return time.time() + float(self._directory().get("settings", {}).get("clock_offset", 0.0))

    def _users(self) -> dict[str, dict[str, Any]]:
        return self._directory().get("users", {})

    def is_local(self, address: str) -> bool:
        return address.rpartition("@")[2].lower() == self.domain

    def has_mailbox(self, address: str) -> bool:
        return address.lower() in self.mailboxes

    # ------------------------------------------------------------------ lookups
    def resolve(self, reference: str) -> Mailbox:
        """``/users/{id | userPrincipalName}``: by UPN or object ID; 404 as Graph answers."""
        wanted = reference.strip().lower()
        for upn, user in self._users().items():
            if upn.lower() == wanted or str(user.get("oid", "")).lower() == wanted:
                return self._mailbox_of(upn, user)
        raise errors.invalid_user(reference)

    def mailbox_of_user(self, upn: str) -> Mailbox:
        """``/me``: the signed-in user's mailbox."""
        user = self._users().get(upn.lower())
        if user is None:
            raise errors.invalid_user(upn)
        return self._mailbox_of(upn, user)

    def _mailbox_of(self, upn: str, user: dict[str, Any]) -> Mailbox:
        settings = self.mailboxes.get(upn.lower())
        if settings is None or not settings.rest_enabled:
            raise errors.mailbox_not_enabled()
        return Mailbox(upn.lower(), str(user.get("oid", "")), str(user.get("display_name", "")), settings)

    def display_name(self, address: str) -> str:
        return str(self._users().get(address.lower(), {}).get("display_name", ""))

    # ------------------------------------------------------------------ rights
    def send_right(self, actor: str, address: str) -> str | None:
        """``"self"``, ``"as"`` (Send As), ``"behalf"`` (Send on Behalf) or None: may ``actor`` send from ``address``."""
        actor, address = actor.lower(), address.lower()
        if actor == address:
            return "self"
        settings = self.mailboxes.get(address)
        if settings is None:
            return None
        if actor in settings.send_as:
            return "as"
        if actor in settings.send_on_behalf:
            return "behalf"
        return None

    def full_access(self, actor: str, mailbox: Mailbox) -> bool:
        return actor.lower() == mailbox.address or actor.lower() in mailbox.settings.full_access

    def app_may_open(self, app_id: str, mailbox: Mailbox) -> bool:
        allowed = self.access_policies.get(app_id)
        return allowed is None or mailbox.address in allowed

    # ------------------------------------------------------------------ admin
    def update_mailbox(self, address: str, **values: Any) -> MailboxSettings:
        with self._lock:
            settings = self.mailboxes.get(address.lower())
            if settings is None:
                raise KeyError(f"no sandbox mailbox {address!r}")
            for name, value in values.items():
                if name == "rest_enabled":
                    settings.rest_enabled = bool(value)
                elif name == "max_send_size":
                    size = int(value)
                    if not 0 < size <= MAX_SEND_SIZE_CEILING:
                        raise ValueError(f"max_send_size must be between 1 and {MAX_SEND_SIZE_CEILING} bytes (150 MB)")
                    settings.max_send_size = size
                elif name in ("send_as", "send_on_behalf", "full_access"):
                    setattr(settings, name, _lower(value))
                else:
                    raise ValueError(f"unknown mailbox setting {name!r}")
            return settings

    def set_access_policy(self, app_id: str, mailboxes: list[str] | None) -> None:
        with self._lock:
            if mailboxes is None:
                self.access_policies.pop(app_id, None)
            else:
                self.access_policies[app_id] = _lower(mailboxes)

    def state(self) -> dict[str, Any]:
        return {
            "mailboxes": {address: asdict(settings) for address, settings in self.mailboxes.items()},
            "access_policies": dict(self.access_policies),
        }
