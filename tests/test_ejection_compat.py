"""
Ejection with a dead backend, side by side with nutcracker (twemproxy 0.5.0)
on the same configuration: the proxy probes an ejected server before giving it
traffic again, so retries cost clients no more errors than nutcracker's.
"""

from __future__ import annotations

import shutil
import time

import pytest
import redis

from tests.support import processes
from tests.support.processes import HOST, free_port
from tests.support.workers import connect, poll, read_reply

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:Call to '__init__' function with deprecated usage:DeprecationWarning"),
]

RETRY_MS = 400
PERIODS = 6


def _errors_under_load(port: int, seconds: float) -> tuple:
    """Paced GETs over many keys (about half on the dead server) for C{seconds}: (requests, errors)."""
    client = redis.Redis(host=HOST, port=port, socket_timeout=5, protocol=2, lib_name=None, lib_version=None)
    requests = errors = 0
    deadline = time.time() + seconds
    while time.time() < deadline:
        requests += 1
        try:
            client.get("key:%d" % (requests % 1000))
        except redis.exceptions.ResponseError:
            errors += 1
        time.sleep(0.001)
    return requests, errors


@pytest.mark.skipif(shutil.which("nutcracker") is None, reason="nutcracker (twemproxy) is not installed")
@pytest.mark.parametrize("limit", [1, 2])
def test_a_dead_backend_costs_no_more_errors_than_with_nutcracker(limit, spawn, redis_backends):
    live = redis_backends(1)[0]
    dead = free_port()  # nothing listens there
    results = {}
    for name, start in (("nutcracker", processes.nutcracker), ("twistedproxy", processes.proxy)):
        port = free_port()
        pool = processes.pool_config([live.port, dead], port, redis=True, timeout=400, auto_eject_hosts=True,
                                     server_failure_limit=limit, server_retry_timeout=RETRY_MS)
        proc = spawn(start, {"alpha": pool}, port)
        results[name] = _errors_under_load(port, PERIODS * RETRY_MS / 1000.0)
        proc.stop()
    (nut_requests, nut_errors), (our_requests, our_errors) = results["nutcracker"], results["twistedproxy"]
    print(results)
    assert nut_errors > 0 and our_requests > 100, results
    # nutcracker pays at every retry period; the probe pays once, at the first ejection.
    assert our_errors <= max(nut_errors, limit), results


def test_a_memcached_server_is_readmitted_once_it_answers_version(spawn, memcached_backends):
    live = memcached_backends(1)[0]
    dead = free_port()
    port = free_port()
    pool = processes.pool_config([live.port, dead], port, redis=False, timeout=400, auto_eject_hosts=True,
                                 server_failure_limit=1, server_retry_timeout=300)
    proxy = spawn(processes.proxy, {"alpha": pool}, port)
    sock = connect(port)
    # Keys that differ in their first bytes: fnv1a_64 (the default hash) barely spreads keys
    # that differ only at the end ("key:0".."key:39" can all land in one ketama segment,
    # so on one server, depending on the ports' ring points).
    keys = [b"%d:key" % i for i in range(40)]

    def errors():
        sock.sendall(b"".join(b"get %s\r\n" % key for key in keys))
        replies = b""
        while replies.count(b"END\r\n") + replies.count(b"SERVER_ERROR") < len(keys):
            replies += read_reply(sock, b"\r\n")
        return replies.count(b"SERVER_ERROR")

    assert errors() > 0  # the dead server's keys, once: it is ejected
    assert errors() == 0  # every key on the live server now
    time.sleep(1.0)  # a few retry periods: probes fail, no client sees it
    assert errors() == 0
    spawn(processes.memcached, dead)
    # Readmitted after its probe: keys are spread over both servers again.
    poll(lambda: proxy.output().count("back in placement") == 1, 5, 0.05, "the server to be readmitted")
    assert errors() == 0
    sock.close()
