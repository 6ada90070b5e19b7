"""
Certificates made by the tests themselves (the C{cryptography} package): a CA,
certificates it signs for the proxy, the backends and clients, and a stranger
CA whose certificates nobody trusts.  Written as PEM files into a directory.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: str, *parts: bytes) -> str:
    with open(path, "wb") as f:
        f.write(b"".join(parts))
    return path


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class Authority:
    """A CA that signs certificates into C{directory}."""

    def __init__(self, directory: str, name: str):
        self.directory = directory
        self.name = name
        self.key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name)).issuer_name(_name(name))
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.path = _write(os.path.join(directory, name + "-ca.pem"), self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, common_name: str, dns=(), ips=(), client=False):
        """A certificate for C{common_name}: (cert path, key path)."""
        key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        names = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        usage = x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH if client else x509.oid.ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        base = os.path.join(self.directory, common_name.replace(" ", "-"))
        cert_path = _write(base + ".crt", cert.public_bytes(serialization.Encoding.PEM))
        key_path = _write(base + ".key", _pem_key(key))
        return cert_path, key_path


class Certificates:
    """Everything the TLS tests use, made once per test session."""

    def __init__(self, directory: str):
        self.directory = directory
        self.ca = Authority(directory, "test")
        self.stranger = Authority(directory, "stranger")
        self.proxy = self.ca.issue("proxy one", dns=["localhost"], ips=["127.0.0.1"])
        self.proxy_renewed = self.ca.issue("proxy two", dns=["localhost"], ips=["127.0.0.1"])
        self.backend = self.ca.issue("cache-a.test", dns=["cache-a.test"], ips=["127.0.0.1"])
        self.client = self.ca.issue("client one", client=True)
        self.stranger_backend = self.stranger.issue("cache-x.test", dns=["cache-x.test"], ips=["127.0.0.1"])

    def client_context(self, certificate=False) -> ssl.SSLContext:
        """What a client trusting the test CA uses (with the client certificate if asked)."""
        context = ssl.create_default_context(cafile=self.ca.path)
        if certificate:
            context.load_cert_chain(*self.client)
        return context


def peer_common_name(sock) -> str:
    """The common name of the certificate an C{ssl} socket's peer presented."""
    der = sock.getpeercert(binary_form=True)
    cert = x509.load_der_x509_certificate(der)
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
