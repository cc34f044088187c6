"""O365MailHook: access tokens and logged-in IMAP/SMTP clients for Microsoft 365 mail."""

from __future__ import annotations

import contextlib
import smtplib
import ssl
from collections.abc import Iterator
from functools import cached_property
from typing import Any

from airflow.sdk import BaseHook

from airflow_provider_o365mail.auth.tokens import AccessToken, TokenManager
from airflow_provider_o365mail.auth.xoauth2 import xoauth2_responder, xoauth2_string
from airflow_provider_o365mail.connection import CONN_TYPE, DEFAULT_CONN_ID, O365MailSettings, settings_from_connection
from airflow_provider_o365mail.exceptions import (
    AuthorizationError,
    MailAuthenticationError,
    MailServerError,
    O365MailError,
    TlsRequiredError,
)
from airflow_provider_o365mail.tls import client_ssl_context

IMAP_REFUSAL_HINT = (
    "The server refused the token for {mailbox}. Check that the mailbox is the signed-in user (or one it may "
    "open), that the app has IMAP.AccessAsUser.All (delegated) or IMAP.AccessAsApp plus Add-MailboxPermission "
    "(app-only), and that IMAP is enabled for the mailbox."
)
SMTP_REFUSAL_HINT = (
    "The server refused the token for {mailbox} ({reply}). If the reply says 5.7.139, SMTP AUTH is disabled for "
    "the tenant or mailbox: enable it with Set-CASMailbox -SmtpClientAuthenticationDisabled $false. Otherwise check "
    "that the app has SMTP.Send (delegated) or SMTP.SendAsApp (app-only) and that the mailbox is the signed-in user."
)


