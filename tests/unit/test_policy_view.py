"""`doit policy show|promote|suggest`: what it prints is routes the agent file loader accepts, narrowed to
what was seen, and nothing the agent chose can escape its YAML string or drive the terminal."""

from __future__ import annotations

import fnmatch
import textwrap
from pathlib import Path

import pytest

from bottle_tasks import policy_view
from bottle_tasks.cli import main
from bottle_tasks.errors import BottleError
from bottle_tasks.policy_view import narrow_paths
from bottle_tasks.sidecars.audit import MAX_FIELD_CHARS, AuditWriter, audit_record, read_records
from bottle_tasks.sidecars.overlay import Overlay, approve_route, overlay_path, read_overlay
from bottle_tasks.spec import load_spec
from bottle_tasks.tasks import policy as policy_tasks
from tests.unit.test_overlay import plan_for

HOSTILE_PATH = '/x"\n- host: evil.example.com\n  token: {env: HOME, header: x}\n\x1b[2J\u202e\'#]'


def learned(host: str, path: str | None = "/", method: str = "GET", port: int = 443, **fields) -> dict:
    return audit_record("egress", "request", "learn", host=host, method=method, port=port, path=path or "", **fields)


def paths_of(*paths: str) -> dict[str, bool]:
    return dict.fromkeys(paths, False)


def load_routes_snippet(tmp_path: Path, snippet: str):
    """The snippet pasted under routes: of an agent file, as the agent-file loader reads it."""
    agent = tmp_path / "pasted.yaml"
    agent.write_text("routes:\n  - host: api.anthropic.com\n" + snippet)
    return load_spec(agent).routes[1:]


def suggestion(records, routed=()) -> str:
    return policy_view.suggest("agent=demo", Path("/agents/demo.yaml"), Path("/state/demo/audit"), records, routed)


# --------------------------------------------------------------------------- the path rule


def test_a_few_paths_are_listed_exactly_and_match_only_themselves() -> None:
    seen = paths_of("/v1/a", "/v1/b", "/status", "/a[1]*?")
    globs = narrow_paths(seen)
    assert globs == ("/a[[]1][*][?]", "/status", "/v1/a", "/v1/b")
    assert fnmatch.fnmatchcase("/a[1]*?", "/a[[]1][*][?]")
    assert not fnmatch.fnmatchcase("/a1xx", "/a[[]1][*][?]")


def test_many_paths_are_grouped_by_first_segment_under_their_longest_common_directory() -> None:
    seen = paths_of("/v1/users/1", "/v1/users/2", "/v1/users/3/keys", "/v2", "/v2/x/1", "/v2/x/2",
                    "/health", "/static/app.js", "/static/css/site.css")
    globs = narrow_paths(seen)
    assert globs == ("/health", "/static/*", "/v1/users/*", "/v2", "/v2/x/*")
    assert all(any(fnmatch.fnmatchcase(path, glob) for glob in globs) for path in seen)
    for unseen in ("/v1/orgs/1", "/v2beta", "/admin", "/"):
        assert not any(fnmatch.fnmatchcase(unseen, glob) for glob in globs)


def test_only_paths_with_nothing_in_common_widen_to_any_path() -> None:
    assert narrow_paths(paths_of(*(f"/{name}.js" for name in "abcdefghij"))) == ("/*",)
    mixed = narrow_paths(paths_of(*(f"/{name}.js" for name in "abcdefghi"), "/api/1", "/api/2"))
    assert "/*" not in mixed and "/api/*" in mixed and "/a.js" in mixed


def test_a_path_the_audit_line_cut_short_becomes_a_prefix_glob() -> None:
    long_path = "/files/" + "a" * 600
    (record,) = policy_view.learned_requests([learned("cdn.example.com", long_path)])
    assert record.path_cut and len(record.path) == MAX_FIELD_CHARS["path"] - 3
    (glob,) = narrow_paths({record.path: record.path_cut})
    assert glob.endswith("*") and fnmatch.fnmatchcase(long_path, glob)


# --------------------------------------------------------------------------- suggest


def test_suggest_names_methods_ports_and_says_what_it_read(tmp_path: Path) -> None:
    records = [learned("api.example.org", "/v1/a?token=x", "GET", ts="2026-01-01T00:00:00.000Z"),
               learned("api.example.org", "/v1/b", "post"),
               learned("api.example.org", "/v1/b", "GET", port=8443),
               learned("plain.example.org", "/", "HEAD"),
               audit_record("egress", "request", "allow", host="allowed.example.org", path="/"),  # not learned
               audit_record("dns", "request", "learn", host="dns.example.org")]
    text = suggestion(records)
    assert "# Suggested for agent=demo from 4 learned requests since 2026-01-01T00:00:00.000Z" in text
    routes = load_routes_snippet(tmp_path, text)
    assert [(r.host, r.methods, r.ports, r.paths) for r in routes] == [
        ("api.example.org", ("GET", "POST"), (443, 8443), ("/v1/a", "/v1/b")),
        ("plain.example.org", ("HEAD",), (443,), ("/",)),
    ]


def test_suggest_leaves_methods_open_when_the_agent_file_cannot_name_one(tmp_path: Path) -> None:
    text = suggestion([learned("dav.example.org", "/f", "PROPFIND"), learned("dav.example.org", "/f", "GET")])
    (route,) = load_routes_snippet(tmp_path, text)
    assert route.methods == () and "cannot name PROPFIND" in text


