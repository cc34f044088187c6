"""SMTP throughput: 200 messages to the sandbox's Postfix, four ways, side by side in one run.

1. ``O365SmtpOperator`` batch mode (``messages=[...]``): one session, one AUTH.
2. The same operator, one task per message: a session (connect, STARTTLS, AUTH) per message.
3. apache-airflow-providers-smtp's ``SmtpHook`` the way ``EmailOperator`` uses it (a session per
   message) and reusing one session, with the same XOAUTH2 token in its ``access_token`` extra.
4. Raw ``smtplib`` over one session with pre-built messages: the floor.

Needs a running sandbox (``python -m airflow_provider_o365mail.testing up --env-file .sandbox.env``), then
``python bench/smtp_batch.py --env-file .sandbox.env``. The sandbox mailboxes are emptied afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import smtplib
import ssl
import time
import uuid
from collections.abc import Callable

from common import BENCH_CONN_ID, bench_environment


def timed(label: str, count: int, run: Callable[[], None], results: dict[str, float]) -> None:
    started = time.perf_counter()
    run()
    elapsed = time.perf_counter() - started
    results[label] = count / elapsed
    print(f"  {label:<44} {elapsed:7.2f} s  {results[label]:8.1f} msgs/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--env-file", default=".sandbox.env")
    parser.add_argument("--messages", type=int, default=200)
    args = parser.parse_args()
    n = args.messages

    sbx = bench_environment(args.env_file)
    os.environ["SSL_CERT_FILE"] = sbx.ca_file  # SmtpHook builds ssl.create_default_context()

    from airflow_provider_o365mail.hooks.o365mail import O365MailHook
    from airflow_provider_o365mail.operators.smtp import O365SmtpOperator
    from airflow_provider_o365mail.testing.sandbox import Sandbox

    hook = O365MailHook(BENCH_CONN_ID)
    token = hook.get_access_token()  # warm the store: every variant starts with a valid token
    os.environ["AIRFLOW_CONN_SMTP_BENCH"] = json.dumps(
        {
            "conn_type": "smtp",
            "host": "127.0.0.1",
            "port": sbx.smtp_port,
            "login": sbx.user,
            "extra": {"auth_type": "oauth2", "access_token": token, "disable_ssl": True, "from_email": sbx.user},
        }
    )
    from airflow.providers.smtp.hooks.smtp import SmtpHook

    run_tag = uuid.uuid4().hex[:6]

    def subjects(variant: str) -> list[str]:
        return [f"bench {run_tag} {variant} #{i}" for i in range(n)]

    def body(i: int) -> str:
        return f"<p>Daily extract {i}: 1,234 rows loaded.</p>"

    results: dict[str, float] = {}
    print(f"{n} messages per variant to {sbx.user} via 127.0.0.1:{sbx.smtp_port} (STARTTLS + XOAUTH2)")

    def ours_batch() -> None:
        messages = [{"subject": s, "html_content": body(i)} for i, s in enumerate(subjects("batch"))]
        O365SmtpOperator(task_id="batch", conn_id=BENCH_CONN_ID, to=sbx.user, messages=messages).execute({})

    def ours_per_message() -> None:
        for i, subject in enumerate(subjects("single")):
            O365SmtpOperator(
                task_id="single", conn_id=BENCH_CONN_ID, to=sbx.user, subject=subject, html_content=body(i)
            ).execute({})

    def smtphook_per_message() -> None:
        for i, subject in enumerate(subjects("smtphook")):
            with SmtpHook("smtp_bench") as smtp:
                smtp.send_email_smtp(to=sbx.user, subject=subject, html_content=body(i))

    def smtphook_one_session() -> None:
        with SmtpHook("smtp_bench") as smtp:
            for i, subject in enumerate(subjects("smtphook-session")):
                smtp.send_email_smtp(to=sbx.user, subject=subject, html_content=body(i))

    def raw_smtplib() -> None:
        prebuilt = [
            hook.compose(to=sbx.user, subject=s, html_content=body(i)).as_bytes() for i, s in enumerate(subjects("raw"))
        ]
        sasl = f"user={sbx.user}\x01auth=Bearer {token}\x01\x01"
        with smtplib.SMTP("127.0.0.1", sbx.smtp_port, timeout=30) as client:
            client.starttls(context=ssl.create_default_context(cafile=sbx.ca_file))
            client.ehlo()
            client.auth("XOAUTH2", lambda challenge=None: "" if challenge else sasl, initial_response_ok=False)
            for data in prebuilt:
                client.sendmail(sbx.user, [sbx.user], data)

    try:
        timed("ours: batch, one session", n, ours_batch, results)
        timed("ours: one task per message", n, ours_per_message, results)
        timed("providers-smtp SmtpHook: session per message", n, smtphook_per_message, results)
        timed("providers-smtp SmtpHook: one session", n, smtphook_one_session, results)
        timed("raw smtplib, one session (floor)", n, raw_smtplib, results)
    finally:
        Sandbox(sbx.state_dir).clean_mailboxes()

    batch = results["ours: batch, one session"]
    print()
    print(f"batch / per-message (ours)          {batch / results['ours: one task per message']:6.2f}x  (goal >= 5x)")
    print(
        f"batch / SmtpHook session per message {batch / results['providers-smtp SmtpHook: session per message']:6.2f}x"
    )
    print(f"batch / SmtpHook one session        {batch / results['providers-smtp SmtpHook: one session']:6.2f}x")
    floor = results["raw smtplib, one session (floor)"]
    print(f"raw smtplib / batch                 {floor / batch:6.2f}x  (goal <= 1.2x)")


if __name__ == "__main__":
    main()
