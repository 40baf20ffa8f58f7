"""The fake smolvm (tests/fakes/smolvm) keeps the v1.9.3 CLI contract: docs/reference smolvm-1.9.md §2-§5, §7.

No docker here: everything below stops before a machine would boot. `--from` uses a pack this test writes itself
with a valid 64-byte SMOLPACK footer (the fake's `pack create` needs a registry; see the integration test).
"""

from __future__ import annotations

import json
import os
import platform
import sqlite3
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

FAKE = Path(__file__).resolve().parents[1] / "fakes" / "smolvm"
CLAP_TRAILER = "\n\nFor more information, try '--help'.\n"
JSON_FIELDS = sorted("""cmd cpus created_at cuda cuda_fork_pool_size cuda_vram_limit_mib entrypoint ephemeral forkable
    forkpoint_held gpu gpu_vram_mib health_cmd health_interval_secs health_retries health_startup_grace_secs
    health_timeout_secs image labels memory_mib mounts name network overlay_gb pid ports restart_count
    restart_max_retries restart_policy state storage_gb""".split())
ARCH = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine().lower(), platform.machine())


@pytest.fixture
def smolvm(tmp_path):
    def run(*args: str, version: str | None = None, input: str | None = None, env: dict | None = None):
        e = {k: v for k, v in os.environ.items() if not k.startswith("SMOLVM_")}
        e["SMOLVM_DATA_DIR"] = str(tmp_path / "data")
        e["DOCKER"] = "/nonexistent/docker"      # these tests must never reach docker
        if version:
            e["SMOLVM_FAKE_VERSION"] = version
        e.update(env or {})
        return subprocess.run([sys.executable, str(FAKE), *args], capture_output=True, text=True, env=e,
                              input=input, timeout=30)
    run.data = tmp_path / "data"
    return run


def write_pack(path: Path, **manifest_overrides) -> Path:
    manifest = {"mode": "container", "image": "localhost:5000/x:tag", "digest": "sha256:" + "0" * 64,
                "platform": f"linux/{ARCH}", "entrypoint": [], "cmd": ["/bin/sh"], "env": ["PATH=/usr/bin:/bin"],
                "secret_refs": [], "workdir": None, "cpus": 4, "mem": 8192, "image_size": 1, "network": False,
                "gpu": False, "cuda": False, "host_platform": f"linux/{ARCH}", "created": "2026-01-01T00:00:00Z",
                "smolvm_version": "1.9.3", "assets": {"layers": []}}
    manifest.update(manifest_overrides)
    assets, mbytes = b"assets", json.dumps(manifest).encode()
    footer = struct.pack("<8sIQQQQQI8x", b"SMOLPACK", 1, 0, 0, len(assets), len(assets), len(mbytes),
                         zlib.crc32(assets + mbytes))
    assert len(footer) == 64
    path.write_bytes(assets + mbytes + footer)
    return path


def record(data: Path, name: str) -> dict | None:
    db = data / ".local/share/smolvm/server/smolvm.db"
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT CAST(data AS TEXT) FROM vms WHERE name=?", (name,)).fetchone()
    return json.loads(row[0]) if row else None


def assert_clap(proc, first_line: str, usage: str):
    assert proc.returncode == 2, proc
    assert proc.stdout == ""
    assert proc.stderr.startswith(f"error: {first_line}"), proc.stderr
    assert f"\n\nUsage: {usage}{CLAP_TRAILER}" in proc.stderr, proc.stderr
    assert proc.stderr.endswith(CLAP_TRAILER)


def assert_error(proc, message: str):
    assert proc.returncode == 1, proc
    assert proc.stderr.strip().splitlines()[-1] == f"Error: {message}", proc.stderr
    assert sum(line.startswith("Error: ") for line in proc.stderr.splitlines()) == 1


CREATE_USAGE = "smolvm machine create [OPTIONS] [-- <COMMAND>...]"


# --- §1 version ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(smolvm, flag):
    proc = smolvm(flag)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "smolvm 1.9.3\n", "")


