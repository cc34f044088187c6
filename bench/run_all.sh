#!/usr/bin/env bash
# One documented run of every benchmark, in sequence, against one running sandbox.
#
# The sizes are chosen to fit about 30 minutes on a 2-core machine (the defaults of
# bench/smtp_batch.py would take far longer there: one task per message costs about a second).
# The full output (the run's provenance first, then each benchmark's own header and report) goes
# to the terminal and to the log file.
#
#   python -m airflow_provider_o365mail.testing up --env-file .sandbox.env
#   bash bench/run_all.sh [--env-file .sandbox.env] [--log bench-run.log]
#
# PYTHON selects the interpreter (default: python on PATH); it must have the provider,
# apache-airflow-providers-smtp and apache-airflow-providers-imap installed. bench/graph_send.py runs
# its anchor (apache-airflow-providers-microsoft-azure) from a venv of its own: ANCHOR_VENV (default
# $TMPDIR/o365mail-bench-anchor-venv), created with pip on first use (a few minutes, needs the index).
set -uo pipefail

env_file=.sandbox.env
log="bench-run-$(date -u +%Y%m%dT%H%M%SZ).log"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --env-file) env_file="$2"; shift 2 ;;
        --log) log="$2"; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
python="${PYTHON:-python}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
env_file="$(realpath "$env_file")"
[[ -f "$env_file" ]] || { echo "no sandbox env file at $env_file: start the sandbox first" >&2; exit 2; }
log="$(realpath "$log")"
cd "$root"
export PYTHONUNBUFFERED=1  # stdout and stderr reach the log in the order they were written

exec > >(tee "$log") 2>&1

started=$(date +%s)
echo "== bench/run_all.sh"
echo "command: bash bench/run_all.sh --env-file $env_file --log $log"
echo "commit:  $(git rev-parse HEAD) ($(git status --porcelain --untracked-files=no | wc -l) modified tracked files)"
echo "date:    $(date -u)"
echo "nproc:   $(nproc)"
echo "uptime: $(uptime)"
echo "python:  $("$python" -c 'import platform, sys; print(platform.python_version(), sys.executable)')"
echo "airflow: $("$python" -c 'from importlib.metadata import version as v; print(v("apache-airflow"))')"
echo "provider source: $("$python" -c 'import airflow_provider_o365mail as p; print(p.__path__[0])')"
echo

failed=()
run() {
    local script="$1"; shift
    local t0=$(date +%s)
    echo "---- $script $* (start $(date -u +%H:%M:%S) UTC; uptime: $(uptime))"
    "$python" "bench/$script" --env-file "$env_file" "$@" || failed+=("$script")
    echo "---- $script: $(( $(date +%s) - t0 )) s (uptime: $(uptime))"
    echo
}

run token_reuse.py --repeat 20 --processes 10
run smtp_batch.py --messages 40 --repeat 5 --warmup-messages 10 --kill-messages 100 --attachment-mb 50
run imap_poke.py --sizes 1000,10000,100000 --official-max 10000 --repeat 15 --latency-samples 5 --attachment-mb 50
run imap_events.py --samples 15 --burst 1000 --watchers 1,10,100
run imap_scale.py --sizes 1,10,100,1000 --repeat 3 --same-spec-size 1000
run graph_sensors.py --sizes 1,100,1000 --repeat 2 --wait-seconds 120
run graph_send.py --messages 40 --repeat 5 --warmup-messages 5 --attachment-mb 50,100 \
    --anchor-venv "${ANCHOR_VENV:-${TMPDIR:-/tmp}/o365mail-bench-anchor-venv}"

echo "== total: $(( $(date +%s) - started )) s; finished $(date -u); uptime: $(uptime)"
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
