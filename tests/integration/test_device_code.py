"""A public client (no secret, no certificate) consents with the device code flow and then refreshes
without a credential: ``authorize --device-code`` as a user runs it, against the stand-in's device code
endpoint and "Enter code" page, and each way the flow can end badly.

The sandbox's delegated app gets "Allow public client flows" for these tests only; the stand-in's
polling interval is 1 s (Microsoft announces 5 s) so that the tests do not wait for nothing.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid

import pytest
from test_cli import CLI, PIPED, stored_connection_extra

from airflow_provider_o365mail.exceptions import ClientCredentialError, ReauthorizationRequired
from airflow_provider_o365mail.hooks.o365mail import O365MailHook
from airflow_provider_o365mail.testing.airflow_services import wait_until
from airflow_provider_o365mail.testing.mailbox import wait_for_messages
from airflow_provider_o365mail.testing.sandbox import GRAPH

CODE_LINE = re.compile(r"open the page (?P<uri>https://\S+) and enter the code (?P<code>[A-Z]+)")


@pytest.fixture
def public_client(o365_sandbox, o365_admin):
    """The sandbox app with public client flows allowed and a 1 s polling interval; restored afterwards."""
    o365_admin.set_public_client(o365_sandbox.client_id, True)
    o365_admin.update_settings(device_code_interval=1, device_code_lifetime=900, device_code_slow_down=0)
    yield o365_sandbox.client_id
    o365_admin.set_public_client(o365_sandbox.client_id, False)
    o365_admin.update_settings(
        device_code_interval=5, device_code_lifetime=900, device_code_slow_down=0, clock_offset=0
    )
    o365_admin.clear_faults()


@pytest.fixture
def public_conn(db_connection, o365_sandbox) -> str:
    """A never-authorized connection without any credential (credential_type public_client)."""
    extra = o365_sandbox.connection_extra(credential_type="public_client")
    del extra["refresh_token"]
    conn_id = f"o365mail_public_{uuid.uuid4().hex[:8]}"
    return db_connection(
        conn_id, json.dumps({"conn_type": "o365mail", "login": o365_sandbox.client_id, "password": "", "extra": extra})
    )


def start_device_authorize(conn_id: str, timeout: float = 120) -> tuple[subprocess.Popen, str, str]:
    """Start ``authorize --device-code``; read up to the line with the URL and the code."""
    process = subprocess.Popen(
        [*CLI, "authorize", "--conn-id", conn_id, "--device-code", "--timeout", str(timeout)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=PIPED,
    )
    seen = []
    process.seen = seen  # type: ignore[attr-defined]
    for line in process.stdout:
        seen.append(line)
        match = CODE_LINE.search(line)
        if match:
            return process, match["uri"], match["code"]
    process.wait(timeout=30)
    raise AssertionError(f"authorize --device-code printed no code (exit {process.returncode}):\n{''.join(seen)}")


def finish(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    """Exit code and the whole output. Read from the same buffered file as the code line: communicate()
    with a timeout reads the raw pipe and loses what that buffer already holds (an error line that came
    right after the code line)."""
    process.wait(timeout=timeout)
    return process.returncode, "".join(process.seen) + process.stdout.read()  # type: ignore[attr-defined]


def test_device_code_consent_then_refreshes_without_a_secret_send_and_receive(
    public_client, public_conn, o365_sandbox, o365_admin
):
    sbx = o365_sandbox
    with pytest.raises(Exception, match="never been authorized"):
        O365MailHook(public_conn).get_access_token()
    earlier = len(o365_admin.device_flows())
    process, uri, code = start_device_authorize(public_conn)
    # A few polls answered authorization_pending first.
    wait_until(lambda: o365_admin.device_flows()[earlier:][0]["polls"] >= 2, 60, "two polls of the new code")
    result = o365_admin.device_sign_in(uri, code, login=sbx.user, password=sbx.user_password)
    assert "You have signed in" in result
    returncode, output = finish(process)
    assert returncode == 0, output
    assert f"Authorized connection {public_conn!r} for {sbx.user}" in output
    flows = [f for f in o365_admin.device_flows() if f["status"] == "redeemed"]
    assert flows and flows[-1]["polls"] >= 2 and flows[-1]["slow_downs"] == 0  # polled, never too soon
    assert stored_connection_extra(public_conn)["refresh_token"]  # stored into the DB connection

    # Refreshes as a public client: the connection has no secret to send, and the stand-in accepts none
    # only because the app allows public client flows.
    o365_admin.reset_counters()
    hook = O365MailHook(public_conn)
    assert hook.access_token(force_refresh=True).source == "identity_provider"
    assert o365_admin.counters().get("token:refresh_token", 0) >= 1
    subject = f"device code {uuid.uuid4().hex[:8]}"
    message_id = hook.send_email(to=sbx.user, subject=subject, text_content="sent by a public client")
    arrived = wait_for_messages(sbx, sbx.user, lambda m: m["Message-ID"] == message_id, timeout=30)
    assert arrived[0]["Subject"] == subject
    with hook.imap_client() as client:
        assert client.select_folder("INBOX")[b"EXISTS"] >= 1

    # Public client flows switched off later: the next refresh names the setting.
    o365_admin.set_public_client(sbx.client_id, False)
    with pytest.raises(ClientCredentialError, match="Allow public client flows") as refused:
        O365MailHook(public_conn).access_token(force_refresh=True)
    assert "AADSTS7000218" in str(refused.value) and "--device-code" not in str(refused.value)


def test_declined_sign_in_fails_with_the_fix(public_client, public_conn, o365_sandbox, o365_admin):
    sbx = o365_sandbox
    process, uri, code = start_device_authorize(public_conn)
    result = o365_admin.device_sign_in(uri, code, login=sbx.user, password=sbx.user_password, decision="cancel")
    assert "declined" in result
    returncode, output = finish(process)
    assert returncode == 1, output
    assert "authorization_declined" in output and "--device-code' again" in output, output
    assert "refresh_token" not in stored_connection_extra(public_conn)


@pytest.mark.parametrize("who", ["client", "identity provider"])
def test_a_code_nobody_enters_expires_and_says_so(public_client, public_conn, o365_admin, who):
    """The client stops at the code's lifetime, or the stand-in answers expired_token (AADSTS70019) first."""
    if who == "client":
        o365_admin.update_settings(device_code_lifetime=4)
    process, _, _ = start_device_authorize(public_conn)
    if who == "identity provider":
        o365_admin.update_settings(clock_offset=1000)  # 16 minutes later on the stand-in's clock
    returncode, output = finish(process, timeout=60)
    assert returncode == 1, output
    assert "expired" in output and "--device-code' again" in output, output


