"""Sending through the sandbox's Postfix (STARTTLS, XOAUTH2 via Dovecot SASL), read back from Dovecot."""

from __future__ import annotations

import hashlib
import os
import uuid

import pytest

from airflow_provider_o365mail.exceptions import MessageRejectedError, RecipientsRefusedError
from airflow_provider_o365mail.hooks.o365mail import O365MailHook
from airflow_provider_o365mail.operators.smtp import O365SmtpOperator
from airflow_provider_o365mail.testing.mailbox import wait_for_messages, with_subject
from airflow_provider_o365mail.version_compat import AIRFLOW_V_3_3_PLUS

PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d763f8cfc0000003010100"
    "18dd8db00000000049454e44ae426082"
)


def unique(prefix: str) -> str:
    return f"{prefix} {uuid.uuid4().hex[:8]}"


@pytest.fixture
def files(tmp_path):
    report = tmp_path / "Überblick – Q3, final.csv"
    report.write_bytes("région,montant\r\nÎle-de-France,12\n".encode())
    large = tmp_path / "extract.bin"
    large.write_bytes(os.urandom(12 * 1024 * 1024))
    logo = tmp_path / "logo.png"
    logo.write_bytes(PNG)
    return report, large, logo


def test_full_message_arrives_intact_for_to_cc_and_bcc(o365mail_conn, o365_sandbox, files):
    sbx = o365_sandbox
    report, large, logo = files
    subject = unique("Grüße – Bericht ✓")
    message_id = O365MailHook(o365mail_conn).send_email(
        to=f"Zoë Ærø <{sbx.user}>",
        cc=f'"Doe, Blair" <{sbx.second_user}>',
        bcc=sbx.shared_mailbox,
        subject=subject,
        text_content="Plain text: naïve café",
        html_content='<p>HTML: naïve café <img src="cid:logo"></p>',
        files=[report, large],
        inline_images={"logo": logo},
        custom_headers={"X-Report-Id": "Q3-2026"},
    )
    for upn in (sbx.user, sbx.second_user, sbx.shared_mailbox):
        (msg,) = wait_for_messages(sbx, upn, with_subject(subject))
        assert msg["Message-ID"] == message_id
        assert "Bcc" not in msg and sbx.shared_mailbox not in str(msg), "no trace of the Bcc recipient"
        assert msg["To"].addresses[0].display_name == "Zoë Ærø"
        assert msg["Cc"].addresses[0].display_name == "Doe, Blair"
        assert msg["X-Report-Id"] == "Q3-2026"
        assert msg.get_body(("plain",)).get_content().strip() == "Plain text: naïve café"
        assert "naïve café" in msg.get_body(("html",)).get_content()
        images = [p for p in msg.walk() if p["Content-ID"] == "<logo>"]
        assert len(images) == 1 and images[0].get_content() == PNG
        attachments = {a.get_filename(): a.get_payload(decode=True) for a in msg.iter_attachments()}
        assert attachments[report.name] == report.read_bytes()
        assert hashlib.sha256(attachments["extract.bin"]).digest() == hashlib.sha256(large.read_bytes()).digest()


def test_operator_batch_over_one_session_returns_message_ids(o365mail_conn, o365_sandbox, o365_admin):
    sbx = o365_sandbox
    tag = unique("batch")
    o365_admin.reset_counters()
    operator = O365SmtpOperator(
        task_id="send_batch",
        conn_id=o365mail_conn,
        to=sbx.user,
        text_content="default body",
        messages=[{"subject": f"{tag} #{i}"} for i in range(5)]
        + [{"subject": f"{tag} html", "html_content": "<b>x</b>"}],
    )
    ids = operator.execute(context={})
    # One SMTP AUTH for the whole batch: Postfix asks Dovecot, which asks the identity provider.
    assert o365_admin.counters().get("introspect", 0) == 1
    assert len(ids) == 6 and len(set(ids)) == 6
    received = wait_for_messages(sbx, sbx.user, lambda m: str(m["Subject"]).startswith(tag), count=6)
    assert sorted(m["Message-ID"] for m in received) == sorted(ids)


def test_send_as_a_shared_mailbox_and_refusal_without_permission(o365mail_conn, o365_sandbox):
    sbx = o365_sandbox
    hook = O365MailHook(o365mail_conn)
    subject = unique("from shared")
    hook.send_email(to=sbx.user, subject=subject, text_content="x", from_email=f"Team <{sbx.shared_mailbox}>")
    (msg,) = wait_for_messages(sbx, sbx.user, with_subject(subject))
    assert msg["From"].addresses[0].addr_spec == sbx.shared_mailbox
    with pytest.raises(MessageRejectedError, match="refused the sender .*Send As"):
        hook.send_email(to=sbx.user, subject="nope", text_content="x", from_email=sbx.second_user)


