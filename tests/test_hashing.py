"""
twistedproxy.hashing against twemproxy 0.5.0.

Expected values come from twemproxy's own test vector (src/test_all.c), from
twemproxy's hashkit C functions run on the keys below, and from key placement
observed through a real nutcracker 0.5.0 in front of three redis servers.
"""

import random
from bisect import bisect_left

import pytest

from twistedproxy.hashing import (
    DISTRIBUTION_NAMES,
    HASH_NAMES,
    hash_function,
    hash_tag_key,
    make_distribution,
)
from twistedproxy.hashing import functions
from twistedproxy.hashing.distributions import ketama_points

# src/test_all.c test_hash_algorithms(), also libmemcached's tests/hash_results.h.
APPLE = {
    "one_at_a_time": 2297466611,
    "md5": 3195025439,
    "crc16": 3662830516,
    "crc32": 10542,
    "crc32a": 2838417488,
    "fnv1_32": 67176023,
    "fnv1a_32": 280767167,
    "fnv1_64": 473199127,
    "fnv1a_64": 1488911807,
    "hsieh": 3738850110,
    "jenkins": 1442444624,
    "murmur": 4142305122,
}

# Keys that exercise the signed-char reads (bytes >= 0x80), hsieh's 3-byte
# tail, jenkins' multi-block path and long keys.  Values from twemproxy's C
# functions, in HASH_NAMES order.
C_VECTORS = [
    (b"\xff\x80", [3637588423, 82539146, 2003575, 16197, 1061514413, 3035328992,
                   3035557738, 309762336, 1400454730, 3181452272, 1759350492,
                   2875642111]),
    (b"\x80", [3273477671, 2128427405, 37256, 16314, 1069182125, 2046707807,
               2046684255, 4210270879, 83079839, 3606367026, 2421514821,
               2976898632]),
    (b"ab\xff", [100913432, 2192293236, 2088034275, 19613, 3432881837, 2488291927,
                 4206756399, 3160658135, 3283607919, 1977393110, 3968893618,
                 3920586603]),
    (b"caf\xc3\xa9-\xff\xfe\xfd", [3924959081, 4125193306, 3230740522, 14456,
                                   947445844, 502330270, 2660713560, 3143721790,
                                   1660020056, 3870783501, 3070149175, 4083043624]),
    (b"The quick brown fox jumps over the lazy dog",
     [1369346549, 2642219166, 581169352, 16719, 1095738169, 2112060110, 3890508048,
      3922226286, 76545936, 471461527, 818385189, 314054204]),
    (bytes(range(256)), [3571313950, 3680880866, 3439689301, 10501, 688229491,
                         1421105445, 3252658213, 1148338629, 3725316805, 2804200527,
                         3391133120, 2562932646]),
]

# Keys written through nutcracker 0.5.0; NUTCRACKER_* list the backend each
# one landed on.
PLACEMENT_KEYS = [
    b"", b"apple", b"foo", b"bar", b"user:1000", b"user:1001", b"session:abcdef",
    b"\xff\xfe\x80", b"caf\xc3\xa9", b"{user1000}.following", b"{user1000}.followers",
    b"x{}y", b"counter:42", b"k" * 50, b"\x00\x01\x02", b"hello world",
]


def route(distribution, hash_name, key, hash_tag=None):
    """What a pool does with a key: hash tag, hash, distribution."""
    return distribution.index(hash_function(hash_name)(hash_tag_key(key, hash_tag)))


# --- hash functions -------------------------------------------------------


def test_hash_names_in_twemproxy_order():
    assert HASH_NAMES == (
        "one_at_a_time", "md5", "crc16", "crc32", "crc32a", "fnv1_64", "fnv1a_64",
        "fnv1_32", "fnv1a_32", "hsieh", "murmur", "jenkins",
    )


@pytest.mark.parametrize("name", sorted(APPLE))
def test_twemproxy_apple_vector(name):
    assert hash_function(name)(b"apple") == APPLE[name]


