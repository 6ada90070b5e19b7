"""
Tests for twistedproxy.config: nutcracker.yml (+ global:) to validated objects.
"""

from __future__ import annotations

import dataclasses
import os
import textwrap
from pathlib import Path

import pytest

from twistedproxy.config import (
    DISTRIBUTIONS,
    HASHES,
    ConfigError,
    GlobalConfig,
    ListenSpec,
    PoolConfig,
    ProxyConfig,
    ServerSpec,
    config_from_dict,
    describe_keys,
    load_config,
    parse_config,
)
from twistedproxy.config import loader

REPO = Path(__file__).resolve().parent.parent

# twemproxy 0.5.0's README example (conf/nutcracker.yml, with the socket mode).
TWEMPROXY_EXAMPLE = """\
alpha:
  listen: 127.0.0.1:22121
  hash: fnv1a_64
  distribution: ketama
  auto_eject_hosts: true
  redis: true
  server_retry_timeout: 2000
  server_failure_limit: 1
  servers:
   - 127.0.0.1:6379:1

beta:
  listen: 127.0.0.1:22122
  hash: fnv1a_64
  hash_tag: "{}"
  distribution: ketama
  auto_eject_hosts: false
  timeout: 400
  redis: true
  servers:
   - 127.0.0.1:6380:1 server1
   - 127.0.0.1:6381:1 server2
   - 127.0.0.1:6382:1 server3
   - 127.0.0.1:6383:1 server4

gamma:
  listen: 127.0.0.1:22123
  hash: fnv1a_64
  distribution: ketama
  timeout: 400
  backlog: 1024
  preconnect: true
  auto_eject_hosts: true
  server_retry_timeout: 2000
  server_failure_limit: 3
  servers:
   - 127.0.0.1:11212:1
   - 127.0.0.1:11213:1

delta:
  listen: 127.0.0.1:22124
  hash: fnv1a_64
  distribution: ketama
  timeout: 100
  auto_eject_hosts: true
  server_retry_timeout: 2000
  server_failure_limit: 1
  servers:
   - 127.0.0.1:11214:1
   - 127.0.0.1:11215:1
   - 127.0.0.1:11216:1
   - 127.0.0.1:11217:1
   - 127.0.0.1:11218:1
   - 127.0.0.1:11219:1
   - 127.0.0.1:11220:1
   - 127.0.0.1:11221:1
   - 127.0.0.1:11222:1
   - 127.0.0.1:11223:1

omega:
  listen: /tmp/gamma 0666
  hash: hsieh
  distribution: ketama
  auto_eject_hosts: false
  servers:
   - 127.0.0.1:11214:100000
   - 127.0.0.1:11215:1
"""

MINIMAL = """\
alpha:
  listen: 127.0.0.1:22121
  servers:
   - 127.0.0.1:11211:1
"""


