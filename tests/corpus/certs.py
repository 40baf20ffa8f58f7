"""Certificates for the corpus's fake upstreams: leaves signed by a test CA (never the bottle's)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import tempfile
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def leaf_pem(ca_cert_pem: bytes, ca_key_pem: bytes, names: list[str]) -> tuple[bytes, bytes]:
    """(cert, key) PEM for names (DNS names, "*.domain" wildcards, IP literals), signed by the CA."""
    ca = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])]))
        .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


class SniContexts:
    """Server TLS contexts minted on demand for whatever name a client asks for (SNI).

    The corpus's host names carry secrets and random labels, so no fixed certificate covers them;
    the fake upstream answers each with a leaf for exactly that name, as a real server would."""

    def __init__(self, ca_cert: Path, ca_key: Path, workdir: Path):
        self.ca_cert, self.ca_key = ca_cert.read_bytes(), ca_key.read_bytes()
        self.workdir = workdir
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._lock = threading.Lock()
        self.default = self.context_for("localhost")
        self.default.sni_callback = self._choose

    def context_for(self, name: str) -> ssl.SSLContext:
        with self._lock:
            if name not in self._contexts:
                cert, key = leaf_pem(self.ca_cert, self.ca_key, [name])
                with tempfile.NamedTemporaryFile(dir=self.workdir, suffix=".pem", delete=False) as handle:
                    handle.write(cert + key)
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.load_cert_chain(handle.name)
                context.set_alpn_protocols(["h2", "http/1.1"])
                self._contexts[name] = context
            return self._contexts[name]

    def _choose(self, sock: ssl.SSLSocket, name: str | None, _context) -> None:
        if name:
            try:
                sock.context = self.context_for(name)
            except ValueError:  # a name no certificate can carry: the default one fails verification
                pass
