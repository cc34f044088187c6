"""Token reuse: identity-provider requests and latency, warm store vs refresh, side by side.

Needs a running sandbox: ``python -m airflow_provider_o365mail.testing up --env-file .sandbox.env``
then ``python bench/token_reuse.py --env-file .sandbox.env``. It uses its own AIRFLOW_HOME.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from common import bench_environment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--env-file", default=".sandbox.env")
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--processes", type=int, default=10)
    parser.add_argument("--refreshes", type=int, default=20)
    args = parser.parse_args()

    sbx = bench_environment(args.env_file)
    admin = sbx.admin()

    from airflow_provider_o365mail.hooks.o365mail import O365MailHook

    O365MailHook("o365mail_bench").get_access_token()  # seed the store
    admin.reset_counters()
    warm = []
    for _ in range(args.calls):
        started = time.perf_counter()
        O365MailHook("o365mail_bench").get_access_token()
        warm.append(time.perf_counter() - started)
    warm_requests = sum(admin.counters().values())

    code = (
        "from airflow_provider_o365mail.hooks.o365mail import O365MailHook as H; H('o365mail_bench').get_access_token()"
    )
    admin.reset_counters()
    for _ in range(args.processes):
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    process_requests = sum(admin.counters().values())

    admin.reset_counters()
    refresh = []
    hook = O365MailHook("o365mail_bench")
    for _ in range(args.refreshes):
        started = time.perf_counter()
        hook.get_access_token(force_refresh=True)
        refresh.append(time.perf_counter() - started)
    refresh_counters = admin.counters()

    warm_ms, refresh_ms = statistics.median(warm) * 1000, statistics.median(refresh) * 1000
    print(f"{'case':<44}{'calls':>7}{'IdP requests':>14}{'median ms':>11}")
    print(f"{'warm store, fresh hook instances':<44}{args.calls:>7}{warm_requests:>14}{warm_ms:>11.2f}")
    print(f"{'warm store, fresh processes':<44}{args.processes:>7}{process_requests:>14}{'-':>11}")
    print(
        f"{'forced refresh (refresh_token grant)':<44}{args.refreshes:>7}"
        f"{sum(refresh_counters.values()):>14}{refresh_ms:>11.2f}"
    )
    print(
        f"refresh / warm median latency: {refresh_ms / warm_ms:.1f}x; "
        f"IdP requests per warm call: {warm_requests / args.calls:.3f}"
    )
    print(json.dumps({"refresh_counters": refresh_counters}))


if __name__ == "__main__":
    main()
