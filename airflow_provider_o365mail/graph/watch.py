"""Watch folders over Microsoft Graph: ``check`` (read-only) then ``commit`` (post-action, watermark).

The Graph twin of :mod:`..imap.watch`, with the same split: a trigger only checks; whoever persists
the result commits, so a crash in between loses nothing.

- Without ``new_only``: the folder's messages matching the criteria, oldest first. Graph's
  ``$filter`` decides dates, read state and "has attachments"; the rest is decided here
  (:mod:`.query`).
- With ``new_only`` the watermark of a folder is a **delta link** (``changeType=created``: new to
  the folder, moved-in messages included; flag changes are not "new") and the Graph ids reported
  from it. Delta cannot start "from now" for messages, so the first round starts from a
  ``receivedDateTime`` bound (:data:`FIRST_ROUND_MARGIN` before the check) and pages through to its
  delta link; the messages already in the folder are found by the criteria's query, as over IMAP
  (without a watermark every matching message is new). An expired delta token
  (``syncStateNotFound``, ``resyncRequired``) starts a fresh round from :data:`RESYNC_MARGIN` before
  the expired link was obtained, skipping the ids already reported: nothing is reported twice, and
  nothing received meanwhile is lost (a message *moved* into the folder during the gap with an older
  ``receivedDateTime`` is the one exception, and is logged nowhere: Graph cannot tell).
- The watermark names the folder's id: a folder renamed or moved elsewhere is still watched through
  its id (its old path no longer resolves); a different folder under the old name starts over from
  the time of the watermark.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_o365mail.core.watch_spec import CheckResult, WatchSpec
from airflow_provider_o365mail.core.watermark import DeltaWatermark, FolderWatermark, Watermark, WatermarkStore
from airflow_provider_o365mail.exceptions import GraphRequestRefused
from airflow_provider_o365mail.graph import folders as graph_folders
from airflow_provider_o365mail.graph.query import compile_query, headers_of, odata_datetime, summarize

log = logging.getLogger(__name__)

#: A first delta round starts this long before the check (mail is stamped ``receivedDateTime`` by the
#: server before it shows in the folder; clocks differ).
FIRST_ROUND_MARGIN = 600.0
#: A round after an expired delta token starts this long before the expired link was obtained.
RESYNC_MARGIN = 3600.0
#: Messages per delta or list page (``Prefer: odata.maxpagesize`` / ``$top``).
PAGE_SIZE = 50
#: Pages of a folder listed per check at most (criteria Graph cannot decide are matched client-side).
MAX_LIST_PAGES = 40
#: Graph's answers to a delta token it no longer knows.
EXPIRED_DELTA_CODES = frozenset({"syncstatenotfound", "resyncrequired", "syncstateinvalid"})
ATTACHMENTS_EXPAND = "attachments($select=name,contentType,size,isInline)"
TRANSPORT = "graph"


@dataclass(frozen=True)
class GraphMailbox:
    """What a watch needs: a :class:`.client.GraphClient`, the mailbox's path (``me`` or
    ``users/{address}``) and the key of the per-process folder-id cache (connection and mailbox)."""

    client: Any
    who: str
    key: Hashable


@dataclass
class _Found:
    messages: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)  # (summary, raw)
    scan: dict[str, Any] | None = None


def _select(spec: WatchSpec, *, headers: bool = False) -> str:
    from airflow_provider_o365mail.graph.query import SUMMARY_FIELDS

    wanted = SUMMARY_FIELDS + (("internetMessageHeaders",) if headers or spec.criteria.header else ())
    return ",".join(wanted)


def graph_summary(message: Mapping[str, Any], folder: str) -> dict[str, Any]:
    """:func:`.query.summarize` with the IMAP-only fields present (``uid``, ``uidvalidity``: ``None``)."""
    summary = summarize(message, folder)
    summary.setdefault("uid", None)
    summary.setdefault("uidvalidity", None)
    return summary


def folder_id(mailbox: GraphMailbox, folder: str, mark: Watermark | None) -> str:
    """The folder's id; a watched folder that was renamed or moved is still found through its watermark."""
    try:
        return graph_folders.resolve(mailbox.client, mailbox.who, folder, key=mailbox.key)
    except GraphRequestRefused as err:
        if err.code == "ErrorItemNotFound" and isinstance(mark, DeltaWatermark):
            log.warning(
                "The folder %r no longer exists under that name; watching the folder it was (id kept in the "
                "watermark), which was renamed or moved.",
                folder,
            )
            return mark.folder_id
        raise


