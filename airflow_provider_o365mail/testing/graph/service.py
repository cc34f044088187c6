"""What each Graph mail operation does once the request is admitted (blocking: run it in a thread).

Permissions (Graph permissions reference; outlook-send-mail-from-other-user.md; known-issues.md):

=====================  ===========================  ==================================  ============================
operation              delegated, own mailbox       delegated, another mailbox          application
=====================  ===========================  ==================================  ============================
sendMail, send         Mail.Send                    Mail.Send.Shared + Full Access      Mail.Send
drafts, attachments    Mail.ReadWrite               Mail.ReadWrite.Shared + Full Access Mail.ReadWrite
createUploadSession    Mail.ReadWrite               always 403 (documented known issue) Mail.ReadWrite
list/get folders,      Mail.ReadBasic/Read/RW       Mail.ReadBasic/Read(Write).Shared   Mail.ReadBasic.All/Read/RW
messages, delta                                     + Full Access
$value, attachments    Mail.Read/RW                 Mail.Read(Write).Shared + Full Acc. Mail.Read/RW
PATCH, move, DELETE    Mail.ReadWrite               Mail.ReadWrite.Shared + Full Access Mail.ReadWrite
=====================  ===========================  ==================================  ============================

Mail.ReadBasic reads everything but the body, the preview and the attachments (permissions reference).

A ``from`` other than the sending account needs Send As or Send on Behalf on that address (and, for a
delegated token, Mail.Send.Shared), else 403 ``ErrorSendAsDenied``. The sending account is the
signed-in user for a delegated token and the mailbox in the URL for an app-only token.
"""

from __future__ import annotations

import email
import email.utils
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from typing import Any

from airflow_provider_o365mail.testing.graph import errors, messages, views
from airflow_provider_o365mail.testing.graph.drafts import Draft, DraftStore, StoredAttachment
from airflow_provider_o365mail.testing.graph.mailstore import MailStore
from airflow_provider_o365mail.testing.graph.messages import Composed
from airflow_provider_o365mail.testing.graph.reader import MailReader
from airflow_provider_o365mail.testing.graph.settings import GraphSettings
from airflow_provider_o365mail.testing.graph.tenant import Mailbox, Tenant
from airflow_provider_o365mail.testing.graph.tokens import Caller
from airflow_provider_o365mail.testing.graph.uploads import UploadBook, UploadSession, check_chunk


@dataclass(frozen=True)
class Permission:
    own: tuple[str, ...]
    shared: tuple[str, ...]
    app: tuple[str, ...]


SEND = Permission(("Mail.Send",), ("Mail.Send.Shared",), ("Mail.Send",))
READ_WRITE = Permission(("Mail.ReadWrite",), ("Mail.ReadWrite.Shared",), ("Mail.ReadWrite",))
READ = Permission(
    ("Mail.ReadBasic", "Mail.Read", "Mail.ReadWrite"),
    ("Mail.ReadBasic.Shared", "Mail.Read.Shared", "Mail.ReadWrite.Shared"),
    ("Mail.ReadBasic.All", "Mail.Read", "Mail.ReadWrite"),
)
READ_FULL = Permission(
    ("Mail.Read", "Mail.ReadWrite"),
    ("Mail.Read.Shared", "Mail.ReadWrite.Shared"),
    ("Mail.Read", "Mail.ReadWrite"),
)
#: The permission each operation needs.
OPERATION_PERMISSIONS = {
    "sendMail": SEND,
    "send": SEND,
    "createMessage": READ_WRITE,
    "addAttachment": READ_WRITE,
    "createUploadSession": READ_WRITE,
    "listMessages": READ,
    "listMailFolders": READ,
    "listChildFolders": READ,
    "getMailFolder": READ,
    "getMessage": READ,
    "messagesDelta": READ,
    "getMessageValue": READ_FULL,
    "listAttachments": READ_FULL,
    "getAttachment": READ_FULL,
    "getAttachmentValue": READ_FULL,
    "updateMessage": READ_WRITE,
    "moveMessage": READ_WRITE,
    "deleteMessage": READ_WRITE,
}


