"""The extra CAs image builds trust: BOTTLE_BUILD_CA_CERTS when set (`none` for none), else what the host trusts.

Behind a TLS-intercepting proxy whose CA the host already trusts, a first `doit start` must not fail on
`npm install`: the builds take the host's trust (the files its CA variables name, and its system
bundle) minus the public Mozilla roots, which the base image trusts already (Debian's ca-certificates
is the Mozilla set), so only private CAs reach the build context. Certificates are deduplicated by
SHA-256 fingerprint and written in fingerprint order: the staged extra-ca.pem, hence the build
context, is the same from run to run, so an unchanged start builds nothing.

build_trust is the pure part (an env mapping, a file reader, the public roots); host_build_trust
reads this host. The bundle image also adds these CAs to its system store (its outbound TLS).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from bottle_tasks.errors import BottleError

SETTING = "BOTTLE_BUILD_CA_CERTS"
# The variables through which a host points its tools at a CA file, read in this order.
HOST_CA_VARIABLES = ("SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS", "REQUESTS_CA_BUNDLE", "PIP_CERT")
TRUST_ENV = (SETTING, *HOST_CA_VARIABLES)
# The distros' system bundles (the list Go's crypto/x509 reads); the first that exists is the host's.
SYSTEM_BUNDLES = tuple(Path(p) for p in (
    "/etc/ssl/certs/ca-certificates.crt",                 # Debian, Ubuntu, Arch, Gentoo
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",  # Fedora, RHEL 7+
    "/etc/pki/tls/certs/ca-bundle.crt",                   # older Fedora and RHEL
    "/etc/ssl/ca-bundle.pem",                             # openSUSE
    "/etc/pki/tls/cacert.pem",                            # OpenELEC
    "/etc/ssl/cert.pem",                                  # Alpine, macOS
))
# Debian and Ubuntu keep the Mozilla roots they ship apart from local ones. certifi alone is not
# enough: a newer certifi has dropped roots that bookworm's ca-certificates still carries.
DISTRO_MOZILLA_DIR = Path("/usr/share/ca-certificates/mozilla")
# What npm, pip, curl, OpenSSL and Go print when a certificate on the way is not trusted.
TLS_FAILURE_MARKERS = (
    "SELF_SIGNED_CERT_IN_CHAIN", "self signed certificate in certificate chain",
    "self-signed certificate in certificate chain", "UNABLE_TO_GET_ISSUER_CERT_LOCALLY",
    "unable to get local issuer certificate", "UNABLE_TO_VERIFY_LEAF_SIGNATURE", "certificate verify failed",
    "CERTIFICATE_VERIFY_FAILED", "x509: certificate signed by unknown authority",
)

_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----\s.*?-----END CERTIFICATE-----", re.S)

Reader = Callable[[Path], bytes | None]   # a file's bytes, None when it cannot be read


@dataclass(frozen=True)
class BuildTrust:
    pem: str      # the CAs image builds add, in fingerprint order; "" for none
    count: int
    source: str   # where they came from, for one line of start's output

    @property
    def summary(self) -> str:
        """e.g. `1 from the host's trust (/etc/ssl/certs/ca-certificates.crt, not in the public roots)`."""
        return f"{self.count} from {self.source}" if self.count else f"none ({self.source})"


def build_trust(env: Mapping[str, str], read: Reader, public_roots: Iterable[bytes] = ()) -> BuildTrust:
    """The CAs for image builds. public_roots: PEM bundles of the roots the base image trusts already."""
    public = {fingerprint for blob in public_roots for fingerprint, _ in _certificates(blob)}
    setting = (env.get(SETTING) or "").strip()
    if setting.lower() == "none":
        return BuildTrust("", 0, f"{SETTING}=none")
    if setting:
        path = Path(setting).expanduser()
        data = read(path)
        if data is None:
            raise BottleError(f"{SETTING}={setting}: no such readable file. Set it to a PEM file holding the CA of "
                              "the proxy that intercepts TLS here, unset it to use the host's trust, or set it to none")
        if not _cas(data):
            raise BottleError(f"{SETTING}={setting} holds no CA certificate in PEM form (-----BEGIN CERTIFICATE-----): "
                              "point it at the proxy's CA certificate, unset it to use the host's trust, or set it to none")
        return _select([(path, data)], public, SETTING)
    return _select(_host_sources(env, read), public, "the host's trust")


def _host_sources(env: Mapping[str, str], read: Reader) -> list[tuple[Path, bytes]]:
    """The files the host's CA variables name (those that can be read), then the first system bundle that exists."""
    sources: dict[Path, bytes] = {}
    for var in HOST_CA_VARIABLES:
        path = Path(env[var]).expanduser() if env.get(var) else None
        if path is not None and path not in sources and (data := read(path)) is not None:
            sources[path] = data
    for path in SYSTEM_BUNDLES:
        data = sources[path] if path in sources else read(path)
        if data is not None:
            sources.setdefault(path, data)
            break
    return list(sources.items())


