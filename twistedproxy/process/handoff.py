"""
Handing connected clients from a worker that stops to one that serves, so a
reload that replaces the workers, an upgrade or fewer workers fail no request
of a connected client.

The stopping worker (L{Drain}) stops reading from every client, lets what it
read be answered, and then sends the client's socket with its state (the
parser's state and the bytes read but not framed yet,
L{twistedproxy.core.client.ClientConnection.export_state}) to its master in a
L{HandOff} command, the descriptor passed with SCM_RIGHTS over the AMP channel
(a UNIX socketpair).  The master (L{relay}) passes it on to a ready worker of
its current generation serving the same listen address, or during an upgrade
to the new master, which does the same with its own workers.  The receiving
worker adopts the socket into that pool's factory, restores the state and
feeds the carried bytes; the client sees nothing.

A TLS client is never handed over: its session (keys, sequence numbers) lives
in this process.  It stays served here, read from as before, until it leaves,
its pool's C{tls_idle_timeout} passes without a byte from it while it has every
reply (it is closed then, with TLS's close_notify), or C{worker_shutdown_timeout}
ends the drain (L{twistedproxy.net.tls}).

Where nobody takes the client (the reload removed its listen address, the
pool there now speaks another protocol, the master stops, no worker is
ready), the stopping worker closes it: its replies are already out.
"""

from __future__ import annotations

import json
import os

from twisted.internet import defer
from twisted.logger import Logger
from twisted.protocols import amp

from twistedproxy.net.channels import BigUnicode, quiet_factory
from twistedproxy.net.tls import is_tls

log = Logger()

# How often a stopping worker looks for clients whose replies are all out (s).
HAND_INTERVAL = 0.01


class HandOff(amp.Command):
    """
    Take this client connection: C{fd} its socket, C{listen} the address it
    connected to, C{pool} the pool serving it (the master rewrites it to the
    receiver's pool at that address), C{state} the JSON of its state.
    Stopping worker -> master -> (old master -> new master ->) serving worker.
    """

    arguments = [
        (b"fd", amp.Descriptor()),
        (b"family", amp.Integer()),
        (b"listen", amp.Unicode()),
        (b"pool", amp.Unicode()),
        (b"state", BigUnicode()),
    ]
    response = [(b"ok", amp.Boolean()), (b"why", amp.Unicode())]


def _refused(why: str) -> dict:
    return {"ok": False, "why": why}


