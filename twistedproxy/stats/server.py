"""
The stats endpoints:

  - the stats port (nutcracker's C{-s/-a}): every TCP connection gets the
    twemproxy JSON document and is closed, as nutcracker does (also one that
    shut down its sending side at once, like C{nc HOST PORT </dev/null});
  - the HTTP endpoint (C{global: stats_http}): C{/status} (HTML page),
    C{/stats.json}, C{/metrics} (Prometheus), C{/slowlog} (JSON, C{?limit=N})
    and C{POST /tune} (run-time settings as a form or JSON object; answers
    with each process's settings).  State-changing calls (C{POST}) are off
    unless C{global: admin_token} (or C{admin_token_file}) is set; they then
    need C{Authorization: Bearer TOKEN}.
  - the read-only HTTP endpoint (C{global: metrics_http}): only C{GET} (and
    C{HEAD}) of C{/metrics}, C{/status} and C{/stats.json}; any other method
    on any path is 405, whatever it carries: a scraper's address that cannot
    change anything, token or not.

Both take I{sources}, callables returning Deferreds, so the same servers run in
a single process (L{LocalSources}) and in the master, which collects from its
workers over AMP:

  - C{stats()}: the merged snapshot (L{twistedproxy.stats.snapshots.merge});
  - C{slowlog(limit=None)}: the merged slow log (a list, most recent first);
  - C{tune(changes, pool)}: apply settings everywhere; fires with a report;
  - C{admin_token()}: the token state-changing calls need, or None (see
    L{admin_token}).
"""

from __future__ import annotations

import hmac
import json

from twisted.internet.defer import maybeDeferred, succeed
from twisted.internet.interfaces import IHalfCloseableProtocol, ILoggingContext, IProtocolFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.web import resource, server
from zope.interface import implementer

from twistedproxy.config.settings import TuningError
from twistedproxy.stats import prometheus, snapshots, status

log = Logger()


class LocalSources:
    """The sources for a single process running C{proxy}."""

    def __init__(self, proxy):
        self.proxy = proxy

    def stats(self):
        merged = snapshots.merge([snapshots.snapshot(self.proxy)])
        coordinator = getattr(self.proxy, "coordinator", None)
        if coordinator is not None:
            merged["migrations"] = coordinator.records()
        return succeed(merged)

    def slowlog(self, limit=None):
        return succeed(snapshots.merge_slowlogs([snapshots.slowlog(self.proxy)], limit or None))

    def tune(self, changes, pool=None):
        return maybeDeferred(lambda: {"workers": [self.proxy.tune(changes, pool)]})

    def admin_token(self):
        return admin_token(self.proxy.config.global_)


def admin_token(global_config):
    """
    The token of C{global_config} (a GlobalConfig) that state-changing HTTP
    calls need: C{admin_token}, else the content of C{admin_token_file} (read
    at each call, so a rotated file applies at once; surrounding whitespace
    dropped), else None: those calls are off.  Raises OSError when the file
    cannot be read.
    """
    if global_config.admin_token:
        return global_config.admin_token
    if global_config.admin_token_file:
        with open(global_config.admin_token_file, "rb") as f:
            token = f.read().strip().decode("utf-8", "replace")
        if not token:
            raise OSError("%s is empty" % (global_config.admin_token_file,))
        return token
    return None


# -- the twemproxy stats port ------------------------------------------------


@implementer(IHalfCloseableProtocol)
class _StatsPortProtocol(Protocol):
    def connectionMade(self):
        d = maybeDeferred(self.factory.source)
        d.addCallback(snapshots.twemproxy_document)
        d.addCallback(self._send)
        d.addErrback(self._failed)

    def _send(self, document):
        if self.transport is not None:
            self.transport.write(json.dumps(document, separators=(", ", ":")).encode("utf-8") + b"\n")
            self.transport.loseConnection()

    def _failed(self, failure):
        log.failure("stats port: cannot collect stats", failure)
        self.transport.loseConnection()

    def readConnectionLost(self):
        pass  # the client sent all it will (nothing is read anyway): the document still goes out

    def writeConnectionLost(self):
        pass


