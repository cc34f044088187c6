"""Token reuse: identity-provider requests and latency, warm store vs refresh, side by side.

Warm-store calls (a fresh hook instance each, as every task builds one) and forced refreshes
(refresh_token grant) are timed in the same rounds, interleaved in a shuffled order after a
warm-up (bench/common.py); each call's identity-provider requests are read from the sandbox's
counters outside the timed part. Fresh processes are counted, not timed (interpreter start-up
would dominate).

The same is measured for app-only connections with a certificate credential and with a federated
token file (the certificate uploaded to the sandbox app, the token signed by a local OIDC issuer).

Needs a running sandbox: ``python -m airflow_provider_o365mail.testing up --env-file .sandbox.env``
then ``python bench/token_reuse.py --env-file .sandbox.env``. It uses its own AIRFLOW_HOME.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from common import BENCH_CONN_ID, Stats, bench_environment, print_header, print_ratios, run_interleaved

WARM = "warm store, fresh hook instances"
REFRESH = "forced refresh (refresh_token grant)"
CERT_WARM = "certificate: warm store"
CERT_REFRESH = "certificate: forced refresh"
FED_WARM = "federated token: warm store"
FED_REFRESH = "federated token: forced refresh"
SUBJECT = "system:serviceaccount:airflow:bench"


def credential_connections(sbx, admin, stack: ExitStack) -> tuple[str, str]:
    """App-only connections with a certificate and with a federated token file; undone by ``stack``."""
    import os

    from airflow_provider_o365mail.testing.app_credentials import OidcIssuer, make_certificate
    from airflow_provider_o365mail.testing.sandbox import APP_ONLY_SCOPE

    workdir = Path(tempfile.mkdtemp(prefix="o365-bench-cred-"))
    pair = make_certificate("o365mail-bench")
    key_path, cert_path = pair.write(workdir)
    admin.add_certificate(sbx.app_client_id, pair.certificate_pem)
    stack.callback(admin.clear_certificates, sbx.app_client_id)
    config = json.loads((sbx.state_dir / "entra.json").read_text())
    issuer = stack.enter_context(OidcIssuer(config["cert_file"], config["key_file"]))
    admin.add_federated_credential(sbx.app_client_id, issuer=issuer.issuer, subject=SUBJECT)
    stack.callback(admin.clear_federated_credentials, sbx.app_client_id)
    token_file = workdir / "federated-token"
    issuer.write_token_file(token_file, SUBJECT)
    base = sbx.connection_extra(grant_type="client_credentials", scopes=APP_ONLY_SCOPE)
    del base["refresh_token"]
    ids = []
    for extra in (
        {**base, "certificate_path": str(cert_path), "certificate_key_path": str(key_path)},
        {**base, "federated_assertion_file": str(token_file)},
    ):
        conn_id = f"o365mail_bench_{uuid.uuid4().hex[:8]}"
        body = {"conn_type": "o365mail", "login": sbx.app_client_id, "extra": extra}
        os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"] = json.dumps(body)
        ids.append(conn_id)
    return ids[0], ids[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--env-file", default=".sandbox.env")
    parser.add_argument("--repeat", type=int, default=20, help="measured calls per case (after one warm-up)")
    parser.add_argument("--processes", type=int, default=10)
    args = parser.parse_args()
    print_header("Token reuse (bench/token_reuse.py)")

    sbx = bench_environment(args.env_file)
    admin = sbx.admin()

    from airflow_provider_o365mail.hooks.o365mail import O365MailHook

    stack = ExitStack()
    cert_conn, fed_conn = credential_connections(sbx, admin, stack)
    for conn_id in (BENCH_CONN_ID, cert_conn, fed_conn):
        O365MailHook(conn_id).get_access_token()  # seed the store
    refresh_hook = O365MailHook(BENCH_CONN_ID)
    cert_hook, fed_hook = O365MailHook(cert_conn), O365MailHook(fed_conn)
    names = (WARM, REFRESH, CERT_WARM, CERT_REFRESH, FED_WARM, FED_REFRESH)
    requests: dict[str, Counter[str]] = {name: Counter() for name in names}

    def counted(name: str, call: Callable[[], object]) -> Callable[[], float]:
        """Time ``call`` alone; attribute the IdP requests it caused to ``name``."""

        def run() -> float:
            admin.reset_counters()
            started = time.perf_counter()
            call()
            elapsed = time.perf_counter() - started
            requests[name].update(admin.counters())
            return elapsed

        return run

    variants = {
        WARM: counted(WARM, lambda: O365MailHook(BENCH_CONN_ID).get_access_token()),
        REFRESH: counted(REFRESH, lambda: refresh_hook.get_access_token(force_refresh=True)),
        CERT_WARM: counted(CERT_WARM, lambda: O365MailHook(cert_conn).get_access_token()),
        CERT_REFRESH: counted(CERT_REFRESH, lambda: cert_hook.get_access_token(force_refresh=True)),
        FED_WARM: counted(FED_WARM, lambda: O365MailHook(fed_conn).get_access_token()),
        FED_REFRESH: counted(FED_REFRESH, lambda: fed_hook.get_access_token(force_refresh=True)),
    }
    run_interleaved(variants, 0, warmup=1, self_timed=True)  # warm-up: the MSAL app, connections
    for counter in requests.values():
        counter.clear()  # the warm-up round's requests are not part of the result
    samples = run_interleaved(variants, args.repeat, warmup=0, self_timed=True)
    stats = {name: Stats.of(times).scaled(1000) for name, times in samples.items()}

    code = f"from airflow_provider_o365mail.hooks.o365mail import O365MailHook as H; H({BENCH_CONN_ID!r}).get_access_token()"
    admin.reset_counters()
    for _ in range(args.processes):
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    process_requests = sum(admin.counters().values())

    print(f"{'case':<40}{'calls':>7}{'IdP requests':>14}  latency")
    stack.close()
    for name in names:
        print(f"{name:<40}{stats[name].count:>7}{sum(requests[name].values()):>14}  {stats[name].describe('ms', 2)}")
    print(f"{'warm store, fresh processes':<40}{args.processes:>7}{process_requests:>14}  (not timed)")
    print("ratios:")
    print_ratios([("forced refresh / warm store, median latency", stats[REFRESH].median, stats[WARM].median)])
    for name in (WARM, CERT_WARM, FED_WARM):
        print(f"  IdP requests per call, {name}: {sum(requests[name].values()) / stats[name].count:.3f}")
    print(json.dumps({"refresh_counters": dict(requests[REFRESH])}))


if __name__ == "__main__":
    main()
