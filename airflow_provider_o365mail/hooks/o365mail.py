"""O365MailHook: access tokens and logged-in IMAP/SMTP clients for Microsoft 365 mail."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import smtplib
import ssl
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import cached_property
from typing import Any
from urllib.parse import parse_qs, urlsplit

from airflow.sdk import BaseHook

from airflow_provider_o365mail import hints
from airflow_provider_o365mail.auth.lease import LeaseTiming, RefreshLease
from airflow_provider_o365mail.auth.masking import mask_access_token, mask_proxies
from airflow_provider_o365mail.auth.tokens import AccessToken, TokenManager
from airflow_provider_o365mail.auth.xoauth2 import xoauth2_responder, xoauth2_string
from airflow_provider_o365mail.connection import (
    CONN_TYPE,
    DEFAULT_CONN_ID,
    HOOK_NAME,
    O365MailSettings,
    settings_from_connection,
)
from airflow_provider_o365mail.core.batch import send_batch
from airflow_provider_o365mail.core.budget import (
    ConnectionBudget,
    HeldSlot,
    SharedSlot,
    connection_budget,
    two_level_slot,
)
from airflow_provider_o365mail.core.compose import OutgoingMessage, PlannedMessage, compose_message, plan_message
from airflow_provider_o365mail.core.credentials import login_with_fresh_token
from airflow_provider_o365mail.core.gate import check_gate
from airflow_provider_o365mail.core.message_ids import TaskIdentity, stable_message_id
from airflow_provider_o365mail.core.recipient_budget import (
    DEFAULT_DAILY_RECIPIENT_BUDGET,
    RecipientBudget,
    budget_key,
)
from airflow_provider_o365mail.core.send_ledger import SendLedger
from airflow_provider_o365mail.core.watch_spec import CheckResult, WatchSpec
from airflow_provider_o365mail.core.watermark import Watermark, WatermarkStore
from airflow_provider_o365mail.exceptions import (
    AuthorizationError,
    ConnectionConfigError,
    MailAuthenticationError,
    MailServerError,
    MailServerUnavailable,
    O365MailError,
    ReauthorizationRequired,
    TlsRequiredError,
)
from airflow_provider_o365mail.graph import watch as graph_watch
from airflow_provider_o365mail.graph.attachments import GraphAttachmentReader
from airflow_provider_o365mail.graph.client import (
    DEFAULT_REQUESTS_PER_WINDOW,
    GRAPH_RETRY,
    GraphClient,
    RequestPacer,
    request_pacer,
)
from airflow_provider_o365mail.graph.hub import GraphFolderWatch, graph_hub
from airflow_provider_o365mail.graph.sender import SEND_RETRY as GRAPH_SEND_RETRY
from airflow_provider_o365mail.graph.sender import GraphSender, mailbox_path, sent_items_count
from airflow_provider_o365mail.hooks import connection_form
from airflow_provider_o365mail.hooks.fallback import SmtpThenGraph, imap_then_graph, smtp_auth_disabled
from airflow_provider_o365mail.hooks.shared_budget import (
    DEFAULT_SHARED_IMAP,
    DEFAULT_SHARED_SMTP,
    SHARED_IMAP_OPTION,
    SHARED_SMTP_OPTION,
    SharedBudget,
    configured_shared_budget,
)
from airflow_provider_o365mail.imap import watch as imap_watch
from airflow_provider_o365mail.imap.attachments import ImapAttachmentReader
from airflow_provider_o365mail.imap.errors import refusal_class
from airflow_provider_o365mail.imap.hub import FolderWatch, idle_hub
from airflow_provider_o365mail.imap.idle import MAX_IDLE_SECONDS, ImapEndpoint
from airflow_provider_o365mail.imap.liveness import keep_alive
from airflow_provider_o365mail.imap.pool import DEFAULT_MAX_CONNECTIONS, ImapPool, close_client, imap_pool
from airflow_provider_o365mail.imap.proxied import ProxiedIMAPClient
from airflow_provider_o365mail.imap.scan import ImapSession
from airflow_provider_o365mail.imap.stream import FolderStream
from airflow_provider_o365mail.locks import host_lock
from airflow_provider_o365mail.runtime import VariableBackend, default_variables, load_connection
from airflow_provider_o365mail.smtp.proxied import ProxiedSMTP
from airflow_provider_o365mail.smtp.sender import SEND_RETRY, SendResult, SmtpBatchSender, raise_for_refused
from airflow_provider_o365mail.tls import IdentityProviderSession, client_ssl_context
from airflow_provider_o365mail.version_compat import conf

#: ``[o365mail]`` options: this process's connection budgets per mailbox (Exchange: ~20 IMAP, 3 SMTP).
IMAP_BUDGET_OPTION = "max_imap_connections_per_mailbox"
SMTP_BUDGET_OPTION = "max_smtp_sessions_per_mailbox"
DEFAULT_SMTP_SESSIONS = 3
#: Outlook allows 4 concurrent Graph requests per app and mailbox.
GRAPH_BUDGET_OPTION = "max_graph_requests_per_mailbox"
DEFAULT_GRAPH_REQUESTS = 4
#: Outlook allows 10,000 Graph requests per 10 minutes per app and mailbox; this process paces itself to this many.
GRAPH_PACING_OPTION = "max_graph_requests_per_10_minutes"
#: Graph permissions that can read Sent Items (for the lookup after an ambiguous outcome).
GRAPH_READ_PERMISSIONS = frozenset({"mail.readbasic", "mail.read", "mail.readwrite"})


def configured_budget(option: str, default: int) -> int:
    """``[o365mail] <option>`` as a positive int; a wrong value is an error that names the option."""
    value = conf.get("o365mail", option, fallback=str(default))
    try:
        budget = int(str(value).strip() or default)
    except ValueError:
        budget = 0
    if budget < 1:
        raise ConnectionConfigError(
            f"[o365mail] {option} must be a whole number >= 1, not {value!r}. Exchange Online allows about 20 IMAP "
            "connections and 3 SMTP sessions per mailbox; see docs/receiving.md for sizing."
        )
    return budget


#: How sensors, the attachment operator and event triggers read mail.
RECEIVE_TRANSPORTS = ("imap", "graph", "auto")


def receive_transport(requested: str | None, connection_transport: str) -> str:
    """``imap``, ``graph`` or ``auto``: ``requested``, else the connection's ``transport`` (``smtp``: IMAP)."""
    value = str(requested or ("imap" if connection_transport == "smtp" else connection_transport)).lower()
    if value not in RECEIVE_TRANSPORTS:
        raise ConnectionConfigError(f"transport must be one of {', '.join(RECEIVE_TRANSPORTS)}; got {requested!r}.")
    return value


