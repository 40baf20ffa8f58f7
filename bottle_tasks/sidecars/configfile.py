"""Reading the bundle's YAML config files: one way, one error shape (`<file>: ...`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import yaml

PIPELOCK_TOKEN_ENV = "BOTTLE_PIPELOCK_SCAN_TOKEN"  # overrides scan_api.auth.bearer_tokens[0] of pipelock.yaml


def read_yaml(path: str | Path, error: type[Exception], what: str) -> Any:
    """The parsed document, or `error` naming the file and what went wrong."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise error(f"{path}: not valid YAML{where}") from None


def pipelock_scan_token(environ: Mapping[str, str], pipelock_config: Path) -> str:
    """Bearer token for pipelock's scan API: the env var, else the first of
    ``scan_api.auth.bearer_tokens`` in pipelock.yaml (pipelock refuses to start without one)."""
    if environ.get(PIPELOCK_TOKEN_ENV):
        return environ[PIPELOCK_TOKEN_ENV]
    try:
        document = yaml.safe_load(pipelock_config.read_text(encoding="utf-8"))
        tokens = document["scan_api"]["auth"]["bearer_tokens"]
        return str(tokens[0]) if tokens else ""
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError):
        return ""