def test_unknown_recipient_is_named_and_the_others_get_the_mail(o365mail_conn, o365_sandbox):
    sbx = o365_sandbox
    subject = unique("partial")
    with pytest.raises(RecipientsRefusedError, match=r"nobody@o365\.sandbox\.test .*5\d\d") as err:
        O365MailHook(o365mail_conn).send_email(
            to=[sbx.user, "nobody@o365.sandbox.test"], subject=subject, text_content="x"
        )
    assert list(err.value.refused) == ["nobody@o365.sandbox.test"]
    wait_for_messages(sbx, sbx.user, with_subject(subject))


def test_revoked_consent_mid_dag_fails_the_task_once_with_the_fix(o365mail_conn, o365_sandbox, o365_admin, run_dag):
    sbx = o365_sandbox
    tag = unique("mid-dag")
    result = run_dag(
        "o365_revoked_mid_dag",
        f"""
        from datetime import timedelta
        from airflow.sdk import dag, task
        from airflow_provider_o365mail.operators.smtp import O365SmtpOperator

        @dag(schedule=None)
        def o365_revoked_mid_dag():
            first = O365SmtpOperator(
                task_id="first", conn_id={o365mail_conn!r}, to={sbx.user!r}, subject={tag + " first"!r},
                text_content="sent before the user removed consent",
            )

            @task
            def user_removes_consent_and_an_hour_passes():
                import os
                from airflow_provider_o365mail.testing.sandbox import SandboxInfo
                admin = SandboxInfo.from_env(os.environ).admin()
                admin.revoke_consent(os.environ["O365_SANDBOX_USER"], os.environ["O365_SANDBOX_CLIENT_ID"])
                admin.update_settings(clock_offset=4000)  # the access token has expired at Exchange

            second = O365SmtpOperator(
                task_id="second", conn_id={o365mail_conn!r}, to={sbx.user!r}, subject={tag + " second"!r},
                text_content="never sent", retries=3, retry_delay=timedelta(seconds=1),
            )
            first >> user_removes_consent_and_an_hour_passes() >> second

        o365_revoked_mid_dag()
        """,
        env=sbx.env(),
    )
    states = result.task_states()
    assert states["first"][0] == "success", result.output[-3000:]
    assert states["second"] == ("failed", 1), f"failed at the first try, no retries: {states}"
    assert "AADSTS65001" in result.output
    assert f"airflow o365mail authorize --conn-id {o365mail_conn}" in result.output
    o365_admin.update_settings(clock_offset=0)  # back to now, to read the mailbox
    wait_for_messages(sbx, sbx.user, with_subject(f"{tag} first"))


def test_notifier_and_email_backend_in_real_task_failures(o365mail_conn, o365_sandbox, o365_clean_mailboxes, run_dag):
    sbx = o365_sandbox
    tag = unique("alert")
    result = run_dag(
        "o365_alerts",
        f"""
        from airflow.sdk import dag, task
        from airflow_provider_o365mail.notifications.email import O365EmailNotifier

        @dag(schedule=None)
        def o365_alerts():
            @task(on_failure_callback=O365EmailNotifier(
                to={sbx.user!r}, conn_id={o365mail_conn!r}, custom_headers={{"X-Tag": {tag!r}}}))
            def breaks_with_notifier():
                raise ValueError("disk full on the report volume")

            @task(email={sbx.user!r}, email_on_failure=True, email_on_retry=False)
            def breaks_with_email_backend():
                raise ValueError("legacy email path")

            breaks_with_notifier()
            breaks_with_email_backend()

        o365_alerts()
        """,
        env={
            "AIRFLOW__EMAIL__EMAIL_BACKEND": "airflow_provider_o365mail.utils.email.send_email",
            "AIRFLOW__EMAIL__EMAIL_CONN_ID": o365mail_conn,
        },
    )
    assert result.task_states()["breaks_with_notifier"][0] == "failed", result.output[-3000:]
    (notified,) = wait_for_messages(sbx, sbx.user, lambda m: m["X-Tag"] == tag)
    assert str(notified["Subject"]).startswith("[Airflow] o365_alerts.breaks_with_notifier: failed")
    body = notified.get_body(("html",)).get_content()
    assert "breaks_with_notifier" in body
    if AIRFLOW_V_3_3_PLUS:  # before 3.3, `airflow dags test` (InProcessTestSupervisor) leaves the exception
        # out of the callback context; real workers (task_runner.main) put it there on 3.1 and 3.2 too.
        assert "disk full on the report volume" in body
    (legacy,) = wait_for_messages(
        sbx, sbx.user, lambda m: "task_id='breaks_with_email_backend' dag_id='o365_alerts'" in str(m["Subject"])
    )
    assert str(legacy["Subject"]).startswith("Airflow alert:"), "Airflow's own template, our transport"
    assert legacy["From"].addresses[0].addr_spec == sbx.user, "Airflow's placeholder sender replaced by the mailbox"
    assert "legacy email path" in legacy.get_body(("html",)).get_content()
