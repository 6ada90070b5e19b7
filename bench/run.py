"""
The benchmark: the same load against twistedproxy on PyPy, twistedproxy on
CPython and twemproxy (nutcracker), each in front of the same two backends on
loopback, and straight against one backend with no proxy ("direct", the
machine's ceiling), then one table of requests/s, p50/p99 latency and the
ratio of each target to nutcracker next to its goal.

    python3 bench/run.py                 # full run, Redis and memcached
    python3 bench/run.py --quick         # the same, with fewer requests
    python3 bench/run.py --protocol redis --workers 0,2
    python3 bench/run.py --no-direct     # without the no-proxy baseline

See bench/README.md for what each run does and how to read it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
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
    from twisted.protocols import amp  # noqa: F401  (the control client: a master's spare)
except ImportError:  # a bare python3: go on under the CPython venv, which has them
    _venv = os.path.join(ROOT, ".venv-cpython", "bin", "python")
    if not os.path.exists(_venv):
        subprocess.check_call(["bash", "-c", 'source scripts/env.sh && ensure_venv cpython "$(cpython)" ""'],
                              cwd=ROOT)
    os.execv(_venv, [_venv] + sys.argv)

sys.path.insert(0, ROOT)
from tests.support import processes  # noqa: E402
from tests.support.workers import ready_status  # noqa: E402

HOST = processes.HOST
CLIENTS = 50
PIPELINE = 16
KEYSPACE = 100000  # -r: random keys key:000000000000 .. key:000000099999
FULL_REQUESTS = 200000
QUICK_REQUESTS = 40000

# Minimum ratio of a proxy's requests/s to nutcracker's: (pipelined, unpipelined).
TARGETS = {"pypy": (1.5, 0.8), "cpython": (0.7, 0.5)}
# Most CPU per request a proxy may spend, as a ratio to nutcracker's (both pipelinings).
CPU_TARGETS = {"pypy": 1.0}
# The baseline with no proxy at all: the load tool straight against one backend.
# No proxy can beat it (a proxy only adds work on the same cores), so its ratio
# to nutcracker is the highest ratio any proxy can reach on this machine.
DIRECT = "direct"
# The suffix of a target that runs another checkout's code (--baseline): "pypy@base".
BASE = "@base"
# A target named FLOOR + interpreter runs bench/floor.py (the proxy's I/O layer forwarding bytes) on it.
FLOOR = "floor-"
TOOLS = ["redis-server", "redis-benchmark", "memcached", "memcaslap", "nutcracker"]
# The memcached load tools: memaslap (C, one request in flight per connection), bench/mcload.py
# (Python) and bench/latgen.c's batch mode (C); the pipelined run takes either of the last two.
MC_LOADERS = ("memaslap", "mcload", "latgen")
MC_PIPELINED_LOADERS = ("latgen", "mcload")
LATGEN_SOURCE = os.path.join(HERE, "latgen.c")
BUILD_DIR = os.path.join(HERE, ".build")


class BenchError(Exception):
    """The benchmark, or one target's run, cannot go on."""


# -- interpreters and tools ---------------------------------------------------------

def find_python(name: str, override, fallback: str) -> str:
    """
    The venv interpreter for C{name} ("pypy" or "cpython"): C{override} (a venv
    directory or an interpreter), else the repo's .venv-NAME, else C{fallback},
    else a new .venv-NAME made by scripts/env.sh's ensure_venv.
    """
    candidates = [override] if override else [os.path.join(ROOT, ".venv-" + name), fallback]
    for path in candidates:
        python = os.path.join(path, "bin", "python") if os.path.isdir(path) else path
        if os.access(python, os.X_OK):
            return python
    if override:
        raise BenchError("--%s %s: no such venv or interpreter" % (name, override))
    interp = "pypy3" if name == "pypy" else '"$(cpython)"'
    print("==> no %s venv found; making %s/.venv-%s" % (name, ROOT, name), flush=True)
    subprocess.check_call(["bash", "-c", "source scripts/env.sh && ensure_venv %s %s ''" % (name, interp)],
                          cwd=ROOT)
    return os.path.join(ROOT, ".venv-" + name, "bin", "python")


def ensure_tools() -> None:
    """The Debian packages this needs, installed by scripts/env.sh if any is missing."""
    if all(shutil.which(tool) for tool in TOOLS):
        return
    subprocess.check_call(["bash", "-c", "source scripts/env.sh && ensure_debian_packages"], cwd=ROOT)
    missing = [tool for tool in TOOLS if not shutil.which(tool)]
    if missing:
        raise BenchError("missing after install: %s" % (", ".join(missing),))


