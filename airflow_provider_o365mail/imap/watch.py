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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_o365mail.core.criteria import POST_ACTIONS, MailCriteria
from airflow_provider_o365mail.core.watermark import FolderWatermark, WatermarkStore, seen_key
from airflow_provider_o365mail.exceptions import CriteriaError
from airflow_provider_o365mail.imap.scan import ImapSession, scan_folder, select
from airflow_provider_o365mail.imap.search import needs_utf8, search_keys

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WatchSpec:
    """What to watch and what to do with matches."""

    folders: tuple[str, ...] = ("INBOX",)
    criteria: MailCriteria = field(default_factory=MailCriteria)
    new_only: bool = False
    max_messages: int = 100
    post_action: str | None = None
    move_to: str | None = None

    def __post_init__(self) -> None:
        if not self.folders or any(not isinstance(f, str) or not f for f in self.folders):
            raise CriteriaError("folders must be a folder name or a non-empty list of folder names.")
        if self.post_action not in POST_ACTIONS:
            raise CriteriaError(f"post_action must be one of None, 'seen', 'flag', 'move'; got {self.post_action!r}.")
        if self.post_action == "move" and not self.move_to:
            raise CriteriaError("post_action='move' needs move_to (the target folder).")
        if self.max_messages < 1:
            raise CriteriaError("max_messages must be >= 1.")

    @classmethod
    def build(
        cls,
        folders: str | Sequence[str] = "INBOX",
        *,
        new_only: bool = False,
        max_messages: int = 100,
        post_action: str | None = None,
        move_to: str | None = None,
        **criteria: Any,
    ) -> WatchSpec:
        folder_list = (folders,) if isinstance(folders, str) else tuple(folders or ())
        return cls(
            folders=folder_list,
            criteria=MailCriteria.build(**criteria),
            new_only=bool(new_only),
            max_messages=int(max_messages),
            post_action=post_action or None,
            move_to=move_to or None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "folders": list(self.folders),
            "new_only": self.new_only,
            "max_messages": self.max_messages,
            "post_action": self.post_action,
            "move_to": self.move_to,
            **self.criteria.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WatchSpec:
        return cls.build(**dict(data))


@dataclass
class CheckResult:
    """Matches (summaries, oldest first) and, per folder, how far the scan got."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    scanned: dict[str, dict[str, int]] = field(default_factory=dict)  # folder -> {uidvalidity, high_uid, uidnext}

    def to_dict(self) -> dict[str, Any]:
        return {"messages": self.messages, "scanned": self.scanned}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CheckResult:
        return cls(messages=list(data.get("messages", [])), scanned=dict(data.get("scanned", {})))


def check(
    session: ImapSession, spec: WatchSpec, watermarks: Mapping[str, FolderWatermark] | None = None
) -> CheckResult:
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
            watermarks.get(folder) if spec.new_only else None,
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


def advanced(watermarks: Mapping[str, FolderWatermark], result: CheckResult) -> dict[str, FolderWatermark]:
    """The watermarks past what ``result`` scanned (pure)."""
    marks = dict(watermarks)
    for folder, scan in result.scanned.items():
        keys = [seen_key(m) for m in result.messages if m["folder"] == folder]
        previous = marks.get(folder) or FolderWatermark(uidvalidity=scan["uidvalidity"], last_uid=0)
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
