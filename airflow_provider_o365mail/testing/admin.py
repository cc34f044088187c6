"""Python client of the sandbox's admin API (tests, demos and benchmarks drive the sandbox with it)."""

from __future__ import annotations

import base64
import hashlib
import html
import re
import secrets
from http.client import RemoteDisconnected
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests


def tls_session(ca_file: str) -> requests.Session:
    """A session that trusts exactly ``ca_file``; REQUESTS_CA_BUNDLE cannot override it."""
    session = requests.Session()
    session.trust_env = False
    session.verify = ca_file
    return session


def _closed_before_answering(err: requests.ConnectionError) -> bool:
    """The server closed a kept-alive connection as the request went out (uvicorn drops idle ones after 5 s):
    nothing reached the handler, so sending the request again on a new connection is safe."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, RemoteDisconnected) or any(isinstance(a, RemoteDisconnected) for a in seen.args):
            return True
        seen = seen.__cause__ or seen.__context__ or next((a for a in seen.args if isinstance(a, BaseException)), None)
    return False


def admin_request(session: requests.Session, method: str, url: str, **kwargs: Any) -> requests.Response:
    """One admin call; sent once more when the server had closed the reused connection before reading it."""
    try:
        return session.request(method, url, **kwargs)
    except requests.ConnectionError as err:
        if not _closed_before_answering(err):
            raise
    return session.request(method, url, **kwargs)


class SandboxAdmin:
    """Drive the Entra ID stand-in: revoke consent, expire tokens, inject faults, count requests."""

    def __init__(
        self, base_url: str, admin_key: str, ca_file: str, tenant: str, *, graph_url: str | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.graph_url = graph_url.rstrip("/") if graph_url else None
        self.tenant = tenant
        self._session = tls_session(ca_file)
        self._session.headers["X-Sandbox-Admin-Key"] = admin_key

    def __repr__(self) -> str:
        return f"SandboxAdmin({self.base_url!r})"

    def _call(self, method: str, path: str, payload: dict | None = None) -> Any:
        response = admin_request(
            self._session, method, f"{self.base_url}/_sandbox/admin/{path}", json=payload, timeout=30
        )
        response.raise_for_status()
        return response.json()

    # -- state and counters
    def state(self) -> dict:
        return self._call("GET", "state")

    def counters(self) -> dict[str, int]:
        return self.state()["counters"]

    def reset_counters(self) -> None:
        self._call("POST", "counters/reset")

    def update_settings(self, **values: Any) -> dict:
        return self._call("POST", "settings", values)

    # -- users and consent
    def update_user(self, upn: str, **flags: Any) -> dict:
        return self._call("POST", f"users/{upn}", flags)

    def consent(self, upn: str, client_id: str, scope: str) -> dict:
        return self._call("POST", "consent", {"upn": upn, "client_id": client_id, "scope": scope})

    def revoke_consent(self, upn: str, client_id: str, resource: str | None = None) -> bool:
        """Remove the user's consent to the app; with ``resource`` (e.g. Graph's), only that API's permissions."""
        payload = {"client_id": client_id, "resource": resource}
        return self._call("POST", f"users/{upn}/revoke-consent", payload)["removed"]

    def revoke_sessions(self, upn: str) -> None:
        self._call("POST", f"users/{upn}/revoke-sessions")

    def expire_refresh_tokens(self, upn: str) -> None:
        self._call("POST", f"users/{upn}/expire-refresh-tokens")

    # -- app registrations
    def add_secret(self, client_id: str, lifetime_days: float = 180) -> dict:
        return self._call("POST", f"apps/{client_id}/secrets", {"lifetime_days": lifetime_days})

    def expire_secrets(self, client_id: str) -> None:
        self._call("POST", f"apps/{client_id}/secrets/expire")

    def remove_secret(self, client_id: str, secret_id: str) -> None:
        self._call("DELETE", f"apps/{client_id}/secrets/{secret_id}")

    def add_certificate(self, client_id: str, certificate_pem: str) -> dict:
        """Upload a certificate (PEM, public part) to the app registration; returns its thumbprints."""
        return self._call("POST", f"apps/{client_id}/certificates", {"certificate": certificate_pem})

    def clear_certificates(self, client_id: str) -> None:
        self._call("DELETE", f"apps/{client_id}/certificates")

    def add_federated_credential(
        self, client_id: str, *, issuer: str, subject: str, audiences: list[str] | None = None, name: str = "sandbox"
    ) -> dict:
        """Trust tokens of ``issuer`` for ``subject`` (audience default ``api://AzureADTokenExchange``)."""
        payload = {"name": name, "issuer": issuer, "subject": subject, "audiences": audiences}
        return self._call("POST", f"apps/{client_id}/federated-credentials", payload)

    def clear_federated_credentials(self, client_id: str) -> None:
        self._call("DELETE", f"apps/{client_id}/federated-credentials")

    def add_redirect_uri(self, client_id: str, redirect_uri: str) -> None:
        self._call("POST", f"apps/{client_id}/redirect-uris", {"redirect_uri": redirect_uri})

    def set_app_roles(self, client_id: str, resource: str, roles: list[str]) -> dict:
        """Application permissions with admin consent on ``resource`` (``[]``: none; client credentials' ``roles``)."""
        return self._call("POST", f"apps/{client_id}/app-roles", {"resource": resource, "roles": roles})

    def set_delegated_permissions(self, client_id: str, resource: str, permissions: list[str]) -> dict:
        """The delegated permissions the app registration lists on ``resource`` (what ``/.default`` requests)."""
        payload = {"resource": resource, "permissions": permissions}
        return self._call("POST", f"apps/{client_id}/delegated-permissions", payload)

    # -- faults
    def set_public_client(self, client_id: str, allowed: bool) -> None:
        """Switch the app registration's "Allow public client flows"."""
        self._call("POST", f"apps/{client_id}/public-client", {"allowed": allowed})

    def device_flows(self) -> list[dict]:
        """Each device code's polls, slow-downs, interval and status (no codes)."""
        return self._call("GET", "device-flows")["flows"]

    def device_sign_in(
        self, verification_uri: str, user_code: str, *, login: str, password: str, decision: str = "accept"
    ) -> str:
        """Play the person on the device code page: enter ``user_code``, sign in, accept or cancel; the result text."""
        entered = self._session.post(verification_uri, data={"otc": user_code}, timeout=30)
        match = re.search(r'name="flow" value="([^"]+)"', entered.text)
        if match is None:
            alert = re.search(r'role="alert">([^<]*)<', entered.text)
            raise RuntimeError(
                f"the code was refused: {html.unescape(alert.group(1)) if alert else entered.status_code}"
            )
        done = self._session.post(
            verification_uri,
            data={"flow": html.unescape(match.group(1)), "login": login, "passwd": password, "decision": decision},
            timeout=30,
        )
        result = re.search(r'id="result">([^<]*)<', done.text) or re.search(r'role="alert">([^<]*)<', done.text)
        return html.unescape(result.group(1)) if result else f"HTTP {done.status_code}"

    def add_fault(
        self,
        status: int = 503,
        count: int = 1,
        retry_after: int | None = None,
        delay: float = 0.0,
        *,
        aadsts: int | None = None,
        error: str = "invalid_grant",
    ) -> None:
        """The next ``count`` token requests fail with ``status`` (with ``aadsts``: that code and ``error``)."""
        payload = {"status": status, "count": count, "retry_after": retry_after, "delay": delay}
        if aadsts is not None:
            payload.update(aadsts=aadsts, error=error)
        self._call("POST", "faults", payload)

    def clear_faults(self) -> None:
        self._call("DELETE", "faults")

    # -- mail side: Exchange's caps, SMTP reply injection, Sent Items lag
    def mail_limits(self) -> dict:
        return self._call("GET", "mail/limits")

    def set_limits(
        self,
        *,
        imap_connections: int | None = None,
        smtp_sessions: int | None = None,
        sent_items_lag: float | None = None,
    ) -> dict:
        """Change the per-mailbox caps (defaults 20 IMAP, 3 SMTP) and the Sent Items lag in seconds."""
        values = {
            "imap_connections": imap_connections,
            "smtp_sessions": smtp_sessions,
            "sent_items_lag": sent_items_lag,
        }
        return self._call("POST", "mail/limits", {k: v for k, v in values.items() if v is not None})

    def reset_mail(self) -> dict:
        """Exchange's default caps, no lag, no pending injected replies, SMTP counters zeroed."""
        return self._call("POST", "mail/reset")

    def inject_smtp_reply(self, reply: str, *, stage: str = "data", count: int = 1, mailbox: str | None = None) -> dict:
        """The next ``count`` MAIL FROM / RCPT TO / end-of-DATA (``stage`` mail|rcpt|data) get ``reply``."""
        payload = {"stage": stage, "reply": reply, "count": count, "mailbox": mailbox}
        return self._call("POST", "mail/smtp-replies", payload)

    def lose_smtp_reply(self, *, count: int = 1, mailbox: str | None = None) -> dict:
        """The next ``count`` messages are accepted and delivered, but the 250 never reaches the client."""
        payload = {"stage": "data", "lost_reply": True, "count": count, "mailbox": mailbox}
        return self._call("POST", "mail/smtp-replies", payload)

    def clear_smtp_replies(self) -> dict:
        return self._call("DELETE", "mail/smtp-replies")

    def smtp_state(self) -> dict:
        """Active sessions, peak concurrency, refusals, accepted messages, pending injections (per mailbox)."""
        return self._call("GET", "mail/smtp")

    def reset_smtp_counters(self) -> dict:
        return self._call("POST", "mail/smtp/reset-counters")

    # -- tokens
    def mint_access_token(self, upn: str, **claims: Any) -> str:
        return self._call("POST", "mint", {"upn": upn, **claims})["access_token"]

    def authorize_silently(self, *, client_id: str, upn: str, scope: str, redirect_uri: str) -> tuple[str, str]:
        """Run the authorize leg for a pre-approved user; returns (code, code_verifier)."""
        verifier = secrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        state = secrets.token_urlsafe(16)
        response = self._session.get(
            f"{self.base_url}/{self.tenant}/oauth2/v2.0/authorize",
            params={
                "client_id": client_id,
                "response_type": "code",
                "redirect_uri": redirect_uri,
                "scope": scope,
                "state": state,
                "login_hint": upn,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            },
            allow_redirects=False,
            timeout=30,
        )
        if response.status_code != 302:
            raise RuntimeError(
                f"authorize did not redirect (HTTP {response.status_code}); is {upn} pre-approved and consented?"
            )
        query = parse_qs(urlsplit(response.headers["location"]).query)
        if query.get("state") != [state] or "code" not in query:
            raise RuntimeError(f"authorize failed: {query.get('error_description', query)}")
        return query["code"][0], verifier

    def sign_in(self, auth_uri: str, *, login: str, password: str, decision: str = "accept") -> str:
        """Play the user on the sign-in/consent page of ``auth_uri``; returns the redirect URL (code or error)."""
        response = self._session.get(auth_uri, allow_redirects=False, timeout=30)
        if response.status_code in (301, 302, 303):
            return response.headers["location"]  # single sign-on: no page at all
        response.raise_for_status()
        match = re.search(r'name="flow" value="([^"]+)"', response.text)
        if match is None:
            raise RuntimeError(f"no sign-in form at {auth_uri.split('?')[0]} (HTTP {response.status_code})")
        posted = self._session.post(
            auth_uri,
            data={"flow": html.unescape(match.group(1)), "login": login, "passwd": password, "decision": decision},
            allow_redirects=False,
            timeout=30,
        )
        if posted.status_code not in (301, 302, 303):
            raise RuntimeError(f"the sign-in page answered HTTP {posted.status_code} instead of redirecting")
        return posted.headers["location"]

    def new_refresh_token(self, *, client_id: str, client_secret: str, upn: str, scope: str, redirect_uri: str) -> str:
        """Consent for ``upn`` and redeem a fresh authorization code: a new grant's refresh token."""
        self.consent(upn, client_id, scope)
        code, verifier = self.authorize_silently(client_id=client_id, upn=upn, scope=scope, redirect_uri=redirect_uri)
        response = self._session.post(
            f"{self.base_url}/{self.tenant}/oauth2/v2.0/token",
            data={
                "client_id": client_id,
                "client_secret": client_secret,
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirect_uri,
                "code_verifier": verifier,
                "scope": f"{scope} offline_access openid profile",
            },
            timeout=30,
        )
        if response.status_code != 200:
            raise RuntimeError(f"code redemption failed: {response.json().get('error_description')}")
        return response.json()["refresh_token"]

    # -- the Microsoft Graph stand-in (its own host: ``graph_url``)
    def _graph(self, method: str, path: str, payload: dict | None = None) -> Any:
        if not self.graph_url:
            raise RuntimeError("this sandbox has no Graph stand-in (an env file from before it: run 'up' again)")
        response = admin_request(
            self._session, method, f"{self.graph_url}/_sandbox/admin/graph/{path}", json=payload, timeout=30
        )
        response.raise_for_status()
        return response.json()

    def graph_state(self) -> dict:
        """Settings, limits, per-mailbox counters, mailbox rights, access policies, pending and fired faults."""
        return self._graph("GET", "state")

    def graph_counters(self, mailbox: str | None = None, app_id: str | None = None) -> dict:
        """``requests``, ``throttled``, ``in_flight``, ``peak_concurrency``, ``uploaded_bytes``, ``by_operation``
        of a mailbox (all apps) or, with ``app_id``, of that app on it; without ``mailbox`` all of them."""
        counters = self.graph_state()["counters"]
        if mailbox is None:
            return counters
        key = f"{app_id}|{mailbox.lower()}" if app_id else mailbox.lower()
        return counters.get(key, {"requests": 0, "throttled": 0, "in_flight": 0, "peak_concurrency": 0})

    def graph_settings(self, **values: Any) -> dict:
        """Change the stand-in's behaviour (``max_request_bytes``, ``upload_session_lifetime``, ...) and
        Outlook's limits (``concurrency``, ``requests_per_window``, ``request_window``,
        ``upload_bytes_per_window``, ``upload_window``, ``concurrency_retry_after``)."""
        return self._graph("POST", "settings", values)

    def graph_mailbox(self, address: str, **values: Any) -> dict:
        """``rest_enabled``, ``max_send_size`` (bytes, up to 150 MB), ``send_as``, ``send_on_behalf``,
        ``full_access`` (lists of UPNs) of a mailbox."""
        return self._graph("POST", f"mailboxes/{address}", values)

    def graph_access_policy(self, app_id: str, mailboxes: list[str] | None) -> dict:
        """Limit an app's app-only Graph access to ``mailboxes`` (None: lift the policy)."""
        return self._graph("POST", f"access-policies/{app_id}", {"mailboxes": mailboxes})

    def graph_fault(
        self,
        kind: str = "error",
        *,
        status: int | None = None,
        code: str | None = None,
        message: str | None = None,
        retry_after: int | None = None,
        count: int = 1,
        operation: str | None = None,
        mailbox: str | None = None,
    ) -> dict:
        """Inject a failure for the next ``count`` matching requests: ``kind`` ``error`` (answer it, do
        nothing), ``after_delivery`` (deliver, then answer it: "504 but delivered"),
        ``drop_after_delivery`` (deliver, then close the connection unanswered) or ``hold`` (wait
        for :meth:`graph_release`)."""
        payload = {
            "kind": kind,
            "status": status,
            "code": code,
            "message": message,
            "retry_after": retry_after,
            "count": count,
            "operation": operation,
            "mailbox": mailbox,
        }
        return self._graph("POST", "faults", payload)

    def graph_throttle(self, count: int = 1, retry_after: int = 2, **match: Any) -> dict:
        """The next ``count`` requests get 429 ``ApplicationThrottled`` with ``Retry-After``."""
        return self.graph_fault(status=429, retry_after=retry_after, count=count, **match)

    def graph_clear_faults(self) -> None:
        self._graph("DELETE", "faults")

    def graph_release(self) -> int:
        """Let held requests go on; returns how many were held."""
        return self._graph("POST", "release")["released"]

    def graph_deliveries(self) -> list[dict]:
        """What the stand-in delivered (Message-ID, mailbox, recipients, Sent Items or not), oldest first."""
        return self._graph("GET", "deliveries")["deliveries"]

    def graph_expire_delta(self, mailbox: str | None = None, how: str = "syncStateNotFound") -> int:
        """Invalidate the Graph stand-in's delta tokens (of ``mailbox``, else all): ``how`` is
        ``"syncStateNotFound"`` (an expired token) or ``"resyncRequired"`` (410 with a Location to start
        over from: the synchronization reset of delta-query-overview.md). Returns how many."""
        return self._graph("POST", "delta/expire", {"mailbox": mailbox, "how": how})["expired"]

    def graph_delta_tokens(self) -> dict[str, int]:
        """How many delta tokens the Graph stand-in keeps, per mailbox."""
        return self.graph_state()["delta_tokens"]

    def graph_reset_counters(self) -> None:
        self._graph("POST", "counters/reset")

    def graph_reset(self) -> None:
        """Documented defaults again: settings, limits, mailbox rights; no faults, counters or log."""
        self._graph("POST", "reset")
