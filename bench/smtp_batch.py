"""SMTP throughput: 200 messages to the sandbox's Postfix, five ways, side by side in one run.

1. ``O365SmtpOperator`` batch mode (``messages=[...]``): one session, one AUTH.
2. The same operator, one task per message: a session (connect, STARTTLS, AUTH) per message.
3. apache-airflow-providers-smtp's ``SmtpHook`` the way ``EmailOperator`` uses it (a session per
   message) and reusing one session, with the same XOAUTH2 token in its ``access_token`` extra.
4. Raw ``smtplib`` over one session with pre-built messages: the floor.

Then two exactly-once figures (issue #14):

- "retry after a kill at 50 %": a child process sends a batch as one task instance (send ledger on)
  and is SIGKILLed when half of it is recorded as accepted; a second process (the task's retry)
  sends the batch again. Messages delivered twice, counted by Message-ID in the mailbox: goal 0.
- peak Python memory (tracemalloc) while sending one message with a 50 MB attachment: goal < 2x,
  and the growth of the process's peak RSS (``ru_maxrss``) over the send.

Both are printed side by side in one table at the end of every run.

Each variant sends ``--messages`` per round: one warm-up round (``--warmup-messages`` each), then
``--repeat`` rounds, each running every variant once in a shuffled order; medians with min/max.

Needs a running sandbox (``python -m airflow_provider_o365mail.testing up --env-file .sandbox.env``), then
``python bench/smtp_batch.py --env-file .sandbox.env [--messages 200 --repeat 5]``. The sandbox
mailboxes are emptied afterwards.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import smtplib
import ssl
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from common import BENCH_CONN_ID, Stats, bench_environment, print_header, print_ratios, run_interleaved

BATCH = "ours: batch, one session"
PER_MESSAGE = "ours: one task per message"
SMTPHOOK_PER_MESSAGE = "providers-smtp SmtpHook: session per message"
SMTPHOOK_SESSION = "providers-smtp SmtpHook: one session"
RAW = "raw smtplib, one session (floor)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--env-file", default=".sandbox.env")
    parser.add_argument("--messages", type=int, default=200, help="messages per variant and round")
    parser.add_argument("--repeat", type=int, default=5, help="measured rounds (each runs every variant once)")
    parser.add_argument("--warmup-messages", type=int, default=20, help="messages per variant in the warm-up round")
    parser.add_argument("--kill-messages", type=int, default=100, help="batch size of the kill-at-50%% retry run")
    parser.add_argument("--attachment-mb", type=int, default=50, help="attachment size of the memory figure")
    parser.add_argument("--skip-throughput", action="store_true", help="only the exactly-once figures")
    args = parser.parse_args()
    print_header("SMTP throughput (bench/smtp_batch.py)", ["apache-airflow-providers-smtp"])

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
    batches = itertools.count()

    def subjects(variant: str, n: int) -> list[str]:
        batch = next(batches)  # unique subjects across rounds
        return [f"bench {run_tag} {variant} {batch} #{i}" for i in range(n)]

    def body(i: int) -> str:
        return f"<p>Daily extract {i}: 1,234 rows loaded.</p>"

    def variants(n: int) -> dict[str, Callable[[], None]]:
        def ours_batch() -> None:
            messages = [{"subject": s, "html_content": body(i)} for i, s in enumerate(subjects("batch", n))]
            O365SmtpOperator(task_id="batch", conn_id=BENCH_CONN_ID, to=sbx.user, messages=messages).execute({})

        def ours_per_message() -> None:
            for i, subject in enumerate(subjects("single", n)):
                O365SmtpOperator(
                    task_id="single", conn_id=BENCH_CONN_ID, to=sbx.user, subject=subject, html_content=body(i)
                ).execute({})

        def smtphook_per_message() -> None:
            for i, subject in enumerate(subjects("smtphook", n)):
                with SmtpHook("smtp_bench") as smtp:
                    smtp.send_email_smtp(to=sbx.user, subject=subject, html_content=body(i))

        def smtphook_one_session() -> None:
            with SmtpHook("smtp_bench") as smtp:
                for i, subject in enumerate(subjects("smtphook-session", n)):
                    smtp.send_email_smtp(to=sbx.user, subject=subject, html_content=body(i))

        def raw_smtplib() -> None:
            prebuilt = [
                hook.compose(to=sbx.user, subject=s, html_content=body(i)).as_bytes()
                for i, s in enumerate(subjects("raw", n))
            ]
            sasl = f"user={sbx.user}\x01auth=Bearer {token}\x01\x01"
            with smtplib.SMTP("127.0.0.1", sbx.smtp_port, timeout=30) as client:
                client.starttls(context=ssl.create_default_context(cafile=sbx.ca_file))
                client.ehlo()
                client.auth("XOAUTH2", lambda challenge=None: "" if challenge else sasl, initial_response_ok=False)
                for data in prebuilt:
                    client.sendmail(sbx.user, [sbx.user], data)

        return {
            BATCH: ours_batch,
            PER_MESSAGE: ours_per_message,
            SMTPHOOK_PER_MESSAGE: smtphook_per_message,
            SMTPHOOK_SESSION: smtphook_one_session,
            RAW: raw_smtplib,
        }

    if args.skip_throughput:
        try:
            exactly_once_figures(sbx, args)
        finally:
            Sandbox(sbx.state_dir).clean_mailboxes()
        return
    n = args.messages
    print(
        f"{n} messages per variant and round to {sbx.user} via 127.0.0.1:{sbx.smtp_port} (STARTTLS + XOAUTH2); "
        f"warm-up round of {args.warmup_messages}, then {args.repeat} rounds in shuffled order"
    )
    try:
        run_interleaved(variants(args.warmup_messages), repeat=0, warmup=1)
        samples = run_interleaved(variants(n), repeat=args.repeat, warmup=0)
        exactly_once_figures(sbx, args)
    finally:
        Sandbox(sbx.state_dir).clean_mailboxes()

    # Throughput per round (messages / elapsed): its median is n / the median elapsed time.
    rates = {name: Stats.of([n / elapsed for elapsed in times]) for name, times in samples.items()}
    width = max(map(len, rates))
    print()
    print(f"  {'variant':<{width}}  {'s per round (median)':>20}  throughput msgs/s")
    for name, rate in rates.items():
        print(f"  {name:<{width}}  {Stats.of(samples[name]).median:20.2f}  {rate.describe('msgs/s')}")
    print()
    print("ratios of median throughput (same rounds, interleaved):")
    batch = rates[BATCH].median
    print_ratios(
        [
            ("batch / per-message (ours)  (goal >= 5x)", batch, rates[PER_MESSAGE].median),
            ("batch / SmtpHook session per message", batch, rates[SMTPHOOK_PER_MESSAGE].median),
            ("batch / SmtpHook one session", batch, rates[SMTPHOOK_SESSION].median),
            ("raw smtplib / batch  (goal <= 1.2x)", rates[RAW].median, batch),
        ]
    )


# One task instance sending a batch, as a separate process (what a worker is).
_CHILD = """
import sys
from airflow_provider_o365mail.hooks.o365mail import O365MailHook
from airflow_provider_o365mail.core.message_ids import TaskIdentity
tag, n, to = sys.argv[1], int(sys.argv[2]), sys.argv[3]
hook = O365MailHook("o365mail_bench")
ti = TaskIdentity("bench", "manual__" + tag, "send", -1)
specs = [{"to": to, "subject": f"kill {tag} #{i}", "text_content": "x"} for i in range(n)]
hook.send_messages(hook.plan(specs, ti), identity=ti)
"""


def exactly_once_figures(sbx, args) -> None:
    """Both figures in one run, printed side by side."""
    kill = kill_at_half(sbx, args.kill_messages)
    memory = attachment_memory(sbx, args.attachment_mb)
    left = [
        "retry after a kill at 50 %",
        f"{kill['n']} messages, killed with {kill['accepted']} accepted, {kill['entries']} started",
        f"retry exit {kill['retry_exit']}; distinct Message-IDs delivered: {kill['distinct']} of {kill['n']}",
        f"messages sent twice: {kill['twice']} (goal 0); lost: {kill['n'] - kill['distinct']}",
    ]
    right = [
        f"one message with a {args.attachment_mb} MB attachment",
        f"sent in {memory['elapsed']:.1f} s",
        f"peak traced memory {memory['peak'] / 2**20:.1f} MB = {memory['peak'] / memory['size']:.2f}x (goal < 2x)",
        f"peak RSS growth {memory['rss'] / 2**20:.1f} MB = {memory['rss'] / memory['size']:.2f}x",
    ]
    width = max(map(len, left))
    print()
    print("exactly-once figures (issue #14), one run:")
    for a, b in zip(left, right, strict=True):
        print(f"  {a:<{width}}  |  {b}")


def kill_at_half(sbx, n: int) -> dict[str, int]:
    from airflow_provider_o365mail.core.message_ids import TaskIdentity
    from airflow_provider_o365mail.core.send_ledger import SendLedger
    from airflow_provider_o365mail.runtime import MetadataDbVariables
    from airflow_provider_o365mail.testing.mailbox import fetch_raw_messages, parse, wait_for_messages

    os.environ["AIRFLOW__O365MAIL__DAILY_RECIPIENT_BUDGET"] = "0"  # the bench sends more than a day's worth
    tag = uuid.uuid4().hex[:8]
    ledger = SendLedger(MetadataDbVariables(), TaskIdentity("bench", "manual__" + tag, "send", -1))

    def accepted() -> int:
        ledger._data = None  # re-read what the child recorded
        return sum(1 for e in ledger.entries().values() if e.get("state") == "accepted")

    command = [sys.executable, "-c", _CHILD, tag, str(n), sbx.user]
    child = subprocess.Popen(command)
    while child.poll() is None:
        if accepted() >= n // 2:
            os.kill(child.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    child.wait()
    at_kill, entries = accepted(), len(ledger.entries())
    retry = subprocess.run(command, check=False)
    wait_for_messages(sbx, sbx.user, lambda m: f"kill {tag} " in str(m["Subject"]), count=n, timeout=120)

    def counted() -> Counter:
        return Counter(
            m["Message-ID"]
            for m in map(parse, fetch_raw_messages(sbx, sbx.user))
            if f"kill {tag} " in str(m["Subject"])
        )

    counts, quiet_since = counted(), time.monotonic()
    while time.monotonic() - quiet_since < 2:  # anything delivered twice would arrive now
        time.sleep(0.5)
        latest = counted()
        if latest != counts:
            counts, quiet_since = latest, time.monotonic()
    return {
        "n": n,
        "accepted": at_kill,
        "entries": entries,
        "retry_exit": retry.returncode,
        "distinct": len(counts),
        "twice": sum(1 for c in counts.values() if c > 1),
    }


def attachment_memory(sbx, megabytes: int) -> dict[str, float]:
    import resource

    from airflow_provider_o365mail.hooks.o365mail import O365MailHook

    size = megabytes * 1024 * 1024
    with tempfile.TemporaryDirectory() as tmp:
        attachment = Path(tmp) / "extract.bin"
        with attachment.open("wb") as handle:
            for _ in range(megabytes):
                handle.write(os.urandom(1024 * 1024))
        hook = O365MailHook(BENCH_CONN_ID)
        hook.get_access_token()
        planned = hook.plan([{"to": sbx.user, "subject": "memory", "text_content": "x", "files": [attachment]}])
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        tracemalloc.start()
        started = time.monotonic()
        hook.send_messages(planned)
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    return {"size": size, "elapsed": elapsed, "peak": peak, "rss": rss}


if __name__ == "__main__":
    main()
