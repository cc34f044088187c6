"""A dropped or stalled IDLE connection is noticed within seconds (TCP fault proxy in front of Dovecot)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from airflow_provider_o365mail.exceptions import MailServerUnavailable
from airflow_provider_o365mail.hooks.o365mail import O365MailHook
from airflow_provider_o365mail.imap.idle import aioimaplib_client, wait_for_new_mail
from airflow_provider_o365mail.testing.fault_proxy import FaultProxy
from airflow_provider_o365mail.triggers.imap import O365ImapTrigger


@pytest.fixture
def proxied_conn(o365_sandbox, monkeypatch):
    with FaultProxy(("127.0.0.1", o365_sandbox.imap_port)) as proxy:
        conn_id = f"o365mail_proxied_{uuid.uuid4().hex[:8]}"
        monkeypatch.setenv(
            f"AIRFLOW_CONN_{conn_id.upper()}",
            o365_sandbox.connection_json(
                refresh_token=o365_sandbox.new_refresh_token(), imap_port=proxy.address[1], timeout=5
            ),
        )
        yield conn_id, proxy


def test_a_reset_idle_connection_is_noticed_at_once(proxied_conn):
    conn_id, proxy = proxied_conn
    hook = O365MailHook(conn_id)
    endpoint, token = hook.imap_endpoint(), hook.access_token()
    idling = asyncio.Event()

    def spying_client(endpoint, on_lost):
        client = aioimaplib_client(endpoint, on_lost)
        idle_start = client.idle_start

        async def started(*args, **kwargs):
            idle = await idle_start(*args, **kwargs)
            idling.set()  # the server answered "+ idling": the session is in IDLE now
            return idle

        client.idle_start = started
        return client

    async def run():
        task = asyncio.ensure_future(
            wait_for_new_mail(endpoint, "INBOX", token, None, max_idle=1500, client_factory=spying_client)
        )
        await asyncio.wait_for(idling.wait(), 60)
        started = time.monotonic()
        proxy.reset()
        with pytest.raises(MailServerUnavailable, match="lost"):
            await asyncio.wait_for(task, 30)
        return time.monotonic() - started

    noticed = asyncio.run(run())
    assert noticed < 5, f"a reset took {noticed:.1f} s to notice (the IDLE would have run 25 min)"


def test_mail_after_a_reset_fires_the_trigger_within_15_s(proxied_conn, o365_sandbox):
    conn_id, proxy = proxied_conn
    sbx = o365_sandbox
    subject = f"after reset {uuid.uuid4().hex[:8]}"
    trigger = O365ImapTrigger(conn_id=conn_id, spec={"folders": ["INBOX"], "subject": subject}, max_idle=1500)

    async def run():
        events = trigger.run()
        first = asyncio.ensure_future(events.__anext__())
        await asyncio.to_thread(proxy.wait_for, lambda s: s.accepted >= 2, 30)  # the check, then IDLE
        await asyncio.sleep(1.5)
        proxy.reset()
        started = time.monotonic()
        await asyncio.to_thread(O365MailHook(conn_id).send_email, to=sbx.user, subject=subject, text_content="x")
        event = await asyncio.wait_for(first, 60)
        return event, time.monotonic() - started

    event, elapsed = asyncio.run(run())
    assert event.payload["status"] == "success"
    assert [m["subject"] for m in event.payload["result"]["messages"]] == [subject]
    assert elapsed < 15, f"the trigger fired {elapsed:.1f} s after the reset"
