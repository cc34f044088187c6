"""Exchange Online's 10,000 recipients per rolling 24 hours per mailbox, counted before Exchange does.

Past that limit Exchange answers ``554 5.2.0 ...SubmissionQuotaExceededException`` and blocks the
mailbox from sending for up to a day, so the provider keeps its own count below a budget. One
Variable per mailbox, ``o365mail_recipients_<sha256(mailbox)[:16]>``, JSON::

    {"v": 1, "mailbox": "reports@contoso.com", "window": 86400,
     "reservations": {"<task instance key or one-off id>": [1764630000.0, 120], ...}}

A batch reserves all its recipients (To + Cc + Bcc of every message) before its first message is
sent, under a lock, so concurrent tasks of one mailbox cannot both pass (the hook's lock is exclusive
across hosts: a host ``flock``, then a cross-host lease in a Variable). A task's retry keeps its
first reservation (same key), so retries are not counted twice. Reservations older than the window
are dropped on every reservation. The count covers what this provider sent; mail the mailbox sends
otherwise (Outlook, other apps) is not seen: leave room for it in the budget.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from airflow_provider_o365mail import hints
from airflow_provider_o365mail.exceptions import RecipientBudgetExceeded

if TYPE_CHECKING:
    from airflow_provider_o365mail.runtime import VariableBackend

#: Exchange Online's Recipient Rate Limit is 10,000; stop a little before it.
DEFAULT_DAILY_RECIPIENT_BUDGET = 9_500
WINDOW_SECONDS = 24 * 3600.0
DESCRIPTION = "airflow-provider-o365mail: recipients sent per mailbox in the last 24 h (do not edit)"


def budget_key(mailbox: str) -> str:
    return "o365mail_recipients_" + hashlib.sha256(mailbox.lower().encode()).hexdigest()[:16]


class RecipientBudget:
    """The rolling 24-hour recipient count of one mailbox.

    :param lock: a context manager factory held around the read-modify-write (the Variable API has
        no compare-and-swap); the hook passes a host lock plus a cross-host lease named after the mailbox.
    """

    def __init__(
        self,
        store: VariableBackend,
        mailbox: str,
        budget: int = DEFAULT_DAILY_RECIPIENT_BUDGET,
        *,
        window: float = WINDOW_SECONDS,
        clock: Callable[[], float] = time.time,
        lock: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
    ) -> None:
        self._store = store
        self.mailbox = mailbox
        self.budget = budget
        self.window = window
        self._clock = clock
        self._lock = lock
        self.key = budget_key(mailbox)

    def _load(self, now: float) -> dict[str, list[float]]:
        raw = self._store.get(self.key)
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            data = {}
        reservations = data.get("reservations") if isinstance(data, dict) else None
        if not isinstance(reservations, dict):
            return {}
        kept = {}
        for key, value in reservations.items():
            if isinstance(value, list) and len(value) == 2 and now - float(value[0]) < self.window:
                kept[key] = [float(value[0]), int(value[1])]
        return kept

    def used(self) -> int:
        return sum(int(n) for _, n in self._load(self._clock()).values())

    def reserve(self, holder: str, recipients: int) -> None:
        """Count ``recipients`` for ``holder`` (a task instance key) or raise without counting anything.

        :raises RecipientBudgetExceeded: the batch would cross the budget; says when room frees up.
        """
        earlier = self._load(self._clock()).get(holder)
        if earlier is not None and earlier[1] >= recipients:
            return  # a retry of a batch that was counted already (only the window's end removes it)
        with self._lock():
            now = self._clock()
            reservations = self._load(now)
            earlier = reservations.get(holder)
            if earlier is not None and earlier[1] >= recipients:
                return  # a retry of a batch that was counted already
            others = sum(n for key, (_, n) in reservations.items() if key != holder)
            if others + recipients > self.budget:
                raise self._exceeded(reservations, holder, others, recipients, now)
            reservations[holder] = [earlier[0] if earlier else now, recipients]
            document = {"v": 1, "mailbox": self.mailbox, "window": self.window, "reservations": reservations}
            self._store.set(self.key, json.dumps(document, separators=(",", ":")), DESCRIPTION)

    def _exceeded(
        self, reservations: dict[str, list[float]], holder: str, used: int, needed: int, now: float
    ) -> RecipientBudgetExceeded:
        if needed > self.budget:
            when = "never: the batch alone needs more than the whole budget; split it over several days"
        else:
            # The oldest reservations expire first; find when enough of them have.
            free = self.budget - used
            when = "now"
            for started, n in sorted(v for k, v in reservations.items() if k != holder):
                if free >= needed:
                    break
                free += int(n)
                when = datetime.fromtimestamp(started + self.window, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")
        return RecipientBudgetExceeded(
            f"Not sending: {self.mailbox} sent to {used:,} recipient(s) in the last 24 h and this batch needs "
            f"{needed:,} more, over the budget of {self.budget:,} ([o365mail] daily_recipient_budget). Nothing "
            f"of this batch was sent. Enough budget frees up at {when}. {hints.RECIPIENT_BUDGET}"
        )


__all__ = ["DEFAULT_DAILY_RECIPIENT_BUDGET", "RecipientBudget", "budget_key"]
