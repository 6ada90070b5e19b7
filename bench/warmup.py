"""
What the warm-up (global: warmup, twistedproxy/core/warmup.py) buys, and what
it costs after a worker crash:

    python3 bench/warmup.py first    # latency of the first seconds of traffic after start
    python3 bench/warmup.py crash    # how long connections wait while a crashed worker is replaced

first: for each interpreter and each warmup setting (off, auto), start a
single-process proxy (worker_processes: 0) in front of one backend, and the
moment its port accepts, send GETs open-loop (each request's latency counted
from when it was due, so a stall is charged to every request it delays) at
--rate over --conns long connections for --seconds.  Prints p50/p99/p99.9/max
of the first second, of the second one and of the last one (steady state).

crash: a master with 2 workers (reuseport: one socket per worker, so the
connections the kernel puts on the dead worker's socket wait for its
replacement).  SIGKILL one worker, at once open --probes connections one
millisecond apart, each sending one GET; the slowest reply is the wait of the
connections queued on the dead worker's socket (the respawn: process start,
imports, configuration, warm-up).  Repeated --repeat times per setting, with
global: spare_worker on and off (--spare): with it on, each kill waits until
the master has a spare (imports done), which takes the slot instead of a new
process.  --traffic S: once the slowest probe is answered, S seconds of GETs
at --rate over --conns new connections, open loop as in first (about half of
them land on the replacement's socket): the replacement's first seconds (the
same load runs once before the first kill, so that the other worker's first
traffic is not counted as the replacement's).

--jit (first, PyPy): count the loops and bridges the JIT compiles during the
warm-up and in each of the first 3 seconds of traffic (bench/jithook, a compile
hook loaded as sitecustomize); --jit-names lists each with the guard that failed.

The load generator runs in this process (CPython is steadier here): its own
figures straight against the backend are printed first, as the floor.
Run it under the bench lock on a shared machine: flock /work/bench.lock ...
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

try:
    import yaml  # noqa: F401  (tests.support.processes needs it)
    from twisted.protocols import amp  # noqa: F401  (the control client, for the spare's status)
except ImportError:  # a bare python3: go on under the CPython venv, which has them
    _venv = os.path.join(ROOT, ".venv-cpython", "bin", "python")
    os.execv(_venv, [_venv] + sys.argv)

sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
from run import wait_for, warm_spare  # noqa: E402
from tests.support import processes  # noqa: E402

HOST = processes.HOST
KEY = b"warmbench:key"
VALUE = b"v" * 32
PROTOCOLS = {
    # request, the exact reply to it, a request that stores the value
    "redis": (b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(KEY), KEY),
              b"$%d\r\n%s\r\n" % (len(VALUE), VALUE),
              b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(KEY), KEY, len(VALUE), VALUE)),
    "memcache": (b"get %s\r\n" % KEY,
                 b"VALUE %s 0 %d\r\n%s\r\nEND\r\n" % (KEY, len(VALUE), VALUE),
                 b"set %s 0 0 %d\r\n%s\r\n" % (KEY, len(VALUE), VALUE)),
}


def find_python(name: str, override=None) -> str:
    for path in ((override,) if override else ()) + (os.path.join(ROOT, ".venv-" + name, "bin", "python"),
                 os.path.join("/work/main", ".venv-" + name, "bin", "python")):
        if os.access(path, os.X_OK):
            return path
    raise SystemExit("no %s venv (scripts/test.sh makes them)" % (name,))


def percentile(sorted_values, p: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, int(round(p / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[index]


def summary(latencies) -> str:
    values = sorted(latencies)
    if not values:
        return "no replies"
    return "n=%5d p50 %7.3f  p99 %7.3f  p99.9 %7.3f  max %7.3f ms" % (
        len(values), percentile(values, 50) * 1e3, percentile(values, 99) * 1e3,
        percentile(values, 99.9) * 1e3, values[-1] * 1e3)


def figures(latencies) -> dict:
    values = sorted(latencies)
    return {"n": len(values), "p50": percentile(values, 50), "p99": percentile(values, 99),
            "p99.9": percentile(values, 99.9), "max": values[-1] if values else None}


def connect(port: int, timeout: float = 5.0):
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def store(port: int, protocol: str) -> None:
    with connect(port) as sock:
        sock.sendall(PROTOCOLS[protocol][2])
        sock.recv(100)


def open_loop(port: int, protocol: str, rate: float, seconds: float, conns: int):
    """
    GETs at C{rate} per second for C{seconds} over C{conns} connections, open
    loop; returns [(due, latency)] with C{due} relative to the start.
    """
    request, reply, _ = PROTOCOLS[protocol]
    size = len(reply)
    socks = [connect(port) for _ in range(conns)]
    poller = select.epoll()
    state = {}
    for sock in socks:
        sock.setblocking(False)
        poller.register(sock.fileno(), select.EPOLLIN)
        state[sock.fileno()] = [sock, [], b""]  # due times (oldest first), buffered bytes
    results = []
    total = int(rate * seconds)
    interval = 1.0 / rate
    start = time.perf_counter()
    sent = 0
    answered = 0
    deadline = start + seconds + 10.0
    while answered < total:
        now = time.perf_counter()
        if now > deadline:
            break
        while sent < total and start + sent * interval <= now:
            entry = state[socks[sent % conns].fileno()]
            entry[1].append(start + sent * interval)
            entry[0].send(request)  # a few dozen bytes: the socket buffer always takes them
            sent += 1
        wait = max(0.0, start + sent * interval - time.perf_counter()) if sent < total else 0.05
        for fd, _ in poller.poll(wait):
            entry = state[fd]
            data = entry[0].recv(65536)
            now = time.perf_counter()
            buf = entry[2] + data
            count = len(buf) // size
            entry[2] = buf[count * size:]
            for _ in range(count):
                due = entry[1].pop(0)
                results.append((due - start, now - due))
                answered += 1
    for sock in socks:
        sock.close()
    poller.close()
    return results


def windows(results, seconds: float):
    first = [lat for due, lat in results if due < 1.0]
    second = [lat for due, lat in results if 1.0 <= due < 2.0]
    last = [lat for due, lat in results if due >= seconds - 1.0]
    return first, second, last


def config_for(protocol: str, backend_port: int, listen_port: int, warmup, workers: int = 0, spare=False) -> dict:
    pool = processes.pool_config([backend_port], listen_port, redis=protocol == "redis")
    return {"bench": pool, "global": {"worker_processes": workers, "warmup": warmup, "spare_worker": spare}}


def start_backend(protocol: str):
    return processes.redis_server() if protocol == "redis" else processes.memcached()


def wait_accepting(port: int, proc, timeout: float = 30.0) -> float:
    """Poll until C{port} accepts; the time it took."""
    started = time.perf_counter()
    while True:
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return time.perf_counter() - started
        except OSError:
            if not proc.alive():
                raise SystemExit("the proxy exited:\n" + proc.output())
            if time.perf_counter() - started > timeout:
                raise SystemExit("the proxy does not listen:\n" + proc.output())
            time.sleep(0.002)


def jit_log(path: str, traffic_started: float, verbose: bool) -> dict:
    """
    What the proxy's JIT compiled (bench/jithook: one line per loop or bridge)
    during the warm-up and in each of the first 3 seconds of traffic.
    """
    counts = {"before": [0, 0], 0: [0, 0], 1: [0, 0], 2: [0, 0]}
    names = {0: [], 1: [], 2: []}
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return counts
    for line in lines:
        parts = line.split(" ", 6)
        when = float(parts[0]) - traffic_started
        kind = 1 if parts[1] == "bridge" else 0
        key = "before" if when < 0 else int(when)
        if key in counts:
            counts[key][kind] += 1
            if key != "before":
                names[key].append("%+.3f %s %s ops=%s %s" % (when, parts[1], parts[5], parts[4], parts[6]))
    if verbose:
        for second in (0, 1, 2):
            for name in names[second]:
                print("    " + name)
    return counts


def describe_jit(counts) -> str:
    return "JIT (loops/bridges): warm-up %d/%d, 1st s %d/%d, 2nd s %d/%d, 3rd s %d/%d" % tuple(
        counts[key][kind] for key in ("before", 0, 1, 2) for kind in (0, 1))


def first(args) -> dict:
    out = {}
    if args.jit:
        hook = os.path.join(HERE, "jithook")
        os.environ["PYTHONPATH"] = hook + os.pathsep + os.environ.get("PYTHONPATH", "")
    for protocol in args.protocol:
        backend = start_backend(protocol)
        try:
            store(backend.port, protocol)
            base = open_loop(backend.port, protocol, args.rate, args.seconds, args.conns)
            print("%-8s direct            first s: %s" % (protocol, summary(windows(base, args.seconds)[0])))
            for name in args.python:
                python = find_python(name, getattr(args, name))
                for setting in args.warmup:
                    port = processes.free_port()
                    config = config_for(protocol, backend.port, port, setting)
                    log_path = None
                    if args.jit:
                        fd, log_path = tempfile.mkstemp(prefix="tp-jit-", suffix=".log")
                        os.close(fd)
                        os.environ["TP_JIT_LOG"] = log_path
                    proc = processes.proxy(config, port, python=python, wait_port=False)
                    try:
                        took = wait_accepting(port, proc)
                        traffic_started = time.monotonic()
                        results = open_loop(port, protocol, args.rate, args.seconds, args.conns)
                    finally:
                        proc.stop()
                        os.environ.pop("TP_JIT_LOG", None)
                    warmed = [line for line in proc.output().splitlines() if "warmed up in" in line]
                    one, two, last = windows(results, args.seconds)
                    label = "%-8s %-7s warmup %-4s" % (protocol, name, setting)
                    print("%s first s: %s   (listening after %.2f s)" % (label, summary(one), took))
                    if warmed:
                        print("%s %s" % (" " * len(label), warmed[0].split("] ", 1)[-1]))
                    print("%s 2nd s:   %s" % (" " * len(label), summary(two)))
                    print("%s last s:  %s" % (" " * len(label), summary(last)))
                    out["%s/%s/%s" % (protocol, name, setting)] = entry = {
                        "listening_after": took, "first": figures(one), "second": figures(two), "last": figures(last)}
                    if log_path is not None:
                        if name == "pypy":
                            counts = jit_log(log_path, traffic_started, args.jit_names)
                            print("%s %s" % (" " * len(label), describe_jit(counts)))
                            entry["jit"] = counts
                        if args.jit_names:
                            print("%s (the whole log: %s)" % (" " * len(label), log_path))
                        else:
                            os.unlink(log_path)
                    sys.stdout.flush()
        finally:
            backend.stop()
    return out


def worker_pids(master_pid: int, kind: str = "worker") -> list:
    """The master's children titled C{cacheproxy: worker process N} (C{kind} "spare": its spare)."""
    out = subprocess.run(["pgrep", "-P", str(master_pid)], stdout=subprocess.PIPE, universal_newlines=True)
    prefix = "cacheproxy: spare worker process" if kind == "spare" else "cacheproxy: worker process "
    found = []
    for pid in out.stdout.split():
        try:
            with open("/proc/%s/cmdline" % (pid,), "rb") as f:
                title = f.read().replace(b"\0", b" ").decode()
        except OSError:
            continue  # gone meanwhile
        if title.startswith(prefix):
            found.append(int(pid))
    return sorted(found)


