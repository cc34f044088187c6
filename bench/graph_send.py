"""Graph sending vs our SMTP path vs Airflow's own msgraph email backend, on the same mail, side by side.

Variants (the same small HTML message, to the sandbox's second user):

1. ours, Graph, delegated: ``O365MailHook.send_messages`` with ``transport: graph`` (``/me/sendMail``
   with the base64 MIME; drafts and upload sessions over 4 MB).
2. ours, Graph, app-only: the same with client credentials (``/users/{mailbox}/sendMail``), the
   anchor's way of signing in.
3. the floor: ``/me/sendMail`` with pre-built base64 MIME and the warm token over one ``requests``
   session, nothing else.
4. ours, SMTP: the same hook with ``transport: smtp`` (one session per batch, XOAUTH2).
5. the anchor: ``airflow.providers.microsoft.azure.hooks.msgraph.send_email``, the Graph
   ``[email] email_backend`` of apache-airflow-providers-microsoft-azure (``MSGraphMailHook``, JSON
   ``sendMail``, app-only client credentials, attachments inline and capped at 3 MB in all). It runs
   in its own venv (``--anchor-venv``, created on first use with pip and the constraints of the running
   Airflow's minor version), in a long-lived child process (bench/anchor_msgraph.py) that times its
   own sends; it is called once per message, as Airflow calls an email backend.

Figures:

- messages/s for a batch of ``--messages`` small messages: a warm-up round, then ``--repeat`` rounds
  running every variant once in a shuffled order (bench/common.py); medians with min and max.
- requests per message: Graph requests counted by the Graph stand-in (per app and mailbox) and token
  requests counted by the Entra stand-in, both read around each batch outside the timed part; for
  SMTP, sessions, round trips and replies counted at ``smtplib`` in this process.
- delivery: every message of every round counted by Message-ID over IMAP in the recipient's INBOX.
- peak RSS of a fresh child process sending one message with a ``--attachment-mb`` attachment (50 and
  100 MB by default; random bytes): during the send (``VmHWM`` reset just before it, tokens and imports
  warm), its growth over the RSS just before, and over the process's life. Each delivered attachment is fetched over IMAP and compared by SHA-256. The
  anchor is given the same file: it refuses anything over 3 MB, and its error text is printed.

Set-up on the stand-ins, printed with the results: the sending mailbox's MaxSendSize is raised to 150 MB
(an Exchange admin must do the same for mail over 35 MB), and the Graph stand-in's limit windows are
reset before each large Graph send (50 + 100 MB of uploads within 5 minutes would otherwise be
throttled: Outlook allows 150 MB per 5 minutes per app and mailbox). Log level WARNING for all variants
(Airflow's per-message INFO lines would otherwise be timed too). The mailboxes are emptied and the
Graph stand-in reset afterwards.

Needs a running sandbox (``python -m airflow_provider_o365mail.testing up --env-file .sandbox.env``),
then ``python bench/graph_send.py --env-file .sandbox.env [--messages 40 --repeat 5]``.
"""

from __future__ import annotations

import argparse
import base64
import email
import hashlib
import itertools
import json
import os
import smtplib
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from email import policy
from importlib import metadata
from pathlib import Path
from typing import Any

from common import BENCH_CONN_ID, Stats, bench_environment, print_header, print_ratios, run_interleaved

