"""Certificate and federated credentials against the sandbox: both grant types, and each refusal Entra gives."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from pathlib import Path

import jwt
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from airflow_provider_o365mail import exceptions as exc
from airflow_provider_o365mail.auth.store import TokenStore
from airflow_provider_o365mail.hooks.o365mail import O365MailHook
from airflow_provider_o365mail.testing.admin import tls_session
from airflow_provider_o365mail.testing.app_credentials import CertificatePair, OidcIssuer, make_certificate
from airflow_provider_o365mail.testing.sandbox import APP_ONLY_SCOPE

SUBJECT = "system:serviceaccount:airflow:worker"


def token_requests(admin) -> int:
    return sum(v for k, v in admin.counters().items() if k.startswith("token:"))


def export(monkeypatch: pytest.MonkeyPatch, login: str | None, extra: dict, password: str | None = None) -> str:
    conn_id = f"o365mail_{uuid.uuid4().hex[:10]}"
    body = {"conn_type": "o365mail", "login": login, "password": password, "extra": extra}
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(body))
    return conn_id


def app_only_extra(sandbox, **overrides: object) -> dict:
    extra = sandbox.connection_extra(grant_type="client_credentials", scopes=APP_ONLY_SCOPE)
    del extra["refresh_token"]
    extra.update(overrides)
    return extra


@pytest.fixture
def certificate(o365_sandbox, o365_admin, tmp_path: Path):
    """A certificate uploaded to both sandbox apps; removed again afterwards."""
    pair = make_certificate("airflow-o365mail-test")
    key_path, cert_path = pair.write(tmp_path)
    for client_id in (o365_sandbox.client_id, o365_sandbox.app_client_id):
        o365_admin.add_certificate(client_id, pair.certificate_pem)
    yield pair, key_path, cert_path
    for client_id in (o365_sandbox.client_id, o365_sandbox.app_client_id):
        o365_admin.clear_certificates(client_id)


@pytest.fixture
def issuer(o365_sandbox, o365_admin):
    """An OIDC issuer trusted by both sandbox apps for SUBJECT (as an AKS cluster's issuer would be)."""
    config = json.loads((o365_sandbox.state_dir / "entra.json").read_text())
    with OidcIssuer(config["cert_file"], config["key_file"]) as oidc:
        for client_id in (o365_sandbox.client_id, o365_sandbox.app_client_id):
            o365_admin.add_federated_credential(client_id, issuer=oidc.issuer, subject=SUBJECT)
        yield oidc
    for client_id in (o365_sandbox.client_id, o365_sandbox.app_client_id):
        o365_admin.clear_federated_credentials(client_id)


# --------------------------------------------------------------------------------------- certificate
def test_certificate_app_only_reaches_the_mailbox(o365_sandbox, o365_admin, certificate, monkeypatch):
    _, key_path, cert_path = certificate
    conn_id = export(
        monkeypatch,
        o365_sandbox.app_client_id,
        app_only_extra(o365_sandbox, certificate_path=str(cert_path), certificate_key_path=str(key_path)),
    )
    hook = O365MailHook(conn_id)
    assert hook.access_token().source == "identity_provider"
    with hook.imap_client() as client:
        client.select_folder("INBOX", readonly=True)
    o365_admin.reset_counters()
    assert O365MailHook(conn_id).access_token().source == "store"
    assert token_requests(o365_admin) == 0


def test_certificate_delegated_refresh_rotates_the_grant(o365_sandbox, o365_admin, certificate, monkeypatch):
    pair, _, _ = certificate
    combined = pair.key_pem + pair.certificate_pem  # one PEM with key and certificate, inline
    extra = o365_sandbox.connection_extra(refresh_token=o365_sandbox.new_refresh_token(), certificate=combined)
    conn_id = export(monkeypatch, o365_sandbox.client_id, extra)
    first = O365MailHook(conn_id).access_token()
    assert first.source == "identity_provider"
    second = O365MailHook(conn_id).access_token(force_refresh=True)
    assert second.token != first.token
    assert TokenStore(conn_id).load() is not None
    with O365MailHook(conn_id).smtp_client():
        pass


def test_encrypted_key_needs_its_passphrase(o365_sandbox, o365_admin, tmp_path, monkeypatch):
    pair = make_certificate("encrypted", passphrase="correct horse battery")
    o365_admin.add_certificate(o365_sandbox.app_client_id, pair.certificate_pem)
    try:
        key_path, cert_path = pair.write(tmp_path)
        base = app_only_extra(o365_sandbox, certificate_path=str(cert_path), certificate_key_path=str(key_path))
        good = export(
            monkeypatch, o365_sandbox.app_client_id, {**base, "certificate_passphrase": "correct horse battery"}
        )
        assert O365MailHook(good).access_token().source == "identity_provider"
        wrong = export(monkeypatch, o365_sandbox.app_client_id, {**base, "certificate_passphrase": "wrong horse"})
        with pytest.raises(exc.ConnectionConfigError, match="passphrase is wrong") as info:
            O365MailHook(wrong).access_token()
        assert "wrong horse" not in str(info.value)
        missing = export(monkeypatch, o365_sandbox.app_client_id, base)
        with pytest.raises(exc.ConnectionConfigError, match="encrypted: set certificate_passphrase"):
            O365MailHook(missing).access_token()
    finally:
        o365_admin.clear_certificates(o365_sandbox.app_client_id)


def test_sha1_thumbprint_mode(o365_sandbox, certificate, monkeypatch):
    _, key_path, cert_path = certificate
    extra = app_only_extra(
        o365_sandbox, certificate_path=str(cert_path), certificate_key_path=str(key_path), certificate_sha1="true"
    )
    conn_id = export(monkeypatch, o365_sandbox.app_client_id, extra)
    assert O365MailHook(conn_id).access_token().source == "identity_provider"


def test_unregistered_certificate_is_700027(o365_sandbox, o365_admin, tmp_path, monkeypatch):
    key_path, cert_path = make_certificate("never-uploaded").write(tmp_path)
    extra = app_only_extra(o365_sandbox, certificate_path=str(cert_path), certificate_key_path=str(key_path))
    conn_id = export(monkeypatch, o365_sandbox.app_client_id, extra)
    o365_admin.reset_counters()
    with pytest.raises(exc.ClientCredentialError) as info:
        O365MailHook(conn_id).access_token()
    assert info.value.error_codes == [700027]
    assert "Certificates & secrets" in str(info.value)
    assert token_requests(o365_admin) == 1  # a permanent refusal: not retried


def test_expired_registered_certificate_is_refused(o365_sandbox, o365_admin, tmp_path, monkeypatch):
    import datetime as dt

    old = make_certificate("expired", days=1, not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=3))
    o365_admin.add_certificate(o365_sandbox.app_client_id, old.certificate_pem)
    try:
        key_path, cert_path = old.write(tmp_path)
        extra = app_only_extra(o365_sandbox, certificate_path=str(cert_path), certificate_key_path=str(key_path))
        with pytest.raises(exc.ClientCredentialError) as info:
            O365MailHook(export(monkeypatch, o365_sandbox.app_client_id, extra)).access_token()
        assert info.value.error_codes == [700027]
    finally:
        o365_admin.clear_certificates(o365_sandbox.app_client_id)


