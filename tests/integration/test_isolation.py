"""Invariant 1 and 2: from inside the guest, nothing answers but the bundle's front door, and
through it only declared routes. Every blocked probe has a positive control showing the target
really listens, so a probe cannot pass by aiming at nothing."""

from __future__ import annotations

import socket

from bottle_tasks.bundle_plan import EGRESS_PORT
from tests.integration.conftest import docker
from tests.integration.probes import Probe, run_probes


def _docker0_gateway() -> str:
    return docker("network", "inspect", "-f", "{{(index .IPAM.Config 0).Gateway}}", "bridge").stdout.strip()


def isolation_probes(bottle, neighbour, host_listener: int) -> list[Probe]:
    """What the guest must not reach, on either backend. Each target is one the tests created."""
    plan, net = bottle.plan, bottle.plan.network
    up = bottle.upstream_ip
    proxy = plan.bundle.egress_url
    b_net = neighbour.plan.network
    probes = [
        Probe("upstream ip tcp/443 direct", "tcp", (up, 443)),
        Probe("upstream ip tcp/80 direct", "tcp", (up, 80)),
        Probe("upstream ip tcp/7000 direct", "tcp", (up, 7000)),
        Probe("upstream by name, no proxy", "http", ("http://upstream.test/", None)),
        Probe("upstream udp/5353", "udp", (up, 5353)),
        Probe("internal network gateway (host)", "tcp", (net.guest_side.gateway, host_listener)),
        Probe("egress network gateway (host)", "tcp", (net.outbound.gateway, host_listener)),
        Probe("docker0 gateway (host)", "tcp", (_docker0_gateway(), host_listener)),
        Probe("host gateway udp/53", "udp", (net.guest_side.gateway, 53)),
        Probe("loopback tcp", "tcp", ("127.0.0.1", host_listener)),
        Probe("bundle pipelock port", "tcp", (net.bundle_ip, 8888)),
        Probe("bundle scan api port", "tcp", (net.bundle_ip, 8889)),
        Probe("bundle other port", "tcp", (net.bundle_ip, next(p for p in range(EGRESS_PORT + 1, EGRESS_PORT + 100)
                                                                if ("tcp", p) not in plan.bundle.guest_ports))),
        Probe("other bottle's bundle", "tcp", (b_net.bundle_ip, EGRESS_PORT)),
        Probe("metadata 169.254.169.254 direct", "tcp", ("169.254.169.254", 80)),
        Probe("metadata through the proxy", "http", ("http://169.254.169.254/latest/meta-data/", proxy)),
        Probe("dns: outside name", "resolve", ("example.com",)),
        Probe("dns: upstream alias", "resolve", ("upstream.test",)),
        Probe("dns: sink answers nothing", "resolve", ("api.anthropic.com",)),
        Probe("ipv6 link-local", "tcp6", ("fe80::1%eth0", 80)),
        Probe("ipv6 loopback to host port", "tcp6", ("::1", host_listener)),
        Probe("CONNECT to an unrouted host", "http", ("https://unrouted.test/", proxy)),
        Probe("plain http to an unrouted host", "http", ("http://unrouted.test/", proxy)),
        Probe("proxy to an IP literal", "http", (f"http://{up}/", proxy)),
        Probe("no-SNI TLS through the proxy", "tls_via_proxy", (net.bundle_ip, EGRESS_PORT, "upstream.test:443", None)),
        Probe("SNI differs from CONNECT host", "tls_via_proxy", (net.bundle_ip, EGRESS_PORT, "upstream.test:443", "unrouted.test")),
        Probe("wildcard route: apex not included", "http", ("http://wild.test/", proxy)),
        Probe("wildcard route: method not allowed", "http", ("http://sub.wild.test/", proxy, {}, "x=1")),
    ]
    if len(net.bridges) > 1:     # docker: the bundle's second leg, and the neighbour's guest
        bundle_egress_ip = docker("inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{net.outbound.name}").IPAddress}}}}',
                                  plan.bundle.name).stdout.strip()
        probes += [Probe("bundle egress-side address", "tcp", (bundle_egress_ip, EGRESS_PORT)),
                   Probe("other bottle's guest", "tcp", (b_net.guest_ip, 22))]
    return probes


