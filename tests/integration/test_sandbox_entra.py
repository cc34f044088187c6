"""The Entra ID stand-in against MSAL and plain HTTP only (independent of the provider's hook)."""

from __future__ import annotations

import base64
import hashlib
import imaplib
import re
import secrets
import ssl
import time
from urllib.parse import parse_qs, urlencode, urlsplit

import msal
import pytest

from airflow_provider_o365mail.testing.admin import tls_session
from airflow_provider_o365mail.testing.sandbox import DELEGATED_SCOPES, REDIRECT_URI

SCOPES = DELEGATED_SCOPES.split()


def msal_app(sbx, client_id=None, secret=None):
    return msal.ConfidentialClientApplication(
        client_id or sbx.client_id,
        client_credential=secret or sbx.client_secret,
        authority=sbx.authority,
        instance_discovery=False,
        http_client=tls_session(sbx.ca_file),
    )


def token_post(sbx, **form):
    form.setdefault("client_id", sbx.client_id)
    form.setdefault("client_secret", sbx.client_secret)
    return tls_session(sbx.ca_file).post(f"{sbx.authority}/oauth2/v2.0/token", data=form, timeout=30)


def fresh_rt(sbx, admin):
    return sbx.new_refresh_token()


def test_discovery_document_has_what_msal_needs(o365_sandbox):
    doc = (
        tls_session(o365_sandbox.ca_file)
        .get(f"{o365_sandbox.authority}/v2.0/.well-known/openid-configuration", timeout=10)
        .json()
    )
    assert doc["token_endpoint"] == f"{o365_sandbox.authority}/oauth2/v2.0/token"
    assert doc["authorization_endpoint"] == f"{o365_sandbox.authority}/oauth2/v2.0/authorize"
    keys = tls_session(o365_sandbox.ca_file).get(doc["jwks_uri"], timeout=10).json()["keys"]
    assert keys[0]["kty"] == "RSA"


def test_auth_code_with_pkce_state_and_nonce_through_the_sign_in_page(o365_sandbox, o365_admin):
    """MSAL's own auth-code flow; the person's part is a form POST on the HTML page."""
    sbx = o365_sandbox
    app = msal_app(sbx)
    flow = app.initiate_auth_code_flow(SCOPES, redirect_uri=REDIRECT_URI, login_hint=sbx.second_user)
    assert "code_challenge_method=S256" in flow["auth_uri"]
    session = tls_session(sbx.ca_file)
    page = session.get(flow["auth_uri"], timeout=10)
    assert page.status_code == 200 and "Permissions requested" in page.text
    flow_id = re.search(r'name="flow" value="([^"]+)"', page.text).group(1)
    answer = session.post(
        flow["auth_uri"].split("?")[0],
        data={"flow": flow_id, "login": sbx.second_user, "passwd": sbx.user_password, "decision": "accept"},
        allow_redirects=False,
        timeout=10,
    )
    assert answer.status_code == 302
    location = urlsplit(answer.headers["location"])
    assert f"http://{location.netloc}{location.path}" == REDIRECT_URI
    params = {k: v[0] for k, v in parse_qs(location.query).items()}
    result = app.acquire_token_by_auth_code_flow(flow, params)
    assert "access_token" in result, result.get("error_description")
    assert result["id_token_claims"]["preferred_username"] == sbx.second_user
    assert result["refresh_token"].startswith("1.A")
    assert app.get_accounts()[0]["username"] == sbx.second_user


def test_declined_consent_redirects_with_access_denied(o365_sandbox, o365_admin):
    sbx = o365_sandbox
    app = msal_app(sbx)
    flow = app.initiate_auth_code_flow(SCOPES, redirect_uri=REDIRECT_URI, prompt="consent")
    session = tls_session(sbx.ca_file)
    page = session.get(flow["auth_uri"], timeout=10)
    flow_id = re.search(r'name="flow" value="([^"]+)"', page.text).group(1)
    answer = session.post(
        flow["auth_uri"].split("?")[0], data={"flow": flow_id, "decision": "cancel"}, allow_redirects=False, timeout=10
    )
    params = {k: v[0] for k, v in parse_qs(urlsplit(answer.headers["location"]).query).items()}
    assert params["error"] == "access_denied" and params["error_description"].startswith("AADSTS65004")
    assert params["state"] == flow["state"]


