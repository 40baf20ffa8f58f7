"""The one backend interface. A backend plans its part of the bottle (pure class methods the plan calls),
then creates, probes and removes it (instance methods the tasks call), and hands out a Guest handle
that provisioning and `start` use to reach the guest.

docker and smolmachines share the bundle as a docker container on docker networks
(backends/bundle.py: DockerBundle); a backend without docker implements those methods its own way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from bottle_tasks.plan import GUEST_USER

if TYPE_CHECKING:
    from bottle_tasks.docker_cli import Docker
    from bottle_tasks.plan import NetworkPlan, Plan
    from bottle_tasks.runner import Result
    from bottle_tasks.settings import Settings
    from bottle_tasks.spec import AgentSpec


class Guest(ABC):
    """A running guest: run commands in it, copy files into it, attach the agent."""

    @abstractmethod
    def exec_argv(self, argv: list[str], *, user: str = GUEST_USER, tty: bool = False,
                  env: Mapping[str, str] | None = None) -> list[str]:
        """The host command that runs argv in the guest as user (root commands run from /)."""

    @abstractmethod
    def exec(self, argv: list[str], *, user: str = GUEST_USER, input: str | None = None,
             check: bool = True) -> "Result":
        """Run argv in the guest; input goes to its stdin."""

    @abstractmethod
    def copy(self, source: Path, dest: str) -> None:
        """Copy a host file or directory to dest in the guest, root-owned; a symlink stays a link."""

    @abstractmethod
    def attach_argv(self, argv: list[str], tty: bool) -> list[str]:
        """The host command that runs the agent attached to this terminal."""

    @abstractmethod
    def identity(self) -> str | None:
        """Changes whenever the guest is replaced (provisioning is redone then); None when not running."""


class Backend(ABC):
    name: ClassVar[str]
    agent_build_args: ClassVar[tuple[tuple[str, str], ...]] = ()   # extra build args for the agent image
    # A module of doit task creators (its __all__) for stages of this backend's own, loaded with the others.
    task_module: ClassVar[str | None] = None

    def __init__(self, docker: "Docker") -> None:
        self.docker = docker

    # ---- planning: pure, called by plan.make_plan ------------------------------------------------

    @classmethod
    def host_facts(cls, slug: str, docker: "Docker") -> Any:
        """What planning needs to know about the host (I/O, gathered before make_plan); None by default."""
        return None

    @classmethod
    @abstractmethod
    def plan_network(cls, slug: str, spec: "AgentSpec", settings: "Settings", host_facts: Any) -> "NetworkPlan":
        """The bottle's networks and addresses."""

    @classmethod
    def default_workspace(cls, state_dir: Path) -> Path | None:
        """A host directory for the workspace when the agent file names none; None means a docker volume."""
        return None

    @classmethod
    def image_pipeline(cls, slug: str, settings: "Settings", cache_dir: Path,
                       build_args: tuple[tuple[str, str], ...]) -> Any | None:
        """The backend's own stages between the agent image and the guest (plan.image_pipeline)."""
        return None

    @classmethod
    def guest_image_task(cls, plan: "Plan") -> str:
        """The task whose output the guest is made from."""
        return f"image_build:{plan.agent}"

    # ---- the bottle -------------------------------------------------------------------------------

    def watch_names(self, plan: "Plan") -> tuple[str, ...]:
        """The docker objects this run's probes read: inspected in one call (docker_cli.Docker.watch)."""
        return (plan.guest.name, plan.bundle.name, *(b.name for b in plan.network.bridges),
                plan.agent_image.tag, plan.bundle_image.tag)

    @abstractmethod
    def preflight(self, plan: "Plan") -> None:
        """Cheap checks before anything is built: names free, subnets free, the backend's tools."""

    @abstractmethod
    def create_networks(self, plan: "Plan") -> None: ...

    @abstractmethod
    def networks_ready(self, plan: "Plan") -> bool: ...

    @abstractmethod
    def remove_networks(self, plan: "Plan") -> None: ...

    @abstractmethod
    def start_bundle(self, plan: "Plan", secrets: Mapping[str, str]) -> None:
        """(Re)create the bundle with the secrets passed by name, and wait until it is healthy."""

    @abstractmethod
    def bundle_ready(self, plan: "Plan") -> bool:
        """Running, healthy, and made from exactly this plan's inputs (its fingerprint)."""

    @abstractmethod
    def remove_bundle(self, plan: "Plan") -> None: ...

    @abstractmethod
    def start_guest(self, plan: "Plan") -> None:
        """(Re)create the guest and prove its fence; on failure nothing of it is left."""

    @abstractmethod
    def guest_ready(self, plan: "Plan") -> bool: ...

    @abstractmethod
    def fence_epoch(self, plan: "Plan") -> str | None:
        """What must not change between fencing and use (a restart outside doit changes it)."""

    @abstractmethod
    def remove_guest(self, plan: "Plan") -> None: ...

    @abstractmethod
    def remove_all(self, plan: "Plan") -> None:
        """Remove every container of the bottle, found by its label (clean runs this first)."""

    @abstractmethod
    def guest(self, plan: "Plan") -> Guest:
        """The handle provisioning and start use."""
