# Shared by scripts/test.sh, scripts/demo.sh and bench/: installs the Debian
# packages and the two virtualenvs (CPython and PyPy) the project runs on.
# Source it; it defines ensure_debian_packages and ensure_venv.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Debian packages: backends and peers the tests and the demo run for real
# (chromium renders the status page headless, as a person's browser would).
DEBIAN_PACKAGES="redis-server redis-tools memcached nutcracker libmemcached-tools libmemcached-dev
  pypy3 pypy3-venv python3-venv python3-dev zlib1g-dev gcc chromium"

ensure_debian_packages() {
    local missing=""
    for pkg in $DEBIAN_PACKAGES "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
    done
    [ -z "$missing" ] && return 0
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    echo "==> installing Debian packages:$missing"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $missing >/dev/null
}

# The CPython to use: python3.11 if present, else python3.
cpython() {
    command -v python3.11 || command -v python3
}

# ensure_venv NAME INTERPRETER EXTRAS: a virtualenv at $ROOT/.venv-NAME with the
# project installed the way users install it (a regular, non-editable pip install).
ensure_venv() {
    local name=$1 interp=$2 extras=$3
    local venv="$ROOT/.venv-$name"
    if [ ! -x "$venv/bin/python" ]; then
        echo "==> creating $venv ($interp)"
        "$interp" -m venv "$venv"
        "$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel
    fi
    echo "==> installing twistedproxy$extras into $venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "$ROOT$extras" 2>&1 | grep -v "^WARNING: Location" || true
    # pip writes a build/ folder next to setup.cfg; keep the checkout clean.
    rm -rf "$ROOT/build"
}
