"""
twemproxy 0.5.0's key hash functions (src/hashkit/), bit for bit.

Each function takes the key as C{bytes} and returns the C{uint32} twemproxy
routes on.  Two things make them differ from textbook versions:

  - twemproxy reads the key through a (signed on x86) C{char *} in
    one_at_a_time, the four fnv variants and the 3-byte tail of hsieh, so a
    byte >= 0x80 enters the arithmetic sign-extended (0xffffff80 and up);
  - twemproxy never hashes an empty key: C{server_pool_hash} returns 0 for it
    before calling the function, so every function here returns 0 for C{b""}.

Where the standard library computes the same value (md5, crc32, crc32a and
the CRC-16/XMODEM core of crc16) it is used; the rest are tight loops over
the key with explicit 32-bit masks.
"""

from __future__ import annotations

import struct
import sys
from binascii import crc_hqx
from typing import Callable, Dict, Tuple
from zlib import crc32 as _zlib_crc32

try:
    # On PyPy the builtin md5 is about ten times faster than hashlib's
    # OpenSSL binding; on CPython it is a little faster too.
    from _md5 import md5
except ImportError:  # an interpreter built without its own hash modules
    from hashlib import md5  # type: ignore[assignment]

HashFunction = Callable[[bytes], int]

# The value a C "(uint32_t) (char) b" cast yields for each byte: bytes >= 0x80
# are negative chars and sign-extend.
_SIGNED_BYTE = tuple(b if b < 0x80 else b | 0xFFFFFF00 for b in range(256))

_FNV32_INIT = 0x811C9DC5
_FNV32_PRIME = 0x01000193
# fnv1_64/fnv1a_64 return the low 32 bits of a 64-bit hash; the low 32 bits of
# a product depend only on the low 32 bits of its factors, so they are
# computed in 32 bits from the low halves of the 64-bit constants
# 0xcbf29ce484222325 and 0x100000001b3.  (Written out rather than masked at
# import: on PyPy a masked big literal stays a slow arbitrary-precision int.)
_FNV64_INIT_LOW32 = 0x84222325
_FNV64_PRIME_LOW32 = 0x000001B3

_MURMUR_M = 0x5BD1E995
_JENKINS_INITVAL = 13

_unpack_uint32_le = struct.Struct("<I").unpack_from
_unpack_uint32_le_3 = struct.Struct("<3I").unpack_from


def hash_one_at_a_time(key: bytes) -> int:
    """Bob Jenkins' one-at-a-time hash over signed chars (nc_one_at_a_time.c)."""
    value = 0
    if key.isascii():
        for byte in key:
            value = (value + byte) & 0xFFFFFFFF
            value = (value + (value << 10)) & 0xFFFFFFFF
            value ^= value >> 6
    else:
        signed = _SIGNED_BYTE
        for byte in key:
            value = (value + signed[byte]) & 0xFFFFFFFF
            value = (value + (value << 10)) & 0xFFFFFFFF
            value ^= value >> 6
    value = (value + (value << 3)) & 0xFFFFFFFF
    value ^= value >> 11
    return (value + (value << 15)) & 0xFFFFFFFF


def hash_md5(key: bytes) -> int:
    """The first four bytes of the MD5 digest, little-endian (nc_md5.c)."""
    if not key:
        return 0
    return _unpack_uint32_le(md5(key).digest())[0]


def hash_crc16(key: bytes) -> int:
    """
    twemproxy's CRC-16/XMODEM whose 32-bit register is never masked to 16 bits
    (nc_crc16.c).

    The low 16 bits are the standard CRC of the whole key.  Each step shifts the
    register left by 8 and the table entries are 16-bit, so bits 16-23 hold the
    high byte of the CRC of all but the last byte and bits 24-31 the high byte
    of the CRC of all but the last two bytes.
    """
    but_two = crc_hqx(key[:-2], 0)
    but_one = crc_hqx(key[-2:-1], but_two)
    whole = crc_hqx(key[-1:], but_one)
    return ((but_two >> 8) << 24) | ((but_one >> 8) << 16) | whole


def hash_crc32(key: bytes) -> int:
    """Bits 16-30 of the standard CRC-32 (nc_crc32.c hash_crc32)."""
    return (_zlib_crc32(key) >> 16) & 0x7FFF


def hash_crc32a(key: bytes) -> int:
    """The standard CRC-32 (nc_crc32.c hash_crc32a)."""
    return _zlib_crc32(key)


