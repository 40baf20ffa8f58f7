"""How many bottles this machine holds at once: start instances of one agent file one after another
until a count or a free-memory floor, and record for each the start time and the memory of its bundle
and guest. Everything is compared within this one run.

    python bench/density.py [--max 24] [--min-free-mib 2048] [--keep]

It uses the checkout's settings (BOTTLE_STATE_DIR, BOTTLE_CACHE_DIR: the same image cache as your
bottles, so the images are built once, before the first timed start) and an agent file of its own,
`bench-density`, in a temporary agents dir. Memory per container: RSS (the sum of its processes'
VmRSS, which counts shared pages once per process) and PSS (shared pages split between the processes
that map them, so the sum is what the container really adds). Every bottle is cleaned at the end
(`clean agent=bench-density all=1 purge=1`) unless --keep.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AGENT = "bench-density"
AGENT_FILE = """\
description: "density bench: a bottle with the full bundle, idle"
command: [sleep, infinity]
routes:
  - host: api.anthropic.com
    token: {env: ANTHROPIC_API_KEY, header: x-api-key}
supervise:
  tools: ["Bash(git push:*)"]
"""


def doit(env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise SystemExit(f"doit {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def container_pids(name: str) -> list[int]:
    out = subprocess.run(["docker", "top", name, "-eo", "pid"], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out[1:] if p.isdigit()]


def memory_kib(pids: list[int]) -> tuple[int, int]:
    """(RSS, PSS) of the processes, in KiB, from /proc (run as root to read other users' processes)."""
    rss = pss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                key, _, value = line.partition(":")
                if key == "Rss":
                    rss += int(value.split()[0])
                elif key == "Pss":
                    pss += int(value.split()[0])
        except OSError:
            continue
    return rss, pss


def mem_available_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


def per_process(name: str) -> list[tuple[str, int]]:
    """(command, PSS KiB) of each process in the container, largest first."""
    rows = []
    for pid in container_pids(name):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        rows.append((cmd[:90], memory_kib([pid])[1]))
    return sorted(rows, key=lambda r: -r[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max", type=int, default=24, help="stop after this many bottles (default 24)")
    parser.add_argument("--min-free-mib", type=int, default=2048, help="stop when MemAvailable falls below this")
    parser.add_argument("--keep", action="store_true", help="leave the bottles running")
    args = parser.parse_args()

    agents = Path(tempfile.mkdtemp(prefix="bench-density-agents-"))
    (agents / f"{AGENT}.yaml").write_text(AGENT_FILE)
    env = {**os.environ, "BOTTLE_AGENTS_DIR": str(agents), "ANTHROPIC_API_KEY": os.environ.get(
        "ANTHROPIC_API_KEY", "sk-ant-bench-not-a-real-key")}
    print("building the images once (not timed) ...", flush=True)
    doit(env, f"image_build:{AGENT}", "bundle_build", f"agent={AGENT}", "name=warm")
    rows = []
    free_before = mem_available_mib()
    try:
        for k in range(1, args.max + 1):
            if mem_available_mib() < args.min_free_mib:
                print(f"stopping: MemAvailable {mem_available_mib()} MiB < {args.min_free_mib} MiB")
                break
            name = f"d{k:02d}"
            began = time.monotonic()
            doit(env, "start", f"agent={AGENT}", f"name={name}", "command=true")
            seconds = time.monotonic() - began
            slug = f"{AGENT}-{name}"
            bundle = memory_kib(container_pids(f"bottle-{slug}-bundle"))
            guest = memory_kib(container_pids(f"bottle-{slug}-guest") + container_pids(f"bottle-{slug}-guestnet"))
            rows.append((k, seconds, bundle, guest, mem_available_mib()))
            print(f"bottle {k:2d}: start {seconds:5.1f} s   bundle RSS {bundle[0] / 1024:6.1f} MiB PSS "
                  f"{bundle[1] / 1024:6.1f} MiB   guest RSS {guest[0] / 1024:5.1f} MiB   "
                  f"MemAvailable {rows[-1][4]} MiB", flush=True)
        if rows:
            print(f"\nwhere one bundle's memory goes (PSS, bottle {rows[-1][0]}):")
            for cmd, kib in per_process(f"bottle-{AGENT}-d{rows[-1][0]:02d}-bundle"):
                print(f"  {kib / 1024:6.1f} MiB  {cmd}")
    finally:
        if not args.keep:
            doit(env, "clean", f"agent={AGENT}", "all=1", "purge=1", check=False)
    if not rows:
        return 1
    n = len(rows)
    starts = [r[1] for r in rows]
    rss = [r[2][0] / 1024 for r in rows]
    pss = [r[2][1] / 1024 for r in rows]
    third = max(1, n // 3)
    print(f"\n{n} bottles ran at once; MemAvailable {free_before} -> {rows[-1][4]} MiB "
          f"({(free_before - rows[-1][4]) / n:.0f} MiB per bottle, bundle + guest + kernel)")
    print(f"bundle RSS per bottle: median {statistics.median(rss):.1f} MiB (min {min(rss):.1f}, max {max(rss):.1f}); "
          f"PSS median {statistics.median(pss):.1f} MiB")
    print(f"guest (and fence holder) RSS per bottle: median {statistics.median(r[3][0] / 1024 for r in rows):.1f} MiB")
    print(f"start time: first {starts[0]:.1f} s, median of the first third {statistics.median(starts[:third]):.1f} s, "
          f"of the last third {statistics.median(starts[-third:]):.1f} s, last {starts[-1]:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
