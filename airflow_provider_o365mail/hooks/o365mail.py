"""O365MailHook: access tokens and logged-in IMAP/SMTP clients for Microsoft 365 mail."""

from __future__ import annotations

import contextlib
import smtplib
import ssl
from collections.abc import Iterable, Iterator, Mapping
from functools import cached_property
from typing import Any

from airflow.sdk import BaseHook

from airflow_provider_o365mail.auth.tokens import AccessToken, TokenManager
from airflow_provider_o365mail.auth.xoauth2 import xoauth2_responder, xoauth2_string
from airflow_provider_o365mail.connection import (
    CONN_TYPE,
    DEFAULT_CONN_ID,
    O365MailSettings,
    load_connection,
    settings_from_connection,
)
from airflow_provider_o365mail.exceptions import (
    AuthorizationError,
    MailAuthenticationError,
    MailServerError,
    O365MailError,
    TlsRequiredError,
)
from airflow_provider_o365mail.mail import imap_watch
from airflow_provider_o365mail.mail.compose import OutgoingMessage, compose_message
from airflow_provider_o365mail.mail.imap_watch import CheckResult, WatchSpec
from airflow_provider_o365mail.mail.smtp_sender import SendResult, SmtpBatchSender, raise_for_refused
from airflow_provider_o365mail.mail.watermark import FolderWatermark, WatermarkStore
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
        return settings_from_connection(load_connection(self.conn_id))

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

    def check_mail(
        self, spec: WatchSpec, watermarks: Mapping[str, FolderWatermark] | None = None, *, mailbox: str | None = None
    ) -> CheckResult:
        """Messages matching ``spec`` in its folders (read-only; see :mod:`.mail.imap_watch`)."""
        with self.imap_client(mailbox) as client:
            return imap_watch.check(client, spec, watermarks)

    def commit_mail(
        self, spec: WatchSpec, result: CheckResult, store: WatermarkStore | None, *, mailbox: str | None = None
    ) -> None:
        """Apply ``spec``'s post-action to ``result``'s messages and advance the watermarks."""
        if not result.messages:
            return
        with self.imap_client(mailbox) as client:
            imap_watch.commit(client, spec, result, store)

    # ------------------------------------------------------------------ SMTP
    def _smtp_login(self, user: str, force_refresh: bool) -> tuple[smtplib.SMTP, AccessToken]:
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
            token = self.access_token(force_refresh=force_refresh)
            sasl = self.xoauth2_string(token.token, user=user)
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
        return client, token

    def smtp_login(
        self, mailbox: str | None = None, *, force_refresh: bool = False
    ) -> tuple[smtplib.SMTP, AccessToken]:
        """Open a logged-in SMTP session and say which access token it used (for its expiry).

        The caller must ``quit()`` the client. A refused token is retried once with a refreshed one;
        ``force_refresh`` replaces the current token first (a long session whose token nears expiry).
        """
        user = mailbox or self.settings.mailbox
        try:
            return self._smtp_login(user, force_refresh=force_refresh)
        except MailAuthenticationError:
            self.log.info("SMTP refused the access token for %s; retrying once with a refreshed token.", user)
            return self._smtp_login(user, force_refresh=True)

    @contextlib.contextmanager
    def smtp_client(self, mailbox: str | None = None) -> Iterator[smtplib.SMTP]:
        """A logged-in :class:`smtplib.SMTP` (STARTTLS verified, AUTH XOAUTH2); QUITs on exit."""
        client, _ = self.smtp_login(mailbox)
        try:
            yield client
        finally:
            try:
                client.quit()
            except Exception:
                _quietly_close(client)

    # ------------------------------------------------------------------ sending
    def compose(self, *, from_email: str | None = None, **fields: Any) -> OutgoingMessage:
        """Build a message from this connection's mailbox (or ``from_email``); see :func:`compose_message`."""
        return compose_message(sender=from_email or self.settings.mailbox, **fields)

    def send_messages(
        self, messages: Iterable[OutgoingMessage], *, raise_on_refused: bool = True, **sender_options: Any
    ) -> list[SendResult]:
        """Send messages over one SMTP session (re-authenticating when its token nears expiry).

        :param raise_on_refused: raise :class:`RecipientsRefusedError` after the batch if the server
            refused recipients permanently (the others received the message).
        :param sender_options: passed to :class:`SmtpBatchSender` (``max_attempts``, ``backoff``...).
        """
        with SmtpBatchSender(self, **sender_options) as sender:
            results = []
            for message in messages:
                result = sender.send(message)
                self.log.info(
                    "Sent %s to %d recipient(s)%s.",
                    result.message_id,
                    len(result.accepted),
                    f", {len(result.refused)} refused" if result.refused else "",
                )
                results.append(result)
        if raise_on_refused:
            raise_for_refused(results)
        return results

    def send_email(
        self, to: Any = None, subject: str | None = None, html_content: str | None = None, **fields: Any
    ) -> str:
        """Compose and send one message; returns its Message-ID. Fields as in :func:`compose_message`."""
        message = self.compose(to=to, subject=subject, html_content=html_content, **fields)
        return self.send_messages([message])[0].message_id

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
