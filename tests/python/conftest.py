"""Shared fixtures: where the built CLI is, and a small sharded model directory for the checkpoint tests.
Helpers that tests import live beside this file: servers.py (processes and HTTP), weights.py (comparing
and changing weights), tiny_model.py (a tiny model with a tokenizer)."""

import os
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def cli() -> str:
    """Path of the `livetrain` executable: $LIVETRAIN_CLI, the development build, or the installed one."""
    for candidate in (os.environ.get("LIVETRAIN_CLI"), ROOT / "build" / "livetrain", shutil.which("livetrain")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail("the livetrain CLI is not built: run `bash scripts/test.sh` or set LIVETRAIN_CLI")


@pytest.fixture
def sharded_model(tmp_path) -> tuple[Path, dict]:
    """``tmp_path/model``: three tensors of odd sizes (bf16 and fp32) in several safetensors shards, and
    the tensors (which tests then change as live weights)."""
    from livetrain import safetensors as lst

    torch.manual_seed(0)
    tensors = {
        "model.embed_tokens.weight": (torch.randn(257, 63) * 0.02).to(torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": (torch.randn(112, 64) * 0.02).to(torch.bfloat16),
        "model.norm.weight": torch.ones(65),
    }
    d = tmp_path / "model"
    d.mkdir()
    lst.save_model(d, tensors, max_shard_bytes=20000)
    return d, tensors
