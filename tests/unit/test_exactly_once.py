"""Exactly-once sending without a sandbox: stable Message-IDs, the send ledger, Sent Items checks
after lost or stalled replies (fault proxy in front of a fake SMTP server), Exchange's blocking
replies, the recipient budget, streaming batches and progress lines."""

from __future__ import annotations

import contextlib
import email
import email.policy
import json
import logging
import smtplib
import threading
from collections import Counter, deque
from dataclasses import dataclass

import pytest

from airflow_provider_o365mail.core.batch import send_batch
from airflow_provider_o365mail.core.compose import plan_message
from airflow_provider_o365mail.core.message_ids import TaskIdentity, normalize_message_id, stable_message_id
from airflow_provider_o365mail.core.recipient_budget import RecipientBudget
from airflow_provider_o365mail.core.send_ledger import INDEX_KEY, SendLedger, ledger_key
from airflow_provider_o365mail.exceptions import (
    DeliveryUnknownError,
    MailServerError,
    MessageCompositionError,
    RecipientBudgetExceeded,
    SendingBlockedError,
)
from airflow_provider_o365mail.retry import Backoff
from airflow_provider_o365mail.smtp.replies import mailbox_block_hint
from airflow_provider_o365mail.smtp.sender import SmtpBatchSender
from airflow_provider_o365mail.testing.fake_smtp import FakeSmtpServer, SmtpScript
from airflow_provider_o365mail.testing.fault_proxy import FaultProxy, FaultRule

TI = TaskIdentity("reports", "scheduled__2026-12-01T00:00:00+00:00", "mail_customers", -1)