GRAPH = "ours: Graph, delegated"
GRAPH_APP = "ours: Graph, app-only"
SMTP = "ours: SMTP"
ANCHOR = "anchor: msgraph send_email (app-only)"
RAW = "raw requests sendMail, prebuilt (floor)"
GRAPH_CONN_ID = "o365mail_bench_graph"
GRAPH_APP_CONN_ID = "o365mail_bench_graph_app"
ANCHOR_CONN_ID = "msgraph_bench"  # bench/anchor_msgraph.py's
ANCHOR_CHILD = Path(__file__).with_name("anchor_msgraph.py")
ANCHOR_DISTRIBUTION = "apache-airflow-providers-microsoft-azure"
ANCHOR_REQUIREMENT = "apache-airflow-providers-microsoft-azure>=15,<16"
MiB = 1024 * 1024
MAX_SEND_SIZE = 150 * MiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-file", default=".sandbox.env")
    parser.add_argument("--messages", type=int, default=40, help="messages per variant and round")
    parser.add_argument("--repeat", type=int, default=5, help="measured rounds (each runs every variant once)")
    parser.add_argument("--warmup-messages", type=int, default=5, help="messages per variant in the warm-up round")
    parser.add_argument("--attachment-mb", default="50,100", help="attachment sizes (MB) of the memory figures")
    parser.add_argument(
        "--anchor-venv",
        default=os.path.join(tempfile.gettempdir(), "o365mail-bench-anchor-venv"),
        help="venv of the anchor (apache-airflow + apache-airflow-providers-microsoft-azure); created if absent",
    )
    args = parser.parse_args()
    os.environ["AIRFLOW__LOGGING__LOGGING_LEVEL"] = "WARNING"
    os.environ["AIRFLOW__O365MAIL__DAILY_RECIPIENT_BUDGET"] = "0"  # the bench sends more than a day's worth
    print_header("Graph sending (bench/graph_send.py)", ["requests"])

    anchor_python = ensure_anchor_venv(Path(args.anchor_venv))
    print(f"anchor:  {anchor_python} ({anchor_versions(anchor_python)})", flush=True)

    sbx = bench_environment(args.env_file)
    admin = sbx.admin()
    if not sbx.graph_url:
        raise SystemExit(
            "this sandbox has no Graph stand-in: run 'python -m airflow_provider_o365mail.testing up' again"
        )
    os.environ[f"AIRFLOW_CONN_{GRAPH_CONN_ID.upper()}"] = sbx.connection_json(
        refresh_token=sbx.new_refresh_token(), transport="graph", graph_url=sbx.graph_url
    )
    app = json.loads(sbx.app_connection_json())
    app["extra"].update(transport="graph", graph_url=sbx.graph_url)
    os.environ[f"AIRFLOW_CONN_{GRAPH_APP_CONN_ID.upper()}"] = json.dumps(app)

    from airflow_provider_o365mail.hooks.o365mail import O365MailHook
    from airflow_provider_o365mail.testing.admin import tls_session
    from airflow_provider_o365mail.testing.sandbox import Sandbox

    hooks = {
        GRAPH: O365MailHook(GRAPH_CONN_ID),
        GRAPH_APP: O365MailHook(GRAPH_APP_CONN_ID),
        SMTP: O365MailHook(BENCH_CONN_ID),
    }
    hooks[GRAPH].graph_access_token()  # warm stores: every variant starts with a valid token
    hooks[GRAPH_APP].graph_access_token()
    hooks[SMTP].get_access_token()
    smtp_calls = count_smtp_calls()
    recipient, sender = sbx.second_user, sbx.user
    admin.graph_mailbox(sender, max_send_size=MAX_SEND_SIZE)
    run_tag = uuid.uuid4().hex[:6]
    batches = itertools.count()
    sent: Counter[str] = Counter()  # messages each variant was asked to send
    per_batch: dict[str, list[dict[str, float]]] = {}  # requests counted around each measured batch

    anchor = AnchorWorker(anchor_python, sbx)
    measuring = False
    app_ids = {GRAPH: sbx.client_id, GRAPH_APP: sbx.app_client_id, SMTP: sbx.client_id, RAW: sbx.client_id}
    raw_session = tls_session(sbx.ca_file)

    def subject_prefix(variant: str) -> str:
        return f"bench {run_tag} {VARIANT_KEYS[variant]} "

    def ours(variant: str, n: int) -> Callable[[], float]:
        hook = hooks[variant]

        def run() -> float:
            batch = next(batches)
            specs = [
                {"to": recipient, "subject": f"{subject_prefix(variant)}{batch} #{i}", "html_content": body(i)}
                for i in range(n)
            ]
            before = counters(admin, sbx, app_ids[variant], sender, smtp_calls)
            started = time.perf_counter()
            hook.send_messages(hook.plan(specs))
            elapsed = time.perf_counter() - started
            record(variant, n, before, counters(admin, sbx, app_ids[variant], sender, smtp_calls))
            return elapsed

        return run

    anchor_errors: list[str] = []  # failed sends of the anchor in measured rounds (counted as not delivered)

    def anchored(n: int, *, probe: bool = False) -> Callable[[], float]:
        def run() -> float:
            batch = next(batches)
            before = counters(admin, sbx, sbx.app_client_id, sender, smtp_calls)
            reply = anchor.batch(n, f"{subject_prefix(ANCHOR)}{batch}", recipient, sender)
            record(ANCHOR, n, before, counters(admin, sbx, sbx.app_client_id, sender, smtp_calls))
            if reply["errors"] and probe:
                raise AnchorFailed(reply["errors"])
            anchor_errors.extend(reply["errors"])
            return reply["elapsed"]

        return run

    def raw(n: int) -> Callable[[], float]:
        """``/me/sendMail`` with pre-built base64 MIME and the warm token over one HTTPS session: the floor."""

        def run() -> float:
            batch = next(batches)
            hook = hooks[GRAPH]
            bodies = [
                base64.b64encode(
                    hook.compose(
                        to=recipient, subject=f"{subject_prefix(RAW)}{batch} #{i}", html_content=body(i)
                    ).as_bytes()
                )
                for i in range(n)
            ]
            headers = {"Authorization": f"Bearer {hook.graph_access_token().token}", "Content-Type": "text/plain"}
            before = counters(admin, sbx, app_ids[RAW], sender, smtp_calls)
            started = time.perf_counter()
            for data in bodies:
                raw_session.post(
                    f"{sbx.graph_url}/v1.0/me/sendMail", data=data, headers=headers, timeout=30
                ).raise_for_status()
            elapsed = time.perf_counter() - started
            record(RAW, n, before, counters(admin, sbx, app_ids[RAW], sender, smtp_calls))
            return elapsed

        return run

    def record(variant: str, n: int, before: dict, after: dict) -> None:
        sent[variant] += n
        if measuring:
            delta = {k: (after[k] - before[k]) / n for k in before}
            per_batch.setdefault(variant, []).append(delta)

    def variants(n: int, with_anchor: bool) -> dict[str, Callable[[], float]]:
        chosen = {name: ours(name, n) for name in (GRAPH, GRAPH_APP, SMTP)}
        chosen[RAW] = raw(n)
        if with_anchor:
            chosen[ANCHOR] = anchored(n)
        return chosen

    n = args.messages
    sizes = [int(s) for s in args.attachment_mb.split(",") if s.strip()]
    print(
        f"{n} messages per variant and round from {sender} to {recipient}; Graph stand-in {sbx.graph_url}, "
        f"SMTP 127.0.0.1:{sbx.smtp_port}; warm-up round of {args.warmup_messages}, then {args.repeat} rounds in "
        "shuffled order",
        flush=True,
    )
    anchor_problem: str | None = None
    try:
        anchor_problem = anchor.start()
        if anchor_problem is None:
            try:  # the anchor's first send tells whether it can be pointed at the stand-ins at all
                anchored(args.warmup_messages, probe=True)()
            except AnchorFailed as failed:
                anchor_problem = f"its warm-up sends failed: {failed.errors[0]}"
        if anchor_problem:
            print(f"anchor left out of the throughput figures: {anchor_problem}", flush=True)
        run_interleaved(variants(args.warmup_messages, with_anchor=False), repeat=0, warmup=1, self_timed=True)
        measuring = True
        samples = run_interleaved(
            variants(n, with_anchor=anchor_problem is None), repeat=args.repeat, warmup=0, self_timed=True
        )
        measuring = False
        arrived = {name: delivered_ids(sbx, recipient, subject_prefix(name), sent[name]) for name in sent}
        memory = attachment_figures(sbx, admin, anchor, sizes, recipient, sender)
    finally:
        anchor.stop()
        admin.graph_reset()
        Sandbox(sbx.state_dir).clean_mailboxes()

    report(samples, per_batch, arrived, sent, n, memory, sizes, anchor_problem, anchor_errors)


