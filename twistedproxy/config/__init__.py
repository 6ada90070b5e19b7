"""
Configuration: nutcracker.yml (twemproxy 0.5.0's pools, plus a C{global:}
section for the process model) read into validated, immutable objects.
"""

from twistedproxy.config.loader import (
    DISTRIBUTIONS,
    HASHES,
    LISTEN_MODES,
    ConfigError,
    KeyDoc,
    config_from_dict,
    describe_keys,
    load_config,
    load_config_text,
    parse_config,
)
from twistedproxy.config.model import GlobalConfig, ListenSpec, PoolConfig, ProxyConfig, ServerSpec

__all__ = [
    "DISTRIBUTIONS",
    "HASHES",
    "LISTEN_MODES",
    "ConfigError",
    "GlobalConfig",
    "KeyDoc",
    "ListenSpec",
    "PoolConfig",
    "ProxyConfig",
    "ServerSpec",
    "config_from_dict",
    "describe_keys",
    "load_config",
    "load_config_text",
    "parse_config",
]
