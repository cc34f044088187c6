"""Token requests, IMAP (hook, sensor, IDLE) and SMTP through a real CONNECT proxy, against the sandbox.

Every test records each TCP connection the test process opens (``ConnectionRecorder``): with a
proxy configured, none goes to the identity provider or a mail server directly, and the proxy
counted a tunnel for each. TLS runs through the tunnel to the server: the proxy sees a TLS
handshake and never the token.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import time
import uuid

import pytest

from airflow_provider_o365mail.auth.tokens import TokenManager
from airflow_provider_o365mail.exceptions import (
    IdentityProviderUnavailable,
    MailServerError,
    ProxyRefused,
    ProxyUnavailable,
)
from airflow_provider_o365mail.hooks.o365mail import O365MailHook
from airflow_provider_o365mail.imap.idle import wait_for_new_mail
from airflow_provider_o365mail.sensors.imap import O365ImapSensor
from airflow_provider_o365mail.testing.connect_proxy import ConnectionRecorder, ConnectProxy
from airflow_provider_o365mail.testing.fake_smtp import FakeSmtpServer, SmtpScript
from airflow_provider_o365mail.testing.tls import make_untrusted_certificate

PROXY_PASSWORD = "pr0xy-S3cret/with:chars"


def set_conn(monkeypatch, conn_id: str, **extra) -> None:
    """Change the extras of the test's connection (its fresh refresh token stays)."""
    name = f"AIRFLOW_CONN_{conn_id.upper()}"
    conn = json.loads(os.environ[name])
    conn["extra"].update(extra)
    monkeypatch.setenv(name, json.dumps(conn))


@pytest.fixture(autouse=True)
def no_proxy_environment(monkeypatch):
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def proxy():
    with ConnectProxy() as running:
        yield running


@pytest.fixture
def auth_proxy():
    with ConnectProxy(username="airflow-svc", password=PROXY_PASSWORD) as running:
        yield running


def targets(sbx) -> dict[str, str]:
    return {
        "idp": f"127.0.0.1:{sbx.idp_port}",
        "imap": f"127.0.0.1:{sbx.imap_port}",
        "smtp": f"127.0.0.1:{sbx.smtp_port}",
    }


def assert_nothing_direct(seen: ConnectionRecorder, sbx) -> None:
    direct = [c for c in seen.connects if c[1] in (sbx.idp_port, sbx.imap_port, sbx.smtp_port)]
    assert direct == [], f"connections that bypassed the proxy: {direct}"


def unique(prefix: str) -> str:
    return f"{prefix} {uuid.uuid4().hex[:10]}"


def test_token_imap_smtp_and_sensor_all_go_through_the_proxy(o365mail_conn, o365_sandbox, proxy, monkeypatch):
    sbx, where = o365_sandbox, targets(o365_sandbox)
    set_conn(monkeypatch, o365mail_conn, proxy=proxy.url)
    subject = unique("through the proxy")
    with ConnectionRecorder().active() as seen:
        hook = O365MailHook(o365mail_conn)
        token = hook.access_token()
        assert token.source == "identity_provider"
        with hook.imap_client() as client:
            assert client.list_folders(directory="", pattern="INBOX")
        hook.send_email(to=sbx.user, subject=subject, text_content="tunnelled")
        sensor = O365ImapSensor(task_id="wait_proxied", conn_id=o365mail_conn, subject=subject)
        deadline, result = time.monotonic() + 20, False
        while not result and time.monotonic() < deadline:
            result = sensor.poke({})
            time.sleep(0.3)
    assert result and result.xcom_value[0]["subject"] == subject
    assert_nothing_direct(seen, sbx)
    assert proxy.port in seen.ports()
    assert proxy.count(where["idp"]) >= 1 and proxy.count(where["imap"]) >= 2 and proxy.count(where["smtp"]) >= 1
    # TLS end to end: each IMAP tunnel starts with a TLS handshake; the token never crosses in clear.
    xoauth2 = base64.b64encode(f"user={sbx.user}\x01auth=Bearer {token.token}\x01\x01".encode())
    for record in proxy.tunnels():
        assert token.token.encode() not in record.client_bytes and xoauth2 not in record.client_bytes
        if record.target in (where["imap"], where["idp"]):
            assert record.client_bytes[:1] == b"\x16", record.target  # TLS handshake record
        else:  # SMTP: EHLO and STARTTLS in clear, then TLS; never AUTH before it
            clear = bytes(record.client_bytes).split(b"STARTTLS\r\n", 1)
            assert len(clear) == 2 and b"AUTH" not in clear[0]
            assert clear[1][:1] == b"\x16"


