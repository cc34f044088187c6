"""Proxy URLs, the CONNECT tunnel and the identity provider session's proxy choice (no sandbox)."""

from __future__ import annotations

import socket
import threading

import pytest

from airflow_provider_o365mail.auth.masking import mask_proxies, secret_forms
from airflow_provider_o365mail.connection import settings_from_fields
from airflow_provider_o365mail.exceptions import ConnectionConfigError, ProxyRefused, ProxyUnavailable
from airflow_provider_o365mail.testing.connect_proxy import ConnectionRecorder, ConnectProxy
from airflow_provider_o365mail.tls import IdentityProviderSession, open_tunnel, parse_proxy

BASE = {"tenant_id": "contoso", "mailbox": "reports@contoso.com", "refresh_token": "rt"}


def test_parse_proxy_reads_credentials_and_never_shows_the_password():
    proxy = parse_proxy("http://svc%40corp:p%3Ass%2Fw0rd@proxy.corp:3128")
    assert (proxy.host, proxy.port, proxy.username, proxy.password) == ("proxy.corp", 3128, "svc@corp", "p:ss/w0rd")
    assert str(proxy) == "http://proxy.corp:3128"
    assert "p:ss" not in repr(proxy) and "svc" not in repr(proxy)
    assert parse_proxy(proxy.url) == proxy  # re-encoded URL round-trips
    assert proxy.basic_credentials == "svc@corp:p:ss/w0rd"
    assert parse_proxy("http://proxy.corp:8080").authorization() is None


@pytest.mark.parametrize(
    "value",
    ["https://proxy:443", "socks5://proxy:1080", "http://proxy", "proxy:3128", "http://:3128", "http://p:3128/path"],
)
def test_unsupported_proxy_urls_are_refused_without_echoing_them(value):
    with pytest.raises(ConnectionConfigError, match="http://") as caught:
        settings_from_fields("c", "client", "secret", {**BASE, "proxy": value.replace("proxy", "u:hunter2@proxy")})
    assert "hunter2" not in str(caught.value)


def test_settings_keep_the_proxy_out_of_repr():
    settings = settings_from_fields("c", "client", "secret", {**BASE, "proxy": "http://u:hunter2@proxy.corp:3128"})
    assert "hunter2" not in repr(settings)
    assert str(settings.http_proxy) == "http://proxy.corp:3128"
    assert settings_from_fields("c", "client", "secret", BASE).http_proxy is None


def test_proxy_credentials_are_masked_in_every_form(monkeypatch):
    from airflow._shared.secrets_masker import redact as core_redact
    from airflow.sdk._shared.secrets_masker import redact as sdk_redact

    monkeypatch.setenv("HTTPS_PROXY", "https://envuser:env-pass-5150@envproxy:3128")
    mask_proxies("http://svc:conn-pass-8086@proxy.corp:3128")
    conn = parse_proxy("http://svc:conn-pass-8086@proxy.corp:3128")
    env = parse_proxy("http://envuser:env-pass-5150@envproxy:3128")  # the same credentials, https:// in the env
    forms = {conn.authorization().split()[1], env.authorization().split()[1]}
    for value in ("conn-pass-8086", "env-pass-5150", conn.basic_credentials, env.basic_credentials):
        forms |= secret_forms(value)
    for form in forms:
        for redact in (sdk_redact, core_redact):
            assert form not in redact(f"line {form} end"), form


