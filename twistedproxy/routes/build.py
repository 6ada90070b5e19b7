"""
From the configuration's routes (L{twistedproxy.config.routes}) to route
objects: a front pool (C{route:} instead of C{servers:}) becomes a
L{FrontRoute} over a tree of routes whose leaves are the hash routes of the
pools it names, built once per configuration and shared by every route that
names them (one set of connections, health and counters per pool).

Prefix routes and tenants are built by the tenants work (not here yet).
"""

from __future__ import annotations

from zope.interface import implementer

from twistedproxy.config import routes as spec
from twistedproxy.protocols import codec_for
from twistedproxy.routes.copies import CompoundRoute
from twistedproxy.routes.failover import FailoverRoute
from twistedproxy.routes.interface import IServedRoute
from twistedproxy.routes.replicate import ReplicateRoute
from twistedproxy.routes.shadow import ShadowRoute
from twistedproxy.routes.warmup import WarmupRoute


def build_route(route_spec, pools: dict, name: str = "route"):
    """The route object of C{route_spec}; C{pools}: pool name -> its hash route (built already)."""
    if isinstance(route_spec, spec.PoolRoute):
        return pools[route_spec.pool]
    if isinstance(route_spec, spec.FailoverRoute):
        return FailoverRoute([build_route(r, pools, name) for r in route_spec.routes])
    if isinstance(route_spec, spec.ReplicateRoute):
        return ReplicateRoute([build_route(r, pools, name) for r in route_spec.routes], name=name)
    if isinstance(route_spec, spec.ShadowRoute):
        return ShadowRoute(build_route(route_spec.route, pools, name), build_route(route_spec.copy_to, pools, name),
                           route_spec.sample, route_spec.queue)
    if isinstance(route_spec, spec.WarmupRoute):
        return WarmupRoute(build_route(route_spec.route, pools, name), build_route(route_spec.warm, pools, name))
    raise NotImplementedError("%s: %s routes are not built yet" % (name, type(route_spec).__name__))


def compound_routes(route) -> list:
    """Every route of a tree but its leaves (the pools), depth first: what has counters of its own."""
    found = []
    children = getattr(route, "routes", None)
    if children is None:
        children = [child for child in (getattr(route, attr, None) for attr in ("route", "copy_to", "cold", "warm"))
                    if child is not None]
        if not children:
            return found  # a pool's hash route
    found.append(route)
    for child in children:
        found.extend(compound_routes(child))
    return found


@implementer(IServedRoute)
class FrontRoute(CompoundRoute):
    """
    What a front pool's listener serves: its clients, their settings and
    client-facing counters, and the root of its route tree.

    @ivar root: the route every request goes to.
    """

    servers = ()  # the servers are its pools' (each in the stats under its own name)
    health = None

    def __init__(self, config, root, stats):
        CompoundRoute.__init__(self, root)  # its pools are started and stopped where they are built
        self.config = config
        self.name = config.name
        self.root = root
        self.codec = codec_for(config.protocol)
        self.stats = stats
        self.clients = set()
        # The root's methods themselves: no call of our own per request.
        self.dispatch = root.dispatch
        self.dispatch_slice = root.dispatch_slice

    def route_counters(self) -> dict:
        """The counters of its routes (failovers, shadow copies ...), summed per name over the tree."""
        totals = {}
        for route in compound_routes(self.root):
            for name, value in route.counters().items():
                totals[name] = totals.get(name, 0) + value
        return totals

    def client_gone(self, client) -> None:
        self.clients.discard(client)

    def use_config(self, config) -> None:
        """Take the client settings a live front can change (C{client_max_pending} ...)."""
        self.config = config
        for client in self.clients:
            client.max_pending = config.client_max_pending


def build_front(config, pools: dict, stats) -> FrontRoute:
    """The served route of the front pool C{config} (C{route:}), over C{pools}."""
    if config.route is None:
        raise NotImplementedError("%s: tenants are not built yet" % (config.name,))
    return FrontRoute(config, build_route(config.route, pools, config.name), stats)
