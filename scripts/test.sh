#!/usr/bin/env bash
# Runs the whole test suite on CPython 3.11 and PyPy 3.9, installing what it needs
# (Debian packages, two virtualenvs) first.  Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"

ensure_debian_packages
ensure_venv cpython "$(cpython)" "[test]"
ensure_venv pypy pypy3 "[test]"

status=0
for name in cpython pypy; do
    echo "==> test suite on $name: $("$ROOT/.venv-$name/bin/python" -c 'import sys; print(sys.version.split()[0], sys.implementation.name)')"
    "$ROOT/.venv-$name/bin/python" -m pytest -p no:cacheprovider -q -rfE "$@" || status=$?
done
exit $status
