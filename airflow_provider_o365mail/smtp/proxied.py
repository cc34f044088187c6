"""An SMTP client whose TCP connection is a CONNECT tunnel through an HTTP proxy.

Only how the socket is opened changes (:func:`..tls.open_tunnel`); smtplib then sends EHLO and
STARTTLS through the tunnel, so the certificate checked is the mail server's, with the caller's
verifying context, and the XOAUTH2 token is sent only after that.
"""

from __future__ import annotations

import smtplib
import socket

from airflow_provider_o365mail.tls import HttpProxy, open_tunnel


class ProxiedSMTP(smtplib.SMTP):
    """:class:`smtplib.SMTP` whose connection is a tunnel through ``proxy``; STARTTLS names the mail server."""

    def __init__(self, host: str, port: int, *, proxy: HttpProxy, timeout: float) -> None:
        self._proxy = proxy  # before super().__init__, which connects
        super().__init__(host, port, timeout=timeout)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return open_tunnel(self._proxy, host, port, timeout)