def test_idle_for_the_deferrable_sensor_goes_through_the_proxy(o365mail_conn, o365_sandbox, proxy, monkeypatch):
    sbx, where = o365_sandbox, targets(o365_sandbox)
    set_conn(monkeypatch, o365mail_conn, proxy=proxy.url)
    hook = O365MailHook(o365mail_conn)
    token = hook.access_token()
    with ConnectionRecorder().active() as seen:
        # A UIDNEXT the folder cannot have: the wait ends as soon as the IDLE session selected it.
        why = asyncio.run(wait_for_new_mail(hook.imap_endpoint(), "INBOX", token, known_uidnext=10**9))
    assert why == "changed"
    assert_nothing_direct(seen, sbx)
    assert proxy.count(where["imap"]) == 1 and proxy.tunnels()[-1].client_bytes[:1] == b"\x16"


def test_https_proxy_is_followed_for_tokens_and_no_proxy_bypasses_it(o365mail_conn, o365_sandbox, proxy, monkeypatch):
    sbx, where = o365_sandbox, targets(o365_sandbox)
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    with ConnectionRecorder().active() as seen:
        hook = O365MailHook(o365mail_conn)
        assert hook.access_token().source == "identity_provider"
        with hook.imap_client():
            pass  # mail follows the connection's proxy field only: direct here
    assert proxy.targets() == [where["idp"]]
    assert sbx.idp_port not in seen.ports() and sbx.imap_port in seen.ports()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with ConnectionRecorder().active() as seen:
        assert O365MailHook(o365mail_conn).access_token(force_refresh=True).source == "identity_provider"
    assert proxy.targets() == [where["idp"]], "NO_PROXY must bypass the proxy"
    assert sbx.idp_port in seen.ports()


def test_the_connections_proxy_wins_over_https_proxy(o365mail_conn, o365_sandbox, proxy, monkeypatch):
    with ConnectProxy(refuse={"*": 403}) as env_proxy:
        monkeypatch.setenv("HTTPS_PROXY", env_proxy.url)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # the field wins over NO_PROXY too
        set_conn(monkeypatch, o365mail_conn, proxy=proxy.url)
        assert O365MailHook(o365mail_conn).access_token().source == "identity_provider"
    assert env_proxy.records == []
    assert proxy.targets() == [targets(o365_sandbox)["idp"]]


def test_authenticating_proxy_works_and_its_password_is_never_logged(
    o365mail_conn, o365_sandbox, auth_proxy, monkeypatch, caplog
):
    sbx, where = o365_sandbox, targets(o365_sandbox)
    set_conn(monkeypatch, o365mail_conn, proxy=auth_proxy.url)
    caplog.set_level(logging.DEBUG)
    with ConnectionRecorder().active() as seen:
        hook = O365MailHook(o365mail_conn)
        hook.access_token()
        ok, message = hook.test_connection()
    assert ok, message
    assert_nothing_direct(seen, sbx)
    assert {where["idp"], where["imap"], where["smtp"]} <= set(auth_proxy.targets())
    assert auth_proxy.tunnels(status=407) == []
    basic = base64.b64encode(f"airflow-svc:{PROXY_PASSWORD}".encode()).decode()
    logged = "\n".join(r.getMessage() for r in caplog.records) + repr(hook.settings) + str(hook.settings.http_proxy)
    for secret in (PROXY_PASSWORD, basic, auth_proxy.url):
        assert secret not in logged
    from airflow.sdk._shared.secrets_masker import redact

    assert PROXY_PASSWORD not in redact(f"proxy at {auth_proxy.url}")


@pytest.mark.parametrize("given", [None, ("airflow-svc", "wrong")], ids=["no credentials", "wrong password"])
def test_a_407_names_the_proxy_not_the_identity_provider(o365mail_conn, o365_sandbox, auth_proxy, monkeypatch, given):
    url = auth_proxy.url_with(*given) if given else f"http://127.0.0.1:{auth_proxy.port}"
    set_conn(monkeypatch, o365mail_conn, proxy=url)
    sleeps: list[float] = []
    manager = TokenManager(O365MailHook(o365mail_conn).settings, sleep=sleeps.append)
    with pytest.raises(ProxyRefused) as caught:
        manager.get()
    message = str(caught.value)
    assert caught.value.status == 407 and f"The proxy http://127.0.0.1:{auth_proxy.port} refused" in message
    assert f"tunnel to 127.0.0.1:{o365_sandbox.idp_port}" in message and "proxy URL" in message
    assert "wrong" not in message and sleeps == [], "a refusal is permanent: no retries"


def test_imap_and_smtp_refused_by_the_proxys_policy(o365mail_conn, o365_sandbox, monkeypatch):
    where = targets(o365_sandbox)
    with ConnectProxy(refuse={where["imap"]: 403, where["smtp"]: 403}) as proxy:
        set_conn(monkeypatch, o365mail_conn, proxy=proxy.url)
        hook = O365MailHook(o365mail_conn)
        with pytest.raises(ProxyRefused, match=rf"proxy http://127.0.0.1:{proxy.port} refused .* {where['imap']}: 403"):
            hook.imap_login()
        with pytest.raises(ProxyRefused, match=rf"proxy http://127.0.0.1:{proxy.port} refused .* {where['smtp']}: 403"):
            hook.smtp_login()
        ok, message = hook.test_connection()
        assert not ok and message.startswith("IMAP step failed: The proxy") and "rules do not allow" in message
        with pytest.raises(ProxyRefused):
            O365ImapSensor(task_id="refused", conn_id=o365mail_conn, subject="x").poke({})
    assert proxy.count(where["idp"]) == 1  # the token went through; the mail servers were refused


