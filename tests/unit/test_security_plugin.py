"""Issue #15 plugin pieces without a server: URL encoding of conn ids, escaping of every value the
pages show, peeking a flow does not use it up."""

from __future__ import annotations

import datetime as dt
import re
import time
import uuid
from html.parser import HTMLParser

import pytest

from airflow_provider_o365mail.exceptions import InvalidRequestError
from airflow_provider_o365mail.plugins import pages
from airflow_provider_o365mail.plugins.flow_store import PendingFlow, consume_flow, peek_flow, save_flow


@pytest.mark.parametrize(
    ("conn_id", "path"),
    [
        ("x/../../../api/v2/variables", "/o365mail/authorize/x%2F..%2F..%2F..%2Fapi%2Fv2%2Fvariables"),
        ("a b?c#d", "/o365mail/authorize/a%20b%3Fc%23d"),
        ("plain_id", "/o365mail/authorize/plain_id"),
    ],
)
def test_the_authorize_form_posts_to_the_encoded_id(conn_id, path):
    html = pages.index_page(
        "http://x/o365mail/callback",
        [
            {
                "conn_id": conn_id,
                "mailbox": None,
                "grant_type": "authorization_code",
                "state": "needs-consent",
                "state_text": "needs consent",
            }
        ],
    )
    (action,) = re.findall(r"<form method='post' action='([^']+)'>", html)
    assert action == path


HOSTILE = """<script>alert('x')</script><img src=x onerror="alert(1)">&amp;"""


class Parsed(HTMLParser):
    """What a browser would make of a page: its elements (tag, attributes) and its text."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.text = ""
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text += data

    def attribute(self, name: str) -> list[str | None]:
        return [attrs[name] for _, attrs in self.elements if name in attrs]

    def count(self, tag: str) -> int:
        return sum(1 for t, _ in self.elements if t == tag)


def hostile_row() -> dict:
    """A connection state in which every value a user or an identity provider can influence is hostile."""
    return {
        "conn_id": "o365mail_" + HOSTILE,
        "source": HOSTILE,
        "authorize_note": HOSTILE,
        "mailbox": HOSTILE,
        "grant_type": "authorization_code",
        "credential_type": "secret",
        "state": HOSTILE,
        "level": HOSTILE,
        "state_text": HOSTILE,
        "last_error": "GrantRevoked: " + HOSTILE,
        "last_error_current": True,
        "last_error_at": "2026-12-02T01:00:00+00:00",
        "secret_expires_on": HOSTILE,
        "secret_days_left": 3,
        "secret_level": HOSTILE,
    }


def test_every_value_of_the_page_and_its_check_answer_is_escaped():
    now = dt.datetime(2026, 12, 2, 2, 0, tzinfo=dt.UTC)
    page = Parsed(pages.index_page("http://x/" + HOSTILE, [hostile_row()], now=now))
    cells = Parsed(pages.row_cells(hostile_row(), now))  # the Check answer's row_html
    assert page.count("script") == 1, "only the page's own script"
    assert cells.count("script") == 0 and page.count("img") == cells.count("img") == 0
    assert not [a for p in (page, cells) for _, attrs in p.elements for a in attrs if a.startswith("on")]
    # Each value comes back whole (not cut, not escaped twice), as text or as one attribute's value.
    texts = "id, source, note, mailbox, state, state text, error, secret expiry"
    assert cells.text.count(HOSTILE) == 8, texts
    assert page.text.count(HOSTILE) == 9, texts + " and the callback URL"
    assert "http://x/" + HOSTILE in page.text
    for parsed in (page, cells):
        assert parsed.attribute("title") == ["GrantRevoked: " + HOSTILE]
        assert parsed.attribute("data-state") == [HOSTILE] and parsed.attribute("data-level") == [HOSTILE]
        assert "authorize-o365mail_" + HOSTILE in parsed.attribute("id")
        assert "o365mail_" + HOSTILE in parsed.attribute("data-conn-id")
    assert page.attribute("data-source") == [HOSTILE]


def test_the_result_page_escapes_the_message_the_connection_id_and_the_scopes():
    page = Parsed(pages.result_page(ok=False, conn_id=HOSTILE, message="AADSTS: " + HOSTILE, scopes=[HOSTILE]))
    assert page.count("script") == 1 and page.count("img") == 0
    assert page.text.count(HOSTILE) == 3, "message, scope, connection id"
    assert page.attribute("data-ok") == ["false"]


def test_peeking_a_flow_leaves_it_for_its_owner():
    from airflow.utils.session import create_session

    state = uuid.uuid4().hex
    pending = PendingFlow("c", "alice", "http://x/cb", time.time(), {"state": state, "auth_uri": "https://idp"})
    with create_session() as session:
        save_flow(pending, session=session)
    with create_session() as session:
        assert peek_flow(state, session=session).user_id == "alice"
    with create_session() as session:
        assert peek_flow(state, session=session).user_id == "alice", "still there"
        assert consume_flow(state, session=session).user_id == "alice"
    with create_session() as session, pytest.raises(InvalidRequestError, match="already used"):
        peek_flow(state, session=session)