@pytest.mark.parametrize("key, expected", C_VECTORS)
def test_matches_twemproxy_c_functions(key, expected):
    assert [hash_function(name)(key) for name in HASH_NAMES] == expected


@pytest.mark.parametrize("name", HASH_NAMES)
def test_empty_key_hashes_to_zero(name):
    # server_pool_hash() returns 0 for an empty key without calling the hash.
    assert hash_function(name)(b"") == 0


@pytest.mark.parametrize("name", HASH_NAMES)
def test_values_are_uint32(name):
    function = hash_function(name)
    rng = random.Random(name)
    for length in range(1, 70):
        value = function(bytes(rng.randrange(256) for _ in range(length)))
        assert 0 <= value <= 0xFFFFFFFF


@pytest.mark.parametrize("bits", ["32", "64"])
def test_fnv1a_of_a_short_key_without_a_loop_is_the_loop_value(bits):
    # PyPy hashes keys of up to 16 bytes with straight-line code over the key
    # padded in front with zero bytes (see functions._fnv1a_short); called
    # directly here, so that CPython checks it too.
    init, prime = {"32": (functions._FNV32_INIT, functions._FNV32_PRIME),
                   "64": (functions._FNV64_INIT_LOW32, functions._FNV64_PRIME_LOW32)}[bits]
    starts = {"32": functions._FNV32_PADDED_STARTS, "64": functions._FNV64_PADDED_STARTS}[bits]
    rng = random.Random(bits)
    for length in range(1, functions._SHORT_KEY + 1):
        for key in [b"k" * length, bytes(rng.randrange(128) for _ in range(length))]:
            pad = functions._SHORT_KEY - length
            assert functions._fnv1a_short(key, pad, starts[pad], prime) == functions._fnv1a(key, init, prime), key
            assert hash_function("fnv1a_" + bits)(key) == functions._fnv1a(key, init, prime), key


def test_signed_char_quirk_changes_the_value():
    # one_at_a_time reads a signed char, so 0x80 enters as 0xffffff80.
    signed = hash_function("one_at_a_time")(b"\x80")
    value = (0x80 - 256) & 0xFFFFFFFF
    value = (value + (value << 10)) & 0xFFFFFFFF
    value ^= value >> 6
    value = (value + (value << 3)) & 0xFFFFFFFF
    value ^= value >> 11
    value = (value + (value << 15)) & 0xFFFFFFFF
    assert signed == value == 3273477671


def test_crc32_is_15_bits_and_crc32a_full():
    assert hash_function("crc32")(b"apple") == (hash_function("crc32a")(b"apple") >> 16) & 0x7FFF


def test_unknown_hash_name():
    with pytest.raises(ValueError):
        hash_function("sha1")


# --- hash_tag ----------------------------------------------------------------


@pytest.mark.parametrize(
    "key, tag, expected",
    [
        (b"user:{1000}:name", None, b"user:{1000}:name"),
        (b"user:{1000}:name", b"", b"user:{1000}:name"),
        (b"user:{1000}:name", b"{}", b"1000"),
        (b"{abc}", b"{}", b"abc"),
        (b"{}x", b"{}", b"{}x"),  # empty tag content: the whole key
        (b"{}{a}", b"{}", b"{}{a}"),  # only the first left char counts
        (b"a{b", b"{}", b"a{b"),  # no right char
        (b"a}b", b"{}", b"a}b"),  # no left char
        (b"a}b{c}", b"{}", b"c"),  # the right char must follow the left one
        (b"{{a}}", b"{}", b"{a"),
        (b"x{a}y{b}", b"{}", b"a"),
        (b"a$b$c", b"$$", b"b"),
        (b"$$x", b"$$", b"$$x"),
        (b"", b"{}", b""),
    ],
)
def test_hash_tag_key(key, tag, expected):
    assert hash_tag_key(key, tag) == expected


# --- ketama ------------------------------------------------------------------


def test_distribution_names():
    assert DISTRIBUTION_NAMES == ("ketama", "modula", "random")


