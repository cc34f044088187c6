#!/usr/bin/env bash
# Create .venv with the provider and its test tools, every distribution pinned by
# constraints/airflow-3.3.txt (the newest supported Airflow), and install the sandbox's Debian packages.
# Safe to re-run. Run as root on a fresh Debian/Ubuntu machine (apt-get is used when needed).
set -euo pipefail
cd "$(dirname "$0")/.."

# Every distribution at the version in the newest Airflow's constraints file (scripts/update-constraints.sh
# makes it): a fresh clone installs what was tested, not what is newest on the index that day.
CONSTRAINTS=constraints/airflow-3.3.txt
if [ ! -f "$CONSTRAINTS" ]; then
  echo "bootstrap: $PWD/$CONSTRAINTS is missing: restore it (git checkout -- $CONSTRAINTS) or make it with: bash scripts/update-constraints.sh 3.3" >&2
  exit 1
fi

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "Python >= 3.11 is required (found $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  if ! "$PYTHON" -m venv .venv 2>/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
    rm -rf .venv && "$PYTHON" -m venv .venv
  fi
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]" -c "$CONSTRAINTS"
# Dovecot and Postfix: installed without starting the system-wide daemons.
.venv/bin/python -c 'from airflow_provider_o365mail.testing import mailservers as m; missing = m.missing_packages(); missing and m.install_packages(missing)'
# A browser for the consent UI test: Debian's Chromium (Playwright drives it); where apt has none
# (Ubuntu ships it as a snap), Playwright's own build.
if [ ! -x /usr/bin/chromium ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium > /dev/null 2>&1 || true
fi
if [ ! -x /usr/bin/chromium ]; then
  .venv/bin/python -m playwright install --with-deps chromium
fi
