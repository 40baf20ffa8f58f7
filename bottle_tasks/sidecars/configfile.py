"""Reading the bundle's YAML config files: one way, one error shape (`<file>: ...`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from bottle_tasks.sidecars.daemon import split_host_port

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")  # an environment variable name
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


def config_failer(error: type[Exception], source: str) -> Callable[[str, str], Exception]:
    """`fail(key, problem)`: the config's own error, worded `<file>: <key>: <problem>`."""
    return lambda key, problem: error(f"{source}: {key}: {problem}")


def top_level_mapping(data: Any, fail) -> dict:
    if not isinstance(data, dict):
        raise fail("(top level)", "must be a mapping")
    return data


def versioned_document(data: Any, known: set[str], version: int, fail) -> dict:
    """The top-level mapping of a config file: only known keys, and ``version`` equal to version."""
    top_level_mapping(data, fail)
    refuse_unknown_keys(data, known | {"version"}, "", fail)
    if data.get("version") != version:
        raise fail("version", f"must be {version}, got {data.get('version')!r}")
    return data


def nested_mapping(value: Any, known: set[str], key: str, fail, problem: str = "must be a mapping") -> dict:
    """value, a mapping at key with only known keys; otherwise fail(key, problem)."""
    if not isinstance(value, dict):
        raise fail(key, problem)
    refuse_unknown_keys(value, known, key + ".", fail)
    return value


def refuse_unknown_keys(mapping: dict, known: set[str], prefix: str, fail) -> None:
    """Every key of mapping must be one of known; prefix places it in the file (`repos[0].`)."""
    for key in mapping:
        if key not in known:
            raise fail(f"{prefix}{key}", f"unknown key (expected one of: {', '.join(sorted(known))})")


def check_http_url(value: str, key: str, fail) -> str:
    """An http(s) URL or "" (off); `fail(key, problem)` builds the config's own error."""
    if value and not value.startswith(("http://", "https://")):
        raise fail(key, "must be an http:// or https:// URL, or \"\"")
    return value


def list_of(data: dict, key: str, fail) -> list:
    """data[key] as a list; absent or null is empty."""
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise fail(key, "must be a list")
    return value


def refuse_duplicates(names: list[str], key: str, field: str, fail) -> None:
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise fail(f"{key}[{i}].{field}", f"duplicate of {key}[{seen[name]}].{field} ({name})")
        seen[name] = i


def string_value(mapping: dict, name: str, key: str, fail, *, required: bool = False) -> str:
    """mapping[name] as a string ("" when absent or null); key names it in the error."""
    value = mapping.get(name)
    if value is None:
        if required:
            raise fail(key, "is required")
        return ""
    if not isinstance(value, str):
        raise fail(key, f"must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise fail(key, "must not be empty")
    return value


def bool_value(mapping: dict, name: str, key: str, fail) -> bool:
    """mapping[name] as true/false, false when absent."""
    value = mapping.get(name, False)
    if not isinstance(value, bool):
        raise fail(key, "must be true or false")
    return value


def string_list(value: Any, key: str, fail, what: str = "strings") -> list[str]:
    """value as a list of non-empty strings; None is empty. what names the items in the error."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise fail(key, f"must be a list of non-empty {what}")
    return value


def listen_address(value: str, key: str, fail, *, allow_port_zero: bool = True) -> tuple[str, int]:
    """An "ip:port" (or "[v6]:port") a daemon binds; port 0 (any free port) only when allowed."""
    try:
        host, port = split_host_port(value)
    except ValueError:
        host, port = "", 0
    if not host or (port == 0 and not allow_port_zero):
        raise fail(key, f"must be \"ip:port\", got {value!r}")
    return host, port
