#!/usr/bin/env bash
# Regenerate the constraints files constraints/airflow-<minor>.txt (pip -c): for each supported Airflow
# minor, a fresh virtualenv with the newest patch release of that minor and the provider (editable,
# with the extras below), then `pip freeze --exclude-editable` (everything pip installed, the provider
# itself left out) under a header that says how the file was made.
#
# Usage: bash scripts/update-constraints.sh [MINOR|VERSION ...]   (default: 3.1 3.2 3.3)
#          3.3    the newest 3.3.x on the package index (pip index versions apache-airflow)
#          3.3.2  that release
# Env:   PYTHON                    the interpreter (default python3); the files are for its minor version
#        O365MAIL_CONSTRAINTS_DIR  where the files are written (default constraints/ of this checkout)
#
# Extras: the dev venv's minor (DEV_MINOR, the file scripts/bootstrap.sh installs) gets [dev] (tests,
# benchmarks, docs, lint, build); the older minors [test], what scripts/compat-test.sh installs there.
# Takes a few minutes per minor (pip's cache helps). Review the diff before committing: every pin moves.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DEV_MINOR=3.3
PYTHON=${PYTHON:-python3}
OUT=${O365MAIL_CONSTRAINTS_DIR:-$REPO/constraints}
if [ $# -eq 0 ]; then set -- 3.1 3.2 3.3; fi

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "update-constraints: Python >= 3.11 is required (found $("$PYTHON" --version 2>&1)); set PYTHON" >&2
  exit 1
fi
py_version=$("$PYTHON" -c 'import platform; print(platform.python_version())')
py_minor=${py_version%.*}
platform=$("$PYTHON" -c 'import platform; print(platform.system(), platform.machine())')
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/o365mail-constraints.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# newest_patch MINOR: the newest final release X.Y.Z of apache-airflow X.Y on the package index.
newest_patch() {
  "$PYTHON" -m pip index versions apache-airflow 2> /dev/null \
    | sed -n 's/^Available versions: //p' | tr ',' '\n' | tr -d ' ' \
    | grep -E "^${1//./\\.}\.[0-9]+$" | sort -V | tail -n 1
}

for spec in "$@"; do
  case "$spec" in
    3.[0-9]|3.[0-9][0-9]) minor=$spec; version=$(newest_patch "$minor") ;;
    3.[0-9]*.[0-9]*) version=$spec; minor=${spec%.*} ;;
    *) echo "update-constraints: $spec is not an Airflow minor (3.3) or release (3.3.2)" >&2; exit 1 ;;
  esac
  if [ -z "$version" ]; then
    echo "update-constraints: no apache-airflow $minor.x release found (pip index versions apache-airflow)" >&2
    exit 1
  fi
  if [ "$minor" = "$DEV_MINOR" ]; then extras=dev; else extras=test; fi
  venv=$WORK/venv-$minor
  echo "update-constraints: apache-airflow==$version with .[$extras] on Python $py_version ..."
  "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip > "$WORK/pip-$minor.log" 2>&1 \
    || { cat "$WORK/pip-$minor.log"; exit 1; }
  "$venv/bin/python" -m pip install -q --no-compile "apache-airflow==$version" -e "$REPO[$extras]" \
    >> "$WORK/pip-$minor.log" 2>&1 || { cat "$WORK/pip-$minor.log"; exit 1; }
  "$venv/bin/python" -m pip check
  "$venv/bin/python" -m pip freeze --exclude-editable > "$WORK/freeze-$minor.txt"
  # Only name==version lines: a direct reference (a local wheel, a URL) would not install elsewhere.
  if grep -vE '^[A-Za-z0-9._-]+==[^ ]+$' "$WORK/freeze-$minor.txt"; then
    echo "update-constraints: the lines above are not name==version pins; install those from the index" >&2
    exit 1
  fi
  grep -qx "apache-airflow==$version" "$WORK/freeze-$minor.txt" \
    || { echo "update-constraints: apache-airflow==$version is not in the freeze" >&2; exit 1; }
  if grep -qi '^airflow[-_.]provider[-_.]o365mail==' "$WORK/freeze-$minor.txt"; then
    echo "update-constraints: the provider itself is in the freeze" >&2
    exit 1
  fi
  pip_version=$("$venv/bin/python" -m pip --version | cut -d' ' -f2)
  file=$OUT/airflow-$minor.txt
  {
    echo "# Constraints for airflow-provider-o365mail on Apache Airflow $minor (apache-airflow==$version), Python $py_minor."
    echo "# Use: pip install airflow-provider-o365mail -c airflow-$minor.txt (docs/compatibility.md says which"
    echo "# file for which Airflow, and what to do on another Python version)."
    echo "# Made on $(date -I) by scripts/update-constraints.sh with Python $py_version ($platform), pip $pip_version:"
    echo "#   python -m venv VENV"
    echo "#   VENV/bin/pip install \"apache-airflow==$version\" -e \".[$extras]\""
    echo "#   VENV/bin/pip freeze --exclude-editable   (every installed distribution but the provider itself)"
    echo "# Regenerate: bash scripts/update-constraints.sh $minor   (all files: bash scripts/update-constraints.sh)"
    cat "$WORK/freeze-$minor.txt"
  } > "$file.tmp"
  mv "$file.tmp" "$file"
  echo "update-constraints: wrote $file ($(wc -l < "$WORK/freeze-$minor.txt") pins)"
  rm -rf "$venv"
done
