"""The bundle's daemon table: which daemons init can run, with their command lines and readiness probes.

The host renders it as JSON and mounts it at ``/etc/bottle/daemons.json`` (``BOTTLE_DAEMON_TABLE``
names another file)::

    {"name": {"command": ["prog", "arg", ...],
              "probe": {"tcp": "ip:port"} | {"http": "http://..."} | {"dns": "ip:port"} | null,
              "secrets": ["VAR", ...],           # optional: the secret variables this daemon gets
              "audit_sink": true,                # optional: reads the audit pipe on stdin (sidecars/audit.py)
              "audit_stdout": "pipelock"}}       # optional: its log lines are read for audit records

``BUNDLE_DAEMONS`` (comma separated) selects the daemons init starts, in that order.
Standard library only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from bottle_tasks.sidecars.configfile import ENV_NAME
from bottle_tasks.sidecars.probes import Probe, probe_from_spec

DEFAULT_DAEMON_TABLE = "/etc/bottle/daemons.json"


@dataclass(frozen=True)
class Daemon:
    name: str
    command: tuple[str, ...]
    probe: Probe | None = None  # None: ready as soon as it runs
    secrets: tuple[str, ...] = ()  # variables of the secrets file handed to this daemon, and to no other
    audit_sink: bool = False       # gets the audit pipe's read end as stdin; every other daemon its write end
    audit_stdout: str = ""         # its stdout lines are read for audit records ("pipelock": sidecars/audit.py)


class DaemonTableError(ValueError):
    """The daemon table is missing, unreadable or malformed; the message names the file."""


def load_daemon_table(path: str | Path) -> dict[str, Daemon]:
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise DaemonTableError(f"{path}: cannot read the daemon table: {error.strerror or error}") from None
    except ValueError as error:
        raise DaemonTableError(f"{path}: the daemon table is not valid JSON ({error})") from None
    return parse_daemon_table(entries, source=str(path))


def parse_daemon_table(entries: Any, *, source: str = "daemons.json") -> dict[str, Daemon]:
    if not isinstance(entries, dict):
        raise DaemonTableError(f"{source}: must be a JSON object of daemon name -> {{command, probe}}")
    table: dict[str, Daemon] = {}
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            raise DaemonTableError(f"{source}: {name}: must be an object with command and probe")
        command = entry.get("command")
        if not isinstance(command, list) or not command or not all(isinstance(a, str) and a for a in command):
            raise DaemonTableError(f"{source}: {name}.command: must be a non-empty list of non-empty strings")
        try:
            probe = probe_from_spec(entry.get("probe"))
        except ValueError as error:
            raise DaemonTableError(f"{source}: {name}.probe: {error}") from None
        secrets = entry.get("secrets", [])
        if not isinstance(secrets, list) or not all(isinstance(v, str) and ENV_NAME.match(v) for v in secrets):
            raise DaemonTableError(f"{source}: {name}.secrets: must be a list of environment variable names")
        audit_sink = entry.get("audit_sink", False)
        if not isinstance(audit_sink, bool):
            raise DaemonTableError(f"{source}: {name}.audit_sink: must be true or false")
        audit_stdout = entry.get("audit_stdout", "")
        if audit_stdout not in ("", "pipelock"):
            raise DaemonTableError(f"{source}: {name}.audit_stdout: must be \"pipelock\" or absent")
        table[name] = Daemon(name, tuple(command), probe, tuple(secrets), audit_sink, audit_stdout)
    return table


def parse_daemon_names(value: str) -> list[str]:
    """'egress, dns,,egress' -> ['egress', 'dns']: order kept, blanks and repeats dropped."""
    names: list[str] = []
    for name in (part.strip() for part in value.split(",")):
        if name and name not in names:
            names.append(name)
    return names


def select_daemons(table: Mapping[str, Daemon], names: Sequence[str]) -> list[Daemon]:
    unknown = [name for name in names if name not in table]
    if unknown:
        raise UnknownDaemon(unknown, sorted(table))
    return [table[name] for name in names]


class UnknownDaemon(ValueError):
    def __init__(self, unknown: Sequence[str], known: Sequence[str]) -> None:
        super().__init__(
            f"unknown daemon(s) in BUNDLE_DAEMONS: {', '.join(unknown)}; "
            f"known daemons: {', '.join(known)}"
        )


class SecretsError(ValueError):
    """The secrets file is unreadable or malformed; the message names the file, never a value."""


def load_secrets(path: str | Path) -> dict[str, str]:
    """The secrets file the host copied into the bundle: {"VAR": "value"}. Absent: no secrets."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except OSError as error:
        raise SecretsError(f"{path}: cannot read the secrets file: {error.strerror or error}") from None
    except ValueError:
        raise SecretsError(f"{path}: the secrets file is not valid JSON") from None
    if not isinstance(document, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in document.items()):
        raise SecretsError(f"{path}: the secrets file must map variable names to strings")
    return document


def daemon_environment(base: Mapping[str, str], daemon: Daemon, secrets: Mapping[str, str]) -> dict[str, str]:
    """base without any secret variable, plus the secrets this daemon's entry names (those that exist)."""
    env = {key: value for key, value in base.items() if key not in secrets}
    env.update({name: secrets[name] for name in daemon.secrets if name in secrets})
    return env
