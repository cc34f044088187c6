"""Certificate and federated credentials without a network: settings, MSAL's credential forms, masking."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from airflow_provider_o365mail.auth import masking
from airflow_provider_o365mail.auth.credential import (
    FederatedTokenFile,
    certificate_info,
    client_credential,
    load_certificate,
)
from airflow_provider_o365mail.connection import settings_from_fields
from airflow_provider_o365mail.exceptions import ConnectionConfigError
from airflow_provider_o365mail.testing.app_credentials import make_certificate

BASE = {"tenant_id": "contoso.onmicrosoft.com", "mailbox": "reports@contoso.com"}


def settings(login="client-id", password=None, environ=None, **extra):
    return settings_from_fields("c1", login, password, {**BASE, **extra}, environ=environ or {})


@pytest.fixture(scope="module")
def pair():
    return make_certificate("unit-test")


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The forms handed to the maskers."""
    seen: list[str] = []
    monkeypatch.setattr(masking, "_register", lambda forms, until: seen.extend(forms))
    return seen


# ------------------------------------------------------------------------------ settings
@pytest.mark.parametrize(
    ("extra", "password", "expected"),
    [
        pytest.param({}, "s3cret", "client_secret", id="secret"),
        pytest.param({"certificate_path": "/etc/app.pem"}, None, "certificate", id="certificate-path"),
        pytest.param({"certificate": "-----BEGIN CERTIFICATE-----"}, None, "certificate", id="certificate-inline"),
        pytest.param({"federated_assertion_file": "/var/run/token"}, None, "federated", id="federated"),
    ],
)
def test_credential_type_follows_the_fields(extra, password, expected):
    assert settings(password=password, **extra).credential_type == expected


def test_federated_from_the_aks_variables_when_nothing_else_is_set():
    env = {
        "AZURE_CLIENT_ID": "env-client",
        "AZURE_TENANT_ID": "env-tenant",
        "AZURE_FEDERATED_TOKEN_FILE": "/var/run/secrets/azure/tokens/azure-identity-token",
    }
    s = settings_from_fields("c1", None, None, {"mailbox": "a@b.c"}, environ=env)
    assert (s.credential_type, s.client_id, s.tenant_id) == ("federated", "env-client", "env-tenant")
    assert s.federated_assertion_file == env["AZURE_FEDERATED_TOKEN_FILE"]
    assert s.client_secret == ""


def test_the_connection_wins_over_the_environment():
    env = {"AZURE_CLIENT_ID": "env", "AZURE_TENANT_ID": "env", "AZURE_FEDERATED_TOKEN_FILE": "/env"}
    s = settings(login="conn", environ=env, federated_assertion_file="/conn")
    assert (s.client_id, s.tenant_id, s.federated_assertion_file) == ("conn", BASE["tenant_id"], "/conn")
    # a secret in the connection is used, the environment's federated file is not
    assert settings(password="s3cret", environ=env).credential_type == "client_secret"


@pytest.mark.parametrize(
    ("extra", "password", "message"),
    [
        pytest.param({"credential_type": "kerberos"}, None, "credential_type must be one of", id="unknown-type"),
        pytest.param({"credential_type": "certificate"}, None, "needs the certificate", id="certificate-missing"),
        pytest.param({"certificate_path": "/a.pem"}, "s3cret", "also has a client secret", id="cert-and-secret"),
        pytest.param({"credential_type": "federated"}, None, "needs the token file", id="federated-no-file"),
        pytest.param(
            {"federated_assertion_file": "/t", "credential_type": "federated"}, "x", "stores none", id="fed-secret"
        ),
        pytest.param({"certificate_path": "/a.pem", "certificate_sha1": "maybe"}, None, "true or false", id="flag"),
        pytest.param({}, None, r"Client secret \(password\) is empty", id="nothing"),
    ],
)
def test_invalid_credential_settings_name_the_fix(extra, password, message):
    with pytest.raises(ConnectionConfigError, match=message):
        settings(password=password, **extra)


