"""Shared fixtures: where the built CLI is, and a generator of random tensors for every dtype."""

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def cli() -> str:
    """Path of the `livetrain` executable: $LIVETRAIN_CLI, the development build, or the installed one."""
    for candidate in (os.environ.get("LIVETRAIN_CLI"), ROOT / "build" / "livetrain", shutil.which("livetrain")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail("the livetrain CLI is not built: run `bash scripts/test.sh` or set LIVETRAIN_CLI")