def read_round(mailbox: GraphMailbox, url: str, params: Mapping[str, str] | None) -> tuple[list[dict[str, Any]], str]:
    """Every created message of one delta round (all its pages) and the round's delta link."""
    found: list[dict[str, Any]] = []
    next_url: str | None = url
    query = dict(params) if params else None
    pages = 0
    while next_url:
        pages += 1
        answer = mailbox.client.request(
            "GET",
            next_url,
            doing="reading the folder's changes (delta)",
            params=query,
            headers={"Prefer": f"odata.maxpagesize={PAGE_SIZE}"},
        ).json()
        found.extend(m for m in answer.get("value") or [] if isinstance(m, dict) and "@removed" not in m)
        link = answer.get("@odata.deltaLink")
        if link:
            log.debug("Delta round: %d page(s), %d created message(s).", pages, len(found))
            return found, str(link)
        next_url, query = answer.get("@odata.nextLink"), None
    raise GraphRequestRefused(
        "Microsoft Graph ended a delta round without a deltaLink; cannot tell where the folder's changes end.",
        status=200,
        code="MissingDeltaLink",
    )


def fresh_round(
    mailbox: GraphMailbox, spec: WatchSpec, folder_id_: str, received_from: float, *, headers: bool = False
) -> tuple[list[dict[str, Any]], str]:
    params = {
        "changeType": "created",
        "$select": _select(spec, headers=headers),
        "$expand": ATTACHMENTS_EXPAND,
        "$filter": f"receivedDateTime ge {odata_datetime(dt.datetime.fromtimestamp(received_from, dt.UTC))}",
    }
    return read_round(mailbox, f"{mailbox.who}/mailFolders/{folder_id_}/messages/delta", params)


def is_expired(err: GraphRequestRefused) -> bool:
    return err.status == 410 or str(err.code).lower() in EXPIRED_DELTA_CODES


def matching(spec: WatchSpec, folder: str, raw: list[dict[str, Any]], skip: Callable[[dict[str, Any]], bool]) -> list:
    out = []
    for message in raw:
        summary = graph_summary(message, folder)
        if not skip(summary) and spec.criteria.matches(summary, headers_of(message)):
            out.append((summary, message))
    return out