@implementer(IProtocolFactory, ILoggingContext)  # declared for the reason ProxyFactory's are
class StatsPortFactory(Factory):
    """nutcracker's stats port: C{source()} fires with a merged snapshot."""

    protocol = _StatsPortProtocol
    noisy = False

    def __init__(self, source):
        self.source = source


# -- HTTP --------------------------------------------------------------------


class HTTPRefused(Exception):
    """A request refused before any work: C{code}, a plain-text C{text}, extra C{headers}."""

    def __init__(self, code: int, text: str, headers=()):
        Exception.__init__(self, text)
        self.code = code
        self.text = text
        self.headers = headers


class _Deferred(resource.Resource):
    """A leaf that answers from a Deferred: C{produce(request)} fires with (content type, body)."""

    isLeaf = True

    def __init__(self, produce, methods=(b"GET", b"HEAD")):
        resource.Resource.__init__(self)
        self.produce = produce
        self.methods = methods

    def render(self, request):
        if request.method not in self.methods:
            request.setResponseCode(405)
            request.setHeader(b"allow", b", ".join(self.methods))
            return b"method not allowed\n"
        finished = []
        request.notifyFinish().addBoth(finished.append)
        d = maybeDeferred(self.produce, request)

        def write(result):
            if finished:
                return  # the client went away
            content_type, body, code = result if len(result) == 3 else result + (200,)
            request.setResponseCode(code)
            request.setHeader(b"content-type", content_type.encode("ascii"))
            request.setHeader(b"cache-control", b"no-store")
            request.write(body)
            request.finish()

        def error(failure):
            if failure.check(TuningError):
                return write(("application/json", _json({"error": str(failure.value)}), 400))
            if failure.check(HTTPRefused):
                for name, value in failure.value.headers:
                    request.setHeader(name, value)
                return write(("text/plain; charset=utf-8", failure.value.text.encode("utf-8") + b"\n",
                              failure.value.code))
            log.failure("stats HTTP: {uri}", failure, uri=request.uri)
            if not finished:
                request.setResponseCode(500)
                request.write(b"internal error\n")
                request.finish()

        d.addCallback(write)
        d.addErrback(error)
        return server.NOT_DONE_YET


def _json(data) -> bytes:
    return json.dumps(data, indent=1, sort_keys=False).encode("utf-8") + b"\n"


class _QuietSite(server.Site):
    """No access log: scrapes every few seconds would flood the proxy's log."""

    noisy = False

    def log(self, request):
        pass


class _ReadOnlyRoot(resource.Resource):
    """A root that answers every method but GET and HEAD with 405 before looking for the path."""

    METHODS = (b"GET", b"HEAD")

    def getChildWithDefault(self, path, request):
        if request.method not in self.METHODS:
            return _MethodNotAllowed(self.METHODS)
        return resource.Resource.getChildWithDefault(self, path, request)

    def render(self, request):
        return _MethodNotAllowed(self.METHODS).render(request)


class _MethodNotAllowed(resource.Resource):
    isLeaf = True

    def __init__(self, allowed):
        resource.Resource.__init__(self)
        self.allowed = allowed

    def render(self, request):
        request.setResponseCode(405)
        request.setHeader(b"allow", b", ".join(self.allowed))
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"method not allowed\n"


