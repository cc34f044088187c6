"""The credential watch in real Airflow components: a scheduler and a triggerer (two processes, each
with its own watch thread, as on two hosts) keep an aging refresh token alive and report an expiring
client secret, with nothing scheduled, once per period between them."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import msal

from airflow_provider_o365mail.auth.store import TokenStore
from airflow_provider_o365mail.hooks.credential_watch import WatchState
from airflow_provider_o365mail.hooks.o365mail import O365MailHook
from airflow_provider_o365mail.runtime import MetadataDbVariables
from airflow_provider_o365mail.testing.airflow_services import start_airflow_services, wait_until

DAY = 86400.0
NOTIFIER = "airflow_provider_o365mail.testing.recording_notifier.RecordingNotifier"


def age_store(conn_id: str, days: float) -> None:
    store = TokenStore(conn_id)
    stored = store.load()
    store.save(stored.msal_cache, stored.seed_fingerprint, stored.fence, used_at=time.time() - days * DAY)


def refresh_tokens(conn_id: str) -> set[str]:
    cache = msal.SerializableTokenCache()
    cache.deserialize(TokenStore(conn_id).load().msal_cache)
    return {rt["secret"] for rt in cache.search(msal.TokenCache.CredentialType.REFRESH_TOKEN)}


def test_scheduler_and_triggerer_keep_alive_once_and_notify_once(
    airflow_db, o365_sandbox, o365_admin, monkeypatch, tmp_path: Path
):
    conn_id = "o365mail_watched"
    secret_expires = (dt.datetime.now(dt.UTC) + dt.timedelta(days=5)).date().isoformat()
    connection = o365_sandbox.connection_json(
        refresh_token=o365_sandbox.new_refresh_token(), credential_expires_on=secret_expires
    )
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", connection)
    O365MailHook(conn_id).access_token()
    age_store(conn_id, 70)  # unused for 70 days: past the 60-day keep-alive threshold, 20 days left
    aged = refresh_tokens(conn_id)
    sent = tmp_path / "notifications.jsonl"
    env = {
        f"AIRFLOW_CONN_{conn_id.upper()}": connection,
        "AIRFLOW__O365MAIL__CREDENTIAL_WATCH": "True",
        # One period for the whole test: each component's watch checks once and must leave the
        # connection alone if the other one checked it.
        "AIRFLOW__O365MAIL__CREDENTIAL_WATCH_INTERVAL_SECONDS": "3600",
        "AIRFLOW__O365MAIL__CREDENTIAL_WATCH_FIRST_CHECK_SECONDS": "4",
        "AIRFLOW__O365MAIL__CREDENTIAL_NOTIFIER": NOTIFIER,
        "AIRFLOW__O365MAIL__CREDENTIAL_NOTIFIER_KWARGS": json.dumps(
            {"path": str(sent), "text": "{{ message }} [{{ o365mail_credential.expires_on }}]"}
        ),
    }
    o365_admin.reset_counters()
    services = start_airflow_services(airflow_db, extra_env=env, components=("api-server",))
    try:
        services.start("scheduler")
        services.start("triggerer")
        for component in ("scheduler", "triggerer"):
            wait_until(
                lambda c=component: "Credential watch pass:" in services.log_text(c),
                timeout=240,
                what=f"a pass of the credential watch in the {component}",
            )
        logs = {c: services.log_text(c) for c in ("scheduler", "triggerer")}
    finally:
        services.stop_all()

    passes = [line for text in logs.values() for line in text.splitlines() if "Credential watch pass:" in line]
    assert len(passes) == 2, passes
    assert sum(f"{conn_id}: keep-alive ok" in line for line in passes) == 1, passes
    assert sum(f"{conn_id}: skipped" in line for line in passes) == 1, passes

    # Counted at the identity provider: one redemption between the two components.
    assert o365_admin.counters().get("token:refresh_token") == 1, o365_admin.counters()
    stored = TokenStore(conn_id).load()
    assert time.time() - stored.refresh_token_used_at < 600, "the keep-alive stored a new 90-day window"
    assert refresh_tokens(conn_id).isdisjoint(aged), "the rotated refresh token is stored"
    state = WatchState.read(MetadataDbVariables(), conn_id)
    assert state.keep_alive.startswith("ok:") and state.checked_at > 0

    # One notification, naming the connection, the credential, its expiry date and the fix.
    (line,) = sent.read_text().splitlines()
    note = json.loads(line)
    assert note["conn_id"] == conn_id and note["credential"]["credential"] == "client secret"
    assert note["credential"]["state"] == "expiring" and note["credential"]["expires_on"] == secret_expires
    text = note["text"]
    assert conn_id in text and "client secret" in text and f"expires on {secret_expires}" in text
    assert "Certificates & secrets" in text and "credential_expires_on" in text
    assert text.endswith(f"[{secret_expires}]"), "the notifier's template was rendered with the warning"

    # No secret in the notification or the components' logs.
    issued = Path(o365_sandbox.state_dir) / "issued-secrets.txt"
    secrets = {o365_sandbox.client_secret, *aged, *refresh_tokens(conn_id)}
    if issued.exists():
        secrets |= {s for s in issued.read_text().splitlines() if s}
    for secret in secrets:
        assert secret not in sent.read_text()
        assert all(secret not in text for text in logs.values())
