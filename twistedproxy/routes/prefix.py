"""
Key prefix routing: which pool a key goes to on a front, how many of its
leading bytes the pool must not see, and which tenant it counts for.

A front's C{route:} or C{tenants:} (L{twistedproxy.config.routes}) becomes a
small tree of L{Node}s: a leaf holds a pool's route, a prefix node maps key
prefixes to the next node.  L{resolve} walks it for one key: at each prefix
node the longest matching prefix wins (one dict lookup per distinct prefix
length, longest first), else the node's default, else no route.  A stripped
prefix moves the walk's start in the key, so a prefix route under a
stripping one matches what follows the outer prefix, and the bytes cut add up.
"""

from __future__ import annotations

from twistedproxy.config.routes import PoolRoute, PrefixRoute, route_kinds


class Node:
    """A leaf (C{pool} set) or a prefix node (C{lengths}, C{default})."""

    __slots__ = ("pool", "lengths", "default")

    def __init__(self, pool=None, lengths=(), default=None):
        self.pool = pool  # the pool's route (a leaf), else None
        # [(length, {prefix: Branch})], longest first
        self.lengths = lengths
        self.default = default  # a Branch, or None


class Branch:
    """Where a matched prefix (or the default) leads: the next node, what is cut, whose it is."""

    __slots__ = ("node", "cut", "tenant")

    def __init__(self, node, cut: int = 0, tenant=None):
        self.node = node
        self.cut = cut  # bytes of the key the pool does not see (the prefix, when stripped)
        self.tenant = tenant  # the tenant keys on this branch count for, or None (the one above)


class UnbuiltRoute(ValueError):
    """A route kind the run time cannot build (yet)."""


def compile_route(spec, pools: dict, build=None) -> Node:
    """
    The node tree of route C{spec}; C{pools} maps pool names to their routes.
    Other route kinds (failover, replicate, ...) become leaves built by
    C{build(spec, pools)}, which returns their route (an object with the
    pool route's C{dispatch} and C{dispatch_slice}).
    """
    if isinstance(spec, PoolRoute):
        return Node(pool=pools[spec.pool])
    if isinstance(spec, PrefixRoute):
        branches = [
            (entry.prefix, Branch(compile_route(entry.route, pools, build), len(entry.prefix) if entry.strip else 0))
            for entry in spec.entries
        ]
        default = Branch(compile_route(spec.default, pools, build)) if spec.default is not None else None
        return prefix_node(branches, default)
    if build is not None:
        return Node(pool=build(spec, pools))
    raise UnbuiltRoute("%s routes are not built at run time yet" % (route_kinds(spec)[0],))


def prefix_node(branches: list, default=None) -> Node:
    """A prefix node over C{branches} (C{(prefix, Branch)} pairs) and a default branch."""
    by_length = {}
    for prefix, branch in branches:
        by_length.setdefault(len(prefix), {})[prefix] = branch
    return Node(lengths=sorted(by_length.items(), reverse=True), default=default)


def resolve(node: Node, key: bytes):
    """
    C{(pool, cut, tenant)} for C{key}: the pool's route (None when no prefix
    matches and no default is left), how many leading bytes of the key the pool
    must not see, and the tenant of the last branch that names one (or None).
    """
    cut = 0
    tenant = None
    while node.pool is None:
        branch = None
        size = len(key) - cut
        for length, table in node.lengths:
            if length <= size:
                branch = table.get(key[cut : cut + length])
                if branch is not None:
                    break
        if branch is None:
            branch = node.default
            if branch is None:
                return None, cut, tenant
        cut += branch.cut
        if branch.tenant is not None:
            tenant = branch.tenant
        node = branch.node
    return node.pool, cut, tenant


def keyless(node: Node):
    """C{(pool, tenant)} for a request without a key: the defaults all the way down (None, None if none)."""
    tenant = None
    while node.pool is None:
        branch = node.default
        if branch is None:
            return None, tenant
        if branch.tenant is not None:
            tenant = branch.tenant
        node = branch.node
    return node.pool, tenant
