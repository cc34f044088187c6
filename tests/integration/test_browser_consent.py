"""Consent from the Airflow UI in a real browser (Playwright + Debian's Chromium, headless).

Log in to Airflow, open Microsoft 365 Mail from the navigation, see the Callback URL, click
Authorize, accept on the Entra stand-in's page, land back authorized; then a DAG task sends mail
with the connection. Screenshots go to ``test-artifacts/browser/`` (or ``$O365MAIL_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from airflow_provider_o365mail.testing.mailbox import wait_for_messages, with_subject

ARTIFACTS = Path(os.environ.get("O365MAIL_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts")) / "browser"


def test_authorize_from_the_airflow_ui_then_send_mail_from_a_task(
    airflow_services, unauthorized_db_conn, o365_sandbox, o365_admin, browser_page, run_dag
):
    services, sbx, page = airflow_services, o365_sandbox, browser_page
    callback = f"{services.api_url}/o365mail/callback"
    o365_admin.add_redirect_uri(sbx.client_id, callback)
    conn_id = unauthorized_db_conn

    # 1. Airflow login, then the page from the navigation.
    page.goto(f"{services.api_url}/")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", services.admin_password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: "/auth/" not in url)  # logged in: the UI itself, not the login page
    errors = page.request.get(
        f"{services.api_url}/api/v2/plugins/importErrors",
        headers={"Authorization": f"Bearer {services.admin_token()}"},
    ).json()
    assert errors.get("total_entries") == 0, errors
    page.get_by_role("button", name="Admin").click()
    page.get_by_role("menuitem", name="Microsoft 365 Mail").wait_for()
    page.screenshot(path=str(ARTIFACTS / "01-admin-menu.png"))
    page.goto(f"{services.api_url}/o365mail/")
    assert page.locator("#callback-url").inner_text() == callback
    row = page.locator("tr", has=page.locator(f"code:text-is('{conn_id}')"))
    assert row.locator("[data-state]").get_attribute("data-state") == "needs-consent"
    page.screenshot(path=str(ARTIFACTS / "02-needs-consent.png"), full_page=True)

    # 2. Authorize: the stand-in's sign-in and consent page, then back to Airflow.
    page.click(f"#authorize-{conn_id}")
    page.wait_for_url(f"{sbx.idp_url}/**")
    page.fill("#login", sbx.user)
    page.fill("#passwd", sbx.user_password)
    page.screenshot(path=str(ARTIFACTS / "03-consent-page.png"), full_page=True)
    page.click("#accept")
    page.wait_for_url(f"{callback}?**")
    result = page.locator("#result")
    assert result.get_attribute("data-ok") == "true", result.inner_text()
    assert f"authorized for {sbx.user}" in result.inner_text()
    assert "code=" not in page.content()
    page.screenshot(path=str(ARTIFACTS / "04-authorized.png"), full_page=True)
    page.click("#back")
    row = page.locator("tr", has=page.locator(f"code:text-is('{conn_id}')"))
    assert row.locator("[data-state]").get_attribute("data-state") == "authorized"
    page.screenshot(path=str(ARTIFACTS / "05-connection-authorized.png"), full_page=True)

    # 3. A DAG task sends mail with the connection that was just authorized.
    subject = f"sent after UI consent {uuid.uuid4().hex[:6]}"
    dag_run = run_dag(
        "o365_after_ui_consent",
        f"""
        from airflow.sdk import dag
        from airflow_provider_o365mail.operators.smtp import O365SmtpOperator

        @dag(schedule=None)
        def o365_after_ui_consent():
            O365SmtpOperator(task_id="send", conn_id={conn_id!r}, to={sbx.user!r}, subject={subject!r},
                             text_content="The consent from the UI works.")

        o365_after_ui_consent()
        """,
    )
    assert dag_run.task_states()["send"][0] == "success", dag_run.output[-3000:]
    wait_for_messages(sbx, sbx.user, with_subject(subject))
