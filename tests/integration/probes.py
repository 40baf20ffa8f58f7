"""Network probes that run *inside* a container (python3 -c), returning one JSON result per probe.

Each probe reports `reached: true` only when the far side answered: a TCP connect succeeded, a UDP
datagram got a reply, a name resolved, a TLS handshake completed, an HTTP response came back.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass

PROBE_SCRIPT = r'''
import json, os, socket, ssl, sys, urllib.request
results = []
def record(name, fn):
    try:
        detail = fn()
        results.append({"name": name, "reached": True, "detail": str(detail)[:300]})
    except Exception as exc:
        results.append({"name": name, "reached": False, "detail": f"{type(exc).__name__}: {exc}"[:300]})
def tcp(host, port, family=socket.AF_INET):
    s = socket.socket(family, socket.SOCK_STREAM); s.settimeout(3)
    try:
        s.connect((host, port)); return "connected"
    finally:
        s.close()
def udp(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
    try:
        s.sendto(b"probe", (host, port)); data, _ = s.recvfrom(2048); return data
    finally:
        s.close()
def resolve(name):
    return socket.getaddrinfo(name, 443, proto=socket.IPPROTO_TCP)[0][4][0]
def http(url, proxy=None, headers=None, data=None):
    handler = urllib.request.ProxyHandler({"http": proxy, "https": proxy} if proxy else {})
    opener = urllib.request.build_opener(handler)
    req = urllib.request.Request(url, headers=headers or {}, data=data.encode() if data is not None else None)
    with opener.open(req, timeout=5) as resp:
        return resp.status, resp.read(200)
def tls_via_proxy(proxy_host, proxy_port, target, sni):
    s = socket.create_connection((proxy_host, proxy_port), timeout=5)
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = s.recv(4096)
    if b" 200 " not in head.split(b"\r\n")[0]:
        raise ConnectionError(head.split(b"\r\n")[0].decode())
    ctx = ssl.create_default_context(); ctx.check_hostname = False
    t = ctx.wrap_socket(s, server_hostname=sni)
    t.sendall(f"GET / HTTP/1.1\r\nHost: {target.split(':')[0]}\r\nConnection: close\r\n\r\n".encode())
    data = t.recv(200)
    if not data:
        raise ConnectionError("closed after handshake")
    return data
KINDS = {"tcp": tcp, "tcp6": lambda h, p: tcp(h, p, socket.AF_INET6), "udp": udp, "resolve": resolve,
         "http": http, "tls_via_proxy": tls_via_proxy}
for name, kind, args in json.loads(sys.argv[1]):
    record(name, lambda: KINDS[kind](*args))
print(json.dumps(results))
'''


@dataclass(frozen=True)
class Probe:
    name: str
    kind: str
    args: tuple

    def as_json(self):
        return [self.name, self.kind, list(self.args)]


def run_probes(target, probes: list[Probe], *, user: str = "agent", env: dict | None = None) -> dict[str, dict]:
    """target: a container name (docker exec), or a Bottle, whose backend's own exec runs the script."""
    script = ["python3", "-c", PROBE_SCRIPT, json.dumps([p.as_json() for p in probes])]
    if isinstance(target, str):
        env_args = [arg for key, value in (env or {}).items() for arg in ("-e", f"{key}={value}")]
        argv = ["docker", "exec", "-u", user, *env_args, target, *script]
    else:
        argv = target.exec_argv(script, user=user, env=env)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60 + 6 * len(probes), stdin=subprocess.DEVNULL,
                         env=None if isinstance(target, str) else target.env.test_env)
    assert out.returncode == 0, out.stderr
    return {r["name"]: r for r in json.loads(out.stdout.strip().splitlines()[-1])}
