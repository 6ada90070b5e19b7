"""
The Redis Cluster acceptance harness checked on its own, without processes:
the checking clients see a lost write, a wrong value and an error for what
they are, and the command stream is reproducible and knows which commands
span slots.  (tests/test_cluster_scenarios.py uses them on real processes.)
"""

from __future__ import annotations

import redis

from tests.support.checking import CheckingClient, CheckingLoad
from tests.support.cluster import parse_nodes
from tests.support.command_stream import CommandStream, Command, normalize, replies_equal


class FakeRedis:
    """A dict behind redis-py's method names, with a hook to misbehave."""

    def __init__(self, store, misbehave=None):
        self.store = store
        self.misbehave = misbehave or (lambda name, key, value: value)

    def set(self, key, value):
        self.store[key] = self.misbehave("set", key, value)
        return True

    def get(self, key):
        return self.misbehave("get", key, self.store.get(key))

    def delete(self, key):
        return int(self.store.pop(key, None) is not None)

    def mset(self, mapping):
        for key, value in mapping.items():
            self.set(key, value)
        return True

    def mget(self, keys):
        return [self.get(key) for key in keys]

    def close(self):
        pass


def run_steps(misbehave=None, steps=400) -> CheckingClient:
    store = {}
    client = CheckingClient(0, lambda: FakeRedis(store, misbehave), keys=10, rate=0)
    client.client = client.connect()
    for _ in range(steps):
        try:
            client.step()
        except redis.RedisError as e:
            client.errors.append(e)
    return client


def test_a_faithful_server_gives_no_bad_value():
    client = run_steps()
    assert client.bad_values == [] and client.errors == []


def test_a_value_of_another_key_is_wrong():
    def swap(name, key, value):
        if name == "get" and key.endswith("3"):
            return b"chk:00:0004:v1"
        return value

    kinds = {e.kind for e in run_steps(swap).bad_values}
    assert kinds == {"wrong"}


def test_a_lost_write_reads_stale():
    lost = []

    def lose(name, key, value):
        if name == "set" and key.endswith("3") and not lost:
            lost.append(value)
            return b"chk:00:0003:v-never"  # a value this client never wrote
        return value

    def lose_quietly(name, key, value):
        # The server answers OK to one write of key 3 but keeps the value before it.
        if name == "set" and key.endswith("3") and len(lost) < 2:
            lost.append(value)
            if len(lost) == 2:
                return lost[0]
        return value

    assert {e.kind for e in run_steps(lose).bad_values} == {"wrong"}
    lost.clear()
    bad = run_steps(lose_quietly).bad_values
    assert bad and {e.kind for e in bad} == {"stale"} and all(e.keys == ("chk:00:0003",) for e in bad)


def test_an_error_is_counted_and_leaves_either_value():
    sets = []

    def fail_once(name, key, value):
        if name == "set":
            sets.append(key)
            if len(sets) == 5:
                raise redis.ConnectionError("closed")
        return value

    client = run_steps(fail_once)
    assert len(client.errors) == 1 and client.bad_values == []


def test_loads_have_keys_of_their_own():
    first, second = CheckingLoad(None, clients=1), CheckingLoad(None, clients=1)
    assert not set(first.clients[0].keys) & set(second.clients[0].keys)


def test_the_stream_is_reproducible_and_knows_cross_slot_commands():
    assert [c.args for c in CommandStream(7).commands(500)] == [c.args for c in CommandStream(7).commands(500)]
    commands = CommandStream(7).commands(3000)
    names = {c.name for c in commands}
    assert {b"MGET", b"MSET", b"DEL", b"UNLINK", b"EXISTS", b"TOUCH", b"RENAME", b"SMOVE", b"SINTERSTORE",
            b"EVAL", b"HSET", b"LPUSH", b"SADD", b"ZADD"} <= names
    crossed = [c for c in commands if c.cross_slot]
    assert crossed and all(c.args[0] != b"MGET" for c in crossed)
    stream = CommandStream(0)
    assert not stream.unsplittable(b"RENAME", b"{user}", b"{user}x", keys=(b"{user}", b"{user}x")).cross_slot
    assert stream.unsplittable(b"RENAME", b"{}{user}", b"{user}", keys=(b"{}{user}", b"{user}")).cross_slot


def test_set_replies_compare_in_any_order():
    smembers, lrange = Command((b"SMEMBERS", b"k")), Command((b"LRANGE", b"k", 0, -1))
    assert replies_equal(smembers, [b"b", b"a"], [b"a", b"b"])
    assert not replies_equal(lrange, [b"b", b"a"], [b"a", b"b"])
    assert normalize(smembers, None) is None


def test_cluster_nodes_are_parsed_with_slot_ranges():
    text = (b"07c3 127.0.0.1:30004@40004 slave e7d1 0 1426238317239 4 connected\n"
            b"e7d1 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5 10 [11->-292f]\n")
    nodes = parse_nodes(text)
    assert nodes["e7d1"]["slots"] == {0, 1, 2, 3, 4, 5, 10} and nodes["e7d1"]["port"] == 30001
    assert nodes["07c3"]["master"] == "e7d1" and "slave" in nodes["07c3"]["flags"]
