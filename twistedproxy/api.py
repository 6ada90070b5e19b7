"""
The embedding API: build the proxy's pools and listening factories from a
configuration, inside any Twisted program.

    from twisted.internet import reactor
    from twistedproxy import Proxy

    proxy = Proxy.from_file("conf/nutcracker.yml", reactor)
    proxy.start()                      # listen on every pool's configured address
    # or pick factories yourself:
    reactor.listenTCP(6380, proxy.factories["alpha"])
"""

from __future__ import annotations

from twisted.internet.defer import DeferredList, maybeDeferred

from twistedproxy.config import ProxyConfig, config_from_dict, load_config
from twistedproxy.core.client import ProxyFactory
from twistedproxy.core.pool import ServerPool
from twistedproxy.process.listeners import listen
from twistedproxy.protocols import codec_for, codecs_of


def build_pool(pool_config, reactor) -> ServerPool:
    """A L{ServerPool} for one L{PoolConfig}, speaking the pool's protocol."""
    codec = codec_for(pool_config.protocol)
    return ServerPool(pool_config, codec, reactor, codecs=codecs_of(codec))


class Proxy:
    """
    Every pool of a configuration, with one L{ProxyFactory} per pool.

    @ivar pools: pool name -> L{ServerPool}.
    @ivar factories: pool name -> L{ProxyFactory} (a Twisted ServerFactory).
    @ivar ports: the listening ports opened by L{start}.
    """

    def __init__(self, config: ProxyConfig, reactor):
        self.config = config
        self.reactor = reactor
        self.pools = {}
        self.factories = {}
        for pool_config in config.pools:
            pool = build_pool(pool_config, reactor)
            self.pools[pool_config.name] = pool
            self.factories[pool_config.name] = ProxyFactory(pool)
        self.ports = []

    @classmethod
    def from_file(cls, path: str, reactor) -> "Proxy":
        """A proxy for the nutcracker.yml-style file at C{path}."""
        return cls(load_config(path), reactor)

    @classmethod
    def from_dict(cls, data: dict, reactor) -> "Proxy":
        """A proxy for a configuration given as a dict (the YAML's structure)."""
        return cls(config_from_dict(data), reactor)

    def start(self) -> list:
        """Connect preconnect pools and listen on every pool's address; returns the ports."""
        for name, pool in self.pools.items():
            pool.start()
            cfg = pool.config
            self.ports.append(listen(self.reactor, cfg.listen, self.factories[name], cfg.backlog, cfg.reuseport))
        return self.ports

    def stop(self):
        """Stop listening, close clients and backend connections; a Deferred fires when done."""
        ports, self.ports = self.ports, []
        waits = [maybeDeferred(port.stopListening) for port in ports]
        for pool in self.pools.values():
            for client in list(pool.clients):
                client.transport.loseConnection()
            pool.stop()
        return DeferredList(waits)
