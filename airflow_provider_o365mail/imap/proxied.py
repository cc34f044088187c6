"""IMAP clients (IMAPClient, aioimaplib) whose TCP connection is a CONNECT tunnel through an HTTP proxy.

Each client only replaces how its socket is opened (:func:`..tls.open_tunnel` instead of a direct
connection); everything after it is the library's own: IMAPS wraps the tunnel in TLS for the
mail server's name. The certificate checked is the mail
server's, with the caller's verifying context, and the XOAUTH2 token is sent only after that.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import Any

import aioimaplib
from imapclient import IMAPClient
from imapclient import tls as imapclient_tls

from airflow_provider_o365mail.tls import HttpProxy, open_tunnel


class _TunnelledIMAP4TLS(imapclient_tls.IMAP4_TLS):
    def __init__(
        self, host: str, port: int, ssl_context: ssl.SSLContext, timeout: float | None, proxy: HttpProxy
    ) -> None:
        self._proxy = proxy  # before super().__init__, which connects
        super().__init__(host, port, ssl_context, timeout)

    def _create_socket(self, timeout: float | None = None) -> socket.socket:
        sock = open_tunnel(self._proxy, self.host, self.port, timeout if timeout is not None else self._timeout)
        try:
            return imapclient_tls.wrap_socket(sock, self.ssl_context, self.host)
        except BaseException:
            sock.close()
            raise


class ProxiedIMAPClient(IMAPClient):
    """:class:`IMAPClient` over implicit TLS through ``proxy`` (``ssl_context`` is required)."""

    def __init__(self, host: str, *, proxy: HttpProxy, ssl_context: ssl.SSLContext, **kwargs: Any) -> None:
        self._proxy = proxy
        super().__init__(host, ssl=True, ssl_context=ssl_context, **kwargs)

    def _create_IMAP4(self) -> imapclient_tls.IMAP4_TLS:
        connect_timeout = getattr(self._timeout, "connect", None)
        return _TunnelledIMAP4TLS(self.host, self.port, self.ssl_context, connect_timeout, self._proxy)


class ProxiedAioIMAP4(aioimaplib.IMAP4):
    """aioimaplib's IMAPS client through ``proxy``: the tunnel is opened in a thread, TLS on the loop."""

    def __init__(self, *, proxy: HttpProxy, **kwargs: Any) -> None:
        self._proxy = proxy  # before super().__init__, which starts connecting
        super().__init__(**kwargs)

    def create_client(
        self,
        host: str,
        port: int,
        loop: asyncio.AbstractEventLoop | None,
        conn_lost_cb: Callable[[Exception | None], None] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if ssl_context is None:
            raise ValueError("an IMAP session through a proxy needs a TLS context")
        local_loop = loop if loop is not None else asyncio.get_running_loop()
        self.protocol = aioimaplib.IMAP4ClientProtocol(local_loop, conn_lost_cb)

        async def connect() -> Any:
            sock = await local_loop.run_in_executor(None, open_tunnel, self._proxy, host, port, self.timeout)
            try:
                return await local_loop.create_connection(
                    lambda: self.protocol, sock=sock, ssl=ssl_context, server_hostname=host
                )
            except BaseException:
                sock.close()
                raise

        self._client_task = local_loop.create_task(connect())
