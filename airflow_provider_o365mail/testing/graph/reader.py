"""Reading mail through Graph: folders, messages, attachments, read/flag/move/delete, delta (blocking).

Everything is read from and written to the sandbox's Dovecot (no copy): mail delivered over SMTP
is visible here, and a PATCH ``isRead`` is the ``\\Seen`` flag an IMAP client sees. Message and
folder IDs: :mod:`ids`; query options: :mod:`odata`; MIME to Graph properties: :mod:`mailview`;
delta tokens: :mod:`delta`.

A caller holding only ``Mail.ReadBasic`` (or ``.All``/``.Shared``) gets no ``body``,
``bodyPreview`` or ``uniqueBody`` and no attachments or MIME (403), as the permissions reference
describes Mail.ReadBasic.

Flags: ``flag.flagStatus`` ``flagged`` is IMAP ``\\Flagged``; ``complete`` is the keyword
``$Completed`` (the sandbox's own mapping: IMAP has no "complete"); ``notFlagged`` neither.
"""

from __future__ import annotations

import base64
import email
import hashlib
import re
from collections import OrderedDict
from collections.abc import Callable
from email import policy
from typing import Any
from urllib.parse import urlencode

from airflow_provider_o365mail.testing.graph import delta as deltas
from airflow_provider_o365mail.testing.graph import errors, mailview, odata, views
from airflow_provider_o365mail.testing.graph.drafts import DraftStore
from airflow_provider_o365mail.testing.graph.ids import FOLDER_PREFIX, IdCodec, MessageRef
from airflow_provider_o365mail.testing.graph.mailstore import WELL_KNOWN_FOLDERS, FolderInfo, MailStore, StoredMessage
from airflow_provider_o365mail.testing.graph.messages import read_json
from airflow_provider_o365mail.testing.graph.settings import GraphSettings
from airflow_provider_o365mail.testing.graph.tenant import Mailbox

ROOT_GUID = "00" * 16
COMPLETED = "$Completed"
MAX_TOP = 1000
#: What a message comes with without $select (Graph's default set, less rarely used properties).
DEFAULT_SELECT = (
    *views.DEFAULT_SELECT,
    "lastModifiedDateTime",
    "changeKey",
    "categories",
    "bodyPreview",
    "parentFolderId",
    "conversationId",
    "isReadReceiptRequested",
    "inferenceClassification",
    "body",
    "flag",
)
FULL_READ = ("Mail.Read", "Mail.ReadWrite", "Mail.Read.Shared", "Mail.ReadWrite.Shared")
_CACHE_LIMIT = 2000
_CACHE_MAX_BYTES = 1024 * 1024
_MESSAGE_ID_FILTER = re.compile(r"^\s*internetMessageId\s+eq\s+'((?:[^']|'')+)'\s*$", re.I)
_DELTA_FILTER = re.compile(r"^\s*receivedDateTime\s+(ge|gt)\s+(\S+)\s*$", re.I)