VARIANT_KEYS = {GRAPH: "graph", GRAPH_APP: "graph-app", SMTP: "smtp", ANCHOR: "anchor", RAW: "raw"}


def body(i: int) -> str:
    return f"<p>Daily extract {i}: 1,234 rows loaded.</p>"


class AnchorFailed(Exception):
    def __init__(self, errors: list[str]) -> None:
        super().__init__(errors[0])
        self.errors = errors


# ---------------------------------------------------------------------- the anchor's venv and process
def ensure_anchor_venv(venv: Path) -> Path:
    """The anchor's interpreter; the venv is created with pip (and the running Airflow's constraints) if absent."""
    python = venv / "bin" / "python"
    if python.exists():
        return python
    airflow = metadata.version("apache-airflow")
    minor = ".".join(airflow.split(".")[:2])
    constraints = Path(__file__).resolve().parent.parent / "constraints" / f"airflow-{minor}.txt"
    command = [str(venv / "bin" / "pip"), "install", "--quiet", f"apache-airflow=={airflow}", ANCHOR_REQUIREMENT]
    if constraints.exists():
        command += ["-c", str(constraints)]
    print(f"creating the anchor's venv: {sys.executable} -m venv {venv}; {' '.join(command)}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(command, check=True)
    return python


def anchor_versions(python: Path) -> str:
    code = (
        "from importlib.metadata import version as v; "
        f"print(', '.join(f'{{d}} {{v(d)}}' for d in ('apache-airflow', '{ANCHOR_DISTRIBUTION}', 'azure-identity', "
        "'msgraph-core', 'httpx')))"
    )
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def anchor_env(sbx) -> dict[str, str]:
    """The anchor's environment: its own AIRFLOW_HOME, no PYTHONPATH (it must not see this provider), and a
    ``msgraph`` connection on the stand-ins: Graph host, Entra authority, the sandbox CA."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("AIRFLOW_CONN_")}
    connection = {
        "conn_type": "msgraph",
        "login": sbx.app_client_id,
        "password": sbx.app_client_secret,
        "schema": "https",
        "host": f"127.0.0.1:{sbx.graph_port}",  # base URL https://127.0.0.1:PORT/v1.0/
        "extra": {
            "tenant_id": sbx.tenant_id,
            "authority": sbx.idp_url,  # azure-identity asks {authority}/{tenant_id}/oauth2/v2.0/token
            "disable_instance_discovery": True,  # else MSAL asks login.microsoftonline.com about the authority
            "allowed_hosts": "127.0.0.1",  # kiota sends the token only to these hosts (default: the authority)
            "verify": sbx.ca_file,  # httpx (Graph) and azure-identity (token) both take a CA file here
        },
    }
    env.update(
        AIRFLOW_HOME=tempfile.mkdtemp(prefix="o365-bench-anchor-"),
        AIRFLOW__LOGGING__LOGGING_LEVEL="WARNING",
        SSL_CERT_FILE=sbx.ca_file,
        REQUESTS_CA_BUNDLE=sbx.ca_file,
    )
    env[f"AIRFLOW_CONN_{ANCHOR_CONN_ID.upper()}"] = json.dumps(connection)
    return env


def read_answer(stream, what: str) -> dict[str, Any]:
    """The next ``@@ {json}`` line of the anchor's stdout (other lines are its own log: kept for errors)."""
    seen: list[str] = []
    for line in stream:
        if line.startswith("@@ "):
            return json.loads(line[3:])
        seen.append(line.rstrip())
    tail = " | ".join(seen[-5:])
    raise RuntimeError(f"the anchor's process ended without answering ({what}); its last lines: {tail}")


class AnchorWorker:
    """bench/anchor_msgraph.py ``serve`` in the anchor's venv: one batch per command, self-timed."""

    def __init__(self, python: Path, sbx) -> None:
        self.python = python
        self.env = anchor_env(sbx)
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> str | None:
        """``None`` when ready, else why the anchor cannot run."""
        self.process = subprocess.Popen(
            [str(self.python), str(ANCHOR_CHILD), "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=self.env,
        )
        try:
            read_answer(self.process.stdout, "start")
        except RuntimeError as err:
            return str(err)
        return None

    def batch(self, n: int, subject: str, to: str, sender: str) -> dict[str, Any]:
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(json.dumps({"n": n, "subject": subject, "to": to, "from": sender}) + "\n")
        self.process.stdin.flush()
        return read_answer(self.process.stdout, "batch")

    def one(self, path: Path, to: str, sender: str, subject: str) -> dict[str, Any]:
        """One message with ``path`` attached, in a fresh process."""
        command = [str(self.python), str(ANCHOR_CHILD), "one", str(path), to, sender, subject]
        child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=self.env)
        try:
            return read_answer(child.stdout, "one")
        finally:
            child.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)