def _fnv1(key: bytes, hash_value: int, prime: int) -> int:
    """FNV-1 (multiply, then xor) in 32 bits over signed chars; 0 for an empty key."""
    if not key:
        return 0
    if key.isascii():
        for byte in key:
            hash_value = ((hash_value * prime) & 0xFFFFFFFF) ^ byte
    else:
        signed = _SIGNED_BYTE
        for byte in key:
            hash_value = ((hash_value * prime) & 0xFFFFFFFF) ^ signed[byte]
    return hash_value


def _fnv1a(key: bytes, hash_value: int, prime: int) -> int:
    """FNV-1a (xor, then multiply) in 32 bits over signed chars; 0 for an empty key."""
    if not key:
        return 0
    if key.isascii():
        for byte in key:
            hash_value = ((hash_value ^ byte) * prime) & 0xFFFFFFFF
    else:
        signed = _SIGNED_BYTE
        for byte in key:
            hash_value = ((hash_value ^ signed[byte]) * prime) & 0xFFFFFFFF
    return hash_value


# FNV-1a of a short key without a loop.  On PyPy a loop the JIT compiled apart
# is entered with a frame allocated on the heap, about 700 bytes per key hashed
# here (a third of what the proxy allocates per request at -P 16, and as much
# time as the hashing itself); straight-line code is traced inline instead.
# Code per key length would make the JIT compile a branch per length, so a key
# of up to _SHORT_KEY bytes goes through the same _SHORT_KEY steps whatever its
# length: it is padded in front with zero bytes, and hashing starts from the
# state that those zero bytes take to the real initial value.  A zero byte
# only multiplies the state by the (odd, so invertible) prime, so that state
# is the initial value times the prime's inverse once per padding byte.
# (Not on CPython: each of the steps is bytecode there, slower than its loop
# over a key shorter than _SHORT_KEY.)
_SHORT_KEY = 16
_ZEROS = bytes(_SHORT_KEY)
_STRAIGHT_LINE = sys.implementation.name == "pypy"


def _padded_starts(init: int, prime: int) -> Tuple[int, ...]:
    """C{starts[p]}: the state that C{p} zero bytes take to C{init} (FNV-1a)."""
    inverse = pow(prime, -1, 1 << 32)
    starts = [init]
    for _ in range(_SHORT_KEY):
        starts.append((starts[-1] * inverse) & 0xFFFFFFFF)
    return tuple(starts)


_FNV64_PADDED_STARTS = _padded_starts(_FNV64_INIT_LOW32, _FNV64_PRIME_LOW32)
_FNV32_PADDED_STARTS = _padded_starts(_FNV32_INIT, _FNV32_PRIME)


def _fnv1a_short(key: bytes, pad: int, h: int, prime: int) -> int:
    """FNV-1a over C{pad} zero bytes and then C{key}, C{pad + len(key) == _SHORT_KEY}, from state C{h}."""
    k = _ZEROS[:pad] + key
    h = ((h ^ k[0]) * prime) & 0xFFFFFFFF
    h = ((h ^ k[1]) * prime) & 0xFFFFFFFF
    h = ((h ^ k[2]) * prime) & 0xFFFFFFFF
    h = ((h ^ k[3]) * prime) & 0xFFFFFFFF
    h = ((h ^ k[4]) * prime) & 0xFFFFFFFF
    h = ((h ^ k[5]) * prime) & 0xFFFFFFFF
    h = ((h ^ k[6]) * prime) & 0xFFFFFFFF
    h = ((h ^ k[7]) * prime) & 0xFFFFFFFF
    h = ((h ^ k[8]) * prime) & 0xFFFFFFFF
    h = ((h ^ k[9]) * prime) & 0xFFFFFFFF
    h = ((h ^ k[10]) * prime) & 0xFFFFFFFF
    h = ((h ^ k[11]) * prime) & 0xFFFFFFFF
    h = ((h ^ k[12]) * prime) & 0xFFFFFFFF
    h = ((h ^ k[13]) * prime) & 0xFFFFFFFF
    h = ((h ^ k[14]) * prime) & 0xFFFFFFFF
    h = ((h ^ k[15]) * prime) & 0xFFFFFFFF
    return h


def _fnv1a_hash(key: bytes, init: int, prime: int, starts: Tuple[int, ...]) -> int:
    """FNV-1a of C{key} from C{init}: straight-line where that pays (L{_fnv1a_short}), else the loop."""
    if _STRAIGHT_LINE and 0 < len(key) <= _SHORT_KEY and key.isascii():
        pad = _SHORT_KEY - len(key)
        return _fnv1a_short(key, pad, starts[pad], prime)
    return _fnv1a(key, init, prime)


