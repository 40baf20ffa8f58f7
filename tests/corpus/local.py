"""The local transport: the real egress in a subprocess, the fake upstream and, optionally, pipelock.

Everything listens on 127.0.0.1 and nothing else is contacted:

- routes.yaml and pipelock.yaml are rendered from the project's templates for the site's agent
  (bottle_tasks.render), then pointed at loopback ports; egress dials directly (in the bundle it
  goes through pipelock's proxy, which would resolve names itself and reach the internet);
- egress runs as ``tests.corpus.egress_harness``: egress.main with the site's DNS table and every
  checked address mapped onto the fake upstream (public names to the public one, private
  addresses to the private one);
- pipelock (``pipelock run``, when a binary is given) serves its scan API to egress;
- the client (client.py) sends each wire request through egress with the bottle CA trusted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bottle_tasks.ca import mint_ca
from bottle_tasks.plan import make_plan
from bottle_tasks.render import render, write_atomic
from bottle_tasks.settings import ROOT, Settings
from bottle_tasks.sidecars.addresses import is_public_address
from bottle_tasks.spec import load_spec
from tests.corpus import client
from tests.corpus.cases import RenderedCase, Site
from tests.corpus.outcome import Exchange, Outcome
from tests.corpus.upstream import FakeUpstream, free_port

# Stands for every "public" name of the site. It passes egress's global-address check; it is never
# dialled: the harness maps it onto the fake upstream like every other address it hands out.
FAKE_PUBLIC_ADDRESS = "93.184.215.34"
HARNESS_EVENTS = ("harness_dns", "harness_refused")


class TransportError(RuntimeError):
    pass


class LocalTransport:
    """One egress (and pipelock when pipelock_bin is given) for a whole corpus run."""

    def __init__(self, site: Site, *, pipelock_bin: str | None = None, workdir: Path | None = None):
        self.site = site
        self.pipelock_bin = pipelock_bin
        self.mode = "pipelock" if pipelock_bin else "floor"
        self.name = f"local-{self.mode}"
        self._workdir = workdir
        self._processes: list[subprocess.Popen] = []

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> "LocalTransport":
        self.tmp = Path(tempfile.mkdtemp(prefix="corpus-", dir=self._workdir))
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        bottle_ca, upstream_ca = self.tmp / "bottle-ca", self.tmp / "upstream-ca"
        mint_ca(bottle_ca / "ca.pem", bottle_ca / "ca-key.pem", "corpus bottle CA")
        mint_ca(upstream_ca / "ca.pem", upstream_ca / "ca-key.pem", "corpus upstream CA")
        self.upstream = FakeUpstream(upstream_ca / "ca.pem", upstream_ca / "ca-key.pem", self.tmp)
        plan = self._plan()
        scan_url, pipelock_config = "", self.tmp / "pipelock.yaml"
        if self.pipelock_bin:
            scan_url = self._start_pipelock(plan, pipelock_config)
        self.proxy = ("127.0.0.1", free_port())
        routes = yaml.safe_load(render("routes.yaml.j2", plan))
        routes.update(listen=f"{self.proxy[0]}:{self.proxy[1]}", upstream_proxy="", pipelock_scan_url=scan_url)
        (self.tmp / "routes.yaml").write_text(json.dumps(routes))  # JSON is YAML
        (self.tmp / "harness.json").write_text(json.dumps(self._harness_tables()))
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env["PYTHONPATH"] = str(ROOT)
        for route in self.site.agent["routes"]:
            if route.get("token"):  # a fake real token; egress fills it only after DLP
                env[route["token"]["env"]] = "sk-ant-api03-" + secrets.token_urlsafe(60)
        self.egress_log = self.tmp / "egress.out"
        self._log_offset = 0
        self._spawn([sys.executable, "-m", "tests.corpus.egress_harness", "--harness", str(self.tmp / "harness.json"),
                     "--", "--routes", str(self.tmp / "routes.yaml"), "--ca-dir", str(bottle_ca),
                     "--upstream-ca", str(upstream_ca / "ca.pem"), "--pipelock-config", str(pipelock_config),
                     "--confdir", str(self.tmp / "mitmproxy")], self.egress_log, env)
        _wait_for_port(self.proxy, self._processes[-1], self.tmp / "egress.out.err")
        self.context = ssl.create_default_context(cafile=str(bottle_ca / "ca.pem"))
        self.http2_context = ssl.create_default_context(cafile=str(bottle_ca / "ca.pem"))
        self.http2_context.set_alpn_protocols(["h2"])

    def _plan(self):
        agents = self.tmp / "agents"
        agents.mkdir()
        spec_path = agents / "corpus.yaml"
        spec_path.write_text(yaml.safe_dump(self.site.agent))
        settings = Settings.from_env({"HOME": str(self.tmp), "BOTTLE_STATE_DIR": str(self.tmp / "state"),
                                      "BOTTLE_CACHE_DIR": str(self.tmp / "cache"),
                                      "BOTTLE_PIPELOCK_BIN": self.pipelock_bin or "/nonexistent/pipelock"})
        return dataclasses.replace(make_plan(load_spec(spec_path), settings), pipelock_enabled=bool(self.pipelock_bin))

    def _start_pipelock(self, plan, config_path: Path) -> str:
        token = secrets.token_urlsafe(24)
        config = yaml.safe_load(render("pipelock.yaml.j2", plan, scan_token=token))
        scan = ("127.0.0.1", free_port())
        config["fetch_proxy"]["listen"] = f"127.0.0.1:{free_port()}"  # unused here: egress dials directly
        config["scan_api"]["listen"] = f"{scan[0]}:{scan[1]}"
        write_atomic(config_path, yaml.safe_dump(config), mode=0o600)
        self._spawn([self.pipelock_bin, "run", "--config", str(config_path)], self.tmp / "pipelock.out", dict(os.environ))
        _wait_for_port(scan, self._processes[-1], self.tmp / "pipelock.out.err")
        return f"http://{scan[0]}:{scan[1]}/api/v1/scan"

    def _harness_tables(self) -> dict:
        dns = {name: [FAKE_PUBLIC_ADDRESS if a == "public" else a for a in addresses]
               for name, addresses in self.site.dns.items()}
        dial: dict[str, list] = {}
        for address in {a for addresses in dns.values() for a in addresses}:
            private = not is_public_address(address)
            for port, scheme in ((443, "https"), (80, "http")):
                dial[f"{address}|{port}"] = ["127.0.0.1", self.upstream.port(private=private, scheme=scheme)]
        return {"dns": dns, "dial": dial}

    def _spawn(self, argv: list[str], stdout: Path, env: dict) -> None:
        with open(stdout, "wb") as out, open(f"{stdout}.err", "wb") as err:
            self._processes.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=err))

    def close(self) -> None:
        for process in reversed(self._processes):
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        self._processes.clear()
        if getattr(self, "upstream", None) is not None:
            self.upstream.close()
            self.upstream = None
        if getattr(self, "tmp", None) is not None and os.environ.get("CORPUS_KEEP_TMP") != "1":
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- one case -------------------------------------------------------------------------------

    def run(self, rendered: RenderedCase) -> Outcome:
        start = time.perf_counter()
        self.upstream.begin(rendered.response)
        self._read_log()  # what is left from earlier cases is theirs
        exchanges = [[Exchange.from_client(x) for x in client.perform(wire.to_json(), self.proxy, self.context,
                                                                   http2_context=self.http2_context)]
                     for wire in rendered.wires]
        arrivals = self.upstream.settle()
        records = self._read_log()
        dns = [r["host"] for r in records if r.get("event") == "harness_dns"]
        log = [r for r in records if r.get("event") not in HARNESS_EVENTS]
        return Outcome(exchanges, arrivals, dns, log, time.perf_counter() - start)

    def _read_log(self) -> list[dict]:
        with open(self.egress_log, "rb") as handle:
            handle.seek(self._log_offset)
            data = handle.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._log_offset += len(complete)
        records = []
        for line in complete.splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records


def _wait_for_port(address: tuple[str, int], process: subprocess.Popen, stderr: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise TransportError(f"{process.args[0]} exited ({process.returncode}): {_tail(stderr)}")
        try:
            socket.create_connection(address, timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TransportError(f"nothing listens on {address[0]}:{address[1]}: {_tail(stderr)}") from None
            time.sleep(0.1)


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-2000:]
    except OSError:
        return ""