# ---------------------------------------------------------------------- counting
def count_smtp_calls() -> Counter[str]:
    """What ``smtplib`` does in this process from now on: sessions (connects), replies read, and round
    trips (a reply awaited after something was written; pipelined commands share one)."""
    calls: Counter[str] = Counter()
    connect, send, getreply = smtplib.SMTP.connect, smtplib.SMTP.send, smtplib.SMTP.getreply
    wrote = False

    def counted_connect(self, *args, **kwargs):
        calls["sessions"] += 1
        return connect(self, *args, **kwargs)

    def counted_send(self, *args, **kwargs):
        nonlocal wrote
        wrote = True
        return send(self, *args, **kwargs)

    def counted_getreply(self, *args, **kwargs):
        nonlocal wrote
        calls["replies"] += 1
        if wrote:
            calls["round_trips"] += 1
            wrote = False
        return getreply(self, *args, **kwargs)

    smtplib.SMTP.connect, smtplib.SMTP.send, smtplib.SMTP.getreply = counted_connect, counted_send, counted_getreply
    return calls


def counters(admin, sbx, app_id: str, mailbox: str, smtp_calls: Counter[str]) -> dict[str, float]:
    graph = admin.graph_counters(mailbox, app_id=app_id)
    entra = admin.counters()
    return {
        "graph": graph.get("requests", 0),
        "throttled": graph.get("throttled", 0),
        "tokens": sum(v for k, v in entra.items() if k.startswith("token")),
        "smtp_sessions": smtp_calls["sessions"],
        "smtp_round_trips": smtp_calls["round_trips"],
        "smtp_replies": smtp_calls["replies"],
    }