def test_version_08_mode(smolvm):
    assert smolvm("--version", version="0.8.0").stdout == "smolvm 0.8.0\n"


# --- clap parse errors -----------------------------------------------------------------------------------------

def test_create_rejects_positional_name(smolvm):
    proc = smolvm("machine", "create", "myvm")
    assert_clap(proc, "unexpected argument 'myvm' found\n\nUsage:", CREATE_USAGE)
    assert "tip:" not in proc.stderr


def test_from_conflicts_with_image_and_smolfile(smolvm, tmp_path):
    pack = write_pack(tmp_path / "p.smolmachine")
    proc = smolvm("machine", "create", "-n", "a", "--from", str(pack), "--image", "alpine")
    assert_clap(proc, "the argument '--from <PATH>' cannot be used with '--image <IMAGE>'", CREATE_USAGE)
    proc = smolvm("machine", "create", "-s", "Smolfile", "--from", str(pack))
    assert proc.returncode == 2 and "cannot be used with" in proc.stderr
    assert "'--smolfile <PATH>'" in proc.stderr and "'--from <PATH>'" in proc.stderr


@pytest.mark.parametrize("value", ["x", "10.0.0.0/33", "1.2.3", "::g", "10.0.0.1/"])
def test_allow_cidr_validated_at_parse_time(smolvm, value):
    proc = smolvm("machine", "create", "-n", "a", "--allow-cidr", value)
    assert_clap(proc, f"invalid value '{value}' for '--allow-cidr <CIDR>': invalid CIDR '{value}': expected format "
                      "like 10.0.0.0/8 or 1.1.1.1", CREATE_USAGE)


def test_exec_has_no_short_name(smolvm):
    proc = smolvm("machine", "exec", "-n", "a", "--", "true")
    assert_clap(proc, "unexpected argument '-n' found", "smolvm machine exec [OPTIONS] <COMMAND>...")


def test_exec_requires_a_command(smolvm):
    proc = smolvm("machine", "exec", "--name", "a")
    assert_clap(proc, "the following required arguments were not provided:\n  <COMMAND>...",
                "smolvm machine exec [OPTIONS] <COMMAND>...")


def test_delete_requires_name_flag(smolvm):
    usage = "smolvm machine delete [OPTIONS] --name <NAME>"
    assert_clap(smolvm("machine", "delete", "-f"),
                "the following required arguments were not provided:\n  --name <NAME>", usage)
    assert_clap(smolvm("machine", "delete", "myvm", "-f"), "unexpected argument 'myvm' found", usage)


@pytest.mark.parametrize("args, first", [
    (["--cpus", "300"], "invalid value '300' for '--cpus <N>': 300 is not in 0..=255"),
    (["--mem", "lots"], "invalid value 'lots' for '--mem <MiB>': invalid digit found in string"),
    (["--net-backend", "slirp"], "invalid value 'slirp' for '--net-backend <NET_BACKEND>'\n"
                                 "  [possible values: tsi, virtio-net]"),
    (["--dns", "1.2.3"], "invalid value '1.2.3' for '--dns <IP>': invalid IPv4 address syntax"),
    (["--image", ""], "invalid value '' for '--image <IMAGE>': image reference must not be empty"),
    (["--name"], "a value is required for '--name <NAME>' but none was supplied"),
    (["-n", "a", "-n", "b"], "the argument '--name <NAME>' cannot be used multiple times"),
    (["--nmae", "a"], "unexpected argument '--nmae' found"),
])
def test_create_parse_errors(smolvm, args, first):
    assert_clap(smolvm("machine", "create", *args), first, CREATE_USAGE)


def test_exec_timeout_needs_a_unit(smolvm):
    proc = smolvm("machine", "exec", "--name", "a", "--timeout", "30", "--", "true")
    assert_clap(proc, "invalid value '30' for '--timeout <DURATION>': time unit needed, for example 30sec or 30ms",
                "smolvm machine exec [OPTIONS] <COMMAND>...")


def test_unknown_subcommand(smolvm):
    proc = smolvm("machine", "frobnicate")
    assert proc.returncode == 2 and proc.stderr.startswith("error: unrecognized subcommand 'frobnicate'")


