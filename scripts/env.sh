# Shared by scripts/test.sh, scripts/demo.sh and bench/: installs the Debian
# packages and the two virtualenvs (CPython and PyPy) the project runs on.
# Source it; it defines ensure_debian_packages and ensure_venv.  Every install
# step that fails stops the calling script with the installer's own error.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Debian packages: backends and peers the tests and the demo run for real (sasl2-bin:
# saslpasswd2, for a memcached -S backend)
# (chromium renders the status page headless, as a person's browser would;
# pypy3-dev carries the headers pylibmc's C extension builds against on PyPy).
DEBIAN_PACKAGES="redis-server redis-tools memcached sasl2-bin nutcracker libmemcached-tools libmemcached-dev
  pypy3 pypy3-dev pypy3-venv python3-venv python3-dev zlib1g-dev gcc chromium"

die() {
    echo "==> FAILED: $*" >&2
    exit 1
}

ensure_debian_packages() {
    local missing=""
    for pkg in $DEBIAN_PACKAGES "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
    done
    [ -z "$missing" ] && return 0
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    echo "==> installing Debian packages:$missing"
    $sudo apt-get update -qq || die "apt-get update"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $missing >/dev/null \
        || die "apt-get install$missing"
}

# The CPython to use: python3.11 if present, else python3.
cpython() {
    command -v python3.11 || command -v python3
}

# run_logged WHAT CMD...: runs CMD quietly; on failure prints its whole output and stops.
run_logged() {
    local what=$1
    shift
    local log
    log=$(mktemp)
    if ! "$@" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        die "$what"
    fi
    rm -f "$log"
}

# What an installed copy of the project was built from: a digest of the files
# pip packs, so an unchanged checkout is not reinstalled on every start.
source_digest() {
    (cd "$ROOT" && find setup.cfg pyproject.toml README.md twistedproxy twisted -type f \
        ! -name '*.pyc' ! -path '*__pycache__*' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
}

# ensure_venv NAME INTERPRETER EXTRAS: a virtualenv at $ROOT/.venv-NAME with the
# project installed the way users install it (a regular, non-editable pip install),
# skipped when that venv already holds this very source with these extras.
ensure_venv() {
    local name=$1 interp=$2 extras=$3
    local venv="$ROOT/.venv-$name"
    command -v "$interp" >/dev/null || die "interpreter $interp not found"
    if [ ! -f "$venv/.bootstrapped" ]; then
        echo "==> creating $venv ($interp)"
        rm -rf "$venv"
        run_logged "creating the virtualenv $venv" "$interp" -m venv "$venv"
        run_logged "upgrading pip in $venv" "$venv/bin/python" -m pip install --upgrade pip setuptools wheel
        touch "$venv/.bootstrapped"
    fi
    local stamp="$venv/.twistedproxy-installed" digest have=""
    digest=$(source_digest)
    [ -f "$stamp" ] && have=$(cat "$stamp")
    # Current when the same source is in, with these extras (or any, when none are asked).
    if [ "$have" = "$digest $extras" ] || { [ -z "$extras" ] && [ "${have%% *}" = "$digest" ]; }; then
        return 0
    fi
    echo "==> installing twistedproxy$extras into $venv"
    rm -f "$stamp"
    run_logged "pip install twistedproxy$extras into $venv" \
        "$venv/bin/python" -m pip install --disable-pip-version-check "$ROOT$extras"
    # pip writes a build/ folder next to setup.cfg; keep the checkout clean.
    rm -rf "$ROOT/build"
    echo "$digest $extras" >"$stamp"
}