class Drain:
    """
    A stopping worker's clients: none is read from any more; each is handed
    over (or closed) once every request it sent is answered and written.
    Calls C{done()} when no client is left or at C{deadline}.
    """

    def __init__(self, reactor, clients, channel, deadline: float, done):
        self.reactor = reactor
        self.clients = clients  # a callable: the open client connections
        self.channel = channel  # AMP to the master
        self.deadline = deadline
        self.done = done
        self.sending = set()
        self.handed = 0
        self.closed = 0
        self.call = None
        self.heard = {}  # TLS client -> when it last sent bytes (or the drain began)

    def start(self) -> None:
        self._tick()

    def _tick(self) -> None:
        self.call = None
        clients = self.clients()
        # Past the deadline the rest is closed, but never a client being handed
        # over: the receiver may hold it already.
        if not clients or (self.reactor.seconds() >= self.deadline and not self.sending):
            if self.handed or self.closed:
                log.info("handed {handed} client(s) over to another worker, closed {closed}",
                         handed=self.handed, closed=self.closed)
            self.done()
            return
        for client in clients:
            if is_tls(client.transport):
                self._keep(client)  # served here: a TLS session cannot change process
                continue
            client.freeze()
            if client not in self.sending and client.drained():
                self._send(client)
        self.call = self.reactor.callLater(HAND_INTERVAL, self._tick)

    def _keep(self, client) -> None:
        """Serve a TLS client here; close it once idle for its pool's C{tls_idle_timeout}."""
        now = self.reactor.seconds()
        if client not in self.heard:
            self.heard[client] = now
            read = client.dataReceived

            def dataReceived(data):
                self.heard[client] = self.reactor.seconds()
                read(data)

            client.dataReceived = dataReceived
        idle = client.route.config.tls_idle_timeout
        if idle and not client.queue and not client.closed and now - self.heard[client] >= idle / 1000.0:
            log.debug("TLS client {peer} idle on a stopping worker; closing", peer=client._peer())
            self.closed += 1
            client.closed = True
            client.transport.loseConnection()

    def _send(self, client) -> None:
        self.sending.add(client)
        transport = client.transport
        try:
            d = self.channel.callRemote(
                HandOff,
                fd=transport.fileno(),
                family=int(transport.socket.family),
                listen=str(client.pool.config.listen),
                pool=client.pool.name,
                state=json.dumps(client.export_state()),
            )
        except Exception:
            d = defer.fail()
        d.addCallbacks(self._answered, self._failed, callbackArgs=(client,), errbackArgs=(client,))

    def _answered(self, answer, client) -> None:
        self.sending.discard(client)
        if answer["ok"]:
            self.handed += 1
            client.handed_off()
        else:
            self._close(client, answer["why"])

    def _failed(self, failure, client) -> None:
        self.sending.discard(client)
        self._close(client, failure.getErrorMessage())

    def _close(self, client, why: str) -> None:
        # Its replies are out: close it as a stop always did.  Without
        # shutdown(): should the receiver have taken it after all, it keeps it.
        log.debug("client {peer} not handed over ({why}); closing", peer=client._peer(), why=why)
        self.closed += 1
        client.transport._shouldShutdown = False
        client.transport.loseConnection()


def relay(master, sender, fd: int, family: int, listen: str, pool: str, state: str):
    """
    A master's part of a L{HandOff} from its worker C{sender} (None: from the
    old master of an upgrade): pass it on; a Deferred firing with the answer.
    The master's copy of C{fd} is closed once answered.
    """

    def close(result):
        try:
            os.close(fd)
        except OSError:
            pass
        return result

    if master.heir is not None:
        # An upgrade: the new master's workers serve now.
        d = master.heir.callRemote(HandOff, fd=fd, family=family, listen=listen, pool=pool, state=state)
    elif master.stopping:
        d = defer.succeed(_refused("the proxy stops"))
    else:
        name = next((p.name for p in master.config.pools if str(p.listen) == listen), None)
        targets = [w for _, w in sorted(master.workers.items())
                   if w is not sender and w.state == "ready" and w.hello and w.channel is not None]
        if name is None:
            d = defer.succeed(_refused("listen address %s removed" % (listen,)))
        elif not targets:
            d = defer.succeed(_refused("no worker ready to take it"))
        else:
            master.handoff_turn = (master.handoff_turn + 1) % len(targets)
            target = targets[master.handoff_turn]
            d = target.channel.callRemote(HandOff, fd=fd, family=family, listen=listen, pool=name, state=state)
    d.addErrback(lambda failure: _refused(failure.getErrorMessage()))
    return d.addBoth(close)


def adopt(reactor, factory, fd: int, family: int, state: str, prepare):
    """
    A serving worker's part of a L{HandOff}: adopt socket C{fd} into C{factory}
    (a L{twistedproxy.core.client.ProxyFactory}), C{prepare(client)} as for an
    accepted client, then restore its state.  Returns the answer; C{fd} stays
    the caller's to close.
    """

    carried = json.loads(state)
    if carried.get("codec") != factory.pool.codec.name:
        return _refused("the pool at that address speaks %s now" % (factory.pool.codec.name,))
    adopted = []

    def build():
        client = factory.adopt()
        prepare(client)
        adopted.append(client)
        return client

    reactor.adoptStreamConnection(fd, family, quiet_factory(build))
    os.set_blocking(fd, False)  # PyPy's adoption made it (the shared file) blocking
    adopted[0].import_state(carried)
    return {"ok": True, "why": ""}
