"""The example DAGs parse without import errors (they run against the sandbox in the main job)."""

from __future__ import annotations

from pathlib import Path

EXAMPLES = Path(__file__).parents[2] / "example_dags"


def test_example_dags_parse():
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow < 3.3
        from airflow.models.dagbag import DagBag

    bag = DagBag(dag_folder=str(EXAMPLES))
    assert bag.import_errors == {}
    assert {
        "example_o365mail_connection_check",
        "example_o365mail_send_report",
        "example_o365mail_invoice_roundtrip",
        "example_o365mail_invoice_events",
    } <= set(bag.dag_ids)
