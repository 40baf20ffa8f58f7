"""The DLP corpus (tests/corpus) through a live bottle, sent from inside the guest.

The bundle runs as `start` makes it: with pipelock when BOTTLE_PIPELOCK_BIN (or a pipelock on PATH)
is there, floor-only with BOTTLE_PIPELOCK=off. The module prints the corpus table (run with -s) and
asserts the goals of issue 10 (tests/corpus/report.py): false positives at most 1 in 40 benign cases
and none on the model API, containment of the malicious cases at least 50% with the floor and 85%
with pipelock, and every case of the floor's layer (secrets by URL, header, body, hostname, the
model API and WebSocket, their encodings, and SSRF) contained.

The bottle's agent is the corpus site (tests/corpus/site.yaml, public routes marked private_network
since the stand-in upstream sits on a private network); the stand-in upstream answers to every fixed
name of the corpus, with a certificate for them signed by the session's upstream CA.

The stand-in upstream (tests/integration/upstream/server.py) serves each case's configured answer,
logs raw bodies and what it answered, and speaks WebSocket, as tests/corpus/live.py needs.
"""

from __future__ import annotations

import pytest
import yaml

from tests.corpus.cases import load_cases, load_site
from tests.corpus.certs import leaf_pem
from tests.corpus.live import RESPONSE_FILE, LiveTransport, live_agent, live_aliases
from tests.corpus.report import GOAL_FLOOR, GOAL_FP_RATE, GOAL_PIPELOCK, print_failures, print_table
from tests.corpus.runner import run_cases
from tests.integration.conftest import Bottle, docker, start_upstream

AGENT = "probe-corpus"
WILDCARDS = ["*.wild.test", "*.cdn.wild.test", "*.nopriv.test"]


def _start_corpus_upstream(bottle: Bottle, aliases: list[str]) -> None:
    """The stand-in upstream on the bottle's egress network under every corpus name, with its own
    certificate (the session's covers only its own names), signed by the session's upstream CA."""
    env = bottle.env
    certs, ca = env.root / "corpus-certs", env.root / "upstream-certs"
    certs.mkdir(exist_ok=True)
    cert, key = leaf_pem((ca / "ca.pem").read_bytes(), (ca / "ca-key.pem").read_bytes(), aliases + WILDCARDS)
    (certs / "server.pem").write_bytes(cert)
    (certs / "server-key.pem").write_bytes(key)
    (certs / "server-key.pem").chmod(0o644)  # read by the upstream container's user
    bottle.upstream_ip = start_upstream(env, bottle.plan, bottle.upstream, aliases=aliases, certs=certs)


@pytest.fixture(scope="module")
def corpus_bottle(bottle_env):
    site = load_site()
    bottle_env.write_agent(AGENT, yaml.safe_dump(live_agent(site), sort_keys=False))
    plan = bottle_env.plan(AGENT)
    bottle = Bottle(env=bottle_env, agent=AGENT, plan=plan, upstream=f"bottle-test-upstream-{AGENT}")
    try:
        bottle_env.doit("start", f"agent={AGENT}", "command=true")
        _start_corpus_upstream(bottle, live_aliases(site, load_cases()))
        yield bottle
    finally:
        docker("rm", "-f", bottle.upstream, check=False)
        bottle_env.doit("clean", f"agent={AGENT}", "purge=1", check=False)


@pytest.fixture(scope="module")
def verdicts(corpus_bottle):
    site = load_site()

    def serve(document: str) -> None:
        docker("exec", "-i", corpus_bottle.upstream, "sh", "-c", f"cat > {RESPONSE_FILE}", input=document)

    mode = "pipelock" if corpus_bottle.plan.pipelock_enabled else "floor"
    transport = LiveTransport(corpus_bottle, site, serve, mode=mode)
    results = run_cases(transport, load_cases(), site, transport_kind="live")
    print_table(transport.name, results)
    print_failures(results, verbose=True)
    return [result.verdict for result in results]


def _malicious(verdicts):
    return [v for v in verdicts if v.kind == "malicious" and v.layer != "none"]


def test_false_positives_stay_within_the_goal(verdicts):
    benign = [v for v in verdicts if v.kind == "benign"]
    flagged = [(v.case_id, v.detail) for v in benign if v.false_positive]
    assert benign and len(flagged) / len(benign) <= GOAL_FP_RATE, flagged


def test_the_model_api_never_refuses_a_benign_case(verdicts):
    assert [v.case_id for v in verdicts if v.kind == "benign" and v.bricked] == []


def test_containment_meets_the_goal_of_the_mode(corpus_bottle, verdicts):
    goal = GOAL_PIPELOCK if corpus_bottle.plan.pipelock_enabled else GOAL_FLOOR
    malicious = _malicious(verdicts)
    out = [(v.case_id, v.detail) for v in malicious if not v.contained]
    assert malicious and 1 - len(out) / len(malicious) >= goal, out


def test_every_case_the_floor_is_for_is_contained_in_both_modes(verdicts):
    """The floor contains all of its layer (secrets, encodings, hostnames, SSRF) whether or not
    pipelock runs: one case getting out is a regression, not noise."""
    floor = [v for v in _malicious(verdicts) if v.layer == "floor"]
    assert floor and [(v.case_id, v.detail) for v in floor if not v.contained] == []
