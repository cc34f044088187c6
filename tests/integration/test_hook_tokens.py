"""O365MailHook and the token lifecycle against the sandbox: store, rotation, errors, concurrency."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import msal
import pytest

from airflow_provider_o365mail import exceptions as exc
from airflow_provider_o365mail.auth.store import TokenStore
from airflow_provider_o365mail.auth.tokens import TokenManager
from airflow_provider_o365mail.hooks.o365mail import O365MailHook


def run_python(code: str, timeout: float = 120) -> dict:
    """Run ``code`` in a fresh interpreter (a fresh 'worker'); it prints one JSON line last."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def token_in_process(conn_id: str, force: bool = False) -> dict:
    return run_python(f"""
        import json, hashlib
        from airflow_provider_o365mail.hooks.o365mail import O365MailHook
        t = O365MailHook({conn_id!r}).access_token(force_refresh={force})
        print(json.dumps({{"source": t.source, "sha": hashlib.sha256(t.token.encode()).hexdigest()}}))
    """)


def stored_refresh_tokens(conn_id: str) -> set[str]:
    stored = TokenStore(conn_id).load()
    cache = msal.SerializableTokenCache()
    cache.deserialize(stored.msal_cache)
    return {rt["secret"] for rt in cache.search(msal.TokenCache.CredentialType.REFRESH_TOKEN)}


def token_requests(admin) -> int:
    counters = admin.counters()
    return sum(v for k, v in counters.items() if k.startswith("token:"))


def test_warm_store_answers_without_the_identity_provider(o365mail_conn, o365_admin):
    first = O365MailHook(o365mail_conn).access_token()
    assert first.source == "identity_provider"
    o365_admin.reset_counters()
    for _ in range(5):
        again = O365MailHook(o365mail_conn).access_token()  # fresh hook instances
        assert again.source == "store" and again.token == first.token
    assert token_in_process(o365mail_conn)["source"] == "store"  # a fresh process too
    assert o365_admin.counters() == {}, "a warm store must not call the identity provider at all"


def test_warm_store_answers_graph_tokens_without_the_identity_provider(o365mail_conn, o365_admin):
    """The identity platform answers a Graph token's scope unqualified ("Mail.Send", not
    "https://graph.microsoft.com/Mail.Send"): the store must still find it, or every Graph request refreshes."""
    first = O365MailHook(o365mail_conn).graph_access_token()
    assert first.source == "identity_provider"
    exchange = O365MailHook(o365mail_conn).access_token()  # both resources' tokens in one store
    o365_admin.reset_counters()
    for _ in range(3):
        again = O365MailHook(o365mail_conn).graph_access_token()  # fresh hook instances
        assert again.source == "store" and again.token == first.token
        assert O365MailHook(o365mail_conn).access_token().token == exchange.token
    assert o365_admin.counters() == {}, "a warm store must not call the identity provider for Graph either"


def test_rotation_is_persisted_across_processes_in_strict_mode(o365mail_conn, o365_admin, o365_sandbox):
    o365_admin.update_settings(strict_rotation=True)
    seed = json.loads(os.environ[f"AIRFLOW_CONN_{o365mail_conn.upper()}"])["extra"]["refresh_token"]
    assert token_in_process(o365mail_conn, force=True)["source"] == "identity_provider"
    after_first = stored_refresh_tokens(o365mail_conn)
    assert after_first and seed not in after_first, "the rotated refresh token must replace the seed in the store"
    # A second 'worker' refreshes again: had it reused the seed, strict rotation would revoke the grant.
    assert token_in_process(o365mail_conn, force=True)["source"] == "identity_provider"
    after_second = stored_refresh_tokens(o365mail_conn)
    assert after_second.isdisjoint(after_first)
    assert O365MailHook(o365mail_conn).access_token(force_refresh=True).source == "identity_provider"


