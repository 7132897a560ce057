"""Provenance: where a store or a trained model came from (SPEC.md, root attribute `provenance`).

Shared by every stage that writes something others will read later; never holds credentials:
every string of the recorded config goes through `redact_uri`, and the environment is not read.
"""

from __future__ import annotations

import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

PACKAGES = ("featinv", "torch", "timm", "zarr", "numcodecs", "numpy", "pillow", "fsspec",
            "diffusers", "accelerate")  # fmt: skip


def provenance(config: dict) -> dict:
    """Time, featinv's git revision, Python and package versions, and the config (redacted)."""
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_revision": _git_revision(),
        "python": platform.python_version(),
        "packages": package_versions(PACKAGES),
        "config": _redacted(config),
    }


def package_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """The installed version of each distribution; None for one that is not installed."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def redact_url(url: str) -> str:
    """Drop user:password@ from a URL so it can go into metadata and logs."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def redact_uri(uri: str) -> str:
    """`redact_url` for every link of an fsspec chain (`tar://member::https://u:p@host/a.tar`)."""
    return "::".join(redact_url(part) for part in uri.split("::"))


def _redacted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(v) for v in value]
    return redact_uri(value) if isinstance(value, str) else value


def _git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None