def yaml_text(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def write(tmp_path: Path, text: str, name: str = "x.yml") -> Path:
    path = tmp_path / name
    path.write_text(yaml_text(text))
    return path


def refusal(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value


def model_defaults(model: type) -> dict:
    return {f.name: f.default for f in dataclasses.fields(model) if f.default is not dataclasses.MISSING}


# ---------------------------------------------------------------- valid files


def test_minimal_pool_gets_every_default():
    config = parse_config(MINIMAL)
    assert isinstance(config, ProxyConfig)
    assert config.source == "<string>"
    (pool,) = config.pools
    assert pool.name == "alpha"
    assert pool.listen == ListenSpec(host="127.0.0.1", port=22121)
    assert pool.servers == (ServerSpec(host="127.0.0.1", port=11211, weight=1),)
    for key, default in model_defaults(PoolConfig).items():
        if key not in ("listen", "servers"):
            assert getattr(pool, key) == default, key
    # twemproxy 0.5.0's defaults, spelled out
    assert pool.hash == "fnv1a_64" and pool.distribution == "ketama"
    assert pool.hash_tag is None and pool.timeout is None
    assert pool.backlog == 512 and pool.client_connections == 0
    assert pool.redis is False and pool.redis_auth is None and pool.redis_db == 0
    assert pool.preconnect is False and pool.auto_eject_hosts is False
    assert pool.server_connections == 1
    assert pool.server_retry_timeout == 30000 and pool.server_failure_limit == 2
    assert pool.tcpkeepalive is False and pool.reuseport is False
    assert pool.protocol == "memcache"


def test_plain_file_gets_global_defaults():
    assert parse_config(MINIMAL).global_ == GlobalConfig()
    assert parse_config(TWEMPROXY_EXAMPLE).global_ == GlobalConfig()


def test_every_pool_key_parsed():
    config = parse_config(yaml_text("""
        full:
          listen: 0.0.0.0:22121
          hash: murmur
          hash_tag: "$$"
          distribution: modula
          timeout: 250
          backlog: 64
          preconnect: true
          redis: true
          redis_auth: s3cret
          redis_db: 3
          server_connections: 4
          auto_eject_hosts: true
          server_retry_timeout: 1500
          server_failure_limit: 5
          tcpkeepalive: true
          reuseport: true
          client_connections: 100
          max_request_bytes: 65536
          client_max_pending: 32
          servers:
           - 127.0.0.1:6379:2 first
           - /tmp/redis.sock:1 second
    """))
    pool = config.pool("full")
    assert pool == PoolConfig(
        name="full",
        listen=ListenSpec(host="0.0.0.0", port=22121),
        servers=(
            ServerSpec(host="127.0.0.1", port=6379, weight=2, name="first"),
            ServerSpec(host=None, port=None, weight=1, name="second", path="/tmp/redis.sock"),
        ),
        hash="murmur", hash_tag=b"$$", distribution="modula", timeout=250, backlog=64,
        preconnect=True, redis=True, redis_auth="s3cret", redis_db=3, server_connections=4,
        auto_eject_hosts=True, server_retry_timeout=1500, server_failure_limit=5,
        tcpkeepalive=True, reuseport=True, client_connections=100, max_request_bytes=65536,
        client_max_pending=32,
    )
    assert pool.protocol == "redis"


def test_twemproxy_example_parses(tmp_path):
    path = write(tmp_path, TWEMPROXY_EXAMPLE, "nutcracker.yml")
    config = load_config(path)
    assert config.source == str(path)
    assert [p.name for p in config.pools] == ["alpha", "beta", "gamma", "delta", "omega"]
    alpha, beta, gamma, delta, omega = config.pools
    assert alpha.redis and alpha.auto_eject_hosts and alpha.server_retry_timeout == 2000
    assert alpha.server_failure_limit == 1 and alpha.timeout is None
    assert beta.hash_tag == b"{}" and beta.timeout == 400
    assert [s.name for s in beta.servers] == ["server1", "server2", "server3", "server4"]
    assert [s.ketama_name for s in beta.servers] == ["server1", "server2", "server3", "server4"]
    assert gamma.backlog == 1024 and gamma.preconnect and not gamma.redis
    assert [s.ketama_name for s in gamma.servers] == ["127.0.0.1:11212", "127.0.0.1:11213"]
    assert len(delta.servers) == 10 and delta.timeout == 100
    assert omega.listen == ListenSpec(path="/tmp/gamma", perm=0o666)
    assert omega.hash == "hsieh"
    assert [s.weight for s in omega.servers] == [100000, 1]


@pytest.mark.parametrize("name", ["admin.yml", "migrate.yml"])
def test_example_confs_of_the_security_and_migration_keys_load(name):
    config = load_config(REPO / "conf" / name)
    if name == "migrate.yml":
        assert [(pool.name, pool.migrate) for pool in config.pools] == [("cache", True), ("sessions", True)]
        assert config.global_.state_dir == "/var/lib/twistedproxy"
    else:
        assert config.global_.control_mode == 0o600 and config.global_.metrics_http is not None
        assert config.pools[0].redis_auth_user == "proxy"


def test_example_conf_in_repo_parses():
    config = load_config(REPO / "conf" / "nutcracker.yml")
    protocols = {pool.protocol for pool in config.pools}
    assert protocols == {"redis", "memcache"}
    for pool in config.pools:
        if pool.listen.is_unix:
            assert pool.listen.path.startswith("/tmp/")
        else:
            assert pool.listen.host == "127.0.0.1"
        for server in pool.servers:
            assert server.is_unix or server.host == "127.0.0.1"


def test_config_objects_are_immutable():
    config = parse_config(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.pools[0].timeout = 5
    assert isinstance(config.pools, tuple) and isinstance(config.pools[0].servers, tuple)


def test_values_read_like_twemproxy():
    pool = parse_config(yaml_text("""
        alpha:
          listen: 127.0.0.1:22121
          timeout: "400"
          redis_db: 0400
          redis: "true"
          redis_auth: 0123
          servers:
           - 127.0.0.1:6379:1
    """)).pools[0]
    # quoted numbers are numbers; a leading zero is decimal, not YAML octal;
    # a numeric password keeps its digits.
    assert pool.timeout == 400 and pool.redis_db == 400
    assert pool.redis is True and pool.redis_auth == "0123"


def test_timeout_zero_means_wait_forever():
    pool = parse_config(MINIMAL + "  timeout: 0\n").pools[0]
    assert pool.timeout is None


def test_empty_optional_value_is_the_default():
    pool = parse_config(MINIMAL + "  timeout:\n  hash_tag:\n").pools[0]
    assert pool.timeout is None and pool.hash_tag is None


def test_every_hash_and_distribution_accepted():
    for hash_name in HASHES:
        for distribution in DISTRIBUTIONS:
            pool = parse_config(MINIMAL + "  hash: %s\n  distribution: %s\n" % (hash_name, distribution)).pools[0]
            assert (pool.hash, pool.distribution) == (hash_name, distribution)
    assert len(HASHES) == 12 and DISTRIBUTIONS == ("ketama", "modula", "random")


def test_listen_forms():
    def listen(value):
        return parse_config("p:\n  listen: %s\n  servers: [127.0.0.1:1:1]\n" % value).pools[0].listen

    assert listen("localhost:22121") == ListenSpec(host="localhost", port=22121)
    assert listen("/tmp/p.sock") == ListenSpec(path="/tmp/p.sock")
    assert listen("/tmp/p.sock 0600") == ListenSpec(path="/tmp/p.sock", perm=0o600)
    assert listen("'[::1]:22121'") == ListenSpec(host="::1", port=22121)
    assert listen("::1:22121") == ListenSpec(host="::1", port=22121)


def test_server_forms():
    servers = parse_config(yaml_text("""
        p:
          listen: 127.0.0.1:22121
          servers:
           - 127.0.0.1:11211:1
           - cache-2.local:11212:3 two
           - "[::1]:11213:1"
           - ::1:11214:1
           - /var/run/memcached.sock:2 sock
    """)).pools[0].servers
    assert servers[0].ketama_name == "127.0.0.1"  # port 11211 is left out, like libmemcached
    assert servers[1] == ServerSpec(host="cache-2.local", port=11212, weight=3, name="two")
    assert servers[2] == ServerSpec(host="::1", port=11213, weight=1)
    assert servers[3] == ServerSpec(host="::1", port=11214, weight=1)
    assert servers[4] == ServerSpec(host=None, port=None, weight=2, name="sock", path="/var/run/memcached.sock")


# ---------------------------------------------------------------- refusals

# (yaml, line, pool or section, key, words the message must contain)
ERROR_CASES = [
    pytest.param("""
        alpha:
          listen: 127.0.0.1:22121
          hash: fnv9
          servers: [127.0.0.1:1:1]
    """, 3, "pool 'alpha'", "hash", "unknown hash 'fnv9' (expected one of: one_at_a_time", id="bad-hash"),
    pytest.param("""
        alpha:
          listen: 127.0.0.1:22121
          distribution: consistent
          servers: [127.0.0.1:1:1]
    """, 3, "pool 'alpha'", "distribution", "unknown distribution 'consistent'", id="bad-distribution"),
    pytest.param("""
        alpha:
          listen: 127.0.0.1:22121
          servers: [127.0.0.1:1:1]
          hashtag: "{}"
    """, 4, "pool 'alpha'", "hashtag", "unknown key (did you mean 'hash_tag'?)", id="unknown-key"),
    pytest.param("""
        alpha:
          listen: 127.0.0.1:22121
          servers: [127.0.0.1:1:1]
          frobnicate: 1
    """, 4, "pool 'alpha'", "frobnicate", "unknown key (expected one of: listen, hash", id="unknown-key-list"),
    pytest.param("""
        alpha:
          listen: 127.0.0.1:22121
          timeout: soon
          servers: [127.0.0.1:1:1]
    """, 3, "pool 'alpha'", "timeout", "expected an integer >= 0, got 'soon'", id="wrong-type-int"),
    pytest.param("""
        alpha:
          listen: 127.0.0.1:22121
          backlog: [1]
          servers: [127.0.0.1:1:1]
    """, 3, "pool 'alpha'", "backlog", "got a list", id="wrong-type-list"),
    pytest.param("""
        alpha:
          listen: 127.0.0.1:22121
          preconnect: yes
          servers: [127.0.0.1:1:1]
    """, 3, "pool 'alpha'", "preconnect", "expected true or false, got 'yes'", id="wrong-type-bool"),
    pytest.param("""
        alpha:
          listen: 127.0.0.1:22121
          redis: True
          servers: [127.0.0.1:1:1]
    """, 3, "pool 'alpha'", "redis", "expected true or false, got 'True'", id="bool-is-lowercase"),
    pytest.param("""
        alpha:
          listen: 127.0.0.1
          servers: [127.0.0.1:1:1]
    """, 2, "pool 'alpha'", "listen", "expected 'host:port'", id="listen-no-port"),
    pytest.param("""
        alpha:
          listen: 127.0.0.1:99999
          servers: [127.0.0.1:1:1]
    """, 2, "pool 'alpha'", "listen", "invalid port '99999'", id="listen-bad-port"),
    pytest.param("""
        alpha:
          listen: bad host:1
          servers: [127.0.0.1:1:1]
    """, 2, "pool 'alpha'", "listen", "invalid host 'bad host'", id="listen-bad-host"),
    pytest.param("""
        alpha:
          listen: /tmp/a.sock 0999
          servers: [127.0.0.1:1:1]
    """, 2, "pool 'alpha'", "listen", "invalid socket permissions '0999'", id="listen-bad-perm"),
    pytest.param("""
        alpha:
          listen: /tmp/%s.sock
          servers: [127.0.0.1:1:1]
    """ % ("x" * 120), 2, "pool 'alpha'", "listen", "too long", id="listen-path-too-long"),
    pytest.param("""
        alpha:
          hash: md5
          servers: [127.0.0.1:1:1]
    """, 1, "pool 'alpha'", "listen", "is missing", id="missing-listen"),
    pytest.param("""
        alpha:
          listen: 127.0.0.1:22121
    """, 1, "pool 'alpha'", "servers", "is missing", id="missing-servers"),
    pytest.param("""
        alpha:
          listen: 127.0.0.1:22121
          servers: []
    """, 3, "pool 'alpha'", "servers", "is empty", id="empty-servers"),
    pytest.param("""
        alpha:
          listen: 127.0.0.1:22121
          servers: 127.0.0.1:6379:1
    """, 3, "pool 'alpha'", "servers", "expected a list of servers", id="servers-not-a-list"),
    pytest.param("""
        alpha:
          listen: 127.0.0.1:22121
          servers:
           - 127.0.0.1:6379:1
           - 127.0.0.1:6380
    """, 5, "pool 'alpha'", "servers", "server '127.0.0.1:6380': expected 'host:port:weight [name]'",
        id="bad-server-line"),
    pytest.param("""
        alpha:
          listen: 127.0.0.1:22121
          servers:
           - 127.0.0.1:6379:1 a b
    """, 4, "pool 'alpha'", "servers", "expected 'host:port:weight [name]'", id="server-extra-words"),
    pytest.param("""
        alpha:
          listen: 127.0.0.1:22121
          servers:
           - 127.0.0.1:0:1
    """, 4, "pool 'alpha'", "servers", "invalid port '0'", id="bad-server-port"),
    pytest.param("""
        alpha:
          listen: 127.0.0.1:22121
          servers:
           - 127.0.0.1:6379:heavy
    """, 4, "pool 'alpha'", "servers", "invalid weight 'heavy'", id="bad-weight"),
    pytest.param("""
        alpha:
          listen: 127.0.0.1:22121
          servers:
           - 127.0.0.1:6379:0
    """, 4, "pool 'alpha'", "servers", "weight must be at least 1 (got 0)", id="zero-weight"),
    pytest.param("""
        alpha:
          listen: 127.0.0.1:22121
          servers:
           - 127.0.0.1:6379:1
           - 127.0.0.1:6379:2
    """, 5, "pool 'alpha'", "servers", "same address as the server on line 4", id="duplicate-server-address"),
    pytest.param("""
        alpha:
          listen: 127.0.0.1:22121
          servers:
           - 127.0.0.1:6379:1 shard
           - 127.0.0.1:6380:1 shard
    """, 5, "pool 'alpha'", "servers", "name 'shard' is already used by the server on line 4",
        id="duplicate-server-name"),
    pytest.param("""
        alpha:
          listen: 127.0.0.1:22121
          servers:
           - 127.0.0.1:6379:1
           - 127.0.0.1:6380:1 127.0.0.1:6379
    """, 5, "pool 'alpha'", "servers", "name '127.0.0.1:6379' is already used", id="name-clashes-with-address"),
    pytest.param("""
        alpha:
          listen: 127.0.0.1:22121
          servers: [127.0.0.1:1:1]
        beta:
          listen: 127.0.0.1:22121
          servers: [127.0.0.1:2:1]
    """, 5, "pool 'beta'", "listen", "address 127.0.0.1:22121 is already used by pool 'alpha' (line 2)",
        id="duplicate-listen"),
    pytest.param("""
        alpha:
          listen: 127.0.0.1:22121
          hash: md5
          servers: [127.0.0.1:1:1]
          hash: crc32
    """, 5, "pool 'alpha'", "hash", "duplicate key (first set on line 3)", id="duplicate-key"),
    pytest.param("""
        alpha:
          listen: 127.0.0.1:22121
          hash_tag: "{"
          servers: [127.0.0.1:1:1]
    """, 3, "pool 'alpha'", "hash_tag", "must be exactly 2 characters", id="hash-tag-short"),
    pytest.param("""
        alpha:
          listen: 127.0.0.1:22121
          hash_tag: {}
          servers: [127.0.0.1:1:1]
    """, 3, "pool 'alpha'", "hash_tag", 'quote it: hash_tag: "{}"', id="hash-tag-unquoted"),
    pytest.param("""
        alpha:
          listen: 127.0.0.1:22121
          redis_auth: secret
          servers: [127.0.0.1:1:1]
    """, 3, "pool 'alpha'", "redis_auth", "only valid in a redis pool", id="redis-auth-on-memcache"),
    pytest.param("""
        alpha:
          listen: 127.0.0.1:22121
          timeout: -1
          servers: [127.0.0.1:1:1]
    """, 3, "pool 'alpha'", "timeout", "must not be negative (got -1)", id="negative-timeout"),
    pytest.param("""
        alpha:
          listen: 127.0.0.1:22121
          server_failure_limit: -2
          servers: [127.0.0.1:1:1]
    """, 3, "pool 'alpha'", "server_failure_limit", "must not be negative", id="negative-limit"),
    pytest.param("""
        alpha:
          listen: 127.0.0.1:22121
          server_connections: 0
          servers: [127.0.0.1:1:1]
    """, 3, "pool 'alpha'", "server_connections", "must be at least 1 (got 0)", id="zero-server-connections"),
    pytest.param("""
        alpha:
          listen:
          servers: [127.0.0.1:1:1]
    """, 2, "pool 'alpha'", "listen", "has no value", id="empty-listen"),
    pytest.param("""
        global:
          worker_processes: many
        alpha:
          listen: 127.0.0.1:22121
          servers: [127.0.0.1:1:1]
    """, 2, "section 'global'", "worker_processes", "expected an integer >= 0, got 'many'",
        id="global-bad-workers"),
    pytest.param("""
        global:
          workers: 4
        alpha:
          listen: 127.0.0.1:22121
          servers: [127.0.0.1:1:1]
    """, 2, "section 'global'", "workers", "unknown key", id="global-unknown-key"),
    pytest.param("""
        global:
          listen_mode: fork
        alpha:
          listen: 127.0.0.1:22121
          servers: [127.0.0.1:1:1]
    """, 2, "section 'global'", "listen_mode", "unknown listen mode 'fork' (expected one of: reuseport, shared)",
        id="global-bad-listen-mode"),
    pytest.param("""
        global:
          worker_cpu_affinity: ["0102"]
        alpha:
          listen: 127.0.0.1:22121
          servers: [127.0.0.1:1:1]
    """, 2, "section 'global'", "worker_cpu_affinity", "invalid CPU bitmask '0102'", id="global-bad-mask"),
    pytest.param("""
        global:
          worker_shutdown_timeout: -1.5
        alpha:
          listen: 127.0.0.1:22121
          servers: [127.0.0.1:1:1]
    """, 2, "section 'global'", "worker_shutdown_timeout", "must not be negative", id="global-negative-seconds"),
]


@pytest.mark.parametrize("text, line, section, key, words", ERROR_CASES)
def test_refusal_names_file_line_pool_and_key(tmp_path, text, line, section, key, words):
    error = refusal(tmp_path, text)
    path = str(tmp_path / "x.yml")
    assert len(error.errors) == 1, error.errors
    message = error.errors[0]
    assert message.startswith("%s:%d: %s: key '%s': " % (path, line, section, key)), message
    assert words in message
    assert str(error) == message


def test_yaml_syntax_error_has_line(tmp_path):
    error = refusal(tmp_path, """
        alpha:
          listen: 127.0.0.1:22121
          servers: [127.0.0.1:1:1
        beta:
          listen: 127.0.0.1:22122
    """)
    (message,) = error.errors
    assert message.startswith(str(tmp_path / "x.yml") + ":")
    assert "invalid YAML" in message
    line = int(message[len(str(tmp_path / "x.yml")) + 1:].split(":", 1)[0])
    assert 3 <= line <= 5


def test_yaml_bad_indent_names_line(tmp_path):
    error = refusal(tmp_path, """
        alpha:
          listen: 127.0.0.1:22121
           hash: md5
    """)
    assert error.errors[0].startswith(str(tmp_path / "x.yml") + ":3: invalid YAML: ")


def test_top_level_not_a_mapping(tmp_path):
    error = refusal(tmp_path, """
        - alpha
        - beta
    """)
    assert error.errors == [
        "%s:1: expected a mapping of pool names to pools at the top level, got a list" % (tmp_path / "x.yml")
    ]


def test_pool_not_a_mapping(tmp_path):
    error = refusal(tmp_path, """
        alpha:
          - listen: 127.0.0.1:22121
    """)
    assert error.errors == ["%s:1: pool 'alpha': expected a mapping of pool keys, got a list" % (tmp_path / "x.yml")]


def test_duplicate_pool_name(tmp_path):
    error = refusal(tmp_path, MINIMAL + MINIMAL.replace("22121", "22122"))
    assert error.errors == ["%s:5: duplicate pool 'alpha' (first defined on line 1)" % (tmp_path / "x.yml")]


def test_empty_file_and_no_pools(tmp_path):
    error = refusal(tmp_path, "# nothing here\n")
    assert error.errors == ["%s: no pools defined (the file is empty)" % (tmp_path / "x.yml")]
    error = refusal(tmp_path, "global:\n  worker_processes: 2\n")
    assert error.errors == ["%s:1: no pools defined" % (tmp_path / "x.yml")]


def test_several_errors_reported_at_once_in_file_order(tmp_path):
    error = refusal(tmp_path, """
        alpha:
          listen: 127.0.0.1:22121
          hash: fnv9
          timeout: -3
          servers:
           - 127.0.0.1:6379:1
           - 127.0.0.1:6379:1
           - nonsense
        beta:
          listen: 127.0.0.1:22121
          redis: maybe
          servers: [127.0.0.1:1:1]
        global:
          worker_processes: -1
    """)
    path = str(tmp_path / "x.yml")
    lines = [int(message[len(path) + 1:].split(":", 1)[0]) for message in error.errors]
    assert lines == [3, 4, 7, 8, 10, 11, 14]
    assert all(message.startswith(path + ":") for message in error.errors)
    assert str(error).split("\n") == error.errors
    assert "key 'hash'" in error.errors[0] and "key 'timeout'" in error.errors[1]
    assert "pool 'beta': key 'listen'" in error.errors[4]
    assert "section 'global': key 'worker_processes'" in error.errors[6]


def test_unreadable_file(tmp_path):
    missing = tmp_path / "missing.yml"
    with pytest.raises(ConfigError) as caught:
        load_config(missing)
    assert caught.value.errors[0].startswith(str(missing) + ": cannot read the configuration")


def test_unsupported_yaml_constructs(tmp_path):
    error = refusal(tmp_path, """
        alpha:
          listen: !!python/name:os.system 127.0.0.1:22121
    """)
    assert "x.yml:2: unsupported YAML tag" in error.errors[0]
    error = refusal(tmp_path, """
        defaults: &defaults
          hash: md5
        alpha:
          <<: *defaults
          listen: 127.0.0.1:22121
    """)
    assert "x.yml:4: YAML merge keys" in error.errors[0]


# ---------------------------------------------------------------- global section


def global_config(text: str) -> GlobalConfig:
    return parse_config(yaml_text(text) + MINIMAL).global_


def test_global_section_all_keys():
    config = global_config("""
        global:
          worker_processes: 4
          worker_cpu_affinity: [0, 1, 2, 3]
          worker_shutdown_timeout: 2.5
          listen_mode: shared
          accept_mutex: true
          tcp_quickack: true
          control: /tmp/tp.ctl
          user: nobody
          group: nogroup
    """)
    assert config == GlobalConfig(
        worker_processes=4, worker_cpu_affinity=((0,), (1,), (2,), (3,)), worker_shutdown_timeout=2.5,
        listen_mode="shared", accept_mutex=True, tcp_quickack=True, control="/tmp/tp.ctl",
        user="nobody", group="nogroup",
    )
    assert [p.name for p in parse_config("global:\n  worker_processes: 1\n" + MINIMAL).pools] == ["alpha"]


def test_global_empty_section_is_defaults():
    assert global_config("global:\n") == GlobalConfig()
    assert global_config("global: {}\n") == GlobalConfig()


def test_admin_token_one_way_or_the_other(tmp_path):
    assert global_config("global:\n  admin_token: abc\n").admin_token == "abc"
    assert global_config("global:\n  admin_token_file: /etc/tp.token\n").admin_token_file == "/etc/tp.token"
    error = refusal(tmp_path, yaml_text("""
        global:
          admin_token: abc
          admin_token_file: /etc/tp.token
    """) + MINIMAL)
    assert "key 'admin_token_file': set admin_token or admin_token_file, not both" in error.errors[0]


def test_worker_processes_auto_and_ints(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert global_config("global:\n  worker_processes: auto\n").worker_processes == 6
    assert global_config("global:\n  worker_processes: 0\n").worker_processes == 0
    assert global_config("global:\n  worker_processes: 12\n").worker_processes == 12
    assert global_config("global:\n  worker_shutdown_timeout: 3\n").worker_shutdown_timeout == 3.0


def test_cpu_affinity_auto_round_robin(monkeypatch):
    monkeypatch.setattr(loader, "_available_cpus", lambda: [2, 3, 5])
    config = global_config("global:\n  worker_processes: 5\n  worker_cpu_affinity: auto\n")
    assert config.worker_cpu_affinity == ((2,), (3,), (5,), (2,), (3,))
    # a single process gets one set too
    config = global_config("global:\n  worker_cpu_affinity: auto\n")
    assert config.worker_cpu_affinity == ((2,),)


def test_available_cpus_falls_back_to_cpu_count(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert loader._available_cpus() == [0, 1, 2]


def test_cpu_affinity_explicit_forms():
    config = global_config("""
        global:
          worker_processes: 4
          worker_cpu_affinity: [3, [0, 2], "0110", 0101]
    """)
    assert config.worker_cpu_affinity == ((3,), (0, 2), (1, 2), (0, 2))


def test_cpu_affinity_nginx_string_and_padding():
    config = global_config("""
        global:
          worker_processes: 3
          worker_cpu_affinity: 0001 0010
    """)
    # fewer entries than workers: the last one is reused, as in nginx
    assert config.worker_cpu_affinity == ((0,), (1,), (1,))


@pytest.mark.parametrize("value", ["off", "false", "~", "null"])
def test_cpu_affinity_off(value):
    assert global_config("global:\n  worker_processes: 2\n  worker_cpu_affinity: %s\n" % value).worker_cpu_affinity is None
    assert global_config("global:\n  worker_processes: 2\n").worker_cpu_affinity is None


@pytest.mark.parametrize("value, words", [
    ("[]", "is an empty list"),
    ("[[]]", "an empty list of CPUs"),
    ("[-1]", "invalid CPU number -1"),
    ("[5000]", "invalid CPU number 5000"),
    ('["0000"]', "invalid CPU bitmask '0000'"),
    ("true", "expected auto, off"),
    ("{a: 1}", "expected auto, off"),
])
def test_cpu_affinity_refusals(value, words):
    with pytest.raises(ConfigError) as caught:
        parse_config("global:\n  worker_cpu_affinity: %s\n" % value + MINIMAL, "g.yml")
    (message,) = caught.value.errors
    assert message.startswith("g.yml:2: section 'global': key 'worker_cpu_affinity': ")
    assert words in message


def test_duplicate_global_section():
    with pytest.raises(ConfigError) as caught:
        parse_config("global: {}\n" + MINIMAL + "global: {}\n", "g.yml")
    assert caught.value.errors == ["g.yml:6: duplicate section 'global' (first defined on line 1)"]


# ---------------------------------------------------------------- dicts and the key table


def test_config_from_dict_same_rules():
    config = config_from_dict({
        "alpha": {"listen": "127.0.0.1:22121", "redis": True, "timeout": 300, "hash_tag": "{}",
                  "servers": ["127.0.0.1:6379:1", "127.0.0.1:6380:1"]},
        "global": {"worker_processes": 2, "worker_cpu_affinity": [[0, 1], "0100"]},
    })
    assert config.source == "<dict>"
    pool = config.pool("alpha")
    assert pool.redis and pool.timeout == 300 and pool.hash_tag == b"{}"
    assert len(pool.servers) == 2
    assert config.global_.worker_cpu_affinity == ((0, 1), (2,))
    with pytest.raises(KeyError):
        config.pool("beta")


def test_config_from_dict_errors_have_no_lines():
    with pytest.raises(ConfigError) as caught:
        config_from_dict({
            "alpha": {"listen": "127.0.0.1:22121", "redis": "yes", "servers": ["a:1:1", "a:1:1"]},
            "beta": {"servers": []},
        }, source="embedded")
    assert caught.value.errors == [
        "embedded: pool 'alpha': key 'redis': expected true or false, got 'yes'",
        "embedded: pool 'alpha': key 'servers': server 'a:1:1': same address as the server on entry 1",
        "embedded: pool 'beta': key 'servers': is empty: a pool needs at least one server",
        "embedded: pool 'beta': key 'listen': is missing (every pool needs it)",
    ]
    with pytest.raises(ConfigError) as caught:
        config_from_dict(["alpha"])
    assert caught.value.errors == ["<dict>: expected a mapping of pool names to pools at the top level, got a list"]


def test_key_table_matches_the_model():
    docs = describe_keys()
    pool_keys = {doc.key for doc in docs if doc.section == "pool"}
    global_keys = {doc.key for doc in docs if doc.section == "global"}
    assert pool_keys == {f.name for f in dataclasses.fields(PoolConfig)} - {"name"}
    assert global_keys == {f.name for f in dataclasses.fields(GlobalConfig)} - {"extra"}
    by_key = {(doc.section, doc.key): doc for doc in docs}
    assert by_key["pool", "listen"].required and by_key["pool", "servers"].required
    assert by_key["pool", "backlog"].default == 512
    assert by_key["pool", "hash"].default == "fnv1a_64"
    assert by_key["global", "listen_mode"].default == "reuseport"
    assert all(doc.type and doc.meaning for doc in docs)
