"""Message-IDs that are the same on every try of a task, so a retry can recognise what it sent.

A task instance (dag_id, run_id, task_id, map_index) and a message's position in its batch name one
message forever: the Message-ID is a hash of them under the sender's domain. Nothing of Airflow is
imported here; the glue layer passes the identity as plain values.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from airflow_provider_o365mail.exceptions import MessageCompositionError

# RFC 5322 msg-id: "<" id-left "@" id-right ">", no spaces or line breaks.
_MESSAGE_ID = re.compile(r"^<[^<>@\s]+@[^<>@\s]+>$")


@dataclass(frozen=True)
class TaskIdentity:
    """Who is sending: one Airflow task instance (all tries share it)."""

    dag_id: str
    run_id: str
    task_id: str
    map_index: int = -1

    def key(self) -> str:
        """A short, stable, Variable-key-safe name for this task instance."""
        raw = "\0".join((self.dag_id, self.run_id, self.task_id, str(self.map_index)))
        return hashlib.sha256(raw.encode()).hexdigest()[:32]

    @classmethod
    def of(cls, ti: object) -> TaskIdentity:
        """From anything with ``dag_id``, ``run_id``, ``task_id`` and ``map_index`` (a task instance)."""
        map_index = getattr(ti, "map_index", -1)
        return cls(
            dag_id=str(getattr(ti, "dag_id")),  # noqa: B009 - duck-typed on purpose (no Airflow import)
            run_id=str(getattr(ti, "run_id")),  # noqa: B009
            task_id=str(getattr(ti, "task_id")),  # noqa: B009
            map_index=-1 if map_index is None else int(map_index),
        )

    def describe(self) -> str:
        mapped = f"[{self.map_index}]" if self.map_index >= 0 else ""
        return f"{self.dag_id}.{self.task_id}{mapped} of run {self.run_id}"


def stable_message_id(identity: TaskIdentity, position: int, domain: str, scope: str = "") -> str:
    """``<hash.position@domain>``: the same for this task instance's ``position``-th message on every try.

    :param scope: keeps apart messages of one task instance that are not one batch (the operator's
        batch has scope ``""``; a notifier uses the event it reports).
    """
    raw = f"{identity.key()}\0{scope}\0{position}".encode()
    digest = hashlib.sha256(raw).hexdigest()[:32]
    return f"<{digest}.{position}@{domain}>"


def normalize_message_id(value: str) -> str:
    """A user's own Message-ID, with angle brackets, checked (no spaces, one ``@``)."""
    text = value.strip()
    if not text.startswith("<"):
        text = f"<{text}>"
    if not _MESSAGE_ID.match(text):
        raise MessageCompositionError(
            f"message_id {value!r} is not a valid Message-ID; use the form <unique-part@your-domain>."
        )
    return text


__all__ = ["TaskIdentity", "normalize_message_id", "stable_message_id"]
