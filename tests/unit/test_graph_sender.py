"""GraphSender against a fake Graph client (graph_fakes.FakeGraph): the small or draft path, resumed
uploads, new drafts, the ledger callbacks and the Sent Items rule. What arrived is read from the fake's
``delivered``, never from the sender's result."""

from __future__ import annotations

import hashlib
import os

import pytest
from graph_fakes import FakeGraph, graph_refusal

from airflow_provider_o365mail.core.compose import compose_message
from airflow_provider_o365mail.exceptions import MailServerUnavailable, MessageTooLargeError
from airflow_provider_o365mail.graph.client import NoAnswer
from airflow_provider_o365mail.graph.sender import GraphSender
from airflow_provider_o365mail.retry import Backoff

MiB = 1024 * 1024
CHUNK = MiB


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def graph() -> FakeGraph:
    return FakeGraph()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def sender_for(graph: FakeGraph, clock: Clock, *, can_draft: bool = True, lookup: bool = True) -> GraphSender:
    return GraphSender(
        graph,
        who="me",
        can_draft=can_draft,
        sent_lookup=graph.copies_in_sent_items if lookup else None,
        retry=Backoff(first=1.0, maximum=1.0, attempts=4, jitter=(1.0, 1.0)),
        clock=clock,
        sleep=clock.sleep,
        sent_items_wait=0.0,
        upload_chunk=CHUNK,
    )


def small_message():
    return compose_message(sender="me@x.example", to="a@x.example", bcc="b@x.example", subject="s", text_content="hi")


def large_message(tmp_path, size: int = 3 * MiB + MiB // 2):
    """Over Graph's 4 MB request: a streamed file for an upload session and a small in-memory one."""
    big = tmp_path / "extract.bin"
    big.write_bytes(os.urandom(size))
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"a few notes\r\n")
    message = compose_message(
        sender="me@x.example", to="a@x.example", bcc="b@x.example", subject="big", text_content="x", files=[big, notes]
    )
    return message, {big.name: _sha(big.read_bytes()), notes.name: _sha(notes.read_bytes())}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def attachments_of(delivered) -> dict[str, str]:
    return {name: _sha(data) for name, data in delivered.attachments.items()}


def ledger(graph: FakeGraph):
    """on_sending / on_accepted that write into the fake's event list, between its requests."""

    def on_sending(message_id: str) -> None:
        graph.events.append("on_sending")

    def on_accepted(message_id: str, recipients: tuple[str, ...], complete: bool) -> None:
        graph.events.append(("on_accepted", recipients, complete))

    return {"on_sending": on_sending, "on_accepted": on_accepted}


def test_small_mail_is_one_sendmail_with_the_composed_mime(graph, clock):
    message = small_message()
    result = sender_for(graph, clock).send(message, **ledger(graph))
    assert graph.events == ["on_sending", "sendMail", ("on_accepted", ("a@x.example", "b@x.example"), True)]
    (delivered,) = graph.delivered
    assert delivered.message_id == message.message_id and delivered.via == "sendMail"
    assert delivered.recipients == ["a@x.example", "b@x.example"]
    assert graph.calls[0]["repeatable"] is False, "a send is never repeated blindly"
    assert result.accepted == message.recipients and not result.already_sent


def test_mail_over_the_request_limit_is_a_draft_with_an_upload_session(graph, clock, tmp_path):
    message, expected = large_message(tmp_path)
    sender_for(graph, clock).send(message, **ledger(graph))
    assert graph.events == [
        "createMessage",
        "createUploadSession",
        *["uploadChunk"] * 4,
        "addAttachment",
        "on_sending",
        "send",
        ("on_accepted", message.recipients, True),
    ]
    (delivered,) = graph.delivered
    assert delivered.via == "draft" and delivered.message_id == message.message_id
    assert delivered.recipients == ["a@x.example", "b@x.example"]
    assert attachments_of(delivered) == expected
    ranges = [c["headers"]["Content-Range"] for c in graph.calls if c["operation"] == "uploadChunk"]
    size = 3 * MiB + MiB // 2
    assert ranges == [f"bytes {o}-{min(o + CHUNK, size) - 1}/{size}" for o in range(0, size, CHUNK)]
    assert graph.drafts == {} and graph.sessions == {}


