"""The extra CAs image builds trust (bottle_tasks/build_trust.py): which files, which certificates, in
which order; the build_trust task that stages them; and the error of a build that failed on TLS."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from bottle_tasks.build_trust import (
    SETTING, SYSTEM_BUNDLES, BuildTrust, build_trust, public_roots, tls_failure, tls_failure_error,
)
from bottle_tasks.errors import BottleError
from bottle_tasks.plan import ImagePlan
from bottle_tasks.runner import CommandError
from bottle_tasks.settings import Settings
from bottle_tasks.tasks import common, images
from tests.unit.fakes import FakeRunner

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


Key = ec.EllipticCurvePrivateKey


def mint(cn: str, *, ca: bool | None = True, issuer: tuple[str, Key] | None = None) -> tuple[bytes, Key]:
    """A PEM certificate and its key: self-signed unless issuer (name, key) is given; ca=None leaves out BasicConstraints."""
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_name, issuer_key = issuer or (cn, key)
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(issuer_name))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(NOW).not_valid_after(NOW + datetime.timedelta(days=3650)))
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    return builder.sign(issuer_key, hashes.SHA256()).public_bytes(Encoding.PEM), key


CORP, CORP_KEY = mint("Corp Intercepting Proxy CA")   # the "corporate" CA a TLS-intercepting proxy signs with
OTHER, OTHER_KEY = mint("Other Private CA")
THIRD, _ = mint("Third Private CA")
LEAF, _ = mint("proxy.corp.example", ca=False, issuer=("Corp Intercepting Proxy CA", CORP_KEY))


def fingerprint(pem: bytes | str) -> str:
    data = pem.encode() if isinstance(pem, str) else pem
    return x509.load_pem_x509_certificate(data).fingerprint(hashes.SHA256()).hex()


def fingerprints(pem: str) -> list[str]:
    marker = "-----END CERTIFICATE-----\n"
    return [fingerprint(block + marker) for block in pem.split(marker) if block.strip()]


class Files:
    """A file reader over a dict, recording what was read."""

    def __init__(self, files: dict[str, bytes]):
        self.files = {Path(k): v for k, v in files.items()}
        self.reads: list[Path] = []

    def __call__(self, path: Path) -> bytes | None:
        self.reads.append(path)
        return self.files.get(path)


DEBIAN = str(SYSTEM_BUNDLES[0])


# ---- which files ---------------------------------------------------------------------------------

def test_the_setting_wins_over_the_host_trust():
    files = Files({"/corp.pem": CORP, "/other.pem": OTHER, DEBIAN: THIRD})
    trust = build_trust({SETTING: "/corp.pem", "SSL_CERT_FILE": "/other.pem"}, files, [THIRD])
    assert fingerprints(trust.pem) == [fingerprint(CORP)] and trust.count == 1
    assert trust.summary == f"1 from {SETTING} (/corp.pem, not in the public roots)"
    assert files.reads == [Path("/corp.pem")]


@pytest.mark.parametrize("value", ["none", "NONE", " none "])
def test_none_turns_extra_cas_off(value):
    files = Files({"/corp.pem": CORP, DEBIAN: CORP})
    trust = build_trust({SETTING: value, "SSL_CERT_FILE": "/corp.pem"}, files)
    assert trust == BuildTrust("", 0, f"{SETTING}=none")
    assert trust.summary == f"none ({SETTING}=none)"
    assert files.reads == []


def test_the_host_trust_is_what_its_ca_variables_name_then_the_first_system_bundle_that_exists():
    files = Files({"/a.pem": CORP, str(SYSTEM_BUNDLES[1]): OTHER, str(SYSTEM_BUNDLES[2]): THIRD})
    env = {"SSL_CERT_FILE": "/a.pem", "PIP_CERT": "/missing.pem"}
    trust = build_trust(env, files)
    assert sorted(fingerprints(trust.pem)) == sorted([fingerprint(CORP), fingerprint(OTHER)])
    assert SYSTEM_BUNDLES[2] not in files.reads          # only the first system bundle that exists
    assert trust.source.startswith(f"the host's trust (/a.pem, {SYSTEM_BUNDLES[1]}, ")
    # Every variable counts, in its order.
    for var in ("NODE_EXTRA_CA_CERTS", "REQUESTS_CA_BUNDLE", "PIP_CERT"):
        assert build_trust({var: "/a.pem"}, Files({"/a.pem": CORP})).count == 1


def test_a_setting_that_names_no_file_or_no_ca_is_an_error_naming_the_variable():
    with pytest.raises(BottleError, match=f"{SETTING}=/nowhere.pem: no such readable file.*none"):
        build_trust({SETTING: "/nowhere.pem"}, Files({}))
    for content in (b"not a certificate\n", LEAF):
        with pytest.raises(BottleError, match=f"{SETTING}=/x.pem holds no CA certificate"):
            build_trust({SETTING: "/x.pem"}, Files({"/x.pem": content}))


def test_a_host_without_any_bundle_adds_none():
    trust = build_trust({"SSL_CERT_FILE": "/gone.pem"}, Files({}))
    assert trust.count == 0 and trust.pem == "" and trust.summary.startswith("none (no CA bundle on this host")


# ---- which certificates --------------------------------------------------------------------------

def test_a_ca_named_twice_or_written_differently_counts_once():
    crlf = CORP.replace(b"\n", b"\r\n")
    files = Files({DEBIAN: CORP + OTHER, "/copy.pem": b"# a comment\n" + crlf, "/again.pem": CORP})
    trust = build_trust({"SSL_CERT_FILE": DEBIAN, "NODE_EXTRA_CA_CERTS": "/copy.pem", "PIP_CERT": "/again.pem"}, files)
    assert trust.count == 2 and sorted(fingerprints(trust.pem)) == sorted([fingerprint(CORP), fingerprint(OTHER)])
    assert files.reads.count(Path(DEBIAN)) == 1
    assert "/copy.pem" not in trust.source           # it added nothing new


def test_only_real_ca_certificates_are_kept():
    v1_root, _ = mint("Old Root Without BasicConstraints", ca=None)     # self-signed: a trust anchor
    foreign_leaf, _ = mint("leaf.example", ca=None, issuer=("Other Private CA", OTHER_KEY))
    garbage = b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
    files = Files({DEBIAN: garbage + LEAF + CORP + foreign_leaf + v1_root})
    trust = build_trust({}, files)
    assert sorted(fingerprints(trust.pem)) == sorted([fingerprint(CORP), fingerprint(v1_root)])


def test_the_public_roots_are_left_out_and_the_private_ca_stays():
    certifi = pytest.importorskip("certifi")
    bundle = Path(certifi.where()).read_bytes()
    marker = b"-----END CERTIFICATE-----"
    public_root = bundle[bundle.index(b"-----BEGIN CERTIFICATE-----"):bundle.index(marker) + len(marker)] + b"\n"
    files = Files({DEBIAN: public_root + CORP})
    trust = build_trust({}, files, [bundle])
    assert fingerprints(trust.pem) == [fingerprint(CORP)]
    assert trust.summary == f"1 from the host's trust ({DEBIAN}, not in the public roots)"
    # Without knowing the public roots, everything the host trusts is kept, and the line says why.
    unknown = build_trust({}, files, [])
    assert unknown.count == 2 and "public roots are unknown" in unknown.summary
    # A host that trusts only public roots adds none.
    only_public = build_trust({}, Files({DEBIAN: public_root}), [bundle])
    assert only_public.count == 0 and "holds only public roots" in only_public.summary
    assert fingerprint(public_root) not in build_trust({SETTING: "/x.pem"}, Files({"/x.pem": public_root + CORP}), [bundle]).pem


def test_the_output_is_in_fingerprint_order_whatever_the_input_order():
    one = build_trust({}, Files({DEBIAN: CORP + OTHER + THIRD}))
    other = build_trust({"SSL_CERT_FILE": "/b.pem"}, Files({"/b.pem": THIRD + CORP, DEBIAN: OTHER}))
    assert one.pem == other.pem and one.count == 3
    assert fingerprints(one.pem) == sorted(fingerprints(one.pem))


def test_the_public_roots_are_certifi_and_the_distro_mozilla_set(tmp_path):
    (tmp_path / "A_Root.crt").write_bytes(OTHER)
    (tmp_path / "notes.txt").write_bytes(THIRD)
    found = public_roots(tmp_path)
    assert OTHER in found and THIRD not in found
    try:
        import certifi
    except ImportError:
        return
    assert Path(certifi.where()).read_bytes() in found


# ---- a build that failed on TLS ------------------------------------------------------------------

@pytest.mark.parametrize("output", [
    "npm error code SELF_SIGNED_CERT_IN_CHAIN",
    "npm ERR! request to https://registry.npmjs.org/x failed, reason: self-signed certificate in certificate chain",
    "curl: (60) SSL certificate problem: unable to get local issuer certificate",
    "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer certificate (_ssl.c:992)",
    "npm error code UNABLE_TO_VERIFY_LEAF_SIGNATURE",
    "Get \"https://ghcr.io/v2/\": tls: failed to verify certificate: x509: certificate signed by unknown authority",
])
def test_tls_failures_are_recognised(output):
    assert tls_failure(f"Step 5/9 : RUN npm install\n{output}\nmore\n") == output


def test_other_failures_are_not_called_tls():
    assert tls_failure("npm error code E404\nnpm error 404 Not Found - GET https://registry.npmjs.org/x") is None


def _image(tmp_path: Path) -> tuple[ImagePlan, Settings]:
    dockerfile_dir = tmp_path / "df"
    dockerfile_dir.mkdir()
    (dockerfile_dir / "Dockerfile").write_text("FROM scratch\n")
    ca = tmp_path / "corp.pem"
    ca.write_bytes(CORP)
    s = Settings.from_env({"HOME": str(tmp_path / "home"), "PATH": str(tmp_path / "nowhere"),
                           "BOTTLE_CACHE_DIR": str(tmp_path / "cache"), "BOTTLE_STATE_DIR": str(tmp_path / "state"),
                           SETTING: str(ca)})
    image = ImagePlan(kind="agent", tag="claude-bottle/agent-x:latest", dockerfile_dir=dockerfile_dir,
                      context_dir=tmp_path / "ctx", iid_file=tmp_path / "agent.iid", build_args=())
    return image, s


def failed_build(tmp_path: Path, monkeypatch, run_output: str) -> tuple[BottleError, ImagePlan]:
    """The error build_image raises when docker build exits 1 after printing run_output. The classic
    builder prints a RUN's output on stdout and only its verdict on stderr."""
    image, s = _image(tmp_path)
    images.stage_build_trust(s)
    runner = FakeRunner({("docker", "build"): (1, f"Step 4/9 : RUN npm install\n{run_output}\n",
                                               "The command '/bin/sh -c npm install' returned a non-zero code: 1\n")})
    monkeypatch.setattr(common, "_run", common.Run(s, common.Docker(runner=runner)))
    with pytest.raises(BottleError) as failed:
        images.build_image(image, s)
    return failed.value, image


