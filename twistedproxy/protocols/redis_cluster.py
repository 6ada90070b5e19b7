"""
Redis Cluster's side of a cluster pool (L{twistedproxy.routes.cluster}): the
hash slot of a key, the slot map (C{CLUSTER SHARDS} on Redis 7, C{CLUSTER
SLOTS} before), the C{-MOVED} and C{-ASK} redirects, and the C{ASKING} and
C{READONLY} requests, as the module-level L{cluster} (an L{ISlotCluster}).
The route knows none of these words.

The slot of a key is CRC-16/XMODEM (polynomial 0x1021, initial value 0: what
C{binascii.crc_hqx(key, 0)} computes, and the low 16 bits of twemproxy's
C{crc16} hash, L{twistedproxy.hashing.functions.hash_crc16}) modulo 16384, of
the key's hash tag when it has one: what lies between the first C{{} and the
first C{}} after it, if that is not empty (twemproxy's hash tag rule with
C{"{}"}: L{twistedproxy.hashing.hash_tag_key}); otherwise of the whole key.
"""

from __future__ import annotations

from binascii import crc_hqx

from zope.interface import implementer

from twistedproxy.core.request import Request
from twistedproxy.hashing import hash_tag_key
from twistedproxy.protocols.interface import ISlotCluster
from twistedproxy.protocols.redis import multibulk

SLOTS = 16384
_TAG = b"{}"
_CROSSSLOT = b"-CROSSSLOT Keys in request don't hash to the same slot\r\n"  # Redis 7.0's words

# What replicas may answer (commands Redis flags read-only, among those the
# proxy forwards): the rest goes to masters.
READ_COMMANDS = frozenset(
    name.encode("ascii")
    for name in (
        "get getrange getbit strlen substr mget exists bitcount bitpos bitfield_ro lcs dump ttl pttl"
        " expiretime pexpiretime type object sort_ro"
        " hget hmget hgetall hkeys hvals hlen hexists hstrlen hrandfield hscan"
        " lindex llen lrange lpos"
        " scard sismember smismember smembers srandmember sdiff sinter sunion sintercard sscan"
        " zcard zcount zlexcount zscore zmscore zrank zrevrank zrange zrangebylex zrangebyscore zrevrange"
        " zrevrangebylex zrevrangebyscore zrandmember zdiff zinter zunion zintercard zscan"
        " geohash geopos geodist georadius_ro georadiusbymember_ro geosearch"
        " xlen xrange xrevrange xpending xinfo"
        " eval_ro evalsha_ro fcall_ro"
    ).split()
)


def key_slot(key: bytes) -> int:
    """The Redis Cluster hash slot of C{key}."""
    return crc_hqx(hash_tag_key(key, _TAG), 0) & 0x3FFF


def decode(raw: bytes):
    """
    A RESP2 reply as Python values (bulk and status strings as bytes, integers
    as int, arrays as lists, nil as None); an error reply raises ValueError.
    For the few replies the proxy reads itself (the slot map), not the hot path.
    """
    value, end = _decode(raw, 0)
    if end != len(raw):
        raise ValueError("trailing bytes after a reply")
    return value


def _decode(raw: bytes, pos: int):
    nl = raw.find(b"\r\n", pos)
    if nl < 0:
        raise ValueError("a reply cut short")
    kind = raw[pos : pos + 1]
    line = raw[pos + 1 : nl]
    if kind == b"+":
        return line, nl + 2
    if kind == b"-":
        raise ValueError(line.decode("utf-8", "replace"))
    if kind == b":":
        return int(line), nl + 2
    if kind == b"$":
        length = int(line)
        if length < 0:
            return None, nl + 2
        end = nl + 2 + length
        return raw[nl + 2 : end], end + 2
    if kind == b"*":
        count = int(line)
        if count < 0:
            return None, nl + 2
        items = []
        pos = nl + 2
        for _ in range(count):
            item, pos = _decode(raw, pos)
            items.append(item)
        return items, pos
    raise ValueError("unexpected reply type %r" % (kind,))


def _host(ip, asked: str) -> str:
    """A node's announced ip; a node that does not know its own address says "" (or "?" for its endpoint)."""
    text = ip.decode("ascii", "replace") if isinstance(ip, bytes) else ""
    return text if text and text != "?" else asked


def _pairs(flat: list) -> dict:
    """A RESP2 flattened map (key, value, key, value ...) as a dict with str keys."""
    return {flat[i].decode("ascii", "replace"): flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def _shards(value: list, asked: str) -> list:
    """CLUSTER SHARDS (Redis 7): per shard its slot ranges and its nodes, each with role and health."""
    ranges = []
    for shard in value:
        fields = _pairs(shard)
        slots = fields.get("slots") or []
        master = None
        replicas = []
        for node in fields.get("nodes") or []:
            node = _pairs(node)
            address = (_host(node.get("ip"), asked), int(node["port"]))
            if node.get("role") == b"master":
                master = address
            elif node.get("health") not in (b"fail", b"failed"):
                # Redis 7.0 says "loading" of any replica whose offset is still 0
                # (one that got no write yet) as well: only a failed one is left out.
                replicas.append(address)
        if master is None:
            continue  # a shard whose master is gone and no replica promoted yet: its slots are not served
        for i in range(0, len(slots) - 1, 2):
            ranges.append((int(slots[i]), int(slots[i + 1]), master, tuple(replicas)))
    return ranges


def _slots(value: list, asked: str) -> list:
    """CLUSTER SLOTS: per range its first and last slot, its master's address, then its replicas'."""
    ranges = []
    for entry in value:
        nodes = [(_host(node[0], asked), int(node[1])) for node in entry[2:]]
        ranges.append((int(entry[0]), int(entry[1]), nodes[0], tuple(nodes[1:])))
    return ranges


@implementer(ISlotCluster)
class RedisCluster:
    """Redis Cluster's slots, map and redirects (see the module docstring)."""

    slots = SLOTS

    def slot(self, key: bytes) -> int:
        return key_slot(key)

    def map_request(self, fallback: bool):
        if fallback:
            return Request(multibulk((b"CLUSTER", b"SLOTS")), b"cluster")
        return Request(multibulk((b"CLUSTER", b"SHARDS")), b"cluster")

    def parse_map(self, raw: bytes, host: str):
        try:
            value = decode(raw)
            if not value:
                return []
            if isinstance(value[0], list) and value[0] and isinstance(value[0][0], bytes):
                return _shards(value, host)  # shards start with the field name "slots"
            return _slots(value, host)
        except (ValueError, TypeError, KeyError, IndexError):
            return None

    def map_unsupported(self, raw: bytes) -> bool:
        lower = raw[:40].lower()
        return lower.startswith(b"-err unknown subcommand") or lower.startswith(b"-err unknown command")

    def redirect(self, raw: bytes):
        # -MOVED 3999 127.0.0.1:6381  /  -ASK 3999 127.0.0.1:6381
        words = raw[1 : raw.find(b"\r\n")].split(b" ")
        if len(words) != 3:
            return None
        host, colon, port = words[2].rpartition(b":")
        if not colon or not port.isdigit() or not words[1].isdigit():
            return None
        return words[0] == b"MOVED", int(words[1]), (host.decode("ascii", "replace"), int(port))

    def asking_request(self):
        return Request(multibulk((b"ASKING",)), b"asking")

    def readonly_request(self):
        return Request(multibulk((b"READONLY",)), b"readonly")

    def cross_slot_reply(self, request) -> bytes:
        return _CROSSSLOT

    def is_read(self, request) -> bool:
        return request.command in READ_COMMANDS


cluster = RedisCluster()
