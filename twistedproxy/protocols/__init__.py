"""
The wire protocols, one module each behind L{interface.ICodec}.

Pools name their protocol (C{redis: true} or not); L{codec_for} maps that name to
the module that implements it.  Adding a protocol means adding a module and a
line to L{PROTOCOL_MODULES}.
"""

from __future__ import annotations

import hashlib
import importlib

PROTOCOL_MODULES = {
    "redis": "twistedproxy.protocols.redis",
    "memcache": "twistedproxy.protocols.memcache",
}

# Keys of the codecs' warm-up samples (ICodec.warmup_samples): unlike keys that
# differ in one character, any hash function spreads them over a pool's servers.
WARMUP_KEYS = [b"warmup:" + hashlib.md5(b"%d" % i).hexdigest()[:10].encode("ascii") for i in range(12)]


def codec_for(protocol: str):
    """The codec object of the protocol named C{protocol} ('redis', 'memcache')."""
    try:
        module_name = PROTOCOL_MODULES[protocol]
    except KeyError:
        raise ValueError("unknown protocol %r (known: %s)" % (protocol, ", ".join(sorted(PROTOCOL_MODULES))))
    return importlib.import_module(module_name).codec


# The protocols whose servers may form a slot cluster (a pool with redis_cluster: true).
CLUSTER_MODULES = {
    "redis": "twistedproxy.protocols.redis_cluster",
}


def cluster_for(protocol: str):
    """The L{interface.ISlotCluster} of the protocol named C{protocol} ('redis')."""
    try:
        module_name = CLUSTER_MODULES[protocol]
    except KeyError:
        raise ValueError("protocol %r has no cluster mode" % (protocol,))
    return importlib.import_module(module_name).cluster


def codecs_of(codec) -> tuple:
    """
    Every codec a pool's clients may end up speaking: a sniffing codec (memcached
    text or binary on one port) lists them in C{codecs}; others speak only themselves.
    """
    return tuple(getattr(codec, "codecs", None) or (codec,))


# The protocols whose pools can move keys between servers online (migrate: true).
MIGRATION_MODULES = {
    "redis": "twistedproxy.protocols.redis_migration",
    "memcache": "twistedproxy.protocols.memcache_migration",
}


def migration_for(protocol: str):
    """The L{interface.IKeyMigration} of the protocol named C{protocol} ('redis', 'memcache')."""
    try:
        module_name = MIGRATION_MODULES[protocol]
    except KeyError:
        raise ValueError("protocol %r cannot migrate keys" % (protocol,))
    return importlib.import_module(module_name).migration
