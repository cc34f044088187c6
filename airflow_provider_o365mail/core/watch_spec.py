"""What a watch looks for and what it found, whatever the transport (IMAP or Microsoft Graph).

Shared by the sensor (poke and reschedule), its deferrable trigger and the event trigger; each
transport's ``watch`` module checks (read-only) and commits (post-action, watermark) with these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_o365mail.core.criteria import POST_ACTIONS, MailCriteria
from airflow_provider_o365mail.exceptions import CriteriaError


@dataclass(frozen=True)
class WatchSpec:
    """What to watch and what to do with matches."""

    folders: tuple[str, ...] = ("INBOX",)
    criteria: MailCriteria = field(default_factory=MailCriteria)
    new_only: bool = False
    max_messages: int = 100
    post_action: str | None = None
    move_to: str | None = None

    def __post_init__(self) -> None:
        if not self.folders or any(not isinstance(f, str) or not f for f in self.folders):
            raise CriteriaError("folders must be a folder name or a non-empty list of folder names.")
        if self.post_action not in POST_ACTIONS:
            raise CriteriaError(
                f"post_action must be one of None, 'seen', 'flag', 'move', 'delete'; got {self.post_action!r}."
            )
        if self.post_action == "move" and not self.move_to:
            raise CriteriaError("post_action='move' needs move_to (the target folder).")
        if self.max_messages < 1:
            raise CriteriaError("max_messages must be >= 1.")

    @classmethod
    def build(
        cls,
        folders: str | Sequence[str] = "INBOX",
        *,
        new_only: bool = False,
        max_messages: int = 100,
        post_action: str | None = None,
        move_to: str | None = None,
        **criteria: Any,
    ) -> WatchSpec:
        folder_list = (folders,) if isinstance(folders, str) else tuple(folders or ())
        return cls(
            folders=folder_list,
            criteria=MailCriteria.build(**criteria),
            new_only=bool(new_only),
            max_messages=int(max_messages),
            post_action=post_action or None,
            move_to=move_to or None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "folders": list(self.folders),
            "new_only": self.new_only,
            "max_messages": self.max_messages,
            "post_action": self.post_action,
            "move_to": self.move_to,
            **self.criteria.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WatchSpec:
        return cls.build(**dict(data))


@dataclass
class CheckResult:
    """Matches (summaries, oldest first) and, per folder, how far the scan got."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    #: folder -> how far the scan got: IMAP ``{uidvalidity, high_uid, uidnext}``; Graph ``{transport:
    #: "graph", folder_id, delta_link, obtained_at, since}``.
    scanned: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"messages": self.messages, "scanned": self.scanned}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CheckResult:
        return cls(messages=list(data.get("messages", [])), scanned=dict(data.get("scanned", {})))


__all__ = ["CheckResult", "WatchSpec"]
