"""
TLS on both sides of the proxy, on Twisted's memory-BIO TLS (pyOpenSSL).

Client side: a listen address with C{tls_cert} serves through a
L{ListenerTLS}: each accepted client protocol is wrapped in a
L{TLSMemoryBIOProtocol} (L{ListenerTLS.wrap}), so the listening socket stays a
plain TCP (or UNIX) socket that a master can hand to its workers, reuseport or
shared, exactly as before.  A reload builds a new L{ListenerTLS} from the files
(L{twistedproxy.config.tls}), so new clients get the renewed certificate while
connected ones keep their sessions (each holds the context it started with).

A TLS session lives in the process that made it: it cannot be handed to
another worker (L{is_tls}), so a stopping worker keeps serving its TLS clients
until they leave or C{worker_shutdown_timeout} ends them
(L{twistedproxy.process.handoff.Drain}).

Server side: a pool with C{backend_tls} connects through a L{BackendTLS}:
Twisted's C{optionsForClientTLS} per server, which verifies the chain against
C{backend_tls_ca} (or the system's trust store) and the server's name through
service-identity.  A failed handshake or check ends the connection with the
TLS error: L{failure_text} gives the text of the error replies, and the
connection's requests fail as for any lost connection.  Nothing falls back to
plain text.
"""

from __future__ import annotations

from typing import Optional

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from twistedproxy.config.tls import read_certificates, read_key_pair, server_name

TLS_FAILURE = "TLS: "  # how the text of a TLS failure's error reply starts

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def is_tls(transport) -> bool:
    """Whether a protocol's C{transport} is a TLS session (one that cannot change process)."""
    return isinstance(transport, TLSMemoryBIOProtocol)


def raw_transport(transport):
    """The transport that owns the socket: under TLS, the one below the TLS layer."""
    return transport.transport if isinstance(transport, TLSMemoryBIOProtocol) else transport


# -- reads without a new buffer each ------------------------------------------------

try:
    from OpenSSL._util import ffi as _ffi, lib as _lib  # pyOpenSSL's own bindings

    _READ_SIZE = 2**15  # what Twisted's TLS layer asks for at a time
    _buffer = _ffi.new("char[]", _READ_SIZE)
except ImportError:  # another pyOpenSSL: its own reads
    _buffer = None


class _SharedBufferConnection(SSL.Connection):
    """
    pyOpenSSL's connection, reading into one buffer the process shares.

    Twisted's TLS layer calls C{recv(2**15)} and C{bio_read(2**15)} at least
    twice per read and per write, and pyOpenSSL allocates a new 32 KiB cffi
    buffer for each: on PyPy those allocations drove the garbage collector,
    10-100 us each (bench/README.md).  Reads happen one at a time, in the
    reactor's thread, and each read's bytes are copied out before anyone sees
    them, as in L{twistedproxy.core.reads}.  Everything else is pyOpenSSL's,
    errors included.
    """

    def recv(self, bufsiz, flags=None):
        if flags is not None:
            return SSL.Connection.recv(self, bufsiz, flags)
        size = min(bufsiz, _READ_SIZE)
        result = _lib.SSL_read(self._ssl, _buffer, size)
        self._raise_ssl_error(self._ssl, result)
        return _ffi.buffer(_buffer, result)[:]

    def bio_read(self, bufsiz):
        if self._from_ssl is None:
            return SSL.Connection.bio_read(self, bufsiz)
        size = min(bufsiz, _READ_SIZE)
        result = _lib.BIO_read(self._from_ssl, _buffer, size)
        if result <= 0:
            self._handle_bio_errors(self._from_ssl, result)
        return _ffi.buffer(_buffer, result)[:]


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLClientConnectionCreator)
class _SharedBufferCreator:
    """Twisted's connection creator C{creator}, its connections reading into the shared buffer."""

    def __init__(self, creator):
        self.creator = creator

    def serverConnectionForTLS(self, protocol):
        return self._shared(self.creator.serverConnectionForTLS(protocol))

    def clientConnectionForTLS(self, protocol):
        return self._shared(self.creator.clientConnectionForTLS(protocol))

    @staticmethod
    def _shared(connection):
        if _buffer is not None and type(connection) is SSL.Connection:
            connection.__class__ = _SharedBufferConnection  # same object and state, two methods of ours
        return connection


