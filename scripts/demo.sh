#!/usr/bin/env bash
# Runs the proxy on a ready-made local setup: installs what it needs, starts two
# redis-server and two memcached backends on 127.0.0.1, then the proxy (PyPy) in
# the foreground with conf/demo.yml.  Ctrl-C stops everything.
# Extra arguments go to the proxy (e.g. -v 7 for debug logs).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"

ensure_debian_packages netcat-openbsd
ensure_venv pypy pypy3 ""

run="$ROOT/.demo"
mkdir -p "$run"
pids=()
stop_all() {
    trap - EXIT INT TERM
    # The proxy first (fast stop), then the backends.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill "${pids[i]}" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap stop_all EXIT INT TERM

for port in 26379 26380; do
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$run" \
        --logfile "$run/redis-$port.log" &
    pids+=($!)
done
mc_user=()
[ "$(id -u)" -eq 0 ] && mc_user=(-u root)
for port in 21211 21212; do
    memcached -l 127.0.0.1 -p "$port" -U 0 -m 64 "${mc_user[@]}" &
    pids+=($!)
done
sleep 0.5

cat <<'INFO'
==> backends up: redis 127.0.0.1:26379,26380  memcached 127.0.0.1:21211,21212
==> proxy: Redis on 127.0.0.1:22121, memcached on 127.0.0.1:22122 (conf/demo.yml),
    a master with one worker per CPU; stats: 127.0.0.1:22222 (twemproxy JSON),
    http://127.0.0.1:22223/status, /metrics, /slowlog
    try: redis-cli -p 22121 set hello world && redis-cli -p 22121 get hello
         .venv-pypy/bin/cacheproxyctl -c conf/demo.yml status
    Ctrl-C stops the proxy and the backends.
INFO
"$ROOT/.venv-pypy/bin/cacheproxy" -c conf/demo.yml -s 22222 -a 127.0.0.1 "$@" &
pids+=($!)
wait "${pids[-1]}"
