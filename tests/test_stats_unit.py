"""
Statistics without processes: the recorders as the core feeds them (driven
through a memory reactor and string transports, with a controlled clock), the
HDR layout, merging across workers, the twemproxy document and tuning.
"""

from __future__ import annotations

import json
import random

import pytest
from hdrh.histogram import HdrHistogram
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from twistedproxy.api import Proxy
from twistedproxy.config.settings import TuningError
from twistedproxy.stats import merge, snapshot
from twistedproxy.stats import histogram as histogram_module
from twistedproxy.stats.workers import warm_up_answers, worker_snapshot
from twistedproxy.stats.histogram import (
    EMPTY,
    HIGHEST_US,
    PERCENTILES,
    Latency,
    bucket_index,
    merge_hist,
    new_hdr,
    summarize,
    with_encoded,
)
from twistedproxy.stats.recorder import SlowLog
from twistedproxy.stats.snapshots import POOL_FIELDS, SERVER_FIELDS, twemproxy_document


def make_proxy(**pool_keys):
    pool = {"listen": "127.0.0.1:1", "redis": True, "servers": ["127.0.0.1:7001:1", "127.0.0.1:7002:1"]}
    pool.update(pool_keys)
    return Proxy.from_dict({"alpha": pool, "global": {"slowlog_threshold": 0.02}}, MemoryReactorClock())


class Harness:
    """One client of pool alpha, and the memory reactor's server connections made on demand."""

    def __init__(self, proxy):
        self.proxy = proxy
        self.reactor = proxy.reactor
        self.client = proxy.factories["alpha"].buildProtocol(None)
        self.client_transport = StringTransport()
        self.client.makeConnection(self.client_transport)
        self.servers = {}  # port -> (protocol, transport)

    def connect_servers(self):
        for host, port, factory, _, _ in self.reactor.tcpClients:
            if port not in self.servers:
                conn = factory.buildProtocol(None)
                transport = StringTransport()
                conn.makeConnection(transport)
                self.servers[port] = (conn, transport)

    def send(self, data: bytes):
        self.client.dataReceived(data)
        self.connect_servers()
        self.reactor.advance(0)  # the end of the reactor turn: batched writes go out

    def reply(self, port: int, data: bytes):
        self.servers[port][0].dataReceived(data)
        self.reactor.advance(0)

    def server_for(self, key: bytes) -> int:
        return self.proxy.pools["alpha"].server_for(key).spec.port


def test_latency_layout_is_hdrhistogram():
    ours, theirs = Latency(), new_hdr()
    rng = random.Random(7)
    values = [rng.randint(0, 5000000) for _ in range(3000)] + [0, 1, 255, 256, HIGHEST_US]
    for us in values:
        ours.record(us / 1000000.0)
        theirs.record_value(us)
    assert ours.counts == list(theirs.counts)
    summary = summarize(ours.export())
    for p in PERCENTILES:
        assert summary["p%g" % p] == round(min(theirs.get_value_at_percentile(p), max(values)) / 1000.0, 3)
    assert summary["max"] == max(values) / 1000.0
    assert summary["count"] == len(values)


def test_merge_adds_histograms_not_averages():
    # Worker 1 saw 900 fast requests, worker 2 saw 100 slow ones: the merged
    # p95 is slow, whereas an average of the two workers' p95 would not be.
    a, b, both = Latency(), Latency(), HdrHistogram(1, HIGHEST_US, 2)
    for _ in range(900):
        a.record(0.001)
        both.record_value(1000)
    for _ in range(100):
        b.record(0.2)
        both.record_value(200000)
    exported = json.loads(json.dumps([a.export(), b.export()]))  # as sent over AMP
    merged = summarize(merge_hist(exported))
    assert merged["count"] == 1000
    assert merged["p50"] == both.get_value_at_percentile(50) / 1000.0
    assert merged["p95"] == pytest.approx(200.0, rel=0.01)
    assert merged["avg"] == pytest.approx((900 * 1 + 100 * 200) / 1000.0)


def test_an_export_lists_the_non_empty_buckets_and_builds_no_hdrhistogram(monkeypatch):
    """
    A worker exports whenever its master collects (every -i ms) in the middle
    of its traffic: only its non-empty buckets, with no HdrHistogram built or
    encoded there (on PyPy that took 5-17 ms per collection).
    """
    latency = Latency()
    for us in (3, 3, 200, 70000):
        latency.record_us(us)
    monkeypatch.setattr(histogram_module, "HdrHistogram", None)  # any use of the package fails
    exported = latency.export()
    assert exported == {
        "count": 4,
        "sum": 70206,
        "max": 70000,
        "buckets": [bucket_index(3), 2, bucket_index(200), 1, bucket_index(70000), 1],
    }
    assert Latency().export() == {"count": 0, "sum": 0, "max": 0}
    assert merge_hist([exported, None, Latency().export()]) == exported


