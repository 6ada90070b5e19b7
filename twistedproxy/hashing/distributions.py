"""
twemproxy 0.5.0's key distributions (src/hashkit/nc_ketama.c, nc_modula.c,
nc_random.c).

A distribution is built from the LIVE servers of a pool, in configuration
order, as C{(ketama_name, weight)} pairs; its C{index(hash_value)} names the
position in that list that a key hash goes to.  Rebuild it whenever the set
of live servers changes, as twemproxy rebuilds its continuum.

twemproxy does not keep a pool's servers in configuration order: checking
for duplicate names (nc_conf.c conf_validate_server) sorts them by name,
shorter names first, then bytewise, and the continuum is built in that
order.  That decides which server owns which modula slot, so the
distributions here sort the same way and map back to the caller's indices.
"""

from __future__ import annotations

import random
import struct
from array import array
from bisect import bisect_left
from math import floor
from typing import List, Optional, Sequence, Tuple, Union

from twistedproxy.hashing.functions import md5

DISTRIBUTION_NAMES: Tuple[str, ...] = ("ketama", "modula", "random")

ServerName = Union[str, bytes]

KETAMA_POINTS_PER_SERVER = 160
KETAMA_POINTS_PER_HASH = 4  # one md5 digest gives four 32-bit points
# snprintf() into a 273-byte buffer keeps at most 272 bytes of "name-N".
KETAMA_MAX_POINT_NAME = 272

_float32 = struct.Struct("<f")
_unpack_md5_points = struct.Struct("<4I").unpack


def _to_float32(value: float) -> float:
    """Round a double to the nearest IEEE single, as a C (float) cast does."""
    return _float32.unpack(_float32.pack(value))[0]


def _name_bytes(name: ServerName) -> bytes:
    return name if isinstance(name, bytes) else name.encode("utf-8")


def _twemproxy_order(
    servers: Sequence[Tuple[ServerName, int]]
) -> List[Tuple[int, bytes, int]]:
    """
    C{(caller's index, name, weight)} for each server, in twemproxy's order
    (by name: shorter first, then bytewise, as nc_string.c string_compare).
    Raises C{ValueError} for no servers, a weight below 1 or a repeated name.
    """
    if not servers:
        raise ValueError("a distribution needs at least one live server")
    ordered = []
    for index, (name, weight) in enumerate(servers):
        if not isinstance(weight, int) or weight <= 0:
            raise ValueError("server %r has invalid weight %r" % (name, weight))
        ordered.append((index, _name_bytes(name), weight))
    ordered.sort(key=_twemproxy_name_order)
    for (_, name, _), (_, next_name, _) in zip(ordered, ordered[1:]):
        if name == next_name:
            raise ValueError("two servers are named %r" % name)
    return ordered


def _twemproxy_name_order(server: Tuple[int, bytes, int]) -> Tuple[int, bytes]:
    name = server[1]
    return len(name), name


def ketama_points(weight: int, total_weight: int, nlive_server: int) -> int:
    """
    The number of continuum points twemproxy gives a server (ketama_update).

    C evaluates C{floorf((float)(pct * 160 / 4 * (float)n + 0.0000000001)) * 4}
    with C{pct = (float)weight / (float)total_weight}: every step is rounded to
    single precision except the addition of the double constant.  Each single
    operation is done here in double and rounded once, which gives the same
    single-precision result because a double holds the exact product or
    quotient of two singles closely enough.
    """
    pct = _to_float32(_to_float32(weight) / _to_float32(total_weight))
    scaled = _to_float32(pct * KETAMA_POINTS_PER_SERVER)
    scaled = _to_float32(scaled / KETAMA_POINTS_PER_HASH)
    scaled = _to_float32(scaled * _to_float32(nlive_server))
    return floor(_to_float32(scaled + 0.0000000001)) * KETAMA_POINTS_PER_HASH


