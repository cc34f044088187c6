"""The /o365mail plugin in a real ``airflow api-server``: auth on every route, the consent flow, replays."""

from __future__ import annotations

import httpx
import pytest

from airflow_provider_o365mail.auth.store import TokenStore


@pytest.fixture
def plugin(airflow_services, o365_sandbox, o365_admin):
    callback = f"{airflow_services.api_url}/o365mail/callback"
    o365_admin.add_redirect_uri(o365_sandbox.client_id, callback)
    return airflow_services, callback


def client(services, token: str | None = None) -> httpx.Client:
    cookies = {"_token": token} if token else {}
    return httpx.Client(base_url=services.api_url, cookies=cookies, timeout=60, follow_redirects=False)


def test_routes_refuse_unauthenticated_requests(plugin, unauthorized_db_conn):
    services, _ = plugin
    with client(services) as anonymous:
        page = anonymous.get("/o365mail/", headers={"Accept": "text/html"})
        assert page.status_code == 303 and page.headers["location"].startswith("/auth/login")
        assert anonymous.get("/o365mail/api/connections").status_code == 401
        assert anonymous.post(f"/o365mail/authorize/{unauthorized_db_conn}").status_code == 401
    with client(services, "not-a-jwt") as forged:
        assert forged.get("/o365mail/api/connections").status_code in (401, 403)
        assert forged.post(f"/o365mail/authorize/{unauthorized_db_conn}").status_code in (401, 403)


def test_consent_through_the_plugin_then_replay_and_forgery_are_refused(plugin, unauthorized_db_conn, o365_sandbox):
    services, callback = plugin
    sbx = o365_sandbox
    token = services.admin_token()
    with client(services, token) as admin:
        listing = admin.get("/o365mail/api/connections").json()
        (row,) = [c for c in listing if c["conn_id"] == unauthorized_db_conn]
        assert row["state"] == "needs-consent"
        page = admin.get("/o365mail/", headers={"Accept": "text/html"})
        assert page.status_code == 200 and callback in page.text
        started = admin.post(f"/o365mail/authorize/{unauthorized_db_conn}")
        assert started.status_code == 303
        auth_uri = started.headers["location"]
        assert auth_uri.startswith(sbx.authority) and "code_challenge=" in auth_uri
        redirect = sbx.admin().sign_in(auth_uri, login=sbx.user, password=sbx.user_password)
        assert redirect.startswith(callback + "?code=")
        done = admin.get(redirect.removeprefix(services.api_url))
        assert done.status_code == 200, done.text
        assert f"authorized for {sbx.user}" in done.text and "IMAP.AccessAsUser.All" in done.text
        assert "code=" not in done.text and "refresh" not in done.headers.get("location", "")
        replay = admin.get(redirect.removeprefix(services.api_url))
        assert replay.status_code == 400 and "already used" in replay.text
        forged = admin.get("/o365mail/callback", params={"code": "x", "state": "forged-state"})
        assert forged.status_code == 400 and "unknown" in forged.text
        (row,) = [c for c in admin.get("/o365mail/api/connections").json() if c["conn_id"] == unauthorized_db_conn]
        assert row["state"] == "authorized" and sbx.user in row["state_text"]
    assert TokenStore(unauthorized_db_conn).load() is not None


def test_callback_refuses_a_flow_started_by_another_user(plugin, unauthorized_db_conn, o365_sandbox):
    services, callback = plugin
    sbx = o365_sandbox
    with client(services, services.admin_token()) as admin:
        auth_uri = admin.post(f"/o365mail/authorize/{unauthorized_db_conn}").headers["location"]
    redirect = sbx.admin().sign_in(auth_uri, login=sbx.user, password=sbx.user_password)
    with client(services, services.admin_token("operator2")) as other:
        refused = other.get(redirect.removeprefix(services.api_url))
    assert refused.status_code == 403 and "another Airflow user" in refused.text


def test_check_runs_the_doctors_steps_and_refuses_forgery_unknown_ids_and_viewers(plugin, unauthorized_db_conn):
    services, _ = plugin
    path = f"/o365mail/api/check/{unauthorized_db_conn}"
    header = {"X-O365Mail-Check": "1"}
    with client(services) as anonymous:
        assert anonymous.post(path, headers=header).status_code == 401
    with client(services, services.admin_token("viewer1")) as viewer:
        assert viewer.post(path, headers=header).status_code == 403
    with client(services, services.admin_token()) as admin:
        assert admin.post(path).status_code == 400, "a cross-site form cannot send the header"
        unknown = admin.post("/o365mail/api/check/ui-does-not-exist", headers=header)
        assert unknown.status_code == 404 and "There is no connection" in unknown.json()["detail"]
        checked = admin.post(path, headers=header)
    assert checked.status_code == 200, checked.text
    body = checked.json()
    statuses = {c["link"]: c["status"] for c in body["checks"]}
    assert statuses["connection"] == "ok" and statuses["endpoints"] == "ok", statuses
    assert statuses["consent"] == "fail" and statuses["IMAP"] == statuses["SMTP"] == "skip", statuses
    assert body["state"]["conn_id"] == unauthorized_db_conn and body["state"]["state"] == "needs-consent"