def test_unregistered_redirect_uri_is_never_redirected_to(o365_sandbox):
    sbx = o365_sandbox
    response = tls_session(sbx.ca_file).get(
        f"{sbx.authority}/oauth2/v2.0/authorize",
        params={
            "client_id": sbx.client_id,
            "response_type": "code",
            "redirect_uri": "https://evil.example/cb",
            "scope": DELEGATED_SCOPES,
        },
        allow_redirects=False,
        timeout=10,
    )
    assert response.status_code == 400 and "AADSTS50011" in response.text


def test_refresh_rotates_and_old_token_stays_valid(o365_sandbox, o365_admin):
    sbx = o365_sandbox
    rt1 = fresh_rt(sbx, o365_admin)
    r1 = msal_app(sbx).acquire_token_by_refresh_token(rt1, SCOPES)
    assert r1["refresh_token"] != rt1
    r_old = msal_app(sbx).acquire_token_by_refresh_token(rt1, SCOPES)
    assert "access_token" in r_old, "Microsoft does not revoke a rotated refresh token"


def test_strict_rotation_reuse_revokes_the_grant(o365_sandbox, o365_admin):
    sbx = o365_sandbox
    o365_admin.update_settings(strict_rotation=True)
    rt1 = fresh_rt(sbx, o365_admin)
    rt2 = token_post(sbx, grant_type="refresh_token", refresh_token=rt1, scope=DELEGATED_SCOPES).json()["refresh_token"]
    reuse = token_post(sbx, grant_type="refresh_token", refresh_token=rt1, scope=DELEGATED_SCOPES)
    assert reuse.status_code == 400 and reuse.json()["error"] == "invalid_grant"
    after = token_post(sbx, grant_type="refresh_token", refresh_token=rt2, scope=DELEGATED_SCOPES)
    assert after.status_code == 400, "the newer token dies with the grant"


def test_client_credentials(o365_sandbox):
    sbx = o365_sandbox
    app = msal_app(sbx, sbx.app_client_id, sbx.app_client_secret)
    result = app.acquire_token_for_client(["https://outlook.office365.com/.default"])
    assert "access_token" in result, result.get("error_description")
    import jwt

    claims = jwt.decode(result["access_token"], options={"verify_signature": False})
    assert claims["aud"] == "https://outlook.office365.com" and "IMAP.AccessAsApp" in claims["roles"]


def test_access_token_shape(o365_sandbox, o365_admin):
    import jwt

    sbx = o365_sandbox
    result = msal_app(sbx).acquire_token_by_refresh_token(fresh_rt(sbx, o365_admin), SCOPES)
    header = jwt.get_unverified_header(result["access_token"])
    claims = jwt.decode(result["access_token"], options={"verify_signature": False})
    assert header["alg"] == "RS256" and header["typ"] == "JWT"
    assert claims["aud"] == "https://outlook.office.com" and claims["tid"] == sbx.tenant_id
    assert set(claims["scp"].split()) == {"IMAP.AccessAsUser.All", "SMTP.Send"}
    assert claims["upn"] == claims["preferred_username"] == sbx.user
    assert 3600 <= claims["exp"] - claims["iat"] <= 5400


# ---------------------------------------------------------------- every listed AADSTS error
def _code_twice(sbx, admin):
    admin.consent(sbx.user, sbx.client_id, DELEGATED_SCOPES)
    code, verifier = admin.authorize_silently(
        client_id=sbx.client_id, upn=sbx.user, scope=DELEGATED_SCOPES, redirect_uri=REDIRECT_URI
    )
    form = dict(
        grant_type="authorization_code",
        code=code,
        redirect_uri=REDIRECT_URI,
        code_verifier=verifier,
        scope=DELEGATED_SCOPES,
    )
    assert token_post(sbx, **form).status_code == 200
    return token_post(sbx, **form)


