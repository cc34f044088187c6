"""Shared parts of the benchmarks: set-up on the sandbox, the run header, interleaved timing, reports.

Every benchmark prints :func:`print_header` first (exact command, date, machine) and times its
variants with :func:`run_interleaved`: a warm-up of each variant, then ``repeat`` rounds that run
every variant once in a freshly shuffled order, so that drift on a shared machine (other jobs,
caches, the sandbox's own state) spreads over all variants instead of favouring whichever runs
first. Reports give the median with min and max, and ratios of medians side by side.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from airflow_provider_o365mail.testing.sandbox import SandboxInfo, read_env_file

BENCH_CONN_ID = "o365mail_bench"


def bench_environment(env_file: str) -> SandboxInfo:
    """Point Airflow at a throw-away home and export ``o365mail_bench`` backed by a fresh grant."""
    sbx = SandboxInfo.from_env(read_env_file(env_file))
    home = tempfile.mkdtemp(prefix="o365-bench-")
    os.environ.update(
        AIRFLOW_HOME=home,
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        O365MAIL_LOCK_DIR=home,
        AIRFLOW__CORE__FERNET_KEY="sxgU9Vw5J1kPp0mUwNDg2B0xlJ0m4zM2f9YQ6u3qk1Q=",
    )
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)
    os.environ[f"AIRFLOW_CONN_{BENCH_CONN_ID.upper()}"] = sbx.connection_json(refresh_token=sbx.new_refresh_token())
    return sbx


# ---------------------------------------------------------------------- header
def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def print_header(title: str, extra_packages: Iterable[str] = ()) -> None:
    """The run's provenance: exact command line, date/time, machine and versions."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    packages = ", ".join(f"{name} {_version(name)}" for name in ("apache-airflow", *extra_packages))
    print(f"== {title}")
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(f"cwd:     {os.getcwd()}")
    print(f"date:    {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}")
    print(f"machine: {platform.node()}, nproc {cpus}, load average {load} (1/5/15 min), {platform.platform()}")
    print(f"python:  {platform.python_version()} ({sys.executable}); {packages}")
    print(flush=True)


# ---------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Stats:
    """Median, min and max of repeated samples (seconds unless said otherwise)."""

    median: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, samples: list[float]) -> Stats:
        if not samples:
            raise ValueError("no samples")
        return cls(statistics.median(samples), min(samples), max(samples), len(samples))

    def scaled(self, factor: float) -> Stats:
        """The same statistics in another unit (e.g. x1000 for ms)."""
        return Stats(self.median * factor, self.low * factor, self.high * factor, self.count)

    def describe(self, unit: str, digits: int = 1) -> str:
        return (
            f"median {self.median:,.{digits}f} {unit} "
            f"(min {self.low:,.{digits}f}, max {self.high:,.{digits}f}, n={self.count})"
        )


def run_interleaved(
    variants: Mapping[str, Callable[[], Any]],
    repeat: int,
    *,
    warmup: int = 1,
    self_timed: bool = False,
    rng: random.Random | None = None,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Samples per variant: ``warmup`` discarded rounds, then ``repeat`` rounds in shuffled order.

    Each call is timed as a whole, or with ``self_timed`` the variants return their own sample in
    seconds (e.g. a delivery latency measured from the send).
    """
    rng = rng or random.Random()  # ordering only, not security
    names = list(variants)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeat):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            started = time.perf_counter()
            measured = variants[name]()
            elapsed = float(measured) if self_timed else time.perf_counter() - started
            if round_index >= warmup:
                samples[name].append(elapsed)
        if progress:
            kind = "warm-up" if round_index < warmup else f"round {round_index - warmup + 1}/{repeat}"
            print(f"    {kind}: {' -> '.join(order)}", file=sys.stderr, flush=True)
    return samples


# ---------------------------------------------------------------------- reports
def print_stats_table(rows: Mapping[str, Stats], unit: str, digits: int = 1, indent: str = "  ") -> None:
    width = max(len(name) for name in rows)
    for name, stats in rows.items():
        print(f"{indent}{name:<{width}}  {stats.describe(unit, digits)}")


def print_ratios(rows: Iterable[tuple[str, float, float]], indent: str = "  ") -> None:
    """``(label, numerator median, denominator median)`` rows, printed as aligned ratios."""
    rows = list(rows)
    width = max(len(label) for label, _, _ in rows)
    for label, numerator, denominator in rows:
        ratio = numerator / denominator if denominator else float("inf")
        print(f"{indent}{label:<{width}}  {ratio:8.2f}x")
