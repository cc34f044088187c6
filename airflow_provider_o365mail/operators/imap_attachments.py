"""O365ImapAttachmentOperator: download the attachments of sensed messages, streamed in chunks."""

from __future__ import annotations

import ast
import contextlib
import fnmatch
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from airflow_provider_o365mail.connection import DEFAULT_CONN_ID
from airflow_provider_o365mail.core.attachments import safe_file_name, unique_name
from airflow_provider_o365mail.exceptions import MessageCompositionError
from airflow_provider_o365mail.hooks.o365mail import O365MailHook

if TYPE_CHECKING:
    from airflow.sdk import Context


def _as_messages(value: Any) -> list[Mapping[str, Any]]:
    """Summaries from XCom: a list (``sensor.output``), or its rendered string form."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = ast.literal_eval(value)
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, Sequence) or not all(isinstance(m, Mapping) for m in value):
        raise MessageCompositionError("messages must be the O365ImapSensor's XCom: a list of message summaries.")
    return list(value)


class O365ImapAttachmentOperator(BaseOperator):
    """Save attachments of the given messages (the sensor's XCom) into a directory.

    Over IMAP parts are fetched in 1 MiB slices and decoded on the fly (``imap.attachments``); messages
    the sensor found over Microsoft Graph are read from Graph's ``/$value`` as a stream
    (``graph.attachments``, a moved message is found again by its Message-ID). Either way a 100 MB
    attachment never sits in memory. Names from the sender are reduced to a safe
    base name (no ``..``, no path separators, no control characters); clashes get `` (1)``.

    :param messages: the sensor's summaries, e.g. ``messages=wait_for_invoice.output``. (templated)
    :param target_dir: local directory or an ``ObjectStoragePath`` (created if missing). (templated)
    :param attachment_name: glob for the file names to save (case-insensitive), default all. (templated)
    :param include_inline: also save inline parts (e.g. images referenced from HTML).
    :param overwrite: replace existing files instead of choosing a new name.
    :param conn_id: the ``o365mail`` connection.
    :param mailbox: the mailbox the messages are in, if not the connection's (shared mailbox). (templated)
    Pushes to XCom the written paths (strings).
    """

    template_fields: Sequence[str] = ("messages", "target_dir", "attachment_name", "mailbox")
    ui_color = "#0078d4"

    def __init__(
        self,
        *,
        messages: Any,
        target_dir: str | os.PathLike | Any,
        attachment_name: str = "*",
        include_inline: bool = False,
        overwrite: bool = False,
        conn_id: str = DEFAULT_CONN_ID,
        mailbox: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.messages = messages
        self.target_dir = target_dir
        self.attachment_name = attachment_name
        self.include_inline = include_inline
        self.overwrite = overwrite
        self.conn_id = conn_id
        self.mailbox = mailbox

    def _target(self) -> Any:
        target = self.target_dir
        if isinstance(target, (str, os.PathLike)) and "://" not in str(target):
            path = Path(target)
            path.mkdir(parents=True, exist_ok=True)
            return path
        if isinstance(target, str):
            from airflow.sdk import ObjectStoragePath

            target = ObjectStoragePath(target)
        target.mkdir(parents=True, exist_ok=True)
        return target

    def execute(self, context: Context) -> list[str]:
        messages = _as_messages(self.messages)
        target = self._target()
        taken: set[str] = set() if self.overwrite else {p.name for p in target.iterdir()}
        written: list[str] = []
        pattern = (self.attachment_name or "*").lower()
        hook = O365MailHook(self.conn_id)
        with contextlib.ExitStack() as stack:
            readers: dict[str, Any] = {}

            def reader_for(message: Mapping[str, Any]) -> Any:
                # Messages sensed over Graph carry Graph ids and are read over Graph; the others over IMAP.
                kind = "graph" if message.get("graph_id") else "imap"
                if kind not in readers:
                    opened = hook.graph_attachment_reader if kind == "graph" else hook.attachment_reader
                    readers[kind] = stack.enter_context(opened(self.mailbox))
                return readers[kind]

            for message in _by_folder(messages):
                for attachment in message.get("attachments") or []:
                    if attachment.get("inline") and not self.include_inline:
                        continue
                    if not fnmatch.fnmatchcase(str(attachment.get("name") or "").lower(), pattern):
                        continue
                    name = safe_file_name(attachment.get("name"))
                    if not self.overwrite:
                        name = unique_name(name, taken)
                    taken.add(name)
                    destination = target / name
                    size = _save(reader_for(message).chunks(message, attachment), destination)
                    self.log.info(
                        "Saved %s (%d bytes) from %s/%s.",
                        destination,
                        size,
                        message.get("folder"),
                        message.get("uid") or message.get("message_id"),
                    )
                    written.append(str(destination))
        return written


def _by_folder(messages: list[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    """The messages grouped by folder (each folder is selected once), in their order otherwise."""
    folders: dict[str, list[Mapping[str, Any]]] = {}
    for message in messages:
        folders.setdefault(str(message.get("folder") or "INBOX"), []).append(message)
    for group in folders.values():
        yield from group


def _save(chunks: Iterator[bytes], destination: Any) -> int:
    """Write ``chunks`` to ``destination``; a download that fails part-way leaves no partial file."""
    size = 0
    try:
        with destination.open("wb") as out:
            for data in chunks:
                out.write(data)
                size += len(data)
    except BaseException:
        with contextlib.suppress(Exception):
            destination.unlink()
        raise
    return size