class ListenerTLS:
    """The TLS of one listen address: certificate, key, client verification, ciphers, versions."""

    def __init__(self, pool_config, factory):
        """Read the pool's certificate files now; C{factory} is the listen address's own factory."""
        certificate, chain, key = read_key_pair(pool_config.tls_cert, pool_config.tls_key)
        options = dict(
            privateKey=key.to_cryptography_key(),  # pyOpenSSL's own objects are deprecated here
            certificate=certificate.to_cryptography(),
            extraCertChain=chain,
            raiseMinimumTo=_VERSIONS[pool_config.tls_min_version],
        )
        if pool_config.tls_ca is not None:
            options.update(verify=True, requireCertificate=True, caCerts=read_certificates(pool_config.tls_ca))
        if pool_config.tls_ciphers is not None:
            options["acceptableCiphers"] = ssl.AcceptableCiphers.fromOpenSSLCipherString(pool_config.tls_ciphers)
        self.options = ssl.CertificateOptions(**options)
        self.factory = TLSMemoryBIOFactory(_SharedBufferCreator(self.options), False, factory)

    def wrap(self, protocol):
        """C{protocol} (an accepted client) behind a TLS session of this certificate."""
        return TLSMemoryBIOProtocol(self.factory, protocol)


def listener_tls(pool_config, factory) -> Optional[ListenerTLS]:
    """The L{ListenerTLS} of a pool's listen address, or None without C{tls_cert}."""
    if pool_config.tls_cert is None or pool_config.listen is None:
        return None
    return ListenerTLS(pool_config, factory)


class BackendTLS:
    """TLS to the servers of one pool: one client-side TLS options object per server."""

    def __init__(self, pool_config):
        """Read the pool's CA and client certificate files now."""
        if pool_config.backend_tls_ca is not None:
            cas = read_certificates(pool_config.backend_tls_ca)
            self.trust = ssl.trustRootFromCertificates([ssl.Certificate(ca) for ca in cas])
        else:
            self.trust = ssl.platformTrust()
        self.client = None
        extra = {"raiseMinimumTo": ssl.TLSVersion.TLSv1_2}
        if pool_config.backend_tls_cert is not None:
            certificate, chain, key = read_key_pair(pool_config.backend_tls_cert, pool_config.backend_tls_key)
            self.client = ssl.PrivateCertificate.fromCertificateAndKeyPair(
                ssl.Certificate(certificate), ssl.KeyPair(key))
            extra["extraCertChain"] = chain
        self.extra = extra
        self.names = pool_config.backend_tls_names
        self._creators = {}  # expected name -> options (its context and session cache reused)

    def expected_name(self, spec) -> str:
        """The name the certificate of server C{spec} must carry."""
        return server_name(self.names, spec)

    def wrap(self, factory, spec):
        """C{factory} (connecting to server C{spec}) behind TLS that checks that server."""
        name = self.expected_name(spec)
        creator = self._creators.get(name)
        if creator is None:
            creator = self._creators[name] = ssl.optionsForClientTLS(
                name, self.trust, self.client, extraCertificateOptions=self.extra)
        return TLSMemoryBIOFactory(_SharedBufferCreator(creator), True, factory)


def backend_tls(pool_config) -> Optional[BackendTLS]:
    """The L{BackendTLS} of a pool, or None without C{backend_tls}."""
    if not getattr(pool_config, "backend_tls", False):
        return None
    return BackendTLS(pool_config)


def failure_text(value) -> Optional[str]:
    """
    The error reply's text for a backend connection that failed with the
    exception C{value} in its TLS layer (None: not a TLS failure), e.g.
    C{TLS: certificate verify failed}.
    """
    if isinstance(value, VerificationError):
        names = []
        for error in value.errors:
            mismatched = getattr(error, "mismatched_id", None)
            for attribute in ("hostname", "ip", "pattern"):
                if mismatched is not None and hasattr(mismatched, attribute):
                    name = getattr(mismatched, attribute)
                    names.append(name.decode("ascii", "replace") if isinstance(name, bytes) else str(name))
                    break
        return TLS_FAILURE + "certificate name mismatch (expected %s)" % (", ".join(names) or "another name",)
    if isinstance(value, SSL.Error):
        queue = value.args[0] if value.args else None
        if isinstance(queue, list) and queue and isinstance(queue[-1], tuple):
            return TLS_FAILURE + str(queue[-1][-1])
        return TLS_FAILURE + "handshake failed"
    return None
