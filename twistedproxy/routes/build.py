"""
From the configuration's routes (L{twistedproxy.config.routes}) to route
objects: the compound kinds (failover, replicate, shadow, warmup) over the
hash routes of the pools they name, built once per configuration and shared
by every route that names them (one set of connections, health and counters
per pool).  Prefix routes and tenants are the front's own
(L{twistedproxy.routes.tenants.FrontRoute}, which calls L{build_route} for
the other kinds).
"""

from __future__ import annotations

from twistedproxy.config import routes as spec
from twistedproxy.routes.failover import FailoverRoute
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
