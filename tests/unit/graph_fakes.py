"""A fake Graph client for GraphSender's unit tests: Graph's semantics (drafts, attachments, upload
sessions that expect the next byte, sends) in memory, with faults injected per operation.

It stands where :class:`GraphClient` stands (``request(method, path, ...)``), so the sender's own
logic is tested: which requests, in which order, and what reached the "mailbox" (``delivered``).
"""

from __future__ import annotations

import base64
import email
import itertools
import re
from dataclasses import dataclass, field
from email import policy
from typing import Any

from airflow_provider_o365mail.graph.errors import parse_reply, permanent_error

BASE_URL = "https://graph.example/v1.0"
UPLOAD_HOST = "https://upload.example/sessions/"


def graph_refusal(status: int, code: str, doing: str = "a request"):
    """The exception GraphClient raises for a permanent Graph error."""
    body = f'{{"error": {{"code": "{code}", "message": "{code}"}}}}'.encode()
    return permanent_error(parse_reply(status, {}, body), doing=doing, mailbox="me@x.example", conn_id="c")


@dataclass
class Fault:
    """``when`` ``before`` (raise, nothing done) or ``after`` (done, then raise) on the ``skip``-th next
    request of ``operation`` (0: the next one)."""

    operation: str
    error: BaseException
    when: str = "before"
    skip: int = 0


@dataclass
class Answer:
    status: int
    body: dict = field(default_factory=dict)

    def json(self) -> dict:
        return self.body


@dataclass
class Delivered:
    message_id: str
    recipients: list[str]
    mime: email.message.EmailMessage
    attachments: dict[str, bytes]
    via: str


class FakeGraph:
    def __init__(self) -> None:
        self.base_url = BASE_URL
        self.events: list[Any] = []
        self.calls: list[dict] = []
        self.faults: list[Fault] = []
        self.drafts: dict[str, dict] = {}
        self.sessions: dict[str, dict] = {}
        self.delivered: list[Delivered] = []
        self.drafts_created = 0
        self.closed = False
        self._ids = itertools.count(1)

    def close(self) -> None:
        self.closed = True

    def fault(self, operation: str, error: BaseException, *, when: str = "before", skip: int = 0) -> None:
        self.faults.append(Fault(operation, error, when, skip))

    def copies_in_sent_items(self, message_id: str) -> int:
        return sum(1 for d in self.delivered if d.message_id == message_id)

    # ------------------------------------------------------------------ requests
    def request(self, method: str, path: str, *, doing: str, **kwargs: Any) -> Answer:
        operation = self._operation(method, path)
        self.events.append(operation)
        self.calls.append({"operation": operation, "method": method, "path": path, "doing": doing, **kwargs})
        fault = self._due(operation)
        if fault is not None and fault.when == "before":
            raise fault.error
        answer = getattr(self, f"_{operation}")(path, **kwargs)
        if fault is not None:
            raise fault.error
        return answer

    def _due(self, operation: str) -> Fault | None:
        for fault in self.faults:
            if fault.operation == operation:
                if fault.skip:
                    fault.skip -= 1
                    return None
                self.faults.remove(fault)
                return fault
        return None

    @staticmethod
    def _operation(method: str, path: str) -> str:
        if path.startswith(UPLOAD_HOST):
            return "uploadChunk"
        if path.endswith("/sendMail"):
            return "sendMail"
        if path.endswith("/attachments/createUploadSession"):
            return "createUploadSession"
        if path.endswith("/attachments"):
            return "addAttachment"
        if path.endswith("/send"):
            return "send"
        if method == "POST" and path.endswith("/messages"):
            return "createMessage"
        if method == "DELETE" and "/messages/" in path:
            return "deleteMessage"
        raise AssertionError(f"unexpected request {method} {path}")

    def _sendMail(self, path: str, *, data: bytes, headers: dict, **_: Any) -> Answer:
        assert headers["Content-Type"] == "text/plain"
        self._deliver(_mime(data), {}, "sendMail")
        return Answer(202)

    def _createMessage(self, path: str, *, data: bytes, headers: dict, **_: Any) -> Answer:
        assert headers["Content-Type"] == "text/plain"
        self.drafts_created += 1
        draft_id = f"AAMk{next(self._ids)}=="
        self.drafts[draft_id] = {"mime": _mime(data), "attachments": {}}
        return Answer(201, {"id": draft_id})

    def _draft(self, path: str) -> dict:
        draft_id = re.search(r"/messages/([^/]+)", path).group(1).replace("%3D", "=")
        return self.drafts[draft_id]

    def _addAttachment(self, path: str, *, json: dict, **_: Any) -> Answer:
        assert json["@odata.type"] == "#microsoft.graph.fileAttachment"
        self._draft(path)["attachments"][json["name"]] = base64.b64decode(json["contentBytes"])
        return Answer(201, {"id": "att"})

    def _createUploadSession(self, path: str, *, json: dict, **_: Any) -> Answer:
        item = json["AttachmentItem"]
        session_id = str(next(self._ids))
        self.sessions[session_id] = {
            "draft": self._draft(path),
            "name": item["name"],
            "size": item["size"],
            "data": bytearray(),
        }
        return Answer(201, {"uploadUrl": f"{UPLOAD_HOST}{session_id}?authtoken=x"})

    def _uploadChunk(self, path: str, *, data: bytes, headers: dict, authorized: bool, **_: Any) -> Answer:
        assert not authorized, "upload URLs are pre-authenticated: no bearer token"
        session_id = path.removeprefix(UPLOAD_HOST).split("?")[0]
        session = self.sessions.get(session_id)
        if session is None:
            raise graph_refusal(404, "itemNotFound")
        start, end, total = map(int, re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", headers["Content-Range"]).groups())
        assert total == session["size"] and end - start + 1 == len(data)
        if start != len(session["data"]):
            raise graph_refusal(416, "invalidRange")
        session["data"] += data
        if len(session["data"]) == total:
            session["draft"]["attachments"][session["name"]] = bytes(session["data"])
            del self.sessions[session_id]
            return Answer(201)
        return Answer(200, {"nextExpectedRanges": [f"{end + 1}-"]})

    def _deleteMessage(self, path: str, **_: Any) -> Answer:
        draft = self._draft(path)
        self.drafts = {k: v for k, v in self.drafts.items() if v is not draft}
        return Answer(204)

    def _send(self, path: str, **_: Any) -> Answer:
        draft = self._draft(path)
        self._deliver(draft["mime"], draft["attachments"], "draft")
        self.drafts = {k: v for k, v in self.drafts.items() if v is not draft}
        return Answer(202)

    def _deliver(self, mime: email.message.EmailMessage, added: dict[str, bytes], via: str) -> None:
        attachments = {a.get_filename(): a.get_payload(decode=True) for a in mime.iter_attachments()}
        attachments.update(added)
        recipients = [a.addr_spec for name in ("To", "Cc", "Bcc") for a in (mime[name].addresses if mime[name] else ())]
        self.delivered.append(Delivered(mime["Message-ID"], recipients, mime, attachments, via))


def _mime(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(base64.b64decode(data), policy=policy.default)