def test_key_of_another_certificate_is_caught_before_any_request(
    o365_sandbox, o365_admin, certificate, tmp_path, monkeypatch
):
    _, _, cert_path = certificate
    other_key, _ = make_certificate("other").write(tmp_path / "other")
    extra = app_only_extra(o365_sandbox, certificate_path=str(cert_path), certificate_key_path=str(other_key))
    o365_admin.reset_counters()
    with pytest.raises(exc.ConnectionConfigError, match="does not belong to the certificate"):
        O365MailHook(export(monkeypatch, o365_sandbox.app_client_id, extra)).access_token()
    assert token_requests(o365_admin) == 0


# ----------------------------------------------------------------- the stand-in's checks, one by one
def _x5t_s256(pem: str) -> str:
    der = x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def _assertion(pair: CertificatePair, client_id: str, audience: str, *, key=None, **claims: object) -> str:
    now = int(time.time())
    payload = {
        "aud": audience,
        "iss": client_id,
        "sub": client_id,
        "jti": str(uuid.uuid4()),
        "nbf": now,
        "exp": now + 600,
    }
    payload.update(claims)
    signing_key = key or serialization.load_pem_private_key(pair.key_pem.encode(), None)
    return jwt.encode(payload, signing_key, algorithm="PS256", headers={"x5t#S256": _x5t_s256(pair.certificate_pem)})


