"""
The embedding API from a plain Twisted program: C{Proxy.from_dict} and the
per-pool factories listened on with the program's own C{reactor.listenTCP}.
"""

from __future__ import annotations

import sys
import textwrap

import pytest
import redis

from tests.support import processes
from tests.support.processes import HOST, free_port

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent(
    """\
    import sys

    from twisted.internet import reactor

    import twistedproxy

    backend_port, port = int(sys.argv[1]), int(sys.argv[2])
    proxy = twistedproxy.Proxy.from_dict(
        {
            "cache": {
                "listen": "127.0.0.1:1",  # not used: this program listens itself
                "redis": True,
                "timeout": 2000,
                "servers": ["127.0.0.1:%d:1" % backend_port],
            }
        },
        reactor,
    )
    reactor.listenTCP(port, proxy.factories["cache"], interface="127.0.0.1")
    print("listening", flush=True)
    reactor.run()
    """
)


def test_embedded_proxy_serves(spawn, redis_backends, tmp_path):
    (backend,) = redis_backends(1)
    port = free_port()
    script = tmp_path / "embedded.py"
    script.write_text(SCRIPT)
    proc = spawn(
        processes.Process,
        [sys.executable, str(script), str(backend.port), str(port)],
        port,
        env=processes.proxy_env(),
        cwd=str(tmp_path),
    )
    client = redis.Redis(host=HOST, port=port, socket_timeout=10, protocol=2)
    pipe = client.pipeline(transaction=False)
    for i in range(100):
        pipe.set("emb:%d" % i, i)
    assert all(pipe.execute())
    assert client.mget(["emb:%d" % i for i in range(100)]) == [b"%d" % i for i in range(100)]
    assert client.ping() is True
    direct = redis.Redis(host=HOST, port=backend.port, socket_timeout=10, protocol=2)
    assert direct.dbsize() == 100
    output = proc.output()
    assert "listening" in output and "Traceback" not in output, output