def parse_bool(value: Any, name: str) -> bool:
    """``saveToSentItems`` as a boolean or, as in Microsoft's own example, the string ``"false"``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise errors.GraphError(
        400, "BadRequest", f"Cannot convert the literal '{value}' to the expected type 'Edm.Boolean' ({name})."
    )


class GraphService:
    def __init__(
        self,
        tenant: Tenant,
        store: MailStore,
        drafts: DraftStore,
        uploads: UploadBook,
        settings: GraphSettings,
        *,
        tenant_id: str,
        id_domain: str,
        record_secret: Callable[[str], None] = lambda _: None,
        reader: MailReader | None = None,
    ) -> None:
        self.tenant = tenant
        self.store = store
        self.drafts = drafts
        self.uploads = uploads
        self.settings = settings
        self.tenant_id = tenant_id
        self.id_domain = id_domain
        self.record_secret = record_secret
        #: The read operations (folders, messages, attachments, delta); None where only sending is served.
        self.reader = reader
        self._log_lock = threading.Lock()
        self.deliveries: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ who and what
    def mailbox(self, caller: Caller, reference: str | None) -> Mailbox:
        """The mailbox of ``/me`` (``reference`` None) or ``/users/{reference}``."""
        if reference is None:
            if not caller.delegated or not caller.upn:
                raise errors.me_needs_delegated_token()
            return self.tenant.mailbox_of_user(caller.upn)
        return self.tenant.resolve(reference)

    def authorize(self, caller: Caller, mailbox: Mailbox, operation: str) -> None:
        permission = OPERATION_PERMISSIONS[operation]
        if not caller.delegated:
            if not caller.has(*permission.app):
                raise errors.access_denied()
            if not self.tenant.app_may_open(caller.app_id, mailbox):
                raise errors.access_policy_denied()
            return
        if mailbox.address == caller.upn:
            if not caller.has(*permission.own, *permission.shared):
                raise errors.access_denied()
            return
        if operation == "createUploadSession":
            raise errors.access_denied()  # known-issues.md: delegated upload sessions work only in one's own mailbox
        if not caller.has(*permission.shared) or not self.tenant.full_access(caller.upn or "", mailbox):
            raise errors.access_denied()

    def _sender_for(self, caller: Caller, mailbox: Mailbox, from_address: str | None) -> tuple[str, str] | None:
        """Check the right to send from ``from_address``; the delegate to name in ``Sender:`` (Send on Behalf)."""
        actor = caller.upn if caller.delegated and caller.upn else mailbox.address
        wanted = (from_address or mailbox.address).lower()
        if wanted == actor:
            return None
        if caller.delegated and not caller.has("Mail.Send.Shared"):
            raise errors.send_as_denied()
        right = self.tenant.send_right(actor, wanted)
        if right is None:
            raise errors.send_as_denied()
        return (self.tenant.display_name(actor), actor) if right == "behalf" else None

    # ------------------------------------------------------------------ sendMail
    def send_mail(self, caller: Caller, mailbox: Mailbox, content_type: str, body: bytes) -> dict[str, Any]:
        if content_type.startswith("text/plain"):
            mime = messages.decode_mime(body)
            from_header = _from_of(mime)
            sender = self._sender_for(caller, mailbox, from_header)
            if sender is not None:
                mime["Sender"] = messages._format(*sender)
            composed = messages.from_mime(
                mime,
                mailbox=mailbox.address,
                mailbox_name=mailbox.display_name,
                attachments=[],
                id_domain=self.id_domain,
            )
            save = True
        else:
            payload = messages.read_json(body)
            message = payload.get("message")
            if not isinstance(message, dict):
                raise errors.invalid_request("The 'message' parameter is required and must be a message object.")
            save = parse_bool(payload.get("saveToSentItems", True), "saveToSentItems")
            sender = self._sender_for(caller, mailbox, messages.from_address(message))
            composed = messages.compose(
                message,
                mailbox=mailbox.address,
                mailbox_name=mailbox.display_name,
                sender=sender,
                attachments=messages.json_attachments(message),
                id_domain=self.id_domain,
            )
        return self.submit("sendMail", mailbox, composed, save_to_sent_items=save)

    def submit(
        self, operation: str, mailbox: Mailbox, composed: Composed, *, save_to_sent_items: bool
    ) -> dict[str, Any]:
        """Exchange's part after the checks: recipients' INBOXes, Sent Items, NDRs; logged for tests."""
        messages.check_recipients(composed)
        raw = composed.for_sent_items()
        if len(raw) > mailbox.settings.max_send_size:
            raise errors.message_too_large(self.settings.message_size_status)
        local = [r for r in composed.recipients if self.tenant.has_mailbox(r)]
        unknown = {
            r: "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup"
            if self.tenant.is_local(r)
            else "550 5.4.1 the sandbox delivers only to its own mailboxes"
            for r in composed.recipients
            if r not in local
        }
        refused = self.store.deliver(composed.for_recipients(), composed.from_address, local) if local else {}
        if save_to_sent_items:
            self.store.save(mailbox.address, "Sent Items", raw, seen=True)
        failures = {**unknown, **refused}
        ndr_to = composed.from_address if self.tenant.has_mailbox(composed.from_address) else mailbox.address
        if failures and self.settings.send_ndr:
            report = messages.non_delivery_report(
                composed, failures, postmaster=f"postmaster@{self.tenant.domain}", to=ndr_to, id_domain=self.id_domain
            )
            self.store.deliver(report, "", [ndr_to])
        entry = {
            "time": time.time(),
            "operation": operation,
            "mailbox": mailbox.address,
            "from": composed.from_address,
            "message_id": composed.message_id,
            "delivered": [r for r in local if r not in refused],
            "undeliverable": sorted(failures),
            "sent_items": save_to_sent_items,
            "size": len(raw),
        }
        with self._log_lock:
            self.deliveries.append(entry)
        return entry

    # ------------------------------------------------------------------ drafts
    def create_draft(self, caller: Caller, mailbox: Mailbox, content_type: str, body: bytes) -> dict[str, Any]:
        if content_type.startswith("text/plain"):
            mime = messages.decode_mime(body)
            message_id = str(mime.get("Message-ID") or "").strip() or messages.new_message_id(self.id_domain)
            if "Message-ID" not in mime:
                mime["Message-ID"] = message_id
            draft = self.drafts.create(mailbox.address, message_id, mime=mime.as_bytes(policy=policy.SMTP))
            inline: list[messages.Attachment] = []
        else:
            message = messages.read_json(body)
            inline = messages.json_attachments(message)
            message = {k: v for k, v in message.items() if k != "attachments"}
            message_id = str(message.get("internetMessageId") or "").strip() or messages.new_message_id(self.id_domain)
            message["internetMessageId"] = message_id
            messages.compose(  # validate recipients and headers now, as Exchange does on save
                message,
                mailbox=mailbox.address,
                mailbox_name=mailbox.display_name,
                sender=None,
                attachments=[],
                id_domain=self.id_domain,
            )
            draft = self.drafts.create(mailbox.address, message_id, message=message)
        try:
            for item in inline:
                self.drafts.add_attachment(
                    draft,
                    name=item.name,
                    content_type=item.content_type,
                    is_inline=item.is_inline,
                    content_id=item.content_id,
                    data=item.data,
                )
            header = self._store_draft_copy(draft, mailbox)
        except Exception:
            self.drafts.remove(draft)
            raise
        body_json = (draft.message or {}).get("body") if draft.message else None
        return views.draft_message(draft, header, mailbox.oid, body_json)

    def _compose_draft(self, draft: Draft, mailbox: Mailbox, sender: tuple[str, str] | None) -> Composed:
        attachments = [a.read() for a in draft.attachments]
        if draft.message is not None:
            return messages.compose(
                draft.message,
                mailbox=mailbox.address,
                mailbox_name=mailbox.display_name,
                sender=sender,
                attachments=attachments,
                id_domain=self.id_domain,
            )
        mime = _parse(draft.mime or b"")
        if sender is not None:
            mime["Sender"] = messages._format(*sender)
        return messages.from_mime(
            mime,
            mailbox=mailbox.address,
            mailbox_name=mailbox.display_name,
            attachments=attachments,
            id_domain=self.id_domain,
        )

    def _store_draft_copy(self, draft: Draft, mailbox: Mailbox) -> str:
        """Put the draft's current form in the Drafts folder (replacing the previous copy); its header block."""
        raw = self._compose_draft(draft, mailbox, None).for_sent_items()
        old = draft.uid
        draft.uid = self.store.save(mailbox.address, "Drafts", raw, seen=True, draft=True)
        draft.size = len(raw)
        if old is not None:
            self.store.expunge(mailbox.address, "Drafts", old)
        end = raw.find(b"\r\n\r\n")
        return raw[: end + 2].decode("utf-8", errors="replace")

    def add_attachment(self, mailbox: Mailbox, draft_id: str, body: bytes) -> dict[str, Any]:
        draft = self.drafts.get(mailbox.address, draft_id)
        item = messages.parse_attachment(messages.read_json(body))
        if len(item.data) >= self.settings.inline_attachment_limit:
            raise errors.GraphError(
                self.settings.inline_attachment_status,
                self.settings.inline_attachment_code,
                "Attachments of 3 MB or more need an upload session (attachments/createUploadSession).",
            )
        if draft.size + messages.base64_size(len(item.data)) > mailbox.settings.max_send_size:
            raise errors.message_too_large(self.settings.message_size_status, saving=True)
        stored = self.drafts.add_attachment(
            draft,
            name=item.name,
            content_type=item.content_type,
            is_inline=item.is_inline,
            content_id=item.content_id,
            data=item.data,
        )
        self._store_draft_copy(draft, mailbox)
        return views.attachment(stored, mailbox.oid, draft.id)

    def send_draft(self, caller: Caller, mailbox: Mailbox, draft_id: str) -> dict[str, Any]:
        draft = self.drafts.get(mailbox.address, draft_id)
        if draft.message is not None:
            from_address = messages.from_address(draft.message)
        else:
            from_address = _from_of(_parse(draft.mime or b""))
        sender = self._sender_for(caller, mailbox, from_address)
        composed = self._compose_draft(draft, mailbox, sender)
        entry = self.submit("send", mailbox, composed, save_to_sent_items=True)
        if draft.uid is not None:
            self.store.expunge(mailbox.address, "Drafts", draft.uid)
        self.drafts.remove(draft)
        return entry

    # ------------------------------------------------------------------ upload sessions
    def create_upload_session(
        self, caller: Caller, mailbox: Mailbox, draft_id: str, body: bytes, upload_root: str
    ) -> dict[str, Any]:
        draft = self.drafts.get(mailbox.address, draft_id)
        payload = messages.read_json(body)
        item = next((v for k, v in payload.items() if k.lower() == "attachmentitem"), None)
        if not isinstance(item, dict):
            raise errors.invalid_request("The 'AttachmentItem' parameter is required.")
        if str(item.get("attachmentType", "file")).lower() != "file":
            raise errors.unsupported(f"attachmentType '{item.get('attachmentType')}'")
        name, size = item.get("name"), item.get("size")
        if not name or not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise errors.invalid_request("AttachmentItem needs a 'name' and the file's 'size' in bytes.")
        if size < self.settings.upload_min_size:
            raise errors.attachment_too_small()
        if size > self.settings.upload_max_size:
            raise errors.message_too_large(self.settings.message_size_status)
        spool = self.drafts.upload_spool()
        session = self.uploads.open(
            app_id=caller.app_id,
            mailbox=mailbox.address,
            user_key=f"{mailbox.oid}@{self.tenant_id}",
            draft_id=draft.id,
            name=str(name),
            content_type=str(item.get("contentType") or "application/octet-stream"),
            size=size,
            is_inline=bool(item.get("isInline", False)),
            content_id=item.get("contentId"),
            expires=self.tenant.now() + self.settings.upload_session_lifetime,
            path=spool / f"{secrets.token_hex(16)}.part",
        )
        self.record_secret(session.token)
        url = (
            f"{upload_root}/api/v2.0/Users('{session.user_key}')/Messages('{draft.id}')"
            f"/AttachmentSessions('{session.id}')?authtoken={session.token}"
        )
        return views.upload_session_created(session, url)

    def upload_chunk(self, session: UploadSession, content_range: str | None, data: bytes) -> StoredAttachment | None:
        """Append one chunk; the new attachment once the last byte is in (None before)."""
        with session.lock:
            check_chunk(session, content_range, len(data), self.settings)
            mailbox = self.tenant.resolve(session.mailbox)
            draft = self.drafts.get(session.mailbox, session.draft_id)
            if draft.size + messages.base64_size(session.received + len(data)) > mailbox.settings.max_send_size:
                raise errors.message_too_large(self.settings.message_size_status, saving=True)
            with open(session.path, "ab") as fh:
                fh.write(data)
            session.received += len(data)
            if session.received < session.size:
                return None
            self.uploads.finish(session)
        stored = self.drafts.add_attachment(
            draft,
            name=session.name,
            content_type=session.content_type,
            is_inline=session.is_inline,
            content_id=session.content_id,
            from_file=session.path,
        )
        self._store_draft_copy(draft, mailbox)
        return stored


def _parse(raw: bytes) -> EmailMessage:
    return email.message_from_bytes(raw, policy=policy.default)  # type: ignore[return-value]


def _from_of(message: EmailMessage) -> str | None:
    found = email.utils.getaddresses([str(message.get("From", ""))])
    return found[0][1].lower() if found and found[0][1] else None
