"""
The routing extension of nutcracker.yml (twistedproxy/config/routes.py): fronts
with C{route:} or C{tenants:}, pools only routes reach, and the file:line errors
C{-t} gives for them.
"""

from __future__ import annotations

import hashlib
import textwrap

import pytest

from twistedproxy.config import ConfigError, parse_config
from twistedproxy.config.routes import (
    FailoverRoute,
    Password,
    PoolRoute,
    PrefixEntry,
    PrefixRoute,
    ReplicateRoute,
    ShadowRoute,
    TenantSpec,
    WarmupRoute,
    route_pools,
)

MEMCACHED_POOLS = """\
warm:
  servers:
    - 127.0.0.1:11211:1
cold:
  servers:
    - 127.0.0.1:11212:1
spare:
  listen: 127.0.0.1:22122
  servers:
    - 127.0.0.1:11213:1
"""


def parse(text: str):
    return parse_config(textwrap.dedent(text), "routes.yml")


def refusal(text: str) -> list:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    return caught.value.errors


def test_a_plain_twemproxy_file_has_no_fronts():
    config = parse(MEMCACHED_POOLS.replace("warm:\n", "warm:\n  listen: 127.0.0.1:1\n")
                   .replace("cold:\n", "cold:\n  listen: 127.0.0.1:2\n"))
    assert all(not pool.is_front and pool.route is None and pool.tenants == () for pool in config.pools)
    assert [pool.name for pool in config.listening] == ["warm", "cold", "spare"]


def test_every_route_kind_reads_into_its_object():
    config = parse(MEMCACHED_POOLS + """\
front:
  listen: 127.0.0.1:22121
  route:
    prefix:
      "a:": {failover: [warm, spare]}
      "ab:": {route: {replicate: [warm, cold]}, strip: true}
      "s:": {shadow: warm, copy_to: cold, sample: 0.25, queue: 10}
    default: {warmup: cold, from: warm}
""")
    front = config.pool("front")
    assert front.is_front and front.servers == ()
    assert front.route == PrefixRoute(
        entries=(
            PrefixEntry(b"ab:", ReplicateRoute((PoolRoute("warm"), PoolRoute("cold"))), strip=True),
            PrefixEntry(b"a:", FailoverRoute((PoolRoute("warm"), PoolRoute("spare")))),
            PrefixEntry(b"s:", ShadowRoute(PoolRoute("warm"), PoolRoute("cold"), 0.25, 10)),
        ),
        default=WarmupRoute(PoolRoute("cold"), PoolRoute("warm")),
    )
    assert [leaf.pool for leaf in route_pools(front.route)] == [
        "warm", "cold", "warm", "spare", "warm", "cold", "cold", "warm"]
    # Pools only routes reach listen nowhere.
    assert config.pool("warm").listen is None
    assert [pool.name for pool in config.listening] == ["spare", "front"]


def test_tenants_by_prefix_with_a_default_and_limits():
    config = parse(MEMCACHED_POOLS + """\
front:
  listen: 127.0.0.1:22121
  tenants:
    users:
      prefix: "user:"
      strip_prefix: true
      route: warm
      rate_limit: 1000
    rest:
      default: true
      route: cold
      rate_limit: 2.5
      rate_burst: 10
""")
    users, rest = config.pool("front").tenants
    assert users == TenantSpec("users", PoolRoute("warm"), prefix=b"user:", strip_prefix=True, rate_limit=1000.0)
    assert users.burst == 1000
    assert rest == TenantSpec("rest", PoolRoute("cold"), default=True, rate_limit=2.5, rate_burst=10)
    assert rest.burst == 10


def test_tenants_by_redis_user():
    digest = hashlib.sha256(b"s3cret").hexdigest()
    config = parse("""\
a:
  redis: true
  servers: [127.0.0.1:6379:1]
b:
  redis: true
  servers: [127.0.0.1:6380:1]
front:
  listen: 127.0.0.1:22121
  redis: true
  tenants:
    acme:
      users: {alice: plain, bob: "sha256:%s"}
      route: {prefix: {"acme:": a}}
      max_client_connections: 5
    other:
      users: {carol: pw}
      route: {failover: [b, a]}
""" % (digest.upper(),))
    acme, other = config.pool("front").tenants
    assert acme.users == (("alice", Password(text="plain")), ("bob", Password(sha256=digest)))
    assert acme.max_client_connections == 5
    assert "plain" not in repr(acme)  # a password stays out of logs
    assert other.route == FailoverRoute((PoolRoute("b"), PoolRoute("a")))


