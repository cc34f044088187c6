"""TLS contexts for the identity provider and the mail servers, always verifying; HTTP CONNECT tunnels.

A proxy only ever carries a tunnel: TLS runs end to end with the identity provider or the mail
server, whose certificate is verified (never the proxy's), and no credential of ours crosses the
tunnel before that handshake succeeded. Nothing here does I/O except :func:`open_tunnel` and the
session's requests.
"""

from __future__ import annotations

import base64
import re
import socket
import ssl
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

import requests
from requests.adapters import HTTPAdapter

from airflow_provider_o365mail import hints
from airflow_provider_o365mail.exceptions import ConnectionConfigError, ProxyRefused, ProxyUnavailable

#: The proxy's reply to CONNECT is read up to its blank line; a longer head is not a proxy.
MAX_CONNECT_REPLY = 16 * 1024
_TUNNEL_FAILED = re.compile(r"Tunnel connection failed: (\d{3})\s*([^'\"\)]*)")


def client_ssl_context(ca_bundle: str | None = None) -> ssl.SSLContext:
    """System trust store plus ``ca_bundle``; hostname checking and verification always on.

    :raises ConnectionConfigError: ``ca_bundle`` is missing or holds no PEM certificate.
    """
    context = ssl.create_default_context()
    if ca_bundle:
        try:
            context.load_verify_locations(cafile=ca_bundle)
        except (OSError, ssl.SSLError) as err:
            raise ConnectionConfigError(
                f"The connection's ca_bundle {ca_bundle!r} cannot be loaded ({type(err).__name__}: "
                f"{getattr(err, 'strerror', None) or err}). Point ca_bundle at a readable PEM file with the CA "
                "certificate(s), or remove it to use the system trust store."
            ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def is_certificate_error(err: BaseException) -> bool:
    """True when ``err`` (a requests/urllib3/ssl error, possibly wrapped) is a failed certificate check.

    Such a failure is permanent (a wrong ``ca_bundle`` or an intercepting proxy), unlike a reset
    handshake, and must not be retried as if the identity provider were overloaded.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return True
        if "CERTIFICATE_VERIFY_FAILED" in str(current):
            return True
        nested = [a for a in getattr(current, "args", ()) if isinstance(a, BaseException)]
        current = (
            current.__cause__
            or current.__context__
            or getattr(current, "reason", None)
            or (nested[0] if nested else None)
        )
        if current is not None and not isinstance(current, BaseException):
            current = None
    return False


# ---------------------------------------------------------------------- proxies
def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class HttpProxy:
    """An HTTP proxy that opens tunnels with CONNECT. ``str`` and ``repr`` never show the password."""

    host: str
    port: int
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return f"http://{_hostport(self.host, self.port)}"

    @property
    def url(self) -> str:
        """The URL with its credentials (URL-encoded) for an HTTP library; a secret, never logged."""
        if self.username is None:
            return str(self)
        userinfo = quote(self.username, safe="")
        if self.password is not None:
            userinfo += ":" + quote(self.password, safe="")
        return f"http://{userinfo}@{_hostport(self.host, self.port)}"

    @property
    def basic_credentials(self) -> str | None:
        """``user:password`` as sent (base64) in ``Proxy-Authorization: Basic``; None without credentials."""
        if self.username is None:
            return None
        return f"{self.username}:{self.password or ''}"

    def authorization(self) -> str | None:
        credentials = self.basic_credentials
        if credentials is None:
            return None
        return "Basic " + base64.b64encode(credentials.encode("utf-8")).decode("ascii")


def parse_proxy(value: str, *, where: str = "the proxy") -> HttpProxy:
    """``http://[user:password@]host:port`` (credentials URL-encoded) as an :class:`HttpProxy`.

    :raises ConnectionConfigError: not an ``http://`` URL with a host and a port. The message
        never repeats the value (it may hold a password).
    """
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        parts, port = None, None
    if parts is None or parts.scheme.lower() != "http" or not parts.hostname or port is None:
        raise ConnectionConfigError(
            f"{where} must be an URL http://[user:password@]host:port (a proxy that opens tunnels with "
            "CONNECT; https:// and socks proxies are not supported, and the port is required)."
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConnectionConfigError(f"{where} must be http://[user:password@]host:port, without a path or query.")
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return HttpProxy(parts.hostname, port, username, password)


def _refused(proxy: HttpProxy | str, target: str, status: int, reason: str) -> ProxyRefused:
    fix = hints.PROXY_REFUSED.get(status, hints.PROXY_REFUSED_OTHER).format(target=target)
    return ProxyRefused(
        f"The proxy {proxy} refused to open a tunnel to {target}: {status} {reason.strip()}. {fix} "
        "Nothing was sent to the server.",
        proxy=str(proxy),
        status=status,
    )


def _read_connect_reply(sock: socket.socket) -> bytes:
    """The proxy's reply head, byte by byte: a mail server may speak first (SMTP's 220) right after it."""
    head = bytearray()
    while not head.endswith(b"\r\n\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionResetError("the proxy closed the connection before answering CONNECT")
        head += chunk
        if len(head) > MAX_CONNECT_REPLY:
            raise ConnectionError("the proxy's answer to CONNECT has no end")
    return bytes(head)


def open_tunnel(proxy: HttpProxy, host: str, port: int, timeout: float | None) -> socket.socket:
    """A TCP connection to ``host:port`` through ``proxy`` (CONNECT), ready for TLS to ``host``.

    Only the proxy's credentials (``Proxy-Authorization: Basic``) go to the proxy; the caller then runs
    TLS through the tunnel and verifies the server's certificate for ``host``.

    :raises ProxyRefused: the proxy answered other than 2xx (403, 407...): permanent.
    :raises ProxyUnavailable: the proxy cannot be reached or dropped the connection (transient).
    """
    # Only the host name goes through IDNA (the request line and headers are ASCII).
    target = _hostport(host if host.isascii() else host.encode("idna").decode("ascii"), port)
    try:
        sock = socket.create_connection((proxy.host, proxy.port), timeout=timeout)
    except OSError as err:
        raise ProxyUnavailable(
            f"Cannot reach the proxy {proxy} to open a tunnel to {target} ({type(err).__name__}: "
            f"{getattr(err, 'strerror', None) or err}). {hints.PROXY_UNREACHABLE}"
        ) from None
    try:
        request = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
        authorization = proxy.authorization()
        if authorization:
            request.append(f"Proxy-Authorization: {authorization}")
        sock.sendall(("\r\n".join(request) + "\r\n\r\n").encode("ascii"))
        status_line = _read_connect_reply(sock).split(b"\r\n", 1)[0].decode("latin-1")
        version, _, rest = status_line.partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/") or not code.isdigit():
            raise ConnectionError(f"the proxy answered CONNECT with {status_line[:80]!r}, not HTTP")
        if 500 <= int(code) < 600:  # the proxy's own trouble (502/503/504 upstream): temporary, retried
            raise ConnectionError(f"the proxy answered CONNECT with {code} {reason}".strip())
        if not 200 <= int(code) < 300:
            raise _refused(proxy, target, int(code), reason)
    except ProxyRefused:
        sock.close()
        raise
    except OSError as err:
        sock.close()
        raise ProxyUnavailable(
            f"The proxy {proxy} failed while opening a tunnel to {target} ({type(err).__name__}: "
            f"{getattr(err, 'strerror', None) or err}). {hints.PROXY_UNREACHABLE}"
        ) from None
    except BaseException:
        sock.close()
        raise
    return sock


# ---------------------------------------------------------------------- identity provider
class _ContextAdapter(HTTPAdapter):
    def __init__(self, context: ssl.SSLContext, **kwargs) -> None:
        self._context = context
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs):
        kwargs["ssl_context"] = self._context
        return super().init_poolmanager(*args, **kwargs)

    def proxy_manager_for(self, proxy, **proxy_kwargs):
        # Through a proxy, TLS to the identity provider still uses our verifying context.
        proxy_kwargs["ssl_context"] = self._context
        return super().proxy_manager_for(proxy, **proxy_kwargs)


class IdentityProviderSession(requests.Session):
    """HTTP session for MSAL: explicit timeout, our CA list, the proxy we chose; no other environment.

    ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` would otherwise replace MSAL's ``verify`` silently, so
    ``trust_env`` stays off and the proxy is chosen here: ``proxy`` (the connection's field) wins;
    without it ``HTTPS_PROXY``/``NO_PROXY`` decide, as in every HTTP client. TLS goes through the
    proxy's tunnel to the identity provider and is verified against our context.
    It keeps no state about responses: whoever needs a response's status wraps the session
    (see :class:`airflow_provider_o365mail.auth.msal_app.RecordingHttpClient`).
    """

    def __init__(self, ca_bundle: str | None, timeout: float, *, proxy: HttpProxy | None = None) -> None:
        super().__init__()
        self.trust_env = False
        self.timeout = timeout
        self.proxy = proxy
        self.mount("https://", _ContextAdapter(client_ssl_context(ca_bundle)))

    def proxy_for(self, url: str) -> tuple[str, str] | None:
        """``(proxy URL, its name without credentials)`` for a request to ``url``, or None for direct.

        The connection's proxy wins; else ``HTTPS_PROXY`` unless ``NO_PROXY`` matches the host (an
        ``https://`` proxy from the environment is left to requests, which supports it).
        """
        if self.proxy is not None:
            return self.proxy.url, str(self.proxy)
        chosen = requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))
        if not chosen:
            return None
        chosen = chosen if "://" in chosen else f"http://{chosen}"
        parts = urlsplit(chosen)
        host = parts.hostname or "?"
        try:
            port = f":{parts.port}" if parts.port else ""
        except ValueError:
            port = ""
        return chosen, f"{parts.scheme}://{f'[{host}]' if ':' in host else host}{port}"

    def request(self, method, url, *args, **kwargs):  # type: ignore[override]
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout
        chosen = self.proxy_for(url)
        kwargs["proxies"] = {"https": chosen[0], "http": chosen[0]} if chosen else {}
        try:
            return super().request(method, url, *args, **kwargs)
        except requests.exceptions.ProxyError as err:
            if chosen is None:
                raise
            proxy = chosen[1]
            target = urlsplit(url)
            where = _hostport(target.hostname or "", target.port or 443)
            refused = _TUNNEL_FAILED.search(str(err))
            if refused and not 500 <= int(refused.group(1)) < 600:  # a 5xx from the proxy is retried
                raise _refused(proxy, where, int(refused.group(1)), refused.group(2)) from None
            raise requests.exceptions.ProxyError(
                f"cannot reach the proxy {proxy} for {where} ({hints.PROXY_UNREACHABLE.rstrip('.')})"
            ) from None
