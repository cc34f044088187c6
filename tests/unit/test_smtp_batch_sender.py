"""SmtpBatchSender's retries and re-AUTH with a fake login, a fake server, an injected clock and sleep.

No identity provider, no TLS: the sender only needs ``login(force_refresh)``; the hook supplies the
real one (STARTTLS + XOAUTH2, tested against the sandbox).
"""

from __future__ import annotations

import smtplib
from collections import deque
from dataclasses import dataclass

import pytest

from airflow_provider_o365mail.core.compose import compose_message
from airflow_provider_o365mail.exceptions import MailServerError, MessageRejectedError
from airflow_provider_o365mail.retry import Backoff
from airflow_provider_o365mail.smtp.sender import SmtpBatchSender
from airflow_provider_o365mail.testing.fake_smtp import FakeSmtpServer, SmtpScript


@dataclass(frozen=True)
class Token:
    token: str
    expires_on: float


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def plain_login(server: FakeSmtpServer, clock: Clock, logins: list[bool], lifetime: float = 3600.0):
    def login(force_refresh: bool):
        logins.append(force_refresh)
        client = smtplib.SMTP("127.0.0.1", server.port, timeout=5)
        client.ehlo()
        return client, Token(f"token-{len(logins)}", clock() + lifetime)

    return login


def message(n: int = 1):
    return compose_message(sender="me@example.com", to="you@example.com", subject=f"m{n}", text_content="body")


def sender_for(server, clock, logins, **options) -> SmtpBatchSender:
    options.setdefault("retry", Backoff(first=2.0, maximum=8.0, attempts=4, jitter=(1.0, 1.0)))
    return SmtpBatchSender(
        plain_login(server, clock, logins, options.pop("lifetime", 3600.0)),
        where=f"127.0.0.1:{server.port}",
        clock=clock,
        sleep=clock.sleep,
        **options,
    )


def test_one_session_serves_the_whole_batch(clock):
    logins: list[bool] = []
    with FakeSmtpServer(SmtpScript(offer_starttls=False)) as server, sender_for(server, clock, logins) as sender:
        for n in range(5):
            sender.send(message(n))
    assert logins == [False] and len(server.sessions) == 1 and len(server.delivered) == 5


def test_a_token_near_expiry_logs_in_again_with_a_fresh_token(clock):
    logins: list[bool] = []
    script = SmtpScript(offer_starttls=False)
    with FakeSmtpServer(script) as server, sender_for(server, clock, logins, lifetime=600.0) as sender:
        sender.send(message(1))
        clock.now += 500  # 100 s left: inside the 120 s margin
        sender.send(message(2))
    assert logins == [False, True], "the second login forces a refresh"
    assert len(server.sessions) == 2 and len(server.delivered) == 2


def test_temporary_connect_refusals_back_off_exponentially_then_succeed(clock):
    logins: list[bool] = []
    script = SmtpScript(
        offer_starttls=False, connect_replies=deque(["432 4.3.2 Concurrent connections limit exceeded"] * 2)
    )
    with FakeSmtpServer(script) as server, sender_for(server, clock, logins) as sender:
        result = sender.send(message())
    assert result.accepted == ("you@example.com",)
    assert clock.slept == [2.0, 4.0] and len(server.delivered) == 1


def test_temporary_failures_give_up_after_the_policy_s_attempts(clock):
    logins: list[bool] = []
    script = SmtpScript(offer_starttls=False, data_replies=deque(["451 4.3.0 try later"] * 10))
    with (
        FakeSmtpServer(script) as server,
        sender_for(server, clock, logins) as sender,
        pytest.raises(MailServerError, match=r"failed 4 times.*451 4\.3\.0.*Airflow pool") as err,
    ):
        sender.send(message())
    assert not isinstance(err.value, MessageRejectedError)
    assert clock.slept == [2.0, 4.0, 8.0] and not server.delivered


def test_a_dropped_session_is_reopened_and_the_message_sent_once(clock):
    logins: list[bool] = []
    script = SmtpScript(offer_starttls=False, drop_after_messages=deque([1]))
    with FakeSmtpServer(script) as server, sender_for(server, clock, logins) as sender:
        sender.send(message(1))
        sender.send(message(2))
    assert [subject for _, _, data in server.delivered for subject in [data.split(b"Subject: ")[1][:2]]] == [
        b"m1",
        b"m2",
    ]
    assert len(logins) == 2


def test_permanent_data_refusal_is_not_retried(clock):
    logins: list[bool] = []
    script = SmtpScript(offer_starttls=False, data_replies=deque(["554 5.6.0 content refused"]))
    with (
        FakeSmtpServer(script) as server,
        sender_for(server, clock, logins) as sender,
        pytest.raises(MessageRejectedError, match="554 5.6.0"),
    ):
        sender.send(message())
    assert clock.slept == [] and len(server.sessions) == 1


def test_an_unbounded_policy_is_refused():
    with pytest.raises(ValueError, match="bounded"):
        SmtpBatchSender(lambda force: None, where="x", retry=Backoff())  # type: ignore[arg-type,return-value]


# ---------------------------------------------------------------------- per-mailbox session budget
def test_senders_of_one_process_never_hold_more_sessions_than_the_budget(clock):
    import threading
    import time as real_time

    from airflow_provider_o365mail.core.budget import ConnectionBudget

    budget = ConnectionBudget(3, what="SMTP sessions of conn/me", option="max_smtp_sessions_per_mailbox")
    script = SmtpScript(offer_starttls=False)
    with FakeSmtpServer(script) as server:

        def batch(n: int) -> None:
            sender = SmtpBatchSender(
                plain_login(server, clock, []), where="fake", session_slot=budget.slot, clock=clock, sleep=clock.sleep
            )
            with sender:
                sender.send(message(n))
                real_time.sleep(0.02)  # keep the session open while others want one

        threads = [threading.Thread(target=batch, args=(n,)) for n in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(server.delivered) == 12
    assert budget.max_in_use == 3 and budget.in_use == 0, "at most 3 at once, every slot returned"


def test_a_432_at_login_is_retried_and_the_session_holds_one_slot(clock):
    from airflow_provider_o365mail.core.budget import ConnectionBudget

    budget = ConnectionBudget(1, what="SMTP sessions", option="max_smtp_sessions_per_mailbox")
    script = SmtpScript(
        offer_starttls=False, connect_replies=deque(["432 4.3.2 Concurrent connections limit exceeded"] * 2)
    )
    with FakeSmtpServer(script) as server, sender_for(server, clock, [], session_slot=budget.slot) as sender:
        result = sender.send(message())
        assert budget.in_use == 1, "the open session holds its slot"
    assert result.accepted == ("you@example.com",) and clock.slept == [2.0, 4.0]
    assert budget.in_use == 0 and budget.max_in_use == 1


def test_a_budget_that_stays_busy_says_which_option_to_change():
    from airflow_provider_o365mail.core.budget import ConnectionBudget
    from airflow_provider_o365mail.exceptions import MailServerUnavailable

    budget = ConnectionBudget(1, what="SMTP sessions", option="max_smtp_sessions_per_mailbox", acquire_timeout=0.05)
    fix = r"\[o365mail\] max_smtp_sessions_per_mailbox"
    with budget.slot(), pytest.raises(MailServerUnavailable, match=fix), budget.slot():
        pass
