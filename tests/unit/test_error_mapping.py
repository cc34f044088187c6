from __future__ import annotations

import pytest

from airflow_provider_o365mail import exceptions as exc
from airflow_provider_o365mail.auth.errors import authorization_error
from airflow_provider_o365mail.version_compat import AirflowFailException


@pytest.mark.parametrize(
    ("code", "error", "expected", "fix"),
    [
        (65001, "invalid_grant", exc.ConsentRevoked, "airflow o365mail authorize --conn-id c1"),
        (50173, "invalid_grant", exc.GrantRevoked, "airflow o365mail authorize"),
        (70008, "invalid_grant", exc.GrantRevoked, "airflow o365mail authorize"),
        (700082, "invalid_grant", exc.RefreshTokenExpired, "90 days"),
        (50076, "invalid_grant", exc.InteractionRequired, "multi-factor"),
        (53003, "invalid_grant", exc.AccessBlocked, "Conditional Access"),
        (7000215, "invalid_client", exc.ClientCredentialError, "Certificates & secrets"),
        (7000222, "invalid_client", exc.ClientCredentialError, "expired"),
        (70000, "invalid_grant", exc.ReauthorizationRequired, "airflow o365mail authorize"),
        (54005, "invalid_grant", exc.InvalidRequestError, "single-use"),
        (900144, "invalid_request", exc.InvalidRequestError, "scopes"),
    ],
)
def test_aadsts_codes_map_to_typed_errors_with_a_fix(code, error, expected, fix):
    result = {
        "error": error,
        "error_description": f"AADSTS{code}: secret-looking text Trace ID: x",
        "error_codes": [code],
        "correlation_id": "corr-1",
    }
    err = authorization_error(result, "c1")
    assert type(err) is expected
    assert isinstance(err, AirflowFailException), "permanent failures must not be retried by Airflow"
    assert f"AADSTS{code}" in str(err) and fix in str(err) and "'c1'" in str(err)
    assert "secret-looking text" not in str(err)
    assert err.error_codes == [code] and err.correlation_id == "corr-1"


def test_unknown_code_still_gives_a_typed_permanent_error():
    err = authorization_error({"error": "invalid_request", "error_codes": [123456]}, "c1")
    assert isinstance(err, exc.InvalidRequestError)
    assert "AADSTS123456" in str(err)


def test_no_secret_sent_means_public_flows_are_off_for_a_public_client_and_a_missing_secret_otherwise():
    result = {"error": "invalid_client", "error_codes": [7000218], "error_description": "AADSTS7000218: x"}
    public = authorization_error(result, "c1", public_client=True)
    confidential = authorization_error(result, "c1")
    assert isinstance(public, exc.ClientCredentialError) and "Allow public client flows" in str(public)
    assert "Client secret" in str(confidential) and "public client flows" not in str(confidential)


@pytest.mark.parametrize(
    ("error", "code", "text"),
    [
        ("authorization_declined", 65004, "declined"),
        ("expired_token", 70019, "expired"),
        ("bad_verification_code", 70000, "did not recognise the device code"),
    ],
)
def test_device_code_endings_say_what_happened_and_to_start_again(error, code, text):
    err = authorization_error({"error": error, "error_codes": [code]}, "c1", public_client=True)
    assert text in str(err) and "authorize --conn-id c1 --device-code' again" in str(err)
    assert isinstance(err, AirflowFailException)


@pytest.mark.parametrize("code", [65001, 50173, 700082, 50076])
def test_a_public_client_is_told_to_re_authorize_with_the_device_code(code):
    result = {"error": "invalid_grant", "error_codes": [code]}
    assert "authorize --conn-id c1 --device-code" in str(authorization_error(result, "c1", public_client=True))
    assert "--device-code" not in str(authorization_error(result, "c1"))
