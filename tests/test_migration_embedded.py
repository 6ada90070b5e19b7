"""An embedded Proxy coordinates its own migrations (state in memory): routes rebuilt and switched by phase."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock

from twistedproxy import Proxy
from twistedproxy.config import config_from_dict
from twistedproxy.config.migration import MOVE
from twistedproxy.routes.hash import HashRoute
from twistedproxy.routes.migrate import MigratingRoute

OLD = ["127.0.0.1:7001:1", "127.0.0.1:7002:1", "127.0.0.1:7003:1"]


def config(servers, **keys):
    pool = {"listen": "127.0.0.1:22121", "redis": True, "migrate": True, "servers": list(servers)}
    pool.update(keys)
    return config_from_dict({"alpha": pool, "front": {"listen": "127.0.0.1:22122", "redis": True, "route": "alpha"}})


class Client:
    """What a pool asks of its clients here: their route, their parser (none: no login), and a transport to close."""

    parser = None

    def __init__(self, route):
        self.route = route
        self.transport = self
        self.closed = False

    def loseConnection(self):
        self.closed = True


def test_a_reconfigure_migrates_and_the_end_rebuilds_the_pool():
    reactor = MemoryReactorClock()
    proxy = Proxy(config(OLD), reactor)
    first = proxy.pools["alpha"]
    client = Client(first)
    first.clients.add(client)
    assert type(first) is HashRoute and proxy.migration() == (True, {})

    assert proxy.reconfigure(config(OLD + ["127.0.0.1:7004:1"])) == []
    route = proxy.pools["alpha"]
    assert isinstance(route, MigratingRoute) and route.plan.phase == MOVE  # held, then moving: this process only
    assert client.route is route and client in route.clients
    assert proxy.pools["front"] is not None and proxy.factories["alpha"].pool is route
    ok, records = proxy.migration("status", "alpha")
    assert ok and records["alpha"]["state"] == "moving" and len(records["alpha"]["target"]) == 4

    # Unchanged placement keys and the same list: nothing is rebuilt; a second change waits.
    refusals = proxy.reconfigure(config(OLD + ["127.0.0.1:7004:1"], timeout=400))
    assert refusals == [] and proxy.pools["alpha"] is not route
    assert proxy.reconfigure(config(OLD))[0].startswith("pool alpha is migrating (from 3 to 4 servers")
    route = proxy.pools["alpha"]

    migration = proxy.coordinator.migrations["alpha"]
    migration.mover.events.finished()  # the mover's listing is complete
    done = proxy.pools["alpha"]
    assert type(done) is HashRoute and [s.spec.port for s in done.servers] == [7001, 7002, 7003, 7004]
    assert client.route is done
    assert proxy.migration("status", "alpha")[1]["alpha"]["state"] == "done"
    proxy.stop()
    assert client.closed