def test_route_errors_name_file_line_pool_and_key():
    errors = refusal(MEMCACHED_POOLS + """\
front:
  listen: 127.0.0.1:22121
  route:
    failover:
      - warm
      - cold
      - nowhere
""")
    assert errors == ["routes.yml:17: pool 'front': key 'route': no pool named 'nowhere'"]
    errors = refusal(MEMCACHED_POOLS + "front:\n  listen: 127.0.0.1:22121\n  hash: md5\n  route: warm\n")
    assert errors == [
        "routes.yml:13: pool 'front': key 'hash': applies to pools with servers, not to one with route"
        " (set it on the pools its routes name)",
    ]


def test_route_shapes_that_are_refused():
    head = MEMCACHED_POOLS + "front:\n  listen: 127.0.0.1:22121\n  route: "
    cases = {
        "{failover: [warm]}": "failover route: expected a list of at least two routes, got a list",
        "{failover: [warm, cold], replicate: [warm, cold]}":
            "a route mapping names exactly one kind of failover, replicate, shadow, warmup, prefix"
            " (found 'failover', 'replicate')",
        "{shadow: warm}": "shadow route: copy_to (the route that gets the copies) is missing",
        "{shadow: warm, copy_to: cold, sample: 0}":
            "sample: the fraction of requests copied, above 0 and at most 1 (got '0')",
        "{warmup: cold}": "warmup route: from (the warm route its misses are read from) is missing",
        "{prefix: {}}": "prefix route: no prefixes",
        "{prefix: {a: warm}, fallback: cold}":
            "prefix route: unknown key 'fallback' (expected one of: prefix, default)",
        "[warm, cold]": "expected a pool name or a route mapping (a list needs a kind, such as"
                        " {failover: [...]}), got a list",
    }
    for route, message in cases.items():
        errors = refusal(head + route + "\n")
        assert errors == ["routes.yml:13: pool 'front': key 'route': " + message], route


def test_what_routes_need_from_the_pools_they_name():
    errors = refusal("""\
r:
  redis: true
  servers: [127.0.0.1:6379:1]
m:
  servers: [127.0.0.1:11211:1]
lonely:
  servers: [127.0.0.1:11212:1]
front:
  listen: 127.0.0.1:22121
  redis: true
  route: {replicate: [r, m]}
other:
  listen: 127.0.0.1:22122
  route: front
""")
    assert errors == [
        "routes.yml:6: pool 'lonely': key 'listen': is missing (every pool needs it, unless a route names"
        " the pool)",
        "routes.yml:8: pool 'front': key 'route': replicate routes are for memcached pools only (a Redis"
        " command's effect cannot be copied safely)",
        "routes.yml:11: pool 'front': key 'route': pool 'm' speaks memcache, this pool redis",
        "routes.yml:14: pool 'other': key 'route': pool 'front' has no servers (a route names pools with"
        " servers)",
    ]


def test_tenant_errors():
    head = MEMCACHED_POOLS + "front:\n  listen: 127.0.0.1:22121\n  tenants:\n"
    errors = refusal(head + """\
    a:
      prefix: "x:"
      route: warm
    b:
      prefix: "x:"
      default: true
      route: cold
    c:
      route: cold
      rate_burst: 5
    d:
      default: true
      route: cold
      rate_limit: 0
""")
    assert errors == [
        "routes.yml:17: pool 'front': key 'tenants': tenant 'b': needs exactly one of prefix, default: true"
        " or users (found prefix, default)",
        "routes.yml:21: pool 'front': key 'tenants': tenant 'c': needs exactly one of prefix, default: true"
        " or users (found none)",
        "routes.yml:27: pool 'front': key 'tenants': tenant 'd': rate_limit: requests a second, above 0"
        " (got '0')",
    ]
    # Issue 14 made memcached fronts take tenants chosen by user (memcached logins:
    # tests/test_memcache_login.py); until then this file was refused.
    config = parse(head + """\
    a:
      users: {alice: pw}
      route: {failover: [warm, cold]}
""")
    [front] = [pool for pool in config.pools if pool.name == "front"]
    assert not front.redis and [user for user, _ in front.tenants[0].users] == ["alice"]


def test_tenants_by_user_and_by_prefix_do_not_mix():
    errors = refusal("""\
r:
  redis: true
  servers: [127.0.0.1:6379:1]
front:
  listen: 127.0.0.1:22121
  redis: true
  tenants:
    a: {users: {alice: pw}, route: r}
    b: {users: {alice: other}, route: r}
    c: {prefix: "c:", route: r}
""")
    assert errors == [
        "routes.yml:7: pool 'front': key 'tenants': tenants are chosen either by key prefix (and a default)"
        " or by AUTH user, not both on one listener",
        "routes.yml:9: pool 'front': key 'tenants': tenant 'b': user 'alice' is already tenant 'a''s",
    ]


def test_the_example_in_conf_is_valid():
    from twistedproxy.config import load_config
    import os

    config = load_config(os.path.join(os.path.dirname(__file__), os.pardir, "conf", "routes.yml"))
    assert any(pool.is_front for pool in config.pools)