# --- create: --from check order, egress, env, labels, names --------------------------------------------------------

def test_from_check_order(smolvm, tmp_path):
    missing = tmp_path / "nope.smolmachine"
    # a missing file beats a bad name
    assert_error(smolvm("machine", "create", "-n", "bad.name", "--from", str(missing)),
                 f"config operation failed: create from .smolmachine: file not found: {missing}")
    junk = tmp_path / "junk.smolmachine"
    junk.write_bytes(b"x" * 100)
    assert_error(smolvm("machine", "create", "-n", "bad.name", "--from", str(junk)),
                 "agent operation failed: read .smolmachine: invalid magic: expected SMOLPACK")
    tiny = tmp_path / "tiny.smolmachine"
    tiny.write_bytes(b"SMOLPACK")
    assert_error(smolvm("machine", "create", "--from", str(tiny)),
                 "agent operation failed: read .smolmachine: I/O error: sidecar file too small to contain footer")
    other = "arm64" if ARCH == "amd64" else "amd64"
    foreign = write_pack(tmp_path / "foreign.smolmachine", platform=f"linux/{other}")
    proc = smolvm("machine", "create", "-n", "bad.name", "--from", str(foreign))
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"Error: agent operation failed: platform mismatch: this artifact is built for "
                                  f"architecture '{other}' (platform 'linux/{other}'), but this host is '{ARCH}'.")
    secret = write_pack(tmp_path / "secret.smolmachine", secret_refs=[{"name": "K", "source": "env:K"}])
    proc = smolvm("machine", "create", "-n", "bad.name", "--from", str(secret))
    assert proc.returncode == 1 and "create from .smolmachine: secret 'K'" in proc.stderr
    assert "packs may not carry secret refs" in proc.stderr
    good = write_pack(tmp_path / "good.smolmachine")
    assert_error(smolvm("machine", "create", "-n", "bad.name", "--from", str(good)),
                 "config operation failed: create machine: machine name contains invalid character: '.'")
    assert smolvm("machine", "create", "-n", "dup", "--from", str(good)).returncode == 0
    assert_error(smolvm("machine", "create", "-n", "dup", "--from", str(good)),
                 "config operation failed: create machine: machine 'dup' already exists or is being created")


def test_create_from_with_allow_cidr(smolvm, tmp_path):
    pack = write_pack(tmp_path / "p.smolmachine")
    proc = smolvm("machine", "create", "-n", "fenced", "--from", str(pack), "--allow-cidr", "10.1.2.3",
                  "--allow-cidr", "fd00::1", "--allow-cidr", "10.9.9.9/8", "-e", "K=V=W", "--label", "policy=x")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ("Extracting .smolmachine assets...\n"
                           "Created machine: fenced\n"
                           "  CPUs: 4, Memory: 8192 MiB\n"
                           "\n"
                           "Use 'smolvm machine start --name fenced' to start the machine\n"
                           "Then use 'smolvm machine exec --name fenced -- <command>' to run commands\n")
    assert proc.stderr == ""
    rec = record(smolvm.data, "fenced")
    assert rec["allowed_cidrs"] == ["10.1.2.3/32", "fd00::1/128", "10.9.9.9/8"]   # host bits kept
    assert rec["network"] is True
    assert rec["source_smolmachine"] == str(pack)
    assert rec["labels"] == {"policy": "x"}
    assert ["K", "V=W"] in rec["env"] and ["PATH", "/usr/bin:/bin"] == rec["env"][0]
    assert "network_backend" not in rec and "dns_filter_hosts" not in rec
    status = json.loads(smolvm("machine", "status", "-n", "fenced", "--json").stdout)
    assert status["network"] is True and sorted(status) == JSON_FIELDS


def test_create_from_without_egress_flags_keeps_pack_default(smolvm, tmp_path):
    pack = write_pack(tmp_path / "p.smolmachine", cpus=2, mem=1024)
    assert smolvm("machine", "create", "-n", "plain", "--from", str(pack)).returncode == 0
    rec = record(smolvm.data, "plain")
    assert rec["network"] is False and rec["allowed_cidrs"] is None
    assert (rec["cpus"], rec["mem"]) == (2, 1024)


