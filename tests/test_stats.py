"""
Statistics end to end, against real redis-server and nutcracker processes: the
stats port serves nutcracker's document with the same counts for the same
workload, latency percentiles of a backend slowed by a known amount are right
within HDR precision, the slow log catches exactly the slow requests, and
settings change at run time.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.support import processes
from tests.support.ctl import cacheproxyctl
from tests.support.processes import HOST, free_port, read_stats_port  # noqa: F401 (other tests import it here)

pytestmark = pytest.mark.integration

# A Lua busy loop that keeps redis-server busy for ARGV[1] microseconds.
BUSY = (
    "local t=redis.call('TIME') local s=t[1]*1000000+t[2] "
    "while true do local n=redis.call('TIME') "
    "if n[1]*1000000+n[2]-s >= tonumber(ARGV[1]) then break end end return 1"
)


def client(port):
    return redis.Redis(host=HOST, port=port, socket_timeout=10, protocol=2, lib_name=None, lib_version=None)


def http_get(port, path) -> bytes:
    with urllib.request.urlopen("http://%s:%d%s" % (HOST, port, path), timeout=10) as response:
        return response.read()


TOKEN = "s3cret-admin-token"


def http_post(port, path, fields, token=TOKEN) -> dict:
    body = urllib.parse.urlencode(fields).encode()
    request = urllib.request.Request("http://%s:%d%s" % (HOST, port, path), data=body)
    if token is not None:
        request.add_header("Authorization", "Bearer " + token)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def http_refusal(port, path, fields, token=None):
    """The HTTP error C{http_post} gets: (status, text of the body, headers)."""
    with pytest.raises(urllib.error.HTTPError) as e:
        http_post(port, path, fields, token)
    return e.value.code, e.value.read().decode(), e.value.headers


def poll(fetch, ready, timeout=10.0):
    """C{fetch()} until C{ready(result)}; the last result."""
    deadline = time.time() + timeout
    while True:
        result = fetch()
        if ready(result) or time.time() > deadline:
            return result
        time.sleep(0.05)


def server_total(doc, pool, field):
    return sum(v[field] for v in doc[pool].values() if isinstance(v, dict))


def start_proxy(spawn, pool, stats_http=True, **global_keys):
    port = free_port()
    stats_port = free_port()
    http_port = free_port()
    config = {"alpha": processes.pool_config(pool, port)}
    if stats_http:
        global_keys["stats_http"] = "%s:%d" % (HOST, http_port)
    if global_keys:
        config["global"] = global_keys
    proc = spawn(processes.proxy, config, port, extra_args=["-s", str(stats_port), "-a", HOST])
    processes.wait_for_port(stats_port, proc.proc)
    if stats_http:
        processes.wait_for_port(http_port, proc.proc)
    return port, stats_port, http_port


def spread_keys(ports, count=10):
    """C{count} keys the pool on C{ports} places on both servers (placement depends on the ports)."""
    from twisted.internet.testing import MemoryReactorClock

    from twistedproxy.api import build_pool
    from twistedproxy.config import config_from_dict

    config = config_from_dict({"alpha": processes.pool_config(ports, 1)})
    pool = build_pool(config.pools[0], MemoryReactorClock())
    keys = ["key:%d" % i for i in range(count)]
    n = count
    while len({pool.server_for(k.encode()) for k in keys}) < 2:
        keys[-1] = "key:%d" % n
        n += 1
    return keys


def workload(port, keys):
    """10 SET + 10 GET + one 10-key MGET: 22 server requests when the MGET spans 2 servers."""
    r = client(port)
    for key in keys:
        assert r.set(key, "value-" + key)
    for key in keys:
        assert r.get(key) == ("value-" + key).encode()
    assert r.mget(keys) == [("value-" + key).encode() for key in keys]
    r.close()


def test_stats_port_matches_nutcracker(spawn, redis_backends):
    backends = redis_backends(2)
    ports = [b.port for b in backends]
    port, stats_port, _ = start_proxy(spawn, ports, stats_http=False)

    nut_port, nut_stats = free_port(), free_port()
    nut_conf = processes.write_config({"alpha": processes.pool_config(ports, nut_port)})
    spawn(processes.Process, ["nutcracker", "-c", nut_conf, "-s", str(nut_stats), "-a", HOST, "-i", "50"], nut_port)

    keys = spread_keys(ports)
    workload(port, keys)
    workload(nut_port, keys)

    # (wait_for_port's probe was a client too)
    ours = poll(lambda: read_stats_port(stats_port), lambda d: d["alpha"]["client_eof"] == 2)
    theirs = poll(lambda: read_stats_port(nut_stats),
                  lambda d: server_total(d, "alpha", "responses") == 22 and d["alpha"]["client_eof"] == 2)

    # Same document shape at every level, so twemproxy's parsers read ours.
    assert set(ours) == set(theirs)
    assert ours["service"] == "nutcracker"
    assert set(ours["alpha"]) == set(theirs["alpha"])
    for label in theirs["alpha"]:
        if isinstance(theirs["alpha"][label], dict):
            assert list(ours["alpha"][label]) == list(theirs["alpha"][label])

    # The same counts for the same workload, server by server.
    assert server_total(ours, "alpha", "requests") == 22
    servers = [label for label, v in theirs["alpha"].items() if isinstance(v, dict)]
    assert len(servers) == 2
    for label in servers:
        mine, nut = ours["alpha"][label], theirs["alpha"][label]
        assert mine["requests"] > 0, "the MGET must span both servers"
        for field in ("requests", "responses", "request_bytes", "response_bytes", "server_eof", "server_err",
                      "server_timedout", "server_connections", "in_queue", "out_queue"):
            assert mine[field] == nut[field], (label, field, mine[field], nut[field])
    for field in ("client_eof", "client_err", "client_connections", "server_ejects", "forward_error"):
        assert ours["alpha"][field] == theirs["alpha"][field], field
    assert ours["total_connections"] == theirs["total_connections"]
    assert ours["curr_connections"] == theirs["curr_connections"]
    # nutcracker 0.5.0 never counts fragments; we count the MGET's two.
    assert ours["alpha"]["fragments"] == 2


def test_latency_slow_log_and_tuning(spawn, redis_backends):
    (backend,) = redis_backends(1)
    delay_ms = 60
    port, stats_port, http_port = start_proxy(spawn, [backend.port], slowlog_threshold=0.03, admin_token=TOKEN)
    r = client(port)
    for i in range(20):
        r.set("fast:%d" % i, "x")
        r.get("fast:%d" % i)
    seen_ms = []  # each busy EVAL's round trip as the client saw it: the proxy's figures lie within

    def busy_eval(key: str) -> None:
        """An EVAL that keeps the backend busy for C{delay_ms}, its round trip kept in C{seen_ms}."""
        started = time.monotonic()
        assert r.eval(BUSY, 1, key, delay_ms * 1000) == 1
        seen_ms.append((time.monotonic() - started) * 1000)

    for i in range(4):
        busy_eval("slow:%d" % i)
    # HDR keeps 2 significant digits: a value is recorded within 1% (a busy
    # loop overshoots its delay when the machine is busy, and so may its time).
    ceiling = max(seen_ms) * 1.01 + 1

    report = json.loads(http_get(http_port, "/stats.json"))
    pool = report["twistedproxy"]["pools"]["alpha"]
    evals = pool["commands"]["eval"]
    assert evals["total"]["count"] == 4
    for name in ("p50", "p90", "p99", "p99.9", "max"):
        assert delay_ms * 0.99 <= evals["total"][name] <= ceiling, (name, evals["total"], seen_ms)
        assert delay_ms * 0.99 <= evals["backend"][name] <= evals["total"]["max"], (name, evals["backend"])
    assert delay_ms * 0.99 <= evals["total"]["avg"] <= ceiling
    assert pool["commands"]["get"]["total"]["count"] == 20
    assert pool["commands"]["get"]["total"]["p50"] < 25
    label = "%s:%d" % (HOST, backend.port)
    server = pool["servers"][label]["latency"]
    assert server["count"] == 44
    assert delay_ms * 0.99 <= server["max"] <= ceiling
    assert pool["latency"]["total"]["count"] == 44
    assert pool["latency"]["proxy"]["count"] == 44
    assert pool["latency"]["proxy"]["p99"] < 25

    # The slow log has exactly the four slow requests, most recent first.
    entries = json.loads(http_get(http_port, "/slowlog"))
    assert [e["key"] for e in entries] == ["slow:3", "slow:2", "slow:1", "slow:0"]
    for entry in entries:
        assert entry["command"] == "eval" and entry["pool"] == "alpha" and entry["server"] == label
        assert entry["backend_ms"] >= delay_ms * 0.99
        assert entry["proxy_ms"] < entry["backend_ms"]
    assert len(json.loads(http_get(http_port, "/slowlog?limit=1"))) == 1

    # Raise the threshold at run time: the next slow request is not logged.
    answer = http_post(http_port, "/tune", {"slowlog_threshold": "0.5", "timeout": "2000"})
    (settings,) = answer["workers"]
    assert settings["slowlog_threshold"] == 0.5
    assert settings["pools"]["alpha"]["timeout"] == 2000
    busy_eval("slow:late")
    assert len(json.loads(http_get(http_port, "/slowlog"))) == 4
    # Refused values change nothing.
    with pytest.raises(urllib.error.HTTPError) as e:
        http_post(http_port, "/tune", {"slowlog_max_len": "-1"})
    assert e.value.code == 400
    # The new server timeout applies to live connections: a 2.5 s busy loop times out.
    with pytest.raises(redis.ResponseError):
        r.eval(BUSY, 1, "slow:timeout", 2500 * 1000)
    doc = poll(lambda: read_stats_port(stats_port), lambda d: d["alpha"][label]["server_timedout"] == 1)
    assert doc["alpha"][label]["server_timedout"] == 1
    assert doc["alpha"]["forward_error"] == 1
    r.close()

    # Prometheus: the same numbers, labelled by pool and server.
    families = {f.name: f for f in text_string_to_metric_families(http_get(http_port, "/metrics").decode())}
    requests = {tuple(sorted(s.labels.items())): s.value for s in families["cacheproxy_server_requests"].samples
                if s.name.endswith("_total")}
    assert requests[(("pool", "alpha"), ("server", label))] == doc["alpha"][label]["requests"]
    buckets = [s for s in families["cacheproxy_request_duration_seconds"].samples
               if s.labels.get("command") == "eval" and s.name.endswith("_bucket")]
    below = {s.labels["le"]: s.value for s in buckets}
    # The five 60-ms EVALs fall under 0.1 s (unless the machine stretched them past it, as
    # the client saw), the one that timed out above it.
    assert below["0.05"] == 0 and below["+Inf"] == 6
    assert sum(ms < 99 for ms in seen_ms) <= below["0.1"] <= 5, (below, seen_ms)


def test_tune_needs_the_admin_token(spawn, redis_backends, tmp_path):
    (backend,) = redis_backends(1)
    # No token configured: state-changing calls are off, and the answer says how to turn them on.
    _, _, http_port = start_proxy(spawn, [backend.port])
    code, text, _ = http_refusal(http_port, "/tune", {"slowlog_threshold": "0.5"})
    assert code == 403 and "admin_token" in text and "Authorization: Bearer" in text
    code, _, _ = http_refusal(http_port, "/tune", {"slowlog_threshold": "0.5"}, token="anything")
    assert code == 403
    settings = json.loads(http_get(http_port, "/stats.json"))["twistedproxy"]["settings"]
    assert settings["slowlog_threshold"] == 0.01  # unchanged
    # A token read from a file: a missing or wrong one is 401, the right one goes through.
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    _, _, http_port = start_proxy(spawn, [backend.port], admin_token_file=str(token_file))
    code, text, headers = http_refusal(http_port, "/tune", {"slowlog_threshold": "0.5"})
    assert code == 401 and "Bearer" in headers["www-authenticate"]
    code, _, _ = http_refusal(http_port, "/tune", {"slowlog_threshold": "0.5"}, token=TOKEN + "x")
    assert code == 401
    (settings,) = http_post(http_port, "/tune", {"slowlog_threshold": "0.5"})["workers"]
    assert settings["slowlog_threshold"] == 0.5
    # Reading stays open.
    assert http_get(http_port, "/metrics") and http_get(http_port, "/slowlog") == b"[]\n"


def chromium(*args, timeout=60):
    """Headless Chromium with a throwaway profile; its standard output."""
    import shutil
    import subprocess
    import tempfile

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "chromium is missing: scripts/env.sh installs it (DEBIAN_PACKAGES)"
    with tempfile.TemporaryDirectory(prefix="tp-chromium-") as profile:
        argv = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--no-first-run", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                "--user-data-dir=" + profile] + list(args)
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=timeout,
                              start_new_session=True)
    return done.stdout.decode("utf-8", "replace")


def test_status_page_renders_in_a_browser(spawn, redis_backends, tmp_path):
    backends = redis_backends(2)
    port, _, http_port = start_proxy(spawn, [b.port for b in backends])
    r = client(port)
    for i in range(30):
        r.set("page:%d" % i, "x")
        r.get("page:%d" % i)
    r.close()
    url = "http://%s:%d/status" % (HOST, http_port)

    dom = chromium("--dump-dom", url)
    assert "twistedproxy" in dom and "<svg" in dom
    assert dom.count('class="bar"') == 7  # one pool: p50 .. p99.9 and max
    for backend in backends:
        assert "%s:%d" % (HOST, backend.port) in dom
    assert dom.count('class="up"') == 2
    assert ">alpha<" in dom and ">get<" in dom and ">set<" in dom
    assert 'id="workers"' in dom and dom.count('class="worker"') == 1 and "single process" in dom

    shot = tmp_path / "status.png"
    chromium("--screenshot=%s" % shot, "--window-size=1000,900", url)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10000


def test_status_page_and_metrics_show_workers(spawn, redis_backends):
    import os
    import signal

    from tests.support.workers import master_config, poll, ready_status

    (backend,) = redis_backends(1)
    port, http_port = free_port(), free_port()
    config = master_config({"alpha": processes.pool_config([backend.port], port)},
                           stats_http="%s:%d" % (HOST, http_port))
    control = config["global"]["control"]
    spawn(processes.proxy, config, port)

    def workers(count):
        return (ready_status(control, count) or {}).get("workers")

    before = poll(lambda: workers(2), 20, 0.05, "2 ready workers")
    victim = before[1]
    os.kill(victim["pid"], signal.SIGKILL)
    after = poll(lambda: (lambda w: w and w[1]["pid"] != victim["pid"] and w)(workers(2)), 20, 0.05,
                 "the killed worker's respawn")
    assert [w["restarts"] for w in after] == [0, 1]
    assert after[0]["last_exit"] is None
    assert after[1]["last_exit"] == {"pid": victim["pid"], "reason": "killed by signal 9 (SIGKILL)"}
    r = client(port)
    for i in range(10):
        r.set("w:%d" % i, "x")
    r.close()

    page = http_get(http_port, "/status").decode()
    table = page[page.index('<table id="workers">'):]
    table = table[:table.index("</table>")]
    rows = table.split('<tr class="worker">')[1:]
    assert len(rows) == 2
    assert ">%d<" % after[1]["pid"] in rows[1] and ">ready<" in rows[1] and "<td>1</td>" in rows[1]
    assert "pid %d killed by signal 9 (SIGKILL)" % victim["pid"] in rows[1]
    assert ">%d<" % after[0]["pid"] in rows[0] and "<td>0</td>" in rows[0]

    families = {f.name: f for f in text_string_to_metric_families(http_get(http_port, "/metrics").decode())}
    build = families["cacheproxy_build_info"]
    assert build.type == "gauge"
    (sample,) = build.samples
    from twistedproxy._version import __version__

    assert sample.value == 1 and sample.labels["version"] == __version__
    assert sample.labels["implementation"] in ("CPython", "PyPy") and sample.labels["python"].count(".") == 2
    restarts = families["cacheproxy_worker_restarts"]
    assert restarts.type == "counter"
    assert {s.labels["slot"]: s.value for s in restarts.samples if s.name.endswith("_total")} == {"1": 1}
    # Latency percentiles: a summary (quantiles, _sum, _count), the same name as the gauge it replaces.
    latency = families["cacheproxy_latency_seconds"]
    assert latency.type == "summary"
    total = [s for s in latency.samples if s.labels.get("kind") == "total"]
    by_name = {(s.name, s.labels.get("quantile")): s.value for s in total}
    assert by_name[("cacheproxy_latency_seconds_count", None)] == 10
    assert 0 < by_name[("cacheproxy_latency_seconds_sum", None)] < 10
    quantiles = [by_name[("cacheproxy_latency_seconds", q)] for q in ("0.5", "0.9", "0.99", "0.999")]
    assert 0 < quantiles[0] and quantiles == sorted(quantiles)
    assert families["cacheproxy_server_latency_seconds"].type == "summary"
    assert families["cacheproxy_request_duration_seconds"].type == "histogram"


def test_master_merges_workers_and_tunes_them(spawn, redis_backends):
    from tests.support.workers import master_config, poll
    from twistedproxy.control.client import BlockingControlClient

    (backend,) = redis_backends(1)
    port, stats_port, http_port = free_port(), free_port(), free_port()
    config = master_config({"alpha": processes.pool_config([backend.port], port)},
                           stats_http="%s:%d" % (HOST, http_port), slowlog_threshold=0.15, admin_token=TOKEN)
    control = config["global"]["control"]
    spawn(processes.proxy, config, port, extra_args=["-s", str(stats_port), "-a", HOST])

    def ready():
        try:
            with BlockingControlClient(control) as ctl:
                workers = ctl.status()["workers"]
        except OSError:
            return None
        return len([w for w in workers if w["state"] == "ready"]) == 2 and workers

    workers = poll(ready, 20, 0.05, "2 ready workers")
    pids = {w["pid"] for w in workers}
    processes.wait_for_port(stats_port)

    # Far apart, so that no plain SET/GET of a loaded 2-core box looks slow.
    slow_ms = 250
    clients = [client(port) for _ in range(6)]
    for n, r in enumerate(clients):
        for i in range(5):
            r.set("k:%d:%d" % (n, i), "v")
            r.get("k:%d:%d" % (n, i))
        r.eval(BUSY, 1, "slow:%d" % n, slow_ms * 1000)

    doc = read_stats_port(stats_port)
    label = "%s:%d" % (HOST, backend.port)
    assert doc["alpha"][label]["requests"] == 66
    assert doc["alpha"]["client_connections"] == 6
    report = json.loads(http_get(http_port, "/stats.json"))["twistedproxy"]
    assert report["workers"] == 2 and set(report["pids"]) == pids
    assert report["pools"]["alpha"]["commands"]["eval"]["total"]["count"] == 6
    assert report["pools"]["alpha"]["commands"]["eval"]["total"]["p50"] >= slow_ms * 0.99

    code, out, err = cacheproxyctl(control, "slowlog")
    assert code == 0, err
    entries = json.loads(out)
    assert sorted(e["key"] for e in entries) == ["slow:%d" % n for n in range(6)]
    assert {e["pid"] for e in entries} <= pids
    code, out, _ = cacheproxyctl(control, "slowlog", "--limit", "2")
    assert len(json.loads(out)) == 2

    code, out, err = cacheproxyctl(control, "set", "slowlog_threshold=1", "client_max_pending=64")
    assert code == 0, err
    answer = json.loads(out)["workers"]
    assert {w["pid"] for w in answer} == pids
    assert all(w["slowlog_threshold"] == 1.0 and w["pools"]["alpha"]["client_max_pending"] == 64 for w in answer)
    clients[0].eval(BUSY, 1, "slow:after", slow_ms * 1000)
    assert len(json.loads(cacheproxyctl(control, "slowlog")[1])) == 6

    code, out, err = cacheproxyctl(control, "set", "slowlog_max_len=lots")
    assert code == 1 and "slowlog_max_len" in err

    # The master's HTTP endpoint: POST /tune with the token reaches every worker, without it nothing.
    assert http_refusal(http_port, "/tune", {"slowlog_max_len": "7"}, token="wrong")[0] == 401
    answer = http_post(http_port, "/tune", {"slowlog_max_len": "7"})["workers"]
    assert {w["pid"] for w in answer} == pids and all(w["slowlog_max_len"] == 7 for w in answer)
    for r in clients:
        r.close()
