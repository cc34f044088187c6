"""Implementations of ``airflow o365mail authorize | doctor | token-status | forget``."""

from __future__ import annotations

import html
import json
import sys
import threading
import webbrowser
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from airflow_provider_o365mail.auth.consent import ConsentFlow, ConsentResult, parse_redirect, store_consent
from airflow_provider_o365mail.connection import load_connection, settings_from_connection

DEFAULT_CLI_REDIRECT_URI = "http://localhost/o365mail/callback"


def _settings(conn_id: str):
    return settings_from_connection(load_connection(conn_id))


def _fail(message: str) -> None:
    print(f"Error: {message}", file=sys.stderr)
    sys.exit(1)


# ---------------------------------------------------------------------- authorize
def authorize(args: Any) -> None:
    """Run the consent flow for ``--conn-id``: loopback listener, or ``--paste`` for headless terminals."""
    from airflow_provider_o365mail.exceptions import O365MailError

    try:
        settings = _settings(args.conn_id)
        redirect_uri = args.redirect_uri or DEFAULT_CLI_REDIRECT_URI
        if args.paste:
            result = _authorize_by_paste(settings, redirect_uri)
        else:
            result = _authorize_by_loopback(settings, redirect_uri, args.port, not args.no_browser, args.timeout)
        result = store_consent(result)
    except (O365MailError, ValueError, TimeoutError) as err:
        _fail(str(err))
        return
    where = "the connection and the token store" if result.connection_updated else "the token store"
    print(
        f"Authorized connection {result.conn_id!r} for {result.username}"
        f"{f' ({result.name})' if result.name else ''}.\nScopes: {' '.join(result.scopes)}\n"
        f"The refresh token was stored in {where} (encrypted); no token is shown."
    )


def _authorize_by_paste(settings: Any, redirect_uri: str) -> ConsentResult:
    flow_helper = ConsentFlow(settings, redirect_uri)
    flow = flow_helper.start()
    print(
        "1. Open this link in a browser, sign in as the mailbox user and accept:\n\n"
        f"{flow['auth_uri']}\n\n"
        f"2. The browser is then sent to {redirect_uri}?code=... (the page may not load: that is expected).\n"
        "   Copy the whole address from the address bar and paste it here, then press Enter:",
        flush=True,
    )
    line = sys.stdin.readline()
    if not line.strip():
        raise ValueError("Nothing was pasted.")
    return flow_helper.finish(flow, parse_redirect(line))


class _CallbackHandler(BaseHTTPRequestHandler):
    expected_path = "/"
    received: dict[str, str] | None = None
    done: threading.Event

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if parts.path != self.expected_path or not parts.query:
            self.send_error(404)
            return
        type(self).received = parse_redirect(parts.query)
        ok = "error" not in type(self).received
        body = (
            "<h2>Authorized.</h2><p>You can close this window and return to the terminal.</p>"
            if ok
            else f"<h2>Authorization failed</h2><p>{html.escape(type(self).received.get('error', ''))}</p>"
        )
        payload = f"<!DOCTYPE html><html><body style='font-family:sans-serif'>{body}</body></html>".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        type(self).done.set()

    def log_message(self, format: str, *args: Any) -> None:  # the query holds the code: never log it
        return


def _authorize_by_loopback(
    settings: Any, redirect_uri: str, port: int, open_browser: bool, timeout: float
) -> ConsentResult:
    parts = urlsplit(redirect_uri)
    if parts.hostname not in ("localhost", "127.0.0.1"):
        raise ValueError(
            f"The loopback listener needs a localhost redirect URI, not {redirect_uri}; use --paste with that URI."
        )
    handler = type("Handler", (_CallbackHandler,), {"expected_path": parts.path or "/", "done": threading.Event()})
    server = HTTPServer(("127.0.0.1", port), handler)
    local_uri = urlunsplit(parts._replace(netloc=f"{parts.hostname}:{server.server_address[1]}"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        flow_helper = ConsentFlow(settings, local_uri)
        flow = flow_helper.start()
        print(
            f"Sign in as the mailbox user and accept; waiting for the callback on {local_uri}\n\n{flow['auth_uri']}\n"
        )
        if open_browser:
            webbrowser.open(flow["auth_uri"])
        if not handler.done.wait(timeout):
            raise TimeoutError(f"No sign-in completed within {timeout:.0f} s. Run authorize again (or use --paste).")
        return flow_helper.finish(flow, handler.received or {})
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------- doctor
def doctor(args: Any) -> None:
    from airflow_provider_o365mail.doctor import FAIL, diagnose

    checks = diagnose(args.conn_id)
    if args.output == "json":
        print(json.dumps([c.as_dict() for c in checks], indent=2))
    else:
        marks = {"ok": " OK ", "warn": "WARN", "fail": "FAIL", "skip": "SKIP"}
        for check in checks:
            print(f"[{marks[check.status]}] {check.link:<20} {check.detail}")
            if check.fix and check.status in ("fail", "warn"):
                print(f"       {'':<20} fix: {check.fix}")
    broken = [c.link for c in checks if c.status == FAIL]
    if broken:
        print(f"\nBroken link: {broken[0]}", file=sys.stderr)
        sys.exit(1)


# ---------------------------------------------------------------------- token-status / forget
def token_status(args: Any) -> None:
    from airflow_provider_o365mail.auth.token_status import describe_store

    try:
        status = describe_store(_settings(args.conn_id))
    except Exception as err:
        _fail(str(err))
        return
    if args.output == "json":
        print(json.dumps(status, indent=2))
        return
    for key, value in status.items():
        print(f"{key:<26} {value if value not in (None, '', []) else '-'}")


def forget(args: Any) -> None:
    from airflow_provider_o365mail.auth.store import TokenStore

    TokenStore(args.conn_id).forget()
    print(
        f"Dropped the cached tokens of {args.conn_id!r}. The connection's refresh token field is kept; the next use "
        "redeems it (or run 'airflow o365mail authorize')."
    )
