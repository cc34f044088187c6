"""Mail-triggered scheduling, measured in one run against a real Airflow and the sandbox.

1. Delivery-to-asset-event latency of the shared IDLE stream vs checking every 5 s (what a polling
   sensor with ``poke_interval=5`` does): ``--samples`` deliveries each after a warm-up, the two
   methods interleaved in a shuffled order (bench/common.py); medians with min and max.
2. IMAP connections held by 1, 10 and 100 watchers on one mailbox folder (Dovecot's own count).
3. Messages per second the stream turns into stored asset events in one burst of 1,000.

Starts its own api-server, triggerer, scheduler and dag-processor in a throw-away AIRFLOW_HOME:

    python -m airflow_provider_o365mail.testing up --env-file .sandbox.env
    python bench/imap_events.py --env-file .sandbox.env
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import textwrap
import threading
import time
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

from airflow_provider_o365mail.testing.airflow_services import wait_until


def event_times(asset_name: str) -> list[tuple[str, float]]:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = (
            session.query(AssetEvent)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .filter(AssetModel.name == asset_name)
            .all()
        )
        return [((row.extra or {}).get("payload", {}).get("subject", ""), row.timestamp.timestamp()) for row in rows]


def fire_times(services, prefix: str) -> dict[int, float]:
    """When the triggerer fired the events for ``prefix <n>``, by n (its log lines)."""
    import datetime as dt
    import re

    times: dict[int, float] = {}
    pattern = re.compile(r"^(\S+Z) .*Trigger fired event.*'subject': '" + re.escape(prefix) + r" (\d+)'")
    for line in services.log_text("triggerer").splitlines():
        match = pattern.search(line)
        if match and int(match.group(2)) not in times:
            times[int(match.group(2))] = dt.datetime.fromisoformat(match.group(1).replace("Z", "+00:00")).timestamp()
    return times


def running_watchers() -> int:
    """Asset-watcher triggers a triggerer has picked up."""
    from airflow.models.trigger import Trigger
    from airflow.utils.session import create_session

    with create_session() as session:
        return (
            session.query(Trigger)
            .filter(Trigger.triggerer_id.isnot(None), Trigger.classpath.like("%O365ImapEventTrigger"))
            .count()
        )


def watcher_dag(dag_id: str, conn_id: str, watchers: dict[str, str]) -> str:
    assets = "\n".join(
        f'a{i} = Asset("{name}", watchers=[AssetWatcher(name="{name}", '
        f'trigger=O365ImapEventTrigger(conn_id="{conn_id}", subject="{subject}"))])'
        for i, (name, subject) in enumerate(watchers.items())
    )
    schedule = " | ".join(f"a{i}" for i in range(len(watchers)))
    return (
        "from airflow.sdk import Asset, AssetWatcher, dag, task\n"
        "from airflow_provider_o365mail.triggers.imap_events import O365ImapEventTrigger\n\n"
        f"{assets}\n\n"
        f"@dag(schedule=({schedule}))\n"
        f"def {dag_id}():\n"
        "    @task\n"
        "    def noop():\n"
        "        pass\n\n"
        "    noop()\n\n"
        f"{dag_id}()\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--env-file", default=".sandbox.env")
    parser.add_argument("--samples", type=int, default=15, help="deliveries per waiting method (after a warm-up)")
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--watchers", default="1,10,100")
    args = parser.parse_args()
    print_header("Mail-triggered scheduling (bench/imap_events.py)")

    sbx = bench_environment(args.env_file)
    home = Path(os.environ["AIRFLOW_HOME"])
    dags = home / "dags"
    dags.mkdir(exist_ok=True)
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(dags)

    from airflow.models import Connection
    from airflow.utils.session import create_session

    from airflow_provider_o365mail.hooks.o365mail import O365MailHook
    from airflow_provider_o365mail.sensors.imap import O365ImapSensor
    from airflow_provider_o365mail.testing.airflow_services import start_airflow_services
    from airflow_provider_o365mail.testing.sandbox import Sandbox

    conn = json.loads(os.environ[f"AIRFLOW_CONN_{BENCH_CONN_ID.upper()}"])
    with create_session() as session:  # in the DB: the triggerer must see it too
        session.add(
            Connection(
                conn_id=BENCH_CONN_ID,
                conn_type="o365mail",
                login=conn["login"],
                password=conn["password"],
                extra=json.dumps(conn["extra"]),
            )
        )
    services = start_airflow_services(home, {"AIRFLOW__CORE__DAGS_FOLDER": str(dags)})
    services.start("scheduler")
    services.start("dag-processor")
    hook = O365MailHook(BENCH_CONN_ID)
    sandbox = Sandbox(sbx.state_dir)
    try:
        tag = uuid.uuid4().hex[:6]

        def started(count: int = 1) -> bool:
            return services.log_text("triggerer").count(f"IMAP stream {BENCH_CONN_ID}/INBOX starts") >= count

        # 1. latency
        (dags / "bench_latency.py").write_text(
            watcher_dag("bench_latency", BENCH_CONN_ID, {f"lat_{tag}": f"Lat {tag}"})
        )
        wait_until(started, 180, "the latency watcher's stream")
        numbers = itertools.count()
        sent_at: dict[int, float] = {}

        def idle_sample() -> float:
            """Send one message to the watched subject; seconds until its asset event is stored."""
            number = next(numbers)
            subject = f"Lat {tag} {number}"
            hook.send_email(to=sbx.user, subject=subject, text_content="x")
            sent_at[number] = sent = time.time()
            stored = wait_until(
                lambda s=subject: [t for subj, t in event_times(f"lat_{tag}") if subj == s], 30, "the event"
            )
            time.sleep(random.uniform(0.2, 0.8))  # do not send in lock-step with the stream's cycle
            return stored[0] - sent

        def poll_sample() -> float:
            """A 5 s polling sensor; the mail arrives at a random point of the interval."""
            subject = f"Poll {tag} {uuid.uuid4().hex[:6]}"
            sensor = O365ImapSensor(task_id="p", conn_id=BENCH_CONN_ID, subject=subject)
            sent: list[float] = []
            timer = threading.Timer(
                random.uniform(0, 5.0),
                lambda s=subject, out=sent: (
                    hook.send_email(to=sbx.user, subject=s, text_content="x"),
                    out.append(time.time()),
                ),
            )
            timer.start()
            while not sensor.poke({}):
                time.sleep(5.0)
            timer.join()
            return time.time() - sent[0]

        stored_label, poll_label = "shared IDLE stream, asset event stored", "checking every 5 s (sensor pokes)"
        samples = run_interleaved({stored_label: idle_sample, poll_label: poll_sample}, args.samples, self_timed=True)
        # The first IDLE message was the warm-up; the triggerer's log says when each event fired.
        fired_at = fire_times(services, f"Lat {tag}")
        fired = [fired_at[n] - sent_at[n] for n in sorted(sent_at)[1:]]
        fired_label = "shared IDLE stream, trigger fired"
        latency = {fired_label: Stats.of(fired), **{name: Stats.of(times) for name, times in samples.items()}}
        print("1. delivery-to-asset-event latency (IDLE and polling samples interleaved, after a warm-up)")
        print_stats_table(latency, "s", digits=2)
        print("  (asset event stored = trigger fired + Airflow's ~1 s state sync)")
        print_ratios(
            [
                ("5 s polling / IDLE fired (medians)", latency[poll_label].median, latency[fired_label].median),
                ("5 s polling / IDLE stored (medians)", latency[poll_label].median, latency[stored_label].median),
            ]
        )

        # 2. connections per watcher count: watchers are added next to the latency watcher (same folder)
        print("2. IMAP connections held by N watchers of one folder")
        total = 1
        for count in [int(n) for n in args.watchers.split(",")]:
            if count > total:
                dag_id = f"bench_watchers_{count}"
                watchers = {f"w{count}_{i}_{tag}": f"W{count} {i} {tag}" for i in range(count - total)}
                (dags / f"{dag_id}.py").write_text(watcher_dag(dag_id, BENCH_CONN_ID, watchers))
                total = count
            wait_until(lambda c=count: running_watchers() >= c, 300, f"{count} running watchers", 1)
            time.sleep(5)  # late subscribers join the group
            print(f"  {count:>4} watcher(s): {sandbox.imap_sessions(sbx.user)} IMAP connection(s) (goal <= 2 for 100)")

        # 3. burst, with all the watchers above still subscribed to the stream
        (dags / "bench_burst.py").write_text(
            watcher_dag("bench_burst", BENCH_CONN_ID, {f"burst_{tag}": f"Burst {tag}"})
        )
        wait_until(lambda: running_watchers() >= total + 1, 300, "the burst watcher", 1)
        time.sleep(5)
        # Drop the burst straight into the Maildir (as a delivery agent would), so that the stream's own
        # throughput is measured rather than the SMTP submission rate.
        new_dir = Path(sbx.state_dir) / "mail" / sbx.user / "Maildir" / "new"
        dropped_at = time.time()
        for i in range(args.burst):
            data = (
                f"From: supplier@partner.test\r\nTo: {sbx.user}\r\nSubject: Burst {tag} {i}\r\n"
                f"Message-ID: <burst-{i}-{tag}@partner.test>\r\n\r\nbody {i}\r\n"
            ).encode()
            path = new_dir / f"{int(dropped_at)}.B{i}P{os.getpid()}.bench,S={len(data)}"
            path.write_bytes(data)
            os.chown(path, 65534, 65534)
        dropped = time.time()
        wait_until(lambda: len(event_times(f"burst_{tag}")) >= args.burst, 600, "the burst's events", 1)
        times = sorted(t for _, t in event_times(f"burst_{tag}"))
        print("3. burst (one burst, not repeated)")
        print(
            f"  {args.burst} messages dropped into the INBOX in {dropped - dropped_at:.1f} s; all {args.burst} asset "
            f"events stored {times[-1] - dropped_at:.1f} s after the first: "
            f"{args.burst / (times[-1] - dropped_at):.0f} messages/s end to end "
            f"(first event after {times[0] - dropped_at:.1f} s, {len(times)} events, "
            f"{len({s for s, _ in event_times(f'burst_{tag}')})} distinct)"
        )
    finally:
        services.stop_all()
        sandbox.clean_mailboxes()
        print(textwrap.dedent(f"logs: {services.logs}"))


if __name__ == "__main__":
    main()
