"""Exchange's "Sent Items" copy of every SMTP AUTH submission, for the sandbox.

Exchange Online stores every message sent through SMTP AUTH in the Sent Items folder of the
mailbox used (Microsoft Learn, "Message storage and concurrent connection throttling for SMTP
Authenticated Submission"). In the sandbox the milter adds an extra envelope recipient,
``<local>=<domain>@sent-items.sandbox.invalid``, for the authenticated mailbox; Postfix routes that
domain to a ``pipe`` transport running this file (as the maildirs' owner), which stores the queued
message in ``Sent Items`` of that mailbox. So the copy exists only if Postfix accepted the message,
has the recipients' bytes and Message-ID, and never lands in an INBOX.

Standard library only: Postfix runs it with Debian's python3 from a copy in the state directory.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from pathlib import Path

ROUTING_DOMAIN = "sent-items.sandbox.invalid"
FOLDER = "Sent Items"


def routing_address(mailbox: str) -> str:
    local, _, domain = mailbox.lower().rpartition("@")
    return f"{local}={domain}@{ROUTING_DOMAIN}"


def mailbox_of(address: str) -> str:
    local = address.strip("<>").rpartition("@")[0]
    user, _, domain = local.rpartition("=")
    if not user or not domain:
        raise ValueError("not a Sent Items routing address")
    return f"{user}@{domain}".lower()


def strip_submission_trace(raw: bytes, hostname: str) -> bytes:
    """Remove the ``Received:`` header our Postfix prepended, so the copy is what the client sent."""
    pattern = re.compile(
        rb"\AReceived:[^\n]*\n(?:[ \t][^\n]*\n)*",
    )
    found = pattern.match(raw)
    if found and f"by {hostname} (Postfix)".encode() in found.group(0):
        return raw[found.end() :]
    return raw


def store(raw: bytes, maildir: Path, seen: bool = True) -> Path:
    """Deliver into a Maildir++ folder as an external delivery agent does (tmp/, then rename).

    Exchange marks the Sent Items copy as read: the file goes to ``cur/`` with the S flag.
    """
    folder = maildir / f".{FOLDER}"
    for sub in (maildir, folder):
        for part in ("cur", "new", "tmp"):
            (sub / part).mkdir(parents=True, exist_ok=True)
    (folder / "maildirfolder").touch()
    unique = f"{time.time_ns() // 1000}.P{os.getpid()}.{socket.gethostname()}"
    tmp = folder / "tmp" / unique
    with open(tmp, "wb") as fh:
        fh.write(raw)
        fh.flush()
        os.fsync(fh.fileno())
    final = folder / ("cur" if seen else "new") / (f"{unique},S={len(raw)}" + (":2,S" if seen else ""))
    os.rename(tmp, final)
    return final


def lag_seconds(control_file: Path) -> float:
    try:
        return float(json.loads(control_file.read_text()).get("sent_items_lag", 0))
    except (OSError, ValueError):
        return 0.0


def main(argv: list[str]) -> int:
    """``sent_items.py CONTROL_FILE MAIL_ROOT HOSTNAME RECIPIENT`` with the message on stdin."""
    control_file, mail_root, hostname, recipient = argv
    raw = sys.stdin.buffer.read().replace(b"\r\n", b"\n")
    mailbox = mailbox_of(recipient)
    lag = lag_seconds(Path(control_file))
    if lag > 0:
        time.sleep(lag)  # "the copy lags": the Sent Items copy shows up later than the 250
    store(strip_submission_trace(raw, hostname), Path(mail_root) / mailbox / "Maildir")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