def hash_fnv1_64(key: bytes) -> int:
    """The low 32 bits of 64-bit FNV-1 (nc_fnv.c)."""
    return _fnv1(key, _FNV64_INIT_LOW32, _FNV64_PRIME_LOW32)


def hash_fnv1a_64(key: bytes) -> int:
    """64-bit FNV-1a constants truncated to 32 bits, as nc_fnv.c computes it."""
    return _fnv1a_hash(key, _FNV64_INIT_LOW32, _FNV64_PRIME_LOW32, _FNV64_PADDED_STARTS)


def hash_fnv1_32(key: bytes) -> int:
    """32-bit FNV-1 (nc_fnv.c)."""
    return _fnv1(key, _FNV32_INIT, _FNV32_PRIME)


def hash_fnv1a_32(key: bytes) -> int:
    """32-bit FNV-1a (nc_fnv.c)."""
    return _fnv1a_hash(key, _FNV32_INIT, _FNV32_PRIME, _FNV32_PADDED_STARTS)


def hash_hsieh(key: bytes) -> int:
    """Paul Hsieh's SuperFastHash (nc_hsieh.c), little-endian 16-bit reads."""
    length = len(key)
    if not length:
        return 0
    nblocks = length >> 2
    rem = length & 3
    hash_value = 0
    if nblocks:
        halves = struct.unpack_from("<%dH" % (nblocks * 2), key)
        for i in range(0, nblocks * 2, 2):
            hash_value = (hash_value + halves[i]) & 0xFFFFFFFF
            tmp = ((halves[i + 1] << 11) ^ hash_value) & 0xFFFFFFFF
            hash_value = ((hash_value << 16) & 0xFFFFFFFF) ^ tmp
            hash_value = (hash_value + (hash_value >> 11)) & 0xFFFFFFFF
    tail = nblocks << 2
    if rem == 3:
        hash_value = (hash_value + key[tail] + (key[tail + 1] << 8)) & 0xFFFFFFFF
        hash_value ^= (hash_value << 16) & 0xFFFFFFFF
        # The third tail byte is read through a signed char.
        hash_value ^= (_SIGNED_BYTE[key[tail + 2]] << 18) & 0xFFFFFFFF
        hash_value = (hash_value + (hash_value >> 11)) & 0xFFFFFFFF
    elif rem == 2:
        hash_value = (hash_value + key[tail] + (key[tail + 1] << 8)) & 0xFFFFFFFF
        hash_value ^= (hash_value << 11) & 0xFFFFFFFF
        hash_value = (hash_value + (hash_value >> 17)) & 0xFFFFFFFF
    elif rem == 1:
        hash_value = (hash_value + key[tail]) & 0xFFFFFFFF
        hash_value ^= (hash_value << 10) & 0xFFFFFFFF
        hash_value = (hash_value + (hash_value >> 1)) & 0xFFFFFFFF
    hash_value ^= (hash_value << 3) & 0xFFFFFFFF
    hash_value = (hash_value + (hash_value >> 5)) & 0xFFFFFFFF
    hash_value ^= (hash_value << 4) & 0xFFFFFFFF
    hash_value = (hash_value + (hash_value >> 17)) & 0xFFFFFFFF
    hash_value ^= (hash_value << 25) & 0xFFFFFFFF
    return (hash_value + (hash_value >> 6)) & 0xFFFFFFFF


def hash_murmur(key: bytes) -> int:
    """MurmurHash2 seeded with 0xdeadbeef * length (nc_murmur.c), little-endian reads."""
    length = len(key)
    if not length:
        return 0
    m = _MURMUR_M
    hash_value = ((0xDEADBEEF * length) ^ length) & 0xFFFFFFFF
    nwords = length >> 2
    if nwords:
        for word in struct.unpack_from("<%dI" % nwords, key):
            word = (word * m) & 0xFFFFFFFF
            word ^= word >> 24
            hash_value = ((hash_value * m) & 0xFFFFFFFF) ^ ((word * m) & 0xFFFFFFFF)
    tail = key[nwords << 2:]
    if tail:
        hash_value ^= int.from_bytes(tail, "little")
        hash_value = (hash_value * m) & 0xFFFFFFFF
    hash_value ^= hash_value >> 13
    hash_value = (hash_value * m) & 0xFFFFFFFF
    return hash_value ^ (hash_value >> 15)


