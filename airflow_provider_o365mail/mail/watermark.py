"""Where a watcher remembers what it has already reported: per folder UIDVALIDITY + last UID.

IMAP guarantees that (folder, UIDVALIDITY, UID) never names another message, so "everything
above the last UID" is exactly the new mail, until UIDVALIDITY changes (folder recreated,
mailbox moved): then UIDs mean nothing and the recent Message-IDs prevent repeats. Exchange may
also give an edited message a new UID; the Message-IDs catch that too.

Sensors keep watermarks in an Airflow Variable (reachable from workers, the triggerer and the
CLI); the event trigger keeps them in the asset state store (Airflow >= 3.3).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from airflow_provider_o365mail.auth.store import VariableBackend, default_backend

SEEN_IDS_KEPT = 2000
WATERMARK_DESCRIPTION = "airflow-provider-o365mail: IMAP watermark (folder UIDVALIDITY and last UID)"


@dataclass
class FolderWatermark:
    uidvalidity: int
    last_uid: int
    seen_message_ids: list[str] = field(default_factory=list)
    updated_at: float = 0.0

    def advanced(
        self, uidvalidity: int, high_uid: int, message_ids: Iterable[str], now: float | None = None
    ) -> FolderWatermark:
        """Past ``high_uid``; Message-IDs are kept across UIDVALIDITY changes (they dedupe the rescan)."""
        same_folder = uidvalidity == self.uidvalidity
        seen = [*self.seen_message_ids, *(m for m in message_ids if m)]
        return FolderWatermark(
            uidvalidity=uidvalidity,
            last_uid=max(high_uid, self.last_uid) if same_folder else high_uid,
            seen_message_ids=list(dict.fromkeys(reversed(seen)))[:SEEN_IDS_KEPT][::-1],
            updated_at=time.time() if now is None else now,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> FolderWatermark | None:
        if not isinstance(data, dict) or "uidvalidity" not in data:
            return None
        return cls(
            uidvalidity=int(data["uidvalidity"]),
            last_uid=int(data["last_uid"]),
            seen_message_ids=[str(m) for m in data.get("seen_message_ids", [])][-SEEN_IDS_KEPT:],
            updated_at=float(data.get("updated_at", 0.0)),
        )


class WatermarkStore(Protocol):
    def load(self) -> dict[str, FolderWatermark]: ...
    def save(self, watermarks: dict[str, FolderWatermark]) -> None: ...


def _decode(raw: str | None) -> dict[str, FolderWatermark]:
    if not raw:
        return {}
    data = json.loads(raw)
    folders = {folder: FolderWatermark.from_dict(values) for folder, values in data.get("folders", {}).items()}
    return {folder: mark for folder, mark in folders.items() if mark is not None}


def _encode(watermarks: dict[str, FolderWatermark]) -> str:
    return json.dumps({"version": 1, "folders": {f: w.to_dict() for f, w in watermarks.items()}})


def variable_key(conn_id: str, watch_id: str, mailbox: str | None = None) -> str:
    scope = f"{conn_id}|{mailbox or ''}|{watch_id}"
    digest = hashlib.sha256(scope.encode()).hexdigest()[:16]
    readable = "".join(c if c.isalnum() or c in "._-" else "_" for c in watch_id)[:120]
    return f"o365mail_watermark__{conn_id}__{readable}__{digest}"


class VariableWatermarkStore:
    """Watermarks of one watcher (connection + mailbox + watch id) in one Airflow Variable."""

    def __init__(self, key: str, backend: VariableBackend | None = None) -> None:
        self.key = key
        self._backend = backend

    @property
    def backend(self) -> VariableBackend:
        if self._backend is None:
            self._backend = default_backend()
        return self._backend

    def load(self) -> dict[str, FolderWatermark]:
        return _decode(self.backend.get(self.key))

    def save(self, watermarks: dict[str, FolderWatermark]) -> None:
        self.backend.set(self.key, _encode(watermarks), description=WATERMARK_DESCRIPTION)
