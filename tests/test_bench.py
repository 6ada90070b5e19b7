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