def test_08_mode_drops_allow_cidr_on_from(smolvm, tmp_path):
    pack = write_pack(tmp_path / "p.smolmachine")
    proc = smolvm("machine", "create", "-n", "leaky", "--from", str(pack), "--net", "--allow-cidr", "10.1.2.3/32",
                  version="0.8.0")
    assert proc.returncode == 0, proc.stderr
    rec = record(smolvm.data, "leaky")
    assert rec["allowed_cidrs"] is None and rec["network"] is True
    # without --net, 0.8 does not even turn the network on for the CIDR
    smolvm("machine", "create", "-n", "leaky2", "--from", str(pack), "--allow-cidr", "10.1.2.3/32", version="0.8.0")
    assert record(smolvm.data, "leaky2")["network"] is False


def test_tsi_with_policy_is_rejected(smolvm, tmp_path):
    pack = write_pack(tmp_path / "p.smolmachine")
    for extra in (["--allow-cidr", "10.0.0.1"], ["--outbound-localhost-only"]):
        assert_error(smolvm("machine", "create", "-n", "t", "--from", str(pack), "--net-backend", "tsi", *extra),
                     "config operation failed: egress: egress policy (--allow-cidr/--allow-host/"
                     "--outbound-localhost-only) requires the virtio-net backend; TSI does not enforce it. Remove "
                     "--net-backend tsi or set it to virtio-net")
    assert smolvm("machine", "create", "-n", "t", "--net", "--net-backend", "tsi").returncode == 0
    assert record(smolvm.data, "t")["network_backend"] == "tsi"


def test_outbound_localhost_only_and_dns(smolvm):
    assert smolvm("machine", "create", "-n", "lo", "--outbound-localhost-only").returncode == 0
    assert record(smolvm.data, "lo")["allowed_cidrs"] == ["127.0.0.0/8", "::1/128"]
    assert smolvm("machine", "create", "-n", "d", "--dns", "10.0.0.53").returncode == 0
    rec = record(smolvm.data, "d")
    assert rec["dns"] == "10.0.0.53" and rec["network"] is True      # --dns implies --net


def test_allow_host_resolution(smolvm):
    assert smolvm("machine", "create", "-n", "h", "--allow-host", "localhost").returncode == 0
    rec = record(smolvm.data, "h")
    assert "127.0.0.1/32" in rec["allowed_cidrs"] and rec["dns_filter_hosts"] == ["localhost"]
    proc = smolvm("machine", "create", "-n", "h2", "--allow-host", "no-such-host.invalid")
    assert proc.returncode == 1
    assert proc.stderr.startswith("Error: config operation failed: --allow-host: failed to resolve "
                                  "'no-such-host.invalid': ")
    proc = smolvm("machine", "create", "-n", "h3", "--allow-host", "example.com:443")
    assert proc.returncode == 1 and "port suffixes are not supported" in proc.stderr


def test_env_semantics(smolvm):
    proc = smolvm("machine", "create", "-n", "e", "-e", "A=1", "-e", "=dropped", "-e", "FROM_HOST", "-e", "UNSET_X",
                  "-e", "B=x=y", env={"FROM_HOST": "hv"})
    assert proc.returncode == 0, proc.stderr
    assert record(smolvm.data, "e")["env"] == [["A", "1"], ["FROM_HOST", "hv"], ["B", "x=y"]]


@pytest.mark.parametrize("label, message", [
    ("x", "config operation failed: --label: expected KEY=VALUE, got 'x'"),
    ("=v", "config operation failed: --label: label key cannot be empty (in '=v')"),
])
def test_label_errors(smolvm, label, message):
    assert_error(smolvm("machine", "create", "-n", "l", "--label", label), message)