def _select(sources: list[tuple[Path, bytes]], public: set[str], origin: str) -> BuildTrust:
    kept: dict[str, x509.Certificate] = {}
    contributed: list[str] = []
    for path, data in sources:
        new = {fp: cert for fp, cert in _cas(data).items() if fp not in public and fp not in kept}
        if new:
            contributed.append(str(path))
            kept.update(new)
    if not sources:
        return BuildTrust("", 0, f"no CA bundle on this host ({', '.join(HOST_CA_VARIABLES)} unset, "
                                 f"no {SYSTEM_BUNDLES[0]} or the like)")
    if not kept:
        return BuildTrust("", 0, f"{origin}: {', '.join(str(p) for p, _ in sources)} holds only public roots, "
                                 "which the image trusts already")
    note = ("not in the public roots" if public else
            f"all kept: the public roots are unknown here, as neither certifi nor {DISTRO_MOZILLA_DIR} is present")
    pem = "".join(kept[fp].public_bytes(Encoding.PEM).decode() for fp in sorted(kept))
    return BuildTrust(pem, len(kept), f"{origin} ({', '.join(contributed)}, {note})")


def _certificates(data: bytes) -> Iterator[tuple[str, x509.Certificate]]:
    """(SHA-256 fingerprint of the DER, certificate) of every PEM block that parses; others are skipped."""
    for block in _PEM_BLOCK.findall(data):
        try:
            cert = x509.load_pem_x509_certificate(block)
        except ValueError:
            continue
        yield cert.fingerprint(hashes.SHA256()).hex(), cert


def _cas(data: bytes) -> dict[str, x509.Certificate]:
    return {fp: cert for fp, cert in _certificates(data) if _is_ca(cert)}


def _is_ca(cert: x509.Certificate) -> bool:
    """A CA (BasicConstraints CA=true) or a self-signed certificate; a leaf signed by someone else is no trust anchor."""
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    except ValueError:        # malformed extensions: not a certificate to trust
        return False
    return bool(constraints and constraints.ca) or cert.issuer == cert.subject


# ---- this host ---------------------------------------------------------------------------------

def read_file(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def public_roots(mozilla_dir: Path = DISTRO_MOZILLA_DIR) -> tuple[bytes, ...]:
    """The public roots as far as this host knows them: certifi's bundle when importable, and the distro's Mozilla set."""
    blobs: list[bytes | None] = []
    try:
        import certifi
        blobs.append(read_file(Path(certifi.where())))
    except ImportError:
        pass
    blobs += [read_file(path) for path in sorted(mozilla_dir.glob("*.crt"))]
    return tuple(blob for blob in blobs if blob)


def host_build_trust(env: Mapping[str, str]) -> BuildTrust:
    return build_trust(env, read_file, public_roots())


# ---- a build that failed on trust --------------------------------------------------------------

def tls_failure(output: str) -> str | None:
    """The first line of a build's output that shows a TLS trust failure, None when none does."""
    markers = [marker.lower() for marker in TLS_FAILURE_MARKERS]
    for line in output.splitlines():
        if any(marker in line.lower() for marker in markers):
            return line.strip()[:300]
    return None


def tls_failure_error(what: str, line: str, trust: BuildTrust) -> BottleError:
    return BottleError(
        f"{what} failed on TLS: a certificate on the way is not trusted ({line}). Usually a proxy intercepts TLS "
        f"here and the build lacks its CA; the build had extra CAs: {trust.summary}. Set {SETTING} to a PEM file "
        f"holding that proxy's CA (export {SETTING}=/path/to/proxy-ca.pem; your IT team, or the certificate your "
        "browser shows for any https site, has it), then run the command again.")