def test_secrets_stay_out_of_repr(pair):
    s = settings(certificate=pair.certificate_pem, certificate_private_key=pair.key_pem, certificate_passphrase="pp")
    text = repr(s)
    assert "PRIVATE KEY" not in text and "'pp'" not in text and "BEGIN CERTIFICATE" not in text


# --------------------------------------------------------------------------- certificate
def test_certificate_form_for_msal(pair, tmp_path, registered):
    key_path, cert_path = pair.write(tmp_path)
    credential = client_credential(settings(certificate_path=str(cert_path), certificate_key_path=str(key_path)))
    assert isinstance(credential, dict)
    assert set(credential) == {"private_key", "public_certificate"}
    assert credential["private_key"].strip() == pair.key_pem.strip()
    assert "BEGIN CERTIFICATE" in credential["public_certificate"]
    assert pair.key_pem.strip() in registered  # masked before MSAL sees it
    body = "".join(line for line in pair.key_pem.splitlines() if not line.startswith("-----"))
    assert body in registered


def test_sha1_form_and_passphrase(tmp_path, registered):
    encrypted = make_certificate("enc", passphrase="open sesame")
    key_path, cert_path = encrypted.write(tmp_path)
    s = settings(
        certificate_path=str(cert_path),
        certificate_key_path=str(key_path),
        certificate_passphrase="open sesame",
        certificate_sha1="true",
    )
    credential = client_credential(s)
    leaf = x509.load_pem_x509_certificate(encrypted.certificate_pem.encode())
    assert credential["thumbprint"] == leaf.fingerprint(hashes_sha1()).hex()
    assert credential["passphrase"] == "open sesame"
    assert "open sesame" in registered


def hashes_sha1():
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA1()


def test_one_pem_with_key_and_chain(pair):
    other = make_certificate("intermediate")
    combined = pair.key_pem + pair.certificate_pem + other.certificate_pem
    material = load_certificate(settings(certificate=combined))
    assert material.leaf.subject.rfc4514_string() == "CN=unit-test"
    assert material.certificates_pem.count("BEGIN CERTIFICATE") == 2
    assert "PRIVATE KEY" not in material.certificates_pem


def test_inline_pem_with_escaped_newlines(pair):
    one_line = (pair.key_pem + pair.certificate_pem).replace("\n", "\\n")
    assert load_certificate(settings(certificate=one_line)).leaf.subject.rfc4514_string() == "CN=unit-test"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"certificate_path": "/nonexistent/app.pem"}, "cannot read the certificate file", id="no-file"),
        pytest.param({"certificate": "not a pem"}, "holds no '-----BEGIN CERTIFICATE-----'", id="no-cert"),
    ],
)
def test_unreadable_certificates(kwargs, message):
    with pytest.raises(ConnectionConfigError, match=message):
        load_certificate(settings(**kwargs))


def test_key_missing_wrong_or_encrypted(pair):
    with pytest.raises(ConnectionConfigError, match="no private key found"):
        load_certificate(settings(certificate=pair.certificate_pem))
    other = make_certificate("other")
    with pytest.raises(ConnectionConfigError, match="does not belong to the certificate"):
        load_certificate(settings(certificate=pair.certificate_pem, certificate_private_key=other.key_pem))
    encrypted = make_certificate("enc", passphrase="right")
    both = encrypted.key_pem + encrypted.certificate_pem
    with pytest.raises(ConnectionConfigError, match="is encrypted: set certificate_passphrase"):
        load_certificate(settings(certificate=both))
    with pytest.raises(ConnectionConfigError, match="passphrase is wrong") as info:
        load_certificate(settings(certificate=both, certificate_passphrase="wrong"))
    assert "wrong" not in str(info.value).replace("passphrase is wrong", "")
    with pytest.raises(ConnectionConfigError, match="is not encrypted: remove certificate_passphrase"):
        load_certificate(settings(certificate=pair.key_pem + pair.certificate_pem, certificate_passphrase="x"))


