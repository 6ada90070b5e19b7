"""The online migration keys of the configuration and what migrate: true refuses."""

from __future__ import annotations

import pytest

from twistedproxy.config import ConfigError, config_from_dict
from twistedproxy.migration.state import FileStore, state_dir


def pool(**keys):
    data = {"listen": "127.0.0.1:22121", "redis": True, "servers": ["127.0.0.1:7001:1", "127.0.0.1:7002:1"]}
    data.update(keys)
    return data


def refusals(**keys):
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"alpha": pool(**keys)})
    return caught.value.errors


def test_defaults_and_values():
    config = config_from_dict({"alpha": pool(), "global": {"state_dir": "/var/lib/cacheproxy"}})
    alpha = config.pool("alpha")
    assert (alpha.migrate, alpha.migrate_rate, alpha.migrate_match) == (False, 10000, None)
    assert config.global_.state_dir == "/var/lib/cacheproxy"
    alpha = config_from_dict({"alpha": pool(migrate=True, migrate_rate=0, migrate_match="user:*")}).pool("alpha")
    assert (alpha.migrate, alpha.migrate_rate, alpha.migrate_match) == (True, 0, "user:*")
    assert refusals(migrate_rate=-1) == ["<dict>: pool 'alpha': key 'migrate_rate': must not be negative (got -1)"]


def test_what_migrate_refuses():
    assert refusals(migrate=True, redis_cluster=True) == [
        "<dict>: pool 'alpha': key 'migrate': cannot move keys online: a Redis Cluster pool moves its slots itself"]
    assert refusals(migrate=True, distribution="random") == [
        "<dict>: pool 'alpha': key 'migrate': cannot move keys online: distribution random places no key on"
        " one server"]
    assert refusals(migrate=True, servers=["/tmp/redis.sock:1", "127.0.0.1:7002:1"]) == [
        "<dict>: pool 'alpha': key 'migrate': cannot move keys online: Redis MIGRATE needs host:port servers, not"
        " UNIX sockets ('/tmp/redis.sock')"]
    # memcached servers on UNIX sockets are fine (the meta commands go through the proxy's connections).
    config_from_dict({"alpha": pool(migrate=True, redis=False, servers=["/tmp/mc.sock:1"])})
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"front": {"listen": "127.0.0.1:22121", "route": "alpha", "migrate": True},
                          "alpha": pool(listen="127.0.0.1:22122")})
    assert any("key 'migrate': applies to pools with servers" in error for error in caught.value.errors)


def test_backend_tls_is_refused():
    errors = refusals(migrate=True, backend_tls=True)
    assert ("<dict>: pool 'alpha': key 'migrate': cannot move keys online: the servers are reached over TLS"
            " (backend_tls), which Redis MIGRATE does not speak") in errors


def test_state_dir_and_files(tmp_path):
    config = config_from_dict({"alpha": pool()})
    path = str(tmp_path / "conf" / "nutcracker.yml")
    assert state_dir(config, path) == str(tmp_path / "conf")
    config = config_from_dict({"alpha": pool(), "global": {"state_dir": "state"}})
    assert state_dir(config, path) == str(tmp_path / "conf" / "state")
    store = FileStore(str(tmp_path))
    store.save("alpha", {"plan": None, "record": {"state": "done"}})
    assert (tmp_path / "cacheproxy-migration-alpha.json").exists()
    assert store.load() == {"alpha": {"plan": None, "record": {"state": "done"}}}
    store.remove("alpha")
    assert store.load() == {} and not (tmp_path / "cacheproxy-migration-alpha.json").exists()
    (tmp_path / "cacheproxy-migration-beta.json").write_text("{not json")
    with pytest.raises(ValueError):
        store.load()
