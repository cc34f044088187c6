"""The ``queues`` entry: ``MessageQueueTrigger`` of apache-airflow-providers-common-messaging builds the mail
event trigger (scheme ``o365mail``, and the deprecated ``o365mail://`` queue URI)."""

from __future__ import annotations

import warnings

import pytest

from airflow_provider_o365mail.exceptions import ConnectionConfigError
from airflow_provider_o365mail.get_provider_info import get_provider_info
from airflow_provider_o365mail.version_compat import AIRFLOW_V_3_3_PLUS

pytest.importorskip("airflow.providers.common.messaging", reason="the common-messaging extra is not installed")
needs_shared_streams = pytest.mark.skipif(not AIRFLOW_V_3_3_PLUS, reason="the event trigger needs Airflow >= 3.3")

PROVIDER = "airflow_provider_o365mail.queues.o365mail.O365MailMessageQueueProvider"
TRIGGER = "airflow_provider_o365mail.triggers.imap_events.O365ImapEventTrigger"


def test_the_provider_declares_its_queue_and_airflow_finds_it():
    from airflow.providers_manager import ProvidersManager

    assert get_provider_info()["queues"] == [PROVIDER]
    assert PROVIDER in ProvidersManager().queue_class_names


@needs_shared_streams
@pytest.mark.parametrize("transport", ["imap", "graph"])
def test_message_queue_trigger_by_scheme_is_the_mail_event_trigger(transport):
    from airflow.providers.common.messaging.triggers.msg_queue import MessageQueueTrigger

    trigger = MessageQueueTrigger(
        scheme="o365mail", conn_id="c", folder="Invoices", transport=transport, subject="Invoice", post_action="seen"
    )
    classpath, kwargs = trigger.serialize()
    assert classpath == TRIGGER, "the triggerer runs the mail trigger itself (shared streams, ack mode)"
    assert (kwargs["conn_id"], kwargs["folder"], kwargs["transport"]) == ("c", "Invoices", transport)
    assert (kwargs["subject"], kwargs["post_action"]) == ("Invoice", "seen")
    direct = trigger.trigger.__class__(**kwargs)
    assert trigger.trigger.shared_stream_key() == direct.shared_stream_key(), "shares streams with direct watchers"


@needs_shared_streams
def test_the_deprecated_queue_uri_names_connection_folder_and_transport():
    from airflow.providers.common.messaging.triggers.msg_queue import MessageQueueTrigger

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trigger = MessageQueueTrigger(queue="o365mail://my_conn/Inbox/Invoices%202026?transport=graph", subject="x")
        classpath, kwargs = trigger.serialize()
    assert classpath == TRIGGER
    assert (kwargs["conn_id"], kwargs["folder"], kwargs["transport"]) == ("my_conn", "Inbox/Invoices 2026", "graph")


def test_queue_uris_are_matched_narrowly_and_checked():
    from airflow_provider_o365mail.queues.o365mail import O365MailMessageQueueProvider, parse_queue

    provider = O365MailMessageQueueProvider()
    assert provider.scheme_matches("o365mail") and not provider.scheme_matches("o365")
    assert provider.queue_matches("o365mail://c/INBOX") and not provider.queue_matches("kafka://c/INBOX")
    assert parse_queue("o365mail://c") == {"conn_id": "c"}
    with pytest.raises(ConnectionConfigError, match="'subject' cannot be set in an o365mail:// queue URI"):
        parse_queue("o365mail://c/INBOX?subject=x")
    with pytest.raises(ConnectionConfigError, match="conn_id given both"):
        provider.trigger_kwargs("o365mail://c/INBOX", conn_id="d")


@needs_shared_streams
def test_a_wrong_transport_fails_at_dag_parse():
    from airflow.providers.common.messaging.triggers.msg_queue import MessageQueueTrigger

    with pytest.raises(ConnectionConfigError, match="transport must be one of imap, graph, auto"):
        MessageQueueTrigger(scheme="o365mail", conn_id="c", transport="pop3").serialize()