def test_a_build_that_fails_on_tls_names_the_setting(tmp_path, monkeypatch):
    error, image = failed_build(tmp_path, monkeypatch, "npm error code SELF_SIGNED_CERT_IN_CHAIN")
    assert not isinstance(error, CommandError) and not image.iid_file.exists()
    assert "failed on TLS" in str(error) and "SELF_SIGNED_CERT_IN_CHAIN" in str(error)
    assert f"Set {SETTING} to a PEM file" in str(error) and f"1 from {SETTING} ({tmp_path / 'corp.pem'}" in str(error)


def test_a_build_that_fails_otherwise_shows_the_output_s_last_lines(tmp_path, monkeypatch):
    error, _ = failed_build(tmp_path, monkeypatch, "npm error 404 Not Found")
    assert isinstance(error, CommandError)
    assert "npm error 404 Not Found" in str(error) and "TLS" not in str(error)


def test_tls_failure_error_says_what_the_build_had():
    error = tls_failure_error("the build of x", "npm error code SELF_SIGNED_CERT_IN_CHAIN", BuildTrust("", 0, f"{SETTING}=none"))
    assert f"extra CAs: none ({SETTING}=none)" in str(error) and f"export {SETTING}=" in str(error)


# ---- the build_trust task ------------------------------------------------------------------------