def assert_only_the_front_door(bottle, neighbour, host_listener: int) -> None:
    results = run_probes(bottle, isolation_probes(bottle, neighbour, host_listener))
    reached = {name: r["detail"] for name, r in results.items() if r["reached"]}
    assert not reached, f"the guest reached what it must not: {reached}"
    assert len(results) >= 15

    # NO_PROXY tricks: the client skips the proxy, and the network still holds.
    up = bottle.upstream_ip
    tricks = run_probes(bottle, [
        Probe("NO_PROXY=* to upstream by name", "http", ("https://upstream.test/", None)),
        Probe("NO_PROXY=* to upstream ip", "http", (f"http://{up}/", None)),
    ], env={"NO_PROXY": "*", "no_proxy": "*"})
    assert not any(r["reached"] for r in tricks.values()), tricks


def test_guest_reaches_only_the_front_door(bottle_a, bottle_b, host_listener):
    assert_only_the_front_door(bottle_a, bottle_b, host_listener)


def test_blocked_requests_get_a_403_that_names_the_reason(bottle_a):
    proxy = bottle_a.plan.bundle.egress_url
    for url, reason in (("https://unrouted.test/", "route_not_allowed"), ("http://unrouted.test/", "route_not_allowed"),
                        ("http://wild.test/", "route_not_allowed")):
        proc = bottle_a.exec("curl", "-sS", "-m", "10", "-x", proxy, "-o", "/dev/null", "-D", "-", url)
        text = proc.stdout + proc.stderr
        assert "403" in text and reason in text, (url, text)
    proc = bottle_a.exec("curl", "-sS", "-m", "10", "-x", proxy, "-X", "POST", "-d", "x", "http://sub.wild.test/")
    assert "method_not_allowed" in proc.stdout, proc.stdout + proc.stderr


def test_positive_controls_the_probed_targets_really_listen(bottle_a, host_listener):
    assert_probed_targets_listen(bottle_a, host_listener)


def assert_probed_targets_listen(bottle_a, host_listener: int) -> None:
    """The same targets answer from a container on the egress network and from the host."""
    net = bottle_a.plan.network
    control = f"probe-control-{bottle_a.agent}"
    docker("run", "-d", "--rm", "--name", control, "--network", net.outbound.name, "--entrypoint", "sleep",
           "claude-bottle-test/upstream:latest", "60")
    try:
        results = run_probes(control, [
            Probe("upstream tcp/443", "tcp", (bottle_a.upstream_ip, 443)),
            Probe("upstream udp/5353", "udp", (bottle_a.upstream_ip, 5353)),
            Probe("metadata listener", "tcp", ("169.254.169.254", 80)),
            Probe("egress gateway host listener", "tcp", (net.outbound.gateway, host_listener)),
        ], user="root")
    finally:
        docker("rm", "-f", control, check=False)
    assert all(r["reached"] for r in results.values()), results
    with socket.create_connection((net.guest_side.gateway, host_listener), timeout=3) as s:
        assert s.recv(64).startswith(b"host-listener")


def test_routed_https_works_through_the_chain(bottle_a):
    assert_routed_https_works(bottle_a)


def assert_routed_https_works(bottle_a) -> None:
    """The positive twin of the probes: a routed host answers, and with SNI the same TLS probe succeeds."""
    proc = bottle_a.exec("curl", "-sS", "-m", "10", "https://upstream.test/hello")
    assert proc.returncode == 0, proc.stderr
    assert '"path": "/hello"' in proc.stdout
    net = bottle_a.plan.network
    ok = run_probes(bottle_a, [
        Probe("TLS with SNI through the proxy", "tls_via_proxy", (net.bundle_ip, EGRESS_PORT, "upstream.test:443", "upstream.test")),
        Probe("python urllib through the proxy", "http", ("https://upstream.test/py", bottle_a.plan.bundle.egress_url)),
    ])
    assert all(r["reached"] for r in ok.values()), ok
