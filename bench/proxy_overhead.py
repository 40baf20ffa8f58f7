"""What the proxy chain (guest -> egress -> upstream) adds to HTTPS, against a direct client, in one run.

Latency: small GETs over persistent connections (one per client thread), at 1 and 16 concurrent
clients, p50/p99 through the chain (from the guest, via its HTTPS_PROXY) and direct (from a
container on the bottle's egress network that trusts the fake upstream's CA, no proxy). Goals:
at most 5 ms added at p50 and 20 ms at p99. Also, for reading the numbers, one client opening a
new connection per request (TLS interception per connection). Throughput: a 100 MB download
through the chain and direct. Goal: at least 50 MB/s through the chain.

Every request goes to the fake upstream this script starts (tests/integration/upstream), on the
bottle's own egress network; everything is removed at the end, even on failure.

    python bench/proxy_overhead.py [small-requests-at-1-client]
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time

from common import ROOT, BenchEnv, machine

from bottle_tasks.labels import LABEL
from bottle_tasks.settings import Settings
from tests.integration.certs import mint_upstream_certs
from tests.integration.conftest import UPSTREAM_IMAGE, UPSTREAM_NAMES

AGENT = "bench-proxy"
AGENT_YAML = """routes:
  - host: upstream.test
    private_network: true      # the fake upstream sits on the bottle's egress network
"""
HOST = "upstream.test"
BIG = 100 * 1024 * 1024
GOAL_P50_MS, GOAL_P99_MS, GOAL_MBPS = 5.0, 20.0, 50.0

# Run inside the containers with `python3 -c` (standard library only). argv[1] is a JSON job.
# Through the chain: a CONNECT tunnel to HTTPS_PROXY, TLS with the bottle CA (SSL_CERT_FILE).
# Direct: TLS straight to the upstream with the test CA (BENCH_CA). Prints one JSON line.
CLIENT = r'''
import http.client, json, os, ssl, sys, threading, time, urllib.parse
job = json.loads(sys.argv[1])
host, via = job["host"], job["via"]
if via == "chain":
    ctx = ssl.create_default_context()  # SSL_CERT_FILE: the system bundle with the bottle CA
    proxy = urllib.parse.urlsplit(os.environ["HTTPS_PROXY"])
else:
    ctx = ssl.create_default_context(cafile=os.environ["BENCH_CA"])

def connect():
    if via == "chain":
        conn = http.client.HTTPSConnection(proxy.hostname, proxy.port, context=ctx, timeout=60)
        conn.set_tunnel(host, 443)
    else:
        conn = http.client.HTTPSConnection(host, 443, context=ctx, timeout=60)
    return conn

def get(conn, path, bufsize=1 << 20):
    conn.request("GET", path, headers={"Host": host})
    resp = conn.getresponse()
    n, buf = 0, bytearray(bufsize)
    view = memoryview(buf)
    while True:
        got = resp.readinto(view)
        if not got:
            break
        n += got
    if resp.status != 200:
        raise SystemExit(f"{path}: HTTP {resp.status} {resp.getheader('X-Bottle-Block-Reason', '')}")
    return n

if job["kind"] == "latency":
    clients, n, warmup, fresh = job["clients"], job["requests"], job["warmup"], job["fresh"]
    start = threading.Barrier(clients)
    samples = [[] for _ in range(clients)]
    errors = []

    def worker(i):
        try:
            conn = connect()
            for _ in range(warmup):
                get(conn, job["path"], 65536)
            start.wait()
            for _ in range(n):
                if fresh:
                    conn.close()
                    conn = connect()
                t = time.perf_counter()
                get(conn, job["path"], 65536)
                samples[i].append(time.perf_counter() - t)
            conn.close()
        except BaseException as exc:
            errors.append(repr(exc))
            start.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit("; ".join(errors[:3]))
    print(json.dumps({"samples": [s for per in samples for s in per], "wall": time.perf_counter() - t0}))
else:
    conn = connect()
    get(conn, "/bytes/1048576")  # warm: tunnel, TLS and the upstream connection are up
    runs = []
    for _ in range(job["runs"]):
        t = time.perf_counter()
        got = get(conn, "/bytes/%d" % job["size"])
        runs.append(time.perf_counter() - t)
        if got != job["size"]:
            raise SystemExit(f"short body: {got} of {job['size']}")
    print(json.dumps({"seconds": runs}))
'''


def docker(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise SystemExit(f"docker {' '.join(args[:3])} ... failed: {proc.stderr.strip()}")
    return proc


def run_client(container: str, job: dict, user: str | None = None) -> dict:
    argv = ["exec", *(["-u", user] if user else []), container, "python3", "-c", CLIENT, json.dumps(job)]
    proc = docker(*argv, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"client in {container} ({job}) failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def start_upstream(plan, name: str, certs) -> None:
    """The test upstream (tests/integration/upstream) on the bottle's egress network, same aliases."""
    docker("run", "-d", "--name", name, "--label", f"{LABEL}.test=bench-upstream",
           "--network", plan.network.outbound.name, *sum((["--network-alias", n] for n in UPSTREAM_NAMES), []),
           "-v", f"{certs}:/certs:ro", UPSTREAM_IMAGE, "/certs/server.pem", "/certs/server-key.pem")
    for _ in range(100):
        if '"ready"' in docker("logs", name).stdout:
            return
        time.sleep(0.1)
    raise SystemExit(f"the upstream did not start: {docker('logs', name, check=False).stderr}")


def cpu_seconds(container: str) -> float:
    """CPU time the container's processes used so far (cgroup v2 cpu.stat, else v1 cpuacct)."""
    out = docker("exec", container, "sh", "-c", "cat /sys/fs/cgroup/cpu.stat 2>/dev/null "
                 "|| cat /sys/fs/cgroup/cpuacct/cpuacct.usage").stdout.split()
    if "usage_usec" in out:
        return int(out[out.index("usage_usec") + 1]) / 1e6
    return int(out[0]) / 1e9


