"""
memcached pools end to end: the real proxy process in front of stock memcached
1.6, driven by libmemcached's memccapable and memcslap, pymemcache, pylibmc and
raw sockets.

Protocol details are checked differentially: the same bytes go to a three-server
proxy and to one plain memcached, and the answers must match (CAS values and the
version string masked), so multi-key gets, meta quiet pipelines and binary quiet
pipelines answer across servers exactly as one server does.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import time

import pytest

from tests.support import processes

pytestmark = pytest.mark.integration

HOST = processes.HOST
NOOP, GETK, GETKQ, SETQ = 0x0A, 0x0C, 0x0D, 0x11
SENTINEL_OPAQUE = 0xFEEDFACE


# -- clusters ------------------------------------------------------------------


class Cluster:
    """memcached backends behind one proxy process; C{stop()} ends them all."""

    def __init__(self, count, memcached_args=(), **pool_keys):
        self.backends = []
        self.proxy = None
        try:
            self.backends = [processes.memcached(None, *memcached_args) for _ in range(count)]
            self.port = processes.free_port()
            pool = processes.pool_config(
                [b.port for b in self.backends], self.port, redis=False, hash="md5", distribution="ketama",
                **pool_keys
            )
            self.proxy = processes.proxy({"alpha": pool}, self.port)
        except Exception:
            self.stop()
            raise

    def stop(self):
        for proc in ([self.proxy] if self.proxy else []) + self.backends:
            proc.stop()

    def holder(self, key: bytes) -> int:
        """The index of the backend that holds C{key} (asked directly)."""
        owners = [i for i, b in enumerate(self.backends) if b"VALUE " in talk(b.port, b"get " + key + b"\r\n")]
        assert len(owners) == 1, (key, owners)
        return owners[0]


@pytest.fixture(scope="module")
def three():
    """A three-server pool (items up to 2 MB) and a plain memcached to compare with."""
    cluster = Cluster(3, ("-I", "2m"), timeout=5000)
    try:
        cluster.reference = processes.memcached(None, "-I", "2m")
    except Exception:
        cluster.stop()
        raise
    yield cluster
    cluster.reference.stop()
    cluster.stop()


@pytest.fixture
def cluster(three):
    """The three-server pool, flushed."""
    for port in (three.port, three.reference.port):
        assert talk(port, b"flush_all\r\n") == b"OK\r\n"
    return three


# -- raw sockets ---------------------------------------------------------------


class Conn:
    """A client socket with reads that wait for a known end, never for silence."""

    def __init__(self, port, timeout=10.0):
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _more(self) -> bool:
        data = self.sock.recv(1 << 20)
        self.buf += data
        return bool(data)

    def read_until(self, done) -> bytes:
        """Read until C{done(buffer)} returns an end offset (or the peer closes)."""
        while True:
            end = done(self.buf)
            if end is not None:
                out, self.buf = self.buf[:end], self.buf[end:]
                return out
            if not self._more():
                out, self.buf = self.buf + b"<closed>", b""
                return out

    def text_until(self, last_line_prefix: bytes) -> bytes:
        """Read text replies up to and including the first line starting with the prefix."""

        def done(buf):
            pos = 0
            while True:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return None
                if buf.startswith(last_line_prefix, pos):
                    return eol + 2
                pos = eol + 2

        return self.read_until(done)

    def packets_until_noop(self, opaque=SENTINEL_OPAQUE) -> list:
        """Read binary responses up to the noop answer carrying C{opaque}; return them all."""
        out = []

        def done(buf):
            pos = 0
            while len(buf) - pos >= 24:
                end = pos + 24 + struct.unpack_from(">I", buf, pos + 8)[0]
                if end > len(buf):
                    return None
                if buf[pos + 1] == NOOP and struct.unpack_from(">I", buf, pos + 12)[0] == opaque:
                    return end
                pos = end
            return None

        raw = self.read_until(done)
        pos = 0
        while pos < len(raw) and not raw.startswith(b"<closed>", pos):
            end = pos + 24 + struct.unpack_from(">I", raw, pos + 8)[0]
            out.append(raw[pos:end])
            pos = end
        return out

    def close(self):
        self.sock.close()


def talk(port, data: bytes) -> bytes:
    """Send text commands, then version, and return every reply before VERSION."""
    conn = Conn(port)
    try:
        conn.send(data + b"version\r\n")
        raw = conn.text_until(b"VERSION ")
        return raw[: raw.rfind(b"VERSION ")]
    finally:
        conn.close()


def packet(opcode, key=b"", extras=b"", value=b"", opaque=0, cas=0):
    header = struct.pack(
        ">BBHBBHIIQ", 0x80, opcode, len(key), len(extras), 0, 0, len(extras) + len(key) + len(value), opaque, cas
    )
    return header + extras + key + value


def noop_sentinel():
    return packet(NOOP, opaque=SENTINEL_OPAQUE)


def masked_text(raw: bytes) -> bytes:
    """Mask what differs between servers: CAS values, the version, ME's item details."""
    raw = re.sub(rb"(VALUE \S+ \d+ \d+) \d+", rb"\1 CAS", raw)
    raw = re.sub(
        rb"(?m)^(VA \d+|HD|EN|NF|NS|EX|OK)((?: \S+)*)",
        lambda m: m.group(1) + re.sub(rb" c\d+", b" cCAS", m.group(2)),
        raw,
    )
    raw = re.sub(rb"VERSION [^\r]*", b"VERSION x", raw)
    return re.sub(rb"(ME \S+) [^\r]*", rb"\1 ...", raw)