def test_labels_in_json(smolvm):
    assert smolvm("machine", "create", "-n", "l", "--label", "b=", "--label", "a=1=2").returncode == 0
    [obj] = json.loads(smolvm("machine", "ls", "--json").stdout)
    assert obj["labels"] == {"a": "1=2", "b": ""}


@pytest.mark.parametrize("name, reason", [
    ("-x", 'machine name must start with a letter or digit (got: "-x")'),
    ("x-", 'machine name cannot end with a hyphen (got: "x-")'),
    ("a--b", "machine name cannot contain consecutive hyphens"),
    ("a/b", "machine name cannot contain path separators"),
    ("a.b", "machine name contains invalid character: '.'"),
    ("", "machine name cannot be empty"),
    ("a" * 129, "machine name too long: 129 characters (max 128)"),
])
def test_name_validation(smolvm, name, reason):
    assert_error(smolvm("machine", "create", f"--name={name}"), f"config operation failed: create machine: {reason}")


def test_default_name_and_workload(smolvm):
    proc = smolvm("machine", "create", "--net", "--", "sleep", "--mem", "1")
    assert proc.returncode == 0
    assert "note: --mem came after `--`" in proc.stderr
    [obj] = json.loads(smolvm("machine", "ls", "--json").stdout)
    assert obj["name"].startswith("vm-") and len(obj["name"]) == 11
    assert obj["cmd"] == ["sleep", "--mem", "1"] and obj["memory_mib"] == 8192


def test_registry_image_without_network_rejected(smolvm):
    proc = smolvm("machine", "create", "-n", "i", "--image", "alpine")
    assert proc.returncode == 1
    assert proc.stderr.startswith("Error: config operation failed: create machine: image 'alpine' must be pulled "
                                  "from a registry, but this machine has no network")


# --- lifecycle on records ----------------------------------------------------------------------------------------

def test_lifecycle_without_booting(smolvm, tmp_path):
    assert smolvm("machine", "ls").stdout == "No machines found\n"
    assert smolvm("machine", "ls", "--json").stdout == "[]\n"
    pack = write_pack(tmp_path / "p.smolmachine")
    assert smolvm("machine", "create", "-n", "m", "--from", str(pack)).returncode == 0
    assert smolvm("machine", "status", "-n", "m").stdout == "Machine 'm': created\n"
    assert smolvm("machine", "status").stdout == "Machine 'default': not running\n"
    proc = smolvm("machine", "stop", "-n", "m")
    assert (proc.returncode, proc.stdout) == (0, "Machine 'm' is not running (state: created)\n")
    assert_error(smolvm("machine", "exec", "--name", "m", "--", "true"),
                 "agent operation failed: connect: machine 'm' is not running. Use 'smolvm machine start --name m' "
                 "first.")
    assert_error(smolvm("machine", "cp", "./x", "m:/tmp/x"),
                 "agent operation failed: connect: machine 'm' is not running. Use 'smolvm machine start --name m' "
                 "first.")
    # delete without -f and a closed stdin: Cancelled, exit 0, record kept
    proc = smolvm("machine", "delete", "-n", "m", input="")
    assert (proc.returncode, proc.stdout) == (0, "Cancelled\n")
    assert proc.stderr == "Delete machine 'm'? [y/N] "
    assert record(smolvm.data, "m") is not None
    proc = smolvm("machine", "rm", "-n", "m", input="y\n")
    assert proc.returncode == 0 and proc.stdout.endswith("Deleted machine: m\n")
    assert record(smolvm.data, "m") is None
    assert smolvm("machine", "create", "-n", "m2", "--from", str(pack)).returncode == 0
    proc = smolvm("machine", "delete", "-n", "m2", "-f")
    assert proc.stdout == "Cleaning up data directory for vm: m2\nDeleted machine: m2\n"


@pytest.mark.parametrize("args", [
    ["machine", "start", "-n", "ghost"], ["machine", "stop", "-n", "ghost"], ["machine", "status", "-n", "ghost"],
    ["machine", "delete", "-n", "ghost", "-f"], ["machine", "exec", "--name", "ghost", "--", "true"],
    ["machine", "cp", "ghost:/etc/hostname", "./h"], ["machine", "cp", "./h", "ghost:/tmp/h"],
])
def test_unknown_name(smolvm, args):
    assert_error(smolvm(*args), "vm not found: ghost")


