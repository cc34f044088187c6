"""The sandbox admin client sends a call again only when the server closed the connection unanswered."""

from __future__ import annotations

import socket
import threading

import pytest
import requests

from airflow_provider_o365mail.testing.admin import admin_request


def _serve(answers: list[bytes | None]) -> tuple[int, list[bytes]]:
    """Accept one connection per answer; ``None`` reads the request and closes without a response."""
    listener = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def run() -> None:
        with listener:
            for answer in answers:
                conn, _ = listener.accept()
                with conn:
                    received.append(conn.recv(65536))
                    if answer is not None:
                        conn.sendall(answer)

    threading.Thread(target=run, daemon=True).start()
    return listener.getsockname()[1], received


OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"


def test_a_connection_closed_before_answering_is_sent_once_more():
    port, received = _serve([None, OK])
    with requests.Session() as session:
        response = admin_request(session, "POST", f"http://127.0.0.1:{port}/reset", timeout=5)
    assert response.status_code == 200 and len(received) == 2


def test_a_refused_connection_is_not_retried():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens once it is closed
    with requests.Session() as session, pytest.raises(requests.ConnectionError):
        admin_request(session, "POST", f"http://127.0.0.1:{port}/reset", timeout=5)


def test_a_second_unanswered_close_is_raised():
    port, received = _serve([None, None])
    with requests.Session() as session, pytest.raises(requests.ConnectionError):
        admin_request(session, "POST", f"http://127.0.0.1:{port}/reset", timeout=5)
    assert len(received) == 2
