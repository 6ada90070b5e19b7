"""
twemproxy 0.5.0's key hashing and server distribution, bit for bit.

  - L{hash_function}(name) gives the C{bytes -> uint32} hash twemproxy routes on
    for a C{hash:} name in L{HASH_NAMES};
  - L{hash_tag_key} applies a pool's C{hash_tag:} to a key before hashing;
  - L{make_distribution}(name, live_servers) builds a C{distribution:} in
    L{DISTRIBUTION_NAMES} whose C{index(hash)} picks one of the live servers.
"""

from twistedproxy.hashing.distributions import DISTRIBUTION_NAMES, make_distribution
from twistedproxy.hashing.functions import HASH_NAMES, hash_function
from twistedproxy.hashing.hashtag import hash_tag_key

__all__ = [
    "HASH_NAMES",
    "hash_function",
    "DISTRIBUTION_NAMES",
    "hash_tag_key",
    "make_distribution",
]
