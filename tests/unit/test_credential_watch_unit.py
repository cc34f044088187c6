"""The credential watch without a network: what expires, once per period across watchers, once a day per
credential to the notifier, the listener's start and stop, and no secret in what it sends."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from pathlib import Path

import pytest

from airflow_provider_o365mail.auth.expiry import credential_warnings
from airflow_provider_o365mail.auth.store import StoredCache
from airflow_provider_o365mail.connection import settings_from_fields
from airflow_provider_o365mail.hooks import credential_watch as cw
from airflow_provider_o365mail.hooks.credential_watch import CredentialWatch, WatchConfig, notifier_from_config
from airflow_provider_o365mail.plugins import credential_listener
from airflow_provider_o365mail.testing.app_credentials import make_certificate

DAY = 86400.0
NOW = 1_800_000_000.0  # 2027-01-15 08:00 UTC
TODAY = dt.datetime.fromtimestamp(NOW, dt.UTC).date()
SECRET = "sbx~the-client-secret-value"
BASE = {"tenant_id": "contoso.onmicrosoft.com", "mailbox": "reports@contoso.com"}


class Variables:
    """An in-memory Variable backend shared by several watchers (as the metadata DB is by hosts)."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self.lock:
            return self.data.get(key)

    def set(self, key: str, value: str, description: str = "") -> None:
        with self.lock:
            self.data[key] = value

    def delete(self, key: str) -> None:
        with self.lock:
            self.data.pop(key, None)


def secret_settings(conn_id: str = "c1", expires_in_days: int = 5):
    expires = (TODAY + dt.timedelta(days=expires_in_days)).isoformat()
    return settings_from_fields(conn_id, "client-id", SECRET, {**BASE, "credential_expires_on": expires}, environ={})


def watcher(variables, sent, clock, **config) -> CredentialWatch:
    return CredentialWatch(
        WatchConfig(**{"interval": 3600.0, **config}), backend=variables, notify=sent.append, clock=clock
    )


@pytest.fixture(autouse=True)
def _quick_lease(monkeypatch):
    monkeypatch.setenv("AIRFLOW__O365MAIL__REFRESH_LEASE_SETTLE_SECONDS", "0.05")


# ------------------------------------------------------------------------------ what expires
def test_a_client_secret_inside_the_window_is_reported_with_its_date_and_fix():
    (warning,) = credential_warnings(secret_settings(expires_in_days=5), None, None, warning_days=14, now=NOW)
    assert (warning.credential, warning.state, warning.days_left) == ("client secret", "expiring", 5)
    expires = (TODAY + dt.timedelta(days=5)).isoformat()
    assert warning.expires_on == expires and f"expires on {expires}" in warning.message
    assert "'c1'" in warning.message and "Certificates & secrets" in warning.message
    assert "credential_expires_on" in warning.fix and SECRET not in json.dumps(warning.as_dict())
    assert credential_warnings(secret_settings(expires_in_days=15), None, None, warning_days=14, now=NOW) == []
    (expired,) = credential_warnings(secret_settings(expires_in_days=-1), None, None, warning_days=14, now=NOW)
    assert expired.state == "expired"


def test_a_certificate_is_reported_from_its_not_after(tmp_path: Path):
    pair = make_certificate("watch-test", days=5)
    key_path, cert_path = pair.write(tmp_path)
    settings = settings_from_fields(
        "cert1", "client-id", None, {**BASE, "certificate_path": str(cert_path), "certificate_key_path": str(key_path)}
    )
    (warning,) = credential_warnings(settings, None, None, warning_days=14)
    assert warning.credential == "certificate" and warning.state == "expiring"
    assert "thumbprint" in warning.detail and "Certificates" in warning.fix
    assert "PRIVATE KEY" not in json.dumps(warning.as_dict())
    assert credential_warnings(settings, None, None, warning_days=3) == []