def test_certificate_info_shows_what_entra_shows(pair):
    info = certificate_info(settings(certificate=pair.key_pem + pair.certificate_pem))
    leaf = x509.load_pem_x509_certificate(pair.certificate_pem.encode())
    der = leaf.public_bytes(serialization.Encoding.DER)
    assert info.subject == "CN=unit-test"
    assert info.thumbprint_sha1 == hashlib.sha1(der).hexdigest().upper()
    assert info.x5t_s256 == base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
    assert info.not_after == leaf.not_valid_after_utc
    assert 360 <= info.days_left <= 365


# ----------------------------------------------------------------------------- federated
def test_federated_file_is_read_on_every_call(tmp_path, registered):
    path = tmp_path / "token"
    path.write_text("first.token.value\n")
    s = settings(federated_assertion_file=str(path))
    credential = client_credential(s)
    read = credential["client_assertion"]
    assert isinstance(read, FederatedTokenFile)
    assert read() == "first.token.value"
    path.write_text("second.token.value")
    assert read() == "second.token.value"
    assert {"first.token.value", "second.token.value"} <= set(registered)
    assert "token.value" not in repr(read)


def test_federated_file_missing_or_empty(tmp_path):
    read = FederatedTokenFile(str(tmp_path / "absent"), "c1")
    with pytest.raises(ConnectionConfigError, match="cannot read the federated token file"):
        read()
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(ConnectionConfigError, match="is empty"):
        FederatedTokenFile(str(tmp_path / "empty"), "c1")()


def test_client_secret_stays_a_string():
    assert client_credential(settings(password="s3cret")) == "s3cret"


# -------------------------------------------------------------------------------- doctor
@pytest.mark.parametrize(
    ("days", "age", "status", "words"),
    [
        pytest.param(365, 0, "ok", "valid", id="valid"),
        pytest.param(20, 0, "warn", "expires in 19 day(s)", id="expires-soon"),
        pytest.param(1, 3, "fail", "expired on", id="expired"),
    ],
)
def test_doctor_shows_the_certificate_and_warns_ahead(days, age, status, words):
    import datetime as dt

    from airflow_provider_o365mail.hooks.doctor import _check_credential

    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=age, minutes=5)
    cert = make_certificate("doctor-cn", days=days, not_before=start)
    check = _check_credential(settings(certificate=cert.key_pem + cert.certificate_pem))
    assert (check.link, check.status) == ("certificate", status)
    assert words in check.detail and "CN=doctor-cn" in check.detail
    leaf = x509.load_pem_x509_certificate(cert.certificate_pem.encode())
    assert leaf.fingerprint(hashes_sha1()).hex().upper() in check.detail
    assert "PRIVATE KEY" not in check.detail + check.fix


def test_doctor_shows_the_federated_token_without_it(tmp_path):
    import time

    import jwt

    from airflow_provider_o365mail.hooks.doctor import _check_credential

    path = tmp_path / "token"
    now = int(time.time())
    claims = {"iss": "https://issuer.example", "sub": "system:serviceaccount:a:b", "aud": "api://AzureADTokenExchange"}
    path.write_text(jwt.encode({**claims, "exp": now + 1800}, "k" * 32, algorithm="HS256"))
    check = _check_credential(settings(federated_assertion_file=str(path)))
    assert check.status == "ok" and "system:serviceaccount:a:b" in check.detail
    assert path.read_text() not in check.detail
    path.write_text(jwt.encode({**claims, "exp": now - 60}, "k" * 32, algorithm="HS256"))
    assert _check_credential(settings(federated_assertion_file=str(path))).status == "fail"
    path.write_text(jwt.encode({**claims, "aud": "api://other", "exp": now + 600}, "k" * 32, algorithm="HS256"))
    assert _check_credential(settings(federated_assertion_file=str(path))).status == "warn"
