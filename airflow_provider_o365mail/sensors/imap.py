"""O365ImapSensor: wait for matching mail in Microsoft 365 folders over IMAP XOAUTH2."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue

from airflow_provider_o365mail.connection import DEFAULT_CONN_ID
from airflow_provider_o365mail.core.criteria import POST_ACTIONS, CriteriaError
from airflow_provider_o365mail.core.watch_spec import CheckResult, WatchSpec
from airflow_provider_o365mail.core.watermark import (
    Reservation,
    VariableWatermarkStore,
    WatchState,
    task_key,
    variable_key,
)
from airflow_provider_o365mail.hooks.o365mail import O365MailHook, advanced, is_graph_result, receive_transport
from airflow_provider_o365mail.imap.idle import MAX_IDLE_SECONDS
from airflow_provider_o365mail.triggers.imap import O365ImapTrigger, raise_from_event
from airflow_provider_o365mail.version_compat import conf

if TYPE_CHECKING:
    from airflow.sdk import Context

log = logging.getLogger(__name__)


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
    :param post_action: ``None``, ``"seen"``, ``"flag"``, ``"move"`` (with ``move_to``) or ``"delete"`` on the
        matches.
    :param move_to: target folder for ``post_action="move"``. (templated)
    :param mailbox: another mailbox the signed-in user may open (shared mailbox). (templated)
    :param watermark_id: name of the watermark; default ``<dag_id>.<task_id>``.
    :param deferrable: wait in the triggerer with IMAP IDLE (default ``[operators] default_deferrable``).
    :param poll_interval: seconds between checks in the triggerer where the server offers no IDLE.
    :param idle_timeout: re-issue IDLE (and re-check) after this many seconds; at most 25 minutes. Lower
        it if a firewall drops idle connections sooner.
    :param transport: ``"imap"``, ``"graph"`` (Microsoft Graph: where IMAP is off) or ``"auto"`` (IMAP, and
        Graph once Exchange refuses the IMAP login); default: the connection's ``transport`` (``smtp``
        means IMAP). Raw IMAP ``criteria`` work over IMAP only. Over Graph the deferrable wait polls the
        folder's changes (``poll_interval``, shared by every sensor of the folder in the triggerer).
    Pushes to XCom a list of message summaries (folder, uid, uidvalidity, message_id, from, to, cc, subject,
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
        transport: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if transport is not None:
            receive_transport(transport, "smtp")  # a wrong name fails at DAG parse
        if transport in ("graph", "auto") and criteria:
            raise CriteriaError(
                "Raw IMAP criteria cannot be sent to Microsoft Graph; with transport='graph' or 'auto' use the "
                "readable criteria (sender, recipient, subject, since, before, unseen, header, has_attachment, "
                "attachment_name)."
            )
        if post_action not in POST_ACTIONS:
            raise CriteriaError(
                f"post_action must be one of None, 'seen', 'flag', 'move', 'delete'; got {post_action!r}."
            )
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
        self.transport = transport

    # ------------------------------------------------------------------ helpers
    def receive_transport(self, hook: O365MailHook) -> str:
        """``imap``, ``graph`` or ``auto`` for this sensor (its own, else the connection's)."""
        return receive_transport(self.transport, hook.settings.transport)

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
        """Where the watch's watermarks and reservations live; none when there is nothing to remember."""
        if not (spec.new_only or spec.post_action):
            return None
        key = self.watermark_key()
        self.log.debug("Watermarks in Variable %s (delete it to start over).", key)
        return VariableWatermarkStore(key)

    # ------------------------------------------------------------------ at-least-once delivery
    def _settle(
        self, hook: O365MailHook, spec: WatchSpec, store: VariableWatermarkStore, me: str, context: Any
    ) -> WatchState:
        """Confirm the reservations of earlier task instances Airflow recorded as successful (post-action,
        watermark), drop those that failed for good; return the watch's state."""
        state = store.load_state()
        others = [r for key, r in state.reservations.items() if key != me]
        if not others:
            return state
        states = task_states(context, others)
        confirmed = [r for r in others if states.get(r.key) == "success"]
        dropped = [r for r in others if r.key in states and states[r.key] in GIVEN_UP_STATES]
        for reservation in confirmed:
            result = CheckResult(messages=reservation.messages, scanned=reservation.scanned)
            hook.apply_post_action(spec, result, mailbox=self.mailbox)
            if spec.new_only:
                state.watermarks = advanced(state.watermarks, result)
            self.log.info(
                "Confirmed %d message(s) of %s (it succeeded): %s applied, watermark advanced.",
                len(reservation.messages),
                reservation.key,
                spec.post_action or "no post-action",
            )
        for reservation in dropped:
            self.log.info(
                "%s ended as %s: its %d message(s) stay unconfirmed and will be reported again.",
                reservation.key,
                states[reservation.key] or "deleted",
                len(reservation.messages),
            )
        for reservation in (*confirmed, *dropped):
            del state.reservations[reservation.key]
        if confirmed or dropped:
            store.save_state(state)
        return state

    def _deliver(
        self,
        context: Any,
        hook: O365MailHook,
        spec: WatchSpec,
        result_of: Callable[[WatchState | None], CheckResult | None],
    ) -> list[dict[str, Any]] | None:
        """Find (``result_of(state)``) and reserve the messages for this task instance, or return the ones an
        earlier try of it reserved. ``None``: nothing matched."""
        store = self._store(spec)
        me = own_task_key(context)
        if store is None or me is None:  # nothing to remember, or no task instance: commit at once
            result = result_of(None)
            if result is None or not result.messages:
                return None
            return self._finish(hook, spec, result)
        state = self._settle(hook, spec, store, me, context)
        mine = state.reservations.get(me)
        if mine is not None:
            self.log.info(
                "Returning the %d message(s) reserved by an earlier try of this task instance.", len(mine.messages)
            )
            return mine.messages
        result = result_of(state)
        if result is None or not result.messages:
            if result is not None and spec.new_only and is_graph_result(result):
                # Over Graph a check that matched nothing still moves the delta link on; else every later
                # check reads all the folder's changes since the last match again.
                state.watermarks = advanced(state.watermarks, result)
                store.save_state(state)
            return None
        dag_id, run_id, task_id, map_index = me.split("|")
        state.reserve(
            Reservation(dag_id, run_id, task_id, int(map_index), result.messages, result.scanned, time.time())
        )
        store.save_state(state)
        self._log_matches(result.messages)
        return result.messages

    def _finish(self, hook: O365MailHook, spec: WatchSpec, result: CheckResult) -> list[dict[str, Any]]:
        hook.commit_mail(spec, result, self._store(spec), mailbox=self.mailbox)
        self._log_matches(result.messages)
        return result.messages

    def _log_matches(self, messages: list[dict[str, Any]]) -> None:
        for message in messages:
            self.log.info(
                "Matched %s/%s: %r from %s (%d attachment(s)).",
                message["folder"],
                message.get("uid") or message.get("message_id"),
                message["subject"],
                message["from"],
                len(message["attachments"]),
            )

    # ------------------------------------------------------------------ sensor
    def poke(self, context: Context) -> PokeReturnValue | bool:
        spec = self.watch_spec()
        hook = O365MailHook(self.conn_id)
        store = self._store(spec)
        transport = self.receive_transport(hook)

        def check(state: WatchState | None) -> CheckResult:
            marks = None
            if spec.new_only and store is not None:
                marks = state.watermarks if state is not None else store.load()
            return hook.check_mail(spec, marks, mailbox=self.mailbox, transport=transport)

        messages = self._deliver(context, hook, spec, check)
        if messages is None:
            self.log.info("No matching mail in %s yet.", ", ".join(spec.folders))
            return False
        return PokeReturnValue(is_done=True, xcom_value=messages)

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
                transport=self.receive_transport(O365MailHook(self.conn_id)),
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=self.timeout),
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> list[dict[str, Any]]:
        if event.get("status") != "success":
            raise_from_event(event)
        spec = self.watch_spec()
        result = CheckResult.from_dict(event["result"])
        return self._deliver(context, O365MailHook(self.conn_id), spec, lambda _state: result) or []