class DictStore:
    """The Variable backend's three calls over a dict (what runtime.default_variables() offers)."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.sets = 0

    def get(self, key: str) -> str | None:
        return self.data.get(key)

    def set(self, key: str, value: str, description: str = "") -> None:
        self.sets += 1
        self.data[key] = value

    def delete(self, key: str) -> None:
        self.data.pop(key, None)


@dataclass(frozen=True)
class Token:
    token: str
    expires_on: float


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def planned_batch(n: int, identity: TaskIdentity = TI):
    return [
        plan_message(
            sender="me@example.com",
            to=f"r{i}@example.com",
            subject=f"m{i}",
            text_content="body",
            message_id=stable_message_id(identity, i, "example.com"),
        )
        for i in range(n)
    ]


def sender(port: int, clock: Clock, *, attempts: int = 3, timeout: float = 5, **options) -> SmtpBatchSender:
    def login(force_refresh: bool):
        client = smtplib.SMTP("127.0.0.1", port, timeout=timeout)
        client.ehlo()
        return client, Token("t", clock() + 3600)

    return SmtpBatchSender(
        login,
        where=f"127.0.0.1:{port}",
        retry=Backoff(first=1.0, maximum=2.0, attempts=attempts, jitter=(1.0, 1.0)),
        clock=clock,
        sleep=clock.sleep,
        **options,
    )


def delivered_ids(server: FakeSmtpServer) -> Counter:
    return Counter(email.message_from_bytes(raw)["Message-ID"] for _, _, raw in server.delivered)


# ---------------------------------------------------------------------------- Message-IDs
def test_message_ids_are_stable_per_task_instance_and_position():
    first = [stable_message_id(TI, i, "contoso.com") for i in range(3)]
    assert first == [stable_message_id(TI, i, "contoso.com") for i in range(3)]  # every try
    assert len(set(first)) == 3 and all(m.endswith("@contoso.com>") for m in first)
    other_ti = TaskIdentity(TI.dag_id, TI.run_id, TI.task_id, map_index=0)
    assert stable_message_id(other_ti, 0, "contoso.com") != first[0]
    assert stable_message_id(TI, 0, "contoso.com", scope="notify:1:failed") != first[0]


def test_a_users_own_message_id_is_kept_and_checked():
    planned = plan_message(sender="me@example.com", to="a@example.com", message_id="mine.1@example.com")
    assert planned.message_id == "<mine.1@example.com>"
    assert planned.build().message["Message-ID"] == "<mine.1@example.com>"
    with pytest.raises(MessageCompositionError, match="not a valid Message-ID"):
        normalize_message_id("two words@example.com")


def test_plan_checks_everything_before_building(tmp_path):
    with pytest.raises(MessageCompositionError, match="not-an-address"):
        plan_message(sender="me@example.com", to="not-an-address")
    with pytest.raises(MessageCompositionError, match="line break"):
        plan_message(sender="me@example.com", to="a@example.com", subject="a\r\nBcc: x@evil.test")
    with pytest.raises(MessageCompositionError, match="Cannot read attachment"):
        plan_message(sender="me@example.com", to="a@example.com", files=[tmp_path / "missing.pdf"])
    attachment = tmp_path / "a.txt"
    attachment.write_text("v1")
    planned = plan_message(sender="me@example.com", to="a@example.com", bcc="b@example.com", files=[attachment])
    assert planned.recipients == ("a@example.com", "b@example.com")
    attachment.write_text("v2")  # nothing was read at planning time
    assert b"djI=" in planned.build().as_bytes()  # base64 of "v2"


# ---------------------------------------------------------------------------- ledger
def test_ledger_records_skips_and_outlives_the_batch_until_its_retention():
    store, clock = DictStore(), Clock()
    ledger = SendLedger(store, TI, clock=clock, retention=100)
    ledger.record("<a@x>", "accepted", 2)
    again = SendLedger(store, TI, clock=clock, retention=100)  # another worker, the next try
    assert again.state("<a@x>") == "accepted" and again.entries()["<a@x>"]["recipients"] == 2
    assert ledger_key(TI) in json.loads(store.data[INDEX_KEY])
    clock.now += 50
    again.finish()  # the batch went through: kept, so a try killed before Airflow saw the success skips it
    assert SendLedger(store, TI).state("<a@x>") == "accepted"
    assert json.loads(store.data[INDEX_KEY])[ledger_key(TI)] == clock.now + 100  # retention from the finish
    again.delete()
    assert ledger_key(TI) not in store.data and json.loads(store.data[INDEX_KEY]) == {}


def test_ledgers_past_their_retention_are_purged_by_the_next_ledger():
    store, clock = DictStore(), Clock()
    SendLedger(store, TI, clock=clock, retention=100).record("<a@x>", "accepted", 1)
    clock.now += 101
    other = TaskIdentity("d", "r", "t")
    SendLedger(store, other, clock=clock, retention=100).record("<b@x>", "accepted", 1)
    assert ledger_key(TI) not in store.data and ledger_key(other) in store.data
    assert set(json.loads(store.data[INDEX_KEY])) == {ledger_key(other)}


def test_a_retry_after_a_failed_batch_sends_only_the_rest_with_the_same_message_ids(caplog):
    """5 messages, message 3 gets 451 until the attempts run out; the task's retry sends 3, 4, 5."""
    store, clock = DictStore(), Clock()
    script = SmtpScript(offer_starttls=False, data_replies=deque(["250 ok", "250 ok", "451 4.7.0 later"] * 1))
    script.data_replies.append("451 4.7.0 later")
    with FakeSmtpServer(script) as server:
        with sender(server.port, clock, attempts=2) as s, pytest.raises(MailServerError, match="failed 2 times"):
            send_batch(s, planned_batch(5), ledger=SendLedger(store, TI, clock=clock))
        assert len(server.delivered) == 2
        caplog.set_level(logging.INFO, logger="airflow_provider_o365mail.core.batch")
        with sender(server.port, clock) as s:
            results = send_batch(s, planned_batch(5), ledger=SendLedger(store, TI, clock=clock))
    ids = [stable_message_id(TI, i, "example.com") for i in range(5)]
    assert [r.message_id for r in results] == ids
    assert [r.already_sent for r in results] == [True, True, False, False, False]
    assert delivered_ids(server) == Counter(ids)  # each exactly once, same Message-IDs
    assert f"skipping them: {ids[0]}, {ids[1]}" in caplog.text


# ---------------------------------------------------------------------------- ambiguous outcomes
def lost_reply_batch(action: str, lookup, *, timeout: float = 5, sent_items_wait: float = 10.0):
    """Message 1 of 2: the proxy forwards the end of DATA, then drops (or stalls) the server's reply."""
    clock = Clock()
    with FakeSmtpServer(SmtpScript(offer_starttls=False)) as server, FaultProxy(("127.0.0.1", server.port)) as proxy:
        if action == "drop":
            proxy.add_rule(FaultRule(direction="up", match=rb"\r\n\.\r\n", action="drop"))
        else:  # the server's 250 never comes back; the client's read times out
            proxy.add_rule(FaultRule(direction="down", match=rb"354 [^\r]*\r\n", action="stall"))
        recorded: list[str] = []
        inner = lookup(server)

        def looking(message_id: str) -> bool:
            # The fake server serves one session at a time: close the stalled one (the client gave up),
            # and let its thread record what it received (Sent Items would have it by the time it is read).
            proxy.drop()
            server.wait_sessions_closed()
            return inner(message_id)

        with sender(proxy.port, clock, timeout=timeout, sent_lookup=looking, sent_items_wait=sent_items_wait) as s:
            results = [s.send(m.build(), on_accepted=lambda mid, _, __: recorded.append(mid)) for m in planned_batch(2)]
        proxy.clear()
    return server, results, recorded


