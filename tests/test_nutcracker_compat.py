"""
The acceptance test of the drop-in promise: keys written through nutcracker
(twemproxy 0.5.0) are all found through twistedproxy with the same
configuration, for every distribution, with weights and named servers.
"""

from __future__ import annotations

import random
import shutil

import pytest
import redis

from tests.support import processes
from tests.support.processes import HOST, free_port

pytestmark = [
    pytest.mark.integration,
    # redis-py 8 deprecates lib_name/lib_version (needed to skip CLIENT SETINFO) for driver_info.
    pytest.mark.filterwarnings("ignore:Call to '__init__' function with deprecated usage:DeprecationWarning"),
    pytest.mark.skipif(shutil.which("nutcracker") is None, reason="nutcracker (twemproxy) is not installed"),
]

KEY_COUNT = 10000

CASES = {
    "ketama-fnv1a_64": dict(distribution="ketama", hash="fnv1a_64"),
    "ketama-md5-weights": dict(distribution="ketama", hash="md5", weights=(1, 3, 2)),
    "modula-fnv1a_64-weights": dict(distribution="modula", hash="fnv1a_64", weights=(2, 1, 1)),
    "ketama-named": dict(distribution="ketama", hash="fnv1a_64", names=("alpha", "beta", "gamma")),
    "ketama-murmur-hash-tag": dict(distribution="ketama", hash="murmur", hash_tag="{}"),
}


def _pool(backends, port, case) -> dict:
    weights = case.get("weights", (1,) * len(backends))
    names = case.get("names")
    servers = []
    for i, backend in enumerate(backends):
        line = "%s:%d:%d" % (HOST, backend.port, weights[i])
        if names:
            line += " " + names[i]
        servers.append(line)
    pool = {
        "listen": "%s:%d" % (HOST, port),
        "redis": True,
        "hash": case["hash"],
        "distribution": case["distribution"],
        "servers": servers,
        "timeout": 5000,
    }
    if "hash_tag" in case:
        pool["hash_tag"] = case["hash_tag"]
    return {"compat": pool}


def _keys(count: int, seed: int, tagged: bool) -> list:
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_-."
    keys = set()
    while len(keys) < count:
        key = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40)))
        if tagged and rng.random() < 0.5:
            key = "%s{%s}%s" % (key[:3], key[3:9], key[9:])
        keys.add(key)
    return sorted(keys)


@pytest.mark.parametrize("name", sorted(CASES))
def test_keys_written_by_nutcracker_are_read_by_twistedproxy(name, spawn, redis_backends):
    case = CASES[name]
    backends = redis_backends(3)
    nut_port, proxy_port = free_port(), free_port()
    spawn(processes.nutcracker, _pool(backends, nut_port, case), nut_port)
    proxy = spawn(processes.proxy, _pool(backends, proxy_port, case), proxy_port)

    keys = _keys(KEY_COUNT, seed=len(name), tagged="hash_tag" in case)
    # No CLIENT SETINFO on connect: nutcracker closes connections on commands it does not know.
    writer = redis.Redis(host=HOST, port=nut_port, socket_timeout=30, protocol=2, lib_name=None, lib_version=None)
    pipe = writer.pipeline(transaction=False)
    for key in keys:
        pipe.set(key, key)
    assert all(r is True for r in pipe.execute())
    # Every key is on exactly one backend, and every backend got a share.
    sizes = [redis.Redis(host=HOST, port=b.port, protocol=2).dbsize() for b in backends]
    assert sum(sizes) == KEY_COUNT and min(sizes) > 0, sizes

    reader = redis.Redis(host=HOST, port=proxy_port, socket_timeout=30, protocol=2)
    pipe = reader.pipeline(transaction=False)
    for key in keys:
        pipe.get(key)
    got = pipe.execute()
    missing = [k for k, v in zip(keys, got) if v != k.encode()]
    assert not missing, "%d of %d keys not found, e.g. %r" % (len(missing), len(keys), missing[:5])
    # And the other way round for a sample, with multi-key splitting on both sides.
    sample = keys[::50]
    assert reader.mget(sample) == writer.mget(sample) == [k.encode() for k in sample]
    output = proxy.output()
    assert "Traceback" not in output, output
