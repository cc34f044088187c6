"""Admin > Microsoft 365 Mail inside Airflow's UI, in a real browser (Playwright + Chromium, headless).

An api-server of its own (same metadata DB) also sees an ``AIRFLOW_CONN_*`` connection. The page must
render inside the UI (iframe at ``/plugin/o365mail``), follow the UI's light/dark mode, show an
authorized connection green, a revoked one red (although its token store still holds a valid access
token), the environment-variable one with how to authorize it; Check runs the doctor's steps;
Authorize from inside the UI signs in at the top level and lands back authorized. Screenshots go to
``test-artifacts/browser/mail-page-*.png``; ``docs/img/`` has copies.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import uuid
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from airflow_provider_o365mail import exceptions as exc
from airflow_provider_o365mail.hooks.o365mail import O365MailHook
from airflow_provider_o365mail.testing.airflow_services import start_airflow_services

ARTIFACTS = Path(os.environ.get("O365MAIL_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts")) / "browser"
FRAME = "iframe[title='Microsoft 365 Mail']"


@pytest.fixture
def env_conn(o365_sandbox) -> tuple[str, dict[str, str]]:
    conn_id = f"ui_env_{uuid.uuid4().hex[:6]}"
    sbx = o365_sandbox
    return conn_id, {f"AIRFLOW_CONN_{conn_id.upper()}": sbx.connection_json(refresh_token=sbx.new_refresh_token())}


@pytest.fixture
def env_api_server(airflow_db, env_conn, o365_sandbox, o365_admin):
    """An api-server alone (same metadata DB) whose environment defines the env-var connection."""
    services = start_airflow_services(airflow_db, extra_env=env_conn[1], components=("api-server",))
    o365_admin.add_redirect_uri(o365_sandbox.client_id, f"{services.api_url}/o365mail/callback")
    try:
        yield services
    finally:
        services.stop_all()


def _consent_through_the_plugin(services, sbx, conn_id: str, upn: str) -> None:
    """Authorize as a user without single sign-on (the stand-in's sign-in page), as the UI does."""
    cookies = {"_token": services.admin_token()}
    with httpx.Client(base_url=services.api_url, cookies=cookies, timeout=60, follow_redirects=False) as admin:
        started = admin.post("/o365mail/authorize/" + quote(conn_id, safe=""))
        assert started.status_code == 303, started.text
        redirect = sbx.admin().sign_in(started.headers["location"], login=upn, password=sbx.user_password)
        done = admin.get(redirect.removeprefix(services.api_url))
        assert done.status_code == 200 and f"authorized for {upn}" in done.text, done.text


@pytest.fixture
def page_connections(env_api_server, env_conn, db_connection, o365_sandbox, o365_admin) -> dict[str, str]:
    """An authorized DB connection, a revoked one (warm store, then a refused refresh) and the env-var one."""
    sbx, suffix, today = o365_sandbox, uuid.uuid4().hex[:6], dt.date.today()

    def db_conn(conn_id: str, upn: str, secret_expires: dt.date, refresh_token: str | None) -> str:
        extra = sbx.connection_extra(
            refresh_token=refresh_token, mailbox=upn, credential_expires_on=secret_expires.isoformat()
        )
        connection = {"conn_type": "o365mail", "login": sbx.client_id, "password": sbx.client_secret, "extra": extra}
        return db_connection(conn_id, json.dumps(connection))

    authorized = db_conn(f"ui_ok_{suffix}", sbx.user, today + dt.timedelta(days=200), sbx.new_refresh_token())
    revoked = db_conn(f"ui_revoked_{suffix}", sbx.second_user, today + dt.timedelta(days=12), None)
    _consent_through_the_plugin(env_api_server, sbx, revoked, sbx.second_user)
    for conn_id in (authorized, revoked):
        O365MailHook(conn_id).access_token()  # the token store holds an account and a valid access token
    o365_admin.revoke_sessions(sbx.second_user)
    with pytest.raises(exc.ReauthorizationRequired):
        O365MailHook(revoked).access_token(force_refresh=True)  # records the last error: GrantRevoked
    return {"authorized": authorized, "revoked": revoked, "env": env_conn[0]}


def _row(frame, conn_id: str):
    return frame.locator(f"tbody[data-conn-id='{conn_id}']")


def _badge_is_error_red(frame, conn_id: str) -> bool:
    """The badge's computed color is the page's error color (not only its class)."""
    return (
        _row(frame, conn_id)
        .locator("[data-state]")
        .evaluate(
            """el => { const probe = document.createElement('span'); probe.style.color = 'var(--error)';
                   document.body.append(probe); const want = getComputedStyle(probe).color; probe.remove();
                   return getComputedStyle(el).color === want; }"""
        )
    )


def test_the_page_inside_airflows_ui_states_check_authorize_light_and_dark(
    env_api_server, page_connections, o365_sandbox, browser
):
    services, sbx, conns = env_api_server, o365_sandbox, page_connections
    context = browser.new_context(viewport={"width": 1600, "height": 1000}, color_scheme="light")
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        # 1. Log in, then Admin > Microsoft 365 Mail: inside the UI, not a new tab.
        page.goto(f"{services.api_url}/")
        page.fill("input[name=username]", "admin")
        page.fill("input[name=password]", services.admin_password)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(lambda url: "/auth/" not in url)
        page.get_by_role("button", name="Admin").click()
        page.get_by_role("menuitem", name="Microsoft 365 Mail").click()
        page.wait_for_url("**/plugin/o365mail**")
        assert len(context.pages) == 1, "the page must not open a new tab"
        frame = page.frame_locator(FRAME)
        assert frame.locator("#callback-url").inner_text() == f"{services.api_url}/o365mail/callback"
        assert frame.locator("#open-in-airflow").is_hidden(), "embedded: no link to the UI"

        # 2. Honest states.
        ok_row, revoked_row, env_row = (_row(frame, conns[k]) for k in ("authorized", "revoked", "env"))
        ok_badge = ok_row.locator("[data-state]")
        assert (ok_badge.get_attribute("data-state"), ok_badge.get_attribute("data-level")) == ("authorized", "ok")
        assert "authorized for " + sbx.user in ok_row.inner_text()
        assert ok_row.locator("[data-field=refresh-last-used] time").count() == 1
        assert ok_row.locator("[data-field=refresh-expires] time").count() == 1
        assert "200 days" in ok_row.locator("[data-field=secret-expiry]").inner_text()
        revoked_badge = revoked_row.locator("[data-state]")
        assert (revoked_badge.get_attribute("data-state"), revoked_badge.get_attribute("data-level")) == (
            "revoked",
            "error",
        )
        assert _badge_is_error_red(frame, conns["revoked"])
        assert not _badge_is_error_red(frame, conns["authorized"])
        assert "GrantRevoked" in revoked_row.locator("[data-field=last-error]").inner_text()
        assert "text-warn" in revoked_row.locator("[data-field=secret-expiry]").get_attribute("class")
        assert "authorized for" not in revoked_row.inner_text(), "never 'authorized' next to the error"
        assert env_row.get_attribute("data-source") == "environment variable"
        env_row.get_by_text("How to authorize it").click()
        note = env_row.locator("[data-field=authorize-note]")
        assert f"airflow o365mail authorize --conn-id {conns['env']}" in note.inner_text()
        assert "never shown" in note.inner_text()
        env_badge = env_row.locator("[data-state]")
        assert (env_badge.get_attribute("data-state"), env_badge.get_attribute("data-level")) == ("unverified", "info")
        assert frame.locator("html").get_attribute("data-theme") == "light"
        page.screenshot(path=str(ARTIFACTS / "mail-page-light.png"))

        # 3. Check: the doctor's steps, one line each; the env-var connection turns green.
        env_row.get_by_role("button", name="Check").click()
        frame.locator(f"tbody[data-conn-id='{conns['env']}'][data-checked]").wait_for(timeout=120_000)
        links = env_row.locator(".checks li").evaluate_all("els => els.map(e => [e.dataset.link, e.dataset.status])")
        assert [link for link, _ in links] == [
            "connection",
            "scopes",
            "credential watch",
            "endpoints",
            "token store",
            "refresh token",
            "token",
            "IMAP",
            "SMTP",
        ]
        assert {status for _, status in links} == {"ok"}, links
        assert (env_badge.get_attribute("data-state"), env_badge.get_attribute("data-level")) == ("authorized", "ok")
        assert env_row.locator("[data-field=refresh-last-used] time").count() == 1, "the whole row is read again"
        assert env_row.locator("[data-field=source]").inner_text() == "environment variable"
        revoked_row.get_by_role("button", name="Check").click()
        frame.locator(f"tbody[data-conn-id='{conns['revoked']}'][data-checked]").wait_for(timeout=120_000)
        statuses = dict(
            revoked_row.locator(".checks li").evaluate_all("els => els.map(e => [e.dataset.link, e.dataset.status])")
        )
        assert statuses["consent"] == "fail" and statuses["IMAP"] == "skip", statuses
        assert "authorize" in revoked_row.locator(".checks").inner_text().lower()
        assert revoked_badge.get_attribute("data-level") == "error"
        assert env_row.locator("details.note:has([data-field=authorize-note])").get_attribute("open") is None, (
            "re-rendered: the note is folded"
        )
        frame.locator("h1").scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / "mail-page-checked-light.png"))

        # 4. Dark mode: the frame follows the UI live (its <html> class), and after a reload.
        page.evaluate("document.documentElement.classList.replace('light', 'dark')")
        frame.locator("html[data-theme=dark]").wait_for()
        page.evaluate("localStorage.setItem('theme', 'dark')")
        page.reload()
        frame = page.frame_locator(FRAME)
        page.locator("html.dark").wait_for(state="attached")  # Airflow's UI sets the class once its JS ran
        assert page.locator("html").get_attribute("class").split().count("dark") == 1
        frame.locator("html[data-theme=dark]").wait_for()
        _row(frame, conns["revoked"]).wait_for()
        assert _badge_is_error_red(frame, conns["revoked"])
        page.screenshot(path=str(ARTIFACTS / "mail-page-dark.png"))

        # 5. Authorize from inside the UI: the sign-in is the top-level page, then back, authorized.
        _row(frame, conns["revoked"]).get_by_role("button", name="Authorize").click()
        page.wait_for_url(f"{sbx.idp_url}/**")
        page.fill("#login", sbx.second_user)
        page.fill("#passwd", sbx.user_password)
        page.click("#accept")
        page.wait_for_url(f"{services.api_url}/o365mail/callback?**")
        assert page.locator("#result").get_attribute("data-ok") == "true", page.locator("#result").inner_text()
        page.click("#back-to-airflow")
        page.wait_for_url("**/plugin/o365mail**")
        frame = page.frame_locator(FRAME)
        badge = _row(frame, conns["revoked"]).locator("[data-state]")
        assert (badge.get_attribute("data-state"), badge.get_attribute("data-level")) == ("authorized", "ok")
        assert "authorized for " + sbx.second_user in _row(frame, conns["revoked"]).inner_text()
    finally:
        context.close()
