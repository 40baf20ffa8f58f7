"""`doit start` to the agent command running (`true`), against the raw docker floor, in one run.

Cases: images cached with the bottle down, and the bottle already up. The floor makes the same
networks and containers with plain docker calls (no doit, no checks, no rendering).
Also counts docker build/save/push calls on an unchanged start (goal: 0).

    python bench/start_time.py [rounds]
"""

from __future__ import annotations

import subprocess
import sys

from common import BenchEnv, machine, summary, timed

from bottle_tasks.backends.docker import DockerBackend
from bottle_tasks.render import render

AGENT = "bench-start"


def sh(*argv: str, input: str | None = None) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, input=input)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} ... failed: {proc.stderr}")
    return proc.stdout


def floor_up(plan) -> None:
    """The same bottle with plain docker calls: 2 networks, bundle (healthy), fenced holder, guest, exec."""
    net, b, g = plan.network, plan.bundle, plan.guest
    sh("docker", "network", "create", "--internal", "--subnet", net.guest_side.subnet, "--gateway", net.guest_side.gateway, net.guest_side.name)
    sh("docker", "network", "create", "--subnet", net.outbound.subnet, "--gateway", net.outbound.gateway, net.outbound.name)
    env = sum((["--env", f"{k}={v}"] for k, v in b.env), [])
    mounts = sum((["--mount", m.docker_arg()] for m in b.mounts), [])
    sh("docker", "create", "--name", b.name, "--network", net.guest_side.name, "--ip", net.bundle_ip,
       "--cap-drop", "ALL", "--cap-add", "NET_BIND_SERVICE", "--cap-add", "SETUID", "--cap-add", "SETGID",
       "--cap-add", "DAC_OVERRIDE", *env, *mounts, plan.bundle_image.tag)
    sh("docker", "network", "connect", net.outbound.name, b.name)
    sh("docker", "start", b.name)
    while sh("docker", "inspect", "-f", "{{.State.Health.Status}}", b.name).strip() != "healthy":
        pass
    # The fenced namespace holder, then the guest in it (backends/docker.py's topology).
    holder = DockerBackend.netns_holder(plan)
    v4, v6 = render("guest-fence.rules.j2", plan), render("guest-fence6.rules.j2", plan)
    sh("docker", "create", "--name", holder, "--network", net.guest_side.name, "--ip", net.guest_ip,
       "--dns", net.bundle_ip, "--sysctl", "net.ipv6.conf.all.disable_ipv6=1", "--cap-drop", "ALL",
       "--cap-add", "NET_ADMIN", "--cap-add", "NET_RAW", "--env", f"V4={v4}", "--env", f"V6={v6}",
       "--entrypoint", "/bin/sh", plan.bundle_image.tag, "-c",
       'printf "%s\\n" "$V4" | iptables-restore && printf "%s\\n" "$V6" | ip6tables-restore && touch /run/f && exec sleep infinity')
    sh("docker", "start", holder)
    while subprocess.run(["docker", "exec", holder, "test", "-e", "/run/f"], capture_output=True).returncode != 0:
        pass
    sh("docker", "create", "--name", g.name, "--network", f"container:{holder}", "--cap-drop", "ALL",
       "--env-file", str(plan.guest.env_file.host_path),
       *sum((["--mount", m.docker_arg()] for m in g.mounts), []), plan.agent_image.tag, "sleep", "infinity")
    sh("docker", "start", g.name)
    sh("docker", "cp", str(plan.ca_cert), f"{g.name}:/usr/local/share/ca-certificates/claude-bottle.crt")
    sh("docker", "exec", "-u", "root", g.name, "update-ca-certificates")
    sh("docker", "exec", g.name, "true")


def floor_down(plan) -> None:
    subprocess.run(["docker", "rm", "-f", plan.guest.name, DockerBackend.netns_holder(plan), plan.bundle.name],
                   capture_output=True)
    subprocess.run(["docker", "network", "rm", plan.network.guest_side.name, plan.network.outbound.name], capture_output=True)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    bench = BenchEnv({AGENT: "routes: []\n"}, {"BOTTLE_PIPELOCK": "off"})
    try:
        print(f"machine: {machine()}")
        bench.doit("start", f"agent={AGENT}", "command=true")    # warm the image cache and render configs
        plan = bench.plan(AGENT)
        cold, warm, floor_cold, floor_warm = [], [], [], []
        for _ in range(rounds):
            bench.doit("clean", f"agent={AGENT}")
            # The floor reuses the rendered files and the CA; it does not time producing them.
            bench.doit("render:" + AGENT, "ca:" + AGENT, f"agent={AGENT}")
            floor_cold.append(timed(lambda: floor_up(plan)))
            floor_warm.append(timed(lambda: sh("docker", "exec", plan.guest.name, "true")))
            floor_down(plan)
            cold.append(timed(lambda: bench.doit("start", f"agent={AGENT}", "command=true")))
            mark = len(bench.docker_calls())
            warm.append(timed(lambda: bench.doit("start", f"agent={AGENT}", "command=true")))
            unchanged = bench.docker_calls()[mark:]
        heavy = [c for c in unchanged if c.split(" ", 1)[0] in ("build", "save", "push")]
        print(f"bottle down, images cached   doit start: {summary(cold)}")
        print(f"                             raw floor:  {summary(floor_cold)}")
        print(f"                             ratio (median): {sorted(cold)[len(cold)//2] / sorted(floor_cold)[len(floor_cold)//2]:.2f}x  (goal <= 1.3x)")
        print(f"bottle already up            doit start: {summary(warm)}  (goal < 0.5 s)")
        print(f"                             raw floor (docker exec true): {summary(floor_warm)}")
        print(f"unchanged start: {len(heavy)} docker build/save/push calls (goal 0); {len(unchanged)} docker calls in all:")
        for call in unchanged:
            print(f"    docker {call[:110]}")
    finally:
        floor_down(bench.plan(AGENT))
        bench.doit("clean", f"agent={AGENT}", "purge=1")
        bench.cleanup()


if __name__ == "__main__":
    main()