def test_twenty_concurrent_processes_in_strict_mode(o365mail_conn, o365_admin):
    o365_admin.update_settings(strict_rotation=True)
    o365_admin.reset_counters()
    code = textwrap.dedent(f"""
        import json
        from airflow_provider_o365mail.hooks.o365mail import O365MailHook
        print(json.dumps({{"source": O365MailHook({o365mail_conn!r}).access_token().source}}))
    """)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ.copy(),
        )
        for _ in range(20)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1])["source"])
    assert results.count("identity_provider") == 1 and results.count("store") == 19
    assert o365_admin.counters().get("token:refresh_token") == 1
    # The grant is intact: strict rotation saw no reuse.
    assert O365MailHook(o365mail_conn).access_token(force_refresh=True).source == "identity_provider"


def test_store_survives_a_worker_restart(o365mail_conn):
    first = token_in_process(o365mail_conn)
    second = token_in_process(o365mail_conn)
    assert first["source"] == "identity_provider" and second == {**first, "source": "store"}


def test_reauthorized_connection_reseeds_the_store(o365mail_conn, o365_admin, o365_sandbox, monkeypatch):

    O365MailHook(o365mail_conn).get_access_token()
    o365_admin.revoke_consent(o365_sandbox.user, o365_sandbox.client_id)
    with pytest.raises(exc.ConsentRevoked):
        O365MailHook(o365mail_conn).get_access_token(force_refresh=True)
    new_rt = o365_sandbox.new_refresh_token()
    monkeypatch.setenv(f"AIRFLOW_CONN_{o365mail_conn.upper()}", o365_sandbox.connection_json(refresh_token=new_rt))
    assert O365MailHook(o365mail_conn).access_token(force_refresh=True).source == "identity_provider"


@pytest.mark.parametrize(
    ("break_it", "expected", "words"),
    [
        (lambda a, s: a.revoke_consent(s.user, s.client_id), exc.ConsentRevoked, "AADSTS65001"),
        (lambda a, s: a.expire_refresh_tokens(s.user), exc.RefreshTokenExpired, "AADSTS700082"),
        (lambda a, s: a.revoke_sessions(s.user), exc.GrantRevoked, "AADSTS50173"),
        (lambda a, s: a.update_user(s.user, mfa_required=True), exc.InteractionRequired, "AADSTS50076"),
        # Conditional Access re-authentication: sign-in frequency (the consent's sign-in is an hour old, the
        # policy allows 30 minutes), MFA that expired, MFA registration, and a policy that blocks the app.
        (
            lambda a, s: (a.update_user(s.user, sign_in_frequency=1800), a.update_settings(clock_offset=3600)),
            exc.InteractionRequired,
            "AADSTS70043",
        ),
        (
            lambda a, s: (
                a.update_user(s.user, mfa_required=True, mfa_required_since=0, mfa_max_age=1800),
                a.update_settings(clock_offset=3600),
            ),
            exc.InteractionRequired,
            "AADSTS50078",
        ),
        (lambda a, s: a.update_user(s.user, mfa_registration_required=True), exc.InteractionRequired, "AADSTS50079"),
        (lambda a, s: a.update_user(s.user, blocked_by_conditional_access=True), exc.AccessBlocked, "AADSTS53003"),
    ],
    ids=[
        "consent-revoked",
        "refresh-token-expired",
        "sessions-revoked",
        "mfa-required",
        "sign-in-frequency",
        "mfa-expired",
        "mfa-registration",
        "ca-blocked",
    ],
)
def test_permanent_failures_have_their_own_error(o365mail_conn, o365_admin, o365_sandbox, break_it, expected, words):
    break_it(o365_admin, o365_sandbox)
    o365_admin.reset_counters()
    with pytest.raises(expected) as err:
        O365MailHook(o365mail_conn).get_access_token()
    message = str(err.value)
    assert words in message and f"airflow o365mail authorize --conn-id {o365mail_conn}" in message
    assert o365_admin.counters().get("token:refresh_token") == 1, "permanent failures are not retried"


