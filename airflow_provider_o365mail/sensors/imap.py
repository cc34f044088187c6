"""O365ImapSensor: wait for matching mail in Microsoft 365 folders over IMAP XOAUTH2."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue, conf

from airflow_provider_o365mail.connection import DEFAULT_CONN_ID
from airflow_provider_o365mail.hooks.o365mail import O365MailHook
from airflow_provider_o365mail.mail.imap_criteria import POST_ACTIONS, CriteriaError
from airflow_provider_o365mail.mail.imap_idle import MAX_IDLE_SECONDS
from airflow_provider_o365mail.mail.imap_watch import CheckResult, WatchSpec
from airflow_provider_o365mail.mail.watermark import VariableWatermarkStore, variable_key
from airflow_provider_o365mail.triggers.imap import O365ImapTrigger, raise_from_event

if TYPE_CHECKING:
    from airflow.sdk import Context


class O365ImapSensor(BaseSensorOperator):
    """Wait until mail matching the criteria is in one of the folders; push summaries to XCom.

    All criteria must hold; a list for ``sender``/``recipient`` means any of them.

    :param conn_id: the ``o365mail`` connection.
    :param folders: folder name or list (``"INBOX"``, ``"Invoices/2026"``, non-ASCII names work). (templated)
    :param sender: substring of From, or a list (any). (templated)
    :param recipient: substring of To/Cc, or a list (any). (templated)
    :param subject: substring of Subject. (templated)
    :param since: received on/after this date (date, datetime or ISO string). (templated)
    :param before: received before this date. (templated)
    :param unseen: only unread messages.
    :param header: ``{"X-Report-Id": "Q3"}``: header contains value. (templated)
    :param has_attachment: only messages with an attachment.
    :param attachment_name: attachment file-name glob such as ``"invoice_*.pdf"`` (case-insensitive). (templated)
    :param criteria: raw IMAP SEARCH keys added to the others (escape hatch). (templated)
    :param new_only: only messages that arrived since this sensor's last success (watermark per
        connection, mailbox, folder and ``watermark_id``; survives restarts).
    :param max_messages: at most this many summaries (oldest first); the rest waits for the next run.
    :param post_action: ``None``, ``"seen"``, ``"flag"`` or ``"move"`` (with ``move_to``) on the matches.
    :param move_to: target folder for ``post_action="move"``. (templated)
    :param mailbox: another mailbox the signed-in user may open (shared mailbox). (templated)
    :param watermark_id: name of the watermark; default ``<dag_id>.<task_id>``.
    :param deferrable: wait in the triggerer with IMAP IDLE (default ``[operators] default_deferrable``).
    :param poll_interval: seconds between checks in the triggerer where the server offers no IDLE.
    :param idle_timeout: re-issue IDLE (and re-check) after this many seconds; at most 25 minutes. Lower
        it if a firewall drops idle connections sooner.
    :return: list of message summaries (folder, uid, uidvalidity, message_id, from, to, cc, subject,
        date, received, size, flags, attachments[name, content_type, size, encoding, section, inline]).
    """

    template_fields: Sequence[str] = (
        "folders",
        "sender",
        "recipient",
        "subject",
        "since",
        "before",
        "header",
        "attachment_name",
        "criteria",
        "move_to",
        "mailbox",
    )
    ui_color = "#0078d4"

    def __init__(
        self,
        *,
        conn_id: str = DEFAULT_CONN_ID,
        folders: str | Sequence[str] = "INBOX",
        sender: str | Sequence[str] | None = None,
        recipient: str | Sequence[str] | None = None,
        subject: str | None = None,
        since: date | datetime | str | None = None,
        before: date | datetime | str | None = None,
        unseen: bool = False,
        header: Mapping[str, str] | None = None,
        has_attachment: bool = False,
        attachment_name: str | None = None,
        criteria: str | Sequence[str] | None = None,
        new_only: bool = False,
        max_messages: int = 100,
        post_action: str | None = None,
        move_to: str | None = None,
        mailbox: str | None = None,
        watermark_id: str | None = None,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poll_interval: float = 60.0,
        idle_timeout: float = MAX_IDLE_SECONDS,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if post_action not in POST_ACTIONS:
            raise CriteriaError(f"post_action must be one of None, 'seen', 'flag', 'move'; got {post_action!r}.")
        if post_action == "move" and not move_to:
            raise CriteriaError("post_action='move' needs move_to (the target folder).")
        self.conn_id = conn_id
        self.folders = folders
        self.sender = sender
        self.recipient = recipient
        self.subject = subject
        self.since = since
        self.before = before
        self.unseen = unseen
        self.header = header
        self.has_attachment = has_attachment
        self.attachment_name = attachment_name
        self.criteria = criteria
        self.new_only = new_only
        self.max_messages = max_messages
        self.post_action = post_action
        self.move_to = move_to
        self.mailbox = mailbox
        self.watermark_id = watermark_id
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.idle_timeout = min(float(idle_timeout), MAX_IDLE_SECONDS)

    # ------------------------------------------------------------------ helpers
    def watch_spec(self) -> WatchSpec:
        return WatchSpec.build(
            self.folders,
            new_only=self.new_only,
            max_messages=self.max_messages,
            post_action=self.post_action,
            move_to=self.move_to,
            sender=self.sender,
            recipient=self.recipient,
            subject=self.subject,
            since=self.since,
            before=self.before,
            unseen=self.unseen,
            header=self.header,
            has_attachment=self.has_attachment,
            attachment_name=self.attachment_name,
            criteria=self.criteria,
        )

    def watermark_key(self) -> str:
        watch_id = self.watermark_id or f"{self.dag_id}.{self.task_id}"
        return variable_key(self.conn_id, watch_id, self.mailbox)

    def _store(self, spec: WatchSpec) -> VariableWatermarkStore | None:
        if not spec.new_only:
            return None
        key = self.watermark_key()
        self.log.debug("Watermarks in Variable %s (delete it to start over).", key)
        return VariableWatermarkStore(key)

    def _finish(self, hook: O365MailHook, spec: WatchSpec, result: CheckResult) -> list[dict[str, Any]]:
        hook.commit_mail(spec, result, self._store(spec), mailbox=self.mailbox)
        for message in result.messages:
            self.log.info(
                "Matched %s/%s: %r from %s (%d attachment(s)).",
                message["folder"],
                message["uid"],
                message["subject"],
                message["from"],
                len(message["attachments"]),
            )
        return result.messages

    # ------------------------------------------------------------------ sensor
    def poke(self, context: Context) -> PokeReturnValue | bool:
        spec = self.watch_spec()
        hook = O365MailHook(self.conn_id)
        store = self._store(spec)
        result = hook.check_mail(spec, store.load() if store else None, mailbox=self.mailbox)
        if not result.messages:
            self.log.info("No matching mail in %s yet.", ", ".join(spec.folders))
            return False
        return PokeReturnValue(is_done=True, xcom_value=self._finish(hook, spec, result))

    def execute(self, context: Context) -> Any:
        if not self.deferrable:
            return super().execute(context)
        found = self.poke(context)
        if found:
            return found.xcom_value if isinstance(found, PokeReturnValue) else None
        spec = self.watch_spec()
        self.defer(
            trigger=O365ImapTrigger(
                conn_id=self.conn_id,
                spec=spec.to_dict(),
                watermark_key=self.watermark_key() if spec.new_only else None,
                mailbox=self.mailbox,
                poll_interval=self.poll_interval,
                max_idle=self.idle_timeout,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=self.timeout),
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> list[dict[str, Any]]:
        if event.get("status") != "success":
            raise_from_event(event)
        spec = self.watch_spec()
        return self._finish(O365MailHook(self.conn_id), spec, CheckResult.from_dict(event["result"]))
