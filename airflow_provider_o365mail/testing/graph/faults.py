"""Failures a test injects into the Graph stand-in (no I/O).

Kinds, each for the next ``count`` requests of an ``operation`` (any when None) on a ``mailbox``
(any when None), after the request passed authentication, authorization and the throttling limits:

- ``error``: answer ``status``/``code``/``message`` (``Retry-After`` when given) and do nothing;
- ``after_delivery``: do the work (deliver), then answer the error anyway: the "504 but delivered"
  of a Microsoft Q&A report, which a client must not retry blindly;
- ``drop_after_delivery``: do the work, then close the connection without an answer;
- ``hold``: keep the request (and its concurrency slot) until ``release()``: concurrency tests
  without timing.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any

KINDS = ("error", "after_delivery", "drop_after_delivery", "hold")
#: What a fault can target (the stand-in's operation names).
OPERATIONS = (
    "sendMail",
    "createMessage",
    "addAttachment",
    "createUploadSession",
    "uploadChunk",
    "cancelUpload",
    "send",
    "listMessages",
    "listMailFolders",
    "listChildFolders",
    "getMailFolder",
    "getMessage",
    "getMessageValue",
    "listAttachments",
    "getAttachment",
    "getAttachmentValue",
    "updateMessage",
    "moveMessage",
    "deleteMessage",
    "messagesDelta",
)


@dataclass
class Fault:
    kind: str = "error"
    status: int | None = None
    code: str | None = None
    message: str | None = None
    retry_after: int | None = None
    count: int = 1
    operation: str | None = None
    mailbox: str | None = None
    fired: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        if self.operation is not None and self.operation not in OPERATIONS:
            raise ValueError(f"operation must be one of {OPERATIONS} (or omitted: any)")
        if self.count < 1:
            raise ValueError("count must be at least 1")
        if self.kind in ("error", "after_delivery") and self.status is None and self.code is None:
            raise ValueError("an error fault needs a status or a code")
        if self.status is not None and not 400 <= int(self.status) <= 599:
            raise ValueError("status must be 4xx or 5xx")
        if self.mailbox:
            self.mailbox = self.mailbox.lower()

    def matches(self, operation: str, mailbox: str) -> bool:
        return (self.operation in (None, operation)) and (self.mailbox in (None, mailbox.lower()))


class FaultQueue:
    """Pending faults, first match first; each fires ``count`` times."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self.fired: list[dict[str, Any]] = []

    def add(self, fault: Fault) -> int:
        with self._lock:
            self._faults.append(fault)
            return len(self._faults)

    def take(self, operation: str, mailbox: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(operation, mailbox):
                    fault.fired += 1
                    if fault.fired >= fault.count:
                        self._faults.remove(fault)
                    self.fired.append({"kind": fault.kind, "operation": operation, "mailbox": mailbox.lower()})
                    return fault
            return None

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
            self.fired.clear()

    def pending(self) -> list[dict[str, Any]]:
        with self._lock:
            return [asdict(f) for f in self._faults]
