"""
The benchmarks run: bench/latency.py in its shortest form against a real
backend and the proxy.  Smoke tests only: the figures are the bench's business,
never the suite's (nothing here is timed).
"""

from __future__ import annotations

import glob
import json
import os
import platform
import subprocess
import sys

import pytest

from tests.support.processes import ROOT

pytestmark = pytest.mark.integration

PERCENTILES = ("p50", "p90", "p99", "p999", "max")


def test_latency_shortest_run(tmp_path):
    """
    One round of one second at 1000/s, direct and the proxy on this interpreter,
    after a cold round on a fresh start: the table has the percentile and
    added-latency columns, and every figure is positive and ordered.
    """
    name = "pypy" if platform.python_implementation() == "PyPy" else "cpython"
    argv = [sys.executable, os.path.join(ROOT, "bench", "latency.py"), "--protocol", "redis",
            "--targets", "direct," + name, "--%s" % (name,), sys.executable, "--workers", "0",
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
    assert {(t, 1000) for t in ("direct", name, "generator")} <= set(rows), sorted(rows)
    for row in rows.values():
        for stats in [row["overall"]] + ([row["cold"]] if row["cold"] else []):
            assert stats["n"] == 1000
            assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["p999"] <= stats["max"], stats
    assert rows[("direct", 1000)]["cold"] and rows[(name, 1000)]["cold"]
    assert set(rows[(name, 1000)]["added"]) == set(PERCENTILES) == set(rows[(name, 1000)]["cold_added"])


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
