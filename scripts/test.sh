#!/usr/bin/env bash
# Runs the whole test suite on CPython 3.11 and PyPy 3.9, installing what it needs
# (Debian packages, two virtualenvs) first.  Extra arguments go to pytest.
#
# The two interpreters' runs go side by side, each split over TEST_WORKERS
# pytest-xdist workers (2 unless set; 0 runs it in one process), a test file to
# a worker: most of a run is waiting on the real backends and proxies it starts,
# so four fit on two cores.  Each run's output is kept and printed whole once
# both are done.  TEST_SERIAL=1 runs them one after the other, printing as they go.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"

ensure_debian_packages
ensure_venv cpython "$(cpython)" "[test]"
ensure_venv pypy pypy3 "[test]"

run_suite() {
    local name=$1
    shift
    echo "==> test suite on $name: $("$ROOT/.venv-$name/bin/python" -c 'import sys; print(sys.version.split()[0], sys.implementation.name)')"
    local workers=()
    if [ "${TEST_WORKERS:-2}" != 0 ]; then
        workers=(-n "${TEST_WORKERS:-2}" --dist loadfile)
    fi
    "$ROOT/.venv-$name/bin/python" -m pytest -p no:cacheprovider -q -rfE "${workers[@]}" "$@"
}

status=0
if [ "${TEST_SERIAL:-0}" = 1 ]; then
    for name in cpython pypy; do
        run_suite "$name" "$@" || status=$?
    done
    exit $status
fi

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
declare -A pids
for name in cpython pypy; do
    run_suite "$name" "$@" >"$logs/$name.log" 2>&1 &
    pids[$name]=$!
done
for name in cpython pypy; do
    code=0
    wait "${pids[$name]}" || code=$?
    cat "$logs/$name.log"
    if [ "$code" != 0 ]; then
        echo "==> test suite on $name failed (exit $code)"
        status=$code
    fi
done
exit $status
