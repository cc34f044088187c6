"""Issue #15 plugin pieces without a server: URL encoding of conn ids, peeking a flow does not use it up."""

from __future__ import annotations

import re
import time
import uuid

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