def test_a_413_on_sendmail_falls_back_to_a_draft(graph, clock):
    graph.fault("sendMail", graph_refusal(413, "RequestEntityTooLarge"))
    message = small_message()
    sender_for(graph, clock).send(message, **ledger(graph))
    assert graph.events == [
        "on_sending",
        "sendMail",
        "createMessage",
        "on_sending",
        "send",
        ("on_accepted", message.recipients, True),
    ]
    assert [d.via for d in graph.delivered] == ["draft"]


def test_a_413_without_mail_readwrite_fails_and_sends_nothing(graph, clock):
    graph.fault("sendMail", graph_refusal(413, "RequestEntityTooLarge"))
    with pytest.raises(MessageTooLargeError, match="MaxSendSize"):
        sender_for(graph, clock, can_draft=False).send(small_message())
    assert graph.events == ["sendMail"] and graph.delivered == []


def test_large_mail_without_mail_readwrite_fails_before_any_request(graph, clock, tmp_path):
    message, _ = large_message(tmp_path)
    with pytest.raises(MessageTooLargeError, match="Mail.ReadWrite"):
        sender_for(graph, clock, can_draft=False).send(message)
    assert graph.events == []


def test_a_chunk_that_arrived_unanswered_resumes_at_the_next_one(graph, clock, tmp_path):
    message, expected = large_message(tmp_path)
    graph.fault("uploadChunk", NoAnswer("no answer from Graph (ReadTimeout)"), when="after", skip=1)
    sender_for(graph, clock).send(message)
    ranges = [
        c["headers"]["Content-Range"].split()[1].split("/")[0]
        for c in graph.calls
        if "Content-Range" in c.get("headers", {})
    ]
    assert ranges == ["0-1048575", "1048576-2097151", "1048576-2097151", "2097152-3145727", "3145728-3670015"], (
        "the unanswered chunk once more (416 invalidRange: it had arrived), then the next one"
    )
    assert graph.drafts_created == 1
    (delivered,) = graph.delivered
    assert attachments_of(delivered) == expected


def test_a_chunk_lost_before_arriving_is_sent_again(graph, clock, tmp_path):
    message, expected = large_message(tmp_path)
    graph.fault("uploadChunk", NoAnswer("no answer from Graph (ConnectionError)"), when="before", skip=2)
    sender_for(graph, clock).send(message)
    assert graph.events.count("uploadChunk") == 5 and graph.drafts_created == 1
    (delivered,) = graph.delivered
    assert attachments_of(delivered) == expected


def test_a_lost_last_chunk_starts_over_with_a_new_draft(graph, clock, tmp_path):
    message, expected = large_message(tmp_path)
    graph.fault("uploadChunk", NoAnswer("no answer from Graph (ReadTimeout)"), when="after", skip=3)
    sender_for(graph, clock).send(message, **ledger(graph))
    assert graph.drafts_created == 2 and graph.events.count("on_sending") == 1
    assert graph.events.count("send") == 1
    (delivered,) = graph.delivered
    assert attachments_of(delivered) == expected
    assert len(clock.slept) == 1
    assert graph.drafts == {}, "the abandoned draft was deleted, the other one sent"
    assert graph.events.index("deleteMessage") < graph.events.index("on_sending")


def test_a_draft_that_cannot_be_deleted_is_left_with_a_warning_and_the_mail_still_goes(graph, clock, tmp_path, caplog):
    message, expected = large_message(tmp_path)
    graph.fault("uploadChunk", graph_refusal(404, "itemNotFound"), skip=1)
    graph.fault("deleteMessage", graph_refusal(403, "ErrorAccessDenied"))
    with caplog.at_level("WARNING", logger="airflow_provider_o365mail.graph.sender"):
        sender_for(graph, clock).send(message)
    assert len(graph.drafts) == 1 and len(graph.delivered) == 1
    assert any("Could not delete the unsent draft" in r.getMessage() for r in caplog.records)


def test_a_permanent_failure_while_building_deletes_the_draft_and_sends_nothing(graph, clock, tmp_path):
    message, _ = large_message(tmp_path)
    graph.fault("createUploadSession", graph_refusal(400, "ErrorMessageSizeExceeded"))
    with pytest.raises(MessageTooLargeError):
        sender_for(graph, clock).send(message, **ledger(graph))
    assert graph.drafts == {} and graph.delivered == [] and "on_sending" not in graph.events


