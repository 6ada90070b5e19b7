"""Migration records and counters in /stats.json, /status and Prometheus (from a merged snapshot)."""

from __future__ import annotations

from twistedproxy.stats import prometheus, snapshots, status

RECORD = {"pool": "alpha", "id": "alpha-1", "state": "moving", "aborting": False, "error": None,
          "source": ["127.0.0.1:7001", "127.0.0.1:7002"], "target": ["127.0.0.1:7001", "127.0.0.1:7002",
                                                                      "127.0.0.1:7003"],
          "removed": [], "scanned": 120, "moved": 40, "skipped": 2, "failed": 1, "bytes": 4096, "rate": 12.5,
          "eta_seconds": 30.0, "started": 1000.0, "finished": None, "drained": []}


def merged():
    snap = {"pids": [1], "workers": 1, "started": 900.0, "time": 1010.0, "total_connections": 0,
            "curr_connections": 0, "slowlog_seen": 0,
            "pools": {"alpha": {"latency": {}, "commands": {}, "servers": {}, "migrate_on_access": 7,
                                "migrate_held": 3}}}
    out = snapshots.merge([snap, dict(snap, pids=[2])])
    out["migrations"] = {"alpha": RECORD}
    return out


def test_records_in_stats_json_and_the_status_page():
    doc = snapshots.report(merged(), now=1010.0)
    assert doc["migrations"] == {"alpha": RECORD}
    assert "migrate_on_access" not in doc["alpha"]  # the twemproxy document keeps its fields
    page = status.render(merged(), now=1010.0)
    assert "<h2>Migrations</h2>" in page and "moving" in page and "2 &rarr; 3" in page
    assert "<h2>Migrations</h2>" not in status.render(dict(merged(), migrations={}), now=1010.0)


def test_prometheus_families():
    text = prometheus.render(merged(), 1010.0).decode("utf-8")
    assert 'twistedproxy_migration_keys_total{pool="alpha",what="moved"} 40.0' in text
    assert 'twistedproxy_migration_keys_total{pool="alpha",what="failed"} 1.0' in text
    assert 'twistedproxy_migration_bytes_total{pool="alpha"} 4096.0' in text
    assert 'twistedproxy_migration_state{pool="alpha",state="moving"} 1.0' in text
    assert 'twistedproxy_migration_state{pool="alpha",state="done"} 0.0' in text
    assert 'twistedproxy_migration_eta_seconds{pool="alpha"} 30.0' in text
    assert 'twistedproxy_migrate_on_access_total{pool="alpha"} 14.0' in text  # summed over two workers
    assert 'twistedproxy_migrate_held_total{pool="alpha"} 6.0' in text
