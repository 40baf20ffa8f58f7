"""Health verdicts from status.json: fresh, and every selected daemon running and ready."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from bottle_tasks.sidecars.health import bundle_health, main

NOW = 1_000_000.0


def daemon(running: bool = True, ready: bool = True, **extra: Any) -> dict[str, Any]:
    return {"pid": 42 if running else None, "running": running, "ready": ready,
            "restarts": 0, "last_exit_code": None, **extra}


def status(updated_at: float = NOW, **daemons: dict[str, Any]) -> dict[str, Any]:
    return {"updated_at": updated_at, "init_pid": 1, "stopping": False,
            "selected": list(daemons), "daemons": daemons}


def test_all_running_and_ready_is_healthy() -> None:
    healthy, reason = bundle_health(status(dns=daemon(), egress=daemon()), None, NOW)
    assert healthy, reason
    assert reason == "healthy: dns, egress running and ready"


@pytest.mark.parametrize(
    ("document", "selected", "expected_reason"),
    [
        (None, None, "no readable status.json"),
        (status(updated_at=NOW - 60, dns=daemon()), None, "stale"),
        (status(dns=daemon(running=False, ready=False, last_exit_code=1)), None, "dns: not running"),
        (status(dns=daemon(ready=False)), None, "dns: running (pid 42) but not ready"),
        (status(dns=daemon()), ["dns", "egress"], "egress: not supervised"),
        ({**status(dns=daemon()), "stopping": True}, None, "init is stopping"),
    ],
)
def test_unhealthy_verdicts_name_the_reason(
    document: dict[str, Any] | None, selected: list[str] | None, expected_reason: str
) -> None:
    healthy, reason = bundle_health(document, selected, NOW)
    assert not healthy
    assert expected_reason in reason
    assert "\n" not in reason


def test_empty_selection_is_healthy_while_fresh() -> None:
    assert bundle_health(status(), None, NOW)[0]
    assert not bundle_health(status(updated_at=NOW - 60), None, NOW)[0]


def test_max_age_is_configurable() -> None:
    document = status(updated_at=NOW - 8, dns=daemon())
    assert not bundle_health(document, None, NOW, max_age_s=5)[0]
    assert bundle_health(document, None, NOW, max_age_s=10)[0]


def write_status(run_dir: Path, document: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "status.json").write_text(json.dumps(document))


def test_main_exit_codes_and_one_line_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = {"BOTTLE_RUN_DIR": str(tmp_path)}
    assert main(env) == 1
    assert capsys.readouterr().out.count("\n") == 1

    write_status(tmp_path, status(updated_at=time.time(), dns=daemon()))
    assert main(env) == 0
    assert main({**env, "BUNDLE_DAEMONS": "dns,egress"}) == 1
    assert "egress: not supervised" in capsys.readouterr().out.splitlines()[-1]


def test_main_reads_garbage_as_unhealthy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "status.json").write_text("{not json")
    assert main({"BOTTLE_RUN_DIR": str(tmp_path)}) == 1
    assert "no readable status.json" in capsys.readouterr().out
