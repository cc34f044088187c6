#!/usr/bin/env bash
# The distributed job (issue #24), separate from scripts/test.sh (the main CI job has no time left for
# it): measured on 2 cores with the default 1,000 sensors, about 60 minutes (deployment 2-3 min, refresh
# test 1.5 min, budget test 50 min: each sensor is two Celery tasks, its first poke and execute_complete;
# killed-host test 2.5 min). A CeleryExecutor deployment on this machine, each
# Airflow component a "host" in its own network, mount and UTS namespace (tests/distributed/), with
# PostgreSQL and Redis from Debian's packages, against the local sandbox. Run as root.
#
# Usage: bash scripts/distributed-test.sh [pytest args]      (default: tests/distributed -m distributed)
# Env:   O365MAIL_DIST_VENV     the job's virtualenv (default /tmp/o365mail-dist-venv; scripts/distributed/venv.sh)
#        O365MAIL_DIST_STATE    where the deployment and its sandbox live (default: a new /tmp/o365mail-dist.XXXXXX)
#        O365MAIL_DIST_SENSORS  deferrable sensors in the budget test (default 1000)
#        O365MAIL_DIST_WITHOUT_SHARED_BUDGET=1  shared budgets off, assertions kept (to see the budget test fail)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then echo "distributed-test: run as root (network namespaces, mounts, apt-get)" >&2; exit 1; fi
# PostgreSQL and Redis from Debian's packages, installed without starting the system-wide daemons
# (the deployment runs its own instances; the lab notes' policy-rc.d trick).
need=()
[ -x /usr/lib/postgresql/15/bin/postgres ] || ls /usr/lib/postgresql/*/bin/postgres > /dev/null 2>&1 || need+=(postgresql)
command -v redis-server > /dev/null || need+=(redis-server)
command -v ip > /dev/null || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; own_policy=1; fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" > /dev/null
  [ "$own_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi
VENV=${O365MAIL_DIST_VENV:-/tmp/o365mail-dist-venv}
bash scripts/distributed/venv.sh "$VENV"
if [ -z "${O365MAIL_DIST_STATE:-}" ]; then
  O365MAIL_DIST_STATE=$(mktemp -d /tmp/o365mail-dist.XXXXXX)
fi
chmod 755 "$O365MAIL_DIST_STATE"  # the sandbox's mail daemons (other users) read below it
export O365MAIL_DIST_STATE
export O365_SANDBOX_STATE_DIR=$O365MAIL_DIST_STATE/sandbox
trap '"$VENV/bin/python" -m airflow_provider_o365mail.testing down --state-dir "$O365_SANDBOX_STATE_DIR" --purge > /dev/null 2>&1 || true' EXIT
# This process reads the metadata DB and the Variables as every host does: the same settings.
export AIRFLOW_HOME=$O365MAIL_DIST_STATE/test-home
mkdir -p "$AIRFLOW_HOME"
eval "$("$VENV/bin/python" - <<'PY'
import shlex, sys
from pathlib import Path
sys.path.insert(0, "tests/distributed")
from deployment import Deployment
for key, value in Deployment(Path("/tmp")).env().items():
    if key.startswith("AIRFLOW__"):
        print(f"export {key}={shlex.quote(value)}")
PY
)"
if [ $# -eq 0 ]; then set -- tests/distributed -m distributed; fi
"$VENV/bin/python" -m pytest -p no:randomly "$@"
