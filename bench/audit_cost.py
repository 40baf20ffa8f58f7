"""What the audit stream costs egress per request, in one run: the same allowed request through the egress
addon (mitmproxy test flows, a fake resolver, nothing dialled) with its audit writer going nowhere, and
with it writing through a pipe to a sink thread appending to a file, as in the bundle.

    python bench/audit_cost.py [requests]
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import machine  # noqa: E402

from bottle_tasks.sidecars import audit, egress  # noqa: E402
from tests.unit.test_egress import SECRETS, fake_resolve, make_config, tunnel_flow  # noqa: E402


def per_request_us(writer: audit.AuditWriter, count: int) -> list[float]:
    addon = egress.Egress(make_config(), SECRETS, emit=lambda record: None, resolve=fake_resolve, audit=writer)
    flows = [tunnel_flow(addon, "GET", "www.example.com", f"/page/{n}") for n in range(count)]

    async def run() -> list[float]:
        samples = []
        for flow in flows:
            started = time.perf_counter()
            await addon.request(flow)
            samples.append((time.perf_counter() - started) * 1e6)
            assert flow.response is None
        return samples

    return asyncio.run(run())


def us(samples: list[float]) -> str:
    ordered = sorted(samples)
    return f"median {ordered[len(ordered) // 2]:7.1f} µs  p90 {ordered[int(len(ordered) * 0.9)]:7.1f} µs"


def emit_us(writer: audit.AuditWriter, count: int) -> list[float]:
    samples = []
    for n in range(count):
        started = time.perf_counter()
        writer.emit("request", "allow", method="GET", host="www.example.com", port=443, path=f"/page/{n}",
                    request_id=f"{n:016x}")
        samples.append((time.perf_counter() - started) * 1e6)
    return samples


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    print(f"# {machine()}; {count} requests per case")
    with tempfile.TemporaryDirectory() as directory:
        read_end, write_end = audit.make_pipe()
        sink = threading.Thread(target=audit.sink, args=(read_end, audit.AuditFile(directory), "bench"), daemon=True)
        sink.start()
        piped = audit.AuditWriter("egress", fd=write_end)
        nowhere = audit.AuditWriter("egress")
        print("one audit line (build, scrub, DLP-redact, write):")
        print(f"  built, written nowhere:           {us(emit_us(nowhere, count))}")
        print(f"  through the pipe to the sink:     {us(emit_us(piped, count))}")
        print(f"  appended to the file directly:    {us(emit_us(audit.AuditWriter('egress', directory=Path(directory) / 'd'), count))}")
        # The whole request hook, with and without the stream, in alternating blocks so drift hits both.
        off, on = [], []
        for _ in range(10):
            off += per_request_us(nowhere, count // 10)
            on += per_request_us(piped, count // 10)
        time.sleep(0.2)
        lines = sum(1 for _ in audit.read_records(directory))
    print("egress's request hook, an allowed request (alternating blocks):")
    print(f"  audit off:                        {us(off)}")
    print(f"  audit on (pipe):                  {us(on)}")
    print(f"  lines that reached the file: {lines} (of {count + count // 10 * 10} sent through the pipe)")


if __name__ == "__main__":
    main()
