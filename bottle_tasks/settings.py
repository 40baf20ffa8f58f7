"""Host settings: every image reference, path and knob, each overridable by an environment variable."""

from __future__ import annotations

import importlib.resources
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from bottle_tasks.agents import agent_dirs
from bottle_tasks.build_trust import TRUST_ENV
from bottle_tasks.errors import BottleError

ROOT = Path(__file__).resolve().parent.parent   # the checkout, when run from one (its ./agents)
PACKAGE_DIR = Path(__file__).resolve().parent


def package_dir(name: str) -> Path:
    """A directory the package ships (templates/, images/), as a path on disk: Jinja's loader and
    docker build contexts need one, which every installed wheel (and the checkout) gives."""
    found = importlib.resources.files("bottle_tasks") / name
    if not isinstance(found, Path) or not found.is_dir():
        raise BottleError(f"claude-bottle's package data {name}/ is missing or not on disk ({found}): "
                          "install the package from a wheel or a checkout (pip install / pipx install), not as a zip")
    return found


IMAGES_DIR = package_dir("images")
# Pinned defaults; see README "Pinned versions".
DEFAULT_BASE_IMAGE = "debian:bookworm-slim"
DEFAULT_CLAUDE_CODE_VERSION = "2.1.197"  # newest 2.1.x that runs on Debian bookworm's node 18
DEFAULT_SUBNET_POOL = "10.243.0.0/16"
# pipelock's official image: a scratch image holding /pipelock; its tags drop the "v". Pinned by tag
# only: ghcr.io could not be reached where this was written, so its digest could not be learned. The
# bundle build prints the digest it pulled; pin it with BOTTLE_PIPELOCK_IMAGE=<image>@sha256:<digest>.
DEFAULT_PIPELOCK_IMAGE = "ghcr.io/luckypipewrench/pipelock:2.3.0"
PIPELOCK_IN_IMAGE = "/pipelock"
PIPELOCK_MODES = ("required", "off")
_IMAGE_REF = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*"
                        r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?")


def _xdg(env: Mapping[str, str], var: str, fallback: str) -> Path:
    return Path(env.get(var) or Path(env.get("HOME", "/root")) / fallback)


@dataclass(frozen=True)
class Settings:
    agents_dirs: tuple[Path, ...]  # the agent files' search path (bottle_tasks/agents.py)
    images_dir: Path           # holds agent/Dockerfile and bundle/Dockerfile; point it at your own copy to customise
    state_dir: Path            # holds work: workspace metadata, CA, rendered configs; kept by clean
    cache_dir: Path            # transient: digests, staged build contexts
    base_image: str
    claude_code_version: str
    build_trust_env: tuple[tuple[str, str], ...]  # what build_trust reads: BOTTLE_BUILD_CA_CERTS, the host's CA variables
    upstream_ca_certs: Path | None  # extra CAs egress trusts for upstream TLS
    pipelock_bin: Path | None      # BOTTLE_PIPELOCK_BIN, else a local pipelock: the fallback when pipelock_image is set
    pipelock_image: str            # the image the bundle build takes /pipelock from; "" = none (pipelock_source)
    pipelock_mode: str             # BOTTLE_PIPELOCK: "required", or "off" to run without pipelock
    subnet_pool: str
    backend: str | None
    image_prefix: str
    smolvm_bin: str
    crane_bin: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env

        def path_or_none(var: str) -> Path | None:
            return Path(env[var]).expanduser().resolve() if env.get(var) else None

        pipelock_bin, pipelock_image = pipelock_source(env, local_pipelock(env))
        return cls(
            agents_dirs=agent_dirs(env, Path.cwd()),
            images_dir=Path(env.get("BOTTLE_IMAGES_DIR") or IMAGES_DIR).resolve(),
            state_dir=(path_or_none("BOTTLE_STATE_DIR") or _xdg(env, "XDG_STATE_HOME", ".local/state") / "claude-bottle"),
            cache_dir=(path_or_none("BOTTLE_CACHE_DIR") or _xdg(env, "XDG_CACHE_HOME", ".cache") / "claude-bottle"),
            base_image=env.get("BOTTLE_BASE_IMAGE") or DEFAULT_BASE_IMAGE,
            claude_code_version=env.get("BOTTLE_CLAUDE_CODE_VERSION") or DEFAULT_CLAUDE_CODE_VERSION,
            build_trust_env=tuple((var, env[var]) for var in TRUST_ENV if env.get(var)),
            upstream_ca_certs=path_or_none("BOTTLE_UPSTREAM_CA_CERTS"),
            pipelock_bin=pipelock_bin,
            pipelock_image=pipelock_image,
            pipelock_mode=env.get("BOTTLE_PIPELOCK") or "required",
            subnet_pool=env.get("BOTTLE_SUBNET_POOL") or DEFAULT_SUBNET_POOL,
            backend=env.get("BOTTLE_BACKEND") or None,
            image_prefix=env.get("BOTTLE_IMAGE_PREFIX") or "claude-bottle",
            smolvm_bin=env.get("BOTTLE_SMOLVM_BIN") or "smolvm",
            crane_bin=env.get("BOTTLE_CRANE_BIN") or "crane",
        )