class StatsSite:
    """
    The HTTP resource tree; C{site()} is a Twisted web Site to listen with.
    C{read_only}: the C{metrics_http} endpoint's tree (L{_ReadOnlyRoot}: only
    reading, and only C{/metrics}, C{/status}, C{/stats.json}).
    """

    def __init__(self, sources, reactor, read_only=False):
        self.sources = sources
        self.reactor = reactor
        self.previous = None  # the last snapshot the status page saw (for rates)
        # The status page links to the other pages of its address.
        self.links = tuple(link for link in status.LINKS if link != "/slowlog") if read_only else status.LINKS
        root = _ReadOnlyRoot() if read_only else resource.Resource()
        page = _Deferred(self._status)
        root.putChild(b"status", page)
        root.putChild(b"stats.json", _Deferred(self._stats_json))
        root.putChild(b"metrics", _Deferred(self._metrics))
        if not read_only:
            root.putChild(b"", page)
            root.putChild(b"slowlog", _Deferred(self._slowlog))
            root.putChild(b"tune", _Deferred(self._tune, methods=(b"POST",)))
        self.root = root

    def site(self) -> server.Site:
        site = _QuietSite(self.root)
        site.displayTracebacks = False
        return site

    def _status(self, request):
        def render(merged):
            previous, self.previous = self.previous, merged
            if previous is not None and merged["time"] - previous["time"] > 120:
                previous = None  # too old to give a current rate
            page = status.render(merged, previous, self.reactor.seconds(), self.links)
            return "text/html; charset=utf-8", page.encode("utf-8")

        return self.sources.stats().addCallback(render)

    def _stats_json(self, request):
        now = self.reactor.seconds()
        return self.sources.stats().addCallback(
            lambda merged: ("application/json", _json(snapshots.report(merged, now)))
        )

    def _metrics(self, request):
        now = self.reactor.seconds()
        return self.sources.stats().addCallback(
            lambda merged: (prometheus.CONTENT_TYPE, prometheus.render(merged, now))
        )

    def _slowlog(self, request):
        limit = None
        raw = request.args.get(b"limit")
        if raw:
            try:
                limit = max(int(raw[0]), 0)
            except ValueError:
                raise TuningError("limit: expected an integer")
        return self.sources.slowlog().addCallback(
            lambda entries: ("application/json", _json(entries[:limit] if limit is not None else entries))
        )

    def _authorize(self, request) -> None:
        """Let a state-changing call through only with the configured token; raise L{HTTPRefused} if not."""
        try:
            token = self.sources.admin_token()
        except OSError as e:
            log.warn("stats HTTP: {uri} refused: cannot read admin_token_file: {error}", uri=request.uri, error=e)
            raise HTTPRefused(403, "refused: the admin_token_file cannot be read (see the proxy's log)")
        if token is None:
            raise HTTPRefused(403, "refused: state-changing HTTP calls are off; set global: admin_token"
                                   " (or admin_token_file) and send Authorization: Bearer TOKEN")
        scheme, _, given = (request.getHeader(b"authorization") or b"").strip().partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), token.encode("utf-8")):
            raise HTTPRefused(401, "unauthorized: send Authorization: Bearer TOKEN (global: admin_token)",
                              [(b"www-authenticate", b'Bearer realm="twistedproxy"')])

    def _tune(self, request):
        self._authorize(request)
        content_type = request.getHeader(b"content-type") or b""
        if content_type.startswith(b"application/json"):
            try:
                changes = json.loads(request.content.read().decode("utf-8"))
            except ValueError as e:
                raise TuningError("bad JSON: %s" % (e,))
            if not isinstance(changes, dict):
                raise TuningError("expected a JSON object of settings")
        else:
            changes = {k.decode("utf-8"): v[-1].decode("utf-8") for k, v in request.args.items()}
        pool = changes.pop("pool", None)
        return self.sources.tune(changes, pool).addCallback(lambda report: ("application/json", _json(report)))


def stats_key(kind: str, listen_spec) -> str:
    """
    The name of the master's listening socket for a stats endpoint (C{kind}
    "port": nutcracker's C{-s/-a}; "http": C{global.stats_http}; "metrics":
    C{global.metrics_http}).  The address is part of the name so a new master
    whose endpoint moved binds afresh.
    """
    return "stats#%s@%s" % (kind, listen_spec)