class MailReader:
    def __init__(
        self,
        store: MailStore,
        drafts: DraftStore | None,
        settings: GraphSettings,
        codec: IdCodec,
        delta_store: deltas.DeltaStore,
    ) -> None:
        self.store = store
        self.drafts = drafts
        self.settings = settings
        self.codec = codec
        self.deltas = delta_store
        self._views: OrderedDict[tuple, mailview.MailView] = OrderedDict()

    # ------------------------------------------------------------------ folders
    def _folders(self, mailbox: Mailbox) -> list[FolderInfo]:
        return self.store.folders(mailbox.address)

    def folder(self, mailbox: Mailbox, reference: str, folders: list[FolderInfo] | None = None) -> FolderInfo | None:
        """The folder ``reference`` names (well-known name or ID); None for the root (msgfolderroot)."""
        folders = folders if folders is not None else self._folders(mailbox)
        if reference.lower() == "msgfolderroot":
            return None
        name = WELL_KNOWN_FOLDERS.get(reference.lower())
        guid = None if name else self.codec.folder_guid(mailbox.address, reference)
        if guid == ROOT_GUID:
            return None
        for info in folders:
            if (name and info.name == name) or (guid and info.guid == guid):
                return info
        if name or guid or reference.startswith(FOLDER_PREFIX):
            raise errors.item_not_found()
        raise errors.id_malformed()

    def folder_id(self, mailbox: Mailbox, info: FolderInfo | None) -> str:
        return self.codec.folder_id(mailbox.address, info.guid if info else ROOT_GUID)

    def _folder_json(self, mailbox: Mailbox, info: FolderInfo | None, folders: list[FolderInfo]) -> dict[str, Any]:
        name = info.name if info else None
        children = [f for f in folders if f.parent == name and f is not info]
        parent = None
        if info is not None:
            parent = next((f for f in folders if f.name == info.parent), None) if info.parent else None
        return {
            "id": self.folder_id(mailbox, info),
            "displayName": info.display_name if info else "Top of Information Store",
            "parentFolderId": self.folder_id(mailbox, parent) if info is not None else None,
            "childFolderCount": len(children),
            "unreadItemCount": info.unseen if info else 0,
            "totalItemCount": info.messages if info else 0,
            "sizeInBytes": info.size if info else 0,
            "isHidden": False,
        }

    def get_folder(self, mailbox: Mailbox, reference: str) -> dict[str, Any]:
        folders = self._folders(mailbox)
        info = self.folder(mailbox, reference, folders)
        context = f"{views.GRAPH_ROOT}/$metadata#users('{mailbox.oid}')/mailFolders/$entity"
        return {"@odata.context": context, **self._folder_json(mailbox, info, folders)}

    def list_folders(
        self, mailbox: Mailbox, parent_reference: str | None, query: dict[str, str], base: str
    ) -> dict[str, Any]:
        """``.../mailFolders`` (the root's children) or ``.../mailFolders/{id}/childFolders``."""
        folders = self._folders(mailbox)
        parent = self.folder(mailbox, parent_reference, folders) if parent_reference else None
        parent_name = parent.name if parent else None
        children = [f for f in folders if f.parent == parent_name and f is not parent]
        children.sort(key=lambda f: (f.name.upper() != "INBOX", f.name.lower()))
        top, skip = _paging(query, self.settings.list_page_size)
        value = [self._folder_json(mailbox, f, folders) for f in children[skip : skip + top]]
        selected = odata_folder_select(query.get("$select"))
        if selected:
            value = [{k: v for k, v in item.items() if k in selected or k == "id"} for item in value]
        answer: dict[str, Any] = {
            "@odata.context": f"{views.GRAPH_ROOT}/$metadata#users('{mailbox.oid}')/mailFolders",
            "value": value,
        }
        if skip + top < len(children):
            answer["@odata.nextLink"] = _next_link(base, query, skip + top)
        return answer

    # ------------------------------------------------------------------ one message
    def _view(self, mailbox: Mailbox, info: FolderInfo, uid: int, raw: bytes | None = None) -> mailview.MailView | None:
        key = (mailbox.address, info.guid, info.uidvalidity, uid)
        if key in self._views:
            self._views.move_to_end(key)
            return self._views[key]
        if raw is None:
            raw = self.store.raw(mailbox.address, info.name, [uid]).get(uid)
            if raw is None:
                return None
        parsed = mailview.view(raw)
        if len(raw) <= _CACHE_MAX_BYTES:
            self._views[key] = parsed
            while len(self._views) > _CACHE_LIMIT:
                self._views.popitem(last=False)
        return parsed

    def _views_for(self, mailbox: Mailbox, info: FolderInfo, uids: list[int]) -> dict[int, mailview.MailView]:
        out = {}
        missing = []
        for uid in uids:
            key = (mailbox.address, info.guid, info.uidvalidity, uid)
            if key in self._views:
                out[uid] = self._views[key]
            else:
                missing.append(uid)
        for start in range(0, len(missing), 50):
            batch = missing[start : start + 50]
            for uid, raw in self.store.raw(mailbox.address, info.name, batch).items():
                parsed = self._view(mailbox, info, uid, raw)
                if parsed is not None:
                    out[uid] = parsed
        return out

    def locate(self, mailbox: Mailbox, message_id: str) -> tuple[FolderInfo, StoredMessage]:
        """The folder and stored message ``message_id`` stands for (404 when it is not there)."""
        folders = self._folders(mailbox)
        draft = self._draft(mailbox, message_id)
        if draft is not None:
            info = next((f for f in folders if f.name == "Drafts"), None)
            uid = draft.uid
        else:
            ref = self.codec.message_ref(mailbox.address, message_id)
            info = next((f for f in folders if f.guid == ref.folder_guid), None)
            if info is not None and info.uidvalidity != ref.uidvalidity:
                info = None
            uid = ref.uid
        found = self.store.find(mailbox.address, info.name, uids=[uid]) if info is not None and uid else []
        if info is None or not found:
            raise errors.item_not_found()
        return info, found[0]

    def _draft(self, mailbox: Mailbox, message_id: str) -> Any:
        if self.drafts is None or message_id.startswith(FOLDER_PREFIX):
            return None
        try:
            return self.drafts.get(mailbox.address, message_id)
        except errors.GraphError:
            return None

    def message_json(
        self,
        mailbox: Mailbox,
        info: FolderInfo,
        stored: StoredMessage,
        view: mailview.MailView | None,
        *,
        body_type: str,
        full: bool,
        draft_ids: dict[int, str] | None = None,
    ) -> dict[str, Any]:
        message_id = (draft_ids or {}).get(stored.uid) or self.codec.message_id(
            mailbox.address, MessageRef(info.guid, info.uidvalidity, stored.uid)
        )
        message = views.message_from_headers(
            stored.header,
            message_id=message_id,
            received=stored.received,
            is_read="\\Seen" in stored.flags,
            is_draft="\\Draft" in stored.flags or info.name == "Drafts",
            context="",
        )
        del message["@odata.context"]
        change_key = base64.b64encode(hashlib.sha256(f"{message_id}|{stored.modseq}".encode()).digest()[:18]).decode()
        parsed = email.message_from_string(stored.header, policy=policy.default)
        references = str(parsed.get("References", "")).split()
        thread = references[0] if references else message["internetMessageId"]
        flag = "flagged" if "\\Flagged" in stored.flags else "complete" if COMPLETED in stored.flags else "notFlagged"
        message.update(
            {
                "@odata.etag": f'W/"{change_key}"',
                "changeKey": change_key,
                "categories": [],
                "parentFolderId": self.codec.folder_id(mailbox.address, info.guid),
                "conversationId": "AAQkAG"
                + base64.urlsafe_b64encode(hashlib.sha256(thread.encode()).digest()).decode(),
                "isReadReceiptRequested": "Disposition-Notification-To" in parsed,
                "inferenceClassification": "focused",
                "flag": {"flagStatus": flag},
                "internetMessageHeaders": [{"name": k, "value": str(v)} for k, v in parsed.items()],
            }
        )
        if view is not None:
            message["hasAttachments"] = view.has_attachments
            if full:
                message["body"] = view.body(body_type)
                message["uniqueBody"] = message["body"]
                message["bodyPreview"] = view.preview()
        return message

    def _render(
        self, mailbox: Mailbox, info: FolderInfo, rows: list[StoredMessage], selected: list[str] | None, **kw: Any
    ) -> list[dict[str, Any]]:
        wanted = selected or list(DEFAULT_SELECT)
        found = self._views_for(mailbox, info, [r.uid for r in rows]) if odata.BODY_PROPERTIES & set(wanted) else {}
        return [
            _select(self.message_json(mailbox, info, row, found.get(row.uid), **kw), wanted, kw["full"]) for row in rows
        ]

    def get_message(
        self, mailbox: Mailbox, message_id: str, query: dict[str, str], *, body_type: str, full: bool
    ) -> dict[str, Any]:
        info, stored = self.locate(mailbox, message_id)
        selected = odata.parse_select(query.get("$select"))
        [message] = self._render(mailbox, info, [stored], selected, body_type=body_type, full=full)
        context = f"{views.GRAPH_ROOT}/$metadata#users('{mailbox.oid}')/messages/$entity"
        return {"@odata.context": context, **message}

    def message_mime(self, mailbox: Mailbox, message_id: str) -> bytes:
        info, stored = self.locate(mailbox, message_id)
        raw = self.store.raw(mailbox.address, info.name, [stored.uid]).get(stored.uid)
        if raw is None:
            raise errors.item_not_found()
        return raw

    # ------------------------------------------------------------------ listing
    def list_messages(
        self,
        mailbox: Mailbox,
        folder_reference: str | None,
        query: dict[str, str],
        base: str,
        *,
        body_type: str,
        full: bool,
    ) -> dict[str, Any]:
        folders = self._folders(mailbox)
        if folder_reference is not None:
            info = self.folder(mailbox, folder_reference, folders)
            targets = [info] if info is not None else []
        else:
            targets = list(folders)
        selected = odata.parse_select(query.get("$select"))
        filter_ = odata.parse_filter(query["$filter"]) if "$filter" in query else None
        orderby = odata.parse_orderby(query["$orderby"]) if "$orderby" in query else None
        search = odata.parse_search(query["$search"]) if "$search" in query else None
        if search is not None and filter_ is not None:
            raise errors.search_with("$filter")
        if search is not None and orderby is not None:
            raise errors.search_with("$orderBy")
        if filter_ is not None and orderby is not None:
            odata.check_filter_and_orderby(filter_, orderby)
        top, skip = _paging(query, self.settings.list_page_size)
        expand = expanded_attachments(query.get("$expand"))
        named = set(filter_.properties if filter_ else ()) | {name.split("/")[0] for name, _ in orderby or ()}
        need_views = search is not None or bool(odata.BODY_PROPERTIES & named)
        draft_ids = {d.uid: d.id for d in self.drafts.of_mailbox(mailbox.address)} if self.drafts else {}
        rows: list[tuple[dict[str, Any], FolderInfo, StoredMessage, mailview.MailView | None]] = []
        # A lookup by Message-ID (how a sender finds its copy in Sent Items) asks Dovecot for that header only.
        narrow = _MESSAGE_ID_FILTER.match(query.get("$filter", ""))
        wanted_id = narrow.group(1).replace("''", "'") if narrow else None
        for info in targets:
            stored = self.store.find(mailbox.address, info.name, wanted_id)
            found = self._views_for(mailbox, info, [s.uid for s in stored]) if need_views else {}
            for item in stored:
                view = found.get(item.uid)
                message = self.message_json(
                    mailbox,
                    info,
                    item,
                    view,
                    body_type=body_type,
                    full=True,
                    draft_ids=draft_ids if info.name == "Drafts" else None,
                )
                rows.append((message, info, item, view))
        if filter_ is not None:
            rows = [r for r in rows if filter_.matches(r[0])]
        if search is not None:
            rows = [r for r in rows if search.matches(_search_texts(r[0], r[3]))]
            rows.sort(key=lambda r: r[0]["sentDateTime"], reverse=True)
            rows = rows[: self.settings.search_max_results]
        elif orderby:
            key = odata.sort_key(orderby)
            rows.sort(key=lambda r: key(r[0]))
        else:
            rows.sort(key=lambda r: (r[2].received, r[2].uid), reverse=True)
        page = rows[skip : skip + top]
        wanted = selected or list(DEFAULT_SELECT)
        value = []
        for message, info, item, view in page:
            if view is None and odata.BODY_PROPERTIES & set(wanted):
                view = self._view(mailbox, info, item.uid)
                message = self.message_json(
                    mailbox,
                    info,
                    item,
                    view,
                    body_type=body_type,
                    full=True,
                    draft_ids=draft_ids if info.name == "Drafts" else None,
                )
            item_json = _select(message, wanted, full)
            if expand is not None:
                item_json["attachments"] = self._expanded(mailbox, info, item, view, item_json["id"], expand)
            value.append(item_json)
        where = f"mailFolders('{folder_reference}')/messages" if folder_reference else "messages"
        answer: dict[str, Any] = {
            "@odata.context": f"{views.GRAPH_ROOT}/$metadata#users('{mailbox.oid}')/{where}",
            "value": value,
        }
        if skip + top < len(rows):
            answer["@odata.nextLink"] = _next_link(base, query, skip + top)
        return answer

    def _expanded(
        self,
        mailbox: Mailbox,
        info: FolderInfo,
        stored: StoredMessage,
        view: mailview.MailView | None,
        message_id: str,
        selected: list[str],
    ) -> list[dict[str, Any]]:
        """``$expand=attachments($select=...)``: the message's attachments, without their content."""
        view = view or self._view(mailbox, info, stored.uid)
        if view is None:
            return []
        modified = views.iso(stored.received)
        out = []
        for part in view.attachments:
            item = mailview.attachment_json(part, message_id, with_content=False, modified=modified)
            if selected:
                item = {k: v for k, v in item.items() if k in selected or k in ("id", "@odata.type")}
            out.append(item)
        return out

    # ------------------------------------------------------------------ attachments
    def _attachments(self, mailbox: Mailbox, message_id: str) -> tuple[mailview.MailView, str]:
        info, stored = self.locate(mailbox, message_id)
        raw = self.store.raw(mailbox.address, info.name, [stored.uid]).get(stored.uid)
        if raw is None:
            raise errors.item_not_found()
        return mailview.view(raw), views.iso(stored.received)

    def _attachment(self, mailbox: Mailbox, message_id: str, attachment_id: str) -> tuple[mailview.Part, str]:
        parsed, modified = self._attachments(mailbox, message_id)
        for part in parsed.attachments:
            if mailview.attachment_id(message_id, part.index) == attachment_id:
                return part, modified
        raise errors.item_not_found()

    def list_attachments(self, mailbox: Mailbox, message_id: str) -> dict[str, Any]:
        parsed, modified = self._attachments(mailbox, message_id)
        context = f"{views.GRAPH_ROOT}/$metadata#users('{mailbox.oid}')/messages('{message_id}')/attachments"
        value = [
            mailview.attachment_json(p, message_id, with_content=True, modified=modified) for p in parsed.attachments
        ]
        return {"@odata.context": context, "value": value}

    def get_attachment(
        self, mailbox: Mailbox, message_id: str, attachment_id: str, query: dict[str, str]
    ) -> dict[str, Any]:
        part, modified = self._attachment(mailbox, message_id, attachment_id)
        context = f"{views.GRAPH_ROOT}/$metadata#users('{mailbox.oid}')/messages('{message_id}')/attachments/$entity"
        answer = {
            "@odata.context": context,
            **mailview.attachment_json(part, message_id, with_content=True, modified=modified),
        }
        if part.is_item and "item" in query.get("$expand", "").lower():
            inner = mailview.parse(part.data)
            header = part.data[: part.data.find(b"\r\n\r\n") + 2].decode("utf-8", errors="replace")
            item = views.message_from_headers(
                header, message_id="", received=0.0, is_read=True, is_draft=False, context=""
            )
            del item["@odata.context"], item["@odata.etag"]
            item["receivedDateTime"] = item["sentDateTime"]
            item["createdDateTime"] = item["lastModifiedDateTime"] = item["sentDateTime"]
            item["hasAttachments"] = inner.is_multipart() and mailview.view(part.data).has_attachments
            answer["item"] = {"@odata.type": "#microsoft.graph.message", **item}
        return answer

    def attachment_value(self, mailbox: Mailbox, message_id: str, attachment_id: str) -> tuple[bytes, str]:
        part, _ = self._attachment(mailbox, message_id, attachment_id)
        return part.data, (self.settings.mime_content_type if part.is_item else part.content_type)

    # ------------------------------------------------------------------ changes
    def update_message(self, mailbox: Mailbox, message_id: str, body: bytes, *, body_type: str) -> dict[str, Any]:
        changes = read_json(body)
        add: list[str] = []
        remove: list[str] = []
        for name, value in changes.items():
            if name == "isRead":
                if not isinstance(value, bool):
                    raise errors.bad_query(f"Cannot convert the literal '{value}' to the expected type 'Edm.Boolean'.")
                (add if value else remove).append("\\Seen")
            elif name == "flag":
                status = value.get("flagStatus") if isinstance(value, dict) else None
                if status not in ("notFlagged", "flagged", "complete"):
                    raise errors.bad_query(f"Invalid flagStatus '{status}' (notFlagged, flagged or complete).")
                add += {"flagged": ["\\Flagged"], "complete": [COMPLETED], "notFlagged": []}[status]
                remove += {"flagged": [COMPLETED], "complete": ["\\Flagged"], "notFlagged": ["\\Flagged", COMPLETED]}[
                    status
                ]
            else:
                raise errors.unsupported(f"updating '{name}' of a message (isRead and flag only)")
        info, stored = self.locate(mailbox, message_id)
        self.store.set_flags(mailbox.address, info.name, stored.uid, add=add, remove=remove)
        return self.get_message(mailbox, message_id, {}, body_type=body_type, full=True)

    def move_message(self, mailbox: Mailbox, message_id: str, body: bytes, *, body_type: str) -> dict[str, Any]:
        destination_ref = read_json(body).get("destinationId")
        if not isinstance(destination_ref, str) or not destination_ref:
            raise errors.invalid_request("The 'destinationId' parameter is required.")
        folders = self._folders(mailbox)
        destination = self.folder(mailbox, destination_ref, folders)
        if destination is None:
            raise errors.invalid_request("Messages cannot be moved to the root folder.")
        info, stored = self.locate(mailbox, message_id)
        new_uid = self._move(mailbox, info, destination, stored)
        new_id = self.codec.message_id(mailbox.address, MessageRef(destination.guid, destination.uidvalidity, new_uid))
        return self.get_message(mailbox, new_id, {}, body_type=body_type, full=True)

    def _move(self, mailbox: Mailbox, source: FolderInfo, destination: FolderInfo, stored: StoredMessage) -> int:
        if source.guid == destination.guid:
            return stored.uid
        new_uid = self.store.move(mailbox.address, source.name, destination.name, stored.uid, stored.guid)
        if new_uid is None:
            raise errors.item_not_found()
        return new_uid

    def delete_message(self, mailbox: Mailbox, message_id: str) -> None:
        info, stored = self.locate(mailbox, message_id)
        if self.settings.delete_to_deleted_items and info.name != "Deleted Items":
            trash = self.folder(mailbox, "deleteditems")
            if trash is not None:
                self._move(mailbox, info, trash, stored)
                return
        self.store.expunge(mailbox.address, info.name, stored.uid)

    # ------------------------------------------------------------------ delta
    def delta(
        self,
        mailbox: Mailbox,
        folder_reference: str,
        query: dict[str, str],
        link_base: Callable[[str], str],
        *,
        max_page_size: int | None,
        body_type: str,
        full: bool,
    ) -> dict[str, Any]:
        info = self.folder(mailbox, folder_reference)
        if info is None:
            raise errors.unsupported("delta on the root folder (messages live in its child folders)")
        base = link_base(self.folder_id(mailbox, info))
        self.deltas.capacity = self.settings.delta_token_cache
        skip_value, delta_value = query.get("$skiptoken"), query.get("$deltatoken")
        if skip_value is not None or delta_value:
            token = self.deltas.load(skip_value if skip_value is not None else str(delta_value))
            wanted_kind = "skip" if skip_value is not None else "delta"
            if token is None or token.kind != wanted_kind or token.mailbox != mailbox.address:
                raise errors.sync_state_not_found(self.settings.delta_expired_status)
            if token.folder_guid != info.guid:
                raise errors.sync_state_not_found(self.settings.delta_expired_status)
            if token.expired == deltas.RESET:
                raise errors.resync_required(f"{base}?{urlencode({**token.params, '$deltatoken': ''}, safe='$')}")
            if token.expired:
                raise errors.sync_state_not_found(self.settings.delta_expired_status)
            params = token.params
            if token.kind == "skip":
                pending, state, received = token.pending, token.state, {}
            else:
                snapshot, received = self._snapshot(mailbox, info, params)
                pending = self._changes(token, info, snapshot)
                state = {str(uid): modseq for uid, modseq in snapshot.items()}
        else:
            params = _delta_params(query)
            snapshot, received = self._snapshot(mailbox, info, params)
            order = (
                sorted(snapshot, key=lambda uid: (-received[uid], -uid)) if "$orderby" in params else sorted(snapshot)
            )
            pending = [[uid, "created", info.uidvalidity] for uid in order]
            state = {str(uid): modseq for uid, modseq in snapshot.items()}
        size = max_page_size or int(params.get("$top") or 0) or self.settings.delta_page_size
        page, rest = pending[:size], pending[size:]
        value = self._delta_page(mailbox, info, page, params, body_type=body_type, full=full)
        answer: dict[str, Any] = {"@odata.context": f"{views.GRAPH_ROOT}/$metadata#Collection(message)"}
        common = {"mailbox": mailbox.address, "folder_guid": info.guid, "uidvalidity": info.uidvalidity}
        if rest:
            token = deltas.Token(deltas.new_token_value(), "skip", params=params, state=state, pending=rest, **common)
            answer["@odata.nextLink"] = f"{base}?$skiptoken={self.deltas.save(token).value}"
        else:
            token = deltas.Token(deltas.new_token_value(), "delta", params=params, state=state, **common)
            answer["@odata.deltaLink"] = f"{base}?$deltatoken={self.deltas.save(token).value}"
        answer["value"] = value
        return answer

    def _snapshot(
        self, mailbox: Mailbox, info: FolderInfo, params: dict[str, str]
    ) -> tuple[dict[int, int], dict[int, float]]:
        rows = self.store.find(mailbox.address, info.name)
        bound = params.get("$filter")
        if bound:
            operator, when = _DELTA_FILTER.match(bound).groups()  # type: ignore[union-attr]
            limit = odata.parse_datetime(when).timestamp()
            rows = [r for r in rows if (r.received > limit if operator.lower() == "gt" else r.received >= limit)]
            rows = sorted(rows, key=lambda r: (-r.received, -r.uid))[: self.settings.delta_filter_limit]
        return {r.uid: r.modseq for r in rows}, {r.uid: r.received for r in rows}

    def _changes(self, token: deltas.Token, info: FolderInfo, snapshot: dict[int, int]) -> list[list[Any]]:
        old = {int(uid): modseq for uid, modseq in token.state.items()}
        if token.uidvalidity != info.uidvalidity:
            if self.settings.delta_uidvalidity_change != "replay":
                raise errors.sync_state_not_found(self.settings.delta_expired_status)
            pending = [[uid, "deleted", token.uidvalidity] for uid in sorted(old)]
            pending += [[uid, "created", info.uidvalidity] for uid in sorted(snapshot)]
        else:
            pending = [[uid, kind, info.uidvalidity] for uid, kind in deltas.changes(old, snapshot)]
        wanted = token.params.get("changeType")
        return [p for p in pending if not wanted or p[1] == wanted]

    def _delta_page(
        self, mailbox: Mailbox, info: FolderInfo, page: list[list[Any]], params: dict[str, str], **kw: Any
    ) -> list[dict[str, Any]]:
        live_uids = [
            int(uid) for uid, kind, uidvalidity in page if kind != "deleted" and uidvalidity == info.uidvalidity
        ]
        stored = {s.uid: s for s in self.store.find(mailbox.address, info.name, uids=live_uids)}
        selected = odata.parse_select(params.get("$select"))
        rendered = {
            m_uid: m
            for m_uid, m in zip(stored, self._render(mailbox, info, list(stored.values()), selected, **kw), strict=True)
        }
        expand = expanded_attachments(params.get("$expand"))
        out = []
        for uid, kind, uidvalidity in page:
            uid = int(uid)
            if kind != "deleted" and uid in rendered:
                item = {"@odata.type": "#microsoft.graph.message", **rendered[uid]}
                if expand is not None:
                    item["attachments"] = self._expanded(mailbox, info, stored[uid], None, item["id"], expand)
                out.append(item)
                continue
            message_id = self.codec.message_id(mailbox.address, MessageRef(info.guid, int(uidvalidity), uid))
            out.append({"@odata.type": "#microsoft.graph.message", "id": message_id, "@removed": {"reason": "deleted"}})
        return out


