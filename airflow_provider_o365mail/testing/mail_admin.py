"""Admin operations on the sandbox's mail side (caps, SMTP reply injection, Sent Items lag).

Served by the Entra ID stand-in under ``/_sandbox/admin/mail/...`` (same admin key), because that
process already is the sandbox's admin endpoint and runs with the rights to reload Dovecot and to
reach the milter's root-only control socket.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from airflow_provider_o365mail.testing import mailservers
from airflow_provider_o365mail.testing.mailservers import DEFAULT_LIMITS, MailServerConfig


class MailControlError(RuntimeError):
    pass


def milter_command(cfg: MailServerConfig, command: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
    """Send one JSON command to the milter's control socket; return its state."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(cfg.milter_control))
        except OSError as exc:
            raise MailControlError(f"the sandbox milter is not running ({exc.strerror})") from None
        sock.sendall(json.dumps(command).encode() + b"\n")
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    reply = json.loads(answer)
    if not reply["ok"]:
        raise ValueError(reply["error"])
    return reply["state"]


def _reloads(log: Path) -> int:
    try:
        return len(re.findall(r"SIGHUP received - reloading configuration", log.read_text(errors="replace")))
    except OSError:
        return 0


def reload_dovecot(cfg: MailServerConfig, timeout: float = 10) -> None:
    """``doveadm reload`` and wait until the master has re-read its configuration."""
    log = cfg.dovecot_dir / "dovecot.log"
    before = _reloads(log)
    subprocess.run(["doveadm", "-c", str(cfg.dovecot_conf), "reload"], check=True, capture_output=True)
    deadline = time.monotonic() + timeout
    while _reloads(log) <= before:
        if time.monotonic() > deadline:
            raise MailControlError("Dovecot did not log its reload")
        time.sleep(0.02)
    time.sleep(0.2)  # the config service restarts after the log line; new logins must see the new value


def limits(cfg: MailServerConfig) -> dict[str, Any]:
    return mailservers.read_control(cfg)


def set_limits(
    cfg: MailServerConfig,
    *,
    imap_connections: int | None = None,
    smtp_sessions: int | None = None,
    sent_items_lag: float | None = None,
) -> dict[str, Any]:
    current = mailservers.read_control(cfg)
    if imap_connections is not None and int(imap_connections) < 1:
        raise ValueError("imap_connections must be at least 1")
    if sent_items_lag is not None and float(sent_items_lag) < 0:
        raise ValueError("sent_items_lag cannot be negative")
    if smtp_sessions is not None:
        current["smtp_sessions"] = milter_command(cfg, {"op": "set_limits", "smtp_sessions": int(smtp_sessions)})[
            "smtp_sessions"
        ]
    if sent_items_lag is not None:
        current["sent_items_lag"] = float(sent_items_lag)
    imap_changed = imap_connections is not None and int(imap_connections) != current["imap_connections"]
    if imap_connections is not None:
        current["imap_connections"] = int(imap_connections)
    mailservers.write_control(cfg, current)
    if imap_changed:
        reload_dovecot(cfg)
    return current


def reset(cfg: MailServerConfig) -> dict[str, Any]:
    """Exchange's defaults again, no pending injections, counters zeroed."""
    milter_command(cfg, {"op": "clear_injections"})
    milter_command(cfg, {"op": "reset_counters"})
    return set_limits(cfg, **DEFAULT_LIMITS)


def router(state_dir: Path, admin_key: str) -> APIRouter:
    """Routes under ``/_sandbox/admin/mail/``; the mail config is read lazily (the IdP starts first)."""
    api = APIRouter(prefix="/_sandbox/admin/mail")

    def config(request: Request) -> MailServerConfig:
        if not secrets.compare_digest(request.headers.get("x-sandbox-admin-key", ""), admin_key):
            raise PermissionError
        from airflow_provider_o365mail.testing.sandbox import Sandbox

        sandbox = Sandbox(state_dir)
        return sandbox.mail_config(json.loads(sandbox.config_file.read_text()))

    async def body(request: Request) -> dict[str, Any]:
        return await request.json() if await request.body() else {}

    def answer(call: Any) -> JSONResponse:
        try:
            return JSONResponse(call())
        except (ValueError, TypeError) as exc:
            return JSONResponse({"detail": str(exc)}, status_code=400)
        except MailControlError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=503)

    @api.get("/limits")
    async def get_limits(request: Request) -> JSONResponse:
        cfg = config(request)
        return answer(lambda: limits(cfg))

    @api.post("/limits")
    async def post_limits(request: Request) -> JSONResponse:
        cfg, values = config(request), await body(request)
        allowed = {k: values[k] for k in ("imap_connections", "smtp_sessions", "sent_items_lag") if k in values}
        if len(allowed) != len(values):
            return JSONResponse({"detail": f"unknown limits: {sorted(set(values) - set(allowed))}"}, status_code=400)
        return answer(lambda: set_limits(cfg, **allowed))

    @api.post("/reset")
    async def post_reset(request: Request) -> JSONResponse:
        cfg = config(request)
        return answer(lambda: reset(cfg))

    @api.post("/smtp-replies")
    async def inject(request: Request) -> JSONResponse:
        cfg, values = config(request), await body(request)
        return answer(lambda: milter_command(cfg, {**values, "op": "inject"}))

    @api.delete("/smtp-replies")
    async def clear(request: Request) -> JSONResponse:
        cfg = config(request)
        return answer(lambda: milter_command(cfg, {"op": "clear_injections"}))

    @api.get("/smtp")
    async def smtp_state(request: Request) -> JSONResponse:
        cfg = config(request)
        return answer(lambda: milter_command(cfg, {"op": "state"}))

    @api.post("/smtp/reset-counters")
    async def reset_counters(request: Request) -> JSONResponse:
        cfg = config(request)
        return answer(lambda: milter_command(cfg, {"op": "reset_counters"}))

    return api
