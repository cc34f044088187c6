"""The credential watch: keep rarely used refresh tokens alive and report credentials that die soon.

Run by the plugin's listener in the scheduler and the triggerer (``plugins/credential_listener.py``),
so nobody has to schedule anything. Per connection and period, across every host:

- one process checks it: it claims the connection's watch lease (a :class:`.RefreshLease` on its own
  Variable) without waiting, and skips a connection another process checked within the period
  (the watch state Variable ``o365mail_credential_watch__<conn_id>`` records when);
- a delegated connection whose token store holds a refresh token unused for
  ``[o365mail] credential_watch_keepalive_days`` (60) is redeemed once (:func:`.keep_alive`: the
  refresh lease, the rotated token stored), which starts a new 90-day window;
- every credential that expires within ``[o365mail] credential_warning_days`` (14), expired, or
  was revoked (:mod:`.auth.expiry`) is handed to the notifier ``[o365mail] credential_notifier``
  at most once per credential and day (the state records the day it was sent).

Nothing here logs or sends a secret: warnings name the connection, the credential, its date and the fix.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msal

from airflow_provider_o365mail import exceptions as exc
from airflow_provider_o365mail.auth.expiry import DEFAULT_WARNING_DAYS, CredentialWarning, credential_warnings
from airflow_provider_o365mail.auth.last_error import last_error_record
from airflow_provider_o365mail.auth.lease import LeaseTimeout, LeaseTiming, RefreshLease
from airflow_provider_o365mail.auth.store import StoredCache, TokenStore
from airflow_provider_o365mail.auth.token_status import (
    DAY,
    DEFAULT_KEEPALIVE_DAYS,
    KeepAliveResult,
    keep_alive,
    refresh_token_health,
)
from airflow_provider_o365mail.auth.tokens import TokenManager
from airflow_provider_o365mail.connection import O365MailSettings
from airflow_provider_o365mail.runtime import VariableBackend, default_variables

log = logging.getLogger(__name__)

STATE_PREFIX = "o365mail_credential_watch__"
LEASE_PREFIX = "o365mail_credential_watch_lease__"
STATE_DESCRIPTION = "airflow-provider-o365mail: credential watch (last check, keep-alive, notifications); no secret"
DEFAULT_INTERVAL = 6 * 3600.0
#: How many days of notification records the state keeps.
NOTIFIED_KEPT_DAYS = 3


def state_key(conn_id: str) -> str:
    return f"{STATE_PREFIX}{conn_id}"


class WatchConfigError(ValueError):
    """An ``[o365mail] credential_*`` option cannot be used."""


@dataclass(frozen=True)
class WatchConfig:
    """The ``[o365mail] credential_*`` options."""

    enabled: bool = True
    interval: float = DEFAULT_INTERVAL
    keepalive_after_days: float = DEFAULT_KEEPALIVE_DAYS
    warning_days: int = DEFAULT_WARNING_DAYS
    notifier: str = ""
    notifier_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def configured(cls) -> WatchConfig:
        from airflow_provider_o365mail.version_compat import conf

        raw_kwargs = (conf.get("o365mail", "credential_notifier_kwargs", fallback="") or "").strip()
        try:
            kwargs = json.loads(raw_kwargs) if raw_kwargs else {}
        except ValueError as err:
            raise WatchConfigError(
                f"[o365mail] credential_notifier_kwargs is not JSON ({err.msg} at {err.pos}): give a JSON object "
                'such as {"to": "ops@contoso.com"}.'
            ) from None
        if not isinstance(kwargs, dict):
            raise WatchConfigError("[o365mail] credential_notifier_kwargs must be a JSON object (keyword arguments).")
        config = cls(
            enabled=conf.getboolean("o365mail", "credential_watch", fallback=True),
            interval=conf.getfloat("o365mail", "credential_watch_interval_seconds", fallback=DEFAULT_INTERVAL),
            keepalive_after_days=conf.getfloat(
                "o365mail", "credential_watch_keepalive_days", fallback=DEFAULT_KEEPALIVE_DAYS
            ),
            warning_days=conf.getint("o365mail", "credential_warning_days", fallback=DEFAULT_WARNING_DAYS),
            notifier=(conf.get("o365mail", "credential_notifier", fallback="") or "").strip(),
            notifier_kwargs=kwargs,
        )
        if config.interval <= 0:
            raise WatchConfigError("[o365mail] credential_watch_interval_seconds must be > 0.")
        if not 0 < config.keepalive_after_days < 90:
            raise WatchConfigError(
                "[o365mail] credential_watch_keepalive_days must be between 0 and 90 (Microsoft expires a refresh "
                "token unused for 90 days)."
            )
        return config


def notifier_from_config(config: WatchConfig) -> Callable[[dict[str, Any]], None] | None:
    """A callable sending one warning through ``[o365mail] credential_notifier`` (None when none is set).

    A new notifier per warning: Airflow's ``BaseNotifier`` renders its templated fields in place, once.
    """
    if not config.notifier:
        return None
    module_name, _, class_name = config.notifier.rpartition(".")
    try:
        notifier_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise WatchConfigError(
            f"[o365mail] credential_notifier {config.notifier!r} cannot be imported ({err}). Give the dotted path of "
            "a notifier class, e.g. airflow_provider_o365mail.notifications.email.O365EmailNotifier."
        ) from None

    def send(context: dict[str, Any]) -> None:
        notifier_class(**config.notifier_kwargs)(context)

    return send


def notification_context(warning: CredentialWarning) -> dict[str, Any]:
    """What the notifier gets as its context (its templates can use every key)."""
    return {
        "reason": "o365mail_credential_watch",
        "conn_id": warning.conn_id,
        "subject": warning.subject,
        "message": warning.message,
        "o365mail_credential": warning.as_dict(),
    }


@dataclass
class WatchState:
    """The watch state Variable of one connection (no secret)."""

    checked_at: float = 0.0
    checked_by: str = ""
    kept_alive_at: float = 0.0
    keep_alive: str = ""
    notified: dict[str, str] = field(default_factory=dict)
    notify_error: str = ""

    @classmethod
    def read(cls, backend: VariableBackend, conn_id: str) -> WatchState:
        try:
            raw = backend.get(state_key(conn_id))
            data = json.loads(raw) if raw else {}
        except (ValueError, TypeError):
            data = {}
        if not isinstance(data, dict):
            data = {}
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        try:
            return cls(**known)
        except TypeError:
            return cls()

    def write(self, backend: VariableBackend, conn_id: str) -> None:
        backend.set(state_key(conn_id), json.dumps(self.__dict__), description=STATE_DESCRIPTION)


@dataclass
class WatchOutcome:
    """What one check of one connection did."""

    conn_id: str
    skipped: str = ""
    keep_alive: KeepAliveResult | None = None
    warnings: list[CredentialWarning] = field(default_factory=list)
    notified: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.skipped:
            return f"skipped ({self.skipped})"
        parts = [f"keep-alive {self.keep_alive.status}" if self.keep_alive else "no keep-alive due"]
        parts.append(f"{len(self.warnings)} warning(s)")
        if self.notified:
            parts.append(f"{len(self.notified)} notified")
        return ", ".join(parts)


def _has_refresh_token(stored: StoredCache | None) -> bool:
    if stored is None:
        return False
    cache = msal.SerializableTokenCache()
    cache.deserialize(stored.msal_cache)
    return any(True for _ in cache.search(msal.TokenCache.CredentialType.REFRESH_TOKEN))


class CredentialWatch:
    """One pass over connections; :meth:`check` is one connection (see the module docstring)."""

    def __init__(
        self,
        config: WatchConfig,
        *,
        backend: VariableBackend | None = None,
        notify: Callable[[dict[str, Any]], None] | None = None,
        clock: Callable[[], float] = time.time,
        who: str = "",
    ) -> None:
        self.config = config
        self.backend = backend or default_variables()
        self.notify = notify if notify is not None else notifier_from_config(config)
        self.clock = clock
        self.who = who

    def run(self, connections: Iterable[O365MailSettings]) -> list[WatchOutcome]:
        outcomes = []
        for settings in connections:
            try:
                outcomes.append(self.check(settings))
            except Exception as err:  # one connection must not stop the others
                log.warning("Credential watch: checking %s failed: %s: %s", settings.conn_id, type(err).__name__, err)
                outcomes.append(WatchOutcome(settings.conn_id, skipped=f"failed: {type(err).__name__}"))
        return outcomes

    def _lease(self, settings: O365MailSettings) -> RefreshLease:
        timing = LeaseTiming.configured(settings.timeout)
        return RefreshLease(
            self.backend,
            settings.conn_id,
            timing,
            key=f"{LEASE_PREFIX}{settings.conn_id}",
            doing="checking the credentials of",
        )

    def check(self, settings: O365MailSettings) -> WatchOutcome:
        conn_id = settings.conn_id
        lease = self._lease(settings)
        try:
            # No waiting: a process that holds the lease is doing this check now.
            lease.acquire(time.monotonic() + 3 * lease.timing.settle + 1)
        except LeaseTimeout:
            return WatchOutcome(conn_id, skipped="another process is checking it")
        try:
            state = WatchState.read(self.backend, conn_id)
            now = self.clock()
            if now - state.checked_at < self.config.interval:
                return WatchOutcome(conn_id, skipped=f"checked {now - state.checked_at:.0f} s ago ({state.checked_by})")
            outcome = WatchOutcome(conn_id)
            store = TokenStore(conn_id, self.backend)
            stored = self._load(store)
            if self._keep_alive_due(settings, stored, now):
                outcome.keep_alive = keep_alive(TokenManager(settings, store))
                state.kept_alive_at, state.keep_alive = now, f"{outcome.keep_alive.status}: {outcome.keep_alive.detail}"
                log.info("Credential watch: keep-alive of %s: %s", conn_id, state.keep_alive)
                stored = self._load(store)
            outcome.warnings = credential_warnings(
                settings,
                stored,
                last_error_record(conn_id),
                warning_days=self.config.warning_days,
                now=now,
                keepalive_after_days=self.config.keepalive_after_days,
            )
            state.checked_at, state.checked_by = now, lease.owner
            self._report(outcome, state, now)
            state.write(self.backend, conn_id)
            return outcome
        finally:
            lease.release()

    @staticmethod
    def _load(store: TokenStore) -> StoredCache | None:
        try:
            return store.load()
        except exc.TokenStoreError as err:
            log.warning("Credential watch: the token store of %s cannot be read: %s", store.conn_id, err)
            return None

    def _keep_alive_due(self, settings: O365MailSettings, stored: StoredCache | None, now: float) -> bool:
        if not settings.delegated or not _has_refresh_token(stored):
            return False
        last_used = refresh_token_health(stored).last_used
        return last_used is not None and now - last_used >= self.config.keepalive_after_days * DAY

    def _report(self, outcome: WatchOutcome, state: WatchState, now: float) -> None:
        today = dt.datetime.fromtimestamp(now, dt.UTC).date()
        oldest = (today - dt.timedelta(days=NOTIFIED_KEPT_DAYS)).isoformat()
        state.notified = {key: day for key, day in state.notified.items() if day >= oldest}
        for warning in outcome.warnings:
            log.warning("Credential watch: %s", warning.message)
            if self.notify is None or state.notified.get(warning.key) == today.isoformat():
                continue
            try:
                self.notify(notification_context(warning))
            except Exception as err:
                state.notify_error = f"{today}: {self.config.notifier or 'notifier'} failed: {type(err).__name__}"
                log.warning(
                    "Credential watch: the notifier %s failed for %s (%s); the next check tries again.",
                    self.config.notifier,
                    outcome.conn_id,
                    type(err).__name__,
                )
                continue
            state.notified[warning.key] = today.isoformat()
            state.notify_error = ""
            outcome.notified.append(warning.key)
            state.write(self.backend, outcome.conn_id)  # sent: recorded at once, not only at the end


def watch_status(conn_id: str, backend: VariableBackend | None = None) -> WatchState:
    """The watch state of ``conn_id`` (for ``doctor`` and the page)."""
    return WatchState.read(backend or default_variables(), conn_id)
