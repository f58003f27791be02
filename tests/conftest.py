"""Test-wide setup: a fake 8-device CPU mesh, shared data paths."""

import os
import pathlib

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The real ESCI rows laid beside the checkout (never copied into the repo)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found beside the repo: {SHARED_DATA}")
    return SHARED_DATA
