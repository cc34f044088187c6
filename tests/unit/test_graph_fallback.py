"""``transport: auto`` (SmtpThenGraph) with fake senders and an injected clock: Graph only after
Exchange's "SMTP AUTH is disabled" refusal, logged once, remembered for a while."""

from __future__ import annotations

import logging

import pytest

from airflow_provider_o365mail.core.compose import compose_message
from airflow_provider_o365mail.core.sending import SendResult
from airflow_provider_o365mail.exceptions import MailAuthenticationError, MessageRejectedError
from airflow_provider_o365mail.hooks import fallback
from airflow_provider_o365mail.hooks.fallback import REMEMBER_SECONDS, SmtpThenGraph, smtp_auth_disabled

DISABLED_REPLY = (
    "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the "
    "Tenant. Visit https://aka.ms/smtp_auth_disabled for more information."
)
DISABLED = MailAuthenticationError(f"SMTP login refused: {DISABLED_REPLY}", reply=DISABLED_REPLY)
LOGGER = "airflow_provider_o365mail.hooks.fallback"


class FakeSender:
    """A MessageSender that records sends, or raises ``error`` on each."""

    def __init__(self, name: str, made: list[str], sent: list[tuple[str, str]], error: BaseException | None = None):
        self.name, self.made, self.sent, self.error = name, made, sent, error
        made.append(name)
        self.closed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.closed = True

    def send(self, message, **options):
        if self.error is not None:
            raise self.error
        self.sent.append((self.name, message.message_id))
        return SendResult(message.message_id, accepted=message.recipients)


class Clock:
    def __init__(self) -> None:
        self.now = 5_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def _forget():
    fallback.forget_disabled()
    yield
    fallback.forget_disabled()


@pytest.fixture
def clock() -> Clock:
    return Clock()


class World:
    def __init__(self, clock: Clock, smtp_error: BaseException | None = DISABLED) -> None:
        self.clock = clock
        self.smtp_error = smtp_error
        self.made: list[str] = []
        self.sent: list[tuple[str, str]] = []

    def auto(self, key=("o365mail_a", "alex@x.example")) -> SmtpThenGraph:
        return SmtpThenGraph(
            lambda: FakeSender("smtp", self.made, self.sent, self.smtp_error),
            lambda: FakeSender("graph", self.made, self.sent),
            key=key,
            what="alex@x.example (connection o365mail_a)",
            clock=self.clock,
        )


def message(n: int = 0):
    return compose_message(sender="alex@x.example", to="b@x.example", subject=f"m{n}", text_content="x")


def switch_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and "SMTP AUTH is disabled" in r.getMessage()]


def test_smtp_auth_disabled_sends_the_same_message_by_graph_and_logs_why(clock, caplog):
    world = World(clock)
    m = message()
    with caplog.at_level(logging.WARNING, logger=LOGGER), world.auto() as auto:
        result = auto.send(m)
    assert world.sent == [("graph", m.message_id)] and result.message_id == m.message_id
    assert auto.transport_used == "graph"
    (warning,) = switch_warnings(caplog)
    assert "5.7.139" in warning and "alex@x.example (connection o365mail_a)" in warning


def test_the_switch_is_logged_once_per_key_and_smtp_is_not_tried_again(clock, caplog):
    world = World(clock)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for n in range(3):  # three tasks of one process, each with its own sender
            clock.now += 60
            with world.auto() as auto:
                auto.send(message(n))
                auto.send(message(n + 10))
        with world.auto(key=("o365mail_b", "alex@x.example")) as other:
            other.send(message(99))
    assert len(switch_warnings(caplog)) == 2, "once for each connection and mailbox"
    assert world.made.count("smtp") == 2, "SMTP tried once per key, then remembered"
    assert [name for name, _ in world.sent] == ["graph"] * 7