def endpoints(global_config, stats_port=None, stats_addr="0.0.0.0") -> dict:
    """
    The stats endpoints asked for: kind -> ListenSpec, kind "port" for the stats
    port (the command line's C{stats_port}, 0 or None: none, on C{stats_addr}),
    "http" for C{global_config.stats_http} and "metrics" for its read-only
    C{metrics_http} (each a ListenSpec or None: none).
    """
    from twistedproxy.config import ListenSpec

    found = {}
    if stats_port:
        found["port"] = ListenSpec(host=stats_addr, port=stats_port)
    if global_config.stats_http is not None:
        found["http"] = global_config.stats_http
    if global_config.metrics_http is not None:
        found["metrics"] = global_config.metrics_http
    return found


def moved(old_global, new_global) -> bool:
    """Whether a reload from C{old_global} to C{new_global} (GlobalConfigs) moves an HTTP stats endpoint."""
    return (old_global.stats_http, old_global.metrics_http) != (new_global.stats_http, new_global.metrics_http)


def _factory(kind, sources, reactor):
    if kind == "port":
        return StatsPortFactory(sources.stats)
    return StatsSite(sources, reactor, read_only=kind == "metrics").site()


_WHAT = {"port": "on stats port", "http": "for stats HTTP on", "metrics": "for read-only metrics HTTP on"}


def _cannot_listen(kind, spec, error) -> None:
    log.error("cannot listen {what} {addr}: {error}", what=_WHAT[kind], addr=str(spec), error=error)


def start(reactor, sources, specs: dict, running=None) -> dict:
    """
    Listen with the stats endpoints C{specs} (kind -> ListenSpec, from
    L{endpoints}); returns the listening ports by socket name (L{stats_key}).
    C{running} (what an earlier call returned) are kept where their address
    stays and stopped otherwise: a reload moves only what moved.  One that
    cannot be opened is logged and skipped: the proxy keeps serving.
    """
    from twistedproxy.net.sockets import listen

    ports = {}
    running = dict(running or {})
    wanted = {stats_key(kind, spec): (kind, spec) for kind, spec in specs.items()}
    for key in set(running) - set(wanted):
        running.pop(key).stopListening()
    for key, (kind, spec) in wanted.items():
        if key in running:
            ports[key] = running.pop(key)
            continue
        try:
            ports[key] = listen(reactor, spec, _factory(kind, sources, reactor))
        except Exception as e:
            _cannot_listen(kind, spec, e)
    return ports


def bind(specs: dict, available: dict) -> dict:
    """
    Listening sockets for the endpoints C{specs} (kind -> ListenSpec, from
    L{endpoints}): taken from C{available} (socket name -> socket, consumed:
    what a master inherits on upgrade) when there, bound otherwise.  Returns
    socket name (L{stats_key}) -> socket; one that cannot be bound is logged
    and skipped.
    """
    from twistedproxy.net.sockets import bind_socket

    sockets = {}
    for kind, spec in specs.items():
        key = stats_key(kind, spec)
        sock = available.pop(key, None)
        if sock is None:
            try:
                sock = bind_socket(spec, 128)
            except OSError as e:
                _cannot_listen(kind, spec, e)
                continue
        sockets[key] = sock
    return sockets


def adopt(reactor, sources, specs: dict, sockets: dict) -> list:
    """
    Serve the stats endpoints C{specs} on the sockets made for them by L{bind}
    (an endpoint without one is skipped); returns the ports.  The sockets stay
    open (and a UNIX socket's path in place) when the ports stop: their owner
    closes them.
    """
    from twistedproxy.net.sockets import adopt_port

    ports = []
    for kind, spec in specs.items():
        sock = sockets.get(stats_key(kind, spec))
        if sock is not None:
            ports.append(adopt_port(reactor, sock.fileno(), _factory(kind, sources, reactor)))
    return ports