def test_ketama_points_equal_weights():
    distribution = make_distribution("ketama", [("a", 1), ("b", 1), ("c", 1)])
    assert distribution.points_per_server == [160, 160, 160]
    assert len(distribution.continuum) == 480


def test_ketama_points_follow_weights():
    distribution = make_distribution("ketama", [("a", 1), ("b", 2), ("c", 3)])
    assert distribution.points_per_server == [80, 160, 240]
    counts = [0, 0, 0]
    for _, owner in distribution.continuum:
        counts[owner] += 1
    assert counts == [80, 160, 240]


def test_ketama_points_use_float32_arithmetic():
    # 1/25 as a float is a little under 0.04, so 1/25 * 40 * 5 is 7.9999995:
    # twemproxy gives 28 points where exact arithmetic would give 32.
    assert ketama_points(1, 25, 5) == 28
    assert ketama_points(1, 1, 1) == 160
    assert ketama_points(1, 1000, 2) == 0


def test_ketama_points_are_md5_of_name_dash_index():
    # src/test_all.c: ketama_hash("server1-8", 9, 0) and (..., 3).
    values = {value for value, _ in make_distribution("ketama", [("server1", 1)]).continuum}
    assert len(values) == 160
    assert 3853726576 in values
    assert 2667054752 in values


def test_ketama_lookup_first_point_at_or_above_and_wraps():
    distribution = make_distribution("ketama", [("a", 1), ("b", 1), ("c", 1)])
    continuum = distribution.continuum
    values = [value for value, _ in continuum]
    assert values == sorted(values)
    for position in (0, 1, 100, len(continuum) - 1):
        value, owner = continuum[position]
        assert distribution.index(value) == owner
        if position:
            assert distribution.index(continuum[position - 1][0] + 1) == owner
    assert distribution.index(0) == continuum[0][1]
    assert distribution.index(values[-1] + 1) == continuum[0][1]
    assert distribution.index(0xFFFFFFFF) == continuum[0][1]


