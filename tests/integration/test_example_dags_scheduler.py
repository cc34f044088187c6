"""The example DAGs as users run them: parsed by the dag-processor, triggered through the REST API
with ``"logical_date": null`` (what the UI's Trigger button sends), scheduled by the real
scheduler, run by LocalExecutor workers (Task SDK over HTTP) and, for sensors, the triggerer.
Results are checked over REST and in the sandbox mailbox by Message-ID.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import shutil
import signal
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import jsonschema
import pytest

from airflow_provider_o365mail.hooks.o365mail import O365MailHook
from airflow_provider_o365mail.testing.admin import tls_session
from airflow_provider_o365mail.testing.airflow_services import wait_until
from airflow_provider_o365mail.testing.mailbox import wait_for_messages
from airflow_provider_o365mail.testing.sandbox import DELEGATED_SCOPES, REDIRECT_URI

EXAMPLES = Path(__file__).parents[2] / "example_dags"
DAG_IDS = [
    "example_o365mail_connection_check",
    "example_o365mail_send_report",
    "example_o365mail_invoice_roundtrip",
    "example_o365mail_invoice_events",
]


class Api:
    def __init__(self, services) -> None:
        self.client = httpx.Client(
            base_url=f"{services.api_url}/api/v2",
            headers={"Authorization": f"Bearer {services.admin_token()}"},
            timeout=30,
        )
        self.services = services

    def get(self, path: str) -> dict:
        response = self.client.get(path)
        response.raise_for_status()
        return response.json()

    def trigger(self, dag_id: str, conf: dict | None = None) -> dict:
        response = self.client.post(f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf or {}})
        assert response.status_code == 200, response.text
        return response.json()

    def wait_final(self, dag_id: str, run_id: str, timeout: float = 240) -> dict:
        def final():
            run = self.get(f"/dags/{dag_id}/dagRuns/{run_id}")
            return run if run["state"] in ("success", "failed") else None

        try:
            run = wait_until(final, timeout, f"{dag_id} {run_id} to finish", interval=1)
        except AssertionError as timed_out:  # say where it stood, not only that it never finished
            raise AssertionError(f"{timed_out}\n{self.failure_report(dag_id, run_id, services=True)}") from None
        assert run["state"] == "success", self.failure_report(dag_id, run_id)
        return run

    def xcom(self, dag_id: str, run_id: str, task_id: str):
        return self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value")["value"]

    def failure_report(self, dag_id: str, run_id: str, *, services: bool = False) -> str:
        tis = self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
        states = {ti["task_id"]: ti["state"] for ti in tis}
        logs = Path(self.services.env["AIRFLOW_HOME"]) / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}"
        text = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(logs.rglob("*.log")))
        if services:  # a run that never ends: its state, the DAG's, and what the scheduler and triggerer did
            run = self.get(f"/dags/{dag_id}/dagRuns/{run_id}")
            text += f"\nrun state {run['state']}; DAG paused: {self.get(f'/dags/{dag_id}')['is_paused']}"
            for name in ("scheduler", "triggerer"):
                text += f"\n--- {name} log (tail) ---\n{self.services.log_text(name)[-4000:]}"
        return f"{states}\n{text}"


def running(services, name: str) -> bool:
    process = services.processes.get(name)
    return process is not None and process.poll() is None


def refresh_token_by_sign_in(sbx, upn: str) -> str:
    """A grant for a user without single sign-on: sign in on the stand-in's page, redeem the code."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    scope = f"{DELEGATED_SCOPES} offline_access"
    query = {"client_id": sbx.client_id, "response_type": "code", "redirect_uri": REDIRECT_URI, "scope": scope,
             "login_hint": upn, "code_challenge": challenge, "code_challenge_method": "S256"}  # fmt: skip
    location = sbx.admin().sign_in(
        f"{sbx.authority}/oauth2/v2.0/authorize?{urlencode(query)}", login=upn, password=sbx.user_password
    )
    code = parse_qs(urlsplit(location).query)["code"][0]
    response = tls_session(sbx.ca_file).post(
        f"{sbx.authority}/oauth2/v2.0/token",
        data={"client_id": sbx.client_id, "client_secret": sbx.client_secret, "grant_type": "authorization_code",
              "code": code, "redirect_uri": REDIRECT_URI, "code_verifier": verifier, "scope": scope},
        timeout=30,
    )  # fmt: skip
    response.raise_for_status()
    return response.json()["refresh_token"]


