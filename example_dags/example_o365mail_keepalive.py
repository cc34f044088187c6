"""Keep rarely used ``o365mail`` connections alive: an unused refresh token expires after 90 days.

Each Monday, one task per connection redeems its refresh token and stores the rotated one (what
``airflow o365mail refresh <conn_id>`` does from a shell). A grant that needs a person again fails
its task without retries; a temporary failure is retried. See docs/token-store.md (keep-alive).
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import dag, task

#: The delegated connections to keep alive (app-only connections have no refresh token).
CONN_IDS = ["o365mail_default"]


@dag(
    schedule="0 6 * * 1",
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    tags=["o365mail", "example"],
)
def example_o365mail_keepalive():
    # [START howto_o365mail_keepalive]
    @task(retries=3, retry_delay=dt.timedelta(minutes=30))
    def refresh(conn_id: str) -> dict:
        from airflow_provider_o365mail.auth.token_status import keep_alive
        from airflow_provider_o365mail.exceptions import O365MailError
        from airflow_provider_o365mail.hooks.o365mail import O365MailHook
        from airflow_provider_o365mail.version_compat import AirflowFailException  # 3.1 has no airflow.sdk.exceptions

        result = keep_alive(O365MailHook(conn_id).tokens)
        if result.status in ("reauthorize", "broken"):
            raise AirflowFailException(result.detail)  # a person must act (authorize, fix the secret): no retries
        if result.status == "failed":
            raise O365MailError(result.detail)  # temporary: the task is retried
        return result.as_dict()

    # [END howto_o365mail_keepalive]
    refresh.expand(conn_id=CONN_IDS)


example_o365mail_keepalive()
