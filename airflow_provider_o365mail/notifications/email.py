"""O365EmailNotifier: task and DAG callbacks that send mail through Microsoft 365 with OAuth2."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseNotifier

from airflow_provider_o365mail.connection import DEFAULT_CONN_ID
from airflow_provider_o365mail.core.message_ids import TaskIdentity
from airflow_provider_o365mail.hooks.o365mail import O365MailHook

if TYPE_CHECKING:
    from airflow.sdk import Context

TEMPLATES = Path(__file__).parent / "templates"
DEFAULT_SUBJECT_TEMPLATE = (TEMPLATES / "subject.jinja2").read_text().strip()
DEFAULT_HTML_TEMPLATE = (TEMPLATES / "body.html").read_text()


class O365EmailNotifier(BaseNotifier):
    """Send a notification mail, e.g. ``on_failure_callback=O365EmailNotifier(to="team@contoso.com")``.

    Subject and body default to templates naming the DAG, task, run, state, try and log link; pass
    your own Jinja strings (the task context is available) to override them.

    :param to: recipients (string with ``,``/``;`` or a list). (templated)
    :param conn_id: the ``o365mail`` connection. (templated)
    :param from_email: From address; default the connection's mailbox. (templated)
    :param subject: subject template. (templated)
    :param html_content: HTML body template. (templated)
    :param text_content: optional plain-text alternative. (templated)
    :param files: attachment paths. (templated)
    :param cc: Cc recipients. (templated)
    :param bcc: Bcc recipients. (templated)
    :param custom_headers: extra headers. (templated)
    :param mime_charset: charset of the bodies.
    """

    template_fields = (
        "to",
        "conn_id",
        "from_email",
        "subject",
        "html_content",
        "text_content",
        "files",
        "cc",
        "bcc",
        "custom_headers",
    )

    def __init__(
        self,
        *,
        to: str | Sequence[str],
        conn_id: str = DEFAULT_CONN_ID,
        from_email: str | None = None,
        subject: str | None = None,
        html_content: str | None = None,
        text_content: str | None = None,
        files: Sequence[str] | None = None,
        cc: str | Sequence[str] | None = None,
        bcc: str | Sequence[str] | None = None,
        custom_headers: Mapping[str, Any] | None = None,
        mime_charset: str = "utf-8",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.to = to
        self.conn_id = conn_id
        self.from_email = from_email
        self.subject = DEFAULT_SUBJECT_TEMPLATE if subject is None else subject
        self.html_content = DEFAULT_HTML_TEMPLATE if html_content is None else html_content
        self.text_content = text_content
        self.files = files
        self.cc = cc
        self.bcc = bcc
        self.custom_headers = custom_headers
        self.mime_charset = mime_charset

    def _send(self, context: Context) -> str:
        return O365MailHook(self.conn_id).send_email(
            identity=_identity(context),
            scope=_scope(context),
            to=self.to,
            subject=" ".join(str(self.subject).split()),
            html_content=self.html_content,
            text_content=self.text_content,
            files=self.files,
            cc=self.cc,
            bcc=self.bcc,
            from_email=self.from_email,
            custom_headers=self.custom_headers,
            mime_charset=self.mime_charset,
        )

    def notify(self, context: Context) -> None:
        message_id = self._send(context)
        self.log.info("Notification mail %s sent through connection %s.", message_id, self.conn_id)

    async def async_notify(self, context: Context) -> None:
        # SMTP, the token store and Variable access are blocking: keep them off the triggerer's loop.
        from asgiref.sync import sync_to_async

        message_id = await sync_to_async(self._send)(context)
        self.log.info("Notification mail %s sent through connection %s.", message_id, self.conn_id)


def _identity(context: Context) -> TaskIdentity | None:
    ti = context.get("ti") or context.get("task_instance")
    return TaskIdentity.of(ti) if ti is not None and getattr(ti, "run_id", None) else None


def _scope(context: Context) -> str:
    """One notification per event: the same callback run twice for one try and state sends one message."""
    ti = context.get("ti") or context.get("task_instance")
    state = getattr(ti, "state", None) or context.get("reason") or ""
    return f"notify:{getattr(ti, 'try_number', '')}:{state}"


send_o365_notification = O365EmailNotifier