def test_slow_down_makes_the_client_poll_5_s_slower_each_time(public_client, public_conn, o365_sandbox, o365_admin):
    sbx = o365_sandbox
    o365_admin.update_settings(device_code_slow_down=2)
    started = time.monotonic()
    process, uri, code = start_device_authorize(public_conn)
    o365_admin.device_sign_in(uri, code, login=sbx.user, password=sbx.user_password)
    returncode, output = finish(process)
    assert returncode == 0, output
    flow = [f for f in o365_admin.device_flows() if f["status"] == "redeemed"][-1]
    # Only the two asked-for slow_downs: a client that kept its 1 s interval would have polled too soon
    # and been answered slow_down again.
    assert flow["slow_downs"] == 2 and flow["interval"] == 11 and flow["polls"] >= 3
    assert time.monotonic() - started >= 6 + 11


def test_failing_polls_are_retried_and_the_sign_in_still_lands(public_client, public_conn, o365_sandbox, o365_admin):
    sbx = o365_sandbox
    process, uri, code = start_device_authorize(public_conn)
    o365_admin.add_fault(status=503, count=2)  # the next two polls
    o365_admin.device_sign_in(uri, code, login=sbx.user, password=sbx.user_password)
    returncode, output = finish(process)
    assert returncode == 0, output
    assert "Traceback" not in output
    assert o365_admin.state()["faults"] == []  # both failures were met by polls


def test_public_client_flows_off_names_the_app_setting(public_client, public_conn, o365_sandbox, o365_admin):
    o365_admin.set_public_client(o365_sandbox.client_id, False)
    process, _, _ = start_device_authorize(public_conn)
    returncode, output = finish(process)
    assert returncode == 1, output
    assert "AADSTS7000218" in output and "Allow public client flows" in output, output


def test_a_secret_on_a_public_client_connection_is_refused_before_any_request(o365_sandbox, monkeypatch):
    conn_id = f"o365mail_pub_{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", o365_sandbox.connection_json(credential_type="public_client"))
    with pytest.raises(Exception, match="public_client but the connection also has a client secret"):
        O365MailHook(conn_id).get_access_token()


@pytest.mark.parametrize(
    ("transport", "graph_consent", "returncode"), [("graph", False, 1), ("auto", False, 0), ("graph", True, 0)]
)
def test_device_code_for_a_graph_connection_consents_exchange_and_checks_graph(
    public_client, db_connection, o365_sandbox, o365_admin, transport, graph_consent, returncode
):
    """A device code carries one resource: it asks Exchange's scopes; Graph then works only with a consent
    given otherwise (here: as an administrator's), and without one the command names the fix."""
    sbx = o365_sandbox
    extra = sbx.connection_extra(credential_type="public_client", transport=transport, graph_url=sbx.graph_url)
    del extra["refresh_token"]
    conn_id = db_connection(
        f"o365mail_public_{transport}_{uuid.uuid4().hex[:8]}",
        json.dumps({"conn_type": "o365mail", "login": sbx.client_id, "password": "", "extra": extra}),
    )
    o365_admin.revoke_consent(sbx.user, sbx.client_id, resource=GRAPH)
    if graph_consent:
        o365_admin.consent(sbx.user, sbx.client_id, f"{GRAPH}/Mail.Send {GRAPH}/Mail.ReadWrite")
    process, uri, code = start_device_authorize(conn_id)
    o365_admin.device_sign_in(uri, code, login=sbx.user, password=sbx.user_password)
    rc, output = finish(process)
    assert rc == returncode, output
    assert f"Authorized connection {conn_id!r} for {sbx.user}" in output, output
    assert stored_connection_extra(conn_id)["refresh_token"], "the Exchange consent is stored either way"
    hook = O365MailHook(conn_id)
    with hook.smtp_client() as client:
        assert client.noop()[0] == 250
    if graph_consent:
        assert "the same grant yields a Graph token" in output, output
        assert hook.graph_access_token(force_refresh=True).token
    else:
        assert "covers Exchange (SMTP and IMAP) only" in output and "AADSTS65001" in output, output
        assert "admin consent" in output and f"authorize --conn-id {conn_id}'" in output, output
        assert ("Error: " in output) == (transport == "graph") and ("Warning: " in output) == (transport == "auto")
        with pytest.raises(ReauthorizationRequired):
            hook.graph_access_token(force_refresh=True)
