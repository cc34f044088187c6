"""Check an ``o365mail`` connection from a task: token, IMAP login, SMTP login.

Run it against the local sandbox with ``bash scripts/main-job.sh`` (see the README).
"""

from __future__ import annotations

from airflow.sdk import dag, task


@dag(schedule=None, catchup=False, tags=["o365mail", "example"])
def example_o365mail_connection_check():
    # [START howto_o365mail_connection_check]
    @task
    def check_connection(conn_id: str = "o365mail_default") -> str:
        from airflow_provider_o365mail.exceptions import O365MailError
        from airflow_provider_o365mail.hooks.o365mail import O365MailHook

        ok, message = O365MailHook(conn_id).test_connection()
        if not ok:
            raise O365MailError(message)
        return message

    # [END howto_o365mail_connection_check]
    check_connection()


example_o365mail_connection_check()