def in_server(server: FakeSmtpServer):
    return lambda message_id: delivered_ids(server)[message_id] > 0


@pytest.mark.parametrize("action", ["drop", "stall"])
def test_a_lost_or_stalled_reply_is_checked_in_sent_items_and_not_resent(action):
    server, results, recorded = lost_reply_batch(action, in_server, timeout=1.5)
    ids = [stable_message_id(TI, i, "example.com") for i in range(2)]
    assert delivered_ids(server) == Counter(ids)  # once each
    assert [r.message_id for r in results] == ids and recorded == ids


def test_the_copy_can_lag_the_sender_waits_for_it():
    looks: list[str] = []

    def lagging(server):
        def lookup(message_id: str) -> bool:
            looks.append(message_id)
            return len(looks) >= 3 and in_server(server)(message_id)

        return lookup

    server, _, _ = lost_reply_batch("drop", lagging)
    assert len(looks) == 3 and sum(delivered_ids(server).values()) == 2


def test_absent_from_sent_items_after_the_wait_means_resend():
    server, results, _ = lost_reply_batch("drop", lambda server: lambda mid: False, sent_items_wait=4.0)
    first = stable_message_id(TI, 0, "example.com")
    assert delivered_ids(server)[first] == 2  # the server had it; a lookup saying "absent" is believed


def test_an_unreadable_sent_items_leaves_the_outcome_unknown_and_the_ledger_says_so():
    def broken(_server):
        def lookup(message_id: str) -> bool:
            raise ConnectionResetError("imap down")

        return lookup

    with pytest.raises(DeliveryUnknownError, match="not sent again"):
        lost_reply_batch("drop", broken)
    store, clock = DictStore(), Clock()
    with FakeSmtpServer(SmtpScript(offer_starttls=False)) as server, FaultProxy(("127.0.0.1", server.port)) as proxy:
        proxy.add_rule(FaultRule(direction="up", match=rb"\r\n\.\r\n", action="drop"))
        with (
            sender(proxy.port, clock, sent_lookup=broken(server), sent_items_wait=2) as s,
            pytest.raises(DeliveryUnknownError),
        ):
            send_batch(s, planned_batch(2), ledger=SendLedger(store, TI, clock=clock))
        first = stable_message_id(TI, 0, "example.com")
        assert SendLedger(store, TI).state(first) == "sending"
        proxy.drop()
        server.wait_sessions_closed()  # what the dropped session received is recorded
        # Whether the server got the dot before the drop is a race; either way the retry must end
        # with the message there exactly once, and say "already sent" exactly when it was.
        reached = delivered_ids(server)[first] == 1
        with sender(server.port, clock, sent_lookup=in_server(server)) as s:  # the retry, IMAP is back
            results = send_batch(s, planned_batch(2), ledger=SendLedger(store, TI, clock=clock))
    assert results[0].already_sent == reached and delivered_ids(server) == Counter(
        stable_message_id(TI, i, "example.com") for i in range(2)
    )


# ---------------------------------------------------------------------------- Exchange's blocking replies
QUOTA = "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process message"


def test_mapping_of_replies_that_block_the_mailbox():
    assert "24 hours" in mailbox_block_hint(554, QUOTA)
    for code in ("5.2.251", "5.2.252", "5.2.253", "5.2.254", "5.2.255"):
        assert "throttles" in mailbox_block_hint(550, f"550 {code} whatever")
    assert mailbox_block_hint(550, "550 5.1.1 unknown user") is None
    assert mailbox_block_hint(451, "451 4.2.254 x") is None


def test_submission_quota_exceeded_fails_at_once_without_retries():
    clock = Clock()
    with (
        FakeSmtpServer(SmtpScript(offer_starttls=False, data_replies=deque([QUOTA]))) as server,
        sender(server.port, clock) as s,
        pytest.raises(SendingBlockedError, match="up to 24 hours") as err,
    ):
        send_batch(s, planned_batch(3))
    assert len(server.sessions) == 1 and not server.delivered and clock.now == 1_000_000.0
    assert err.value.__class__.__mro__.count(SendingBlockedError) == 1


