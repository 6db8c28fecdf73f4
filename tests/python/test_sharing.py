"""Weight sharing between two real processes: an engine serving a small random Llama from shared memory
(or CUDA IPC memory) and a trainer that attaches, builds the Hugging Face model on the views, gets the
engine's logits bit for bit, holds no copy, and whose in-place optimizer step changes the engine's next
output; plus the stale-manifest, second-trainer and CLI paths. CUDA variants skip without a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import livetrain

from servers import ENV

PROCS = str(Path(__file__).with_name("sharing_procs.py"))
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]


class Engine:
    def __init__(self, manifest: Path, device: str):
        self.p = subprocess.Popen(
            [sys.executable, PROCS, "engine", str(manifest), device],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        assert self.read() == {"ready": True}

    def read(self) -> dict:
        line = self.p.stdout.readline()
        assert line, f"engine exited with {self.p.wait()}"
        return json.loads(line)

    def logits(self) -> str:
        self.p.stdin.write("logits\n")
        self.p.stdin.flush()
        return self.read()["logits"]

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.stdin.write("quit\n")
            self.p.stdin.close()
            self.p.wait(timeout=60)


def run_trainer(mode: str, manifest: Path) -> dict:
    r = subprocess.run(
        [sys.executable, PROCS, mode, str(manifest)], capture_output=True, text=True, env=ENV, timeout=300
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture
def engine(request, tmp_path):
    e = Engine(tmp_path / "engine.manifest.json", request.param)
    yield e, tmp_path / "engine.manifest.json"
    e.stop()


@pytest.mark.parametrize("engine", DEVICES, indirect=True)
def test_trainer_shares_the_engine_weights(engine):
    eng, manifest = engine
    served = eng.logits()
    out = run_trainer("train", manifest)
    assert "error" not in out, out
    assert out["lease"] is True
    assert out["before"] == served  # (a) same logits, bit for bit
    assert out["outside"] == [] and out["params"] == 2 + 2 * 9 + 1  # (b) every parameter is a view
    assert out["after"] != out["before"]
    assert eng.logits() == out["after"]  # (c) the trainer's in-place step is what the engine now serves


@pytest.mark.parametrize("engine", DEVICES, indirect=True)
def test_second_trainer_is_refused_and_cli_shows_the_holder(engine, cli):
    eng, manifest = engine
    holder = subprocess.Popen(
        [sys.executable, PROCS, "hold", str(manifest)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        first = json.loads(holder.stdout.readline())
        assert first["holding"] is True and first["tensors"] == 2 + 2 * 9 + 1
        second = run_trainer("train", manifest)
        assert "another trainer holds the lease" in second["error"]
        assert f"(pid {holder.pid}, lock on /livetrain-" in second["error"]
        doc = json.loads(
            subprocess.run(
                [cli, "manifest", "inspect", str(manifest), "--json"], capture_output=True, text=True, check=True
            ).stdout
        )
        assert doc["owner"]["pid"] == eng.p.pid and doc["owner"]["state"] == "alive"
        assert doc["lease_holder"] == holder.pid
        assert doc["model"]["config"]["model_type"] == "llama"
        table = subprocess.run(
            [cli, "manifest", "inspect", str(manifest)], capture_output=True, text=True, check=True
        ).stdout
        assert f"lease     held by pid {holder.pid}" in table and "model.norm.weight" in table
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    # Released when the holder exits: a new trainer gets in.
    assert run_trainer("train", manifest).get("lease") is True


def test_dead_owner_is_a_stale_manifest(tmp_path, cli):
    manifest = tmp_path / "engine.manifest.json"
    eng = Engine(manifest, "cpu")
    pid = eng.p.pid
    shm = livetrain.attach(manifest, take_lease=False).manifest["buffers"][0]["name"]
    eng.stop()
    assert not os.path.exists("/dev/shm" + shm)  # the engine unlinked its segment on the way out
    out = run_trainer("train", manifest)
    assert out["error"].startswith(f"stale manifest {manifest}: its owner, pid {pid}, is not running"), out
    with pytest.raises(livetrain.Error, match="stale manifest"):
        livetrain.attach(manifest)
    r = subprocess.run([cli, "manifest", "inspect", str(manifest), "--json"], capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout)["owner"]["state"] == "dead"


def test_malformed_manifest_names_the_field(tmp_path, cli):
    manifest = tmp_path / "m.json"
    manifest.write_text('{"magic": "livetrain-manifest", "version": 1}')
    with pytest.raises(livetrain.Error, match=r"owner: missing"):
        livetrain.attach(manifest)
    r = subprocess.run([cli, "manifest", "inspect", str(manifest)], capture_output=True, text=True)
    assert r.returncode == 1 and "owner: missing" in r.stderr
    r = subprocess.run([cli, "manifest", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("usage: livetrain manifest")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_export_cuda_without_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(livetrain.Error, match="export_cuda needs CUDA tensors"):
        livetrain.export_cuda({"w": torch.ones(3)}, tmp_path / "m.json")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_export_cuda_refuses_expandable_segments(tmp_path):
    # PyTorch's expandable segments are VMM allocations, which cudaIpcGetMemHandle cannot share: the
    # export must refuse them with an error that says what to change.
    code = (
        "import torch, livetrain.sharing as s\n"
        "t = torch.ones(1 << 20, device='cuda')\n"
        f"s.export_cuda({{'w': t}}, {str(tmp_path / 'm.json')!r})\n"
    )
    env = dict(ENV, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode != 0
    assert "expandable_segments" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "m.json").exists()