def test_suggest_leaves_out_hosts_a_route_names_now_and_names_that_cannot_be_routed(tmp_path: Path) -> None:
    from bottle_tasks.contract import Route

    text = suggestion([learned("docs.example.com"), learned("new.example.com"), learned("bad_name.example.com")],
                      routed=(Route("docs.example.com"),))
    assert [r.host for r in load_routes_snippet(tmp_path, text)] == ["new.example.com"]
    assert "left out docs.example.com: a route names it now" in text
    assert "left out bad_name.example.com" in text


def test_a_hostile_path_stays_one_inert_string(tmp_path: Path) -> None:
    text = suggestion([learned("up.example.org", HOSTILE_PATH, "POST"), learned("up.example.org", "/ok\U0001F600")])
    assert "\x1b" not in text and "\u202e" not in text
    yaml_lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert [line.split(":")[0] for line in yaml_lines] == ["  - host", "    ports", "    methods", "    paths"]
    (route,) = load_routes_snippet(tmp_path, text)
    assert route.host == "up.example.org" and route.token is None
    as_audited = HOSTILE_PATH.split("#")[0]   # the audit line, like egress's match, drops the fragment
    assert sorted(route.paths) == sorted(narrow_paths(paths_of(as_audited, "/ok\U0001F600")))
    assert route.allows_path(HOSTILE_PATH) and route.allows_path("/ok\U0001F600")
    assert not route.allows_path("/x") and not route.allows_path("/ok")


def test_a_hostile_host_or_timestamp_cannot_break_out_of_a_comment(tmp_path: Path) -> None:
    text = suggestion([learned("x.example\n- host: evil.example.com", ts="t\n- host: evil2.example.com\n\x1b]0;x\x07")])
    assert "\x1b" not in text and "\x07" not in text
    assert load_routes_snippet(tmp_path, text) == ()


def test_no_learned_requests_says_how_to_get_some() -> None:
    text = suggestion([audit_record("egress", "request", "block", host="x.example.com")])
    assert text.startswith("no learned requests in the audit stream /state/demo/audit")
    assert "network: {unknown_hosts: learn}" in text


# --------------------------------------------------------------------------- promote and show


def test_promote_prints_the_overlay_as_routes_the_agent_file_accepts(tmp_path: Path) -> None:
    overlay = overlay_path(tmp_path / "policy")
    approve_route(overlay, "docs.example.com", 443, request_id="egress-request-1", by="alice\n\x1b[31m",
                  reason="the docs\nroutes: []")
    approve_route(overlay, "docs.example.com", 8443, request_id="egress-request-2", by="bob")
    approve_route(overlay, "pypi.example.org", 443, request_id="egress-request-3", by="bob")
    text = policy_view.promote("agent=demo", Path("/agents/demo.yaml"), overlay, read_overlay(overlay))
    assert "\x1b" not in text
    assert [(r.host, r.ports, r.methods, r.paths, r.token) for r in load_routes_snippet(tmp_path, text)] == [
        ("docs.example.com", (443, 8443), (), (), None), ("pypi.example.org", (443,), (), (), None)]
    assert "port 8443 approved by bob" in text and "(request egress-request-2)" in text


def test_promote_with_an_empty_overlay_says_so() -> None:
    text = policy_view.promote("agent=demo", Path("/a/demo.yaml"), Path("/s/overlay.json"), Overlay())
    assert "has no routes, so there is nothing to promote" in text and "scope=always" in text


def test_show_lists_both_with_their_keys_and_who_approved(tmp_path: Path, capsys) -> None:
    plan = plan_for(tmp_path, "network: {unknown_hosts: ask}")
    approve_route(overlay_path(plan.policy_dir), "docs.example.com", 443, request_id="egress-request-1",
                  by="alice", reason="docs\x1b[2J")
    policy_tasks.policy(plan, ["show"])
    out = capsys.readouterr().out
    assert "routes[0]  api.anthropic.com  ports 443, 80" in out
    assert "routes[0]  docs.example.com  ports 443  methods any  paths any" in out
    assert "port 443 approved by alice at " in out and "(request egress-request-1): docs\\x1b[2J" in out
    assert "\x1b" not in out


def test_an_unknown_or_missing_sub_command_lists_the_three(tmp_path: Path) -> None:
    plan = plan_for(tmp_path, "")
    for args in ([], ["bogus"], ["show", "extra"]):
        with pytest.raises(BottleError, match=r"doit policy show\|promote\|suggest agent=asker"):
            policy_tasks.policy(plan, args)


def test_doit_policy_suggest_reads_the_bottles_audit_stream(tmp_path: Path, monkeypatch, capsys) -> None:
    agents = tmp_path / "agents"
    agents.mkdir()
    (agents / "learner.yaml").write_text(textwrap.dedent("""
        routes:
          - host: api.anthropic.com
        network: {unknown_hosts: learn}
    """))
    for name, value in (("BOTTLE_AGENTS_DIR", agents), ("BOTTLE_STATE_DIR", tmp_path / "state"),
                        ("BOTTLE_CACHE_DIR", tmp_path / "cache"), ("HOME", tmp_path)):
        monkeypatch.setenv(name, str(value))
    AuditWriter("egress", directory=tmp_path / "state" / "learner" / "audit").emit(
        "request", "learn", method="GET", host="pkg.example.org", port=443, path="/simple/x/")
    assert len(list(read_records(tmp_path / "state" / "learner" / "audit"))) == 1
    assert main(["policy", "suggest", "agent=learner"]) == 0   # the sub-command arrives as doit's pos_arg
    out = capsys.readouterr().out
    assert '- host: "pkg.example.org"' in out and 'paths: ["/simple/x/"]' in out
    assert main(["policy", "agent=learner"]) != 0
