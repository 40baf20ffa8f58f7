"""`doit start` on the smolmachines backend against the docker backend, same agent, same run.

Cases, each with the images and the pack already built:
  cold  the bottle is down: bridge, bundle, machine create + start, the two fence checks, provisioning
  up    the bottle is up and unchanged: what `start` costs before the agent runs (goal: no create, no build)

The guest is the fake smolvm (a container fenced from outside), so the smolmachines numbers measure
this project's orchestration (the state-DB check, the canary, exec/cp through smolvm), not a microVM's
boot. Also prints where the cold start's time goes, from the smolvm calls it made.

    python bench/smol_start.py [rounds] [-v]    (-v lists the smolvm calls of a cold start)
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from common import ROOT, BenchEnv, machine, summary, timed
from smol_pipeline import crane_path

from bottle_tasks.backends.smolmachines import bridge_name as smol_bridge_name

SMOL, DOCKER = "bench-smol-start", "bench-docker-start"
AGENT_BODY = "routes: []\nprompt: a bench agent\n"
FAKE_SMOLVM = ROOT / "tests" / "fakes" / "smolvm"


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 3
    crane = crane_path()
    work = Path(tempfile.mkdtemp(prefix="bench-smol-start-"))
    smol_log = work / "smolvm-argv.log"
    shim = work / "smolvm"
    # One line per call: a multi-line argument (a python -c script) is folded onto it.
    shim.write_text(f'#!/bin/sh\nprintf "%s" "$*" | tr "\\n" " " >> "{smol_log}"\necho >> "{smol_log}"\nexec {sys.executable} {FAKE_SMOLVM} "$@"\n')
    shim.chmod(0o755)
    extra = {"BOTTLE_PIPELOCK": "off", "BOTTLE_SMOLVM_BIN": str(shim), "BOTTLE_CRANE_BIN": crane, "CRANE": crane,
             "SMOLVM_DATA_DIR": str(work / "smolvm-data"), "SMOLVM_FAKE_NETWORK": smol_bridge_name(SMOL)}
    bench = BenchEnv({SMOL: "backend: smolmachines\n" + AGENT_BODY, DOCKER: AGENT_BODY}, extra)
    try:
        print(f"machine: {machine()}")
        for agent in (SMOL, DOCKER):       # not timed: images, pack, CA
            bench.doit("start", f"agent={agent}", "command=true")
            bench.doit("clean", f"agent={agent}")
        results: dict[str, dict[str, list[float]]] = {a: {"cold": [], "up": []} for a in (SMOL, DOCKER)}
        for _ in range(rounds):
            for agent in (SMOL, DOCKER):
                results[agent]["cold"].append(timed(lambda: bench.doit("start", f"agent={agent}", "command=true")))
                results[agent]["up"].append(timed(lambda: bench.doit("start", f"agent={agent}", "command=true")))
                bench.doit("clean", f"agent={agent}")
        # One more cold and up start, for the call counts.
        calls = {}
        for case in ("cold", "up"):
            mark, docker_mark = len(smol_log.read_text().splitlines()), len(bench.docker_calls())
            bench.doit("start", f"agent={SMOL}", "command=true")
            calls[case] = (smol_log.read_text().splitlines()[mark:], bench.docker_calls()[docker_mark:])
        up_smol, up_docker = calls["up"]
        for case in ("cold", "up"):
            print(f"{case:4}  smolmachines (fake): {summary(results[SMOL][case])}")
            print(f"      docker:              {summary(results[DOCKER][case])}")
        cold_smol, cold_docker = calls["cold"]
        print(f"cold smolmachines start: {len(cold_smol)} smolvm calls, {len(cold_docker)} docker calls "
              "(the fake turns each smolvm call into a python start plus docker calls of its own)")
        if "-v" in sys.argv:
            print("\n".join(f"  smolvm {c[:110]}" for c in cold_smol))
        heavy = [c for c in up_smol if c.startswith(("machine create", "machine delete", "pack create"))]
        heavy += [c for c in up_docker if c.split(" ", 1)[0] in ("build", "save", "create", "run")]
        print(f"unchanged smolmachines start: {len(up_smol)} smolvm calls ({', '.join(sorted(set(c.split(' --')[0] for c in up_smol)))}), "
              f"{len(up_docker)} docker calls, {len(heavy)} create/build/pack calls (goal 0)")
    finally:
        for agent in (SMOL, DOCKER):
            bench.doit("clean", f"agent={agent}", "purge=1")
        bench.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
