#!/usr/bin/env bash
# Compatibility job (run by scripts/test.sh after the main pytest run; O365MAIL_SKIP_COMPAT=1 skips it):
# the OLDEST supported Airflow in a second virtualenv, with the provider installed from its built
# wheel (not the editable checkout), then a subset of the suite from outside the repository:
# the unit tests, the hook against the sandbox (SMTP sending, the IMAP sensor, the CLI) and one
# example DAG run end to end with `airflow dags test`. Tests that need a newer Airflow skip with
# their reason. Target: about 6 minutes on 2 otherwise idle cores; measured figures in docs/compatibility.md.
#
# Usage: bash scripts/compat-test.sh [PYTHON]   (default .venv/bin/python: builds the wheel)
# Env:   O365MAIL_COMPAT_AIRFLOW  Airflow version (default: the one constraints/airflow-3.1.txt pins, the
#                                 oldest supported minor's latest patch); every distribution is installed at
#                                 the version of constraints/airflow-<its minor>.txt, which must pin it
#        O365MAIL_COMPAT_VENV     where the virtualenv lives (default /tmp/o365mail-compat-venv-<version>);
#                                 reused when it has that Airflow and was made from the same constraints
#                                 file, the wheel is always reinstalled
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${1:-$REPO/.venv/bin/python}
# The constraints file of the Airflow minor under test; it pins that Airflow's patch release.
if [ -n "${O365MAIL_COMPAT_AIRFLOW:-}" ]; then minor=${O365MAIL_COMPAT_AIRFLOW%.*}; else minor=3.1; fi
CONSTRAINTS=$REPO/constraints/airflow-$minor.txt
if [ ! -f "$CONSTRAINTS" ]; then
  echo "compat: $CONSTRAINTS is missing: restore it from git or make it with: bash scripts/update-constraints.sh ${O365MAIL_COMPAT_AIRFLOW:-$minor}" >&2
  exit 1
fi
pinned=$(sed -n 's/^apache-airflow==//p' "$CONSTRAINTS")
AIRFLOW_VERSION=${O365MAIL_COMPAT_AIRFLOW:-$pinned}
if [ -z "$pinned" ] || [ "$pinned" != "$AIRFLOW_VERSION" ]; then
  echo "compat: $CONSTRAINTS pins apache-airflow==${pinned:-(nothing)}, not $AIRFLOW_VERSION: run with" \
    "O365MAIL_COMPAT_AIRFLOW=$pinned, or remake the file with: bash scripts/update-constraints.sh $AIRFLOW_VERSION" >&2
  exit 1
fi
VENV=${O365MAIL_COMPAT_VENV:-/tmp/o365mail-compat-venv-$AIRFLOW_VERSION}
WORK=$(mktemp -d /tmp/o365mail-compat.XXXXXX)
chmod 755 "$WORK"  # the sandbox's mail daemons (other users) reach its state directory below
trap 'rm -rf "$WORK"' EXIT
. scripts/build-lib.sh
t_all=$(now)