# ---------------------------------------------------------------------- helpers
def _select(message: dict[str, Any], wanted: list[str], full: bool) -> dict[str, Any]:
    out = {"@odata.etag": message["@odata.etag"], "id": message["id"]}
    for name in wanted:
        if name in message and (full or name not in ("body", "bodyPreview", "uniqueBody")):
            out[name] = message[name]
    return out


def _search_texts(message: dict[str, Any], view: mailview.MailView | None) -> dict[str, str]:
    def people(*fields: str) -> str:
        found = []
        for field in fields:
            value = message.get(field)
            for item in value if isinstance(value, list) else [value] if value else []:
                address = item.get("emailAddress", {})
                found.append(f"{address.get('name', '')} {address.get('address', '')}")
        return " ".join(found)

    return {
        "subject": str(message.get("subject") or ""),
        "body": view.search_text() if view is not None else "",
        "from": people("from"),
        "to": people("toRecipients"),
        "cc": people("ccRecipients"),
    }


def _paging(query: dict[str, str], default_top: int) -> tuple[int, int]:
    try:
        top = int(query.get("$top", str(default_top)))
        skip = int(query.get("$skip", "0"))
    except ValueError:
        raise errors.bad_query("Invalid $top or $skip value.") from None
    if skip < 0:
        raise errors.bad_query("Invalid $skip value.")
    return max(1, min(top, MAX_TOP)), skip


