# Sourced by package-check.sh and compat-test.sh (run from the repository root): timing, and building
# the distributions from a copy of the checkout.
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }

# copy_checkout DEST: the checkout without .venv, .git, egg-info, caches and build output. Builds run
# on such a copy: setuptools writes *.egg-info into the tree it builds, and an egg-info in the
# checkout makes Airflow processes started there see the provider twice.
copy_checkout() {
  mkdir "$1"
  tar -c --exclude=./.venv --exclude=./.git --exclude='*.egg-info' --exclude=__pycache__ \
    --exclude=./build --exclude=./dist . | tar -x -C "$1"
}

# build_dist PYTHON SRC OUTDIR [BUILD-ARGS...]: python -m build; its log is shown only on failure.
build_dist() {
  local py=$1 src=$2 out=$3
  shift 3
  "$py" -m build "$@" --outdir "$out" "$src" > "$out.build.log" 2>&1 || { cat "$out.build.log"; return 1; }
}
