"""
twistedproxy: a twemproxy-compatible caching proxy for memcached and Redis on
Twisted, with an nginx-style master and worker processes.

The public API is small: L{Proxy} builds pools and listening factories from a
configuration (a nutcracker.yml file or a dict), L{load_config} and
L{ConfigError} read and validate configurations.  Everything else lives in
subpackages and may change.
"""

from twistedproxy._version import __version__

__all__ = ["__version__", "Proxy", "build_pool", "load_config", "config_from_dict", "ConfigError"]


def __getattr__(name):
    # Lazy, so that `import twistedproxy` (e.g. for the version) stays cheap.
    if name in ("Proxy", "build_pool"):
        from twistedproxy import api

        return getattr(api, name)
    if name in ("load_config", "config_from_dict", "ConfigError"):
        from twistedproxy import config

        return getattr(config, name)
    raise AttributeError(name)
