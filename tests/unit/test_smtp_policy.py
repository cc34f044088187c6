"""The SMTP submission policy the sandbox milter applies: session cap, injections, Sent Items routing."""

from __future__ import annotations

import threading

import pytest

from airflow_provider_o365mail.testing import sent_items
from airflow_provider_o365mail.testing.smtp_policy import CONCURRENCY_REPLY, Injection, Reply, SubmissionPolicy

ALEX, BLAIR = "alex@o365.sandbox.test", "blair@o365.sandbox.test"


def open_session(policy: SubmissionPolicy, session_id: int, mailbox: str | None = ALEX):
    policy.connect(session_id)
    return policy.mail(session_id, mailbox)


def test_fourth_session_of_a_mailbox_is_refused_until_one_closes():
    policy = SubmissionPolicy()
    assert all(open_session(policy, n).proceed for n in (1, 2, 3))
    refused = open_session(policy, 4)
    assert str(refused.reply) == CONCURRENCY_REPLY == "432 4.3.2 Concurrent connections limit exceeded."
    assert open_session(policy, 5, BLAIR).proceed  # per mailbox
    assert policy.mail(1, ALEX).proceed  # a second MAIL FROM in a counted session does not count again
    policy.close(2)
    assert policy.mail(4, ALEX).proceed
    state = policy.control({"op": "state"})
    assert state["active"] == {ALEX: 3, BLAIR: 1}
    assert state["max_concurrent"][ALEX] == 3
    assert state["refused"][ALEX] == 1


def test_unauthenticated_and_refused_sessions_hold_no_slot():
    policy = SubmissionPolicy(smtp_sessions=1)
    assert open_session(policy, 1, None).proceed
    assert open_session(policy, 2).proceed
    assert not open_session(policy, 3).proceed
    policy.close(3)  # closing a refused session frees nothing
    assert not open_session(policy, 4).proceed
    policy.close(2)
    assert policy.mail(4, ALEX).proceed


def test_injection_fires_count_times_at_its_stage_only():
    policy = SubmissionPolicy()
    policy.control({"op": "inject", "stage": "data", "reply": "451 4.7.0 Temporary server error", "count": 2})
    open_session(policy, 1)
    assert policy.rcpt(1).proceed
    decisions = [policy.end_of_data(1) for _ in range(3)]
    assert [str(d.reply) if d.reply else None for d in decisions] == [
        "451 4.7.0 Temporary server error",
        "451 4.7.0 Temporary server error",
        None,
    ]
    state = policy.control({"op": "state"})
    assert state["injections"] == []
    assert state["injected"][ALEX] == 2 and state["accepted"][ALEX] == 1


def test_injection_for_one_mailbox_only():
    policy = SubmissionPolicy()
    policy.control({"op": "inject", "stage": "mail", "reply": "550 5.2.252 send as denied", "mailbox": BLAIR.upper()})
    assert open_session(policy, 1, ALEX).proceed
    assert str(open_session(policy, 2, BLAIR).reply) == "550 5.2.252 send as denied"


def test_lost_reply_is_an_accepted_message():
    policy = SubmissionPolicy()
    policy.control({"op": "inject", "stage": "data", "lost_reply": True})
    open_session(policy, 1)
    decision = policy.end_of_data(1)
    assert decision.proceed and decision.lost_reply
    assert policy.control({"op": "state"})["lost_replies"] == {ALEX: 1}


@pytest.mark.parametrize(
    "fields",
    [
        {"stage": "helo", "reply": "554 5.0.0 no"},
        {"stage": "data", "reply": "250 2.0.0 fine"},
        {"stage": "data", "reply": "554 5.0.0 100% wrong"},
        {"stage": "mail", "lost_reply": True},
        {"stage": "data", "reply": "554 5.0.0 x", "lost_reply": True},
        {"stage": "data", "reply": "554 5.0.0 x", "count": 0},
    ],
)
def test_invalid_injections_are_refused(fields):
    with pytest.raises(ValueError):
        Injection(**fields)


def test_reply_parsing_keeps_codes_and_lines():
    reply = Reply.parse("554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException\nsecond line")
    assert (reply.code, reply.xcode, reply.lines) == (
        "554",
        "5.2.0",
        ("STOREDRV.Submission.Exception:SubmissionQuotaExceededException", "second line"),
    )
    assert Reply.parse("421").lines == ("",)


def test_control_rejects_unknown_operations_and_bad_limits():
    policy = SubmissionPolicy()
    with pytest.raises(ValueError):
        policy.control({"op": "explode"})
    with pytest.raises(ValueError):
        policy.control({"op": "set_limits", "smtp_sessions": 0})
    assert policy.control({"op": "set_limits", "smtp_sessions": 7})["smtp_sessions"] == 7


def test_concurrent_sessions_never_exceed_the_cap():
    policy = SubmissionPolicy(smtp_sessions=3)
    admitted: list[int] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        if open_session(policy, n).proceed:
            with lock:
                admitted.append(n)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 3


def test_sent_items_routing_round_trip_and_trace_stripping(tmp_path):
    address = sent_items.routing_address("Alex@O365.Sandbox.Test")
    assert address == "alex=o365.sandbox.test@sent-items.sandbox.invalid"
    assert sent_items.mailbox_of(f"<{address}>") == ALEX
    with pytest.raises(ValueError):
        sent_items.mailbox_of("nobody@sent-items.sandbox.invalid")
    raw = b"Subject: s\nMessage-ID: <m@x>\n\nbody\n"
    traced = (
        b"Received: from [127.0.0.1] (localhost [127.0.0.1])\n\tby smtp.o365.sandbox.test (Postfix) with ESMTPSA id X\n"
        b"\tfor <b@x>; Tue, 1 Dec 2026 21:00:00 +0000 (UTC)\n" + raw
    )
    assert sent_items.strip_submission_trace(traced, "smtp.o365.sandbox.test") == raw
    foreign = b"Received: from elsewhere\n\tby mx.example (Exim)\n" + raw
    assert sent_items.strip_submission_trace(foreign, "smtp.o365.sandbox.test") == foreign
    stored = sent_items.store(raw, tmp_path / "Maildir")
    assert stored.parent == tmp_path / "Maildir" / ".Sent Items" / "cur"
    assert stored.name.endswith(":2,S") and stored.read_bytes() == raw
    assert (tmp_path / "Maildir" / ".Sent Items" / "maildirfolder").exists()
