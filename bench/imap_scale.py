"""Many deferred sensors of one mailbox in one triggerer process: connections, fan-out, latency, lag, memory.

N = 1, 10, 100, 1,000 ``O365ImapTrigger.run()`` coroutines run concurrently on one event loop (as
the triggerer runs them), all watching one folder of one mailbox, each with its own spec (a
different ``max_messages``: no two checks are identical, so nothing is coalesced: the worst case);
"same N=1000" gives all of them one spec (every check after the push coalesces into one).
Once every trigger has checked and waits, ONE message matching all of them is APPENDed, and:

- IMAP connections held: the most at once, counted by a TCP proxy (FaultProxy) in front of Dovecot;
- share of triggers that fired within 30 s of the delivery;
- delivery-to-fire latency p50 / p95 over the triggers (from just before the APPEND);
- event-loop lag, max and p99, of a 5 ms ticker task over the whole run;
- memory per waiting trigger: tracemalloc's traced memory once all wait, over N (a separate,
  untimed run: tracemalloc slows Python down several times).

"today" is the one-connection-per-trigger path this replaced (its own IDLE per trigger, a fresh
login per check; reproduced below from the previous ``O365ImapTrigger.run``). It runs only where
it fits under the sandbox's 20-connection cap (N <= 10).

Runs are interleaved in shuffled order and repeated (bench/common.py); the table shows medians
over the runs. Goals at N = 1,000: <= 6 connections, 100 % fire, p95 <= 2 s, lag p99 <= 50 ms,
<= 100 KB per waiting sensor.

    python -m airflow_provider_o365mail.testing up --env-file .sandbox.env
    python bench/imap_scale.py --env-file .sandbox.env [--sizes 1,10,100,1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import time
import tracemalloc
import uuid
from collections.abc import Callable
from typing import Any

from common import Stats, bench_environment, print_header, print_ratios, run_interleaved

FOLDER = "Scale"
FIRE_TIMEOUT = 30.0
READY_TIMEOUT = 300.0
LEGACY_MAX_N = 10  # today's path needs N IDLE connections + its checks: above ~15 the cap refuses logins
TICK = 0.005


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class LegacyTrigger:
    """The previous ``O365ImapTrigger.run``: its own IDLE connection and a fresh login for every check."""

    checks_done = 0

    def __init__(self, conn_id: str, spec: dict[str, Any]) -> None:
        self.conn_id = conn_id
        self.spec = spec

    async def run(self):
        from airflow_provider_o365mail.hooks.o365mail import O365MailHook
        from airflow_provider_o365mail.imap import watch as imap_watch
        from airflow_provider_o365mail.imap.idle import first_completed, wait_for_new_mail
        from airflow_provider_o365mail.imap.scan import ImapSession
        from airflow_provider_o365mail.imap.watch import WatchSpec

        spec = WatchSpec.from_dict(self.spec)
        hook = O365MailHook(self.conn_id)

        def check():
            with ImapSession(lambda: hook.imap_client()) as session:
                return imap_watch.check(session, spec, None)

        while True:
            result = await asyncio.to_thread(check)
            LegacyTrigger.checks_done += 1
            if result.messages:
                yield result
                return
            # Its own IDLE connection per folder (what the removed MailWaiter did), not the shared hub.
            endpoint = await asyncio.to_thread(hook.imap_endpoint)
            token = await asyncio.to_thread(hook.access_token)
            waits = [
                wait_for_new_mail(endpoint, folder, token, scan.get("uidnext"), 1500)
                for folder, scan in result.scanned.items()
            ]
            (await first_completed(waits)).result()


class Scenario:
    """One run: N triggers of one mailbox behind a fresh proxy and connection id (a fresh pool)."""

    counter = 0

    def __init__(self, sbx: Any, n: int, variant: str) -> None:
        self.sbx, self.n, self.variant = sbx, n, variant

    def _connection(self, proxy_port: int) -> str:
        Scenario.counter += 1
        conn_id = f"o365mail_scale_{os.getpid()}_{Scenario.counter}"
        os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"] = self.sbx.connection_json(
            refresh_token=self.sbx.new_refresh_token(), imap_port=proxy_port
        )
        return conn_id

    def run(self, *, memory: bool = False) -> dict[str, float]:
        from airflow_provider_o365mail.testing.fault_proxy import FaultProxy

        with FaultProxy(("127.0.0.1", self.sbx.imap_port)) as proxy:
            conn_id = self._connection(proxy.port)
            metrics = asyncio.run(self._run(conn_id, proxy, memory))
            metrics["connections"] = proxy.stats().max_concurrent
        return metrics

    async def _ready(self, conn_id: str, proxy: Any) -> None:
        from airflow_provider_o365mail.core.gate import check_gate
        from airflow_provider_o365mail.imap.hub import idle_hub

        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.variant == "today":
                if LegacyTrigger.checks_done >= self.n and proxy.stats().active >= self.n:
                    break
            else:
                gate = check_gate(("o365mail", conn_id, ""), 4)
                selected = [s for s in idle_hub().watched() if s.sessions >= 1]
                started = gate.requested >= self.n if self.variant == "same" else gate.ran >= self.n
                if started and gate.running == 0 and not gate._queued and selected:
                    break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError(f"{self.n} {self.variant} triggers did not all start waiting in {READY_TIMEOUT:.0f} s")
        await asyncio.sleep(1.0)  # every IDLE is in place

    async def _run(self, conn_id: str, proxy: Any, memory: bool) -> dict[str, float]:
        from airflow_provider_o365mail.testing.hostile_mail import deliver, good_message
        from airflow_provider_o365mail.triggers.imap import O365ImapTrigger

        loop = asyncio.get_running_loop()
        lags: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            expected = loop.time() + TICK
            while not stop.is_set():
                await asyncio.sleep(max(0.0, expected - loop.time()))
                now = loop.time()
                lags.append(max(0.0, now - expected))
                expected = now + TICK

        tick = asyncio.ensure_future(ticker())
        subject = f"scale {uuid.uuid4().hex[:10]}"
        # "same": every sensor has the same spec (checks coalesce); otherwise each its own (worst case).
        same = self.variant == "same"
        specs = [{"folders": [FOLDER], "subject": subject, "max_messages": 1 if same else i + 1} for i in range(self.n)]
        LegacyTrigger.checks_done = 0
        if memory:
            gc.collect()
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
        make: Callable[[dict[str, Any]], Any] = (
            (lambda spec: LegacyTrigger(conn_id, spec))
            if self.variant == "today"
            else (lambda spec: O365ImapTrigger(conn_id=conn_id, spec=spec, max_idle=1500))
        )
        fired: list[float | None] = [None] * self.n
        generators = [make(spec).run() for spec in specs]
        tasks = []
        for i, gen in enumerate(generators):
            task = asyncio.ensure_future(gen.__anext__())
            task.add_done_callback(lambda _t, i=i: fired.__setitem__(i, time.perf_counter()))
            tasks.append(task)
        try:
            await self._ready(conn_id, proxy)
            per_sensor = float("nan")
            if memory:
                gc.collect()
                per_sensor = (tracemalloc.get_traced_memory()[0] - base) / self.n
                tracemalloc.stop()
            raw = good_message(self.sbx.user, subject=subject)
            sent = time.perf_counter()
            await asyncio.to_thread(deliver, self.sbx, self.sbx.user, raw, FOLDER)
            await asyncio.wait(tasks, timeout=FIRE_TIMEOUT)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for gen in generators:
                await gen.aclose()
            stop.set()
            await tick
        errors = [t for t in tasks if not t.cancelled() and t.exception() is not None]
        if errors:
            print(f"    {len(errors)} trigger(s) failed, e.g. {errors[0].exception()!r}", file=sys.stderr)
        latencies = [f - sent for f, t in zip(fired, tasks, strict=True) if f is not None and not t.cancelled()]
        return {
            "fired": len(latencies) / self.n,
            "p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95),
            "lag_max": max(lags) * 1000,
            "lag_p99": percentile(lags, 99) * 1000,
            "kb_per_sensor": per_sensor / 1024,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-file", required=True)
    parser.add_argument("--sizes", default="1,10,100,1000")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--same-spec-size", type=int, default=1000, help="N of the all-identical-specs variant (0: none)"
    )
    args = parser.parse_args()
    print_header("IMAP connections, fan-out, latency, loop lag and memory of N deferred sensors (#13)", ["aioimaplib"])
    sbx = bench_environment(args.env_file)
    from airflow_provider_o365mail.testing.hostile_mail import deliver, good_message

    deliver(sbx, sbx.user, good_message(sbx.user, subject="scale folder"), FOLDER)  # creates the folder
    limits = sbx.admin().mail_limits()
    print(f"sandbox caps: {limits}; [o365mail] max_imap_connections_per_mailbox = 4 (default)")
    sizes = [int(s) for s in args.sizes.split(",")]
    variants: dict[str, tuple[int, str]] = {f"shared N={n}": (n, "shared") for n in sizes}
    variants.update({f"today N={n}": (n, "today") for n in sizes if n <= LEGACY_MAX_N})
    if args.same_spec_size:
        variants[f"same N={args.same_spec_size}"] = (args.same_spec_size, "same")
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}

    def sample(name: str) -> Callable[[], float]:
        def run() -> float:
            n, variant = variants[name]
            metrics = Scenario(sbx, n, variant).run()
            runs[name].append(metrics)
            return metrics["p95"]

        return run

    print(f"timed runs: {args.repeat} per variant after a warm-up, interleaved in shuffled order", flush=True)
    run_interleaved({name: sample(name) for name in variants}, args.repeat, self_timed=True)
    for name in variants:  # the warm-up's metrics are not reported
        runs[name] = runs[name][-args.repeat :]

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    width = max(len(name) for name in variants)
    header = (
        f"  {'variant':<{width}} {'conns max':>9} {'fired':>7} {'p50 s':>7} {'p95 s':>7} "
        f"{'lag max ms':>10} {'lag p99 ms':>10}"
    )
    print("\nmedians over the timed runs (connections: the most open at once, via the proxy)")
    print(header)
    for name in variants:
        print(
            f"  {name:<{width}} {med(name, 'connections'):>9.0f} {med(name, 'fired') * 100:>6.0f}% "
            f"{med(name, 'p50'):>7.2f} {med(name, 'p95'):>7.2f} {med(name, 'lag_max'):>10.1f} "
            f"{med(name, 'lag_p99'):>10.1f}"
        )
    print("\n  spread of p95 (s) over the runs:")
    for name in variants:
        print(f"    {name:<{width}} {Stats.of([r['p95'] for r in runs[name]]).describe('s', 2)}")
    print("\nmemory runs: one per variant with tracemalloc (untimed); traced memory once all wait, over N", flush=True)
    memory = {name: Scenario(sbx, *variants[name]).run(memory=True)["kb_per_sensor"] for name in variants}
    for name in variants:
        print(f"  {name:<{width}} {memory[name]:>9.1f} KB per waiting sensor")
    ratios = []
    for n in sizes:
        if n > LEGACY_MAX_N:
            continue
        today, shared = f"today N={n}", f"shared N={n}"
        ratios += [
            (f"connections today/shared N={n}", med(today, "connections"), med(shared, "connections")),
            (f"p95 latency today/shared N={n}", med(today, "p95"), med(shared, "p95")),
            (f"memory/sensor today/shared N={n}", memory[today], memory[shared]),
        ]
    if ratios:
        print("\nratios of medians (today's one-connection-per-sensor path / shared)")
        print_ratios(ratios)
    top = f"shared N={max(sizes)}"
    print(
        f"\ngoals at N={max(sizes)}: connections {med(top, 'connections'):.0f} (<= 6), fired "
        f"{med(top, 'fired') * 100:.0f} % (100 %), p95 {med(top, 'p95'):.2f} s (<= 2 s), lag p99 "
        f"{med(top, 'lag_p99'):.1f} ms (<= 50 ms), {memory[top]:.1f} KB per waiting sensor (<= 100 KB)"
    )


if __name__ == "__main__":
    main()
