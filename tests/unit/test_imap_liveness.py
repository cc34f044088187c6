"""Dead-peer detection settings: the socket options every IMAP connection gets, and the bounds they give."""

from __future__ import annotations

import socket

import pytest

from airflow_provider_o365mail.imap import liveness


def test_keepalive_and_user_timeout_are_set_on_a_real_socket():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        liveness.keep_alive(sock)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == liveness.KEEPALIVE_IDLE_SECONDS
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == liveness.KEEPALIVE_INTERVAL_SECONDS
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == liveness.KEEPALIVE_PROBES
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == liveness.USER_TIMEOUT_SECONDS * 1000


def test_a_socket_that_refuses_the_options_still_works():
    class Refusing:
        def setsockopt(self, *args):
            raise OSError("not supported")

    liveness.keep_alive(Refusing())  # no error: the connection just notices a silent drop later


def test_the_documented_bounds_hold_for_the_chosen_timings():
    # Hung peer (TCP up, nobody answers): the next probe plus its answer deadline, with margin to 60 s.
    assert liveness.PROBE_SECONDS + liveness.PROBE_ANSWER_SECONDS <= 45
    # Silent drop: keepalive's end, or a probe sent into the dead path just before it (then its
    # answer deadline), with margin to 30 s.
    keepalive_end = liveness.KEEPALIVE_IDLE_SECONDS + liveness.KEEPALIVE_INTERVAL_SECONDS * liveness.KEEPALIVE_PROBES
    assert keepalive_end == liveness.USER_TIMEOUT_SECONDS
    assert liveness.USER_TIMEOUT_SECONDS + liveness.PROBE_ANSWER_SECONDS <= 25


@pytest.mark.parametrize(("timeout", "expected"), [(30.0, 10.0), (5.0, 5.0), (0.0, 10.0)])
def test_a_probe_never_waits_longer_than_the_connections_timeout(timeout, expected):
    assert liveness.answer_deadline(timeout) == expected
