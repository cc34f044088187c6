from __future__ import annotations

import json

import pytest
from airflow.sdk import Connection

from airflow_provider_o365mail.connection import normalise_authority, settings_from_connection, settings_from_fields
from airflow_provider_o365mail.exceptions import ConnectionConfigError

TENANT = "11111111-2222-3333-4444-555555555555"
BASE = {"tenant_id": TENANT, "mailbox": "reports@contoso.com"}


@pytest.mark.parametrize(
    "value",
    [
        f"https://login.microsoftonline.com/{TENANT}",
        f"https://login.microsoftonline.com/{TENANT}/",
        f"https://login.microsoftonline.com/{TENANT}/v2.0",
        f"https://login.microsoftonline.com/{TENANT}/oauth2/v2.0/authorize",
        f"https://login.microsoftonline.com/{TENANT}/oauth2/v2.0/token",
    ],
)
def test_authority_and_v2_endpoints_normalise_to_the_authority(value):
    assert normalise_authority(value) == (f"https://login.microsoftonline.com/{TENANT}", TENANT)


@pytest.mark.parametrize("endpoint", ["authorize", "token"])
def test_v1_endpoints_are_refused_with_the_v2_hint(endpoint):
    with pytest.raises(ConnectionConfigError, match=r"V1 endpoint.*oauth2/v2\.0"):
        normalise_authority(f"https://login.microsoftonline.com/{TENANT}/oauth2/{endpoint}")


@pytest.mark.parametrize("value", ["http://login.microsoftonline.com/x", "login.microsoftonline.com/x", "https://h/"])
def test_non_https_or_tenantless_authority_is_refused(value):
    with pytest.raises(ConnectionConfigError):
        normalise_authority(value)


def test_any_host_is_allowed_for_sovereign_clouds_and_the_sandbox():
    assert normalise_authority("https://127.0.0.1:8443/t1/oauth2/v2.0/token") == ("https://127.0.0.1:8443/t1", "t1")


def test_defaults_for_the_global_cloud():
    s = settings_from_fields("c", "client", "secret", dict(BASE))
    assert s.authority == f"https://login.microsoftonline.com/{TENANT}"
    assert s.scopes == (
        "https://outlook.office.com/IMAP.AccessAsUser.All",
        "https://outlook.office.com/SMTP.Send",
    )
    assert (s.imap_host, s.imap_port, s.smtp_host, s.smtp_port) == (
        "outlook.office365.com",
        993,
        "smtp.office365.com",
        587,
    )
    assert s.is_microsoft_authority and s.delegated


def test_usgov_cloud_preset():
    s = settings_from_fields("c", "client", "secret", {**BASE, "cloud": "usgov"})
    assert s.authority.startswith("https://login.microsoftonline.us/")
    assert s.imap_host == "outlook.office365.us"
    assert s.scopes[0].startswith("https://outlook.office365.us/")


def test_client_credentials_defaults_and_checks():
    s = settings_from_fields("c", "client", "secret", {**BASE, "grant_type": "client_credentials"})
    assert s.scopes == ("https://outlook.office365.com/.default",)
    with pytest.raises(ConnectionConfigError, match="tenant-specific"):
        settings_from_fields(
            "c", "client", "secret", {"tenant_id": "common", "mailbox": "a@b", "grant_type": "client_credentials"}
        )
    with pytest.raises(ConnectionConfigError, match="/.default"):
        settings_from_fields(
            "c",
            "client",
            "secret",
            {**BASE, "grant_type": "client_credentials", "scopes": "https://outlook.office.com/SMTP.Send"},
        )


def test_a_public_client_has_no_credential_and_acts_only_for_a_user():
    s = settings_from_fields("c", "client", "", {**BASE, "credential_type": "public_client"})
    assert s.public_client and s.delegated and not s.client_secret
    with pytest.raises(ConnectionConfigError, match="also has a client secret"):
        settings_from_fields("c", "client", "secret", {**BASE, "credential_type": "public_client"})
    with pytest.raises(ConnectionConfigError, match="need a confidential client"):
        settings_from_fields(
            "c", "client", "", {**BASE, "credential_type": "public_client", "grant_type": "client_credentials"}
        )
    with pytest.raises(ConnectionConfigError, match="public_client"):  # no secret at all: the hint names it
        settings_from_fields("c", "client", "", dict(BASE))


def test_reserved_scopes_are_dropped_because_msal_adds_them():
    s = settings_from_fields(
        "c", "client", "secret", {**BASE, "scopes": "offline_access openid https://outlook.office.com/SMTP.Send"}
    )
    assert s.scopes == ("https://outlook.office.com/SMTP.Send",)


def test_tenant_mismatch_between_tenant_id_and_authority():
    with pytest.raises(ConnectionConfigError, match="differs"):
        settings_from_fields(
            "c", "client", "secret", {**BASE, "authority": "https://login.microsoftonline.com/other/oauth2/v2.0/token"}
        )


@pytest.mark.parametrize(
    ("login", "password", "extra", "message"),
    [
        ("", "s", BASE, "Client ID"),
        ("c", "", BASE, "Client secret"),
        ("c", "s", {"mailbox": "a@b"}, "tenant_id"),
        ("c", "s", {"tenant_id": TENANT}, "mailbox"),
        ("c", "s", {**BASE, "grant_type": "password"}, "grant_type"),
        ("c", "s", {**BASE, "imap_port": "nine"}, "imap_port"),
    ],
)
def test_missing_or_bad_fields_name_the_field(login, password, extra, message):
    with pytest.raises(ConnectionConfigError, match=message):
        settings_from_fields("c", login, password, extra)


def test_secrets_stay_out_of_repr():
    s = settings_from_fields("c", "client", "s3cr3t-value", {**BASE, "refresh_token": "rt-value-123"})
    assert "s3cr3t-value" not in repr(s) and "rt-value-123" not in repr(s)


def test_connection_from_uri_with_string_extras(monkeypatch):
    uri = (
        "o365mail://client-id:the%2Fsecret@/?tenant_id="
        + TENANT
        + "&mailbox=reports%40contoso.com&imap_port=1993&timeout=12.5"
    )
    monkeypatch.setenv("AIRFLOW_CONN_O365_URI", uri)
    s = settings_from_connection(Connection.get("o365_uri"))
    assert (s.client_id, s.client_secret, s.imap_port, s.timeout) == ("client-id", "the/secret", 1993, 12.5)
    assert s.mailbox == "reports@contoso.com"


def test_connection_from_json(monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_O365_JSON",
        json.dumps({"conn_type": "o365mail", "login": "cid", "password": "sec", "extra": {**BASE, "smtp_port": 2587}}),
    )
    s = settings_from_connection(Connection.get("o365_json"))
    assert s.smtp_port == 2587 and s.tenant_id == TENANT
