"""The sandbox's Dovecot, as Graph's mail store: delivery into INBOXes, Sent Items, Drafts, lookups.

Recipients get the message over LMTP (the path Postfix uses for SMTP submissions, so a Graph send
lands exactly like an SMTP one); folder copies (Sent Items, Drafts) are written with ``doveadm
save`` and flagged with ``doveadm flags``, lookups use ``doveadm fetch``. Nothing here trusts the
caller: what a test later reads over IMAP is what Dovecot stored.
"""

from __future__ import annotations

import contextlib
import email
import json
import smtplib
import subprocess
import threading
from collections import defaultdict
from dataclasses import dataclass
from email import policy
from typing import Any

from airflow_provider_o365mail.testing.mailservers import MailServerConfig

#: Graph's well-known folder names (mailFolder resource) -> the sandbox's Dovecot folders.
WELL_KNOWN_FOLDERS = {
    "inbox": "INBOX",
    "drafts": "Drafts",
    "sentitems": "Sent Items",
    "deleteditems": "Deleted Items",
    "junkemail": "Junk Email",
    "archive": "Archive",
}


#: Folders Dovecot creates on first use (``auto = subscribe``): listed before they exist.
AUTO_CREATED = frozenset(WELL_KNOWN_FOLDERS.values()) - {"INBOX"}


class MailStoreError(RuntimeError):
    pass


@dataclass(frozen=True)
class StoredMessage:
    """A message in a folder: enough to answer a Graph ``$select`` on header properties."""

    folder: str
    uid: int
    guid: str
    flags: frozenset[str]
    received: float
    size: int
    header: str
    modseq: int = 0


@dataclass(frozen=True)
class FolderInfo:
    """A Dovecot mailbox as a Graph mailFolder sees it."""

    name: str
    guid: str
    uidvalidity: int
    uidnext: int
    messages: int
    unseen: int
    size: int

    @property
    def parent(self) -> str | None:
        return self.name.rpartition("/")[0] or None

    @property
    def display_name(self) -> str:
        leaf = self.name.rpartition("/")[2]
        return "Inbox" if self.name.upper() == "INBOX" else leaf