def _expired_code(sbx, admin):
    admin.consent(sbx.user, sbx.client_id, DELEGATED_SCOPES)
    code, verifier = admin.authorize_silently(
        client_id=sbx.client_id, upn=sbx.user, scope=DELEGATED_SCOPES, redirect_uri=REDIRECT_URI
    )
    admin.update_settings(clock_offset=601)
    return token_post(
        sbx,
        grant_type="authorization_code",
        code=code,
        redirect_uri=REDIRECT_URI,
        code_verifier=verifier,
        scope=DELEGATED_SCOPES,
    )


def _refresh_after(action):
    def run(sbx, admin):
        rt = fresh_rt(sbx, admin)
        action(sbx, admin)
        return token_post(sbx, grant_type="refresh_token", refresh_token=rt, scope=DELEGATED_SCOPES)

    return run


def _wrong_secret(sbx, admin):
    return token_post(
        sbx,
        client_secret="not-the-secret",
        grant_type="refresh_token",
        refresh_token=fresh_rt(sbx, admin),
        scope=DELEGATED_SCOPES,
    )


CASES = {
    700082: (_refresh_after(lambda s, a: a.update_settings(clock_offset=91 * 86400)), "invalid_grant"),
    70008: (_expired_code, "invalid_grant"),
    50173: (_refresh_after(lambda s, a: a.revoke_sessions(s.user)), "invalid_grant"),
    65001: (_refresh_after(lambda s, a: a.revoke_consent(s.user, s.client_id)), "invalid_grant"),
    7000215: (_wrong_secret, "invalid_client"),
    50076: (_refresh_after(lambda s, a: a.update_user(s.user, mfa_required=True)), "invalid_grant"),
    53003: (_refresh_after(lambda s, a: a.update_user(s.user, blocked_by_conditional_access=True)), "invalid_grant"),
    70043: (
        _refresh_after(
            lambda s, a: (a.update_user(s.user, sign_in_frequency=1800), a.update_settings(clock_offset=3600))
        ),
        "invalid_grant",
    ),
    50078: (
        _refresh_after(
            lambda s, a: (
                a.update_user(s.user, mfa_required=True, mfa_required_since=0, mfa_max_age=1800),
                a.update_settings(clock_offset=3600),
            )
        ),
        "invalid_grant",
    ),
    50079: (_refresh_after(lambda s, a: a.update_user(s.user, mfa_registration_required=True)), "invalid_grant"),
    70000: (
        lambda s, a: token_post(s, grant_type="refresh_token", refresh_token="1.Agarbage", scope=DELEGATED_SCOPES),
        "invalid_grant",
    ),
    54005: (_code_twice, "invalid_grant"),
    900144: (
        lambda s, a: (
            a.update_settings(refresh_requires_scope=True),
            token_post(s, grant_type="refresh_token", refresh_token=fresh_rt(s, a)),
        )[1],
        "invalid_request",
    ),
}


@pytest.mark.parametrize("code", sorted(CASES))
def test_aadsts_errors_in_microsofts_shape(o365_sandbox, o365_admin, code):
    produce, error = CASES[code]
    response = produce(o365_sandbox, o365_admin)
    assert response.status_code == (401 if error == "invalid_client" else 400)
    body = response.json()
    assert body["error"] == error
    assert body["error_description"].startswith(f"AADSTS{code}: ")
    assert body["error_codes"] == [code]
    for key in ("timestamp", "trace_id", "correlation_id"):
        assert body[key]
    if code in (65001,):
        assert body["suberror"] == "consent_required"
    if code in (700082, 50173, 70043):
        assert body["suberror"] == "bad_token"
    if code in (50076, 50078, 50079):
        assert body["suberror"] == "basic_action"