def test_a_draft_whose_send_got_no_answer_is_never_deleted(graph, clock, tmp_path):
    message, _ = large_message(tmp_path)
    graph.fault("send", NoAnswer("no answer from Graph (ReadTimeout)"), when="after")
    sender_for(graph, clock).send(message)
    assert "deleteMessage" not in graph.events


def test_a_lost_upload_session_starts_over(graph, clock, tmp_path):
    message, expected = large_message(tmp_path)
    graph.fault("uploadChunk", graph_refusal(404, "itemNotFound"), skip=1)
    sender_for(graph, clock).send(message)
    assert graph.drafts_created == 2
    (delivered,) = graph.delivered
    assert attachments_of(delivered) == expected


def test_a_send_lost_before_delivery_is_not_found_in_sent_items_then_sent_again(graph, clock):
    message = small_message()
    graph.fault("sendMail", NoAnswer("no answer from Graph (ReadTimeout)"))
    sender_for(graph, clock).send(message, **ledger(graph))
    assert graph.events == [
        "on_sending",
        "sendMail",
        ("on_accepted", (), False),
        "on_sending",
        "sendMail",
        ("on_accepted", message.recipients, True),
    ]
    assert len(graph.delivered) == 1


def test_a_send_answered_by_nothing_after_delivery_is_found_and_not_resent(graph, clock):
    message = small_message()
    graph.fault("sendMail", NoAnswer("Graph answered HTTP 504 GatewayTimeout"), when="after")
    result = sender_for(graph, clock).send(message, **ledger(graph))
    assert graph.events == ["on_sending", "sendMail", ("on_accepted", message.recipients, True)]
    assert len(graph.delivered) == 1 and result.accepted == message.recipients


def test_a_draft_send_answered_by_nothing_after_delivery_is_not_resent(graph, clock, tmp_path):
    message, _ = large_message(tmp_path)
    graph.fault("send", NoAnswer("no answer from Graph (ReadTimeout)"), when="after")
    sender_for(graph, clock).send(message)
    assert len(graph.delivered) == 1 and graph.drafts_created == 1


def test_without_a_sent_items_lookup_an_unknown_outcome_is_resent(graph, clock):
    """Documented behaviour: no lookup configured means "not found" (with a warning)."""
    graph.fault("sendMail", NoAnswer("lost"), when="after")
    sender_for(graph, clock, lookup=False).send(small_message())
    assert len(graph.delivered) == 2


def test_attempts_are_bounded_and_nothing_is_sent(graph, clock):
    for _ in range(6):
        graph.fault("sendMail", NoAnswer("no answer from Graph (ReadTimeout)"))
    with pytest.raises(MailServerUnavailable, match="failed 4 times") as caught:
        sender_for(graph, clock).send(small_message())
    assert graph.events.count("sendMail") == 4 and graph.delivered == []
    assert "Nothing was sent twice" in str(caught.value) and len(clock.slept) == 3


def test_check_sent_first_skips_a_message_already_in_sent_items(graph, clock):
    message = small_message()
    sender = sender_for(graph, clock)
    sender.send(message)
    graph.events.clear()
    result = sender.send(message, check_sent_first=True, **ledger(graph))
    assert result.already_sent and graph.events == [("on_accepted", message.recipients, True)]
    assert len(graph.delivered) == 1


def test_check_sent_first_sends_a_message_not_in_sent_items(graph, clock):
    message = small_message()
    result = sender_for(graph, clock).send(message, check_sent_first=True)
    assert not result.already_sent and len(graph.delivered) == 1


def test_check_sent_first_counts_copies_of_earlier_transactions(graph, clock):
    """One copy known from an earlier accepted transaction (copies=1) is not this try's copy."""
    message = small_message()
    sender = sender_for(graph, clock)
    sender.send(message)
    sender.send(message, check_sent_first=True, copies=1)
    assert len(graph.delivered) == 2


def test_a_partial_resend_reaches_only_pending_recipients(graph, clock):
    message = small_message()
    sender_for(graph, clock).send(message, already_accepted=["a@x.example"], **ledger(graph))
    (delivered,) = graph.delivered
    assert delivered.recipients == ["b@x.example"]
    assert graph.events[-1] == ("on_accepted", ("b@x.example",), True)


def test_nothing_pending_sends_nothing(graph, clock):
    message = small_message()
    result = sender_for(graph, clock).send(message, already_accepted=message.recipients)
    assert result.already_sent and graph.events == []
