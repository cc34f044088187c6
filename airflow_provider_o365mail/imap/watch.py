"""Watch IMAP folders for matching mail: ``check`` (read-only) then ``commit`` (post-action, watermark).

Shared by the sensor (poke and reschedule), its deferrable trigger and the event trigger. The split
matters: a trigger only checks; whoever persists the result (the worker after the trigger fired,
Airflow after the asset events are stored) commits, so a crash in between loses nothing.

A check costs little when nothing is new (see :mod:`.scan`, shared with the event stream):
with a watermark, one ``STATUS (UIDNEXT UIDVALIDITY)`` per folder answers "nothing above the last
UID" without selecting the folder; otherwise ``UID SEARCH <last+1>:* <criteria>`` runs on the
server and only ENVELOPE/BODYSTRUCTURE of the hits are fetched, never bodies.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from airflow_provider_o365mail.core.watch_spec import CheckResult, WatchSpec
from airflow_provider_o365mail.core.watermark import ANY_SIZE, FolderWatermark, Watermark, WatermarkStore, seen_key
from airflow_provider_o365mail.imap.scan import ImapSession, scan_folder, select
from airflow_provider_o365mail.imap.search import needs_utf8, search_keys

log = logging.getLogger(__name__)


def imap_watermark(mark: Watermark | None) -> FolderWatermark | None:
    """The IMAP watermark of a folder; a Graph one (the sensor moved from Graph to IMAP) becomes "a
    folder generation we do not know, written at ``updated_at``": the folder is searched since a day
    before, skipping messages whose Message-ID the Graph watermark reported."""
    if mark is None or isinstance(mark, FolderWatermark):
        return mark
    keys = [f"{message_id}|{ANY_SIZE}" for message_id in mark.seen_message_ids]
    return FolderWatermark(uidvalidity=0, last_uid=0, seen_keys=keys, updated_at=mark.updated_at)


def check(session: ImapSession, spec: WatchSpec, watermarks: Mapping[str, Watermark] | None = None) -> CheckResult:
    """Find matching messages; change nothing on the server.

    A message summarised without its structure (``"unparsed"``) matches criteria about attachments
    only if it cannot be told: it is skipped when the spec asks about attachments, reported otherwise.
    """
    watermarks = watermarks or {}
    candidates: list[dict[str, Any]] = []
    scanned: dict[str, dict[str, int]] = {}
    charset = "UTF-8" if needs_utf8(spec.criteria) else None
    for folder in spec.folders:
        scan = scan_folder(
            session,
            folder,
            imap_watermark(watermarks.get(folder)) if spec.new_only else None,
            search_keys=search_keys(spec.criteria),
            charset=charset,
        )
        for message in scan.messages:
            summary = message.summary
            if summary.get("unparsed") and spec.criteria.needs_bodystructure:
                log.warning(
                    "%s UID %s (%s) is skipped: its attachments cannot be read, and the criteria ask about them.",
                    folder,
                    summary["uid"],
                    summary["message_id"],
                )
            elif spec.criteria.attachments_match(summary["attachments"]):
                candidates.append(summary)
        scanned[folder] = scan.progress()
    return _capped(candidates, scanned, spec.max_messages)


def _capped(candidates: list[dict[str, Any]], scanned: dict[str, dict[str, int]], limit: int) -> CheckResult:
    kept, dropped = candidates[:limit], candidates[limit:]
    for message in dropped:  # the watermark must not pass what was not reported
        folder_scan = scanned[message["folder"]]
        folder_scan["high_uid"] = min(folder_scan["high_uid"], message["uid"] - 1)
    return CheckResult(messages=kept, scanned=scanned)


def commit(client: Any, spec: WatchSpec, result: CheckResult, store: WatermarkStore | None) -> None:
    """Apply the post-action to the reported messages, then advance the watermarks (at once)."""
    if spec.post_action:
        _post_action(client, spec, result)
    if spec.new_only and store is not None:
        state = store.load_state()
        state.watermarks = advanced(state.watermarks, result)
        store.save_state(state)


def apply_post_action(client: Any, spec: WatchSpec, result: CheckResult) -> None:
    """The post-action alone (the sensor's confirmation step advances the watermark itself)."""
    if spec.post_action and result.messages:
        _post_action(client, spec, result)


def advanced(watermarks: Mapping[str, Watermark], result: CheckResult) -> dict[str, Watermark]:
    """The watermarks past what ``result`` scanned (pure)."""
    marks = dict(watermarks)
    for folder, scan in result.scanned.items():
        if "uidvalidity" not in scan:  # another transport's scan (Graph: a delta link)
            continue
        keys = [seen_key(m) for m in result.messages if m["folder"] == folder]
        previous = imap_watermark(marks.get(folder)) or FolderWatermark(uidvalidity=scan["uidvalidity"], last_uid=0)
        marks[folder] = previous.advanced(scan["uidvalidity"], scan["high_uid"], keys)
    return marks


def _post_action(client: Any, spec: WatchSpec, result: CheckResult) -> None:
    by_folder: dict[str, list[dict[str, Any]]] = {}
    for message in result.messages:
        by_folder.setdefault(message["folder"], []).append(message)
    for folder, messages in by_folder.items():
        selected = select(client, folder, readonly=False)
        uidvalidity = int(selected[b"UIDVALIDITY"])
        uids = [m["uid"] for m in messages if m["uidvalidity"] == uidvalidity]
        if len(uids) != len(messages):
            log.warning(
                "UIDVALIDITY of %s changed since the check; %s skipped for those messages.", folder, spec.post_action
            )
        if not uids:
            continue
        if spec.post_action == "seen":
            client.add_flags(uids, [b"\\Seen"], silent=True)
        elif spec.post_action == "flag":
            client.add_flags(uids, [b"\\Flagged"], silent=True)
        elif spec.post_action == "delete":  # Exchange moves expunged messages to Recoverable Items
            client.delete_messages(uids, silent=True)
            if client.has_capability("UIDPLUS"):
                client.uid_expunge(uids)
            else:
                client.expunge()
        elif spec.post_action == "move":
            if client.has_capability("MOVE"):
                client.move(uids, spec.move_to)
            else:
                client.copy(uids, spec.move_to)
                client.delete_messages(uids, silent=True)
                if client.has_capability("UIDPLUS"):
                    client.uid_expunge(uids)
                else:
                    client.expunge()
        log.info("%s: %s %d message(s).", folder, spec.post_action, len(uids))
