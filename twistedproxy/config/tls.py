"""
The TLS keys of a pool: what they mean, how they parse, and the certificate
material they name, read and checked.

Client side (the pool's listen address): C{tls_cert} turns TLS on, with
C{tls_key}, C{tls_ca} (client certificates required and verified),
C{tls_ciphers} and C{tls_min_version}.  Server side (the pool's backends):
C{backend_tls} turns it on, with C{backend_tls_ca}, C{backend_tls_cert} /
C{backend_tls_key} (a client certificate) and C{backend_tls_names} (the name
each server's certificate must carry, apart from the server line's C{name},
which sets ketama placement).

The configuration keeps only paths: L{check_pool_tls} reads the files when a
file is loaded (so C{-t} and a reload refuse a bad certificate before anything
changes), and L{read_certificates} / L{read_key_pair} are the one way the files
are read, by that check and by L{twistedproxy.net.tls} when it serves them
(again at each reload: a renewed certificate needs only a reload).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Tuple

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from OpenSSL import SSL, crypto

from twistedproxy.config.tree import MAPPING, SCALAR, ConfigNode
from twistedproxy.config.values import (
    Boolean, Invalid, Milliseconds, Report, Text, ValueType, describe, quote, scalar_text)

TLS_VERSIONS = ("1.2", "1.3")

# Keys of the client side: they need tls_cert.
LISTENER_KEYS = ("tls_key", "tls_ca", "tls_ciphers", "tls_min_version", "tls_idle_timeout")
# Keys of the server side: they need backend_tls: true, and belong to pools with servers.
BACKEND_KEYS = ("backend_tls", "backend_tls_ca", "backend_tls_cert", "backend_tls_key", "backend_tls_names")


class PemFile(Text):
    """The absolute path of a readable file (a worker or a daemon runs from /)."""

    name = "/absolute/path of a PEM file"

    def parse(self, node: ConfigNode, report: Report) -> Any:
        path = Text.parse(self, node, report)
        if not os.path.isabs(path):
            raise Invalid("must be an absolute path (got %s)" % (quote(path),))
        if not os.access(path, os.R_OK) or not os.path.isfile(path):
            raise Invalid("cannot read %s" % (quote(path),))
        return path


class TLSVersion(ValueType):
    name = " | ".join(TLS_VERSIONS)

    def parse(self, node: ConfigNode, report: Report) -> Any:
        text = scalar_text(node)
        if text is None and node.kind == SCALAR and isinstance(node.value, float):
            text = "%.1f" % (node.value,)  # 1.2 given as a number (config_from_dict)
        if text in TLS_VERSIONS:
            return text
        raise Invalid("expected one of: %s, got %s" % (", ".join(TLS_VERSIONS), describe(node)))


class Ciphers(Text):
    name = "OpenSSL cipher list"

    def parse(self, node: ConfigNode, report: Report) -> Any:
        ciphers = Text.parse(self, node, report)
        try:
            SSL.Context(SSL.TLS_METHOD).set_cipher_list(ciphers.encode("ascii"))
        except (SSL.Error, UnicodeEncodeError):
            raise Invalid("no cipher OpenSSL knows in %s" % (quote(ciphers),))
        return ciphers


class ServerNames(ValueType):
    """Server address (as on its server line) -> the name its certificate must carry."""

    name = "mapping of server host:port -> expected certificate name (DNS name or IP)"

    def parse(self, node: ConfigNode, report: Report) -> Any:
        if node.kind != MAPPING:
            raise Invalid("expected a mapping of server address -> name, got %s" % (describe(node),))
        names = []
        for key_node, value_node in node.value:
            address, name = scalar_text(key_node), scalar_text(value_node)
            if not address or not name:
                report("expected server address: name, got %s: %s" % (describe(key_node), describe(value_node)),
                       key_node.line)
                continue
            names.append((address, name))
        return tuple(names)


def tls_key_specs(key_spec: Callable) -> Tuple:
    """The pool keys of TLS, as C{key_spec(name, value_type, meaning)} makes them (the loader's KeySpec)."""
    pem = PemFile()
    return (
        key_spec("tls_cert", pem,
                 "twistedproxy: TLS on the listen address: the proxy's certificate (PEM, its chain after it;"
                 " the key too unless tls_key is set). A reload reads it again: new clients get the new"
                 " one, connected ones keep their sessions."),
        key_spec("tls_key", pem, "twistedproxy: the private key of tls_cert (PEM)."),
        key_spec("tls_ca", pem,
                 "twistedproxy: CA certificates (PEM); set, clients must present a certificate they signed."),
        key_spec("tls_ciphers", Ciphers(),
                 "twistedproxy: the ciphers offered to clients up to TLS 1.2 (OpenSSL syntax; TLS 1.3's"
                 " suites are OpenSSL's); absent: Twisted's default (forward secrecy, AEAD first)."),
        key_spec("tls_min_version", TLSVersion(), "twistedproxy: the lowest TLS version clients may use."),
        key_spec("tls_idle_timeout", Milliseconds(),
                 "twistedproxy: a TLS client cannot be handed to another worker: on a stopping worker"
                 " (rollover, upgrade, stop) one that has sent nothing for this many milliseconds and"
                 " has every reply is closed; absent or 0: it stays until it leaves or"
                 " worker_shutdown_timeout."),
        key_spec("backend_tls", Boolean(),
                 "twistedproxy: TLS to the servers, each certificate verified (backend_tls_ca) and its name"
                 " checked (backend_tls_names); a failure is an error reply, never plain text."),
        key_spec("backend_tls_ca", pem,
                 "twistedproxy: CA certificates (PEM) the servers' certificates must chain to; absent: the"
                 " system's trust store."),
        key_spec("backend_tls_cert", pem,
                 "twistedproxy: a client certificate (PEM, the key too unless backend_tls_key is set) for"
                 " servers that ask for one."),
        key_spec("backend_tls_key", pem, "twistedproxy: the private key of backend_tls_cert (PEM)."),
        key_spec("backend_tls_names", ServerNames(),
                 "twistedproxy: the name each server's certificate must carry, by server address"
                 " (host:port as on its line); a server not listed is checked against its host. The"
                 " server line's name (ketama placement) plays no part."),
    )


# --------------------------------------------------------------------------
# Reading the files


def read_certificates(path: str) -> List[crypto.X509]:
    """Every certificate in the PEM file at C{path}, in file order; raises L{Invalid}."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise Invalid("cannot read %s: %s" % (quote(path), e.strerror or e))
    marker = b"-----BEGIN CERTIFICATE-----"
    certificates = []
    for part in data.split(marker)[1:]:
        try:
            certificates.append(crypto.load_certificate(crypto.FILETYPE_PEM, marker + part))
        except crypto.Error:
            raise Invalid("%s holds a certificate that is not valid PEM" % (quote(path),))
    if not certificates:
        raise Invalid("%s holds no PEM certificate" % (quote(path),))
    return certificates


def read_key_pair(cert_path: str, key_path: Optional[str]) -> Tuple[crypto.X509, List[crypto.X509], crypto.PKey]:
    """
    The certificate in C{cert_path} (the first; the others are its chain) and
    its private key (from C{key_path}, else from C{cert_path}); raises
    L{Invalid} when they cannot be read or do not belong together.
    """
    certificates = read_certificates(cert_path)
    key_file = key_path or cert_path
    try:
        with open(key_file, "rb") as f:
            key = crypto.load_privatekey(crypto.FILETYPE_PEM, f.read())
    except OSError as e:
        raise Invalid("cannot read %s: %s" % (quote(key_file), e.strerror or e))
    except crypto.Error:
        raise Invalid("%s holds no PEM private key (or it is encrypted)" % (quote(key_file),))
    if _public_key(certificates[0].get_pubkey()) != _public_key(key):
        raise Invalid("the key in %s does not belong to the certificate in %s" % (quote(key_file), quote(cert_path)))
    return certificates[0], certificates[1:], key


def _public_key(key: crypto.PKey) -> bytes:
    """The public half of C{key} (a certificate's or a private key's), as DER."""
    key = key.to_cryptography_key()
    key = getattr(key, "public_key", lambda: key)()
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def check_pool_tls(values: Dict[str, Any], lines: Dict[str, Optional[int]], report: Callable) -> None:
    """
    What the TLS keys of one pool need from each other and from their files;
    C{report(line, message, key)} for each problem.
    """
    if "tls_cert" not in values:
        for key in LISTENER_KEYS:
            if key in values:
                report(lines[key], "needs tls_cert (TLS on the listen address)", key)
    else:
        _check_files(values, lines, report, "tls_cert", "tls_key", "tls_ca")
        if values.get("listen") is None and "listen" not in lines:
            report(lines["tls_cert"], "needs a listen address", "tls_cert")
    if not values.get("backend_tls"):
        for key in BACKEND_KEYS[1:]:
            if key in values:
                report(lines[key], "needs backend_tls: true", key)
        return
    if "backend_tls_key" in values and "backend_tls_cert" not in values:
        report(lines["backend_tls_key"], "needs backend_tls_cert", "backend_tls_key")
    if "backend_tls_cert" in values:
        _check_files(values, lines, report, "backend_tls_cert", "backend_tls_key", "backend_tls_ca")
    elif "backend_tls_ca" in values:
        _check_files(values, lines, report, None, None, "backend_tls_ca")
    servers = values.get("servers", ())
    addresses = {server.address for server in servers}
    names = dict(values.get("backend_tls_names", ()))
    for address in names:
        if address not in addresses:
            report(lines["backend_tls_names"], "no server %s in this pool" % (quote(address),), "backend_tls_names")
    for server in servers:
        if server.path is not None and server.address not in names:
            report(lines.get("backend_tls_names", lines["backend_tls"]),
                   "server %s is a UNIX socket: name the certificate it must carry in backend_tls_names"
                   % (quote(server.address),), "backend_tls_names")


def _check_files(values, lines, report, cert_key, key_key, ca_key) -> None:
    if cert_key is not None:
        try:
            read_key_pair(values[cert_key], values.get(key_key))
        except Invalid as e:
            report(lines[cert_key], e.message, cert_key)
    if ca_key in values:
        try:
            read_certificates(values[ca_key])
        except Invalid as e:
            report(lines[ca_key], e.message, ca_key)


def server_name(names: Tuple[Tuple[str, str], ...], server) -> str:
    """The name the certificate of C{server} (a ServerSpec) must carry."""
    for address, name in names:
        if address == server.address:
            return name
    return server.host or ""
