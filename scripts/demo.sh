#!/usr/bin/env bash
# Runs the proxy on a ready-made local setup: installs what it needs, starts two
# redis-server and two memcached backends on 127.0.0.1, then the proxy (PyPy) in
# the foreground with conf/demo.yml.  Ctrl-C stops everything.
# Extra arguments go to the proxy (e.g. -v 7 for debug logs).
#
# The demo follows the master through its pid file (.demo/cacheproxy.pid), so it
# survives an upgrade (kill -USR2 "$(cat .demo/cacheproxy.pid)"): it runs while the
# master the pid file names runs, and Ctrl-C stops whichever master that is.
# Environment (defaults in brackets), for running it beside another copy:
#   DEMO_CONF [conf/demo.yml]  DEMO_REDIS_PORTS ["26379 26380"]
#   DEMO_MEMCACHED_PORTS ["21211 21212"]  DEMO_STATS_PORT [22222]  DEMO_RUN [.demo]
#   DEMO_PROXY: the proxy command [.venv-pypy/bin/cacheproxy, installed first]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"

conf=${DEMO_CONF:-conf/demo.yml}
redis_ports=${DEMO_REDIS_PORTS:-26379 26380}
memcached_ports=${DEMO_MEMCACHED_PORTS:-21211 21212}
stats_port=${DEMO_STATS_PORT:-22222}
run=${DEMO_RUN:-$ROOT/.demo}

ensure_debian_packages netcat-openbsd
if [ -n "${DEMO_PROXY:-}" ]; then
    read -ra proxy <<<"$DEMO_PROXY"
else
    ensure_venv pypy pypy3 ""
    proxy=("$ROOT/.venv-pypy/bin/cacheproxy")
fi

mkdir -p "$run"
pidfile="$run/cacheproxy.pid"
rm -f "$pidfile" "$pidfile.oldbin"  # a crashed run's: its pid may be another process's now
pids=()
proxy_pid=""

# The master now: the one the pid file names (an upgrade replaces it), else the one we started.
master_pid() {
    local pid=""
    [ -f "$pidfile" ] && read -r pid <"$pidfile" 2>/dev/null || true
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        echo "$pid"
    elif [ -n "$proxy_pid" ] && kill -0 "$proxy_pid" 2>/dev/null; then
        echo "$proxy_pid"
    fi
}

stop_all() {
    trap - EXIT INT TERM
    # The proxy first (fast stop; an old master of an upgrade too), then the backends.
    local masters=() pid
    for pid in "$(master_pid)" "$(cat "$pidfile.oldbin" 2>/dev/null || true)" "$proxy_pid"; do
        [ -n "$pid" ] && kill "$pid" 2>/dev/null && masters+=("$pid")
    done
    # A master after an upgrade is not our child: wait for it by its pid (10 s at most).
    for _ in $(seq 100); do
        local alive=0
        for pid in "${masters[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill "${pids[i]}" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap stop_all EXIT INT TERM

for port in $redis_ports; do
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$run" \
        --logfile "$run/redis-$port.log" &
    pids+=($!)
done
mc_user=()
[ "$(id -u)" -eq 0 ] && mc_user=(-u root)
for port in $memcached_ports; do
    memcached -l 127.0.0.1 -p "$port" -U 0 -m 64 "${mc_user[@]}" &
    pids+=($!)
done
sleep 0.5

cat <<INFO
==> backends up: redis 127.0.0.1:${redis_ports// /,}  memcached 127.0.0.1:${memcached_ports// /,}
==> proxy: Redis on 127.0.0.1:22121, memcached on 127.0.0.1:22122 (conf/demo.yml),
    a master with one worker per CPU; stats: 127.0.0.1:$stats_port (twemproxy JSON),
    http://127.0.0.1:22223/status, /metrics, /slowlog
    try: redis-cli -p 22121 set hello world && redis-cli -p 22121 get hello
         .venv-pypy/bin/cacheproxyctl -c conf/demo.yml status
         kill -USR2 \$(cat ${pidfile#"$ROOT/"})     # upgrade: the demo follows the new master
    Ctrl-C stops the proxy and the backends.
INFO
"${proxy[@]}" -c "$conf" -s "$stats_port" -a 127.0.0.1 -p "$pidfile" "$@" &
proxy_pid=$!
# Until the master the pid file names (or the one just started) is gone; sleep in
# the background so that Ctrl-C and TERM are handled at once.
while [ -n "$(master_pid)" ]; do
    sleep 0.2 &
    wait $! || true
done
wait "$proxy_pid"  # its exit status is the demo's (0 after an upgrade: it handed over)