def test_aadsts7000222_expired_secret(o365_sandbox, o365_admin):
    sbx = o365_sandbox
    admin = o365_admin
    # A second app secret that we expire; the sandbox's own secret is left alone.
    secret = admin.add_secret(sbx.app_client_id, lifetime_days=-1)
    try:
        response = token_post(
            sbx,
            client_id=sbx.app_client_id,
            client_secret=secret["value"],
            grant_type="client_credentials",
            scope="https://outlook.office365.com/.default",
        )
    finally:
        admin.remove_secret(sbx.app_client_id, secret["secret_id"])
    assert response.status_code == 401
    body = response.json()
    assert body["error"] == "invalid_client" and body["error_codes"] == [7000222]
    assert body["error_description"].startswith("AADSTS7000222: ")


def test_injected_faults_and_counters(o365_sandbox, o365_admin):
    sbx = o365_sandbox
    o365_admin.reset_counters()
    o365_admin.add_fault(status=429, count=1, retry_after=7)
    o365_admin.add_fault(status=503, count=1)
    first = token_post(sbx, grant_type="refresh_token", refresh_token="x", scope=DELEGATED_SCOPES)
    second = token_post(sbx, grant_type="refresh_token", refresh_token="x", scope=DELEGATED_SCOPES)
    assert (first.status_code, first.headers["Retry-After"]) == (429, "7")
    assert second.status_code == 503
    o365_admin.add_fault(status=200, delay=0.5)
    started = time.monotonic()
    token_post(sbx, grant_type="refresh_token", refresh_token="x", scope=DELEGATED_SCOPES)
    assert time.monotonic() - started >= 0.5
    assert o365_admin.counters()["token:refresh_token"] == 3