def test_an_unreachable_proxy_is_named_and_transient(o365mail_conn, o365_sandbox, monkeypatch):
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]  # closed below: nothing listens there
    O365MailHook(o365mail_conn).access_token()  # a warm store: IMAP's token needs no request
    set_conn(monkeypatch, o365mail_conn, proxy=f"http://127.0.0.1:{port}")
    hook = O365MailHook(o365mail_conn)
    with pytest.raises(ProxyUnavailable, match=f"Cannot reach the proxy http://127.0.0.1:{port}"):
        hook.imap_login()
    sleeps: list[float] = []
    with pytest.raises(IdentityProviderUnavailable, match=f"cannot reach the proxy http://127.0.0.1:{port}"):
        TokenManager(hook.settings, sleep=sleeps.append).get(force_refresh=True)
    assert len(sleeps) == 3, "an unreachable proxy is retried like a network error"


def test_through_the_proxy_the_mail_servers_certificate_is_checked_before_any_credential(
    o365mail_conn, o365_sandbox, proxy, monkeypatch, tmp_path
):
    untrusted = make_untrusted_certificate(tmp_path)
    with FakeSmtpServer(SmtpScript(cert_file=untrusted.cert_file, key_file=untrusted.key_file)) as server:
        set_conn(monkeypatch, o365mail_conn, proxy=proxy.url, smtp_port=server.port)
        hook = O365MailHook(o365mail_conn)
        hook.access_token()
        with pytest.raises(MailServerError, match=rf"TLS certificate of 127.0.0.1:{server.port} failed verification"):
            hook.smtp_login()
    assert proxy.count(f"127.0.0.1:{server.port}") >= 1
    assert all(session.auth_commands == 0 for session in server.sessions)


def test_doctor_names_a_refusing_proxy_as_the_broken_link(o365mail_conn, o365_sandbox, auth_proxy, monkeypatch):
    from airflow_provider_o365mail.hooks.doctor import diagnose

    set_conn(monkeypatch, o365mail_conn, proxy=f"http://127.0.0.1:{auth_proxy.port}")  # no credentials
    checks = diagnose(o365mail_conn)
    (failed,) = [c for c in checks if c.status == "fail"]
    assert failed.link == "proxy" and "407" in failed.detail and f"127.0.0.1:{o365_sandbox.idp_port}" in failed.detail
    assert [c.status for c in checks[checks.index(failed) + 1 :]] == ["skip"] * 3


def test_a_proxy_refusal_reaches_every_deferred_sensor_with_its_class(o365mail_conn, o365_sandbox, monkeypatch):
    """Two deferred sensors share one IDLE loop; when the proxy starts refusing, both fail fast with
    ``ProxyRefused`` (status and proxy kept) after the event crossed to the worker as JSON. Before: the
    hub rebuilt the error as ``ProxyRefused(*args)`` (a TypeError, retried forever) and the worker
    rebuilt it by class name without its fields (a TypeError too)."""
    from airflow_provider_o365mail.triggers.imap import O365ImapTrigger

    where = targets(o365_sandbox)
    with ConnectProxy() as proxy:
        set_conn(monkeypatch, o365mail_conn, proxy=proxy.url)
        sensors = [
            O365ImapSensor(task_id=f"refused_{i}", conn_id=o365mail_conn, subject=unique("never sent"), deferrable=True)
            for i in range(2)
        ]
        triggers = [
            O365ImapTrigger(conn_id=o365mail_conn, spec=s.watch_spec().to_dict(), poll_interval=5, max_idle=4)
            for s in sensors
        ]

        async def first_event(trigger):
            async for event in trigger.run():
                return event.payload
            raise AssertionError("the trigger ended without an event")

        async def scenario():
            runs = [asyncio.ensure_future(first_event(t)) for t in triggers]
            deadline = time.monotonic() + 60
            while proxy.count(where["imap"]) < 2:  # a pooled check session and the shared IDLE are up
                assert time.monotonic() < deadline, proxy.targets()
                await asyncio.sleep(0.2)
            proxy.refuse[where["imap"]] = 403  # the IDLE renewal (max_idle=4 s) now gets a 403
            return await asyncio.wait_for(asyncio.gather(*runs), 90)

        events = asyncio.run(scenario())
    assert proxy.count(where["imap"], status=403) >= 1
    for sensor, event in zip(sensors, events, strict=True):
        over_the_wire = json.loads(json.dumps(event))  # what the triggerer stores and the worker reads
        assert over_the_wire["status"] == "error", over_the_wire
        with pytest.raises(ProxyRefused) as caught:
            sensor.execute_complete({}, over_the_wire)
        assert caught.value.status == 403 and caught.value.proxy == f"http://127.0.0.1:{proxy.port}"
        assert "403" in str(caught.value)