def test_two_tasks_refused_at_once_log_the_switch_once(clock, caplog):
    """Both tasks tried SMTP before either had remembered the refusal: one warning, both by Graph."""
    world = World(clock)
    second = world.auto()
    second_message = message(2)

    class RefusedWhileAnotherTries(FakeSender):
        def send(self, m, **options):
            if self.name == "smtp" and not world.sent:
                second.send(second_message)  # the other task meets the refusal first
            return super().send(m, **options)

    first = SmtpThenGraph(
        lambda: RefusedWhileAnotherTries("smtp", world.made, world.sent, DISABLED),
        lambda: FakeSender("graph", world.made, world.sent),
        key=("o365mail_a", "alex@x.example"),
        what="alex@x.example (connection o365mail_a)",
        clock=clock,
    )
    first_message = message(1)
    with caplog.at_level(logging.WARNING, logger=LOGGER), first, second:
        first.send(first_message)
    assert world.made.count("smtp") == 2
    assert world.sent == [("graph", second_message.message_id), ("graph", first_message.message_id)]
    assert len(switch_warnings(caplog)) == 1


def test_smtp_is_tried_again_after_remember_seconds(clock):
    world = World(clock)
    with world.auto() as auto:
        auto.send(message(1))
    clock.now += REMEMBER_SECONDS - 1
    with world.auto() as auto:
        auto.send(message(2))
    assert world.made == ["smtp", "graph", "graph"]
    clock.now += 2  # more than REMEMBER_SECONDS after the refusal was last seen
    world.smtp_error = None  # an admin turned SMTP AUTH back on
    with world.auto() as auto:
        auto.send(message(3))
        assert auto.transport_used == "smtp"
    assert world.sent[-1][0] == "smtp"


def test_smtp_keeps_sending_while_it_works(clock):
    world = World(clock, smtp_error=None)
    with world.auto() as auto:
        auto.send(message(1))
        auto.send(message(2))
    assert world.made == ["smtp"] and [name for name, _ in world.sent] == ["smtp", "smtp"]


@pytest.mark.parametrize(
    "error",
    [
        MailAuthenticationError("535 5.7.3 Authentication unsuccessful", reply="535 5.7.3 Authentication unsuccessful"),
        MailAuthenticationError(
            "SMTP login failed. If the reply says 5.7.139, SMTP AUTH is disabled...",
            reply="535 5.7.8 Error: authentication failed: invalid token",
        ),
        MessageRejectedError("550 5.7.139 something else mentioning the code"),
    ],
    ids=["5.7.3", "bad-token-with-advice-naming-5.7.139", "not-an-auth-error"],
)
def test_other_errors_propagate_and_graph_is_never_used(clock, caplog, error):
    world = World(clock, smtp_error=error)
    with caplog.at_level(logging.WARNING, logger=LOGGER), pytest.raises(type(error)), world.auto() as auto:
        auto.send(message())
    assert "graph" not in world.made and world.sent == [] and switch_warnings(caplog) == []
    world.smtp_error = None
    with world.auto() as auto:
        auto.send(message(1))
    assert world.sent[-1][0] == "smtp", "nothing was remembered"


def test_the_marker_is_recognised_alone_or_by_its_words():
    assert smtp_auth_disabled(DISABLED)
    locked = "535 5.7.139 Authentication unsuccessful, user is locked"
    assert smtp_auth_disabled(MailAuthenticationError("refused", reply=locked))
    words = "535 5.7.8 Error: authentication failed: Authentication unsuccessful, SmtpClientAuthentication is disabled"
    assert smtp_auth_disabled(MailAuthenticationError("refused", reply=words))
    assert not smtp_auth_disabled(MailAuthenticationError("refused", reply="535 5.7.3 Authentication unsuccessful"))
    assert not smtp_auth_disabled(MailAuthenticationError("advice: if the reply says 5.7.139 ...")), "the reply decides"
    assert not smtp_auth_disabled(MessageRejectedError("550 5.7.139 refused after the login")), "only a login refusal"


def test_closing_closes_the_senders_it_opened(clock):
    world = World(clock)
    opened: list[FakeSender] = []

    def graph():
        opened.append(FakeSender("graph", world.made, world.sent))
        return opened[-1]

    auto = SmtpThenGraph(
        lambda: FakeSender("smtp", world.made, world.sent, DISABLED), graph, key="k", what="w", clock=clock
    )
    with auto:
        auto.send(message())
    assert opened and opened[0].closed