def _post(sandbox, assertion: str, client_id: str) -> requests.Response:
    session = tls_session(sandbox.ca_file)
    return session.post(
        f"{sandbox.authority}/oauth2/v2.0/token",
        data={
            "grant_type": "client_credentials",
            "client_id": client_id,
            "scope": APP_ONLY_SCOPE,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion,
        },
        timeout=30,
    )


def test_stand_in_accepts_a_well_formed_assertion_once(o365_sandbox, o365_admin, certificate):
    pair, _, _ = certificate
    client_id, aud = o365_sandbox.app_client_id, f"{o365_sandbox.authority}/oauth2/v2.0/token"
    assertion = _assertion(pair, client_id, aud)
    assert _post(o365_sandbox, assertion, client_id).status_code == 200
    replay = _post(o365_sandbox, assertion, client_id)
    assert (replay.status_code, replay.json()["error_codes"]) == (401, [50013])
    o365_admin.update_settings(reject_replayed_assertions=False)
    try:
        assert _post(o365_sandbox, assertion, client_id).status_code == 200
    finally:
        o365_admin.update_settings(reject_replayed_assertions=True)


@pytest.mark.parametrize(
    ("claims", "code"),
    [
        pytest.param({"aud": "https://login.microsoftonline.com/other/oauth2/v2.0/token"}, 50012, id="audience"),
        pytest.param({"aud": "{authority}/v2.0"}, 50012, id="audience-issuer-not-token-endpoint"),
        pytest.param({"iss": "someone-else", "sub": "someone-else"}, 50027, id="issuer-not-client"),
        pytest.param({"sub": "someone-else"}, 50048, id="subject-not-issuer"),
        pytest.param({"exp": int(time.time()) - 3600, "nbf": int(time.time()) - 4000}, 700024, id="expired"),
        pytest.param({"nbf": int(time.time()) + 3600, "exp": int(time.time()) + 4000}, 700024, id="not-yet-valid"),
        pytest.param({"jti": None}, 50027, id="no-jti"),
    ],
)
def test_stand_in_refuses_assertions_as_entra_does(o365_sandbox, certificate, claims, code):
    pair, _, _ = certificate
    client_id = o365_sandbox.app_client_id
    claims = {k: (v.format(authority=o365_sandbox.authority) if isinstance(v, str) else v) for k, v in claims.items()}
    response = _post(
        o365_sandbox, _assertion(pair, client_id, f"{o365_sandbox.authority}/oauth2/v2.0/token", **claims), client_id
    )
    body = response.json()
    assert (response.status_code, body["error"], body["error_codes"]) == (401, "invalid_client", [code])
    assert body["error_description"].startswith(f"AADSTS{code}: ")
    assert {"trace_id", "correlation_id", "timestamp", "error_uri"} <= set(body)


def test_stand_in_refuses_a_signature_by_another_key(o365_sandbox, certificate):
    pair, _, _ = certificate
    client_id = o365_sandbox.app_client_id
    intruder = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assertion = _assertion(pair, client_id, f"{o365_sandbox.authority}/oauth2/v2.0/token", key=intruder)
    response = _post(o365_sandbox, assertion, client_id)
    assert response.json()["error_codes"] == [700027]
    assert "failed signature validation" in response.json()["error_description"]