class O365MailHook(BaseHook):
    """Interact with Microsoft 365 mail over IMAP and SMTP with OAuth2 (SASL XOAUTH2).

    :param conn_id: The :ref:`o365mail connection id <howto/connection:o365mail>`.
    """

    conn_name_attr = "conn_id"
    default_conn_name = DEFAULT_CONN_ID
    conn_type = CONN_TYPE
    hook_name = "Microsoft 365 Mail (OAuth2)"

    def __init__(self, conn_id: str = DEFAULT_CONN_ID, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.conn_id = conn_id

    def __repr__(self) -> str:
        return f"{type(self).__name__}(conn_id={self.conn_id!r})"

    # ------------------------------------------------------------------ settings and tokens
    @cached_property
    def settings(self) -> O365MailSettings:
        return settings_from_connection(self.get_connection(self.conn_id))

    @cached_property
    def tokens(self) -> TokenManager:
        return TokenManager(self.settings)

    def get_access_token(self, *, force_refresh: bool = False) -> str:
        """A valid access token (reused from the shared store until 5 minutes before expiry)."""
        return self.access_token(force_refresh=force_refresh).token

    def access_token(self, *, force_refresh: bool = False) -> AccessToken:
        return self.tokens.get(force_refresh=force_refresh)

    def xoauth2_string(self, access_token: str | None = None, *, user: str | None = None) -> str:
        """The SASL XOAUTH2 string for the connection's mailbox (or ``user``)."""
        return xoauth2_string(user or self.settings.mailbox, access_token or self.get_access_token())

    @cached_property
    def ssl_context(self) -> ssl.SSLContext:
        return client_ssl_context(self.settings.ca_bundle)

    # ------------------------------------------------------------------ IMAP
    def _imap_login(self, user: str, force_refresh: bool):
        from imapclient import IMAPClient
        from imapclient.exceptions import IMAPClientError

        s = self.settings
        client = IMAPClient(s.imap_host, port=s.imap_port, ssl=True, ssl_context=self.ssl_context, timeout=s.timeout)
        try:
            sasl = self.xoauth2_string(self.get_access_token(force_refresh=force_refresh), user=user)
            client.sasl_login("XOAUTH2", xoauth2_responder(sasl))
            # Exchange can accept AUTHENTICATE and refuse the next command ("User is authenticated
            # but not connected"): only a command after login proves the session works.
            client.list_folders(directory="", pattern="INBOX")
        except IMAPClientError as err:
            with contextlib.suppress(Exception):
                client.shutdown()
            raise MailAuthenticationError(
                f"IMAP login to {s.imap_host}:{s.imap_port} as {user} failed: {_server_text(err)}. "
                + IMAP_REFUSAL_HINT.format(mailbox=user)
            ) from None
        except BaseException:
            with contextlib.suppress(Exception):
                client.shutdown()
            raise
        return client

    @contextlib.contextmanager
    def imap_client(self, mailbox: str | None = None) -> Iterator[Any]:
        """A logged-in, TLS-verified :class:`imapclient.IMAPClient`; logs out on exit.

        :param mailbox: another mailbox to open with the connection's token (shared mailbox).
        """
        user = mailbox or self.settings.mailbox
        try:
            client = self._imap_login(user, force_refresh=False)
        except MailAuthenticationError:
            # The token may have been revoked server-side before its expiry: one fresh try.
            self.log.info("IMAP refused the access token for %s; retrying once with a refreshed token.", user)
            client = self._imap_login(user, force_refresh=True)
        try:
            yield client
        finally:
            try:
                client.logout()
            except Exception:
                with contextlib.suppress(Exception):
                    client.shutdown()

    # ------------------------------------------------------------------ SMTP
    def _smtp_login(self, user: str, force_refresh: bool) -> smtplib.SMTP:
        s = self.settings
        client = smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=s.timeout)
        try:
            client.ehlo()
            if not client.has_extn("starttls"):
                raise TlsRequiredError(
                    f"SMTP server {s.smtp_host}:{s.smtp_port} does not offer STARTTLS; no credentials were sent. "
                    "Microsoft 365 submission is smtp.office365.com:587 with STARTTLS."
                )
            client.starttls(context=self.ssl_context)
            client.ehlo()
            if not client.has_extn("auth") or "XOAUTH2" not in client.esmtp_features.get("auth", "").upper().split():
                raise MailServerError(
                    f"SMTP server {s.smtp_host}:{s.smtp_port} does not offer AUTH XOAUTH2 after STARTTLS "
                    f"(offers: {client.esmtp_features.get('auth', 'nothing')!r}). SMTP AUTH may be disabled."
                )
            sasl = self.xoauth2_string(self.get_access_token(force_refresh=force_refresh), user=user)
            # The response goes after the 334 prompt: servers cut long AUTH lines (tokens are 1.5-3 kB).
            client.auth("XOAUTH2", xoauth2_responder(sasl), initial_response_ok=False)
        except smtplib.SMTPAuthenticationError as err:
            _quietly_close(client)
            reply = f"{err.smtp_code} {err.smtp_error.decode(errors='replace')}"
            raise MailAuthenticationError(
                f"SMTP login to {s.smtp_host}:{s.smtp_port} as {user} failed. "
                + SMTP_REFUSAL_HINT.format(mailbox=user, reply=reply)
            ) from None
        except ssl.SSLCertVerificationError as err:
            _quietly_close(client)
            raise MailServerError(
                f"TLS certificate of {s.smtp_host}:{s.smtp_port} failed verification ({err.verify_message}); no "
                "credentials were sent. Set the connection's ca_bundle if the server uses a private CA."
            ) from None
        except BaseException:
            _quietly_close(client)
            raise
        return client

    @contextlib.contextmanager
    def smtp_client(self, mailbox: str | None = None) -> Iterator[smtplib.SMTP]:
        """A logged-in :class:`smtplib.SMTP` (STARTTLS verified, AUTH XOAUTH2); QUITs on exit."""
        user = mailbox or self.settings.mailbox
        try:
            client = self._smtp_login(user, force_refresh=False)
        except MailAuthenticationError:
            self.log.info("SMTP refused the access token for %s; retrying once with a refreshed token.", user)
            client = self._smtp_login(user, force_refresh=True)
        try:
            yield client
        finally:
            try:
                client.quit()
            except Exception:
                _quietly_close(client)

    # ------------------------------------------------------------------ UI test button
    def test_connection(self) -> tuple[bool, str]:
        """Get a token, log in to IMAP and to SMTP; say which step failed."""
        steps = (
            ("token", lambda: self.get_access_token()),
            ("IMAP", lambda: self._use(self.imap_client)),
            ("SMTP", lambda: self._use(self.smtp_client)),
        )
        for name, step in steps:
            try:
                step()
            except (O365MailError, AuthorizationError) as err:
                return False, f"{name} step failed: {err}"
            except (TimeoutError, OSError) as err:
                return False, f"{name} step failed: cannot reach the server ({type(err).__name__}: {err})"
        s = self.settings
        return True, (
            f"Token, IMAP ({s.imap_host}:{s.imap_port}) and SMTP ({s.smtp_host}:{s.smtp_port}) work for {s.mailbox}."
        )

    @staticmethod
    def _use(factory) -> None:
        with factory():
            pass


def _server_text(err: Exception) -> str:
    text = str(err)
    return text[:300]


def _quietly_close(client: smtplib.SMTP) -> None:
    with contextlib.suppress(Exception):
        client.close()