def test_continuous_error_throttling_at_rcpt_stops_the_batch():
    clock = Clock()
    script = SmtpScript(offer_starttls=False, rcpt_replies={"r1@example.com": deque(["550 5.2.254 too many"])})
    with (
        FakeSmtpServer(script) as server,
        sender(server.port, clock) as s,
        pytest.raises(SendingBlockedError, match="fewer recipients"),
    ):
        send_batch(s, planned_batch(3))
    # message 0 went; message 1's only recipient was refused (the fake records an empty transaction); 2 was not tried
    assert [rcpts for _, rcpts, _ in server.delivered if rcpts] == [["r0@example.com"]]
    assert len(server.sessions[0].messages) == 2


# ---------------------------------------------------------------------------- recipient budget
def test_budget_fails_before_sending_and_says_when_it_frees_up():
    store, clock = DictStore(), Clock()
    budget = RecipientBudget(store, "me@example.com", 10, clock=clock)
    budget.reserve("ti-a", 6)
    budget.reserve("ti-a", 6)  # a retry of the same task instance counts once
    assert budget.used() == 6
    with pytest.raises(RecipientBudgetExceeded) as err:
        budget.reserve("ti-b", 5)
    text = str(err.value)
    assert "sent to 6 recipient(s)" in text and "needs 5 more" in text and "budget of 10" in text
    assert "1970-01-13 13:46 UTC" in text  # the first reservation (at 1_000_000) + 24 h
    clock.now += 24 * 3600
    budget.reserve("ti-b", 5)
    assert budget.used() == 5


