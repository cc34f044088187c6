"""The sandbox's milter: Exchange's per-mailbox SMTP session cap, injected replies, Sent Items copies.

Why a milter: Postfix limits concurrency per client IP (anvil), never per SASL login, and a policy
service is asked per command but is never told that a session ended, so it cannot count open
sessions. A milter sees the connection open, ``{auth_authen}`` at MAIL FROM, every RCPT, the end of
DATA, and the close, on one socket per SMTP session; it can answer any of them with a chosen reply
and add a recipient (the Sent Items copy).

Runs under Debian's ``python3`` with Debian's ``python3-milter`` (pymilter on Sendmail's libmilter):
``python3 -m airflow_provider_o365mail.testing.smtp_milter --port P --control SOCKET --smtp-port S``.
It only imports the standard library, Milter and the sandbox's stdlib-only modules.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import socketserver
import threading
from pathlib import Path
from typing import Any

import Milter

from airflow_provider_o365mail.testing.sent_items import routing_address
from airflow_provider_o365mail.testing.smtp_policy import Decision, SubmissionPolicy

_ids = itertools.count(1)
_ids_lock = threading.Lock()


def smtpd_pid_for(client_port: int, smtp_port: int) -> int | None:
    """The PID of the Postfix smtpd serving the TCP connection from 127.0.0.1:``client_port``."""
    wanted_local, wanted_remote = f"0100007F:{smtp_port:04X}", f"0100007F:{client_port:04X}"
    inode = None
    with open("/proc/net/tcp") as fh:
        for line in fh.readlines()[1:]:
            fields = line.split()
            if fields[1] == wanted_local and fields[2] == wanted_remote:
                inode = fields[9]
                break
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().strip() != "smtpd":
                continue
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) == target:
                    return int(proc.name)
        except OSError:
            continue
    return None


class SandboxMilter(Milter.Base):
    policy: SubmissionPolicy = SubmissionPolicy()
    smtp_port: int = 0

    def __init__(self) -> None:
        with _ids_lock:
            self.session_id = next(_ids)
        self.client_port: int | None = None
        self.mailbox: str | None = None

    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        if isinstance(hostaddr, tuple) and len(hostaddr) >= 2:
            self.client_port = int(hostaddr[1])
        self.policy.connect(self.session_id)
        return Milter.CONTINUE

    def envfrom(self, mailfrom: str, *params: str) -> int:
        self.mailbox = self.getsymval("{auth_authen}") or None
        return self._apply(self.policy.mail(self.session_id, self.mailbox))

    def envrcpt(self, to: str, *params: str) -> int:
        return self._apply(self.policy.rcpt(self.session_id))

    def eom(self) -> int:
        decision = self.policy.end_of_data(self.session_id)
        if not decision.proceed:
            return self._apply(decision)
        if self.mailbox:
            self.addrcpt(f"<{routing_address(self.mailbox)}>")
        if decision.lost_reply:
            self._cut_session()
        return Milter.ACCEPT

    def close(self) -> int:
        self.policy.close(self.session_id)
        return Milter.CONTINUE

    def _apply(self, decision: Decision) -> int:
        if decision.reply is None:
            return Milter.CONTINUE
        reply = decision.reply
        self.setreply(reply.code, reply.xcode, *reply.lines)
        return Milter.TEMPFAIL if reply.code.startswith("4") else Milter.REJECT

    def _cut_session(self) -> None:
        """Kill the smtpd before it can say 250: Postfix's cleanup still commits the message.

        At end of DATA the milter is talking to cleanup (smtpd handed it the milter socket), and
        cleanup queues the message once the milter accepts, whether or not smtpd is alive.
        """
        pid = smtpd_pid_for(self.client_port, self.smtp_port) if self.client_port else None
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class _ControlHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            try:
                answer: dict[str, Any] = {"ok": True, "state": SandboxMilter.policy.control(json.loads(line))}
            except (ValueError, KeyError, TypeError) as exc:
                answer = {"ok": False, "error": str(exc)}
            self.wfile.write(json.dumps(answer).encode() + b"\n")
            self.wfile.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="milter socket on 127.0.0.1")
    parser.add_argument("--control", type=Path, required=True, help="unix socket of the admin commands")
    parser.add_argument("--smtp-port", type=int, required=True, help="Postfix submission port (for lost replies)")
    parser.add_argument("--smtp-sessions", type=int, default=3)
    args = parser.parse_args(argv)
    SandboxMilter.policy = SubmissionPolicy(smtp_sessions=args.smtp_sessions)
    SandboxMilter.smtp_port = args.smtp_port
    args.control.unlink(missing_ok=True)
    old_umask = os.umask(0o077)  # the control socket is root's only
    control = socketserver.ThreadingUnixStreamServer(str(args.control), _ControlHandler)
    os.umask(old_umask)
    control.daemon_threads = True
    threading.Thread(target=control.serve_forever, daemon=True).start()
    Milter.factory = SandboxMilter
    Milter.set_flags(Milter.ADDRCPT)
    try:
        Milter.runmilter("o365sandbox", f"inet:{args.port}@127.0.0.1", timeout=600)
    finally:
        control.shutdown()
        args.control.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
