"""SIGKILL a real Airflow task at many points of a 200-message batch sent through Microsoft Graph:
every message is delivered exactly once (counted by Message-ID in the recipient's INBOX, and once in
the sender's Sent Items, where the Graph stand-in saves one copy per accepted send), none is lost,
and message 100, which carries an 8 MiB attachment, arrives with it intact.

As ``test_smtp_kill_points.py`` (shared machinery: ``kill_points.py``), with a connection whose
``transport`` is ``graph``: the DAG is parsed by the dag-processor, triggered over the REST API and
run by the scheduler's LocalExecutor; the test SIGKILLs the task process of the running try and
Airflow's retry (``retry_delay=0``) reads the send ledger and, for a message whose send had started,
looks it up in Sent Items (``$filter=internetMessageId eq ...``) before sending it again.

Kill points: every 5th position (and 1 and 200) in the ledger phases ``sending`` (the ledger says
the ``sendMail``, or the draft's ``send``, started: the kill lands in the request or before the
``202`` was recorded) and ``accepted`` (recorded; for message 200, after the batch before Airflow
saw the success), plus one that only Graph has: ``uploading``, message 100's upload session in
progress (the stand-in holds the second of its three chunk PUTs, 3.75 MiB each at most, with the
first one stored; the kill lands there). That is 83 points; CI (and any run) takes 20 of them in one
DAG run (21 tries), always the first message's send, the upload and the end of the batch (fewer
than the SMTP test's 30: Graph's run then takes no longer than SMTP's, about 100 s against 120 s on
2 cores); ``O365MAIL_FULL_FAULTS=1`` runs all 83 in 3 DAG runs.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass

import pytest
from kill_points import Killer, KillPlan, Point, fault_seed, run_kill_points, scheduled_fixture  # noqa: F401 (a fixture)

from airflow_provider_o365mail.runtime import MetadataDbVariables
from airflow_provider_o365mail.testing.mailbox import imap_session, parse

BATCH = 200
SAMPLED = 20
LARGE = 100  # the position of the message with the attachment
MiB = 1024 * 1024
ATTACHMENT_BYTES = 8 * MiB
DAG_ID = "o365mail_graph_kill_points"
TASK_ID = "send"
SEED = fault_seed()
UPLOADING = (LARGE, "uploading")
PLAN = KillPlan(
    batch=BATCH,
    sampled=SAMPLED,
    must=((1, "sending"), UPLOADING, (BATCH, "accepted")),
    phases=("uploading", "sending", "accepted"),
    extra=(UPLOADING,),
)

DAG_SOURCE = """
import time
from datetime import datetime, timedelta

from airflow.sdk import DAG

from airflow_provider_o365mail.operators.send_mail import O365SendMailOperator

with DAG("{dag_id}", schedule=None, start_date=datetime(2026, 1, 1), catchup=False, max_active_runs=1):
    O365SendMailOperator(
        task_id="{task_id}",
        conn_id="{conn_id}",
        messages=[
            {{
                "subject": "kill {{{{ run_id }}}} #" + str(i),
                "text_content": "x",
                **({{"files": ["{attachment}"]}} if i == {large} - 1 else {{}}),
            }}
            for i in range({batch})
        ],
        to="{to}",
        retries={retries},
        retry_delay=timedelta(seconds=0),
        # The stand-in saves the Sent Items copy before it answers 202; Exchange's copy can lag.
        sent_items_wait=2,
        # Holds the try for 3 s after the batch, before Airflow records success: the kill point
        # "after the last message" lands there, not in a race with the task's last few milliseconds.
        post_execute=lambda context, result: time.sleep(3),
    )
