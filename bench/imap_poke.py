"""IMAP sensing cost, side by side in one run, against the sandbox's Dovecot.

1. Poke cost with 0 new messages in folders of 1k / 10k / 100k messages:
   - ours, ``new_only`` (watermark): one STATUS per folder when nothing is new;
   - ours without a watermark (``subject=...`` compiled into a server-side SEARCH);
   ours reuse a pooled logged-in session between pokes, as the pokes of one poke-mode task do; each
   of the two has a connection id of its own (its own pool), as a sensor alone would: a session that
   SEARCHed has the folder selected, and a selected folder is SELECTed again instead of STATUS;
   - apache-airflow-providers-imap ``ImapHook.has_mail_attachment`` (the official sensor's poke):
     SEARCH ALL, then FETCH (RFC822) of every message. It has no OAuth2, so here its ``get_conn``
     logs in with XOAUTH2; everything after the login is the provider's own code.
2. Delivery-to-detection latency: the deferrable trigger's IDLE wait vs polling every 5 s, both
   measured; a 60 s ``poke_interval`` is COMPUTED (half the interval plus one poke), not measured.
3. Peak Python memory while O365ImapAttachmentOperator downloads a 50 MB attachment.

Every timing is a median (with min and max) of repeated runs after a warm-up, the variants
interleaved in a shuffled order (bench/common.py); ratios are of those medians.

Folders are filled by writing Maildir files directly (APPENDing 100k messages would take minutes);
Dovecot indexes them once before measuring, as a live server would have.

    python -m airflow_provider_o365mail.testing up --env-file .sandbox.env
    python bench/imap_poke.py --env-file .sandbox.env
"""

from __future__ import annotations

import argparse
import asyncio
import imaplib
import os
import random
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid
from pathlib import Path

from common import (
    BENCH_CONN_ID,
    Stats,
    bench_environment,
    print_header,
    print_ratios,
    print_stats_table,
    run_interleaved,
)

WATERMARK_CONN_ID = "o365mail_bench_watermark"
MESSAGE = (
    "From: sender{n}@partner.test\r\nTo: alex@o365.sandbox.test\r\nSubject: routine message {n}\r\n"
    "Message-ID: <bench-{n}-{tag}@partner.test>\r\nDate: Mon, 02 Nov 2026 10:00:00 +0000\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n\r\nBody of message {n}.\r\n"
)