def test_the_staged_cas_are_rewritten_only_when_they_change(tmp_path, capsys):
    image, s = _image(tmp_path)
    images.stage_build_trust(s)
    staged = images.staged_trust(s)
    assert fingerprints(staged.read_text()) == [fingerprint(CORP)]
    assert capsys.readouterr().out == f"build CAs: 1 from {SETTING} ({tmp_path / 'corp.pem'}, not in the public roots)\n"
    os.utime(staged, ns=(10**18, 10**18))
    images.stage_build_trust(s)                 # the same CAs: the file (and the builds' file_dep) stays as it was
    assert staged.stat().st_mtime_ns == 10**18
    (tmp_path / "corp.pem").write_bytes(CORP + OTHER)
    images.stage_build_trust(s)
    assert staged.stat().st_mtime_ns != 10**18 and len(fingerprints(staged.read_text())) == 2
    images.stage_context(image, s)              # the staged file is what the build context holds
    assert (image.context_dir / "extra-ca.pem").read_text() == staged.read_text()


def test_none_stages_an_empty_file(tmp_path):
    s = Settings.from_env({"HOME": str(tmp_path), "BOTTLE_CACHE_DIR": str(tmp_path / "cache"), SETTING: "none"})
    assert dict(s.build_trust_env) == {SETTING: "none"}      # a word, not a path resolved against the cwd
    images.stage_build_trust(s)
    assert images.staged_trust(s).read_text() == ""
