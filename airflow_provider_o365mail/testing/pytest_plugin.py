"""pytest fixtures for the local Microsoft 365 sandbox (loaded through the ``pytest11`` entry point).

- ``o365_sandbox``: session-wide :class:`SandboxInfo`; starts the sandbox unless it runs already
  (``O365_SANDBOX_ENV_FILE`` points at the env file of a running one) and stops what it started.
- ``o365_admin``: the admin client; ``o365_clean_mailboxes``: empty mailboxes before a test.
- ``o365mail_conn``: a fresh consented grant per test, exported as ``AIRFLOW_CONN_O365MAIL_DEFAULT``.

Options: ``--o365-sandbox-state-dir`` (default: a directory under /tmp).

pytest loads this module in every test run of everyone who installed the provider, so it imports
only pytest and the standard library at module level: the sandbox, Airflow, MSAL and requests load
inside the fixtures (tests/unit/test_packaging.py checks it).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("o365mail", "Microsoft 365 sandbox (airflow-provider-o365mail)")
    group.addoption("--o365-sandbox-state-dir", default=None, help="state directory of the sandbox")


@pytest.fixture(scope="session")
def o365_sandbox(request: pytest.FixtureRequest):
    from airflow_provider_o365mail.testing.sandbox import DEFAULT_STATE_DIR, Sandbox, SandboxInfo, read_env_file

    env_file = os.environ.get("O365_SANDBOX_ENV_FILE")
    if env_file and Path(env_file).exists():
        yield SandboxInfo.from_env(read_env_file(env_file))
        return
    state_dir = request.config.getoption("--o365-sandbox-state-dir") or DEFAULT_STATE_DIR
    sandbox = Sandbox(Path(state_dir))
    already_running = all(sandbox.running().values())
    info = sandbox.up()
    yield info
    if not already_running:
        sandbox.down()


@pytest.fixture
def o365_admin(o365_sandbox):
    admin = o365_sandbox.admin()
    admin.clear_faults()
    if o365_sandbox.graph_url:
        admin.graph_clear_faults()
    yield admin
    admin.clear_faults()
    if admin.mail_limits() != _default_mail_limits() or admin.smtp_state()["injections"]:
        admin.reset_mail()  # caps raised or lowered by the test, replies it did not consume
    admin.update_settings(
        strict_rotation=False,
        clock_offset=0,
        access_token_lifetime=3900,
        refresh_requires_scope=False,
        reject_replayed_assertions=True,
    )
    from airflow_provider_o365mail.testing.sandbox import (
        DELEGATED_SCOPES,
        GRAPH,
        GRAPH_APP_ROLES,
        GRAPH_DELEGATED_SCOPES,
    )

    admin.consent(o365_sandbox.user, o365_sandbox.client_id, DELEGATED_SCOPES)
    if o365_sandbox.graph_url:  # Graph: documented defaults, consent and admin consent as seeded
        admin.graph_reset()
        admin.consent(o365_sandbox.user, o365_sandbox.client_id, GRAPH_DELEGATED_SCOPES)
        admin.set_app_roles(o365_sandbox.app_client_id, GRAPH, list(GRAPH_APP_ROLES))
    for upn in (o365_sandbox.user, o365_sandbox.second_user):
        admin.update_user(
            upn,
            mfa_required=False,
            mfa_max_age=0.0,
            mfa_registration_required=False,
            sign_in_frequency=0.0,
            blocked_by_conditional_access=False,
            smtp_auth_enabled=True,
            imap_enabled=True,
        )


def _default_mail_limits() -> dict:
    from airflow_provider_o365mail.testing.mailservers import DEFAULT_LIMITS

    return dict(DEFAULT_LIMITS)


@pytest.fixture
def o365_clean_mailboxes(o365_sandbox) -> None:
    from airflow_provider_o365mail.testing.sandbox import Sandbox

    Sandbox(o365_sandbox.state_dir).clean_mailboxes()


@pytest.fixture
def o365mail_conn(o365_sandbox, o365_admin, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A connection id backed by a fresh grant (own refresh token, empty token store)."""

    refresh_token = o365_sandbox.new_refresh_token()
    conn_id = f"o365mail_{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", o365_sandbox.connection_json(refresh_token=refresh_token))
    yield conn_id
    # Its pool's idle sessions would stay logged in for a minute and count against the mailbox's cap.
    from airflow_provider_o365mail.imap.pool import close_idle_pools

    close_idle_pools()
