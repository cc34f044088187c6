"""Deferred sensors waiting over Microsoft Graph beside IMAP: delivery-to-fire latency and requests (#23).

N = 1, 100, 1,000 ``O365ImapTrigger.run()`` coroutines on one event loop (as the triggerer runs
them), all watching one folder of one mailbox, each with its own spec (a different
``max_messages``: no two checks coalesce, the worst case), once with ``transport="graph"`` (the
shared delta-poll loop, :mod:`airflow_provider_o365mail.graph.hub`) and once with ``"imap"`` (the
shared IDLE, as in bench/imap_scale.py). Once every trigger has checked and waits, the run waits
``--wait-seconds`` more (so the Graph loop has backed off to ``poll_interval``: its steady state),
then ONE message matching all of them is APPENDed, and:

- Graph requests, counted at the stand-in (its admin counters): while all N wait (as requests per
  hour), and from the delivery until all fired (the fan-out); the most in flight at once and 429s;
- IMAP connections, counted by a TCP proxy in front of Dovecot: the most at once;
- share of triggers that fired within ``--fire-timeout`` of the delivery;
- delivery-to-fire latency p50 / p95 over the triggers (from just before the APPEND);
- event-loop lag, max, of a 10 ms ticker over the run.

Graph's latency is bounded by the poll interval (the loop polls every ``poll_interval`` when
nothing happened; every few seconds for two minutes after a change): the ``--poll-interval``
(default 60, the sensor's default) is the knob. IMAP's is a push.

Runs are interleaved in shuffled order and repeated (bench/common.py); the table shows medians.

    python -m airflow_provider_o365mail.testing up --env-file .sandbox.env
    python bench/graph_sensors.py --env-file .sandbox.env [--sizes 1,100,1000] [--repeat 2] [--wait-seconds 120]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from common import Stats, bench_environment, print_header, print_ratios, run_interleaved

FOLDER = "GraphBench"
READY_TIMEOUT = 900.0
TICK = 0.01


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class Scenario:
    """One run: N triggers of one transport behind a fresh connection id (fresh pool, budget, hub loop)."""

    counter = 0

    def __init__(self, sbx: Any, n: int, transport: str, args: argparse.Namespace) -> None:
        self.sbx, self.n, self.transport, self.args = sbx, n, transport, args

    def _connection(self, proxy_port: int) -> str:
        Scenario.counter += 1
        conn_id = f"o365mail_gsens_{os.getpid()}_{Scenario.counter}"
        extra: dict[str, Any] = {"imap_port": proxy_port}
        if self.transport == "graph":
            extra.update(transport="graph", graph_url=self.sbx.graph_url)
        os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"] = self.sbx.connection_json(
            refresh_token=self.sbx.new_refresh_token(), **extra
        )
        return conn_id

    def run(self) -> dict[str, float]:
        from airflow_provider_o365mail.testing.fault_proxy import FaultProxy

        with FaultProxy(("127.0.0.1", self.sbx.imap_port)) as proxy:
            conn_id = self._connection(proxy.port)
            metrics = asyncio.run(self._run(conn_id))
            metrics["imap_connections"] = proxy.stats().max_concurrent
        return metrics

    async def _ready(self, conn_id: str) -> None:
        from airflow_provider_o365mail.core.gate import check_gate
        from airflow_provider_o365mail.graph.hub import graph_hub
        from airflow_provider_o365mail.imap.hub import idle_hub

        key = ("graph", "o365mail", conn_id, "") if self.transport == "graph" else ("o365mail", conn_id, "")
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            gate = check_gate(key, 4)
            if self.transport == "graph":
                waiting = [s for s in graph_hub().watched() if s.synced]
            else:
                waiting = [s for s in idle_hub().watched() if s.sessions >= 1]
            if gate.ran >= self.n and gate.running == 0 and not gate._queued and waiting:
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.n} {self.transport} triggers did not all start waiting in {READY_TIMEOUT:.0f} s")

    async def _run(self, conn_id: str) -> dict[str, float]:
        from airflow_provider_o365mail.testing.hostile_mail import deliver, good_message
        from airflow_provider_o365mail.triggers.imap import O365ImapTrigger

        admin = self.sbx.admin()
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

        def graph_requests() -> dict[str, Any]:
            return admin.graph_counters(self.sbx.user)

        tick = asyncio.ensure_future(ticker())
        subject = f"gsens {uuid.uuid4().hex[:10]}"
        specs = [{"folders": [FOLDER], "subject": subject, "max_messages": i + 1} for i in range(self.n)]
        fired: list[float | None] = [None] * self.n
        generators = [
            O365ImapTrigger(
                conn_id=conn_id, spec=spec, transport=self.transport, poll_interval=self.args.poll_interval
            ).run()
            for spec in specs
        ]
        tasks = []
        for i, gen in enumerate(generators):
            task = asyncio.ensure_future(gen.__anext__())
            task.add_done_callback(lambda _t, i=i: fired.__setitem__(i, time.perf_counter()))
            tasks.append(task)
        start = await asyncio.to_thread(graph_requests)
        try:
            await self._ready(conn_id)
            ready = await asyncio.to_thread(graph_requests)
            waited_from = time.perf_counter()
            await asyncio.sleep(self.args.wait_seconds)
            before = await asyncio.to_thread(graph_requests)
            waited = time.perf_counter() - waited_from
            sent = time.perf_counter()
            await asyncio.to_thread(
                deliver, self.sbx, self.sbx.user, good_message(self.sbx.user, subject=subject), FOLDER
            )
            await asyncio.wait(tasks, timeout=self.args.fire_timeout)
            after = await asyncio.to_thread(graph_requests)
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
            "startup_requests": ready["requests"] - start["requests"],
            "requests_per_hour": (before["requests"] - ready["requests"]) * 3600.0 / waited,
            "fanout_requests": after["requests"] - before["requests"],
            "peak_concurrency": after.get("peak_concurrency", 0),
            "throttled": after["throttled"] - start["throttled"],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-file", required=True)
    parser.add_argument("--sizes", default="1,100,1000")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="discarded rounds first")
    parser.add_argument("--wait-seconds", type=float, default=120.0, help="waiting before the delivery")
    parser.add_argument("--poll-interval", type=float, default=60.0, help="the sensors' poll_interval")
    parser.add_argument("--fire-timeout", type=float, default=180.0)
    args = parser.parse_args()
    print_header("Deferred sensors over Graph beside IMAP: latency, requests, connections (#23)", ["aioimaplib"])
    sbx = bench_environment(args.env_file)
    from airflow_provider_o365mail.testing.hostile_mail import deliver, good_message

    deliver(sbx, sbx.user, good_message(sbx.user, subject="graph bench folder"), FOLDER)  # creates the folder
    admin = sbx.admin()
    admin.graph_reset()
    print(f"Graph stand-in limits: {admin.graph_state()['limits']}")
    print(f"IMAP caps: {admin.mail_limits()}; poll_interval {args.poll_interval:.0f} s; wait {args.wait_seconds:.0f} s")
    sizes = [int(s) for s in args.sizes.split(",")]
    variants = {f"{t} N={n}": (n, t) for n in sizes for t in ("graph", "imap")}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}

    def sample(name: str) -> Callable[[], float]:
        def run() -> float:
            n, transport = variants[name]
            admin.graph_reset_counters()
            metrics = Scenario(sbx, n, transport, args).run()
            runs[name].append(metrics)
            return metrics["p95"]

        return run

    print(
        f"timed runs: {args.repeat} per variant after {args.warmup} warm-up(s), interleaved in shuffled order",
        flush=True,
    )
    run_interleaved({name: sample(name) for name in variants}, args.repeat, warmup=args.warmup, self_timed=True)
    for name in variants:
        runs[name] = runs[name][-args.repeat :]

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    width = max(len(name) for name in variants)
    print("\nmedians over the timed runs (Graph requests counted at the stand-in; IMAP connections at a proxy)")
    print(
        f"  {'variant':<{width}} {'fired':>6} {'p50 s':>7} {'p95 s':>7} {'graph req/h waiting':>19} "
        f"{'startup req':>11} {'fan-out req':>11} {'peak':>4} {'429s':>4} {'imap conns':>10} {'lag max ms':>10}"
    )
    for name in variants:
        print(
            f"  {name:<{width}} {med(name, 'fired') * 100:>5.0f}% {med(name, 'p50'):>7.2f} {med(name, 'p95'):>7.2f} "
            f"{med(name, 'requests_per_hour'):>19.0f} {med(name, 'startup_requests'):>11.0f} "
            f"{med(name, 'fanout_requests'):>11.0f} {med(name, 'peak_concurrency'):>4.0f} "
            f"{med(name, 'throttled'):>4.0f} {med(name, 'imap_connections'):>10.0f} {med(name, 'lag_max'):>10.1f}"
        )
    print("\n  spread of p95 (s) over the runs:")
    for name in variants:
        print(f"    {name:<{width}} {Stats.of([r['p95'] for r in runs[name]]).describe('s', 2)}")
    ratios = []
    for n in sizes:
        ratios += [
            (f"p95 latency graph/imap N={n}", med(f"graph N={n}", "p95"), med(f"imap N={n}", "p95")),
            (f"p50 latency graph/imap N={n}", med(f"graph N={n}", "p50"), med(f"imap N={n}", "p50")),
        ]
    top, low = max(sizes), min(sizes)
    ratios.append(
        (
            f"graph req/h waiting N={top} / N={low}",
            med(f"graph N={top}", "requests_per_hour"),
            med(f"graph N={low}", "requests_per_hour"),
        )
    )
    print("\nratios of medians")
    print_ratios(ratios)
    print(
        "\nOutlook's limits per app and mailbox: 4 concurrent, 10,000 requests per 10 minutes (60,000 per hour); "
        f"graph N={top} waiting uses {med(f'graph N={top}', 'requests_per_hour'):.0f} per hour."
    )


if __name__ == "__main__":
    main()