def test_totals_from_an_older_master_are_read_and_merged():
    """
    An older master hands its totals on in a binary upgrade with each histogram
    encoded whole ("hdr"): they merge with the new form bucket by bucket.
    """
    old = new_hdr()
    for us in (100, 100, 5000):
        old.record_value(us)
    encoded = old.encode()
    legacy = {"count": 3, "sum": 5200, "max": 5000, "hdr": encoded.decode("ascii") if isinstance(encoded, bytes) else encoded}
    current = Latency()
    current.record_us(100)
    merged = merge_hist([legacy, current.export()])
    assert merged == {"count": 4, "sum": 5300, "max": 5000,
                      "buckets": [bucket_index(100), 3, bucket_index(5000), 1]}
    assert summarize(legacy)["p50"] == summarize({"count": 3, "sum": 5200, "max": 5000,
                                                  "buckets": [bucket_index(100), 2, bucket_index(5000), 1]})["p50"]


def test_the_totals_handed_on_carry_the_encoded_form_an_older_heir_reads():
    latency = Latency()
    for us in (100, 100, 5000):
        latency.record_us(us)
    totals = {"pools": {"alpha": {"latency": {"total": latency.export(), "proxy": dict(EMPTY)}, "client_eof": 2}}}
    handed = json.loads(json.dumps(with_encoded(totals)))
    total = handed["pools"]["alpha"]["latency"]["total"]
    assert list(HdrHistogram.decode(total["hdr"]).counts) == latency.counts  # as an older master decodes it
    assert total["buckets"] == latency.export()["buckets"] and handed["pools"]["alpha"]["client_eof"] == 2
    assert handed["pools"]["alpha"]["latency"]["proxy"] == EMPTY


def test_warming_up_the_stats_answer_leaves_the_statistics_as_they_were():
    proxy = make_proxy()
    before = worker_snapshot(proxy, 3)
    warm_up_answers(lambda: worker_snapshot(proxy, 3), rounds=2)
    assert worker_snapshot(proxy, 3) == before