def hash_jenkins(key: bytes) -> int:
    """
    Bob Jenkins' lookup3 C{hashlittle} with initval 13 (nc_jenkins.c).

    The C code picks a 32-bit, 16-bit or byte-wise read by pointer alignment;
    on a little-endian machine all three read the same little-endian words,
    and its masked partial last block equals the zero-padded block.
    """
    length = len(key)
    if not length:
        return 0
    a = b = c = (0xDEADBEEF + length + _JENKINS_INITVAL) & 0xFFFFFFFF
    # Every block but the last (which holds 1 to 12 bytes) goes through mix().
    nfull = (length - 1) // 12
    if nfull:
        words = struct.unpack_from("<%dI" % (nfull * 3), key)
        for i in range(0, nfull * 3, 3):
            a = (a + words[i]) & 0xFFFFFFFF
            b = (b + words[i + 1]) & 0xFFFFFFFF
            c = (c + words[i + 2]) & 0xFFFFFFFF
            a = (a - c) & 0xFFFFFFFF
            a ^= ((c << 4) | (c >> 28)) & 0xFFFFFFFF
            c = (c + b) & 0xFFFFFFFF
            b = (b - a) & 0xFFFFFFFF
            b ^= ((a << 6) | (a >> 26)) & 0xFFFFFFFF
            a = (a + c) & 0xFFFFFFFF
            c = (c - b) & 0xFFFFFFFF
            c ^= ((b << 8) | (b >> 24)) & 0xFFFFFFFF
            b = (b + a) & 0xFFFFFFFF
            a = (a - c) & 0xFFFFFFFF
            a ^= ((c << 16) | (c >> 16)) & 0xFFFFFFFF
            c = (c + b) & 0xFFFFFFFF
            b = (b - a) & 0xFFFFFFFF
            b ^= ((a << 19) | (a >> 13)) & 0xFFFFFFFF
            a = (a + c) & 0xFFFFFFFF
            c = (c - b) & 0xFFFFFFFF
            c ^= ((b << 4) | (b >> 28)) & 0xFFFFFFFF
            b = (b + a) & 0xFFFFFFFF
    last = key[nfull * 12:]
    last_a, last_b, last_c = _unpack_uint32_le_3(last + b"\0" * (12 - len(last)))
    a = (a + last_a) & 0xFFFFFFFF
    b = (b + last_b) & 0xFFFFFFFF
    c = (c + last_c) & 0xFFFFFFFF
    # final(a, b, c)
    c ^= b
    c = (c - (((b << 14) | (b >> 18)) & 0xFFFFFFFF)) & 0xFFFFFFFF
    a ^= c
    a = (a - (((c << 11) | (c >> 21)) & 0xFFFFFFFF)) & 0xFFFFFFFF
    b ^= a
    b = (b - (((a << 25) | (a >> 7)) & 0xFFFFFFFF)) & 0xFFFFFFFF
    c ^= b
    c = (c - (((b << 16) | (b >> 16)) & 0xFFFFFFFF)) & 0xFFFFFFFF
    a ^= c
    a = (a - (((c << 4) | (c >> 28)) & 0xFFFFFFFF)) & 0xFFFFFFFF
    b ^= a
    b = (b - (((a << 14) | (a >> 18)) & 0xFFFFFFFF)) & 0xFFFFFFFF
    c ^= b
    return (c - (((b << 24) | (b >> 8)) & 0xFFFFFFFF)) & 0xFFFFFFFF


_FUNCTIONS: Dict[str, HashFunction] = {
    "one_at_a_time": hash_one_at_a_time,
    "md5": hash_md5,
    "crc16": hash_crc16,
    "crc32": hash_crc32,
    "crc32a": hash_crc32a,
    "fnv1_64": hash_fnv1_64,
    "fnv1a_64": hash_fnv1a_64,
    "fnv1_32": hash_fnv1_32,
    "fnv1a_32": hash_fnv1a_32,
    "hsieh": hash_hsieh,
    "murmur": hash_murmur,
    "jenkins": hash_jenkins,
}

# In twemproxy's HASH_CODEC order (nc_hashkit.h).
HASH_NAMES: Tuple[str, ...] = tuple(_FUNCTIONS)


def hash_function(name: str) -> HashFunction:
    """Return twemproxy's key hash called C{name}; C{ValueError} for an unknown name."""
    try:
        return _FUNCTIONS[name]
    except KeyError:
        raise ValueError(
            "unknown hash %r (expected one of: %s)" % (name, ", ".join(HASH_NAMES))
        ) from None