def pct(samples: list[float], q: float) -> float:
    """Nearest-rank percentile, in ms."""
    ordered = sorted(samples)
    return 1000 * ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def main() -> None:
    small_n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    bench = BenchEnv({AGENT: AGENT_YAML}, {"BOTTLE_PIPELOCK": "off",
                                           "BOTTLE_BUILD_CA_CERTS": "/etc/ssl/certs/ca-certificates.crt"})
    upstream = f"bottle-bench-upstream-{os.getpid()}"
    direct = f"bottle-bench-direct-{os.getpid()}"
    try:
        certs = bench.root / "upstream-certs"  # the upstream's own test CA, trusted by egress and the direct client
        ca_pem, _, _ = mint_upstream_certs(certs, UPSTREAM_NAMES)
        bench.env["BOTTLE_UPSTREAM_CA_CERTS"] = str(ca_pem)
        print(f"machine: {machine()}", flush=True)
        bench.doit("start", f"agent={AGENT}", "command=true")
        plan = bench.plan(AGENT)
        docker("build", "-q", "-t", UPSTREAM_IMAGE, "--build-arg", f"BASE_IMAGE={Settings.from_env(bench.env).base_image}",
               str(ROOT / "tests" / "integration" / "upstream"))
        start_upstream(plan, upstream, certs)
        docker("run", "-d", "--name", direct, "--label", f"{LABEL}.test=bench-client",
               "--network", plan.network.outbound.name, "-v", f"{certs}:/certs:ro", "--env", "BENCH_CA=/certs/ca.pem",
               "--entrypoint", "sleep", UPSTREAM_IMAGE, "infinity")
        clients = {"chain": (plan.guest.name, "agent"), "direct": (direct, None)}
        bundle, warmup = plan.bundle.name, 20

        def latency(via: str, n_clients: int, per_client: int, fresh: bool = False) -> list[float]:
            container, user = clients[via]
            job = {"kind": "latency", "via": via, "host": HOST, "path": "/small", "clients": n_clients,
                   "requests": per_client, "warmup": warmup, "fresh": fresh}
            return run_client(container, job, user)["samples"]

        cases = [("1 client, keep-alive", 1, small_n, False),
                 ("16 clients, keep-alive", 16, max(1, small_n // 6), False),
                 ("1 client, new conn/request", 1, max(1, small_n // 3), True)]
        rows = []
        for label, n_clients, per_client, fresh in cases:
            before = cpu_seconds(bundle)
            chain = latency("chain", n_clients, per_client, fresh)
            # Bundle CPU per request through the chain, warm-up requests included (egress is all of it).
            cpu_ms = 1000 * (cpu_seconds(bundle) - before) / (n_clients * (per_client + warmup))
            direct_s = latency("direct", n_clients, per_client, fresh)
            rows.append((label, chain, direct_s, cpu_ms))

        def throughput(via: str) -> list[float]:
            container, user = clients[via]
            seconds = run_client(container, {"kind": "bulk", "via": via, "host": HOST, "size": BIG, "runs": 3}, user)["seconds"]
            return [BIG / 1e6 / s for s in seconds]

        before = cpu_seconds(bundle)
        bulk = {"chain": throughput("chain")}
        bulk_cpu = cpu_seconds(bundle) - before
        bulk["direct"] = throughput("direct")

        print(f"\nsmall HTTPS GET https://{HOST}/small, latency in ms (goal: chain adds <= {GOAL_P50_MS:g} at p50, "
              f"<= {GOAL_P99_MS:g} at p99)")
        print(f"{'case':28} {'n':>5} {'chain p50':>10} {'p99':>8} {'direct p50':>11} {'p99':>8} "
              f"{'added p50':>10} {'p99':>8} {'egress CPU/req':>15}")
        for label, chain, direct_s, cpu_ms in rows:
            c50, c99, d50, d99 = pct(chain, 50), pct(chain, 99), pct(direct_s, 50), pct(direct_s, 99)
            a50, a99 = c50 - d50, c99 - d99
            goal = "" if "new conn" in label else \
                f"  p50 {verdict(a50 <= GOAL_P50_MS)}, p99 {verdict(a99 <= GOAL_P99_MS)}"
            print(f"{label:28} {len(chain):5d} {c50:10.2f} {c99:8.2f} {d50:11.2f} {d99:8.2f} {a50:10.2f} {a99:8.2f} {cpu_ms:12.2f} ms{goal}")
        print(f"\n100 MB download https://{HOST}/bytes/{BIG}, one keep-alive connection, 3 runs (goal: chain >= "
              f"{GOAL_MBPS:g} MB/s)")
        for via in ("chain", "direct"):
            runs = bulk[via]
            extra = f"  {verdict(statistics.median(runs) >= GOAL_MBPS)}" if via == "chain" else ""
            print(f"{via:8} median {statistics.median(runs):7.1f} MB/s  min {min(runs):7.1f}  max {max(runs):7.1f}{extra}")
        print(f"chain / direct (median): {statistics.median(bulk['chain']) / statistics.median(bulk['direct']):.2f}; "
              f"bundle CPU through the chain: {1000 * bulk_cpu / (3 * BIG / 1e6):.1f} ms per MB "
              f"(one core saturates at ~{3 * BIG / 1e6 / bulk_cpu:.0f} MB/s)")
    finally:
        docker("rm", "-f", upstream, direct, check=False)
        try:
            bench.doit("clean", f"agent={AGENT}", "purge=1")
        finally:
            bench.cleanup()


if __name__ == "__main__":
    main()
