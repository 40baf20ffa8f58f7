"""Host settings: every image reference, path and knob, each overridable by an environment variable."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = Path(__file__).resolve().parent
# Pinned defaults; see README "Pinned versions".
DEFAULT_BASE_IMAGE = "debian:bookworm-slim"
DEFAULT_CLAUDE_CODE_VERSION = "2.1.197"  # newest 2.1.x that runs on Debian bookworm's node 18
DEFAULT_SUBNET_POOL = "10.243.0.0/16"


def _xdg(env: Mapping[str, str], var: str, fallback: str) -> Path:
    return Path(env.get(var) or Path(env.get("HOME", "/root")) / fallback)


@dataclass(frozen=True)
class Settings:
    agents_dir: Path
    images_dir: Path           # holds agent/Dockerfile and bundle/Dockerfile; point it at your own copy to customise
    state_dir: Path            # holds work: workspace metadata, CA, rendered configs; kept by clean
    cache_dir: Path            # transient: digests, staged build contexts
    base_image: str
    claude_code_version: str
    build_ca_certs: Path | None    # extra CAs for image builds (corporate TLS interception)
    upstream_ca_certs: Path | None  # extra CAs egress trusts for upstream TLS
    pipelock_bin: Path | None
    pipelock_required: bool
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

        pipelock = path_or_none("BOTTLE_PIPELOCK_BIN")
        if pipelock is None:
            found = shutil.which("pipelock") or next(
                (str(p) for p in (Path(env.get("HOME", "/root")) / "go/bin/pipelock",) if p.is_file()), None)
            pipelock = Path(found) if found else None
        return cls(
            agents_dir=Path(env.get("BOTTLE_AGENTS_DIR") or ROOT / "agents").resolve(),
            images_dir=Path(env.get("BOTTLE_IMAGES_DIR") or ROOT / "images").resolve(),
            state_dir=(path_or_none("BOTTLE_STATE_DIR") or _xdg(env, "XDG_STATE_HOME", ".local/state") / "claude-bottle"),
            cache_dir=(path_or_none("BOTTLE_CACHE_DIR") or _xdg(env, "XDG_CACHE_HOME", ".cache") / "claude-bottle"),
            base_image=env.get("BOTTLE_BASE_IMAGE") or DEFAULT_BASE_IMAGE,
            claude_code_version=env.get("BOTTLE_CLAUDE_CODE_VERSION") or DEFAULT_CLAUDE_CODE_VERSION,
            build_ca_certs=path_or_none("BOTTLE_BUILD_CA_CERTS"),
            upstream_ca_certs=path_or_none("BOTTLE_UPSTREAM_CA_CERTS"),
            pipelock_bin=pipelock,
            # Running without pipelock loses response scanning and its SSRF floor: opt-out only.
            pipelock_required=(env.get("BOTTLE_PIPELOCK", "required") != "off"),
            subnet_pool=env.get("BOTTLE_SUBNET_POOL") or DEFAULT_SUBNET_POOL,
            backend=env.get("BOTTLE_BACKEND") or None,
            image_prefix=env.get("BOTTLE_IMAGE_PREFIX") or "claude-bottle",
            smolvm_bin=env.get("BOTTLE_SMOLVM_BIN") or "smolvm",
            crane_bin=env.get("BOTTLE_CRANE_BIN") or "crane",
        )