def build_generator() -> str:
    """bench/latgen.c compiled into bench/.build/ (git-ignored), once per version of the source."""
    with open(LATGEN_SOURCE, "rb") as f:
        digest = hashlib.sha1(f.read()).hexdigest()[:12]
    binary = os.path.join(BUILD_DIR, "latgen-" + digest)
    if os.access(binary, os.X_OK):
        return binary
    if not shutil.which("gcc"):
        subprocess.check_call(["bash", "-c", "source scripts/env.sh && ensure_debian_packages"], cwd=ROOT)
    os.makedirs(BUILD_DIR, exist_ok=True)
    partial = "%s.%d" % (binary, os.getpid())
    out = subprocess.run(["gcc", "-O2", "-Wall", "-o", partial, LATGEN_SOURCE], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    if out.returncode != 0:
        raise BenchError("gcc could not build %s:\n%s" % (LATGEN_SOURCE, out.stdout))
    os.rename(partial, binary)  # atomic: a concurrent build finds a whole binary or none
    return binary


def describe(python: str) -> str:
    """C{python}'s implementation and version, e.g. "PyPy 3.9.16"."""
    try:
        return subprocess.check_output(
            [python, "-c", "import sys, platform; print(platform.python_implementation(), sys.version.split()[0])"],
            text=True, stderr=subprocess.STDOUT).strip()
    except (OSError, subprocess.CalledProcessError) as e:
        return "unknown (%s)" % (e,)


# -- processes ---------------------------------------------------------------------

class Running:
    """Every process this run started, stopped in reverse order by L{stop_all}."""

    def __init__(self):
        self.procs = []

    def add(self, proc):
        self.procs.append(proc)
        return proc

    def stop(self, proc, keep_log=False):
        proc.stop()
        # A master/worker proxy's workers share its process group (its own session):
        # make sure none outlives the master.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if proc in self.procs:
            self.procs.remove(proc)
        if not keep_log:
            _unlink(proc.log_path)
        if "-c" in proc.argv:  # the config file processes.write_config made
            _unlink(proc.argv[proc.argv.index("-c") + 1])

    def stop_all(self):
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def start_target(running, target, pool, python=None, workers=0, baseline=None, settled=True):
    """
    Start C{target} ("nutcracker", a proxy interpreter name, or L{FLOOR} and one) in front of C{pool};
    a name ending in L{BASE} runs the code of the checkout C{baseline} instead of this one.  With
    C{workers}, return once the master's spare is warm (C{settled}: a proxy that has been running a
    while), else as soon as every worker is ready (a fresh start, as its first clients meet it).
    """
    port = processes.free_port()
    pool = dict(pool, listen="%s:%d" % (HOST, port))
    if target == "nutcracker":
        proc = processes.nutcracker({"bench": pool}, port)
    elif target.startswith(FLOOR):
        backend_port = pool["servers"][0].split(":")[1]  # "host:port:weight"
        argv = [python, os.path.join(HERE, "floor.py"), str(port), backend_port]
        proc = processes.Process(argv, port, env=processes.proxy_env(), cwd=ROOT)
    elif target.endswith(BASE):
        config = processes.write_config({"bench": pool, "global": {"worker_processes": workers}})
        argv = [python, "-m", "twistedproxy.cli", "-c", config, "-s", str(processes.free_port()), "-a", HOST]
        proc = processes.Process(argv, port, env=dict(os.environ, PYTHONPATH=baseline), cwd=baseline)
    else:
        config = {"bench": pool, "global": {"worker_processes": workers}}
        if workers:
            config["global"]["control"] = tempfile.mktemp(prefix="tp-bench-ctl-", suffix=".sock")
        stats = ["-s", str(processes.free_port()), "-a", HOST]
        proc = processes.proxy(config, port, python=python, extra_args=stats)
        if workers and settled:
            # The spare starts with the workers and warms up for about 3 s on a core:
            # measured once it is warm, as a proxy that has been running a while.
            wait_for(lambda: warm_spare(config["global"]["control"]), 60, "the master's spare worker")
        elif workers:
            # The master listens from its start: a fresh start serves once its workers are ready.
            wait_for(lambda: ready_status(config["global"]["control"], workers), 60, "the master's workers")
    return running.add(proc), port


def warm_spare(control_path: str):
    """The pid of the master's spare once it is warm (its status, over the control socket), else None."""
    from twistedproxy.control.client import BlockingControlClient

    try:
        with BlockingControlClient(control_path) as ctl:
            found = ctl.status()["spare"]
    except OSError:
        return None
    return found["pid"] if found and found["warm"] else None


def wait_for(predicate, timeout: float, what: str):
    """C{predicate()}'s first true value, polled until C{timeout} seconds (then BenchError)."""
    deadline = time.perf_counter() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.perf_counter() > deadline:
            raise BenchError("timed out waiting for " + what)
        time.sleep(0.02)


# -- load generators ---------------------------------------------------------------

def _run(argv, timeout):
    try:
        out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError("%s timed out after %ss" % (argv[0], timeout))
    if out.returncode != 0:
        raise BenchError("%s exited %s:\n%s" % (" ".join(argv), out.returncode, out.stdout[-2000:]))
    return out.stdout


def redis_load(port, requests, pipeline, timeout, extra=()):
    """redis-benchmark set,get (C{extra}: more of its arguments, e.g. --tls or --cluster): {test: {rps, p50_ms, p99_ms}}."""
    argv = ["redis-benchmark", "-h", HOST, "-p", str(port), "-t", "set,get", "-n", str(requests),
            "-c", str(CLIENTS), "-r", str(KEYSPACE), "--csv"] + list(extra)
    if pipeline > 1:
        argv += ["-P", str(pipeline)]
    out = _run(argv, timeout)
    results = {}
    header = None
    for line in out.splitlines():
        if not line.startswith('"'):
            continue  # e.g. the CONFIG GET warning
        cells = [c.strip('"') for c in line.split('","')]
        if cells[0] == "test":
            header = cells
            continue
        row = dict(zip(header or ["test", "rps"], cells))
        results[row["test"].lower()] = {
            "rps": float(row["rps"]),
            "p50_ms": float(row["p50_latency_ms"]) if "p50_latency_ms" in row else None,
            "p99_ms": float(row["p99_latency_ms"]) if "p99_latency_ms" in row else None,
        }
    if set(results) != {"set", "get"}:
        raise BenchError("redis-benchmark gave no SET/GET results:\n%s" % (out[-2000:],))
    return results


def mcload(loader_python, port, requests, pipeline, timeout):
    """bench/mcload.py's set/get mix: {"set+get": {rps, p50_ms, p99_ms}}."""
    argv = [loader_python, os.path.join(HERE, "mcload.py"), "--port", str(port), "-n", str(requests),
            "-c", str(CLIENTS), "-P", str(pipeline), "-r", str(KEYSPACE), "--timeout", str(timeout)]
    return _set_get_result("mcload", _run(argv, timeout + 30), requests)


def latgen_batch(port, requests, pipeline, timeout):
    """
    The same load as L{mcload} from bench/latgen.c's batch mode (C, so it takes
    less of the cores the target shares): {"set+get": {rps, p50_ms, p99_ms}}.
    """
    argv = [build_generator(), "batch", HOST, str(port), "memcache", str(CLIENTS), str(KEYSPACE), str(requests),
            str(pipeline)]
    return _set_get_result("latgen", _run(argv, timeout), requests)


def _set_get_result(name, out, requests):
    """mcload's or latgen batch's JSON line; any error reply, or a request never answered, fails the run."""
    result = json.loads(out.strip().splitlines()[-1])
    if result["errors"]:
        raise BenchError("%s: %d error replies" % (name, result["errors"]))
    if result["requests"] != requests:
        raise BenchError("%s: %d of %d requests answered" % (name, result["requests"], requests))
    return {"set+get": {k: result[k] for k in ("rps", "p50_ms", "p99_ms")}}


_MEMASLAP_CFG = "key\n16 16 1\nvalue\n3 3 1\ncmd\n0 0.5\n1 0.5\n"  # 16-byte keys, 3-byte values, 50% set


def memaslap(port, requests, timeout):
    """
    memaslap (libmemcached-tools' memcaslap) set/get 50/50 mix, one request in
    flight per connection: {"set+get": {rps, p50_ms, p99_ms}}.  memaslap keeps
    only a log2 histogram, so p50/p99 are read off it (approximate).
    """
    with tempfile.NamedTemporaryFile("w", prefix="tp-memaslap-", suffix=".cfg", delete=False) as f:
        f.write(_MEMASLAP_CFG)
    try:
        argv = ["memcaslap", "-s", "%s:%d" % (HOST, port), "-T", "2", "-c", str(CLIENTS),
                "-x", str(requests), "-F", f.name, "-S", "3600s"]
        out = _run(argv, timeout)
    finally:
        _unlink(f.name)
    tps = re.search(r"Run time: \S+ Ops: (\d+) TPS: (\d+)", out)
    if not tps or int(tps.group(1)) < requests:
        raise BenchError("memaslap did not finish:\n%s" % (out[-2000:],))
    buckets = _log2_histogram(out, "Total Statistics")
    return {"set+get": {"rps": float(tps.group(2)), "p50_ms": _log2_percentile(buckets, 0.50),
                        "p99_ms": _log2_percentile(buckets, 0.99), "approx_latency": True}}


def _log2_histogram(out, section):
    """memaslap's 'Log2 Dist' rows under C{section}: counts per bucket, bucket i = [2^i, 2^(i+1)) us."""
    counts = {}
    text = out[out.index(section):]
    text = text[text.index("Log2 Dist:"):]
    for line in text.splitlines()[1:]:
        m = re.match(r"\s*(\d+):((?:\s+\d+)+)\s*$", line)
        if not m:
            break
        for i, count in enumerate(m.group(2).split()):
            counts[int(m.group(1)) + i] = int(count)
    return counts


def _log2_percentile(counts, p):
    total = sum(counts.values())
    seen = 0
    for bucket in sorted(counts):
        n = counts[bucket]
        if n and seen + n >= p * total:
            fraction = (p * total - seen) / n
            return round(2 ** (bucket + fraction) / 1000.0, 3)  # geometric within the bucket, in ms
        seen += n
    return None


class Load:
    """One protocol's load: warm-up and measured runs against a listening port."""

    def __init__(self, protocol, requests, quick, loader_python, mc_loader, mc_pipelined_loader="latgen"):
        self.protocol = protocol
        self.requests = requests
        self.loader_python = loader_python
        self.mc_loader = mc_loader  # the unpipelined run's: one of MC_LOADERS
        self.mc_pipelined_loader = mc_pipelined_loader  # one of MC_PIPELINED_LOADERS
        self.warm = (10000, 30000) if quick else (30000, 100000)  # (unpipelined, pipelined)

    def run(self, port, pipeline, requests):
        # A stuck target fails its run instead of the whole benchmark: even at 5000
        # requests/s a run is over well within this.
        timeout = max(60, requests // 5000)
        if self.protocol == "redis":
            return redis_load(port, requests, pipeline, timeout)
        loader = self.mc_loader if pipeline == 1 else self.mc_pipelined_loader
        if loader == "memaslap":
            return memaslap(port, requests, timeout)
        if loader == "latgen":
            return latgen_batch(port, requests, pipeline, timeout)
        return mcload(self.loader_python, port, requests, pipeline, timeout)

    def warm_up(self, port, workers=1):
        """
        Load that is not measured: PyPy's JIT compiles the hot paths here.  The
        kernel spreads connections over the workers, so each of C{workers}
        gets the same share as a single process would.
        """
        scale = max(1, workers)
        self.run(port, PIPELINE, self.warm[1] * scale)
        self.run(port, 1, self.warm[0] * scale)

    def measure(self, port, pid):
        """
        [(pipeline, test, result)] for the pipelined and the unpipelined run; each
        result also has the target's CPU time per request (L{cpu_times} of C{pid}'s
        process tree over the run, divided by the run's requests), which other load
        on the machine disturbs much less than requests/s; None when C{pid} is None
        (no target process: the direct baseline).
        """
        rows = []
        for pipeline in (PIPELINE, 1):
            before = cpu_times(pid) if pid is not None else None
            machine_before = machine_cpu()
            results = self.run(port, pipeline, self.requests)
            busy, elapsed = (after - start for after, start in zip(machine_cpu(), machine_before))
            count = self.requests * len(results)
            cpu = {"cpu_us_per_req": None, "cpu_system_share": None}
            if pid is not None:
                user, system = (after - start for after, start in zip(cpu_times(pid), before))
                cpu["cpu_us_per_req"] = round((user + system) * 1e6 / count, 3)
                cpu["cpu_system_share"] = round(system / (user + system), 3) if user + system else None
            machine = {"machine_us_per_req": round(busy * 1e6 / count, 2),
                       "machine_busy": round(busy / elapsed, 3) if elapsed else None}
            for test, result in results.items():
                rows.append((pipeline, test, dict(result, **cpu, **machine)))
        return rows


_TICK = os.sysconf("SC_CLK_TCK")


def _processes() -> dict:
    """pid -> the fields of its /proc/PID/stat after "pid (comm) " (state, ppid, ...), every live process."""
    procs = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        procs[int(name)] = stat[stat.rindex(b")") + 2:].split()
    return procs


def _tree(pid, procs) -> list:
    """C{pid} and its descendants among C{procs} (L{_processes})."""
    children = {}
    for child, fields in procs.items():
        children.setdefault(int(fields[1]), []).append(child)
    tree = []
    todo = [pid] if pid in procs else []
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, ()))
    return tree