def _greeting_server() -> tuple[socket.socket, threading.Thread]:
    """A server that speaks first (like SMTP's 220) and echoes one line."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(b"220 hello\r\n")
            conn.sendall(conn.recv(100))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


def test_tunnel_keeps_the_bytes_a_server_sends_right_after_the_proxys_answer():
    server, thread = _greeting_server()
    port = server.getsockname()[1]
    with server, ConnectProxy(username="u", password="p w") as proxy:
        proxy_settings = parse_proxy(proxy.url)
        with open_tunnel(proxy_settings, "127.0.0.1", port, 5) as sock:
            assert sock.recv(100) == b"220 hello\r\n"
            sock.sendall(b"EHLO x\r\n")
            assert sock.recv(100) == b"EHLO x\r\n"
    thread.join(5)
    (record,) = proxy.tunnels()
    assert record.target == f"127.0.0.1:{port}"
    assert record.authorization == proxy_settings.authorization()


@pytest.mark.parametrize(
    ("proxy_kwargs", "given", "status", "hint"),
    [
        ({"username": "u", "password": "right"}, None, 407, "wants credentials"),
        ({"username": "u", "password": "right"}, ("u", "wrong"), 407, "wants credentials"),
        ({"refuse": {"*": 403}}, None, 403, "rules do not allow a tunnel to mail.example:993"),
    ],
)
def test_a_refusing_proxy_is_a_permanent_error_naming_the_proxy(proxy_kwargs, given, status, hint):
    with ConnectProxy(**proxy_kwargs) as proxy:
        url = proxy.url_with(*given) if given else f"http://127.0.0.1:{proxy.port}"
        with pytest.raises(ProxyRefused) as caught:
            open_tunnel(parse_proxy(url), "mail.example", 993, 5)
    message = str(caught.value)
    assert caught.value.status == status and caught.value.proxy == f"http://127.0.0.1:{proxy.port}"
    assert f"The proxy http://127.0.0.1:{proxy.port} refused" in message and hint in message
    assert "wrong" not in message and "right" not in message


def test_an_unreachable_proxy_is_transient_and_named():
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]
    with pytest.raises(ProxyUnavailable, match=f"Cannot reach the proxy http://127.0.0.1:{port}"):
        open_tunnel(parse_proxy(f"http://127.0.0.1:{port}"), "mail.example", 993, 2)


@pytest.mark.parametrize("status", [502, 503, 504])
def test_a_proxy_in_trouble_is_transient_not_a_refusal(status):
    """A 5xx to CONNECT is the proxy's (or its upstream's) trouble: retried, unlike 403/407."""
    with (
        ConnectProxy(refuse={"*": status}) as proxy,
        pytest.raises(ProxyUnavailable, match=f"answered CONNECT with {status}") as caught,
    ):
        open_tunnel(parse_proxy(f"http://127.0.0.1:{proxy.port}"), "mail.example", 993, 5)
    assert not isinstance(caught.value, ProxyRefused)


def test_a_non_ascii_mail_host_goes_through_idna_and_credentials_stay_intact():
    with (
        ConnectProxy(username="u", password="pässword", refuse={"*": 403}) as proxy,
        pytest.raises(ProxyRefused) as caught,
    ):
        open_tunnel(parse_proxy(proxy.url_with("u", "pässword")), "bücher.example", 993, 5)
    assert caught.value.status == 403, "authenticated, then refused by rule: the request was well formed"
    assert "xn--bcher-kva.example:993" in str(caught.value)


def test_session_proxy_choice_explicit_wins_then_https_proxy_then_no_proxy(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://envuser:envpass@env.corp:8080")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    url = "https://login.microsoftonline.com/t/v2.0/.well-known/openid-configuration"
    assert IdentityProviderSession(None, 5).proxy_for(url) == (
        "http://envuser:envpass@env.corp:8080",
        "http://env.corp:8080",  # named without its credentials
    )
    explicit = parse_proxy("http://conn.corp:3128")
    assert IdentityProviderSession(None, 5, proxy=explicit).proxy_for(url) == (explicit.url, "http://conn.corp:3128")
    monkeypatch.setenv("NO_PROXY", ".microsoftonline.com")
    assert IdentityProviderSession(None, 5).proxy_for(url) is None
    assert IdentityProviderSession(None, 5, proxy=explicit).proxy_for(url)[1] == "http://conn.corp:3128"  # wins
    monkeypatch.delenv("NO_PROXY")
    monkeypatch.setenv("HTTPS_PROXY", "env.corp:8080")  # no scheme, as curl accepts it
    assert IdentityProviderSession(None, 5).proxy_for(url) == ("http://env.corp:8080", "http://env.corp:8080")
    monkeypatch.setenv("HTTPS_PROXY", "https://tls-proxy.corp:443")  # left to requests, which supports it
    assert IdentityProviderSession(None, 5).proxy_for(url) == ("https://tls-proxy.corp:443",) * 2


def test_recorder_sees_direct_connections_but_not_the_proxys_own():
    server, thread = _greeting_server()
    with server, ConnectProxy() as proxy, ConnectionRecorder().active() as seen:
        with open_tunnel(parse_proxy(proxy.url), "127.0.0.1", server.getsockname()[1], 5) as sock:
            sock.recv(100)
            sock.sendall(b"x")
        assert seen.ports() == {proxy.port}  # the proxy's upstream connection is not ours
        with socket.create_connection(proxy.address, timeout=5):
            pass
        assert [port for _, port, _ in seen.connects] == [proxy.port, proxy.port]
    thread.join(5)