def test_concurrent_reservations_hold_the_budget_exactly():
    store = DictStore()
    lock = threading.Lock()
    outcomes: list[bool] = []

    def task(n: int) -> None:
        budget = RecipientBudget(store, "me@example.com", 50, lock=lambda: lock)
        try:
            budget.reserve(f"ti-{n}", 7)
            outcomes.append(True)
        except RecipientBudgetExceeded:
            outcomes.append(False)

    threads = [threading.Thread(target=task, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count(True) == 7 and RecipientBudget(store, "me@example.com", 50).used() == 49


def test_a_retry_keeps_its_reservation_without_taking_the_lock():
    store, locked = DictStore(), []

    @contextlib.contextmanager
    def lock():
        locked.append(True)
        yield

    RecipientBudget(store, "me@example.com", 10, lock=lock).reserve("ti-1", 6)
    RecipientBudget(store, "me@example.com", 10, lock=lock).reserve("ti-1", 6)  # the task's retry
    assert locked == [True] and RecipientBudget(store, "me@example.com", 10).used() == 6
    with pytest.raises(RecipientBudgetExceeded):
        RecipientBudget(store, "me@example.com", 10, lock=lock).reserve("ti-2", 6)
    assert len(locked) == 2


# ---------------------------------------------------------------------------- streaming and progress
def test_a_batch_builds_one_message_at_a_time_and_logs_progress(caplog):
    built: list[int] = []
    alive: list[int] = []
    planned = []
    for p in planned_batch(60):

        def build(p=p, n=len(planned)):
            built.append(n)
            alive.append(len(built) - sent_count())
            return p.build()

        planned.append(type(p)(p.message_id, p.envelope_from, p.recipients, build))
    clock = Clock()
    with FakeSmtpServer(SmtpScript(offer_starttls=False)) as server:

        def sent_count() -> int:
            return len(server.delivered)

        caplog.set_level(logging.INFO, logger="airflow_provider_o365mail.core.batch")
        with sender(server.port, clock) as s:
            send_batch(s, planned, progress_every=25, clock=iter(range(0, 1000, 2)).__next__)
    assert built == list(range(60)) and max(alive) == 1  # never more than one built and unsent
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Sent ")]
    assert progress[0].startswith("Sent 25 of 60 message(s) (42%)") and "per minute" in progress[0]
    assert progress[-1].startswith("Sent 60 of 60")
    assert any("30 messages per minute" in r.getMessage() for r in caplog.records)


def test_a_large_attachment_is_streamed_from_its_file_and_arrives_intact(tmp_path):
    import os

    from airflow_provider_o365mail.core.compose import STREAM_THRESHOLD, compose_message

    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(STREAM_THRESHOLD * 3 + 17))  # not a multiple of 57: a short last line
    small = tmp_path / "small.txt"
    small.write_text("small")
    out = compose_message(sender="me@example.com", to="a@example.com", files=[big, small], text_content="x")
    assert len(out.streamed) == 1 and len(out.message.as_bytes()) < 10_000  # the tree holds a marker only
    raw = out.as_bytes()
    assert out.size() == len(raw)
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    files = {a.get_filename(): a.get_payload(decode=True) for a in parsed.iter_attachments()}
    assert files == {"big.bin": big.read_bytes(), "small.txt": b"small"}
    with FakeSmtpServer(SmtpScript(offer_starttls=False)) as server, sender(server.port, Clock()) as s:
        s.send(out)
    assert server.delivered[0][2].rstrip(b"\r\n") == raw.rstrip(b"\r\n")


def test_a_try_killed_during_a_transaction_leaves_sending_and_the_retry_checks_sent_items():
    store, clock = DictStore(), Clock()
    batch = planned_batch(3)
    with FakeSmtpServer(SmtpScript(offer_starttls=False)) as server:
        with sender(server.port, clock) as s:
            s.send(batch[0].build())  # delivered, then the worker died before the 250 was recorded
        SendLedger(store, TI, clock=clock).record(batch[0].message_id, "sending", 1)
        looked: list[str] = []

        def lookup(message_id: str) -> bool:
            looked.append(message_id)
            return in_server(server)(message_id)

        with sender(server.port, clock, sent_lookup=lookup) as s:
            results = send_batch(s, planned_batch(3), ledger=SendLedger(store, TI, clock=clock))
    assert looked == [batch[0].message_id] and results[0].already_sent
    assert delivered_ids(server) == Counter(p.message_id for p in batch)


# ---------------------------------------------------------------------------- deferred recipients, finished batches
def two_recipient_message(identity: TaskIdentity = TI):
    return plan_message(
        sender="me@example.com",
        to=["a@example.com", "b@example.com"],
        subject="two",
        text_content="body",
        message_id=stable_message_id(identity, 0, "example.com"),
    )


def test_recipients_deferred_when_a_try_dies_are_sent_by_the_retry_and_only_they():
    """RCPT b@ answers 451 until the try gives up: a@ got it; the retry sends it to b@ alone."""
    store, clock = DictStore(), Clock()
    script = SmtpScript(offer_starttls=False, rcpt_replies={"b@example.com": deque(["451 4.2.0 later"] * 2)})
    message = two_recipient_message()
    with FakeSmtpServer(script) as server:
        with sender(server.port, clock, attempts=2) as s, pytest.raises(MailServerError, match="deferred"):
            send_batch(s, [message], ledger=SendLedger(store, TI, clock=clock))
        entry = SendLedger(store, TI).entries()[message.message_id]
        assert entry["state"] == "partial" and entry["done"] == ["a@example.com"] and entry["copies"] == 1
        with sender(server.port, clock) as s:
            (result,) = send_batch(s, [message], ledger=SendLedger(store, TI, clock=clock))
    # (the fake server records the empty DATA of the all-deferred transaction with no recipients)
    assert [rcpts for _, rcpts, _ in server.delivered if rcpts] == [["a@example.com"], ["b@example.com"]]
    assert set(result.accepted) == {"a@example.com", "b@example.com"}
    assert SendLedger(store, TI).state(message.message_id) == "accepted"


@pytest.mark.parametrize("went_through", [True, False])
def test_a_kill_during_the_deferred_recipients_transaction_counts_sent_items_copies(went_through):
    """The ledger says a@ got it (1 copy) and a transaction for b@ had started: a second Sent Items
    copy means it went through (not resent); one copy means it did not (sent to b@ only)."""
    store, clock = DictStore(), Clock()
    message = two_recipient_message()
    SendLedger(store, TI, clock=clock).record(message.message_id, "sending", 2, done=["a@example.com"], copies=1)
    with FakeSmtpServer(SmtpScript(offer_starttls=False)) as server:
        copies = 2 if went_through else 1
        with sender(server.port, clock, sent_lookup=lambda _: copies, sent_items_wait=0) as s:
            (result,) = send_batch(s, [message], ledger=SendLedger(store, TI, clock=clock))
    assert result.already_sent is went_through
    assert [rcpts for _, rcpts, _ in server.delivered if rcpts] == ([] if went_through else [["b@example.com"]])
    assert SendLedger(store, TI).state(message.message_id) == "accepted"


def test_a_try_killed_after_the_batch_went_through_sends_nothing_again():
    """The ledger outlives a finished batch: a try killed after it (before Airflow recorded the
    success) is retried, and the retry skips every message."""
    store, clock = DictStore(), Clock()
    with FakeSmtpServer(SmtpScript(offer_starttls=False)) as server:
        ledger = SendLedger(store, TI, clock=clock)
        with sender(server.port, clock) as s:
            send_batch(s, planned_batch(4), ledger=ledger)
        ledger.finish()  # then SIGKILL: Airflow never saw the success
        with sender(server.port, clock) as s:
            again = send_batch(s, planned_batch(4), ledger=SendLedger(store, TI, clock=clock))
    assert all(r.already_sent for r in again)
    assert delivered_ids(server) == Counter(p.message_id for p in planned_batch(4))