copy_checkout "$WORK/src"
t=$(now)
build_dist "$PY" "$WORK/src" "$WORK/dist" --wheel
wheel=$(ls "$WORK"/dist/*.whl)
echo "compat: wheel built: $(elapsed "$t")"

# The second virtualenv: Airflow $AIRFLOW_VERSION, the test tools and the wheel with its dependencies,
# resolved together under the constraints file (Airflow pinned: a wheel whose requirements exclude it
# fails here instead of upgrading Airflow). --no-compile: byte-compiling ~150 distributions is most of
# a fresh install's CPU. The venv records the constraints file's digest; another digest makes a new venv.
t=$(now)
pins=("apache-airflow==$AIRFLOW_VERSION" "pytest>=8" "pytest-timeout>=2.3" "hypothesis>=6.100" -c "$CONSTRAINTS")
stamp=$(sha256sum "$CONSTRAINTS" | cut -d' ' -f1)
if [ ! -x "$VENV/bin/python" ] || [ "$("$VENV/bin/python" -c 'import airflow; print(airflow.__version__)' 2>/dev/null)" != "$AIRFLOW_VERSION" ] \
  || [ "$(cat "$VENV/o365mail-constraints.sha256" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "$VENV"
  "$("$PY" -c 'import sys; print(sys._base_executable)')" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --no-compile "$wheel" "${pins[@]}" > "$WORK/pip.log" 2>&1 \
    || { cat "$WORK/pip.log"; exit 1; }
  echo "$stamp" > "$VENV/o365mail-constraints.sha256"
  echo "compat: fresh venv with apache-airflow==$AIRFLOW_VERSION and the wheel, constraints ${CONSTRAINTS#"$REPO"/}: $(elapsed "$t") ($(du -sm "$VENV" | cut -f1) MB)"
else
  # Reused: this build of the wheel replaces the last one; its dependencies only when pip check misses one.
  "$VENV/bin/python" -m pip install -q --no-compile --force-reinstall --no-deps "$wheel" > "$WORK/pip.log" 2>&1 \
    || { cat "$WORK/pip.log"; exit 1; }
  if ! "$VENV/bin/python" -m pip check > "$WORK/pip-check.log" 2>&1; then
    "$VENV/bin/python" -m pip install -q --no-compile "$wheel" "${pins[@]}" >> "$WORK/pip.log" 2>&1 \
      || { cat "$WORK/pip-check.log" "$WORK/pip.log"; exit 1; }
  fi
  echo "compat: reused $VENV (apache-airflow==$AIRFLOW_VERSION, constraints ${CONSTRAINTS#"$REPO"/}), wheel reinstalled: $(elapsed "$t")"
fi
"$VENV/bin/python" -m pip check > "$WORK/pip-check.log" 2>&1 || { cat "$WORK/pip-check.log"; exit 1; }

# Outside the repository: tests, example DAGs and the pytest settings copied, the package only from the wheel.
mkdir "$WORK/run"
cp -r tests example_dags pyproject.toml "$WORK/run/"
cd "$WORK/run"
installed=$("$VENV/bin/python" -c 'import airflow, airflow_provider_o365mail as p; print(airflow.__version__, p.__file__)')
case "$installed" in
  "$AIRFLOW_VERSION $VENV/"*) echo "compat: Airflow and provider: $installed" ;;
  *) echo "compat: wrong Airflow or provider not from the wheel: $installed"; exit 1 ;;
esac

# The subset: what touches Airflow's APIs. Left out, being independent of Airflow's version:
# test_architecture (import contracts of the source tree, checked by lint-imports), test_packaging
# (the build, checked by package-check.sh), and the sensor's and the CLI's tests of our own IMAP
# SEARCH compilation, UID bookkeeping and consent flow (the full suite runs them on the newest Airflow).
t=$(now)
"$VENV/bin/python" -m pytest -p no:cacheprovider -q --durations=10 \
  --o365-sandbox-state-dir "${O365_SANDBOX_STATE_DIR:-$WORK/sandbox}" \
  --ignore=tests/unit/test_architecture.py --ignore=tests/unit/test_packaging.py \
  tests/unit \
  tests/integration/test_smtp_sending.py \
  tests/integration/test_imap_sensor.py::test_sent_mail_with_attachment_is_detected_with_a_full_summary \
  tests/integration/test_imap_sensor.py::test_new_only_watermark_survives_restarts \
  tests/integration/test_imap_sensor.py::test_post_actions_seen_flag_and_move \
  tests/integration/test_imap_sensor.py::test_revoked_consent_fails_the_sensor_instead_of_poking_forever \
  tests/integration/test_cli.py::test_doctor_healthy_and_token_status_and_forget \
  tests/integration/test_example_dag_dags_test.py
echo "compat: pytest on Airflow $AIRFLOW_VERSION: $(elapsed "$t")"
echo "compat: OK in $(elapsed "$t_all")"