def test_status_json_unknown(smolvm):
    assert_error(smolvm("machine", "status", "-n", "ghost", "--json"),
                 "config operation failed: machine status: machine 'ghost' not found")


def test_ls_json_fields(smolvm, tmp_path):
    pack = write_pack(tmp_path / "p.smolmachine")
    smolvm("machine", "create", "-n", "b", "--from", str(pack), "--allow-cidr", "10.0.0.1")
    smolvm("machine", "create", "-n", "a", "-v", "/tmp:/mnt", "-p", "8080:80")
    text = smolvm("machine", "ls", "--json").stdout
    objs = json.loads(text)
    assert {o["name"] for o in objs} == {"a", "b"}
    for o in objs:
        assert list(o) == JSON_FIELDS                                       # alphabetical, exact set
        assert not any("cidr" in k or "backend" in k or "source" in k for k in o)
    a = next(o for o in objs if o["name"] == "a")
    assert (a["mounts"], a["ports"], a["state"], a["pid"]) == (1, 1, "created", None)
    assert text.startswith("[\n  {\n    \"cmd\": [],\n")                  # serde_json pretty layout


def test_cp_needs_exactly_one_machine_side(smolvm):
    assert_error(smolvm("machine", "cp", "a", "b"),
                 "config operation failed: cp: one of SRC or DST must use machine:path syntax (e.g., "
                 "myvm:/workspace/file)")
    assert_error(smolvm("machine", "cp", "--mode", "600", "m:/a", "b"),
                 "config operation failed: cp: --mode/--uid/--gid apply to uploads only (host -> machine)")
    assert_clap(smolvm("machine", "cp", "a"), "the following required arguments were not provided:\n  <DST>",
                "smolvm machine cp [OPTIONS] <SRC> <DST>")


def test_egress_events_empty(smolvm):
    proc = smolvm("machine", "egress-events", "-n", "whatever", "--json")
    assert (proc.returncode, proc.stdout) == (0, "[]\n")
    assert smolvm("machine", "egress-events", "-n", "w").stdout == "No egress denials recorded for 'w'.\n"


# --- pack create arguments ---------------------------------------------------------------------------------------

PACK_USAGE = "smolvm pack create [OPTIONS] --output <PATH>"


def test_pack_create_requires_output_and_image(smolvm, tmp_path):
    assert_clap(smolvm("pack", "create", "--image", "alpine"),
                "the following required arguments were not provided:\n  --output <PATH>", PACK_USAGE)
    assert_clap(smolvm("pack", "create", "-o", str(tmp_path / "p")),
                "the following required arguments were not provided:\n  --image <IMAGE>", PACK_USAGE)
    assert_clap(smolvm("pack", "create", "alpine", "-o", str(tmp_path / "p")),
                "unexpected argument 'alpine' found", PACK_USAGE)
    proc = smolvm("pack", "create", "--image", "a", "--from-vm", "v", "-o", str(tmp_path / "p"))
    assert proc.returncode == 2 and "cannot be used with" in proc.stderr


def test_pack_create_rejects_sidecar_output(smolvm, tmp_path):
    assert_error(smolvm("pack", "create", "--image", "alpine", "-o", str(tmp_path / "p.smolmachine")),
                 "config operation failed: pack create: --output names the executable stub, not the .smolmachine "
                 "sidecar (which is created automatically as '<output>.smolmachine'). Use --output <stem> instead.")
    assert not (tmp_path / "p.smolmachine").exists()


def test_pack_create_pull_failure_is_a_runtime_error(smolvm, tmp_path):
    proc = smolvm("pack", "create", "--image", "localhost:1/none:tag", "-o", str(tmp_path / "p"),
                  env={"CRANE": "/nonexistent/crane", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1 and proc.stderr.startswith("Error: agent operation failed: pull image: ")
    assert not (tmp_path / "p").exists()
