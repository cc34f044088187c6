"""An ``[email] email_backend`` that sends Airflow's own mails through Microsoft 365 with OAuth2.

Configure::

    [email]
    email_backend = airflow_provider_o365mail.utils.email.send_email
    email_conn_id = o365mail_default

Airflow calls ``backend(to, subject, html_content, conn_id=..., from_email=...)``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

from airflow_provider_o365mail.connection import DEFAULT_CONN_ID
from airflow_provider_o365mail.core.message_ids import TaskIdentity
from airflow_provider_o365mail.hooks.o365mail import O365MailHook

# Airflow's default [email] email_conn_id: an SMTP connection, never ours.
AIRFLOW_DEFAULT_EMAIL_CONN_ID = "smtp_default"
# What Airflow passes as from_email when [email] from_email is unset: not a mailbox anyone owns.
AIRFLOW_PLACEHOLDER_FROM_EMAIL = "airflow@airflow"


def send_email(
    to: str | Iterable[str],
    subject: str,
    html_content: str,
    files: Iterable[str] | None = None,
    dryrun: bool = False,
    cc: str | Iterable[str] | None = None,
    bcc: str | Iterable[str] | None = None,
    mime_subtype: str = "mixed",
    mime_charset: str = "utf-8",
    conn_id: str | None = None,
    from_email: str | None = None,
    custom_headers: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> str | None:
    """Send an e-mail with the ``o365mail`` connection ``conn_id``; returns the Message-ID.

    ``conn_id`` None or Airflow's default ``smtp_default`` means ``o365mail_default``. ``from_email``
    None or Airflow's placeholder ``airflow@airflow`` means the connection's mailbox.
    ``mime_subtype`` is accepted for signature compatibility (the structure follows the content).
    ``dryrun`` builds the message and checks the connection's settings without sending.
    """
    if conn_id in (None, "", AIRFLOW_DEFAULT_EMAIL_CONN_ID):
        conn_id = DEFAULT_CONN_ID
    if from_email in (None, "", AIRFLOW_PLACEHOLDER_FROM_EMAIL):
        from_email = None
    hook = O365MailHook(conn_id)
    identity, scope = _current_task(subject)
    spec = {
        "to": to,
        "subject": subject,
        "html_content": html_content,
        "files": files,
        "cc": cc,
        "bcc": bcc,
        "from_email": from_email,
        "custom_headers": custom_headers,
        "mime_charset": mime_charset,
    }
    (planned,) = hook.plan([spec], identity, scope=scope)
    if dryrun:
        message = planned.build()
        hook.log.info("Dry run: built %s for %d recipient(s); not sent.", message.message_id, len(message.recipients))
        return None
    return hook.send_messages([planned])[0].message_id


def _current_task(subject: str) -> tuple[TaskIdentity | None, str]:
    """The running task instance, if any, and a scope naming this alert (try and subject).

    Airflow sends a retry alert and a failure alert per try: each is its own message, but the same
    alert sent twice for one try gets one Message-ID.
    """
    try:
        from airflow.sdk import get_current_context

        ti = get_current_context().get("ti")
    except Exception:  # not inside a task (scheduler callbacks, CLI): a random Message-ID
        return None, ""
    if ti is None:
        return None, ""
    digest = hashlib.sha256(str(subject).encode()).hexdigest()[:12]
    return TaskIdentity.of(ti), f"email:{getattr(ti, 'try_number', '')}:{digest}"