def _next_link(base: str, query: dict[str, str], skip: int) -> str:
    params = {k: v for k, v in query.items() if k != "$skip"}
    params["$skip"] = str(skip)
    return f"{base}?{urlencode(params)}"


def _delta_params(query: dict[str, str]) -> dict[str, str]:
    """The options of a delta round's first request, checked as delta-query-messages.md describes them."""
    if "$search" in query:
        raise errors.bad_query("$search is not supported in a delta query on messages.")
    params = {}
    change = query.get("changeType")
    if change is not None:
        if change not in deltas.CHANGE_TYPES:
            raise errors.bad_query(f"Invalid changeType '{change}' (created, updated or deleted).")
        params["changeType"] = change
    if "$select" in query:
        odata.parse_select(query["$select"])
        params["$select"] = query["$select"]
    if "$filter" in query:
        found = _DELTA_FILTER.match(query["$filter"])
        try:
            valid = found is not None and bool(odata.parse_datetime(found.group(2)))
        except ValueError:
            valid = False
        if not valid:
            raise errors.bad_query("The only supported $filter in a delta query is 'receivedDateTime ge|gt {value}'.")
        params["$filter"] = query["$filter"]
    if "$orderby" in query:
        if " ".join(query["$orderby"].split()).lower() != "receiveddatetime desc":
            raise errors.bad_query("The only supported $orderby in a delta query is 'receivedDateTime desc'.")
        params["$orderby"] = query["$orderby"]
    if "$top" in query:
        try:
            top = int(query["$top"])
        except ValueError:
            raise errors.bad_query("Invalid $top value.") from None
        params["$top"] = str(max(1, min(top, MAX_TOP)))
    if "$expand" in query:
        expanded_attachments(query["$expand"])
        params["$expand"] = query["$expand"]
    return params