def cpu_times(pid) -> tuple:
    """
    The CPU per request's numerator, as (user, system) CPU seconds: those of
    process C{pid} and of every live descendant of it (utime, stime of
    /proc/PID/stat), plus what their exited and waited-for children used
    (cutime, cstime): for a proxy, its master and all its workers, a worker
    that exited included; for nutcracker, its one process.
    """
    procs = _processes()
    user = system = 0
    for member in _tree(pid, procs):
        # utime, stime, cutime, cstime are the 12th to 15th fields after the command.
        fields = procs[member]
        user += int(fields[11]) + int(fields[13])
        system += int(fields[12]) + int(fields[14])
    return user / _TICK, system / _TICK


def pin_tree(pid, cpus) -> None:
    """Run process C{pid} and its live descendants on C{cpus} only (children started later inherit it)."""
    for member in _tree(pid, _processes()):
        try:
            os.sched_setaffinity(member, cpus)
        except OSError:
            pass  # exited meanwhile


def machine_cpu():
    """(busy, total) CPU seconds of the whole machine so far, summed over its cores (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest time is in user)
    return (total - idle) / _TICK, total / _TICK


# -- the run -----------------------------------------------------------------------

def backends(running, protocol):
    factory = processes.redis_server if protocol == "redis" else processes.memcached
    return [running.add(factory()) for _ in range(2)]


_PROBE = {"redis": (b"*2\r\n$3\r\nGET\r\n$11\r\nbench:probe\r\n", b"$-1\r\n"),
          "memcache": (b"get bench:probe\r\n", b"END\r\n")}


def wait_ready(port, protocol, connections=8, timeout=20.0):
    """
    Wait until C{connections} fresh connections each get a reply to a GET: a
    listening socket alone does not mean every worker of a proxy serves it.
    """
    request, reply = _PROBE[protocol]
    deadline = time.time() + timeout
    ok = 0
    last = None
    while ok < connections:
        if time.time() > deadline:
            raise BenchError("%d of %d probe connections got no reply in %ss (%s)" % (
                connections - ok, connections, timeout, last))
        try:
            with socket.create_connection((HOST, port), timeout=2.0) as sock:
                sock.sendall(request)
                got = b""
                while len(got) < len(reply):
                    chunk = sock.recv(64)
                    if not chunk:
                        break
                    got += chunk
            if got == reply:
                ok += 1
                continue
            last = "reply %r" % (got,)
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    return True


def bench_protocol(running, protocol, args, pythons, results):
    """
    Every target runs at once in front of the same two backends (idle while another
    is measured), plus, unless C{args.no_direct}, the "direct" baseline: the same
    load against the first backend with no proxy.  After each one's warm-up, the
    measured runs go round-robin, C{args.repeat} rounds, so that load from
    elsewhere on the machine spreads over all targets.  Each row keeps the median run (by requests/s)
    and all samples, with the median CPU per request of its own.
    A target that fails (does not start, does not answer, a load errors or hangs)
    is stopped and reported as failed; the others go on.
    """
    load = Load(protocol, args.requests, args.quick, args.loader_python, args.mc_loader, args.mc_pipelined_loader)
    servers = backends(running, protocol)
    pool = processes.pool_config([s.port for s in servers], 0, redis=(protocol == "redis"))
    runs = [("nutcracker", 0)] + ([] if args.no_direct else [(DIRECT, 0)])
    for workers in args.workers:
        # With --baseline each interpreter's run of this checkout is followed by one of the
        # baseline's, so that the rounds interleave them (A/B under the same load).
        runs += [(name, workers) for name in ("pypy", "pypy" + BASE, "cpython", "cpython" + BASE) if name in pythons]
    live = []  # [target, workers, label, proc, port]
    samples = {}  # (target, workers, pipeline, test) -> [result]
    failed = {}  # (target, workers) -> error

    def attempt(entry, what, func, *func_args):
        target, workers, label, proc, port = entry
        try:
            return func(*func_args)
        except BenchError as e:
            tail = proc.output()[-3000:] if proc is not None else ""
            print("!!! %s %s failed: %s\n---- %s log ----\n%s" % (label, what, e, label, tail), file=sys.stderr)
            failed[(target, workers)] = "%s: %s" % (what, str(e).splitlines()[0])
            if proc is not None:
                running.stop(proc)
            if entry in live:
                live.remove(entry)
            return None

    try:
        for target, workers in runs:
            label = target if target in ("nutcracker", DIRECT) else "%s w=%d" % (target, workers)
            entry = [target, workers, label, None, None]
            if target == DIRECT:
                # redis-benchmark cannot spread over two servers: one backend is the
                # load tool's own ceiling, which is what bounds any proxy here.
                entry[4] = servers[0].port
                live.append(entry)
                continue
            try:
                entry[3], entry[4] = start_target(running, target, pool, pythons.get(target), workers, args.baseline)
                if args.pin:
                    pin_tree(entry[3].pid, args.pin)
            except RuntimeError as e:
                attempt(entry, "start", _raise, BenchError(str(e)))
                continue
            live.append(entry)
        for entry in list(live):
            print("==> %s: warming up %s" % (protocol, entry[2]), flush=True)
            if attempt(entry, "readiness", wait_ready, entry[4], protocol):
                attempt(entry, "warm-up", load.warm_up, entry[4], entry[1])
        for round_ in range(args.repeat):
            for entry in list(live):
                target, workers, label, proc, port = entry
                print("==> %s round %d/%d: %s (load average %.2f)" % (
                    protocol, round_ + 1, args.repeat, label, os.getloadavg()[0]), flush=True)
                rows = attempt(entry, "measured run", load.measure, port, proc.pid if proc else None)
                for pipeline, test, result in rows or ():
                    result = dict(result, loadavg=os.getloadavg()[0])
                    samples.setdefault((target, workers, pipeline, test), []).append(result)
                    print("    P=%-2d %-8s %10.0f req/s  p50 %s  p99 %s  cpu %s us/req (%s system)" % (
                        pipeline, test, result["rps"], _ms(result["p50_ms"]), _ms(result["p99_ms"]),
                        _cpu(result["cpu_us_per_req"]), _share(result["cpu_system_share"])), flush=True)
    finally:
        for entry in live:
            if entry[3] is not None:
                running.stop(entry[3])
        for server in servers:
            running.stop(server)
    for (target, workers, pipeline, test), runs_ in samples.items():
        if (target, workers) in failed:
            continue  # a target that failed midway has no comparable median
        median = sorted(runs_, key=lambda r: r["rps"])[len(runs_) // 2]
        # CPU per request is a median of its own: the run with the median rate need not have it.
        cpus = sorted(r["cpu_us_per_req"] for r in runs_ if r["cpu_us_per_req"] is not None)
        results.append(dict(median, protocol=protocol, target=target, workers=workers, pipeline=pipeline,
                            test=test, samples=[r["rps"] for r in runs_],
                            cpu_us_per_req=cpus[len(cpus) // 2] if cpus else None,
                            cpu_samples=[r["cpu_us_per_req"] for r in runs_]))
    for (target, workers), error in failed.items():
        results.append({"protocol": protocol, "target": target, "workers": workers, "pipeline": None,
                        "test": "-", "rps": None, "p50_ms": None, "p99_ms": None, "error": error})


def _raise(error):
    raise error


def add_ratios(results):
    """
    Each proxy (and direct) row gets its ratio of requests/s to nutcracker's row of
    the same load, and a proxy row its CPU per request as a ratio to nutcracker's;
    a proxy row its goals.
    """
    base = {(r["protocol"], r["test"], r["pipeline"]): r for r in results
            if r["target"] == "nutcracker" and r["rps"]}
    for r in results:
        nut = base.get((r["protocol"], r["test"], r["pipeline"]))
        r["ratio"] = round(r["rps"] / nut["rps"], 3) if nut and r["rps"] else None
        if r["target"] in TARGETS and r["ratio"] is not None:
            r["goal"] = TARGETS[r["target"]][0 if r["pipeline"] > 1 else 1]
            r["pass"] = r["ratio"] >= r["goal"]
        nut_cpu = nut.get("cpu_us_per_req") if nut else None
        cpu = r.get("cpu_us_per_req")
        r["cpu_ratio"] = round(cpu / nut_cpu, 3) if cpu is not None and nut_cpu else None
        if r["target"] in CPU_TARGETS and r["cpu_ratio"] is not None:
            r["cpu_goal"] = CPU_TARGETS[r["target"]]
            r["cpu_pass"] = r["cpu_ratio"] <= r["cpu_goal"]


def ceilings(results):
    """
    Per protocol and pipelining, the direct row with the lowest ratio to
    nutcracker (the tightest ceiling), with the goals of the proxies in
    C{results} (all of L{TARGETS} if none ran) that exceed it:
    [{protocol, pipeline, test, ratio, goals: {target: goal}}], goals possibly empty.
    """
    ran = {r["target"] for r in results if r["target"] in TARGETS} or set(TARGETS)
    lowest = {}
    for r in results:
        if r["target"] == DIRECT and r.get("ratio") is not None:
            key = (r["protocol"], r["pipeline"])
            if key not in lowest or r["ratio"] < lowest[key]["ratio"]:
                lowest[key] = r
    out = []
    for (protocol, pipeline), r in lowest.items():
        goals = {t: TARGETS[t][0 if pipeline > 1 else 1] for t in sorted(ran)}
        out.append({"protocol": protocol, "pipeline": pipeline, "test": r["test"], "ratio": r["ratio"],
                    "goals": {t: g for t, g in goals.items() if g > r["ratio"]}})
    return out


def ceiling_lines(ceilings_) -> list:
    """One line per ceiling that some goal exceeds."""
    # Rounded down: "reaches 1.50x" next to a 1.5x goal it misses would read as a contradiction.
    return ["ceiling: no proxy at all reaches %.2fx nutcracker (%s P%d %s); %s cannot be met on this machine" % (
        math.floor(c["ratio"] * 100) / 100, c["protocol"], c["pipeline"], c["test"],
        " and ".join("the %s goal >=%.1fx" % (t, g) for t, g in c["goals"].items()))
        for c in ceilings_ if c["goals"]]


def _ms(value):
    return "-" if value is None else "%.3f" % value


def _cpu(value):
    return "-" if value is None else "%.2f" % value


def _share(value):
    return "-" if value is None else "%.0f%%" % (100 * value)


def _pass(r, key):
    return ("PASS" if r[key] else "FAIL") if key in r else ""


def table(results) -> str:
    """The results as a text table; failed targets are listed under it, then the ceilings goals exceed."""
    head = ("protocol", "test", "pipe", "target", "w", "req/s", "spread", "p50 ms", "p99 ms",
            "x nutcracker", "goal", "", "cpu us/req", "cpu x nut", "goal", "")
    lines = []
    errors = []
    for r in results:
        if r["rps"] is None:
            errors.append("%s %s w=%s FAILED (%s)" % (r["protocol"], r["target"], r["workers"], r["error"]))
            continue
        approx = "~" if r.get("approx_latency") else ""
        samples = r.get("samples") or [r["rps"]]
        spread = "" if len(samples) < 2 else "%.0f%%" % (100.0 * (max(samples) - min(samples)) / r["rps"])
        if r["target"] == "nutcracker":
            ratio = cpu_ratio = "-"
        else:
            ratio = "n/a" if r["ratio"] is None else "%.2f" % r["ratio"]
            cpu_ratio = "-" if r.get("cpu_ratio") is None else "%.2f" % r["cpu_ratio"]
        lines.append((
            r["protocol"], r["test"], "P%d" % r["pipeline"], r["target"],
            "-" if r["target"] in ("nutcracker", DIRECT) else str(r["workers"]),
            "%.0f" % r["rps"], spread, approx + _ms(r["p50_ms"]), approx + _ms(r["p99_ms"]),
            ratio, ">=%.1f" % r["goal"] if "goal" in r else "", _pass(r, "pass"),
            _cpu(r.get("cpu_us_per_req")), cpu_ratio, "<=%.1f" % r["cpu_goal"] if "cpu_goal" in r else "",
            _pass(r, "cpu_pass"),
        ))
    widths = [max(len(row[i]) for row in [head] + lines) for i in range(len(head))]
    right = {5, 6, 7, 8, 9, 12, 13}

    def fmt(row):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt(head), fmt(tuple("-" * w for w in widths))] + [fmt(row) for row in lines] + errors
                     + ceiling_lines(ceilings(results)))


def parse_args(argv):
    parser = argparse.ArgumentParser(description="twistedproxy (PyPy, CPython) against nutcracker, same load.")
    parser.add_argument("--quick", action="store_true", help="%d requests per run instead of %d" % (
        QUICK_REQUESTS, FULL_REQUESTS))
    parser.add_argument("-n", "--requests", type=int, help="requests per measured run (overrides --quick)")
    parser.add_argument("--repeat", type=int, help="measured rounds per target, median kept (default 3; 1 with --quick)")
    parser.add_argument("--pin", action="store_true",
                        help="each target (its processes) on the last CPU, the backends, load tools and this"
                             " script on the others: no target shares its core")
    parser.add_argument("--protocol", choices=("redis", "memcache", "all"), default="all")
    parser.add_argument("--workers", default="0",
                        help="comma-separated worker counts for the proxy's global: worker_processes (default 0)")
    parser.add_argument("--pypy", help="PyPy venv directory or interpreter")
    parser.add_argument("--cpython", help="CPython venv directory or interpreter")
    parser.add_argument("--only", default="pypy,cpython", help="which proxies to run: pypy,cpython (default both)")
    parser.add_argument("--mc-loader", choices=MC_LOADERS, default="memaslap",
                        help="unpipelined memcached load: memaslap (default), bench/mcload.py or bench/latgen.c")
    parser.add_argument("--mc-pipelined-loader", choices=MC_PIPELINED_LOADERS, default="latgen",
                        help="pipelined memcached load: bench/latgen.c's batch mode (default) or bench/mcload.py")
    parser.add_argument("--no-direct", action="store_true",
                        help="skip the baseline straight against one backend with no proxy (the ceiling)")
    parser.add_argument("--baseline", help="another checkout (e.g. git archive main | tar -x -C DIR) whose code "
                        "runs as the targets pypy@base and cpython@base, interleaved with this one's (A/B)")
    parser.add_argument("--results", default=os.path.join(HERE, "results"), help="where the JSON goes")
    args = parser.parse_args(argv)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.requests = args.requests or (QUICK_REQUESTS if args.quick else FULL_REQUESTS)
    try:
        args.workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        parser.error("--workers takes numbers like 0 or 0,2")
    args.only = [name for name in args.only.split(",") if name]
    return args


def _git_state() -> str:
    """The commit measured, and whether the work tree had changes (read-only git)."""
    try:
        head = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                       stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                        text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def save_results(directory, prefix, doc) -> str:
    """C{doc} as JSON in C{directory} (made if missing), named C{prefix} and the time; its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, prefix + time.strftime("%Y%m%d-%H%M%S") + ".json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
    return path