class KetamaDistribution:
    """
    twemproxy's ketama continuum: MD5 points per server proportional to its
    weight; a hash goes to the first point at or above it, wrapping to the
    lowest point.
    """

    __slots__ = ("_values", "_owners", "_first", "_shift", "points_per_server")

    def __init__(self, servers: Sequence[Tuple[ServerName, int]]) -> None:
        ordered = _twemproxy_order(servers)
        total_weight = sum(weight for _, weight in servers)
        nlive_server = len(servers)
        points: List[Tuple[int, int]] = []
        self.points_per_server: List[int] = [0] * nlive_server
        for server_index, name, weight in ordered:
            npoints = ketama_points(weight, total_weight, nlive_server)
            self.points_per_server[server_index] = npoints
            prefix = name + b"-"
            for digest_index in range(npoints // KETAMA_POINTS_PER_HASH):
                point_name = (prefix + b"%d" % digest_index)[:KETAMA_MAX_POINT_NAME]
                for value in _unpack_md5_points(md5(point_name).digest()):
                    points.append((value, server_index))
        # A stable sort on the value alone: on equal values glibc's qsort
        # (a merge sort) keeps twemproxy's insertion order, and a lookup takes
        # the first of them.
        points.sort(key=_point_value)
        # A trailing value above every 32-bit hash, with a copy of the first
        # owner, makes a hash above every point wrap around without a branch.
        self._values = [value for value, _ in points]
        self._values.append(_ABOVE_EVERY_HASH)
        self._owners = [owner for _, owner in points]
        self._owners.append(self._owners[0])
        self._first = self._first_points_by_top_bits()

    def _first_points_by_top_bits(self) -> array:
        """
        For each value of a hash's top C{32 - _shift} bits (a bucket), the
        index of the first point at or above the bucket's lowest hash: a lookup
        starts there instead of a binary search over the whole continuum, and
        steps past the bucket's points below its hash.

        The table is read at a random place per request, and what that costs is
        whether it is still in the CPU's cache from the requests before (the
        allocations in between stream through it): perf put 5% of PyPy's CPU at
        -P 16 on that read when the table was a list of 65536 (512 KiB), 2-2.5%
        with 64 KiB, nothing visible with 16 KiB.  So it has two bytes an entry
        (four for 65535 points or more) and about 16 buckets a point: 16 KiB
        for two servers (9 of whose 8192 buckets held two points, for the
        two tried).
        """
        values = self._values
        count = len(values) - 1  # without the value above every hash
        bits = min(16, max(8, (count * _BUCKETS_PER_POINT - 1).bit_length()))
        shift = 32 - bits
        first = array("H" if count < 0xFFFF else "L", [0]) * (1 << bits)
        i = 0
        for bucket in range(1 << bits):
            low = bucket << shift
            while values[i] < low:  # the value above every hash ends it
                i += 1
            first[bucket] = i
        self._shift = shift
        return first

    @property
    def continuum(self) -> List[Tuple[int, int]]:
        """The sorted C{(point value, server index)} pairs, for inspection."""
        return list(zip(self._values[:-1], self._owners))

    def index(self, hash_value: int) -> int:
        """The server index for C{hash_value} (ketama_dispatch)."""
        values = self._values
        i = self._first[hash_value >> self._shift]
        # One step past a point below the hash, without a branch ((a - b) >> 63
        # is -1 when a < b, else 0): PyPy compiles a branch that a few per cent
        # of hashes take as a bridge of its own once serving, milliseconds
        # long, since the warm-up's few keys may never take it.  Only a bucket
        # with two points or more can need more: fewer than one hash in a thousand
        # for two servers.  (A second step made the request's trace too long
        # for PyPy at redis -P 16: bench/corepath.py's minor collections went
        # from 16 to 24 per 100k requests.)
        i -= (values[i] - hash_value) >> 63
        if values[i] < hash_value:
            i = bisect_left(values, hash_value, i)
        return self._owners[i]


# Buckets of the first-points table per continuum point (see _first_points_by_top_bits).
_BUCKETS_PER_POINT = 16

# Above every 32-bit hash: the continuum's last value, so a lookup never runs off its end.
_ABOVE_EVERY_HASH = 1 << 32


def _point_value(point: Tuple[int, int]) -> int:
    return point[0]


class ModulaDistribution:
    """
    twemproxy's modula: a continuum with C{weight} consecutive slots per server,
    servers in twemproxy's name order; a hash goes to slot C{hash % total_weight}.
    """

    __slots__ = ("_slots", "_nslots")

    def __init__(self, servers: Sequence[Tuple[ServerName, int]]) -> None:
        self._slots = [
            server_index
            for server_index, _, weight in _twemproxy_order(servers)
            for _ in range(weight)
        ]
        self._nslots = len(self._slots)

    def index(self, hash_value: int) -> int:
        """The server index for C{hash_value} (modula_dispatch)."""
        return self._slots[hash_value % self._nslots]


class RandomDistribution:
    """
    twemproxy's random: each live server equally likely, whatever its weight,
    and the hash ignored.

    Without C{rng} it draws from its own generator seeded by the OS.  A
    distribution built before C{fork()} gives every child the same sequence,
    so build it in the process that uses it, or pass an C{rng}.
    """

    __slots__ = ("_random", "_nserver")

    def __init__(
        self,
        servers: Sequence[Tuple[ServerName, int]],
        rng: Optional[random.Random] = None,
    ) -> None:
        _twemproxy_order(servers)  # validates
        self._random = (rng if rng is not None else random.Random()).random
        self._nserver = len(servers)

    def index(self, hash_value: int) -> int:
        """A uniformly random server index (random_dispatch)."""
        return int(self._random() * self._nserver)


Distribution = Union[KetamaDistribution, ModulaDistribution, RandomDistribution]


def make_distribution(
    name: str,
    servers: Sequence[Tuple[ServerName, int]],
    rng: Optional[random.Random] = None,
) -> Distribution:
    """
    Build distribution C{name} over the live C{servers}, C{(ketama_name, weight)}
    in configuration order.  C{rng} is used by C{random} only.  Raises
    C{ValueError} for an unknown name, no servers or a weight below 1.
    """
    if name == "ketama":
        return KetamaDistribution(servers)
    if name == "modula":
        return ModulaDistribution(servers)
    if name == "random":
        return RandomDistribution(servers, rng)
    raise ValueError(
        "unknown distribution %r (expected one of: %s)"
        % (name, ", ".join(DISTRIBUTION_NAMES))
    )
