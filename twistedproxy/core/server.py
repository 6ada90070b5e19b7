"""
One pipelined connection to one backend.

Requests are appended to an in-flight queue in the order their frames are
written; the backend answers in the same order, so each reply completes the
oldest request.  Frames queued during one client batch go out in one write.

Timeouts cost one timer per connection, not per request: the timer always
points at the oldest request still waiting.  A request that times out gets its
error reply at once and stays in the queue, marked expired, until the backend's
late reply arrives and is thrown away: the pipeline stays aligned and the other
requests on the connection are not touched.

A timer can fire late, after a long reactor turn, when the replies it waits
for are already in the socket: the reactor runs due timers before it reads.  So
a timer first reads what the backend has sent, and only requests still
unanswered then time out.
"""

from __future__ import annotations

from collections import deque

from twisted.internet.error import ConnectError
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from twistedproxy.core.completion import BAD_REPLY, CLOSED, TIMED_OUT, complete, fail, failure_text, flush_clients
from twistedproxy.core.jit import compiled_apart, object_list
from twistedproxy.core.request import ProtocolError, stand_in
from twistedproxy.core.transports import set_up_connected
from twistedproxy.net.tls import TLS_FAILURE, is_tls, raw_transport

log = Logger()


class ServerConnection(Protocol):
    """
    A backend connection for one L{twistedproxy.core.servers.Server} and one codec.

    It exists (and accepts requests) before the TCP connection is up: frames
    wait in C{outbuf} until C{connectionMade}.
    """

    def __init__(self, server, codec, reactor, probe=False):
        self.server = server
        self.codec = codec
        self.reactor = reactor
        self.parser = codec.reply_parser()
        self.inflight = deque()
        self.outbuf = object_list()  # emptied in place, never replaced (see object_list)
        self.connected = False
        self.closed = False
        self.n_expired = 0  # the expired requests are always a prefix of inflight
        self.closing_when_idle = False
        self.timer = None
        self.timeout = server.pool.timeout  # seconds or None
        self.pinned = False  # one client's own (L{twistedproxy.core.servers.Server.pin})
        now = reactor.seconds()
        requests = codec.handshake(server.pool.config)
        for extra in server.pool.handshake_extra:
            requests.append(extra())
        # A probe of an ejected server (L{Server.probe}): internal, like the handshake.
        self.probe = codec.probe_request() if probe else None
        if probe:
            requests.append(self.probe)
        for request in requests:
            request.internal = True  # the proxy's own: never a client's, never counted
            # Timed like any request queued before the connection is up (a zero
            # sent_at would make it expire at the first flush).
            request.sent_at = now
            self.outbuf.append(request.frame)
            self.inflight.append(request)

    # -- sending -------------------------------------------------------------

    def enqueue(self, request, now: float, touched: list) -> None:
        """Queue C{request}; C{touched} collects connections to flush after the batch."""
        if not self.outbuf:
            touched.append(self)
        request.sent_at = now
        server = request.server = self.server
        frame = request.frame
        if not request.internal:  # a route's own copy (replicate, shadow ...) is not counted
            stats = server.stats
            stats.requests += 1
            stats.request_bytes += len(frame)
        self.outbuf.append(frame)
        self.inflight.append(request)

    def enqueue_internal(self, request, now: float, touched: list) -> None:
        """
        Queue a request the proxy issues itself (L{twistedproxy.core.request.Request.internal}:
        ASKING, a migration command ...): uncounted, its reply or failure goes to
        its C{resume} hook, never to a client.
        """
        if not self.outbuf:
            touched.append(self)
        request.internal = True
        request.sent_at = now
        self.outbuf.append(request.frame)
        self.inflight.append(request)

    @compiled_apart
    def flush(self) -> None:
        """Write every queued frame in one write (once connected)."""
        if not self.connected or not self.outbuf:
            return
        out = self.outbuf
        data = out[0] if len(out) == 1 else b"".join(out)
        del out[:]
        self.write(data)
        if self.timer is None and self.timeout is not None:
            self._arm_timer()

    # -- connection events ---------------------------------------------------

    def connectionMade(self):
        self.connected = True
        transport = self.transport
        self.write = set_up_connected(transport)
        if self.closed:
            # Closed while connecting (its server was ejected or stopped): do not
            # keep it; requests queued on it fail when the connection is lost.
            transport.loseConnection()
            return
        if hasattr(transport, "setTcpNoDelay"):
            transport.setTcpNoDelay(True)
            if self.server.pool.config.tcpkeepalive:
                transport.setTcpKeepAlive(True)
        self.server.connection_made(self)
        self.flush()

    @compiled_apart
    def dataReceived(self, data):
        parser = self.parser
        parser.feed(data)
        inflight = self.inflight
        dirty = []
        stats = self.server.stats
        now = self.reactor.seconds()
        try:
            more = True
            if len(inflight) == 1:
                # One request in flight (low load): its reply without entering the
                # loop, as on PyPy each entry into a loop the JIT compiled apart
                # allocates a frame on the heap (see
                # L{twistedproxy.core.client.ClientConnection._take}).
                more = self._take_reply(parser, inflight, stats, now, dirty)
            while more and inflight:  # more in flight (or a reply sent its request again here)
                more = self._take_reply(parser, inflight, stats, now, dirty)
            if more and parser.buffered():
                raise ProtocolError(b"", message="unexpected data from backend")
        except ProtocolError as e:
            log.error(
                "backend {server} sent bad data ({error}); closing",
                server=self.server.label,
                error=str(e),
            )
            flush_clients(dirty)
            self.closed = True
            self.server.last_error = BAD_REPLY
            self.transport.abortConnection()
            return
        server = self.server
        if server.failures:
            server.succeeded()
        # Replies for a client from several backends in one turn leave in one write.
        if dirty:
            server.pool.flusher.add_clients(dirty)
        if self.closing_when_idle and not inflight:
            self.close()

    def _take_reply(self, parser, inflight, stats, now: float, dirty: list) -> bool:
        """
        Give the oldest request in flight its reply if C{parser} has it whole;
        False when it has not, or when a refused login closed the connection
        (nothing after it is read).
        """
        request = inflight[0]
        raw = parser.next_reply(request)
        if raw is None:
            return False
        if len(inflight) == 1:
            # Emptied by clear(), not popleft(): that puts a deque's next item back
            # in the middle of its block, so a connection with a few requests in
            # flight never crosses into another block, a rare path that PyPy
            # compiled in a pause of milliseconds while serving (bench/README.md,
            # "Measured in the eleventh #10 session").
            inflight.clear()
        else:
            inflight.popleft()
        if request.internal:  # the proxy's own request: no counter, no client
            if request.expired:
                self.n_expired -= 1
                return True
            return not self._internal_reply(request, raw, dirty)
        stats.reply(len(raw), now - request.sent_at)
        request.replied_at = now
        if request.parent is not None:
            request.parent.replied_at = now
        if request.expired:
            self.n_expired -= 1
        else:
            complete(request, raw, self.codec, dirty)
        return True

    def _internal_reply(self, request, raw: bytes, dirty: list) -> bool:
        """Take the reply to the proxy's own C{request}; True when it closed the connection."""
        if request.resume is not None:  # a route's own request (ASKING, a migration command ...)
            request.resume(request, raw, None, self.codec, dirty)
            return False
        # A handshake or probe request.
        error = self.codec.handshake_error(raw)
        if request is self.probe:
            self.server.probe_answered(self, error is None)
            if error is None:
                return False
        if error is not None:
            log.error("backend {server} refused the handshake: {error}", server=self.server.label, error=error)
            if request.close_after:
                # A refused login after which the server's replies cannot be
                # trusted to follow the requests (memcached): the connection's
                # requests fail with the refusal instead.
                self.server.last_error = "backend refused the login: %s" % (error,)
                self.close()
                return True
        return False

    def connectionLost(self, reason):
        self.connected = False
        server = self.server
        if self.closed:
            # The proxy closed it (ejection, bad data, stop): what is still in
            # flight fails the way the failure that made it close did.
            error = server.last_error or CLOSED
        else:
            error = server.last_error = failure_text(reason)
        # Leave the server first: failing requests lets their clients send more
        # (held requests), which must not be queued on this dead connection.
        server.connection_lost(self, reason)
        failed = self._fail_all(error)
        if failed or not self.closed:
            self._log_failure("connection lost", reason, failed, error)

    def connection_failed(self, reason) -> None:
        """The TCP connection could not be made."""
        server = self.server
        error = server.last_error = failure_text(reason)
        server.connection_lost(self, reason)
        self._log_failure("cannot connect", reason, self._fail_all(error), error)

    def _log_failure(self, what: str, reason, failed: int, error: str) -> None:
        # The reply says only nutcracker's text: the log names the server and the cause.
        # A failed TLS handshake or certificate check is a configuration error: an error.
        (log.error if error.startswith(TLS_FAILURE) else log.warn)(
            "backend {server}: {what} ({reason}); {failed} requests answered '{error}'",
            server=self.server.label,
            what=what,
            reason=_cause(reason).getErrorMessage(),
            failed=failed,
            error=error,
        )

    def close_when_idle(self) -> None:
        """Close once every request in flight is answered (used when a pool retires)."""
        self.closing_when_idle = True
        if not self.inflight and not self.outbuf:
            self.close()

    def close(self) -> None:
        """Close the connection; requests still in flight get error replies."""
        if self.closed:
            return
        self.closed = True
        if self.connected:
            self.transport.loseConnection()

    def _fail_all(self, error: str) -> int:
        """Fail every request in flight with C{error}; return how many."""
        self.closed = True
        self._cancel_timer()
        dirty = []
        inflight = self.inflight
        self.inflight = deque()
        del self.outbuf[:]
        where = self.server.label
        failed = 0
        for request in inflight:
            if request.expired:
                continue
            if request.internal:
                if request.resume is not None:
                    request.resume(request, None, error, self.codec, dirty)
            elif request.client is not None or request.parent is not None:
                fail(request, error, where, self.codec, dirty)
                failed += 1
        self.n_expired = 0
        flush_clients(dirty)
        return failed

    # -- timeouts ------------------------------------------------------------

    def _arm_timer(self) -> None:
        if len(self.inflight) > self.n_expired:
            oldest = self.inflight[self.n_expired]
            delay = oldest.sent_at + self.timeout - self.reactor.seconds()
            self.timer = self.reactor.callLater(max(delay, 0.0), self._timer_fired)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None

    def _read_waiting(self) -> None:
        """Read what the backend has already sent, without waiting for the reactor's turn."""
        transport = self.transport
        received = self.dataReceived
        if is_tls(transport):  # the socket's bytes are TLS records: through the TLS layer
            received = transport.dataReceived
            transport = raw_transport(transport)
        sock = getattr(transport, "socket", None)
        if sock is None:
            return
        size = getattr(transport, "bufferSize", 65536)
        while self.connected and self.inflight:
            try:
                data = sock.recv(size)
            except OSError:
                return  # nothing waiting (EAGAIN); an error: the reactor's next read ends the connection
            if not data:
                return  # the end of the stream: the reactor's read sees it too and closes
            received(data)
            if len(data) < size or transport.disconnecting or getattr(transport, "_aborting", False):
                return  # all read, or the backend's bytes were refused (bad data): stop reading them

    def _timer_fired(self) -> None:
        self.timer = None
        self._read_waiting()
        now = self.reactor.seconds()
        deadline = now - self.timeout
        inflight = self.inflight
        dirty = []
        expired = 0
        where = self.server.label
        # Fractions of a millisecond early count as due: timers fire at most that early.
        while len(inflight) > self.n_expired and inflight[self.n_expired].sent_at <= deadline + 1e-4:
            request = inflight[self.n_expired]
            if request.resume is not None:
                # A route may send it elsewhere (its own internal requests too):
                # a stand-in swallows the late reply here.
                inflight[self.n_expired] = stand_in(request)
            else:
                request.expired = True
            self.n_expired += 1
            expired += 1
            if request.internal:
                if request.resume is not None:
                    request.resume(request, None, TIMED_OUT, self.codec, dirty)
                continue
            if request.client is None and request.parent is None:
                continue  # its client is gone
            fail(request, TIMED_OUT, where, self.codec, dirty)
        flush_clients(dirty)
        if expired:
            log.info("backend {server}: {expired} requests timed out", server=where, expired=expired)
            self.server.last_error = TIMED_OUT
            self.server.timed_out(self)
        # Failing requests may have let clients send more, arming the timer already.
        if self.timer is None and not self.closed and self.connected:
            self._arm_timer()


def _cause(reason: Failure) -> Failure:
    """
    The failure behind C{reason}.  A connection lost while it was still
    connecting (the reactor stopping, say) reaches us as a ConnectError whose
    message is that loss's whole Failure, traceback header included: the log
    names the loss instead.
    """
    value = reason.value
    if isinstance(value, ConnectError) and value.args and isinstance(value.args[0], Failure):
        return value.args[0]
    return reason
