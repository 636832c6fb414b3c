"""Shared fixtures: where the real mirror is, and whether its absence is a failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def mirror_path() -> Path | None:
    """The local chest X-ray mirror: $CXR_MIRROR, else ../shared/cxr-mirror beside the repo."""
    env = os.environ.get("CXR_MIRROR")
    path = Path(env) if env else REPO.parent / "shared" / "cxr-mirror"
    return path if (path / "sources.csv").exists() else None


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The mirror, or skip; in CI (CI=true) a missing mirror is a failure, never a skip."""
    path = mirror_path()
    if path is None:
        message = (
            "the chest X-ray mirror is missing (set CXR_MIRROR or put it at ../shared/cxr-mirror)"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path
