"""The fake smolvm end to end on the real engine: pack create pulls from a real registry with crane, the machine
runs as a docker container, and its --allow-cidr fence (applied from outside the guest) holds.

Everything here is created by this module and labelled dev.claude-bottle.test=smolvm-fake plus a per-run label;
teardown removes only those. The registry image is the product's own (bottle_tasks/images/registry: Debian's docker-registry).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import sqlite3
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGES_DIR = ROOT / "bottle_tasks" / "images"
FAKE = ROOT / "tests" / "fakes" / "smolvm"
LABEL = "dev.claude-bottle.test=smolvm-fake"
RUN = secrets.token_hex(4)
RUN_LABEL = f"smolvm-fake.run={RUN}"
REGISTRY_IMAGE = "claude-bottle-test/registry:latest"
BASE_IMAGE = "debian:bookworm-slim"
HELPER_IMAGE = os.environ.get("SMOLVM_FAKE_FIREWALL_IMAGE") or "claude-bottle/bundle:latest"   # has python3, iptables
DNS_ANSWER = "10.123.45.67"

# Listeners: HTTP on :80 everywhere, and a DNS server on udp/53 answering every A query with DNS_ANSWER.
LISTENER = r"""
import http.server, socket, struct, threading
def dns():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 53))
    while True:
        q, peer = s.recvfrom(512)
        qid, flags = q[:2], struct.unpack(">H", q[2:4])[0]
        end = q.index(b"\0", 12) + 5
        qtype = struct.unpack(">H", q[end - 4:end - 2])[0]
        ans = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + socket.inet_aton("%s") if qtype == 1 else b""
        hdr = qid + struct.pack(">HHHHH", 0x8180 | (flags & 0x0100), 1, 1 if ans else 0, 0, 0)
        s.sendto(hdr + q[12:end] + ans, peer)