#: Task states after which a task instance will not report its messages: they are reported again.
GIVEN_UP_STATES = frozenset({"failed", "upstream_failed", "skipped", "removed", None})


def own_task_key(context: Any) -> str | None:
    """This task instance's reservation key, or ``None`` outside a task run (e.g. ``sensor.poke({})``)."""
    ti = context.get("ti") if isinstance(context, Mapping) else None
    if ti is None or not getattr(ti, "run_id", None):
        return None
    map_index = getattr(ti, "map_index", -1)
    return task_key(ti.dag_id, ti.run_id, ti.task_id, map_index if isinstance(map_index, int) else -1)


def task_states(context: Any, reservations: list[Reservation]) -> dict[str, str | None]:
    """Airflow's recorded state of each reservation's task instance (``None``: it no longer exists).

    A reservation whose state cannot be read is left out: it stays open (never confirmed on a guess).
    """
    ti = context.get("ti") if isinstance(context, Mapping) else None
    lookup = getattr(ti, "get_task_states", None)
    states: dict[str, str | None] = {}
    if lookup is None:
        return states
    for reservation in reservations:
        try:
            by_run = lookup(dag_id=reservation.dag_id, task_ids=[reservation.task_id], run_ids=[reservation.run_id])
        except Exception as err:  # a lookup that fails leaves the reservation open
            log.warning("Cannot read the state of %s (%s); leaving it unconfirmed.", reservation.key, err)
            continue
        name = reservation.task_id if reservation.map_index < 0 else f"{reservation.task_id}_{reservation.map_index}"
        state = (by_run or {}).get(reservation.run_id, {}).get(name)
        states[reservation.key] = str(getattr(state, "value", state)) if state is not None else None
    return states