def masked_packets(packets) -> list:
    """Binary responses with CAS zeroed and version bodies replaced."""
    out = []
    for p in packets:
        if p[1] == 0x0B:  # version
            p = p[:8] + struct.pack(">I", 1) + p[12:24] + b"x"
        out.append(p[:16] + bytes(8) + p[24:])
    return out


# -- memccapable -----------------------------------------------------------------


@pytest.mark.skipif(shutil.which("memccapable") is None, reason="libmemcached-tools is not installed")
def test_memccapable_passes_every_case(spawn):
    """libmemcached's conformance suite: all 27 text and 27 binary cases (twemproxy passes 7)."""
    cluster = Cluster(1)
    try:
        result = subprocess.run(
            ["memccapable", "-h", HOST, "-p", str(cluster.port), "-t", "5"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=120,
        )
    finally:
        cluster.stop()
    output = result.stdout.decode("utf-8", "replace")
    assert result.returncode == 0, output
    assert output.count("[pass]") == 54, output
    assert "FAIL" not in output


# -- text and meta, compared with one memcached -------------------------------------

KEYS = [b"key:%d" % i for i in range(12)]


def _sets(keys, flags=0):
    return b"".join(b"set %s %d 0 %d\r\n%s\r\n" % (k, flags, len(k), k) for k in keys)


TEXT_CASES = {
    "multi-key get, gets, gat, gats in the client's order": _sets(KEYS[:8])
    + b"get " + b" ".join(reversed(KEYS)) + b" " + KEYS[3] + b"\r\n"
    + b"gets " + b" ".join(KEYS[2:10]) + b"\r\n"
    + b"gat 100 " + b" ".join(KEYS[5:]) + b"\r\n"
    + b"gats 0 " + KEYS[7] + b" nope " + KEYS[1] + b"\r\n"
    + b"get nope1 nope2 nope3 nope4\r\n",
    "storage commands": b"set a 5 0 3\r\nabc\r\nadd a 0 0 1\r\nx\r\nadd b 0 0 1\r\nx\r\nreplace a 7 0 2\r\nxy\r\n"
    b"replace nope 0 0 1\r\nx\r\nappend a 0 0 2\r\n12\r\nprepend a 0 0 2\r\n00\r\nappend nope 0 0 1\r\nx\r\n"
    b"get a b\r\ncas nope 0 0 1 1\r\nx\r\ncas a 0 0 1 1\r\nx\r\n",
    "incr, decr, touch, delete": b"set n 0 0 1\r\n5\r\nincr n 10\r\ndecr n 100\r\nincr nope 1\r\n"
    b"incr n x\r\nset s 0 0 1\r\nx\r\nincr s 1\r\ntouch n 10\r\ntouch nope 10\r\ntouch n x\r\n"
    b"delete n\r\ndelete n\r\ndelete n 0\r\ndelete n 5\r\ndelete\r\nincr n\r\ntouch n\r\n",
    "noreply everywhere": b"set a 0 0 1 noreply\r\n1\r\nadd a 0 0 1 noreply\r\n2\r\nreplace a 0 0 1 noreply\r\n3\r\n"
    b"append a 0 0 1 noreply\r\n4\r\nprepend a 0 0 1 noreply\r\n5\r\ncas a 0 0 1 1 noreply\r\n9\r\n"
    b"set n 0 0 1 noreply\r\n1\r\nincr n 5 noreply\r\ndecr n 2 noreply\r\ntouch a 0 noreply\r\n"
    b"delete zz noreply\r\nflush_all 0 noreply\r\nverbosity 1 noreply\r\nget a n\r\n",
    "flush_all and verbosity reach every server": _sets(KEYS) + b"flush_all\r\nget " + b" ".join(KEYS) + b"\r\n"
    + _sets(KEYS) + b"flush_all noreply\r\nget " + b" ".join(KEYS) + b"\r\n"
    + b"flush_all 0\r\nflush_all x\r\nverbosity 1\r\nverbosity 0\r\nverbosity\r\n",
    "long keys, bad lengths and bad data blocks": b"get " + b"k" * 250 + b"\r\n"
    b"set a 0 0 x\r\nset a 0 0 -1\r\nset a 0 0\r\nset a 0 0 3\r\nabcdef\r\nget a\r\n",
    "unknown commands": b"bogus\r\nget\r\ngat\r\nGET a\r\n\r\nmz a\r\n",
    "meta commands with flags": b"ms mk 2 T0 F5 O1 k\r\nhi\r\nmg mk v f t k s O2\r\nmg nope v O3 k\r\n"
    b"mg mk v c\r\nma cnt N0 J5 v\r\nma cnt v\r\nma cnt MD D2 v O9\r\nmd mk O4 k\r\nmd mk\r\n"
    b"ms Zm9v 3 b\r\nbar\r\nmg foo v\r\nmg Zm9v b v k\r\nme cnt\r\nme nope\r\nmg\r\nms a x\r\nmn\r\n",
    "meta quiet pipeline across servers closed by mn": b"".join(
        b"ms %s %d q O%d\r\n%s\r\n" % (k, len(k), i, k) for i, k in enumerate(KEYS[:8])
    )
    + b"".join(b"mg %s v q k O%d\r\n" % (k, i) for i, k in enumerate(KEYS))
    + b"".join(b"md %s q O%d\r\n" % (k, i) for i, k in enumerate(KEYS))
    + b"ma counter q\r\nma %s q\r\nmn\r\nmg %s v\r\nmn\r\n" % (KEYS[0], KEYS[0]),
}


@pytest.mark.parametrize("name", sorted(TEXT_CASES))
def test_text_and_meta_answer_like_one_memcached(cluster, name):
    data = TEXT_CASES[name]
    expected = masked_text(talk(cluster.reference.port, data))
    assert masked_text(talk(cluster.port, data)) == expected


def test_multi_get_spans_servers_and_keeps_order(cluster):
    # Placement follows the backends' (free, random) ports: enough keys that
    # every server holds some, whatever the ports (12 keys missed one server in
    # a few runs out of a hundred).  They differ in their first bytes: fnv1a_64
    # puts keys that differ only at the end ("key:0".."key:9") in one ketama segment.
    keys = [b"%d:key" % i for i in range(60)]
    assert talk(cluster.port, _sets(keys)).count(b"STORED") == len(keys)
    first_on = {}  # server index -> the first key it holds
    for key in keys:
        first_on.setdefault(cluster.holder(key), key)
    assert len(first_on) == 3
    a, b, c = (first_on[i] for i in sorted(first_on))
    wanted = [b, b"missing", a, c, b]
    reply = talk(cluster.port, b"get " + b" ".join(wanted) + b"\r\n")
    expected = b"".join(b"VALUE %s 0 %d\r\n%s\r\n" % (k, len(k), k) for k in (b, a, c, b))
    assert reply == expected + b"END\r\n"  # a repeated key is answered twice, as memcached does


def test_quit_and_stats(cluster):
    conn = Conn(cluster.port)
    conn.send(b"stats\r\nstats noreply\r\nstats settings\r\nset a 0 0 1\r\nx\r\nquit\r\nget a\r\n")
    reply = conn.read_until(lambda buf: None)
    assert reply.endswith(b"END\r\nERROR\r\nEND\r\nSTORED\r\n<closed>")
    assert b"STAT version " in reply and b"STAT pid " in reply
    conn.close()


# -- binary, compared with one memcached ----------------------------------------------


def _binary_everything():
    store = struct.pack(">II", 3, 0)
    arith = struct.pack(">QQI", 2, 10, 0)
    touch = struct.pack(">I", 100)
    ops = [
        (0x01, b"a", store, b"va"),  # set
        (0x11, b"b", store, b"vb"),  # setq
        (0x02, b"a", store, b"x"),  # add: exists
        (0x12, b"a", store, b"x"),  # addq: the error shows
        (0x12, b"c", store, b"vc"),  # addq: success hides
        (0x03, b"a", store, b"va2"),  # replace
        (0x13, b"zz", store, b"x"),  # replaceq: not found shows
        (0x0E, b"a", b"", b"+"),  # append
        (0x0F, b"a", b"", b"-"),  # prepend
        (0x19, b"b", b"", b"+"),  # appendq
        (0x1A, b"b", b"", b"-"),  # prependq
        (0x00, b"a", b"", b""),  # get
        (0x09, b"zz", b"", b""),  # getq miss hides
        (0x09, b"b", b"", b""),  # getq hit
        (0x0C, b"c", b"", b""),  # getk
        (0x0D, b"zz", b"", b""),  # getkq miss
        (0x0D, b"c", b"", b""),  # getkq hit
        (0x05, b"n", arith, b""),  # incr (creates with initial)
        (0x05, b"n", arith, b""),  # incr
        (0x06, b"n", arith, b""),  # decr
        (0x15, b"n", arith, b""),  # incrq
        (0x16, b"n", arith, b""),  # decrq
        (0x00, b"n", b"", b""),
        (0x1C, b"a", touch, b""),  # touch
        (0x1C, b"zz", touch, b""),
        (0x1D, b"a", touch, b""),  # gat
        (0x23, b"a", touch, b""),  # gatk
        (0x1E, b"zz", touch, b""),  # gatq miss
        (0x24, b"b", touch, b""),  # gatkq hit
        (0x04, b"a", b"", b""),  # delete
        (0x04, b"a", b"", b""),  # delete: not found
        (0x14, b"b", b"", b""),  # deleteq: success hides
        (0x14, b"b", b"", b""),  # deleteq: not found shows
        (0x0B, b"", b"", b""),  # version
        (0x0A, b"", b"", b""),  # noop
        (0x08, b"", b"", b""),  # flush
        (0x18, b"", b"", b""),  # flushq
        (0x0D, b"c", b"", b""),  # gone after the flush
    ]
    return b"".join(packet(op, key, extras, value, opaque=i + 1) for i, (op, key, extras, value) in enumerate(ops))


def binary_exchange(port, data):
    conn = Conn(port)
    try:
        conn.send(data + noop_sentinel())
        return masked_packets(conn.packets_until_noop())
    finally:
        conn.close()


def test_binary_answers_like_one_memcached(cluster):
    data = _binary_everything()
    assert binary_exchange(cluster.port, data) == binary_exchange(cluster.reference.port, data)


def test_binary_invalid_packets_keep_the_connection(cluster):
    # memcached answers these and then closes; the proxy keeps framing, so it keeps the client
    store = struct.pack(">II", 0, 0)
    data = packet(0x01, b"k" * 251, store, b"x") + packet(0x00) + packet(0x55, b"k") + packet(0x0B)
    answers = binary_exchange(cluster.port, data)
    assert [struct.unpack_from(">BBHBBH", p)[1::4] for p in answers] == [
        (0x01, 0x0004),  # key too long: invalid arguments
        (0x00, 0x0004),  # get without a key
        (0x55, 0x0081),  # unknown command
        (0x0B, 0),
        (NOOP, 0),
    ]


def test_binary_cas_and_opaque_travel(cluster):
    conn = Conn(cluster.port)
    conn.send(packet(0x01, b"c", struct.pack(">II", 0, 0), b"v", opaque=77) + noop_sentinel())
    stored = conn.packets_until_noop()[0]
    cas = struct.unpack_from(">Q", stored, 16)[0]
    assert struct.unpack_from(">I", stored, 12)[0] == 77 and cas
    store = struct.pack(">II", 0, 0)
    conn.send(
        packet(0x01, b"c", store, b"w", opaque=78, cas=cas + 1)
        + packet(0x01, b"c", store, b"w", opaque=79, cas=cas)
        + noop_sentinel()
    )
    stale, fresh, _ = conn.packets_until_noop()
    assert struct.unpack_from(">HII", stale, 6)[::2] == (0x0002, 78)  # key exists: wrong CAS
    assert struct.unpack_from(">HII", fresh, 6)[::2] == (0x0000, 79)
    conn.close()


def test_quiet_pipelines_of_ten_thousand(cluster):
    """setq x 10,000 then getkq (hits and misses) closed by noop: as one server answers."""
    store = struct.pack(">II", 0, 0)
    keys = [b"q:%d" % i for i in range(10000)]
    sets = b"".join(packet(SETQ, k, store, k * 3, opaque=i) for i, k in enumerate(keys))
    gets = b"".join(packet(GETKQ, k, opaque=i) for i, k in enumerate(keys + [b"miss:%d" % i for i in range(100)]))
    for port in (cluster.port, cluster.reference.port):
        assert [p[:2] for p in binary_exchange(port, sets)] == [b"\x81\x0a"]  # only the noop answers
    proxied = binary_exchange(cluster.port, gets)
    assert len(proxied) == 10001
    assert proxied == binary_exchange(cluster.reference.port, gets)
    noreply = b"".join(b"set t:%d 0 0 4 noreply\r\nt%03d\r\n" % (i, i % 1000) for i in range(10000))
    assert talk(cluster.port, noreply) == b""
    assert talk(cluster.port, b"get t:0 t:9999 t:5000\r\n") == (
        b"VALUE t:0 0 4\r\nt000\r\nVALUE t:9999 0 4\r\nt999\r\nVALUE t:5000 0 4\r\nt000\r\nEND\r\n"
    )


# -- real clients ------------------------------------------------------------------------


def test_pymemcache_reads_back_what_it_wrote(cluster):
    pymemcache = pytest.importorskip("pymemcache.client.base")
    client = pymemcache.Client((HOST, cluster.port), timeout=10)
    data = {"pm:%d" % i: b"value-%d" % i for i in range(10000)}
    assert client.set_many(data, noreply=True) == []
    assert client.get_many(list(data)) == data
    big = os.urandom(1 << 20)
    assert client.set("big", big, noreply=False)
    assert client.get("big") == big
    assert client.add("pm:1", b"x", noreply=False) is False
    assert client.incr("counter", 1) is None
    client.set("counter", b"10", noreply=False)
    assert (client.incr("counter", 5), client.decr("counter", 3)) == (15, 12)
    value, cas = client.gets("pm:2")
    assert client.cas("pm:2", b"new", cas, noreply=False) is True
    assert client.cas("pm:2", b"newer", cas, noreply=False) is False
    assert client.append("pm:2", b"+", noreply=False) and client.prepend("pm:2", b"-", noreply=False)
    assert client.touch("pm:2", 100, noreply=False) is True
    assert client.gets_many(["pm:2", "pm:3"])["pm:2"][0] == b"-new+"
    assert client.delete_many(list(data)[:100], noreply=False)
    assert client.get_many(list(data)[:200]) == dict(list(data.items())[100:200])
    assert client.version().startswith(b"1.6")
    client.close()


def _pylibmc():
    # pylibmc is a C extension built against libmemcached; it is only in the
    # test extras on CPython (setup.cfg), so PyPy skips these tests.
    return pytest.importorskip("pylibmc")


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_pylibmc_reads_back_what_it_wrote(cluster, binary):
    pylibmc = _pylibmc()
    client = pylibmc.Client(["%s:%d" % (HOST, cluster.port)], binary=binary, behaviors={"cas": True})
    data = {"pl:%d" % i: b"value-%d" % i for i in range(10000)}
    assert client.set_multi(data) == []
    assert client.get_multi(list(data) + ["missing"]) == data
    big = os.urandom(1 << 20)
    assert client.set("big", big)
    assert client.get("big") == big
    assert client.add("pl:1", b"x") is False
    if binary:  # libmemcached reports a binary NOT_FOUND as an error
        with pytest.raises(pylibmc.NotFound):
            client.replace("missing", b"x")
    else:
        assert client.replace("missing", b"x") is False
    client.set("counter", 10)
    assert (client.incr("counter", 5), client.decr("counter", 3)) == (15, 12)
    value, cas = client.gets("pl:2")
    assert client.cas("pl:2", b"new", cas) is True
    assert client.cas("pl:2", b"newer", cas) is False
    assert client.append("pl:2", b"+") and client.prepend("pl:2", b"-")
    assert client.get("pl:2") == b"-new+"
    assert client.touch("pl:2", 100) is True and client.touch("missing", 100) is False
    assert client.delete("pl:3") is True and client.delete("pl:3") is False
    client.delete_multi(list(data)[:100])
    assert client.get_multi(list(data)[:200]) == dict(list(data.items())[100:200])
    assert client.flush_all()
    assert client.get("pl:150") is None
    client.disconnect_all()


def test_pylibmc_noreply_pipeline(cluster):
    """libmemcached's buffered noreply mode (text) writes 10,000 sets without reading."""
    pylibmc = _pylibmc()
    behaviors = {"buffer_requests": True, "_noreply": True}
    client = pylibmc.Client(["%s:%d" % (HOST, cluster.port)], behaviors=behaviors)
    data = {"nr:%d" % i: b"v%d" % i for i in range(10000)}
    assert client.set_multi(data) == []
    assert client.get_multi(list(data)) == data  # same connection: the sets came first
    client.disconnect_all()


@pytest.mark.skipif(shutil.which("memcslap") is None, reason="libmemcached-tools is not installed")
@pytest.mark.parametrize("args", [[], ["--binary"]], ids=["text", "binary"])
def test_memcslap_runs_without_errors(cluster, args):
    for test in ("set", "get", "mget"):
        result = subprocess.run(
            ["memcslap", "--servers=%s:%d" % (HOST, cluster.port), "--test=" + test, "--execute-number=500",
             "--concurrency=2", "--flush"] + args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=60,
        )
        output = result.stdout.decode("utf-8", "replace")
        assert result.returncode == 0, output
        assert "error" not in output.lower() and "fail" not in output.lower(), output


# -- a backend dies mid-pipeline --------------------------------------------------------------


def test_backend_killed_mid_pipeline():
    """
    Requests in flight to a killed memcached get SERVER_ERROR (text, meta) or
    status 0x0086 (binary), exactly those; the client connections and the other
    servers keep working.
    """
    cluster = Cluster(3, timeout=5000)
    try:
        # Keys spread (see test_multi_get_spans_servers_and_keeps_order) until every server holds
        # five: where a key lands depends on the servers' ports, which the test picks anew each run.
        keys, by_server = [], {}
        while len(by_server) < 3 or min(map(len, by_server.values())) < 5:
            key = b"%d:key" % len(keys)
            keys.append(key)
            assert talk(cluster.port, _sets([key])) == b"STORED\r\n"
            by_server.setdefault(cluster.holder(key), []).append(key)
            assert len(keys) < 1000
        live_a, victim, live_c = by_server[0], by_server[1], by_server[2]
        missing = live_a[-1]  # a miss on a live server
        assert talk(cluster.port, b"delete " + missing + b"\r\n") == b"DELETED\r\n"

        def value(key):
            return b"VALUE %s 0 %d\r\n%s\r\n" % (key, len(key), key)

        text, binary = Conn(cluster.port), Conn(cluster.port)
        text.send(b"get " + b" ".join(keys) + b"\r\n")  # every backend connection is open
        text.text_until(b"END")
        binary.send(b"".join(packet(GETK, k) for k in keys) + noop_sentinel())
        assert len(binary.packets_until_noop()) == len(keys) + 1

        cluster.backends[1].freeze()
        text.send(
            b"get " + live_a[0] + b"\r\n"
            + b"get " + victim[0] + b"\r\n"
            + b"mg " + live_c[0] + b" v\r\n"
            + b"mg " + victim[1] + b" v q\r\n"
            + b"set " + victim[2] + b" 0 0 1 noreply\r\nx\r\n"
            + b"get " + live_a[0] + b" " + victim[3] + b"\r\n"
            + b"mg " + live_c[1] + b" v q\r\n"
            + b"mn\r\n"
        )
        binary.send(
            packet(GETK, live_a[0], opaque=1)
            + packet(GETK, victim[0], opaque=2)
            + packet(GETKQ, victim[1], opaque=3)
            + packet(GETKQ, live_c[0], opaque=4)
            + packet(GETKQ, missing, opaque=5)
            + noop_sentinel()
        )
        assert text.text_until(b"END") == value(live_a[0]) + b"END\r\n"  # the proxy has read the pipeline
        first = binary.read_until(lambda buf: 24 + struct.unpack_from(">I", buf, 8)[0] if len(buf) >= 24 else None)
        assert struct.unpack_from(">I", first, 12)[0] == 1
        time.sleep(0.2)  # let the proxy write the victim's requests to it
        cluster.backends[1].kill()

        lines = text.text_until(b"MN").split(b"\r\n")
        replies = [b"SERVER_ERROR" if r.startswith(b"SERVER_ERROR ") else r for r in lines]
        assert replies == [
            b"SERVER_ERROR",  # get on the victim
            b"VA %d" % len(live_c[0]),
            live_c[0],
            b"SERVER_ERROR",  # mg q on the victim: quiet mode never hides errors
            # (the noreply set on the victim answers nothing, as memcached would)
            b"SERVER_ERROR",  # the split get that touched the victim
            b"VA %d" % len(live_c[1]),
            live_c[1],
            b"MN",
            b"",
        ]
        answers = [struct.unpack_from(">BBHBBHII", p) for p in binary.packets_until_noop()]
        # (opcode, status, opaque): getkq keeps its opcode; the quiet miss stays hidden
        assert [(a[1], a[5], a[7]) for a in answers] == [
            (GETK, 0x0086, 2),
            (GETKQ, 0x0086, 3),
            (GETKQ, 0x0000, 4),
            (NOOP, 0x0000, SENTINEL_OPAQUE),
        ]

        # the connections and the other servers keep working
        assert talk(cluster.port, b"get " + live_a[1] + b" " + live_c[2] + b"\r\n") == (
            value(live_a[1]) + value(live_c[2]) + b"END\r\n"
        )
        text.send(b"get " + live_c[3] + b"\r\nget " + victim[4] + b"\r\nversion\r\n")
        after = text.text_until(b"VERSION")
        assert after.startswith(value(live_c[3]) + b"END\r\nSERVER_ERROR ")
        binary.send(packet(GETK, live_a[2], opaque=9) + noop_sentinel())
        (found, _) = binary.packets_until_noop()
        assert struct.unpack_from(">H", found, 6)[0] == 0 and found.endswith(live_a[2])
        text.close()
        binary.close()
    finally:
        cluster.stop()
