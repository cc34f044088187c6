"""The device code wait loop with fake MSAL applications: what a flaky identity provider does to it."""

from __future__ import annotations

import time

import msal
import pytest
import requests

from airflow_provider_o365mail.auth import device_code
from airflow_provider_o365mail.auth.device_code import DeviceCodeConsent
from airflow_provider_o365mail.connection import settings_from_fields
from airflow_provider_o365mail.exceptions import AuthorizationError, IdentityProviderUnavailable

SETTINGS = settings_from_fields(
    "c1",
    "client",
    "",
    {
        "tenant_id": "11111111-2222-3333-4444-555555555555",
        "mailbox": "a@contoso.com",
        "credential_type": "public_client",
    },
)
SIGNED_IN = {
    "access_token": "at",
    "refresh_token": "rt",
    "scope": "https://outlook.office.com/SMTP.Send",
    "id_token_claims": {"preferred_username": "a@contoso.com"},
}


class FakeApp:
    def __init__(self, answers: list) -> None:
        self.answers = answers

    def initiate_device_flow(self, scopes):
        return {"user_code": "ABC", "device_code": "dc", "interval": 1, "expires_at": time.time() + 60, "message": "m"}

    def acquire_token_by_device_flow(self, flow, exit_condition):
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


@pytest.fixture
def builds(monkeypatch):
    """Each build of the MSAL app takes the next entry: a FakeApp, or an exception the build raises."""
    queue: list = []

    def build(settings, *, cache, http_client):
        entry = queue.pop(0)
        if isinstance(entry, BaseException):
            raise entry
        return entry

    monkeypatch.setattr(device_code, "build_app", build)
    monkeypatch.setattr(device_code.time, "sleep", lambda seconds: None)
    return queue


def test_a_failing_poll_and_a_failing_rebuild_are_retried_until_the_sign_in_lands(builds):
    answers = [{"error": "authorization_pending"}, msal.exceptions.MsalServiceError(error="x", error_description="5xx")]
    builds.extend([FakeApp(answers), requests.ConnectionError("down"), FakeApp([SIGNED_IN])])
    consent = DeviceCodeConsent(SETTINGS)
    result = consent.wait(consent.start())
    assert result.username == "a@contoso.com" and result.refresh_token == "rt"
    assert builds == []  # rebuilt twice: once failing, once working


def test_an_identity_provider_down_until_the_code_expires_says_so(builds):
    class Expiring(FakeApp):
        def initiate_device_flow(self, scopes):
            return {**super().initiate_device_flow(scopes), "expires_at": time.time() - 1}

    builds.append(Expiring([requests.Timeout("slow")]))
    consent = DeviceCodeConsent(SETTINGS)
    with pytest.raises(IdentityProviderUnavailable, match="kept failing .*Timeout"):
        consent.wait(consent.start())


def test_a_declined_sign_in_stops_at_once(builds):
    builds.append(
        FakeApp([{"error": "authorization_pending"}, {"error": "authorization_declined", "error_codes": [65004]}])
    )
    consent = DeviceCodeConsent(SETTINGS)
    with pytest.raises(AuthorizationError, match="declined"):
        consent.wait(consent.start())