def list_matching(
    mailbox: GraphMailbox,
    spec: WatchSpec,
    folder: str,
    folder_id_: str,
    limit: int,
    skip: Callable[[dict[str, Any]], bool],
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Messages in the folder matching the criteria, oldest first, until more than ``limit`` matched
    (or the end, or :data:`MAX_LIST_PAGES` pages: the rest is found by the next check)."""
    query = compile_query(spec.criteria)
    params: dict[str, str] | None = {**query.params(top=PAGE_SIZE), "$expand": ATTACHMENTS_EXPAND}
    url: str | None = f"{mailbox.who}/mailFolders/{folder_id_}/messages"
    found: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for _page in range(MAX_LIST_PAGES):
        answer = mailbox.client.request("GET", url, doing=f"listing {folder!r}", params=params).json()
        found.extend(matching(spec, folder, [m for m in answer.get("value") or [] if isinstance(m, dict)], skip))
        url, params = answer.get("@odata.nextLink"), None
        if not url or len(found) > limit:
            return found
    log.warning(
        "Listed %d messages of %r without reaching its end; the criteria Graph cannot decide (sender, recipient, "
        "subject, header, attachment name) are matched here. Narrow the watch with since/unseen/has_attachment.",
        MAX_LIST_PAGES * PAGE_SIZE,
        folder,
    )
    return found


def _check_folder(mailbox: GraphMailbox, spec: WatchSpec, folder: str, mark: Watermark | None, now: float) -> _Found:
    fid = folder_id(mailbox, folder, mark)
    if not spec.new_only:
        return _Found(list_matching(mailbox, spec, folder, fid, spec.max_messages, lambda _s: False))
    delta = mark if isinstance(mark, DeltaWatermark) and mark.folder_id == fid else None
    seen = set(delta.seen_ids) if delta else set()
    # The watch ran over IMAP before: the Message-IDs it reported.
    imap_seen = mark.seen_keys if isinstance(mark, FolderWatermark) else []
    seen_message_ids = {key.rsplit("|", 1)[0] for key in imap_seen}

    def skip(summary: dict[str, Any]) -> bool:
        return summary["graph_id"] in seen or (summary["message_id"] or "") in seen_message_ids

    if delta is not None and delta.delta_link:
        obtained = now
        try:
            raw, link = read_round(mailbox, delta.delta_link, None)
            since = delta.since
        except GraphRequestRefused as err:
            if not is_expired(err):
                raise
            since = min(delta.obtained_at, delta.updated_at or delta.obtained_at) - RESYNC_MARGIN
            log.warning(
                "The delta token of %r expired (%s); reading the folder again from %s, skipping the %d "
                "message(s) already reported.",
                folder,
                err.code or err.status,
                odata_datetime(dt.datetime.fromtimestamp(since, dt.UTC)),
                len(seen),
            )
            raw, link = fresh_round(mailbox, spec, fid, since, headers=bool(spec.criteria.header))
        found = _Found(matching(spec, folder, raw, skip))
    elif mark is not None and delta is None:  # an IMAP watermark, or another folder under this name
        since = mark.updated_at - (86400.0 if isinstance(mark, FolderWatermark) else RESYNC_MARGIN)
        obtained = now
        raw, link = fresh_round(mailbox, spec, fid, since, headers=bool(spec.criteria.header))
        found = _Found(matching(spec, folder, raw, skip))
    else:  # no round yet: the folder's matching messages are all new; the round starts near now
        since = now - FIRST_ROUND_MARGIN
        obtained = now
        raw, link = fresh_round(mailbox, spec, fid, since, headers=bool(spec.criteria.header))
        listed = list_matching(mailbox, spec, folder, fid, spec.max_messages, skip)
        found = _Found([*listed, *matching(spec, folder, raw, skip)])
    found.scan = {"transport": TRANSPORT, "folder_id": fid, "delta_link": link, "obtained_at": obtained, "since": since}
    return found


def check(
    mailbox: GraphMailbox,
    spec: WatchSpec,
    watermarks: Mapping[str, Watermark] | None = None,
    *,
    now: float | None = None,
) -> CheckResult:
    """Find matching messages; change nothing in the mailbox (oldest first, at most ``max_messages``)."""
    watermarks = watermarks or {}
    now = time.time() if now is None else now
    candidates: list[dict[str, Any]] = []
    scanned: dict[str, dict[str, Any]] = {}
    for folder in spec.folders:
        found = _check_folder(mailbox, spec, folder, watermarks.get(folder), now)
        unique: dict[str, dict[str, Any]] = {}
        for summary, _raw in found.messages:
            unique.setdefault(summary["graph_id"], summary)
        candidates.extend(unique.values())
        if found.scan is not None:
            scanned[folder] = found.scan
    candidates.sort(key=lambda m: (str(m.get("received") or ""), str(m.get("graph_id"))))
    kept = candidates[: spec.max_messages]
    if len(candidates) > len(kept):
        for folder in {m["folder"] for m in candidates[len(kept) :]}:
            if folder in scanned:  # the rest waits: the link must not pass what was not reported
                scanned[folder]["delta_link"] = None
    return CheckResult(messages=kept, scanned=scanned)


def advanced(
    watermarks: Mapping[str, Watermark], result: CheckResult, now: float | None = None
) -> dict[str, Watermark]:
    """The watermarks past what ``result`` scanned (pure)."""
    marks = dict(watermarks)
    for folder, scan in result.scanned.items():
        if scan.get("transport") != TRANSPORT:
            continue
        reported = [m.get("graph_id") for m in result.messages if m["folder"] == folder]
        previous = marks.get(folder)
        base = previous if isinstance(previous, DeltaWatermark) else DeltaWatermark(folder_id=scan["folder_id"])
        marks[folder] = base.advanced(
            scan["folder_id"],
            scan.get("delta_link"),
            float(scan["obtained_at"]),
            float(scan["since"]),
            reported,
            now,
            reported_message_ids=[m.get("message_id") for m in result.messages if m["folder"] == folder],
        )
    return marks


def commit(mailbox: GraphMailbox, spec: WatchSpec, result: CheckResult, store: WatermarkStore | None) -> None:
    """Apply the post-action to the reported messages, then advance the watermarks (at once)."""
    apply_post_action(mailbox, spec, result)
    if spec.new_only and store is not None:
        state = store.load_state()
        state.watermarks = advanced(state.watermarks, result)
        store.save_state(state)


def apply_post_action(mailbox: GraphMailbox, spec: WatchSpec, result: CheckResult) -> None:
    """Mark read, flag, move or delete the reported messages (one request each; a message already
    gone, moved or deleted by someone else, is skipped with a warning)."""
    if not spec.post_action or not result.messages:
        return
    destination = None
    if spec.post_action == "move":
        assert spec.move_to is not None
        destination = graph_folders.resolve(mailbox.client, mailbox.who, spec.move_to, key=mailbox.key)
    done = 0
    for message in result.messages:
        graph_id = message.get("graph_id")
        if not graph_id:
            continue
        path = f"{mailbox.who}/messages/{graph_id}"
        doing = f"applying post_action={spec.post_action!r} to {message.get('message_id')}"
        try:
            if spec.post_action == "seen":
                mailbox.client.request("PATCH", path, doing=doing, json={"isRead": True})
            elif spec.post_action == "flag":
                mailbox.client.request("PATCH", path, doing=doing, json={"flag": {"flagStatus": "flagged"}})
            elif spec.post_action == "move":
                mailbox.client.request("POST", f"{path}/move", doing=doing, json={"destinationId": destination})
            elif spec.post_action == "delete":
                mailbox.client.request("DELETE", path, doing=doing)
            done += 1
        except GraphRequestRefused as err:
            if err.status != 404:
                raise
            log.warning(
                "%s is no longer in %s (moved or deleted); %s skipped.",
                message.get("message_id"),
                message["folder"],
                spec.post_action,
            )
    log.info("%s %d message(s) over Microsoft Graph.", spec.post_action, done)


__all__ = [
    "FIRST_ROUND_MARGIN",
    "RESYNC_MARGIN",
    "GraphMailbox",
    "advanced",
    "apply_post_action",
    "check",
    "commit",
    "fresh_round",
    "graph_summary",
    "read_round",
]