def local_pipelock(env: Mapping[str, str]) -> Path | None:
    """pipelock on PATH, else where `go install` puts it (~/go/bin)."""
    found = shutil.which("pipelock", path=env.get("PATH"))
    if found:
        return Path(found)
    go_bin = Path(env.get("HOME", "/root")) / "go/bin/pipelock"
    return go_bin if go_bin.is_file() else None


def pipelock_source(env: Mapping[str, str], local: Path | None) -> tuple[Path | None, str]:
    """(binary, image) the bundle build takes pipelock from, first match wins:

    1. BOTTLE_PIPELOCK=off: neither; the bottle runs without pipelock.
    2. BOTTLE_PIPELOCK_BIN: that binary alone (the override; no image is pulled).
    3. BOTTLE_PIPELOCK_IMAGE (default DEFAULT_PIPELOCK_IMAGE; set it empty for none): /pipelock from
       that image, pulled by the pipelock_binary task, with the local binary as the fallback when the
       image cannot be pulled.
    4. The local binary (local_pipelock) alone.
    Nothing is checked here (planning does no I/O and must not fail on a setting start does not
    use): pipelock_problem says what is wrong, pipelock_binary_choice picks after the pull."""
    if (env.get("BOTTLE_PIPELOCK") or "required") == "off":
        return None, ""
    if env.get("BOTTLE_PIPELOCK_BIN"):
        return Path(env["BOTTLE_PIPELOCK_BIN"]).expanduser().resolve(), ""
    return local, env.get("BOTTLE_PIPELOCK_IMAGE", DEFAULT_PIPELOCK_IMAGE).strip()


def pipelock_problem(s: Settings) -> str | None:
    """What keeps start from getting pipelock, naming the setting to change; None when nothing does."""
    if s.pipelock_mode not in PIPELOCK_MODES:
        return f"BOTTLE_PIPELOCK={s.pipelock_mode!r} is not a mode: set it to one of {', '.join(PIPELOCK_MODES)}"
    if s.pipelock_mode == "off":
        return None
    if s.pipelock_image and not _IMAGE_REF.fullmatch(s.pipelock_image):
        return (f"BOTTLE_PIPELOCK_IMAGE={s.pipelock_image!r} is not an image reference "
                f"(e.g. {DEFAULT_PIPELOCK_IMAGE}); fix it, or set it empty to use a local pipelock binary")
    if not s.pipelock_image and s.pipelock_bin is None:
        return ("pipelock was not found: set BOTTLE_PIPELOCK_IMAGE to an image holding /pipelock (unset, it is "
                f"{DEFAULT_PIPELOCK_IMAGE}), or BOTTLE_PIPELOCK_BIN to a pipelock binary, or put pipelock on PATH "
                "(see README). To run without it (no pipelock allowlist floor, scan API or SNI check), set BOTTLE_PIPELOCK=off")
    if not s.pipelock_image and not _is_executable(s.pipelock_bin):
        return f"{s.pipelock_bin} is not an executable file: fix BOTTLE_PIPELOCK_BIN (or PATH), or unset it to pull BOTTLE_PIPELOCK_IMAGE"
    return None


def pipelock_binary_choice(s: Settings, pulled: Path | None, pull_error: str) -> Path:
    """The binary the bundle image gets, once the image was tried: the one pulled from
    s.pipelock_image, else the local fallback. Raises BottleError naming the settings to change."""
    if pulled is not None:
        return pulled
    if _is_executable(s.pipelock_bin):
        return s.pipelock_bin
    raise BottleError(
        f"pipelock could not be taken from BOTTLE_PIPELOCK_IMAGE={s.pipelock_image} ({pull_error}), and no local "
        "pipelock binary was found (PATH, ~/go/bin): set BOTTLE_PIPELOCK_IMAGE to an image you can pull, or "
        "BOTTLE_PIPELOCK_BIN to a pipelock binary, or BOTTLE_PIPELOCK=off to run without pipelock")


def _is_executable(path: Path | None) -> bool:
    return path is not None and path.is_file() and os.access(path, os.X_OK)