@pytest.fixture(scope="module")
def examples_deployed(airflow_services, o365_sandbox):
    """The example DAGs in the DAGs folder with ``o365mail_default`` in the metadata DB, a scheduler
    and a dag-processor; removed afterwards (the event DAG's watcher must not outlive the module).

    ``o365mail_default`` is the second user's mailbox: the event DAG's watcher holds an IMAP
    connection while it exists, and other tests count the first user's IMAP sessions."""
    from airflow.models import Connection
    from airflow.models.trigger import Trigger
    from airflow.utils.session import create_session

    sbx = o365_sandbox
    grant = refresh_token_by_sign_in(sbx, sbx.second_user)
    conn = Connection.from_json(
        sbx.connection_json(refresh_token=grant, mailbox=sbx.second_user), conn_id="o365mail_default"
    )
    with create_session() as session:
        session.query(Connection).filter(Connection.conn_id == "o365mail_default").delete()
        session.add(conn)
    dags = Path(os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    dags.mkdir(parents=True, exist_ok=True)
    copied = [Path(shutil.copy(path, dags)) for path in sorted(EXAMPLES.glob("example_*.py"))]
    # Stopped again afterwards if started here: later tests run `dags test --use-executor`, whose
    # runs a live scheduler would also pick up.
    started = [name for name in ("scheduler", "dag-processor") if not running(airflow_services, name)]
    airflow_services.start("scheduler")
    airflow_services.start("dag-processor")
    airflow_services.wait_healthy("scheduler")
    api = Api(airflow_services)

    def parsed() -> bool:
        return all(api.client.get(f"/dags/{dag_id}").status_code == 200 for dag_id in DAG_IDS)

    wait_until(parsed, 180, "the example DAGs to be parsed", interval=2)
    # Unpaused as a user does with the toggle: "paused at creation" is off for these services, but a DAG
    # an earlier test put in the DB (with `airflow dags test`, where it is on) stays paused, and the
    # scheduler leaves the runs of a paused DAG queued forever (CI: four runs timed out that way).
    for dag_id in DAG_IDS:
        api.client.patch(f"/dags/{dag_id}", json={"is_paused": False}).raise_for_status()
    errors = api.get("/importErrors")["import_errors"]
    assert not [e for e in errors if "example_o365mail" in e["filename"]], errors
    yield api
    # Airflow drops an asset's watchers when it parses the DAG paused (a deleted file is never parsed
    # again, and its watcher would keep running): pause, wait for the trigger to go, then delete.
    for dag_id in DAG_IDS:
        api.client.patch(f"/dags/{dag_id}", json={"is_paused": True}).raise_for_status()

    def watcher_gone() -> bool:
        with create_session() as session:
            triggers = session.query(Trigger).filter(Trigger.classpath.like("%imap_events%")).all()
            return not [t for t in triggers if t.kwargs.get("conn_id") == "o365mail_default"]

    wait_until(watcher_gone, 120, "the example watcher to stop after its DAG was paused", interval=2)
    for path in copied:
        path.unlink()
    for name in started:
        airflow_services.kill(name, signal.SIGTERM)
    with create_session() as session:
        session.query(Connection).filter(Connection.conn_id == "o365mail_default").delete()


def ui_would_block_trigger(param: dict) -> bool:
    """The UI trigger form's rule (airflow-core/src/airflow/ui/src/components/FlexibleForm/isParamRequired.tsx):
    a param whose schema has a ``type`` without ``"null"`` is required, and an empty field is sent as null."""
    schema_type = param["schema"].get("type")
    required = bool(schema_type) and not (isinstance(schema_type, list) and "null" in schema_type)
    return required and param["value"] in (None, "")


def test_params_of_every_example_allow_the_ui_trigger_form_with_defaults(examples_deployed):
    for dag_id in DAG_IDS:
        params = examples_deployed.get(f"/dags/{dag_id}/details")["params"] or {}
        for name, param in params.items():
            assert not ui_would_block_trigger(param), f"{dag_id}: the trigger form stays disabled until {name} is set"
            jsonschema.validate(param["value"], param["schema"])
    report_to = examples_deployed.get("/dags/example_o365mail_send_report/details")["params"]["report_to"]
    assert report_to["value"] is None and "null" in report_to["schema"]["type"]


def test_send_report_with_null_logical_date_mails_the_report(examples_deployed, o365_sandbox):
    api = examples_deployed
    # What the UI sends with the defaults: the emptied field is null.
    run = api.trigger("example_o365mail_send_report", conf={"report_to": None})
    assert run["logical_date"] is None
    run = api.wait_final("example_o365mail_send_report", run["dag_run_id"])
    day = run["run_after"][:10]
    path = api.xcom("example_o365mail_send_report", run["dag_run_id"], "build_report")
    assert Path(path).name == f"orders-{day}.csv"
    message_id = api.xcom("example_o365mail_send_report", run["dag_run_id"], "send_report")
    (message,) = wait_for_messages(o365_sandbox, o365_sandbox.second_user, lambda m: m["Message-ID"] == message_id)
    assert message["Subject"] == f"Orders report {day}"
    assert [part.get_filename() for part in message.iter_attachments()] == [f"orders-{day}.csv"]


def test_connection_check_with_null_logical_date(examples_deployed):
    api = examples_deployed
    run = api.wait_final(
        "example_o365mail_connection_check", api.trigger("example_o365mail_connection_check")["dag_run_id"]
    )
    assert api.xcom("example_o365mail_connection_check", run["dag_run_id"], "check_connection")


def test_invoice_roundtrip_with_null_logical_date_through_the_triggerer(examples_deployed, o365_sandbox):
    api = examples_deployed
    dag_id = "example_o365mail_invoice_roundtrip"
    run_id = api.trigger(dag_id)["dag_run_id"]
    api.wait_final(dag_id, run_id, timeout=300)
    sent_id = api.xcom(dag_id, run_id, "supplier_sends_invoice")
    (summary,) = api.xcom(dag_id, run_id, "wait_for_invoice")
    assert summary["message_id"] == sent_id and run_id in summary["subject"]
    assert api.xcom(dag_id, run_id, "process_invoice") == 127.7
    # The sensor defers to the triggerer only if its first check misses the mail (delivery is fast
    # here): the run's success with the right message is the point, not which path found it.
    wait_for_messages(o365_sandbox, o365_sandbox.second_user, lambda m: m["Message-ID"] == sent_id)


def test_invoice_events_runs_per_mail_and_on_a_manual_trigger(examples_deployed, o365_sandbox, tmp_path):
    api = examples_deployed
    dag_id = "example_o365mail_invoice_events"
    # A manual run (no asset event, null logical date) has nothing to download and succeeds.
    manual = api.wait_final(dag_id, api.trigger(dag_id)["dag_run_id"])
    assert api.xcom(dag_id, manual["dag_run_id"], "download_invoices") == []

    def stream_started() -> bool:
        return "IMAP stream o365mail_default/INBOX starts" in api.services.log_text("triggerer")

    wait_until(stream_started, 120, "the example watcher's IMAP stream", interval=1)
    time.sleep(2)  # the stream is in IDLE
    pdf = tmp_path / f"invoice-{uuid.uuid4().hex[:6]}.pdf"
    pdf.write_bytes(b"%PDF-1.4\n% example invoice\n")
    message_id = O365MailHook("o365mail_default").send_email(
        to=o365_sandbox.second_user, subject=f"Invoice {pdf.stem}", text_content="attached", files=[str(pdf)]
    )

    def asset_run():
        runs = api.get(f"/dags/{dag_id}/dagRuns")["dag_runs"]
        done = [r for r in runs if r["run_type"] == "asset_triggered" and r["state"] in ("success", "failed")]
        return done[-1] if done else None

    run = wait_until(asset_run, 180, "the mail-triggered run", interval=1)
    api.wait_final(dag_id, run["dag_run_id"])
    (found,) = api.xcom(dag_id, run["dag_run_id"], "messages")
    assert found["message_id"] == message_id
    (downloaded,) = api.xcom(dag_id, run["dag_run_id"], "download_invoices")
    assert Path(downloaded).read_bytes() == pdf.read_bytes()
