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

Scan cost (``--scan-cost``, in this process, no docker): what egress's built-in DLP floor costs per
request and per MB, the floor as it is against the nine-regex floor it replaced (copied below as
the baseline), side by side. Egress scans in a worker thread: a request's URL and headers
(dlp.scan_request), then its body window by window with its fields reassembled
(bodies.scan_body); the model API route redacts instead (dlp.redact_body). Goal: a 1 MB Messages
API body (a screenshot and text) well under 50 ms.

    python bench/proxy_overhead.py --scan-cost [repeats]
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import time
import urllib.parse

from common import ROOT, BenchEnv, machine

from bottle_tasks.labels import LABEL
from bottle_tasks.settings import Settings
from bottle_tasks.sidecars import bodies, dlp

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
    from tests.integration.certs import mint_upstream_certs
    from tests.integration.conftest import UPSTREAM_IMAGE, UPSTREAM_NAMES

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


# -- scan cost ----------------------------------------------------------------------------------

# The floor before issue 10 (bottle_tasks/sidecars/dlp.py at 9bb0f8c): nine regexes over the text
# and its percent-decodings, the baseline for the scan cost.
OLD_PATTERNS = tuple(re.compile(source) for source in (
    r"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])",
    r"(?i)aws[_\-. ]?secret[_\-. ]?(?:access[_\-. ]?)?key[\"'\s]*[:=]\s*[\"']?[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])",
    r"(?<![A-Za-z0-9_])gh[pousr]_[A-Za-z0-9]{36,255}",
    r"(?<![A-Za-z0-9_])github_pat_[A-Za-z0-9_]{22,255}",
    r"(?<![A-Za-z0-9_-])sk-ant-[A-Za-z0-9_-]{20,}",
    r"(?<![A-Za-z0-9_-])sk-(?!ant-)(?:[A-Za-z0-9]+-)?[A-Za-z0-9_-]{20,}",
    r"(?<![A-Za-z0-9])xox[abposr]-[A-Za-z0-9-]{10,}",
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----",
    r"(?<![A-Za-z0-9_-])AIza[0-9A-Za-z_-]{35}(?![0-9A-Za-z_-])",
))


def old_scan_text(text: str) -> int:
    views, current = [text], text
    for _ in range(3):
        if "%" not in current and "+" not in current:
            break
        decoded = urllib.parse.unquote_plus(current, errors="replace")
        if decoded == current:
            break
        views.append(decoded)
        current = decoded
    return sum(1 for pattern in OLD_PATTERNS if any(pattern.search(view) for view in views))


def old_floor(head: dlp.RequestParts, body: str) -> int:
    """The old egress path: URL and each header value, then the body in bodies' windows."""
    found = old_scan_text(head.url) + sum(old_scan_text(value) for _, value in head.headers)
    step = bodies.SCAN_WINDOW - bodies.SCAN_OVERLAP
    return found + sum(old_scan_text(body[start:start + bodies.SCAN_WINDOW]) for start in range(0, max(len(body), 1), step))


def new_floor(head: dlp.RequestParts, body: str) -> int:
    """egress's path today: dlp.scan_request on URL and headers, bodies.scan_body on the body."""
    found = dlp.scan_request(head)
    window = bodies.scan_body(body.encode(), "", 1 << 30, lambda text: dlp.scan_text(text, "body") or None)
    return len(found) + len(window or [])


