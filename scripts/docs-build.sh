#!/usr/bin/env bash
# Build the documentation site (MkDocs, strict: a broken link, a page missing from the nav or an
# API reference that does not resolve fails the build). Output in site/ (not committed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
"$PY" -m mkdocs build --strict --clean --site-dir site "${@:2}"
