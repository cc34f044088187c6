"""What one task instance has already handed to the SMTP server, visible to every worker.

One Airflow Variable per task instance, ``o365mail_send_ledger_<TaskIdentity.key()>``, JSON::

    {"v": 1, "task": "dag.task of run ...", "created": 1764630000.0, "updated": 1764630042.5,
     "messages": {"<hash.0@contoso.com>": {"state": "accepted", "at": 1764630001.2, "recipients": 3},
                  "<hash.1@contoso.com>": {"state": "sending", "at": 1764630042.5, "recipients": 1}}}

``sending``: written just before each of the message's transactions starts; a try killed (or
whose connection was lost and whose Sent Items could not be read) after that may or may not have
delivered it, so a retry looks in Sent Items before sending it again (found: more copies of the
Message-ID than ``copies``, the transactions known accepted). ``accepted``: the server answered
``250`` to the end of DATA and no recipient is left deferred (written right after that reply); a
retry skips it. ``partial``: a ``250`` delivered it to the recipients listed in ``done`` while the
server deferred (4xx) the others; a retry sends it to the others only. Entries exist only for
messages of the batch, so a ledger is bounded by its batch.

Cleanup: the ledger is *not* deleted when the batch went through (a try killed after that and
before Airflow recorded its success would otherwise send the whole batch again);
:meth:`SendLedger.finish` marks it complete. Every ledger is listed with its expiry (``retention``
after its last write) in the index Variable ``o365mail_send_ledger_index``, and the first write of
any ledger deletes those whose retention ran out.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Literal

from airflow_provider_o365mail.core.message_ids import TaskIdentity

if TYPE_CHECKING:
    from airflow_provider_o365mail.runtime import VariableBackend

log = logging.getLogger(__name__)

LEDGER_PREFIX = "o365mail_send_ledger_"
INDEX_KEY = "o365mail_send_ledger_index"
#: Longer than any retry schedule: a ledger left by a task that never succeeded goes after this.
DEFAULT_RETENTION_SECONDS = 7 * 24 * 3600.0
DESCRIPTION = "airflow-provider-o365mail: messages a task instance already sent (do not edit)"

State = Literal["accepted", "partial", "sending"]


def ledger_key(identity: TaskIdentity) -> str:
    return LEDGER_PREFIX + identity.key()


class SendLedger:
    """The ledger of one task instance.

    :param store: Variables (``get``/``set``/``delete``), e.g. ``runtime.default_variables()``.
    :param lock: a context manager factory serialising index updates between processes.
    """

    def __init__(
        self,
        store: VariableBackend,
        identity: TaskIdentity,
        *,
        retention: float = DEFAULT_RETENTION_SECONDS,
        clock: Callable[[], float] = time.time,
        lock: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
    ) -> None:
        self._store = store
        self.identity = identity
        self.key = ledger_key(identity)
        self.retention = retention
        self._clock = clock
        self._lock = lock
        self._data: dict | None = None

    def _load(self) -> dict:
        if self._data is None:
            raw = self._store.get(self.key)
            data: dict | None = None
            if raw:
                try:
                    data = json.loads(raw)
                except ValueError:
                    log.warning("Send ledger %s is not JSON; starting a new one.", self.key)
            if not isinstance(data, dict) or not isinstance(data.get("messages"), dict):
                data = None
            self._data = data or {"v": 1, "task": self.identity.describe(), "created": self._clock(), "messages": {}}
        return self._data

    def entries(self) -> dict[str, dict]:
        """``{message_id: {"state", "at", "recipients"}}`` recorded by earlier tries (and this one)."""
        return dict(self._load()["messages"])

    def state(self, message_id: str) -> State | None:
        entry = self._load()["messages"].get(message_id)
        return entry.get("state") if isinstance(entry, dict) else None

    def record(
        self, message_id: str, state: State, recipients: int, *, done: list[str] | None = None, copies: int = 0
    ) -> None:
        """Write one message's entry (``done``: recipients it was delivered to while others are deferred;
        ``copies``: its accepted transactions so far, each a Sent Items copy)."""
        data = self._load()
        first_write = not data["messages"]
        now = self._clock()
        entry: dict = {"state": state, "at": now, "recipients": recipients}
        if done:
            entry["done"] = list(done)
        if copies:
            entry["copies"] = copies
        data["messages"][message_id] = entry
        data["updated"] = now
        self._save(data)
        if first_write:
            self._index_update(add=True)

    def _save(self, data: dict) -> None:
        self._store.set(self.key, json.dumps(data, separators=(",", ":")), DESCRIPTION)

    def finish(self) -> None:
        """The batch went through. The ledger stays (a retry of this task instance, e.g. after a kill
        before Airflow recorded the success, skips everything) until its retention runs out."""
        data = self._load()
        data["complete"] = self._clock()
        self._save(data)
        self._index_update(add=True)

    def delete(self) -> None:
        """Forget what this task instance sent: its next try sends every message again."""
        self._data = None
        with contextlib.suppress(Exception):  # a missing Variable is fine
            self._store.delete(self.key)
        self._index_update(add=False)

    def _index_update(self, *, add: bool) -> None:
        """List this ledger with its expiry (or drop it) and delete ledgers whose retention ran out."""
        try:
            with self._lock():
                index = _read_index(self._store)
                now = self._clock()
                for key, expires in list(index.items()):
                    if key != self.key and expires < now:
                        with contextlib.suppress(Exception):
                            self._store.delete(key)
                        del index[key]
                        log.info("Deleted the send ledger %s: its retention ran out.", key)
                if add:
                    index[self.key] = now + self.retention
                else:
                    index.pop(self.key, None)
                self._store.set(INDEX_KEY, json.dumps(index, separators=(",", ":")), DESCRIPTION)
        except Exception as err:  # the index is housekeeping; sending must not fail for it
            log.warning("Could not update the send ledger index (%s: %s).", type(err).__name__, err)


def _read_index(store: VariableBackend) -> dict[str, float]:
    raw = store.get(INDEX_KEY)
    try:
        index = json.loads(raw) if raw else {}
    except ValueError:
        index = {}
    if not isinstance(index, dict):
        return {}
    return {k: float(v) for k, v in index.items() if isinstance(k, str) and isinstance(v, (int, float))}


__all__ = ["INDEX_KEY", "SendLedger", "ledger_key"]
