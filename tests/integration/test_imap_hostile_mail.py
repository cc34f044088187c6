"""Poison messages next to good mail: the good mail is delivered in the first poke, nothing raises.

10,000 MIME parts (BODYSTRUCTURE over imaplib's 1 MB line limit), nesting 1,000 levels deep, a 100 MB
header and 200 attachments with 8,000-character names, in one folder between two good messages.
"""

from __future__ import annotations

import uuid

import pytest

from airflow_provider_o365mail.sensors.imap import O365ImapSensor
from airflow_provider_o365mail.testing import hostile_mail


@pytest.fixture(scope="module")
def poisoned_folder(o365_sandbox):
    sbx = o365_sandbox
    folder = f"Poison {uuid.uuid4().hex[:8]}"
    tag = uuid.uuid4().hex[:8]
    deliveries = [
        hostile_mail.good_message(sbx.user, subject=f"good {tag} first"),
        hostile_mail.many_parts(10_000),
        hostile_mail.deeply_nested(1_000),
        hostile_mail.huge_header(100 * 1024 * 1024),
        hostile_mail.huge_filenames(200, 8_000),
        hostile_mail.good_message(sbx.user, subject=f"good {tag} last"),
    ]
    uids = [hostile_mail.deliver(sbx, sbx.user, raw, folder=folder) for raw in deliveries]
    del deliveries
    return folder, tag, uids


def test_poison_messages_hide_no_good_mail_in_the_first_poke(o365mail_conn, poisoned_folder):
    folder, tag, uids = poisoned_folder
    result = O365ImapSensor(task_id="poison", conn_id=o365mail_conn, folders=folder).poke({})
    assert result, "the first poke finds the mail"
    by_uid = {m["uid"]: m for m in result.xcom_value}
    assert sorted(by_uid) == sorted(uids), "every message is reported, none hides another"
    assert by_uid[uids[0]]["subject"] == f"good {tag} first" and by_uid[uids[-1]]["subject"] == f"good {tag} last"
    assert not by_uid[uids[0]].get("unparsed") and not by_uid[uids[-1]].get("unparsed")
    unparsed = {uid for uid, m in by_uid.items() if m.get("unparsed")}
    # 200 names of 8,000 characters make a BODYSTRUCTURE line over imaplib's 1 MB limit (Dovecot cuts
    # its own MIME parsing at 10,000 parts and 100 levels, so those two stay under it here).
    assert unparsed == {uids[4]}, f"unparsed: {sorted(unparsed)}"
    assert by_uid[uids[4]]["attachments"] == [] and by_uid[uids[4]]["message_id"]
    assert by_uid[uids[3]]["subject"] == f"{100 * 1024 * 1024} byte header", "read from the first 64 KiB"


def test_attachment_criteria_skip_what_cannot_be_parsed_with_a_warning(o365mail_conn, poisoned_folder, caplog):
    folder, _tag, uids = poisoned_folder
    sensor = O365ImapSensor(task_id="poison_pdf", conn_id=o365mail_conn, folders=folder, attachment_name="*.pdf")
    assert sensor.poke({}) is False, "no readable .pdf attachment; the check itself does not fail"
    assert f"UID {uids[4]} " in caplog.text and "is skipped" in caplog.text, "the skipped message is named"


def test_subject_criteria_still_apply_to_poison_messages(o365mail_conn, poisoned_folder):
    folder, tag, uids = poisoned_folder
    result = O365ImapSensor(
        task_id="poison_subject", conn_id=o365mail_conn, folders=folder, subject=f"good {tag}"
    ).poke({})
    assert [m["uid"] for m in result.xcom_value] == [uids[0], uids[-1]]