class MailStore:
    def __init__(self, cfg: MailServerConfig) -> None:
        self.cfg = cfg
        self._folder_locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)

    def _doveadm(self, *args: str, stdin: bytes | None = None, json_out: bool = False, timeout: float = 300) -> Any:
        command = ["doveadm", "-c", str(self.cfg.dovecot_conf)] + (["-f", "json"] if json_out else []) + list(args)
        result = subprocess.run(command, input=stdin, capture_output=True, timeout=timeout, check=False)
        if result.returncode != 0:
            raise MailStoreError(
                f"doveadm {args[0]} failed ({result.returncode}): {result.stderr.decode(errors='replace')[-500:]}"
            )
        if json_out:
            return json.loads(result.stdout.decode("utf-8", errors="replace") or "[]")
        return result.stdout

    # ------------------------------------------------------------------ recipients
    def deliver(self, raw: bytes, envelope_from: str, recipients: list[str]) -> dict[str, str]:
        """LMTP into each recipient's INBOX, one transaction per recipient; returns refusals ``{rcpt: reply}``.

        One recipient per transaction because LMTP answers DATA once per recipient and smtplib reads
        only one reply.
        """
        refused: dict[str, str] = {}
        with smtplib.LMTP("127.0.0.1", self.cfg.lmtp_port, timeout=300) as lmtp:
            for recipient in recipients:
                try:
                    lmtp.sendmail(envelope_from, [recipient], raw)
                except smtplib.SMTPRecipientsRefused as exc:
                    code, text = exc.recipients[recipient]
                    refused[recipient] = f"{code} {text.decode(errors='replace')}"
                except smtplib.SMTPDataError as exc:
                    refused[recipient] = f"{exc.smtp_code} {exc.smtp_error.decode(errors='replace')}"
                    lmtp.rset()
        return refused

    # ------------------------------------------------------------------ folders
    def save(self, mailbox: str, folder: str, raw: bytes, *, seen: bool = True, draft: bool = False) -> int:
        """Store ``raw`` in ``folder`` of ``mailbox``; returns its UID."""
        with self._folder_locks[(mailbox.lower(), folder)]:
            status = self._doveadm("mailbox", "status", "-u", mailbox, "uidnext", folder, json_out=True)
            uid = int(status[0]["uidnext"])
            self._doveadm("save", "-u", mailbox, "-m", folder, stdin=raw)
            flags = [f for f, on in (("\\Seen", seen), ("\\Draft", draft)) if on]
            if flags:
                self._doveadm("flags", "add", "-u", mailbox, " ".join(flags), "mailbox", folder, "uid", str(uid))
            return uid

    def expunge(self, mailbox: str, folder: str, uid: int) -> None:
        self._doveadm("expunge", "-u", mailbox, "mailbox", folder, "uid", str(uid))

    def find(
        self, mailbox: str, folder: str, message_id: str | None = None, *, uids: list[int] | None = None
    ) -> list[StoredMessage]:
        """Messages of ``folder`` (with ``message_id``: those whose Message-ID is exactly that; with
        ``uids``: those UIDs only)."""
        if message_id:
            query = ["header", "Message-ID", message_id]
        elif uids is not None:
            if not uids:
                return []
            query = ["uid", ",".join(str(u) for u in sorted(set(uids)))]
        else:
            query = ["all"]
        rows = self._doveadm(
            "fetch",
            "-u",
            mailbox,
            "uid guid flags modseq date.received.unixtime size.physical hdr",
            "mailbox",
            folder,
            *query,
            json_out=True,
        )
        found = [
            StoredMessage(
                folder=folder,
                uid=int(row["uid"]),
                guid=str(row.get("guid", "")),
                flags=frozenset(f for f in str(row.get("flags", "")).split() if f != "\\Recent"),
                received=float(row.get("date.received.unixtime") or 0),
                size=int(row.get("size.physical") or 0),
                header=str(row.get("hdr", "")),
                modseq=int(row.get("modseq") or 0),
            )
            for row in rows
        ]
        if message_id:
            # IMAP/doveadm HEADER search is a substring match: keep exact Message-IDs only.
            found = [m for m in found if _message_id_of(m.header) == message_id.strip()]
        return found

    # ------------------------------------------------------------------ reading (Graph's GET/PATCH/move/delete)
    def folders(self, mailbox: str) -> list[FolderInfo]:
        """Every folder of ``mailbox``; Dovecot's auto-created ones (Drafts, Sent Items, ...) exist only once
        used, so they are created here, as an IMAP client's first SELECT would."""
        listed = [str(r["mailbox"]) for r in self._doveadm("mailbox", "list", "-u", mailbox, json_out=True)]
        rows = self._status(mailbox, listed)
        missing = set(listed) - {str(r["mailbox"]) for r in rows}
        if missing & AUTO_CREATED:
            for name in sorted(missing & AUTO_CREATED):
                with contextlib.suppress(MailStoreError):  # created meanwhile (another request, an IMAP session)
                    self._doveadm("mailbox", "create", "-u", mailbox, name)
            rows = self._status(mailbox, listed)
        return [
            FolderInfo(
                name=str(row["mailbox"]),
                guid=str(row.get("guid", "")),
                uidvalidity=int(row.get("uidvalidity") or 0),
                uidnext=int(row.get("uidnext") or 0),
                messages=int(row.get("messages") or 0),
                unseen=int(row.get("unseen") or 0),
                size=int(row.get("vsize") or 0),
            )
            for row in rows
        ]

    def _status(self, mailbox: str, names: list[str]) -> list[dict[str, Any]]:
        """``mailbox status`` of every folder that exists (a deleted parent of a child folder is listed but has no
        status: it is left out)."""
        fields = "messages unseen uidvalidity uidnext vsize guid"
        try:
            return self._doveadm("mailbox", "status", "-u", mailbox, fields, "*", json_out=True)
        except MailStoreError:
            rows = []
            for name in names:
                with contextlib.suppress(MailStoreError):
                    rows += self._doveadm("mailbox", "status", "-u", mailbox, fields, name, json_out=True)
            return rows

    def raw(self, mailbox: str, folder: str, uids: list[int]) -> dict[int, bytes]:
        """The stored MIME of ``uids`` in ``folder`` (CRLF line ends), by UID; absent UIDs are left out."""
        if not uids:
            return {}
        rows = self._doveadm(
            "fetch",
            "-u",
            mailbox,
            "uid text",
            "mailbox",
            folder,
            "uid",
            ",".join(map(str, sorted(set(uids)))),
            json_out=True,
        )
        out = {}
        for row in rows:
            text = str(row.get("text", "")).replace("\r\n", "\n").replace("\n", "\r\n")
            out[int(row["uid"])] = text.encode("utf-8", errors="surrogateescape")
        return out

    def set_flags(self, mailbox: str, folder: str, uid: int, *, add: list[str], remove: list[str]) -> None:
        for verb, flags in (("add", add), ("remove", remove)):
            if flags:
                self._doveadm("flags", verb, "-u", mailbox, " ".join(flags), "mailbox", folder, "uid", str(uid))

    def move(self, mailbox: str, source: str, destination: str, uid: int, guid: str) -> int | None:
        """Move one message; its UID in ``destination`` (None if it was gone)."""
        with self._folder_locks[(mailbox.lower(), destination)]:
            status = self._doveadm("mailbox", "status", "-u", mailbox, "uidnext", destination, json_out=True)
            first = int(status[0]["uidnext"])
            self._doveadm("move", "-u", mailbox, destination, "mailbox", source, "uid", str(uid))
            rows = self._doveadm(
                "fetch", "-u", mailbox, "uid guid", "mailbox", destination, "uid", f"{first}:*", json_out=True
            )
        moved = [int(r["uid"]) for r in rows if int(r["uid"]) >= first]
        same = [int(r["uid"]) for r in rows if int(r["uid"]) >= first and str(r.get("guid")) == guid]
        return (same or moved or [None])[-1]


def _message_id_of(header: str) -> str:
    parsed = email.message_from_string(header, policy=policy.default)
    return str(parsed.get("Message-ID", "")).strip()