def mailbox_headers(sbx, upn: str) -> list[dict[str, Any]]:
    """``uid``, ``subject``, ``message_id``, ``size`` of every message in ``upn``'s INBOX (headers only)."""
    from airflow_provider_o365mail.testing.mailbox import imap_session

    with imap_session(sbx, upn) as client:
        client.select_folder("INBOX", readonly=True)
        uids = client.search("ALL")
        rows = []
        for start in range(0, len(uids), 500):
            fetched = client.fetch(
                uids[start : start + 500], ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID SUBJECT)]", "RFC822.SIZE"]
            )
            for uid, data in fetched.items():
                headers = email.message_from_bytes(
                    data[b"BODY[HEADER.FIELDS (MESSAGE-ID SUBJECT)]"], policy=policy.default
                )
                rows.append(
                    {
                        "uid": uid,
                        "subject": str(headers["Subject"] or ""),
                        "message_id": str(headers["Message-ID"] or ""),
                        "size": data[b"RFC822.SIZE"],
                    }
                )
    return rows


def delivered_ids(sbx, upn: str, prefix: str, expected: int, timeout: float = 120.0) -> Counter[str]:
    """Message-IDs of the messages whose subject starts with ``prefix``, once ``expected`` arrived (or the
    timeout passed) and nothing more arrived for 2 s (anything sent twice would arrive then)."""

    def counted() -> Counter[str]:
        return Counter(row["message_id"] for row in mailbox_headers(sbx, upn) if row["subject"].startswith(prefix))

    deadline = time.monotonic() + timeout
    counts = counted()
    while sum(counts.values()) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        counts = counted()
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < 2:
        time.sleep(0.5)
        latest = counted()
        if latest != counts:
            counts, quiet_since = latest, time.monotonic()
    return counts


def attachment_digest(sbx, upn: str, uid: int) -> str | None:
    """SHA-256 of the (single) attachment of message ``uid`` as delivered."""
    from airflow_provider_o365mail.testing.mailbox import imap_session

    with imap_session(sbx, upn) as client:
        client.select_folder("INBOX", readonly=True)
        raw = client.fetch([uid], ["BODY.PEEK[]"])[uid][b"BODY[]"]
    message = email.message_from_bytes(raw, policy=policy.default)
    del raw
    for part in message.iter_attachments():
        return hashlib.sha256(part.get_content()).hexdigest()
    return None


# ---------------------------------------------------------------------- memory for large attachments
# One message with one attachment, in a fresh process of this provider (tokens warm before the baseline).
_OURS_CHILD = """
import json, sys, time
from pathlib import Path
conn_id, path, to, subject, kind, helpers = sys.argv[1:7]
sys.path.insert(0, helpers)
from anchor_msgraph import memory_figures, reset_peak_rss
from airflow_provider_o365mail.hooks.o365mail import O365MailHook
hook = O365MailHook(conn_id)
hook.graph_access_token() if kind == "graph" else hook.get_access_token()
planned = hook.plan([{"to": to, "subject": subject, "html_content": "<p>extract attached</p>", "files": [path]}])
before, error, started = reset_peak_rss(), None, time.perf_counter()
try:
    hook.send_messages(planned)
except Exception as err:
    error = f"{type(err).__name__}: {err}"[:500]
answer = {"elapsed": time.perf_counter() - started, "error": error, "rss_before": before, **memory_figures()}
print("@@ " + json.dumps(answer), flush=True)
"""


