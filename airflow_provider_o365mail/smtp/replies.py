"""Which permanent SMTP replies of Exchange Online mean "stop sending from this mailbox" (pure).

``554 5.2.0 ...SubmissionQuotaExceededException`` (10,000 recipients a day exceeded: blocked for up
to 24 h) and the continuous error throttling replies ``550 5.2.251``..``5.2.255`` are not about one
message: every further message fails the same way and retrying prolongs the throttling. The sender
raises :class:`SendingBlockedError` for them (no retries, the rest of the batch is not attempted).
"""

from __future__ import annotations

import re

from airflow_provider_o365mail import hints

_ENHANCED = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")


def enhanced_code(text: str) -> str | None:
    """The enhanced status code (``5.2.251``) of a reply's text, if any."""
    match = _ENHANCED.search(text)
    return match.group(1) if match else None


def mailbox_block_hint(code: int, text: str) -> str | None:
    """The fix-it sentence when ``code``/``text`` means the mailbox may not send now; else None."""
    if code < 500:
        return None
    if "submissionquotaexceeded" in text.lower():
        return hints.SUBMISSION_QUOTA_EXCEEDED
    enhanced = enhanced_code(text)
    if enhanced in hints.CONTINUOUS_ERROR_THROTTLING:
        return hints.CONTINUOUS_ERROR_THROTTLING[enhanced]
    if enhanced == "5.2.2" and "quotaexceeded" in text.lower():
        return hints.MAILBOX_FULL
    return None


__all__ = ["enhanced_code", "mailbox_block_hint"]
