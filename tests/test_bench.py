"""
The benchmarks run: bench/latency.py in its shortest form against a real
backend and the proxy.  Smoke tests only: the figures are the bench's business,
never the suite's (nothing here is timed).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import platform
import socket
import subprocess
import sys

import pytest
from pymemcache.client.base import Client as MemcacheClient

from tests.support.processes import HOST, ROOT

pytestmark = pytest.mark.integration

PERCENTILES = ("p50", "p90", "p99", "p999", "max")


def _bench_run():
    """bench/run.py as a module (the bench is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_run", os.path.join(ROOT, "bench", "run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_latency_shortest_run(tmp_path):
    """
    One round of one second at 1000/s, direct, the floor (bench/floor.py) and
    the proxy on this interpreter, after a cold round on a fresh start: the
    table has the percentile and added-latency columns, and every figure is
    positive and ordered.
    """
    name = "pypy" if platform.python_implementation() == "PyPy" else "cpython"
    argv = [sys.executable, os.path.join(ROOT, "bench", "latency.py"), "--protocol", "redis",
            "--targets", "direct,floor-%s,%s" % (name, name), "--%s" % (name,), sys.executable, "--workers", "0",
            "--rounds", "1", "--seconds", "1", "--rates", "1000", "--fractions", "", "--warmup", "1000",
            "--results", str(tmp_path)]
    out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stdout
    header = [line for line in out.stdout.splitlines() if line.startswith("protocol ")]
    assert header, out.stdout
    for column in ("p50", "p90", "p99", "p99.9", "max", "+p50", "+p99", "+max", "cold"):
        assert column in header[0].split(), header[0]
    [path] = glob.glob(str(tmp_path / "latency-*.json"))
    with open(path) as f:
        doc = json.load(f)
    assert doc["meta"]["git"]
    rows = {(r["target"], r.get("rate")): r for r in doc["results"]}
    assert "error" not in str(doc["results"]), doc["results"]
    assert {(t, 1000) for t in ("direct", "floor-" + name, name, "generator")} <= set(rows), sorted(rows)
    for row in rows.values():
        for stats in [row["overall"]] + ([row["cold"]] if row["cold"] else []):
            assert stats["n"] == 1000
            assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["p999"] <= stats["max"], stats
    for target in ("direct", "floor-" + name, name):
        assert rows[(target, 1000)]["cold"], target
    for target in ("floor-" + name, name):
        assert set(rows[(target, 1000)]["added"]) == set(PERCENTILES) == set(rows[(target, 1000)]["cold_added"])


def test_cluster_bench_shortest_run(tmp_path):
    """
    bench/cluster.py's shortest run on this interpreter: every target (the cluster
    pool, the hash pool and redis-benchmark --cluster straight to the cluster) has
    a row for SET and GET, pipelined and not, with the CPU figures it measures.
    """
    name = "pypy" if platform.python_implementation() == "PyPy" else "cpython"
    argv = [sys.executable, os.path.join(ROOT, "bench", "cluster.py"), "-n", "3000", "--repeat", "1",
            "--only", name, "--%s" % (name,), sys.executable, "--results", str(tmp_path)]
    out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stdout
    [path] = glob.glob(str(tmp_path / "cluster-*.json"))
    with open(path) as f:
        rows = json.load(f)["results"]
    targets = {"cluster direct", name + " cluster pool", name + " hash pool"}
    assert {(r["target"], r["pipeline"], r["test"]) for r in rows} == {
        (t, p, test) for t in targets for p in (16, 1) for test in ("set", "get")}
    for row in rows:
        assert row["rps"] > 0 and row["servers_us"] >= 0 and row["tool_us"] >= 0
        assert (row["proxy_us"] is None) == (row["target"] == "cluster direct")


@pytest.mark.parametrize("protocol", ["redis", "memcache"])
@pytest.mark.parametrize("pipeline", ["1", "16"])
def test_core_path_bench_shortest_run(protocol, pipeline):
    """bench/corepath.py (the core's work per request, in memory) runs and answers every request."""
    argv = [sys.executable, os.path.join(ROOT, "bench", "corepath.py"), "--protocol", protocol, "-P", pipeline,
            "--keys", "512", "-n", "1024", "--rounds", "1"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120, cwd=ROOT,
                         env=env)
    assert out.returncode == 0, out.stdout
    assert "us/request" in out.stdout, out.stdout


def test_run_memcache_shortest_run(tmp_path):
    """
    bench/run.py's shortest memcached run on this interpreter with the default pipelined
    loader (latgen) and latgen unpipelined too: rows for nutcracker and the proxy at P16
    and P1 with their CPU per request, and the JSON says which loaders ran.
    """
    name = "pypy" if platform.python_implementation() == "PyPy" else "cpython"
    argv = [sys.executable, os.path.join(ROOT, "bench", "run.py"), "--protocol", "memcache", "--only", name,
            "--%s" % (name,), sys.executable, "--no-direct", "--quick", "-n", "3000", "--mc-loader", "latgen",
            "--results", str(tmp_path)]
    out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout
    assert "memcache load: latgen pipelined, latgen unpipelined" in out.stdout, out.stdout
    [path] = glob.glob(str(tmp_path / "*.json"))
    with open(path) as f:
        doc = json.load(f)
    assert (doc["meta"]["memcache_pipelined_loader"], doc["meta"]["memcache_unpipelined_loader"]) == (
        "latgen", "latgen")
    assert doc["meta"]["mcload_python"] is None
    rows = {(r["target"], r["pipeline"]): r for r in doc["results"]}
    assert set(rows) == {(t, p) for t in ("nutcracker", name) for p in (16, 1)}, doc["results"]
    for row in rows.values():
        assert row["test"] == "set+get" and row["rps"] > 0 and row["cpu_us_per_req"] is not None, row


def test_run_takes_the_pipelined_memcached_loader():
    """--mc-pipelined-loader picks latgen (the default) or mcload; nothing else."""
    run = _bench_run()
    assert run.parse_args([]).mc_pipelined_loader == "latgen"
    assert run.parse_args(["--mc-pipelined-loader", "mcload"]).mc_pipelined_loader == "mcload"
    assert run.parse_args(["--mc-loader", "latgen"]).mc_loader == "latgen"
    with pytest.raises(SystemExit):
        run.parse_args(["--mc-pipelined-loader", "memaslap"])


@pytest.mark.parametrize("loader", ["latgen", "mcload"])
@pytest.mark.parametrize("pipeline", [1, 16])
def test_memcached_loaders_send_the_same_load(memcached_backends, loader, pipeline):
    """
    bench/run.py's memcached load from either tool (bench/latgen.c's batch mode or
    bench/mcload.py): 2000 requests over 50 connections (40 each: the last batch of 16 is
    not full) all answered, half of them sets and half gets, as memcached counts them.
    """
    run = _bench_run()
    [server] = memcached_backends(1)
    load = run.Load("memcache", 2000, True, sys.executable, loader, loader)
    result = load.run(server.port, pipeline, 2000)
    assert set(result) == {"set+get"}
    assert result["set+get"]["rps"] > 0
    assert 0 < result["set+get"]["p50_ms"] <= result["set+get"]["p99_ms"]
    stats = MemcacheClient((HOST, server.port), timeout=10).stats()
    assert (stats[b"cmd_set"], stats[b"cmd_get"]) == (1000, 1000)


def test_latgen_batch_fails_on_error_replies_and_unanswered_requests():
    """A batch run's JSON with an error reply, or fewer answers than requests, fails the run."""
    run = _bench_run()
    line = {"requests": 100, "seconds": 0.1, "rps": 1000.0, "p50_ms": 1.0, "p99_ms": 2.0, "errors": 0}
    assert run._set_get_result("latgen", json.dumps(line), 100) == {
        "set+get": {"rps": 1000.0, "p50_ms": 1.0, "p99_ms": 2.0}}
    with pytest.raises(run.BenchError, match="1 error replies"):
        run._set_get_result("latgen", json.dumps(dict(line, errors=1)), 100)
    with pytest.raises(run.BenchError, match="99 of 100 requests answered"):
        run._set_get_result("latgen", json.dumps(dict(line, requests=99)), 100)


def _memcached_requests(conn, count):
    """Read from C{conn} until it has sent C{count} whole get/set requests: [(command, key)]."""
    data = b""
    while True:
        lines = data.split(b"\r\n")[:-1]
        requests = [line.split()[:2] for line in lines if line[:4] in (b"get ", b"set ")]
        sets = sum(1 for command, _ in requests if command == b"set")
        if len(requests) >= count and len(lines) == len(requests) + sets:
            assert len(requests) == count, data
            assert all(line == b"vvv" for line in lines if line[:4] not in (b"get ", b"set ")), data
            return requests
        chunk = conn.recv(4096)
        assert chunk, data
        data += chunk


def test_latgen_batch_sends_depth_requests_then_waits():
    """
    latgen batch against a listener that plays memcached: each connection sends
    DEPTH requests at once and nothing more until all their replies are in; the
    requests are a SET and a GET in turn on key:%012d keys; the JSON counts them.
    """
    run = _bench_run()
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(8)
    argv = [run.build_generator(), "batch", HOST, str(listener.getsockname()[1]), "memcache", "2", "1000", "12", "3"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        conns = [listener.accept()[0] for _ in range(2)]
        sent = []
        for _ in range(2):
            for conn in conns:
                conn.settimeout(30)
                batch = _memcached_requests(conn, 3)
                conn.settimeout(0.2)  # an absence, not a timing: anything more would be a 4th request in flight
                with pytest.raises(socket.timeout):
                    conn.recv(4096)
                conn.sendall(b"".join(b"STORED\r\n" if command == b"set" else b"END\r\n" for command, _ in batch))
                sent += batch
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        listener.close()
    assert proc.returncode == 0, err
    assert sorted(command for command, _ in sent) == [b"get"] * 6 + [b"set"] * 6
    assert all(key.startswith(b"key:") and len(key) == 16 and int(key[4:]) < 1000 for _, key in sent), sent
    result = json.loads(out)
    assert (result["requests"], result["errors"], result["lost"], result["misses"]) == (12, 0, 0, 6), result
    for conn in conns:
        conn.close()


def test_the_targets_tree_is_what_cpu_and_pinning_cover():
    """run.py's process tree (CPU per request, --pin): a process and its descendants, nobody else's."""
    run = _bench_run()
    procs = {1: [b"S", b"0"], 10: [b"S", b"1"], 11: [b"S", b"10"], 12: [b"S", b"11"], 20: [b"S", b"1"]}
    assert sorted(run._tree(10, procs)) == [10, 11, 12]
    assert run._tree(99, procs) == []
    if not hasattr(os, "sched_getaffinity"):
        return  # PyPy 3.9 has no sched_*affinity; the bench runs under CPython
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        mine = os.sched_getaffinity(0)
        cpu = {sorted(mine)[-1]}
        assert child.pid in run._tree(os.getpid(), run._processes())
        run.pin_tree(child.pid, cpu)
        assert os.sched_getaffinity(child.pid) == cpu and os.sched_getaffinity(0) == mine
    finally:
        child.kill()
        child.wait()


def test_iterlog_lists_long_iterations_with_the_sections_inside(tmp_path):
    """bench/iterlog.py on a PyPy log of three marked iterations: the long one, with the sections inside it."""
    def at(ms):  # the log's clock: ticks, here 1 GHz from 1e9
        return "[%x]" % int(1e9 + ms * 1e6)

    log = tmp_path / "pypylog"
    log.write_text("\n".join([
        at(0) + " {tp-iter", "1 100.0", at(0.2) + " tp-iter}",
        at(0.2) + " {tp-iter", "3 100.0002",
        at(0.5) + " {jit-tracing", at(2.0) + " {jit-backend", at(3.0) + " jit-backend}", at(4.0) + " jit-tracing}",
        at(4.2) + " {gc-minor", at(4.5) + " gc-minor}",
        at(5.0) + " tp-iter}",
        at(5.0) + " {tp-iter", "2 100.005", at(5.1) + " tp-iter}",
    ]) + "\n")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "iterlog.py"), str(log), "--ms", "1"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    # Sections directly in the iteration, each counted once (the compile inside the trace is the trace's).
    assert out == ["100.000200    4.80ms events=3 jit-tracing=3.50 gc-minor=0.30"]