threading.Thread(target=dns, daemon=True).start()
http.server.ThreadingHTTPServer(("0.0.0.0", 80), http.server.SimpleHTTPRequestHandler).serve_forever()
""" % DNS_ANSWER


def docker(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {proc.stderr}")
    return proc


def find_crane() -> str | None:
    for cand in (os.environ.get("CRANE"), shutil.which("crane"), "/var/cache/claude-bottle-ci/go-bin/crane"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


@pytest.fixture(scope="module")
def crane() -> str:
    path = find_crane()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("crane is missing; CI installs it (go-bin/crane)")
        pytest.skip("crane is not installed here (not on PATH, no $CRANE, no /var/cache/claude-bottle-ci/go-bin/crane)")
    for image in (BASE_IMAGE, HELPER_IMAGE):
        if docker("image", "inspect", image, check=False).returncode != 0:
            pytest.skip(f"{image} is not available locally")
    return path


@pytest.fixture(scope="module")
def cleanup():
    yield
    for name in docker("ps", "-aq", "--filter", f"label={RUN_LABEL}").stdout.split():
        docker("rm", "-f", name, check=False)
    for net in docker("network", "ls", "-q", "--filter", f"label={RUN_LABEL}").stdout.split():
        docker("network", "rm", net, check=False)


def free_subnet(name: str, first_octets: str) -> str:
    """Create a labelled test network on a random /24 that does not overlap any existing one; return its prefix."""
    for _ in range(20):
        prefix = f"{first_octets}.{random.randint(1, 250)}"
        proc = docker("network", "create", "--label", LABEL, "--label", RUN_LABEL, "--subnet", f"{prefix}.0/24",
                      name, check=False)
        if proc.returncode == 0:
            return prefix
    raise AssertionError(f"no free {first_octets}.x.0/24 for {name}: {proc.stderr}")


def listener(net: str, ip: str) -> None:
    docker("run", "-d", "--label", LABEL, "--label", RUN_LABEL, "--name", f"sf-{RUN}-{ip}", "--network", net,
           "--ip", ip, "--entrypoint", "python3", HELPER_IMAGE, "-c", LISTENER)


@pytest.fixture(scope="module")
def env(tmp_path_factory, crane, cleanup) -> dict:
    data = tmp_path_factory.mktemp("smolvm-data")
    e = {k: v for k, v in os.environ.items() if not k.startswith("SMOLVM_")}
    e.update(SMOLVM_DATA_DIR=str(data), CRANE=crane, SMOLVM_FAKE_FIREWALL_IMAGE=HELPER_IMAGE)
    return e


@pytest.fixture(scope="module")
def registry(crane, cleanup) -> str:
    docker("build", "-q", "-t", REGISTRY_IMAGE, str(IMAGES_DIR / "registry"))
    name = f"sf-{RUN}-registry"
    docker("run", "-d", "--label", LABEL, "--label", RUN_LABEL, "--name", name, "-p", "127.0.0.1::5000",
           REGISTRY_IMAGE)
    port = docker("port", name, "5000/tcp").stdout.split()[0].rsplit(":", 1)[1]
    deadline = time.time() + 20
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2).read()
            break
        except OSError:
            if time.time() > deadline:
                raise AssertionError("the test registry did not come up: " + docker("logs", name).stderr)
            time.sleep(0.2)
    return f"localhost:{port}"


@pytest.fixture(scope="module")
def pack(registry, crane, env, tmp_path_factory):
    ref = f"{registry}/smolvm-fake/guest:{RUN}"
    tmp = tmp_path_factory.mktemp("pack")
    docker("tag", BASE_IMAGE, ref)
    try:
        docker("save", "-o", str(tmp / "img.tar"), ref)
        push = subprocess.run([crane, "push", "--insecure", str(tmp / "img.tar"), ref], capture_output=True, text=True)
        assert push.returncode == 0, push.stderr
        (tmp / "img.tar").unlink()
        docker("rmi", ref)                       # so the fake's docker load has to bring it back from the pull
        proc = smolvm(env, "pack", "create", "--image", ref, "-o", str(tmp / "p"))
        assert proc.returncode == 0, proc.stderr
        yield {"ref": ref, "out": tmp / "p", "sidecar": tmp / "p.smolmachine", "stdout": proc.stdout}
    finally:
        docker("rmi", ref, check=False)


@pytest.fixture(scope="module")
def net(env, cleanup) -> dict:
    name = f"sf-{RUN}-net"
    prefix = free_subnet(name, "10.231")
    allowed, other = f"{prefix}.10", f"{prefix}.11"
    listener(name, allowed)
    listener(name, other)
    return {"name": name, "allowed": allowed, "other": other}


def smolvm(env: dict, *args: str, network: str | None = None, version: str | None = None, timeout: float = 120):
    e = dict(env)
    if network:
        e["SMOLVM_FAKE_NETWORK"] = network
    if version:
        e["SMOLVM_FAKE_VERSION"] = version
    return subprocess.run([sys.executable, str(FAKE), *args], capture_output=True, text=True, env=e,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def ok(proc) -> str:
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def reaches(env: dict, name: str, ip: str, port: int = 80) -> bool:
    proc = smolvm(env, "machine", "exec", "--name", name, "--", "timeout", "2", "bash", "-c",
                  f"exec 3<>/dev/tcp/{ip}/{port}")
    return proc.returncode == 0


def db_record(env: dict, name: str) -> dict:
    db = Path(env["SMOLVM_DATA_DIR"]) / ".local/share/smolvm/server/smolvm.db"
    with sqlite3.connect(db) as conn:
        return json.loads(conn.execute("SELECT CAST(data AS TEXT) FROM vms WHERE name=?", (name,)).fetchone()[0])


def machine(env, *create_args, network=None, version=None) -> str:
    name = f"sf{RUN}-{secrets.token_hex(2)}"
    ok(smolvm(env, "machine", "create", "-n", name, *create_args, version=version))
    ok(smolvm(env, "machine", "start", "-n", name, network=network, version=version))
    return name


def test_pack_create_pulls_the_image(pack):
    out, sidecar = pack["out"], pack["sidecar"]
    assert out.stat().st_mode & 0o777 == 0o755
    data = sidecar.read_bytes()
    magic, version, _, _, _, moff, msize, _ = struct.unpack("<8sIQQQQQI8x", data[-64:])
    assert (magic, version) == (b"SMOLPACK", 1)
    manifest = json.loads(data[moff:moff + msize])
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    assert manifest["platform"] == f"linux/{arch}"
    assert (manifest["network"], manifest["cpus"], manifest["mem"]) == (False, 4, 8192)
    assert manifest["image"] == pack["ref"] and manifest["digest"].startswith("sha256:")
    image_id = manifest["assets"]["docker_image_id"]
    assert docker("image", "inspect", image_id, check=False).returncode == 0
    assert f"Packed: {out} " in pack["stdout"] and f"Assets: {sidecar} " in pack["stdout"]


def test_pack_create_pull_failure(env, registry, tmp_path):
    proc = smolvm(env, "pack", "create", "--image", f"{registry}/smolvm-fake/absent:nope", "-o", str(tmp_path / "p"))
    assert proc.returncode == 1 and proc.stderr.startswith("Error: agent operation failed: pull image: ")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "p").exists()


def test_allow_cidr_fences_the_guest(env, pack, net):
    name = machine(env, "--from", str(pack["sidecar"]), "--allow-cidr", f"{net['allowed']}/32", "--dns", net["other"],
                   "-e", "GREETING=hi there", "--label", "owner=test", network=net["name"])
    rec = db_record(env, name)
    assert rec["allowed_cidrs"] == [f"{net['allowed']}/32"] and rec["network"] is True
    assert rec["network_backend"] == "virtio-net" and rec["dns"] == net["other"]
    [obj] = [o for o in json.loads(ok(smolvm(env, "machine", "ls", "--json"))) if o["name"] == name]
    assert obj["state"] == "running" and obj["network"] is True and obj["labels"] == {"owner": "test"}

    assert reaches(env, name, net["allowed"])
    assert not reaches(env, name, net["other"])                 # same subnet, not listed
    assert not reaches(env, name, "169.254.169.254")
    # --dns is honoured: the resolver at `other` answers (port 53 passes, port 80 on it stayed closed above)
    assert ok(smolvm(env, "machine", "exec", "--name", name, "--", "getent", "ahostsv4", "anything.test")
              ).startswith(DNS_ANSWER)
    # root in the guest lacks NET_ADMIN (bit 12) and NET_RAW (13), so it cannot take its own fence down
    status = ok(smolvm(env, "machine", "exec", "--name", name, "--", "grep", "^CapEff", "/proc/self/status"))
    caps = int(status.split()[1], 16)
    assert caps and not caps & (1 << 12) and not caps & (1 << 13), hex(caps)
    assert ok(smolvm(env, "machine", "exec", "--name", name, "--", "sh", "-c", "echo $GREETING")) == "hi there\n"
    proc = smolvm(env, "machine", "exec", "--name", name, "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (proc.returncode, proc.stdout, proc.stderr) == (7, "out\n", "err\n")
    assert ok(smolvm(env, "machine", "egress-events", "-n", name, "--json")) == "[]\n"

    # lifecycle: running -> already running -> stopped -> running again, still fenced
    assert ok(smolvm(env, "machine", "start", "-n", name, network=net["name"])).startswith(
        f"Machine '{name}' already running (PID: ")
    assert ok(smolvm(env, "machine", "stop", "-n", name)) == f"Stopping machine '{name}'...\nStopped machine: {name}\n"
    assert ok(smolvm(env, "machine", "status", "-n", name)) == f"Machine '{name}': stopped\n"
    ok(smolvm(env, "machine", "start", "-n", name, network=net["name"]))
    assert reaches(env, name, net["allowed"]) and not reaches(env, name, net["other"])

    ok(smolvm(env, "machine", "delete", "-n", name, "-f"))
    assert docker("inspect", f"smolvm-fake-{name}", check=False).returncode != 0


def test_cp_round_trip(env, pack, tmp_path):
    name = machine(env, "--from", str(pack["sidecar"]))            # pack default: no network at all
    assert db_record(env, name)["network"] is False
    assert not reaches(env, name, "1.1.1.1")
    src = tmp_path / "in.txt"
    src.write_text("payload\n")
    proc = smolvm(env, "machine", "cp", "--mode", "600", str(src), f"{name}:/tmp/in.txt")
    assert (proc.returncode, proc.stdout) == (0, "") and "Uploading" in proc.stderr
    assert ok(smolvm(env, "machine", "exec", "--name", name, "--", "stat", "-c", "%a %s", "/tmp/in.txt")) == "600 8\n"
    ok(smolvm(env, "machine", "cp", f"{name}:/tmp/in.txt", str(tmp_path / "out.txt")))
    assert (tmp_path / "out.txt").read_text() == "payload\n"
    proc = smolvm(env, "machine", "cp", f"{name}:/tmp", str(tmp_path / "dir"))
    assert proc.returncode == 1 and proc.stderr.startswith("Error: ")
    ok(smolvm(env, "machine", "delete", "-n", name, "-f"))


def test_08_mode_leaves_the_guest_unfenced(env, pack, net):
    name = machine(env, "--from", str(pack["sidecar"]), "--net", "--allow-cidr", f"{net['allowed']}/32",
                   network=net["name"], version="0.8.0")
    assert db_record(env, name)["allowed_cidrs"] is None        # what a driver's post-start check must catch
    assert reaches(env, name, net["allowed"]) and reaches(env, name, net["other"])
    ok(smolvm(env, "machine", "delete", "-n", name, "-f"))


def test_link_local_stays_blocked_even_when_listed(env, pack, cleanup):
    netname = f"sf-{RUN}-ll"
    prefix = free_subnet(netname, "169.254")
    target = f"{prefix}.10"
    listener(netname, target)
    control = machine(env, "--from", str(pack["sidecar"]), "--net", network=netname, version="0.8.0")
    assert reaches(env, control, target)                         # the listener is there
    fenced = machine(env, "--from", str(pack["sidecar"]), "--allow-cidr", f"{target}/32", network=netname)
    assert not reaches(env, fenced, target)
    for n in (control, fenced):
        ok(smolvm(env, "machine", "delete", "-n", n, "-f"))
