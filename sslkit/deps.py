"""Optional dependencies checked before any work: a missing one is a one-line error naming the extra
that installs it (see pyproject.toml), not a traceback after minutes of set-up."""

from __future__ import annotations

import importlib.util

from .errors import SslkitError

DALI_EXTRAS = ("pip install 'sslkit[cuda13]' (CUDA 13 drivers, and CPU-only machines) or "
               "'sslkit[cuda12]' (CUDA 12 drivers)")


class MissingDependencyError(SslkitError):
    """An optional package a command needs is not installed (one line naming the extra)."""


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):   # a parent package that is missing or broken
        return False


def require_dali(command: str) -> None:
    """NVIDIA DALI is an extra because its CUDA 12 and CUDA 13 builds are different distributions."""
    if not _installed("nvidia.dali"):
        raise MissingDependencyError(f"{command} needs NVIDIA DALI, which is not installed: {DALI_EXTRAS}")