def _terminate(signum, frame):
    raise KeyboardInterrupt()


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _terminate)
    ensure_tools()
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            raise SystemExit("--pin needs two CPUs")
        # From now on this script and what it starts (backends, load tools) stay off the target's CPU.
        os.sched_setaffinity(0, cpus[:-1])
        args.pin = {cpus[-1]}
    pythons = {}
    if "pypy" in args.only:
        pythons["pypy"] = find_python("pypy", args.pypy, "/tmp/vpy")
    if "cpython" in args.only:
        pythons["cpython"] = find_python("cpython", args.cpython, "/tmp/vcp")
    if args.baseline:
        args.baseline = os.path.abspath(args.baseline)
        for name in list(pythons):
            pythons[name + BASE] = pythons[name]
    # bench/mcload.py is Python: PyPy runs it about twice as fast.
    args.loader_python = shutil.which("pypy3") or pythons.get("pypy") or sys.executable
    protocols = ["redis", "memcache"] if args.protocol == "all" else [args.protocol]
    meta = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "requests": args.requests, "clients": CLIENTS,
        "pipeline": PIPELINE, "keyspace": KEYSPACE, "repeat": args.repeat, "workers": args.workers, "quick": args.quick,
        "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(),
        "interpreters": {name: {"python": py, "version": describe(py)} for name, py in pythons.items()},
        "nutcracker": subprocess.run(["nutcracker", "-V"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True).stdout.strip(),
        "git": _git_state(), "baseline": args.baseline, "pinned_target_cpus": sorted(args.pin or ()),
        "memcache_unpipelined_loader": args.mc_loader, "memcache_pipelined_loader": args.mc_pipelined_loader,
        "mcload_python": args.loader_python if "mcload" in (args.mc_loader, args.mc_pipelined_loader) else None,
    }
    print("==> %d requests/run, %d clients, -r %d, pipelined P=%d and unpipelined; %s" % (
        args.requests, CLIENTS, KEYSPACE, PIPELINE,
        ", ".join("%s: %s" % (k, v["version"]) for k, v in meta["interpreters"].items())), flush=True)
    running = Running()
    results = []
    try:
        for protocol in protocols:
            bench_protocol(running, protocol, args, pythons, results)
    except KeyboardInterrupt:
        print("\ninterrupted; stopping every process", file=sys.stderr)
        return 130
    except BenchError as e:
        print("bench: %s" % (e,), file=sys.stderr)
        return 1
    finally:
        running.stop_all()
    add_ratios(results)
    meta["loadavg_end"] = os.getloadavg()
    path = save_results(args.results, "", {"meta": meta, "results": results, "ceilings": ceilings(results)})
    print()
    print(table(results))
    print("\nspread = (max - min) / median of the %d measured rounds; ~ = read off memaslap's log2 histogram;"
          % (args.repeat,))
    print("cpu us/req = user + system CPU of the target's processes (/proc/PID/stat of it and its workers)")
    print("             over the run, divided by the run's requests (set and get together);")
    print("cpu x nut = the CPU per request / nutcracker's;")
    if not args.no_direct:
        print("direct = the same load straight against one backend, no proxy: the ceiling no proxy can beat here.")
    if "memcache" in protocols:
        print("memcache load: %s pipelined, %s unpipelined (--mc-pipelined-loader, --mc-loader)." % (
            args.mc_pipelined_loader, args.mc_loader))
    print("Results: %s" % (os.path.relpath(path),))
    return 0


if __name__ == "__main__":
    sys.exit(main())