# ---------------------------------------------------------------- loopback redirect URIs, non-MSAL clients
@pytest.mark.parametrize(
    ("registered", "requested", "matches"),
    [
        ("http://localhost/cb", "http://localhost:50123/cb", True),
        ("http://localhost:8080/cb", "http://localhost:50123/cb", True),
        ("http://127.0.0.1/cb", "http://127.0.0.1:50123/cb", True),
        ("http://127.0.0.1:9/cb", "http://127.0.0.1/cb", True),
        ("http://127.0.0.1/cb", "http://127.0.0.1:50123/other", False),
        ("http://127.0.0.1/cb", "http://127.0.0.1:50123/cb?x=1", False),
        ("http://localhost/cb", "http://127.0.0.1:50123/cb", False),
        ("http://127.0.0.1/cb", "http://localhost:50123/cb", False),
        ("http://127.0.0.1/cb", "https://127.0.0.1:50123/cb", False),
        ("https://app.example/cb", "https://app.example:8443/cb", False),
        ("http://localhost/cb", "http://localhost:notaport/cb", False),
        ("http://localhost/cb", "http://localhost.evil.example:80/cb", False),
    ],
)
def test_loopback_redirect_uris_ignore_the_port_only(registered, requested, matches):
    from airflow_provider_o365mail.testing.entra.directory import App, redirect_uri_registered

    app = App(client_id="c", name="n", redirect_uris=[registered], delegated_permissions={}, secrets=[])
    assert redirect_uri_registered(app, requested) is matches


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def test_plain_http_client_auth_code_pkce_then_refresh_without_scope(o365_sandbox, o365_admin):
    """What email-oauth2-proxy does with ``requests``/urllib, no MSAL: a loopback redirect on an
    ephemeral port, PKCE S256, then refreshes that send no ``scope`` at all."""
    sbx = o365_sandbox
    o365_admin.add_redirect_uri(sbx.client_id, "http://127.0.0.1/emailproxy")
    session = tls_session(sbx.ca_file)
    redirect_uri = "http://127.0.0.1:49152/emailproxy"  # registered without a port
    scope = "https://outlook.office.com/IMAP.AccessAsUser.All https://outlook.office.com/SMTP.Send offline_access"
    verifier, challenge = _pkce()
    state = secrets.token_urlsafe(16)
    auth_uri = f"{sbx.authority}/oauth2/v2.0/authorize?" + urlencode(
        {
            "client_id": sbx.client_id,
            "response_type": "code",
            "redirect_uri": redirect_uri,
            "scope": scope,
            "state": state,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "login_hint": sbx.second_user,
            "prompt": "consent",
        }
    )
    location = o365_admin.sign_in(auth_uri, login=sbx.second_user, password=sbx.user_password)
    assert location.startswith(redirect_uri + "?"), "redirected to the port the client listens on"
    params = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
    assert params["state"] == state and "error" not in params
    token_url = f"{sbx.authority}/oauth2/v2.0/token"
    client = {"client_id": sbx.client_id, "client_secret": sbx.client_secret}
    wrong_verifier = session.post(
        token_url,
        data={**client, "grant_type": "authorization_code", "code": params["code"], "redirect_uri": redirect_uri,
              "code_verifier": _pkce()[0]},
        timeout=30,
    )  # fmt: skip
    assert wrong_verifier.status_code == 400, "PKCE is checked"
    # Entra may burn a code on a failed redemption: sign in again for a fresh one.
    location = o365_admin.sign_in(auth_uri, login=sbx.second_user, password=sbx.user_password)
    code = parse_qs(urlsplit(location).query)["code"][0]
    first = session.post(
        token_url,
        data={**client, "grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
              "code_verifier": verifier},
        timeout=30,
    )  # fmt: skip
    assert first.status_code == 200, first.text
    granted = set(first.json()["scope"].split())
    assert granted == {"https://outlook.office.com/IMAP.AccessAsUser.All", "https://outlook.office.com/SMTP.Send"}

    refresh_token = first.json()["refresh_token"]
    for _ in range(2):  # the rotated token, too, remembers what was granted
        refreshed = session.post(
            token_url, data={**client, "grant_type": "refresh_token", "refresh_token": refresh_token}, timeout=30
        )
        assert refreshed.status_code == 200, refreshed.text
        body = refreshed.json()
        assert set(body["scope"].split()) == granted
        assert body["refresh_token"] != refresh_token
        refresh_token = body["refresh_token"]
    # The access token from a scope-less refresh opens the mailbox (Exchange checks scp).
    context = ssl.create_default_context(cafile=sbx.ca_file)
    imap = imaplib.IMAP4_SSL("127.0.0.1", sbx.imap_port, ssl_context=context, timeout=15)
    auth = f"user={sbx.second_user}\x01auth=Bearer {body['access_token']}\x01\x01".encode()
    try:
        assert imap.authenticate("XOAUTH2", lambda _: auth)[0] == "OK"
    finally:
        imap.logout()

    # Opt-in strictness: the v2 endpoint's documented "scope is required".
    o365_admin.update_settings(refresh_requires_scope=True)
    strict = session.post(
        token_url, data={**client, "grant_type": "refresh_token", "refresh_token": refresh_token}, timeout=30
    )
    assert strict.status_code == 400 and strict.json()["error_codes"] == [900144]


def test_loopback_redirect_on_any_port_through_the_authorize_endpoint(o365_sandbox):
    """The sandbox registers ``http://localhost/o365mail/callback``: any port is fine, another host is not."""
    sbx = o365_sandbox
    session = tls_session(sbx.ca_file)

    def authorize(redirect_uri):
        return session.get(
            f"{sbx.authority}/oauth2/v2.0/authorize",
            params={"client_id": sbx.client_id, "response_type": "code", "redirect_uri": redirect_uri,
                    "scope": DELEGATED_SCOPES, "prompt": "login"},
            allow_redirects=False,
            timeout=10,
        )  # fmt: skip

    assert urlsplit(REDIRECT_URI).port is None
    ok = authorize(REDIRECT_URI.replace("localhost", "localhost:61234"))
    assert ok.status_code == 200 and 'name="flow"' in ok.text
    refused = authorize(REDIRECT_URI.replace("localhost", "127.0.0.2:61234"))
    assert refused.status_code == 400 and "AADSTS50011" in refused.text
