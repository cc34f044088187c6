"""What the sandbox's SMTP submission does per session: Exchange's concurrency cap and injected replies.

Pure logic, standard library only: the milter (``smtp_milter``, run by Debian's python3 with
python3-milter) calls it for each SMTP event, the admin API changes it through the milter's control
socket, and unit tests drive it directly.

Exchange Online (Microsoft Learn, "Message storage and concurrent connection throttling for SMTP
Authenticated Submission"): "Up to three concurrent connections are allowed to send email messages
at the same time. If an application tries to send more than three messages at the same time by
using multiple connections, each connection will receive the following error message:
432 4.3.2 Concurrent connections limit exceeded."
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

CONCURRENCY_REPLY = "432 4.3.2 Concurrent connections limit exceeded."
DEFAULT_SMTP_SESSIONS = 3  # Exchange Online: per mailbox
Stage = Literal["mail", "rcpt", "data"]
STAGES: tuple[str, ...] = ("mail", "rcpt", "data")
_REPLY = re.compile(r"^(?P<code>[45]\d\d)(?: (?P<xcode>[45]\.\d{1,3}\.\d{1,3}))?(?: (?P<text>.*))?$", re.DOTALL)


@dataclass(frozen=True)
class Reply:
    """An SMTP reply the milter can give: a 4xx/5xx code, an optional enhanced code and text lines."""

    code: str
    xcode: str | None
    lines: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Reply:
        """``"554 5.2.0 STOREDRV..."``; several lines separated by ``\\n`` make a multi-line reply."""
        match = _REPLY.match(text.strip())
        if match is None:
            raise ValueError("a reply is '<4xx|5xx> [x.y.z] text' (a milter can only refuse or defer)")
        lines = tuple((match.group("text") or "").split("\n"))
        if any("%" in line for line in lines):
            raise ValueError("libmilter cannot send '%' in a reply text")
        if len(lines) > 32:
            raise ValueError("libmilter sends at most 32 reply lines")
        return cls(match.group("code"), match.group("xcode"), lines)

    def __str__(self) -> str:
        prefix = f"{self.code} {self.xcode}" if self.xcode else self.code
        return "\n".join(f"{prefix} {line}".rstrip() for line in self.lines)


@dataclass
class Injection:
    """The next ``count`` events at ``stage`` (optionally only of ``mailbox``) get ``reply``.

    ``lost_reply`` (stage ``data`` only): the message is accepted and delivered, but the session is
    cut before the 250 reaches the client, as when a connection dies right after end-of-DATA.
    """

    stage: Stage
    reply: str | None = None
    count: int = 1
    mailbox: str | None = None
    lost_reply: bool = False
    fired: int = 0

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}")
        if self.lost_reply == (self.reply is not None):
            raise ValueError("give either a reply or lost_reply=True")
        if self.lost_reply and self.stage != "data":
            raise ValueError("a lost reply happens at the end of DATA (stage='data')")
        if self.reply is not None:
            Reply.parse(self.reply)
        if self.count < 1:
            raise ValueError("count must be at least 1")
        if self.mailbox is not None:
            self.mailbox = self.mailbox.lower()


@dataclass(frozen=True)
class Decision:
    """What the milter does with an event: continue, answer ``reply``, or accept and cut the session."""

    reply: Reply | None = None
    lost_reply: bool = False

    @property
    def proceed(self) -> bool:
        return self.reply is None


@dataclass
class _Session:
    mailbox: str | None = None  # the authenticated login, once a MAIL FROM showed it
    counted: bool = False


@dataclass
class SubmissionPolicy:
    """Thread-safe: libmilter calls back from one thread per SMTP connection."""

    smtp_sessions: int = DEFAULT_SMTP_SESSIONS
    injections: list[Injection] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[int, _Session] = {}
        self._active: Counter[str] = Counter()
        self.counters: dict[str, Counter[str]] = {
            name: Counter() for name in ("max_concurrent", "refused", "accepted", "injected", "lost_replies")
        }

    # -------------------------------------------------------------- SMTP events
    def connect(self, session_id: int) -> None:
        with self._lock:
            self._sessions[session_id] = _Session()

    def mail(self, session_id: int, mailbox: str | None) -> Decision:
        """MAIL FROM: the first point where Postfix tells a milter who authenticated ({auth_authen})."""
        with self._lock:
            session = self._sessions.setdefault(session_id, _Session())
            if mailbox:
                mailbox = mailbox.lower()
                session.mailbox = mailbox
                if not session.counted:
                    if self._active[mailbox] >= self.smtp_sessions:
                        self.counters["refused"][mailbox] += 1
                        return Decision(Reply.parse(CONCURRENCY_REPLY))
                    # The session holds its slot from its first MAIL FROM until it disconnects.
                    session.counted = True
                    self._active[mailbox] += 1
                    peak = self.counters["max_concurrent"]
                    peak[mailbox] = max(peak[mailbox], self._active[mailbox])
            return self._injected("mail", session)

    def rcpt(self, session_id: int) -> Decision:
        with self._lock:
            return self._injected("rcpt", self._sessions.setdefault(session_id, _Session()))

    def end_of_data(self, session_id: int) -> Decision:
        with self._lock:
            session = self._sessions.setdefault(session_id, _Session())
            decision = self._injected("data", session)
            if decision.proceed and session.mailbox:
                self.counters["accepted"][session.mailbox] += 1
            return decision

    def close(self, session_id: int) -> None:
        with self._lock:
            session = self._sessions.pop(session_id, None)
            if session is not None and session.counted and session.mailbox:
                self._active[session.mailbox] -= 1

    def _injected(self, stage: str, session: _Session) -> Decision:
        for injection in self.injections:
            if injection.stage != stage or (injection.mailbox and injection.mailbox != session.mailbox):
                continue
            injection.fired += 1
            if injection.fired >= injection.count:
                self.injections.remove(injection)
            key = session.mailbox or "(unauthenticated)"
            if injection.lost_reply:
                self.counters["lost_replies"][key] += 1
                self.counters["accepted"][key] += 1
                return Decision(lost_reply=True)
            self.counters["injected"][key] += 1
            return Decision(Reply.parse(injection.reply or ""))
        return Decision()

    # -------------------------------------------------------------- control (admin API)
    def control(self, command: dict[str, Any]) -> dict[str, Any]:
        """One admin command (a JSON object) -> a JSON-able answer. Raises ValueError on bad input."""
        op = command.get("op")
        with self._lock:
            if op == "set_limits":
                value = int(command["smtp_sessions"])
                if value < 1:
                    raise ValueError("smtp_sessions must be at least 1")
                self.smtp_sessions = value
            elif op == "inject":
                fields = {k: command[k] for k in ("stage", "reply", "count", "mailbox", "lost_reply") if k in command}
                self.injections.append(Injection(**fields))
            elif op == "clear_injections":
                self.injections.clear()
            elif op == "reset_counters":
                for counter in self.counters.values():
                    counter.clear()
            elif op != "state":
                raise ValueError(f"unknown control operation {op!r}")
            return self._state()

    def _state(self) -> dict[str, Any]:
        return {
            "smtp_sessions": self.smtp_sessions,
            "active": {k: v for k, v in self._active.items() if v},
            "injections": [asdict(i) for i in self.injections],
            **{name: dict(counter) for name, counter in self.counters.items()},
        }