def fill_folder(sbx, folder: str, count: int) -> None:
    """Create ``folder`` over IMAP, drop ``count`` Maildir files in, let Dovecot index them."""
    from airflow_provider_o365mail.testing.mailbox import imap_session

    with imap_session(sbx, sbx.user) as client:
        if client.folder_exists(folder):
            client.delete_folder(folder)
        client.create_folder(folder)
    cur = Path(sbx.state_dir) / "mail" / sbx.user / "Maildir" / f".{folder}" / "cur"
    tag = uuid.uuid4().hex[:6]
    stamp = int(time.time())
    for n in range(count):
        data = MESSAGE.format(n=n, tag=tag).encode()
        path = cur / f"{stamp}.M{n}P{os.getpid()}.bench,S={len(data)}:2,S"  # S= must be the exact size
        path.write_bytes(data)
        os.chown(path, 65534, 65534)
    os.chown(cur, 65534, 65534)
    with imap_session(sbx, sbx.user) as client:
        started = time.perf_counter()
        info = client.select_folder(folder, readonly=True)
        client.search(["SUBJECT", "warm-up"])
        print(f"  {folder}: {info[b'EXISTS']} messages indexed in {time.perf_counter() - started:.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--env-file", default=".sandbox.env")
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--official-max", type=int, default=10000, help="largest folder for the official hook")
    parser.add_argument("--repeat", type=int, default=15, help="measured pokes per variant and folder size")
    parser.add_argument("--latency-samples", type=int, default=5, help="measured deliveries per waiting method")
    parser.add_argument("--attachment-mb", type=int, default=50)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print_header("IMAP sensing cost (bench/imap_poke.py)", ["apache-airflow-providers-imap"])

    sbx = bench_environment(args.env_file)
    os.environ["SSL_CERT_FILE"] = sbx.ca_file  # the official hook builds ssl.create_default_context()

    from airflow.providers.imap.hooks.imap import ImapHook

    from airflow_provider_o365mail.core.watermark import FolderWatermark, VariableWatermarkStore
    from airflow_provider_o365mail.hooks.o365mail import O365MailHook
    from airflow_provider_o365mail.operators.imap_attachments import O365ImapAttachmentOperator
    from airflow_provider_o365mail.sensors.imap import O365ImapSensor
    from airflow_provider_o365mail.testing.mailbox import imap_session
    from airflow_provider_o365mail.testing.sandbox import Sandbox
    from airflow_provider_o365mail.triggers.imap import O365ImapTrigger

    hook = O365MailHook(BENCH_CONN_ID)
    token = hook.get_access_token()

    class XOAuth2ImapHook(ImapHook):
        """The official hook with an XOAUTH2 login; search/fetch/parse are the provider's code."""

        def get_conn(self):
            if not self.mail_client:
                self.mail_client = imaplib.IMAP4_SSL("127.0.0.1", sbx.imap_port)
                sasl = f"user={sbx.user}\x01auth=Bearer {token}\x01\x01".encode()
                self.mail_client.authenticate("XOAUTH2", lambda challenge: b"" if challenge else sasl)
            return self

    os.environ["AIRFLOW_CONN_IMAP_BENCH"] = '{"conn_type": "imap", "host": "127.0.0.1"}'
    # The new_only sensor's own connection id, so its pooled session is not one the SEARCH variant used.
    os.environ[f"AIRFLOW_CONN_{WATERMARK_CONN_ID.upper()}"] = sbx.connection_json(refresh_token=sbx.new_refresh_token())
    O365MailHook(WATERMARK_CONN_ID).get_access_token()  # warm its token store too

    print(
        f"1. poke cost with 0 new messages: {args.repeat} pokes per variant after a warm-up, variants interleaved "
        "in shuffled order; ours reuse a pooled session (one pool per variant), providers-imap logs in per poke"
    )
    results: dict[tuple[str, int], Stats] = {}
    for size in sizes:
        folder = f"Bench {size}"
        fill_folder(sbx, folder, size)
        with imap_session(sbx, sbx.user) as client:
            status = client.folder_status(folder, [b"UIDNEXT", b"UIDVALIDITY"])
        watermark = O365ImapSensor(
            task_id="wm", conn_id=WATERMARK_CONN_ID, folders=folder, new_only=True, watermark_id=f"bench {folder}"
        )
        VariableWatermarkStore(watermark.watermark_key()).save(
            {folder: FolderWatermark(int(status[b"UIDVALIDITY"]), int(status[b"UIDNEXT"]) - 1, [], time.time())}
        )
        search = O365ImapSensor(task_id="s", conn_id=BENCH_CONN_ID, folders=folder, subject="quarterly invoice")

        def official(f=folder) -> None:
            with XOAuth2ImapHook("imap_bench") as official_hook:
                assert not official_hook.has_mail_attachment("*.csv", mail_folder=f'"{f}"')

        variants = {"ours new_only": lambda w=watermark: w.poke({}), "ours SEARCH": lambda s=search: s.poke({})}
        if size <= args.official_max:
            variants["providers-imap has_mail_attachment"] = official
        samples = run_interleaved(variants, args.repeat)
        stats = {name: Stats.of(times).scaled(1000) for name, times in samples.items()}
        results.update({(name, size): value for name, value in stats.items()})
        print(f"  {size:,} messages:")
        print_stats_table(stats, "ms", indent="    ")
        sys.stdout.flush()

    small, large = min(sizes), max(sizes)
    print("  ratios of medians:")
    rows = [
        (
            f"ours new_only {large:,} / {small:,} msgs  (goal <= 1.5)",
            results[("ours new_only", large)].median,
            results[("ours new_only", small)].median,
        ),
        (
            f"ours SEARCH {large:,} / {small:,} msgs",
            results[("ours SEARCH", large)].median,
            results[("ours SEARCH", small)].median,
        ),
    ]
    for size in sizes:
        official_stats = results.get(("providers-imap has_mail_attachment", size))
        if official_stats is not None:
            rows.append(
                (
                    f"official / ours new_only at {size:,}" + ("  (goal >= 100x)" if size == 10000 else ""),
                    official_stats.median,
                    results[("ours new_only", size)].median,
                )
            )
            rows.append(
                (f"official / ours SEARCH at {size:,}", official_stats.median, results[("ours SEARCH", size)].median)
            )
    print_ratios(rows, indent="    ")

    poll_interval = 5.0
    print(
        f"2. delivery-to-detection latency: {args.latency_samples} deliveries per method after a warm-up, "
        "methods interleaved in shuffled order"
    )

    async def idle_once(subject: str) -> float:
        trigger = O365ImapTrigger(conn_id=BENCH_CONN_ID, spec={"folders": ["INBOX"], "subject": subject})
        events = trigger.run()
        first = asyncio.ensure_future(events.__anext__())
        await asyncio.sleep(1.5)  # the trigger checked once and is waiting in IDLE
        sent = await asyncio.to_thread(_send, hook, sbx.user, subject)
        await first
        await events.aclose()
        return time.perf_counter() - sent

    def idle_sample() -> float:
        return asyncio.run(idle_once(f"latency {uuid.uuid4().hex[:8]}"))

    def poll_sample() -> float:
        subject = f"poll {uuid.uuid4().hex[:8]}"
        sensor = O365ImapSensor(task_id="p", conn_id=BENCH_CONN_ID, subject=subject)
        sent: list[float] = []
        delay = random.uniform(0, poll_interval)  # mail arrives at a random point of the interval
        sender = threading.Timer(delay, lambda s=subject, out=sent: out.append(_send(hook, sbx.user, s)))
        sender.start()
        while not sensor.poke({}):
            time.sleep(poll_interval)
        sender.join()
        return time.perf_counter() - sent[0]

    idle_label, poll_label = "IDLE trigger (goal < 2 s)", f"poke every {poll_interval:.0f} s"
    latency = {
        name: Stats.of(times)
        for name, times in run_interleaved(
            {idle_label: idle_sample, poll_label: poll_sample}, args.latency_samples, self_timed=True
        ).items()
    }
    print_stats_table(latency, "s", digits=2)
    print_ratios(
        [
            (
                f"poke every {poll_interval:.0f} s / IDLE (measured medians)",
                latency[poll_label].median,
                latency[idle_label].median,
            )
        ]
    )
    # Not measured (a 60 s interval would need minutes per sample): mail arrives at a uniformly
    # random point of the interval, so the expected wait is half of it, plus one poke.
    poke_s = results[("ours SEARCH", small)].median / 1000
    computed = 60 / 2 + poke_s
    print(
        f"  poke every 60 s: COMPUTED, not measured: expected value = half the interval (30 s) + one measured "
        f"SEARCH poke ({poke_s * 1000:.0f} ms) = {computed:.1f} s = {computed / latency[idle_label].median:.0f}x "
        "the measured IDLE median"
    )

    print(f"3. peak Python memory downloading a {args.attachment_mb} MB attachment (one run: memory, not time)")
    source = Path(tempfile.mkdtemp(prefix="o365-bench-att-")) / "large.bin"
    source.write_bytes(os.urandom(args.attachment_mb * 1024 * 1024))
    subject = f"large {uuid.uuid4().hex[:8]}"
    hook.send_email(to=sbx.user, subject=subject, text_content="large", files=[source])
    messages = None
    for _ in range(120):
        found = O365ImapSensor(task_id="l", conn_id=BENCH_CONN_ID, subject=subject).poke({})
        if found:
            messages = found.xcom_value
            break
        time.sleep(0.5)
    assert messages, "the large message did not arrive"
    target = source.parent / "out"
    tracemalloc.start()
    started = time.perf_counter()
    (written,) = O365ImapAttachmentOperator(
        task_id="d", conn_id=BENCH_CONN_ID, messages=messages, target_dir=target
    ).execute({})
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    size = source.stat().st_size
    assert Path(written).read_bytes() == source.read_bytes()
    print(
        f"  {size / 2**20:.0f} MB in {elapsed:.1f} s, peak traced memory {peak / 2**20:.1f} MB = "
        f"{peak / size:.3f}x the attachment (goal < 1.5x)"
    )
    Sandbox(sbx.state_dir).clean_mailboxes()


def _send(hook, to: str, subject: str) -> float:
    hook.send_email(to=to, subject=subject, text_content="x")
    return time.perf_counter()


if __name__ == "__main__":
    main()
