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
# Every other one is longer than 16 bytes: PyPy hashes keys up to 16 bytes and
# longer ones by different code (hashing/functions.py), and the warm-up must
# compile both, whichever lengths a pool's clients send.
WARMUP_KEYS = [
    (b"w:%s" if i % 2 == 0 else b"warmup:%s") % hashlib.md5(b"%d" % i).hexdigest()[:10].encode("ascii")
    for i in range(12)
]


def codec_for(protocol: str):
    """The codec object of the protocol named C{protocol} ('redis', 'memcache')."""
    return _provided(PROTOCOL_MODULES, protocol, "codec",
                     "unknown protocol %r (known: %s)" % (protocol, ", ".join(sorted(PROTOCOL_MODULES))))


def _provided(modules: dict, protocol: str, name: str, refusal: str):
    """The object C{name} of the module C{modules} maps C{protocol} to; ValueError(C{refusal}) if none."""
    try:
        module_name = modules[protocol]
    except KeyError:
        raise ValueError(refusal)
    return getattr(importlib.import_module(module_name), name)


# The protocols whose servers may form a slot cluster (a pool with redis_cluster: true).
CLUSTER_MODULES = {
    "redis": "twistedproxy.protocols.redis_cluster",
}


def cluster_for(protocol: str):
    """The L{interface.ISlotCluster} of the protocol named C{protocol} ('redis')."""
    return _provided(CLUSTER_MODULES, protocol, "cluster", "protocol %r has no cluster mode" % (protocol,))


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
    return _provided(MIGRATION_MODULES, protocol, "migration", "protocol %r cannot migrate keys" % (protocol,))