def is_graph_result(result: CheckResult) -> bool:
    """The messages were found over Microsoft Graph (they carry Graph ids)."""
    return any(m.get("graph_id") for m in result.messages) or any(
        scan.get("transport") == graph_watch.TRANSPORT for scan in result.scanned.values()
    )


def advanced(watermarks: Mapping[str, Watermark], result: CheckResult) -> dict[str, Watermark]:
    """The watermarks past what ``result`` scanned, whichever transport scanned each folder (pure)."""
    return graph_watch.advanced(imap_watch.advanced(watermarks, result), result)


#: Exchange's name of the folder that holds a copy of every message sent over SMTP AUTH.
SENT_ITEMS_FOLDER = "Sent Items"


class O365MailHook(BaseHook):
    """Interact with Microsoft 365 mail over IMAP and SMTP with OAuth2 (SASL XOAUTH2).

    :param conn_id: The :ref:`o365mail connection id <howto/connection:o365mail>`.
    """

    conn_name_attr = "conn_id"
    default_conn_name = DEFAULT_CONN_ID
    conn_type = CONN_TYPE
    hook_name = HOOK_NAME

    def __init__(self, conn_id: str = DEFAULT_CONN_ID, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.conn_id = conn_id

    # ------------------------------------------------------------------ connection form (Airflow 3.1)
    # Airflow >= 3.2 reads the form from the provider info's ``conn-fields`` and skips these two.
    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        """The form's extra fields on Airflow 3.1, from the same declaration as ``conn-fields``."""
        return connection_form.form_widgets()

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Hidden, relabelled and placeholder fields on Airflow 3.1 (``ui-field-behaviour`` on 3.2+)."""
        return connection_form.field_behaviour()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(conn_id={self.conn_id!r})"

    # ------------------------------------------------------------------ settings and tokens
    @cached_property
    def settings(self) -> O365MailSettings:
        settings = settings_from_connection(load_connection(self.conn_id))
        mask_proxies(settings.proxy)
        return settings

    @cached_property
    def tokens(self) -> TokenManager:
        return TokenManager(self.settings)

    def get_access_token(self, *, force_refresh: bool = False) -> str:
        """A valid access token (reused from the shared store until 5 minutes before expiry)."""
        return self.access_token(force_refresh=force_refresh).token

    def access_token(self, *, force_refresh: bool = False) -> AccessToken:
        return self.tokens.get(force_refresh=force_refresh)

    @cached_property
    def graph_tokens(self) -> TokenManager:
        """Microsoft Graph tokens: the same consent, store and refresh token, with Graph's scopes."""
        return TokenManager(dataclasses.replace(self.settings, scopes=self.settings.graph_scopes))

    def graph_access_token(self, *, force_refresh: bool = False) -> AccessToken:
        """A Graph access token (audience Graph; never used for IMAP or SMTP)."""
        try:
            return self.graph_tokens.get(force_refresh=force_refresh)
        except ReauthorizationRequired as err:
            raise type(err)(
                f"{err} This was a token request for Microsoft Graph ({' '.join(self.settings.graph_scopes)}): a "
                "consent given before the connection sent through Graph covers Exchange only; authorize again to "
                "add Graph (the page or 'airflow o365mail authorize' asks for both).",
                conn_id=err.conn_id,
                error=err.error,
                error_codes=err.error_codes,
                correlation_id=err.correlation_id,
            ) from None

    def xoauth2_string(self, access_token: str | None = None, *, user: str | None = None) -> str:
        """The SASL XOAUTH2 string for the connection's mailbox (or ``user``)."""
        return xoauth2_string(user or self.settings.mailbox, access_token or self.get_access_token())

    @cached_property
    def ssl_context(self) -> ssl.SSLContext:
        return client_ssl_context(self.settings.ca_bundle)

    # ------------------------------------------------------------------ IMAP
    def _imap_login(self, user: str, force_refresh: bool):
        from imapclient import IMAPClient
        from imapclient.exceptions import IMAPClientAbortError, IMAPClientError

        s = self.settings
        where = f"{s.imap_host}:{s.imap_port}"
        token = self.access_token(force_refresh=force_refresh)  # before connecting, as for SMTP
        client = None
        proxy = s.http_proxy
        try:
            if proxy is not None:  # a CONNECT tunnel; TLS and its certificate check are still the server's
                client = ProxiedIMAPClient(
                    s.imap_host, port=s.imap_port, proxy=proxy, ssl_context=self.ssl_context, timeout=s.timeout
                )
            else:
                client = IMAPClient(
                    s.imap_host, port=s.imap_port, ssl=True, ssl_context=self.ssl_context, timeout=s.timeout
                )
            keep_alive(client.socket())  # a silently dropped session fails within 14 s, not at its timeout
            sasl = self.xoauth2_string(token.token, user=user)
            client.sasl_login("XOAUTH2", xoauth2_responder(sasl))
            # Exchange can accept AUTHENTICATE and refuse the next command ("User is authenticated
            # but not connected"): only a command after login proves the session works.
            client.list_folders(directory="", pattern="INBOX")
        except (IMAPClientAbortError, OSError) as err:  # dropped, reset, timed out, TLS broken
            _quietly_shutdown(client)
            if isinstance(err, ssl.SSLCertVerificationError):
                raise MailServerError(
                    f"TLS certificate of {where} failed verification ({err.verify_message}); no credentials were "
                    "sent. Set the connection's ca_bundle if the server uses a private CA."
                ) from None
            raise MailServerUnavailable(
                f"IMAP session with {where} as {user} failed ({type(err).__name__}: {_server_text(err)}); "
                "this is usually temporary and is retried."
            ) from None
        except IMAPClientError as err:
            _quietly_shutdown(client)
            text = _server_text(err)
            if refusal_class(text, during_login=True) is MailServerUnavailable:
                raise MailServerUnavailable(
                    f"IMAP server {where} refused a session as {user} for now: {text}. Exchange allows about 20 "
                    "IMAP connections per mailbox; this is retried."
                ) from None
            raise MailAuthenticationError(
                f"IMAP login to {where} as {user} failed: {text}. " + hints.IMAP_REFUSED.format(mailbox=user)
            ) from None
        except BaseException:
            _quietly_shutdown(client)
            raise
        return client, token

    def imap_login(self, mailbox: str | None = None) -> tuple[Any, AccessToken]:
        """A logged-in, TLS-verified :class:`imapclient.IMAPClient` and the token it used; the caller logs out.

        A refused token is retried once with a refreshed one (it may have been revoked before its expiry).
        """
        user = mailbox or self.settings.mailbox
        return login_with_fresh_token(lambda force: self._imap_login(user, force), what="IMAP", user=user)

    @contextlib.contextmanager
    def imap_client(self, mailbox: str | None = None) -> Iterator[Any]:
        """A logged-in, TLS-verified :class:`imapclient.IMAPClient` of its own; logs out on exit.

        :param mailbox: another mailbox to open with the connection's token (shared mailbox).
        """
        client, _ = self.imap_login(mailbox)
        try:
            yield client
        finally:
            close_client(client)

    # ------------------------------------------------------------------ shared IMAP connections
    def _mailbox_key(self, mailbox: str | None) -> tuple[str, str, str]:
        # Keyed without reading the connection (no I/O on the event loop): connection id and mailbox.
        return ("o365mail", self.conn_id, mailbox or "")

    def imap_pool(self, mailbox: str | None = None) -> ImapPool:
        """This process's pool of logged-in IMAP sessions of the mailbox ([o365mail] max_imap_connections_per_mailbox)."""
        budget = configured_budget(IMAP_BUDGET_OPTION, DEFAULT_MAX_CONNECTIONS)
        return imap_pool(
            self._mailbox_key(mailbox),
            budget,
            name=f"{self.conn_id}/{mailbox or 'default mailbox'}",
            shared_slot=self.shared_slot("imap", mailbox),
        )

    def shared_budget(self, kind: str, mailbox: str | None = None) -> SharedBudget | None:
        """The mailbox's budget of ``kind`` ("imap", "smtp") connections across every process and host,
        keyed by its address ([o365mail] shared_imap_connections_per_mailbox / shared_smtp_sessions_per_mailbox;
        None when set to 0)."""
        option, default = {
            "imap": (SHARED_IMAP_OPTION, DEFAULT_SHARED_IMAP),
            "smtp": (SHARED_SMTP_OPTION, DEFAULT_SHARED_SMTP),
        }[kind]
        limit = configured_shared_budget(option, default)
        if limit == 0:
            return None
        timing = LeaseTiming.configured(self.settings.timeout)
        return SharedBudget(default_variables(), kind, mailbox or self.settings.mailbox, limit, timing, option=option)

    def shared_slot(self, kind: str, mailbox: str | None = None) -> SharedSlot:
        """Blocking: a slot of :meth:`shared_budget` (nothing to hold when it is off); reads the connection
        only when called (the IDLE hub calls it in a thread)."""

        def take() -> HeldSlot:
            budget = self.shared_budget(kind, mailbox)
            return budget.acquire() if budget is not None else _NO_SLOT

        return take

    @contextlib.contextmanager
    def pooled_imap_client(self, mailbox: str | None = None) -> Iterator[Any]:
        """A logged-in IMAPClient from :meth:`imap_pool`: returned to it afterwards, dropped after an error."""
        with self.imap_pool(mailbox).lease(lambda: self.imap_login(mailbox)) as client:
            yield client

    def check_mail(
        self,
        spec: WatchSpec,
        watermarks: Mapping[str, Watermark] | None = None,
        *,
        mailbox: str | None = None,
        transport: str = "imap",
    ) -> CheckResult:
        """Messages matching ``spec`` in its folders (read-only; see :mod:`.imap.watch`, :mod:`.graph.watch`).

        :param transport: ``imap`` (a pooled session), ``graph``, or ``auto`` (IMAP; Graph once Exchange
            refuses the IMAP login).
        """
        if transport == "graph":
            return self.graph_check_mail(spec, watermarks, mailbox=mailbox)
        if transport == "auto":
            return imap_then_graph(
                lambda: self.check_mail(spec, watermarks, mailbox=mailbox),
                lambda: self.graph_check_mail(spec, watermarks, mailbox=mailbox),
                key=self._mailbox_key(mailbox),
                what=f"{mailbox or 'the mailbox'} (connection {self.conn_id})",
            )
        with self._imap_errors("checking mail"), ImapSession(lambda: self.pooled_imap_client(mailbox)) as session:
            return imap_watch.check(session, spec, watermarks)

    async def acheck_mail(
        self,
        spec: WatchSpec,
        watermarks: Mapping[str, Watermark] | None = None,
        *,
        mailbox: str | None = None,
        transport: str = "imap",
    ) -> CheckResult:
        """:meth:`check_mail` from async code: in a thread, at most the budget at once per mailbox, and identical
        concurrent checks (same spec, watermarks and transport) run once."""
        if transport == "graph":
            budget = configured_budget(GRAPH_BUDGET_OPTION, DEFAULT_GRAPH_REQUESTS)
            gate = check_gate(("graph", *self._mailbox_key(mailbox)), budget)
        else:
            budget = configured_budget(IMAP_BUDGET_OPTION, DEFAULT_MAX_CONNECTIONS)
            gate = check_gate(self._mailbox_key(mailbox), budget)
        marks = {folder: mark.to_dict() for folder, mark in sorted((watermarks or {}).items())}
        key = (
            transport,
            json.dumps(spec.to_dict(), sort_keys=True, default=str),
            json.dumps(marks, sort_keys=True, default=str),
        )
        return await gate.run(key, lambda: self.check_mail(spec, watermarks, mailbox=mailbox, transport=transport))

    def graph_mailbox(self, mailbox: str | None = None, **client_options: Any) -> graph_watch.GraphMailbox:
        """What :mod:`.graph.watch` needs: a Graph client of the mailbox, its path and the folder-cache key."""
        who, _ = self._graph_mailbox(mailbox)
        return graph_watch.GraphMailbox(
            self.graph_client(mailbox, **client_options), who, ("graph", *self._mailbox_key(mailbox))
        )

    def graph_check_mail(
        self, spec: WatchSpec, watermarks: Mapping[str, Watermark] | None = None, *, mailbox: str | None = None
    ) -> CheckResult:
        """:meth:`check_mail` over Microsoft Graph."""
        reader = self.graph_mailbox(mailbox)
        try:
            return graph_watch.check(reader, spec, watermarks)
        finally:
            reader.client.close()

    def folder_watch(
        self,
        folders: Sequence[str],
        *,
        mailbox: str | None = None,
        poll_interval: float = 60.0,
        max_idle: float = MAX_IDLE_SECONDS,
        transport: str = "imap",
    ) -> FolderWatch | GraphFolderWatch:
        """Join this process's shared watch of ``folders``: one IDLE connection per folder and mailbox, or with
        ``transport="graph"`` one delta-poll loop per folder and mailbox (:mod:`.graph.hub`).

        Call it on the event loop; it reads nothing (the connection is loaded in a thread by the watch's task).
        """
        if transport == "graph":
            return GraphFolderWatch.join(
                graph_hub(),
                ("graph", *self._mailbox_key(mailbox)),
                folders,
                lambda: self.graph_mailbox(mailbox),
                poll_interval=poll_interval,
                max_idle=max_idle,
            )
        return FolderWatch.join(
            idle_hub(),
            self._mailbox_key(mailbox),
            folders,
            lambda: self.imap_endpoint(mailbox),
            self.access_token,
            poll_interval=poll_interval,
            max_idle=max_idle,
            slot=self.shared_slot("imap", mailbox),
        )

    def commit_mail(
        self, spec: WatchSpec, result: CheckResult, store: WatermarkStore | None, *, mailbox: str | None = None
    ) -> None:
        """Apply ``spec``'s post-action to ``result``'s messages and advance the watermarks."""
        if not result.messages:
            return
        if is_graph_result(result):
            self.apply_post_action(spec, result, mailbox=mailbox)
            if spec.new_only and store is not None:
                state = store.load_state()
                state.watermarks = advanced(state.watermarks, result)
                store.save_state(state)
            return
        if not spec.post_action:  # only the watermark moves: no IMAP connection (100 resuming sensors, none used)
            imap_watch.commit(None, spec, result, store)
            return
        with (
            self._imap_errors(f"applying post_action={spec.post_action!r}"),
            self.pooled_imap_client(mailbox) as client,
        ):
            imap_watch.commit(client, spec, result, store)

    def apply_post_action(self, spec: WatchSpec, result: CheckResult, *, mailbox: str | None = None) -> None:
        """Apply ``spec``'s post-action to ``result``'s messages (watermarks untouched), over the transport
        that found them."""
        if not (spec.post_action and result.messages):
            return
        if is_graph_result(result):
            reader = self.graph_mailbox(mailbox)
            try:
                graph_watch.apply_post_action(reader, spec, result)
            finally:
                reader.client.close()
            return
        with (
            self._imap_errors(f"applying post_action={spec.post_action!r}"),
            self.pooled_imap_client(mailbox) as client,
        ):
            imap_watch.apply_post_action(client, spec, result)

    @contextlib.contextmanager
    def graph_attachment_reader(self, mailbox: str | None = None) -> Iterator[GraphAttachmentReader]:
        """Reads the attachments of messages sensed over Microsoft Graph (``/$value``, streamed)."""
        who, _ = self._graph_mailbox(mailbox)
        reader = GraphAttachmentReader(self.graph_client(mailbox), who)
        try:
            yield reader
        finally:
            reader.close()

    @contextlib.contextmanager
    def attachment_reader(self, mailbox: str | None = None) -> Iterator[ImapAttachmentReader]:
        """Reads the attachments of sensed messages over one IMAP session of its own (logged out on exit);
        every IMAP call is mapped to a provider error, what the caller does with the bytes is not."""
        client, _ = self.imap_login(mailbox)
        try:
            yield ImapAttachmentReader(client, errors=lambda: self._imap_errors("downloading attachments"))
        finally:
            close_client(client)

    @contextlib.contextmanager
    def _imap_errors(self, doing: str) -> Iterator[None]:
        """No raw imaplib/IMAPClient/socket error reaches Airflow: each becomes a provider error saying what."""
        from imapclient.exceptions import IMAPClientAbortError, IMAPClientError

        where = f"{self.settings.imap_host}:{self.settings.imap_port}"
        try:
            yield
        except (IMAPClientAbortError, OSError) as err:
            raise MailServerUnavailable(
                f"IMAP connection to {where} was lost while {doing} ({type(err).__name__}: {_server_text(err)}); "
                "this is retried."
            ) from None
        except IMAPClientError as err:
            text = _server_text(err)
            cls = refusal_class(text, during_login=False)
            raise cls(f"IMAP server {where} refused a command while {doing}: {text}") from None

    def imap_endpoint(self, mailbox: str | None = None) -> ImapEndpoint:
        """Where the connection's IMAP server is, and as whom to log in (``mailbox``: a shared mailbox)."""
        s = self.settings
        return ImapEndpoint(
            s.imap_host, s.imap_port, mailbox or s.mailbox, float(s.timeout), self.ssl_context, s.http_proxy
        )

    def folder_stream(
        self,
        folder: str,
        *,
        mailbox: str | None = None,
        poll_interval: float = 60.0,
        max_idle: float = MAX_IDLE_SECONDS,
    ) -> FolderStream:
        """New messages of ``folder`` as an endless async stream (see :class:`FolderStream`).

        It waits through :meth:`folder_watch`: the same IDLE connection as every deferred sensor and
        every other stream on this folder and mailbox in this process. Building it reads nothing.
        """
        return FolderStream(
            lambda: self.imap_client(mailbox),
            lambda: self.folder_watch([folder], mailbox=mailbox, poll_interval=poll_interval, max_idle=max_idle),
            folder,
        )

    # ------------------------------------------------------------------ SMTP
    def _smtp_login(self, user: str, force_refresh: bool) -> tuple[smtplib.SMTP, AccessToken]:
        s = self.settings
        # The token first: a refresh can take a while (retries, a lease held by another host), and a
        # server that sees no command for a while after STARTTLS drops the session.
        token = self.access_token(force_refresh=force_refresh)
        proxy = s.http_proxy
        if proxy is not None:  # a CONNECT tunnel; STARTTLS and its certificate check are still the server's
            client: smtplib.SMTP = ProxiedSMTP(s.smtp_host, s.smtp_port, proxy=proxy, timeout=s.timeout)
        else:
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
            sasl = self.xoauth2_string(token.token, user=user)
            # The response goes after the 334 prompt: servers cut long AUTH lines (tokens are 1.5-3 kB).
            client.auth("XOAUTH2", xoauth2_responder(sasl), initial_response_ok=False)
        except smtplib.SMTPAuthenticationError as err:
            _quietly_close(client)
            reply = f"{err.smtp_code} {err.smtp_error.decode(errors='replace')}"
            raise MailAuthenticationError(
                f"SMTP login to {s.smtp_host}:{s.smtp_port} as {user} failed. "
                + hints.SMTP_REFUSED.format(mailbox=user, reply=reply),
                reply=reply,
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
        return login_with_fresh_token(
            lambda force: self._smtp_login(user, force), what="SMTP", user=user, force_refresh=force_refresh
        )

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

    def plan(
        self,
        specs: Sequence[Mapping[str, Any]],
        identity: TaskIdentity | None = None,
        *,
        scope: str = "",
    ) -> list[PlannedMessage]:
        """Check every message of a batch (nothing is built or sent); see :func:`plan_message`.

        With ``identity`` (the task instance) each message without its own ``message_id`` gets a
        Message-ID derived from the identity and its position, the same on every try.
        """
        planned = []
        for position, spec in enumerate(specs):
            fields = dict(spec)
            sender = fields.pop("from_email", None) or self.settings.mailbox
            if identity is not None and not fields.get("message_id"):
                domain = sender.rpartition("@")[2].rstrip(">").strip() or "localhost"
                fields["message_id"] = stable_message_id(identity, position, domain, scope)
            planned.append(plan_message(sender=sender, **fields))
        return planned

    def sent_items_lookup(self, mailbox: str | None = None, folder: str = SENT_ITEMS_FOLDER):
        """``lookup(message_id) -> int``: how many messages with this Message-ID are in ``folder`` (Sent Items)?

        Exchange stores every message submitted over SMTP AUTH there; the sender asks after a lost
        reply to the end of DATA. One IMAP session per lookup (they are rare).
        """

        def lookup(message_id: str) -> bool:
            with self.imap_client(mailbox) as client, self._imap_errors(f"searching {folder} for {message_id}"):
                client.select_folder(folder, readonly=True)
                return len(client.search(["HEADER", "Message-ID", message_id]))

        return lookup

    def smtp_batch_sender(
        self, mailbox: str | None = None, *, max_attempts: int | None = None, **options: Any
    ) -> SmtpBatchSender:
        """A :class:`SmtpBatchSender` that logs in through this hook (one session, re-AUTH before expiry).

        After a lost reply to the end of DATA it looks the Message-ID up in the mailbox's Sent Items
        over this hook's IMAP (``sent_lookup=None`` turns that off).

        :param max_attempts: attempts per message for temporary failures (default 5).
        :param options: ``retry`` (a :class:`~..retry.Backoff`), ``reauth_margin``, ``clock``, ``sleep``,
            ``session_slot`` (default: a slot of :meth:`smtp_budget`, then one of :meth:`shared_budget`,
            held while a session is open),
            ``sent_lookup``, ``sent_items_wait``.
        """
        if max_attempts is not None:
            options["retry"] = dataclasses.replace(options.get("retry", SEND_RETRY), attempts=max_attempts)
        options.setdefault("sent_lookup", self.sent_items_lookup(mailbox))
        s = self.settings
        budget = self.smtp_budget(mailbox)
        options.setdefault("session_slot", lambda: two_level_slot(budget, self.shared_slot("smtp", mailbox)))
        return SmtpBatchSender(
            lambda force_refresh: self.smtp_login(mailbox, force_refresh=force_refresh),
            where=f"{s.smtp_host}:{s.smtp_port}",
            **options,
        )

    # ------------------------------------------------------------------ Microsoft Graph
    def _graph_mailbox(self, mailbox: str | None) -> tuple[str, str]:
        """``(path, address)``: delegated ``me`` for the signed-in mailbox, else ``users/{address}``."""
        address = mailbox or self.settings.mailbox
        if self.settings.delegated and address.lower() == self.settings.mailbox.lower():
            return "me", address
        return mailbox_path(address), address

    def graph_budget(self, mailbox: str | None = None) -> ConnectionBudget:
        """This process's budget of concurrent Graph requests of the mailbox ([o365mail] max_graph_requests_per_mailbox)."""
        return connection_budget(
            ("graph", *self._mailbox_key(mailbox)),
            configured_budget(GRAPH_BUDGET_OPTION, DEFAULT_GRAPH_REQUESTS),
            what=f"Graph requests of {self.conn_id}/{mailbox or 'default mailbox'}",
            option=GRAPH_BUDGET_OPTION,
            advice="Outlook allows 4 concurrent requests per app and mailbox; more are refused with 429.",
        )

    def graph_pacer(self, mailbox: str | None = None) -> RequestPacer:
        """This process's pacing of Graph requests to the mailbox ([o365mail] max_graph_requests_per_10_minutes,
        default 8,000: Outlook allows 10,000 per app and mailbox)."""
        return request_pacer(
            ("graph", *self._mailbox_key(mailbox)), configured_budget(GRAPH_PACING_OPTION, DEFAULT_REQUESTS_PER_WINDOW)
        )

    def graph_client(self, mailbox: str | None = None, **options: Any) -> GraphClient:
        """A :class:`GraphClient` for ``{graph_url}/v1.0`` with this connection's Graph tokens and proxy.

        :param options: ``retry``, ``sleep``, ``slot`` (default: a slot of :meth:`graph_budget` per request),
            ``pacer`` (default: :meth:`graph_pacer`).
        """
        s = self.settings
        _, address = self._graph_mailbox(mailbox)
        options.setdefault("slot", self.graph_budget(mailbox).slot)
        options.setdefault("pacer", self.graph_pacer(mailbox))
        return GraphClient(
            f"{s.graph_url}/v1.0",
            lambda force_refresh: self.graph_access_token(force_refresh=force_refresh),
            session=IdentityProviderSession(s.ca_bundle, s.timeout, proxy=s.http_proxy),
            timeout=s.timeout,
            conn_id=self.conn_id,
            mailbox=address,
            **options,
        )

    def graph_can_read(self) -> bool:
        """The Graph token can read Sent Items (app-only: the admin-consented roles decide)."""
        s = self.settings
        return not s.delegated or any(p.rsplit("/", 1)[-1].lower() in GRAPH_READ_PERMISSIONS for p in s.graph_scopes)

    def graph_sent_items_lookup(self, mailbox: str | None = None):
        """``lookup(message_id) -> int`` over Graph (``$filter=internetMessageId eq ...``)."""
        who, _ = self._graph_mailbox(mailbox)

        def lookup(message_id: str) -> int:
            client = self.graph_client(mailbox, retry=dataclasses.replace(GRAPH_RETRY, attempts=2))
            try:
                return sent_items_count(client, who, message_id)
            finally:
                client.close()

        return lookup

    def graph_sender(
        self, mailbox: str | None = None, *, max_attempts: int | None = None, **options: Any
    ) -> GraphSender:
        """A :class:`GraphSender` (sendMail; drafts and upload sessions over 4 MB) for the mailbox.

        After an ambiguous outcome it looks the Message-ID up in Sent Items through Graph (with
        Mail.ReadWrite or Mail.Read), else over this hook's IMAP.

        :param max_attempts: attempts per message whose send got no answer (default 4).
        :param options: ``retry``, ``clock``, ``sleep``, ``sent_lookup``, ``sent_items_wait``,
            ``max_request_bytes``, ``upload_chunk``; ``client_options`` for :meth:`graph_client`.
        """
        if max_attempts is not None:
            options["retry"] = dataclasses.replace(options.get("retry", GRAPH_SEND_RETRY), attempts=max_attempts)
        who, _ = self._graph_mailbox(mailbox)
        if "sent_lookup" not in options:
            options["sent_lookup"] = (
                self.graph_sent_items_lookup(mailbox) if self.graph_can_read() else self.sent_items_lookup(mailbox)
            )
        client_options = options.pop("client_options", {})
        if "sleep" in options:
            client_options.setdefault("sleep", options["sleep"])
        options.setdefault("redact", _redact_url)
        return GraphSender(
            self.graph_client(mailbox, **client_options), who=who, can_draft=self.graph_can_read(), **options
        )

    def message_sender(self, mailbox: str | None = None, **options: Any) -> Any:
        """The connection's sender (``transport``): SMTP, Graph, or SMTP then Graph when SMTP AUTH is off.

        :param options: for the SMTP sender (:meth:`smtp_batch_sender`); ``graph_options`` for
            :meth:`graph_sender`. ``max_attempts``, ``sleep`` and ``sent_items_wait`` go to both.
        """
        graph_options = dict(options.pop("graph_options", {}))
        for shared in ("max_attempts", "sleep", "sent_items_wait"):
            if shared in options:
                graph_options.setdefault(shared, options[shared])
        transport = self.settings.transport
        if transport == "graph":
            return self.graph_sender(mailbox, **graph_options)
        if transport == "smtp":
            return self.smtp_batch_sender(mailbox, **options)
        return SmtpThenGraph(
            lambda: self.smtp_batch_sender(mailbox, **options),
            lambda: self.graph_sender(mailbox, **graph_options),
            key=self._mailbox_key(mailbox),
            what=f"{mailbox or self.settings.mailbox} (connection {self.conn_id})",
        )

    def smtp_budget(self, mailbox: str | None = None) -> ConnectionBudget:
        """This process's budget of concurrent SMTP sessions of the mailbox ([o365mail] max_smtp_sessions_per_mailbox)."""
        return connection_budget(
            ("smtp", *self._mailbox_key(mailbox)),
            configured_budget(SMTP_BUDGET_OPTION, DEFAULT_SMTP_SESSIONS),
            what=f"SMTP sessions of {self.conn_id}/{mailbox or 'default mailbox'}",
            option=SMTP_BUDGET_OPTION,
            advice=f"Send fewer batches at once, or raise [o365mail] {SMTP_BUDGET_OPTION} if the mailbox allows more.",
        )

    def recipient_budget(self, store: VariableBackend | None = None) -> RecipientBudget | None:
        """The mailbox's rolling 24-hour recipient count, or None when ``daily_recipient_budget`` is 0."""
        budget = _configured_budget()
        if budget <= 0:
            return None
        mailbox = self.settings.mailbox
        variables = store or default_variables()
        timing = LeaseTiming.configured(self.settings.timeout)
        return RecipientBudget(
            variables,
            mailbox,
            budget,
            lock=lambda: _cross_host_lock(
                variables, f"recipient-budget:{mailbox.lower()}", budget_key(mailbox), timing
            ),
        )

    def send_messages(
        self,
        messages: Iterable[OutgoingMessage | PlannedMessage],
        *,
        identity: TaskIdentity | None = None,
        raise_on_refused: bool = True,
        variables: VariableBackend | None = None,
        **sender_options: Any,
    ) -> list[SendResult]:
        """Send messages through the connection's transport: one SMTP session (re-authenticating when its
        token nears expiry), Microsoft Graph, or SMTP then Graph (``transport: auto``).

        Before the first message: the batch's recipients are counted against the mailbox's daily
        budget (:class:`RecipientBudgetExceeded`, nothing sent, when it would cross it). With
        ``identity`` (the task instance), accepted messages are recorded in its send ledger and a
        retry skips them; the ledger is kept (marked complete) until its retention runs out.

        :param messages: :class:`PlannedMessage` (built one at a time) or built messages.
        :param raise_on_refused: raise :class:`RecipientsRefusedError` after the batch if the server
            refused recipients permanently (the others received the message).
        :param variables: where the ledger and the budget live (default ``runtime.default_variables()``).
        :param sender_options: passed to :meth:`message_sender` (``max_attempts``, ``retry``, ``sleep``,
            ``graph_options``...).
        """
        planned = [m if isinstance(m, PlannedMessage) else _planned(m) for m in messages]
        store = variables or (default_variables() if identity is not None or _configured_budget() > 0 else None)
        ledger = (
            SendLedger(store, identity, lock=lambda: host_lock("send-ledger-index"))
            if identity is not None and store is not None
            else None
        )
        budget = self.recipient_budget(store) if store is not None else None
        if budget is not None:
            holder = identity.key() if identity is not None else f"once-{uuid.uuid4().hex}"
            budget.reserve(holder, sum(len(m.recipients) for m in planned))
        with self.message_sender(**sender_options) as sender:
            results = send_batch(sender, planned, ledger=ledger)
        if ledger is not None:
            ledger.finish()
        for result in results:
            self.log.info(
                "%s %s to %d recipient(s)%s.",
                "Already sent" if result.already_sent else "Sent",
                result.message_id,
                len(result.accepted),
                f", {len(result.refused)} refused" if result.refused else "",
            )
        if raise_on_refused:
            raise_for_refused(results)
        return results

    def send_email(
        self,
        to: Any = None,
        subject: str | None = None,
        html_content: str | None = None,
        *,
        identity: TaskIdentity | None = None,
        scope: str = "email",
        **fields: Any,
    ) -> str:
        """Compose and send one message; returns its Message-ID. Fields as in :func:`compose_message`.

        With ``identity`` the Message-ID is derived from it and ``scope`` (stable across tries).
        """
        spec = {"to": to, "subject": subject, "html_content": html_content, **fields}
        planned = self.plan([spec], identity, scope=scope)
        return self.send_messages(planned)[0].message_id

    # ------------------------------------------------------------------ UI test button
    def test_connection(self) -> tuple[bool, str]:
        """Get a token, log in to IMAP, then test how the connection sends (``transport``): SMTP, Microsoft
        Graph (a Graph token and one harmless read), or both for ``auto``; say which step failed."""
        s = self.settings
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("token", lambda: self.get_access_token()),
            ("IMAP", lambda: self._use(self.imap_client)),
        ]
        if s.transport != "graph":
            steps.append(("SMTP", lambda: self._use(self.smtp_client)))
        if s.uses_graph:
            steps.append(("Graph", self.graph_probe))
        auth_disabled_reply = ""
        for name, step in steps:
            try:
                step()
            except (O365MailError, AuthorizationError) as err:
                if name == "SMTP" and s.transport == "auto" and smtp_auth_disabled(err):
                    # auto then sends through Graph: the Graph step decides
                    auth_disabled_reply = str(err)
                    continue
                return False, f"{name} step failed: {err}"
            except (TimeoutError, OSError) as err:
                return False, f"{name} step failed: cannot reach the server ({type(err).__name__}: {err})"
        imap = f"Token, IMAP ({s.imap_host}:{s.imap_port})"
        smtp = f"SMTP ({s.smtp_host}:{s.smtp_port})"
        graph = f"Microsoft Graph ({s.graph_url})"
        if s.transport == "graph":
            return True, f"{imap} and {graph} work for {s.mailbox} (transport graph: SMTP is not used)."
        if s.transport == "auto":
            if auth_disabled_reply:
                return True, (
                    f"{imap} and {graph} work for {s.mailbox}. SMTP AUTH is disabled for it ({auth_disabled_reply}): "
                    "transport auto sends its mail through Microsoft Graph."
                )
            return True, f"{imap}, {smtp} and {graph} work for {s.mailbox}."
        return True, f"{imap} and {smtp} work for {s.mailbox}."

    def graph_probe(self) -> int | None:
        """A Graph token, then one harmless request when the permissions can read: the id of at most one
        Sent Items message. Returns how many came back (0 or 1), ``None`` when the token cannot read."""
        self.graph_access_token()
        if not self.graph_can_read():
            return None
        who, _ = self._graph_mailbox(None)
        client = self.graph_client(retry=dataclasses.replace(GRAPH_RETRY, attempts=2, max_retry_after=10.0))
        try:
            response = client.request(
                "GET",
                f"{who}/mailFolders/SentItems/messages",
                params={"$top": "1", "$select": "id"},
                doing=f"reading one message id of {self.settings.mailbox}'s Sent Items (a connection check)",
            )
            return len(response.json().get("value") or [])
        finally:
            client.close()

    @staticmethod
    def _use(factory) -> None:
        with factory():
            pass


class _NoSlot:
    def release(self) -> None:
        pass


_NO_SLOT = _NoSlot()


@contextlib.contextmanager
def _cross_host_lock(variables: VariableBackend, name: str, key: str, timing: LeaseTiming) -> Iterator[None]:
    """Exclusive across hosts: this host's ``flock`` (exact among its processes), then a lease in the
    Variable ``<key>_lease`` (``auth/lease.py``: claim, settle, read back; renewed while held)."""
    with host_lock(name):
        lease = RefreshLease(variables, name, timing, key=f"{key}_lease", doing="holding the lock")
        lease.acquire(time.monotonic() + 2 * timing.ttl)
        try:
            yield
        finally:
            lease.release()


def _redact_url(url: str) -> None:
    """Register a pre-authenticated URL's credential (``authtoken``) with the secret maskers for an hour
    (an upload session lasts minutes; like an access token, it is forgotten once useless)."""
    for values in parse_qs(urlsplit(url).query).values():
        for value in values:
            mask_access_token(value, time.time() + 3600)


def _configured_budget() -> int:
    raw = (conf.get("o365mail", "daily_recipient_budget", fallback="") or "").strip()
    if not raw:
        return DEFAULT_DAILY_RECIPIENT_BUDGET
    try:
        return int(raw)
    except ValueError:
        raise ConnectionConfigError(
            f"[o365mail] daily_recipient_budget must be a whole number of recipients (0 turns the budget off), "
            f"got {raw!r}."
        ) from None


def _planned(message: OutgoingMessage) -> PlannedMessage:
    return PlannedMessage(message.message_id, message.envelope_from, message.recipients, build=lambda: message)


def _server_text(err: Exception) -> str:
    text = str(err)
    return text[:300]


def _quietly_shutdown(client: Any) -> None:
    if client is not None:
        with contextlib.suppress(Exception):
            client.shutdown()


def _quietly_close(client: smtplib.SMTP) -> None:
    with contextlib.suppress(Exception):
        client.close()
