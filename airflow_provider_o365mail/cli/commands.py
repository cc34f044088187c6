"""Implementations of ``airflow o365mail authorize | doctor | token-status | refresh | forget``."""

from __future__ import annotations

import html
import json
import sys
import threading
import time
import webbrowser
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from airflow_provider_o365mail import hints
from airflow_provider_o365mail.auth.consent import ConsentFlow, ConsentResult, parse_redirect, store_consent
from airflow_provider_o365mail.connection import settings_from_connection
from airflow_provider_o365mail.connection_defaults import TRANSPORT_GRAPH
from airflow_provider_o365mail.runtime import load_connection

DEFAULT_CLI_REDIRECT_URI = "http://localhost/o365mail/callback"
#: How long the loopback and paste flows wait for the sign-in without --timeout.
DEFAULT_SIGN_IN_TIMEOUT = 300.0


def _settings(conn_id: str):
    return settings_from_connection(load_connection(conn_id))


def _fail(message: str) -> None:
    print(f"Error: {message}", file=sys.stderr)
    sys.exit(1)


# ---------------------------------------------------------------------- authorize
def authorize(args: Any) -> None:
    """Run the consent flow for ``--conn-id``: loopback listener, ``--paste`` for headless terminals, or
    ``--device-code`` for public clients."""
    from airflow_provider_o365mail.exceptions import O365MailError

    try:
        settings = _settings(args.conn_id)
        redirect_uri = args.redirect_uri or DEFAULT_CLI_REDIRECT_URI
        if args.device_code:
            if args.paste:
                raise ValueError("Use --device-code or --paste, not both.")
            result = _authorize_by_device_code(settings, args.timeout)
        elif args.paste:
            result = _authorize_by_paste(settings, redirect_uri)
        else:
            timeout = DEFAULT_SIGN_IN_TIMEOUT if args.timeout is None else args.timeout
            result = _authorize_by_loopback(settings, redirect_uri, args.port, not args.no_browser, timeout)
        result = store_consent(result)
    except (O365MailError, ValueError, TimeoutError) as err:
        _fail(str(err))
        return
    where = "the connection and the token store" if result.connection_updated else "the token store"
    also = (
        f"Also consented, for sending through Microsoft Graph: {' '.join(result.also_consented)}\n"
        if result.also_consented
        else ""
    )
    print(
        f"Authorized connection {result.conn_id!r} for {result.username}"
        f"{f' ({result.name})' if result.name else ''}.\nScopes: {' '.join(result.scopes)}\n{also}"
        f"The refresh token was stored in {where} (encrypted); no token is shown.",
        flush=True,
    )
    if args.device_code and settings.delegated and settings.uses_graph:
        graph_ok, note = _graph_after_device_code(settings)
        if graph_ok:
            print(note)
        elif settings.transport == TRANSPORT_GRAPH:
            _fail(note)
        else:
            print(f"Warning: {note}", file=sys.stderr)


def _graph_after_device_code(settings: Any) -> tuple[bool, str]:
    """Whether the stored grant yields a Graph token, and what to tell the user.

    A device code is redeemed without a scope parameter, so it can carry one resource only (Entra
    refuses a device code for Exchange and Graph together: AADSTS28000/70011); it asks Exchange's
    scopes. Graph then works only where Graph consent exists already (an earlier browser consent, or
    admin consent for the tenant).
    """
    from airflow_provider_o365mail.exceptions import O365MailError, ReauthorizationRequired
    from airflow_provider_o365mail.hooks.o365mail import O365MailHook

    scopes = " ".join(settings.graph_scopes)
    try:
        O365MailHook(settings.conn_id).graph_access_token(force_refresh=True)
    except ReauthorizationRequired as err:
        codes = ", ".join(f"AADSTS{c}" for c in err.error_codes) or err.error or type(err).__name__
        why = f"Microsoft Graph refused a token with this grant ({codes})"
        return False, hints.DEVICE_CODE_WITHOUT_GRAPH.format(
            why=why, transport=settings.transport, scopes=scopes, conn_id=settings.conn_id
        )
    except O365MailError as err:
        return False, f"The Microsoft Graph token check failed: {err}"
    return True, f"Microsoft Graph: the same grant yields a Graph token ({scopes}); Graph consent was already given."


