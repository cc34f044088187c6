"""O365SendMailOperator: send one message or a batch as a Microsoft 365 mailbox (SMTP or Microsoft Graph)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from airflow_provider_o365mail.connection import DEFAULT_CONN_ID
from airflow_provider_o365mail.core.message_ids import TaskIdentity
from airflow_provider_o365mail.exceptions import MessageCompositionError
from airflow_provider_o365mail.hooks.o365mail import O365MailHook

if TYPE_CHECKING:
    from airflow.sdk import Context

# Fields one message may set; ``messages`` entries use the same names.
MESSAGE_FIELDS = (
    "to",
    "cc",
    "bcc",
    "subject",
    "html_content",
    "text_content",
    "files",
    "inline_images",
    "reply_to",
    "from_email",
    "custom_headers",
    "message_id",
    "mime_charset",
)


class O365SendMailOperator(BaseOperator):
    """Send mail as the connection's mailbox (or a mailbox it may send as), through the connection's
    ``transport``: SMTP XOAUTH2, Microsoft Graph, or SMTP then Graph when SMTP AUTH is disabled (``auto``).

    One message from the operator's fields, or several with ``messages`` (over one SMTP session, or
    one Graph request each; each entry a dict of the same fields; missing ones come from the
    operator's fields). ``O365SmtpOperator`` is the same operator under its former name.

    :param conn_id: the ``o365mail`` connection.
    :param to: recipients: ``"a@x, B <b@y>"``, ``"a@x; b@y"`` or a list. (templated)
    :param cc: Cc recipients. (templated)
    :param bcc: Bcc recipients; they receive the message, no header names them. (templated)
    :param subject: subject line. (templated)
    :param html_content: HTML body, or a path ending in ``.html`` rendered as a template. (templated)
    :param text_content: plain-text body; with ``html_content`` the message is multipart/alternative. (templated)
    :param files: attachment paths (or ObjectStoragePath). (templated)
    :param inline_images: ``{content_id: path}`` for ``<img src="cid:content_id">`` in the HTML. (templated)
    :param reply_to: Reply-To addresses. (templated)
    :param from_email: From address; default the connection's mailbox. Another address needs Send As
        permission on it (shared mailbox). (templated)
    :param custom_headers: extra headers ``{name: value}``. (templated)
    :param message_id: your own Message-ID (``<id@domain>``); default one derived from the task instance
        and the message's position in the batch, the same on every try. (templated)
    :param mime_charset: charset of the bodies (default utf-8).
    :param messages: a list of message dicts sent over one session; the operator then returns a list. (templated)
    :param fail_on_refused_recipients: fail the task (without retries: the others already got the mail)
        when the server refuses a recipient permanently. False: log a warning and go on.
    :param max_send_attempts: attempts per message for temporary SMTP failures (4xx, dropped session),
        and per message whose Graph send got no answer (throttling and 5xx are retried per request).
    :param sent_items_wait: seconds to wait for the Sent Items copy of a message whose outcome is
        unknown (a lost reply, or an earlier try killed while sending it) before sending it again;
        default 30 (Exchange's copy can lag).
    Pushes to XCom the Message-ID (or, with ``messages``, the list of Message-IDs).

    Exactly once (see docs/sending.md): every message is checked before the first is sent, then
    built and sent one at a time; a retry of the task skips the messages an earlier try sent
    (send ledger) and returns their Message-IDs.
    """

    template_fields: Sequence[str] = (*MESSAGE_FIELDS[:-1], "messages")
    template_fields_renderers = {"html_content": "html", "messages": "json", "custom_headers": "json"}
    template_ext: Sequence[str] = (".html",)
    ui_color = "#0078d4"

    def __init__(
        self,
        *,
        to: str | Sequence[str] | None = None,
        subject: str | None = None,
        html_content: str | None = None,
        text_content: str | None = None,
        files: Sequence[Any] | None = None,
        cc: str | Sequence[str] | None = None,
        bcc: str | Sequence[str] | None = None,
        inline_images: Mapping[str, Any] | None = None,
        reply_to: str | Sequence[str] | None = None,
        from_email: str | None = None,
        custom_headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        mime_charset: str = "utf-8",
        messages: Sequence[Mapping[str, Any]] | None = None,
        conn_id: str = DEFAULT_CONN_ID,
        fail_on_refused_recipients: bool = True,
        max_send_attempts: int = 5,
        sent_items_wait: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.to = to
        self.subject = subject
        self.html_content = html_content
        self.text_content = text_content
        self.files = files
        self.cc = cc
        self.bcc = bcc
        self.inline_images = inline_images
        self.reply_to = reply_to
        self.from_email = from_email
        self.custom_headers = custom_headers
        self.message_id = message_id
        self.mime_charset = mime_charset
        self.messages = messages
        self.conn_id = conn_id
        self.fail_on_refused_recipients = fail_on_refused_recipients
        self.max_send_attempts = max_send_attempts
        self.sent_items_wait = sent_items_wait

    def _message_specs(self) -> list[dict[str, Any]]:
        defaults = {name: getattr(self, name) for name in MESSAGE_FIELDS}
        if self.messages is None:
            return [defaults]
        defaults["message_id"] = None  # one Message-ID cannot name several messages
        if isinstance(self.messages, (str, bytes)) or not isinstance(self.messages, Sequence):
            raise MessageCompositionError("messages must be a list of dicts (one per message).")
        specs = []
        for index, entry in enumerate(self.messages):
            if not isinstance(entry, Mapping):
                raise MessageCompositionError(f"messages[{index}] must be a dict, got {type(entry).__name__}.")
            unknown = set(entry) - set(MESSAGE_FIELDS)
            if unknown:
                raise MessageCompositionError(
                    f"messages[{index}] has unknown field(s) {sorted(unknown)}; allowed: {', '.join(MESSAGE_FIELDS)}."
                )
            specs.append({**defaults, **entry})
        return specs

    def execute(self, context: Context) -> str | list[str]:
        hook = O365MailHook(self.conn_id)
        ti = context.get("ti")
        # Outside a task run (execute() called directly) there is no task instance to be stable for.
        identity = TaskIdentity.of(ti) if ti is not None else None
        # Check every message first (a bad address in message 7 must not leave 1-6 sent), but build
        # each one only when it is sent: memory holds one message whatever the batch's size.
        planned = hook.plan(self._message_specs(), identity)
        results = hook.send_messages(
            planned,
            identity=identity,
            raise_on_refused=self.fail_on_refused_recipients,
            max_attempts=self.max_send_attempts,
            **({} if self.sent_items_wait is None else {"sent_items_wait": float(self.sent_items_wait)}),
        )
        for result in results:
            for address, (_, reply) in result.refused.items():
                self.log.warning("Recipient %s of %s was refused: %s", address, result.message_id, reply)
        ids = [result.message_id for result in results]
        return ids if self.messages is not None else ids[0]