@pytest.mark.parametrize("count", [1, 3, 40, 300, 420])
def test_ketama_fast_lookup_agrees_with_the_binary_search(count):
    # index() starts from the first point of the hash's bucket (a table by
    # the hash's top bits) and steps past the points below the hash; it
    # must give what the first point at or above the hash gives, on every edge
    # (300 servers: many buckets hold three points or more; 420: 65535 points
    # or more, so the table's entries are four bytes, not two).
    weights = [1] * count if count == 420 else [1 + i % 3 for i in range(count)]
    distribution = make_distribution("ketama", [("server-%d" % i, w) for i, w in enumerate(weights)])
    continuum = distribution.continuum
    assert (len(continuum) >= 0xFFFF) == (count == 420)
    values = [value for value, _ in continuum]
    owners = [owner for _, owner in continuum] + [continuum[0][1]]

    def reference(hash_value):
        return owners[bisect_left(values, hash_value)]

    rng = random.Random(count)
    probes = [rng.randrange(1 << 32) for _ in range(3000)] + [0, 0xFFFFFFFF]
    for value in values[:: max(1, len(values) // 500)] + values[-3:]:
        probes += [value - 1, value, value + 1, value & ~0xFFFF, value | 0xFFFF]
    crowded = [(a, b) for a, b in zip(values, values[1:]) if a >> 16 == b >> 16][:300]
    assert crowded or count < 40
    for a, b in crowded:  # points that share a bucket of the table (at least 2**16 wide)
        probes += [a - 1, a, a + 1, b - 1, b, b + 1]
    for probe in probes:
        if 0 <= probe <= 0xFFFFFFFF:
            assert distribution.index(probe) == reference(probe), probe


def test_ketama_placement_depends_on_names_not_order():
    servers = [("alpha", 1), ("beta", 2), ("gamma", 5)]
    forward = make_distribution("ketama", servers)
    backward = make_distribution("ketama", servers[::-1])
    rng = random.Random(3)
    for _ in range(2000):
        value = rng.randrange(1 << 32)
        assert servers[forward.index(value)] == servers[::-1][backward.index(value)]


def test_ketama_matches_nutcracker_fnv1a_64():
    # Pool: hash fnv1a_64, distribution ketama, servers "...:1 alpha",
    # "...:2 beta", "...:5 gamma".
    distribution = make_distribution("ketama", [("alpha", 1), ("beta", 2), ("gamma", 5)])
    placed = [route(distribution, "fnv1a_64", key) for key in PLACEMENT_KEYS]
    assert placed == [1, 2, 2, 2, 1, 1, 2, 2, 1, 2, 0, 2, 1, 1, 0, 2]


def test_ketama_matches_nutcracker_md5_with_hash_tag():
    # Pool: hash md5, hash_tag "{}", servers cache-a, cache-b, cache-c weight 1.
    distribution = make_distribution("ketama", [("cache-a", 1), ("cache-b", 1), ("cache-c", 1)])
    placed = [route(distribution, "md5", key, b"{}") for key in PLACEMENT_KEYS]
    assert placed == [0, 2, 2, 2, 1, 1, 1, 2, 0, 0, 0, 2, 2, 2, 2, 0]


def test_ketama_accepts_bytes_names():
    by_str = make_distribution("ketama", [("a", 1), ("b", 1)])
    by_bytes = make_distribution("ketama", [(b"a", 1), (b"b", 1)])
    assert by_str.continuum == by_bytes.continuum


# --- modula ------------------------------------------------------------------


def test_modula_slots_follow_weights():
    distribution = make_distribution("modula", [("a", 1), ("b", 2), ("c", 3)])
    assert [distribution.index(value) for value in range(12)] == [0, 1, 1, 2, 2, 2] * 2


def test_modula_orders_servers_by_name_like_twemproxy():
    # nc_conf.c sorts a pool's servers by name, shorter first: b, aa, zzz.
    distribution = make_distribution("modula", [("zzz", 1), ("b", 2), ("aa", 3)])
    assert [distribution.index(value) for value in range(6)] == [1, 1, 2, 2, 2, 0]


def test_modula_matches_nutcracker_crc32a():
    # Pool: hash crc32a, distribution modula, servers "...:1 zzz", "...:2 b",
    # "...:3 aa".
    distribution = make_distribution("modula", [("zzz", 1), ("b", 2), ("aa", 3)])
    placed = [route(distribution, "crc32a", key) for key in PLACEMENT_KEYS]
    assert placed == [1, 2, 0, 2, 2, 0, 1, 2, 0, 1, 2, 1, 2, 2, 0, 2]


# --- random ------------------------------------------------------------------


def test_random_stays_in_range_and_ignores_weights():
    distribution = make_distribution(
        "random", [("a", 1), ("b", 100), ("c", 1)], rng=random.Random(1)
    )
    counts = [0, 0, 0]
    for value in range(3000):
        counts[distribution.index(value)] += 1
    assert all(800 < count < 1200 for count in counts)


def test_random_uses_the_given_rng():
    servers = [("a", 1), ("b", 1), ("c", 1), ("d", 1)]
    first = make_distribution("random", servers, rng=random.Random(42))
    second = make_distribution("random", servers, rng=random.Random(42))
    assert [first.index(0) for _ in range(50)] == [second.index(0) for _ in range(50)]


# --- all distributions -------------------------------------------------------


@pytest.mark.parametrize("name", DISTRIBUTION_NAMES)
def test_single_server_always_index_zero(name):
    distribution = make_distribution(name, [("only", 3)])
    assert {distribution.index(value) for value in (0, 1, 12345, 0xFFFFFFFF)} == {0}


@pytest.mark.parametrize("name", DISTRIBUTION_NAMES)
@pytest.mark.parametrize(
    "servers",
    [[], [("a", 0)], [("a", -1)], [("a", 1), ("a", 2)]],
)
def test_bad_servers_rejected(name, servers):
    with pytest.raises(ValueError):
        make_distribution(name, servers)


def test_unknown_distribution():
    with pytest.raises(ValueError):
        make_distribution("rendezvous", [("a", 1)])
