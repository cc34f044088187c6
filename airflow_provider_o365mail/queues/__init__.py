"""``queues`` entry for ``apache-airflow-providers-common-messaging`` (optional extra ``common-messaging``)."""