def _authorize_by_device_code(settings: Any, timeout: float | None) -> ConsentResult:
    from airflow_provider_o365mail.auth.device_code import DeviceCodeConsent

    consent = DeviceCodeConsent(settings)
    code = consent.start()
    minutes = max(0, round((code.expires_at - time.time()) / 60))
    waiting = "until it expires" if timeout is None else f"up to {timeout:.0f} s (--timeout)"
    print(
        f"{code.message or f'Open {code.verification_uri} and enter the code {code.user_code}.'}\n"
        f"Sign in as the mailbox user ({settings.mailbox}) and accept. The code is valid for {minutes} minutes; "
        f"waiting {waiting}.",
        flush=True,
    )
    if timeout is None:
        return consent.wait(code)
    deadline = time.monotonic() + timeout
    return consent.wait(code, until=lambda: time.monotonic() > deadline)


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
            f"Sign in as the mailbox user and accept; waiting for the callback on {local_uri}\n\n{flow['auth_uri']}\n",
            flush=True,  # the link must reach a piped terminal (| tee) before the wait
        )
        if open_browser:
            webbrowser.open(flow["auth_uri"])
        if not handler.done.wait(timeout):
            raise TimeoutError(f"No sign-in completed within {timeout:.0f} s. Run authorize again (or use --paste).")
        return flow_helper.finish(flow, handler.received or {})
    finally:
        server.shutdown()
        server.server_close()


def _report(rows: list[Any], output: str, marks: dict[str, str], line: Callable[[Any, str], str]) -> None:
    """Rows (with ``status`` and ``as_dict()``) as a JSON list, or one text line each behind its mark."""
    if output == "json":
        print(json.dumps([row.as_dict() for row in rows], indent=2))
        return
    for row in rows:
        print(line(row, marks[row.status]))


# ---------------------------------------------------------------------- doctor
def doctor(args: Any) -> None:
    from airflow_provider_o365mail.hooks.doctor import FAIL, diagnose

    def line(check: Any, mark: str) -> str:
        text = f"[{mark}] {check.link:<20} {check.detail}"
        if check.fix and check.status in ("fail", "warn"):
            text += f"\n       {'':<20} fix: {check.fix}"
        return text

    checks = diagnose(args.conn_id)
    _report(checks, args.output, {"ok": " OK ", "warn": "WARN", "fail": "FAIL", "skip": "SKIP"}, line)
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


def _o365mail_conn_ids() -> list[str]:
    from airflow.models.connection import Connection
    from airflow.utils.session import create_session

    from airflow_provider_o365mail.connection import CONN_TYPE

    with create_session() as session:
        rows = session.query(Connection.conn_id).filter(Connection.conn_type == CONN_TYPE).all()
    return sorted(row[0] for row in rows)


def refresh(args: Any) -> None:
    """Keep-alive: redeem the refresh token of each connection and store the rotated one."""
    from airflow_provider_o365mail.auth.token_status import KeepAliveResult, keep_alive
    from airflow_provider_o365mail.auth.tokens import TokenManager
    from airflow_provider_o365mail.exceptions import O365MailError

    conn_ids = list(args.conn_ids) or _o365mail_conn_ids()
    if not conn_ids:
        _fail(
            "No o365mail connection in the metadata database. Name the connections: "
            "'airflow o365mail refresh <conn_id> [<conn_id> ...]' (environment and secrets-backend connections "
            "are not listed)."
        )
        return
    results = []
    for conn_id in conn_ids:
        try:
            result = keep_alive(TokenManager(_settings(conn_id)))
        except (O365MailError, ValueError) as err:
            result = KeepAliveResult(conn_id, "failed", str(err))
        results.append(result)
    marks = {"ok": " OK ", "skipped": "SKIP", "failed": "FAIL", "reauthorize": "FAIL", "broken": "FAIL"}
    _report(results, args.output, marks, lambda r, mark: f"[{mark}] {r.connection}: {r.detail}")
    if any(r.status in ("failed", "reauthorize", "broken") for r in results):
        sys.exit(1)


def forget(args: Any) -> None:
    from airflow_provider_o365mail.auth.store import TokenStore

    TokenStore(args.conn_id).forget()
    print(
        f"Dropped the cached tokens of {args.conn_id!r}. The connection's refresh token field is kept; the next use "
        "redeems it (or run 'airflow o365mail authorize')."
    )


# ---------------------------------------------------------------------- rotate-keys
def rotate_keys(args: Any) -> None:
    """Re-encrypt every token store under its data key or the newest key, and the consent flows in progress."""
    from airflow_provider_o365mail.auth.rotation import rotate_all
    from airflow_provider_o365mail.exceptions import O365MailError

    try:
        report = rotate_all()
    except O365MailError as err:
        _fail(str(err))
        return
    print(
        f"Token stores re-encrypted (under their data key, or the newest token_cache_keys): "
        f"{len(report.reencrypted)}; already current: {len(report.current)}; consent flows in progress "
        f"re-encrypted: {report.flows}."
    )
    for conn_id, message in report.failed.items():
        print(f"Cannot re-encrypt the token store of {conn_id!r}: {message}", file=sys.stderr)
    if report.failed:
        print(
            "Keep the old key configured (second) until every store above is re-encrypted; a store no key opens "
            "falls back to its connection's refresh token.",
            file=sys.stderr,
        )
        sys.exit(1)
    print("The old key can now be removed from every Airflow component.")