def test_a_refresh_token_near_90_days_and_a_revoked_grant_are_reported():
    settings = settings_from_fields("d1", "client-id", SECRET, {**BASE, "refresh_token": "rt-value"}, environ={})
    stored = StoredCache("{}", None, NOW - 80 * DAY, refresh_token_used_at=NOW - 80 * DAY)
    (warning,) = credential_warnings(settings, stored, None, warning_days=14, now=NOW, keepalive_after_days=60)
    assert (warning.credential, warning.state, warning.days_left) == ("refresh token", "expiring", 10)
    assert "airflow o365mail refresh d1" in warning.fix and "60 days" in warning.fix
    revoked = {"at": NOW - 60, "error": "GrantRevoked", "message": "Microsoft 365 token request ... (AADSTS50173)"}
    (warning,) = credential_warnings(settings, stored, revoked, warning_days=14, now=NOW)
    assert warning.state == "revoked" and "airflow o365mail authorize --conn-id d1" in warning.fix
    earlier = {**revoked, "at": NOW - 81 * DAY}  # the store was written after it: recovered
    assert [w.state for w in credential_warnings(settings, stored, earlier, warning_days=14, now=NOW)] == ["expiring"]


# ------------------------------------------------------------------------------ once per period, once a day
def test_a_warning_goes_to_the_notifier_once_per_credential_and_day():
    variables, sent = Variables(), []
    now = [NOW]
    watch = watcher(variables, sent, lambda: now[0])
    settings = secret_settings()
    assert watch.check(settings).notified and len(sent) == 1
    now[0] += 3601  # the next period, the same day
    assert watch.check(settings).warnings and len(sent) == 1, "not twice a day"
    now[0] += DAY
    watch.check(settings)
    assert len(sent) == 2, "again the next day"
    context = sent[0]
    assert context["conn_id"] == "c1" and context["o365mail_credential"]["credential"] == "client secret"
    assert SECRET not in json.dumps(context)


def test_a_failed_notifier_is_tried_again_at_the_next_check():
    variables, calls = Variables(), []
    now = [NOW]

    def failing(context):
        calls.append(context)
        raise ConnectionError("mail server down")

    watch = CredentialWatch(WatchConfig(interval=60.0), backend=variables, notify=failing, clock=lambda: now[0])
    watch.check(secret_settings())
    now[0] += 61
    watch.notify = calls.append
    watch.check(secret_settings())
    assert len(calls) == 2 and cw.WatchState.read(variables, "c1").notify_error == ""