_EXPAND = re.compile(r"^\s*attachments\s*(?:\(\s*\$select\s*=\s*([^)]*)\))?\s*$", re.I)
ATTACHMENT_PROPERTIES = ("id", "name", "contentType", "size", "isInline", "lastModifiedDateTime", "contentId")


def expanded_attachments(text: str | None) -> list[str] | None:
    """The attachment properties ``$expand=attachments($select=...)`` asks for ([] = all); None: no expand."""
    if not text:
        return None
    found = _EXPAND.match(text)
    if found is None:
        raise errors.bad_query(f"Parsing OData Select and Expand failed: '{text}' cannot be expanded here.")
    known = {p.lower(): p for p in ATTACHMENT_PROPERTIES}
    selected = []
    for name in (found.group(1) or "").split(","):
        if name.strip():
            if name.strip().lower() not in known:
                raise errors.unknown_property(name.strip())
            selected.append(known[name.strip().lower()])
    return selected


FOLDER_PROPERTIES = (
    "id",
    "displayName",
    "parentFolderId",
    "childFolderCount",
    "unreadItemCount",
    "totalItemCount",
    "sizeInBytes",
    "isHidden",
)


def odata_folder_select(text: str | None) -> set[str] | None:
    if not text:
        return None
    known = {p.lower(): p for p in FOLDER_PROPERTIES}
    out = set()
    for raw in text.split(","):
        name = raw.strip()
        if name and name.lower() not in known:
            raise errors.GraphError(
                400, "BadRequest", f"Could not find a property named '{name}' on type 'microsoft.graph.mailFolder'."
            )
        if name:
            out.add(known[name.lower()])
    return out or None
