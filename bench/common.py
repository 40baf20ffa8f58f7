"""Shared setup for the benchmarks: an isolated state/cache, a bench agent, and a docker shim that
counts the docker subcommands doit runs."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bottle_tasks.plan import make_plan  # noqa: E402
from bottle_tasks.settings import Settings  # noqa: E402
from bottle_tasks.spec import load_spec  # noqa: E402


class BenchEnv:
    def __init__(self, agent_yaml: dict[str, str], extra_env: dict[str, str] | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="bottle-bench-"))
        agents = self.root / "agents"
        agents.mkdir()
        for name, text in agent_yaml.items():
            (agents / f"{name}.yaml").write_text(text)
        shim = self.root / "shim"
        shim.mkdir()
        self.argv_log = self.root / "docker-argv.log"
        real = shutil.which("docker")
        (shim / "docker").write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{self.argv_log}"\nexec "{real}" "$@"\n')
        (shim / "docker").chmod(0o755)
        self.env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}", "BOTTLE_AGENTS_DIR": str(agents),
                    "BOTTLE_STATE_DIR": str(self.root / "state"),
                    # Share the user's image digests so a cached image is not rebuilt for the bench.
                    "BOTTLE_CACHE_DIR": os.environ.get("BOTTLE_CACHE_DIR", str(Path.home() / ".cache/claude-bottle")),
                    **(extra_env or {})}

    def doit(self, *args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), *args], cwd=ROOT,
                              env=self.env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"doit {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def plan(self, agent: str):
        return make_plan(load_spec(Path(self.env["BOTTLE_AGENTS_DIR"]) / f"{agent}.yaml"), Settings.from_env(self.env))

    def docker_calls(self) -> list[str]:
        return self.argv_log.read_text().splitlines() if self.argv_log.exists() else []

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summary(samples: list[float]) -> str:
    return f"median {statistics.median(samples):6.2f}s  min {min(samples):6.2f}s  max {max(samples):6.2f}s  (n={len(samples)})"


def machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = next((int(l.split()[1]) // 1024 // 1024 for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
    engine = subprocess.run(["docker", "version", "-f", "{{.Server.Version}}"], capture_output=True, text=True).stdout.strip()
    return f"{os.cpu_count()} cores ({cpu}), {mem} GiB, Docker Engine {engine}"