def attachment_figures(sbx, admin, anchor, sizes, recipient, sender) -> dict:
    """``{(variant, megabytes): figures}`` for one message with a ``megabytes`` MB attachment each."""
    results: dict[tuple[str, int], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for megabytes in sizes:
            path = Path(tmp) / f"extract-{megabytes}mb.bin"
            digest = hashlib.sha256()
            with path.open("wb") as handle:
                for _ in range(megabytes):
                    piece = os.urandom(MiB)
                    digest.update(piece)
                    handle.write(piece)
            for variant, conn_id, kind in (
                (GRAPH, GRAPH_CONN_ID, "graph"),
                (SMTP, BENCH_CONN_ID, "smtp"),
                (ANCHOR, None, None),
            ):
                subject = f"memory {uuid.uuid4().hex[:8]} {VARIANT_KEYS[variant]} {megabytes} MB"
                admin.graph_reset_counters()  # fresh upload windows (150 MB per 5 minutes); see the docstring
                print(f"    {variant}: one message with a {megabytes} MB attachment", file=sys.stderr, flush=True)
                if variant == ANCHOR:
                    try:
                        figures = anchor.one(path, recipient, sender, subject)
                    except RuntimeError as err:  # the anchor's interpreter cannot run at all
                        results[(variant, megabytes)] = {"error": f"not run: {err}", "unrun": True}
                        continue
                else:
                    command = [
                        sys.executable,
                        "-c",
                        _OURS_CHILD,
                        conn_id,
                        str(path),
                        recipient,
                        subject,
                        kind,
                        str(ANCHOR_CHILD.parent),
                    ]
                    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
                    try:
                        figures = read_answer(child.stdout, "one")
                    finally:
                        child.wait()
                graph = admin.graph_counters(sender)
                figures["graph_requests"] = graph.get("requests", 0)
                figures["graph_operations"] = graph.get("by_operation", {})
                figures["uploaded"] = graph.get("uploaded_bytes", 0)
                figures["size"] = megabytes * MiB
                figures["arrived"], figures["intact"] = arrival(
                    sbx, recipient, subject, digest.hexdigest(), figures["error"]
                )
                results[(variant, megabytes)] = figures
            path.unlink()
    return results


def arrival(sbx, upn: str, subject: str, digest: str, error: str | None) -> tuple[int, bool | None]:
    """How many copies of the message arrived, and whether the attachment is byte for byte the file."""
    deadline = time.monotonic() + (5 if error else 180)
    while True:
        rows = [row for row in mailbox_headers(sbx, upn) if row["subject"] == subject]
        if rows or time.monotonic() > deadline:
            break
        time.sleep(1)
    if not rows:
        return 0, None
    time.sleep(2)  # a second copy would be here now
    rows = [row for row in mailbox_headers(sbx, upn) if row["subject"] == subject]
    return len(rows), attachment_digest(sbx, upn, rows[0]["uid"]) == digest


# ---------------------------------------------------------------------- report
def report(samples, per_batch, arrived, sent, n, memory, sizes, anchor_problem, anchor_errors) -> None:
    rates = {name: Stats.of([n / elapsed for elapsed in times]) for name, times in samples.items()}
    width = max(map(len, [*rates, "variant"]))
    print()
    print(f"throughput, {n} messages per batch (ours: one send_messages call; anchor: one send_email call each):")
    print(f"  {'variant':<{width}}  {'s per batch':>11}  throughput msgs/s")
    for name, rate in rates.items():
        print(f"  {name:<{width}}  {Stats.of(samples[name]).median:11.2f}  {rate.describe('msgs/s')}")
    print()
    print(
        "requests per message (medians over the measured batches): Graph requests and 429s at the Graph stand-in, "
        "token requests at the Entra stand-in, SMTP at smtplib (each Graph request is one round trip too):"
    )
    header = ("Graph", "429s", "tokens", "SMTP sessions/batch", "SMTP round trips", "SMTP replies")
    print(f"  {'variant':<{width}}  " + "  ".join(header))
    for name in rates:
        deltas = per_batch[name]
        med = {k: Stats.of([d[k] for d in deltas]).median for k in deltas[0]}
        values = (
            med["graph"],
            med["throttled"],
            med["tokens"],
            med["smtp_sessions"] * n,
            med["smtp_round_trips"],
            med["smtp_replies"],
        )
        print(f"  {name:<{width}}  " + "  ".join(f"{v:>{len(h)}.2f}" for v, h in zip(values, header, strict=True)))
    print()
    print("delivered (distinct Message-IDs in the recipient's INBOX, all rounds including the warm-up):")
    for name, counts in arrived.items():
        twice = sum(1 for c in counts.values() if c > 1)
        print(
            f"  {name:<{width}}  {len(counts)} of {sent[name]}; sent twice: {twice}; missing: {sent[name] - len(counts)}"
        )
    if anchor_problem:
        print(f"  anchor: not measured: {anchor_problem}")
    for error in Counter(anchor_errors).most_common(3):
        print(f"  anchor: {error[1]} send(s) failed: {error[0]}")
    print()
    print("ratios of median throughput (same rounds, interleaved):")
    rows = [
        (f"{GRAPH} / {SMTP}", rates[GRAPH].median, rates[SMTP].median),
        (f"raw sendMail (floor) / {GRAPH}", rates[RAW].median, rates[GRAPH].median),
    ]
    if ANCHOR in rates:
        rows += [
            (f"{GRAPH} / anchor", rates[GRAPH].median, rates[ANCHOR].median),
            (f"{GRAPH_APP} / anchor", rates[GRAPH_APP].median, rates[ANCHOR].median),
            (f"{SMTP} / anchor", rates[SMTP].median, rates[ANCHOR].median),
        ]
    print_ratios(rows)
    print()
    print(
        "one message with a large attachment, each in a fresh process: RSS just before the send, peak RSS during "
        "it (VmHWM reset just before) and over the process's life (VmHWM):"
    )
    for variant in (GRAPH, SMTP, ANCHOR):
        for mb in sizes:
            f = memory[(variant, mb)]
            label = f"{variant}, {mb} MB"
            if f.get("unrun"):
                print(f"  {label:<{width + 8}}  {f['error']}")
                continue
            growth = f["rss_peak"] - f["rss_before"]
            rss = (
                f"RSS {f['rss_before'] / MiB:.0f} MB before, peak {f['rss_peak'] / MiB:.0f} MB during (+{growth / MiB:.1f} "
                f"MB = {growth / f['size']:.2f}x the attachment), process peak {f['process_peak'] / MiB:.0f} MB"
            )
            if f["error"]:
                print(f"  {label:<{width + 8}}  refused after {f['elapsed']:.2f} s; {rss}; arrived {f['arrived']}")
                print(f"  {'':<{width + 8}}  {f['error']}")
                continue
            ops = ", ".join(f"{k} {v}" for k, v in sorted(f["graph_operations"].items()))
            print(
                f"  {label:<{width + 8}}  sent in {f['elapsed']:.1f} s; {rss}; arrived {f['arrived']}, attachment "
                f"intact (SHA-256): {f['intact']}" + (f"; {f['graph_requests']} Graph requests ({ops})" if ops else "")
            )
    print()
    print("ratios of peak RSS during the send, and of its growth over the RSS before it:")
    rows = []
    for mb in sizes:
        g, s = memory[(GRAPH, mb)], memory[(SMTP, mb)]
        if not (g["error"] or s["error"]):
            rows.append((f"{mb} MB: Graph / SMTP (ours), peak", g["rss_peak"], s["rss_peak"]))
            rows.append(
                (
                    f"{mb} MB: Graph / SMTP (ours), growth",
                    g["rss_peak"] - g["rss_before"],
                    s["rss_peak"] - s["rss_before"],
                )
            )
    if rows:
        print_ratios(rows)
    for mb in sizes:
        a = memory[(ANCHOR, mb)]
        verdict = "refused (3 MB cap)" if a["error"] else f"sent (peak RSS {a['rss_peak'] / MiB:.0f} MB)"
        print(f"  anchor, {mb} MB: {verdict}")


if __name__ == "__main__":
    main()
