"""The example DAGs parse without import errors (they run against the sandbox in the main job)."""

from __future__ import annotations

from pathlib import Path

from airflow_provider_o365mail.version_compat import AIRFLOW_V_3_3_PLUS

EXAMPLES = Path(__file__).parents[2] / "example_dags"


def test_example_dags_parse():
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow < 3.3
        from airflow.models.dagbag import DagBag

    bag = DagBag(dag_folder=str(EXAMPLES))
    assert bag.import_errors == {}
    expected = {
        "example_o365mail_connection_check",
        "example_o365mail_send_report",
        "example_o365mail_invoice_roundtrip",
        "example_o365mail_keepalive",
    }
    if AIRFLOW_V_3_3_PLUS:  # scheduled by inbound mail: O365ImapEventTrigger needs Airflow >= 3.3
        expected.add("example_o365mail_invoice_events")
    assert expected <= set(bag.dag_ids)
    assert ("example_o365mail_invoice_events" in bag.dag_ids) is AIRFLOW_V_3_3_PLUS