def scan_cases(rng: random.Random) -> list[tuple[str, dlp.RequestParts, str]]:
    headers = (("host", "api.anthropic.com"), ("content-type", "application/json"), ("accept", "application/json"),
               ("anthropic-version", "2023-06-01"), ("anthropic-beta", "prompt-caching-2024-07-31"),
               ("x-api-key", "bottle-placeholder-ANTHROPIC_API_KEY"), ("user-agent", "claude-cli/1.0.0 (external, cli)"),
               ("x-stainless-lang", "js"), ("x-stainless-retry-count", "0"))
    head = dlp.RequestParts("api.anthropic.com/v1/messages?beta=true", headers, "")
    prose = (ROOT / "README.md").read_text() * 200
    code = (ROOT / "bottle_tasks" / "sidecars" / "egress.py").read_text() * 40

    def messages(*blocks) -> str:
        return json.dumps({"model": "claude-sonnet-4", "max_tokens": 8192, "stream": True, "system": "You are Claude Code.",
                           "messages": [{"role": "user", "content": list(blocks)}]})

    text_block = lambda text: {"type": "text", "text": text}  # noqa: E731
    image = lambda size: {"type": "image", "source": {"type": "base64", "media_type": "image/png",  # noqa: E731
                                                       "data": base64.b64encode(rng.randbytes(size)).decode()}}
    lockfile = json.dumps({"packages": {f"node_modules/pkg-{i}": {
        "version": f"1.{i % 40}.{i % 7}", "resolved": f"https://registry.npmjs.org/pkg-{i}/-/pkg-{i}-1.0.0.tgz",
        "integrity": "sha512-" + base64.b64encode(hashlib.sha512(str(i).encode()).digest()).decode(), "license": "MIT"}
        for i in range(4000)}}, indent=2)
    return [
        ("typical request: headers + 2 KB JSON", head, messages(text_block(prose[:2000]))),
        ("1 MB Messages API body: screenshot + text", head, messages(image(600_000), text_block(prose[:200_000]))),
        ("1 MB Messages API body: text and code", head, messages(text_block(prose[:500_000]), text_block(code[:500_000]))),
        ("1 MB plain text (prose)", head, prose[:1_000_000]),
        ("1 MB plain text (code)", head, code[:1_000_000]),
        ("1 MB base64 (an image alone)", head, base64.b64encode(rng.randbytes(750_000)).decode()),
        ("1 MB JSON lockfile (hashes, URLs)", head, lockfile[:1_000_000]),
    ]


def timed_ms(fn, repeats: int) -> tuple[float, float]:
    """Median wall time and median CPU time of fn, in ms (caches cleared: every request is new text).
    CPU time is what the scan costs egress; on a shared machine wall time also counts the waits."""
    wall, cpu = [], []
    for _ in range(repeats):
        dlp.analyse.cache_clear()
        start, start_cpu = time.perf_counter(), time.thread_time()
        fn()
        wall.append(1000 * (time.perf_counter() - start))
        cpu.append(1000 * (time.thread_time() - start_cpu))
    return statistics.median(wall), statistics.median(cpu)


def scan_cost(repeats: int) -> None:
    print(f"machine: {machine()}, load average {' '.join(f'{load:.2f}' for load in os.getloadavg())}")
    print(f"DLP floor scan cost, median of {repeats} runs (small requests: 40 times as many), in this process;"
          " wall ms (CPU ms)")
    print(f"{'case':44} {'size':>9} {'old floor':>16} {'new floor':>16} {'new per MB':>16} {'redact_body':>16}")
    goal = None
    for label, head, body in scan_cases(random.Random(10)):
        runs = repeats * 40 if len(body) < 10_000 else repeats
        old = timed_ms(lambda: old_floor(head, body), runs)
        new = timed_ms(lambda: new_floor(head, body), runs)
        redact = timed_ms(lambda: dlp.redact_body(body, "application/json"), runs) if body.startswith("{") else None
        megabytes = len(body) / 1e6
        cells = [f"{old[0]:7.2f} ({old[1]:6.2f})", f"{new[0]:7.2f} ({new[1]:6.2f})",
                 f"{new[0] / megabytes:7.1f} ({new[1] / megabytes:6.1f})" if len(body) > 100_000 else "",
                 f"{redact[0]:7.2f} ({redact[1]:6.2f})" if redact else ""]
        print(f"{label:44} {len(body):9d} " + " ".join(f"{cell:>16}" for cell in cells))
        if label.startswith("1 MB Messages API body: screenshot"):
            goal = new
    assert goal is not None
    print(f"goal: a 1 MB Messages API body well under 50 ms: {goal[0]:.1f} ms wall, {goal[1]:.1f} ms CPU, "
          f"{verdict(goal[0] < 50)}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--scan-cost"]:
        scan_cost(int(sys.argv[2]) if len(sys.argv) > 2 else 7)
    else:
        main()