def test_bad_client_secret(o365mail_conn, o365_sandbox, monkeypatch):
    conn = json.loads(os.environ[f"AIRFLOW_CONN_{o365mail_conn.upper()}"])
    conn["password"] = "sbx~wrong"
    monkeypatch.setenv(f"AIRFLOW_CONN_{o365mail_conn.upper()}", json.dumps(conn))
    with pytest.raises(exc.ClientCredentialError, match="AADSTS7000215.*Certificates & secrets") as err:
        O365MailHook(o365mail_conn).get_access_token()
    assert "sbx~wrong" not in str(err.value)


def test_transient_errors_are_retried_with_backoff_and_retry_after(o365mail_conn, o365_admin):
    o365_admin.add_fault(status=503, count=1)
    o365_admin.add_fault(status=429, count=1, retry_after=3)
    o365_admin.reset_counters()
    slept: list[float] = []
    hook = O365MailHook(o365mail_conn)
    manager = TokenManager(hook.settings, sleep=slept.append)
    assert manager.get().source == "identity_provider"
    assert o365_admin.counters()["token:refresh_token"] == 3
    assert len(slept) == 2 and 0.5 <= slept[0] <= 1.5 and slept[1] == 3.0


def test_persistent_outage_gives_up_with_a_transient_error(o365mail_conn, o365_admin):
    o365_admin.add_fault(status=503, count=10)
    slept: list[float] = []
    manager = TokenManager(O365MailHook(o365mail_conn).settings, sleep=slept.append)
    with pytest.raises(exc.IdentityProviderUnavailable, match="failed 4 times") as err:
        manager.get()
    assert not isinstance(err.value, exc.AuthorizationError)
    assert len(slept) == 3 and slept == sorted(slept)


def test_undecryptable_store_falls_back_to_the_connection_refresh_token(o365mail_conn, caplog):
    """#15: a store no key opens (key rotated, old key removed) is not fatal: warn, use the connection's RT."""
    from airflow.models.variable import Variable

    O365MailHook(o365mail_conn).get_access_token()
    key = TokenStore(o365mail_conn).key
    Variable.set(key, "gAAAAABgarbage")
    with caplog.at_level("WARNING"):
        assert O365MailHook(o365mail_conn).access_token().source == "identity_provider"
    assert "cannot be decrypted" in caplog.text and "rotate-keys" in caplog.text
    assert Variable.get(key) != "gAAAAABgarbage", "the store is rewritten under the current key"
    assert O365MailHook(o365mail_conn).access_token().source == "store"


def test_client_credentials_connection(o365_sandbox, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_O365MAIL_APP_TEST", o365_sandbox.app_connection_json())
    hook = O365MailHook("o365mail_app_test")
    assert hook.access_token().source == "identity_provider"
    assert O365MailHook("o365mail_app_test").access_token().source == "store"
    assert hook.test_connection()[0] is True


def test_test_connection_names_the_failing_step(o365mail_conn, o365_admin, o365_sandbox):
    ok, message = O365MailHook(o365mail_conn).test_connection()
    assert ok, message
    o365_admin.update_user(o365_sandbox.user, smtp_auth_enabled=False)
    ok, message = O365MailHook(o365mail_conn).test_connection()
    assert not ok and message.startswith("SMTP step failed") and "5.7.139" in message


def test_hook_inside_a_real_task_uses_task_sdk_variables(o365mail_conn, run_dag):
    """`airflow dags test` runs the task through the Task SDK: the store is written via the supervisor."""
    result = run_dag(
        "o365_token_probe",
        f"""
        from airflow.sdk import dag, task

        @dag(schedule=None)
        def o365_token_probe():
            @task
            def probe():
                from airflow_provider_o365mail import runtime
                from airflow_provider_o365mail.hooks.o365mail import O365MailHook
                assert runtime.in_task_runtime(), "expected the Task SDK runtime"
                token = O365MailHook({o365mail_conn!r}).access_token()
                return token.source

            probe()

        o365_token_probe()
    """,
    )
    assert result.returncode == 0 and "success" in result.output.lower(), result.output[-3000:]
    assert TokenStore(o365mail_conn).load() is not None, "the task wrote the store through the Task SDK"
    assert O365MailHook(o365mail_conn).access_token().source == "store"
