"""
The wiring of online migration, end to end with real processes: a master
(C{twistd -n cacheproxy}) with 2 workers over real redis-servers, a pool
grown from 3 to 4 servers by a reload, followed through C{cacheproxyctl
migration} to its end; every key is then where a fresh proxy with the new
list looks for it.  (The heavy acceptance under load is
tests/test_migration_acceptance.py.)
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import redis
import yaml

from tests.support import processes
from tests.support.ctl import cacheproxyctl_here
from tests.support.migration import memcached_keys
from tests.support.processes import HOST, free_port
from tests.support.workers import master_config, poll, ready_status
from twistedproxy.config import config_from_dict
from twistedproxy.control import cli
from twistedproxy.control.client import BlockingControlClient, ControlError
from twistedproxy.migration.mover import placement

pytestmark = pytest.mark.integration


def test_a_reload_grows_a_redis_pool_online_with_two_workers(spawn, redis_backends, tmp_path):
    backends = redis_backends(4)
    port = free_port()
    pool = processes.pool_config([b.port for b in backends[:3]], port, migrate=True, migrate_rate=0, timeout=5000)
    config = master_config({"alpha": pool}, state_dir=str(tmp_path))
    control = config["global"]["control"]
    proc = spawn(processes.twistd, config, port)
    path = proc.argv[proc.argv.index("-c") + 1]

    poll(lambda: ready_status(control, 2), 30, 0.05, "2 ready workers")
    client = redis.Redis(host=HOST, port=port, socket_timeout=10, protocol=2)
    pipe = client.pipeline(transaction=False)
    for i in range(300):
        pipe.set(b"key:%d" % i, b"value:%d" % i)
    pipe.set(b"ttl", b"soon", ex=300)
    pipe.hset(b"hash", mapping={b"a": b"1", b"b": b"2"})
    pipe.execute()
    assert cacheproxyctl_here(control, "migration")[:2] == (0, "{}\n")

    pool["servers"].append("%s:%d:1" % (HOST, backends[3].port))
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    with BlockingControlClient(control) as c:
        c.reload()  # ok once every worker holds the plan

        def done():
            record = c.migration("status", "alpha")["alpha"]
            assert record["state"] in ("holding", "moving", "done"), record
            return record if record["state"] == "done" else None

        record = poll(done, 60, 0.1, "the migration to end")
        with pytest.raises(ControlError) as refused:
            c.migration("pause", "alpha")
        assert "nothing to pause (it is done)" in str(refused.value)
    assert record["source"] == ["%s:%d" % (HOST, b.port) for b in backends[:3]], record
    assert len(record["target"]) == 4 and record["removed"] == [] and record["failed"] == 0, record
    # Every key whose owner changed was moved by the mover (no client touched one meanwhile). How
    # many depends on the ports: twemproxy's ketama over "127.0.0.1:PORT" names can give a server few.
    before, after = (config_from_dict({"alpha": dict(pool, servers=servers)}).pool("alpha")
                     for servers in (pool["servers"][:3], pool["servers"]))
    old_owner, owner = placement(before, before.servers), placement(after, after.servers)
    keys = [b"key:%d" % i for i in range(300)] + [b"ttl", b"hash"]
    moving = sum(1 for key in keys if old_owner(key).port != owner(key).port)
    assert record["moved"] == moving and record["scanned"] == 302 + moving, (moving, record)

    code, out, _ = cacheproxyctl_here(control, "migration", "status", "alpha")
    assert code == 0 and json.loads(out)["alpha"]["id"] == record["id"]
    code, _, _ = cacheproxyctl_here(control, "migration", "resume", "nosuch")
    assert code == cli.EXIT_REFUSED
    assert os.path.exists(tmp_path / "cacheproxy-migration-alpha.json")

    # Every key reads back through the proxy, and sits where a fresh proxy with the new list looks.
    assert [client.get(b"key:%d" % i) for i in range(300)] == [b"value:%d" % i for i in range(300)]
    assert client.hgetall(b"hash") == {b"a": b"1", b"b": b"2"} and 0 < client.ttl(b"ttl") <= 300
    direct = {b.port: redis.Redis(host=HOST, port=b.port, socket_timeout=10) for b in backends}
    for port_of, backend in direct.items():
        for key in backend.scan_iter(count=1000):
            assert owner(key).port == port_of, key
    assert sum(backend.dbsize() for backend in direct.values()) == 302


def test_a_single_process_resumes_after_a_restart_and_drains_the_removed_server(spawn, redis_backends, tmp_path):
    backends = redis_backends(4)
    port = free_port()
    pool = processes.pool_config([b.port for b in backends], port, migrate=True, migrate_rate=100, timeout=5000)
    control = str(tmp_path / "ctl.sock")
    config = {"alpha": pool, "global": {"control": control, "state_dir": str(tmp_path)}}
    path = processes.write_config(config, str(tmp_path))

    def start():
        argv = [sys.executable, "-m", "twistedproxy.cli", "-c", path] + processes.stats_args()
        return spawn(processes.Process, argv, port, env=processes.proxy_env(), cwd=processes.ROOT)

    proc = start()
    client = redis.Redis(host=HOST, port=port, socket_timeout=10, protocol=2)
    removed = redis.Redis(host=HOST, port=backends[3].port, socket_timeout=10)
    count = 0
    while removed.dbsize() < 300:  # ketama may give the server a small share: enough keys to move
        pipe = client.pipeline(transaction=False)
        for i in range(count, count + 1000):
            pipe.set(b"key:%d" % i, b"value:%d" % i)
        pipe.execute()
        count += 1000

    pool["servers"].pop()  # 4 -> 3: 300 keys or more move, 100 a second
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    with BlockingControlClient(control) as c:
        c.reload()
        poll(lambda: c.migration()["alpha"]["moved"] > 0, 20, 0.05, "some keys moved")
        assert c.migration()["alpha"]["state"] == "moving"
    proc.stop()  # SIGTERM mid-migration: the cursors are saved
    with open(str(tmp_path / "cacheproxy-migration-alpha.json")) as f:
        saved = json.load(f)
    assert saved["plan"]["phase"] == "move" and list(saved["cursors"].values()).count("done") >= 3

    start()  # the file names the target: the migration goes on, in the move phase at once
    assert [client.get(b"key:%d" % i) for i in range(0, count, 7)] == [b"value:%d" % i for i in range(0, count, 7)]
    with BlockingControlClient(control) as c:
        record = poll(lambda: c.migration()["alpha"] if c.migration()["alpha"]["drained"] else None, 30, 0.1,
                      "the removed server drained")
    address = "%s:%d" % (HOST, backends[3].port)
    assert record["state"] == "done" and record["removed"] == [address] and record["drained"] == [address]
    assert removed.dbsize() == 0
    assert [client.get(b"key:%d" % i) for i in range(count)] == [b"value:%d" % i for i in range(count)]


def test_a_memcached_pool_shrinks_online_through_a_single_process(spawn, memcached_backends, tmp_path):
    from pymemcache.client.base import Client

    backends = memcached_backends(3)
    port = free_port()
    pool = processes.pool_config([b.port for b in backends], port, redis=False, migrate=True, migrate_rate=0,
                                 timeout=5000)
    control = str(tmp_path / "ctl.sock")
    config = {"alpha": pool, "global": {"control": control, "state_dir": str(tmp_path)}}
    path = processes.write_config(config, str(tmp_path))
    argv = [sys.executable, "-m", "twistedproxy.cli", "-c", path] + processes.stats_args()
    spawn(processes.Process, argv, port, env=processes.proxy_env(), cwd=processes.ROOT)
    client = Client((HOST, port), timeout=10)
    for i in range(300):
        assert client.set("key:%d" % i, b"value:%d" % i, expire=600, noreply=False)

    on_removed = len(memcached_keys(backends[2].port))
    pool["servers"].pop()  # 3 -> 2
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    with BlockingControlClient(control) as c:
        c.reload()
        record = poll(lambda: c.migration()["alpha"] if c.migration()["alpha"]["drained"] else None, 30, 0.1,
                      "the removed server drained")
    assert record["state"] == "done" and record["moved"] == on_removed and record["failed"] == 0, record
    assert memcached_keys(backends[2].port) == []
    removed = Client((HOST, backends[2].port), timeout=10)
    assert all(removed.get("key:%d" % i) is None for i in range(300))
    assert [client.get("key:%d" % i) for i in range(300)] == [b"value:%d" % i for i in range(300)]
