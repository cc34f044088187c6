"""Watch IMAP folders for matching mail: ``check`` (read-only) then ``commit`` (post-action, watermark).

Shared by the sensor (poke and reschedule), its deferrable trigger and the event trigger. The split
matters: a trigger only checks; whoever persists the result (the worker after the trigger fired,
Airflow after the asset events are stored) commits, so a crash in between loses nothing.

A check costs little when nothing is new: with a watermark, one ``STATUS (UIDNEXT UIDVALIDITY)``
per folder answers "nothing above the last UID" without selecting the folder; otherwise
``UID SEARCH <last+1>:* <criteria>`` runs on the server and only ENVELOPE/BODYSTRUCTURE of the
hits are fetched, never bodies.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_o365mail.exceptions import MailServerError
from airflow_provider_o365mail.mail.imap_criteria import POST_ACTIONS, CriteriaError, MailCriteria
from airflow_provider_o365mail.mail.imap_summary import FETCH_ITEMS, summarize
from airflow_provider_o365mail.mail.watermark import FolderWatermark, WatermarkStore

log = logging.getLogger(__name__)

FETCH_CHUNK = 500


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


def _select(client: Any, folder: str, *, readonly: bool) -> dict[bytes, Any]:
    try:
        return client.select_folder(folder, readonly=readonly)
    except Exception as err:
        raise MailServerError(
            f"Cannot open folder {folder!r}: {err}. Check the name (Exchange shows localized names such as "
            "'Posteingang' in the UI but IMAP uses INBOX) and that the signed-in user may open it."
        ) from None


def check(client: Any, spec: WatchSpec, watermarks: Mapping[str, FolderWatermark] | None = None) -> CheckResult:
    """Find matching messages; change nothing on the server."""
    watermarks = watermarks or {}
    candidates: list[dict[str, Any]] = []
    scanned: dict[str, dict[str, int]] = {}
    charset = "UTF-8" if spec.criteria.needs_utf8() else None
    for folder in spec.folders:
        mark = watermarks.get(folder) if spec.new_only else None
        if mark is not None:
            status = client.folder_status(folder, [b"UIDNEXT", b"UIDVALIDITY"])
            if int(status[b"UIDVALIDITY"]) == mark.uidvalidity and int(status[b"UIDNEXT"]) - 1 <= mark.last_uid:
                scanned[folder] = {
                    "uidvalidity": mark.uidvalidity,
                    "high_uid": mark.last_uid,
                    "uidnext": int(status[b"UIDNEXT"]),
                }
                continue
        selected = _select(client, folder, readonly=True)
        uidvalidity = int(selected[b"UIDVALIDITY"])
        uidnext = int(selected.get(b"UIDNEXT", 0) or 0)
        keys = spec.criteria.search_keys()
        floor_uid = 0
        if mark is not None and mark.uidvalidity == uidvalidity:
            floor_uid = mark.last_uid
            keys = [b"UID", f"{floor_uid + 1}:*".encode(), *([] if keys == [b"ALL"] else keys)]
        elif mark is not None:
            log.warning(
                "UIDVALIDITY of %s changed (%s -> %s): the folder was recreated or moved; rescanning since %s and "
                "skipping messages already reported (by Message-ID).",
                folder,
                mark.uidvalidity,
                uidvalidity,
                dt.date.fromtimestamp(mark.updated_at) - dt.timedelta(days=1),
            )
            since = dt.date.fromtimestamp(mark.updated_at or 0) - dt.timedelta(days=1)
            keys = [*([] if keys == [b"ALL"] else keys), b"SINCE", since] if mark.updated_at else keys
        uids = sorted(uid for uid in client.search(keys, charset) if uid > floor_uid)
        high_uid = max([uidnext - 1, floor_uid, *uids[-1:]])
        seen_ids = set(mark.seen_message_ids) if mark is not None else set()
        for start in range(0, len(uids), FETCH_CHUNK):
            chunk = uids[start : start + FETCH_CHUNK]
            fetched = client.fetch(chunk, FETCH_ITEMS)
            for uid in chunk:
                data = fetched.get(uid)
                if data is None:  # expunged meanwhile
                    continue
                summary = summarize(folder, uidvalidity, uid, data)
                if spec.new_only and summary["message_id"] and summary["message_id"] in seen_ids:
                    continue
                if not spec.criteria.attachments_match(summary["attachments"]):
                    continue
                candidates.append(summary)
        scanned[folder] = {"uidvalidity": uidvalidity, "high_uid": high_uid, "uidnext": uidnext}
    return _capped(candidates, scanned, spec.max_messages)


def _capped(candidates: list[dict[str, Any]], scanned: dict[str, dict[str, int]], limit: int) -> CheckResult:
    kept, dropped = candidates[:limit], candidates[limit:]
    for message in dropped:  # the watermark must not pass what was not reported
        folder_scan = scanned[message["folder"]]
        folder_scan["high_uid"] = min(folder_scan["high_uid"], message["uid"] - 1)
    return CheckResult(messages=kept, scanned=scanned)


def commit(client: Any, spec: WatchSpec, result: CheckResult, store: WatermarkStore | None) -> None:
    """Apply the post-action to the reported messages, then advance the watermarks."""
    if spec.post_action:
        _post_action(client, spec, result)
    if spec.new_only and store is not None:
        watermarks = store.load()
        for folder, scan in result.scanned.items():
            ids = [m["message_id"] for m in result.messages if m["folder"] == folder and m["message_id"]]
            previous = watermarks.get(folder) or FolderWatermark(uidvalidity=scan["uidvalidity"], last_uid=0)
            watermarks[folder] = previous.advanced(scan["uidvalidity"], scan["high_uid"], ids)
        store.save(watermarks)


def _post_action(client: Any, spec: WatchSpec, result: CheckResult) -> None:
    by_folder: dict[str, list[dict[str, Any]]] = {}
    for message in result.messages:
        by_folder.setdefault(message["folder"], []).append(message)
    for folder, messages in by_folder.items():
        selected = _select(client, folder, readonly=False)
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
