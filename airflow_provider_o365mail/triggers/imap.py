"""O365ImapTrigger: the deferrable O365ImapSensor's wait, in the triggerer.

Loop: note the folders' generation, check the folders, and if nothing matches wait until a folder
changed since that generation. Exchange allows about 20 IMAP connections per mailbox, so the
triggers of one mailbox share them in this process (the hook builds both):

- the wait joins the shared IDLE watch of each folder (:mod:`..imap.hub`: one IDLE connection
  per connection, mailbox and folder, whatever the number of sensors; polling where there is no IDLE);
- the check (IMAPClient, blocking) runs in a worker thread over the mailbox's pool of logged-in
  sessions (:mod:`..imap.pool`, ``[o365mail] max_imap_connections_per_mailbox``), at most that
  many at once, and identical concurrent checks run once (:mod:`..core.gate`).

Over Microsoft Graph (``transport="graph"``) the wait joins the shared delta-poll loop of each folder
instead (:mod:`..graph.hub`: one loop per connection, mailbox and folder, fast after a change, then
every ``poll_interval``), and the checks go through the same gate with the Graph budget; every Graph
request of the process holds a slot of ``[o365mail] max_graph_requests_per_mailbox`` and is paced to
``[o365mail] max_graph_requests_per_10_minutes``. With ``new_only``, a check that matched nothing
moves the trigger's delta links on in memory (the Variable is written by the worker, on success), so
the next check reads only what changed since. With ``transport="auto"`` the first check decides:
the wait follows the transport that answered it (Graph once Exchange refused the IMAP login), and
switches if a later check is answered by the other one.

The check is read-only: the post-action and the watermark advance happen on the worker in
``execute_complete``, after Airflow persisted the event.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_o365mail import exceptions
from airflow_provider_o365mail.connection import DEFAULT_CONN_ID
from airflow_provider_o365mail.core.watch_spec import CheckResult, WatchSpec
from airflow_provider_o365mail.core.watermark import VariableWatermarkStore, Watermark
from airflow_provider_o365mail.graph.hub import PERMANENT_ERRORS as GRAPH_PERMANENT_ERRORS
from airflow_provider_o365mail.hooks.o365mail import O365MailHook, advanced
from airflow_provider_o365mail.imap.idle import MAX_IDLE_SECONDS, PERMANENT_ERRORS, RECONNECT

log = logging.getLogger(__name__)

#: What ends a Graph (or ``auto``) trigger with an error event: IMAP's and Graph's permanent errors.
WATCH_PERMANENT_ERRORS = (*PERMANENT_ERRORS, *GRAPH_PERMANENT_ERRORS)


def served_by(result: CheckResult) -> str:
    """``imap`` or ``graph``: which transport answered a check (an IMAP check reports each folder's UIDVALIDITY)."""
    return "imap" if any("uidvalidity" in scan for scan in result.scanned.values()) else "graph"


def error_event(err: BaseException) -> TriggerEvent:
    """The trigger's error as a structured payload (class, message and fields: :mod:`..exceptions`)."""
    if not isinstance(err, exceptions.O365MailError):
        err = exceptions.MailServerError(f"{type(err).__name__}: {err}")
    # error_class and message too: a worker still running an older provider reads only those.
    return TriggerEvent(
        {"status": "error", "error": err.to_payload(), "error_class": type(err).__name__, "message": str(err)}
    )


def raise_from_event(event: dict[str, Any]) -> None:
    """Raise a trigger's error on the worker with its class and fields (so fail-fast stays fail-fast)."""
    payload = event.get("error")
    if exceptions.is_payload(payload):
        raise exceptions.from_payload(payload)
    # An event from a triggerer running an older provider version: class name and message only.
    raise exceptions.from_payload(
        {"class": event.get("error_class"), "message": event.get("message") or "The IMAP trigger failed."}
    )


class O365ImapTrigger(BaseTrigger):
    """Fires when mail matching the sensor's criteria is in one of its folders.

    :param conn_id: the ``o365mail`` connection.
    :param spec: :meth:`WatchSpec.to_dict` of the sensor.
    :param watermark_key: Variable holding the sensor's watermarks (read only here), for ``new_only``.
    :param mailbox: another mailbox to open (shared mailbox).
    :param poll_interval: seconds between checks where the server has no IDLE; over Graph the longest
        between two polls of the folder's changes when nothing happens.
    :param max_idle: re-issue IDLE after this many seconds (at most 25 minutes).
    :param transport: ``imap``, ``graph`` or ``auto`` (resolved by the sensor on the worker).
    """

    def __init__(
        self,
        conn_id: str = DEFAULT_CONN_ID,
        spec: dict[str, Any] | None = None,
        watermark_key: str | None = None,
        mailbox: str | None = None,
        poll_interval: float = 60.0,
        max_idle: float = MAX_IDLE_SECONDS,
        transport: str = "imap",
    ) -> None:
        super().__init__()
        self.conn_id = conn_id
        self.spec = dict(spec or {})
        self.watermark_key = watermark_key
        self.mailbox = mailbox
        self.poll_interval = float(poll_interval)
        self.max_idle = min(float(max_idle), MAX_IDLE_SECONDS)
        self.transport = transport

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "conn_id": self.conn_id,
                "spec": self.spec,
                "watermark_key": self.watermark_key,
                "mailbox": self.mailbox,
                "poll_interval": self.poll_interval,
                "max_idle": self.max_idle,
                "transport": self.transport,
            },
        )

    async def _check(self, hook: O365MailHook, spec: WatchSpec) -> CheckResult:
        marks = None
        if spec.new_only and self.watermark_key:
            marks = await asyncio.to_thread(VariableWatermarkStore(self.watermark_key).load)  # a Variable read
        return await hook.acheck_mail(spec, marks, mailbox=self.mailbox, transport=self.transport)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            spec = WatchSpec.from_dict(self.spec)
        except exceptions.O365MailError as err:
            yield error_event(err)
            return
        hook = O365MailHook(self.conn_id)
        if self.transport in ("graph", "auto"):
            async for event in self._run_graph_or_auto(hook, spec):
                yield event
            return
        failures = 0
        with hook.folder_watch(
            spec.folders, mailbox=self.mailbox, poll_interval=self.poll_interval, max_idle=self.max_idle
        ) as watch:
            while True:
                try:
                    # Before the check: a change while it runs makes the wait return at once.
                    mark = watch.mark()
                    result = await self._check(hook, spec)
                    if result.messages:
                        yield TriggerEvent({"status": "success", "result": result.to_dict()})
                        return
                    failures = 0
                    reason = await watch.wait(mark, {f: scan.get("uidnext") for f, scan in result.scanned.items()})
                    log.debug("Wait for new mail ended: %s.", reason)
                except PERMANENT_ERRORS as err:
                    log.error("Watching %s stopped: %s", self.conn_id, err)
                    yield error_event(err)
                    return
                except Exception as err:  # network, 5xx, dropped sessions: transient
                    failures += 1
                    delay = RECONNECT.delay(failures)
                    log.warning(
                        "Watching %s failed (%s: %s); checking again in %.0f s (attempt %d).",
                        self.conn_id,
                        type(err).__name__,
                        err,
                        delay,
                        failures,
                    )
                    await asyncio.sleep(delay)

    # ------------------------------------------------------------------ Microsoft Graph, auto
    def _join(self, hook: O365MailHook, spec: WatchSpec, kind: str) -> Any:
        return hook.folder_watch(
            spec.folders,
            mailbox=self.mailbox,
            poll_interval=self.poll_interval,
            max_idle=self.max_idle,
            transport=kind,
        )

    async def _run_graph_or_auto(self, hook: O365MailHook, spec: WatchSpec) -> AsyncIterator[TriggerEvent]:
        """The loop of :meth:`run` for ``graph`` and ``auto``: the wait follows the transport that answered."""
        failures = 0
        kind: str | None = "graph" if self.transport == "graph" else None  # auto: the first check decides
        watch: Any = None
        marks: dict[str, Watermark] | None = None  # new_only over Graph: the delta links, moved on in memory
        try:
            while True:
                try:
                    if kind is not None and watch is None:
                        watch = self._join(hook, spec, kind)
                    if kind == "graph":
                        await watch.ready()  # the folder's loop has its delta link: later mail wakes us
                    mark = watch.mark() if watch is not None else None
                    if marks is None and spec.new_only and self.watermark_key:
                        marks = await asyncio.to_thread(VariableWatermarkStore(self.watermark_key).load)
                    result = await hook.acheck_mail(spec, marks, mailbox=self.mailbox, transport=self.transport)
                    if result.messages:
                        yield TriggerEvent({"status": "success", "result": result.to_dict()})
                        return
                    failures = 0
                    served = served_by(result)
                    if spec.new_only and marks is not None:
                        # Over Graph the next check reads only what changed since this one; over IMAP the
                        # Variable is read again (as in the IMAP-only loop).
                        marks = advanced(marks, result) if served == "graph" else None
                    if served != kind:  # auto: the first check, or IMAP refused / accepted again
                        if watch is not None:
                            watch.close()
                        kind, watch = served, None
                        log.info(
                            "Watching %s over %s.", self.conn_id, "Microsoft Graph" if served == "graph" else "IMAP"
                        )
                        continue  # join that watch and check again: nothing between this check and the wait is lost
                    uidnext = {f: scan.get("uidnext") for f, scan in result.scanned.items()}
                    reason = await watch.wait(mark, uidnext)
                    log.debug("Wait for new mail ended: %s.", reason)
                except WATCH_PERMANENT_ERRORS as err:
                    log.error("Watching %s stopped: %s", self.conn_id, err)
                    yield error_event(err)
                    return
                except Exception as err:  # network, 5xx, throttled: transient
                    failures += 1
                    delay = RECONNECT.delay(failures)
                    log.warning(
                        "Watching %s failed (%s: %s); checking again in %.0f s (attempt %d).",
                        self.conn_id,
                        type(err).__name__,
                        err,
                        delay,
                        failures,
                    )
                    await asyncio.sleep(delay)
        finally:
            if watch is not None:
                watch.close()