def test_watchers_sharing_the_variables_check_a_connection_once_per_period():
    variables, sent = Variables(), []
    settings = secret_settings()
    barrier = threading.Barrier(4)
    outcomes = []

    def host() -> None:
        watch = watcher(variables, sent, lambda: NOW)
        barrier.wait()
        outcomes.append(watch.check(settings))

    threads = [threading.Thread(target=host) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    checked = [o for o in outcomes if not o.skipped]
    assert len(outcomes) == 4 and len(checked) == 1, [o.skipped for o in outcomes]
    assert len(sent) == 1
    later = watcher(variables, sent, lambda: NOW + 60).check(settings)
    assert later.skipped.startswith("checked"), "a later watcher in the same period leaves it alone"


def test_keep_alive_only_for_a_stored_refresh_token_unused_past_the_threshold():
    watch = watcher(Variables(), [], lambda: NOW, keepalive_after_days=60)
    settings = settings_from_fields("d1", "client-id", SECRET, {**BASE, "refresh_token": "rt-value"}, environ={})
    cache = json.dumps({"RefreshToken": {"k": {"credential_type": "RefreshToken", "secret": "rt"}}})
    assert watch._keep_alive_due(settings, StoredCache(cache, None, NOW, refresh_token_used_at=NOW - 61 * DAY), NOW)
    assert not watch._keep_alive_due(settings, StoredCache(cache, None, NOW, refresh_token_used_at=NOW - 59 * DAY), NOW)
    assert not watch._keep_alive_due(settings, StoredCache("{}", None, NOW, refresh_token_used_at=NOW - 61 * DAY), NOW)
    assert not watch._keep_alive_due(settings, None, NOW)


# ------------------------------------------------------------------------------ configuration and notifier
def test_the_configured_notifier_gets_its_templates_rendered(tmp_path: Path):
    out = tmp_path / "sent.jsonl"
    config = WatchConfig(
        notifier="airflow_provider_o365mail.testing.recording_notifier.RecordingNotifier",
        notifier_kwargs={"path": str(out), "text": "{{ subject }} / {{ o365mail_credential.fix }}"},
    )
    (warning,) = credential_warnings(secret_settings(), None, None, warning_days=14, now=NOW)
    notifier_from_config(config)(cw.notification_context(warning))
    (line,) = out.read_text().splitlines()
    assert json.loads(line)["text"] == f"{warning.subject} / {warning.fix}"


def test_bad_options_name_the_option(monkeypatch):
    monkeypatch.setenv("AIRFLOW__O365MAIL__CREDENTIAL_NOTIFIER_KWARGS", "{to: nobody}")
    with pytest.raises(cw.WatchConfigError, match="credential_notifier_kwargs"):
        WatchConfig.configured()
    monkeypatch.setenv("AIRFLOW__O365MAIL__CREDENTIAL_NOTIFIER_KWARGS", "")
    monkeypatch.setenv("AIRFLOW__O365MAIL__CREDENTIAL_WATCH_KEEPALIVE_DAYS", "95")
    with pytest.raises(cw.WatchConfigError, match="credential_watch_keepalive_days"):
        WatchConfig.configured()
    with pytest.raises(cw.WatchConfigError, match="credential_notifier 'no.such.Notifier'"):
        notifier_from_config(WatchConfig(notifier="no.such.Notifier"))


# ------------------------------------------------------------------------------ the listener
class Job:
    """Looks like airflow.jobs.job.Job to the listener: its runner sets job_type after on_starting."""

    job_type: str | None = None


class TaskRunnerMarker:
    pass


def test_the_listener_runs_the_watch_in_scheduler_jobs_and_stops_with_them(monkeypatch):
    monkeypatch.setenv("AIRFLOW__O365MAIL__CREDENTIAL_WATCH", "True")
    monkeypatch.setenv("AIRFLOW__O365MAIL__CREDENTIAL_WATCH_INTERVAL_SECONDS", "0.2")
    passes = []
    monkeypatch.setattr(credential_listener, "check_all_connections", lambda who="": passes.append(who) or [])
    credential_listener.on_starting(TaskRunnerMarker())
    assert not credential_listener._threads, "no watch in task processes"
    job = Job()
    credential_listener.on_starting(job)
    job.job_type = "SchedulerJob"
    thread = credential_listener._threads[id(job)]
    deadline = time.monotonic() + 30
    while len(passes) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(passes) >= 2 and passes[0].startswith("SchedulerJob")
    credential_listener.before_stopping(job)
    thread.join(timeout=10)
    assert not thread.is_alive() and not credential_listener._threads


def test_the_listener_leaves_other_jobs_and_an_opted_out_deployment_alone(monkeypatch):
    monkeypatch.setenv("AIRFLOW__O365MAIL__CREDENTIAL_WATCH_INTERVAL_SECONDS", "0.2")
    passes = []
    monkeypatch.setattr(credential_listener, "check_all_connections", lambda who="": passes.append(who) or [])
    monkeypatch.setenv("AIRFLOW__O365MAIL__CREDENTIAL_WATCH", "False")
    credential_listener.on_starting(Job())
    assert not credential_listener._threads, "credential_watch = False"
    monkeypatch.setenv("AIRFLOW__O365MAIL__CREDENTIAL_WATCH", "True")
    job = Job()
    job.job_type = "DagProcessorJob"
    credential_listener.on_starting(job)
    thread = credential_listener._threads.pop(id(job))
    thread.join(timeout=10)
    assert not thread.is_alive() and passes == []


# ------------------------------------------------------------------------------ doctor
def test_doctor_names_the_watch_its_last_check_and_a_failed_notifier(monkeypatch):
    from airflow_provider_o365mail.hooks import doctor

    monkeypatch.setenv("AIRFLOW__O365MAIL__CREDENTIAL_WATCH", "False")
    off = doctor._check_watch(secret_settings())
    assert (off.status, off.link) == ("ok", "credential watch") and "off" in off.detail
    monkeypatch.setenv("AIRFLOW__O365MAIL__CREDENTIAL_WATCH", "True")
    monkeypatch.setenv("AIRFLOW__O365MAIL__CREDENTIAL_NOTIFIER", "my.Notifier")
    state = cw.WatchState(
        checked_at=NOW, checked_by="host-a:12", notified={"client secret|expiring|2027-01-20": "2027-01-15"}
    )
    monkeypatch.setattr(doctor, "watch_status", lambda conn_id: state)
    ok = doctor._check_watch(secret_settings())
    assert (
        ok.status == "ok"
        and "host-a:12" in ok.detail
        and "client secret expiring 2027-01-20 on 2027-01-15" in ok.detail
    )
    state.notify_error = "2027-01-15: my.Notifier failed: ConnectionError"
    failed = doctor._check_watch(secret_settings())
    assert failed.status == "warn" and "ConnectionError" in failed.detail and "credential_notifier" in failed.fix
