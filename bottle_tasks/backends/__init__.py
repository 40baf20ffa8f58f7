"""Backends: where the guest runs, how it is reached (exec/cp) and fenced. Each implements
`base.Backend`; a new one is its module plus one line here.

The classes load on first use: an up-to-date start of a docker bottle never imports smolmachines.
"""

from __future__ import annotations

import importlib

BACKENDS: dict[str, str] = {
    "docker": "bottle_tasks.backends.docker:DockerBackend",
    "smolmachines": "bottle_tasks.backends.smolmachines:SmolmachinesBackend",
}


def backend_class(name: str) -> type["Backend"]:
    module, _, attr = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def backend_for(plan: "Plan", docker: "Docker | None" = None) -> "Backend":
    """The backend that runs this plan's guest, talking to docker through `docker` (a new client if None)."""
    from bottle_tasks.docker_cli import Docker

    return backend_class(plan.backend)(docker or Docker())
