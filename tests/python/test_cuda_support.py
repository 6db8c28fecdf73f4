"""What a build of the core says about its CUDA support, and `--device cuda` refused when the options are
parsed (livetrain serve, the reference engine) when the core cannot run there: no CUDA support in the build,
no device (no driver, an old driver), or no code of this build for that GPU, each with the core's reason."""

import argparse
import json
import subprocess
import sys

import pytest

from livetrain import _core
from livetrain.trainer import options

from servers import ENV

V100_PROBLEM = (
    "Tesla V100-SXM2-32GB: this build of livetrain has no code for a sm_70 GPU "
    "(it has: sm_80 sm_90a sm_100 compute_100)"
)


def usable_gpu() -> bool:
    return _core.cuda_device_problem(0) == ""


def test_cpu_and_malformed_values():
    assert options.device("cpu") == "cpu"
    for bad in ("gpu", "CPU", "cuda:", "cuda:x", "cuda:-1", "cuda0"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected cpu, cuda or cuda:N"):
            options.device(bad)


@pytest.mark.parametrize(
    "problem",
    [
        "livetrain was built without CUDA support (its core was compiled without nvcc, or with LIVETRAIN_CUDA=OFF)",
        "no CUDA device: the NVIDIA driver supports CUDA 12.8, older than the CUDA 13.0 runtime",
        V100_PROBLEM,
    ],
)
def test_refused_with_the_cores_reason(monkeypatch, problem):
    asked = []
    monkeypatch.setattr(_core, "cuda_device_problem", lambda ordinal: asked.append(ordinal) or problem)
    with pytest.raises(argparse.ArgumentTypeError) as e:
        options.device("cuda:1")
    assert str(e.value) == f"cuda:1: {problem}" and asked == [1]
    with pytest.raises(argparse.ArgumentTypeError, match=r"^cuda: "):
        options.device("cuda")
    assert asked == [1, 0]


def test_accepted_where_the_code_runs(monkeypatch):
    monkeypatch.setattr(_core, "cuda_device_problem", lambda ordinal: "" if ordinal == 0 else V100_PROBLEM)
    assert options.device("cuda") == "cuda" and options.device("cuda:0") == "cuda:0"
    with pytest.raises(argparse.ArgumentTypeError, match="sm_70"):
        options.device("cuda:1")


def test_this_build_reports_itself():
    summary = _core.cuda_support()
    devices, reason = _core.cuda_devices()
    if not _core.cuda_compiled():
        assert "built without CUDA support" in summary and reason == summary
    else:
        assert summary.startswith("CUDA ") and "kernels for" in summary
    if not _core.cuda_compiled():
        assert _core.cuda_device_problem(0) == summary
    elif not devices:
        assert reason and _core.cuda_device_problem(0) == f"no CUDA device: {reason}"
    for d in devices:
        assert bool(d["code"]) != bool(d["code_problem"]), d
        assert _core.cuda_device_problem(d["ordinal"]) == ("" if d["code"] else f"{d['name']}: {d['code_problem']}")
    assert "no CUDA device" in _core.cuda_device_problem(len(devices) + 1)


def test_devices_command_names_the_support(cli):
    r = subprocess.run([cli, "devices", "--json"], capture_output=True, text=True, timeout=60)
    doc = json.loads(r.stdout)
    assert doc["cuda_support"] == _core.cuda_support() and doc["compiled_with_cuda"] == _core.cuda_compiled()
    for d in doc["devices"]:
        assert d["code"] or d["code_problem"], d
    table = subprocess.run([cli, "devices"], capture_output=True, text=True, timeout=60).stdout
    assert table.splitlines()[0] == _core.cuda_support()
    if not _core.cuda_compiled():
        assert "no CUDA devices: livetrain was built without CUDA support" in table
    version = subprocess.run([cli, "--version"], capture_output=True, text=True, timeout=60).stdout
    assert version.strip().endswith(f"({_core.cuda_support()})")


@pytest.mark.skipif(usable_gpu(), reason="a GPU this build runs on is visible: --device cuda is accepted here")
@pytest.mark.parametrize("module", ["livetrain.serve", "livetrain.engines.reference"])
def test_cuda_refused_before_anything_loads(module, tmp_path):
    # The engine's required options point at nothing: the refusal comes first, from argument parsing.
    args = ["--device", "cuda", "--model", str(tmp_path / "no-model")]
    if module == "livetrain.engines.reference":
        args += ["--manifest", str(tmp_path / "m.json"), "--trainer-socket", str(tmp_path / "t.sock")]
    r = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "argument --device: cuda: " in last, last
    assert last.endswith(f"argument --device: cuda: {_core.cuda_device_problem(0)}"), last
    assert not (tmp_path / "m.json").exists()