"""


@dataclass
class GraphKiller(Killer):
    """Kills at the ledger phases, and at ``uploading`` with the second chunk of the upload held by
    the stand-in (its first chunk stored): a kill in the middle of the upload session, not a race."""

    admin: object = None

    def uploads_fired(self) -> int:
        return sum(1 for f in self.admin.graph_state()["fired"] if f["operation"] == "uploadChunk")

    def prepare(self, point: Point) -> None:
        if point == UPLOADING:  # the earlier tries were all killed before message 100: nothing uploads yet
            self.before = self.uploads_fired()
            self.admin.graph_fault("hold", operation="uploadChunk")

    def wait_for(self, point: Point, try_number: int) -> None:
        if point != UPLOADING:
            return super().wait_for(point, try_number)

        def chunk_held(n: int):
            def held() -> bool:
                state = self.admin.graph_state()
                fired = sum(1 for f in state["fired"] if f["operation"] == "uploadChunk")
                return fired == self.before + n and state["held"] >= 1

            return held

        self.poll_until(chunk_held(1), point, try_number, interval=0.2)
        self.admin.graph_fault("hold", operation="uploadChunk")  # hold the next chunk
        self.admin.graph_release()  # the first chunk is stored and answered
        self.poll_until(chunk_held(2), point, try_number, interval=0.2)
        assert len(self.entries()) == LARGE - 1, "the kill is in message 100's upload, before its send"
        return None

    def after_kill(self, point: Point) -> None:
        if point == UPLOADING:
            self.admin.graph_release()  # the dead try's chunk goes into its session; the draft stays unsent


@pytest.fixture
def graph_db_conn(db_connection, o365_sandbox, o365_admin):
    assert o365_sandbox.graph_url, "the sandbox has no Graph stand-in"
    o365_admin.graph_reset()
    conn_json = o365_sandbox.connection_json(
        refresh_token=o365_sandbox.new_refresh_token(), transport="graph", graph_url=o365_sandbox.graph_url
    )
    yield db_connection(f"graph_kill_{uuid.uuid4().hex[:8]}", conn_json)
    o365_admin.graph_release()
    o365_admin.graph_reset()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def copies_of(sbx, upn: str, folder: str, subject: str) -> list:
    """The messages with exactly ``subject`` in ``folder`` of ``upn``, parsed."""
    with imap_session(sbx, upn) as client:
        client.select_folder(folder, readonly=True)
        uids = client.search(["SUBJECT", subject])
        fetched = client.fetch(uids, ["BODY.PEEK[]"]) if uids else {}
    messages = [parse(next(v for k, v in data.items() if k.startswith(b"BODY"))) for data in fetched.values()]
    return [m for m in messages if m["Subject"] == subject]


def attachment_hashes(sbx, upn: str, folder: str, subject: str) -> list[list[str]]:
    """SHA-256 of each attachment, for each message with ``subject`` in ``folder``."""
    return [
        [sha256(a.get_payload(decode=True)) for a in m.iter_attachments()] for m in copies_of(sbx, upn, folder, subject)
    ]


@pytest.mark.timeout(1800)
def test_sigkilled_airflow_task_sends_each_of_200_graph_messages_exactly_once(
    scheduled, graph_db_conn, o365_sandbox, o365_admin, tmp_path_factory, record_property
):
    sbx = o365_sandbox
    attachment = tmp_path_factory.mktemp("graph_kill") / "extract.bin"
    attachment.write_bytes(os.urandom(ATTACHMENT_BYTES))
    expected = sha256(attachment.read_bytes())
    variables = MetadataDbVariables()

    def check_run(run_id: str) -> None:
        subject = f"kill {run_id} #{LARGE - 1}"
        for upn, folder in ((sbx.second_user, "INBOX"), (sbx.user, "Sent Items")):
            assert attachment_hashes(sbx, upn, folder, subject) == [[expected]], f"{folder}: message {LARGE}"
        # A try killed while building the draft leaves it in Drafts, unsent (as Exchange would keep it).
        print(f"{run_id}: drafts of message {LARGE} left in Drafts: {len(copies_of(sbx, sbx.user, 'Drafts', subject))}")

    landed, n_runs, duration = run_kill_points(
        scheduled,
        sbx,
        plan=PLAN,
        seed=SEED,
        dag_id=DAG_ID,
        task_id=TASK_ID,
        dag_source=lambda retries: DAG_SOURCE.format(
            dag_id=DAG_ID,
            task_id=TASK_ID,
            conn_id=graph_db_conn,
            batch=BATCH,
            large=LARGE,
            attachment=attachment,
            to=sbx.second_user,
            retries=retries,
        ),
        killer=lambda run_id: GraphKiller(variables, DAG_ID, TASK_ID, run_id, SEED, admin=o365_admin),
        check_run=check_run,
    )
    assert len(landed) == len(PLAN.planned(SEED)) >= SAMPLED
    assert UPLOADING in [point for point, _, _ in landed]
    sent_by_graph = [d for d in o365_admin.graph_deliveries() if d["operation"] in ("sendMail", "send")]
    assert len(sent_by_graph) == BATCH * n_runs, "every message went through Graph, once"
    record_property("kill_points", len(landed))
    record_property("duration_s", round(duration, 1))
    print(f"seed {SEED}: {len(landed)} kill points in {n_runs} DAG runs, {duration:.0f} s, 0 lost, 0 twice")
