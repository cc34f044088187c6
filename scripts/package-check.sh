#!/usr/bin/env bash
# Packaging checks (run by scripts/test.sh): build the sdist and the wheel (from the sdist, so a
# file missing from the sdist breaks the wheel), twine check --strict, the file lists, then a smoke
# test of the installed wheel in a fresh virtualenv from outside the repository.
# Usage: bash scripts/package-check.sh [PYTHON]   (default: .venv/bin/python, which has build and twine)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${1:-$REPO/.venv/bin/python}
# The smoke test installs the wheel as the docs tell users to: with the newest Airflow's constraints file.
CONSTRAINTS=$REPO/constraints/airflow-3.3.txt
[ -f "$CONSTRAINTS" ] || { echo "package: $CONSTRAINTS is missing (bash scripts/update-constraints.sh 3.3 makes it)" >&2; exit 1; }
WORK=$(mktemp -d /tmp/o365mail-package-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
. scripts/build-lib.sh
t_all=$(now)

copy_checkout "$WORK/src"
t=$(now)
build_dist "$PY" "$WORK/src" "$WORK/dist"  # the sdist, then the wheel from the sdist
echo "package: build (sdist, then wheel from the sdist): $(elapsed "$t")"
"$PY" -m twine check --strict "$WORK"/dist/*
"$PY" scripts/check_dist.py "$WORK/dist" "$WORK/src"

# Fresh virtualenv with the wheel and its dependencies, under $CONSTRAINTS (pip's cache makes this fast
# after the first run).
t=$(now)
"$("$PY" -c 'import sys; print(sys._base_executable)')" -m venv "$WORK/venv"
# pytest too: the smoke test loads the pytest11 plugin through its entry point. --no-compile: the
# smoke test imports a fraction of the ~130 distributions; byte-compiling all of them is most of the CPU.
"$WORK/venv/bin/python" -m pip install -q --no-compile "$WORK"/dist/*.whl pytest -c "$CONSTRAINTS" > "$WORK/pip.log" 2>&1 \
  || { cat "$WORK/pip.log"; exit 1; }
echo "package: fresh venv + wheel install with dependencies: $(elapsed "$t") ($(du -sm "$WORK/venv" | cut -f1) MB)"

# Outside the repository, with a clean environment: imports can only come from the installed wheel.
mkdir "$WORK/home" "$WORK/run"
clean_env=(env -i PATH="$WORK/venv/bin:/usr/bin:/bin" HOME="$WORK/home" AIRFLOW_HOME="$WORK/home/airflow"
  AIRFLOW__CORE__LOAD_EXAMPLES=False LANG=C.UTF-8)
t=$(now)
(cd "$WORK/run" && "${clean_env[@]}" airflow providers list -o plain > "$WORK/providers.txt")
version=$("$PY" -c 'import re, sys; print(re.search(r"__version__ = \"(.+)\"", open(sys.argv[1]).read())[1])' \
  airflow_provider_o365mail/__init__.py)
grep -E "^airflow-provider-o365mail[[:space:]].*[[:space:]]${version//./\\.}\$" "$WORK/providers.txt" \
  || { echo "the provider $version is not listed:"; cat "$WORK/providers.txt"; exit 1; }
(cd "$WORK/run" && "${clean_env[@]}" airflow providers get airflow-provider-o365mail -o plain)
echo "package: airflow providers list/get: $(elapsed "$t")"
t=$(now)
(cd "$WORK/run" && "${clean_env[@]}" python "$REPO/scripts/smoke_installed.py")
echo "package: installed-wheel smoke test: $(elapsed "$t")"
echo "package checks OK in $(elapsed "$t_all")"