def test_core_feeds_the_recorders_exactly():
    proxy = make_proxy(timeout=400)
    h = Harness(proxy)
    clock = proxy.reactor
    key_a = b"a"
    port_a = h.server_for(key_a)
    other = [k for k in (b"%d" % i for i in range(100)) if h.server_for(k) != port_a][0]
    port_b = h.server_for(other)

    # A GET answered after exactly 50 ms of backend time and 0 ms in the proxy.
    h.send(b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n")
    clock.advance(0.050)
    h.reply(port_a, b"$1\r\nx\r\n")
    assert h.client_transport.value() == b"$1\r\nx\r\n"

    # An MGET over both servers: two fragments, replies 10 ms and 30 ms late.
    h.send(b"*3\r\n$4\r\nMGET\r\n$1\r\na\r\n$%d\r\n%s\r\n" % (len(other), other))
    clock.advance(0.010)
    h.reply(port_a, b"*1\r\n$1\r\nx\r\n")
    clock.advance(0.020)
    h.reply(port_b, b"*1\r\n$-1\r\n")

    # A GET that times out (400 ms): the late reply is counted, the client got an error.
    h.send(b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n")
    clock.advance(0.400)
    clock.advance(0.100)
    h.reply(port_a, b"$1\r\nx\r\n")

    stats = snapshot(proxy)
    pool = stats["pools"]["alpha"]
    server_a = pool["servers"]["127.0.0.1:%d" % port_a]
    server_b = pool["servers"]["127.0.0.1:%d" % port_b]
    assert (server_a["requests"], server_a["responses"]) == (3, 3)
    assert (server_b["requests"], server_b["responses"]) == (1, 1)
    get_frame, fragment_frame = b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n", b"*2\r\n$4\r\nmget\r\n$1\r\na\r\n"
    assert server_a["request_bytes"] == 2 * len(get_frame) + len(fragment_frame)
    assert server_a["server_timedout"] == 1
    assert pool["fragments"] == 2
    assert pool["forward_error"] == 1

    get = summarize(pool["commands"]["get"]["total"])
    assert get["count"] == 2
    assert get["max"] == 400.0  # the timed-out one, answered at the deadline
    assert summarize(pool["commands"]["get"]["backend"])["max"] == 50.0
    mget = pool["commands"]["mget"]
    assert summarize(mget["total"])["max"] == 30.0
    assert summarize(mget["backend"])["max"] == 30.0  # first fragment sent .. last reply
    assert summarize(pool["latency"]["proxy"])["max"] == 0.0
    assert summarize(server_a["latency"])["count"] == 3
    assert summarize(server_a["latency"])["max"] == 500.0

    # The slow log (threshold 20 ms) has the three slow requests.
    entries = proxy.stats.slowlog.export()
    assert [(e["command"], e["key"], e["total_ms"]) for e in entries] == [
        ("get", "a", 50.0), ("mget", "a", 30.0), ("get", "a", 400.0)]
    assert entries[1]["server"] == "*" and entries[2]["error"]

    # Connection ends: a clean close is an eof, anything else an error.
    h.client.connectionLost(Failure(ConnectionDone()))
    conn, _ = h.servers[port_b]
    conn.connectionLost(Failure(ConnectionLost()))
    stats = snapshot(proxy)
    assert stats["pools"]["alpha"]["client_eof"] == 1
    assert stats["pools"]["alpha"]["servers"]["127.0.0.1:%d" % port_b]["server_err"] == 1

    # Two workers with this snapshot merge into twice the counts, same percentiles.
    wire = json.loads(json.dumps(stats))
    merged = merge([wire, wire])
    assert merged["workers"] == 2
    assert merged["pools"]["alpha"]["fragments"] == 4
    doc = twemproxy_document(merged)
    assert list(doc["alpha"])[:len(POOL_FIELDS)] == list(POOL_FIELDS)
    assert list(doc["alpha"]["127.0.0.1:%d" % port_a]) == list(SERVER_FIELDS)
    assert doc["alpha"]["127.0.0.1:%d" % port_a]["requests"] == 6
    assert summarize(merged["pools"]["alpha"]["commands"]["get"]["total"])["max"] == 400.0


def test_counters_survive_a_reload():
    proxy = make_proxy()
    h = Harness(proxy)
    h.send(b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n")
    h.reply(h.server_for(b"a"), b"$1\r\nx\r\n")
    proxy.reconfigure(proxy.config)
    pool = snapshot(proxy)["pools"]["alpha"]
    assert sum(s["requests"] for s in pool["servers"].values()) == 1
    assert pool["commands"]["get"]["total"]["count"] == 1


def test_slowlog_ring_is_bounded():
    proxy = make_proxy()
    proxy.stats.set_slowlog(threshold=0.0, max_len=5)
    h = Harness(proxy)
    for i in range(50):
        h.send(b"*2\r\n$3\r\nGET\r\n$2\r\nk%d\r\n" % (i % 10))
    h.client.connectionLost(Failure(ConnectionDone()))
    for port in list(h.servers):
        h.servers[port][0].connectionLost(Failure(ConnectionDone()))
    assert len(proxy.stats.slowlog.export()) == 0  # never written to the client: not finished
    ring = SlowLog(max_len=3)
    for i in range(100):
        request = type("R", (), {"server": None, "fragments": None, "keys": None, "key": b"k" * 500,
                                 "command": b"get", "failed": None})()
        ring.add(float(i), "alpha", request, 0.5, 0.25)
    entries = ring.export()
    assert [e["time"] for e in entries] == [97.0, 98.0, 99.0] and ring.seen == 100
    assert len(entries[0]["key"]) == 64


def test_tuning_applies_in_place_and_refuses_bad_values():
    from twistedproxy import logs

    proxy = make_proxy()
    h = Harness(proxy)
    before = proxy.settings()
    for bad in ({"slowlog_max_len": -1}, {"slowlog_max_len": 10 ** 9}, {"timeout": "soon"},
                {"client_max_pending": 0}, {"nope": 1}, {"slowlog_threshold": "nan"}):
        with pytest.raises(TuningError):
            proxy.tune(dict(bad, slowlog_threshold=1.0) if "slowlog_threshold" not in bad else bad)
        assert proxy.settings() == before
    level = logs.current_level()
    try:
        settings = proxy.tune({"slowlog_threshold": "0.25", "client_max_pending": "16", "timeout": 150,
                              "max_request_bytes": 4096, "slowlog_max_len": 7, "log_level": "debug"})
    finally:
        logs.set_level(level)
    assert settings["slowlog_threshold"] == 0.25 and settings["slowlog_max_len"] == 7
    assert settings["log_level"] == "debug"
    assert settings["pools"]["alpha"] == {"client_max_pending": 16, "max_request_bytes": 4096, "timeout": 150}
    assert h.client.max_pending == 16  # live clients too
    assert proxy.pools["alpha"].stats.slow_threshold == 0.25
    # The new timeout reaches live connections.
    h.send(b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n")
    proxy.reactor.advance(0.151)
    assert h.client_transport.value().startswith(b"-ERR")
    assert snapshot(proxy)["pools"]["alpha"]["forward_error"] == 1