def crash(args) -> dict:
    protocol = args.protocol[0]
    request, reply, _ = PROTOCOLS[protocol]
    out = {}
    backend = start_backend(protocol)
    try:
        store(backend.port, protocol)
        if args.traffic:
            base = open_loop(backend.port, protocol, args.rate, args.traffic, args.conns)
            print("%-8s direct (the generator's floor), 1st s: %s" % (protocol, summary(windows(base, args.traffic)[0])))
        for name in args.python:
            python = find_python(name, getattr(args, name))
            for setting, spare in [(w, s) for w in args.warmup for s in args.spare]:
                port = processes.free_port()
                config = config_for(protocol, backend.port, port, setting, workers=2, spare=spare == "on")
                control = config["global"]["control"] = tempfile.mktemp(prefix="tp-bench-ctl-", suffix=".sock")
                proc = processes.proxy(config, port, python=python, wait_port=False)
                waits = []
                try:
                    wait_accepting(port, proc)
                    time.sleep(3.0)  # both workers up, and no longer young (their death is no crash loop)
                    if args.traffic:
                        # The workers' own first traffic (their JIT's last bridges) is not the replacement's.
                        open_loop(port, protocol, args.rate, args.traffic, args.conns)
                    for _ in range(args.repeat):
                        pids = wait_for(lambda: len(worker_pids(proc.pid)) == 2 and worker_pids(proc.pid), 30,
                                        "two workers")
                        spares = []
                        if spare == "on":
                            spares = [wait_for(lambda: warm_spare(control), 30, "a warm spare")]
                        victim = pids[0]
                        os.kill(victim, signal.SIGKILL)
                        killed = time.perf_counter()
                        socks = []
                        for _ in range(args.probes):
                            sock = connect(port, timeout=10.0)
                            sock.sendall(request)
                            socks.append((sock, time.perf_counter()))
                            time.sleep(0.001)
                        slowest = 0.0
                        for sock, sent in socks:
                            data = b""
                            while len(data) < len(reply):
                                chunk = sock.recv(65536)
                                if not chunk:
                                    break
                                data += chunk
                            slowest = max(slowest, time.perf_counter() - sent)
                            sock.close()
                        respawned = worker_pids(proc.pid)
                        after = None
                        if args.traffic:
                            after = open_loop(port, protocol, args.rate, args.traffic, args.conns)
                        waits.append(slowest)
                        took = "the spare %d" % (spares[0],) if spares and spares[0] in respawned else "a new process"
                        print("%-8s %-7s warmup %-4s spare %-3s killed worker %d: slowest of %d new connections"
                              " %.3f s (kill to last reply %.3f s; workers now %s, %s took its slot)"
                              % (protocol, name, setting, spare, victim, args.probes, slowest,
                                 time.perf_counter() - killed, respawned, took))
                        if after is not None:
                            one, two, last = windows(after, args.traffic)
                            print("    then %d/s over %d new connections, 1st s: %s" % (args.rate, args.conns, summary(one)))
                            print("    %*s2nd s: %s" % (len(str(int(args.rate))) + len(str(args.conns)) + 28, "",
                                                        summary(two)))
                        sys.stdout.flush()
                        time.sleep(3.0)  # the new worker is no longer young
                finally:
                    proc.stop()
                out["%s/%s/%s/spare-%s" % (protocol, name, setting, spare)] = waits
    finally:
        backend.stop()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("first", "crash"))
    parser.add_argument("--protocol", default="redis,memcache", help="redis,memcache (crash: the first)")
    parser.add_argument("--python", default="pypy,cpython", help="interpreters (their venvs)")
    parser.add_argument("--warmup", default="off,auto", help="global: warmup settings to compare")
    parser.add_argument("--rate", type=float, default=5000.0, help="requests per second (first)")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds of traffic (first)")
    parser.add_argument("--conns", type=int, default=20, help="long connections (first)")
    parser.add_argument("--probes", type=int, default=40, help="connections opened after a kill (crash)")
    parser.add_argument("--repeat", type=int, default=3, help="kills per setting (crash)")
    parser.add_argument("--spare", default="on,off", help="global: spare_worker settings to compare (crash)")
    parser.add_argument("--traffic", type=float, default=0.0,
                        help="crash: seconds of open-loop GETs (--rate, --conns) after each replacement serves")
    parser.add_argument("--pypy", help="the PyPy interpreter (default: the repo's .venv-pypy)")
    parser.add_argument("--cpython", help="the CPython interpreter (default: the repo's .venv-cpython)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--jit", action="store_true",
                        help="first: count the loops and bridges PyPy compiles (bench/jithook) in each of the first 3 s")
    parser.add_argument("--jit-names", action="store_true", help="with --jit: also list them, and keep the log")
    args = parser.parse_args(argv)
    args.protocol = args.protocol.split(",")
    args.python = args.python.split(",")
    args.warmup = args.warmup.split(",")
    args.spare = args.spare.split(",")
    result = first(args) if args.mode == "first" else crash(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