# ----------------------------------------------------------------------------------------- federated
def test_federated_app_only_reads_the_file_on_every_request(o365_sandbox, o365_admin, issuer, tmp_path, monkeypatch):
    token_file = tmp_path / "azure-identity-token"
    issuer.write_token_file(token_file, SUBJECT)
    conn_id = export(
        monkeypatch, o365_sandbox.app_client_id, app_only_extra(o365_sandbox, federated_assertion_file=str(token_file))
    )
    hook = O365MailHook(conn_id)
    assert hook.access_token().source == "identity_provider"
    with hook.imap_client() as client:
        client.select_folder("INBOX", readonly=True)
    # The file rotates: the next request must present what is in it now (a wrong subject proves it).
    issuer.write_token_file(token_file, "system:serviceaccount:other:intruder")
    with pytest.raises(exc.ClientCredentialError) as info:
        O365MailHook(conn_id).access_token(force_refresh=True)
    assert info.value.error_codes == [700213]
    issuer.write_token_file(token_file, SUBJECT)
    assert O365MailHook(conn_id).access_token(force_refresh=True).source == "identity_provider"
    o365_admin.reset_counters()
    assert O365MailHook(conn_id).access_token().source == "store"
    assert token_requests(o365_admin) == 0


def test_federated_delegated_refresh(o365_sandbox, issuer, tmp_path, monkeypatch):
    token_file = tmp_path / "token"
    first_token = issuer.write_token_file(token_file, SUBJECT)
    extra = o365_sandbox.connection_extra(
        refresh_token=o365_sandbox.new_refresh_token(), federated_assertion_file=str(token_file)
    )
    conn_id = export(monkeypatch, o365_sandbox.client_id, extra)
    first = O365MailHook(conn_id).access_token()
    second_token = issuer.write_token_file(token_file, SUBJECT)
    assert second_token != first_token
    second = O365MailHook(conn_id).access_token(force_refresh=True)
    assert first.source == second.source == "identity_provider" and first.token != second.token
    with O365MailHook(conn_id).smtp_client():
        pass


def test_federated_from_the_aks_environment(o365_sandbox, issuer, tmp_path, monkeypatch):
    token_file = tmp_path / "projected"
    issuer.write_token_file(token_file, SUBJECT)
    monkeypatch.setenv("AZURE_CLIENT_ID", o365_sandbox.app_client_id)
    monkeypatch.setenv("AZURE_FEDERATED_TOKEN_FILE", str(token_file))
    conn_id = export(monkeypatch, None, app_only_extra(o365_sandbox))  # no Client ID, no secret, no path
    hook = O365MailHook(conn_id)
    assert hook.settings.credential_type == "federated"
    assert hook.access_token().source == "identity_provider"


@pytest.mark.parametrize(
    ("mint", "code"),
    [
        pytest.param({"issuer": "https://issuer.example/unknown"}, 700211, id="issuer"),
        pytest.param({"audience": "api://SomethingElse"}, 700212, id="audience"),
        pytest.param({"subject": "system:serviceaccount:airflow:other"}, 700213, id="subject"),
        pytest.param({"issued_at": time.time() - 7200, "lifetime": 3600}, 700024, id="expired"),
        pytest.param({"signing_key": "intruder"}, 50027, id="signature"),
    ],
)
def test_federated_refusals(o365_sandbox, o365_admin, issuer, tmp_path, monkeypatch, mint, code):
    mint = dict(mint)
    if mint.get("signing_key") == "intruder":
        mint["signing_key"] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token_file = tmp_path / "token"
    issuer.write_token_file(token_file, mint.pop("subject", SUBJECT), **mint)
    conn_id = export(
        monkeypatch, o365_sandbox.app_client_id, app_only_extra(o365_sandbox, federated_assertion_file=str(token_file))
    )
    o365_admin.reset_counters()
    with pytest.raises(exc.ClientCredentialError) as info:
        O365MailHook(conn_id).access_token()
    assert info.value.error_codes == [code]
    assert token_requests(o365_admin) == 1
    assert token_file.read_text() not in str(info.value)


def test_missing_token_file_names_the_fix(o365_sandbox, tmp_path, monkeypatch):
    extra = app_only_extra(o365_sandbox, federated_assertion_file=str(tmp_path / "absent"))
    with pytest.raises(exc.ConnectionConfigError, match="cannot read the federated token file"):
        O365MailHook(export(monkeypatch, o365_sandbox.app_client_id, extra)).access_token()
